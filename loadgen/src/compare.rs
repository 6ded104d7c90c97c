//! `gale-loadgen compare`: one scenario against several servers, interleaved over rounds
//! (A B C A B C …) so that machine noise falls on all of them alike, summarised as medians and
//! ratios against the first server, ranked by messages/s and by server CPU per message.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::cli::{Common, CompareArgs, ConnectArgs, EchoArgs, FanoutArgs, ProtocolArg};
use crate::report::{ConnectReport, EchoReport, FanoutReport, group, human_bytes};
use crate::search::SearchReport;
use crate::servers::{RunningServer, ServerSpec};

/// One scenario setting of a comparison.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct Case {
    /// Connections.
    pub connections: usize,
    /// Message size, bytes (echo).
    pub size: usize,
    /// Pipeline depth (echo).
    pub pipeline: usize,
    /// Publishes per second (fanout).
    pub rate: usize,
}

impl Case {
    /// A one-line title.
    pub fn title(&self, scenario: &str) -> String {
        match scenario {
            "connect" => format!("connect {} connections", self.connections),
            "fanout" => format!(
                "fanout to {} subscribers, {} B, {} publishes/s",
                self.connections, self.size, self.rate
            ),
            _ => format!("echo {} conn, {} B, pipeline {}", self.connections, self.size, self.pipeline),
        }
    }
}

/// The medians of one server in one case.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Server name.
    pub server: String,
    /// Rounds that ran without error: the medians are of these.
    pub rounds: usize,
    /// Median messages per second (echo) or connections per second (connect); with
    /// `--p99-target`, at the sustainable rate.
    pub rate: f64,
    /// `rate` / the first server's.
    pub rate_ratio: f64,
    /// With `--p99-target`: the median over the rounds of the highest rate whose p99 stayed
    /// under the target (msg/s for echo, publishes/s for fanout).
    pub sustainable_rate: Option<f64>,
    /// `sustainable_rate` / the first server's.
    pub sustainable_ratio: Option<f64>,
    /// Median latency percentiles, microseconds (echo: round trip; connect: handshake;
    /// fanout: publish to delivery).
    pub latency_us: LatencyMedians,
    /// Median server CPU milliseconds per 1,000 messages.
    pub cpu_ms_per_1k: Option<f64>,
    /// `cpu_ms_per_1k` / the first server's.
    pub cpu_ratio: Option<f64>,
    /// Median server RSS (echo: at the end; connect: bytes per connection).
    pub memory: Option<f64>,
    /// Median load-generator CPU utilisation.
    pub loadgen_utilisation: f64,
    /// Median bytes on the wire per payload byte the server sent (`--deflate`).
    pub wire_ratio: Option<f64>,
    /// Errors seen in any round (wrong echoes, failed connections, start failures).
    pub errors: Vec<String>,
}

/// Latency percentiles, each the median over the rounds, microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct LatencyMedians {
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

impl LatencyMedians {
    /// Names of the percentiles, in the order of [`values`](LatencyMedians::values).
    pub const NAMES: [&str; 5] = ["p50", "p90", "p99", "p99.9", "max"];

    /// The percentiles from p50 to max.
    pub fn values(&self) -> [u64; 5] {
        [self.p50, self.p90, self.p99, self.p999, self.max]
    }
}

/// A server of a comparison.
#[derive(Clone, Debug, Serialize)]
pub struct ServerEntry {
    /// Short name, as in the tables.
    pub name: String,
    /// Its command line, `{port}` where the port goes.
    pub command: String,
}

/// One case of a comparison and every server's medians in it.
#[derive(Clone, Debug, Serialize)]
pub struct CaseSummaries {
    /// The case: its fields sit beside `summaries` in the JSON.
    #[serde(flatten)]
    pub case: Case,
    /// One summary per server, in server order.
    pub summaries: Vec<Summary>,
}

