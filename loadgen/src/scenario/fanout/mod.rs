//! `gale-loadgen fanout`: M subscribers, publishers at a fixed rate over WebSocket or HTTP,
//! delivery rate, end-to-end latency, and lost / duplicated / out-of-order deliveries.

mod driver;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

pub use self::driver::MIN_SIZE;
use self::driver::{FanoutStats, Gale, Plain, Protocol, Publisher, Subscribers, make_payload, ns_at};
use clap::ValueEnum;

use crate::cli::{FanoutArgs, ProtocolArg};
use crate::common::{run_config, unreachable, write_json};
use crate::report::{FanoutReport, Latency, LoadgenCost, ServerCost, WireReport, print_fanout};
use crate::run::{Run, Samples};

/// The protocol adapter for `--protocol`.
fn protocol(p: ProtocolArg) -> &'static dyn Protocol {
    match p {
        ProtocolArg::Plain => &Plain,
        ProtocolArg::Gale => &Gale,
    }
}

/// What failed in a fan-out run, in one line, if anything: nothing delivered, deliveries lost,
/// duplicated or out of order, publishes refused. A run cut short by Ctrl-C is not judged (its
/// last publishes had no time to arrive).
pub fn failure(r: &FanoutReport) -> Option<String> {
    if r.interrupted {
        return None;
    }
    if r.delivered == 0 {
        return Some(format!(
            "nothing was delivered to the {} subscribers of {}: {} published, {} publishes failed",
            r.subscribers, r.url, r.published, r.publish_errors
        ));
    }
    let problems: Vec<String> = [
        (r.lost, format!("{} of {} deliveries lost", r.lost, r.expected)),
        (r.duplicated, format!("{} duplicated", r.duplicated)),
        (r.out_of_order, format!("{} out of order", r.out_of_order)),
        (r.publish_errors, format!("{} publishes failed", r.publish_errors)),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(_, what)| what)
    .collect();
    (!problems.is_empty()).then(|| problems.join(", "))
}

/// Run the fan-out scenario.
pub fn run(args: &FanoutArgs, print: bool) -> Result<FanoutReport, String> {
    let c = &args.common;
    if args.size < MIN_SIZE {
        return Err(format!("--size must be at least {MIN_SIZE} bytes (sequence number and timestamp)"));
    }
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        return Err(format!("--rate must be a positive number of publishes per second, not {}", args.rate));
    }
    if args.publishers == 0 {
        return Err("--publishers must be at least 1".into());
    }
    let proto = protocol(args.protocol);
    let drain = Duration::from_secs_f64(args.drain.max(0.0));
    let (sub_cfg, _) = run_config(c, true, 64 << 20)?;
    let mut subs = Run::start(&sub_cfg, |_| Subscribers::new(proto, args.topic.clone(), drain))
        .map_err(|e| e.to_string())?;
    let connect = subs.wait_connected()?;
    if connect.connected == 0 {
        let _ = subs.finish();
        return Err(unreachable(
            &c.url_label(),
            connect.attempted,
            &connect.failures,
            &connect.failure_examples,
        ));
    }
    let publish_url = args.publish_url.clone().unwrap_or_else(|| c.url[0].clone());
    let from = Instant::now() + Duration::from_secs_f64(args.warmup.max(0.0));
    let until = from + Duration::from_secs_f64(c.duration);
    let mut samples = Samples::default();
    let pids = &c.server_pid;
    let (published, publish_errors) = if publish_url.starts_with("http://")
        || publish_url.starts_with("https://")
    {
        let tls = (publish_url.starts_with("https://"))
            .then(|| crate::tls::client_config(c.insecure, c.ca_file.as_deref()))
            .transpose()?;
        subs.go(from, until + drain);
        let (url, key, topic, size, rate) =
            (publish_url.clone(), args.api_key.clone(), args.topic.clone(), args.size, args.rate);
        let publisher = std::thread::spawn(move || match tls {
            Some(tls) => https_publisher(&url, tls, key.as_deref(), proto, &topic, size, rate, from, until),
            None => http_publisher(&url, key.as_deref(), proto, &topic, size, rate, from, until),
        });
        subs.wait(from, until + drain, "fan-out", || samples.start(pids));
        samples.end(pids);
        publisher.join().map_err(|_| "the HTTP(S) publisher panicked")??
    } else {
        let mut pub_common = c.clone();
        pub_common.url = vec![publish_url.clone()];
        pub_common.connections = args.publishers;
        pub_common.threads = 1;
        pub_common.source_ips = 1;
        let (pub_cfg, _) = run_config(&pub_common, true, 64 << 20)?;
        let rate = args.rate / args.publishers as f64;
        let mut pubs = Run::start(&pub_cfg, |_| Publisher::new(proto, args.topic.clone(), args.size, rate))
            .map_err(|e| e.to_string())?;
        let pconnect = pubs.wait_connected()?;
        if pconnect.connected == 0 {
            subs.stop();
            let _ = subs.finish();
            let _ = pubs.finish();
            return Err(unreachable(
                &publish_url,
                pconnect.attempted,
                &pconnect.failures,
                &pconnect.failure_examples,
            ));
        }
        subs.go(from, until + drain);
        // Publishers start at once (the warm-up) but count only what is due inside the window.
        pubs.go(from, until);
        subs.wait(from, until + drain, "fan-out", || samples.start(pids));
        samples.end(pids);
        let results = pubs.finish()?;
        (results.iter().map(|r| r.driver.published).sum(), 0)
    };
    let interrupted = subs.interrupted();
    let results = subs.finish()?;
    let mut stats: Option<FanoutStats> = None;
    let mut open = 0u64;
    for r in &results {
        match &mut stats {
            Some(s) => s.merge(&r.driver.stats),
            None => stats = Some(r.driver.stats.clone()),
        }
        open += r.open as u64;
    }
    let stats = stats.ok_or("no results")?;
    let window = until.saturating_duration_since(from).as_secs_f64();
    let expected = published * connect.connected;
    let server = pids.first().copied().and_then(|pid| {
        let cpu = samples.server_cpu()?;
        Some(ServerCost {
            pid,
            cpu_s: cpu,
            cpu_ms_per_1k_msgs: (stats.delivered > 0).then(|| cpu * 1e6 / stats.delivered as f64),
            rss_bytes: samples.server_until.map_or(0, |s| s.rss),
        })
    });
    let threads = results.len();
    let self_cpu = samples.self_cpu();
    let report = FanoutReport {
        scenario: "fanout".into(),
        url: c.url_label(),
        publish_url,
        protocol: args.protocol.to_possible_value().map_or_else(String::new, |v| v.get_name().to_string()),
        topic: args.topic.clone(),
        subscribers: connect.connected,
        failed: connect.failed(),
        open_at_end: open,
        rate: args.rate,
        size: args.size,
        duration_s: window,
        published,
        publish_errors,
        expected,
        delivered: stats.delivered,
        deliveries_per_sec: stats.delivered as f64 / window.max(1e-9),
        lost: expected.saturating_sub(stats.delivered),
        duplicated: stats.duplicated,
        out_of_order: stats.out_of_order,
        latency_us: Latency::of(&stats.latency_us),
        compression: c.deflate.then(|| WireReport::of(results.iter().map(|r| r.wire))),
        server,
        loadgen: LoadgenCost {
            threads,
            cpu_s: self_cpu,
            utilisation: self_cpu / (window + drain.as_secs_f64()) / threads as f64,
        },
        interrupted,
    };
    if print {
        print_fanout(&report);
    }
    write_json(&c.json, &report)?;
    Ok(report)
}

