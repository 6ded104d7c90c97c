//! The application builder, the bound server, and the handle that controls a running server.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};

use crate::behavior::Behavior;
use crate::handler::{HttpHandler, WsHandler};
use crate::listener::bind_reuseport;
use crate::routes::{HttpRoute, Pattern, RouteTicks, Routes, WsRoute};
use crate::timer::ticks;

/// Which event-loop implementation runs the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    /// Readiness-based loops on epoll, through `mio`.
    Epoll,
    /// Completion-based loops on io_uring: multishot accept and receive into a ring of
    /// provided buffers, one send per connection per iteration.
    Uring,
    /// io_uring when this kernel allows it, else epoll (with a log line saying why).
    #[default]
    Auto,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Epoll => "epoll",
            Backend::Uring => "io_uring",
            Backend::Auto => "auto",
        })
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "epoll" => Ok(Backend::Epoll),
            "uring" | "io_uring" => Ok(Backend::Uring),
            "auto" => Ok(Backend::Auto),
            other => Err(format!("unknown backend {other:?}: expected epoll, uring or auto")),
        }
    }
}

impl Backend {
    /// The backend to run: `Auto` resolved by probing io_uring once; a forced `Uring` that
    /// the kernel cannot run is an error naming the reason.
    pub fn resolve(self) -> io::Result<Backend> {
        match self {
            Backend::Epoll => Ok(Backend::Epoll),
            Backend::Uring => match crate::backend::probe_uring() {
                Ok(()) => Ok(Backend::Uring),
                Err(why) => {
                    Err(io::Error::new(io::ErrorKind::Unsupported, format!("io_uring is unavailable: {why}")))
                }
            },
            Backend::Auto => match crate::backend::probe_uring() {
                Ok(()) => Ok(Backend::Uring),
                Err(why) => {
                    tracing::info!("io_uring unavailable ({why}); using epoll");
                    Ok(Backend::Epoll)
                }
            },
        }
    }
}

/// Server-wide settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Event loops (threads); each has its own listener on the same port.
    pub threads: usize,
    /// Pin loop `i` to core `i % cores`.
    pub pin_threads: bool,
    /// Close a connection that has not finished an HTTP request (or an idle keep-alive one)
    /// within this time.
    pub handshake_timeout: Duration,
    /// Largest HTTP request body accepted; larger gets 413.
    pub max_body: usize,
    /// Size of each loop's receive buffer.
    pub recv_buffer: usize,
    /// io_uring: provided receive buffers per loop (a power of two, at most 32768) ...
    pub uring_buffers: u16,
    /// ... and their size. They are allocated untouched and become resident as data lands in
    /// them; a receive completes with at most one buffer.
    pub uring_buffer_size: usize,
    /// On shutdown, how long to wait for clients to answer the close before dropping them.
    pub shutdown_timeout: Duration,
    /// Listen backlog.
    pub backlog: i32,
    /// The event-loop implementation.
    pub backend: Backend,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pin_threads: false,
            handshake_timeout: Duration::from_secs(10),
            max_body: 1 << 20,
            recv_buffer: 512 * 1024,
            uring_buffers: 512,
            uring_buffer_size: 16 * 1024,
            shutdown_timeout: Duration::from_secs(5),
            backlog: 4096,
            backend: Backend::Auto,
        }
    }
}

/// Builds a server: routes and settings, then [`listen`](App::listen).
///
/// ```no_run
/// use gale_server::{Accept, App, Behavior, HttpResponse, Message, Reject, UpgradeRequest, WebSocket, WsHandler};
///
/// struct Echo;
/// impl WsHandler for Echo {
///     type Data = ();
///     fn upgrade(&self, _req: &UpgradeRequest<'_>) -> Result<Accept<()>, Reject> {
///         Ok(Accept::new(()))
///     }
///     fn message(&self, ws: &mut WebSocket<'_, ()>, msg: Message<'_>) {
///         ws.send(msg);
///     }
/// }
///
/// let server = App::new()
///     .ws("/echo", Behavior::default(), Echo)
///     .get("/healthz", |_req: &gale_server::HttpRequest<'_>| HttpResponse::text(200, "ok\n"))
///     .listen("127.0.0.1:9001")?;
/// server.run()?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Default)]
pub struct App {
    config: ServerConfig,
    routes: Routes,
}

impl App {
    /// An app with default settings and no routes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replace the server settings.
    pub fn config(mut self, config: ServerConfig) -> Self {
        self.config = config;
        self
    }

    /// Set the number of event loops.
    pub fn threads(mut self, threads: usize) -> Self {
        self.config.threads = threads.max(1);
        self
    }

