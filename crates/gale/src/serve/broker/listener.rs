//! The listening thread: subscribed to the channels of the topics this node has local
//! subscribers for, it forwards their messages as they come.
//!
//! With one primary, one connection subscribes (`SUBSCRIBE`) to every channel. In a Redis
//! Cluster, channels are sharded: each is subscribed (`SSUBSCRIBE`) on the primary that owns its
//! slot, one connection per primary. A channel whose connection fails, or that Redis
//! unsubscribes because its slot moved (a reshard), loses its home: the thread reads the slot
//! map again, subscribes it where it now lives, then forwards from the topic's log what was
//! published meanwhile; until every channel has a home, the broker counts as down.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use redis::{ConnectionAddr, ConnectionInfo};

use super::forward::split_exclusion;
use super::scripts::SubscribeCommands;
use super::topology::{COMMAND_TIMEOUT, Redis, address, connection_lost};
use super::{CONTROL_CHANNEL, Shared};

/// How long the listener waits for channel messages before it looks at its orders again.
pub(super) const POLL: Duration = Duration::from_millis(2);

/// Orders for the listening thread.
pub(super) enum Listen {
    /// Subscribe to a topic's channel; the answer says when Redis confirmed it.
    Subscribe(String, Sender<redis::RedisResult<()>>),
    /// Stop listening to a topic's channel.
    Unsubscribe(String),
}

/// The thread that owns the subscribed connections: it forwards messages as they come.
pub(super) struct Listener {
    /// Commands (catch-ups) and the slot map.
    pub(super) redis: Redis,
    pub(super) shared: Arc<Shared>,
    pub(super) ctl: Receiver<Listen>,
}

/// The listener's connections and the channels waiting for one.
#[derive(Default)]
struct State {
    /// Per node (index in the topology), its subscribed connection.
    subs: HashMap<usize, Sub>,
    /// Nodes subscribed to before: a connection to one again counts as a reconnect.
    seen: HashSet<usize>,
    /// Channels to subscribe (again): their connection failed, or their slot moved.
    homeless: BTreeSet<String>,
    /// When to try the homeless channels again.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Messages received while a subscription was being confirmed: handled after it (and
    /// after the catch-up that follows it).
    held: Vec<(usize, Resp)>,
}

