//! Reports: JSON for scripts (a stable schema), and a readable terminal summary.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::conn::Failure;

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
    /// Mean.
    pub mean: f64,
    /// Samples.
    pub count: u64,
}

impl Latency {
    /// Percentiles of a histogram of microseconds.
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        Latency {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
            count: h.len(),
        }
    }
}

/// A histogram as `(value, count)` pairs, to move it between processes.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Buckets(pub Vec<(u64, u64)>);

impl Buckets {
    /// The non-empty buckets of `h`.
    pub fn of(h: &Histogram<u64>) -> Buckets {
        Buckets(h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect())
    }

    /// Add these buckets to `h`.
    pub fn add_to(&self, h: &mut Histogram<u64>) {
        for &(v, c) in &self.0 {
            let _ = h.record_n(v, c);
        }
    }
}

/// The cost a server paid during the measurement, from `/proc`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ServerCost {
    /// Process id measured.
    pub pid: u32,
    /// CPU seconds (user + system) used during the window.
    pub cpu_s: f64,
    /// CPU milliseconds per 1,000 messages.
    pub cpu_ms_per_1k_msgs: Option<f64>,
    /// Resident memory at the end, bytes.
    pub rss_bytes: u64,
}

/// The load generator's own CPU use, to tell which side was the bottleneck.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct LoadgenCost {
    /// Threads used.
    pub threads: usize,
    /// CPU seconds used during the window.
    pub cpu_s: f64,
    /// CPU use as a fraction of its threads' capacity (1.0 = every thread busy).
    pub utilisation: f64,
}

/// How much permessage-deflate saved, when `--deflate` was given.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct WireReport {
    /// Payload bytes of the messages sent (whole run).
    pub sent_payload_bytes: u64,
    /// Their bytes on the wire, frame headers excluded.
    pub sent_wire_bytes: u64,
    /// Payload bytes received, after inflating.
    pub received_payload_bytes: u64,
    /// Their bytes on the wire.
    pub received_wire_bytes: u64,
    /// Wire / payload for what the server sent (1.0: no saving).
    pub received_ratio: f64,
    /// Wire / payload for what we sent.
    pub sent_ratio: f64,
}

impl WireReport {
    /// The figures of all threads.
    pub fn of(parts: impl Iterator<Item = crate::deflate::WireBytes>) -> WireReport {
        let mut r = WireReport::default();
        for w in parts {
            r.sent_payload_bytes += w.sent_payload;
            r.sent_wire_bytes += w.sent_wire;
            r.received_payload_bytes += w.received_payload;
            r.received_wire_bytes += w.received_wire;
        }
        let ratio = |wire: u64, payload: u64| if payload == 0 { 1.0 } else { wire as f64 / payload as f64 };
        r.received_ratio = ratio(r.received_wire_bytes, r.received_payload_bytes);
        r.sent_ratio = ratio(r.sent_wire_bytes, r.sent_payload_bytes);
        r
    }
}

/// Report of `echo`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EchoReport {
    /// Always "echo".
    pub scenario: String,
    /// Server URL.
    pub url: String,
    /// Connections that took part.
    pub connections: u64,
    /// Connections that failed to open.
    pub failed: u64,
    /// Message size, bytes.
    pub size: usize,
    /// "text" or "binary".
    pub kind: String,
    /// "fixed" (`size` bytes) or "chat" (JSON chat messages).
    pub payload: String,
    /// Compression, when `--deflate` was given.
    pub compression: Option<WireReport>,
    /// Closed-loop pipeline depth, or 0 for open loop.
    pub pipeline: usize,
    /// Open-loop target rate, messages per second.
    pub rate: Option<f64>,
    /// "random" or "zero".
    pub mask: String,
    /// Measurement window, seconds.
    pub duration_s: f64,
    /// Echoes received and verified in the window.
    pub messages: u64,
    /// Echoes per second.
    pub messages_per_sec: f64,
    /// Payload bytes per second (one direction).
    pub bytes_per_sec: f64,
    /// Round-trip latency.
    pub latency_us: Latency,
    /// Echoes that did not match what was sent; any is a failure.
    pub mismatches: u64,
    /// Description of the first mismatch.
    pub first_mismatch: Option<String>,
    /// Connections lost during the run, by cause.
    pub lost: BTreeMap<String, u64>,
    /// Server cost, when `--server-pid` was given.
    pub server: Option<ServerCost>,
    /// Load generator cost.
    pub loadgen: LoadgenCost,
    /// The run was cut short by Ctrl-C.
    pub interrupted: bool,
}