    /// Choose the event-loop implementation.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.config.backend = backend;
        self
    }

    /// Add a WebSocket route. `pattern` is an exact path or a prefix ending in `*`.
    pub fn ws<H: WsHandler>(mut self, pattern: &str, behavior: Behavior, handler: H) -> Self {
        self.routes.ws.push(WsRoute {
            pattern: Pattern::parse(pattern),
            ticks: RouteTicks::of(&behavior),
            behavior,
            handler: Box::new(handler),
        });
        self
    }

    /// Add an HTTP route for `method` (HEAD requests are served by GET routes).
    pub fn route<H: HttpHandler>(mut self, method: &str, pattern: &str, handler: H) -> Self {
        self.routes.http.push(HttpRoute {
            method: method.to_ascii_uppercase(),
            pattern: Pattern::parse(pattern),
            handler: Box::new(handler),
        });
        self
    }

    /// Add a GET route.
    pub fn get<H: HttpHandler>(self, pattern: &str, handler: H) -> Self {
        self.route("GET", pattern, handler)
    }

    /// Add a POST route.
    pub fn post<H: HttpHandler>(self, pattern: &str, handler: H) -> Self {
        self.route("POST", pattern, handler)
    }

    /// Bind one listener per loop on `addr` (`SO_REUSEPORT`, so the kernel spreads accepts).
    /// With port 0, the first listener picks a free port and the others join it.
    pub fn listen(mut self, addr: impl ToSocketAddrs) -> io::Result<Server> {
        self.config.backend = self.config.backend.resolve()?;
        let addr = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "address resolves to nothing"))?;
        let threads = self.config.threads.max(1);
        let first = bind_reuseport(addr, self.config.backlog)?;
        let local_addr = first.local_addr()?;
        let mut listeners = vec![first];
        for _ in 1..threads {
            listeners.push(bind_reuseport(local_addr, self.config.backlog)?);
        }
        let mut seeds = Vec::with_capacity(threads);
        let mut mailboxes = Vec::with_capacity(threads);
        for (index, listener) in listeners.into_iter().enumerate() {
            let (io, waker) = match self.config.backend {
                Backend::Uring => {
                    let fd = crate::backend::eventfd()?;
                    (LoopIo::Uring(fd.clone()), Waker::EventFd(fd))
                }
                _ => {
                    let poll = mio::Poll::new()?;
                    let waker = mio::Waker::new(poll.registry(), crate::backend::WAKER)?;
                    (LoopIo::Epoll(poll), Waker::Mio(waker))
                }
            };
            let (tx, rx) = crossbeam_channel::unbounded();
            mailboxes.push(Mailbox { tx, waker });
            seeds.push(LoopSeed { index, io, listener, rx });
        }
        let stats = (0..threads).map(|_| LoopStats::default()).collect();
        let handle = ServerHandle {
            inner: Arc::new(HandleInner { mailboxes, shutting_down: AtomicBool::new(false), stats }),
        };
        let handshake_ticks = ticks(self.config.handshake_timeout);
        let shared = Arc::new(Shared { routes: self.routes, config: self.config, handshake_ticks });
        Ok(Server { shared, seeds, handle, local_addr })
    }
}

/// What every loop shares: the routes and the settings.
pub(crate) struct Shared {
    pub(crate) routes: Routes,
    pub(crate) config: ServerConfig,
    /// The handshake timeout in timer ticks.
    pub(crate) handshake_ticks: u32,
}

/// Everything one loop thread starts from.
pub(crate) struct LoopSeed {
    pub(crate) index: usize,
    pub(crate) io: LoopIo,
    pub(crate) listener: std::net::TcpListener,
    pub(crate) rx: Receiver<Task>,
}

/// The backend-specific half of a loop's start: its poller, or the eventfd that wakes it.
pub(crate) enum LoopIo {
    Epoll(mio::Poll),
    Uring(Arc<std::os::fd::OwnedFd>),
    /// Moved out into the running loop.
    Taken,
}

/// Wakes a loop from another thread.
enum Waker {
    Mio(mio::Waker),
    EventFd(Arc<std::os::fd::OwnedFd>),
}

impl Waker {
    fn wake(&self) -> io::Result<()> {
        match self {
            Waker::Mio(w) => w.wake(),
            Waker::EventFd(fd) => crate::backend::signal_eventfd(fd),
        }
    }
}

/// Work sent to a loop from another thread.
pub(crate) enum Task {
    /// Stop accepting, close every connection with 1001, exit once they are gone.
    Shutdown,
    /// Run a closure on the loop.
    Run(Box<dyn FnOnce(&mut LoopContext) + Send>),
}

/// What a closure posted to a loop can see of it.
pub struct LoopContext {
    pub(crate) index: usize,
    pub(crate) connections: usize,
}

impl LoopContext {
    /// The loop's index, from 0.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Connections this loop holds.
    pub fn connections(&self) -> usize {
        self.connections
    }
}

struct Mailbox {
    tx: Sender<Task>,
    waker: Waker,
}

/// Counters a loop publishes for other threads.
#[derive(Default)]
pub(crate) struct LoopStats {
    pub(crate) connections: AtomicUsize,
}

