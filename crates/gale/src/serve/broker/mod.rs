//! Cluster mode: several gateways share topics through Redis (one primary, or a Redis Cluster).
//!
//! Two broker threads per node, each with its own Redis connection: one runs commands (publishes,
//! pipelined; subscriptions; topic info and history reads) as soon as the event loops ask, the other is
//! subscribed to the channels of the topics this node has local subscribers for and forwards
//! their messages as they come. Event loops never wait for
//! Redis: they send requests to the broker over a channel, and the broker answers through the
//! server's mailboxes (`ServerHandle::post_to`, deferred HTTP responses).
//!
//! In Redis, per topic `T`: `gale:T:seq` (the last sequence number), `gale:T:epoch` (set at the
//! first publish; a Redis that lost its data starts a new epoch), `gale:T:log` (a stream of the
//! last deliveries, entry id `seq-1`, trimmed to about the history size), and the channel `gale:T`;
//! over all topics, `gale:topics` (a sorted set of the topics with state, scored by when their keys
//! expire: `limits.max_topics` applies to it). A publish request is one Lua script for all its
//! topics — check, number, record, publish — so every node sees every topic's messages in one order
//! and a broadcast goes to all its topics or none; requests that queue up while Redis answers go
//! out together in one pipelined round trip, and each is answered with its own script's result.
//!
//! Exactly once per node: the broker forwards a message into the node's pub/sub only if its
//! sequence number is above the last one it forwarded for the topic. A local subscription is set up
//! by the broker thread itself, between two messages: it first makes sure the node is subscribed to
//! the channel, replays `(since, last forwarded]` from the stream to the client, then subscribes
//! the connection (`ServerHandle::subscribe`) before forwarding anything newer. Replays and
//! catch-ups read the stream in pages of `LOG_PAGE` entries; the subscribes that queue up
//! together (a reconnect storm) share their reads, made ahead for all their topics in one round
//! trip (at most a page and 64 KiB of each topic); a replay's reads stop, and it is refused, as
//! soon as it passes what the connection may queue. After a lost Redis connection the broker
//! resubscribes and forwards what it missed from the streams, so live subscribers see no gap as
//! long as the history covers the outage.
//!
//! In a Redis Cluster the keys are those above hash-tagged by topic (`gale:{T}:seq`, …), so that
//! a topic's keys and scripts stay on one shard; the registry is one sorted set per slot
//! (counted once a second by one read-only script per primary), the channels are sharded, each
//! thread keeps one connection per primary, and a lost node fails only the requests for its
//! slots (the broker counts as down while one does not answer). Scripts are called by their
//! SHA1 and loaded where Redis answers `NOSCRIPT`.
//!
//! The parts, one job each: [`scripts`] (the key layout and the Lua scripts), [`topology`] (the
//! connection to Redis), [`listener`] (the subscribed connection and its thread), [`forward`]
//! (forwarding into the loops, catch-up, subscriptions with recovery, history), [`replay`]
//! (recoveries' reads of the logs, shared by a batch of subscribes), [`publish`]
//! (pipelined publish scripts) and [`presence`]; this file holds the requests the loops send,
//! the broker's state and its command thread.

mod forward;
mod listener;
mod presence;
mod publish;
mod replay;
mod scripts;
mod topology;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use gale_server::{ConnId, HttpResponse, Responder, ServerHandle};

use super::api::json_error;
use super::gateway::{Client, GatewayStats};
use super::history::HistoryQuery;
use super::presence::{ListLimit, Member};
use super::protocol::{CommandError, error_reply};
use super::publish::{BatchReply, PublishOptions, item_result};
use super::topics::{Position, new_epoch};
use serde_json::value::RawValue;

use forward::{Forwarding, read_history};
use listener::{Listener, Orders};
use presence::read_presence;
use publish::TopicCounts;
use scripts::{Layout, Scripts};
use topology::{Redis, connection_lost, redis_failed, unavailable};

pub use topology::Target;

/// How this node keeps its clients' presence in Redis.
#[derive(Clone, Debug)]
pub struct PresenceConfig {
    /// This node's id (the prefix of its client ids).
    pub node: String,
    /// A node silent this long has its clients' presence forgotten; it refreshes it every
    /// quarter of it.
    pub ttl: Duration,
}

