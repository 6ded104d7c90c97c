//! `peer-redis-raw`: the least a client must do to make a gateway's round trips to Redis, so
//! that what talking to three primaries instead of one costs a gateway can be set against what it
//! costs a client that does nothing else. It publishes and listens in the same pattern as a
//! gateway, on channels of its own (`bench:{N}`), with bare `PUBLISH`/`SPUBLISH` where a gateway
//! runs its publish script: no scripts, no HTTP, no WebSocket, no topic table.
//!
//! - **Publishing** (one thread): every round trip takes the next `--pipeline` topics
//!   round-robin and sends each a `PUBLISH` (one primary) or `SPUBLISH` (a cluster) of
//!   `--payload` bytes, one pipeline per node that owns some of them. Every pipeline is written
//!   before any answer is read, and the answers are read from the node written last first (as
//!   the gateway's broker does). Round trips are paced to `--rate` publishes a second, as the
//!   gateway's are by the rate its publishers get answered.
//! - **Listening** (one thread): one connection per primary, subscribed (`SUBSCRIBE`, or
//!   `SSUBSCRIBE` where the channel's slot lives) to every topic; one edge-triggered poll over
//!   them, each readable connection read until a read comes back short, messages counted.
//!
//! After `--warmup` seconds it measures `--seconds` and prints one JSON line: publishes and
//! messages per second, and each thread's user and system CPU time (`getrusage`) and voluntary
//! context switches per 1,000 messages.

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use mio::{Events, Interest, Poll, Token};

/// Command line.
#[derive(Parser)]
#[command(
    name = "peer-redis-raw",
    about = "A raw Redis client carrying a gateway's publishes and deliveries"
)]
struct Args {
    /// Redis nodes, host:port, comma separated: one primary, or a cluster's primaries.
    #[arg(long, value_delimiter = ',', required = true)]
    nodes: Vec<String>,
    /// The nodes form a Redis Cluster: channels are sharded (`SPUBLISH`, `SSUBSCRIBE`).
    #[arg(long)]
    cluster: bool,
    /// How many topics (channels), published to round-robin.
    #[arg(long, default_value_t = 1000)]
    topics: usize,
    /// Publishes a second.
    #[arg(long, default_value_t = 25_000, value_parser = clap::value_parser!(u64).range(1..))]
    rate: u64,
    /// Publishes per round trip, split over the nodes that own them.
    #[arg(long, default_value_t = 130, value_parser = clap::value_parser!(u64).range(1..))]
    pipeline: u64,
    /// Bytes of each message.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Seconds before the measurement.
    #[arg(long, default_value_t = 1.0, value_parser = seconds)]
    warmup: f64,
    /// Seconds measured.
    #[arg(long, default_value_t = 5.0, value_parser = seconds)]
    seconds: f64,
}

/// A count of seconds: finite, not negative, at most a day.
fn seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if (0.0..=86_400.0).contains(&s) => Ok(s),
        _ => Err(format!("`{text}` is not a number of seconds from 0 to 86400")),
    }
}

/// The run's phase (the main thread sets it; the others follow): warming up.
const WARMING: u8 = 0;
/// Measuring: work is counted, and CPU time from the moment a thread sees this phase.
const MEASURING: u8 = 1;
/// Over: threads take their CPU time and stop.
const DONE: u8 = 2;

/// A thread's CPU time (µs) and voluntary context switches, from `getrusage(RUSAGE_THREAD)`.
#[derive(Clone, Copy, Default)]
struct Usage {
    user_us: i64,
    system_us: i64,
    sleeps: i64,
}

impl Usage {
    fn now() -> Usage {
        // SAFETY: `getrusage` writes one `rusage` into the zeroed value it is given. With
        // `RUSAGE_THREAD` (Linux) it cannot fail; were it to, the zeros would show.
        let ru = unsafe {
            let mut ru: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
            ru
        };
        let us = |t: libc::timeval| t.tv_sec * 1_000_000 + t.tv_usec;
        Usage { user_us: us(ru.ru_utime), system_us: us(ru.ru_stime), sleeps: ru.ru_nvcsw }
    }

    fn since(self, start: Usage) -> Usage {
        Usage {
            user_us: self.user_us - start.user_us,
            system_us: self.system_us - start.system_us,
            sleeps: self.sleeps - start.sleeps,
        }
    }
}

/// What a thread did while measuring: its work count and its usage.
struct Measured {
    count: u64,
    usage: Usage,
}

/// Follows the run's phase: counts only while measuring, and the usage over that time.
struct Meter {
    phase: Arc<AtomicU8>,
    seen: u8,
    count: u64,
    start: Usage,
    usage: Usage,
}

impl Meter {
    fn new(phase: Arc<AtomicU8>) -> Meter {
        Meter { phase, seen: WARMING, count: 0, start: Usage::default(), usage: Usage::default() }
    }

