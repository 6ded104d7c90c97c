//! `gale-loadgen compare`: one scenario against several servers, interleaved over rounds
//! (A B C A B C …) so that machine noise falls on all of them alike, summarised as medians and
//! ratios against the first server, ranked by messages/s and by server CPU per message.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::cli::{Common, CompareArgs, ConnectArgs, EchoArgs, FanoutArgs, ProtocolArg};
use crate::report::{ConnectReport, EchoReport, FanoutReport, group, human_bytes};
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
    /// Rounds that produced a result.
    pub rounds: usize,
    /// Median messages per second (echo) or connections per second (connect).
    pub rate: f64,
    /// `rate` / the first server's.
    pub rate_ratio: f64,
    /// Median latency percentiles, microseconds: p50, p90, p99, p99.9, max.
    pub latency_us: [u64; 5],
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

/// Everything a comparison produced.
#[derive(Clone, Debug, Serialize)]
pub struct CompareReport {
    /// "echo" or "connect".
    pub scenario: String,
    /// Rounds per case.
    pub rounds: usize,
    /// Seconds per run.
    pub duration_s: f64,
    /// Server names and commands.
    pub servers: Vec<(String, String)>,
    /// Per case: the summaries, in server order.
    pub cases: Vec<(Case, Vec<Summary>)>,
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
    let summaries = cases.iter().map(|c| (*c, summarise(&args.scenario, &specs, c, &runs))).collect();
    Ok(CompareReport {
        scenario: args.scenario.clone(),
        rounds: args.rounds,
        duration_s: args.duration,
        servers: specs.iter().map(|s| (s.name.clone(), s.command.clone())).collect(),
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
        };
        match crate::scenario::fanout::run(&a, false) {
            Ok(r) => {
                if r.lost + r.duplicated + r.out_of_order + r.publish_errors > 0 {
                    record.error = Some(format!(
                        "{} lost, {} duplicated, {} out of order, {} publish errors",
                        r.lost, r.duplicated, r.out_of_order, r.publish_errors
                    ));
                }
                record.fanout = Some(r);
            }
            Err(e) => record.error = Some(e),
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
        };
        match crate::scenario::echo::run(&a, false) {
            Ok(r) => {
                if r.mismatches > 0 {
                    record.error = Some(format!(
                        "{} wrong echoes: {}",
                        r.mismatches,
                        r.first_mismatch.clone().unwrap_or_default()
                    ));
                }
                record.echo = Some(r);
            }
            Err(e) => record.error = Some(e),
        }
    }
    drop(server);
    // Let sockets in TIME_WAIT and the kernel settle between runs.
    std::thread::sleep(Duration::from_millis(300));
    record
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
    latency: &'a crate::report::Latency,
    server: Option<&'a crate::report::ServerCost>,
    utilisation: f64,
    /// Bytes on the wire per payload byte received (`--deflate`).
    wire: Option<f64>,
}

