//! Cluster mode: several gateways share topics through Redis.
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
//! catch-ups read the stream in pages of `LOG_PAGE` entries, and a replay stops as soon as it
//! passes what the connection may queue. After a lost Redis connection the broker resubscribes and
//! forwards what it missed from the streams, so live subscribers see no gap as long as the history
//! covers the outage.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use gale_server::{ConnId, HttpResponse, Responder, ServerHandle};

use super::api::{json_error, published};
use super::gateway::{Client, GatewayStats};
use super::history::{HistoryPage, HistoryQuery};
use super::presence::{ListLimit, Member, PresencePage, Stats, event, is_event};
use super::protocol::{CommandError, Reply, error_reply};
use super::publish::{BatchReply, PublishOptions, item_result};
use super::topics::{Position, PublishError, new_epoch};
use serde_json::value::RawValue;

/// How long a Redis command may take before the broker counts Redis as unreachable.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the broker waits for channel messages before it looks at its requests again.
const POLL: Duration = Duration::from_millis(2);

/// The set of topics with state in Redis, shared by the cluster: member, the topic; score,
/// when its keys expire (ms, Redis's clock; `+inf` without a TTL).
const REGISTRY: &str = "gale:topics";

/// The error code of a publish refused because the cluster holds `limits.max_topics` topics.
const FULL: &str = "GALEFULL";

/// Lua, the start of a script whose `KEYS[1]` is the registry: forget the topics whose keys
/// have expired, and set `now` (ms). (Redis 5 and later replicate a script by its effects, so
/// reading the clock before writing is allowed.)
macro_rules! forget_expired_lua {
    () => {
        r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
"#
    };
}

