//! The connections to Redis: one primary (`redis://`), or the primaries of a Redis Cluster
//! (`redis+cluster://`), found from its slot map and followed as it changes (MOVED, ASK,
//! TRYAGAIN, a failover, nodes added); and how Redis's errors are told apart.
//!
//! A thin layer of its own over the `redis` crate's plain connections rather than the crate's
//! cluster client: the broker needs the slot map itself (to place sharded subscriptions on the
//! node that owns a channel, and to send each node one pipeline of the publishes for its
//! slots), it answers each pipelined script with its own result where the crate's cluster
//! pipeline fails whole on one script's error, and it answers 503 at once where the crate
//! retries with a backoff of its own.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Value};

use super::super::protocol::CommandError;
use super::BrokerStatus;
use super::scripts::SLOTS;

/// How long a Redis command may take before the broker counts Redis as unreachable.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// Redirections (MOVED, ASK) and TRYAGAIN answers followed for one command before it fails.
const REDIRECTS: usize = 5;

/// How long a node that failed is not tried again: requests for its slots fail at once
/// meanwhile instead of each waiting for a connection.
const NODE_RETRY: Duration = Duration::from_millis(200);

/// A slot no known node serves.
const UNSERVED: u16 = u16::MAX;

/// Where the broker's Redis is.
#[derive(Clone, Debug)]
pub enum Target {
    /// One primary: `redis://[USER:PASSWORD@]HOST:PORT[/DB]`.
    Single(ConnectionInfo),
    /// A Redis Cluster, found from any of these nodes:
    /// `redis+cluster://[USER:PASSWORD@]HOST:PORT,HOST:PORT,…`.
    Cluster(Vec<ConnectionInfo>),
}

impl Target {
    /// Read a broker URL; the error is one line naming what is wrong.
    pub fn parse(url: &str) -> Result<Target, String> {
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let (auth, hosts) = match rest.rsplit_once('@') {
                Some((auth, hosts)) => (format!("{auth}@"), hosts),
                None => (String::new(), rest),
            };
            let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
            if hosts.contains(['/', '?']) {
                return Err(format!("{url:?}: a cluster URL has no database or options"));
            }
            let mut seeds = Vec::new();
            for host in hosts.split(',') {
                if host.is_empty() {
                    return Err(format!("{url:?}: expected redis+cluster://HOST:PORT,HOST:PORT,…"));
                }
                let info = format!("redis://{auth}{host}")
                    .into_connection_info()
                    .map_err(|e| format!("{url:?}: node {host:?}: {e}"))?;
                seeds.push(info);
            }
            Ok(Target::Cluster(seeds))
        } else if url.starts_with("redis://") {
            url.into_connection_info().map(Target::Single).map_err(|e| format!("{url:?}: {e}"))
        } else {
            Err(format!("{url:?} is not a redis://HOST:PORT or redis+cluster://HOST:PORT,… URL"))
        }
    }

    /// A Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster(_))
    }

    /// The nodes to start from.
    pub(super) fn seeds(&self) -> Vec<ConnectionInfo> {
        match self {
            Target::Single(info) => vec![info.clone()],
            Target::Cluster(seeds) => seeds.clone(),
        }
    }
}

/// `host:port` of a node, for logs and for telling nodes apart.
pub(super) fn address(info: &ConnectionInfo) -> String {
    match info.addr() {
        ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        other => other.to_string(),
    }
}

/// One node: how to reach it, and its connection, made when first needed and dropped when it
/// fails.
pub(super) struct Node {
    pub(super) info: ConnectionInfo,
    conn: Option<redis::Connection>,
    /// Not tried again before this (it failed).
    retry_at: Option<Instant>,
    /// Connected to before: a new connection counts as a reconnect.
    was_connected: bool,
}

impl Node {
    fn new(info: ConnectionInfo) -> Node {
        Node { info, conn: None, retry_at: None, was_connected: false }
    }
}

/// A redirection Redis answered instead of running a command.
enum Redirect {
    /// The slot is served by this node now (the slot map is stale).
    Moved(u16, String, u16),
    /// The slot is moving: ask this node, this once.
    Ask(String, u16),
    /// The slot is moving and the command's keys are split: try again shortly.
    TryAgain,
}