/// Publish over HTTP POST at `rate` on one keep-alive connection, open loop: requests go out
/// on schedule, pipelined, whatever the server's response time (a publisher that waited for
/// each response would slow down exactly when the server is busiest, and hide it). A reader
/// thread matches the in-order responses to the requests. Returns (published in the window
/// with a 2xx answer, failed requests).
#[allow(clippy::too_many_arguments)]
fn http_publisher(
    url: &str,
    api_key: Option<&str>,
    proto: &'static dyn Protocol,
    topic: &str,
    size: usize,
    rate: f64,
    from: Instant,
    until: Instant,
) -> Result<(u64, u64), String> {
    let mut requests = PublishRequests::new(url, "http://", api_key, proto, topic, size)?;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let (mut published, mut errors) = (0u64, 0u64);
    let mut due = Instant::now();
    // One connection at a time; a broken one is replaced and its unanswered requests count
    // as failed.
    while due < until {
        let stream = match TcpStream::connect(requests.authority.as_str()) {
            Ok(s) => s,
            Err(_) => {
                errors += 1;
                due += interval;
                std::thread::sleep(interval.min(Duration::from_millis(100)));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let reader_stream = stream.try_clone().map_err(|e| e.to_string())?;
        let (tx, rx) = std::sync::mpsc::channel::<bool>();
        let reader = std::thread::spawn(move || read_responses(reader_stream, rx));
        let mut writer = stream;
        let mut broken = false;
        while due < until {
            let request = requests.at(due)?;
            let sent = writer.write_all(&request);
            due += interval;
            if sent.is_err() {
                errors += 1;
                broken = true;
                break;
            }
            let _ = tx.send(due - interval >= from);
        }
        drop(tx);
        // No more requests: the server answers what it has, then sees our EOF.
        let _ = writer.shutdown(std::net::Shutdown::Write);
        let (ok, failed) = reader.join().map_err(|_| "the HTTP response reader panicked")?;
        published += ok;
        errors += failed;
        if !broken {
            break;
        }
    }
    Ok((published, errors))
}

/// Read the responses to the requests announced on `requests` (true: inside the window), in
/// order; returns (2xx answers inside the window, requests without a 2xx answer).
fn read_responses(stream: TcpStream, requests: std::sync::mpsc::Receiver<bool>) -> (u64, u64) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream);
    let (mut ok, mut failed) = (0u64, 0u64);
    for in_window in requests.iter() {
        match read_response(&mut reader) {
            Ok(status) if (200..300).contains(&status) => ok += u64::from(in_window),
            Ok(_) => failed += 1,
            Err(_) => {
                // The connection is gone: this request and every later one went unanswered.
                failed += 1 + requests.iter().count() as u64;
                break;
            }
        }
    }
    (ok, failed)
}

