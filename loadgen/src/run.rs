//! Running a scenario over several client threads: connect, synchronise, measure, collect.
//!
//! Every thread opens its share of the connections; once all are done the main thread sets
//! one measurement window (after the warm-up) for all of them, samples the server's and its
//! own CPU at both ends of the window, and merges what the threads report. A live progress
//! line is drawn on a terminal only; Ctrl-C stops the threads and a partial report follows.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::conn::ConnectOptions;
use crate::engine::{ConnectStats, Driver, Engine, EngineConfig, Progress};
use crate::procstat::{self, Sample};

/// Settings shared by all scenarios.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// How to connect, per server (connections go to them in turn).
    pub connect: Vec<ConnectOptions>,
    /// Client threads.
    pub threads: usize,
    /// Connections in total (for this process).
    pub connections: usize,
    /// Connections per second in total (`None`: as fast as possible).
    pub connect_rate: Option<f64>,
    /// Connect + handshake timeout.
    pub timeout: Duration,
    /// Source addresses.
    pub sources: Vec<IpAddr>,
    /// Index of this process among `--procs` workers, to spread sources.
    pub proc_index: usize,
    /// Draw a progress line.
    pub progress: bool,
}

/// What a thread reports when it ends.
pub struct ThreadResult<D> {
    /// The driver with its results.
    pub driver: D,
    /// Connections lost in the run phase, by cause.
    pub lost: BTreeMap<String, u64>,
    /// Connections open at the end.
    pub open: usize,
    /// Bytes before and after compression.
    pub wire: crate::deflate::WireBytes,
}

enum Msg<D> {
    Connected(ConnectStats),
    Done(Box<ThreadResult<D>>),
    Failed(String),
}

/// A started run: threads connecting.
pub struct Run<D: Driver + Send + 'static> {
    progress: Arc<Progress>,
    interrupted: Arc<AtomicBool>,
    to_threads: Vec<Sender<(Instant, Instant)>>,
    from_threads: Receiver<Msg<D>>,
    handles: Vec<JoinHandle<()>>,
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
}

impl<D: Driver + Send + 'static> Run<D> {
    /// Start the threads; `make` builds each thread's driver from its index.
    pub fn start(cfg: &RunConfig, make: impl Fn(usize) -> D) -> std::io::Result<Self> {
        let progress = Arc::new(Progress::default());
        let interrupted = interrupt_flag()?;
        let threads = cfg.threads.clamp(1, cfg.connections.max(1));
        let (tx, from_threads) = crossbeam_channel::unbounded();
        let mut to_threads = Vec::new();
        let mut handles = Vec::new();
        for i in 0..threads {
            let share = cfg.connections / threads + usize::from(i < cfg.connections % threads);
            let ecfg = EngineConfig {
                connect: cfg.connect.clone(),
                connections: share,
                rate: cfg.connect_rate.map(|r| r / threads as f64),
                max_pending: 256,
                sources: cfg.sources.clone(),
                timeout: cfg.timeout,
                index: cfg.proc_index * 1000 + i,
            };
            let (go_tx, go_rx) = bounded(1);
            to_threads.push(go_tx);
            let tx = tx.clone();
            let driver = make(i);
            let progress = progress.clone();
            handles.push(std::thread::Builder::new().name(format!("loadgen-{i}")).spawn(move || {
                thread_main(ecfg, driver, progress, tx, go_rx);
            })?);
        }
        let bar = cfg.progress.then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Ok(Run { progress, interrupted, to_threads, from_threads, handles, bar, started: Instant::now() })
    }

    /// Whether Ctrl-C was pressed.
    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }

    fn check_interrupt(&self) {
        if self.interrupted() {
            self.progress.stop.store(true, Ordering::Relaxed);
        }
    }

    fn show(&self, what: &str) {
        if let Some(bar) = &self.bar {
            let open = self.progress.open.load(Ordering::Relaxed);
            let failed = self.progress.failed.load(Ordering::Relaxed);
            bar.set_message(format!(
                "{what}: {open} open, {failed} failed, {:.0} s",
                self.started.elapsed().as_secs_f64()
            ));
        }
    }

    /// Wait for every thread to finish connecting; returns the merged connect statistics.
    pub fn wait_connected(&mut self) -> Result<ConnectStats, String> {
        let mut merged: Option<ConnectStats> = None;
        let mut waiting = self.to_threads.len();
        while waiting > 0 {
            self.check_interrupt();
            self.show("connecting");
            match self.from_threads.recv_timeout(Duration::from_millis(100)) {
                Ok(Msg::Connected(stats)) => {
                    waiting -= 1;
                    match &mut merged {
                        Some(m) => m.merge(&stats),
                        None => merged = Some(stats),
                    }
                }
                Ok(Msg::Failed(e)) => return Err(e),
                Ok(Msg::Done(_)) => waiting -= 1,
                Err(_) => {}
            }
        }
        merged.ok_or_else(|| "no client thread started".into())
    }

    /// Start the run phase on every thread with window `[from, until)` and wait until it
    /// ends, calling `at_from` when the window opens (to take the first samples). Returns
    /// when the window ended (earlier on Ctrl-C).
    pub fn measure(&mut self, from: Instant, until: Instant, label: &str, at_from: impl FnMut()) -> Instant {
        self.go(from, until);
        self.wait(from, until, label, at_from)
    }

    /// Start the run phase on every thread with window `[from, until)`, without waiting.
    pub fn go(&mut self, from: Instant, until: Instant) {
        for t in &self.to_threads {
            let _ = t.send((from, until));
        }
    }

    /// Wait for the window `[from, until)` to pass, showing progress; see [`Run::measure`].
    pub fn wait(&mut self, from: Instant, until: Instant, label: &str, mut at_from: impl FnMut()) -> Instant {
        let mut took_first = false;
        loop {
            self.check_interrupt();
            let now = Instant::now();
            if !took_first && now >= from {
                at_from();
                took_first = true;
            }
            if now >= until || self.progress.stop.load(Ordering::Relaxed) {
                if !took_first {
                    at_from();
                }
                return now.min(until);
            }
            self.show(label);
            let next = if took_first { until } else { from };
            std::thread::sleep(next.saturating_duration_since(now).min(Duration::from_millis(100)));
        }
    }

    /// Ask the threads to stop now (e.g. another run sharing the window was interrupted).
    pub fn stop(&self) {
        self.progress.stop.store(true, Ordering::Relaxed);
    }

    /// Collect every thread's results.
    pub fn finish(mut self) -> Result<Vec<ThreadResult<D>>, String> {
        self.progress.stop.store(true, Ordering::Relaxed);
        let mut results = Vec::new();
        let mut failure = None;
        for _ in 0..self.handles.len() {
            match self.from_threads.recv_timeout(Duration::from_secs(30)) {
                Ok(Msg::Done(r)) => results.push(*r),
                Ok(Msg::Failed(e)) => failure = Some(e),
                Ok(Msg::Connected(_)) => {}
                Err(_) => failure = Some("a client thread did not finish".into()),
            }
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        match failure {
            Some(e) if results.is_empty() => Err(e),
            _ => Ok(results),
        }
    }
}

