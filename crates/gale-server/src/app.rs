//! The application builder, the bound server, and the handle that controls a running server.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use gale_frame::PartialBudget;

use crate::behavior::Behavior;
use crate::handler::{ErrorRenderer, HttpHandler, WsHandler};
use crate::listener::{bind_reuseport, ensure_port_free};
use crate::pubsub::{ConnId, Published, Registry};
use crate::routes::{ErrorRoute, HttpRoute, Pattern, RouteTicks, Routes, WsRoute};
use crate::timer::ticks;
use crate::tls::{TlsAcceptor, TlsFiles};

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
    /// within this time; a deferred answer that has not come within it is replaced by a 503.
    pub handshake_timeout: Duration,
    /// Largest HTTP request body accepted; larger gets 413.
    pub max_body: usize,
    /// Bytes each loop may hold, over all its connections, for WebSocket messages that have
    /// not arrived whole (split across reads or fragmented). A connection whose message would
    /// grow past it is closed with 1013 (try again later) and the others go on; the bytes
    /// come back as messages complete and connections close. Messages that arrive whole in
    /// one read do not count. Default 64 MiB: four messages of the default 16 MiB
    /// `max_payload` in flight at once on each loop, and a bound of 64 MiB per core however
    /// many peers send part of a message and stall.
    pub partial_message_budget: usize,
    /// Size of each loop's receive buffer.
    pub recv_buffer: usize,
    /// io_uring: provided receive buffers per loop (a power of two, at most 32768); `None`:
    /// 32 when they are filled piece by piece, 512 when each receive takes a whole buffer ...
    pub uring_buffers: Option<u16>,
    /// ... and their size; `None`: 64 KiB piece by piece, 16 KiB whole. They are allocated
    /// untouched and become resident as data lands in them.
    pub uring_buffer_size: Option<usize>,
    /// io_uring: the kernel fills each receive buffer piece by piece (`IOU_PBUF_RING_INC`,
    /// Linux 6.12): a receive takes what is waiting, up to what is left of the buffer, and the
    /// next continues after it, so small receives share a buffer, a large one still arrives
    /// whole, and a small ring (one that stays in the CPU's cache) serves a loop. Where the
    /// kernel lacks it, or when off, each receive takes a whole buffer.
    pub uring_incremental: bool,
    /// io_uring: sends of at least this many bytes are zero-copy (`SEND_ZC`: the kernel
    /// reads the buffer in place instead of copying it); 0 turns it off. Off by default: over
    /// loopback the kernel copies anyway, and zero-copy measured slower (docs/BENCHMARKS.md).
    pub uring_send_zc: usize,
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
            partial_message_budget: 64 << 20,
            recv_buffer: 512 * 1024,
            uring_buffers: None,
            uring_buffer_size: None,
            uring_incremental: true,
            uring_send_zc: 0,
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
    tls: Option<TlsFiles>,
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

    /// io_uring: `count` provided receive buffers of `size` bytes per loop, filled piece by
    /// piece when `incremental`. See [`ServerConfig::uring_incremental`].
    pub fn uring_receive_buffers(mut self, count: u16, size: usize, incremental: bool) -> Self {
        self.config.uring_buffers = Some(count);
        self.config.uring_buffer_size = Some(size);
        self.config.uring_incremental = incremental;
        self
    }

    /// io_uring: make sends of at least `bytes` zero-copy (`SEND_ZC`); 0 turns it off. See
    /// [`ServerConfig::uring_send_zc`].
    pub fn uring_send_zc(mut self, bytes: usize) -> Self {
        self.config.uring_send_zc = bytes;
        self
    }

    /// Serve TLS (`wss://`, `https://`) with this certificate chain and key (PEM files, read
    /// when the server is bound; errors name the file and the problem). TLS 1.2 and 1.3, ALPN
    /// `http/1.1`. [`ServerHandle::reload_tls`] reads the files again.
    pub fn tls(mut self, cert: impl Into<std::path::PathBuf>, key: impl Into<std::path::PathBuf>) -> Self {
        self.tls = Some(TlsFiles { cert: cert.into(), key: key.into() });
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

    /// Render the server's own error answers (malformed requests, 404, 405, 411, 413, 417,
    /// 431, refused upgrades) to requests whose path matches `pattern` (exact, or a prefix
    /// ending in `*`) with `renderer`, e.g. as JSON for an API. Patterns are tried in the order
    /// they were added; other paths keep the one-line plain-text answers. A head too malformed
    /// to parse is matched by its request line when that is readable.
    pub fn render_errors<R: ErrorRenderer>(mut self, pattern: &str, renderer: R) -> Self {
        self.routes
            .errors
            .push(ErrorRoute { pattern: Pattern::parse(pattern), renderer: Box::new(renderer) });
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
    /// With port 0, the first listener picks a free port and the others join it. A port that
    /// another socket already listens on (another process, another server of this one) is an
    /// `AddrInUse` error naming the address, not a port shared with it.
    pub fn listen(mut self, addr: impl ToSocketAddrs) -> io::Result<Server> {
        let tls = match self.tls.take() {
            Some(files) => Some(Arc::new(
                TlsAcceptor::new(files).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            )),
            None => None,
        };
        self.config.backend = self.config.backend.resolve()?;
        let addr = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "address resolves to nothing"))?;
        let threads = self.config.threads.max(1);
        ensure_port_free(addr)?;
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
            mailboxes.push(Mailbox { tx, waker, woken: AtomicBool::new(false) });
            seeds.push(LoopSeed { index, io, listener, rx });
        }
        let stats = (0..threads).map(|_| LoopStats::default()).collect();
        let budgets = (0..threads).map(|_| PartialBudget::new(self.config.partial_message_budget)).collect();
        let handle = ServerHandle {
            inner: Arc::new(HandleInner {
                mailboxes,
                shutting_down: AtomicBool::new(false),
                stats,
                budgets,
                registry: Arc::new(Registry::new(threads)),
                publishes: AtomicU64::new(0),
                tls: tls.clone(),
            }),
        };
        let handshake_ticks = ticks(self.config.handshake_timeout);
        let shared = Arc::new(Shared { routes: self.routes, config: self.config, handshake_ticks, tls });
        Ok(Server { shared, seeds, handle, local_addr })
    }
}

