//! The gateway's shared state and its WebSocket endpoint: authentication at the upgrade, then
//! JSON commands (subscribe with recovery, unsubscribe, publish, history, presence, ping).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use gale_server::{Accept, Message, Reject, ServerHandle, UpgradeRequest, WebSocket, WsHandler};

use super::auth::{Rights, origin_allowed, verify_token};
use super::broker::{BrokerRequest, HistoryReply, PresenceReply, PublishReply};
use super::config::Settings;
use super::history::HistoryQuery;
use super::presence::{ClientIds, ListLimit, Member, Presence, Tracked};
use super::protocol::{
    Command, CommandError, Payload, Reply, check_topic, error_reply, fragment, parse_command,
};
use super::publish::{PublishOptions, check_key, check_ttl};
use super::topics::{Position, PublishError, Published, Recovery, Topics};

/// Counters the gateway adds to the server's own in `/metrics`.
#[derive(Default)]
pub struct GatewayStats {
    /// Publishes through the HTTP API.
    pub http_publishes: AtomicU64,
    /// Publishes by clients.
    pub client_publishes: AtomicU64,
    /// Subscriptions with `since` that got what they missed.
    pub recovered: AtomicU64,
    /// Subscriptions with `since` that could not be recovered.
    pub not_recovered: AtomicU64,
    /// History reads answered through the HTTP API.
    pub http_histories: AtomicU64,
    /// History reads answered to clients' `history` commands.
    pub client_histories: AtomicU64,
    /// Commands answered with an error.
    pub command_errors: AtomicU64,
    /// Upgrades refused (origin, token).
    pub rejected_upgrades: AtomicU64,
    /// Publishes with an idempotency key already remembered: answered, not published again.
    pub idempotent_replays: AtomicU64,
    /// Items of `POST /api/publish_batch` requests.
    pub batch_items: AtomicU64,
    /// `refresh` commands that replaced a connection's token.
    pub refreshes: AtomicU64,
    /// `refresh` commands refused (bad token, another user, no token to refresh).
    pub refused_refreshes: AtomicU64,
    /// Presence reads answered: lists and counts, through the HTTP API and to clients.
    pub presence_reads: PresenceReads,
    /// Join and leave events sent.
    pub join_leave_events: AtomicU64,
}

/// Presence reads answered, by source and kind.
#[derive(Default)]
pub struct PresenceReads {
    /// `GET /api/presence/{topic}`.
    pub http_list: AtomicU64,
    /// `GET /api/presence_stats/{topic}`.
    pub http_stats: AtomicU64,
    /// `presence` commands.
    pub client_list: AtomicU64,
    /// `presence_stats` commands.
    pub client_stats: AtomicU64,
}

impl PresenceReads {
    /// The counter of a read: HTTP or client, list or counts.
    pub fn of(&self, http: bool, list: bool) -> &AtomicU64 {
        match (http, list) {
            (true, true) => &self.http_list,
            (true, false) => &self.http_stats,
            (false, true) => &self.client_list,
            (false, false) => &self.client_stats,
        }
    }
}

/// Everything the endpoints share.
pub struct Gateway {
    /// The configuration.
    pub settings: Settings,
    /// Topic state and history.
    pub topics: Topics,
    /// Rights of clients without a token.
    pub anonymous: Arc<Rights>,
    /// The running server (set once it is bound).
    pub handle: OnceLock<ServerHandle>,
    /// Counters.
    pub stats: Arc<GatewayStats>,
    /// The Redis broker, in cluster mode.
    pub broker: OnceLock<super::broker::BrokerHandle>,
    /// Who is subscribed to the topics that keep presence (single-node mode).
    pub presence: Presence,
    /// Client ids, unique across the nodes of a cluster.
    pub client_ids: ClientIds,
    /// Users' connections, for the server-side control API.
    pub control: super::control::Control,
}

