//! One connection's state machine driven without an event loop, for the `conn` fuzz target
//! and its regression test (feature `fuzzing`; not part of the public API).
//!
//! [`Harness`] holds what a loop lends its connections (routes, settings, the buffer pool);
//! [`Probe`] is one connection on one end of a Unix socket pair, driven the way a backend
//! drives it: in [`Mode::Readiness`] as the epoll loop does (writes go to the socket, whose
//! other end the probe reads), in [`Mode::Completion`] as the io_uring loop does (queued bytes
//! are taken for a send that completes when the caller says so).

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::App;
use crate::app::{Backend, Server, ServerConfig};
use crate::behavior::{Behavior, Compression};
use crate::conn::{Conn, ConnCx};
use crate::handler::{Accept, HttpRequest, HttpResponse, Message, Reject, UpgradeRequest, WsHandler};
use crate::link::{Link, Scratch};
use crate::routes::{HttpRoute, Pattern, RouteTicks, Routes, WsRoute};
use crate::timer::ticks;
use crate::websocket::WebSocket;

/// The HTTP route: `GET /healthz` answers `ok\n`.
pub const HTTP_PATH: &str = "/healthz";
/// `POST /body` answers with the request body.
pub const BODY_PATH: &str = "/body";
/// Echo without compression.
pub const ECHO_PATH: &str = "/echo";
/// Echo with permessage-deflate, no context takeover (one codec per loop).
pub const DEFLATE_SHARED_PATH: &str = "/deflate";
/// Echo with permessage-deflate, context takeover (a codec per connection, 9-bit window).
pub const DEFLATE_DEDICATED_PATH: &str = "/deflate-ctx";

/// Largest message the WebSocket routes accept: small, so that 1009 is reachable.
pub const MAX_PAYLOAD: usize = 8 << 10;
/// The WebSocket routes' backpressure limit: small, so that a peer that does not read
/// reaches it.
pub const MAX_BACKPRESSURE: usize = 16 << 10;
/// Largest HTTP request body.
pub const MAX_BODY: usize = 4 << 10;
/// The close timeout in ticks (the idle timeout is longer, the handshake timeout shorter).
pub const CLOSE_TICKS: u32 = 4;

/// Echoes every message; compressed ones come back compressed (threshold 0).
struct Echo;

impl WsHandler for Echo {
    type Data = ();

    fn upgrade(&self, _req: &UpgradeRequest<'_>) -> Result<Accept<()>, Reject> {
        Ok(Accept::new(()))
    }

    fn message(&self, ws: &mut WebSocket<'_, ()>, msg: Message<'_>) {
        ws.send(msg);
    }
}

fn behavior(compression: Compression) -> Behavior {
    Behavior {
        max_payload: MAX_PAYLOAD,
        idle_timeout: Some(Duration::from_secs(60)),
        ping_interval: Some(Duration::from_secs(20)),
        pong_timeout: Duration::from_secs(5),
        max_backpressure: MAX_BACKPRESSURE,
        close_timeout: Duration::from_millis(1000),
        compression,
        compress_min_size: Some(0),
        ..Behavior::default()
    }
}

/// How the backend moves bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// epoll: writes straight to the socket, flush after every read.
    Readiness,
    /// io_uring: one send in flight at a time, taken from the queue.
    Completion,
}

/// Routes, settings and the buffer pool that connections borrow.
pub struct Harness {
    routes: Routes,
    config: ServerConfig,
    pool: Scratch,
    /// Keeps the handle's loop mailboxes alive (nothing runs on them).
    _server: Server,
}

impl Harness {
    /// The routes above, bound to nothing that runs (the server is never started).
    pub fn new() -> std::io::Result<Harness> {
        let config = ServerConfig {
            threads: 1,
            backend: Backend::Epoll,
            handshake_timeout: Duration::from_millis(2000),
            max_body: MAX_BODY,
            ..ServerConfig::default()
        };
        let server = App::new().config(config.clone()).listen("127.0.0.1:0")?;
        let pool = Scratch::new(server.handle(), 0);
        let ws = |path: &str, compression| {
            let behavior = behavior(compression);
            WsRoute {
                pattern: Pattern::parse(path),
                ticks: RouteTicks::of(&behavior),
                behavior,
                handler: Box::new(Echo),
            }
        };
        let http = |method: &str, path: &str, handler: Box<dyn crate::HttpHandler>| HttpRoute {
            method: method.into(),
            pattern: Pattern::parse(path),
            handler,
        };
        let healthz = |_: &HttpRequest<'_>| HttpResponse::text(200, "ok\n");
        let body = |req: &HttpRequest<'_>| HttpResponse::new(200, "application/octet-stream", req.body());
        let routes = Routes {
            ws: vec![
                ws(ECHO_PATH, Compression::Disabled),
                ws(DEFLATE_SHARED_PATH, Compression::Shared),
                ws(DEFLATE_DEDICATED_PATH, Compression::Dedicated { window_bits: 9 }),
            ],
            http: vec![http("GET", HTTP_PATH, Box::new(healthz)), http("POST", BODY_PATH, Box::new(body))],
            errors: Vec::new(),
        };
        Ok(Harness { routes, config, pool, _server: server })
    }

