//! The gateway's client protocol: JSON commands in, replies and deliveries out
//! (see `docs/GATEWAY.md`).

use base64::Engine;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 200;

/// Largest HTTP request body the gateway accepts (a publish's payload): its
/// `ServerConfig::max_body`.
pub const MAX_BODY: usize = 1 << 20;

/// Bytes a delivery adds to its payload's fragment, at most: `{"topic":…,"epoch":"…","seq":…,}`
/// with the longest topic (200 bytes, never escaped), a 16-digit epoch and a 20-digit
/// sequence number, plus the WebSocket frame header.
const ENVELOPE_MAX: usize = 300;

/// The longest fragment (`"binary":"…"`, `"data":…`) a delivery of an HTTP publish may have:
/// the largest body in base64. JSON goes in as it came, so it is never longer; text is
/// refused if escaping it would make it longer than this.
pub const MAX_FRAGMENT: usize = MAX_BODY.div_ceil(3) * 4 + 11;

/// The longest delivery, as framed on the wire, of a payload whose fragment is at most
/// `fragment` bytes: with the envelope, and with deflate's worst-case expansion (0.1 % + 64
/// bytes) when compression is on and the payload does not compress.
pub const fn max_delivery(fragment: usize) -> usize {
    let framed = fragment + ENVELOPE_MAX;
    framed + framed / 1000 + 64
}

/// A payload as published.
#[derive(Clone, Copy, Debug)]
pub enum Payload<'a> {
    /// JSON (already validated): embedded as is in `data`.
    Json(&'a str),
    /// Text: a JSON string in `data`.
    Text(&'a str),
    /// Bytes: base64 in `binary`.
    Binary(&'a [u8]),
}

impl<'a> Payload<'a> {
    /// The payload of an HTTP body: JSON when the content type says so (and it parses), text
    /// when it is UTF-8, bytes otherwise.
    pub fn from_body(content_type: Option<&str>, body: &'a [u8]) -> Result<Payload<'a>, String> {
        let is_json =
            content_type.is_some_and(|c| c.trim().to_ascii_lowercase().starts_with("application/json"));
        let is_binary = content_type
            .is_some_and(|c| c.trim().to_ascii_lowercase().starts_with("application/octet-stream"));
        match std::str::from_utf8(body) {
            Ok(text) if is_json => {
                serde_json::from_str::<&RawValue>(text)
                    .map_err(|e| format!("body is not valid JSON: {e}"))?;
                Ok(Payload::Json(text.trim()))
            }
            Err(_) if is_json => Err("body is not valid JSON: not UTF-8".into()),
            Ok(text) if !is_binary => Ok(Payload::Text(text)),
            _ => Ok(Payload::Binary(body)),
        }
    }
}

/// The exact length of [`fragment`]`(payload)`, without building it.
pub fn fragment_len(payload: &Payload<'_>) -> usize {
    match payload {
        Payload::Json(raw) => 7 + raw.len(),
        Payload::Text(text) => 7 + json_string_len(text),
        Payload::Binary(bytes) => 11 + bytes.len().div_ceil(3) * 4,
    }
}

/// Length of `s` as a JSON string, quotes included, escaped as `serde_json` does: `"` and `\`
/// and the short escapes take two bytes, other control characters six (`\u00XX`).
fn json_string_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..0x20 => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// The payload's part of a delivery: `"data":…` or `"binary":"…"`.
pub fn fragment(payload: &Payload<'_>) -> String {
    let mut out = String::with_capacity(payload_len(payload) + 12);
    push_payload(&mut out, payload);
    out
}

fn push_payload(out: &mut String, payload: &Payload<'_>) {
    match payload {
        Payload::Json(raw) => {
            out.push_str("\"data\":");
            out.push_str(raw);
        }
        Payload::Text(text) => {
            out.push_str("\"data\":");
            push_json_string(out, text);
        }
        Payload::Binary(bytes) => {
            out.push_str("\"binary\":\"");
            base64::engine::general_purpose::STANDARD.encode_string(bytes, out);
            out.push('"');
        }
    }
}

/// The delivery of a published message, as every subscriber receives it.
pub fn delivery(topic: &str, epoch: &str, seq: u64, payload: &Payload<'_>) -> String {
    let mut out = String::with_capacity(64 + topic.len() + payload_len(payload));
    out.push_str("{\"topic\":");
    push_json_string(&mut out, topic);
    out.push_str(",\"epoch\":\"");
    out.push_str(epoch);
    out.push_str("\",\"seq\":");
    out.push_str(&seq.to_string());
    out.push(',');
    push_payload(&mut out, payload);
    out.push('}');
    out
}

fn payload_len(p: &Payload<'_>) -> usize {
    match p {
        Payload::Json(s) | Payload::Text(s) => s.len() + 8,
        Payload::Binary(b) => b.len() * 4 / 3 + 8,
    }
}

/// Append `s` as a JSON string.
pub(super) fn push_json_string(out: &mut String, s: &str) {
    // serde_json escapes exactly as JSON requires; writing into a String cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_default());
}

/// A position given with `subscribe`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Since {
    /// The topic's epoch the client saw; `null` (or `""`) with `seq` 0: the topic had no
    /// state when the client looked (a `history` reply with `"epoch": null`).
    pub epoch: Option<String>,
    /// The last sequence number it received.
    pub seq: u64,
}

/// A client command.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command<'a> {
    /// Echoed in the reply, so clients can match replies to commands: any JSON value, `null`
    /// included (`None` only when the command has no `id`).
    #[serde(borrow, default, deserialize_with = "present")]
    pub id: Option<&'a RawValue>,
    /// `subscribe`, `unsubscribe`, `publish`, `history`, `presence`, `presence_stats`, `refresh` or
    /// `ping`.
    pub op: String,
    /// The topic (all but `ping`).
    #[serde(default)]
    pub topic: Option<String>,
    /// Recover from this position (`subscribe`).
    #[serde(default)]
    pub since: Option<Since>,
    /// What to publish (`publish`): any JSON value.
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
    /// The messages to read come after this sequence number (`history`).
    #[serde(default)]
    pub since_seq: Option<u64>,
    /// The most messages to read (`history`).
    #[serde(default)]
    pub limit: Option<u64>,
    /// A retried `publish` with this key is answered, not published again.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// `publish`: the publishing connection does not get the message.
    #[serde(default)]
    pub exclude_self: Option<bool>,
    /// `publish`: seconds the message stays in the history.
    #[serde(default)]
    pub ttl: Option<u64>,
    /// `refresh`: the connection's new token.
    #[serde(default)]
    pub token: Option<String>,
}

/// A command that cannot be carried out: the code (HTTP-like) and a one-line reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    /// 400 bad command, 401 not authenticated, 403 forbidden, 413 too many subscriptions,
    /// 429 rate limited, 503 gateway full.
    pub code: u16,
    /// Why.
    pub reason: String,
}

