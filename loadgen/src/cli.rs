//! Command-line interface: one subcommand per scenario, with a stable set of options for
//! scripts (`--url`, `--connections`, `--duration`, `--json`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// A load generator for WebSocket servers: connection counts, echo throughput and latency,
/// and side-by-side comparisons of servers.
#[derive(Parser, Debug)]
#[command(name = "gale-loadgen", version, about, long_about = None)]
pub struct Cli {
    /// The scenario to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Scenarios.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Open N connections, complete the handshake, hold them idle; report connect rate,
    /// handshake latency, failures by cause and the server's memory per connection.
    Connect(ConnectArgs),
    /// N connections send messages and check every echo; report messages/s and round-trip
    /// latency percentiles.
    Echo(EchoArgs),
    /// M subscribers receive what publishers send through a pub/sub server at a fixed rate;
    /// report delivery rate, end-to-end latency, and lost / duplicated / out-of-order messages.
    Fanout(FanoutArgs),
    /// Run one scenario against several servers, interleaved over rounds; print medians and
    /// ratios against the first server (terminal, JSON, Markdown, SVG plots).
    Compare(CompareArgs),
    /// Reconnect storm against `gale serve`: N subscribed clients, a publisher throughout, then
    /// every connection cut at once (or the server restarted); report how long until every
    /// client has resubscribed and recovered what it missed, and check nothing was lost.
    Storm(StormArgs),
}

/// Options every scenario takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Server URL: ws://host:port/path (or tcp://host:port for a raw TCP echo). Repeat to
    /// spread the connections over several servers, in turn.
    #[arg(long, required = true)]
    pub url: Vec<String>,
    /// Connections to open.
    #[arg(long, short = 'c', default_value_t = 100)]
    pub connections: usize,
    /// Length of the measurement (echo) or of the hold (connect), in seconds.
    #[arg(long, short = 'd', default_value_t = 10.0)]
    pub duration: f64,
    /// Write the report as JSON to this file (`-` for stdout).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Client threads, each with its own event loop.
    #[arg(long, short = 't', default_value_t = 1)]
    pub threads: usize,
    /// Subprotocol to offer (repeat for several).
    #[arg(long = "subprotocol", value_name = "NAME")]
    pub protocols: Vec<String>,
    /// Extra request header, "Name: value" (repeat for several).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// PID of the server: report its CPU time per message and its memory (repeat for several
    /// servers: their figures are added up).
    #[arg(long, value_name = "PID")]
    pub server_pid: Vec<u32>,
    /// Give up on a connect + handshake after this many seconds.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub timeout: f64,
    /// Offer permessage-deflate (RFC 7692); the report then gives the compression ratio.
    #[arg(long)]
    pub deflate: bool,
    /// wss://: accept any server certificate (self-signed test certificates).
    #[arg(long)]
    pub insecure: bool,
    /// wss://: trust the certificates in this PEM file (instead of the Mozilla roots).
    #[arg(long, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
    /// Spread connections over source addresses 127.0.0.1 .. 127.0.0.N (loopback servers only),
    /// to go past one address's ~28,000 ephemeral ports.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub source_ips: u8,
}

/// Options of `echo`.
#[derive(Args, Debug, Clone)]
pub struct EchoArgs {
    /// Options every scenario takes.
    #[command(flatten)]
    pub common: Common,
    /// Message size in bytes.
    #[arg(long, short = 's', default_value_t = 20)]
    pub size: usize,
    /// Messages in flight per connection (closed loop).
    #[arg(long, short = 'p', default_value_t = 1)]
    pub pipeline: usize,
    /// Seconds of warm-up before the measurement.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    pub warmup: f64,
    /// Send binary messages instead of UTF-8 text.
    #[arg(long)]
    pub binary: bool,
    /// `chat`: realistic danmaku/chat messages instead of fixed-size ones — short JSON objects
    /// with repeating keys and Chinese text, 120-250 bytes (`--size` is then ignored).
    #[arg(long, value_enum, default_value_t = PayloadArg::Fixed)]
    pub payload: PayloadArg,
    /// Masking keys: fresh random keys (default), or the all-zero key (lets a server that
    /// checks for it skip the unmasking work; uWebSockets' load_test uses it in its deflate
    /// mode, and the fixed key 01 02 03 04 otherwise).
    #[arg(long, value_enum, default_value_t = MaskArg::Random)]
    pub mask: MaskArg,
    /// Open loop: send this many messages per second in total on a fixed schedule, whatever
    /// the server does (latency then includes queueing: no coordinated omission).
    #[arg(long, value_name = "MSG_PER_SEC")]
    pub rate: Option<f64>,
    /// Rate search (`--p99-target`; the search starts at `--rate`, default 1,000 msg/s).
    #[command(flatten)]
    pub search: SearchArgs,
}

