//! The gateway's configuration: an embedded default, a TOML file merged over it, then
//! command-line flags; checked before anything starts, with errors that name the key.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

use super::auth::Pattern;
use super::history::ReadLimits;
use super::presence::PresenceRules;
use super::publish::PublishLimits;
use super::topics::HistoryLimits;
use crate::units;

/// The embedded default configuration (also the documented example).
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// The whole configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listener and loops.
    pub server: ServerSection,
    /// Certificate and key.
    pub tls: TlsSection,
    /// Other nodes.
    pub cluster: ClusterSection,
    /// The client WebSocket endpoint.
    pub websocket: WebSocketSection,
    /// Tokens, the API key, origins.
    pub auth: AuthSection,
    /// Rate and size limits.
    pub limits: LimitsSection,
    /// Per-topic history for recovery.
    pub history: HistorySection,
    /// Publish options: idempotency keys, batches.
    pub publish: PublishSection,
    /// Who is subscribed: list sizes, and the cluster's expiry of a silent node's clients.
    pub presence: PresenceSection,
    /// What anonymous clients may do, by topic pattern.
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
}

/// `[server]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Listen address.
    pub listen: String,
    /// Event loops; 0 = one per core.
    pub threads: usize,
    /// `auto`, `epoll` or `uring`.
    pub backend: String,
    /// Bytes per loop for messages not yet received whole.
    #[serde(deserialize_with = "units::bytes")]
    pub partial_message_budget: usize,
}

/// `[cluster]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Redis URL; empty: single node.
    pub broker: String,
    /// Replicas that must have a publish before it is acknowledged (0: the primary alone).
    pub ack_replicas: usize,
    /// How long a publish waits for those replicas (ms).
    pub ack_timeout_ms: u64,
}

/// `[tls]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Certificate chain (PEM); empty: no TLS.
    pub cert: String,
    /// Private key (PEM).
    pub key: String,
}

/// `[websocket]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketSection {
    /// Path clients connect to.
    pub path: String,
    /// Largest client message, bytes.
    #[serde(deserialize_with = "units::bytes")]
    pub max_payload: usize,
    /// Seconds; 0 = never.
    pub idle_timeout: u64,
    /// Seconds; 0 = no pings.
    pub ping_interval: u64,
    /// Seconds from a message's first byte to its last; 0 = no limit.
    pub message_timeout: u64,
    /// Bytes queued for a slow client.
    #[serde(deserialize_with = "units::bytes")]
    pub max_backpressure: usize,
    /// `drop` or `close`.
    pub backpressure: String,
    /// Seconds a connection may stay past `max_backpressure` (not read) before it is dropped.
    pub backpressure_timeout: u64,
    /// `off`, `shared` or `dedicated`.
    pub compression: String,
    /// Topics per connection.
    pub max_subscriptions: usize,
}

/// `[auth]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// HS256 secret; empty = no tokens.
    pub jwt_secret: String,
    /// HTTP API key; empty = API off.
    pub api_key: String,
    /// Allowed `Origin` values; empty = same origin; `*` = any.
    pub allowed_origins: Vec<String>,
}

/// `[limits]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// Client publishes per second.
    pub client_publish_rate: f64,
    /// Publishes a client may save up.
    pub client_publish_burst: u32,
    /// Client subscribe commands per second.
    pub client_subscribe_rate: f64,
    /// Subscribe commands a client may save up.
    pub client_subscribe_burst: u32,
    /// Client history commands per second.
    pub client_history_rate: f64,
    /// History commands a client may save up.
    pub client_history_burst: u32,
    /// Client presence commands per second.
    pub client_presence_rate: f64,
    /// Presence commands a client may save up.
    pub client_presence_burst: u32,
    /// Topics with state.
    pub max_topics: usize,
}

/// `[history]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistorySection {
    /// Messages kept per topic.
    pub size: usize,
    /// Seconds they are kept; 0 = no limit.
    pub ttl: u64,
    /// Bytes kept per topic.
    #[serde(deserialize_with = "units::bytes")]
    pub topic_bytes: usize,
    /// Bytes kept over all topics.
    #[serde(deserialize_with = "units::bytes")]
    pub total_bytes: usize,
    /// Messages a history read returns when it names no limit.
    pub default_limit: usize,
    /// The largest limit a history read may name.
    pub max_limit: usize,
}