/// What every loop shares: the routes and the settings.
pub(crate) struct Shared {
    pub(crate) routes: Routes,
    pub(crate) config: ServerConfig,
    /// The handshake timeout in timer ticks.
    pub(crate) handshake_ticks: u32,
    /// TLS, when configured.
    pub(crate) tls: Option<Arc<TlsAcceptor>>,
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
    /// Deliver a published message to the loop's subscribers.
    Publish(Arc<Published>),
    /// Run a closure on one WebSocket connection (skipped if it has gone).
    RunOn(ConnId, OnConn),
    /// Subscribe one connection to a topic counted by `Registry::prepare`.
    Subscribe(ConnId, Arc<str>, Arc<crate::pubsub::TopicGlobal>, u64),
    /// A deferred HTTP response.
    Respond(ConnId, crate::handler::HttpResponse),
}

/// A closure posted to a connection, with the connection's data type erased.
pub(crate) type OnConn = Box<dyn FnOnce(&mut crate::WebSocket<'_, crate::websocket::AnyData>) + Send>;

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
    /// Tasks wait that the loop has not started to read: a wake is on its way (senders need
    /// not wake it again: one eventfd write per batch of tasks, not per task), or the loop
    /// posted them itself and runs them before it next waits (see [`Mailbox::wake`]).
    woken: AtomicBool,
}

impl Mailbox {
    fn post(&self, task: Task) -> Result<(), LoopGone> {
        self.tx.send(task).map_err(|_| LoopGone)?;
        self.wake()
    }

    /// Wake the loop unless a wake is already on its way. The loop's own thread only notes
    /// that tasks wait: the loop runs them before it next waits for events, so the eventfd
    /// write (a system call, and an event to read back) would buy nothing.
    fn wake(&self) -> Result<(), LoopGone> {
        if OWN_MAILBOX.get() == std::ptr::from_ref(self).addr() {
            self.woken.store(true, Ordering::SeqCst);
            return Ok(());
        }
        if !self.woken.swap(true, Ordering::SeqCst)
            && let Err(_e) = self.waker.wake()
        {
            // No wake went out: the next post must try again.
            self.woken.store(false, Ordering::SeqCst);
            return Err(LoopGone);
        }
        Ok(())
    }
}

/// Loops (a server's handle and a loop's index) that were handed publishes and are owed a
/// wake, each once.
type Unwoken = Vec<(Arc<HandleInner>, usize)>;

thread_local! {
    /// Inside [`Handle::batched`] on this thread: the loops owed a wake.
    static UNWOKEN: RefCell<Option<Unwoken>> = const { RefCell::new(None) };
    /// The address of the mailbox of the loop this thread runs (0: none); see [`Mailbox::wake`].
    static OWN_MAILBOX: Cell<usize> = const { Cell::new(0) };
}