/// Where a presence read's answer goes.
pub enum PresenceReply {
    /// `GET /api/presence/{topic}` or `/api/presence_stats/{topic}`.
    Http(Responder),
    /// A client's `presence` or `presence_stats` command: its connection and command id.
    Client(ConnId, Option<Box<RawValue>>),
}

/// Where a publish's answer goes.
pub enum PublishReply {
    /// An HTTP request (one publish, or a broadcast to several topics).
    Http(Responder),
    /// A client's `publish` command: its connection and command id.
    Client(ConnId, Option<Box<RawValue>>),
    /// Item `.1` of `POST /api/publish_batch`.
    Batch(Arc<BatchReply>, usize),
}

/// Where a history read's answer goes.
pub enum HistoryReply {
    /// `GET /api/history/{topic}`.
    Http(Responder),
    /// A client's `history` command: its connection and command id.
    Client(ConnId, Option<Box<RawValue>>),
}

/// What the event loops ask the broker.
pub enum BrokerRequest {
    /// Publish `fragment` (`"data":…` or `"binary":…`) to each topic, in order; `opts` only
    /// with one topic.
    Publish { topics: Vec<String>, fragment: String, reply: PublishReply, opts: PublishOptions },
    /// Subscribe a connection, recovering from `since`.
    Subscribe {
        conn: ConnId,
        topic: String,
        since: Option<Position>,
        id: Option<Box<RawValue>>,
        max_replay: usize,
        /// The topic keeps presence: the connection's, and whether to send a join event.
        presence: Option<(Member, bool)>,
        /// Asked by the server (`POST /api/subscribe`), not by the client: answered with
        /// `"op": "subscribed"`.
        server: bool,
    },
    /// A connection left a topic that keeps presence; send a leave event if asked.
    Leave { topic: String, member: Member, join_leave: bool },
    /// Read a topic's presence: the list of members too, or only the counts.
    Presence { topic: String, list: bool, limit: ListLimit, reply: PresenceReply },
    /// Answer `GET /api/topics/{topic}`.
    TopicInfo { topic: String, subscribers: usize, reply: Responder },
    /// Read a page of a topic's history from its stream.
    History { topic: String, query: HistoryQuery, reply: HistoryReply },
    /// Send a control command (`message`) to the other nodes over [`CONTROL_CHANNEL`]; `done`
    /// learns how many nodes listen (this one included), or why it was not sent.
    Control { message: String, done: ControlDone },
}

/// Told the outcome of a [`BrokerRequest::Control`].
pub type ControlDone = Box<dyn FnOnce(Result<u64, CommandError>) + Send>;

/// What a node does with a control command from another node.
pub type ControlHandler = Box<dyn Fn(&str) + Send + Sync>;

/// The channel of control commands (server-side disconnects and subscriptions) between the
/// nodes: a message is the sending node's name, a newline, the command. No topic's channel
/// (`gale:T`) is this one.
pub const CONTROL_CHANNEL: &str = "gale#control";

/// What other threads can see of the broker.
#[derive(Default)]
pub struct BrokerStatus {
    /// Connections to Redis made after the first (by either broker thread).
    pub reconnects: AtomicU64,
    /// Publishes refused because Redis was unreachable.
    pub failed_publishes: AtomicU64,
    /// Messages forwarded from Redis into this node.
    pub forwarded: AtomicU64,
    /// Pipelines written to Redis nodes (one per node a batch of commands went to).
    pub pipelines: AtomicU64,
    /// Commands written in those pipelines.
    pub pipelined: AtomicU64,
    /// The listener's passes over the connections that brought messages (each wakes the loops
    /// at most once).
    pub listener_passes: AtomicU64,
    /// Ranges of topic logs read for recovering subscriptions: read ahead for a batch of
    /// subscribes (which share them), or by one subscribe.
    pub log_reads: AtomicU64,
    /// This node's subscriptions kept in presence.
    pub presence_members: AtomicU64,
    /// The listening connection is up.
    listen_up: AtomicBool,
    /// The command connection is up.
    command_up: AtomicBool,
}

impl BrokerStatus {
    /// Connected to Redis: both threads' connections are up.
    pub fn is_up(&self) -> bool {
        self.listen_up.load(Ordering::Relaxed) && self.command_up.load(Ordering::Relaxed)
    }
}