/// Report of `connect`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConnectReport {
    /// Always "connect".
    pub scenario: String,
    /// Server URL.
    pub url: String,
    /// Connections asked for.
    pub requested: u64,
    /// Connections that completed the handshake.
    pub connected: u64,
    /// Connections that failed.
    pub failed: u64,
    /// Failures by cause.
    pub failures: BTreeMap<String, u64>,
    /// One example per failure cause.
    pub failure_examples: BTreeMap<String, String>,
    /// Completed handshakes per second over the connect phase.
    pub connect_per_sec: f64,
    /// Connect phase duration, seconds.
    pub connect_s: f64,
    /// Connect + handshake latency.
    pub handshake_latency_us: Latency,
    /// How long connections were held, seconds.
    pub hold_s: f64,
    /// Connections still open at the end of the hold.
    pub open_after_hold: u64,
    /// Connections lost while held, by cause.
    pub lost: BTreeMap<String, u64>,
    /// Pings sent and pongs received while held.
    pub pings: u64,
    /// Pongs received.
    pub pongs: u64,
    /// Server RSS before connecting, bytes.
    pub server_rss_before: Option<u64>,
    /// Server RSS with every connection open, bytes.
    pub server_rss_after: Option<u64>,
    /// (after - before) / connected.
    pub server_rss_bytes_per_conn: Option<f64>,
    /// Worker processes used.
    pub procs: usize,
    /// Source addresses used.
    pub source_ips: usize,
    /// Handshake latency buckets, for merging worker processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake_buckets: Option<Buckets>,
    /// The run was cut short by Ctrl-C.
    pub interrupted: bool,
}

/// Set when the JSON report goes to stdout: the readable summary then goes to stderr, so that
/// stdout holds nothing but the JSON.
static SUMMARY_TO_STDERR: AtomicBool = AtomicBool::new(false);

/// Send the readable summaries to stderr (because stdout carries the JSON report).
pub fn summary_to_stderr() {
    SUMMARY_TO_STDERR.store(true, Ordering::Relaxed);
}

/// Print one line of a readable summary.
pub fn say(line: std::fmt::Arguments<'_>) {
    if SUMMARY_TO_STDERR.load(Ordering::Relaxed) {
        eprintln!("{line}");
    } else {
        println!("{line}");
    }
}

/// `println!` for summaries: to stdout, or to stderr when stdout carries JSON.
macro_rules! say {
    ($($arg:tt)*) => { $crate::report::say(format_args!($($arg)*)) };
}

/// Report of `fanout`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FanoutReport {
    /// Always "fanout".
    pub scenario: String,
    /// Subscribers' URL.
    pub url: String,
    /// Publishers' URL.
    pub publish_url: String,
    /// Protocol adapter.
    pub protocol: String,
    /// Topic.
    pub topic: String,
    /// Subscribers connected.
    pub subscribers: u64,
    /// Subscribers that failed to connect.
    pub failed: u64,
    /// Subscribers still open at the end.
    pub open_at_end: u64,
    /// Publish rate asked for, per second.
    pub rate: f64,
    /// Payload size, bytes.
    pub size: usize,
    /// Measurement window, seconds.
    pub duration_s: f64,
    /// Messages published in the window.
    pub published: u64,
    /// Publishes that failed (HTTP errors).
    pub publish_errors: u64,
    /// published × subscribers.
    pub expected: u64,
    /// Distinct deliveries of messages published in the window.
    pub delivered: u64,
    /// Deliveries per second.
    pub deliveries_per_sec: f64,
    /// expected - delivered.
    pub lost: u64,
    /// Deliveries received twice.
    pub duplicated: u64,
    /// Deliveries that arrived after a later message.
    pub out_of_order: u64,
    /// Publish-to-delivery latency.
    pub latency_us: Latency,
    /// Compression of the deliveries, when `--deflate` was given.
    pub compression: Option<WireReport>,
    /// Server cost, when `--server-pid` was given (per 1,000 deliveries).
    pub server: Option<ServerCost>,
    /// Load generator cost.
    pub loadgen: LoadgenCost,
    /// The run was cut short by Ctrl-C.
    pub interrupted: bool,
}

