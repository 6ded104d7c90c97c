//! The fan-out scenario: subscribers count what a publisher sends through the server.
//!
//! Every published payload is text that carries its sequence number and the time it was
//! published (`{seq:016x}{ns:016x}` then padding), so each subscriber can measure end-to-end
//! latency and tell lost, duplicated and out-of-order deliveries apart. How payloads travel —
//! the subscribe command, the publish message, the delivery envelope — is a [`Protocol`], so
//! that servers with different pub/sub protocols can be driven.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::conn::Io;
use crate::engine::{Cx, Driver, latency_histogram};
use crate::payload::Kind;

/// How a pub/sub server expects subscriptions and publishes.
pub trait Protocol: Send + Sync {
    /// The message a subscriber sends once open, if the server needs one.
    fn subscribe(&self, topic: &str) -> Option<String>;
    /// The WebSocket message that publishes `payload`.
    fn publish_ws(&self, topic: &str, payload: &str) -> String;
    /// What to append to the publish URL's path, and the body, to publish `payload` over
    /// HTTP, if the server has an HTTP API.
    fn publish_http(&self, topic: &str, payload: &str) -> Option<(String, Vec<u8>)>;
    /// The publish path when the publish URL gives none (`{topic}` is replaced).
    fn default_http_path(&self) -> &'static str {
        "/"
    }
    /// The published payload inside a message a subscriber received, or `None` for other
    /// messages (replies to commands, heartbeats).
    fn delivery<'a>(&self, msg: &'a [u8]) -> Option<&'a [u8]>;
}

/// The plainest protocol: subscribers connect to one path and receive every message published;
/// the publisher sends the payload itself over WebSocket, or POSTs it as the body.
pub struct Plain;

impl Protocol for Plain {
    fn subscribe(&self, _topic: &str) -> Option<String> {
        None
    }
    fn publish_ws(&self, _topic: &str, payload: &str) -> String {
        payload.to_string()
    }
    fn publish_http(&self, _topic: &str, payload: &str) -> Option<(String, Vec<u8>)> {
        Some((String::new(), payload.as_bytes().to_vec()))
    }
    fn delivery<'a>(&self, msg: &'a [u8]) -> Option<&'a [u8]> {
        Some(msg)
    }
}

/// Gale's gateway protocol (`gale serve`, see docs/GATEWAY.md): subscribers send
/// `{"op":"subscribe","topic":…}` and receive `{"topic":…,"epoch":…,"seq":…,"data":"PAYLOAD"}`;
/// publishers send `{"op":"publish",…,"data":"PAYLOAD"}` over WebSocket, or POST the payload
/// to `/api/publish/{topic}`.
pub struct Gale;

impl Protocol for Gale {
    fn subscribe(&self, topic: &str) -> Option<String> {
        Some(format!("{{\"op\":\"subscribe\",\"topic\":{}}}", json_string(topic)))
    }
    fn publish_ws(&self, topic: &str, payload: &str) -> String {
        // Payloads are hex digits and dots: nothing to escape.
        format!("{{\"op\":\"publish\",\"topic\":{},\"data\":\"{payload}\"}}", json_string(topic))
    }
    fn publish_http(&self, _topic: &str, payload: &str) -> Option<(String, Vec<u8>)> {
        Some((String::new(), payload.as_bytes().to_vec()))
    }
    fn default_http_path(&self) -> &'static str {
        "/api/publish/{topic}"
    }
    fn delivery<'a>(&self, msg: &'a [u8]) -> Option<&'a [u8]> {
        // A delivery carries "seq" before "data"; replies to commands carry "ok" or "error".
        const KEY: &[u8] = b",\"data\":\"";
        let at = msg.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
        let rest = &msg[at..];
        let end = rest.iter().position(|&b| b == b'"')?;
        Some(&rest[..end])
    }
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The instant the fan-out clock counts from; publisher and subscribers share it because they
/// run in the same process.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since the epoch.
pub fn now_ns() -> u64 {
    ns_at(Instant::now())
}

/// `t` in nanoseconds since the epoch (0 for earlier instants).
pub fn ns_at(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64
}

/// Smallest payload: two 16-digit hex numbers.
pub const MIN_SIZE: usize = 32;

/// The payload for `seq`, scheduled for publication at `at_ns`, `size` bytes long. Stamping
/// the scheduled time (not the send time) makes latency include any delay in sending, and
/// puts each message in the same measurement window for publisher and subscribers.
pub fn make_payload(seq: u64, at_ns: u64, size: usize) -> String {
    let mut s = format!("{seq:016x}{at_ns:016x}");
    while s.len() < size {
        s.push('.');
    }
    s
}