/// Publish over HTTPS POST at `rate` on one keep-alive TLS connection. Unlike
/// [`http_publisher`] it waits for each answer before the next request (closed loop): a TLS
/// stream cannot be read and written from two threads. Late requests keep their scheduled
/// time in the payload, so a slow server still shows in the latency. Returns (published in
/// the window with a 2xx answer, failed requests).
#[allow(clippy::too_many_arguments)]
fn https_publisher(
    url: &str,
    tls: std::sync::Arc<rustls::ClientConfig>,
    api_key: Option<&str>,
    proto: &'static dyn Protocol,
    topic: &str,
    size: usize,
    rate: f64,
    from: Instant,
    until: Instant,
) -> Result<(u64, u64), String> {
    let mut requests = PublishRequests::new(url, "https://", api_key, proto, topic, size)?;
    let (host, port) = crate::target::split_port(&requests.authority);
    let name = crate::tls::server_name(host)?;
    let address = format!("{host}:{}", port.unwrap_or(443));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let (mut published, mut errors) = (0u64, 0u64);
    let mut due = Instant::now();
    let mut conn: Option<BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>> = None;
    while due < until {
        let request = requests.at(due)?;
        let in_window = due >= from;
        due += interval;
        let attempt = (|| -> std::io::Result<u16> {
            if conn.is_none() {
                let tcp = TcpStream::connect(address.as_str())?;
                tcp.set_nodelay(true)?;
                tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
                let c = rustls::ClientConnection::new(tls.clone(), name.clone())
                    .map_err(std::io::Error::other)?;
                conn = Some(BufReader::new(rustls::StreamOwned::new(c, tcp)));
            }
            let stream = conn.as_mut().expect("connected above");
            stream.get_mut().write_all(&request)?;
            read_response(stream)
        })();
        match attempt {
            Ok(status) if (200..300).contains(&status) => published += u64::from(in_window),
            Ok(_) | Err(_) => {
                // The server closes after an error answer: start afresh.
                errors += 1;
                conn = None;
            }
        }
    }
    Ok((published, errors))
}

/// The publish requests of an HTTP(S) publisher, one per scheduled time.
struct PublishRequests<'a> {
    /// `host[:port]` of the publish URL.
    authority: String,
    /// Request path (`{topic}` replaced; the protocol's default when the URL has none).
    path: String,
    /// The `Authorization` header line, if any.
    auth: String,
    proto: &'static dyn Protocol,
    topic: &'a str,
    size: usize,
    seq: u64,
}

impl<'a> PublishRequests<'a> {
    fn new(
        url: &str,
        scheme: &str,
        api_key: Option<&str>,
        proto: &'static dyn Protocol,
        topic: &'a str,
        size: usize,
    ) -> Result<Self, String> {
        let rest = url.strip_prefix(scheme).ok_or_else(|| format!("publish URL must start with {scheme}"))?;
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() || path == "/" { proto.default_http_path() } else { path };
        Ok(PublishRequests {
            authority: authority.to_string(),
            path: path.replace("{topic}", topic),
            auth: api_key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default(),
            proto,
            topic,
            size,
            seq: 0,
        })
    }

    /// Wait until `due`, then the next request: its payload stamped with `due`.
    fn at(&mut self, due: Instant) -> Result<Vec<u8>, String> {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let payload = make_payload(self.seq, ns_at(due), self.size);
        self.seq += 1;
        let Some((extra, body)) = self.proto.publish_http(self.topic, &payload) else {
            return Err("this protocol has no HTTP publish API".into());
        };
        let mut request = format!(
            "POST {}{extra} HTTP/1.1\r\nHost: {}\r\n{}Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            self.path,
            self.authority,
            self.auth,
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        Ok(request)
    }
}

/// One response's status; its body is read and dropped.
fn read_response(reader: &mut impl BufRead) -> std::io::Result<u16> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
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
    let mut skip = vec![0u8; length];
    reader.read_exact(&mut skip)?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_fails_on_any_delivery_problem() {
        let good = FanoutReport {
            url: "ws://s/sub".into(),
            subscribers: 5,
            published: 100,
            expected: 500,
            delivered: 500,
            ..FanoutReport::default()
        };
        assert_eq!(failure(&good), None);
        let lossy = FanoutReport { delivered: 490, lost: 10, duplicated: 2, ..good.clone() };
        assert_eq!(failure(&lossy).as_deref(), Some("10 of 500 deliveries lost, 2 duplicated"));
        let refused =
            FanoutReport { published: 0, expected: 0, delivered: 0, publish_errors: 25, ..good.clone() };
        assert_eq!(
            failure(&refused).as_deref(),
            Some(
                "nothing was delivered to the 5 subscribers of ws://s/sub: 0 published, 25 publishes failed"
            )
        );
        assert_eq!(failure(&FanoutReport { interrupted: true, ..lossy }), None);
    }
}
