//! Cluster mode: several gateways share topics through Redis.
//!
//! One broker thread per node owns two Redis connections: one for commands, one subscribed to
//! the channels of the topics this node has local subscribers for. Event loops never wait for
//! Redis: they send requests to the broker over a channel, and the broker answers through the
//! server's mailboxes (`ServerHandle::post_to`, deferred HTTP responses).
//!
//! In Redis, per topic `T`: `gale:T:seq` (the last sequence number), `gale:T:epoch` (set at
//! the first publish; a Redis that lost its data starts a new epoch), `gale:T:log` (a stream of
//! the last deliveries, entry id `seq-1`, trimmed to about the history size), and the channel
//! `gale:T`. A publish is one Lua script — number, record, publish — so every node sees every
//! topic's messages in one order.
//!
//! Exactly once per node: the broker forwards a message into the node's pub/sub only if its
//! sequence number is above the last one it forwarded for the topic. A local subscription is
//! set up by the broker thread itself, between two messages: it first makes sure the node is
//! subscribed to the channel, replays `(since, last forwarded]` from the stream to the client,
//! then subscribes the connection (`ServerHandle::subscribe`) before forwarding anything newer.
//! After a lost Redis connection the broker resubscribes and forwards what it missed from the
//! streams, so live subscribers see no gap as long as the history covers the outage.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use gale_server::{ConnId, HttpResponse, Responder, ServerHandle};

use super::gateway::Client;
use super::protocol::{CommandError, Reply, error_reply};
use super::topics::Position;

/// How long a Redis command may take before the broker counts Redis as unreachable.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the broker waits for channel messages before it looks at its requests again.
const POLL: Duration = Duration::from_millis(2);

/// The publish script: number, record, publish, in one step.
const PUBLISH_LUA: &str = r#"
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[4]
  redis.call('SET', KEYS[3], epoch)
end
local seq = redis.call('INCR', KEYS[1])
local d = '{"topic":' .. ARGV[1] .. ',"epoch":"' .. epoch .. '","seq":' .. seq .. ',' .. ARGV[2] .. '}'
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], seq .. '-1', 'd', d)
redis.call('PUBLISH', ARGV[5], d)
return {seq, epoch}
"#;

/// Where a publish's answer goes.
pub enum PublishReply {
    /// An HTTP request (one publish, or a broadcast to several topics).
    Http(Responder),
    /// A client's `publish` command: its connection and command id.
    Client(ConnId, Option<String>),
}

/// What the event loops ask the broker.
pub enum BrokerRequest {
    /// Publish `fragment` (`"data":…` or `"binary":…`) to each topic, in order.
    Publish { topics: Vec<String>, fragment: String, reply: PublishReply },
    /// Subscribe a connection, recovering from `since`.
    Subscribe { conn: ConnId, topic: String, since: Option<Position>, id: Option<String>, max_replay: usize },
    /// Answer `GET /api/topics/{topic}`.
    TopicInfo { topic: String, subscribers: usize, reply: Responder },
}

/// What other threads can see of the broker.
#[derive(Default)]
pub struct BrokerStatus {
    /// Connected to Redis.
    pub up: AtomicBool,
    /// Connections to Redis made after the first.
    pub reconnects: AtomicU64,
    /// Publishes refused because Redis was unreachable.
    pub failed_publishes: AtomicU64,
    /// Messages forwarded from Redis into this node.
    pub forwarded: AtomicU64,
}

/// The loops' side of the broker.
pub struct BrokerHandle {
    tx: Sender<BrokerRequest>,
    /// The broker's state.
    pub status: Arc<BrokerStatus>,
}

impl BrokerHandle {
    /// Send a request; false if the broker thread is gone.
    pub fn send(&self, request: BrokerRequest) -> bool {
        self.tx.send(request).is_ok()
    }
}

/// What the broker knows of a topic this node forwards.
struct Forwarding {
    epoch: String,
    /// The last sequence number forwarded into this node.
    last: u64,
}

/// Start the broker thread for Redis at `url`.
pub fn start(url: &str, handle: ServerHandle, history: usize) -> Result<BrokerHandle, String> {
    let client = redis::Client::open(url).map_err(|e| format!("broker {url}: {e}"))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let status = Arc::new(BrokerStatus::default());
    let broker = Broker {
        client,
        handle,
        rx,
        status: status.clone(),
        topics: HashMap::new(),
        history: history.max(1),
        script: redis::Script::new(PUBLISH_LUA),
    };
    std::thread::Builder::new()
        .name("gale-broker".into())
        .spawn(move || broker.run())
        .map_err(|e| format!("cannot start the broker thread: {e}"))?;
    Ok(BrokerHandle { tx, status })
}