/// Counters a loop publishes for other threads.
#[derive(Default)]
pub(crate) struct LoopStats {
    pub(crate) connections: AtomicUsize,
    pub(crate) messages_in: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) reads_paused: AtomicU64,
    pub(crate) backpressure_timeouts: AtomicU64,
    pub(crate) zero_copy_sends: AtomicU64,
    pub(crate) receive_buffer_shortages: AtomicU64,
}

impl LoopStats {
    /// Copy a loop's counters (called by the loop itself, once per iteration).
    pub(crate) fn store(&self, connections: usize, c: &crate::link::Counters) {
        self.connections.store(connections, Ordering::Relaxed);
        self.messages_in.store(c.messages_in, Ordering::Relaxed);
        self.bytes_in.store(c.bytes_in, Ordering::Relaxed);
        self.messages_out.store(c.messages_out, Ordering::Relaxed);
        self.bytes_out.store(c.bytes_out, Ordering::Relaxed);
        self.dropped.store(c.dropped, Ordering::Relaxed);
        self.reads_paused.store(c.reads_paused, Ordering::Relaxed);
        self.backpressure_timeouts.store(c.backpressure_timeouts, Ordering::Relaxed);
        self.zero_copy_sends.store(c.zero_copy_sends, Ordering::Relaxed);
        self.receive_buffer_shortages.store(c.receive_buffer_shortages, Ordering::Relaxed);
    }
}

/// A snapshot of one loop's counters (totals since start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopSnapshot {
    /// Connections open now (HTTP and WebSocket).
    pub connections: usize,
    /// WebSocket data messages received.
    pub messages_in: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// WebSocket data messages queued for sending (published ones included).
    pub messages_out: u64,
    /// Bytes of those messages, framed.
    pub bytes_out: u64,
    /// Messages refused because a connection was past its `max_backpressure`.
    pub dropped: u64,
    /// Times a connection stopped being read because the bytes it held (unsent data,
    /// control frames, TLS records, sends in flight) passed its `max_backpressure`.
    pub reads_paused: u64,
    /// Connections dropped because they stayed past `max_backpressure` (unread) for
    /// `Behavior::backpressure_timeout`.
    pub backpressure_timeouts: u64,
    /// io_uring: sends made zero-copy (`ServerConfig::uring_send_zc`).
    pub zero_copy_sends: u64,
    /// io_uring: receives that found every provided buffer in use (the connection waits for
    /// the loop to hand buffers back, its data staying in the socket meanwhile).
    pub receive_buffer_shortages: u64,
    /// Bytes held now for messages not yet received whole, out of
    /// [`ServerConfig::partial_message_budget`].
    pub partial_message_bytes: usize,
}

struct HandleInner {
    mailboxes: Vec<Mailbox>,
    shutting_down: AtomicBool,
    stats: Vec<LoopStats>,
    /// Each loop's budget for unfinished messages.
    budgets: Vec<PartialBudget>,
    registry: Arc<Registry>,
    publishes: AtomicU64,
    tls: Option<Arc<TlsAcceptor>>,
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

    /// Loop `index`'s budget for unfinished messages.
    pub(crate) fn partial_budget(&self, index: usize) -> PartialBudget {
        self.inner.budgets[index].clone()
    }

    /// The counters of loop `index` (modulo the number of loops).
    pub fn loop_stats(&self, index: usize) -> LoopSnapshot {
        let s = &self.inner.stats[index % self.inner.stats.len()];
        LoopSnapshot {
            connections: s.connections.load(Ordering::Relaxed),
            messages_in: s.messages_in.load(Ordering::Relaxed),
            bytes_in: s.bytes_in.load(Ordering::Relaxed),
            messages_out: s.messages_out.load(Ordering::Relaxed),
            bytes_out: s.bytes_out.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            reads_paused: s.reads_paused.load(Ordering::Relaxed),
            backpressure_timeouts: s.backpressure_timeouts.load(Ordering::Relaxed),
            zero_copy_sends: s.zero_copy_sends.load(Ordering::Relaxed),
            receive_buffer_shortages: s.receive_buffer_shortages.load(Ordering::Relaxed),
            partial_message_bytes: self.inner.budgets[index % self.inner.budgets.len()].held(),
        }
    }

    pub(crate) fn registry(&self) -> Arc<Registry> {
        self.inner.registry.clone()
    }