/// Echo payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PayloadArg {
    /// `--size` bytes of UTF-8 text (or binary), numbered.
    Fixed,
    /// Chat/danmaku JSON messages.
    Chat,
}

/// Masking keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MaskArg {
    /// A fresh random key per frame.
    Random,
    /// The all-zero key.
    Zero,
}

/// Options of `connect`.
#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Options every scenario takes (`--duration` is how long connections are held).
    #[command(flatten)]
    pub common: Common,
    /// How long to hold the connections once open, in seconds (overrides --duration).
    #[arg(long, value_name = "SECONDS")]
    pub hold: Option<f64>,
    /// Connections per second (default: as fast as possible).
    #[arg(long, value_name = "CONN_PER_SEC")]
    pub rate: Option<f64>,
    /// Send a ping on every connection this often while holding, in seconds.
    #[arg(long, value_name = "SECONDS")]
    pub ping: Option<f64>,
    /// Worker processes to use: each has its own open-files limit (20,000 here), so K
    /// processes hold up to K times as many connections. The report adds them up.
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Internal: run as worker I of K of a `--procs` run.
    #[arg(long, hide = true, value_name = "I/K")]
    pub worker: Option<String>,
}

/// Options of `compare`.
#[derive(Args, Debug, Clone)]
pub struct CompareArgs {
    /// A server as NAME=COMMAND; `{port}` in the command is replaced by a free port (repeat;
    /// the first is the reference for ratios). The URL is read from a `listening on ws://…`
    /// line the server prints, or is ws://127.0.0.1:{port}/.
    #[arg(long = "server", value_name = "NAME=COMMAND", required = true)]
    pub servers: Vec<String>,
    /// Scenario: echo, connect or fanout.
    #[arg(long, default_value = "echo")]
    pub scenario: String,
    /// Publishes per second to try (comma-separated, fanout).
    #[arg(long, value_delimiter = ',', default_value = "100")]
    pub rate: Vec<usize>,
    /// The fan-out protocol of a server, as NAME=plain or NAME=gale (repeat; default plain:
    /// subscribers on /sub, a WebSocket publisher on /pub; gale: `gale serve`, subscribers on
    /// /ws, HTTP publishing with the API key).
    #[arg(long = "server-protocol", value_name = "NAME=PROTOCOL")]
    pub server_protocols: Vec<String>,
    /// API key for HTTP publishing (fanout with the gale protocol).
    #[arg(long, value_name = "KEY", env = "GALE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Path to connect to.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// Connection counts to try (comma-separated).
    #[arg(long, short = 'c', value_delimiter = ',', default_value = "100")]
    pub connections: Vec<usize>,
    /// Message sizes to try (comma-separated, echo).
    #[arg(long, short = 's', value_delimiter = ',', default_value = "20")]
    pub size: Vec<usize>,
    /// Pipeline depths to try (comma-separated, echo).
    #[arg(long, short = 'p', value_delimiter = ',', default_value = "1")]
    pub pipeline: Vec<usize>,
    /// Rounds; every round runs every server once, in order.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Seconds measured per run (echo) or held (connect).
    #[arg(long, short = 'd', default_value_t = 5.0)]
    pub duration: f64,
    /// Seconds of warm-up per run.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Client threads.
    #[arg(long, short = 't', default_value_t = 1)]
    pub threads: usize,
    /// Send binary messages instead of UTF-8 text.
    #[arg(long)]
    pub binary: bool,
    /// Masking keys.
    #[arg(long, value_enum, default_value_t = MaskArg::Random)]
    pub mask: MaskArg,
    /// Offer permessage-deflate; the tables then give the compression ratio.
    #[arg(long)]
    pub deflate: bool,
    /// wss:// servers: accept any certificate (self-signed test certificates).
    #[arg(long)]
    pub insecure: bool,
    /// Echo payloads: fixed-size numbered ones, or chat/danmaku JSON messages.
    #[arg(long, value_enum, default_value_t = PayloadArg::Fixed)]
    pub payload: PayloadArg,
    /// Write the full results as JSON (`-` for stdout).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the tables as Markdown.
    #[arg(long, value_name = "FILE")]
    pub md: Option<PathBuf>,
    /// Write SVG plots into this directory.
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,
    /// Rate search per server and case (`--p99-target`): servers are ranked by the highest
    /// rate they sustain under the target (echo starts at 1,000 msg/s, fanout at `--rate`).
    #[command(flatten)]
    pub search: SearchArgs,
}

