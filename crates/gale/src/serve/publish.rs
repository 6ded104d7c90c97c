//! Options of a publish, beyond its topic and payload: an idempotency key (a retried publish
//! answers the original position instead of publishing again), a time to live for its place
//! in the history, and leaving out the connection that published it; the limits on them, and
//! the items of `POST /api/publish_batch`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gale_server::{ConnId, HttpResponse, Responder};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::protocol::CommandError;

/// Longest idempotency key, in bytes.
pub const MAX_KEY_LEN: usize = 128;

/// Longest time to live of a message, in seconds (30 days).
pub const MAX_TTL_SECS: u64 = 30 * 24 * 3600;

/// The `[publish]` settings.
#[derive(Clone, Copy, Debug)]
pub struct PublishLimits {
    /// How long an idempotency key is remembered (per topic).
    pub idempotency_window: Duration,
    /// Idempotency keys remembered over all topics on a single node, for the HTTP API and for
    /// clients each: past it a keyed publish is refused (503) until keys end their window.
    pub idempotency_max_keys: usize,
    /// Items of one `POST /api/publish_batch`.
    pub max_batch_items: usize,
}

impl Default for PublishLimits {
    fn default() -> Self {
        PublishLimits {
            idempotency_window: Duration::from_secs(300),
            idempotency_max_keys: 100_000,
            max_batch_items: 100,
        }
    }
}

/// What a publish asks beyond its topic and payload. The default asks nothing, and costs
/// nothing.
#[derive(Clone, Debug, Default)]
pub struct PublishOptions {
    /// A retry of a publish with this key (on this topic, within the window) is not published
    /// again: it answers the first one's position.
    pub idempotency_key: Option<String>,
    /// The message leaves the history (recovery, history reads) this long after it was
    /// published.
    pub ttl: Option<Duration>,
    /// The connection that published it, which does not get it (`exclude_self`).
    pub exclude: Option<ConnId>,
    /// Published by a client connection, not the HTTP API: on a single node its idempotency
    /// key counts against the clients' bound, never the API's.
    pub from_client: bool,
}

/// Check an idempotency key: 1 to 128 bytes of letters, digits and `-_.:+/=` (UUIDs, base64
/// and the like). The error names the problem.
pub fn check_key(key: &str) -> Result<(), CommandError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(CommandError::new(400, format!("idempotency key must be 1 to {MAX_KEY_LEN} bytes long")));
    }
    if let Some(c) = key.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_.:+/=".contains(*c))) {
        return Err(CommandError::new(
            400,
            format!("idempotency key contains {c:?}: use letters, digits and -_.:+/="),
        ));
    }
    Ok(())
}

/// Check a time to live in seconds: 1 to 30 days.
pub fn check_ttl(secs: u64) -> Result<Duration, CommandError> {
    if secs == 0 || secs > MAX_TTL_SECS {
        return Err(CommandError::new(400, format!("ttl: {secs} is not from 1 to {MAX_TTL_SECS} seconds")));
    }
    Ok(Duration::from_secs(secs))
}

/// The options of an HTTP publish: the `Idempotency-Key` header and the `ttl` query parameter
/// (seconds); 400 naming what is wrong.
pub fn http_options(key: Option<&str>, query: Option<&str>) -> Result<PublishOptions, CommandError> {
    let mut opts = PublishOptions::default();
    if let Some(key) = key {
        let key = key.trim();
        check_key(key)?;
        opts.idempotency_key = Some(key.to_string());
    }
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name != "ttl" {
            return Err(CommandError::new(400, format!("unknown query parameter {name:?}: expected ttl")));
        }
        if opts.ttl.is_some() {
            return Err(CommandError::new(400, "ttl: given twice"));
        }
        let secs = value
            .parse()
            .map_err(|_| CommandError::new(400, format!("ttl: {value:?} is not a whole number")))?;
        opts.ttl = Some(check_ttl(secs)?);
    }
    Ok(opts)
}

/// One item of `POST /api/publish_batch`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchItem<'a> {
    /// The topic.
    pub topic: String,
    /// The payload: any JSON value.
    #[serde(borrow)]
    pub data: &'a RawValue,
    /// As the `Idempotency-Key` header of a single publish.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Seconds the message stays in the history.
    #[serde(default)]
    pub ttl: Option<u64>,
}

