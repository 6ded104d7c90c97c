//! `gale-loadgen storm`: a reconnect storm against `gale serve`.
//!
//! Worker processes (`--procs`, each with its own open-files limit) connect the clients and
//! subscribe them, each to one topic; the parent publishes over HTTP throughout, then cuts:
//! it tells the workers to close every connection at once (`--cut client`), or kills the
//! server and starts it again on the same port (`--cut restart`). Every client reconnects
//! after a random delay, resubscribes with `since`, and recovers what it missed. The workers
//! say when all their clients have recovered (or the deadline passed); the parent then stops
//! publishing, hands every topic's last position to the workers, and they check that each
//! client received every message of its topic's epoch exactly once.
//!
//! Parent and workers talk in JSON lines: commands on the worker's stdin ([`Command`]),
//! reports on its stdout ([`WorkerReport`]). Times cross processes as CLOCK_MONOTONIC
//! nanoseconds, so every worker measures from the same instant of the cut.

mod clients;
mod position;
mod publisher;
mod report;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use self::clients::{Causes, Clients, Command, Settings, WorkerReport, instant_of, mono_ns};
use self::publisher::{PublishOutcome, PublishPlan};
pub use self::report::{StormReport, failure};
use self::report::{StormServer, print_storm};
use crate::cli::{Common, CutArg, StormArgs};
use crate::common::{run_config, unreachable, write_json};
use crate::engine::latency_histogram;
use crate::procstat;
use crate::report::Latency;
use crate::servers::{RunningServer, ServerSpec, free_port};
use crate::target::Target;

/// Run `storm` (or one of its workers); `Ok(false)`: the run went through and its checks held.
pub fn run(a: &StormArgs) -> Result<bool, String> {
    if let Some(spec) = &a.worker {
        worker(a, spec)?;
        return Ok(false);
    }
    let r = parent(a)?;
    print_storm(&r);
    write_json(&a.json, &r)?;
    match failure(&r) {
        Some(what) => Err(what),
        None => Ok(false),
    }
}

/// Check the options, naming the one at fault.
fn check(a: &StormArgs) -> Result<(), String> {
    if a.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    if a.topics == 0 {
        return Err("--topics must be at least 1".into());
    }
    if a.procs == 0 {
        return Err("--procs must be at least 1".into());
    }
    if !(a.rate > 0.0 && a.rate.is_finite()) {
        return Err(format!("--rate must be a positive number of publishes per second, not {}", a.rate));
    }
    for (name, v) in [("--deadline", a.deadline), ("--timeout", a.timeout)] {
        if !(v > 0.0 && v.is_finite()) {
            return Err(format!("{name} must be a positive number of seconds, not {v}"));
        }
    }
    for (name, v) in [("--warmup", a.warmup), ("--drain", a.drain)] {
        if !(v >= 0.0 && v.is_finite()) {
            return Err(format!("{name} must be a number of seconds of 0 or more, not {v}"));
        }
    }
    if a.url.is_empty() && a.server_cmd.is_empty() {
        return Err("give the gateway's --url, or a --server-cmd to start it".into());
    }
    if a.cut == CutArg::Restart && a.server_cmd.is_empty() {
        return Err("--cut restart needs --server-cmd: the command that starts the server again".into());
    }
    let share = a.connections.div_ceil(a.procs);
    let limit = open_files_limit();
    if share as u64 + 64 > limit {
        return Err(format!(
            "--connections {} over --procs {} puts {share} clients in one process, past its open-files \
             limit of {limit}: use --procs {} or more",
            a.connections,
            a.procs,
            (a.connections as u64).div_ceil(limit.saturating_sub(64).max(1))
        ));
    }
    Ok(())
}

/// This process's open-files limit (soft).
fn open_files_limit() -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `r` is a valid rlimit the call writes into.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 { r.rlim_cur } else { 1024 }
}

/// The common options the connection setup takes, for `urls` and `clients`.
fn common_of(a: &StormArgs, urls: &[String], clients: usize) -> Common {
    Common {
        url: urls.to_vec(),
        connections: clients,
        duration: 1.0,
        json: None,
        threads: 1,
        protocols: Vec::new(),
        headers: Vec::new(),
        server_pid: Vec::new(),
        timeout: a.timeout,
        deflate: false,
        insecure: false,
        ca_file: None,
        source_ips: a.source_ips,
    }
}

