//! The storm's publisher: HTTP POSTs to `/api/publish/{topic}` at a fixed rate, round-robin
//! over the topics, on one keep-alive connection, from before the cut to the end. It keeps
//! going through the storm (a restarted server refuses it for a while: those publishes fail,
//! counted by cause) and remembers each topic's last published position from the answers,
//! which is what every subscriber must have reached at the end.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::conn::Failure;

/// Where the publisher sends, and how often.
#[derive(Clone, Debug)]
pub struct PublishPlan {
    /// `host:port` to connect to.
    pub authority: String,
    /// `Authorization` header line, or empty.
    pub auth: String,
    /// Topics, published to in turn.
    pub topics: usize,
    /// Their names' prefix.
    pub prefix: String,
    /// Publishes per second.
    pub rate: f64,
    /// Payload bytes.
    pub size: usize,
}

/// A topic's last published position.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Published {
    /// Epoch of the last publish.
    pub epoch: String,
    /// Its `seq`.
    pub seq: u64,
}

/// What the publisher did.
#[derive(Clone, Debug, Default)]
pub struct PublishOutcome {
    /// Publishes answered with 2xx.
    pub published: u64,
    /// Publishes that failed, by cause (`refused`, `http_503`, ...).
    pub errors: BTreeMap<String, u64>,
    /// One example per cause.
    pub examples: BTreeMap<String, String>,
    /// Last position per topic name.
    pub last: BTreeMap<String, Published>,
}

/// The name of topic `i`.
pub fn topic_name(prefix: &str, i: usize) -> String {
    format!("{prefix}{i}")
}

/// Why a publish failed: a label to count by, and words.
struct PublishError {
    label: String,
    words: String,
}

#[derive(Deserialize)]
struct Answer {
    epoch: Option<String>,
    seq: Option<u64>,
}

/// Publish until `stop` is set.
pub fn publish(plan: &PublishPlan, stop: &Arc<AtomicBool>) -> PublishOutcome {
    let mut out = PublishOutcome::default();
    let interval = Duration::from_secs_f64(1.0 / plan.rate);
    let payload = ".".repeat(plan.size);
    let mut conn: Option<BufReader<TcpStream>> = None;
    let mut due = Instant::now();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if due > now {
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
            continue;
        }
        // Closed loop: a slow answer delays the next publish; the rate is caught up after.
        due = (due + interval).max(now - interval * 10);
        let topic = topic_name(&plan.prefix, n % plan.topics);
        n += 1;
        match publish_one(plan, &mut conn, &topic, &payload) {
            Ok(p) => {
                out.published += 1;
                out.last.insert(topic, p);
            }
            Err(e) => {
                *out.errors.entry(e.label.clone()).or_default() += 1;
                out.examples.entry(e.label).or_insert(e.words);
                conn = None;
                // A refused connection: the server is down; try again shortly.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    out
}

fn publish_one(
    plan: &PublishPlan,
    conn: &mut Option<BufReader<TcpStream>>,
    topic: &str,
    payload: &str,
) -> Result<Published, PublishError> {
    let io = |e: std::io::Error| {
        let f = if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut {
            Failure::Timeout
        } else {
            Failure::from_io(&e)
        };
        PublishError { label: f.label(), words: f.to_string() }
    };
    if conn.is_none() {
        let stream = TcpStream::connect(plan.authority.as_str()).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).map_err(io)?;
        *conn = Some(BufReader::new(stream));
    }
    let reader = conn.as_mut().expect("connected above");
    let request = format!(
        "POST /api/publish/{topic} HTTP/1.1\r\nHost: {}\r\n{}Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{payload}",
        plan.authority,
        plan.auth,
        payload.len()
    );
    reader.get_mut().write_all(request.as_bytes()).map_err(io)?;
    let mut status_line = String::new();
    if reader.read_line(&mut status_line).map_err(io)? == 0 {
        return Err(PublishError { label: "reset".into(), words: "the server closed the connection".into() });
    }
    let status: u16 = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).map_err(io)? == 0 {
            return Err(PublishError {
                label: "reset".into(),
                words: "the server closed the connection".into(),
            });
        }
        if h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).map_err(io)?;
    if !(200..300).contains(&status) {
        let why = String::from_utf8_lossy(&body);
        return Err(PublishError {
            label: format!("http_{status}"),
            words: format!("HTTP {status}: {}", why.trim()),
        });
    }
    match serde_json::from_slice::<Answer>(&body) {
        Ok(Answer { epoch: Some(epoch), seq: Some(seq) }) => Ok(Published { epoch, seq }),
        _ => Err(PublishError {
            label: "bad_answer".into(),
            words: format!(
                "the publish answer has no epoch and seq: {}",
                String::from_utf8_lossy(&body).trim()
            ),
        }),
    }
}
