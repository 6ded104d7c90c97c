//! A storm worker's clients: one `mio` event loop over this process's share of them.
//!
//! Each client connects, subscribes to its topic and follows it ([`Position`]). When its
//! connection goes (cut by us, or the server went away) it reconnects after a random delay
//! of 0..jitter, resubscribes with `since` its position, and counts as recovered once the
//! gateway's reply came and every missed message up to the reply's `seq` has arrived (at
//! once, when the gateway says recovery is impossible). A failed attempt is retried with
//! exponential backoff (100 ms doubling to 2 s, times 0.5..1), on the next URL when there are
//! several (cluster nodes).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use gale_frame::{Event, OpCode};
use hdrhistogram::Histogram;
use mio::{Events, Interest, Poll, Token};
use serde::{Deserialize, Serialize};

use super::position::{Placed, Position, Tally};
use super::publisher::{Published, topic_name};
use crate::conn::{Conn, ConnectOptions, Failure, State};
use crate::engine::latency_histogram;
use crate::report::Buckets;
use fastrand::Rng;

/// Connects and subscribes in flight at once in the first connect phase.
const MAX_PENDING: usize = 512;

/// What a worker's clients are and do.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How to connect, per URL.
    pub connect: Vec<ConnectOptions>,
    /// Source addresses (empty: the kernel's choice).
    pub sources: Vec<IpAddr>,
    /// Global index of this worker's first client (client i subscribes to topic i mod topics).
    pub first: usize,
    /// Clients in this worker.
    pub clients: usize,
    /// Topics in all.
    pub topics: usize,
    /// Their names' prefix.
    pub prefix: String,
    /// Reconnect delay is uniform in 0..jitter.
    pub jitter: Duration,
    /// Connect + handshake + subscribe timeout.
    pub timeout: Duration,
}

/// Why an attempt failed, or a connection went: a label to count by, and words.
#[derive(Clone, Debug)]
struct Cause {
    label: String,
    words: String,
}

impl From<Failure> for Cause {
    fn from(f: Failure) -> Cause {
        Cause { label: f.label(), words: f.to_string() }
    }
}

/// Counts by cause, with an example in words per cause.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Causes {
    /// Count per label.
    pub counts: BTreeMap<String, u64>,
    /// One example per label.
    pub examples: BTreeMap<String, String>,
}

impl Causes {
    fn add(&mut self, c: &Cause) {
        *self.counts.entry(c.label.clone()).or_default() += 1;
        self.examples.entry(c.label.clone()).or_insert_with(|| c.words.clone());
    }

