//! The storm's report: JSON (schema in loadgen/README.md) and the summary for people.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::report::{Latency, causes, group, human_bytes};

/// The servers during the storm, from `/proc`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StormServer {
    /// Process ids measured (after a restart, the new one).
    pub pids: Vec<u32>,
    /// CPU seconds from the cut to the end of the storm (every client recovered, or the
    /// deadline), all processes added up.
    pub cpu_s: f64,
    /// Resident memory just before the cut, bytes.
    pub rss_before_bytes: u64,
    /// Largest resident memory from just before the cut to the end of the storm, bytes:
    /// sampled every 50 ms, and for a restarted server its own high-water mark (`VmHWM`: it
    /// lived only through the storm).
    pub peak_rss_bytes: u64,
}

/// Report of `storm`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StormReport {
    /// Always "storm".
    pub scenario: String,
    /// The gateway URL(s), space-separated.
    pub url: String,
    /// `client` or `restart`.
    pub cut: String,
    /// Clients asked for.
    pub clients: u64,
    /// Clients subscribed before the cut.
    pub connected: u64,
    /// Clients whose first connect failed.
    pub failed: u64,
    /// First-connect failures by cause, and an example of each.
    pub failures: BTreeMap<String, u64>,
    /// One example per cause.
    pub failure_examples: BTreeMap<String, String>,
    /// Topics.
    pub topics: usize,
    /// Publishes per second asked for.
    pub rate: f64,
    /// Reconnect jitter, milliseconds.
    pub jitter_ms: u64,
    /// Seconds every client had to recover in.
    pub deadline_s: f64,
    /// Worker processes.
    pub procs: usize,
    /// Source addresses.
    pub source_ips: usize,
    /// Where the publisher published.
    pub publish_url: String,
    /// Publishes answered 2xx (whole run).
    pub published: u64,
    /// Publishes that failed, by cause (a restarted server refuses them for a while).
    pub publish_errors: BTreeMap<String, u64>,
    /// Clients caught by the storm.
    pub affected: u64,
    /// Of them, resubscribed and recovered (by the end of the storm).
    pub resubscribed: u64,
    /// Recovered: resubscribed with every missed message received.
    pub recovered: u64,
    /// Seconds from the cut until every affected client had recovered (`null`: not all did
    /// within the deadline).
    pub all_recovered_s: Option<f64>,
    /// Seconds from the cut until every worker said its clients had recovered (or the
    /// deadline passed): the window `server` is measured over.
    pub storm_s: f64,
    /// Per client, cut to recovered.
    pub recovery_us: Latency,
    /// Per client, cut to the gateway's reply to the resubscribe.
    pub resubscribe_us: Latency,
    /// TCP connect + upgrade of the reconnects.
    pub handshake_latency_us: Latency,
    /// Connect attempts after the cut.
    pub attempts: u64,
    /// Failed attempts by cause (`refused`, `timeout`, `http_503`, `reset`, `subscribe_503`...).
    pub attempt_failures: BTreeMap<String, u64>,
    /// One example per cause.
    pub attempt_failure_examples: BTreeMap<String, String>,
    /// Open connections that went, by cause (besides the load generator's own cut).
    pub dropped: BTreeMap<String, u64>,
    /// Recoveries the gateway said were impossible, by its reason (a restarted single node
    /// has a new epoch: "epoch changed: ...").
    pub impossible: BTreeMap<String, u64>,
    /// Deliveries received.
    pub deliveries: u64,
    /// Messages a client never received within an epoch it followed.
    pub lost: u64,
    /// Messages a client received twice.
    pub duplicated: u64,
    /// Clients that ended in an older epoch than their topic's.
    pub not_following: u64,
    /// Clients with a connection open at the end.
    pub open_at_end: u64,
    /// The servers' CPU and memory, with `--server-pid` or `--server-cmd`.
    pub server: Option<StormServer>,
}