/// `[publish]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishSection {
    /// Seconds an idempotency key is remembered per topic.
    pub idempotency_window: u64,
    /// Idempotency keys remembered over all topics (single node), for the HTTP API and for
    /// clients each.
    pub idempotency_max_keys: usize,
    /// Items of one `POST /api/publish_batch`.
    pub max_batch_items: usize,
}

/// `[presence]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceSection {
    /// Clients one presence list shows at most.
    pub max_clients: usize,
    /// Cluster mode: seconds after which a node that stopped refreshing its clients' presence
    /// (killed, cut off) has them forgotten.
    pub ttl: u64,
}

/// `[[namespaces]]`: anonymous rights on topics matching a pattern.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    /// Topic pattern, `*` matching any run of characters.
    pub pattern: String,
    /// Anonymous clients may subscribe.
    #[serde(default)]
    pub subscribe: bool,
    /// Anonymous clients may publish.
    #[serde(default)]
    pub publish: bool,
    /// Clients that may subscribe may read the history too; left out: as `subscribe`.
    #[serde(default)]
    pub history: Option<bool>,
    /// Presence is kept for the topics, and clients that may subscribe may read it.
    #[serde(default)]
    pub presence: bool,
    /// Subscribers get join and leave events.
    #[serde(default)]
    pub join_leave: bool,
    /// Each topic belongs to the user named after its last `#`: only that user's connections
    /// may use it.
    #[serde(default)]
    pub personal: bool,
}

/// Overrides from the command line.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--host`: the host of `server.listen`, its port kept.
    pub host: Option<IpAddr>,
    /// `--port`: the port of `server.listen`, its host kept.
    pub port: Option<u16>,
    /// `--threads`.
    pub threads: Option<usize>,
    /// `--backend`.
    pub backend: Option<String>,
    /// `--api-key`.
    pub api_key: Option<String>,
    /// `--jwt-secret`.
    pub jwt_secret: Option<String>,
    /// `--compression`.
    pub compression: Option<String>,
    /// `--history-size`.
    pub history_size: Option<usize>,
    /// `--tls-cert`.
    pub tls_cert: Option<String>,
    /// `--tls-key`.
    pub tls_key: Option<String>,
    /// `--broker`.
    pub broker: Option<String>,
}

/// The configuration, checked and in the types the gateway runs with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Listen address.
    pub listen: SocketAddr,
    /// Event loops.
    pub threads: usize,
    /// Event-loop implementation.
    pub backend: gale_server::Backend,
    /// Bytes per loop for messages not yet received whole.
    pub partial_message_budget: usize,
    /// TLS certificate chain and key files, if TLS is on.
    pub tls: Option<(String, String)>,
    /// Redis URL of the cluster, if any.
    pub broker: Option<String>,
    /// Replicas that must have a publish before it is acknowledged, and how long to wait
    /// (`cluster.ack_replicas`, `cluster.ack_timeout_ms`).
    pub ack_replicas: Option<(usize, Duration)>,
    /// Path of the WebSocket endpoint.
    pub ws_path: String,
    /// The WebSocket route's behaviour.
    pub behavior: gale_server::Behavior,
    /// Topics per connection.
    pub max_subscriptions: usize,
    /// HS256 secret, if tokens are accepted.
    pub jwt_secret: Option<Vec<u8>>,
    /// HTTP API key, if the API is on.
    pub api_key: Option<String>,
    /// Allowed origins; empty = same origin.
    pub allowed_origins: Vec<String>,
    /// Client publishes per second and burst.
    pub publish_rate: f64,
    /// Burst of client publishes.
    pub publish_burst: u32,
    /// Client subscribe commands per second.
    pub subscribe_rate: f64,
    /// Burst of client subscribe commands.
    pub subscribe_burst: u32,
    /// Client history commands per second.
    pub history_rate: f64,
    /// Burst of client history commands.
    pub history_burst: u32,
    /// How many messages a history read returns.
    pub history_read: ReadLimits,
    /// Topics with state.
    pub max_topics: usize,
    /// History kept for recovery.
    pub history: HistoryLimits,
    /// Idempotency keys and batches.
    pub publish: PublishLimits,
    /// Anonymous rights: pattern, subscribe, publish, history.
    pub namespaces: Vec<(Pattern, bool, bool, bool)>,
    /// Presence, join/leave events and personal topics.
    pub presence: PresenceSettings,
}