    /// Note `n` units of work done; false once the run is over.
    fn tick(&mut self, n: u64) -> bool {
        if self.seen == MEASURING {
            self.count += n;
        }
        let phase = self.phase.load(Ordering::Relaxed);
        if phase != self.seen {
            if phase == MEASURING {
                self.start = Usage::now();
            } else if self.seen == MEASURING {
                self.usage = Usage::now().since(self.start);
            }
            self.seen = phase;
        }
        phase != DONE
    }

    fn result(self) -> Measured {
        Measured { count: self.count, usage: self.usage }
    }
}

/// `args` as one command in RESP, ready to write.
fn packed(args: &[&[u8]]) -> Vec<u8> {
    let mut cmd = redis::Cmd::new();
    for a in args {
        cmd.arg(*a);
    }
    cmd.get_packed_command()
}

/// Read from `conn` until `lines` more line ends have come (only answers to commands sent are
/// read this way, so no more than that can come); `-` at a line's start is Redis's error, and
/// stops the run.
fn read_lines(conn: &mut TcpStream, buf: &mut [u8], mut lines: usize) -> io::Result<()> {
    let mut line_start = true;
    while lines > 0 {
        let n = conn.read(buf)?;
        if n == 0 {
            return Err(io::Error::new(ErrorKind::UnexpectedEof, "Redis closed the connection"));
        }
        for &b in &buf[..n] {
            if line_start && b == b'-' {
                return Err(io::Error::other(format!(
                    "Redis answered an error: {}",
                    String::from_utf8_lossy(&buf[..n])
                )));
            }
            line_start = b == b'\n';
            lines = lines.saturating_sub(usize::from(line_start));
        }
    }
    Ok(())
}

/// Per channel, the index in `nodes` of the primary that serves its slot, as the cluster says:
/// each channel's slot from `CLUSTER KEYSLOT`, each node's own slots from its `CLUSTER NODES`.
fn nodes_of(nodes: &[String], channels: &[String]) -> redis::RedisResult<Vec<usize>> {
    let mut by_slot = vec![usize::MAX; 16_384];
    let mut first = None;
    for (n, node) in nodes.iter().enumerate() {
        let mut conn = redis::Client::open(format!("redis://{node}"))?.get_connection()?;
        let text: String = redis::cmd("CLUSTER").arg("NODES").query(&mut conn)?;
        let myself = text.lines().find(|l| l.split(' ').nth(2).is_some_and(|flags| flags.contains("myself")));
        // Fields from the ninth on: the node's slots, `a-b` or `a` (`[…]`: one being migrated).
        for field in myself.into_iter().flat_map(|l| l.split(' ').skip(8)) {
            let (a, b) = field.split_once('-').unwrap_or((field, field));
            if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                for slot in by_slot.iter_mut().take(b + 1).skip(a) {
                    *slot = n;
                }
            }
        }
        first.get_or_insert(conn);
    }
    let Some(mut conn) = first else { return Ok(Vec::new()) };
    let mut pipe = redis::pipe();
    for c in channels {
        pipe.cmd("CLUSTER").arg("KEYSLOT").arg(c);
    }
    let slots: Vec<usize> = pipe.query(&mut conn)?;
    Ok(slots.into_iter().map(|s| by_slot.get(s).copied().unwrap_or(usize::MAX)).collect())
}