impl CommandError {
    /// An error with this code and reason.
    pub fn new(code: u16, reason: impl Into<String>) -> Self {
        CommandError { code, reason: reason.into() }
    }
}

/// A field that is present, whatever its value: `null` too is `Some` (serde reads a `null`
/// into an `Option` as `None`, which would lose an `"id": null`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Only the `id` of a JSON object, whatever else it holds: what an error reply to a message
/// that is not a valid command echoes.
#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
}

/// Parse a command. A command that is wrong (an unknown field, a field of the wrong type, no
/// `op`, ...) but a JSON object with an `id` fails with that `id`, for the error reply.
pub fn parse_command(text: &str) -> Result<Command<'_>, (Option<&RawValue>, CommandError)> {
    serde_json::from_str(text).map_err(|e| {
        let id = serde_json::from_str::<IdOnly<'_>>(text).ok().and_then(|o| o.id);
        (id, CommandError::new(400, format!("bad command: {e}")))
    })
}

/// Check a topic name: 1..=200 bytes of letters, digits and `:_-./@#` (`#` ends a personal
/// topic's owner: see `presence::owner`).
pub fn check_topic(topic: &str) -> Result<(), CommandError> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN {
        return Err(CommandError::new(400, format!("topic must be 1 to {MAX_TOPIC_LEN} bytes long")));
    }
    if let Some(c) = topic.chars().find(|c| !(c.is_ascii_alphanumeric() || ":_-./@#".contains(*c))) {
        return Err(CommandError::new(400, format!("topic contains {c:?}: use letters, digits and :_-./@#")));
    }
    Ok(())
}

/// A reply builder: `{"id":…,"ok":true,…}`.
pub struct Reply {
    out: String,
}

impl Reply {
    /// A successful reply to command `id` of kind `op`.
    pub fn ok(id: Option<&RawValue>, op: &str) -> Reply {
        let mut out = String::with_capacity(128);
        out.push('{');
        if let Some(id) = id {
            out.push_str("\"id\":");
            out.push_str(id.get());
            out.push(',');
        }
        out.push_str("\"ok\":true,\"op\":");
        push_json_string(&mut out, op);
        Reply { out }
    }

    /// Add a string field.
    pub fn str(mut self, key: &str, value: &str) -> Reply {
        self.out.push_str(",\"");
        self.out.push_str(key);
        self.out.push_str("\":");
        push_json_string(&mut self.out, value);
        self
    }

    /// Add a field whose value is already JSON (a number, a boolean).
    pub fn raw(mut self, key: &str, value: impl std::fmt::Display) -> Reply {
        use std::fmt::Write;
        let _ = write!(self.out, ",\"{key}\":{value}");
        self
    }