    /// Loop `index` runs on this thread: the tasks this thread posts to it need no wake.
    pub(crate) fn claim_mailbox(&self, index: usize) {
        OWN_MAILBOX.set(std::ptr::from_ref(&self.inner.mailboxes[index]).addr());
    }

    /// Whether loop `index` has tasks it has not started to run (posted from its own thread,
    /// or with a wake on its way).
    #[inline]
    pub(crate) fn has_tasks(&self, index: usize) -> bool {
        self.inner.mailboxes[index].woken.load(Ordering::Relaxed)
    }

    /// The loop has started reading its mailbox: the next task needs a new wake.
    pub(crate) fn awake(&self, index: usize) {
        self.inner.mailboxes[index].woken.swap(false, Ordering::SeqCst);
    }

    /// Publish a text message to `topic` from any thread. Returns the number of loops it was
    /// handed to (0: nobody is subscribed). Subscribers get it in the order of the calls made
    /// by one thread; calls racing on several threads should be ordered by the caller (the
    /// gateway holds a per-topic lock).
    pub fn publish_text(&self, topic: &str, text: &str) -> usize {
        self.publish(topic, gale_frame::OpCode::Text, text.as_bytes(), true, None)
    }

    /// Publish a text message to `topic` from any thread to every subscriber but `exclude`
    /// (the connection it came from; see [`publish_text`](Self::publish_text)).
    pub fn publish_text_except(&self, topic: &str, text: &str, exclude: ConnId) -> usize {
        self.publish(topic, gale_frame::OpCode::Text, text.as_bytes(), true, Some(exclude))
    }

    /// Publish a binary message to `topic` from any thread (see [`publish_text`](Self::publish_text)).
    pub fn publish_binary(&self, topic: &str, data: &[u8]) -> usize {
        self.publish(topic, gale_frame::OpCode::Binary, data, true, None)
    }

    /// Publish with every option: the opcode (text or binary), whether subscribers that
    /// negotiated compression may get it compressed, and a connection not to deliver to.
    pub fn publish(
        &self,
        topic: &str,
        opcode: gale_frame::OpCode,
        payload: &[u8],
        compress: bool,
        exclude: Option<ConnId>,
    ) -> usize {
        self.inner.publishes.fetch_add(1, Ordering::Relaxed);
        if self.inner.registry.subscribers(topic) == 0 {
            return 0;
        }
        // Framed before the registry's lock is taken, so that a large message does not hold
        // up subscriptions on other threads.
        let mut framed = Some(Published::new(Arc::from(topic), opcode, payload, compress, exclude));
        let mut msg: Option<Arc<Published>> = None;
        let mut loops = 0;
        self.inner.registry.route(topic, |serial, index| {
            let m = msg.get_or_insert_with(|| {
                let mut p = framed.take().expect("framed once, wrapped once");
                p.serial = serial;
                Arc::new(p)
            });
            if self.hand_over(index, Task::Publish(m.clone())).is_ok() {
                loops += 1;
            }
        });
        loops
    }

    /// Post a publish to loop `index`: woken now, or at the end of [`batched`](Self::batched).
    fn hand_over(&self, index: usize, task: Task) -> Result<(), LoopGone> {
        let mailbox = &self.inner.mailboxes[index];
        let deferred = UNWOKEN.with_borrow_mut(|unwoken| {
            let unwoken = unwoken.as_mut()?;
            if !unwoken.iter().any(|(inner, i)| *i == index && Arc::ptr_eq(inner, &self.inner)) {
                unwoken.push((self.inner.clone(), index));
            }
            Some(())
        });
        match deferred {
            Some(()) => mailbox.tx.send(task).map_err(|_| LoopGone),
            None => mailbox.post(task),
        }
    }

    /// Run `f`, in which this thread publishes a run of messages (a broker forwarding what it
    /// received in one read), waking each loop that gets one of them once, when `f` returns,
    /// rather than at the first: a loop woken at the first would start delivering while the
    /// rest still come, and go back to sleep to be woken again, a wake-up and two context
    /// switches for every few messages. The messages are in the loops' mailboxes as each call
    /// returns (ordered as usual); only the wakes wait. Nested calls wake at the outermost.
    pub fn batched<R>(&self, f: impl FnOnce() -> R) -> R {
        /// Wakes the owed loops when `batched` ends, also by a panic in `f`.
        struct WakeOnDrop;
        impl Drop for WakeOnDrop {
            fn drop(&mut self) {
                for (inner, index) in UNWOKEN.take().unwrap_or_default() {
                    let _ = inner.mailboxes[index].wake();
                }
            }
        }
        let nested = UNWOKEN.with_borrow_mut(|unwoken| {
            let nested = unwoken.is_some();
            unwoken.get_or_insert_with(Vec::new);
            nested
        });
        if nested {
            return f();
        }
        let _wake = WakeOnDrop;
        f()
    }