fn thread_main<D: Driver + Send + 'static>(
    cfg: EngineConfig,
    driver: D,
    progress: Arc<Progress>,
    tx: Sender<Msg<D>>,
    go: Receiver<(Instant, Instant)>,
) {
    let mut engine = match Engine::new(cfg, driver, progress.clone()) {
        Ok(e) => e,
        Err(e) => {
            let _ = tx.send(Msg::Failed(format!("cannot start a client loop: {e}")));
            return;
        }
    };
    let stats = engine.connect_phase();
    let _ = tx.send(Msg::Connected(stats));
    // Wait for the window (or a stop).
    let window = loop {
        match go.recv_timeout(Duration::from_millis(100)) {
            Ok(w) => break Some(w),
            Err(_) if progress.stop.load(Ordering::Relaxed) => break None,
            Err(_) => {}
        }
    };
    if let Some((from, until)) = window {
        engine.driver().set_window(from, until);
        engine.start();
        engine.run_until(until);
    }
    let open = engine.open_count();
    engine.close_all();
    let lost = std::mem::take(&mut engine.lost);
    let driver = engine.into_driver();
    let wire = crate::deflate::wire_bytes();
    let _ = tx.send(Msg::Done(Box::new(ThreadResult { driver, lost, open, wire })));
}

/// Samples of the servers and of this process at the start and end of a window.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    /// Servers at the start (summed).
    pub server_from: Option<Sample>,
    /// Servers at the end (summed).
    pub server_until: Option<Sample>,
    /// This process at the start.
    pub self_from: Option<Sample>,
    /// This process at the end.
    pub self_until: Option<Sample>,
}

/// The sum of the samples of `pids`; `None` if there are none or one cannot be read.
pub fn sample_all(pids: &[u32]) -> Option<Sample> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().try_fold(Sample::default(), |acc, p| {
        let s = procstat::sample(&p.to_string())?;
        Some(Sample { cpu: acc.cpu + s.cpu, rss: acc.rss + s.rss })
    })
}

impl Samples {
    /// Take the start samples.
    pub fn start(&mut self, server_pids: &[u32]) {
        self.server_from = sample_all(server_pids);
        self.self_from = procstat::sample("self");
    }

    /// Take the end samples.
    pub fn end(&mut self, server_pids: &[u32]) {
        self.server_until = sample_all(server_pids);
        self.self_until = procstat::sample("self");
    }

    /// CPU seconds the servers used in the window.
    pub fn server_cpu(&self) -> Option<f64> {
        Some((self.server_until?.cpu.saturating_sub(self.server_from?.cpu)).as_secs_f64())
    }

    /// CPU seconds this process used in the window.
    pub fn self_cpu(&self) -> f64 {
        match (self.self_from, self.self_until) {
            (Some(a), Some(b)) => b.cpu.saturating_sub(a.cpu).as_secs_f64(),
            _ => 0.0,
        }
    }
}

/// The process-wide Ctrl-C flag, registered once.
pub fn interrupt_flag() -> std::io::Result<Arc<AtomicBool>> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    if let Some(f) = FLAG.get() {
        return Ok(f.clone());
    }
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, flag.clone())?;
    Ok(FLAG.get_or_init(|| flag).clone())
}

/// Whether to draw a progress line: only on a terminal.
pub fn want_progress() -> bool {
    std::io::stderr().is_terminal()
}