struct HandleInner {
    mailboxes: Vec<Mailbox>,
    shutting_down: AtomicBool,
    stats: Vec<LoopStats>,
}

/// Controls a server from any thread: shut it down, run work on its loops.
#[derive(Clone)]
pub struct ServerHandle {
    inner: Arc<HandleInner>,
}

/// The loop is gone (the server stopped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoopGone;

impl std::fmt::Display for LoopGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the event loop has stopped")
    }
}

impl std::error::Error for LoopGone {}

impl ServerHandle {
    /// Number of event loops.
    pub fn loops(&self) -> usize {
        self.inner.mailboxes.len()
    }

    /// Connections currently open, over all loops.
    pub fn connections(&self) -> usize {
        self.inner.stats.iter().map(|s| s.connections.load(Ordering::Relaxed)).sum()
    }

    pub(crate) fn stats(&self, index: usize) -> &LoopStats {
        &self.inner.stats[index]
    }

    /// Graceful shutdown: stop accepting, send close 1001 to every WebSocket, finish HTTP
    /// responses, and let the loops exit once their connections are gone (or after
    /// [`ServerConfig::shutdown_timeout`]).
    pub fn shutdown(&self) {
        if self.inner.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        for m in &self.inner.mailboxes {
            let _ = m.tx.send(Task::Shutdown);
            let _ = m.waker.wake();
        }
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// Run `f` on loop `index` (modulo the number of loops), between two event batches.
    pub fn post(
        &self,
        index: usize,
        f: impl FnOnce(&mut LoopContext) + Send + 'static,
    ) -> Result<(), LoopGone> {
        let m = &self.inner.mailboxes[index % self.inner.mailboxes.len()];
        m.tx.send(Task::Run(Box::new(f))).map_err(|_| LoopGone)?;
        m.waker.wake().map_err(|_| LoopGone)
    }

    /// Shut down gracefully on the first SIGINT or SIGTERM; exit at once on a second one.
    pub fn shutdown_on_signals(&self) -> io::Result<()> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
        let handle = self.clone();
        std::thread::Builder::new().name("gale-signals".into()).spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                if seen == 1 {
                    tracing::info!(signal, "shutting down: closing connections with 1001");
                    handle.shutdown();
                } else {
                    tracing::warn!(signal, "second signal: exiting now");
                    std::process::exit(130);
                }
            }
        })?;
        Ok(())
    }
}

/// A server with its listeners bound, ready to run.
pub struct Server {
    shared: Arc<Shared>,
    seeds: Vec<LoopSeed>,
    handle: ServerHandle,
    local_addr: SocketAddr,
}

impl Server {
    /// The address the listeners are bound to (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle to control the server once it runs.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// The backend the server will run on.
    pub fn backend(&self) -> Backend {
        self.shared.config.backend
    }

    /// Start the loops on their own threads. Returns once every loop is set up and accepting,
    /// or with the first loop's setup error.
    pub fn spawn(self) -> io::Result<Running> {
        let cores = if self.shared.config.pin_threads { core_affinity::get_core_ids() } else { None };
        let mut threads = Vec::with_capacity(self.seeds.len());
        let (ready_tx, ready_rx) = crossbeam_channel::unbounded::<io::Result<()>>();
        let count = self.seeds.len();
        for seed in self.seeds {
            let shared = self.shared.clone();
            let handle = self.handle.clone();
            let ready = ready_tx.clone();
            let core = cores.as_ref().filter(|c| !c.is_empty()).map(|c| c[seed.index % c.len()]);
            let thread =
                std::thread::Builder::new().name(format!("gale-loop-{}", seed.index)).spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    match crate::backend::Loop::new(seed, shared, handle) {
                        Ok(lp) => {
                            let _ = ready.send(Ok(()));
                            lp.run()
                        }
                        Err(e) => {
                            let _ = ready.send(Err(io::Error::new(e.kind(), e.to_string())));
                            Err(e)
                        }
                    }
                })?;
            threads.push(thread);
        }
        let running = Running { handle: self.handle, threads };
        for _ in 0..count {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    running.handle.shutdown();
                    let _ = running.join();
                    return Err(e);
                }
                Err(_) => return Err(io::Error::other("an event loop thread ended during setup")),
            }
        }
        Ok(running)
    }

    /// Run until the server is shut down.
    pub fn run(self) -> io::Result<()> {
        self.spawn()?.join()
    }
}

/// A server whose loops are running.
pub struct Running {
    handle: ServerHandle,
    threads: Vec<JoinHandle<io::Result<()>>>,
}

impl Running {
    /// A handle to control the server.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Wait for every loop to exit; the first error wins.
    pub fn join(self) -> io::Result<()> {
        let mut result = Ok(());
        for t in self.threads {
            let r = t.join().unwrap_or_else(|_| Err(io::Error::other("an event loop panicked")));
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}