/// Sequence number and publish time of a payload.
pub fn parse_payload(p: &[u8]) -> Option<(u64, u64)> {
    let hex = |b: &[u8]| u64::from_str_radix(std::str::from_utf8(b).ok()?, 16).ok();
    if p.len() < MIN_SIZE {
        return None;
    }
    Some((hex(&p[..16])?, hex(&p[16..32])?))
}

/// Which sequence numbers a subscriber has seen: the highest, and a 64-bit window below it, so
/// duplicates and late (out-of-order) deliveries are told apart.
#[derive(Clone, Copy, Debug, Default)]
pub struct SeqWindow {
    highest: Option<u64>,
    /// Bit i set: `highest - i` was seen.
    seen: u64,
}

/// How a delivery relates to what came before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrival {
    /// The next one, or a later one (a gap before it may be filled later).
    InOrder,
    /// Earlier than the highest seen, not seen before.
    Late,
    /// Seen before.
    Duplicate,
    /// Older than the window: cannot tell; counted as late.
    TooOld,
}

impl SeqWindow {
    /// Record `seq`.
    pub fn record(&mut self, seq: u64) -> Arrival {
        let Some(high) = self.highest else {
            self.highest = Some(seq);
            self.seen = 1;
            return Arrival::InOrder;
        };
        if seq > high {
            let shift = seq - high;
            self.seen = if shift >= 64 { 1 } else { (self.seen << shift) | 1 };
            self.highest = Some(seq);
            return Arrival::InOrder;
        }
        let back = high - seq;
        if back >= 64 {
            return Arrival::TooOld;
        }
        let bit = 1u64 << back;
        if self.seen & bit != 0 {
            Arrival::Duplicate
        } else {
            self.seen |= bit;
            Arrival::Late
        }
    }
}

/// What the subscribers of one thread saw.
#[derive(Clone, Debug)]
pub struct FanoutStats {
    /// Distinct deliveries of messages published in the window.
    pub delivered: u64,
    /// Deliveries seen twice.
    pub duplicated: u64,
    /// Deliveries that arrived after a later one.
    pub out_of_order: u64,
    /// Messages that were not deliveries of ours (command replies, others' payloads).
    pub other: u64,
    /// Publish-to-delivery latency, microseconds.
    pub latency_us: Histogram<u64>,
}

impl FanoutStats {
    fn new() -> Self {
        FanoutStats {
            delivered: 0,
            duplicated: 0,
            out_of_order: 0,
            other: 0,
            latency_us: latency_histogram(),
        }
    }

    /// Add another thread's figures.
    pub fn merge(&mut self, o: &FanoutStats) {
        self.delivered += o.delivered;
        self.duplicated += o.duplicated;
        self.out_of_order += o.out_of_order;
        self.other += o.other;
        let _ = self.latency_us.add(&o.latency_us);
    }
}

/// Subscriber connections.
pub struct Subscribers {
    protocol: &'static dyn Protocol,
    topic: String,
    /// What the subscribers saw.
    pub stats: FanoutStats,
    /// Publish times (ns) that count: inside the measurement window.
    window_ns: (u64, u64),
    /// The run goes on this long after the window, for the last deliveries to arrive.
    drain: Duration,
}

impl Subscribers {
    /// Subscribers of `topic` speaking `protocol`; they keep listening `drain` past the window.
    pub fn new(protocol: &'static dyn Protocol, topic: String, drain: Duration) -> Self {
        Subscribers { protocol, topic, stats: FanoutStats::new(), window_ns: (0, u64::MAX), drain }
    }
}

impl Driver for Subscribers {
    type State = SeqWindow;

    fn on_start(&mut self, io: &mut Io, _st: &mut SeqWindow, cx: &mut Cx) {
        if let Some(cmd) = self.protocol.subscribe(&self.topic) {
            io.send(&mut cx.rng, Kind::Text, cmd.len(), |b| b.copy_from_slice(cmd.as_bytes()));
        }
    }

    fn on_message(&mut self, _io: &mut Io, st: &mut SeqWindow, _kind: Kind, msg: &[u8], cx: &mut Cx) {
        cx.progress.messages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some((seq, sent_ns)) = self.protocol.delivery(msg).and_then(parse_payload) else {
            self.stats.other += 1;
            return;
        };
        match st.record(seq) {
            Arrival::Duplicate => {
                self.stats.duplicated += 1;
                return;
            }
            Arrival::Late | Arrival::TooOld => self.stats.out_of_order += 1,
            Arrival::InOrder => {}
        }
        if sent_ns >= self.window_ns.0 && sent_ns < self.window_ns.1 {
            self.stats.delivered += 1;
            let us = now_ns().saturating_sub(sent_ns) / 1000;
            let _ = self.stats.latency_us.record(us.max(1));
        }
    }