    /// Run `f` on connection `conn`, on its loop, between two event batches, as if inside one
    /// of its handler calls (sends are corked with the rest of the batch). Nothing happens if
    /// the connection has closed by then or its data is not a `D`. Use it to answer a client
    /// once work done on another thread is finished.
    pub fn post_to<D: Send + 'static>(
        &self,
        conn: ConnId,
        f: impl FnOnce(&mut crate::WebSocket<'_, D>) + Send + 'static,
    ) -> Result<(), LoopGone> {
        let erased: OnConn = Box::new(move |ws| {
            if let Some(mut typed) = ws.downcast::<D>() {
                f(&mut typed);
            }
        });
        self.mailbox(conn)?.post(Task::RunOn(conn, erased))
    }

    /// Subscribe connection `conn` to `topic` from any thread. Every message published after
    /// this returns reaches the connection (and none from before): publishes are routed to its
    /// loop at once, and the loop adds the connection before it delivers them. Nothing happens
    /// if the connection has closed by then.
    pub fn subscribe(&self, conn: ConnId, topic: &str) -> Result<(), LoopGone> {
        let mailbox = self.mailbox(conn)?;
        let name: Arc<str> = Arc::from(topic);
        let mut posted = Ok(());
        self.inner.registry.prepare(&name, conn.loop_index(), |global, since| {
            posted = mailbox.post(Task::Subscribe(conn, name.clone(), global, since));
        });
        posted
    }

    /// Deliver the answer to a deferred HTTP request.
    pub(crate) fn respond(
        &self,
        conn: ConnId,
        response: crate::handler::HttpResponse,
    ) -> Result<(), LoopGone> {
        self.mailbox(conn)?.post(Task::Respond(conn, response))
    }

    fn mailbox(&self, conn: ConnId) -> Result<&Mailbox, LoopGone> {
        self.inner.mailboxes.get(conn.loop_index()).ok_or(LoopGone)
    }

    /// Subscribers of `topic` over all loops.
    pub fn num_subscribers(&self, topic: &str) -> usize {
        self.inner.registry.subscribers(topic)
    }

    /// Topics with at least one subscriber.
    pub fn num_topics(&self) -> usize {
        self.inner.registry.topic_count()
    }

    /// Publishes so far (including those nobody was subscribed to).
    pub fn publishes(&self) -> u64 {
        self.inner.publishes.load(Ordering::Relaxed)
    }

    /// Graceful shutdown: stop accepting, send close 1001 to every WebSocket, finish HTTP
    /// responses, and let the loops exit once their connections are gone (or after
    /// [`ServerConfig::shutdown_timeout`]).
    pub fn shutdown(&self) {
        if self.inner.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        for m in &self.inner.mailboxes {
            let _ = m.post(Task::Shutdown);
        }
    }

    /// Read the TLS certificate and key again; new handshakes use them, open connections keep
    /// theirs. An error (unreadable or mismatched files) leaves the current certificate in
    /// place. `Ok(false)` when the server has no TLS.
    pub fn reload_tls(&self) -> Result<bool, String> {
        match &self.inner.tls {
            Some(acceptor) => acceptor.reload().map(|()| true),
            None => Ok(false),
        }
    }

    /// Whether the server speaks TLS.
    pub fn is_tls(&self) -> bool {
        self.inner.tls.is_some()
    }

    /// Reload the TLS certificate on every SIGHUP (logging the outcome).
    pub fn reload_tls_on_sighup(&self) -> io::Result<()> {
        let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
        let handle = self.clone();
        std::thread::Builder::new().name("gale-sighup".into()).spawn(move || {
            for _ in signals.forever() {
                match handle.reload_tls() {
                    Ok(true) => tracing::info!("SIGHUP: TLS certificate reloaded"),
                    Ok(false) => tracing::info!("SIGHUP: no TLS configured, nothing to reload"),
                    Err(e) => tracing::error!("SIGHUP: TLS certificate not reloaded: {e}"),
                }
            }
        })?;
        Ok(())
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
        self.inner.mailboxes[index % self.inner.mailboxes.len()].post(Task::Run(Box::new(f)))
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
                    handle.claim_mailbox(seed.index);
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
