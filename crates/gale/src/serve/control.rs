//! Server-side control of users' connections, behind the API key: `POST /api/disconnect`
//! closes every live connection of a user, `POST /api/unsubscribe` and `POST /api/subscribe`
//! remove or add a subscription on each of them.
//!
//! The gateway keeps an index user (the token's `sub`) -> connections, updated when a
//! connection with a user opens and closes; the fan-out path never touches it. A command
//! finds the user's connections in it and posts the action to each connection's loop; the HTTP
//! answer waits until every loop has acted, and counts the connections it changed. In cluster
//! mode the command also goes to the other nodes over Redis (the broker's control channel),
//! and each applies it to its own connections.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use gale_server::{CloseCode, ConnId, HttpRequest, HttpResponse, Responder, WebSocket};
use serde::{Deserialize, Serialize};

use super::api::{check_key, json_error, metric};
use super::broker::BrokerRequest;
use super::gateway::{Client, Gateway};
use super::protocol::{CommandError, Reply, check_topic, error_reply};
use super::topics::Position;

/// The close code of `POST /api/disconnect` without `code` (and `reconnect` false or absent):
/// the gale-client stops, as for every code 4000-4499 but 4001.
pub const NO_RECONNECT: u16 = 4403;
/// The close code of `POST /api/disconnect` with `"reconnect": true` and no `code`: the
/// gale-client reconnects with backoff, as for every code 4500-4999.
pub const RECONNECT: u16 = 4500;
/// The close reason when none is given.
pub const DEFAULT_REASON: &str = "disconnected by the server";
/// The longest close reason: a close frame's payload is at most 125 bytes, 2 of them the code.
pub const MAX_REASON: usize = 123;

/// Shards of the user index: connections of different users open and close without
/// contending for one lock.
const SHARDS: usize = 16;

/// The user -> connections index and the counters of the control API.
pub struct Control {
    shards: Vec<Mutex<HashMap<String, Vec<ConnId>>>>,
    hasher: std::collections::hash_map::RandomState,
    /// Connections closed by `POST /api/disconnect`.
    pub disconnects: AtomicU64,
    /// Subscriptions removed by `POST /api/unsubscribe`.
    pub unsubscribes: AtomicU64,
    /// Subscriptions made by `POST /api/subscribe`.
    pub subscribes: AtomicU64,
}

impl Default for Control {
    fn default() -> Self {
        Control {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
            disconnects: AtomicU64::new(0),
            unsubscribes: AtomicU64::new(0),
            subscribes: AtomicU64::new(0),
        }
    }
}

impl Control {
    fn shard(&self, user: &str) -> std::sync::MutexGuard<'_, HashMap<String, Vec<ConnId>>> {
        let shard = self.hasher.hash_one(user) as usize % SHARDS;
        self.shards[shard].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection of `user` opened (connections without a user are not indexed).
    pub fn opened(&self, conn: ConnId, user: Option<&str>) {
        if let Some(user) = user {
            self.shard(user).entry(user.to_string()).or_default().push(conn);
        }
    }

    /// A connection of `user` closed.
    pub fn closed(&self, conn: ConnId, user: Option<&str>) {
        let Some(user) = user else { return };
        let mut shard = self.shard(user);
        if let Some(conns) = shard.get_mut(user) {
            conns.retain(|c| *c != conn);
            if conns.is_empty() {
                shard.remove(user);
            }
        }
    }

    /// The open connections of `user` on this node.
    pub fn connections(&self, user: &str) -> Vec<ConnId> {
        self.shard(user).get(user).cloned().unwrap_or_default()
    }
}

/// A position to recover from, as `subscribe` takes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Since {
    /// The topic's epoch the user saw (`null` or `""` with `seq` 0: the topic had no state).
    #[serde(default)]
    pub epoch: Option<String>,
    /// The last sequence number it received.
    pub seq: u64,
}

/// A control command, as the API takes it (the `op` comes from the path) and as it travels
/// between the nodes of a cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Command {
    /// Close every connection of `user` with `code` and `reason`.
    Disconnect { user: String, code: u16, reason: String },
    /// Remove the subscriptions of `user`'s connections to `topic`.
    Unsubscribe { user: String, topic: String },
    /// Subscribe `user`'s connections to `topic`, recovering from `since`.
    Subscribe {
        user: String,
        topic: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<Since>,
    },
}