/// The redirection in an error's code and detail (`MOVED 3999 127.0.0.1:6381`), if any.
fn redirect(code: Option<&str>, detail: Option<&str>) -> Option<Redirect> {
    let node = |s: &str| {
        let (host, port) = s.rsplit_once(':')?;
        Some((host.to_string(), port.parse().ok()?))
    };
    match code? {
        "MOVED" => {
            let (slot, to) = detail?.split_once(' ')?;
            let (host, port) = node(to)?;
            Some(Redirect::Moved(slot.parse().ok()?, host, port))
        }
        "ASK" => {
            let (_, to) = detail?.split_once(' ')?;
            let (host, port) = node(to)?;
            Some(Redirect::Ask(host, port))
        }
        "TRYAGAIN" => Some(Redirect::TryAgain),
        _ => None,
    }
}

/// An error's redirection (of a pipeline's error: of its first failed command, as all its
/// commands are for one slot).
fn redirect_of(e: &redis::RedisError) -> Option<Redirect> {
    redirect(e.code(), e.detail()).or_else(|| {
        let failed = e.clone().into_server_errors()?;
        let (_, first) = failed.first()?;
        redirect(Some(first.code()), first.details())
    })
}

/// Redis's answer to `EVALSHA` of a script it does not hold.
const NOSCRIPT: &str = "NOSCRIPT";

/// Whether Redis did not run a command (or a pipeline's first failed one) because it does not
/// hold its script: loaded, the command can be sent again.
fn no_script(e: &redis::RedisError) -> bool {
    e.code() == Some(NOSCRIPT)
        || e.clone()
            .into_server_errors()
            .is_some_and(|failed| failed.first().is_some_and(|(_, first)| first.code() == NOSCRIPT))
}

/// A pipelined command's answer: Redis's (a value, or an error it answered), or `Err(why)`
/// when it is not known whether it ran (the connection failed).
pub(super) type Answer = Result<Value, String>;

/// The broker's way to Redis: the nodes, and which one serves each slot.
pub(super) struct Redis {
    cluster: bool,
    nodes: Vec<Node>,
    /// Per slot, its primary's index in `nodes` (cluster only).
    slots: Vec<u16>,
    /// Changed whenever `slots` changes: what is derived from the slot map is made again.
    generation: u64,
    /// What a node found in a slot map shares with the seeds (credentials).
    template: ConnectionInfo,
    /// Where reconnects are counted.
    status: Arc<BrokerStatus>,
    /// The texts of the scripts the broker calls by SHA1: loaded on a node that answers
    /// `NOSCRIPT`.
    scripts: Vec<String>,
}

impl Redis {
    /// Redis at `target`; nothing is connected yet.
    pub(super) fn new(target: &Target, status: Arc<BrokerStatus>) -> Redis {
        let seeds = target.seeds();
        let template = seeds[0].clone();
        let nodes = seeds.into_iter().map(Node::new).collect();
        let slots = if target.is_cluster() { vec![UNSERVED; SLOTS] } else { Vec::new() };
        Redis {
            cluster: target.is_cluster(),
            nodes,
            slots,
            generation: 0,
            template,
            status,
            scripts: Vec::new(),
        }
    }

    /// Load `scripts` on a node that answers `NOSCRIPT`.
    pub(super) fn with_scripts(mut self, scripts: Vec<String>) -> Redis {
        self.scripts = scripts;
        self
    }