/// The loops' side of the broker.
pub struct BrokerHandle {
    tx: Sender<BrokerRequest>,
    /// Requests waiting past this are refused (leaves excepted).
    limit: usize,
    /// The broker's state.
    pub status: Arc<BrokerStatus>,
    /// Where the listener finds the handler of other nodes' control commands.
    control: Arc<std::sync::OnceLock<ControlHandler>>,
}

/// The most requests the command thread takes at once: the publishes among them go to Redis
/// together, and so do the reads of what the subscribes among them replay.
const BATCH: usize = 256;

/// Requests waiting for the broker past this are refused with 503 (Redis cannot keep up).
const QUEUE_LIMIT: usize = 100_000;

impl BrokerHandle {
    /// Send a request; false if it was refused (the queue is full, or the broker is gone),
    /// in which case an HTTP request in it has been answered 503. A leave is never refused
    /// for a full queue: dropped, it would leave a member in the cluster's presence for good
    /// (this node refreshes it); there is at most one per presence membership, and it keeps
    /// its place after the subscribe it ends.
    pub fn send(&self, request: BrokerRequest) -> bool {
        let sent = if matches!(request, BrokerRequest::Leave { .. }) || self.tx.len() < self.limit {
            self.tx.send(request).map_err(|e| e.into_inner())
        } else {
            Err(request)
        };
        match sent {
            Ok(()) => true,
            Err(request) => {
                let busy = "the broker is overloaded: Redis cannot keep up; retry later";
                match request {
                    BrokerRequest::Publish { reply: PublishReply::Http(r), .. } => {
                        r.respond(json_error(503, busy))
                    }
                    BrokerRequest::Publish { topics, reply: PublishReply::Batch(b, i), .. } => {
                        let topic = topics.first().map_or("", String::as_str);
                        b.fill(i, item_result(topic, Err(&CommandError::new(503, busy))))
                    }
                    BrokerRequest::TopicInfo { reply, .. }
                    | BrokerRequest::Presence { reply: PresenceReply::Http(reply), .. }
                    | BrokerRequest::History { reply: HistoryReply::Http(reply), .. } => {
                        reply.respond(json_error(503, busy))
                    }
                    _ => {}
                }
                false
            }
        }
    }

    /// Hand the control commands other nodes send to `handler` (those that come before are
    /// ignored: this node has no connections yet).
    pub fn on_control(&self, handler: ControlHandler) {
        let _ = self.control.set(handler);
    }
}

/// What the broker keeps in Redis, per topic and over the cluster.
pub struct RedisLimits {
    /// Messages kept per topic for recovery (`history.size`).
    pub history: usize,
    /// How long a topic's keys live after its last publish (`history.ttl`).
    pub ttl: Option<Duration>,
    /// The most topics with state in Redis (`limits.max_topics`, over the cluster).
    pub max_topics: usize,
    /// How long an idempotency key is remembered (`publish.idempotency_window`).
    pub idempotency_window: Duration,
    /// A publish is acknowledged once this many replicas have it, waiting at most this long
    /// (`cluster.ack_replicas`, `cluster.ack_timeout_ms`); `None`: once the primary has it.
    pub ack_replicas: Option<(usize, Duration)>,
}