/// Worker `I/K`: connect its share, then follow the parent's commands.
fn worker(a: &StormArgs, spec: &str) -> Result<(), String> {
    let (index, procs) = spec
        .split_once('/')
        .and_then(|(i, k)| Some((i.parse::<usize>().ok()?, k.parse::<usize>().ok()?)))
        .filter(|(i, k)| i < k)
        .ok_or("bad --worker")?;
    let share = |i: usize| a.connections / procs + usize::from(i < a.connections % procs);
    let (cfg, _) = run_config(&common_of(a, &a.url, share(index).max(1)), true, 1 << 20)?;
    let settings = Settings {
        connect: cfg.connect,
        sources: cfg.sources,
        first: (0..index).map(share).sum(),
        clients: share(index),
        topics: a.topics,
        prefix: a.topic_prefix.clone(),
        jitter: Duration::from_millis(a.jitter),
        timeout: Duration::from_secs_f64(a.timeout),
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            match serde_json::from_str::<Command>(&line) {
                Ok(c) => {
                    if tx.send(c).is_err() {
                        return;
                    }
                }
                Err(e) => eprintln!("gale-loadgen: storm worker: bad command {line:?}: {e}"),
            }
        }
    });
    let mut clients =
        Clients::new(settings, index).map_err(|e| format!("cannot start a client loop: {e}"))?;
    emit(&clients.connect_all())?;
    let deadline = Duration::from_secs_f64(a.deadline);
    let mut storm_until = None;
    let mut storm_told = false;
    loop {
        clients.step(Duration::from_millis(10));
        match rx.try_recv() {
            Ok(Command::Cut { at_ns, close, node }) => {
                let at = instant_of(at_ns);
                clients.cut(at, close, node);
                storm_until = Some(at + deadline);
            }
            Ok(Command::Final(last)) => {
                if !storm_told {
                    emit(&clients.report_now("storm"))?;
                }
                let until = Instant::now() + Duration::from_secs_f64(a.drain);
                while Instant::now() < until && !clients.caught_up(&last) {
                    clients.step(Duration::from_millis(10));
                }
                return emit(&clients.final_report(&last));
            }
            Err(crossbeam_channel::TryRecvError::Empty) => {}
            Err(crossbeam_channel::TryRecvError::Disconnected) => return Ok(()),
        }
        if let Some(until) = storm_until
            && !storm_told
            && (clients.all_recovered() || Instant::now() >= until)
        {
            emit(&clients.report_now("storm"))?;
            storm_told = true;
        }
    }
}

fn emit(r: &WorkerReport) -> Result<(), String> {
    let line = serde_json::to_string(r).map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|_| out.flush()).map_err(|e| e.to_string())
}

/// A worker process seen from the parent.
struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Worker {
    fn start(a: &StormArgs, urls: &[String], index: usize) -> Result<Worker, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
        let mut args: Vec<String> = vec!["storm".into()];
        for u in urls {
            args.extend(["--url".into(), u.clone()]);
        }
        args.extend([
            "--connections".into(),
            a.connections.to_string(),
            "--topics".into(),
            a.topics.to_string(),
            "--topic-prefix".into(),
            a.topic_prefix.clone(),
            "--jitter".into(),
            a.jitter.to_string(),
            "--deadline".into(),
            a.deadline.to_string(),
            "--drain".into(),
            a.drain.to_string(),
            "--timeout".into(),
            a.timeout.to_string(),
            "--source-ips".into(),
            a.source_ips.to_string(),
            "--worker".into(),
            format!("{index}/{}", a.procs),
        ]);
        let mut child = Process::new(exe)
            .args(args)
            .env_remove("GALE_API_KEY")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start a worker process: {e}"))?;
        let stdin = child.stdin.take();
        let lines = BufReader::new(child.stdout.take().ok_or("no worker stdout")?).lines();
        Ok(Worker { child, stdin, lines })
    }

    fn read(&mut self, stage: &str) -> Result<WorkerReport, String> {
        let line = self
            .lines
            .next()
            .ok_or_else(|| format!("a worker process ended before its {stage} report"))?
            .map_err(|e| e.to_string())?;
        let r: WorkerReport =
            serde_json::from_str(&line).map_err(|e| format!("bad report from a worker: {e}"))?;
        if r.stage != stage {
            return Err(format!("a worker sent its {} report instead of {stage}", r.stage));
        }
        Ok(r)
    }

    fn send(&mut self, c: &Command) -> Result<(), String> {
        let line = serde_json::to_string(c).map_err(|e| e.to_string())?;
        let stdin = self.stdin.as_mut().ok_or("worker stdin closed")?;
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .map_err(|e| format!("a worker process is gone: {e}"))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Its stdin closed, the worker finishes on its own; one that does not is killed.
        drop(self.stdin.take());
        crate::servers::reap_within(&mut self.child, Duration::from_secs(5));
    }
}

/// A server this run started: its command and port, kept for a restart.
struct Started {
    spec: ServerSpec,
    port: u16,
    server: RunningServer,
}