    /// Load every script on node `node` (`SCRIPT LOAD`, pipelined): it answered `NOSCRIPT`.
    fn load_scripts(&mut self, node: usize) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for text in &self.scripts {
            pipe.cmd("SCRIPT").arg("LOAD").arg(text);
        }
        let loaded = self.conn(node).and_then(|c| pipe.query::<Vec<String>>(c));
        match loaded {
            Ok(loaded) => {
                tracing::info!(
                    node = address(&self.nodes[node].info),
                    scripts = loaded.len(),
                    "broker: scripts loaded"
                );
                Ok(())
            }
            Err(e) => {
                if connection_lost(&e) {
                    self.fail(node);
                }
                Err(e)
            }
        }
    }

    /// Which version of the slot map this is: it changes whenever the map does.
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// The primaries that serve slots, each with its slots (cluster only).
    pub(super) fn slots_by_node(&self) -> Vec<(usize, Vec<u16>)> {
        let mut by_node: Vec<(usize, Vec<u16>)> = Vec::new();
        for (slot, &node) in self.slots.iter().enumerate() {
            if node == UNSERVED {
                continue;
            }
            let node = usize::from(node);
            match by_node.iter_mut().find(|(n, _)| *n == node) {
                Some((_, slots)) => slots.push(slot as u16),
                None => by_node.push((node, vec![slot as u16])),
            }
        }
        by_node
    }

    /// Node `node`'s `host:port`, for logs.
    pub(super) fn describe_node(&self, node: usize) -> String {
        address(&self.nodes[node].info)
    }

    /// The seeds, for logs.
    pub(super) fn describe(&self) -> String {
        self.nodes.iter().map(|n| address(&n.info)).collect::<Vec<_>>().join(",")
    }

    /// Connect: to the primary, or to a node of the cluster to read its slot map.
    pub(super) fn connect(&mut self) -> redis::RedisResult<()> {
        if self.cluster {
            return self.refresh();
        }
        self.nodes[0].retry_at = None;
        self.check()
    }

    /// Check that Redis answers; in a cluster, read the slot map again (a failover, nodes
    /// added, slots moved).
    pub(super) fn check(&mut self) -> redis::RedisResult<()> {
        if self.cluster {
            return self.refresh();
        }
        self.run(0, |c| redis::cmd("PING").query::<String>(c)).map(drop)
    }

    /// Read the slot map from the first node that answers (those known, then the seeds).
    fn refresh(&mut self) -> redis::RedisResult<()> {
        let mut last: Option<redis::RedisError> = None;
        for i in 0..self.nodes.len() {
            // A node that failed a moment ago is asked last, if at all.
            if self.nodes[i].retry_at.is_some_and(|t| Instant::now() < t) {
                continue;
            }
            let host = match self.nodes[i].info.addr() {
                ConnectionAddr::Tcp(host, _) => host.clone(),
                _ => String::new(),
            };
            let map = self.conn(i).and_then(|c| redis::cmd("CLUSTER").arg("SLOTS").query::<Vec<Value>>(c));
            match map {
                Ok(map) => return self.apply(map, &host),
                Err(e) => {
                    if connection_lost(&e) {
                        self.fail(i);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| lost("no node of the cluster answers")))
    }

    /// Take a `CLUSTER SLOTS` answer as the slot map (`asked`: the host of the node that gave
    /// it, for primaries it names without one).
    fn apply(&mut self, map: Vec<Value>, asked: &str) -> redis::RedisResult<()> {
        let mut slots = vec![UNSERVED; SLOTS];
        for range in map {
            // [first, last, [host, port, id, …], replicas…]
            let parsed = (|| {
                let mut range = redis::from_redis_value::<Vec<Value>>(range).ok()?.into_iter();
                let first: u16 = redis::from_redis_value(range.next()?).ok()?;
                let last: u16 = redis::from_redis_value(range.next()?).ok()?;
                let mut primary = redis::from_redis_value::<Vec<Value>>(range.next()?).ok()?.into_iter();
                let host: String = redis::from_redis_value(primary.next()?).ok()?;
                let port: u16 = redis::from_redis_value(primary.next()?).ok()?;
                Some((first, last, (host, port)))
            })();
            let Some((first, last, (host, port))) = parsed else {
                return Err(lost("unexpected CLUSTER SLOTS answer"));
            };
            let host = if host.is_empty() || host == "?" { asked.to_string() } else { host };
            let node = self.node_at(&host, port);
            for s in first..=last.min(SLOTS as u16 - 1) {
                slots[usize::from(s)] = node;
            }
        }
        if self.slots != slots {
            self.slots = slots;
            self.generation += 1;
        }
        Ok(())
    }

    /// The index of the node at `host:port`, added if new.
    fn node_at(&mut self, host: &str, port: u16) -> u16 {
        let found = self
            .nodes
            .iter()
            .position(|n| matches!(n.info.addr(), ConnectionAddr::Tcp(h, p) if h == host && *p == port));
        let i = found.unwrap_or_else(|| {
            let info = self.template.clone().set_addr(ConnectionAddr::Tcp(host.to_string(), port));
            self.nodes.push(Node::new(info));
            self.nodes.len() - 1
        });
        i as u16
    }

    /// The node that serves `slot`.
    pub(super) fn node_of(&self, slot: u16) -> redis::RedisResult<usize> {
        if !self.cluster {
            return Ok(0);
        }
        match self.slots[usize::from(slot)] {
            UNSERVED => Err(lost(&format!("no node serves slot {slot}"))),
            node => Ok(usize::from(node)),
        }
    }

    /// The connection information of node `node`.
    pub(super) fn info(&self, node: usize) -> &ConnectionInfo {
        &self.nodes[node].info
    }

    /// The connection to node `node`, made if needed.
    pub(super) fn conn(&mut self, node: usize) -> redis::RedisResult<&mut redis::Connection> {
        let n = &mut self.nodes[node];
        if n.conn.is_none() {
            if n.retry_at.is_some_and(|t| Instant::now() < t) {
                return Err(lost(&format!("{} failed a moment ago", address(&n.info))));
            }
            match command_connection(&n.info) {
                Ok(c) => {
                    if n.was_connected {
                        self.status.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    n.was_connected = true;
                    n.conn = Some(c);
                }
                Err(e) => {
                    n.retry_at = Some(Instant::now() + NODE_RETRY);
                    return Err(e);
                }
            }
        }
        Ok(n.conn.as_mut().expect("connected above"))
    }

    /// Drop node `node`'s connection after a failure; it is not tried again for a moment.
    pub(super) fn fail(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        n.conn = None;
        n.retry_at = Some(Instant::now() + NODE_RETRY);
    }

    /// Follow a redirection: the node to ask next, and whether to send it `ASKING` first.
    fn follow(&mut self, r: Redirect) -> Option<(usize, bool)> {
        match r {
            Redirect::Moved(slot, host, port) => {
                let node = self.node_at(&host, port);
                if self.cluster {
                    let owner = &mut self.slots[usize::from(slot) % SLOTS];
                    if *owner != node {
                        *owner = node;
                        self.generation += 1;
                    }
                }
                Some((usize::from(node), false))
            }
            Redirect::Ask(host, port) => Some((usize::from(self.node_at(&host, port)), true)),
            Redirect::TryAgain => {
                std::thread::sleep(Duration::from_millis(10));
                None
            }
        }
    }

    /// Run `f` on the connection of the node that serves `slot`, following redirections (the
    /// commands `f` sends are not run where Redis redirects them, so running `f` again is
    /// safe), and loading the scripts where Redis does not hold one (`NOSCRIPT`: the script
    /// did not run). A lost connection is dropped, to be made again.
    pub(super) fn run<T>(
        &mut self,
        slot: u16,
        mut f: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        let mut next: Option<(usize, bool)> = None;
        let mut last = None;
        let mut loaded = false;
        for _ in 0..REDIRECTS {
            let (node, asking) = match next.take() {
                Some(n) => n,
                None => (self.node_of(slot)?, false),
            };
            let conn = self.conn(node)?;
            let result =
                if asking { redis::cmd("ASKING").query::<()>(conn).and_then(|()| f(conn)) } else { f(conn) };
            match result {
                Err(e) => match redirect_of(&e) {
                    Some(r) => {
                        next = self.follow(r);
                        last = Some(e);
                    }
                    None if !loaded && no_script(&e) => {
                        loaded = true;
                        self.load_scripts(node)?;
                        next = Some((node, asking));
                        last = Some(e);
                    }
                    None => {
                        if connection_lost(&e) {
                            self.fail(node);
                        }
                        return Err(e);
                    }
                },
                ok => return ok,
            }
        }
        Err(last.unwrap_or_else(|| lost("too many redirections")))
    }

    /// Run `cmds` (each with its slot), one pipeline per node, each followed by `WAIT` for
    /// `ack` replicas if given, and answer each in order. Every node's pipeline is written
    /// before any answer is read, so the nodes work at the same time: one round trip in all. A
    /// command Redis redirects, or does not run for want of its script (`NOSCRIPT`: loaded
    /// then), is run again where it goes; where `WAIT` counts fewer replicas than asked, the
    /// node's commands are answered `NOREPLICAS` (they ran on the primary). The error is the
    /// first lost connection, if any (its node's commands are answered `Err`).
    pub(super) fn pipeline(
        &mut self,
        cmds: &[(u16, redis::Cmd)],
        ack: Option<(usize, Duration)>,
    ) -> (Vec<Answer>, Option<redis::RedisError>) {
        let mut answers: Vec<Answer> = vec![Err(String::new()); cmds.len()];
        let mut lost_conn = None;
        let mut by_node: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, (slot, _)) in cmds.iter().enumerate() {
            match self.node_of(*slot) {
                Ok(node) => match by_node.iter_mut().find(|(n, _)| *n == node) {
                    Some((_, indexes)) => indexes.push(i),
                    None => by_node.push((node, vec![i])),
                },
                Err(e) => answers[i] = Err(e.to_string()),
            }
        }
        // A node's connection failed: its commands are answered with why.
        let failed = |redis: &mut Redis,
                      (answers, lost_conn): (&mut Vec<Answer>, &mut Option<redis::RedisError>),
                      node: usize,
                      indexes: &[usize],
                      e: redis::RedisError| {
            if connection_lost(&e) {
                redis.fail(node);
            }
            for &i in indexes {
                answers[i] = Err(e.to_string());
            }
            lost_conn.get_or_insert(e);
        };
        // Written, all of them.
        let mut sent = Vec::with_capacity(by_node.len());
        let mut packed = Vec::new();
        for (node, indexes) in by_node {
            // Each command packed straight into the node's pipeline (no copy of the command).
            packed.clear();
            for &i in &indexes {
                cmds[i].1.write_packed_command(&mut packed);
            }
            if let Some((n, timeout)) = ack {
                redis::cmd("WAIT").arg(n).arg(timeout.as_millis() as u64).write_packed_command(&mut packed);
            }
            match self.conn(node).and_then(|c| c.send_packed_command(&packed)) {
                Ok(()) => {
                    self.status.pipelines.fetch_add(1, Ordering::Relaxed);
                    self.status.pipelined.fetch_add(indexes.len() as u64, Ordering::Relaxed);
                    sent.push((node, indexes))
                }
                Err(e) => failed(self, (&mut answers, &mut lost_conn), node, &indexes, e),
            }
        }
        // Then read, node after node, the last written first: nodes tend to answer in the order
        // they were written to, so by the time the last answer is in, the others most often
        // are too, and the thread sleeps once per batch rather than once per node.
        let mut again = Vec::new();
        let mut unloaded = Vec::new();
        for (node, indexes) in sent.into_iter().rev() {
            let expected = indexes.len() + usize::from(ack.is_some());
            let result = self.conn(node).and_then(|c| (0..expected).map(|_| c.recv_response()).collect());
            let mut values: Vec<Value> = match result {
                Ok(values) => values,
                Err(e) => {
                    failed(self, (&mut answers, &mut lost_conn), node, &indexes, e);
                    continue;
                }
            };
            let acked = ack.is_none_or(|(n, _)| {
                let waited = values.pop().and_then(|v| redis::from_redis_value::<usize>(v).ok());
                waited.is_some_and(|got| got >= n)
            });
            for (&i, value) in indexes.iter().zip(values) {
                match &value {
                    Value::ServerError(e) if redirect(Some(e.code()), e.details()).is_some() => again.push(i),
                    Value::ServerError(e) if e.code() == NOSCRIPT => {
                        again.push(i);
                        if !unloaded.contains(&node) {
                            unloaded.push(node);
                        }
                    }
                    Value::ServerError(_) => answers[i] = Ok(value),
                    _ if !acked => answers[i] = Ok(not_acknowledged(ack)),
                    _ => answers[i] = Ok(value),
                }
            }
        }
        for node in unloaded {
            // Not loaded: the commands run again below meet `NOSCRIPT` again, and `run` tries.
            let _ = self.load_scripts(node);
        }
        again.sort_unstable();
        // Redirected or reloaded: one at a time, in order, where Redis says.
        for i in again {
            let (slot, cmd) = &cmds[i];
            let result = self.run(*slot, |c| {
                let mut pipe = redis::pipe();
                pipe.add_command(cmd.clone());
                if let Some((n, timeout)) = ack {
                    pipe.cmd("WAIT").arg(n).arg(timeout.as_millis() as u64);
                }
                let mut values: Vec<Value> = pipe.ignore_errors().query(c)?;
                let got = ack.map(|_| values.pop().and_then(|v| redis::from_redis_value::<usize>(v).ok()));
                let value = values.pop().unwrap_or(Value::Nil);
                // Redirected again, or the script is missing: an error for `run` to follow.
                if let Value::ServerError(_) = &value
                    && let Ok(Err(e)) = redis::from_redis_value::<redis::RedisResult<Value>>(value.clone())
                    && (redirect_of(&e).is_some() || no_script(&e))
                {
                    return Err(e);
                }
                let acked = ack.is_none_or(|(n, _)| got.flatten().is_some_and(|got| got >= n));
                Ok(if acked || matches!(value, Value::ServerError(_)) {
                    value
                } else {
                    not_acknowledged(ack)
                })
            });
            answers[i] = match result {
                Ok(value) => Ok(value),
                Err(e) if connection_lost(&e) => {
                    let why = e.to_string();
                    lost_conn.get_or_insert(e);
                    Err(why)
                }
                // Redis's own answer (the script refused): as it would be in the pipeline.
                Err(e) => Ok(error_value(&e)),
            };
        }
        (answers, lost_conn)
    }
}

/// Redis's `NOREPLICAS` error, for commands that ran on a primary that its replicas did not
/// acknowledge in time.
fn not_acknowledged(ack: Option<(usize, Duration)>) -> Value {
    let (n, timeout) = ack.unwrap_or_default();
    let text =
        format!("-NOREPLICAS not acknowledged by {n} replica(s) within {} ms\r\n", timeout.as_millis());
    redis::parse_redis_value(text.as_bytes()).unwrap_or(Value::Nil)
}

/// An error Redis answered, as the value a pipeline holds in its place.
fn error_value(e: &redis::RedisError) -> Value {
    let text = format!("-{}\r\n", server_reason(e).replace(['\r', '\n'], " "));
    redis::parse_redis_value(text.as_bytes()).unwrap_or(Value::Nil)
}

/// A lost connection, with why.
fn lost(why: &str) -> redis::RedisError {
    std::io::Error::other(why.to_string()).into()
}

/// A connection for commands, whose every command times out after [`COMMAND_TIMEOUT`].
pub(super) fn command_connection(info: &ConnectionInfo) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(info.clone())?;
    let cmd = client.get_connection_with_timeout(COMMAND_TIMEOUT)?;
    cmd.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    cmd.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    Ok(cmd)
}