/// Start the broker threads for Redis at `target`, keeping what `limits` say; counting into
/// `stats`.
pub fn start(
    target: &Target,
    handle: ServerHandle,
    limits: RedisLimits,
    stats: Arc<GatewayStats>,
    presence: PresenceConfig,
) -> Result<BrokerHandle, String> {
    let RedisLimits { history, ttl, max_topics, idempotency_window, ack_replicas } = limits;
    // Bounded by `BrokerHandle::send`, which lets leaves past the bound.
    let (tx, rx) = crossbeam_channel::unbounded();
    let status = Arc::new(BrokerStatus::default());
    let node = u64::from_str_radix(&new_epoch(), 16).unwrap_or_default();
    let control = Arc::new(std::sync::OnceLock::new());
    let shared = Arc::new(Shared {
        handle,
        status: status.clone(),
        stats,
        topics: Mutex::new(HashMap::new()),
        node: format!("{node:016x}"),
        control: control.clone(),
        layout: Layout::new(target.is_cluster()),
    });
    let (listener, orders) = Listener::new(Redis::new(target, status.clone()), shared.clone())
        .map_err(|e| format!("cannot start the broker's listener: {e}"))?;
    std::thread::Builder::new()
        .name("gale-broker-listen".into())
        .spawn(move || listener.run())
        .map_err(|e| format!("cannot start the broker thread: {e}"))?;
    let ttl_ms = ttl.map_or(0, |t| t.as_millis().max(1) as u64);
    let scripts = Scripts::new(&shared.layout);
    let broker = Broker {
        redis: Redis::new(target, status.clone()).with_scripts(scripts.texts(&shared.layout)),
        scripts,
        shared: shared.clone(),
        rx,
        listen: orders,
        history: history.max(1),
        ttl_ms,
        max_topics,
        topic_counts: TopicCounts::default(),
        idempotency_window,
        ack_replicas,
        presence,
        present: HashMap::new(),
        leaves: RefCell::new(Vec::new()),
        rejoin: false,
        log_spans: replay::LogSpans::default(),
    };
    std::thread::Builder::new()
        .name("gale-broker".into())
        .spawn(move || broker.run())
        .map_err(|e| format!("cannot start the broker thread: {e}"))?;
    Ok(BrokerHandle { tx, limit: QUEUE_LIMIT, status, control })
}

/// What the two broker threads share.
struct Shared {
    handle: ServerHandle,
    status: Arc<BrokerStatus>,
    /// The gateway's counters: publishes, recoveries and errors are counted when the broker
    /// answers them.
    stats: Arc<GatewayStats>,
    /// The topics this node listens to. Locked while a message is forwarded and while a
    /// subscription is set up, so that the two never interleave.
    topics: Mutex<HashMap<String, Forwarding>>,
    /// This node's name in the channel messages of publishes that leave out their publisher.
    node: String,
    /// Applies control commands from other nodes.
    control: Arc<std::sync::OnceLock<ControlHandler>>,
    /// Where things are in Redis.
    layout: Layout,
}

/// The start of a channel message that is not to be delivered to one connection: `\u{1}`,
impl Shared {
    /// Send `text` to connection `conn`, on its loop (nothing if it has gone).
    fn send_to(&self, conn: ConnId, text: String) {
        let _ = self.handle.post_to::<Client>(conn, move |ws| {
            ws.send_text(&text);
        });
    }

    /// Answer command `id` of connection `conn` with an error (counted).
    fn send_error(&self, conn: ConnId, id: Option<Box<RawValue>>, e: CommandError) {
        self.stats.command_errors.fetch_add(1, Ordering::Relaxed);
        self.send_to(conn, error_reply(id.as_deref(), &e));
    }

    fn topics(&self) -> std::sync::MutexGuard<'_, HashMap<String, Forwarding>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Apply a control command from the control channel, unless this node sent it (and has
    /// applied it already).
    fn control(&self, message: &str) {
        let Some((node, command)) = message.split_once('\n') else { return };
        if node != self.node
            && let Some(handler) = self.control.get()
        {
            handler(command);
        }
    }

    /// Record whether one thread's connection is up (the broker is up when both are).
    fn set_up(&self, listen: bool, up: bool) {
        let st = &self.status;
        let flag = if listen { &st.listen_up } else { &st.command_up };
        flag.store(up, Ordering::Relaxed);
    }
}

/// The thread that runs commands: publishes (pipelined), subscriptions, topic info.
struct Broker {
    /// The connections to Redis.
    redis: Redis,
    /// The scripts, as the layout runs them.
    scripts: Scripts,
    shared: Arc<Shared>,
    rx: Receiver<BrokerRequest>,
    listen: Orders,
    history: usize,
    /// Keys of a topic without publishes for this long expire (0: never).
    ttl_ms: u64,
    /// The most topics with state in Redis (`limits.max_topics`, over the cluster).
    max_topics: usize,
    /// The topics per slot, as last counted (cluster).
    topic_counts: TopicCounts,
    /// How long Redis keeps an idempotency key (`publish.idempotency_window`).
    idempotency_window: Duration,
    /// Replicas that must have a publish before it is acknowledged, and how long to wait.
    ack_replicas: Option<(usize, Duration)>,
    /// How this node keeps its presence.
    presence: PresenceConfig,
    /// This node's members of topics that keep presence: per topic, by client id, the user and
    /// the member's JSON; refreshed in Redis periodically, joined again if Redis forgot them.
    present: HashMap<String, HashMap<Arc<str>, (String, String)>>,
    /// Leaves not carried out while Redis was unreachable, and whether each sends a leave
    /// event: done once it answers again.
    leaves: RefCell<Vec<(String, Member, bool)>>,
    /// A join failed, or the connection was made again: the next refresh joins every member
    /// of this node again (a join is idempotent), not only those of topics Redis forgot.
    rejoin: bool,
    /// What the current batch of requests has read of topics' logs for replays.
    log_spans: replay::LogSpans,
}

