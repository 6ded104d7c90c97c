//! `gale echo`: echoes every message back, on any path, and answers `GET /healthz`.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::units;
use clap::{Args, ValueEnum};
use gale_server::{
    Accept, App, Backend, Behavior, Compression, HttpRequest, HttpResponse, Message, Reject, ServerConfig,
    UpgradeRequest, WebSocket, WsHandler,
};

/// Options of `gale echo`.
#[derive(Args, Debug)]
pub struct EchoArgs {
    /// Address to listen on, e.g. 0.0.0.0:9001, instead of --host and --port.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["host", "port"])]
    listen: Option<SocketAddr>,
    /// Host to listen on (IPv4 or IPv6).
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// Port to listen on; 0 picks a free one (printed at start).
    #[arg(long, short, default_value_t = 9001)]
    port: u16,
    /// Event loops (threads); 0 = one per available core.
    #[arg(long, short, default_value_t = 0)]
    threads: usize,
    /// Event-loop implementation: io_uring, epoll, or auto (io_uring when the kernel allows
    /// it, else epoll).
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// Pin each loop thread to a core.
    #[arg(long)]
    pin: bool,
    /// Subprotocols to accept, in order of preference over the client's offer (repeat the
    /// flag). Without it, the client's first offered subprotocol is accepted.
    #[arg(long = "protocol", value_name = "NAME")]
    protocols: Vec<String>,
    /// Largest message accepted, in bytes (1009 above it); units as in 64KiB, 16MiB, 1MB.
    #[arg(long, default_value = "16MiB", value_name = "BYTES", value_parser = units::parse_bytes)]
    max_payload: usize,
    /// permessage-deflate: off, shared (no context takeover; one compressor per loop), or
    /// dedicated (context takeover; a compressor per connection).
    #[arg(long, value_enum, default_value_t = CompressionArg::Shared)]
    compression: CompressionArg,
    /// Window of dedicated compressors, in bits (9..=15).
    #[arg(long, default_value_t = 15, value_name = "BITS", value_parser = clap::value_parser!(u8).range(9..=15))]
    compression_window: u8,
    /// Messages shorter than this are sent uncompressed (default: 1024 with shared
    /// compression, 64 with dedicated).
    #[arg(long, value_name = "BYTES", value_parser = units::parse_bytes)]
    compress_min_size: Option<usize>,
    /// io_uring: provided receive buffers per loop, a power of two [default: 32, or 512 with
    /// --uring-whole-buffers].
    #[arg(long, value_name = "N", hide_short_help = true)]
    uring_buffers: Option<u16>,
    /// io_uring: size of each provided receive buffer [default: 65536, or 16384 with
    /// --uring-whole-buffers].
    #[arg(long, value_name = "BYTES", hide_short_help = true, value_parser = units::parse_bytes)]
    uring_buffer_size: Option<usize>,
    /// io_uring: each receive takes a whole buffer (the kernel's default), instead of
    /// filling buffers piece by piece.
    #[arg(long, hide_short_help = true)]
    uring_whole_buffers: bool,
    /// io_uring: sends of at least this many bytes are zero-copy (SEND_ZC); 0 = never.
    #[arg(long, default_value = "0", value_name = "BYTES", hide_short_help = true, value_parser = units::parse_bytes)]
    uring_send_zc: usize,
    /// Serve TLS (wss://) with this certificate chain (PEM); needs --tls-key. SIGHUP reloads
    /// both files.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Close connections idle for this many seconds (0: never).
    #[arg(long, default_value_t = 120, value_name = "SECONDS")]
    idle_timeout: u64,
    /// Close with 1008 a connection whose message is still unfinished this many seconds after
    /// its first byte (0: never).
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    message_timeout: u64,
    /// Bytes each loop may hold for messages not yet received whole, over all its
    /// connections; the message that would pass it closes its connection with 1013.
    #[arg(long, default_value = "64MiB", value_name = "BYTES", value_parser = units::parse_bytes)]
    partial_message_budget: usize,
    /// Bytes held for a connection the kernel will not take yet (echoes, pongs, TLS records).
    /// An echo that would pass it is dropped; past it, the connection is not read until it
    /// catches up.
    #[arg(long, default_value = "1MiB", value_name = "BYTES", value_parser = parse_backpressure)]
    max_backpressure: usize,
    /// Drop a connection that stays past --max-backpressure (reading nothing) this long.
    #[arg(long, default_value_t = 30, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    backpressure_timeout: u64,
}