/// Print a fan-out report for a person.
pub fn print_fanout(r: &FanoutReport) {
    say!(
        "fanout {} — {} subscribers ({} failed), publishing {} msg/s of {} B to topic {} via {}",
        r.url,
        r.subscribers,
        r.failed,
        group(r.rate),
        r.size,
        r.topic,
        r.publish_url
    );
    say!(
        "  {} published, {} of {} deliveries in {:.1} s: {} deliveries/s",
        group(r.published as f64),
        group(r.delivered as f64),
        group(r.expected as f64),
        r.duration_s,
        group(r.deliveries_per_sec)
    );
    say!(
        "  lost {}  duplicated {}  out of order {}  publish errors {}",
        r.lost,
        r.duplicated,
        r.out_of_order,
        r.publish_errors
    );
    let l = &r.latency_us;
    say!("  end-to-end µs: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}", l.p50, l.p90, l.p99, l.p999, l.max);
    if let Some(w) = &r.compression {
        say!(
            "  permessage-deflate: deliveries took {:.1}% of their payload size on the wire",
            w.received_ratio * 100.0
        );
    }
    if let Some(s) = &r.server {
        say!(
            "  server pid {}: {:.2} CPU s, {} ms CPU per 1k deliveries, RSS {}",
            s.pid,
            s.cpu_s,
            s.cpu_ms_per_1k_msgs.map_or("-".into(), |v| format!("{v:.3}")),
            human_bytes(s.rss_bytes as f64)
        );
    }
    say!("  loadgen: {} threads, {:.0}% of its threads", r.loadgen.threads, r.loadgen.utilisation * 100.0);
}