/// Everything a comparison produced.
#[derive(Clone, Debug, Serialize)]
pub struct CompareReport {
    /// "echo", "connect" or "fanout".
    pub scenario: String,
    /// Rounds per case.
    pub rounds: usize,
    /// Seconds per run.
    pub duration_s: f64,
    /// With `--p99-target`: every run is a rate search under this p99, milliseconds.
    pub p99_target_ms: Option<f64>,
    /// The servers, the first being the reference for ratios.
    pub servers: Vec<ServerEntry>,
    /// Per case: every server's summary.
    pub cases: Vec<CaseSummaries>,
    /// Every run's raw report.
    pub runs: Vec<RunRecord>,
}

/// One run: a server, a case, a round.
#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    /// Server name.
    pub server: String,
    /// The case.
    pub case: Case,
    /// Round number from 0.
    pub round: usize,
    /// Echo report, if the scenario was echo and it ran.
    pub echo: Option<EchoReport>,
    /// Connect report, if the scenario was connect and it ran.
    pub connect: Option<ConnectReport>,
    /// Fan-out report, if the scenario was fanout and it ran.
    pub fanout: Option<FanoutReport>,
    /// Rate-search report, with `--p99-target`.
    pub search: Option<SearchReport>,
    /// Why the run failed, if it did.
    pub error: Option<String>,
}

/// Run the comparison.
pub fn run(args: &CompareArgs) -> Result<CompareReport, String> {
    let specs = args.servers.iter().map(|s| ServerSpec::parse(s)).collect::<Result<Vec<_>, _>>()?;
    if specs.is_empty() {
        return Err("give at least one --server NAME=COMMAND".into());
    }
    if args.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    if !matches!(args.scenario.as_str(), "echo" | "connect" | "fanout") {
        return Err(format!("--scenario {}: expected echo, connect or fanout", args.scenario));
    }
    let fanout = args.scenario == "fanout";
    if fanout && args.size.iter().any(|&s| s < crate::scenario::fanout::MIN_SIZE) {
        return Err(format!(
            "fanout payloads carry a sequence number and a timestamp: -s must be at least {}",
            crate::scenario::fanout::MIN_SIZE
        ));
    }
    for spec in &specs {
        server_protocol(args, &spec.name)?;
    }
    let limits = crate::search::Limits::of(&args.search, crate::search::ECHO_START_RATE)?;
    if limits.is_some() && args.scenario == "connect" {
        return Err("--p99-target searches the rate of echo or fanout, not connect".into());
    }
    let (pipelines, rates) =
        if fanout { (vec![1], args.rate.clone()) } else { (args.pipeline.clone(), vec![0]) };
    let mut cases = Vec::new();
    for &connections in &args.connections {
        for &size in &args.size {
            for &pipeline in &pipelines {
                for &rate in &rates {
                    cases.push(Case { connections, size, pipeline, rate });
                }
            }
        }
    }
    let mut runs = Vec::new();
    let total = cases.len() * args.rounds * specs.len();
    let mut done = 0;
    let interrupted = crate::run::interrupt_flag().map_err(|e| e.to_string())?;
    'all: for case in &cases {
        for round in 0..args.rounds {
            for spec in &specs {
                if interrupted.load(std::sync::atomic::Ordering::Relaxed) {
                    eprintln!("interrupted: summarising the runs done so far");
                    break 'all;
                }
                done += 1;
                eprintln!(
                    "[{done}/{total}] {} — {} (round {})",
                    spec.name,
                    case.title(&args.scenario),
                    round + 1
                );
                runs.push(one_run(args, spec, *case, round));
            }
        }
    }
    let summaries = cases
        .iter()
        .map(|c| CaseSummaries { case: *c, summaries: summarise(&args.scenario, &specs, c, &runs) })
        .collect();
    Ok(CompareReport {
        scenario: args.scenario.clone(),
        rounds: args.rounds,
        duration_s: if limits.is_some() { args.search.step_duration } else { args.duration },
        p99_target_ms: limits.map(|l| l.p99_target_ms),
        servers: specs
            .iter()
            .map(|s| ServerEntry { name: s.name.clone(), command: s.command.clone() })
            .collect(),
        cases: summaries,
        runs,
    })
}