impl<'a> Figures<'a> {
    fn of(r: &'a RunRecord) -> Option<Figures<'a>> {
        if let Some(e) = &r.echo {
            return Some(Figures {
                rate: e.messages_per_sec,
                latency: &e.latency_us,
                server: e.server.as_ref(),
                utilisation: e.loadgen.utilisation,
                wire: e.compression.as_ref().map(|c| c.received_ratio),
            });
        }
        let f = r.fanout.as_ref()?;
        Some(Figures {
            rate: f.deliveries_per_sec,
            latency: &f.latency_us,
            server: f.server.as_ref(),
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
        let s = if scenario == "connect" {
            let reps: Vec<&ConnectReport> = mine.iter().filter_map(|r| r.connect.as_ref()).collect();
            Summary {
                server: spec.name.clone(),
                rounds: reps.len(),
                rate: median(reps.iter().map(|r| r.connect_per_sec).collect()).unwrap_or(0.0),
                rate_ratio: 1.0,
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
                latency_us: latency_medians(reps.iter().map(|r| r.latency)),
                cpu_ms_per_1k: median(reps.iter().filter_map(|r| r.server?.cpu_ms_per_1k_msgs).collect()),
                cpu_ratio: None,
                memory: median(reps.iter().filter_map(|r| r.server.map(|s| s.rss_bytes as f64)).collect()),
                loadgen_utilisation: median(reps.iter().map(|r| r.utilisation).collect()).unwrap_or(0.0),
                wire_ratio: median(reps.iter().filter_map(|r| r.wire).collect()),
                errors,
            }
        };
        out.push(s);
    }
    let first_rate = out.first().map_or(0.0, |s| s.rate);
    let first_cpu = out.first().and_then(|s| s.cpu_ms_per_1k);
    for s in &mut out {
        s.rate_ratio = if first_rate > 0.0 { s.rate / first_rate } else { 0.0 };
        s.cpu_ratio = match (s.cpu_ms_per_1k, first_cpu) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
    }
    out
}

fn latency_medians<'a>(l: impl Iterator<Item = &'a crate::report::Latency> + Clone) -> [u64; 5] {
    let pick = |f: fn(&crate::report::Latency) -> u64| {
        median(l.clone().map(|x| f(x) as f64).collect()).unwrap_or(0.0) as u64
    };
    [pick(|x| x.p50), pick(|x| x.p90), pick(|x| x.p99), pick(|x| x.p999), pick(|x| x.max)]
}

/// The comparison as a Markdown document (also what the terminal shows).
pub fn markdown(r: &CompareReport) -> String {
    let mut s = String::new();
    let unit = match r.scenario.as_str() {
        "connect" => "conn/s",
        "fanout" => "deliveries/s",
        _ => "msg/s",
    };
    for (case, sums) in &r.cases {
        s.push_str(&format!(
            "### {} — median of {} rounds, {} s each\n\n",
            case.title(&r.scenario),
            r.rounds,
            r.duration_s
        ));
        if r.scenario == "connect" {
            s.push_str("| server | conn/s | × first | handshake p50 µs | p99 µs | server bytes/conn |\n|---|---:|---:|---:|---:|---:|\n");
            for x in sums {
                s.push_str(&format!(
                    "| {} | {} | {:.2} | {} | {} | {} |\n",
                    x.server,
                    group(x.rate),
                    x.rate_ratio,
                    x.latency_us[0],
                    x.latency_us[2],
                    x.memory.map_or("-".into(), |m| format!("{m:.0}"))
                ));
            }
        } else {
            let wire = r.cases.iter().any(|(_, s)| s.iter().any(|x| x.wire_ratio.is_some()));
            s.push_str(&format!(
                "| server | {unit} | × first | p50 µs | p99 µs | p99.9 µs | server CPU ms / 1k msg | × first | server RSS | loadgen CPU |{}\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|{}\n",
                if wire { " wire / payload |" } else { "" },
                if wire { "---:|" } else { "" }
            ));
            for x in sums {
                s.push_str(&format!(
                    "| {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {:.0}% |\n",
                    x.server,
                    group(x.rate),
                    x.rate_ratio,
                    x.latency_us[0],
                    x.latency_us[2],
                    x.latency_us[3],
                    x.cpu_ms_per_1k.map_or("-".into(), |v| format!("{v:.3}")),
                    x.cpu_ratio.map_or("-".into(), |v| format!("{v:.2}")),
                    x.memory.map_or("-".into(), human_bytes),
                    x.loadgen_utilisation * 100.0
                ));
                if wire {
                    s.pop();
                    s.push_str(&format!(
                        " {} |\n",
                        x.wire_ratio.map_or("-".into(), |v| format!("{:.1}%", v * 100.0))
                    ));
                }
            }
            let mut by_cpu: Vec<&Summary> = sums.iter().filter(|x| x.cpu_ms_per_1k.is_some()).collect();
            by_cpu.sort_by(|a, b| {
                a.cpu_ms_per_1k.partial_cmp(&b.cpu_ms_per_1k).unwrap_or(std::cmp::Ordering::Equal)
            });
            let mut by_rate: Vec<&Summary> = sums.iter().collect();
            by_rate.sort_by(|a, b| b.rate.total_cmp(&a.rate));
            s.push_str(&format!(
                "\nRanked by {unit}: {}. Ranked by server CPU per message (least first): {}.\n",
                by_rate.iter().map(|x| x.server.as_str()).collect::<Vec<_>>().join(" > "),
                by_cpu.iter().map(|x| x.server.as_str()).collect::<Vec<_>>().join(" < ")
            ));
        }
        for x in sums.iter().filter(|x| !x.errors.is_empty()) {
            s.push_str(&format!(
                "\n**{}: {} failed round(s)**: {}\n",
                x.server,
                x.errors.len(),
                x.errors.join("; ")
            ));
        }
        s.push('\n');
    }
    s
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