/// The publish script: one per request, for all its topics. KEYS: the registry, then three
/// per topic (its sequence number, its log, its epoch), then for a publish to one topic with an
/// idempotency key, that key's key; ARGV: the payload fragment, the history size, the TTL in
/// ms (0: none), the most topics the cluster holds, the idempotency window in ms, the
/// message's time to live in ms (0: none), what goes before the delivery on the channel (who
/// not to deliver it to, or nothing), then four per topic (its name, its name as JSON, its
/// channel, a fresh epoch). Everything is checked before anything is written: a refused publish
/// leaves no trace, and a publish to several topics goes to all of them or none. Each topic's
/// answer is {seq, epoch, 1 if it is an idempotent retry (nothing published) else 0}.
const PUBLISH_LUA: &str = concat!(
    r#"
local n = math.floor((#KEYS - 1) / 3)
local idem = nil
if (#KEYS - 1) % 3 == 1 then idem = KEYS[#KEYS] end
local function key(i, k) return KEYS[1 + 3 * (i - 1) + k] end
local function arg(i, k) return ARGV[7 + 4 * (i - 1) + k] end
local kinds = {'string', 'stream', 'string'}
for i = 1, n do
  for k = 1, 3 do
    local kind = redis.call('TYPE', key(i, k)).ok
    if kind ~= 'none' and kind ~= kinds[k] then
      return redis.error_reply('WRONGTYPE ' .. key(i, k) .. ' holds a ' .. kind .. ', not a ' .. kinds[k])
    end
  end
  local seq = redis.call('GET', key(i, 1))
  if seq and not string.match(seq, '^%d+$') then
    return redis.error_reply('WRONGTYPE ' .. key(i, 1) .. ' holds no sequence number')
  end
end
-- A retry of a remembered idempotency key: the first publish's position, nothing published.
if idem then
  local prior = redis.call('GET', idem)
  if prior then
    local e, s = string.match(prior, '^(%x+):(%d+)$')
    if e then return {{tonumber(s), e, 1}} end
  end
end
-- The last sequence number in a topic's log (0 when empty): a sequence key lost while its log
-- survived (deleted, evicted) continues from there, so XADD below cannot fail.
local function last_logged(log)
  local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
  if #last == 0 then return 0 end
  return tonumber(string.match(last[1][1], '^(%d+)-')) or 0
end
"#,
    forget_expired_lua!(),
    r#"
local new, seen = 0, {}
for i = 1, n do
  local name = arg(i, 1)
  if not seen[name] and not redis.call('ZSCORE', KEYS[1], name) then new = new + 1 end
  seen[name] = true
end
if new > 0 and redis.call('ZCARD', KEYS[1]) + new > tonumber(ARGV[4]) then
  return redis.error_reply('GALEFULL the cluster holds its maximum number of topics')
end
local ttl = tonumber(ARGV[3])
local expires = '+inf'
if ttl > 0 then expires = now + ttl end
local msg_ttl = tonumber(ARGV[6])
local out = {}
for i = 1, n do
  local seq_key, log, epoch_key = key(i, 1), key(i, 2), key(i, 3)
  local epoch = redis.call('GET', epoch_key)
  if not epoch then
    epoch = arg(i, 4)
    redis.call('SET', epoch_key, epoch)
  end
  local seq = math.max(tonumber(redis.call('GET', seq_key) or '0'), last_logged(log)) + 1
  redis.call('SET', seq_key, seq)
  local d = '{"topic":' .. arg(i, 2) .. ',"epoch":"' .. epoch .. '","seq":' .. seq .. ',' .. ARGV[1] .. '}'
  local fields = {'d', d}
  -- Its expiry (ms, Redis's clock) goes with it: reads leave it out once past.
  if msg_ttl > 0 then fields[#fields + 1] = 'x'; fields[#fields + 1] = now + msg_ttl end
  -- So does the connection left out: a node that forwards it from the log (a catch-up)
  -- leaves it out as the channel message would have.
  if ARGV[7] ~= '' then fields[#fields + 1] = 'e'; fields[#fields + 1] = ARGV[7] end
  redis.call('XADD', log, 'MAXLEN', '~', ARGV[2], seq .. '-1', unpack(fields))
  if idem then redis.call('SET', idem, epoch .. ':' .. seq, 'PX', ARGV[5]) end
  for _, k in ipairs({seq_key, log, epoch_key}) do
    if ttl > 0 then
      -- An idle topic is forgotten whole: the next publish starts a new epoch.
      redis.call('PEXPIRE', k, ttl)
    else
      -- Kept for good, even if an earlier configuration gave it a TTL.
      redis.call('PERSIST', k)
    end
  end
  redis.call('ZADD', KEYS[1], expires, arg(i, 1))
  redis.call('PUBLISH', arg(i, 3), ARGV[7] .. d)
  out[i] = {seq, epoch, 0}
end
return out
"#
);

/// Whether a subscription may start: 1 if the topic has state, or one more topic would fit.
/// KEYS: the registry; ARGV: the topic, the most topics the cluster holds.
const ROOM_LUA: &str = concat!(
    forget_expired_lua!(),
    r#"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  return 1
end
return 0
"#
);

/// Lua, the start of every presence script: KEYS[1] is the topic's presence prefix
/// (`gale:T:p:`). Sets `now` (ms) and the topic's keys, and first forgets the nodes whose
/// presence expired (their score, the time of their last refresh plus the TTL, is past):
/// their members leave the counts and their hashes are deleted, and where join/leave events
/// are sent (`ev` is set: a member with a token joined with an event) each of their members
/// with a token is sent its leave event. A node's members with a token are in `n:NODE`
/// (client id → member JSON), its anonymous ones in `a:NODE` (client id → ''), so that a list
/// scans only members it shows. (`p` is `gale:T:p:`, and a topic holds no character JSON
/// escapes, so the topic, its JSON and its channel are cut from it.)
macro_rules! presence_lua {
    () => {
        r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local p = KEYS[1]
local nodes, users, conns, events = p .. 'nodes', p .. 'users', p .. 'conns', p .. 'ev'
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', nodes, '-inf', now)) do
  local members, anons, tally = p .. 'n:' .. dead, p .. 'a:' .. dead, p .. 'u:' .. dead
  if redis.call('EXISTS', events) == 1 then
    local channel = string.sub(p, 1, #p - 3)
    local head = '{"op":"leave","topic":"' .. string.sub(p, 6, #p - 3) .. '",'
    for _, m in ipairs(redis.call('HVALS', members)) do
      if m ~= '' then redis.call('PUBLISH', channel, head .. string.sub(m, 2)) end
    end
  end
  local gone = redis.call('HLEN', members) + redis.call('HLEN', anons)
  if gone > 0 and redis.call('DECRBY', conns, gone) <= 0 then redis.call('DEL', conns) end
  local t = redis.call('HGETALL', tally)
  for i = 1, #t, 2 do
    if redis.call('HINCRBY', users, t[i], -tonumber(t[i + 1])) <= 0 then redis.call('HDEL', users, t[i]) end
  end
  redis.call('DEL', members, anons, tally)
  redis.call('ZREM', nodes, dead)
end
"#
    };
}

/// Lua, after `presence_lua!` in scripts of one node (ARGV[1], the node; ARGV[2], the TTL in
/// ms): the node's keys, and a function that marks the node alive and keeps the topic's keys
/// for three TTLs (a dead node's hashes outlive its score, so that they are reaped, not lost).
macro_rules! node_lua {
    () => {
        r#"
local node, ttl = ARGV[1], tonumber(ARGV[2])
local members, anons, tally = p .. 'n:' .. node, p .. 'a:' .. node, p .. 'u:' .. node
local function alive()
  redis.call('ZADD', nodes, now + ttl, node)
  for _, k in ipairs({nodes, users, conns, members, anons, tally, events}) do redis.call('PEXPIRE', k, 3 * ttl) end
end
"#
    };
}

/// A member joins: ARGV after the node's: the client id, the user (`''`: anonymous), the
/// member's JSON (`''`: not listed), the channel, the join event (`''`: none).
const JOIN_LUA: &str = concat!(
    presence_lua!(),
    node_lua!(),
    r#"
local client, user, member, channel, ev = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local held = members
if user == '' then held = anons end
if redis.call('HSET', held, client, member) == 1 then
  redis.call('INCR', conns)
  if user ~= '' then
    redis.call('HINCRBY', tally, user, 1)
    redis.call('HINCRBY', users, user, 1)
  end
end
if ev ~= '' then
  redis.call('SET', events, '1')
  redis.call('PUBLISH', channel, ev)
end
alive()
return 1
"#
);

/// A member leaves: ARGV as for a join (the event is the leave event).
const LEAVE_LUA: &str = concat!(
    presence_lua!(),
    node_lua!(),
    r#"
local client, user, channel, ev = ARGV[3], ARGV[4], ARGV[6], ARGV[7]
local held = members
if user == '' then held = anons end
if redis.call('HDEL', held, client) == 1 then
  if redis.call('DECR', conns) <= 0 then redis.call('DEL', conns) end
  if user ~= '' then
    if redis.call('HINCRBY', tally, user, -1) <= 0 then redis.call('HDEL', tally, user) end
    if redis.call('HINCRBY', users, user, -1) <= 0 then redis.call('HDEL', users, user) end
  end
  if ev ~= '' then redis.call('PUBLISH', channel, ev) end
end
return 1
"#
);

/// The node's periodic refresh of a topic: 1, or 0 if its presence there was forgotten (the
/// node was silent past the TTL, or Redis lost it): the node then joins its members again.
const REFRESH_LUA: &str = concat!(
    presence_lua!(),
    node_lua!(),
    r#"
if not redis.call('ZSCORE', nodes, node) then return 0 end
alive()
return 1
"#
);

/// Read a topic's presence: ARGV: 1 to list the members too, the most to list. Answers
/// `{connections, users, more, {member JSON…}}`. A list scans only members with a token (the
/// anonymous ones are in hashes of their own), at most `max` of them and one step of 256.
const READ_PRESENCE_LUA: &str = concat!(
    presence_lua!(),
    r#"
local c = tonumber(redis.call('GET', conns) or '0')
local u = redis.call('HLEN', users)
local out, more, max = {}, 0, tonumber(ARGV[2])
if ARGV[1] == '1' then
  for _, node in ipairs(redis.call('ZRANGE', nodes, 0, -1)) do
    local cursor = '0'
    repeat
      local r = redis.call('HSCAN', p .. 'n:' .. node, cursor, 'COUNT', 256)
      cursor = r[1]
      for i = 2, #r[2], 2 do
        if r[2][i] ~= '' then
          if #out >= max then more = 1 else out[#out + 1] = r[2][i] end
        end
      end
    until cursor == '0' or more == 1
    if more == 1 then break end
  end
end
return {c, u, more, out}
"#
);

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

/// What the broker knows of a topic this node forwards.
struct Forwarding {
    epoch: String,
    /// The last sequence number forwarded into this node.
    last: u64,
}

impl Forwarding {
    /// The topic's epoch in Redis is `epoch`: if that is a new one (Redis lost the topic's
    /// state), forward it from its first message.
    fn set_epoch(&mut self, epoch: &str) {
        if self.epoch != epoch {
            self.epoch = epoch.to_string();
            self.last = 0;
        }
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
}

/// Start the broker threads for Redis at `url`, keeping what `limits` say; counting into
/// `stats`.
pub fn start(
    url: &str,
    handle: ServerHandle,
    limits: RedisLimits,
    stats: Arc<GatewayStats>,
    presence: PresenceConfig,
) -> Result<BrokerHandle, String> {
    let RedisLimits { history, ttl, max_topics, idempotency_window } = limits;
    let client = redis::Client::open(url).map_err(|e| format!("broker {url}: {e}"))?;
    // Bounded by `BrokerHandle::send`, which lets leaves past the bound.
    let (tx, rx) = crossbeam_channel::unbounded();
    let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
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
    });
    let listener = Listener { client: client.clone(), shared: shared.clone(), ctl: ctl_rx };
    std::thread::Builder::new()
        .name("gale-broker-listen".into())
        .spawn(move || listener.run())
        .map_err(|e| format!("cannot start the broker thread: {e}"))?;
    let ttl_ms = ttl.map_or(0, |t| t.as_millis().max(1) as u64);
    let broker = Broker {
        client,
        shared: shared.clone(),
        rx,
        listen: ctl_tx,
        history: history.max(1),
        ttl_ms,
        max_topics,
        idempotency_window,
        presence,
        present: HashMap::new(),
        leaves: RefCell::new(Vec::new()),
        rejoin: false,
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
}

/// The start of a channel message that is not to be delivered to one connection: `\u{1}`,
/// the node, `:`, the connection's id, a newline; then the delivery.
const EXCLUDE_MARK: char = '\u{1}';

/// What goes before a delivery on the channel for a publish that leaves out `exclude` on
/// `node`.
fn exclusion_prefix(node: &str, exclude: Option<ConnId>) -> String {
    exclude.map_or_else(String::new, |c| format!("{EXCLUDE_MARK}{node}:{}\n", c.to_bits()))
}

/// A channel message's delivery, and the connection of `node` not to deliver it to.
fn split_exclusion<'a>(message: &'a str, node: &str) -> (&'a str, Option<ConnId>) {
    let Some(rest) = message.strip_prefix(EXCLUDE_MARK) else { return (message, None) };
    let Some((head, delivery)) = rest.split_once('\n') else { return (message, None) };
    (delivery, excluded_on(head, node))
}

/// The connection of `node` that `prefix` (as `exclusion_prefix` made it, kept with a log
/// entry) leaves out.
fn exclusion_of(prefix: &str, node: &str) -> Option<ConnId> {
    excluded_on(prefix.strip_prefix(EXCLUDE_MARK)?.strip_suffix('\n')?, node)
}

/// The connection named by `node:conn` if the node is `node`.
fn excluded_on(head: &str, node: &str) -> Option<ConnId> {
    head.split_once(':').filter(|(n, _)| *n == node).and_then(|(_, c)| c.parse().ok()).map(ConnId::from_bits)
}

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

    /// Hand a delivery from Redis to this node's subscribers (but `exclude`), once and in
    /// order.
    fn forward(
        &self,
        topics: &mut HashMap<String, Forwarding>,
        topic: &str,
        delivery: &str,
        exclude: Option<ConnId>,
    ) {
        if is_event(delivery) {
            // A join or leave event: not numbered, delivered as it comes.
            if topics.contains_key(topic) {
                self.handle.publish_text(topic, delivery);
            }
            return;
        }
        let Some((epoch, seq)) = position_of(delivery) else { return };
        let Some(f) = topics.get_mut(topic) else { return };
        f.set_epoch(&epoch);
        if seq > f.last {
            f.last = seq;
            match exclude {
                Some(publisher) => self.handle.publish_text_except(topic, delivery, publisher),
                None => self.handle.publish_text(topic, delivery),
            };
            self.status.forwarded.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forward what the topic's stream holds beyond the last forwarded message.
    fn catch_up(
        &self,
        cmd: &mut redis::Connection,
        topics: &mut HashMap<String, Forwarding>,
        topic: &str,
    ) -> redis::RedisResult<()> {
        let (_, log, epoch_key, _) = keys(topic);
        // Redis may have lost the topic meanwhile and started a new epoch: forward it from 1.
        let current: Option<String> = redis::cmd("GET").arg(&epoch_key).query(cmd)?;
        if let (Some(e), Some(f)) = (current, topics.get_mut(topic)) {
            f.set_epoch(&e);
        }
        let from = topics.get(topic).map_or(0, |f| f.last) + 1;
        read_log(cmd, &log, from, None, |_, d, _, exclude| {
            let exclude = exclude.and_then(|e| exclusion_of(&e, &self.node));
            self.forward(topics, topic, &d, exclude);
            true
        })
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

/// Orders for the listening thread.
enum Listen {
    /// Subscribe to a topic's channel; the answer says when Redis confirmed it.
    Subscribe(String, Sender<redis::RedisResult<()>>),
    /// Stop listening to a topic's channel.
    Unsubscribe(String),
}

/// The thread that owns the subscribed connection: it forwards messages as they come.
struct Listener {
    client: redis::Client,
    shared: Arc<Shared>,
    ctl: Receiver<Listen>,
}

impl Listener {
    fn run(self) {
        let mut backoff = Duration::from_millis(100);
        let mut connected_once = false;
        loop {
            match self.connect() {
                Ok((mut sub, mut cmd)) => {
                    if connected_once {
                        self.shared.status.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    connected_once = true;
                    backoff = Duration::from_millis(100);
                    let mut pubsub = sub.as_pubsub();
                    let _ = pubsub.set_read_timeout(Some(POLL));
                    match self.serve(&mut pubsub, &mut cmd) {
                        Ok(()) => return,
                        Err(e) => tracing::warn!("broker: Redis subscription lost: {e}"),
                    }
                    self.shared.set_up(true, false);
                }
                Err(e) => tracing::debug!("broker: cannot reach Redis: {e}"),
            }
            let until = Instant::now() + backoff;
            while Instant::now() < until {
                match self.ctl.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    Ok(Listen::Subscribe(_, ack)) => {
                        let _ = ack.send(Err(std::io::Error::other("Redis is unreachable").into()));
                    }
                    Ok(Listen::Unsubscribe(_)) | Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    fn connect(&self) -> redis::RedisResult<(redis::Connection, redis::Connection)> {
        let sub = self.client.get_connection_with_timeout(COMMAND_TIMEOUT)?;
        sub.set_write_timeout(Some(COMMAND_TIMEOUT))?;
        Ok((sub, command_connection(&self.client)?))
    }

    fn serve(&self, pubsub: &mut redis::PubSub<'_>, cmd: &mut redis::Connection) -> redis::RedisResult<()> {
        {
            // After a reconnect: listen again, then forward what was missed meanwhile.
            let mut topics = self.shared.topics();
            let names: Vec<String> = topics.keys().cloned().collect();
            // Confirmations take a round trip: not the short poll timeout.
            pubsub.set_read_timeout(Some(COMMAND_TIMEOUT))?;
            let mut channels: Vec<String> = names.iter().map(|t| keys(t).3).collect();
            channels.push(CONTROL_CHANNEL.to_string());
            pubsub.subscribe(channels)?;
            pubsub.set_read_timeout(Some(POLL))?;
            for topic in &names {
                match self.shared.catch_up(cmd, &mut topics, topic) {
                    Err(e) if connection_lost(&e) => return Err(e),
                    // One topic whose keys Redis cannot read must not keep the node down.
                    Err(e) => tracing::warn!(topic, error = %e, "cannot catch up on a topic"),
                    Ok(()) => {}
                }
            }
        }
        self.shared.set_up(true, true);
        loop {
            loop {
                match self.ctl.try_recv() {
                    Ok(Listen::Subscribe(topic, ack)) => {
                        pubsub.set_read_timeout(Some(COMMAND_TIMEOUT))?;
                        let result = pubsub.subscribe(keys(&topic).3);
                        pubsub.set_read_timeout(Some(POLL))?;
                        let failed = result.is_err();
                        let _ = ack.send(result);
                        if failed {
                            return Err(std::io::Error::other("SUBSCRIBE failed").into());
                        }
                    }
                    Ok(Listen::Unsubscribe(topic)) => {
                        pubsub.set_read_timeout(Some(COMMAND_TIMEOUT))?;
                        pubsub.unsubscribe(keys(&topic).3)?;
                        pubsub.set_read_timeout(Some(POLL))?;
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            match pubsub.get_message() {
                Ok(msg) => {
                    let channel = msg.get_channel_name().to_string();
                    let Ok(payload) = msg.get_payload::<String>() else {
                        tracing::warn!(channel, "ignoring a message that is not UTF-8 text");
                        continue;
                    };
                    if channel == CONTROL_CHANNEL {
                        self.shared.control(&payload);
                    } else if let Some(topic) = channel.strip_prefix("gale:") {
                        let (delivery, exclude) = split_exclusion(&payload, &self.shared.node);
                        let mut topics = self.shared.topics();
                        self.shared.forward(&mut topics, topic, delivery, exclude);
                    }
                }
                Err(e) if e.is_timeout() => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A connection for commands, whose every command times out after [`COMMAND_TIMEOUT`].
fn command_connection(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let cmd = client.get_connection_with_timeout(COMMAND_TIMEOUT)?;
    cmd.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    cmd.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    Ok(cmd)
}

/// Entries of a topic's log read per round trip: a replay or a catch-up holds at most this many
/// beyond what it keeps, however long the history.
const LOG_PAGE: usize = 32;

/// Read the deliveries of a topic's log from sequence number `from` to `to` (inclusive; `None`:
/// to its end), page by page, handing each with its sequence number, its expiry (ms,
/// Redis's clock; for messages published with a time to live) and the connection it leaves
/// out (`exclusion_prefix`, for a publish with `exclude_self`) to `each` until it returns
/// false. Entries without a delivery are skipped.
fn read_log(
    cmd: &mut redis::Connection,
    log: &str,
    from: u64,
    to: Option<u64>,
    mut each: impl FnMut(u64, String, Option<u64>, Option<String>) -> bool,
) -> redis::RedisResult<()> {
    let end = to.map_or_else(|| "+".to_string(), |t| format!("{t}-1"));
    let mut start = format!("{from}-1");
    loop {
        let page: Vec<(String, Vec<(String, String)>)> =
            redis::cmd("XRANGE").arg(log).arg(&start).arg(&end).arg("COUNT").arg(LOG_PAGE).query(cmd)?;
        let full = page.len() == LOG_PAGE;
        let mut reached = 0;
        for (id, fields) in page {
            // An id not of the form `seq-n` is none of ours: the log ends there.
            let Some((seq, next)) = entry_id(&id) else { return Ok(()) };
            (start, reached) = (next, seq);
            let expires = fields.iter().find(|(k, _)| k == "x").and_then(|(_, x)| x.parse().ok());
            let exclude = fields.iter().find(|(k, _)| k == "e").map(|(_, e)| e.clone());
            if let Some((_, d)) = fields.into_iter().find(|(k, _)| k == "d")
                && !each(seq, d, expires, exclude)
            {
                return Ok(());
            }
        }
        if !full || to.is_some_and(|t| reached >= t) {
            return Ok(());
        }
    }
}

/// The sequence number of a log entry's id (`seq-n`), and the id just after it: where the next
/// page starts.
fn entry_id(id: &str) -> Option<(u64, String)> {
    let (seq, n) = id.split_once('-')?;
    let (seq, n): (u64, u64) = (seq.parse().ok()?, n.parse().ok()?);
    Some((seq, format!("{seq}-{}", n.checked_add(1)?)))
}

/// A page of `topic`'s history from its stream, read as `query` asks: the position and the
/// oldest entry in one round trip, then the entries after `query.since` up to that position,
/// page by page, until the page is full. A topic without an epoch has no state: an empty page.
fn read_history(
    cmd: &mut redis::Connection,
    topic: &str,
    query: &HistoryQuery,
) -> redis::RedisResult<HistoryPage> {
    type Entries = Vec<(String, Vec<(String, String)>)>;
    let (seq_key, log, epoch_key, _) = keys(topic);
    let (seq, epoch, oldest, newest, time): (Option<u64>, Option<String>, Entries, Entries, (u64, u64)) =
        redis::pipe()
            .get(&seq_key)
            .get(&epoch_key)
            .cmd("XRANGE")
            .arg(&log)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("XREVRANGE")
            .arg(&log)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .cmd("TIME")
            .query(cmd)?;
    let now = redis_ms(time);
    let Some(epoch) = epoch else {
        return Ok(HistoryPage::new(None, 0, None, query));
    };
    let seq_of = |entries: &Entries| entries.first().and_then(|(id, _)| entry_id(id)).map(|(seq, _)| seq);
    // As a publish numbers: a sequence key lost while the log survived goes on from the log.
    let seq = seq.unwrap_or(0).max(seq_of(&newest).unwrap_or(0));
    let mut page = HistoryPage::new(Some(epoch.clone()), seq, seq_of(&oldest), query);
    read_log(cmd, &log, query.since.saturating_add(1), Some(seq), |n, d, expires, _| {
        // A message whose time to live has passed ends the retention of those before it.
        if expires.is_some_and(|x| x <= now) {
            page.expired(n);
            return true;
        }
        // An entry of another epoch (the topic expired and started again meanwhile) ends it.
        position_of(&d).is_some_and(|(e, _)| e == epoch) && page.offer(query, n, d)
    })?;
    Ok(page)
}

/// The deliveries a client at `since` missed, up to `last`, read page by page: refused as soon
/// as they pass `max_bytes` (what is left is not read), or when the log no longer holds every
/// one of them.
fn read_replay(
    cmd: &mut redis::Connection,
    log: &str,
    since: u64,
    last: u64,
    max_bytes: usize,
) -> redis::RedisResult<Result<Vec<String>, &'static str>> {
    const GONE: &str = "missed messages are no longer in the history";
    let now = redis_ms(redis::cmd("TIME").query(cmd)?);
    let (mut missed, mut bytes, mut refused) = (Vec::new(), 0, None);
    // A replay includes the messages a publisher left itself out of, as on a single node: it
    // asked for what it missed.
    read_log(cmd, log, since + 1, Some(last), |seq, d, expires, _| {
        bytes += d.len();
        // A missed message whose time to live has passed is no longer in the history.
        if seq != since + 1 + missed.len() as u64 || expires.is_some_and(|x| x <= now) {
            refused = Some(GONE);
        } else if bytes > max_bytes {
            refused = Some("missed messages are more than a connection may queue");
        } else {
            missed.push(d);
        }
        refused.is_none()
    })?;
    Ok(match refused {
        Some(why) => Err(why),
        None if missed.len() as u64 != last - since => Err(GONE),
        None => Ok(missed),
    })
}

/// Redis's `TIME` in milliseconds.
fn redis_ms((secs, micros): (u64, u64)) -> u64 {
    secs * 1000 + micros / 1000
}

/// A publish waiting for the broker: its topics, its payload fragment, where its answer goes,
/// its options.
type Publish = (Vec<String>, String, PublishReply, PublishOptions);

/// A topic published to: its name, sequence number, epoch, and whether it was an idempotent
/// retry (nothing published, the first publish's position).
type Placed = (String, u64, String, bool);

/// The topics of a request with their positions, read from its script's answer; or why they
/// were not published.
fn positions(topics: &[String], answer: Option<redis::Value>) -> Result<Vec<Placed>, CommandError> {
    let refused = |why: String| CommandError::new(500, format!("Redis refused the publish: {why}"));
    let answer = answer.ok_or_else(|| refused("no answer".into()))?;
    let found: Vec<(u64, String, u8)> = match redis::from_redis_value::<redis::RedisResult<_>>(answer) {
        Ok(Ok(found)) => found,
        Ok(Err(e)) if e.code() == Some(FULL) => return Err(PublishError::TooManyTopics.into()),
        Ok(Err(e)) if is_transient(&e) => return Err(unavailable(&server_reason(&e))),
        Ok(Err(e)) => return Err(refused(server_reason(&e))),
        Err(e) => return Err(refused(format!("unexpected answer: {e}"))),
    };
    if found.len() != topics.len() {
        return Err(refused(format!("{} positions for {} topics", found.len(), topics.len())));
    }
    Ok(topics.iter().zip(found).map(|(t, (seq, epoch, dup))| (t.clone(), seq, epoch, dup == 1)).collect())
}

/// An error Redis answered, as one line: its code and what it said.
fn server_reason(e: &redis::RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => e.to_string(),
    }
}

/// Whether Redis refused for a while rather than for good (loading its data, busy with a
/// script, a replica or a primary without its replicas, out of memory): worth a retry, so 503.
fn is_transient(e: &redis::RedisError) -> bool {
    matches!(
        e.code(),
        Some("LOADING" | "BUSY" | "READONLY" | "MASTERDOWN" | "OOM" | "NOREPLICAS" | "TRYAGAIN")
    )
}

/// Whether the connection to Redis is gone (and must be made again), as opposed to Redis
/// answering one command with an error.
fn connection_lost(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal()
}

/// The answer to a request that failed on a Redis error: 503 when Redis is unreachable or
/// refuses for a while, else 500 with what Redis said.
fn redis_failed(e: &redis::RedisError) -> CommandError {
    if connection_lost(e) || is_transient(e) {
        unavailable(&server_reason(e))
    } else {
        CommandError::new(500, format!("Redis refused: {}", server_reason(e)))
    }
}

/// A request refused because Redis could not be used.
fn unavailable(why: &str) -> CommandError {
    CommandError::new(503, format!("the broker is unavailable: {why}"))
}

/// The thread that runs commands: publishes (pipelined), subscriptions, topic info.
struct Broker {
    client: redis::Client,
    shared: Arc<Shared>,
    rx: Receiver<BrokerRequest>,
    listen: Sender<Listen>,
    history: usize,
    /// Keys of a topic without publishes for this long expire (0: never).
    ttl_ms: u64,
    /// The most topics with state in Redis (`limits.max_topics`, over the cluster).
    max_topics: usize,
    /// How long Redis keeps an idempotency key (`publish.idempotency_window`).
    idempotency_window: Duration,
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
}

fn keys(topic: &str) -> (String, String, String, String) {
    (
        format!("gale:{topic}:seq"),
        format!("gale:{topic}:log"),
        format!("gale:{topic}:epoch"),
        format!("gale:{topic}"),
    )
}

/// The Redis key of an idempotency key of `topic`: `gale:T|idem:KEY`. `|` is in no topic name
/// (nor in idempotency keys), so it is never another topic's key, whatever the `:` or `#` in
/// either.
fn idempotency_key(topic: &str, key: &str) -> String {
    format!("gale:{topic}|idem:{key}")
}

/// The prefix of a topic's presence keys (`KEYS[1]` of the presence scripts).
fn presence_prefix(topic: &str) -> String {
    format!("gale:{topic}:p:")
}

/// A topic's presence as Redis holds it: the counts, and the members if `list`.
fn read_presence(
    cmd: &mut redis::Connection,
    topic: &str,
    list: bool,
    limit: &ListLimit,
) -> redis::RedisResult<PresencePage> {
    let (connections, users, more, members): (u64, u64, u8, Vec<String>) = redis::cmd("EVAL")
        .arg(READ_PRESENCE_LUA)
        .arg(1)
        .arg(presence_prefix(topic))
        .arg(u8::from(list))
        .arg(limit.max_clients)
        .query(cmd)?;
    let mut page = PresencePage::new(Stats { connections, users });
    for m in members {
        if !page.offer(limit, m) {
            break;
        }
    }
    if more == 1 {
        page.mark_more();
    }
    Ok(page)
}

/// Epoch and sequence number of a delivery (the broker's own format).
fn position_of(delivery: &str) -> Option<(String, u64)> {
    let epoch = delivery.split_once("\"epoch\":\"")?.1.split_once('"')?.0;
    let seq = delivery.split_once("\"seq\":")?.1.split(|c: char| !c.is_ascii_digit()).next()?;
    Some((epoch.to_string(), seq.parse().ok()?))
}

impl Broker {
    fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        let mut connected_once = false;
        // Whether the operator has been told Redis is away: once per outage, not per retry
        // (a lost connection says it; so does the first failed attempt at start).
        let mut down_reported = false;
        let redis = self.client.get_connection_info().addr().to_string();
        loop {
            match self.connect() {
                Ok(mut cmd) => {
                    if connected_once {
                        self.shared.status.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    connected_once = true;
                    backoff = Duration::from_millis(100);
                    self.shared.set_up(false, true);
                    tracing::info!(redis, "broker: connected to Redis");
                    match self.serve(&mut cmd) {
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

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let mut cmd = command_connection(&self.client)?;
        redis::cmd("PING").query::<String>(&mut cmd)?;
        Ok(cmd)
    }

    /// Serve while connected; `Ok` when the gateway shuts down.
    fn serve(&mut self, cmd: &mut redis::Connection) -> redis::RedisResult<()> {
        let mut last_check = Instant::now();
        // At once after a (re)connect: leaves that waited, and presence Redis may have lost
        // (a join cut off with the connection may not have been carried out).
        self.rejoin = true;
        self.refresh_presence(cmd)?;
        let mut last_refresh = Instant::now();
        loop {
            let first = match self.rx.recv_timeout(Duration::from_millis(500)) {
                Ok(request) => Some(request),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            };
            // Publishes that queued up go to Redis in one pipelined round trip.
            let mut publishes = Vec::new();
            let mut next = first;
            for _ in 0..256 {
                match next.take() {
                    Some(BrokerRequest::Publish { topics, fragment, reply, opts }) => {
                        publishes.push((topics, fragment, reply, opts))
                    }
                    Some(request) => {
                        if let Err(e) = self.publish_batch(cmd, std::mem::take(&mut publishes)) {
                            self.refuse(request);
                            return Err(e);
                        }
                        self.handle_request(cmd, request)?;
                    }
                    None => {}
                }
                match self.rx.try_recv() {
                    Ok(request) => next = Some(request),
                    Err(_) => break,
                }
            }
            if let Some(request) = next {
                if let Err(e) = self.publish_batch(cmd, std::mem::take(&mut publishes)) {
                    self.refuse(request);
                    return Err(e);
                }
                self.handle_request(cmd, request)?;
            }
            self.publish_batch(cmd, publishes)?;
            if last_refresh.elapsed() >= self.presence.ttl / 4 {
                last_refresh = Instant::now();
                self.refresh_presence(cmd)?;
            }
            if last_check.elapsed() >= Duration::from_secs(1) {
                last_check = Instant::now();
                redis::cmd("PING").query::<String>(cmd)?;
                // Stop listening to topics nobody here subscribes to any more.
                let mut topics = self.shared.topics();
                let idle: Vec<String> =
                    topics.keys().filter(|t| self.shared.handle.num_subscribers(t) == 0).cloned().collect();
                for topic in idle {
                    topics.remove(&topic);
                    let _ = self.listen.send(Listen::Unsubscribe(topic));
                }
            }
        }
    }

    /// Run every request's publish script in one pipeline, then answer each request with its
    /// own result: a script Redis refuses fails only its own request. If the connection
    /// fails, every request of the batch gets 503.
    fn publish_batch(&mut self, cmd: &mut redis::Connection, batch: Vec<Publish>) -> redis::RedisResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (topics, fragment, _, opts) in &batch {
            pipe.add_command(self.publish_script(topics, fragment, opts));
        }
        // Errors stay in their own slots instead of failing the whole pipeline.
        let answers: Vec<redis::Value> = match pipe.ignore_errors().query(cmd) {
            Ok(a) => a,
            Err(e) => {
                for (topics, _, reply, _) in batch {
                    self.shared.status.failed_publishes.fetch_add(1, Ordering::Relaxed);
                    self.answer_publish_error(reply, &topics, unavailable(&e.to_string()));
                }
                return Err(e);
            }
        };
        let mut answers = answers.into_iter();
        for (topics, _, reply, _) in batch {
            match positions(&topics, answers.next()) {
                Ok(positions) => self.answer_published(reply, &positions),
                Err(e) => {
                    if e.code == 503 {
                        self.shared.status.failed_publishes.fetch_add(1, Ordering::Relaxed);
                    }
                    self.answer_publish_error(reply, &topics, e)
                }
            }
        }
        Ok(())
    }

    /// The publish script's call for one request.
    fn publish_script(&self, topics: &[String], fragment: &str, opts: &PublishOptions) -> redis::Cmd {
        let mut script = redis::cmd("EVAL");
        // An idempotency key is for a publish to one topic (a publish or a batch item).
        let idem = opts.idempotency_key.as_ref().filter(|_| topics.len() == 1);
        script.arg(PUBLISH_LUA).arg(1 + topics.len() * 3 + usize::from(idem.is_some())).arg(REGISTRY);
        let keyed: Vec<_> = topics.iter().map(|t| keys(t)).collect();
        for (seq_key, log, epoch_key, _) in &keyed {
            script.arg(seq_key).arg(log).arg(epoch_key);
        }
        if let Some(key) = idem {
            script.arg(idempotency_key(&topics[0], key));
        }
        let window_ms = self.idempotency_window.as_millis().max(1) as u64;
        let msg_ttl_ms = opts.ttl.map_or(0, |t| t.as_millis().max(1) as u64);
        script.arg(fragment).arg(self.history).arg(self.ttl_ms).arg(self.max_topics);
        script.arg(window_ms).arg(msg_ttl_ms).arg(exclusion_prefix(&self.shared.node, opts.exclude));
        for (topic, (_, _, _, channel)) in topics.iter().zip(&keyed) {
            let json = serde_json::to_string(topic).unwrap_or_default();
            script.arg(topic).arg(json).arg(channel).arg(new_epoch());
        }
        script
    }

    /// Whether `topic` may be subscribed to: it has state in Redis, or the cluster has room
    /// for one more topic (as a subscription to a new topic takes a place on a single node).
    fn has_room(&self, cmd: &mut redis::Connection, topic: &str) -> redis::RedisResult<bool> {
        redis::cmd("EVAL").arg(ROOM_LUA).arg(1).arg(REGISTRY).arg(topic).arg(self.max_topics).query(cmd)
    }

    fn handle_request(
        &mut self,
        cmd: &mut redis::Connection,
        request: BrokerRequest,
    ) -> redis::RedisResult<()> {
        match request {
            BrokerRequest::Publish { topics, fragment, reply, opts } => {
                self.publish_batch(cmd, vec![(topics, fragment, reply, opts)])?;
            }
            BrokerRequest::Subscribe { conn, topic, since, id, max_replay, presence, server } => {
                match self.subscribe(cmd, conn, &topic, since, id.clone(), max_replay, server) {
                    Ok(true) => {
                        if let Some((member, join_leave)) = presence {
                            self.join(cmd, &topic, member, join_leave)?;
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
                self.leave(cmd, &topic, member, join_leave)?;
            }
            BrokerRequest::Presence { topic, list, limit, reply } => {
                match read_presence(cmd, &topic, list, &limit) {
                    Ok(page) => self.answer_presence(reply, &topic, list, Ok(page)),
                    Err(e) if connection_lost(&e) => {
                        self.refuse(BrokerRequest::Presence { topic, list, limit, reply });
                        return Err(e);
                    }
                    Err(e) => self.answer_presence(reply, &topic, list, Err(redis_failed(&e))),
                }
            }
            BrokerRequest::TopicInfo { topic, subscribers, reply } => {
                let (seq_key, _, epoch_key, _) = keys(&topic);
                let found: redis::RedisResult<(Option<u64>, Option<String>)> =
                    redis::pipe().get(seq_key).get(epoch_key).query(cmd);
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
                let sent: redis::RedisResult<u64> = redis::cmd("PUBLISH")
                    .arg(CONTROL_CHANNEL)
                    .arg(format!("{}\n{message}", self.shared.node))
                    .query(cmd);
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
            BrokerRequest::History { topic, query, reply } => match read_history(cmd, &topic, &query) {
                Ok(page) => self.answer_history(reply, &topic, Ok(page)),
                Err(e) if connection_lost(&e) => {
                    self.refuse(BrokerRequest::History { topic, query, reply });
                    return Err(e);
                }
                Err(e) => self.answer_history(reply, &topic, Err(redis_failed(&e))),
            },
        }
        Ok(())
    }

    /// Answer a history read with its page, or with why it failed.
    fn answer_history(&self, reply: HistoryReply, topic: &str, page: Result<HistoryPage, CommandError>) {
        let stats = &self.shared.stats;
        match (reply, page) {
            (HistoryReply::Http(responder), Ok(page)) => {
                stats.http_histories.fetch_add(1, Ordering::Relaxed);
                responder.respond(HttpResponse::json(200, page.http_body(topic)));
            }
            (HistoryReply::Http(responder), Err(e)) => responder.respond(json_error(e.code, &e.reason)),
            (HistoryReply::Client(conn, id), Ok(page)) => {
                stats.client_histories.fetch_add(1, Ordering::Relaxed);
                let text = Reply::ok(id.as_deref(), "history")
                    .str("topic", topic)
                    .fields(|out| page.write_fields(out))
                    .finish();
                self.shared.send_to(conn, text);
            }
            (HistoryReply::Client(conn, id), Err(e)) => {
                self.shared.send_error(conn, id, e);
            }
        }
    }

    /// Run a presence script (`JOIN_LUA`, `LEAVE_LUA`) for `member` on `topic`, with an `op`
    /// event for the subscribers if `join_leave` (counted once Redis has run it).
    fn presence_change(
        &self,
        cmd: &mut redis::Connection,
        script: &str,
        op: &str,
        topic: &str,
        member: &Member,
        join_leave: bool,
    ) -> redis::RedisResult<()> {
        let ev = if join_leave { event(op, topic, &member.to_json()) } else { String::new() };
        self.presence_script(script, topic, member, &ev).query::<i64>(cmd)?;
        if join_leave {
            self.shared.stats.join_leave_events.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The presence script `script` (join or leave) of `member` on `topic`, with `event` for
    /// the subscribers (`""`: none).
    fn presence_script(&self, script: &str, topic: &str, member: &Member, event: &str) -> redis::Cmd {
        let mut c = redis::cmd("EVAL");
        let json = if member.user.is_some() { member.to_json() } else { String::new() };
        c.arg(script)
            .arg(1)
            .arg(presence_prefix(topic))
            .arg(&self.presence.node)
            .arg(self.presence.ttl.as_millis() as u64)
            .arg(&*member.client)
            .arg(member.user.as_deref().unwrap_or(""))
            .arg(json)
            .arg(keys(topic).3)
            .arg(event);
        c
    }

    /// A connection of this node subscribed to a topic that keeps presence.
    fn join(
        &mut self,
        cmd: &mut redis::Connection,
        topic: &str,
        member: Member,
        join_leave: bool,
    ) -> redis::RedisResult<()> {
        let json = if member.user.is_some() { member.to_json() } else { String::new() };
        let user = member.user.as_deref().unwrap_or("").to_string();
        let mine = self.present.entry(topic.to_string()).or_default();
        if mine.insert(member.client.clone(), (user, json)).is_none() {
            self.shared.status.presence_members.fetch_add(1, Ordering::Relaxed);
        }
        match self.presence_change(cmd, JOIN_LUA, "join", topic, &member, join_leave) {
            Ok(()) => Ok(()),
            // The refresh joins it again once Redis answers.
            Err(e) if connection_lost(&e) => {
                self.rejoin = true;
                Err(e)
            }
            Err(e) => {
                self.rejoin = true;
                tracing::warn!(topic, error = %e, "cannot record presence; joining again at the next refresh");
                Ok(())
            }
        }
    }

    /// Take a member out of this node's presence; false if it was not in it (its
    /// subscription failed, so it never joined).
    fn forget_member(&mut self, topic: &str, client: &str) -> bool {
        let Some(mine) = self.present.get_mut(topic) else { return false };
        let was = mine.remove(client).is_some();
        if was {
            self.shared.status.presence_members.fetch_sub(1, Ordering::Relaxed);
        }
        if mine.is_empty() {
            self.present.remove(topic);
        }
        was
    }

    /// A connection of this node left a topic that keeps presence.
    fn leave(
        &mut self,
        cmd: &mut redis::Connection,
        topic: &str,
        member: Member,
        join_leave: bool,
    ) -> redis::RedisResult<()> {
        if !self.forget_member(topic, &member.client) {
            return Ok(());
        }
        self.leave_in_redis(cmd, topic, member, join_leave)
    }

    /// Take a member that left out of Redis, with a leave event if `join_leave`; if the
    /// connection is lost, the leave waits for the next one.
    fn leave_in_redis(
        &self,
        cmd: &mut redis::Connection,
        topic: &str,
        member: Member,
        join_leave: bool,
    ) -> redis::RedisResult<()> {
        match self.presence_change(cmd, LEAVE_LUA, "leave", topic, &member, join_leave) {
            Ok(()) => Ok(()),
            Err(e) if connection_lost(&e) => {
                self.leaves.borrow_mut().push((topic.to_string(), member, join_leave));
                Err(e)
            }
            Err(e) => {
                tracing::warn!(topic, error = %e, "cannot record presence");
                Ok(())
            }
        }
    }

    /// Mark this node's presence alive on every topic it has members of; where Redis forgot it
    /// (the node was silent past the TTL, or Redis lost its data), join its members again.
    fn refresh_presence(&mut self, cmd: &mut redis::Connection) -> redis::RedisResult<()> {
        let mut leaves = std::mem::take(&mut *self.leaves.borrow_mut()).into_iter();
        while let Some((topic, member, join_leave)) = leaves.next() {
            if let Err(e) = self.leave_in_redis(cmd, &topic, member, join_leave) {
                // That one waits again; so do the ones after it, in order.
                self.leaves.borrow_mut().extend(leaves);
                return Err(e);
            }
        }
        let rejoin_all = std::mem::take(&mut self.rejoin);
        if self.present.is_empty() {
            return Ok(());
        }
        let ttl = self.presence.ttl.as_millis() as u64;
        let topics: Vec<String> = self.present.keys().cloned().collect();
        let mut pipe = redis::pipe();
        for t in &topics {
            let script = redis::cmd("EVAL")
                .arg(REFRESH_LUA)
                .arg(1)
                .arg(presence_prefix(t))
                .arg(&self.presence.node)
                .arg(ttl)
                .to_owned();
            pipe.add_command(script);
        }
        let alive: Vec<redis::Value> = pipe.ignore_errors().query(cmd)?;
        let (mut rejoin, mut rejoins) = (redis::pipe(), 0);
        for (topic, answer) in topics.iter().zip(alive) {
            if !rejoin_all && redis::from_redis_value::<i64>(answer).unwrap_or(0) == 1 {
                continue;
            }
            for (client, (user, json)) in &self.present[topic] {
                let script = redis::cmd("EVAL")
                    .arg(JOIN_LUA)
                    .arg(1)
                    .arg(presence_prefix(topic))
                    .arg(&self.presence.node)
                    .arg(ttl)
                    .arg(&**client)
                    .arg(user)
                    .arg(json)
                    .arg(keys(topic).3)
                    .arg("")
                    .to_owned();
                rejoin.add_command(script);
                rejoins += 1;
            }
        }
        if rejoins == 0 {
            return Ok(());
        }
        tracing::info!(members = rejoins, "broker: presence joined again in Redis");
        // A join Redis refuses fails alone, and is tried again at the next refresh.
        let answers: Vec<redis::Value> = rejoin.ignore_errors().query(cmd)?;
        let failed = answers
            .into_iter()
            .filter(|a| !matches!(redis::from_redis_value::<redis::RedisResult<i64>>(a.clone()), Ok(Ok(_))))
            .count();
        if failed > 0 {
            tracing::warn!(failed, "cannot record presence; joining again at the next refresh");
            self.rejoin = true;
        }
        Ok(())
    }

    /// Answer a presence read with what Redis holds, or with why it failed.
    fn answer_presence(
        &self,
        reply: PresenceReply,
        topic: &str,
        list: bool,
        page: Result<PresencePage, CommandError>,
    ) {
        let stats = &self.shared.stats;
        let fields = |page: &PresencePage, out: &mut String| {
            if list { page.write_fields(out) } else { page.stats.write_fields(out) }
        };
        match (reply, page) {
            (PresenceReply::Http(responder), Ok(page)) => {
                stats.presence_reads.of(true, list).fetch_add(1, Ordering::Relaxed);
                let body = super::presence::body(topic, |out| fields(&page, out));
                responder.respond(HttpResponse::json(200, body));
            }
            (PresenceReply::Http(responder), Err(e)) => responder.respond(json_error(e.code, &e.reason)),
            (PresenceReply::Client(conn, id), Ok(page)) => {
                stats.presence_reads.of(false, list).fetch_add(1, Ordering::Relaxed);
                let op = if list { "presence" } else { "presence_stats" };
                let text = Reply::ok(id.as_deref(), op)
                    .str("topic", topic)
                    .fields(|out| fields(&page, out))
                    .finish();
                self.shared.send_to(conn, text);
            }
            (PresenceReply::Client(conn, id), Err(e)) => {
                self.shared.send_error(conn, id, e);
            }
        }
    }

    /// Subscribe a connection; true if it is subscribed (false: it was answered an error).
    #[allow(clippy::too_many_arguments)]
    fn subscribe(
        &mut self,
        cmd: &mut redis::Connection,
        conn: ConnId,
        topic: &str,
        since: Option<Position>,
        id: Option<Box<RawValue>>,
        max_replay: usize,
        server: bool,
    ) -> redis::RedisResult<bool> {
        let (seq_key, log, epoch_key, _) = keys(topic);
        let listening = self.shared.topics().contains_key(topic);
        if !listening && !self.has_room(cmd, topic)? {
            self.reply_error(conn, topic, id, PublishError::TooManyTopics.into());
            return Ok(false);
        }
        if !listening {
            // Listen first: whatever is published from now on arrives on the channel, and
            // what came before is in the stream.
            let (ack_tx, ack_rx) = crossbeam_channel::bounded(1);
            let _ = self.listen.send(Listen::Subscribe(topic.to_string(), ack_tx));
            match ack_rx.recv_timeout(COMMAND_TIMEOUT * 2) {
                Ok(Ok(())) => {}
                _ => {
                    self.reply_error(conn, topic, id, unavailable("cannot subscribe in Redis"));
                    return Ok(false);
                }
            }
        }
        // From here until the connection is subscribed, the listener forwards nothing: what it
        // receives meanwhile is numbered after `last` and is forwarded after the subscription.
        let shared = self.shared.clone();
        let mut topics = shared.topics();
        if !topics.contains_key(topic) {
            let (seq, epoch): (Option<u64>, Option<String>) =
                redis::pipe().get(&seq_key).get(&epoch_key).query(cmd)?;
            topics.insert(
                topic.to_string(),
                Forwarding { epoch: epoch.unwrap_or_default(), last: seq.unwrap_or(0) },
            );
        }
        if let Some(p) = &since
            && topics.get(topic).is_some_and(|f| f.epoch != p.epoch || p.seq > f.last)
        {
            // The client may have seen (on another node) messages this node has not forwarded
            // yet: bring this node up to date from Redis (epoch included) first, then judge its
            // position.
            shared.catch_up(cmd, &mut topics, topic)?;
        }
        let f = &topics[topic];
        let (epoch, last) = (f.epoch.clone(), f.last);
        let mut replay: Vec<String> = Vec::new();
        let recovery: Option<Result<(), &'static str>> = match &since {
            None => None,
            Some(p) if !p.in_epoch(&epoch) => Some(Err("epoch changed: the topic's history was reset")),
            Some(p) if p.seq > last => Some(Err("position is ahead of the topic")),
            Some(p) if p.seq == last => Some(Ok(())),
            Some(p) => match read_replay(cmd, &log, p.seq, last, max_replay)? {
                Ok(missed) => {
                    replay = missed;
                    Some(Ok(()))
                }
                Err(why) => Some(Err(why)),
            },
        };
        let op = if server { "subscribed" } else { "subscribe" };
        let mut reply =
            Reply::ok(id.as_deref(), op).str("topic", topic).str("epoch", &epoch).raw("seq", last);
        if server {
            reply = reply.raw("server", true);
        }
        let stats = &self.shared.stats;
        reply = match recovery {
            None => reply,
            Some(Ok(())) => {
                stats.recovered.fetch_add(1, Ordering::Relaxed);
                reply.raw("recovered", true).raw("missed", replay.len())
            }
            Some(Err(why)) => {
                stats.not_recovered.fetch_add(1, Ordering::Relaxed);
                reply.raw("recovered", false).str("reason", why)
            }
        };
        let text = reply.finish();
        // The answer and the replay first, then the live subscription: both go through the
        // connection's loop mailbox ahead of anything forwarded after this point.
        let _ = self.shared.handle.post_to::<Client>(conn, move |ws| {
            ws.send_text(&text);
            for d in &replay {
                ws.send_text(d);
            }
        });
        let _ = self.shared.handle.subscribe(conn, topic);
        // Behind the subscription in the loop's mailbox: from then on `is_subscribed` says so.
        let name = topic.to_string();
        let _ =
            self.shared.handle.post_to::<Client>(conn, move |ws| ws.data().pending.retain(|t| *t != name));
        drop(topics);
        Ok(true)
    }

    /// Answer a subscribe with an error; the topic is no longer pending for the connection.
    fn reply_error(&self, conn: ConnId, topic: &str, id: Option<Box<RawValue>>, e: CommandError) {
        self.shared.stats.command_errors.fetch_add(1, Ordering::Relaxed);
        let name = topic.to_string();
        let _ = self.shared.handle.post_to::<Client>(conn, move |ws| {
            ws.data().pending.retain(|t| *t != name);
            ws.send_text(&error_reply(id.as_deref(), &e));
        });
    }

    fn answer_published(&self, reply: PublishReply, results: &[Placed]) {
        let stats = &self.shared.stats;
        let replays = results.iter().filter(|(.., dup)| *dup).count() as u64;
        if replays > 0 {
            stats.idempotent_replays.fetch_add(replays, Ordering::Relaxed);
        }
        let fresh = results.len() as u64 - replays;
        match reply {
            PublishReply::Http(responder) => {
                stats.http_publishes.fetch_add(fresh, Ordering::Relaxed);
                if let [(topic, seq, epoch, dup)] = results {
                    let subscribers = self.shared.handle.num_subscribers(topic);
                    responder.respond(published(topic, epoch, *seq, subscribers, *dup));
                    return;
                }
                let list: Vec<_> = results
                    .iter()
                    .map(|(t, s, e, _)| serde_json::json!({"topic": t, "epoch": e, "seq": s}))
                    .collect();
                responder
                    .respond(HttpResponse::json(200, serde_json::json!({ "results": list }).to_string()));
            }
            PublishReply::Batch(batch, i) => {
                stats.http_publishes.fetch_add(fresh, Ordering::Relaxed);
                if let Some((topic, seq, epoch, dup)) = results.first() {
                    batch.fill(i, item_result(topic, Ok((epoch, *seq, *dup))));
                }
            }
            PublishReply::Client(conn, id) => {
                stats.client_publishes.fetch_add(fresh, Ordering::Relaxed);
                let Some((topic, seq, epoch, dup)) = results.first().cloned() else { return };
                let _ = self.shared.handle.post_to::<Client>(conn, move |ws| {
                    let mut reply = Reply::ok(id.as_deref(), "publish")
                        .str("topic", &topic)
                        .str("epoch", &epoch)
                        .raw("seq", seq);
                    if dup {
                        reply = reply.raw("duplicate", true);
                    }
                    ws.send_text(&reply.finish());
                });
            }
        }
    }

    /// Answer a publish that was not carried out.
    fn answer_publish_error(&self, reply: PublishReply, topics: &[String], e: CommandError) {
        match reply {
            PublishReply::Http(responder) => responder.respond(json_error(e.code, &e.reason)),
            PublishReply::Batch(batch, i) => {
                batch.fill(i, item_result(topics.first().map_or("", String::as_str), Err(&e)))
            }
            PublishReply::Client(conn, id) => {
                self.shared.send_error(conn, id, e);
            }
        }
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

    #[test]
    fn positions_are_read_from_deliveries() {
        let d = r#"{"topic":"chat:a","epoch":"00ff","seq":42,"data":{"seq":1}}"#;
        assert_eq!(super::position_of(d), Some(("00ff".to_string(), 42)));
        assert_eq!(super::position_of("{}"), None);
    }

    #[test]
    fn a_publisher_left_out_is_named_on_the_channel_for_its_own_node_only() {
        let conn = gale_server::ConnId::from_bits(0x0001_0000_0200_0003);
        let d = r#"{"topic":"t","epoch":"e","seq":1,"data":1}"#;
        let message = format!("{}{d}", super::exclusion_prefix("00aa", Some(conn)));
        assert_eq!(super::split_exclusion(&message, "00aa"), (d, Some(conn)));
        assert_eq!(super::split_exclusion(&message, "00bb"), (d, None));
        assert_eq!(super::split_exclusion(d, "00aa"), (d, None));
        assert_eq!(super::exclusion_prefix("00aa", None), "");
        // As kept with a log entry.
        let prefix = super::exclusion_prefix("00aa", Some(conn));
        assert_eq!(super::exclusion_of(&prefix, "00aa"), Some(conn));
        assert_eq!(super::exclusion_of(&prefix, "00bb"), None);
    }

    #[test]
    fn idempotency_keys_are_never_the_keys_of_a_topic() {
        // Topic "a" with key "seq" must not be topic "a:idem"'s sequence number.
        let name = super::idempotency_key("a", "seq");
        assert_eq!(name, "gale:a|idem:seq");
        assert!(super::super::protocol::check_topic("a|idem").is_err());
        assert!(super::super::publish::check_key("x|y").is_err());
        let (seq, log, epoch, _) = super::keys("a:idem");
        assert!(![seq, log, epoch].contains(&name));
    }

    #[test]
    fn log_pages_continue_after_the_last_entry() {
        assert_eq!(super::entry_id("42-1"), Some((42, "42-2".to_string())));
        for bad in ["42", "x-1", "42-", "42-18446744073709551615"] {
            assert_eq!(super::entry_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn each_publish_gets_its_own_answer() {
        let topics = || vec!["a".to_string(), "b".to_string()];
        let answer = |resp: &[u8]| Some(redis::parse_redis_value(resp).unwrap());
        let ok = super::positions(
            &topics(),
            answer(b"*2\r\n*3\r\n:7\r\n$2\r\ne1\r\n:0\r\n*3\r\n:1\r\n$2\r\ne2\r\n:1\r\n"),
        );
        assert_eq!(ok.unwrap(), [("a".into(), 7, "e1".into(), false), ("b".into(), 1, "e2".into(), true)]);
        let refused =
            super::positions(&topics(), answer(b"-WRONGTYPE gale:a:log holds a string\r\n")).unwrap_err();
        assert_eq!((refused.code, refused.reason.contains("WRONGTYPE gale:a:log")), (500, true));
        // The cluster's topic limit is told as a single node tells it.
        let full = super::positions(&topics(), answer(b"-GALEFULL the cluster is full\r\n")).unwrap_err();
        assert_eq!(full, super::PublishError::TooManyTopics.into());
        // Never trust the shape of an answer: too few positions, or none at all.
        assert_eq!(
            super::positions(&topics(), answer(b"*1\r\n*3\r\n:7\r\n$2\r\ne1\r\n:0\r\n")).unwrap_err().code,
            500
        );
        assert_eq!(super::positions(&topics(), None).unwrap_err().code, 500);
    }
}
