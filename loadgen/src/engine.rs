//! The client event loop: one per thread, `mio` over epoll, driving many connections for a
//! scenario ([`Driver`]).
//!
//! A run has two phases. The connect phase opens the thread's share of connections at the
//! requested rate, with a bounded number of connects in flight, and records handshake latency
//! and failures by cause. The run phase hands every open connection to the driver and loops:
//! reads are decoded in place with `gale-frame` and given to the driver, whose sends are
//! written once per read batch.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gale_frame::deflate::InflateError;
use gale_frame::{DataKind, Event, OpCode};
use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::conn::{Conn, ConnectOptions, Failure, Io, State};
use crate::deflate::count_received;
use crate::payload::Kind;
use fastrand::Rng;

/// What a scenario does with its connections.
pub trait Driver {
    /// Per-connection state.
    type State: Default;

    /// The run phase begins for this open connection.
    fn on_start(&mut self, io: &mut Io, st: &mut Self::State, cx: &mut Cx);

    /// A whole message arrived (raw TCP mode: a chunk of bytes, `kind` is `Binary`).
    fn on_message(&mut self, io: &mut Io, st: &mut Self::State, kind: Kind, payload: &[u8], cx: &mut Cx);

    /// Called every [`tick`](Driver::tick) for each open connection.
    fn on_tick(&mut self, _io: &mut Io, _st: &mut Self::State, _cx: &mut Cx) {}

    /// How often `on_tick` runs, if at all.
    fn tick(&self) -> Option<Duration> {
        None
    }

    /// A pong arrived.
    fn on_pong(&mut self, _st: &mut Self::State, _cx: &mut Cx) {}

    /// The connection failed or closed during the run phase.
    fn on_lost(&mut self, _st: &mut Self::State, _why: &Failure, _cx: &mut Cx) {}

    /// The measurement window: results count between `from` and `until`.
    fn set_window(&mut self, _from: Instant, _until: Instant) {}
}

/// Per-thread context handed to driver callbacks.
pub struct Cx {
    /// Time of the current batch of events.
    pub now: Instant,
    /// Randomness for masks and payloads.
    pub rng: Rng,
    /// Live counter read by the progress line.
    pub progress: Arc<Progress>,
}

/// Counters shared with the progress line and Ctrl-C handling.
#[derive(Default)]
pub struct Progress {
    /// Connections open.
    pub open: AtomicU64,
    /// Connections failed.
    pub failed: AtomicU64,
    /// Messages received.
    pub messages: AtomicU64,
    /// Set by Ctrl-C or the end of the run: stop as soon as possible.
    pub stop: AtomicBool,
}

/// How the connect phase goes.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Connection options, per server; connections go to them in turn.
    pub connect: Vec<ConnectOptions>,
    /// Connections this thread opens.
    pub connections: usize,
    /// Connections per second for this thread (`None`: as fast as possible).
    pub rate: Option<f64>,
    /// Connects in flight at most.
    pub max_pending: usize,
    /// Source addresses to spread connections over (empty: the kernel chooses).
    pub sources: Vec<IpAddr>,
    /// Give up on a connect + handshake after this long.
    pub timeout: Duration,
    /// Index of this thread (and process), to spread sources.
    pub index: usize,
}

/// What the connect phase achieved.
#[derive(Clone, Debug)]
pub struct ConnectStats {
    /// Connections attempted.
    pub attempted: u64,
    /// Connections that completed the handshake.
    pub connected: u64,
    /// Failures by cause.
    pub failures: BTreeMap<String, u64>,
    /// One example message per failure cause.
    pub failure_examples: BTreeMap<String, String>,
    /// Connect + handshake time, microseconds.
    pub handshake_us: Histogram<u64>,
    /// From the first attempt to the last completed handshake.
    pub elapsed: Duration,
}

impl ConnectStats {
    fn new() -> Self {
        ConnectStats {
            attempted: 0,
            connected: 0,
            failures: BTreeMap::new(),
            failure_examples: BTreeMap::new(),
            handshake_us: latency_histogram(),
            elapsed: Duration::ZERO,
        }
    }

    fn fail(&mut self, f: &Failure) {
        *self.failures.entry(f.label()).or_default() += 1;
        self.failure_examples.entry(f.label()).or_insert_with(|| f.to_string());
    }