impl Gateway {
    /// The gateway for these settings.
    pub fn new(settings: Settings) -> Arc<Gateway> {
        let topics = Topics::new(settings.history, settings.max_topics).with_publish_limits(settings.publish);
        let anonymous = Arc::new(
            Rights::anonymous(&settings.namespaces).with_personal(settings.presence.personal.clone()),
        );
        Arc::new(Gateway {
            settings,
            topics,
            anonymous,
            handle: OnceLock::new(),
            stats: Arc::default(),
            broker: OnceLock::new(),
            presence: Presence::default(),
            client_ids: ClientIds::new(super::topics::new_epoch()),
            control: Default::default(),
        })
    }

    /// This node's subscriptions kept in presence.
    pub fn presence_members(&self) -> u64 {
        match self.broker.get() {
            Some(b) => b.status.presence_members.load(Ordering::Relaxed),
            None => self.presence.members.load(Ordering::Relaxed),
        }
    }

    /// The presence of a connection: its client id, its token's `sub` and `info`.
    pub(super) fn member(&self, client: &Client) -> Member {
        Member {
            client: self.client_ids.client_id(client.serial),
            user: client.rights.user.as_deref().map(Into::into),
            info: client.rights.info.clone(),
        }
    }

    /// A connection left a topic that keeps presence (unsubscribed, or closed).
    pub(super) fn left(&self, client: &Client, topic: &str, tracked: Tracked) {
        let member = self.member(client);
        if let Some(b) = self.broker.get() {
            let join_leave = tracked.join_leave && member.user.is_some();
            b.send(BrokerRequest::Leave { topic: topic.to_string(), member, join_leave });
            return;
        }
        self.presence.leave(topic, &member);
        if tracked.join_leave {
            self.join_leave_event("leave", topic, &member);
        }
    }

    /// A subscribe done on a single node (the client's or the server's): `reply` with what
    /// recovery found, the missed messages after it, then the connection's presence.
    pub(super) fn subscribed(
        &self,
        ws: &mut WebSocket<'_, Client>,
        topic: &str,
        reply: Reply,
        recovery: Recovery,
    ) {
        match recovery {
            Recovery::NotAsked => {
                ws.send_text(&reply.finish());
            }
            Recovery::Recovered(missed) => {
                self.stats.recovered.fetch_add(1, Ordering::Relaxed);
                ws.send_text(&reply.raw("recovered", true).raw("missed", missed.len()).finish());
                for d in &missed {
                    ws.send_text(d);
                }
            }
            Recovery::Impossible(why) => {
                self.stats.not_recovered.fetch_add(1, Ordering::Relaxed);
                ws.send_text(&reply.raw("recovered", false).str("reason", why).finish());
            }
        }
        self.joined(ws.data(), topic);
    }

    /// What a cluster subscribe tells the broker of presence: the connection's member, and
    /// whether to send a join event; `None` when the topic keeps no presence.
    pub(super) fn broker_presence(&self, client: &Client, topic: &str) -> Option<(Member, bool)> {
        let tracked = self.settings.presence.rules.tracked(topic)?;
        Some((self.member(client), tracked.join_leave && client.rights.user.is_some()))
    }

    /// A connection joined a topic (single node; the broker does it in cluster mode): its
    /// presence, and a join event where the namespace sends them.
    fn joined(&self, client: &Client, topic: &str) {
        if let Some(tracked) = self.settings.presence.rules.tracked(topic) {
            let member = self.member(client);
            self.presence.join(topic, &member);
            if tracked.join_leave {
                self.join_leave_event("join", topic, &member);
            }
        }
    }