impl Command {
    fn user(&self) -> &str {
        match self {
            Command::Disconnect { user, .. }
            | Command::Unsubscribe { user, .. }
            | Command::Subscribe { user, .. } => user,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    user: String,
    code: Option<u16>,
    reason: Option<String>,
    reconnect: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicBody {
    user: String,
    topic: String,
    since: Option<Since>,
}

/// Whether the gale-client reconnects after a close with `code` (4001: with a new token).
fn client_reconnects(code: u16) -> bool {
    code == 4001 || code >= RECONNECT
}

/// The close code of a disconnect: `code` if it is an application code (4000-4999) that agrees
/// with `reconnect`, else the default for `reconnect`.
fn close_code(code: Option<u16>, reconnect: Option<bool>) -> Result<u16, String> {
    let Some(code) = code else {
        return Ok(if reconnect == Some(true) { RECONNECT } else { NO_RECONNECT });
    };
    if !(4000..=4999).contains(&code) {
        return Err(format!("code must be an application close code, 4000 to 4999, not {code}"));
    }
    match reconnect {
        Some(r) if r != client_reconnects(code) => Err(format!(
            "code {code} tells clients {}: it contradicts \"reconnect\": {r} (4001 and 4500-4999 \
             reconnect, 4000-4499 do not)",
            if r { "not to reconnect" } else { "to reconnect" }
        )),
        _ => Ok(code),
    }
}

/// Parse and check the body of `POST /api/{op}`.
fn parse(op: &str, body: &[u8]) -> Result<Command, String> {
    let text = std::str::from_utf8(body).map_err(|_| "body is not UTF-8".to_string())?;
    let command = if op == "disconnect" {
        let b: DisconnectBody = serde_json::from_str(text)
            .map_err(|e| format!("body must be {{\"user\", \"code\"?, \"reason\"?, \"reconnect\"?}}: {e}"))?;
        let code = close_code(b.code, b.reconnect)?;
        let reason = b.reason.unwrap_or_else(|| DEFAULT_REASON.to_string());
        if reason.len() > MAX_REASON {
            return Err(format!("reason is {} bytes long: at most {MAX_REASON}", reason.len()));
        }
        Command::Disconnect { user: b.user, code, reason }
    } else {
        let b: TopicBody = serde_json::from_str(text)
            .map_err(|e| format!("body must be {{\"user\", \"topic\", \"since\"?}}: {e}"))?;
        check_topic(&b.topic).map_err(|e| e.reason)?;
        match op {
            "unsubscribe" if b.since.is_some() => return Err("unsubscribe takes no since".into()),
            "unsubscribe" => Command::Unsubscribe { user: b.user, topic: b.topic },
            _ => Command::Subscribe { user: b.user, topic: b.topic, since: b.since },
        }
    };
    if command.user().is_empty() {
        return Err("user must not be empty".into());
    }
    Ok(command)
}

/// The answer to a command, sent once every connection it was posted to has been acted on
/// (when the last reference is dropped) and, in cluster mode, the broker has broadcast it.
struct Tally {
    user: String,
    /// Connections acted on.
    applied: AtomicUsize,
    /// Cluster mode: nodes listening to the control channel (this one included), or why the
    /// broadcast failed; `None` until the broker has answered.
    broadcast: Mutex<Option<Result<u64, CommandError>>>,
    cluster: bool,
    responder: Option<Responder>,
}

impl Tally {
    fn count(&self) {
        self.applied.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        let Some(responder) = self.responder.take() else { return };
        let applied = self.applied.load(Ordering::Relaxed);
        let mut body = serde_json::json!({ "user": self.user, "connections": applied });
        if self.cluster {
            let broadcast = self.broadcast.lock().unwrap_or_else(|e| e.into_inner()).take();
            match broadcast {
                Some(Ok(nodes)) => body["nodes"] = nodes.into(),
                failed => {
                    let why = failed.and_then(Result::err).map_or_else(
                        || "the broker is overloaded: Redis cannot keep up".to_string(),
                        |e| e.reason,
                    );
                    let reason = format!(
                        "applied to {applied} connection(s) on this node, not sent to the other nodes: {why}"
                    );
                    return responder.respond(json_error(503, &reason));
                }
            }
        }
        responder.respond(HttpResponse::json(200, body.to_string()));
    }
}

/// `POST /api/disconnect`, `POST /api/unsubscribe`, `POST /api/subscribe`: `op` is the last
/// part of the path.
pub fn handle(g: &Arc<Gateway>, req: &HttpRequest<'_>) -> HttpResponse {
    if let Some(refused) = check_key(g, req) {
        return refused;
    }
    let op = req.path().rsplit('/').next().unwrap_or_default();
    let command = match parse(op, req.body()) {
        Ok(c) => c,
        Err(why) => return json_error(400, &why),
    };
    let tally = Arc::new(Tally {
        user: command.user().to_string(),
        applied: AtomicUsize::new(0),
        broadcast: Mutex::new(None),
        cluster: g.broker.get().is_some(),
        responder: Some(req.defer()),
    });
    if let Some(b) = g.broker.get() {
        let message = serde_json::to_string(&command).unwrap_or_default();
        let t = tally.clone();
        let done = Box::new(move |result: Result<u64, CommandError>| {
            *t.broadcast.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        });
        // Refused (queue full): `done` is dropped unanswered, and the answer says so.
        b.send(BrokerRequest::Control { message, done });
    }
    apply(g, &command, Some(&tally));
    HttpResponse::text(202, "deferred")
}

/// Apply a command that came from another node of the cluster.
pub fn apply_remote(g: &Arc<Gateway>, message: &str) {
    match serde_json::from_str::<Command>(message) {
        Ok(command) => apply(g, &command, None),
        Err(e) => tracing::warn!(error = %e, "ignoring a control message that is not a command"),
    }
}

/// Act on each of this node's connections of the command's user, on the connection's loop.
fn apply(g: &Arc<Gateway>, command: &Command, tally: Option<&Arc<Tally>>) {
    let Some(handle) = g.handle.get() else { return };
    for conn in g.control.connections(command.user()) {
        let (g, tally, command) = (g.clone(), tally.cloned(), command.clone());
        let _ = handle.post_to::<Client>(conn, move |ws| {
            if ws.is_open() && act(&g, ws, command) {
                tally.inspect(|t| t.count());
            }
        });
    }
}

/// Carry out `command` on one connection; whether it changed anything.
fn act(g: &Arc<Gateway>, ws: &mut WebSocket<'_, Client>, command: Command) -> bool {
    let stats = &g.control;
    match command {
        Command::Disconnect { code, reason, .. } => {
            ws.close(CloseCode(code), &reason);
            stats.disconnects.fetch_add(1, Ordering::Relaxed);
        }
        Command::Unsubscribe { topic, .. } => {
            if !ws.unsubscribe(&topic) {
                return false;
            }
            if let Some(tracked) = g.settings.presence.rules.tracked(&topic) {
                g.left(ws.data(), &topic, tracked);
            }
            stats.unsubscribes.fetch_add(1, Ordering::Relaxed);
            ws.send_text(
                &Reply::ok(None, "unsubscribed").str("topic", &topic).str("reason", "server").finish(),
            );
        }
        Command::Subscribe { topic, since, .. } => {
            if !subscribe(g, ws, topic, since) {
                return false;
            }
            stats.subscribes.fetch_add(1, Ordering::Relaxed);
        }
    }
    true
}

/// Subscribe one connection as the server asks: no rights or rate limit apply (the backend
/// decided), but a connection already subscribed (or subscribing) is left alone and the
/// limit of subscriptions per connection holds.
fn subscribe(g: &Arc<Gateway>, ws: &mut WebSocket<'_, Client>, topic: String, since: Option<Since>) -> bool {
    if ws.is_subscribed(&topic) || ws.data().pending.contains(&topic) {
        return false;
    }
    if super::gateway::at_subscription_limit(ws, g.settings.max_subscriptions) {
        let e = CommandError::new(
            413,
            format!(
                "not subscribed to {topic} by the server: at most {} subscriptions per connection",
                g.settings.max_subscriptions
            ),
        );
        ws.send_text(&error_reply(None, &e));
        return false;
    }
    let since = since.map(|s| Position { epoch: s.epoch.unwrap_or_default(), seq: s.seq });
    // A replay must fit in what the connection may queue, as for a client's subscribe.
    let max_replay = ws.behavior().max_backpressure / 2;
    if let Some(b) = g.broker.get() {
        // The broker answers with `"op": "subscribed"` once Redis has.
        let request = BrokerRequest::Subscribe {
            conn: ws.id(),
            topic: topic.clone(),
            since,
            id: None,
            max_replay,
            presence: g.broker_presence(ws.data(), &topic),
            server: true,
        };
        if !b.send(request) {
            return false;
        }
        ws.data().pending.insert(topic);
        return true;
    }
    let (pos, recovery) = match g.topics.subscribe(&topic, since.as_ref(), max_replay, || {
        ws.subscribe(&topic);
    }) {
        Ok(found) => found,
        Err(e) => {
            ws.send_text(&error_reply(None, &CommandError::from(e)));
            return false;
        }
    };
    let reply = Reply::ok(None, "subscribed")
        .str("topic", &topic)
        .str("epoch", &pos.epoch)
        .raw("seq", pos.seq)
        .raw("server", true);
    g.subscribed(ws, &topic, reply, recovery);
    true
}

/// The control API's counters, for `/metrics`.
pub fn write_metrics(g: &Gateway, out: &mut String) {
    let c = &g.control;
    for (name, help, value) in [
        ("gale_server_disconnects_total", "Connections closed by POST /api/disconnect.", &c.disconnects),
        (
            "gale_server_unsubscribes_total",
            "Subscriptions removed by POST /api/unsubscribe.",
            &c.unsubscribes,
        ),
        ("gale_server_subscribes_total", "Subscriptions made by POST /api/subscribe.", &c.subscribes),
    ] {
        metric(out, name, "counter", help, value.load(Ordering::Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_follow_reconnect() {
        assert_eq!(close_code(None, None), Ok(NO_RECONNECT));
        assert_eq!(close_code(None, Some(false)), Ok(NO_RECONNECT));
        assert_eq!(close_code(None, Some(true)), Ok(RECONNECT));
        assert_eq!(close_code(Some(4001), Some(true)), Ok(4001));
        assert_eq!(close_code(Some(4999), None), Ok(4999));
        assert_eq!(close_code(Some(4100), Some(false)), Ok(4100));
        for bad in [1000, 3000, 3999, 5000] {
            assert!(close_code(Some(bad), None).is_err(), "{bad}");
        }
        assert!(close_code(Some(4100), Some(true)).is_err());
        assert!(close_code(Some(4500), Some(false)).is_err());
    }

    #[test]
    fn bodies_are_checked() {
        let d = parse("disconnect", br#"{"user":"ann"}"#).unwrap();
        assert!(
            matches!(d, Command::Disconnect { code: NO_RECONNECT, ref reason, .. } if reason == DEFAULT_REASON)
        );
        assert!(parse("disconnect", br#"{"user":""}"#).is_err());
        assert!(parse("disconnect", br#"{"user":"ann","bogus":1}"#).is_err());
        let long = format!(r#"{{"user":"ann","reason":"{}"}}"#, "é".repeat(62));
        assert!(parse("disconnect", long.as_bytes()).unwrap_err().contains("124 bytes"));
        assert!(parse("unsubscribe", br#"{"user":"ann","topic":"a b"}"#).is_err());
        assert!(parse("unsubscribe", br#"{"user":"ann","topic":"t","since":{"seq":1}}"#).is_err());
        let s = parse("subscribe", br#"{"user":"ann","topic":"t","since":{"epoch":"e","seq":3}}"#).unwrap();
        // What travels between nodes reads back as the same command.
        let back: Command = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert!(
            matches!(back, Command::Subscribe { ref topic, since: Some(Since { seq: 3, .. }), .. } if topic == "t")
        );
    }

    #[test]
    fn the_index_follows_connections() {
        let c = Control::default();
        let (a, b) = (ConnId::from_bits(1), ConnId::from_bits(2));
        c.opened(a, Some("ann"));
        c.opened(b, Some("ann"));
        c.opened(ConnId::from_bits(3), None);
        assert_eq!(c.connections("ann"), [a, b]);
        c.closed(a, Some("ann"));
        assert_eq!(c.connections("ann"), [b]);
        c.closed(b, Some("ann"));
        assert!(c.connections("ann").is_empty());
        assert!(c.shards.iter().all(|s| s.lock().unwrap().is_empty()));
    }
}