    fn cx(&mut self, now: u32) -> ConnCx<'_> {
        ConnCx {
            routes: &self.routes,
            config: &self.config,
            handshake_ticks: ticks(self.config.handshake_timeout),
            pool: &mut self.pool,
            now,
        }
    }

    /// A new connection at tick 1.
    pub fn connect(&mut self, mode: Mode) -> std::io::Result<Probe> {
        let (ours, peer) = UnixStream::pair()?;
        ours.set_nonblocking(true)?;
        peer.set_nonblocking(true)?;
        // `Link` writes and shuts down through `TcpStream`, whose calls are plain socket calls
        // that work on any stream socket.
        let stream = TcpStream::from(OwnedFd::from(ours));
        let remote = SocketAddr::from(([127, 0, 0, 1], 40000));
        let id = self.pool.next_id(0);
        let conn = Conn::new(Link::new(stream, remote, id), 1);
        Ok(Probe { conn: Some(conn), peer, mode, now: 1, output: Vec::new(), in_flight: None })
    }
}

/// One connection and the peer's end of its socket.
pub struct Probe {
    /// `None` once the backend would have closed the socket.
    conn: Option<Conn>,
    peer: UnixStream,
    mode: Mode,
    now: u32,
    /// Every byte the server wrote, in order.
    output: Vec<u8>,
    /// Completion mode: the send the "kernel" holds.
    in_flight: Option<Vec<u8>>,
}

impl Probe {
    /// Bytes from the peer arrive.
    pub fn input(&mut self, h: &mut Harness, bytes: &[u8]) {
        let Some(conn) = &mut self.conn else { return };
        if conn.should_close() || conn.read_closed {
            return;
        }
        let mut data = bytes.to_vec();
        conn.on_input(&mut data, &mut h.cx(self.now));
        if self.mode == Mode::Readiness && conn.link.flush() {
            conn.drained(&mut h.cx(self.now));
        }
        self.settle(h);
    }

    /// The peer shut down its sending side.
    pub fn eof(&mut self, h: &mut Harness) {
        let Some(conn) = &mut self.conn else { return };
        if conn.read_closed {
            return;
        }
        conn.on_eof(&mut h.cx(self.now));
        self.settle(h);
    }

    /// Readiness: the peer reads what the socket holds, then the socket is writable.
    /// Completion: the send in flight completes, or one starts when none is.
    pub fn writable(&mut self, h: &mut Harness) {
        self.read_peer();
        let Some(conn) = &mut self.conn else { return };
        match self.mode {
            Mode::Readiness => {
                if conn.link.buffered() > 0 {
                    conn.on_writable(&mut h.cx(self.now));
                }
            }
            Mode::Completion => match self.in_flight.take() {
                Some(buf) => {
                    self.output.extend_from_slice(&buf);
                    conn.link.direct = true;
                    if conn.link.sent() {
                        conn.drained(&mut h.cx(self.now));
                    }
                }
                None => {
                    if conn.link.queued() > 0 {
                        let buf = conn.link.take_queued(&mut h.pool);
                        conn.link.direct = false;
                        self.in_flight = Some(buf);
                    }
                }
            },
        }
        self.settle(h);
    }

    /// `n` timer ticks pass; the connection's timer fires if it is due.
    pub fn advance(&mut self, h: &mut Harness, n: u32) {
        self.now = self.now.saturating_add(n);
        let Some(conn) = &mut self.conn else { return };
        conn.on_timer(&mut h.cx(self.now));
        self.settle(h);
    }

    /// The server shuts down.
    pub fn shutdown(&mut self, h: &mut Harness) {
        let Some(conn) = &mut self.conn else { return };
        conn.on_shutdown(&mut h.cx(self.now));
        self.settle(h);
    }

    /// What a backend does after every event: flush (readiness), shut down our side once a
    /// finishing connection has written everything, and close the socket when it is done.
    fn settle(&mut self, h: &mut Harness) {
        let Some(conn) = &mut self.conn else { return };
        if self.mode == Mode::Readiness && conn.link.dirty && !conn.link.blocked && conn.link.flush() {
            conn.drained(&mut h.cx(self.now));
        }
        conn.after_flush(self.now);
        if conn.should_close() {
            conn.on_teardown(&mut h.cx(self.now));
            conn.link.discard(&mut h.pool);
            if let Some(buf) = self.in_flight.take() {
                // The kernel finished the send before the socket closed.
                self.output.extend_from_slice(&buf);
            }
            self.read_peer();
            self.conn = None;
            return;
        }
        conn.link.recycle(&mut h.pool);
    }

    fn read_peer(&mut self) {
        let mut buf = [0u8; 16 << 10];
        while let Ok(n @ 1..) = (&self.peer).read(&mut buf) {
            self.output.extend_from_slice(&buf[..n]);
        }
    }

    /// Run the connection to its end as a patient peer would: read everything, answer nothing,
    /// let timers expire. Returns false if it is still open after `max_ticks`.
    pub fn finish(&mut self, h: &mut Harness, max_ticks: u32) -> bool {
        for _ in 0..max_ticks {
            if self.conn.is_none() {
                return true;
            }
            self.writable(h);
            self.writable(h);
            self.eof(h);
            self.advance(h, 1);
        }
        self.read_peer();
        self.conn.is_none()
    }

    /// Every byte the server has written so far (including what the peer has not read yet
    /// in readiness mode, which is read now).
    pub fn output(&mut self) -> &[u8] {
        self.read_peer();
        &self.output
    }

    /// Bytes the connection holds that the "kernel" has not taken: queued, or in a send in
    /// flight.
    pub fn held(&self) -> usize {
        self.conn.as_ref().map_or(0, |c| c.link.buffered())
    }

    /// Whether the socket is closed.
    pub fn closed(&self) -> bool {
        self.conn.is_none()
    }

    /// Whether the connection has reached the WebSocket phase and is still open for sending.
    pub fn is_open_ws(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.is_open_ws())
    }
}
