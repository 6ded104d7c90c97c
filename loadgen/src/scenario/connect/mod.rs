//! `gale-loadgen connect`: open, hold, measure. With `--procs K` the work is split over K
//! worker processes (each has its own open-files limit); the parent samples the server while
//! all of them hold their connections and adds their reports up.

mod driver;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use self::driver::Hold;
use crate::cli::ConnectArgs;
use crate::common::{run_config, unreachable, write_json};
use crate::engine::{ConnectStats, latency_histogram};
use crate::report::{Buckets, ConnectReport, Latency, print_connect};
use crate::run::{Run, sample_all};

/// Run `connect` and print/write its report.
pub fn run(args: &ConnectArgs, print: bool) -> Result<ConnectReport, String> {
    if args.procs == 0 {
        return Err("--procs must be at least 1".into());
    }
    if let Some(p) = args.ping
        && !(p > 0.0 && p.is_finite())
    {
        return Err(format!("--ping must be a positive number of seconds, not {p}"));
    }
    if let Some(r) = args.rate
        && !(r > 0.0 && r.is_finite())
    {
        return Err(format!("--rate must be a positive number of connections per second, not {r}"));
    }
    let hold = Duration::from_secs_f64(args.hold.unwrap_or(args.common.duration).max(0.0));
    let report = match (&args.worker, args.procs) {
        (Some(w), _) => return worker(args, w),
        (None, 1) => single(args, hold)?,
        (None, _) => parent(args, hold)?,
    };
    if print {
        print_connect(&report);
    }
    write_json(&args.common.json, &report)?;
    if report.connected == 0 {
        return Err(unreachable(
            &args.common.url_label(),
            report.requested,
            &report.failures,
            &report.failure_examples,
        ));
    }
    Ok(report)
}

/// Connect in this process; `proc_index` spreads source addresses between workers.
fn connect_here(args: &ConnectArgs, proc_index: usize) -> Result<(Run<Hold>, ConnectStats), String> {
    let (mut cfg, _) = run_config(&args.common, true, 1 << 20)?;
    cfg.connect_rate = args.rate;
    cfg.proc_index = proc_index;
    if args.worker.is_some() {
        cfg.progress = false;
    }
    let ping = args.ping.map(Duration::from_secs_f64);
    let mut run =
        Run::start(&cfg, |_| Hold { ping, pings: 0, pongs: 0, messages: 0 }).map_err(|e| e.to_string())?;
    let stats = run.wait_connected()?;
    Ok((run, stats))
}

fn base_report(args: &ConnectArgs, stats: &ConnectStats) -> ConnectReport {
    let connect_s = stats.elapsed.as_secs_f64();
    ConnectReport {
        scenario: "connect".into(),
        url: args.common.url_label(),
        requested: args.common.connections as u64,
        connected: stats.connected,
        failed: stats.failed(),
        failures: stats.failures.clone(),
        failure_examples: stats.failure_examples.clone(),
        connect_per_sec: if connect_s > 0.0 { stats.connected as f64 / connect_s } else { 0.0 },
        connect_s,
        handshake_latency_us: Latency::of(&stats.handshake_us),
        procs: args.procs,
        source_ips: args.common.source_ips as usize,
        ..ConnectReport::default()
    }
}

/// Hold the connections until `until` (or until stdin closes for a worker), then close them.
fn hold_and_finish(
    run: Run<Hold>,
    report: &mut ConnectReport,
    hold: impl FnOnce(&mut Run<Hold>) -> Duration,
) -> Result<(), String> {
    let mut run = run;
    let held = hold(&mut run);
    report.hold_s = held.as_secs_f64();
    report.interrupted = run.interrupted();
    let results = run.finish()?;
    for r in &results {
        report.open_after_hold += r.open as u64;
        report.pings += r.driver.pings;
        report.pongs += r.driver.pongs;
        for (k, v) in &r.lost {
            *report.lost.entry(k.clone()).or_default() += v;
        }
    }
    Ok(())
}

fn single(args: &ConnectArgs, hold: Duration) -> Result<ConnectReport, String> {
    let pids = &args.common.server_pid;
    let before = sample_all(pids);
    let (run, stats) = connect_here(args, 0)?;
    let mut report = base_report(args, &stats);
    if stats.connected == 0 {
        // Nothing to hold: report the failures by cause and stop.
        report.interrupted = run.interrupted();
        let _ = run.finish();
        return Ok(report);
    }
    // Let the server settle (its last accepts and handshakes) before reading its memory.
    std::thread::sleep(Duration::from_millis(300));
    let after = sample_all(pids);
    set_rss(&mut report, before.map(|s| s.rss), after.map(|s| s.rss));
    hold_and_finish(run, &mut report, |run| {
        let from = Instant::now();
        run.measure(from, from + hold, "holding", || {}).saturating_duration_since(from)
    })?;
    Ok(report)
}

fn set_rss(report: &mut ConnectReport, before: Option<u64>, after: Option<u64>) {
    report.server_rss_before = before;
    report.server_rss_after = after;
    if let (Some(b), Some(a)) = (before, after)
        && report.connected > 0
    {
        report.server_rss_bytes_per_conn = Some((a as f64 - b as f64) / report.connected as f64);
    }
}