/// Start `spec` on `port`, trying again for up to 10 s while the port is still held (a
/// killed server's port may be released asynchronously).
fn start_server(spec: &ServerSpec, port: u16) -> Result<RunningServer, String> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        match RunningServer::start_on(spec, port, "/ws") {
            Ok(mut s) => {
                // What answered may have been a killed server's listener, still open (io_uring
                // closes it asynchronously) while this one found the port taken and exits.
                let settle = Instant::now() + Duration::from_millis(300);
                while Instant::now() < settle && !s.exited() {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if !s.exited() {
                    return Ok(s);
                }
            }
            Err(e) if Instant::now() >= until => return Err(format!("the server did not start: {e}")),
            Err(_) => {}
        }
        if Instant::now() >= until {
            return Err(format!("`{}` did not stay up on port {port} within 10 s", spec.command));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Samples the servers' memory every 50 ms while the storm lasts; returns the peak.
struct PeakSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl PeakSampler {
    fn start(pids: Arc<Mutex<Vec<u32>>>, from: u64) -> PeakSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = from;
            while !flag.load(Ordering::Relaxed) {
                let now: Vec<u32> = pids.lock().map(|p| p.clone()).unwrap_or_default();
                let rss: u64 =
                    now.iter().filter_map(|p| procstat::sample(&p.to_string())).map(|s| s.rss).sum();
                peak = peak.max(rss);
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        });
        PeakSampler { stop, thread }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

fn parent(a: &StormArgs) -> Result<StormReport, String> {
    check(a)?;
    let mut started = Vec::new();
    for (i, command) in a.server_cmd.iter().enumerate() {
        let spec = ServerSpec { name: format!("server {}", i + 1), command: command.clone() };
        let port = free_port()?;
        let server = start_server(&spec, port)?;
        started.push(Started { spec, port, server });
    }
    let urls: Vec<String> =
        if a.url.is_empty() { started.iter().map(|s| s.server.url.clone()).collect() } else { a.url.clone() };
    // The URLs are checked here, once, rather than by each worker.
    run_config(&common_of(a, &urls, a.connections), true, 1 << 20)?;
    let publish_authority = match &a.publish_url {
        Some(u) => u
            .strip_prefix("http://")
            .map(|rest| rest.split('/').next().unwrap_or_default().to_string())
            .filter(|auth| !auth.is_empty())
            .ok_or_else(|| format!("--publish-url {u}: expected http://host:port"))?,
        None => Target::parse(urls.last().expect("checked"))?.authority,
    };
    let plan = PublishPlan {
        authority: publish_authority.clone(),
        auth: a.api_key.as_ref().map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default(),
        topics: a.topics,
        prefix: a.topic_prefix.clone(),
        rate: a.rate,
        size: a.size,
    };
    let measured = if started.is_empty() {
        a.server_pid.clone()
    } else {
        started.iter().map(|s| s.server.pid()).collect()
    };
    let pids = Arc::new(Mutex::new(measured));

    let mut workers = (0..a.procs).map(|i| Worker::start(a, &urls, i)).collect::<Result<Vec<_>, _>>()?;
    let mut ready = Vec::new();
    for w in &mut workers {
        ready.push(w.read("ready")?);
    }
    let connected: u64 = ready.iter().map(|r| r.connected).sum();
    let mut failed = Causes::default();
    for r in &ready {
        failed.merge(&r.failed);
    }
    if connected == 0 {
        return Err(unreachable(&urls.join(" "), a.connections as u64, &failed.counts, &failed.examples));
    }

    let stop_publishing = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (plan, stop) = (plan.clone(), stop_publishing.clone());
        std::thread::spawn(move || publisher::publish(&plan, &stop))
    };
    std::thread::sleep(Duration::from_secs_f64(a.warmup));

    let at_cut: HashMap<u32, procstat::Sample> =
        current(&pids).into_iter().filter_map(|p| Some((p, procstat::sample(&p.to_string())?))).collect();
    let rss_before = at_cut.values().map(|s| s.rss).sum();
    let sampler = PeakSampler::start(pids.clone(), rss_before);
    let cut_ns = mono_ns();
    match a.cut {
        CutArg::Client => {
            for w in &mut workers {
                w.send(&Command::Cut { at_ns: cut_ns, close: true, node: None })?;
            }
        }
        CutArg::Restart => {
            let first = &mut started[0];
            first.server.kill();
            let node = (urls.len() > 1).then_some(0);
            for w in &mut workers {
                w.send(&Command::Cut { at_ns: cut_ns, close: false, node })?;
            }
            first.server = start_server(&first.spec, first.port)?;
            if let Ok(mut p) = pids.lock() {
                p[0] = first.server.pid();
            }
        }
    }
    let mut storm = Vec::new();
    for w in &mut workers {
        storm.push(w.read("storm")?);
    }
    let storm_s = instant_of(cut_ns).elapsed().as_secs_f64();
    let cpu_s: f64 = current(&pids)
        .iter()
        .filter_map(|p| {
            let now = procstat::sample(&p.to_string())?;
            Some(now.cpu.saturating_sub(at_cut.get(p).map_or(Duration::ZERO, |s| s.cpu)).as_secs_f64())
        })
        .sum();
    let mut peak_rss = sampler.finish();
    if a.cut == CutArg::Restart {
        // The restarted server lived only through the storm: its own high-water mark is its
        // peak, samples or not.
        let others: u64 =
            current(&pids)[1..].iter().filter_map(|p| procstat::sample(&p.to_string())).map(|s| s.rss).sum();
        peak_rss = peak_rss.max(high_water_mark(started[0].server.pid()) + others);
    }

    stop_publishing.store(true, Ordering::Relaxed);
    let published: PublishOutcome = publisher.join().map_err(|_| "the publisher panicked")?;
    let mut finals = Vec::new();
    for w in &mut workers {
        w.send(&Command::Final(published.last.clone()))?;
    }
    for w in &mut workers {
        finals.push(w.read("final")?);
    }
    drop(workers);

    let server = (!current(&pids).is_empty()).then(|| StormServer {
        pids: current(&pids),
        cpu_s,
        rss_before_bytes: rss_before,
        peak_rss_bytes: peak_rss,
    });
    let mut r = merge(a, &urls, connected, &failed, &storm, &finals, &published, storm_s);
    r.server = server;
    r.publish_url = format!("http://{publish_authority}");
    drop(started);
    Ok(r)
}

/// The peak resident memory of a process over its life (`VmHWM`), bytes.
fn high_water_mark(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.split_whitespace().next()?.parse().ok()
        })
        .map_or(0, |kb: u64| kb * 1024)
}