/// What the namespaces and `[presence]` say of presence and personal topics.
#[derive(Clone, Debug)]
pub struct PresenceSettings {
    /// Topics that keep presence, or send join/leave events.
    pub rules: PresenceRules,
    /// Patterns of personal namespaces.
    pub personal: Vec<Pattern>,
    /// Clients one presence list shows at most.
    pub max_clients: usize,
    /// Cluster mode: how long a node's presence lives in Redis without a refresh.
    pub ttl: Duration,
    /// Client presence commands per second.
    pub rate: f64,
    /// Burst of client presence commands.
    pub burst: u32,
}

/// Read the configuration: the embedded default, `file` over it, `env_api_key` (the
/// `GALE_API_KEY` variable) and `overrides` over that.
pub fn load(
    file: Option<(&str, &str)>,
    env_api_key: Option<String>,
    overrides: &Overrides,
) -> Result<Settings, String> {
    let mut table: toml::Table = toml::from_str(DEFAULT_TOML)
        .map_err(|e| syntax_error("embedded default configuration", DEFAULT_TOML, &e))?;
    if let Some((name, text)) = file {
        let user: toml::Table = toml::from_str(text).map_err(|e| syntax_error(name, text, &e))?;
        merge(&mut table, user);
    }
    let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        let source = file.map_or("configuration", |(name, _)| name);
        format!("{source}: {}", in_words(&path, e.into_inner().message()))
    })?;
    settings(config, env_api_key, overrides)
}

/// A TOML syntax error as one line: `FILE:LINE:COLUMN: what is wrong`.
fn syntax_error(name: &str, text: &str, e: &toml::de::Error) -> String {
    let at = e.span().map_or(String::new(), |span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!(":{line}:{column}")
    });
    format!("{name}{at}: {}", one_line(e.message()))
}

/// A message's lines joined with "; ".
fn one_line(message: &str) -> String {
    message.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

/// A deserialisation error at `path` (`websocket.max_payload`, `namespaces[1].subscribe`) as
/// one line in words: `PATH: expected WHAT, got VALUE`, `PATH: unknown key; known keys here:
/// ...`, rather than serde's `invalid type: string "64k", expected usize`.
fn in_words(path: &str, message: &str) -> String {
    let message = one_line(message);
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let (key, known) = rest.split_once('`').unwrap_or((rest, ""));
        // The path already ends with the unknown key, except at the top level.
        let full = if path == "." { key } else { path };
        let known = known.strip_prefix(", expected one of ").or(known.strip_prefix(", expected "));
        return match known {
            Some(list) => format!("{full}: unknown key; known keys here: {}", list.replace('`', "")),
            None => format!("{full}: unknown key"),
        };
    }
    let mismatch = message.strip_prefix("invalid type: ").or(message.strip_prefix("invalid value: "));
    if let Some((got, expected)) = mismatch.and_then(|m| m.rsplit_once(", expected ")) {
        let (kind, value) = got.split_once(' ').unwrap_or((got, ""));
        let got = match kind {
            "string" | "integer" | "boolean" | "floating" => {
                value.trim_start_matches("point ").trim_matches('`').to_string()
            }
            "sequence" => "a list".into(),
            "map" => "a table".into(),
            _ => got.to_string(),
        };
        let expected = match expected {
            "usize" | "u64" => "a whole number".to_string(),
            "u32" => format!("a whole number up to {}", u32::MAX),
            "u16" => format!("a whole number up to {}", u16::MAX),
            "f64" | "f32" => "a number".into(),
            "a boolean" => "true or false".into(),
            "a sequence" => "a list".into(),
            other => other.to_string(),
        };
        return format!("{path}: expected {expected}, got {got}");
    }
    format!("{path}: {message}")
}