/// `--compression` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CompressionArg {
    /// No permessage-deflate.
    Off,
    /// No context takeover: the cheapest in memory.
    Shared,
    /// Context takeover with a compressor per connection.
    Dedicated,
}

/// `--backend` values.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BackendArg {
    /// Readiness loops on epoll (mio).
    Epoll,
    /// Completion loops on io_uring.
    Uring,
    /// io_uring if available, else epoll.
    Auto,
}

impl From<BackendArg> for Backend {
    fn from(b: BackendArg) -> Backend {
        match b {
            BackendArg::Epoll => Backend::Epoll,
            BackendArg::Uring => Backend::Uring,
            BackendArg::Auto => Backend::Auto,
        }
    }
}

/// Echoes messages back as they came.
struct Echo {
    protocols: Vec<String>,
}

impl WsHandler for Echo {
    type Data = ();

    fn upgrade(&self, req: &UpgradeRequest<'_>) -> Result<Accept<()>, Reject> {
        // Without a list, take the client's favourite; with one, ours decides the order.
        let chosen = if self.protocols.is_empty() {
            req.protocols().next().map(str::to_string)
        } else {
            let offered: Vec<&str> = req.protocols().collect();
            self.protocols.iter().find(|p| offered.contains(&p.as_str())).cloned()
        };
        Ok(match chosen {
            Some(p) => Accept::new(()).protocol(p),
            None => Accept::new(()),
        })
    }

    fn message(&self, ws: &mut WebSocket<'_, ()>, msg: Message<'_>) {
        ws.send(msg);
    }
}

/// Run the echo server until SIGINT/SIGTERM.
pub fn run(args: EchoArgs) -> std::io::Result<()> {
    let config = ServerConfig {
        // 0 means one loop per core, as `gale serve --threads 0` does.
        threads: match args.threads {
            0 => ServerConfig::default().threads,
            n => n,
        },
        pin_threads: args.pin,
        backend: args.backend.into(),
        uring_buffers: args.uring_buffers,
        uring_buffer_size: args.uring_buffer_size,
        uring_incremental: !args.uring_whole_buffers,
        uring_send_zc: args.uring_send_zc,
        partial_message_budget: args.partial_message_budget,
        ..ServerConfig::default()
    };
    let behavior = Behavior {
        max_payload: args.max_payload,
        compression: match args.compression {
            CompressionArg::Off => Compression::Disabled,
            CompressionArg::Shared => Compression::Shared,
            CompressionArg::Dedicated => Compression::Dedicated { window_bits: args.compression_window },
        },
        compress_min_size: args.compress_min_size,
        idle_timeout: (args.idle_timeout > 0).then(|| Duration::from_secs(args.idle_timeout)),
        message_timeout: (args.message_timeout > 0).then(|| Duration::from_secs(args.message_timeout)),
        max_backpressure: args.max_backpressure,
        backpressure_timeout: Duration::from_secs(args.backpressure_timeout),
        ..Behavior::default()
    };
    let threads = config.threads;
    let mut app = App::new().config(config);
    if let (Some(cert), Some(key)) = (args.tls_cert, args.tls_key) {
        app = app.tls(cert, key);
    }
    let server = app
        .get("/healthz", |_req: &HttpRequest<'_>| HttpResponse::text(200, "ok\n"))
        .ws("/*", behavior, Echo { protocols: args.protocols })
        .listen(args.listen.unwrap_or(SocketAddr::new(args.host, args.port)))?;
    let handle = server.handle();
    handle.shutdown_on_signals()?;
    if handle.is_tls() {
        handle.reload_tls_on_sighup()?;
    }
    let backend = server.backend();
    let addr = server.local_addr();
    let scheme = if handle.is_tls() { "wss" } else { "ws" };
    // Announce only once every loop is set up and accepting.
    let running = server.spawn()?;
    let mut stdout = std::io::stdout();
    let threads = crate::threads_phrase(threads);
    writeln!(stdout, "gale echo listening on {scheme}://{addr} ({threads}, {backend} backend)")?;
    stdout.flush()?;
    running.join()
}

/// `--max-backpressure`: a size with or without a unit, at least 1 KiB (below it a single
/// pong or frame header would already count as a slow reader).
fn parse_backpressure(text: &str) -> Result<usize, String> {
    let bytes = units::parse_bytes(text)?;
    if bytes < 1024 {
        return Err(format!("at least 1024 bytes (1KiB), got {text:?}"));
    }
    Ok(bytes)
}