/// Options of `fanout`.
#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Options every scenario takes (`--url` and `--connections` are the subscribers').
    #[command(flatten)]
    pub common: Common,
    /// Where publishers go: a ws:// URL, or http://host:port/path for HTTP POST publishing
    /// (`{topic}` in the path is replaced). Default: the subscribers' URL.
    #[arg(long, value_name = "URL")]
    pub publish_url: Option<String>,
    /// The server's pub/sub protocol.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Plain)]
    pub protocol: ProtocolArg,
    /// Topic to subscribe and publish to.
    #[arg(long, default_value = "bench")]
    pub topic: String,
    /// Publishes per second, in total.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Payload size in bytes (at least 32).
    #[arg(long, short = 's', default_value_t = 64)]
    pub size: usize,
    /// Publisher connections (WebSocket publishing).
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// API key for HTTP publishing, sent as `Authorization: Bearer KEY` (default: the
    /// GALE_API_KEY environment variable).
    #[arg(long, value_name = "KEY", env = "GALE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Seconds of publishing before the measurement.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    pub warmup: f64,
    /// Seconds to keep listening after publishing stops, for the last deliveries.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    pub drain: f64,
    /// Rate search (`--p99-target`; the search starts at `--rate`).
    #[command(flatten)]
    pub search: SearchArgs,
}

/// Rate search: the highest sustained rate whose p99 latency stays under a target. Open-loop
/// steps at rising rates, doubling from the start rate until one fails, then bisecting.
#[derive(Args, Debug, Clone)]
pub struct SearchArgs {
    /// Search for the highest rate whose p99 latency stays at or under this many milliseconds
    /// (a step also fails if the rate is not kept or anything is lost).
    #[arg(long, value_name = "MS")]
    pub p99_target: Option<f64>,
    /// First rate of the search, per second (default: see --rate).
    #[arg(long, value_name = "PER_SEC")]
    pub start_rate: Option<f64>,
    /// Highest rate the search tries, per second.
    #[arg(long, default_value_t = 1_000_000.0, value_name = "PER_SEC")]
    pub max_rate: f64,
    /// Most steps the search runs.
    #[arg(long, default_value_t = 12, value_name = "N")]
    pub max_steps: usize,
    /// Stop bisecting once the highest passing and lowest failing rates are this close.
    #[arg(long, default_value_t = 5.0, value_name = "PERCENT")]
    pub precision: f64,
    /// A step fails if the rate achieved is short of the rate asked by more than this.
    #[arg(long, default_value_t = 5.0, value_name = "PERCENT")]
    pub rate_tolerance: f64,
    /// Seconds measured per step, after its warm-up (--warmup).
    #[arg(long, default_value_t = 3.0, value_name = "SECONDS")]
    pub step_duration: f64,
}