fn main() -> io::Result<()> {
    let args = Args::parse();
    let topics = args.topics.max(1);
    // Each topic's channel and the node that serves it.
    let channels: Vec<String> = (0..topics)
        .map(|i| if args.cluster { format!("bench:{{{i}}}") } else { format!("bench:{i}") })
        .collect();
    let node_of: Vec<usize> = if args.cluster {
        let node_of = nodes_of(&args.nodes, &channels).map_err(io::Error::other)?;
        if node_of.contains(&usize::MAX) {
            return Err(io::Error::other("a channel's slot is served by none of --nodes"));
        }
        node_of
    } else {
        vec![0; topics]
    };
    let (publish, subscribe): (&[u8], &[u8]) =
        if args.cluster { (b"SPUBLISH", b"SSUBSCRIBE") } else { (b"PUBLISH", b"SUBSCRIBE") };
    let payload = vec![b'x'; args.payload];
    let publishes: Vec<Vec<u8>> =
        channels.iter().map(|c| packed(&[publish, c.as_bytes(), &payload])).collect();

    // Subscribed first: each confirmation is 6 lines (`*3`, `$N`, the kind, `$N`, the channel,
    // `:count`).
    let mut buf = vec![0u8; 65536];
    let mut subs = Vec::new();
    for (n, node) in args.nodes.iter().enumerate() {
        let mut conn = TcpStream::connect(node)?;
        conn.set_nodelay(true)?;
        let mine: Vec<&String> =
            channels.iter().zip(&node_of).filter(|(_, o)| **o == n).map(|(c, _)| c).collect();
        let mut out = Vec::new();
        for c in &mine {
            out.extend_from_slice(&packed(&[subscribe, c.as_bytes()]));
        }
        conn.write_all(&out)?;
        read_lines(&mut conn, &mut buf, 6 * mine.len())?;
        conn.set_nonblocking(true)?;
        subs.push(mio::net::TcpStream::from_std(conn));
    }
    let mut pubs = Vec::new();
    for node in &args.nodes {
        let conn = TcpStream::connect(node)?;
        conn.set_nodelay(true)?;
        pubs.push(conn);
    }

    let phase = Arc::new(AtomicU8::new(WARMING));

    let publisher = {
        let mut meter = Meter::new(phase.clone());
        let (pipeline, rate) = (args.pipeline as usize, args.rate);
        std::thread::Builder::new().name("publisher".into()).spawn(move || -> io::Result<Measured> {
            let every = Duration::from_secs_f64(pipeline as f64 / rate as f64);
            let mut next = Instant::now();
            let mut topic = 0;
            let mut out: Vec<Vec<u8>> = vec![Vec::new(); pubs.len()];
            let mut expected = vec![0usize; pubs.len()];
            let mut buf = vec![0u8; 65536];
            while meter.tick(0) {
                for _ in 0..pipeline {
                    let node = node_of[topic];
                    out[node].extend_from_slice(&publishes[topic]);
                    expected[node] += 1;
                    topic = (topic + 1) % node_of.len();
                }
                for (node, conn) in pubs.iter_mut().enumerate() {
                    if expected[node] > 0 {
                        conn.write_all(&out[node])?;
                    }
                }
                // Each answer is one line (`:receivers`).
                for (node, conn) in pubs.iter_mut().enumerate().rev() {
                    if expected[node] > 0 {
                        read_lines(conn, &mut buf, expected[node])?;
                        out[node].clear();
                        expected[node] = 0;
                    }
                }
                meter.tick(pipeline as u64);
                next += every;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else {
                    next = now; // behind: do not make up for it in a burst
                }
            }
            Ok(meter.result())
        })?
    };

    let listener = {
        let mut meter = Meter::new(phase.clone());
        std::thread::Builder::new().name("listener".into()).spawn(move || -> io::Result<Measured> {
            let mut poll = Poll::new()?;
            for (n, conn) in subs.iter_mut().enumerate() {
                poll.registry().register(conn, Token(n), Interest::READABLE)?;
            }
            let mut events = Events::with_capacity(64);
            // Line ends carried over: once subscribed, every value is a message of 7 lines
            // (`*3`, `$N`, the kind, `$N`, the channel, `$N`, the payload), and reads cut
            // messages anywhere.
            let mut lines = 0u64;
            loop {
                // Not forever: the end of the run is seen within 50 ms, messages or not.
                match poll.poll(&mut events, Some(Duration::from_millis(50))) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
                for event in &events {
                    let conn = &mut subs[event.token().0];
                    loop {
                        match conn.read(&mut buf) {
                            Ok(0) => {
                                return Err(io::Error::new(
                                    ErrorKind::UnexpectedEof,
                                    "Redis closed a subscription",
                                ));
                            }
                            Ok(n) => {
                                lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
                                if n < buf.len() {
                                    break;
                                }
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(e) if e.kind() == ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                    }
                }
                let messages = lines / 7;
                lines %= 7;
                if !meter.tick(messages) {
                    return Ok(meter.result());
                }
            }
        })?
    };

    std::thread::sleep(Duration::from_secs_f64(args.warmup));
    phase.store(MEASURING, Ordering::Relaxed);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.seconds));
    phase.store(DONE, Ordering::Relaxed);
    let measured = started.elapsed().as_secs_f64();
    let join = |h: std::thread::JoinHandle<io::Result<Measured>>| {
        h.join().unwrap_or_else(|_| Err(io::Error::other("a thread panicked")))
    };
    let published = join(publisher)?;
    let received = join(listener)?;
    let per_1k = |u: &Usage, count: u64| {
        let k = count.max(1) as f64 / 1000.0;
        let field = |v: i64| (v as f64 / 1000.0 / k * 1000.0).round() / 1000.0;
        (field(u.user_us), field(u.system_us), (u.sleeps as f64 / k * 10.0).round() / 10.0)
    };
    let (pu, ps, pz) = per_1k(&published.usage, published.count);
    let (lu, ls, lz) = per_1k(&received.usage, received.count);
    println!(
        "{{\"nodes\": {}, \"cluster\": {}, \"topics\": {}, \"pipeline\": {}, \"payload\": {}, \
         \"publishes_per_sec\": {:.0}, \"messages_per_sec\": {:.0}, \
         \"publisher_user_ms_per_1k\": {pu}, \"publisher_system_ms_per_1k\": {ps}, \"publisher_sleeps_per_1k\": {pz}, \
         \"listener_user_ms_per_1k\": {lu}, \"listener_system_ms_per_1k\": {ls}, \"listener_sleeps_per_1k\": {lz}}}",
        args.nodes.len(),
        args.cluster,
        topics,
        args.pipeline,
        args.payload,
        published.count as f64 / measured,
        received.count as f64 / measured,
    );
    Ok(())
}