    /// Add another worker's.
    pub fn merge(&mut self, o: &Causes) {
        for (k, v) in &o.counts {
            *self.counts.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.examples {
            self.examples.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }

    /// The total.
    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

/// What a worker tells the parent, at each stage (`ready`, `storm`, `final`); later stages
/// carry the earlier figures too.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WorkerReport {
    /// `ready`: subscribed; `storm`: recovered (or the deadline passed); `final`: checked.
    pub stage: String,
    /// Clients subscribed in the first connect phase.
    pub connected: u64,
    /// Clients whose first connect failed (out of the run).
    pub failed: Causes,
    /// Clients caught by the storm (all, or those of the killed node).
    pub affected: u64,
    /// Of those, resubscribed (the gateway's reply came) and recovered.
    pub resubscribed: u64,
    /// Recovered: resubscribed, with every missed message received.
    pub recovered: u64,
    /// Per client, cut to recovered, µs.
    pub recovery: Buckets,
    /// Per client, cut to resubscribed, µs.
    pub resubscribe: Buckets,
    /// Handshakes of reconnects, µs.
    pub handshake: Buckets,
    /// Reconnect attempts.
    pub attempts: u64,
    /// Failed reconnect attempts, by cause.
    pub attempt_failures: Causes,
    /// Open connections that went, by cause (the cut itself not included).
    pub dropped: Causes,
    /// Recoveries the gateway said were impossible, by its reason.
    pub impossible: BTreeMap<String, u64>,
    /// Deliveries received.
    pub deliveries: u64,
    /// Messages skipped within an epoch (gaps), and those never received by the end.
    pub lost: u64,
    /// Deliveries of a `seq` received before.
    pub duplicated: u64,
    /// Deliveries of a new epoch no reply announced.
    pub unannounced_epochs: u64,
    /// Clients that ended in another epoch than their topic's last publish.
    pub not_following: u64,
    /// Clients with a connection open at the end.
    pub open_at_end: u64,
}

/// A command from the parent.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    /// The storm began at `at_ns` (CLOCK_MONOTONIC): close every connection (`close`), or the
    /// server of URL `node` (every URL if `None`) was killed.
    Cut {
        /// When, in CLOCK_MONOTONIC nanoseconds.
        at_ns: u64,
        /// Close every client connection now.
        close: bool,
        /// Which URL's server went (None: all).
        node: Option<usize>,
    },
    /// Publishing stopped; each topic's last position (by name).
    Final(BTreeMap<String, Published>),
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process, unlike an `Instant`.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec the call writes into; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The `Instant` of a CLOCK_MONOTONIC time (`Instant` is CLOCK_MONOTONIC on Linux).
pub fn instant_of(ns: u64) -> Instant {
    let now = Instant::now();
    let mono = mono_ns();
    if ns <= mono { now - Duration::from_nanos(mono - ns) } else { now + Duration::from_nanos(ns - mono) }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Not connected: waiting for its (re)connect time.
    Waiting,
    /// TCP connect and handshake.
    Connecting,
    /// Subscribe sent, no reply yet.
    Subscribing,
    /// Following its topic.
    Live,
    /// Its first connect failed: out of the run.
    Failed,
}

/// What a client knows about its topic and its part in the storm.
#[derive(Debug, Default)]
struct Track {
    pos: Position,
    /// Subscribed at least once (later subscribes carry `since`).
    subscribed_once: bool,
    /// Recovering: the `seq` to reach.
    awaiting: Option<u64>,
    /// Caught by the storm.
    in_storm: bool,
    resubscribed_at: Option<Instant>,
    recovered_at: Option<Instant>,
}

struct Client {
    conn: Option<Conn>,
    /// Bumped per connection, part of the token: events of a closed one are not mistaken.
    generation: u32,
    target: usize,
    topic: String,
    phase: Phase,
    since: Instant,
    /// Failed attempts since the last open.
    failures: u32,
    track: Track,
}

/// The counters the message handler updates.
#[derive(Default)]
struct Counters {
    tally: Tally,
    impossible: BTreeMap<String, u64>,
}

/// The event loop of one worker.
pub struct Clients {
    settings: Settings,
    poll: Poll,
    events: Events,
    clients: Vec<Client>,
    buf: Vec<u8>,
    rng: Rng,
    timers: BinaryHeap<Reverse<(Instant, usize, u32)>>,
    next_source: usize,
    next_expiry: Instant,
    /// Clients started in the first connect phase, and those of them not done.
    started: usize,
    pending: usize,
    cut_at: Option<Instant>,
    counters: Counters,
    handshake: Histogram<u64>,
    report: WorkerReport,
}

/// Bits of a token that hold the client index.
const INDEX_BITS: u32 = 32;

impl Clients {
    /// The clients of `settings`, not connected yet.
    pub fn new(settings: Settings, proc_index: usize) -> std::io::Result<Clients> {
        let now = Instant::now();
        let clients = (0..settings.clients)
            .map(|i| {
                let global = settings.first + i;
                Client {
                    conn: None,
                    generation: 0,
                    target: global % settings.connect.len(),
                    topic: topic_name(&settings.prefix, global % settings.topics),
                    phase: Phase::Waiting,
                    since: now,
                    failures: 0,
                    track: Track::default(),
                }
            })
            .collect();
        Ok(Clients {
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            clients,
            buf: vec![0; 256 * 1024],
            rng: Rng::new(),
            timers: BinaryHeap::new(),
            next_source: proc_index,
            next_expiry: now,
            started: 0,
            pending: 0,
            cut_at: None,
            counters: Counters::default(),
            handshake: latency_histogram(),
            report: WorkerReport::default(),
            settings,
        })
    }

    /// Connect and subscribe every client, `MAX_PENDING` at a time; a client whose first
    /// attempt fails is out of the run. Returns the `ready` report.
    pub fn connect_all(&mut self) -> WorkerReport {
        while self.started < self.clients.len() || self.pending > 0 {
            while self.started < self.clients.len() && self.pending < MAX_PENDING {
                let i = self.started;
                self.started += 1;
                self.pending += 1;
                self.attempt(i);
            }
            self.step(Duration::from_millis(5));
        }
        self.report_now("ready")
    }

    /// The storm began at `at`: cut every connection (`close`), or expect those of URL `node`
    /// (all if `None`) to go.
    pub fn cut(&mut self, at: Instant, close: bool, node: Option<usize>) {
        self.cut_at = Some(at);
        for i in 0..self.clients.len() {
            let c = &mut self.clients[i];
            if c.phase == Phase::Failed || !(close || node.is_none_or(|n| n == c.target)) {
                continue;
            }
            c.track.in_storm = true;
            c.track.resubscribed_at = None;
            c.track.recovered_at = None;
            if close && c.conn.is_some() {
                c.conn = None;
                let delay = self.jitter();
                self.schedule(i, at + delay);
            }
        }
    }

    /// Whether every client caught by the storm has recovered.
    pub fn all_recovered(&self) -> bool {
        self.clients.iter().all(|c| !c.track.in_storm || c.track.recovered_at.is_some())
    }

    /// Whether every client has every message of `last` (its topic's last publish).
    pub fn caught_up(&self, last: &BTreeMap<String, Published>) -> bool {
        self.clients.iter().filter(|c| c.phase != Phase::Failed).all(|c| match last.get(&c.topic) {
            Some(p) => c.track.pos.behind(&p.epoch, p.seq) == Some(0),
            None => true,
        })
    }

    /// The report so far, as stage `stage`; with `last`, what each client never received.
    pub fn report_now(&mut self, stage: &str) -> WorkerReport {
        let mut r = self.report.clone();
        r.stage = stage.into();
        r.connected = self.clients.iter().filter(|c| c.phase != Phase::Failed).count() as u64;
        let (mut recovery, mut resubscribe) = (latency_histogram(), latency_histogram());
        if let Some(cut) = self.cut_at {
            let us = |t: Instant| (t.saturating_duration_since(cut).as_micros() as u64).max(1);
            for c in self.clients.iter().filter(|c| c.track.in_storm) {
                r.affected += 1;
                if let Some(t) = c.track.resubscribed_at {
                    r.resubscribed += 1;
                    let _ = resubscribe.record(us(t));
                }
                if let Some(t) = c.track.recovered_at {
                    r.recovered += 1;
                    let _ = recovery.record(us(t));
                }
            }
        }
        r.recovery = Buckets::of(&recovery);
        r.resubscribe = Buckets::of(&resubscribe);
        r.handshake = Buckets::of(&self.handshake);
        r.impossible = self.counters.impossible.clone();
        let t = self.counters.tally;
        (r.deliveries, r.lost, r.duplicated, r.unannounced_epochs) =
            (t.deliveries, t.lost, t.duplicated, t.unannounced_epochs);
        r.open_at_end = self.clients.iter().filter(|c| c.phase == Phase::Live).count() as u64;
        r
    }

    /// The final report: every client's position checked against `last`.
    pub fn final_report(&mut self, last: &BTreeMap<String, Published>) -> WorkerReport {
        let mut r = self.report_now("final");
        for c in self.clients.iter().filter(|c| c.phase != Phase::Failed) {
            if let Some(p) = last.get(&c.topic) {
                match c.track.pos.behind(&p.epoch, p.seq) {
                    Some(n) => r.lost += n,
                    None => r.not_following += 1,
                }
            }
        }
        r
    }

    fn jitter(&mut self) -> Duration {
        let ms = self.settings.jitter.as_micros() as u64;
        Duration::from_micros(if ms == 0 { 0 } else { self.rng.u64(0..ms) })
    }

    fn schedule(&mut self, i: usize, at: Instant) {
        let c = &mut self.clients[i];
        c.phase = Phase::Waiting;
        self.timers.push(Reverse((at, i, c.generation)));
    }

    /// Start a connect for client `i`.
    fn attempt(&mut self, i: usize) {
        let source = if self.settings.sources.is_empty() {
            None
        } else {
            self.next_source += 1;
            Some(self.settings.sources[self.next_source % self.settings.sources.len()])
        };
        let c = &mut self.clients[i];
        if c.track.subscribed_once {
            self.report.attempts += 1;
        }
        c.generation = c.generation.wrapping_add(1);
        c.phase = Phase::Connecting;
        c.since = Instant::now();
        let mut conn = match Conn::connect(&self.settings.connect[c.target], source) {
            Ok(conn) => conn,
            Err(f) => return self.failed_attempt(i, f.into()),
        };
        let token = Token((c.generation as usize) << INDEX_BITS | i);
        if let Err(e) =
            self.poll.registry().register(&mut conn.io.stream, token, Interest::READABLE | Interest::WRITABLE)
        {
            return self.failed_attempt(i, Failure::from_io(&e).into());
        }
        c.conn = Some(conn);
    }

    /// An attempt failed: out of the run if it was the first, else retried with backoff.
    fn failed_attempt(&mut self, i: usize, why: Cause) {
        let c = &mut self.clients[i];
        c.conn = None;
        if !c.track.subscribed_once {
            c.phase = Phase::Failed;
            self.pending -= 1;
            self.report.failed.add(&why);
            return;
        }
        self.report.attempt_failures.add(&why);
        c.failures += 1;
        c.target = (c.target + 1) % self.settings.connect.len();
        let base = Duration::from_millis(100) * (1u32 << c.failures.min(5)).min(20);
        let delay = base.mul_f64(0.5 + self.rng.f64() * 0.5);
        self.schedule(i, Instant::now() + delay);
    }

    /// An open connection went: reconnect after a random delay.
    fn dropped(&mut self, i: usize, why: Cause) {
        self.report.dropped.add(&why);
        let now = Instant::now();
        let c = &mut self.clients[i];
        c.conn = None;
        if self.cut_at.is_some() && !c.track.in_storm {
            // Caught by the storm after all (in cluster mode, say, a node that was not killed).
            c.track.in_storm = true;
            c.track.resubscribed_at = None;
            c.track.recovered_at = None;
        }
        let delay = self.jitter();
        self.schedule(i, now + delay);
    }

    /// A connection went or failed, whatever its phase.
    fn lose(&mut self, i: usize, why: Cause) {
        match self.clients[i].phase {
            Phase::Live => self.dropped(i, why),
            Phase::Connecting | Phase::Subscribing => self.failed_attempt(i, why),
            Phase::Waiting | Phase::Failed => {}
        }
    }

    /// Run the loop once: wait up to `wait` for events, then handle due timers and timeouts.
    pub fn step(&mut self, wait: Duration) {
        let now = Instant::now();
        let wait = match self.timers.peek() {
            Some(Reverse((at, _, _))) => wait.min(at.saturating_duration_since(now)),
            None => wait,
        };
        if let Err(e) = self.poll.poll(&mut self.events, Some(wait))
            && e.kind() != std::io::ErrorKind::Interrupted
        {
            eprintln!("gale-loadgen: storm worker: poll failed: {e}");
            std::process::exit(1);
        }
        let ready: Vec<(usize, bool, bool)> = self
            .events
            .iter()
            .map(|e| (e.token().0, e.is_readable() || e.is_read_closed() || e.is_error(), e.is_writable()))
            .collect();
        for (token, readable, writable) in ready {
            let (i, generation) = (token & ((1 << INDEX_BITS) - 1), (token >> INDEX_BITS) as u32);
            if self.clients[i].generation != generation || self.clients[i].conn.is_none() {
                continue;
            }
            if writable {
                self.on_writable(i);
            }
            if readable && self.clients[i].conn.is_some() {
                self.on_readable(i);
            }
        }
        let now = Instant::now();
        while let Some(&Reverse((at, i, generation))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let c = &self.clients[i];
            if c.generation == generation && c.phase == Phase::Waiting {
                self.attempt(i);
            }
        }
        if now >= self.next_expiry {
            self.next_expiry = now + Duration::from_millis(100);
            let timeout = self.settings.timeout;
            for i in 0..self.clients.len() {
                let c = &self.clients[i];
                if matches!(c.phase, Phase::Connecting | Phase::Subscribing) && now - c.since > timeout {
                    let why = if c.phase == Phase::Subscribing {
                        Cause {
                            label: "subscribe_timeout".into(),
                            words: "no answer to the subscribe".into(),
                        }
                    } else {
                        Failure::Timeout.into()
                    };
                    self.failed_attempt(i, why);
                }
            }
        }
    }

    fn on_writable(&mut self, i: usize) {
        let c = &mut self.clients[i];
        let Some(conn) = c.conn.as_mut() else { return };
        if conn.state == State::Connecting {
            if let Err(f) = conn.on_connected(&self.settings.connect[c.target]) {
                self.lose(i, f.into());
            }
            return;
        }
        self.flush(i);
    }

    fn flush(&mut self, i: usize) {
        let Some(conn) = self.clients[i].conn.as_mut() else { return };
        if conn.io.pending() > 0
            && let Err(e) = conn.io.flush()
        {
            self.lose(i, Failure::from_io(&e).into());
        }
    }

    /// The handshake completed: record it and subscribe.
    fn opened(&mut self, i: usize) {
        let c = &mut self.clients[i];
        let Some(conn) = c.conn.as_mut() else { return };
        if c.track.subscribed_once {
            let _ = self.handshake.record((c.since.elapsed().as_micros() as u64).max(1));
        }
        let topic = serde_json::to_string(&c.topic).unwrap_or_default();
        let mut cmd = format!("{{\"op\":\"subscribe\",\"id\":1,\"topic\":{topic}");
        if c.track.subscribed_once {
            let p = &c.track.pos;
            match &p.epoch {
                Some(e) => cmd.push_str(&format!(",\"since\":{{\"epoch\":\"{e}\",\"seq\":{}}}", p.last)),
                None => cmd.push_str(&format!(",\"since\":{{\"epoch\":null,\"seq\":{}}}", p.last)),
            }
        }
        cmd.push('}');
        conn.io.send(&mut self.rng, crate::payload::Kind::Text, cmd.len(), |b| {
            b.copy_from_slice(cmd.as_bytes())
        });
        c.phase = Phase::Subscribing;
        c.since = Instant::now();
    }

    fn on_readable(&mut self, i: usize) {
        loop {
            let c = &mut self.clients[i];
            let Some(conn) = c.conn.as_mut() else { return };
            let n = match conn.read(&mut self.buf) {
                Ok(0) => {
                    let f = if conn.state == State::Open {
                        Failure::Protocol("server closed the connection".into())
                    } else {
                        Failure::Reset
                    };
                    return self.lose(i, f.into());
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return self.lose(i, Failure::from_io(&e).into()),
            };
            let drains = conn.reads_until_would_block();
            let mut start = 0;
            if conn.state == State::Handshaking {
                match conn.on_handshake_bytes(&self.buf[..n], &self.settings.connect[c.target]) {
                    Ok(Some(offset)) => {
                        start = offset;
                        self.opened(i);
                    }
                    Ok(None) => {
                        if n < self.buf.len() && !drains {
                            return;
                        }
                        continue;
                    }
                    Err(f) => return self.lose(i, f.into()),
                }
            }
            if let Err(why) = self.frames(i, start, n) {
                return self.lose(i, why);
            }
            self.flush(i);
            if n < self.buf.len() && !drains {
                return;
            }
        }
    }

    /// Decode frames in `buf[start..end]` and handle them.
    fn frames(&mut self, i: usize, start: usize, end: usize) -> Result<(), Cause> {
        let Clients { clients, buf, rng, counters, pending, cut_at, .. } = self;
        let c = &mut clients[i];
        let Some(conn) = c.conn.as_mut() else { return Ok(()) };
        let data = &mut buf[start..end];
        let mut at = 0;
        let now = Instant::now();
        loop {
            let (used, event) = conn
                .decoder
                .decode(&mut data[at..])
                .map_err(|e| Cause::from(Failure::Protocol(e.to_string())))?;
            at += used;
            let Some(event) = event else { break };
            let io = &mut conn.io;
            let msg: &[u8] = match event {
                Event::Text(t) => t.as_bytes(),
                Event::UncheckedText(t) => t,
                Event::Ping(p) => {
                    let p = p.to_vec();
                    io.frame(rng, OpCode::Pong, p.len(), |out| out.copy_from_slice(&p));
                    continue;
                }
                Event::Pong(_) => continue,
                Event::Binary(_) | Event::Compressed { .. } => {
                    return Err(Failure::Protocol("the gateway sent a binary message".into()).into());
                }
                Event::Close(frame) => {
                    let code = frame.code.map_or(1005, |c| c.0);
                    return Err(
                        Failure::Protocol(format!("server closed with {code} {}", frame.reason)).into()
                    );
                }
            };
            let before = c.phase;
            on_text(msg, &mut c.track, &mut c.phase, counters, now)?;
            if before == Phase::Subscribing && c.phase == Phase::Live {
                c.failures = 0;
                if cut_at.is_none() && !c.track.subscribed_once {
                    *pending -= 1;
                }
                c.track.subscribed_once = true;
            }
        }
        conn.decoder.release();
        Ok(())
    }
}

/// A message of the gateway: a delivery or a reply.
#[derive(Deserialize)]
struct Incoming<'a> {
    op: Option<&'a str>,
    ok: Option<bool>,
    epoch: Option<&'a str>,
    seq: Option<u64>,
    recovered: Option<bool>,
    reason: Option<String>,
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: u16,
    reason: String,
}

/// Handle one text message for a client.
fn on_text(
    msg: &[u8],
    t: &mut Track,
    phase: &mut Phase,
    n: &mut Counters,
    now: Instant,
) -> Result<(), Cause> {
    let m: Incoming = serde_json::from_slice(msg).map_err(|e| Cause {
        label: "bad_message".into(),
        words: format!(
            "a message of the gateway is not what it should be ({e}): {}",
            String::from_utf8_lossy(msg)
        ),
    })?;
    if let Some(e) = m.error {
        return Err(Cause {
            label: format!("subscribe_{}", e.code),
            words: format!("subscribe refused: {} {}", e.code, e.reason),
        });
    }
    if m.ok == Some(true) {
        if m.op != Some("subscribe") || *phase != Phase::Subscribing {
            return Ok(());
        }
        *phase = Phase::Live;
        let seq = m.seq.unwrap_or(0);
        let placed = t.pos.subscribed(m.epoch, seq, m.recovered, m.reason.as_deref());
        if t.in_storm {
            t.resubscribed_at = Some(now);
        }
        match placed {
            Placed::Fresh => {}
            Placed::Recovering(to) => t.awaiting = Some(to),
            Placed::Impossible(why) => *n.impossible.entry(why).or_default() += 1,
        }
        reached(t, now);
        return Ok(());
    }
    if let (Some(epoch), Some(seq)) = (m.epoch, m.seq) {
        t.pos.delivery(epoch, seq, &mut n.tally);
        reached(t, now);
    }
    Ok(())
}

/// Mark a resubscribed client recovered once it has what it missed.
fn reached(t: &mut Track, now: Instant) {
    if t.awaiting.is_some_and(|to| t.pos.last < to) {
        return;
    }
    t.awaiting = None;
    if t.in_storm && t.resubscribed_at.is_some() && t.recovered_at.is_none() {
        t.recovered_at = Some(now);
    }
}