/// An error Redis answered, as one line: its code and what it said.
pub(super) fn server_reason(e: &redis::RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => e.to_string(),
    }
}

/// Whether Redis refused for a while rather than for good (loading its data, busy with a
/// script, a replica or a primary without its replicas, out of memory, a cluster without a
/// majority or with a slot moving): worth a retry, so 503.
pub(super) fn is_transient(e: &redis::RedisError) -> bool {
    matches!(
        e.code(),
        Some(
            "LOADING"
                | "BUSY"
                | "READONLY"
                | "MASTERDOWN"
                | "OOM"
                | "NOREPLICAS"
                | "TRYAGAIN"
                | "CLUSTERDOWN"
                | "MOVED"
                | "ASK"
        )
    )
}

/// Whether the connection to Redis is gone (and must be made again), as opposed to Redis
/// answering one command with an error.
pub(super) fn connection_lost(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// The answer to a request that failed on a Redis error: 503 when Redis is unreachable or
/// refuses for a while, else 500 with what Redis said.
pub(super) fn redis_failed(e: &redis::RedisError) -> CommandError {
    if connection_lost(e) || is_transient(e) {
        unavailable(&server_reason(e))
    } else {
        CommandError::new(500, format!("Redis refused: {}", server_reason(e)))
    }
}

/// A request refused because Redis could not be used.
pub(super) fn unavailable(why: &str) -> CommandError {
    CommandError::new(503, format!("the broker is unavailable: {why}"))
}

#[cfg(test)]
mod tests {
    use super::{Redirect, Target, redirect};

    #[test]
    fn broker_urls_name_one_primary_or_the_nodes_of_a_cluster() {
        assert!(!Target::parse("redis://127.0.0.1:6379").unwrap().is_cluster());
        let Target::Cluster(seeds) = Target::parse("redis+cluster://u:pw@10.0.0.1:7000,h2:7001/").unwrap()
        else {
            panic!("not a cluster")
        };
        let addrs: Vec<_> = seeds.iter().map(super::address).collect();
        assert_eq!(addrs, ["10.0.0.1:7000", "h2:7001"]);
        assert_eq!(seeds[1].redis_settings().password(), Some("pw"));
        for bad in ["localhost:6379", "redis+cluster://", "redis+cluster://a:1,,b:2", "redis+cluster://a:1/0"]
        {
            let e = Target::parse(bad).unwrap_err();
            assert!(e.contains(bad) && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn redirections_are_read_from_redis_errors() {
        assert!(matches!(
            redirect(Some("MOVED"), Some("3999 127.0.0.1:6381")),
            Some(Redirect::Moved(3999, h, 6381)) if h == "127.0.0.1"
        ));
        assert!(matches!(redirect(Some("ASK"), Some("3999 h:1")), Some(Redirect::Ask(h, 1)) if h == "h"));
        assert!(matches!(redirect(Some("TRYAGAIN"), None), Some(Redirect::TryAgain)));
        assert!(redirect(Some("MOVED"), Some("x")).is_none());
        assert!(redirect(Some("ERR"), Some("3999 h:1")).is_none());
    }
}
