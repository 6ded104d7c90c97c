//! `gale-loadgen echo`.

mod driver;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use self::driver::{Echo, EchoStats, Pacing};
use crate::cli::{EchoArgs, MaskArg, PayloadArg};
use crate::common::{run_config, unreachable, write_json};
use crate::payload::{Kind, Payloads};
use crate::report::{EchoReport, Latency, LoadgenCost, ServerCost, WireReport, print_echo};
use crate::run::{Run, Samples};
use crate::target::Scheme;
use fastrand::Rng;

/// What failed in an echo run, in one line, if anything: echoes that did not match what was
/// sent, or no echo at all in the measurement (unless Ctrl-C cut it short).
pub fn failure(r: &EchoReport) -> Option<String> {
    if r.mismatches > 0 {
        let first = r.first_mismatch.as_deref().unwrap_or("?");
        return Some(format!("{} echoes did not match what was sent (first: {first})", r.mismatches));
    }
    if r.messages == 0 && !r.interrupted {
        return Some(format!(
            "no message was echoed by {} in the {:.1} s measured ({} connections open)",
            r.url, r.duration_s, r.connections
        ));
    }
    None
}

/// Run the echo scenario and print/write its report. Returns the report.
pub fn run(args: &EchoArgs, print: bool) -> Result<EchoReport, String> {
    let c = &args.common;
    if args.size > 64 << 20 {
        return Err(format!("--size {} is over the 64 MiB this tool sends", args.size));
    }
    if args.pipeline == 0 {
        return Err("--pipeline must be at least 1".into());
    }
    if !(args.warmup >= 0.0 && args.warmup.is_finite()) {
        return Err("--warmup must be zero or a positive number of seconds".into());
    }
    let pacing = match args.rate {
        Some(r) if r > 0.0 && r.is_finite() => {
            Pacing::Open { interval: Duration::from_secs_f64(c.connections as f64 / r) }
        }
        Some(r) => return Err(format!("--rate must be a positive number of messages per second, not {r}")),
        None => Pacing::Closed { pipeline: args.pipeline },
    };
    let (mut cfg, target) =
        run_config(c, args.mask == MaskArg::Random, (args.size as u64 + 1024).max(1 << 20))?;
    // Every echo is compared byte for byte with the valid UTF-8 it echoes, which proves it
    // valid too: checking it separately would cost the load generator about 7 % of its CPU.
    for connect in &mut cfg.connect {
        connect.check_utf8 = false;
    }
    let raw = target.scheme == Scheme::Tcp;
    let chat = args.payload == PayloadArg::Chat;
    if chat && raw {
        return Err("--payload chat needs a WebSocket server (its messages vary in size)".into());
    }
    let kind = if args.binary || raw { Kind::Binary } else { Kind::Text };
    let payloads = Payloads::new(kind, args.size, &mut Rng::new());
    let mut run =
        Run::start(&cfg, |_| Echo::new(payloads.clone(), chat, pacing, raw)).map_err(|e| e.to_string())?;
    let connect = run.wait_connected()?;
    if connect.connected == 0 {
        let _ = run.finish();
        return Err(unreachable(
            &c.url_label(),
            connect.attempted,
            &connect.failures,
            &connect.failure_examples,
        ));
    }
    let from = Instant::now() + Duration::from_secs_f64(args.warmup);
    let until = from + Duration::from_secs_f64(c.duration);
    let mut samples = Samples::default();
    let pids = &c.server_pid;
    let end = run.measure(from, until, "echo", || samples.start(pids));
    samples.end(pids);
    let interrupted = run.interrupted();
    let results = run.finish()?;
    let mut stats: Option<EchoStats> = None;
    let mut lost = BTreeMap::new();
    let mut first_mismatch = None;
    for r in &results {
        match &mut stats {
            Some(s) => s.merge(&r.driver.stats),
            None => stats = Some(r.driver.stats.clone()),
        }
        for (k, v) in &r.lost {
            *lost.entry(k.clone()).or_default() += v;
        }
        if first_mismatch.is_none() {
            first_mismatch = r.driver.first_mismatch.clone();
        }
    }
    let stats = stats.ok_or("no results")?;
    let window = end.saturating_duration_since(from).as_secs_f64().max(1e-9);
    let server = pids.first().copied().and_then(|pid| {
        let cpu = samples.server_cpu()?;
        Some(ServerCost {
            pid,
            cpu_s: cpu,
            cpu_ms_per_1k_msgs: (stats.messages > 0).then(|| cpu * 1000.0 * 1000.0 / stats.messages as f64),
            rss_bytes: samples.server_until.map_or(0, |s| s.rss),
        })
    });
    let threads = results.len();
    let self_cpu = samples.self_cpu();
    let report = EchoReport {
        scenario: "echo".into(),
        url: c.url_label(),
        connections: connect.connected,
        failed: connect.failed(),
        size: args.size,
        kind: if kind == Kind::Text || chat { "text".into() } else { "binary".into() },
        payload: if chat { "chat".into() } else { "fixed".into() },
        compression: c.deflate.then(|| WireReport::of(results.iter().map(|r| r.wire))),
        pipeline: if args.rate.is_some() { 0 } else { args.pipeline },
        rate: args.rate,
        mask: if args.mask == MaskArg::Random { "random".into() } else { "zero".into() },
        duration_s: window,
        messages: stats.messages,
        messages_per_sec: stats.messages as f64 / window,
        bytes_per_sec: stats.bytes as f64 / window,
        latency_us: Latency::of(&stats.latency_us),
        mismatches: stats.mismatches,
        first_mismatch,
        lost,
        server,
        loadgen: LoadgenCost { threads, cpu_s: self_cpu, utilisation: self_cpu / window / threads as f64 },
        interrupted,
    };
    if print {
        print_echo(&report);
    }
    write_json(&c.json, &report)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_fails_on_wrong_echoes_or_on_none_at_all() {
        let good =
            EchoReport { url: "ws://s/".into(), messages: 10, duration_s: 1.0, ..EchoReport::default() };
        assert_eq!(failure(&good), None);
        let wrong =
            EchoReport { mismatches: 2, first_mismatch: Some("echo of message 9".into()), ..good.clone() };
        assert_eq!(
            failure(&wrong).as_deref(),
            Some("2 echoes did not match what was sent (first: echo of message 9)")
        );
        let silent = EchoReport { messages: 0, connections: 3, ..good.clone() };
        assert_eq!(
            failure(&silent).as_deref(),
            Some("no message was echoed by ws://s/ in the 1.0 s measured (3 connections open)")
        );
        // Ctrl-C before the first echo: a partial report, not a failure.
        assert_eq!(failure(&EchoReport { interrupted: true, ..silent }), None);
    }
}