    fn set_window(&mut self, from: Instant, until: Instant) {
        let base = Instant::now();
        let ns = now_ns();
        let at = |t: Instant| {
            if t >= base {
                ns + (t - base).as_nanos() as u64
            } else {
                ns.saturating_sub((base - t).as_nanos() as u64)
            }
        };
        self.window_ns = (at(from), at(until.checked_sub(self.drain).unwrap_or(until)));
    }
}

/// A publisher connection sending at a fixed rate.
pub struct Publisher {
    protocol: &'static dyn Protocol,
    topic: String,
    size: usize,
    interval: Duration,
    next_due: Option<Instant>,
    from: Instant,
    until: Instant,
    next_seq: u64,
    /// Messages published inside the window.
    pub published: u64,
    /// Messages published in all.
    pub sent: u64,
}

impl Publisher {
    /// A publisher of `rate` messages per second for one connection.
    pub fn new(protocol: &'static dyn Protocol, topic: String, size: usize, rate: f64) -> Self {
        let now = Instant::now();
        Publisher {
            protocol,
            topic,
            size,
            interval: Duration::from_secs_f64(1.0 / rate),
            next_due: None,
            from: now,
            until: now,
            next_seq: 0,
            published: 0,
            sent: 0,
        }
    }
}

impl Driver for Publisher {
    type State = ();

    fn on_start(&mut self, _io: &mut Io, _st: &mut (), cx: &mut Cx) {
        self.next_due = Some(cx.now);
    }

    fn on_message(&mut self, _io: &mut Io, _st: &mut (), _kind: Kind, _msg: &[u8], _cx: &mut Cx) {}

    fn on_tick(&mut self, io: &mut Io, _st: &mut (), cx: &mut Cx) {
        while let Some(due) = self.next_due {
            if due > cx.now || due >= self.until {
                break;
            }
            let payload = make_payload(self.next_seq, ns_at(due), self.size);
            self.next_seq += 1;
            let msg = self.protocol.publish_ws(&self.topic, &payload);
            io.send(&mut cx.rng, Kind::Text, msg.len(), |b| b.copy_from_slice(msg.as_bytes()));
            self.sent += 1;
            if due >= self.from {
                self.published += 1;
            }
            self.next_due = Some(due + self.interval);
        }
    }

    fn tick(&self) -> Option<Duration> {
        Some(self.interval.min(Duration::from_millis(1)))
    }

    fn set_window(&mut self, from: Instant, until: Instant) {
        self.from = from;
        self.until = until;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gale_protocol_finds_payloads_in_deliveries_only() {
        let p = make_payload(7, 1, 40);
        let d = format!("{{\"topic\":\"bench\",\"epoch\":\"ab\",\"seq\":3,\"data\":\"{p}\"}}");
        assert_eq!(Gale.delivery(d.as_bytes()), Some(p.as_bytes()));
        assert_eq!(Gale.delivery(br#"{"id":1,"ok":true,"op":"subscribe","topic":"bench","seq":0}"#), None);
        let cmd: serde_json::Value = serde_json::from_str(&Gale.publish_ws("t\"x", &p)).unwrap();
        assert_eq!((cmd["topic"].as_str(), cmd["data"].as_str()), (Some("t\"x"), Some(p.as_str())));
    }

    #[test]
    fn payload_round_trip() {
        let p = make_payload(42, now_ns(), 100);
        assert_eq!(p.len(), 100);
        let (seq, ns) = parse_payload(p.as_bytes()).unwrap();
        assert_eq!(seq, 42);
        assert!(ns <= now_ns());
        assert!(parse_payload(b"short").is_none());
    }

    #[test]
    fn window_tells_late_from_duplicate() {
        let mut w = SeqWindow::default();
        assert_eq!(w.record(0), Arrival::InOrder);
        assert_eq!(w.record(2), Arrival::InOrder);
        assert_eq!(w.record(1), Arrival::Late);
        assert_eq!(w.record(1), Arrival::Duplicate);
        assert_eq!(w.record(2), Arrival::Duplicate);
        assert_eq!(w.record(100), Arrival::InOrder);
        assert_eq!(w.record(99), Arrival::Late);
        assert_eq!(w.record(10), Arrival::TooOld);
    }
}