    /// Add fields written by `write`, which appends them (`"key":value`, comma-separated)
    /// to the reply's text.
    pub fn fields(mut self, write: impl FnOnce(&mut String)) -> Reply {
        self.out.push(',');
        write(&mut self.out);
        self
    }

    /// The finished reply.
    pub fn finish(mut self) -> String {
        self.out.push('}');
        self.out
    }
}

/// An error reply to command `id`.
pub fn error_reply(id: Option<&RawValue>, e: &CommandError) -> String {
    let mut out = String::with_capacity(64 + e.reason.len());
    out.push('{');
    if let Some(id) = id {
        out.push_str("\"id\":");
        out.push_str(id.get());
        out.push(',');
    }
    out.push_str("\"error\":{\"code\":");
    out.push_str(&e.code.to_string());
    out.push_str(",\"reason\":");
    push_json_string(&mut out, &e.reason);
    out.push_str("}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_len_is_exact_and_the_largest_delivery_is_bounded() {
        let text = "a\"b\\c\n\u{1}\u{7f}é🚀\t";
        for p in [Payload::Json("{\"a\": [1, 2]}"), Payload::Text(text), Payload::Binary(&[0, 1, 2, 3, 4])] {
            assert_eq!(fragment_len(&p), fragment(&p).len(), "{p:?}");
        }
        let body = vec![0xffu8; MAX_BODY];
        assert_eq!(fragment_len(&Payload::Binary(&body)), MAX_FRAGMENT);
        let d = delivery(&"t".repeat(MAX_TOPIC_LEN), &"f".repeat(16), u64::MAX, &Payload::Binary(&body));
        // The envelope and a frame header of 10 bytes fit in the bound.
        assert!(d.len() + 10 <= max_delivery(MAX_FRAGMENT) - MAX_FRAGMENT / 1000 - 64, "{}", d.len());
    }

    #[test]
    fn deliveries_are_json_with_every_payload_kind() {
        let d = delivery("chat:\"x\"", "e1", 7, &Payload::Json("{\"a\": 1}"));
        let v: serde_json::Value = serde_json::from_str(&d).unwrap();
        assert_eq!(v["topic"], "chat:\"x\"");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["epoch"], "e1");
        assert_eq!(v["data"]["a"], 1);
        let v: serde_json::Value =
            serde_json::from_str(&delivery("t", "e", 1, &Payload::Text("弹幕 \n"))).unwrap();
        assert_eq!(v["data"], "弹幕 \n");
        let v: serde_json::Value =
            serde_json::from_str(&delivery("t", "e", 1, &Payload::Binary(&[0, 255]))).unwrap();
        assert_eq!(v["binary"], "AP8=");
    }

    #[test]
    fn bodies_become_payloads_by_content_type() {
        assert!(matches!(Payload::from_body(Some("application/json"), b" [1] "), Ok(Payload::Json("[1]"))));
        assert!(Payload::from_body(Some("application/json"), b"{").is_err());
        assert!(matches!(Payload::from_body(None, b"hi"), Ok(Payload::Text("hi"))));
        assert!(matches!(Payload::from_body(Some("text/plain"), &[0xff]), Ok(Payload::Binary(_))));
        assert!(matches!(
            Payload::from_body(Some("application/octet-stream"), b"hi"),
            Ok(Payload::Binary(_))
        ));
    }

    #[test]
    fn commands_and_replies() {
        let c = parse_command(r#"{"id":3,"op":"subscribe","topic":"chat:a","since":{"epoch":"e","seq":4}}"#)
            .unwrap();
        assert_eq!(c.op, "subscribe");
        assert_eq!(c.since.unwrap().seq, 4);
        let c = parse_command(r#"{"id":"x","op":"publish","topic":"t","data":{"k":[1,2]}}"#).unwrap();
        assert_eq!(c.data.unwrap().get(), r#"{"k":[1,2]}"#);
        assert_eq!(parse_command(r#"{"op":"ping","bogus":1}"#).unwrap_err().1.code, 400);
        assert_eq!(parse_command("nope").unwrap_err().1.code, 400);
        let r = Reply::ok(c.id, "publish").raw("seq", 5).str("epoch", "e").finish();
        let v: serde_json::Value = serde_json::from_str(&r).unwrap();
        assert_eq!(
            (v["id"].as_str(), v["ok"].as_bool(), v["seq"].as_u64()),
            (Some("x"), Some(true), Some(5))
        );
        let e = error_reply(None, &CommandError::new(403, "no \"way\""));
        let v: serde_json::Value = serde_json::from_str(&e).unwrap();
        assert_eq!(v["error"]["code"], 403);
        assert_eq!(v["error"]["reason"], "no \"way\"");
        assert!(check_topic("chat:lobby").is_ok());
        assert!(check_topic("").is_err() && check_topic("a b").is_err() && check_topic("a*").is_err());
    }
}
