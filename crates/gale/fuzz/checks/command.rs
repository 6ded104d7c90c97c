//! The `command` target: the gateway's parsing of a client's text message, and the JSON it
//! builds from what it parsed.
//!
//! Input layout: byte 0 picks the content type of the body check (bits 0-1: none,
//! `application/json`, `text/plain`, `application/octet-stream`); the rest is the message (a
//! command when it is UTF-8, as the gateway only parses text messages) and the HTTP body.
//!
//! Invariants: no panic; a refused command is a 400 whose error reply is JSON carrying the
//! same code and reason; an accepted command's `id` and `data` are valid JSON, and the
//! replies and deliveries built from it are JSON that give back the id, op, topic and data;
//! `check_topic` accepts exactly 1..=200 bytes of `[A-Za-z0-9:_\-./@]`; a publish body becomes
//! a payload whose delivery is JSON giving back the body (as JSON, text or base64).

use crate::protocol::{
    CommandError, MAX_TOPIC_LEN, Payload, Reply, check_topic, delivery, error_reply, fragment, parse_command,
};
use base64::Engine;
use serde_json::value::RawValue;
use std::collections::HashMap;

/// What the message was, for the regression tests.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not UTF-8: the gateway refuses it before parsing.
    NotText,
    /// Refused with this reason.
    Refused,
    /// Accepted, with this `op` and whether its topic passed `check_topic`.
    Command { op: String, topic_ok: Option<bool> },
}

/// The fields of a JSON object, each as its raw text. Values are compared as text, not
/// parsed: JSON numbers have no range, and a number beyond `f64` (`1e400`) is valid JSON that
/// the gateway passes through as is.
struct Fields<'a>(HashMap<String, &'a RawValue>);

fn json(s: &str) -> Fields<'_> {
    Fields(serde_json::from_str(s).unwrap_or_else(|e| panic!("not a JSON object ({e}): {s}")))
}

impl<'a> Fields<'a> {
    /// The raw text of field `key`.
    fn raw(&self, key: &str) -> Option<&'a str> {
        self.0.get(key).map(|v| v.get())
    }

    /// Field `key` as a string.
    fn str(&self, key: &str) -> Option<String> {
        self.raw(key)
            .map(|v| serde_json::from_str(v).unwrap_or_else(|e| panic!("{key} is not a string ({e}): {v}")))
    }

    /// Field `key` as an unsigned integer.
    fn u64(&self, key: &str) -> Option<u64> {
        self.raw(key).map(|v| v.parse().unwrap_or_else(|e| panic!("{key} is not a u64 ({e}): {v}")))
    }

    /// Field `key` as an object.
    fn object(&self, key: &str) -> Fields<'a> {
        json(self.raw(key).unwrap_or_else(|| panic!("no {key}")))
    }
}

/// Check one input; panics on a violation.
pub fn check(data: &[u8]) -> Verdict {
    let (&kind, message) = data.split_first().unwrap_or((&0, &[]));
    check_body(kind, message);
    let Ok(text) = std::str::from_utf8(message) else { return Verdict::NotText };
    let cmd = match parse_command(text) {
        Ok(cmd) => cmd,
        Err((id, e)) => {
            assert_eq!(e.code, 400);
            let text = error_reply(id, &e);
            // The refusal carries back the id the object had, whatever else was wrong.
            assert_eq!(json(&text).raw("id"), id.map(|id| id.get()), "refusal id");
            let error = json(&text).object("error");
            assert_eq!(error.u64("code"), Some(400));
            assert_eq!(error.str("reason").as_deref(), Some(e.reason.as_str()));
            return Verdict::Refused;
        }
    };
    let id = cmd.id.map(|id| id.get());
    let text = Reply::ok(cmd.id, &cmd.op).raw("seq", 7).finish();
    let reply = json(&text);
    assert_eq!(reply.raw("id"), id, "reply id");
    assert_eq!(reply.str("op").as_deref(), Some(cmd.op.as_str()));
    assert_eq!(reply.raw("ok"), Some("true"));
    assert_eq!(reply.u64("seq"), Some(7));
    let text = error_reply(cmd.id, &CommandError::new(403, format!("no {}", cmd.op)));
    assert_eq!(json(&text).raw("id"), id, "error reply id");
    let topic_ok = cmd.topic.as_deref().map(|topic| {
        let ok = check_topic(topic).is_ok();
        let valid = !topic.is_empty()
            && topic.len() <= MAX_TOPIC_LEN
            && topic.bytes().all(|b| b.is_ascii_alphanumeric() || b":_-./@#".contains(&b));
        assert_eq!(ok, valid, "check_topic({topic:?})");
        let text = Reply::ok(cmd.id, "subscribe").str("topic", topic).finish();
        assert_eq!(json(&text).str("topic").as_deref(), Some(topic));
        if let Some(data) = cmd.data {
            let text = delivery(topic, "e", 1, &Payload::Json(data.get()));
            let d = json(&text);
            assert_eq!(d.raw("data"), Some(data.get()), "delivery data");
            assert_eq!(d.str("topic").as_deref(), Some(topic));
        }
        ok
    });
    if let Some(since) = &cmd.since {
        let epoch = since.epoch.as_deref().unwrap_or_default();
        let text = Reply::ok(None, "subscribe").str("epoch", epoch).raw("seq", since.seq).finish();
        let r = json(&text);
        assert_eq!(r.str("epoch").as_deref(), Some(epoch));
        assert_eq!(r.u64("seq"), Some(since.seq));
    }
    Verdict::Command { op: cmd.op.clone(), topic_ok }
}

/// The HTTP publish path: a body and its content type become a payload, and its delivery is
/// JSON that gives the body back.
fn check_body(kind: u8, body: &[u8]) {
    let content_type = [None, Some("application/json"), Some("text/plain"), Some("application/octet-stream")]
        [(kind & 3) as usize];
    let Ok(payload) = Payload::from_body(content_type, body) else {
        assert_eq!(content_type, Some("application/json"), "only JSON bodies are refused");
        return;
    };
    let text = delivery("t", "e", u64::MAX, &payload);
    let d = json(&text);
    assert_eq!(d.u64("seq"), Some(u64::MAX));
    let text = format!("{{{}}}", fragment(&payload));
    let frag = json(&text);
    match payload {
        Payload::Json(raw) => {
            assert_eq!(d.raw("data"), Some(raw));
            assert_eq!(frag.raw("data"), Some(raw));
        }
        Payload::Text(text) => {
            assert_eq!(d.str("data").as_deref(), Some(text));
            assert_eq!(std::str::from_utf8(body).ok(), Some(text));
        }
        Payload::Binary(bytes) => {
            let b64 = d.str("binary").expect("binary payload is base64 text");
            let back = base64::engine::general_purpose::STANDARD.decode(b64).expect("valid base64");
            assert_eq!(back, bytes);
            assert_eq!(bytes, body);
        }
    }
}