impl BatchItem<'_> {
    /// The item's options, checked.
    pub fn options(&self) -> Result<PublishOptions, CommandError> {
        if let Some(k) = &self.idempotency_key {
            check_key(k)?;
        }
        Ok(PublishOptions {
            idempotency_key: self.idempotency_key.clone(),
            ttl: self.ttl.map(check_ttl).transpose()?,
            exclude: None,
            from_client: false,
        })
    }
}

/// Parse the body of `POST /api/publish_batch`: a list of 1 to `max` items; 400 saying why not.
pub fn parse_batch<'a>(body: &'a [u8], max: usize) -> Result<Vec<BatchItem<'a>>, CommandError> {
    let text = std::str::from_utf8(body).map_err(|_| CommandError::new(400, "body is not UTF-8"))?;
    let items: Vec<BatchItem<'a>> = serde_json::from_str(text).map_err(|e| {
        CommandError::new(
            400,
            format!("body must be [{{\"topic\", \"data\", \"idempotency_key\"?, \"ttl\"?}}, ...]: {e}"),
        )
    })?;
    if items.is_empty() || items.len() > max {
        return Err(CommandError::new(400, format!("a batch holds 1 to {max} items, not {}", items.len())));
    }
    Ok(items)
}

/// The answer of one batch item: `{"topic", "epoch", "seq"}` (and `"duplicate": true` for an
/// idempotent retry), or `{"topic", "error": {"code", "reason"}}`.
pub fn item_result(topic: &str, result: Result<(&str, u64, bool), &CommandError>) -> serde_json::Value {
    match result {
        Ok((epoch, seq, duplicate)) => {
            let mut v = serde_json::json!({"topic": topic, "epoch": epoch, "seq": seq});
            if duplicate {
                v["duplicate"] = true.into();
            }
            v
        }
        Err(e) => serde_json::json!({"topic": topic, "error": {"code": e.code, "reason": e.reason}}),
    }
}

/// A batch whose items are published one by one (cluster mode: each by its own script) and
/// answered together, in order, when the last one is done.
pub struct BatchReply {
    state: Mutex<(Vec<serde_json::Value>, usize, Option<Responder>)>,
}

impl BatchReply {
    /// A batch of `results` (the items refused before publishing filled in, the others
    /// `null`), of which `pending` are being published, answering to `responder`. With none
    /// pending it answers at once.
    pub fn new(responder: Responder, results: Vec<serde_json::Value>, pending: usize) -> Arc<BatchReply> {
        let reply = Arc::new(BatchReply { state: Mutex::new((results, pending, Some(responder))) });
        if pending == 0 {
            reply.finish_if_done();
        }
        reply
    }

    /// Item `index` is done with `result`.
    pub fn fill(&self, index: usize, result: serde_json::Value) {
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(slot) = state.0.get_mut(index) {
                *slot = result;
            }
            state.1 = state.1.saturating_sub(1);
        }
        self.finish_if_done();
    }

    fn finish_if_done(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.1 == 0
            && let Some(responder) = state.2.take()
        {
            let body = serde_json::json!({ "results": std::mem::take(&mut state.0) }).to_string();
            responder.respond(HttpResponse::json(200, body));
        }
    }
}

/// The idempotency keys remembered from one source (the HTTP API, or clients) over all topics
/// (single node): key and topic to the position published, and the keys in the order they
/// came, to forget them when their window ends.
#[derive(Debug, Default)]
pub struct RememberedKeys {
    /// `key|topic` (a key holds no `|`) to the epoch and sequence number published.
    seqs: HashMap<Box<str>, (Box<str>, u64)>,
    order: VecDeque<(Instant, Box<str>)>,
}

impl RememberedKeys {
    fn slot(topic: &str, key: &str) -> String {
        let mut slot = String::with_capacity(key.len() + 1 + topic.len());
        slot.push_str(key);
        slot.push('|');
        slot.push_str(topic);
        slot
    }

