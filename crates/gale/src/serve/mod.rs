//! `gale serve`: the push gateway. Clients subscribe to topics over WebSocket and get every
//! message published to them, numbered, with recovery of what they missed; backends publish
//! over HTTP. See `docs/GATEWAY.md`.

pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod control;
pub mod gateway;
pub mod history;
pub mod presence;
pub mod protocol;
pub mod publish;
pub mod topics;

use std::io::{self, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use gale_server::{App, HttpRequest, ServerConfig};

use config::Overrides;
use gateway::{Endpoint, Gateway};

/// Options of `gale serve`; flags override the configuration file.
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML configuration file (keys it leaves out keep the embedded defaults; see
    /// `gale serve --print-config`).
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    print_config: bool,
    /// Address to listen on, e.g. 0.0.0.0:9001 (`server.listen`); not with --host or --port.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["host", "port"])]
    listen: Option<String>,
    /// Host to listen on, keeping the port of `server.listen` (IPv4 or IPv6).
    #[arg(long)]
    host: Option<IpAddr>,
    /// Port to listen on, keeping the host of `server.listen`; 0 picks a free one (printed
    /// at start).
    #[arg(long, short)]
    port: Option<u16>,
    /// Event loops; 0 = one per core (`server.threads`).
    #[arg(long, short)]
    threads: Option<usize>,
    /// auto, epoll or uring (`server.backend`).
    #[arg(long)]
    backend: Option<String>,
    /// Key of the HTTP publish API (`auth.api_key`; also GALE_API_KEY).
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// HS256 secret of connection tokens (`auth.jwt_secret`).
    #[arg(long, value_name = "SECRET")]
    jwt_secret: Option<String>,
    /// off, shared or dedicated (`websocket.compression`).
    #[arg(long)]
    compression: Option<String>,
    /// Messages kept per topic for recovery (`history.size`).
    #[arg(long, value_name = "N")]
    history_size: Option<usize>,
    /// TLS certificate chain, PEM (`tls.cert`); with --tls-key, serves wss:// and https://.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<String>,
    /// TLS private key, PEM (`tls.key`).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<String>,
    /// Share topics with other gateways through this Redis (`cluster.broker`), e.g.
    /// redis://127.0.0.1:6379, or a Redis Cluster: redis+cluster://HOST:PORT,HOST:PORT.
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
}

/// Run the gateway until SIGINT/SIGTERM.
pub fn run(args: ServeArgs) -> io::Result<()> {
    if args.print_config {
        print!("{}", config::DEFAULT_TOML);
        return Ok(());
    }
    let invalid = |msg: String| io::Error::new(io::ErrorKind::InvalidInput, msg);
    let file = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
            Some((path.display().to_string(), text))
        }
        None => None,
    };
    let overrides = Overrides {
        listen: args.listen,
        host: args.host,
        port: args.port,
        threads: args.threads,
        backend: args.backend,
        api_key: args.api_key,
        jwt_secret: args.jwt_secret,
        compression: args.compression,
        history_size: args.history_size,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        broker: args.broker,
    };
    let env_key = std::env::var("GALE_API_KEY").ok().filter(|k| !k.is_empty());
    let settings = config::load(file.as_ref().map(|(n, t)| (n.as_str(), t.as_str())), env_key, &overrides)
        .map_err(invalid)?;
    let gateway = Gateway::new(settings);
    let s = &gateway.settings;
    let server_config = ServerConfig {
        threads: s.threads,
        backend: s.backend,
        partial_message_budget: s.partial_message_budget,
        // The delivery of the largest body must fit in `websocket.max_backpressure`, which
        // the configuration checks against this.
        max_body: protocol::MAX_BODY,
        ..ServerConfig::default()
    };
    let g = |f: fn(&Arc<Gateway>, &HttpRequest<'_>) -> gale_server::HttpResponse| {
        let gateway = gateway.clone();
        move |req: &HttpRequest<'_>| f(&gateway, req)
    };
    let mut app = App::new().config(server_config);
    if let Some((cert, key)) = &s.tls {
        app = app.tls(cert, key);
    }
    let server = app
        .ws(&s.ws_path, s.behavior.clone(), Endpoint(gateway.clone()))
        .get("/", |_req: &HttpRequest<'_>| gale_server::HttpResponse::html(200, api::DEMO_PAGE))
        .get("/gale-client.js", |_req: &HttpRequest<'_>| api::client_js())
        .get("/healthz", g(|g, _| api::health(g)))
        .get("/metrics", g(|g, _| api::metrics(g)))
        .post("/api/publish/*", g(api::publish))
        .post("/api/broadcast", g(api::broadcast))
        .post("/api/publish_batch", g(api::publish_batch))
        .get("/api/topics/*", g(api::topic_info))
        .get("/api/history/*", g(api::history))
        .get("/api/presence/*", g(api::presence))
        .get("/api/presence_stats/*", g(api::presence_stats))
        .post("/api/disconnect", g(control::handle))
        .post("/api/unsubscribe", g(control::handle))
        .post("/api/subscribe", g(control::handle))
        // Every answer of the API is JSON, the server's own errors (404, 405, 413, ...) too.
        .render_errors("/api/*", api::json_error)
        .listen(s.listen)?;
    let handle = server.handle();
    let _ = gateway.handle.set(handle.clone());
    handle.shutdown_on_signals()?;
    if handle.is_tls() {
        handle.reload_tls_on_sighup()?;
    }
    if s.api_key.is_none() {
        tracing::info!("no API key configured: the HTTP publish API answers 403");
    }
    if let Some(url) = &s.broker {
        let target = broker::Target::parse(url).map_err(invalid)?;
        let b = broker::start(
            &target,
            handle.clone(),
            broker::RedisLimits {
                history: s.history.size,
                ttl: s.history.ttl,
                max_topics: s.max_topics,
                idempotency_window: s.publish.idempotency_window,
                ack_replicas: s.ack_replicas,
            },
            gateway.stats.clone(),
            broker::PresenceConfig { node: gateway.client_ids.node().to_string(), ttl: s.presence.ttl },
        )
        .map_err(invalid)?;
        let weak = Arc::downgrade(&gateway);
        b.on_control(Box::new(move |command| {
            if let Some(g) = weak.upgrade() {
                control::apply_remote(&g, command);
            }
        }));
        let _ = gateway.broker.set(b);
        let kind = if target.is_cluster() { "a Redis Cluster" } else { "Redis" };
        tracing::info!(broker = %url, "cluster mode: topics are shared through {kind}");
    }
    spawn_sweeper(gateway.clone());
    let (addr, backend, threads) = (server.local_addr(), server.backend(), s.threads);
    let (ws, http) = if s.tls.is_some() { ("wss", "https") } else { ("ws", "http") };
    let running = server.spawn()?;
    let mut stdout = io::stdout();
    writeln!(
        stdout,
        "gale serve listening on {ws}://{addr}{} ({}, {backend} backend); demo page: {http}://{addr}/",
        s.ws_path,
        crate::threads_phrase(threads)
    )?;
    stdout.flush()?;
    running.join()
}

/// Forget idle topics every 10 seconds.
fn spawn_sweeper(gateway: Arc<Gateway>) {
    let _ = std::thread::Builder::new().name("gale-sweeper".into()).spawn(move || {
        loop {
            std::thread::sleep(Duration::from_secs(10));
            let Some(h) = gateway.handle.get() else { continue };
            if h.is_shutting_down() {
                return;
            }
            gateway.topics.sweep(|t| h.num_subscribers(t));
        }
    });
}