/// A worker of a `--procs` run: connect, print a "ready" report line, hold until stdin
/// closes, print the final report line.
fn worker(args: &ConnectArgs, spec: &str) -> Result<ConnectReport, String> {
    let index: usize = spec.split('/').next().and_then(|i| i.parse().ok()).ok_or("bad --worker")?;
    let (run, stats) = connect_here(args, index)?;
    let mut report = base_report(args, &stats);
    report.handshake_buckets = Some(Buckets::of(&stats.handshake_us));
    emit_line(&report)?;
    hold_and_finish(run, &mut report, |_| {
        let from = Instant::now();
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        from.elapsed()
    })?;
    emit_line(&report)?;
    Ok(report)
}

fn emit_line(report: &ConnectReport) -> Result<(), String> {
    let line = serde_json::to_string(report).map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|_| out.flush()).map_err(|e| e.to_string())
}

/// Arguments for worker `index` of `procs`.
fn worker_args(args: &ConnectArgs, index: usize, share: usize) -> Vec<String> {
    let c = &args.common;
    let mut a: Vec<String> = vec!["connect".into()];
    for u in &c.url {
        a.extend(["--url".into(), u.clone()]);
    }
    a.extend([
        "--connections".into(),
        share.to_string(),
        "--threads".into(),
        c.threads.to_string(),
        "--timeout".into(),
        c.timeout.to_string(),
        "--source-ips".into(),
        c.source_ips.to_string(),
        "--worker".into(),
        format!("{index}/{}", args.procs),
    ]);
    for p in &c.protocols {
        a.extend(["--subprotocol".into(), p.clone()]);
    }
    for h in &c.headers {
        a.extend(["--header".into(), h.clone()]);
    }
    if c.insecure {
        a.push("--insecure".into());
    }
    if let Some(f) = &c.ca_file {
        a.extend(["--ca-file".into(), f.display().to_string()]);
    }
    if let Some(r) = args.rate {
        a.extend(["--rate".into(), (r / args.procs as f64).to_string()]);
    }
    if let Some(p) = args.ping {
        a.extend(["--ping".into(), p.to_string()]);
    }
    a
}

struct Worker {
    child: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

fn parent(args: &ConnectArgs, hold: Duration) -> Result<ConnectReport, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let pids = &args.common.server_pid;
    let before = sample_all(pids);
    let total = args.common.connections;
    let mut workers = Vec::new();
    for i in 0..args.procs {
        let share = total / args.procs + usize::from(i < total % args.procs);
        let mut child = Command::new(&exe)
            .args(worker_args(args, i, share))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start worker process: {e}"))?;
        let lines = BufReader::new(child.stdout.take().ok_or("no worker stdout")?).lines();
        workers.push(Worker { child, lines });
    }
    let start = Instant::now();
    let mut ready = Vec::new();
    for w in &mut workers {
        ready.push(read_report(w)?);
    }
    let connect_s = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    let after = sample_all(pids);
    let held_from = Instant::now();
    if ready.iter().any(|r| r.connected > 0) {
        std::thread::sleep(hold);
    }
    let mut finals = Vec::new();
    for w in &mut workers {
        drop(w.child.stdin.take());
        finals.push(read_report(w)?);
        let _ = w.child.wait();
    }
    let mut report = merge_reports(args, &ready, &finals, connect_s);
    report.hold_s = held_from.elapsed().as_secs_f64();
    set_rss(&mut report, before.map(|s| s.rss), after.map(|s| s.rss));
    Ok(report)
}

fn read_report(w: &mut Worker) -> Result<ConnectReport, String> {
    let line = w.lines.next().ok_or("a worker process ended early")?.map_err(|e| e.to_string())?;
    serde_json::from_str(&line).map_err(|e| format!("bad report from a worker: {e}"))
}

fn merge_reports(
    args: &ConnectArgs,
    ready: &[ConnectReport],
    finals: &[ConnectReport],
    connect_s: f64,
) -> ConnectReport {
    let mut hist = latency_histogram();
    let mut out = ConnectReport {
        scenario: "connect".into(),
        url: args.common.url_label(),
        requested: args.common.connections as u64,
        procs: args.procs,
        source_ips: args.common.source_ips as usize,
        connect_s,
        ..ConnectReport::default()
    };
    for r in ready {
        out.connected += r.connected;
        out.failed += r.failed;
        for (k, v) in &r.failures {
            *out.failures.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &r.failure_examples {
            out.failure_examples.entry(k.clone()).or_insert_with(|| v.clone());
        }
        if let Some(b) = &r.handshake_buckets {
            b.add_to(&mut hist);
        }
    }
    for r in finals {
        out.open_after_hold += r.open_after_hold;
        out.pings += r.pings;
        out.pongs += r.pongs;
        out.interrupted |= r.interrupted;
        for (k, v) in &r.lost {
            *out.lost.entry(k.clone()).or_default() += v;
        }
    }
    out.handshake_latency_us = Latency::of(&hist);
    out.connect_per_sec = if connect_s > 0.0 { out.connected as f64 / connect_s } else { 0.0 };
    out
}