    /// Tell a topic's subscribers that a client with a token joined or left (single node; the
    /// broker does it in cluster mode). Not numbered, not kept in the history.
    fn join_leave_event(&self, op: &str, topic: &str, member: &Member) {
        if member.user.is_none() {
            return;
        }
        if let Some(h) = self.handle.get() {
            h.publish_text(topic, &super::presence::event(op, topic, &member.to_json()));
            self.stats.join_leave_events.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Publish `payload` to `topic` (numbered, kept in history, delivered everywhere).
    pub fn publish(&self, topic: &str, payload: &Payload<'_>) -> Result<Position, PublishError> {
        let handle = self.handle.get();
        self.topics.publish(topic, payload, |delivery| {
            if let Some(h) = handle {
                h.publish_text(topic, delivery);
            }
        })
    }

    /// Publish with options: an idempotency key, a time to live, a connection left out.
    pub fn publish_with(
        &self,
        topic: &str,
        payload: &Payload<'_>,
        opts: &PublishOptions,
    ) -> Result<Published, PublishError> {
        let handle = self.handle.get();
        let done = self.topics.publish_with(topic, payload, opts, |delivery| {
            if let Some(h) = handle {
                match opts.exclude {
                    Some(publisher) => h.publish_text_except(topic, delivery, publisher),
                    None => h.publish_text(topic, delivery),
                };
            }
        })?;
        if done.duplicate {
            self.stats.idempotent_replays.fetch_add(1, Ordering::Relaxed);
        }
        Ok(done)
    }
}

/// A token bucket: `rate` per second, at most `burst` saved up.
struct Bucket {
    tokens: f32,
    refilled: Instant,
}

impl Bucket {
    fn full(burst: u32) -> Bucket {
        Bucket { tokens: burst as f32, refilled: Instant::now() }
    }

    /// Spend one token for a `what` command, or answer 429.
    fn spend(&mut self, what: &str, rate: f64, burst: u32) -> Result<(), CommandError> {
        if self.take(rate, burst) {
            return Ok(());
        }
        Err(CommandError::new(429, format!("{what} rate limit: {rate} per second, bursts of {burst}")))
    }

    /// Spend one token if there is one.
    fn take(&mut self, rate: f64, burst: u32) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.refilled).as_secs_f32() * rate as f32;
        self.tokens = (self.tokens + refill).min(burst as f32);
        self.refilled = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// A client's state.
pub struct Client {
    rights: Arc<Rights>,
    publishes: Bucket,
    subscribes: Bucket,
    histories: Bucket,
    presences: Bucket,
    /// Numbers the connection's client id (see `ClientIds`).
    serial: u64,
    /// Cluster mode: subscriptions sent to the broker and not answered yet.
    pub(crate) pending: HashSet<String>,
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The `/ws` endpoint.
pub struct Endpoint(pub Arc<Gateway>);

impl WsHandler for Endpoint {
    type Data = Client;

    fn upgrade(&self, req: &UpgradeRequest<'_>) -> Result<Accept<Client>, Reject> {
        let g = &self.0;
        let refuse = |status, reason: String| {
            g.stats.rejected_upgrades.fetch_add(1, Ordering::Relaxed);
            Err(Reject::new(status, reason))
        };
        if !origin_allowed(req.origin(), req.host(), &g.settings.allowed_origins) {
            return refuse(403, format!("origin {} is not allowed", req.origin().unwrap_or_default()));
        }
        let rights = match req.query_param("token") {
            None | Some("") => g.anonymous.clone(),
            Some(token) => match verify_token(token, g.settings.jwt_secret.as_deref(), &g.anonymous) {
                Ok(r) => Arc::new(r),
                Err(why) => return refuse(401, why),
            },
        };
        let s = &g.settings;
        Ok(Accept::new(Client {
            rights,
            publishes: Bucket::full(s.publish_burst),
            subscribes: Bucket::full(s.subscribe_burst),
            histories: Bucket::full(s.history_burst),
            presences: Bucket::full(s.presence.burst),
            serial: g.client_ids.next(),
            pending: HashSet::new(),
        }))
    }

    fn open(&self, ws: &mut WebSocket<'_, Client>) {
        self.0.control.opened(ws.id(), ws.data().rights.user.as_deref());
    }

    /// Pongs answer the automatic pings: a connection whose token has expired ends here
    /// even if it only listens.
    fn pong(&self, ws: &mut WebSocket<'_, Client>, _payload: &[u8]) {
        close_if_expired(ws);
    }

    /// The connection leaves the user index, and its presence ends with it.
    fn close(&self, ws: &mut WebSocket<'_, Client>, _code: gale_server::CloseCode, _reason: &str) {
        let g = &self.0;
        g.control.closed(ws.id(), ws.data().rights.user.as_deref());
        let rules = &g.settings.presence.rules;
        if rules.is_empty() {
            return;
        }
        // Cluster mode: a subscription the broker has not answered yet may still join; the
        // broker handles the leave after it.
        let mut topics: Vec<String> = ws.topics().map(str::to_string).collect();
        let pending = std::mem::take(&mut ws.data().pending);
        topics.extend(pending.into_iter().filter(|t| !ws.is_subscribed(t)));
        for topic in topics {
            if let Some(tracked) = rules.tracked(&topic) {
                g.left(ws.data(), &topic, tracked);
            }
        }
    }

    fn message(&self, ws: &mut WebSocket<'_, Client>, msg: Message<'_>) {
        if close_if_expired(ws) {
            return;
        }
        let Message::Text(text) = msg else {
            self.0.stats.command_errors.fetch_add(1, Ordering::Relaxed);
            ws.send_text(&error_reply(None, &CommandError::new(400, "commands are JSON text messages")));
            return;
        };
        let cmd = match parse_command(text) {
            Ok(cmd) => cmd,
            Err((id, e)) => {
                self.0.stats.command_errors.fetch_add(1, Ordering::Relaxed);
                ws.send_text(&error_reply(id, &e));
                return;
            }
        };
        if let Err(e) = self.command(ws, &cmd) {
            self.0.stats.command_errors.fetch_add(1, Ordering::Relaxed);
            ws.send_text(&error_reply(cmd.id, &e));
        }
    }
}

/// Close with 4001 if the connection's token has expired; returns whether it did.
fn close_if_expired(ws: &mut WebSocket<'_, Client>) -> bool {
    if ws.data().rights.expires.is_some_and(|exp| unix_now() >= exp) {
        ws.close(gale_server::CloseCode(4001), "token expired");
        return true;
    }
    false
}

impl Endpoint {
    fn command(&self, ws: &mut WebSocket<'_, Client>, cmd: &Command<'_>) -> Result<(), CommandError> {
        let g = &self.0;
        let topic = || -> Result<&str, CommandError> {
            let t = cmd
                .topic
                .as_deref()
                .ok_or_else(|| CommandError::new(400, format!("{} needs a topic", cmd.op)))?;
            check_topic(t)?;
            Ok(t)
        };
        match cmd.op.as_str() {
            "ping" => {
                ws.send_text(&Reply::ok(cmd.id, "ping").finish());
            }
            "subscribe" => {
                let topic = topic()?;
                if !ws.data().rights.may_subscribe(topic) {
                    return Err(CommandError::new(403, format!("not allowed to subscribe to {topic}")));
                }
                // Cluster mode: a subscription the broker has not answered yet counts too.
                if ws.is_subscribed(topic) || ws.data().pending.contains(topic) {
                    return Err(CommandError::new(409, format!("already subscribed to {topic}")));
                }
                let s = &g.settings;
                ws.data().subscribes.spend("subscribe", s.subscribe_rate, s.subscribe_burst)?;
                if at_subscription_limit(ws, g.settings.max_subscriptions) {
                    return Err(CommandError::new(
                        413,
                        format!("at most {} subscriptions per connection", g.settings.max_subscriptions),
                    ));
                }
                let since = cmd
                    .since
                    .as_ref()
                    .map(|s| Position { epoch: s.epoch.clone().unwrap_or_default(), seq: s.seq });
                // A replay must fit in what the connection may queue.
                let max_replay = ws.behavior().max_backpressure / 2;
                if let Some(b) = g.broker.get() {
                    // Cluster mode: the broker answers (and subscribes) once Redis has.
                    let request = BrokerRequest::Subscribe {
                        conn: ws.id(),
                        topic: topic.to_string(),
                        since,
                        id: cmd.id.map(ToOwned::to_owned),
                        max_replay,
                        server: false,
                        presence: g.broker_presence(ws.data(), topic),
                    };
                    if !b.send(request) {
                        return Err(CommandError::new(503, "the broker is unavailable"));
                    }
                    ws.data().pending.insert(topic.to_string());
                    return Ok(());
                }
                let (pos, recovery) = g
                    .topics
                    .subscribe(topic, since.as_ref(), max_replay, || {
                        ws.subscribe(topic);
                    })
                    .map_err(CommandError::from)?;
                let reply = Reply::ok(cmd.id, "subscribe")
                    .str("topic", topic)
                    .str("epoch", &pos.epoch)
                    .raw("seq", pos.seq);
                g.subscribed(ws, topic, reply, recovery);
            }
            "presence" | "presence_stats" => {
                let topic = topic()?;
                let list = cmd.op == "presence";
                let allowed = g.settings.presence.rules.tracked(topic).is_some_and(|t| t.presence);
                if !allowed || !ws.data().rights.may_subscribe(topic) {
                    return Err(CommandError::new(
                        403,
                        format!("not allowed to read the presence of {topic}"),
                    ));
                }
                let p = &g.settings.presence;
                ws.data().presences.spend("presence", p.rate, p.burst)?;
                // An answer must fit in what the connection may queue, as a history page must.
                let limit =
                    ListLimit { max_clients: p.max_clients, max_bytes: ws.behavior().max_backpressure / 2 };
                if let Some(b) = g.broker.get() {
                    let reply = PresenceReply::Client(ws.id(), cmd.id.map(ToOwned::to_owned));
                    if !b.send(BrokerRequest::Presence { topic: topic.to_string(), list, limit, reply }) {
                        return Err(CommandError::new(503, "the broker is unavailable"));
                    }
                    return Ok(());
                }
                g.stats.presence_reads.of(false, list).fetch_add(1, Ordering::Relaxed);
                let reply = Reply::ok(cmd.id, &cmd.op).str("topic", topic);
                let reply = if list {
                    let page = g.presence.list(topic, &limit);
                    reply.fields(|out| page.write_fields(out))
                } else {
                    let stats = g.presence.stats(topic);
                    reply.fields(|out| stats.write_fields(out))
                };
                ws.send_text(&reply.finish());
            }
            "history" => {
                let topic = topic()?;
                if !ws.data().rights.may_read_history(topic) {
                    return Err(CommandError::new(
                        403,
                        format!("not allowed to read the history of {topic}"),
                    ));
                }
                let s = &g.settings;
                let limit = s.history_read.limit(cmd.limit)?;
                ws.data().histories.spend("history", s.history_rate, s.history_burst)?;
                // An answer must fit in what the connection may queue, as a replay must.
                let max_bytes = ws.behavior().max_backpressure / 2;
                let query = HistoryQuery { since: cmd.since_seq.unwrap_or(0), limit, max_bytes };
                if let Some(b) = g.broker.get() {
                    let reply = HistoryReply::Client(ws.id(), cmd.id.map(ToOwned::to_owned));
                    if !b.send(BrokerRequest::History { topic: topic.to_string(), query, reply }) {
                        return Err(CommandError::new(503, "the broker is unavailable"));
                    }
                    return Ok(());
                }
                let page = g.topics.history(topic, &query);
                g.stats.client_histories.fetch_add(1, Ordering::Relaxed);
                ws.send_text(
                    &Reply::ok(cmd.id, "history")
                        .str("topic", topic)
                        .fields(|out| page.write_fields(out))
                        .finish(),
                );
            }
            "unsubscribe" => {
                let topic = topic()?;
                if !ws.unsubscribe(topic) {
                    return Err(CommandError::new(404, format!("not subscribed to {topic}")));
                }
                if let Some(tracked) = g.settings.presence.rules.tracked(topic) {
                    g.left(ws.data(), topic, tracked);
                }
                ws.send_text(&Reply::ok(cmd.id, "unsubscribe").str("topic", topic).finish());
            }
            "publish" => {
                let topic = topic()?;
                if !ws.data().rights.may_publish(topic) {
                    return Err(CommandError::new(403, format!("not allowed to publish to {topic}")));
                }
                let data = cmd.data.ok_or_else(|| CommandError::new(400, "publish needs data"))?;
                let mut opts = PublishOptions { from_client: true, ..PublishOptions::default() };
                if let Some(key) = &cmd.idempotency_key {
                    check_key(key)?;
                    opts.idempotency_key = Some(key.clone());
                }
                if let Some(ttl) = cmd.ttl {
                    opts.ttl = Some(check_ttl(ttl)?);
                }
                if cmd.exclude_self == Some(true) {
                    opts.exclude = Some(ws.id());
                }
                let s = &g.settings;
                ws.data().publishes.spend("publish", s.publish_rate, s.publish_burst)?;
                if let Some(b) = g.broker.get() {
                    let request = BrokerRequest::Publish {
                        topics: vec![topic.to_string()],
                        fragment: fragment(&Payload::Json(data.get())),
                        reply: PublishReply::Client(ws.id(), cmd.id.map(ToOwned::to_owned)),
                        opts,
                    };
                    if !b.send(request) {
                        return Err(CommandError::new(503, "the broker is unavailable"));
                    }
                    // Counted by the broker once Redis has numbered it.
                    return Ok(());
                }
                let done =
                    g.publish_with(topic, &Payload::Json(data.get()), &opts).map_err(CommandError::from)?;
                let mut reply = Reply::ok(cmd.id, "publish")
                    .str("topic", topic)
                    .str("epoch", &done.pos.epoch)
                    .raw("seq", done.pos.seq);
                if done.duplicate {
                    reply = reply.raw("duplicate", true);
                } else {
                    g.stats.client_publishes.fetch_add(1, Ordering::Relaxed);
                }
                ws.send_text(&reply.finish());
            }
            "refresh" => {
                let refused = |e: CommandError| {
                    g.stats.refused_refreshes.fetch_add(1, Ordering::Relaxed);
                    e
                };
                let token = cmd
                    .token
                    .as_deref()
                    .ok_or_else(|| refused(CommandError::new(400, "refresh needs a token")))?;
                let Some(user) = ws.data().rights.user.clone() else {
                    return Err(refused(CommandError::new(
                        403,
                        "this connection has no token to refresh: connect with ?token=",
                    )));
                };
                let rights = verify_token(token, g.settings.jwt_secret.as_deref(), &g.anonymous)
                    .map_err(|why| refused(CommandError::new(401, why)))?;
                if rights.user.as_deref() != Some(user.as_str()) {
                    return Err(refused(CommandError::new(
                        403,
                        format!("the token is for another user: its sub must be {user:?}"),
                    )));
                }
                let expires = rights.expires.unwrap_or(0);
                ws.data().rights = Arc::new(rights);
                g.stats.refreshes.fetch_add(1, Ordering::Relaxed);
                ws.send_text(&Reply::ok(cmd.id, "refresh").raw("expires", expires).finish());
            }
            other => {
                return Err(CommandError::new(
                    400,
                    format!(
                        "unknown op {other:?}: expected subscribe, unsubscribe, publish, history, presence, presence_stats, refresh or ping"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Whether the connection's subscriptions, those the broker has not answered yet included,
/// reach `max`. A topic whose subscription has just been made is counted once: the loop
/// subscribes the connection before it takes the topic out of `pending`, and a command read
/// in between must not count it twice (a connection at its limit would be refused a
/// subscription it may have). Constant time below the limit: the topics counted twice are
/// looked for only when the plain sum reaches it.
pub(crate) fn at_subscription_limit(ws: &mut WebSocket<'_, Client>, max: usize) -> bool {
    let subscribed = ws.subscription_count();
    if subscribed + ws.data().pending.len() < max {
        return false;
    }
    let pending = std::mem::take(&mut ws.data().pending);
    let unanswered = pending.iter().filter(|t| !ws.is_subscribed(t)).count();
    ws.data().pending = pending;
    subscribed + unanswered >= max
}