/// Put `over`'s keys into `base`, merging tables key by key (arrays are replaced).
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn settings(c: Config, env_api_key: Option<String>, o: &Overrides) -> Result<Settings, String> {
    let listen_text = o.listen.clone().unwrap_or(c.server.listen);
    let mut listen: SocketAddr = listen_text
        .parse()
        .map_err(|_| format!("server.listen: {listen_text:?} is not an address like 127.0.0.1:9001"))?;
    // `--host` and `--port` each replace their half of the address, wherever it came from.
    if let Some(host) = o.host {
        listen.set_ip(host);
    }
    if let Some(port) = o.port {
        listen.set_port(port);
    }
    let threads = match o.threads.unwrap_or(c.server.threads) {
        0 => gale_server::ServerConfig::default().threads,
        n if n > 1024 => return Err(format!("server.threads: {n} is more than 1024")),
        n => n,
    };
    let backend_text = o.backend.clone().unwrap_or(c.server.backend);
    let backend: gale_server::Backend =
        backend_text.parse().map_err(|e: String| format!("server.backend: {e}"))?;
    let cert = o.tls_cert.clone().unwrap_or(c.tls.cert);
    let key = o.tls_key.clone().unwrap_or(c.tls.key);
    let tls = match (cert.is_empty(), key.is_empty()) {
        (true, true) => None,
        (false, false) => Some((cert, key)),
        (false, true) => return Err("tls.key: a certificate is given (tls.cert) but no key".into()),
        (true, false) => return Err("tls.cert: a key is given (tls.key) but no certificate".into()),
    };
    let broker = o.broker.clone().unwrap_or(c.cluster.broker);
    let broker = if broker.is_empty() {
        None
    } else {
        super::broker::Target::parse(&broker).map_err(|e| format!("cluster.broker: {e}"))?;
        Some(broker)
    };
    let ack_replicas = match (c.cluster.ack_replicas, c.cluster.ack_timeout_ms) {
        (0, _) => None,
        (_, 0) => return Err("cluster.ack_timeout_ms: must be at least 1 with cluster.ack_replicas".into()),
        (_, ms) if ms > 60_000 => return Err(format!("cluster.ack_timeout_ms: {ms} is above 60000")),
        (n, ms) => Some((n, Duration::from_millis(ms))),
    };
    let ws = c.websocket;
    if !ws.path.starts_with('/') {
        return Err(format!("websocket.path: {:?} must start with '/'", ws.path));
    }
    if ws.max_payload < 125 {
        return Err(format!("websocket.max_payload: {} is below the 125-byte minimum", ws.max_payload));
    }
    if ws.max_backpressure < 1024 {
        return Err(format!("websocket.max_backpressure: {} is below 1024 bytes", ws.max_backpressure));
    }
    // Every delivery must fit in what a subscriber may hold, or a subscriber that reads
    // promptly would lose it whenever anything else is queued (a pong, the previous message).
    let largest = super::protocol::max_delivery(super::protocol::MAX_FRAGMENT.max(ws.max_payload + 7));
    if ws.max_backpressure < largest {
        return Err(format!(
            "websocket.max_backpressure: {} bytes cannot hold the largest delivery ({largest} bytes: \
             an HTTP publish of {} bytes in base64, or a client publish of websocket.max_payload \
             = {} bytes); set it to at least {largest}",
            ws.max_backpressure,
            super::protocol::MAX_BODY,
            ws.max_payload
        ));
    }
    if ws.backpressure_timeout == 0 {
        return Err("websocket.backpressure_timeout: must be at least 1 second".into());
    }
    // A message that arrives in pieces takes its bytes from the loop's budget: one of the
    // largest a client may send must fit, or every such message would be refused with 1013.
    if c.server.partial_message_budget < ws.max_payload {
        return Err(format!(
            "server.partial_message_budget: {} bytes cannot hold one message of websocket.max_payload \
             = {} bytes; set it to at least {}",
            c.server.partial_message_budget, ws.max_payload, ws.max_payload
        ));
    }
    let policy = match ws.backpressure.as_str() {
        "drop" => gale_server::BackpressurePolicy::Drop,
        "close" => gale_server::BackpressurePolicy::Close,
        other => return Err(format!("websocket.backpressure: {other:?} is not \"drop\" or \"close\"")),
    };
    let compression_text = o.compression.clone().unwrap_or(ws.compression);
    let compression = match compression_text.as_str() {
        "off" => gale_server::Compression::Disabled,
        "shared" => gale_server::Compression::Shared,
        "dedicated" => gale_server::Compression::Dedicated { window_bits: 15 },
        other => {
            return Err(format!(
                "websocket.compression: {other:?} is not \"off\", \"shared\" or \"dedicated\""
            ));
        }
    };
    let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
    let behavior = gale_server::Behavior {
        max_payload: ws.max_payload,
        idle_timeout: secs(ws.idle_timeout),
        ping_interval: secs(ws.ping_interval),
        message_timeout: secs(ws.message_timeout),
        max_backpressure: ws.max_backpressure,
        backpressure_policy: policy,
        backpressure_timeout: Duration::from_secs(ws.backpressure_timeout),
        compression,
        ..gale_server::Behavior::default()
    };
    if ws.max_subscriptions == 0 {
        return Err("websocket.max_subscriptions: must be at least 1".into());
    }
    let limits = c.limits;
    for (key, rate) in [
        ("client_publish_rate", limits.client_publish_rate),
        ("client_subscribe_rate", limits.client_subscribe_rate),
        ("client_history_rate", limits.client_history_rate),
        ("client_presence_rate", limits.client_presence_rate),
    ] {
        if !(rate >= 0.0 && rate.is_finite()) {
            return Err(format!("limits.{key}: {rate} is not a rate of zero or more per second"));
        }
    }
    let h = c.history;
    if h.total_bytes < h.topic_bytes {
        return Err(format!(
            "history.total_bytes: {} is less than history.topic_bytes ({})",
            h.total_bytes, h.topic_bytes
        ));
    }
    if h.max_limit == 0 {
        return Err("history.max_limit: must be at least 1".into());
    }
    if h.default_limit == 0 || h.default_limit > h.max_limit {
        return Err(format!(
            "history.default_limit: {} is not from 1 to history.max_limit ({})",
            h.default_limit, h.max_limit
        ));
    }
    if limits.max_topics == 0 {
        return Err("limits.max_topics: must be at least 1".into());
    }
    let p = c.publish;
    if p.idempotency_window == 0 || p.idempotency_window > super::publish::MAX_TTL_SECS {
        return Err(format!(
            "publish.idempotency_window: {} is not from 1 to {} seconds",
            p.idempotency_window,
            super::publish::MAX_TTL_SECS
        ));
    }
    if p.idempotency_max_keys == 0 {
        return Err("publish.idempotency_max_keys: must be at least 1".into());
    }
    if p.max_batch_items == 0 || p.max_batch_items > 10_000 {
        return Err(format!("publish.max_batch_items: {} is not from 1 to 10000", p.max_batch_items));
    }
    let nonempty = |s: String| (!s.is_empty()).then_some(s);
    let api_key = o.api_key.clone().or(env_api_key).or(nonempty(c.auth.api_key)).and_then(nonempty);
    let jwt_secret = o.jwt_secret.clone().or(nonempty(c.auth.jwt_secret)).and_then(nonempty);
    let mut namespaces = Vec::new();
    let (mut presence_rules, mut personal) = (Vec::new(), Vec::new());
    for (i, ns) in c.namespaces.iter().enumerate() {
        let pattern = Pattern::parse(&ns.pattern).map_err(|e| format!("namespaces[{i}].pattern: {e}"))?;
        if ns.personal && !ns.subscribe {
            return Err(format!(
                "namespaces[{i}].personal: needs subscribe = true (it lets each user subscribe to \
                 their own topics)"
            ));
        }
        if ns.join_leave && !ns.presence {
            // Events name who joins and leaves: whoever gets them must be one who may read
            // the presence anyway.
            return Err(format!(
                "namespaces[{i}].join_leave: needs presence = true (the events show each client's \
                 id, user and info, which presence = false keeps from subscribers)"
            ));
        }
        if ns.personal {
            personal.push(pattern.clone());
        }
        presence_rules.push((pattern, ns.presence, ns.join_leave));
    }
    if c.presence.max_clients == 0 {
        return Err("presence.max_clients: must be at least 1".into());
    }
    if c.presence.ttl < 2 {
        return Err(format!("presence.ttl: {} is below 2 seconds", c.presence.ttl));
    }
    let presence = PresenceSettings {
        rules: PresenceRules::new(presence_rules),
        personal,
        max_clients: c.presence.max_clients,
        ttl: Duration::from_secs(c.presence.ttl),
        rate: limits.client_presence_rate,
        burst: limits.client_presence_burst.max(1),
    };
    for (i, ns) in c.namespaces.into_iter().enumerate() {
        let pattern = Pattern::parse(&ns.pattern).map_err(|e| format!("namespaces[{i}].pattern: {e}"))?;
        if ns.history == Some(true) && !ns.subscribe {
            return Err(format!(
                "namespaces[{i}].history: needs subscribe = true (a client never reads the history of a \
                 topic it may not subscribe to)"
            ));
        }
        namespaces.push((pattern, ns.subscribe, ns.publish, ns.history.unwrap_or(ns.subscribe)));
    }
    for (i, origin) in c.auth.allowed_origins.iter().enumerate() {
        if origin != "*" && !(origin.starts_with("http://") || origin.starts_with("https://")) {
            return Err(format!(
                "auth.allowed_origins[{i}]: {origin:?} is not \"*\" or an origin like https://example.com"
            ));
        }
    }
    Ok(Settings {
        listen,
        threads,
        backend,
        partial_message_budget: c.server.partial_message_budget,
        tls,
        broker,
        ack_replicas,
        ws_path: ws.path,
        behavior,
        max_subscriptions: ws.max_subscriptions,
        jwt_secret: jwt_secret.map(String::into_bytes),
        api_key,
        allowed_origins: c
            .auth
            .allowed_origins
            .into_iter()
            .map(|o| o.trim_end_matches('/').to_string())
            .collect(),
        publish_rate: limits.client_publish_rate,
        publish_burst: limits.client_publish_burst.max(1),
        subscribe_rate: limits.client_subscribe_rate,
        subscribe_burst: limits.client_subscribe_burst.max(1),
        history_rate: limits.client_history_rate,
        history_burst: limits.client_history_burst.max(1),
        history_read: ReadLimits { default_limit: h.default_limit, max_limit: h.max_limit },
        max_topics: limits.max_topics,
        history: HistoryLimits {
            size: o.history_size.unwrap_or(h.size),
            ttl: secs(h.ttl),
            topic_bytes: h.topic_bytes,
            total_bytes: h.total_bytes,
        },
        publish: PublishLimits {
            idempotency_window: Duration::from_secs(p.idempotency_window),
            idempotency_max_keys: p.idempotency_max_keys,
            max_batch_items: p.max_batch_items,
        },
        namespaces,
        presence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_is_valid() {
        let s = load(None, None, &Overrides::default()).unwrap();
        assert_eq!(s.listen.port(), 9001);
        assert_eq!(s.ws_path, "/ws");
        assert!(s.api_key.is_none());
        assert_eq!(s.history.size, 100);
        assert_eq!(s.namespaces.len(), 2);
        assert!(s.namespaces.iter().all(|(_, _, _, history)| *history), "history follows subscribe");
        assert_eq!((s.history_read.default_limit, s.history_read.max_limit), (100, 1000));
        assert_eq!(s.publish.idempotency_window, Duration::from_secs(300));
        assert_eq!((s.publish.idempotency_max_keys, s.publish.max_batch_items), (100_000, 100));
        assert_eq!(s.partial_message_budget, 64 << 20);
        assert_eq!(s.behavior.message_timeout, Some(Duration::from_secs(60)));
        assert_eq!(s.behavior.backpressure_timeout, Duration::from_secs(30));
        // The largest delivery of the largest HTTP publish fits, with room for a second one
        // still in flight.
        let largest = super::super::protocol::max_delivery(super::super::protocol::MAX_FRAGMENT);
        assert!(
            s.behavior.max_backpressure >= 2 * largest,
            "{} < 2 x {largest}",
            s.behavior.max_backpressure
        );
    }

    #[test]
    fn input_limits_are_read() {
        let file = "[server]\npartial_message_budget = 1000000\n[websocket]\nmessage_timeout = 0\n";
        let s = load(Some(("g.toml", file)), None, &Overrides::default()).unwrap();
        assert_eq!(s.partial_message_budget, 1_000_000);
        assert_eq!(s.behavior.message_timeout, None);
        let e = load(Some(("g.toml", "[websocket]\nmessage_timeout = -1\n")), None, &Overrides::default())
            .unwrap_err();
        assert!(e.contains("websocket.message_timeout"), "{e}");
        let file = "[server]\npartial_message_budget = 1000\n[websocket]\nmax_payload = 4096\n";
        let e = load(Some(("g.toml", file)), None, &Overrides::default()).unwrap_err();
        assert!(e.contains("server.partial_message_budget") && e.contains("websocket.max_payload"), "{e}");
    }

    #[test]
    fn a_file_overrides_some_keys_and_flags_override_the_file() {
        let file = "[server]\nlisten = \"127.0.0.1:7000\"\n[history]\nsize = 5\n";
        let o = Overrides { threads: Some(3), ..Overrides::default() };
        let s = load(Some(("g.toml", file)), Some("k".into()), &o).unwrap();
        assert_eq!(s.listen.port(), 7000);
        assert_eq!(s.history.size, 5);
        assert_eq!(s.history.ttl, Some(Duration::from_secs(300)), "untouched keys keep the default");
        assert_eq!(s.threads, 3);
        assert_eq!(s.api_key.as_deref(), Some("k"));
    }

    #[test]
    fn errors_name_the_bad_key() {
        let err = |text: &str| load(Some(("g.toml", text)), None, &Overrides::default()).unwrap_err();
        let e = err("[websocket]\nmax_paylod = 10\n");
        assert!(e.contains("websocket") && e.contains("max_paylod"), "{e}");
        let e = err("[websocket]\nmax_payload = \"big\"\n");
        assert!(e.contains("websocket.max_payload"), "{e}");
        let e = err("[server]\nlisten = \"nowhere\"\n");
        assert!(e.contains("server.listen"), "{e}");
        let e = err("[websocket]\ncompression = \"zip\"\n");
        assert!(e.contains("websocket.compression"), "{e}");
        let e = err("[[namespaces]]\npattern = \"\"\n");
        assert!(e.contains("namespaces[0].pattern"), "{e}");
        let e = err("[server\n");
        assert!(e.contains("g.toml"), "{e}");
        let e = err("[cluster]\nbroker = \"localhost:6379\"\n");
        assert!(e.contains("cluster.broker"), "{e}");
        let e = err("[cluster]\nbroker = \"redis+cluster://a:1,,b:2\"\n");
        assert!(e.contains("cluster.broker"), "{e}");
        let e = err("[cluster]\nack_replicas = 1\nack_timeout_ms = 0\n");
        assert!(e.contains("cluster.ack_timeout_ms"), "{e}");
        let e = err("[tls]\ncert = \"c.pem\"\n");
        assert!(e.contains("tls.key"), "{e}");
        let e = err("[websocket]\nmax_backpressure = 1048576\n");
        assert!(e.contains("websocket.max_backpressure") && e.contains("websocket.max_payload"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
        let e = err("[websocket]\nmax_payload = 8388608\n");
        assert!(e.contains("websocket.max_backpressure"), "{e}");
        let e = err("[websocket]\nbackpressure_timeout = 0\n");
        assert!(e.contains("websocket.backpressure_timeout"), "{e}");
        let e = err("[history]\ntotal_bytes = 10\n");
        assert!(e.contains("history.total_bytes"), "{e}");
        let e = err("[history]\ndefault_limit = 2000\n");
        assert!(e.contains("history.default_limit"), "{e}");
        let e = err("[history]\nmax_limit = 0\n");
        assert!(e.contains("history.max_limit"), "{e}");
        let e = err("[[namespaces]]\npattern = \"a:*\"\nhistory = true\n");
        assert!(e.contains("namespaces[0].history") && e.contains("subscribe"), "{e}");
        let e = err("[publish]\nidempotency_window = 0\n");
        assert!(e.contains("publish.idempotency_window"), "{e}");
        let e = err("[publish]\nmax_batch_items = 0\n");
        assert!(e.contains("publish.max_batch_items"), "{e}");
        let e = err("[[namespaces]]\npattern = \"u:*\"\npersonal = true\n");
        assert!(e.contains("namespaces[0].personal") && e.contains("subscribe"), "{e}");
        let e = err("[[namespaces]]\npattern = \"r:*\"\nsubscribe = true\njoin_leave = true\n");
        assert!(e.contains("namespaces[0].join_leave") && e.contains("presence = true"), "{e}");
        let e = err("[presence]\nttl = 1\n");
        assert!(e.contains("presence.ttl"), "{e}");
        let e = err("[presence]\nmax_clients = 0\n");
        assert!(e.contains("presence.max_clients"), "{e}");
        let e = err("[auth]\nallowed_origins = [\"example.com\"]\n");
        assert!(e.contains("auth.allowed_origins[0]"), "{e}");
    }

    #[test]
    fn type_errors_are_one_line_in_words() {
        let err = |text: &str| load(Some(("g.toml", text)), None, &Overrides::default()).unwrap_err();
        let cases = [
            (
                "[websocket]\nmax_payload = \"64k\"\n",
                "g.toml: websocket.max_payload: expected a whole number of bytes, got \"64k\"",
            ),
            (
                "[websocket]\nmax_payload = -5\n",
                "g.toml: websocket.max_payload: expected a whole number of bytes, got -5",
            ),
            (
                "[history]\ntopic_bytes = 1.5\n",
                "g.toml: history.topic_bytes: expected a whole number of bytes, got 1.5",
            ),
            (
                "[[namespaces]]\npattern = \"a:*\"\n[[namespaces]]\npattern = \"b:*\"\nsubscribe = 1\n",
                "g.toml: namespaces[1].subscribe: expected true or false, got 1",
            ),
            (
                "[websocket]\nidle_timeout = \"2m\"\n",
                "g.toml: websocket.idle_timeout: expected a whole number, got \"2m\"",
            ),
            ("[server]\nthreads = -1\n", "g.toml: server.threads: expected a whole number, got -1"),
            (
                "[limits]\nclient_publish_burst = 5000000000\n",
                "g.toml: limits.client_publish_burst: expected a whole number up to 4294967295, got 5000000000",
            ),
            (
                "[limits]\nclient_publish_rate = \"fast\"\n",
                "g.toml: limits.client_publish_rate: expected a number, got \"fast\"",
            ),
            ("[auth]\nallowed_origins = \"*\"\n", "g.toml: auth.allowed_origins: expected a list, got \"*\""),
            (
                "[websocket]\nmax_paylod = 10\n",
                "g.toml: websocket.max_paylod: unknown key; known keys here: path, max_payload",
            ),
            ("[webscket]\n", "g.toml: webscket: unknown key; known keys here: server, tls"),
            ("[server\n", "g.toml:1:8: "),
            ("[server]\nlisten = \n", "g.toml:2:10: "),
        ];
        for (file, expected) in cases {
            let e = err(file);
            assert!(e.starts_with(expected), "{file:?}: {e}");
            assert!(!e.contains('\n'), "{file:?}: {e}");
            assert!(!e.contains("usize") && !e.contains("invalid type"), "{file:?}: {e}");
        }
    }

    #[test]
    fn every_byte_size_takes_units() {
        let file = "[server]\npartial_message_budget = \"16MiB\"\n\
                    [websocket]\nmax_payload = \"64KiB\"\nmax_backpressure = \"2 MB\"\n\
                    [history]\ntopic_bytes = \"1MiB\"\ntotal_bytes = \"1GiB\"\n";
        let s = load(Some(("g.toml", file)), None, &Overrides::default()).unwrap();
        assert_eq!(s.partial_message_budget, 16 << 20);
        assert_eq!(s.behavior.max_payload, 64 << 10);
        assert_eq!(s.behavior.max_backpressure, 2_000_000);
        assert_eq!(s.history.topic_bytes, 1 << 20);
        assert_eq!(s.history.total_bytes, 1 << 30);
        // Plain integers are still bytes.
        let s =
            load(Some(("g.toml", "[websocket]\nmax_payload = 1000\n")), None, &Overrides::default()).unwrap();
        assert_eq!(s.behavior.max_payload, 1000);
    }

    #[test]
    fn host_and_port_each_replace_their_half_of_the_listen_address() {
        let file = Some(("g.toml", "[server]\nlisten = \"127.0.0.2:7000\"\n"));
        let port = Overrides { port: Some(7100), ..Overrides::default() };
        assert_eq!(load(file, None, &port).unwrap().listen, "127.0.0.2:7100".parse().unwrap());
        let host = Overrides { host: Some("::1".parse().unwrap()), ..Overrides::default() };
        assert_eq!(load(file, None, &host).unwrap().listen, "[::1]:7000".parse().unwrap());
        let both =
            Overrides { host: Some("127.0.0.3".parse().unwrap()), port: Some(0), ..Overrides::default() };
        assert_eq!(load(file, None, &both).unwrap().listen, "127.0.0.3:0".parse().unwrap());
        let default_host = load(None, None, &port).unwrap().listen;
        assert_eq!(default_host, "127.0.0.1:7100".parse().unwrap(), "--port alone keeps the default host");
    }
}