/// Print the summary.
pub fn print_storm(r: &StormReport) {
    say!(
        "storm {} — {} clients on {} topics, {} msg/s published, cut: {}, jitter 0..{} ms",
        r.url,
        group(r.clients as f64),
        r.topics,
        group(r.rate),
        r.cut,
        r.jitter_ms
    );
    say!("  subscribed before the cut: {} ({} failed)", group(r.connected as f64), r.failed);
    if r.failed > 0 {
        say!("  failed: {}", causes(&r.failures, &r.failure_examples));
    }
    say!(
        "  recovered {} of {} affected ({} resubscribed): {}",
        group(r.recovered as f64),
        group(r.affected as f64),
        group(r.resubscribed as f64),
        match r.all_recovered_s {
            Some(s) => format!("all within {s:.2} s of the cut"),
            None => format!("NOT ALL within the {:.1} s deadline", r.deadline_s),
        }
    );
    let ms = |us: u64| format!("{:.0}", us as f64 / 1000.0);
    let l = &r.recovery_us;
    say!("  recovery ms: p50 {}  p90 {}  p99 {}  max {}", ms(l.p50), ms(l.p90), ms(l.p99), ms(l.max));
    let l = &r.handshake_latency_us;
    say!(
        "  handshake ms: p50 {}  p90 {}  p99 {}  max {}  ({} attempts, {} failed)",
        ms(l.p50),
        ms(l.p90),
        ms(l.p99),
        ms(l.max),
        group(r.attempts as f64),
        r.attempt_failures.values().sum::<u64>()
    );
    if !r.attempt_failures.is_empty() {
        say!("  failed attempts: {}", causes(&r.attempt_failures, &r.attempt_failure_examples));
    }
    if !r.dropped.is_empty() {
        say!("  connections dropped: {}", causes(&r.dropped, &BTreeMap::new()));
    }
    let impossible: u64 = r.impossible.values().sum();
    say!(
        "  deliveries {}: lost {}  duplicated {}  recoveries impossible {}{}",
        group(r.deliveries as f64),
        r.lost,
        r.duplicated,
        impossible,
        if impossible > 0 {
            format!(
                " ({})",
                r.impossible.iter().map(|(why, n)| format!("{why} ×{n}")).collect::<Vec<_>>().join(", ")
            )
        } else {
            String::new()
        }
    );
    say!(
        "  published {}{}",
        group(r.published as f64),
        if r.publish_errors.is_empty() {
            String::new()
        } else {
            format!(", failed: {}", causes(&r.publish_errors, &BTreeMap::new()))
        }
    );
    if let Some(s) = &r.server {
        say!(
            "  server: {:.2} CPU s during the storm, RSS {} before, peak {}",
            s.cpu_s,
            human_bytes(s.rss_before_bytes as f64),
            human_bytes(s.peak_rss_bytes as f64)
        );
    }
    if r.procs > 1 || r.source_ips > 1 {
        say!("  {} processes, {} source addresses", r.procs, r.source_ips);
    }
}

/// What failed the storm, in one line, if anything: messages lost or duplicated, clients
/// following an old epoch, clients not recovered within the deadline, or recoveries the
/// gateway refused for another reason than a new epoch (the history was too short).
pub fn failure(r: &StormReport) -> Option<String> {
    if r.published == 0 {
        return Some(format!(
            "nothing was published to {}: {}",
            r.publish_url,
            causes(&r.publish_errors, &BTreeMap::new())
        ));
    }
    let mut problems = Vec::new();
    if r.lost > 0 || r.duplicated > 0 {
        problems.push(format!("{} messages lost, {} duplicated", r.lost, r.duplicated));
    }
    if r.not_following > 0 {
        problems.push(format!("{} clients ended in an old epoch of their topic", r.not_following));
    }
    if r.all_recovered_s.is_none() {
        problems.push(format!(
            "{} of {} clients did not recover within the {} s deadline",
            r.affected - r.recovered,
            r.affected,
            r.deadline_s
        ));
    }
    let refused: Vec<String> = r
        .impossible
        .iter()
        .filter(|(why, _)| !why.starts_with("epoch changed"))
        .map(|(why, n)| format!("{why} ×{n}"))
        .collect();
    if !refused.is_empty() {
        problems.push(format!("recovery impossible: {}", refused.join(", ")));
    }
    (!problems.is_empty()).then(|| problems.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_fails_on_loss_late_clients_or_a_short_history() {
        let good = StormReport {
            published: 100,
            affected: 10,
            recovered: 10,
            all_recovered_s: Some(1.5),
            deadline_s: 5.0,
            impossible: BTreeMap::from([("epoch changed: the topic's history was reset".into(), 10)]),
            ..StormReport::default()
        };
        assert_eq!(failure(&good), None);
        let bad = StormReport {
            lost: 3,
            duplicated: 1,
            recovered: 8,
            all_recovered_s: None,
            impossible: BTreeMap::from([("missed messages are no longer in the history".into(), 2)]),
            ..good.clone()
        };
        assert_eq!(
            failure(&bad).as_deref(),
            Some(
                "3 messages lost, 1 duplicated; 2 of 10 clients did not recover within the 5 s deadline; \
                 recovery impossible: missed messages are no longer in the history ×2"
            )
        );
    }
}