impl Broker {
    fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        // Whether the operator has been told Redis is away: once per outage, not per retry
        // (a lost connection says it; so does the first failed attempt at start).
        let mut down_reported = false;
        let redis = self.redis.describe();
        loop {
            match self.redis.connect() {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    self.shared.set_up(false, true);
                    tracing::info!(redis, "broker: connected to Redis");
                    match self.serve() {
                        Ok(()) => return,
                        Err(e) => tracing::warn!(redis, "broker: Redis connection lost: {e}; retrying"),
                    }
                    down_reported = true;
                    self.shared.set_up(false, false);
                }
                Err(e) if !down_reported => {
                    down_reported = true;
                    tracing::warn!(
                        redis,
                        "broker: cannot reach Redis: {e}; publishes get 503 and /healthz says degraded \
                         until it answers; retrying"
                    );
                }
                Err(e) => tracing::debug!(redis, "broker: cannot reach Redis: {e}"),
            }
            // Down: refuse what comes in until the next attempt.
            let until = Instant::now() + backoff;
            while Instant::now() < until {
                match self.rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    Ok(request) => self.refuse(request),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// With one primary, a lost connection ends `serve` (the broker connects again, refusing
    /// requests meanwhile). In a cluster it fails only the requests for the node that failed:
    /// the others go on, and the slot map is read again at once (a failover, or a node gone).
    fn survive(&mut self, result: redis::RedisResult<()>, recheck: &mut bool) -> redis::RedisResult<()> {
        match result {
            Err(e) if self.shared.layout.is_cluster() && connection_lost(&e) => {
                tracing::warn!("broker: a Redis node failed: {e}; reading the slot map again");
                *recheck = true;
                Ok(())
            }
            other => other,
        }
    }

    /// Count the topics (in a cluster: the same round trip asks every primary), and say the
    /// broker is down while a slot has no primary that answers, as with one primary that does
    /// not: requests for those slots fail meanwhile. Once a second; out of line, as
    /// `forget_idle_topics`.
    #[inline(never)]
    fn count_and_check(&mut self, recheck: &mut bool) -> redis::RedisResult<()> {
        let counted = self.count_topics();
        self.shared.set_up(false, matches!(counted, Ok(true)));
        self.survive(counted.map(drop), recheck)
    }

    /// The publishes gathered so far go to Redis first (so that `request` comes after them, as
    /// it came), then `request` is served; if the publishes fail, `request` is refused.
    fn publish_then_handle(
        &mut self,
        publishes: &mut Vec<publish::Publish>,
        request: BrokerRequest,
        recheck: &mut bool,
    ) -> redis::RedisResult<()> {
        let done = self.publish_batch(std::mem::take(publishes));
        if let Err(e) = self.survive(done, recheck) {
            self.refuse(request);
            return Err(e);
        }
        let done = self.handle_request(request);
        self.survive(done, recheck)
    }

    /// Serve while connected; `Ok` when the gateway shuts down.
    fn serve(&mut self) -> redis::RedisResult<()> {
        let mut last_check = Instant::now();
        let mut recheck = false;
        // At once after a (re)connect: leaves that waited, and presence Redis may have lost
        // (a join cut off with the connection may not have been carried out).
        self.rejoin = true;
        let refreshed = self.refresh_presence();
        self.survive(refreshed, &mut recheck)?;
        self.count_and_check(&mut recheck)?;
        let mut last_refresh = Instant::now();
        loop {
            // Replays are read for one batch at a time: what an earlier batch read, Redis may
            // since have trimmed or lost.
            self.log_spans.clear();
            // What queued up is one batch: its publishes go to Redis in one pipelined round
            // trip (per node), and so do the reads of what its subscribes will replay.
            let mut batch: Vec<BrokerRequest> = Vec::new();
            match self.rx.recv_timeout(Duration::from_millis(500)) {
                Ok(request) => batch.push(request),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
            while batch.len() < BATCH {
                match self.rx.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.read_ahead(&batch);
            let mut publishes = Vec::new();
            let mut requests = batch.into_iter();
            while let Some(request) = requests.next() {
                let done = match request {
                    BrokerRequest::Publish { topics, fragment, reply, opts } => {
                        publishes.push((topics, fragment, reply, opts));
                        Ok(())
                    }
                    request => self.publish_then_handle(&mut publishes, request, &mut recheck),
                };
                if let Err(e) = done {
                    // Redis is lost (the publishes gathered went out just before): what is
                    // left of the batch is refused, as the requests that come in while the
                    // broker waits to connect again are.
                    for request in requests.by_ref() {
                        self.refuse(request);
                    }
                    return Err(e);
                }
            }
            let done = self.publish_batch(publishes);
            self.survive(done, &mut recheck)?;
            if last_refresh.elapsed() >= self.presence.ttl / 4 {
                last_refresh = Instant::now();
                let done = self.refresh_presence();
                self.survive(done, &mut recheck)?;
            }
            if recheck || last_check.elapsed() >= Duration::from_secs(1) {
                last_check = Instant::now();
                recheck = false;
                // Redis answers (in a cluster: the slot map, read again); no node at all
                // answering ends `serve`.
                self.redis.check()?;
                self.count_and_check(&mut recheck)?;
                self.forget_idle_topics();
            }
        }
    }

    /// Stop listening to topics nobody here subscribes to any more. Once a second; out of line
    /// so that a profile shows this per-second work apart from the per-message work.
    #[inline(never)]
    fn forget_idle_topics(&self) {
        let mut topics = self.shared.topics();
        let idle: Vec<String> =
            topics.keys().filter(|t| self.shared.handle.num_subscribers(t) == 0).cloned().collect();
        for topic in idle {
            topics.remove(&topic);
            self.listen.send(listener::Listen::Unsubscribe(topic));
        }
    }

    fn handle_request(&mut self, request: BrokerRequest) -> redis::RedisResult<()> {
        let layout = &self.shared.layout;
        match request {
            BrokerRequest::Publish { topics, fragment, reply, opts } => {
                self.publish_batch(vec![(topics, fragment, reply, opts)])?;
            }
            BrokerRequest::Subscribe { conn, topic, since, id, max_replay, presence, server } => {
                match self.subscribe(conn, &topic, since, id.clone(), max_replay, server) {
                    Ok(true) => {
                        if let Some((member, join_leave)) = presence {
                            self.join(&topic, member, join_leave)?;
                        }
                    }
                    Ok(false) => {}
                    Err(e) => {
                        // Every request gets an answer, even when Redis fails under it; only a
                        // lost connection is made again.
                        self.reply_error(conn, &topic, id, redis_failed(&e));
                        if connection_lost(&e) {
                            return Err(e);
                        }
                    }
                }
            }
            BrokerRequest::Leave { topic, member, join_leave } => {
                self.leave(&topic, member, join_leave)?;
            }
            BrokerRequest::Presence { topic, list, limit, reply } => {
                let script = &self.scripts.read_presence;
                let read = self
                    .redis
                    .run(layout.slot(&topic), |c| read_presence(c, layout, script, &topic, list, &limit));
                match read {
                    Ok(page) => self.answer_presence(reply, &topic, list, Ok(page)),
                    Err(e) if connection_lost(&e) => {
                        self.refuse(BrokerRequest::Presence { topic, list, limit, reply });
                        return Err(e);
                    }
                    Err(e) => self.answer_presence(reply, &topic, list, Err(redis_failed(&e))),
                }
            }
            BrokerRequest::TopicInfo { topic, subscribers, reply } => {
                let (seq_key, _, epoch_key, _) = layout.keys(&topic);
                let found: redis::RedisResult<(Option<u64>, Option<String>)> = self
                    .redis
                    .run(layout.slot(&topic), |c| redis::pipe().get(&seq_key).get(&epoch_key).query(c));
                let (seq, epoch) = match found {
                    Ok(v) => v,
                    Err(e) if connection_lost(&e) => {
                        self.refuse(BrokerRequest::TopicInfo { topic, subscribers, reply });
                        return Err(e);
                    }
                    Err(e) => {
                        let e = redis_failed(&e);
                        reply.respond(json_error(e.code, &e.reason));
                        return Ok(());
                    }
                };
                reply.respond(HttpResponse::json(
                    200,
                    serde_json::json!({"topic": topic, "subscribers": subscribers, "seq": seq.unwrap_or(0), "epoch": epoch})
                        .to_string(),
                ));
            }
            BrokerRequest::Control { message, done } => {
                let mut publish = redis::cmd(layout.publish_command());
                publish.arg(CONTROL_CHANNEL).arg(format!("{}\n{message}", self.shared.node));
                let sent: redis::RedisResult<u64> =
                    self.redis.run(layout.control_slot(), |c| publish.query(c));
                match sent {
                    Ok(nodes) => done(Ok(nodes)),
                    Err(e) => {
                        done(Err(redis_failed(&e)));
                        if connection_lost(&e) {
                            return Err(e);
                        }
                    }
                }
            }
            BrokerRequest::History { topic, query, reply } => {
                let read = self.redis.run(layout.slot(&topic), |c| read_history(c, layout, &topic, &query));
                match read {
                    Ok(page) => self.answer_history(reply, &topic, Ok(page)),
                    Err(e) if connection_lost(&e) => {
                        self.refuse(BrokerRequest::History { topic, query, reply });
                        return Err(e);
                    }
                    Err(e) => self.answer_history(reply, &topic, Err(redis_failed(&e))),
                }
            }
        }
        Ok(())
    }

    /// Redis is unreachable: answer at once instead of queueing.
    fn refuse(&mut self, request: BrokerRequest) {
        let why = "Redis is unreachable";
        match request {
            BrokerRequest::Publish { reply, topics, .. } => {
                self.shared.status.failed_publishes.fetch_add(1, Ordering::Relaxed);
                self.answer_publish_error(reply, &topics, unavailable(why));
            }
            BrokerRequest::Subscribe { conn, topic, id, .. } => {
                self.reply_error(conn, &topic, id, unavailable(why));
            }
            BrokerRequest::TopicInfo { reply, .. } => {
                reply.respond(json_error(503, "the broker is unavailable: Redis is unreachable"))
            }
            BrokerRequest::History { topic, reply, .. } => {
                self.answer_history(reply, &topic, Err(unavailable(why)))
            }
            BrokerRequest::Presence { topic, list, reply, .. } => {
                self.answer_presence(reply, &topic, list, Err(unavailable(why)))
            }
            // Out of this node's presence now (the refresh must not join it again); out of
            // Redis, with its event, once Redis answers again.
            BrokerRequest::Leave { topic, member, join_leave } => {
                if self.forget_member(&topic, &member.client) {
                    self.leaves.borrow_mut().push((topic, member, join_leave));
                }
            }
            BrokerRequest::Control { done, .. } => done(Err(unavailable(why))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{BrokerHandle, BrokerRequest, ListLimit, Member, PresenceReply};
    use gale_server::ConnId;

    #[test]
    fn a_full_queue_refuses_requests_but_never_a_leave() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let handle = BrokerHandle { tx, limit: 1, status: Default::default(), control: Default::default() };
        let read = || BrokerRequest::Presence {
            topic: "room:a".into(),
            list: false,
            limit: ListLimit { max_clients: 1, max_bytes: 1 },
            reply: PresenceReply::Client(ConnId::from_bits(1), None),
        };
        assert!(handle.send(read()));
        assert!(!handle.send(read()), "past the bound, refused");
        let member = Member { client: "n-1".into(), user: Some("ann".into()), info: None };
        assert!(handle.send(BrokerRequest::Leave { topic: "room:a".into(), member, join_leave: true }));
        // In order, after what came before it.
        assert!(matches!(rx.try_recv(), Ok(BrokerRequest::Presence { .. })));
        assert!(matches!(rx.try_recv(), Ok(BrokerRequest::Leave { join_leave: true, .. })));
        drop(rx);
        assert!(!handle.send(read()), "the broker is gone");
    }
}