fn one_run(args: &CompareArgs, spec: &ServerSpec, case: Case, round: usize) -> RunRecord {
    let mut record = RunRecord {
        server: spec.name.clone(),
        case,
        round,
        echo: None,
        connect: None,
        fanout: None,
        search: None,
        error: None,
    };
    let server = match RunningServer::start(spec, &args.path) {
        Ok(s) => s,
        Err(e) => {
            record.error = Some(e);
            return record;
        }
    };
    let common = Common {
        url: vec![server.url.clone()],
        connections: case.connections,
        duration: args.duration,
        json: None,
        threads: args.threads,
        protocols: Vec::new(),
        headers: Vec::new(),
        server_pid: vec![server.pid()],
        timeout: 10.0,
        source_ips: 1,
        deflate: args.deflate,
        insecure: args.insecure,
        ca_file: None,
    };
    if args.scenario == "fanout" {
        let protocol = server_protocol(args, &spec.name).unwrap_or(ProtocolArg::Plain);
        // ws://host:port, whatever path the server printed.
        let base = server.url.splitn(4, '/').take(3).collect::<Vec<_>>().join("/");
        // The gateway's default configuration lets anonymous clients subscribe to chat:*.
        let (sub, publish, topic) = match protocol {
            ProtocolArg::Plain => (format!("{base}/sub"), format!("{base}/pub"), "bench"),
            ProtocolArg::Gale => {
                let http = base.replacen("wss://", "https://", 1).replacen("ws://", "http://", 1);
                (format!("{base}/ws"), http, "chat:bench")
            }
        };
        let a = FanoutArgs {
            common: Common { url: vec![sub], ..common },
            publish_url: Some(publish),
            protocol,
            topic: topic.into(),
            rate: case.rate as f64,
            size: case.size,
            publishers: 1,
            api_key: args.api_key.clone(),
            warmup: args.warmup,
            drain: 1.0,
            search: args.search.clone(),
        };
        if a.search.p99_target.is_some() {
            searched(&mut record, crate::search::fanout(&a, false));
        } else {
            match crate::scenario::fanout::run(&a, false) {
                Ok(r) => {
                    record.error = crate::scenario::fanout::failure(&r);
                    record.fanout = Some(r);
                }
                Err(e) => record.error = Some(e),
            }
        }
    } else if args.scenario == "connect" {
        let a =
            ConnectArgs { common, hold: Some(args.duration), rate: None, ping: None, procs: 1, worker: None };
        match crate::scenario::connect::run(&a, false) {
            Ok(r) => record.connect = Some(r),
            Err(e) => record.error = Some(e),
        }
    } else {
        let a = EchoArgs {
            common,
            size: case.size,
            pipeline: case.pipeline,
            warmup: args.warmup,
            binary: args.binary,
            payload: args.payload,
            mask: args.mask,
            rate: None,
            search: args.search.clone(),
        };
        if a.search.p99_target.is_some() {
            searched(&mut record, crate::search::echo(&a, false));
        } else {
            match crate::scenario::echo::run(&a, false) {
                Ok(r) => {
                    record.error = crate::scenario::echo::failure(&r);
                    record.echo = Some(r);
                }
                Err(e) => record.error = Some(e),
            }
        }
    }
    drop(server);
    // Let sockets in TIME_WAIT and the kernel settle between runs.
    std::thread::sleep(Duration::from_millis(300));
    record
}

/// Record a rate search's report, or why it could not run or found no passing rate.
fn searched(record: &mut RunRecord, r: Result<Option<SearchReport>, String>) {
    match r {
        Ok(Some(r)) => {
            record.error = r.failure();
            if let Some(rate) = r.outcome.sustainable_rate {
                eprintln!("  sustainable: {} {} after {} steps", group(rate), r.unit, r.outcome.steps.len());
            }
            record.search = Some(r);
        }
        Ok(None) => record.error = Some("no --p99-target".into()),
        Err(e) => record.error = Some(e),
    }
}