impl Listener {
    pub(super) fn run(mut self) {
        let commands = self.shared.layout.subscribe_commands();
        let mut st = State { backoff: Duration::from_millis(100), ..State::default() };
        st.homeless.insert(CONTROL_CHANNEL.to_string());
        let mut down_reported = false;
        let mut turn = 0usize;
        loop {
            // Homes for the channels that lost theirs (at start: the control channel).
            if !st.homeless.is_empty() && st.retry_at.is_none_or(|t| Instant::now() >= t) {
                let failed = self.rehome(&mut st, commands);
                if st.homeless.is_empty() {
                    if down_reported {
                        tracing::info!("broker: subscribed in Redis again");
                    }
                    down_reported = false;
                } else if !down_reported {
                    down_reported = true;
                    let why = failed.map_or_else(String::new, |e| e.to_string());
                    tracing::warn!(
                        channels = st.homeless.len(),
                        "broker: cannot subscribe in Redis: {why}; retrying (live deliveries resume \
                         from the topic logs once it answers)"
                    );
                }
            }
            // Orders (with no connection to read, waited for).
            let order = if st.subs.is_empty() {
                match self.ctl.recv_timeout(POLL * 25) {
                    Ok(order) => Some(order),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                None
            };
            let mut next = order;
            loop {
                match next.take() {
                    Some(Listen::Subscribe(topic, ack)) => {
                        let channel = self.shared.layout.channel(&topic);
                        let result = self.subscribe(&mut st, commands, &channel);
                        self.release(&mut st, commands);
                        let _ = ack.send(result);
                    }
                    Some(Listen::Unsubscribe(topic)) => {
                        let channel = self.shared.layout.channel(&topic);
                        self.unsubscribe(&mut st, commands, &channel);
                    }
                    None => {}
                }
                match self.ctl.try_recv() {
                    Ok(order) => next = Some(order),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            self.shared.set_up(true, st.homeless.is_empty());
            // Then messages: one connection (each in turn) is waited on for up to POLL, the
            // others are read without waiting, so that orders are looked at every POLL however
            // many primaries there are.
            let mut nodes: Vec<usize> = st.subs.keys().copied().collect();
            nodes.sort_unstable();
            if !nodes.is_empty() {
                let first = turn % nodes.len();
                nodes.rotate_left(first);
            }
            turn = turn.wrapping_add(1);
            for (i, node) in nodes.into_iter().enumerate() {
                let mut wait = (i == 0).then_some(POLL);
                while let Some(sub) = st.subs.get_mut(&node) {
                    match sub.read(wait.take()) {
                        Ok(Some(value)) => {
                            let State { subs, homeless, .. } = &mut st;
                            let channels = &mut subs.get_mut(&node).expect("read above").channels;
                            self.dispatch(commands, value, channels, homeless);
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(node = %address(self.redis.info(node)), "broker: Redis subscription lost: {e}");
                            self.lose(&mut st, node);
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Subscribe `channel` on the node that serves it, following redirections; messages that
    /// come meanwhile are held (`release` handles them).
    fn subscribe(
        &mut self,
        st: &mut State,
        commands: SubscribeCommands,
        channel: &str,
    ) -> redis::RedisResult<()> {
        let slot = match self.shared.layout.topic_of(channel) {
            Some(topic) => self.shared.layout.slot(topic),
            None => self.shared.layout.control_slot(),
        };
        let mut last = None;
        for _ in 0..4 {
            let node = self.redis.node_of(slot)?;
            if !st.subs.contains_key(&node) {
                let sub = Sub::connect(self.redis.info(node)).inspect_err(|_| self.redis.fail(node))?;
                if !st.seen.insert(node) {
                    self.shared.status.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                st.subs.insert(node, sub);
            }
            let sub = st.subs.get_mut(&node).expect("inserted above");
            let confirmed = sub.send(&[commands.subscribe, channel]).and_then(|()| {
                let deadline = Instant::now() + COMMAND_TIMEOUT;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "no confirmation from Redis"));
                    }
                    match sub.read(Some(left))? {
                        Some(Resp::Array(items))
                            if is_reply(&items, &commands.subscribe.to_lowercase(), channel) =>
                        {
                            return Ok(None);
                        }
                        Some(Resp::Error(e)) => return Ok(Some(e)),
                        Some(other) => st.held.push((node, other)),
                        None => {}
                    }
                }
            });
            match confirmed {
                Ok(None) => {
                    sub.channels.insert(channel.to_string());
                    return Ok(());
                }
                // Not this node's slot (the map is stale): read it again, and try there.
                Ok(Some(e)) if e.starts_with("MOVED ") => {
                    let _ = self.redis.check();
                    last = Some(e);
                }
                Ok(Some(e)) => {
                    return Err(io::Error::other(format!("Redis refused to subscribe: {e}")).into());
                }
                Err(e) => {
                    self.lose(st, node);
                    return Err(e.into());
                }
            }
        }
        Err(io::Error::other(format!("Redis refused to subscribe: {}", last.unwrap_or_default())).into())
    }

    /// Stop listening to `channel` (nothing if it has no home).
    fn unsubscribe(&mut self, st: &mut State, commands: SubscribeCommands, channel: &str) {
        st.homeless.remove(channel);
        let home = st.subs.iter_mut().find(|(_, s)| s.channels.contains(channel)).map(|(n, _)| *n);
        let Some(node) = home else { return };
        let sub = st.subs.get_mut(&node).expect("found above");
        // Out of its set first: the confirmation, when it comes, is then known as ours.
        sub.channels.remove(channel);
        if sub.send(&[commands.unsubscribe, channel]).is_err() {
            self.lose(st, node);
        }
    }

    /// A node's connection failed: its channels wait for a home.
    fn lose(&mut self, st: &mut State, node: usize) {
        if let Some(sub) = st.subs.remove(&node) {
            st.homeless.extend(sub.channels);
        }
        self.redis.fail(node);
        st.retry_at = None;
    }

    /// Subscribe the channels that lost their home where they live now, then forward what
    /// their topics published meanwhile, then the messages held.
    fn rehome(&mut self, st: &mut State, commands: SubscribeCommands) -> Option<redis::RedisError> {
        let mut rehomed = HashSet::new();
        let failed = self.redis.check().err().or_else(|| {
            let mut failed = None;
            for channel in st.homeless.clone() {
                match self.subscribe(st, commands, &channel) {
                    Ok(()) => {
                        st.homeless.remove(&channel);
                        rehomed.insert(channel);
                    }
                    Err(e) => failed = Some(e),
                }
            }
            failed
        });
        // Forward what the rehomed topics published meanwhile, while holding the topics so
        // that nothing newer is forwarded first.
        let shared = self.shared.clone();
        let mut topics = shared.topics();
        let names: Vec<String> =
            topics.keys().filter(|t| rehomed.contains(&shared.layout.channel(t))).cloned().collect();
        for topic in names {
            let slot = shared.layout.slot(&topic);
            match self.redis.run(slot, |c| shared.catch_up(c, &mut topics, &topic)) {
                Ok(()) => {}
                // Caught up at the next attempt.
                Err(e) if connection_lost(&e) => {
                    st.homeless.insert(shared.layout.channel(&topic));
                }
                // One topic whose keys Redis cannot read must not keep the node down.
                Err(e) => tracing::warn!(topic, error = %e, "cannot catch up on a topic"),
            }
        }
        drop(topics);
        self.release(st, commands);
        if failed.is_none() && st.homeless.is_empty() {
            st.backoff = Duration::from_millis(100);
            st.retry_at = None;
        } else {
            if let Some(e) = &failed {
                tracing::debug!("broker: cannot subscribe in Redis: {e}");
            }
            st.retry_at = Some(Instant::now() + st.backoff);
            st.backoff = (st.backoff * 2).min(Duration::from_secs(1));
        }
        failed
    }

    /// Handle the messages held while subscriptions were confirmed.
    fn release(&mut self, st: &mut State, commands: SubscribeCommands) {
        for (node, value) in std::mem::take(&mut st.held) {
            let State { subs, homeless, .. } = &mut *st;
            let mut none = HashSet::new();
            let channels = subs.get_mut(&node).map_or(&mut none, |s| &mut s.channels);
            self.dispatch(commands, value, channels, homeless);
        }
    }

    /// Handle one value from a subscribed connection whose channels are `channels`: a message
    /// is forwarded (or applied, on the control channel); an unsubscription this node did not
    /// ask for (its slot moved away) sends the channel to `homeless`.
    fn dispatch(
        &self,
        commands: SubscribeCommands,
        value: Resp,
        channels: &mut HashSet<String>,
        homeless: &mut BTreeSet<String>,
    ) {
        let items = match value {
            Resp::Array(items) => items,
            Resp::Error(e) => {
                tracing::warn!("broker: Redis said on a subscribed connection: {e}");
                return;
            }
            _ => return,
        };
        let text = |i: usize| match items.get(i) {
            Some(Resp::Text(t)) => std::str::from_utf8(t).ok(),
            _ => None,
        };
        let (Some(kind), Some(channel)) = (text(0), text(1)) else { return };
        if kind == commands.message {
            let Some(payload) = text(2) else {
                tracing::warn!(channel, "ignoring a message that is not UTF-8 text");
                return;
            };
            if channel == CONTROL_CHANNEL {
                self.shared.control(payload);
            } else if let Some(topic) = self.shared.layout.topic_of(channel) {
                let (delivery, exclude) = split_exclusion(payload, &self.shared.node);
                let mut topics = self.shared.topics();
                self.shared.forward(&mut topics, topic, delivery, exclude);
            }
        } else if kind == commands.unsubscribe.to_lowercase() && channels.remove(channel) {
            tracing::info!(channel, "broker: the channel's slot moved; subscribing where it lives now");
            homeless.insert(channel.to_string());
        }
    }
}

/// Whether `items` is the confirmation `kind` (`subscribe`, `ssubscribe`) of `channel`.
fn is_reply(items: &[Resp], kind: &str, channel: &str) -> bool {
    matches!(items, [Resp::Text(k), Resp::Text(c), ..] if k == kind.as_bytes() && c == channel.as_bytes())
}

/// A value of the Redis protocol (RESP2) as a subscribed connection receives it.
#[derive(Debug, PartialEq)]
enum Resp {
    /// A simple or bulk string.
    Text(Vec<u8>),
    /// An error reply.
    Error(String),
    Int(i64),
    Nil,
    Array(Vec<Resp>),
}

/// Arrays nested deeper than this are refused (pub/sub messages nest one level).
const MAX_DEPTH: usize = 8;

/// The first value in `buf` and the bytes it takes; `None` if it has not arrived whole.
fn parse(buf: &[u8]) -> Result<Option<(Resp, usize)>, String> {
    parse_nested(buf, 0)
}

fn parse_nested(buf: &[u8], depth: usize) -> Result<Option<(Resp, usize)>, String> {
    if depth > MAX_DEPTH {
        return Err("replies nested too deep".to_string());
    }
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
    if end == 0 {
        return Err("a reply line without a type".to_string());
    }
    let line = std::str::from_utf8(&buf[1..end]).map_err(|_| "a reply line is not UTF-8".to_string())?;
    let next = end + 2;
    let number = || line.parse::<i64>().map_err(|_| format!("not a number: {line:?}"));
    let value = match buf[0] {
        b'+' => (Resp::Text(line.as_bytes().to_vec()), next),
        b'-' => (Resp::Error(line.to_string()), next),
        b':' => (Resp::Int(number()?), next),
        b'$' => match usize::try_from(number()?) {
            Err(_) => (Resp::Nil, next),
            Ok(len) => {
                if buf.len() < next + len + 2 {
                    return Ok(None);
                }
                (Resp::Text(buf[next..next + len].to_vec()), next + len + 2)
            }
        },
        b'*' => match usize::try_from(number()?) {
            Err(_) => (Resp::Nil, next),
            Ok(n) => {
                let (mut items, mut at) = (Vec::with_capacity(n.min(16)), next);
                for _ in 0..n {
                    let Some((item, used)) = parse_nested(&buf[at..], depth + 1)? else { return Ok(None) };
                    items.push(item);
                    at += used;
                }
                (Resp::Array(items), at)
            }
        },
        other => return Err(format!("unexpected reply byte {other:#04x}")),
    };
    Ok(Some(value))
}

/// A subscribed connection to one node: its socket, what it has received and not yet parsed,
/// and the channels subscribed on it.
struct Sub {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Where a read lands before it joins `buf`: made once, not zeroed again for every read
    /// (the listener reads every connection every `POLL`, most times finding nothing).
    chunk: Box<[u8]>,
    channels: HashSet<String>,
}

impl Sub {
    /// Connect to a node (and authenticate, as its URL says).
    fn connect(info: &ConnectionInfo) -> io::Result<Sub> {
        let ConnectionAddr::Tcp(host, port) = info.addr() else {
            return Err(io::Error::other("only TCP addresses are supported"));
        };
        let addr = (host.as_str(), *port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::other(format!("{host} has no address")))?;
        let stream = TcpStream::connect_timeout(&addr, COMMAND_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(COMMAND_TIMEOUT))?;
        let chunk = vec![0; 16 * 1024].into_boxed_slice();
        let mut sub = Sub { stream, buf: Vec::new(), chunk, channels: HashSet::new() };
        let settings = info.redis_settings();
        if let Some(password) = settings.password() {
            match settings.username() {
                Some(user) => sub.send(&["AUTH", user, password])?,
                None => sub.send(&["AUTH", password])?,
            }
            match sub.read(Some(COMMAND_TIMEOUT))? {
                Some(Resp::Text(_)) => {}
                Some(Resp::Error(e)) => return Err(io::Error::other(format!("Redis refused AUTH: {e}"))),
                _ => return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer to AUTH")),
            }
        }
        Ok(sub)
    }

    /// Send one command.
    fn send(&mut self, args: &[&str]) -> io::Result<()> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        self.stream.write_all(&out)
    }

    /// The next value: one already received, else one that arrives within `wait` (`None`:
    /// only what the socket holds now). `Ok(None)`: none yet.
    fn read(&mut self, wait: Option<Duration>) -> io::Result<Option<Resp>> {
        loop {
            if let Some((value, used)) = parse(&self.buf).map_err(io::Error::other)? {
                self.buf.drain(..used);
                return Ok(Some(value));
            }
            match wait {
                Some(t) => {
                    self.stream.set_nonblocking(false)?;
                    self.stream.set_read_timeout(Some(t.max(Duration::from_millis(1))))?;
                }
                None => self.stream.set_nonblocking(true)?,
            }
            match self.stream.read(&mut self.chunk) {
                Ok(0) => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "Redis closed the connection"));
                }
                Ok(n) => self.buf.extend_from_slice(&self.chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Ok(None);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Resp, parse};

    #[test]
    fn replies_are_parsed_only_once_whole() {
        let msg = b"*3\r\n$8\r\nsmessage\r\n$8\r\ngale:{t}\r\n$4\r\na\r\nb\r\n:1\r\n";
        let (value, used) = parse(msg).unwrap().unwrap();
        let text = |s: &[u8]| Resp::Text(s.to_vec());
        assert_eq!(value, Resp::Array(vec![text(b"smessage"), text(b"gale:{t}"), text(b"a\r\nb")]));
        assert_eq!(&msg[used..], b":1\r\n");
        for cut in 0..used {
            assert_eq!(parse(&msg[..cut]).unwrap(), None, "{cut} bytes");
        }
        assert_eq!(parse(b"-MOVED 1 h:2\r\n").unwrap().unwrap().0, Resp::Error("MOVED 1 h:2".into()));
        assert_eq!(parse(b"$-1\r\n").unwrap().unwrap().0, Resp::Nil);
        assert!(parse(b"\r\n").is_err());
        assert!(parse(&b"*1\r\n".repeat(100)).is_err());
        assert_eq!(parse(b":-3\r\n").unwrap().unwrap().0, Resp::Int(-3));
        assert!(parse(b"!x\r\n").is_err());
    }
}