/// Thousands separators for counts and rates.
pub fn group(v: f64) -> String {
    let s = format!("{:.0}", v.max(0.0));
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Causes counted by label, in words: "connection refused ×3, timed out ×1". Each cause is
/// told by its example when there is one (it carries the detail, e.g. which certificate
/// check failed), else by what its label means.
pub fn causes(counts: &BTreeMap<String, u64>, examples: &BTreeMap<String, String>) -> String {
    counts
        .iter()
        .map(|(label, n)| {
            let words = examples.get(label).cloned().unwrap_or_else(|| Failure::describe(label));
            format!("{words} ×{n}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// "none lost" or "3 lost (connection reset ×3)".
fn lost_line(lost: &BTreeMap<String, u64>) -> String {
    let n: u64 = lost.values().sum();
    if n == 0 { "none lost".into() } else { format!("{n} lost ({})", causes(lost, &BTreeMap::new())) }
}

/// Print an echo report for a person.
pub fn print_echo(r: &EchoReport) {
    say!(
        "echo {} — {} connections, {} B {} messages, {}, mask {}",
        r.url,
        r.connections,
        r.size,
        r.kind,
        match r.rate {
            Some(rate) => format!("open loop at {} msg/s", group(rate)),
            None => format!("pipeline {}", r.pipeline),
        },
        r.mask
    );
    say!(
        "  {} messages in {:.1} s: {} msg/s, {}/s",
        group(r.messages as f64),
        r.duration_s,
        group(r.messages_per_sec),
        human_bytes(r.bytes_per_sec)
    );
    let l = &r.latency_us;
    say!(
        "  latency µs: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {:.0})",
        l.p50,
        l.p90,
        l.p99,
        l.p999,
        l.max,
        l.mean
    );
    if let Some(w) = &r.compression {
        say!(
            "  permessage-deflate: server→client {:.1}% of payload size on the wire, client→server {:.1}%",
            w.received_ratio * 100.0,
            w.sent_ratio * 100.0
        );
    }
    if let Some(s) = &r.server {
        say!(
            "  server pid {}: {:.2} CPU s, {} ms CPU per 1k messages, RSS {}",
            s.pid,
            s.cpu_s,
            s.cpu_ms_per_1k_msgs.map_or("-".into(), |v| format!("{v:.3}")),
            human_bytes(s.rss_bytes as f64)
        );
    }
    say!(
        "  loadgen: {} threads, {:.2} CPU s ({:.0}% of its threads)",
        r.loadgen.threads,
        r.loadgen.cpu_s,
        r.loadgen.utilisation * 100.0
    );
    if r.failed > 0 || !r.lost.is_empty() {
        say!("  connections: {} failed to open, {} during the run", r.failed, lost_line(&r.lost));
    }
    if r.mismatches > 0 {
        say!("  WRONG ECHOES: {} ({})", r.mismatches, r.first_mismatch.as_deref().unwrap_or(""));
    }
    if r.interrupted {
        say!("  (interrupted: partial results)");
    }
}

/// Print a connect report for a person.
pub fn print_connect(r: &ConnectReport) {
    say!(
        "connect {} — {} of {} connected in {:.2} s ({} conn/s), {} failed",
        r.url,
        group(r.connected as f64),
        group(r.requested as f64),
        r.connect_s,
        group(r.connect_per_sec),
        r.failed
    );
    if r.failed > 0 {
        say!("  failed: {}", causes(&r.failures, &r.failure_examples));
    }
    if r.connected == 0 {
        // Nothing was held: no latency or hold figures to give.
        return;
    }
    let l = &r.handshake_latency_us;
    say!("  handshake µs: p50 {}  p90 {}  p99 {}  p99.9 {}  max {}", l.p50, l.p90, l.p99, l.p999, l.max);
    say!(
        "  held {:.1} s: {} still open, pings {} / pongs {}, {}",
        r.hold_s,
        r.open_after_hold,
        r.pings,
        r.pongs,
        lost_line(&r.lost)
    );
    if let (Some(b), Some(a)) = (r.server_rss_before, r.server_rss_after) {
        say!(
            "  server RSS {} -> {}: {} per connection",
            human_bytes(b as f64),
            human_bytes(a as f64),
            r.server_rss_bytes_per_conn.map_or("-".into(), |v| format!("{v:.0} B"))
        );
    }
    if r.procs > 1 || r.source_ips > 1 {
        say!("  {} processes, {} source addresses", r.procs, r.source_ips);
    }
    if r.interrupted {
        say!("  (interrupted: partial results)");
    }
}

/// 1234567 -> "1.2 MiB".
pub fn human_bytes(v: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = v;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{v:.0} {}", UNITS[u]) } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting() {
        assert_eq!(group(1234567.4), "1,234,567");
        assert_eq!(group(12.0), "12");
        assert_eq!(human_bytes(512.0), "512 B");
        assert_eq!(human_bytes(1536.0), "1.5 KiB");
    }

    #[test]
    fn causes_are_words_with_counts() {
        let counts = BTreeMap::from([("http_404".to_string(), 2), ("refused".to_string(), 3)]);
        let examples = BTreeMap::from([("refused".to_string(), "connection refused".to_string())]);
        assert_eq!(causes(&counts, &examples), "HTTP 404 instead of 101 ×2, connection refused ×3");
        assert_eq!(lost_line(&BTreeMap::new()), "none lost");
        let lost = BTreeMap::from([("reset".to_string(), 4)]);
        assert_eq!(lost_line(&lost), "4 lost (connection reset ×4)");
    }

    #[test]
    fn buckets_round_trip() {
        let mut h = crate::engine::latency_histogram();
        for v in [1u64, 5, 5, 1000, 123_456] {
            h.record(v).unwrap();
        }
        let mut back = crate::engine::latency_histogram();
        Buckets::of(&h).add_to(&mut back);
        assert_eq!(Latency::of(&h), Latency::of(&back));
    }
}