/// The runs that failed, as one line naming each server that had any and why, or `None`
/// when every run went through.
pub fn failures(r: &CompareReport) -> Option<String> {
    let mut lines = Vec::new();
    for server in &r.servers {
        let mine: Vec<&RunRecord> = r.runs.iter().filter(|x| x.server == server.name).collect();
        let errors: Vec<&str> = mine.iter().filter_map(|x| x.error.as_deref()).collect();
        let failed = errors.len();
        let errors = distinct(errors);
        let Some(first) = errors.first() else { continue };
        let others = match errors.len() - 1 {
            0 => String::new(),
            n => format!(" (and {n} other errors: see the tables)"),
        };
        lines.push(format!("{}: {failed} of {} runs failed: {first}{others}", server.name, mine.len()));
    }
    (!lines.is_empty()).then(|| lines.join("; "))
}

/// `items` without repeats, in their first order.
fn distinct<T: PartialEq>(items: Vec<T>) -> Vec<T> {
    let mut out = Vec::new();
    for item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// The fan-out protocol `--server-protocol` gives server `name` (plain by default).
fn server_protocol(args: &CompareArgs, name: &str) -> Result<ProtocolArg, String> {
    for entry in &args.server_protocols {
        let (n, p) = entry
            .split_once('=')
            .ok_or_else(|| format!("--server-protocol {entry:?}: expected NAME=plain or NAME=gale"))?;
        if n == name {
            return match p {
                "plain" => Ok(ProtocolArg::Plain),
                "gale" => Ok(ProtocolArg::Gale),
                other => Err(format!("--server-protocol {n}={other}: expected plain or gale")),
            };
        }
    }
    Ok(ProtocolArg::Plain)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// What a summary takes from one run of a throughput scenario (echo or fanout).
struct Figures<'a> {
    /// Messages (echo) or deliveries (fanout) per second.
    rate: f64,
    /// With `--p99-target`: the highest rate that passed.
    sustainable: Option<f64>,
    latency: &'a crate::report::Latency,
    /// Server CPU ms per 1,000 messages or deliveries.
    cpu: Option<f64>,
    /// Server RSS, bytes.
    rss: Option<f64>,
    utilisation: f64,
    /// Bytes on the wire per payload byte received (`--deflate`).
    wire: Option<f64>,
}

impl<'a> Figures<'a> {
    fn of(r: &'a RunRecord) -> Option<Figures<'a>> {
        if let Some(s) = &r.search {
            // The figures at the sustainable rate.
            let best = s.outcome.best.as_ref()?;
            return Some(Figures {
                rate: best.measured.throughput,
                sustainable: Some(best.rate),
                latency: &best.measured.latency,
                cpu: best.measured.cpu_ms_per_1k,
                rss: best.measured.rss_bytes.map(|b| b as f64),
                utilisation: best.measured.loadgen_utilisation,
                wire: None,
            });
        }
        if let Some(e) = &r.echo {
            return Some(Figures {
                rate: e.messages_per_sec,
                sustainable: None,
                latency: &e.latency_us,
                cpu: e.server.as_ref().and_then(|s| s.cpu_ms_per_1k_msgs),
                rss: e.server.as_ref().map(|s| s.rss_bytes as f64),
                utilisation: e.loadgen.utilisation,
                wire: e.compression.as_ref().map(|c| c.received_ratio),
            });
        }
        let f = r.fanout.as_ref()?;
        Some(Figures {
            rate: f.deliveries_per_sec,
            sustainable: None,
            latency: &f.latency_us,
            cpu: f.server.as_ref().and_then(|s| s.cpu_ms_per_1k_msgs),
            rss: f.server.as_ref().map(|s| s.rss_bytes as f64),
            utilisation: f.loadgen.utilisation,
            wire: None,
        })
    }
}

fn summarise(scenario: &str, specs: &[ServerSpec], case: &Case, runs: &[RunRecord]) -> Vec<Summary> {
    let mut out: Vec<Summary> = Vec::new();
    for spec in specs {
        let mine: Vec<&RunRecord> =
            runs.iter().filter(|r| r.server == spec.name && r.case == *case).collect();
        let errors: Vec<String> = mine.iter().filter_map(|r| r.error.clone()).collect();
        // A failed run's figures (wrong echoes, lost deliveries, nothing echoed) are no
        // measurement: the medians are of the clean runs only.
        let mine: Vec<&RunRecord> = mine.into_iter().filter(|r| r.error.is_none()).collect();
        let s = if scenario == "connect" {
            let reps: Vec<&ConnectReport> = mine.iter().filter_map(|r| r.connect.as_ref()).collect();
            Summary {
                server: spec.name.clone(),
                rounds: reps.len(),
                rate: median(reps.iter().map(|r| r.connect_per_sec).collect()).unwrap_or(0.0),
                rate_ratio: 1.0,
                sustainable_rate: None,
                sustainable_ratio: None,
                latency_us: latency_medians(reps.iter().map(|r| &r.handshake_latency_us)),
                cpu_ms_per_1k: None,
                cpu_ratio: None,
                memory: median(reps.iter().filter_map(|r| r.server_rss_bytes_per_conn).collect()),
                loadgen_utilisation: 0.0,
                wire_ratio: None,
                errors,
            }
        } else {
            let reps: Vec<Figures<'_>> = mine.iter().filter_map(|r| Figures::of(r)).collect();
            Summary {
                server: spec.name.clone(),
                rounds: reps.len(),
                rate: median(reps.iter().map(|r| r.rate).collect()).unwrap_or(0.0),
                rate_ratio: 1.0,
                sustainable_rate: median(reps.iter().filter_map(|r| r.sustainable).collect()),
                sustainable_ratio: None,
                latency_us: latency_medians(reps.iter().map(|r| r.latency)),
                cpu_ms_per_1k: median(reps.iter().filter_map(|r| r.cpu).collect()),
                cpu_ratio: None,
                memory: median(reps.iter().filter_map(|r| r.rss).collect()),
                loadgen_utilisation: median(reps.iter().map(|r| r.utilisation).collect()).unwrap_or(0.0),
                wire_ratio: median(reps.iter().filter_map(|r| r.wire).collect()),
                errors,
            }
        };
        out.push(s);
    }
    let first_rate = out.first().map_or(0.0, |s| s.rate);
    let first_cpu = out.first().and_then(|s| s.cpu_ms_per_1k);
    let first_sustainable = out.first().and_then(|s| s.sustainable_rate);
    for s in &mut out {
        s.rate_ratio = if first_rate > 0.0 { s.rate / first_rate } else { 0.0 };
        s.sustainable_ratio = match (s.sustainable_rate, first_sustainable) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        s.cpu_ratio = match (s.cpu_ms_per_1k, first_cpu) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
    }
    out
}

fn latency_medians<'a>(l: impl Iterator<Item = &'a crate::report::Latency> + Clone) -> LatencyMedians {
    let pick = |f: fn(&crate::report::Latency) -> u64| {
        median(l.clone().map(|x| f(x) as f64).collect()).unwrap_or(0.0) as u64
    };
    LatencyMedians {
        p50: pick(|x| x.p50),
        p90: pick(|x| x.p90),
        p99: pick(|x| x.p99),
        p999: pick(|x| x.p999),
        max: pick(|x| x.max),
    }
}

/// The comparison as a Markdown document (also what the terminal shows). A server without a
/// result in a case shows `-` in every column, not zeros.
pub fn markdown(r: &CompareReport) -> String {
    let mut s = String::new();
    let unit = match r.scenario.as_str() {
        "connect" => "conn/s",
        "fanout" => "deliveries/s",
        _ => "msg/s",
    };
    let wire = r.cases.iter().any(|c| c.summaries.iter().any(|x| x.wire_ratio.is_some()));
    let search_unit = if r.scenario == "fanout" { "publishes/s" } else { "msg/s" };
    for CaseSummaries { case, summaries: sums } in &r.cases {
        let each = match r.p99_target_ms {
            Some(ms) => format!("rate search for p99 ≤ {ms} ms, steps of {} s", r.duration_s),
            None => format!("{} s each", r.duration_s),
        };
        s.push_str(&format!("### {} — median of {} rounds, {each}\n\n", case.title(&r.scenario), r.rounds));
        let connect = r.scenario == "connect";
        let mut header: Vec<&str> = if connect {
            vec!["conn/s", "× first", "handshake p50 µs", "p99 µs", "server bytes/conn"]
        } else {
            vec![
                unit,
                "× first",
                "p50 µs",
                "p99 µs",
                "p99.9 µs",
                "server CPU ms / 1k msg",
                "× first",
                "server RSS",
                "loadgen CPU",
            ]
        };
        if wire && !connect {
            header.push("wire / payload");
        }
        let sustainable = format!("sustainable {search_unit}");
        if r.p99_target_ms.is_some() {
            header.splice(0..0, [sustainable.as_str(), "× first"]);
        }
        let cells = |x: &Summary| {
            let mut row = if connect { connect_cells(x) } else { throughput_cells(x) };
            if let Some(rate) = x.sustainable_rate {
                row.splice(
                    0..0,
                    [group(rate), x.sustainable_ratio.map_or("-".into(), |v| format!("{v:.2}"))],
                );
            }
            row
        };
        s.push_str(&format!("| server | {} |\n|---|{}\n", header.join(" | "), "---:|".repeat(header.len())));
        for x in sums {
            let mut row = if x.rounds > 0 { cells(x) } else { Vec::new() };
            row.resize(header.len(), "-".into());
            s.push_str(&format!("| {} | {} |\n", x.server, row.join(" | ")));
        }
        let measured: Vec<&Summary> = sums.iter().filter(|x| x.rounds > 0).collect();
        if !connect && !measured.is_empty() {
            let mut by_rate = measured.clone();
            match r.p99_target_ms {
                Some(ms) => {
                    let rate = |x: &Summary| x.sustainable_rate.unwrap_or(0.0);
                    by_rate.sort_by(|a, b| rate(b).total_cmp(&rate(a)));
                    s.push_str(&format!("\nRanked by sustainable {search_unit} (p99 ≤ {ms} ms): "));
                }
                None => {
                    by_rate.sort_by(|a, b| b.rate.total_cmp(&a.rate));
                    s.push_str(&format!("\nRanked by {unit}: "));
                }
            }
            s.push_str(&format!(
                "{}.",
                by_rate.iter().map(|x| x.server.as_str()).collect::<Vec<_>>().join(" > ")
            ));
            let mut by_cpu: Vec<&Summary> =
                measured.into_iter().filter(|x| x.cpu_ms_per_1k.is_some()).collect();
            by_cpu.sort_by(|a, b| {
                a.cpu_ms_per_1k.partial_cmp(&b.cpu_ms_per_1k).unwrap_or(std::cmp::Ordering::Equal)
            });
            if !by_cpu.is_empty() {
                s.push_str(&format!(
                    " Ranked by server CPU per message (least first): {}.",
                    by_cpu.iter().map(|x| x.server.as_str()).collect::<Vec<_>>().join(" < ")
                ));
            }
            s.push('\n');
        }
        for x in sums.iter().filter(|x| !x.errors.is_empty()) {
            s.push_str(&format!(
                "\n**{}: {} failed round(s)**: {}\n",
                x.server,
                x.errors.len(),
                distinct(x.errors.iter().map(String::as_str).collect()).join("; ")
            ));
        }
        s.push('\n');
    }
    s
}

/// A connect summary's table cells, after the server's name.
fn connect_cells(x: &Summary) -> Vec<String> {
    vec![
        group(x.rate),
        format!("{:.2}", x.rate_ratio),
        x.latency_us.p50.to_string(),
        x.latency_us.p99.to_string(),
        x.memory.map_or("-".into(), |m| format!("{m:.0}")),
    ]
}

/// An echo or fanout summary's table cells, after the server's name.
fn throughput_cells(x: &Summary) -> Vec<String> {
    let mut cells = vec![
        group(x.rate),
        format!("{:.2}", x.rate_ratio),
        x.latency_us.p50.to_string(),
        x.latency_us.p99.to_string(),
        x.latency_us.p999.to_string(),
        x.cpu_ms_per_1k.map_or("-".into(), |v| format!("{v:.3}")),
        x.cpu_ratio.map_or("-".into(), |v| format!("{v:.2}")),
        x.memory.map_or("-".into(), human_bytes),
        format!("{:.0}%", x.loadgen_utilisation * 100.0),
    ];
    if let Some(v) = x.wire_ratio {
        cells.push(format!("{:.1}%", v * 100.0));
    }
    cells
}

/// Write the outputs `--json`, `--md`, `--plot` ask for.
pub fn write_outputs(
    r: &CompareReport,
    json: &Option<PathBuf>,
    md: &Option<PathBuf>,
    plot: &Option<PathBuf>,
) -> Result<(), String> {
    crate::common::write_json(json, r)?;
    if let Some(path) = md {
        std::fs::write(path, markdown(r)).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(dir) = plot {
        crate::plot::write_plots(r, dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(server: &str, round: usize, error: Option<&str>) -> RunRecord {
        RunRecord {
            server: server.into(),
            case: Case { connections: 1, size: 20, pipeline: 1, rate: 0 },
            round,
            echo: None,
            connect: None,
            fanout: None,
            search: None,
            error: error.map(String::from),
        }
    }

    fn report(runs: Vec<RunRecord>) -> CompareReport {
        CompareReport {
            scenario: "echo".into(),
            rounds: 3,
            duration_s: 1.0,
            p99_target_ms: None,
            servers: ["a", "b", "c"]
                .map(|n| ServerEntry { name: n.into(), command: format!("{n} {{port}}") })
                .into(),
            cases: Vec::new(),
            runs,
        }
    }

    #[test]
    fn failures_name_each_failing_server_once_on_one_line() {
        let r = report(vec![
            record("a", 0, None),
            record("b", 0, Some("no message was echoed")),
            record("c", 0, Some("exited at start")),
            record("a", 1, None),
            record("b", 1, Some("no message was echoed")),
            record("c", 1, Some("did not accept connections")),
            record("a", 2, None),
            record("b", 2, None),
            record("c", 2, Some("exited at start")),
        ]);
        assert_eq!(
            failures(&r).as_deref(),
            Some(
                "b: 2 of 3 runs failed: no message was echoed; c: 3 of 3 runs failed: exited at start (and 1 \
                 other errors: see the tables)"
            )
        );
        assert_eq!(failures(&report(vec![record("a", 0, None)])), None);
    }

    #[test]
    fn compare_json_names_its_fields() {
        let mut r = report(Vec::new());
        let summary = Summary {
            server: "a".into(),
            rounds: 1,
            rate: 10.0,
            rate_ratio: 1.0,
            sustainable_rate: None,
            sustainable_ratio: None,
            latency_us: LatencyMedians { p50: 1, p90: 2, p99: 3, p999: 4, max: 5 },
            cpu_ms_per_1k: None,
            cpu_ratio: None,
            memory: None,
            loadgen_utilisation: 0.5,
            wire_ratio: None,
            errors: Vec::new(),
        };
        r.cases.push(CaseSummaries {
            case: Case { connections: 100, size: 20, pipeline: 1, rate: 0 },
            summaries: vec![summary],
        });
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["servers"][0], serde_json::json!({"name": "a", "command": "a {port}"}));
        let case = &json["cases"][0];
        assert_eq!(
            (&case["connections"], &case["size"], &case["pipeline"], &case["rate"]),
            (&100.into(), &20.into(), &1.into(), &0.into())
        );
        assert_eq!(
            case["summaries"][0]["latency_us"],
            serde_json::json!({"p50": 1, "p90": 2, "p99": 3, "p999": 4, "max": 5})
        );
    }
}