fn current(pids: &Arc<Mutex<Vec<u32>>>) -> Vec<u32> {
    pids.lock().map(|p| p.clone()).unwrap_or_default()
}

/// The report: storm figures from the workers' `storm` reports, delivery checks from their
/// `final` ones.
#[allow(clippy::too_many_arguments)]
fn merge(
    a: &StormArgs,
    urls: &[String],
    connected: u64,
    failed: &Causes,
    storm: &[WorkerReport],
    finals: &[WorkerReport],
    published: &PublishOutcome,
    storm_s: f64,
) -> StormReport {
    let (mut recovery, mut resubscribe, mut handshake) =
        (latency_histogram(), latency_histogram(), latency_histogram());
    let mut attempt_failures = Causes::default();
    let mut r = StormReport {
        scenario: "storm".into(),
        url: urls.join(" "),
        cut: match a.cut {
            CutArg::Client => "client".into(),
            CutArg::Restart => "restart".into(),
        },
        clients: a.connections as u64,
        connected,
        failed: failed.total(),
        failures: failed.counts.clone(),
        failure_examples: failed.examples.clone(),
        topics: a.topics,
        rate: a.rate,
        jitter_ms: a.jitter,
        deadline_s: a.deadline,
        procs: a.procs,
        source_ips: a.source_ips as usize,
        published: published.published,
        publish_errors: published.errors.clone(),
        ..StormReport::default()
    };
    for s in storm {
        r.affected += s.affected;
        r.resubscribed += s.resubscribed;
        r.recovered += s.recovered;
        r.attempts += s.attempts;
        s.recovery.add_to(&mut recovery);
        s.resubscribe.add_to(&mut resubscribe);
        s.handshake.add_to(&mut handshake);
        attempt_failures.merge(&s.attempt_failures);
    }
    let mut dropped = Causes::default();
    let mut impossible = BTreeMap::new();
    for f in finals {
        r.deliveries += f.deliveries;
        r.lost += f.lost;
        r.duplicated += f.duplicated;
        r.not_following += f.not_following;
        r.open_at_end += f.open_at_end;
        dropped.merge(&f.dropped);
        for (why, n) in &f.impossible {
            *impossible.entry(why.clone()).or_default() += n;
        }
    }
    r.recovery_us = Latency::of(&recovery);
    r.resubscribe_us = Latency::of(&resubscribe);
    r.handshake_latency_us = Latency::of(&handshake);
    r.all_recovered_s =
        (r.recovered == r.affected && r.affected > 0).then_some(r.recovery_us.max as f64 / 1e6);
    r.storm_s = storm_s;
    r.attempt_failures = attempt_failures.counts;
    r.attempt_failure_examples = attempt_failures.examples;
    r.dropped = dropped.counts;
    r.impossible = impossible;
    r
}