/// Pub/sub protocols `fanout` speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtocolArg {
    /// Subscribers receive every message sent to the server; the publisher sends the payload.
    Plain,
    /// `gale serve`'s JSON protocol: subscribe commands, enveloped deliveries, and HTTP
    /// publishing to /api/publish/{topic}.
    Gale,
}

impl Command {
    /// Where `--json` sends the report, if anywhere.
    pub fn json_path(&self) -> Option<&PathBuf> {
        match self {
            Command::Connect(a) => a.common.json.as_ref(),
            Command::Echo(a) => a.common.json.as_ref(),
            Command::Fanout(a) => a.common.json.as_ref(),
            Command::Compare(a) => a.json.as_ref(),
            Command::Storm(a) => a.json.as_ref(),
        }
    }
}

impl Common {
    /// The URLs as one label for reports.
    pub fn url_label(&self) -> String {
        self.url.join(" ")
    }
}

/// Options of `storm`.
#[derive(Args, Debug, Clone)]
pub struct StormArgs {
    /// The gateway's WebSocket URL (ws://host:port/ws). Repeat for cluster nodes: clients are
    /// spread over them, and a client whose reconnect fails moves on to the next. Default with
    /// --server-cmd: the URL the started server prints.
    #[arg(long)]
    pub url: Vec<String>,
    /// Clients (WebSocket connections), each subscribed to one topic.
    #[arg(long, short = 'c', default_value_t = 1000)]
    pub connections: usize,
    /// Topics; client i subscribes to topic i mod N (PREFIX0 .. PREFIX{N-1}).
    #[arg(long, default_value_t = 100)]
    pub topics: usize,
    /// Topic names start with this (the default gateway lets anyone subscribe to `chat:*`).
    #[arg(long, default_value = "chat:storm-", value_name = "PREFIX")]
    pub topic_prefix: String,
    /// Publishes per second, in total, over HTTP, round-robin over the topics, from before the
    /// cut to the end.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Payload size in bytes.
    #[arg(long, short = 's', default_value_t = 32)]
    pub size: usize,
    /// HTTP publish URL (default: http:// and the address of the first --url).
    #[arg(long, value_name = "URL")]
    pub publish_url: Option<String>,
    /// API key for HTTP publishing (default: the GALE_API_KEY environment variable).
    #[arg(long, value_name = "KEY", env = "GALE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The storm: `client` closes every client connection at once; `restart` kills the server
    /// (the first --server-cmd) and starts it again.
    #[arg(long, value_enum, default_value_t = CutArg::Client)]
    pub cut: CutArg,
    /// Server command to start (and, with --cut restart, to kill and start again); `{port}`
    /// is replaced by a free port, kept across the restart. Repeat for cluster nodes (only the
    /// first is restarted).
    #[arg(long = "server-cmd", value_name = "COMMAND")]
    pub server_cmd: Vec<String>,
    /// PID of a server started elsewhere: its CPU and peak memory during the storm are reported
    /// (repeat for several; with --server-cmd the started servers are measured).
    #[arg(long, value_name = "PID")]
    pub server_pid: Vec<u32>,
    /// Each client reconnects after a uniformly random delay of 0..J milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub jitter: u64,
    /// Every client must have recovered within this many seconds of the cut.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    pub deadline: f64,
    /// Seconds of publishing before the cut.
    #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
    pub warmup: f64,
    /// Seconds to wait after publishing stops for the last deliveries.
    #[arg(long, default_value_t = 2.0, value_name = "SECONDS")]
    pub drain: f64,
    /// Give up on a connect + handshake after this many seconds (then retry).
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    pub timeout: f64,
    /// Worker processes: each has its own open-files limit (20,000 here) and event loop.
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Spread connections over source addresses 127.0.0.1 .. 127.0.0.N (loopback servers only).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub source_ips: u8,
    /// Write the report as JSON to this file (`-` for stdout).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Internal: run as worker I of K.
    #[arg(long, hide = true, value_name = "I/K")]
    pub worker: Option<String>,
}

/// How `storm` cuts the clients off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CutArg {
    /// The load generator closes every client connection at once.
    Client,
    /// The server is killed (SIGKILL) and started again.
    Restart,
}