    /// The epoch and sequence number published to `topic` with `key`, if it is remembered.
    pub fn get(&self, topic: &str, key: &str) -> Option<(&str, u64)> {
        self.seqs.get(Self::slot(topic, key).as_str()).map(|(epoch, seq)| (&**epoch, *seq))
    }

    /// Remember that `key` published `seq` of `epoch` to `topic` at `now`.
    pub fn insert(&mut self, topic: &str, key: &str, epoch: &str, seq: u64, now: Instant) {
        let slot: Box<str> = Self::slot(topic, key).into();
        if self.seqs.insert(slot.clone(), (epoch.into(), seq)).is_none() {
            self.order.push_back((now, slot));
        }
    }

    /// Forget the keys remembered before `limit`.
    pub fn forget_before(&mut self, limit: Instant) {
        while self.order.front().is_some_and(|(at, _)| *at < limit) {
            if let Some((_, slot)) = self.order.pop_front() {
                self.seqs.remove(&slot);
            }
        }
    }

    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_ttls_are_checked_naming_the_problem() {
        assert!(check_key("9b2c1d5e-0000-4000-8000-1234567890ab").is_ok());
        assert!(check_key("YWJj+/=_.:").is_ok());
        assert!(check_key("").unwrap_err().reason.contains("1 to 128"));
        assert!(check_key(&"k".repeat(129)).unwrap_err().reason.contains("1 to 128"));
        assert!(check_key("a b").unwrap_err().reason.contains("' '"));
        assert!(check_key("é").is_err());
        assert_eq!(check_ttl(5).unwrap(), Duration::from_secs(5));
        assert!(check_ttl(0).is_err() && check_ttl(MAX_TTL_SECS + 1).is_err());
    }

    #[test]
    fn http_options_come_from_the_header_and_the_query() {
        let o = http_options(Some(" k1 "), Some("ttl=30")).unwrap();
        assert_eq!((o.idempotency_key.as_deref(), o.ttl), (Some("k1"), Some(Duration::from_secs(30))));
        let o = http_options(None, None).unwrap();
        assert!(o.idempotency_key.is_none() && o.ttl.is_none());
        for (key, query, named) in [
            (Some("bad key"), None, "idempotency key"),
            (None, Some("ttl=x"), "ttl"),
            (None, Some("ttl=0"), "ttl"),
            (None, Some("ttl=1&ttl=2"), "twice"),
            (None, Some("tll=1"), "tll"),
        ] {
            let e = http_options(key, query).unwrap_err();
            assert!(e.code == 400 && e.reason.contains(named), "{query:?}: {}", e.reason);
        }
    }

    #[test]
    fn batches_are_lists_of_bounded_length() {
        let items =
            parse_batch(br#"[{"topic":"a","data":1},{"topic":"b","data":{"x":2},"ttl":5}]"#, 2).unwrap();
        assert_eq!((items[0].topic.as_str(), items[1].data.get()), ("a", r#"{"x":2}"#));
        assert_eq!(items[1].options().unwrap().ttl, Some(Duration::from_secs(5)));
        assert!(parse_batch(b"[]", 2).unwrap_err().reason.contains("1 to 2"));
        assert!(parse_batch(br#"[{"topic":"a","data":1}]"#, 0).is_err());
        assert!(parse_batch(br#"[{"topic":"a"}]"#, 2).unwrap_err().reason.contains("data"));
        assert!(parse_batch(br#"{"topic":"a","data":1}"#, 2).is_err());
    }

    #[test]
    fn remembered_keys_are_per_topic_and_forgotten_oldest_first() {
        let mut keys = RememberedKeys::default();
        let t0 = Instant::now();
        keys.insert("t", "a", "e", 1, t0);
        keys.insert("u", "a", "f", 7, t0 + Duration::from_secs(1));
        assert_eq!(
            (keys.get("t", "a"), keys.get("u", "a"), keys.get("t", "c")),
            (Some(("e", 1)), Some(("f", 7)), None)
        );
        keys.forget_before(t0 + Duration::from_millis(1));
        assert_eq!((keys.get("t", "a"), keys.get("u", "a"), keys.len()), (None, Some(("f", 7)), 1));
    }
}