    /// Add another thread's figures.
    pub fn merge(&mut self, other: &ConnectStats) {
        self.attempted += other.attempted;
        self.connected += other.connected;
        for (k, v) in &other.failures {
            *self.failures.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.failure_examples {
            self.failure_examples.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let _ = self.handshake_us.add(&other.handshake_us);
        self.elapsed = self.elapsed.max(other.elapsed);
    }

    /// Total failures.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }
}

/// A histogram for latencies in microseconds, 1 µs to 100 s, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid histogram bounds")
}

struct Entry<S> {
    conn: Conn,
    state: S,
    started: bool,
    /// Which server (index into the connect options).
    target: usize,
}

/// One thread's event loop.
pub struct Engine<D: Driver> {
    cfg: EngineConfig,
    poll: Poll,
    events: Events,
    conns: Slab<Entry<D::State>>,
    buf: Vec<u8>,
    driver: D,
    cx: Cx,
    connect: ConnectStats,
    /// Connections lost during the run phase, by cause.
    pub lost: BTreeMap<String, u64>,
    next_source: usize,
    /// Connections not open yet (connecting or handshaking).
    pending: usize,
    /// Readiness of the last poll, reused between polls.
    ready: Vec<(usize, bool, bool)>,
    /// Where compressed messages are inflated, reused.
    inflated: Vec<u8>,
}

impl<D: Driver> Engine<D> {
    /// An engine for `cfg` with scenario `driver`.
    pub fn new(cfg: EngineConfig, driver: D, progress: Arc<Progress>) -> std::io::Result<Self> {
        // Seeded from fastrand's per-thread generator: every client thread masks differently.
        let rng = Rng::new();
        Ok(Engine {
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            conns: Slab::with_capacity(cfg.connections),
            buf: vec![0; 256 * 1024],
            driver,
            cx: Cx { now: Instant::now(), rng, progress },
            connect: ConnectStats::new(),
            lost: BTreeMap::new(),
            next_source: cfg.index,
            pending: 0,
            ready: Vec::new(),
            inflated: Vec::new(),
            cfg,
        })
    }

    /// Open this thread's connections; returns when every attempt has succeeded or failed (or
    /// a stop was requested).
    pub fn connect_phase(&mut self) -> ConnectStats {
        let start = Instant::now();
        let mut last_done = start;
        let interval = self.cfg.rate.filter(|r| *r > 0.0).map(|r| Duration::from_secs_f64(1.0 / r));
        let mut next_at = start;
        let mut next_expiry = start;
        while !self.stopped() {
            let all_attempted = self.connect.attempted as usize >= self.cfg.connections;
            if all_attempted && self.pending == 0 {
                break;
            }
            let now = Instant::now();
            // Start connects that are due.
            while !all_attempted
                && (self.connect.attempted as usize) < self.cfg.connections
                && self.pending < self.cfg.max_pending
                && now >= next_at
            {
                self.start_connect();
                next_at = match interval {
                    Some(i) => next_at + i,
                    None => now,
                };
            }
            let wait = if (self.connect.attempted as usize) < self.cfg.connections {
                match interval {
                    Some(_) => next_at.saturating_duration_since(Instant::now()),
                    None => Duration::from_millis(if self.pending < self.cfg.max_pending { 0 } else { 10 }),
                }
            } else {
                Duration::from_millis(10)
            };
            self.poll_once(wait.min(Duration::from_millis(50)), true);
            if self.connect.connected + self.connect.failed() > 0 {
                last_done = Instant::now();
            }
            if Instant::now() >= next_expiry {
                self.expire_pending();
                next_expiry = Instant::now() + Duration::from_millis(100);
            }
        }
        self.connect.elapsed = last_done.saturating_duration_since(start);
        let mut out = ConnectStats::new();
        out.merge(&self.connect);
        out
    }

    fn stopped(&self) -> bool {
        self.cx.progress.stop.load(Ordering::Relaxed)
    }