struct Broker {
    client: redis::Client,
    handle: ServerHandle,
    rx: Receiver<BrokerRequest>,
    status: Arc<BrokerStatus>,
    topics: HashMap<String, Forwarding>,
    history: usize,
    script: redis::Script,
}

fn keys(topic: &str) -> (String, String, String, String) {
    (
        format!("gale:{topic}:seq"),
        format!("gale:{topic}:log"),
        format!("gale:{topic}:epoch"),
        format!("gale:{topic}"),
    )
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
        loop {
            match self.connect() {
                Ok((mut cmd, mut sub)) => {
                    if connected_once {
                        self.status.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    connected_once = true;
                    backoff = Duration::from_millis(100);
                    let mut pubsub = sub.as_pubsub();
                    let _ = pubsub.set_read_timeout(Some(POLL));
                    self.status.up.store(true, Ordering::Relaxed);
                    tracing::info!("broker: connected to Redis");
                    match self.serve(&mut cmd, &mut pubsub) {
                        Ok(()) => return,
                        Err(e) => tracing::warn!("broker: Redis connection lost: {e}"),
                    }
                    self.status.up.store(false, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!("broker: cannot reach Redis: {e}"),
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

    fn connect(&self) -> redis::RedisResult<(redis::Connection, redis::Connection)> {
        let cmd = self.client.get_connection_with_timeout(COMMAND_TIMEOUT)?;
        cmd.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        cmd.set_write_timeout(Some(COMMAND_TIMEOUT))?;
        let sub = self.client.get_connection_with_timeout(COMMAND_TIMEOUT)?;
        sub.set_write_timeout(Some(COMMAND_TIMEOUT))?;
        Ok((cmd, sub))
    }

    /// Serve while connected; `Ok` when the gateway shuts down.
    fn serve(
        &mut self,
        cmd: &mut redis::Connection,
        pubsub: &mut redis::PubSub<'_>,
    ) -> redis::RedisResult<()> {
        // After a reconnect: listen again, then forward what was missed meanwhile.
        let topics: Vec<String> = self.topics.keys().cloned().collect();
        for topic in &topics {
            pubsub.subscribe(keys(topic).3)?;
            self.catch_up(cmd, topic)?;
        }
        let mut last_check = Instant::now();
        loop {
            for _ in 0..256 {
                match self.rx.try_recv() {
                    Ok(request) => self.handle_request(cmd, pubsub, request)?,
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            match pubsub.get_message() {
                Ok(msg) => {
                    let channel = msg.get_channel_name().to_string();
                    let payload: String = msg.get_payload()?;
                    if let Some(topic) = channel.strip_prefix("gale:") {
                        self.forward(topic, &payload);
                    }
                }
                Err(e) if e.is_timeout() => {}
                Err(e) => return Err(e),
            }
            if last_check.elapsed() >= Duration::from_secs(1) {
                last_check = Instant::now();
                redis::cmd("PING").query::<String>(cmd)?;
                // Stop listening to topics nobody here subscribes to any more.
                let idle: Vec<String> =
                    self.topics.keys().filter(|t| self.handle.num_subscribers(t) == 0).cloned().collect();
                for topic in idle {
                    pubsub.unsubscribe(keys(&topic).3)?;
                    self.topics.remove(&topic);
                }
            }
        }
    }

    /// Hand a delivery from Redis to this node's subscribers, once and in order.
    fn forward(&mut self, topic: &str, delivery: &str) {
        let Some((epoch, seq)) = position_of(delivery) else { return };
        let Some(f) = self.topics.get_mut(topic) else { return };
        if f.epoch != epoch {
            // Redis lost the topic's state and started a new epoch.
            f.epoch = epoch;
            f.last = 0;
        }
        if seq > f.last {
            f.last = seq;
            self.handle.publish_text(topic, delivery);
            self.status.forwarded.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forward what the topic's stream holds beyond the last forwarded message.
    fn catch_up(&mut self, cmd: &mut redis::Connection, topic: &str) -> redis::RedisResult<()> {
        let (_, log, _, _) = keys(topic);
        let from = self.topics.get(topic).map_or(0, |f| f.last) + 1;
        let entries: Vec<(String, Vec<(String, String)>)> =
            redis::cmd("XRANGE").arg(&log).arg(format!("{from}-1")).arg("+").query(cmd)?;
        for (_, fields) in entries {
            if let Some((_, d)) = fields.into_iter().find(|(k, _)| k == "d") {
                self.forward(topic, &d);
            }
        }
        Ok(())
    }

    fn handle_request(
        &mut self,
        cmd: &mut redis::Connection,
        pubsub: &mut redis::PubSub<'_>,
        request: BrokerRequest,
    ) -> redis::RedisResult<()> {
        match request {
            BrokerRequest::Publish { topics, fragment, reply } => {
                let mut results = Vec::with_capacity(topics.len());
                for topic in &topics {
                    let (seq_key, log, epoch_key, channel) = keys(topic);
                    let topic_json = serde_json::to_string(topic).unwrap_or_default();
                    let result: redis::RedisResult<(u64, String)> = self
                        .script
                        .key(seq_key)
                        .key(log)
                        .key(epoch_key)
                        .arg(topic_json)
                        .arg(&fragment)
                        .arg(self.history)
                        .arg(new_epoch())
                        .arg(channel)
                        .invoke(cmd);
                    match result {
                        Ok((seq, epoch)) => results.push((topic.clone(), seq, epoch)),
                        Err(e) => {
                            self.status.failed_publishes.fetch_add(1, Ordering::Relaxed);
                            self.answer_publish_error(reply, &e.to_string());
                            return Err(e);
                        }
                    }
                }
                self.answer_published(reply, &results);
            }
            BrokerRequest::Subscribe { conn, topic, since, id, max_replay } => {
                self.subscribe(cmd, pubsub, conn, &topic, since, id, max_replay)?;
            }
            BrokerRequest::TopicInfo { topic, subscribers, reply } => {
                let (seq_key, _, epoch_key, _) = keys(&topic);
                let (seq, epoch): (Option<u64>, Option<String>) =
                    redis::pipe().get(seq_key).get(epoch_key).query(cmd)?;
                reply.respond(HttpResponse::json(
                    200,
                    serde_json::json!({"topic": topic, "subscribers": subscribers, "seq": seq.unwrap_or(0), "epoch": epoch})
                        .to_string(),
                ));
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn subscribe(
        &mut self,
        cmd: &mut redis::Connection,
        pubsub: &mut redis::PubSub<'_>,
        conn: ConnId,
        topic: &str,
        since: Option<Position>,
        id: Option<String>,
        max_replay: usize,
    ) -> redis::RedisResult<()> {
        let (seq_key, log, epoch_key, channel) = keys(topic);
        if !self.topics.contains_key(topic) {
            // Listen first: whatever is published from now on arrives on the channel, and
            // what came before is in the stream.
            pubsub.subscribe(&channel)?;
            let (seq, epoch): (Option<u64>, Option<String>) =
                redis::pipe().get(&seq_key).get(&epoch_key).query(cmd)?;
            self.topics.insert(
                topic.to_string(),
                Forwarding { epoch: epoch.unwrap_or_default(), last: seq.unwrap_or(0) },
            );
        }
        if let Some(p) = &since
            && self.topics.get(topic).is_some_and(|f| f.epoch != p.epoch || p.seq > f.last)
        {
            // The client may have seen (on another node) messages this node has not forwarded
            // yet: bring this node up to date from Redis first, then judge its position.
            let current: Option<String> = redis::cmd("GET").arg(&epoch_key).query(cmd)?;
            if let (Some(e), Some(f)) = (current, self.topics.get_mut(topic))
                && f.epoch != e
            {
                f.epoch = e;
                f.last = 0;
            }
            self.catch_up(cmd, topic)?;
        }
        let f = &self.topics[topic];
        let (epoch, last) = (f.epoch.clone(), f.last);
        let mut replay: Vec<String> = Vec::new();
        let recovery: Option<Result<(), &'static str>> = match &since {
            None => None,
            Some(p) if p.epoch != epoch => Some(Err("epoch changed: the topic's history was reset")),
            Some(p) if p.seq > last => Some(Err("position is ahead of the topic")),
            Some(p) if p.seq == last => Some(Ok(())),
            Some(p) => {
                let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                    .arg(&log)
                    .arg(format!("{}-1", p.seq + 1))
                    .arg(format!("{last}-1"))
                    .query(cmd)?;
                let first = entries.first().and_then(|(id, _)| id.split('-').next()?.parse::<u64>().ok());
                if first != Some(p.seq + 1) || entries.len() as u64 != last - p.seq {
                    Some(Err("missed messages are no longer in the history"))
                } else {
                    replay = entries
                        .into_iter()
                        .filter_map(|(_, fields)| fields.into_iter().find(|(k, _)| k == "d").map(|(_, d)| d))
                        .collect();
                    if replay.iter().map(String::len).sum::<usize>() > max_replay {
                        replay.clear();
                        Some(Err("missed messages are more than a connection may queue"))
                    } else {
                        Some(Ok(()))
                    }
                }
            }
        };
        let raw_id = id.as_deref().and_then(|i| serde_json::value::RawValue::from_string(i.to_string()).ok());
        let mut reply = Reply::ok(raw_id.as_deref(), "subscribe")
            .str("topic", topic)
            .str("epoch", &epoch)
            .raw("seq", last);
        reply = match recovery {
            None => reply,
            Some(Ok(())) => reply.raw("recovered", true).raw("missed", replay.len()),
            Some(Err(why)) => reply.raw("recovered", false).str("reason", why),
        };
        let text = reply.finish();
        // The answer and the replay first, then the live subscription: both go through the
        // connection's loop mailbox ahead of anything forwarded after this point.
        let _ = self.handle.post_to::<Client>(conn, move |ws| {
            ws.send_text(&text);
            for d in &replay {
                ws.send_text(d);
            }
        });
        let _ = self.handle.subscribe(conn, topic);
        Ok(())
    }

    fn answer_published(&self, reply: PublishReply, results: &[(String, u64, String)]) {
        match reply {
            PublishReply::Http(responder) => {
                let body = if results.len() == 1 {
                    let (topic, seq, epoch) = &results[0];
                    let subscribers = self.handle.num_subscribers(topic);
                    serde_json::json!({"topic": topic, "epoch": epoch, "seq": seq, "subscribers": subscribers})
                } else {
                    let list: Vec<_> = results
                        .iter()
                        .map(|(t, s, e)| serde_json::json!({"topic": t, "epoch": e, "seq": s}))
                        .collect();
                    serde_json::json!({ "results": list })
                };
                responder.respond(HttpResponse::json(200, body.to_string()));
            }
            PublishReply::Client(conn, id) => {
                let Some((topic, seq, epoch)) = results.first().cloned() else { return };
                let _ = self.handle.post_to::<Client>(conn, move |ws| {
                    let raw = id
                        .as_deref()
                        .and_then(|i| serde_json::value::RawValue::from_string(i.to_string()).ok());
                    ws.send_text(
                        &Reply::ok(raw.as_deref(), "publish")
                            .str("topic", &topic)
                            .str("epoch", &epoch)
                            .raw("seq", seq)
                            .finish(),
                    );
                });
            }
        }
    }

    fn answer_publish_error(&self, reply: PublishReply, why: &str) {
        let reason = format!("the broker is unavailable: {why}");
        match reply {
            PublishReply::Http(responder) => {
                responder.respond(HttpResponse::json(
                    503,
                    serde_json::json!({"error": {"code": 503, "reason": reason}}).to_string(),
                ));
            }
            PublishReply::Client(conn, id) => {
                let _ = self.handle.post_to::<Client>(conn, move |ws| {
                    let raw = id
                        .as_deref()
                        .and_then(|i| serde_json::value::RawValue::from_string(i.to_string()).ok());
                    ws.send_text(&error_reply(raw.as_deref(), &CommandError::new(503, reason)));
                });
            }
        }
    }

    /// Redis is unreachable: answer at once instead of queueing.
    fn refuse(&self, request: BrokerRequest) {
        let why = "Redis is unreachable";
        match request {
            BrokerRequest::Publish { reply, .. } => {
                self.status.failed_publishes.fetch_add(1, Ordering::Relaxed);
                self.answer_publish_error(reply, why);
            }
            BrokerRequest::Subscribe { conn, id, .. } => {
                let _ = self.handle.post_to::<Client>(conn, move |ws| {
                    let raw = id.as_deref().and_then(|i| serde_json::value::RawValue::from_string(i.to_string()).ok());
                    ws.send_text(&error_reply(
                        raw.as_deref(),
                        &CommandError::new(503, "the broker is unavailable: Redis is unreachable"),
                    ));
                });
            }
            BrokerRequest::TopicInfo { reply, .. } => reply.respond(HttpResponse::json(
                503,
                serde_json::json!({"error": {"code": 503, "reason": "the broker is unavailable: Redis is unreachable"}})
                    .to_string(),
            )),
        }
    }
}

/// A fresh epoch for a topic's first publish.
fn new_epoch() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    format!("{:016x}", u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    #[test]
    fn positions_are_read_from_deliveries() {
        let d = r#"{"topic":"chat:a","epoch":"00ff","seq":42,"data":{"seq":1}}"#;
        assert_eq!(super::position_of(d), Some(("00ff".to_string(), 42)));
        assert_eq!(super::position_of("{}"), None);
    }
}