    fn start_connect(&mut self) {
        let target = (self.connect.attempted as usize + self.cfg.index) % self.cfg.connect.len();
        self.connect.attempted += 1;
        let source = if self.cfg.sources.is_empty() {
            None
        } else {
            self.next_source += 1;
            Some(self.cfg.sources[self.next_source % self.cfg.sources.len()])
        };
        match Conn::connect(&self.cfg.connect[target], source) {
            Ok(conn) => {
                let entry = self.conns.vacant_entry();
                let key = entry.key();
                let mut conn = conn;
                if let Err(e) = self.poll.registry().register(
                    &mut conn.io.stream,
                    Token(key),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    self.connect.fail(&Failure::from_io(&e));
                    self.cx.progress.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                entry.insert(Entry { conn, state: D::State::default(), started: false, target });
                self.pending += 1;
            }
            Err(f) => {
                self.connect.fail(&f);
                self.cx.progress.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Fail connects and handshakes older than the timeout.
    fn expire_pending(&mut self) {
        let now = Instant::now();
        let expired: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, e)| {
                e.conn.state != State::Open && now.duration_since(e.conn.started) > self.cfg.timeout
            })
            .map(|(k, _)| k)
            .collect();
        for key in expired {
            self.fail_pending(key, Failure::Timeout);
        }
    }

    fn fail_pending(&mut self, key: usize, f: Failure) {
        if self.conns.try_remove(key).is_some() {
            self.pending -= 1;
        }
        self.connect.fail(&f);
        self.cx.progress.failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Hand every open connection to the driver.
    pub fn start(&mut self) {
        self.cx.now = Instant::now();
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let e = &mut self.conns[key];
            e.started = true;
            self.driver.on_start(&mut e.conn.io, &mut e.state, &mut self.cx);
            self.flush(key);
        }
    }

    /// Run the event loop until `until` or a stop request.
    pub fn run_until(&mut self, until: Instant) {
        let tick = self.driver.tick();
        let mut next_tick = tick.map(|t| Instant::now() + t);
        while !self.stopped() {
            let now = Instant::now();
            if now >= until {
                break;
            }
            let mut wait = until - now;
            if let Some(at) = next_tick {
                wait = wait.min(at.saturating_duration_since(now));
            }
            self.poll_once(wait.min(Duration::from_millis(100)), false);
            if let (Some(t), Some(at)) = (tick, next_tick)
                && Instant::now() >= at
            {
                self.cx.now = Instant::now();
                let keys: Vec<usize> = self.conns.iter().filter(|(_, e)| e.started).map(|(k, _)| k).collect();
                for key in keys {
                    let e = &mut self.conns[key];
                    self.driver.on_tick(&mut e.conn.io, &mut e.state, &mut self.cx);
                    self.flush(key);
                }
                next_tick = Some(at + t);
            }
        }
    }

    /// Send a close frame on every connection and drop them.
    pub fn close_all(&mut self) {
        for (_, e) in self.conns.iter_mut() {
            e.conn.io.close(&mut self.cx.rng);
            let _ = e.conn.io.flush();
            let _ = e.conn.io.stream.shutdown(std::net::Shutdown::Write);
        }
        self.conns.clear();
    }

    /// Open connections now.
    pub fn open_count(&self) -> usize {
        self.conns.iter().filter(|(_, e)| e.conn.state == State::Open).count()
    }

    /// The driver, to adjust it before the run phase.
    pub fn driver(&mut self) -> &mut D {
        &mut self.driver
    }

    /// The driver with its results.
    pub fn into_driver(self) -> D {
        self.driver
    }

    fn poll_once(&mut self, timeout: Duration, connecting: bool) {
        if let Err(e) = self.poll.poll(&mut self.events, Some(timeout))
            && e.kind() != std::io::ErrorKind::Interrupted
        {
            self.cx.progress.stop.store(true, Ordering::Relaxed);
            return;
        }
        self.cx.now = Instant::now();
        let mut ready = std::mem::take(&mut self.ready);
        ready.clear();
        ready.extend(
            self.events.iter().map(|e| {
                (e.token().0, e.is_readable() || e.is_read_closed() || e.is_error(), e.is_writable())
            }),
        );
        for &(key, readable, writable) in &ready {
            if !self.conns.contains(key) {
                continue;
            }
            if writable {
                self.on_writable(key, connecting);
            }
            if readable && self.conns.contains(key) {
                self.on_readable(key, connecting);
            }
        }
        self.ready = ready;
    }

    fn on_writable(&mut self, key: usize, connecting: bool) {
        let e = &mut self.conns[key];
        if e.conn.state == State::Connecting {
            match e.conn.on_connected(&self.cfg.connect[e.target]) {
                Ok(true) => self.opened(key, connecting),
                Ok(false) => {}
                Err(f) => self.fail_pending(key, f),
            }
            return;
        }
        self.flush(key);
    }

    fn opened(&mut self, key: usize, connecting: bool) {
        let e = &mut self.conns[key];
        let us = e.conn.started.elapsed().as_micros() as u64;
        let _ = self.connect.handshake_us.record(us.max(1));
        self.connect.connected += 1;
        self.pending -= 1;
        self.cx.progress.open.fetch_add(1, Ordering::Relaxed);
        if !connecting {
            e.started = true;
            self.driver.on_start(&mut e.conn.io, &mut e.state, &mut self.cx);
        }
    }

    fn on_readable(&mut self, key: usize, connecting: bool) {
        loop {
            let e = &mut self.conns[key];
            let n = match e.conn.read(&mut self.buf) {
                Ok(0) => {
                    let f = if e.conn.state == State::Open {
                        Failure::Protocol("server closed the connection".into())
                    } else {
                        Failure::Reset
                    };
                    self.lose(key, f);
                    return;
                }
                Ok(n) => n,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    self.lose(key, Failure::from_io(&err));
                    return;
                }
            };
            let mut start = 0;
            if e.conn.state == State::Handshaking {
                match e.conn.on_handshake_bytes(&self.buf[..n], &self.cfg.connect[e.target]) {
                    Ok(Some(offset)) => {
                        start = offset;
                        self.opened(key, connecting);
                    }
                    Ok(None) => {
                        if n < self.buf.len() && !e.conn.reads_until_would_block() {
                            return;
                        }
                        continue;
                    }
                    Err(f) => {
                        self.fail_pending(key, f);
                        return;
                    }
                }
            }
            if let Err(f) = self.frames(key, start, n) {
                self.lose(key, f);
                return;
            }
            self.flush(key);
            let Some(e) = self.conns.get(key) else { return };
            if n < self.buf.len() && !e.conn.reads_until_would_block() {
                return;
            }
        }
    }

    /// Decode frames in `buf[start..end]` and hand them to the driver.
    fn frames(&mut self, key: usize, start: usize, end: usize) -> Result<(), Failure> {
        let e = &mut self.conns[key];
        if e.conn.state != State::Open {
            return Ok(());
        }
        let data = &mut self.buf[start..end];
        if self.cfg.connect[e.target].raw {
            if e.started && !data.is_empty() {
                self.driver.on_message(&mut e.conn.io, &mut e.state, Kind::Binary, data, &mut self.cx);
            }
            return Ok(());
        }
        let mut pos = 0;
        loop {
            let (used, event) =
                e.conn.decoder.decode(&mut data[pos..]).map_err(|err| Failure::Protocol(err.to_string()))?;
            pos += used;
            let Some(event) = event else { break };
            let io = &mut e.conn.io;
            match event {
                Event::Text(t) if e.started => {
                    count_received(t.len(), t.len());
                    self.driver.on_message(io, &mut e.state, Kind::Text, t.as_bytes(), &mut self.cx)
                }
                Event::UncheckedText(t) if e.started => {
                    count_received(t.len(), t.len());
                    self.driver.on_message(io, &mut e.state, Kind::Text, t, &mut self.cx)
                }
                Event::Binary(b) if e.started => {
                    count_received(b.len(), b.len());
                    self.driver.on_message(io, &mut e.state, Kind::Binary, b, &mut self.cx)
                }
                Event::Text(_) | Event::UncheckedText(_) | Event::Binary(_) => {}
                Event::Compressed { kind, payload } => {
                    let Some(z) = io.deflate.as_mut() else {
                        return Err(Failure::Protocol(
                            "compressed message without permessage-deflate".into(),
                        ));
                    };
                    let mut plain = std::mem::take(&mut self.inflated);
                    z.inflate(payload, &mut plain, self.cfg.connect[e.target].max_message as usize).map_err(
                        |err| {
                            Failure::Protocol(match err {
                                InflateError::TooBig => {
                                    "a compressed message inflates past the size limit".into()
                                }
                                InflateError::Corrupt => {
                                    "a compressed message is not valid DEFLATE data".into()
                                }
                            })
                        },
                    )?;
                    count_received(plain.len(), payload.len());
                    let kind = if kind == DataKind::Text {
                        // Like the decoder's own check, skipped when the scenario compares
                        // every message with the valid text it sent.
                        if self.cfg.connect[e.target].check_utf8 && std::str::from_utf8(&plain).is_err() {
                            return Err(Failure::Protocol("compressed text message is not UTF-8".into()));
                        }
                        Kind::Text
                    } else {
                        Kind::Binary
                    };
                    if e.started {
                        self.driver.on_message(io, &mut e.state, kind, &plain, &mut self.cx);
                    }
                    self.inflated = plain;
                }
                Event::Ping(p) => {
                    let p = p.to_vec();
                    io.frame(&mut self.cx.rng, OpCode::Pong, p.len(), |out| out.copy_from_slice(&p));
                }
                Event::Pong(_) => self.driver.on_pong(&mut e.state, &mut self.cx),
                Event::Close(frame) => {
                    let code = frame.code.map_or(1005, |c| c.0);
                    return Err(Failure::Protocol(format!("server closed with {code} {}", frame.reason)));
                }
            }
        }
        e.conn.decoder.release();
        Ok(())
    }

    fn flush(&mut self, key: usize) {
        let Some(e) = self.conns.get_mut(key) else { return };
        if e.conn.io.pending() > 0
            && let Err(err) = e.conn.io.flush()
        {
            self.lose(key, Failure::from_io(&err));
        }
    }

    /// A connection ended: a pending one fails the connect phase, an open one is lost.
    fn lose(&mut self, key: usize, f: Failure) {
        let Some(e) = self.conns.try_remove(key) else { return };
        if e.conn.state == State::Open {
            self.cx.progress.open.fetch_sub(1, Ordering::Relaxed);
            *self.lost.entry(f.label()).or_default() += 1;
            let mut state = e.state;
            self.driver.on_lost(&mut state, &f, &mut self.cx);
        } else {
            self.pending -= 1;
            self.connect.fail(&f);
            self.cx.progress.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}
