//! Shared pieces of the `gale-server` integration tests.
//!
//! - [`TestServer`]: an [`App`] listening on a free loopback port, run on its own threads and
//!   stopped with a bounded wait.
//! - [`Client`]: a blocking WebSocket client on `std::net::TcpStream` and `gale-frame`, which
//!   sends masked frames and decodes the server's frames with a client-side [`Decoder`].
//! - [`Recorder`]: a WebSocket handler that records every callback in a [`Log`], with the
//!   reaction to messages supplied by each test.
//! - A small HTTP/1.1 exchange for plain routes.
//!
//! Every read has a timeout and every wait is bounded by [`PATIENCE`], so a broken server
//! fails a test instead of hanging it.

#![allow(dead_code)]

use std::fmt::Debug;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gale_frame::handshake::{ClientHandshake, ClientHandshakeError, ServerResponse};
use gale_frame::{CloseCode, ClosePayload, Decoder, DecoderConfig, Event, FrameSpec, OpCode, append_frame};
use gale_server::{
    Accept, App, Message, Reject, Running, SendStatus, ServerHandle, UpgradeRequest, WebSocket, WsHandler,
};

/// The longest any single wait in a test may take. Generous, because the machine is shared and
/// may be loaded; a healthy server answers within milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Poll `done` until it holds; panics with `what` after [`PATIENCE`].
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Assert that `elapsed` lies in `range` (bounds in seconds), naming what was measured.
pub fn assert_between(what: &str, elapsed: Duration, range: std::ops::RangeInclusive<f64>) {
    let secs = elapsed.as_secs_f64();
    assert!(range.contains(&secs), "{what} took {secs:.3} s, expected between {:?} s", range);
}

// ---------------------------------------------------------------------------------------------
// Recording callbacks
// ---------------------------------------------------------------------------------------------

/// An append-only list shared between the server's loop threads and the test thread, which can
/// wait for it to reach a state.
pub struct Log<T> {
    inner: Arc<(Mutex<Vec<T>>, Condvar)>,
}

impl<T> Clone for Log<T> {
    fn clone(&self) -> Self {
        Log { inner: self.inner.clone() }
    }
}

impl<T: Clone + Debug> Default for Log<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Clone + Debug> Log<T> {
    pub fn new() -> Self {
        Log { inner: Arc::new((Mutex::new(Vec::new()), Condvar::new())) }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<T>> {
        // A panicking handler poisons the lock; the entries are still worth showing.
        self.inner.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, item: T) {
        self.lock().push(item);
        self.inner.1.notify_all();
    }

    pub fn snapshot(&self) -> Vec<T> {
        self.lock().clone()
    }

    /// Wait until `done` holds for the entries and return them; panics after [`PATIENCE`].
    pub fn wait_for(&self, what: &str, done: impl Fn(&[T]) -> bool) -> Vec<T> {
        let deadline = Instant::now() + PATIENCE;
        let mut items = self.lock();
        while !done(&items) {
            let now = Instant::now();
            assert!(now < deadline, "timed out waiting for {what}; log: {:?}", *items);
            items = self.inner.1.wait_timeout(items, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        items.clone()
    }
}

/// A callback seen by a [`Recorder`], tagged with the id of the connection's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ev {
    Open {
        id: usize,
    },
    Text {
        id: usize,
        text: String,
    },
    Binary {
        id: usize,
        data: Vec<u8>,
    },
    /// `buffered` is `buffered_amount()` inside the callback: the automatic pong is queued.
    Ping {
        id: usize,
        payload: Vec<u8>,
        buffered: usize,
    },
    Pong {
        id: usize,
        payload: Vec<u8>,
    },
    Drain {
        id: usize,
    },
    /// `messages` is the per-connection counter kept in the data; `late_send` is what a send
    /// from inside `close` returned.
    Close {
        id: usize,
        code: u16,
        reason: String,
        messages: usize,
        late_send: SendStatus,
    },
}

impl Ev {
    pub fn id(&self) -> usize {
        match self {
            Ev::Open { id }
            | Ev::Text { id, .. }
            | Ev::Binary { id, .. }
            | Ev::Ping { id, .. }
            | Ev::Pong { id, .. }
            | Ev::Drain { id }
            | Ev::Close { id, .. } => *id,
        }
    }
}

impl Log<Ev> {
    /// Wait for the `close` callback of connection `id`; returns its code and reason.
    pub fn wait_close(&self, id: usize) -> (u16, String) {
        let events = self.wait_for(&format!("close of connection {id}"), |evs| {
            evs.iter().any(|e| matches!(e, Ev::Close { id: i, .. } if *i == id))
        });
        events
            .into_iter()
            .find_map(|e| match e {
                Ev::Close { id: i, code, reason, .. } if i == id => Some((code, reason)),
                _ => None,
            })
            .expect("found above")
    }

    /// The callbacks of connection `id`, in order.
    pub fn of(&self, id: usize) -> Vec<Ev> {
        self.snapshot().into_iter().filter(|e| e.id() == id).collect()
    }

    /// Once the server has stopped (no callback can come any more): every connection that
    /// opened saw `open` first, then exactly one `close`, last, in which sends were refused.
    pub fn assert_lifecycles(&self) {
        let events = self.snapshot();
        let mut ids: Vec<usize> = events.iter().map(Ev::id).collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            let evs: Vec<&Ev> = events.iter().filter(|e| e.id() == id).collect();
            assert_eq!(evs.first(), Some(&&Ev::Open { id }), "connection {id} must start with open: {evs:?}");
            let opens = evs.iter().filter(|e| matches!(e, Ev::Open { .. })).count();
            assert_eq!(opens, 1, "connection {id} opened more than once: {evs:?}");
            let closes = evs.iter().filter(|e| matches!(e, Ev::Close { .. })).count();
            assert_eq!(closes, 1, "connection {id} must see close exactly once: {evs:?}");
            let Some(Ev::Close { late_send, .. }) = evs.last() else {
                panic!("close must be the last callback of connection {id}: {evs:?}");
            };
            assert_eq!(*late_send, SendStatus::Closed, "a send from inside close must be refused");
        }
    }
}

/// Per-connection data of a [`Recorder`] connection.
pub struct ConnData {
    /// From the `id` query parameter, or a counter when there is none.
    pub id: usize,
    /// Messages received so far on this connection.
    pub messages: usize,
}

/// How a [`Recorder`] reacts to a message, after recording it.
pub type OnMessage = dyn Fn(&mut WebSocket<'_, ConnData>, Message<'_>) + Send + Sync;

/// A WebSocket handler that records every callback into a [`Log`] and lets the test decide what
/// a message does. Every upgrade is accepted.
pub struct Recorder {
    log: Log<Ev>,
    next_id: AtomicUsize,
    on_message: Box<OnMessage>,
    on_close: Option<Box<dyn Fn() + Send + Sync>>,
}

impl Recorder {
    pub fn new(
        log: &Log<Ev>,
        on_message: impl Fn(&mut WebSocket<'_, ConnData>, Message<'_>) + Send + Sync + 'static,
    ) -> Self {
        Recorder {
            log: log.clone(),
            next_id: AtomicUsize::new(0),
            on_message: Box::new(on_message),
            on_close: None,
        }
    }

    /// Also run `hook` on the loop thread at the start of every `close` callback (to hold the
    /// loop at that point while the test acts).
    pub fn on_close(mut self, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_close = Some(Box::new(hook));
        self
    }

    /// A recorder that echoes every message.
    pub fn echo(log: &Log<Ev>) -> Self {
        Self::new(log, |ws, msg| {
            ws.send(msg);
        })
    }
}

impl WsHandler for Recorder {
    type Data = ConnData;

    fn upgrade(&self, req: &UpgradeRequest<'_>) -> Result<Accept<ConnData>, Reject> {
        let id = match req.query_param("id") {
            Some(id) => id.parse().map_err(|_| Reject::new(400, "id must be a number"))?,
            None => self.next_id.fetch_add(1, Ordering::Relaxed),
        };
        Ok(Accept::new(ConnData { id, messages: 0 }))
    }

    fn open(&self, ws: &mut WebSocket<'_, ConnData>) {
        self.log.push(Ev::Open { id: ws.data().id });
    }

    fn message(&self, ws: &mut WebSocket<'_, ConnData>, msg: Message<'_>) {
        let data = ws.data();
        data.messages += 1;
        let id = data.id;
        self.log.push(match msg {
            Message::Text(text) => Ev::Text { id, text: text.to_string() },
            Message::Binary(data) => Ev::Binary { id, data: data.to_vec() },
        });
        (self.on_message)(ws, msg);
    }

    fn ping(&self, ws: &mut WebSocket<'_, ConnData>, payload: &[u8]) {
        let buffered = ws.buffered_amount();
        self.log.push(Ev::Ping { id: ws.data().id, payload: payload.to_vec(), buffered });
    }

    fn pong(&self, ws: &mut WebSocket<'_, ConnData>, payload: &[u8]) {
        self.log.push(Ev::Pong { id: ws.data().id, payload: payload.to_vec() });
    }

    fn drain(&self, ws: &mut WebSocket<'_, ConnData>) {
        self.log.push(Ev::Drain { id: ws.data().id });
    }

    fn close(&self, ws: &mut WebSocket<'_, ConnData>, code: CloseCode, reason: &str) {
        if let Some(hook) = &self.on_close {
            hook();
        }
        let late_send = ws.send_text("too late");
        let data = ws.data();
        let (id, messages) = (data.id, data.messages);
        self.log.push(Ev::Close { id, code: code.0, reason: reason.to_string(), messages, late_send });
    }
}

// ---------------------------------------------------------------------------------------------
// The server
// ---------------------------------------------------------------------------------------------

/// The backend under test: `GALE_BACKEND` (epoll, uring or auto), auto by default. The test
/// command runs the suites once per backend.
pub fn test_backend() -> gale_server::Backend {
    std::env::var("GALE_BACKEND").map_or(gale_server::Backend::Auto, |b| b.parse().expect("GALE_BACKEND"))
}

/// `GALE_SEND_ZC`: on io_uring, sends of at least this many bytes are zero-copy (the test
/// command runs the suites once with every send zero-copy).
pub fn test_send_zc() -> usize {
    std::env::var("GALE_SEND_ZC").map_or(0, |b| b.parse().expect("GALE_SEND_ZC"))
}

/// A server running in this process on a free loopback port.
pub struct TestServer {
    pub addr: SocketAddr,
    pub handle: ServerHandle,
    running: Option<Running>,
}

impl TestServer {
    pub fn start(app: App) -> TestServer {
        let server = app
            .backend(test_backend())
            .uring_send_zc(test_send_zc())
            .listen("127.0.0.1:0")
            .expect("bind a loopback port");
        let addr = server.local_addr();
        let handle = server.handle();
        let running = server.spawn().expect("start the event loops");
        TestServer { addr, handle, running: Some(running) }
    }

    /// Connect a WebSocket client to `target`.
    pub fn connect(&self, target: &str) -> Client {
        Client::connect(self.addr, target)
    }

    /// Ask for a shutdown (a second call is harmless) and wait for every loop to exit; panics
    /// if that takes longer than `limit` or a loop failed. Returns how long the wait took.
    pub fn stop_within(mut self, limit: Duration) -> Duration {
        let start = Instant::now();
        self.handle.shutdown();
        let running = self.running.take().expect("the server is running");
        // `join` blocks; run it on a thread so that a loop that never exits fails the test.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(running.join());
        });
        match rx.recv_timeout(limit) {
            Ok(result) => result.expect("event loops exit cleanly"),
            Err(_) => panic!("server did not stop within {limit:?}"),
        }
        start.elapsed()
    }

    /// Shut down and wait for the loops (with [`PATIENCE`]).
    pub fn stop(self) -> Duration {
        self.stop_within(PATIENCE)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // A test that failed midway: stop the loops, but do not wait for them.
        if self.running.is_some() {
            self.handle.shutdown();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The WebSocket client
// ---------------------------------------------------------------------------------------------

/// A frame received from the server, with owned payloads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// Code (`None` for an empty close frame) and reason.
    Close(Option<u16>, String),
}

impl From<Event<'_>> for Frame {
    fn from(event: Event<'_>) -> Self {
        match event {
            Event::Text(t) => Frame::Text(t.to_string()),
            Event::Binary(b) => Frame::Binary(b.to_vec()),
            Event::Ping(p) => Frame::Ping(p.to_vec()),
            Event::Pong(p) => Frame::Pong(p.to_vec()),
            Event::Close(c) => Frame::Close(c.code.map(|c| c.0), c.reason.to_string()),
            Event::Compressed { .. } => panic!("the server sent a compressed frame without negotiating it"),
            Event::UncheckedText(_) => unreachable!("the test client checks UTF-8"),
        }
    }
}

/// The outcome of waiting for a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recv {
    Frame(Frame),
    /// Nothing arrived in time.
    Timeout,
    /// The server closed the TCP connection (EOF or reset).
    Eof,
}

/// Seeds the masking keys of successive clients differently.
static MASK_SEED: AtomicU32 = AtomicU32::new(0x9e37_79b9);

/// A blocking WebSocket client. Frames are masked with a fresh pseudo-random key each, as the
/// RFC requires of clients.
pub struct Client {
    stream: TcpStream,
    decoder: Decoder,
    /// Bytes read but not yet decoded.
    pending: Vec<u8>,
    rng: u32,
    /// Answer pings with pongs inside [`recv`](Client::recv) instead of returning them.
    auto_pong: bool,
    /// Pings answered that way.
    pub pings_answered: usize,
}

/// Largest message the client accepts: well above anything the tests send.
const CLIENT_MAX_MESSAGE: u64 = 64 << 20;

impl Client {
    /// Open a WebSocket to `target` (path and query); panics unless the server answers 101.
    pub fn connect(addr: SocketAddr, target: &str) -> Client {
        match Client::try_connect(addr, target, &[], &[]) {
            Ok((client, _)) => client,
            Err(reply) => panic!("upgrade to {target} refused: {reply:?}"),
        }
    }

    /// Open a WebSocket offering `protocols` and sending extra `headers`. Returns the client and
    /// what the 101 said, or the HTTP response of a refused upgrade.
    pub fn try_connect(
        addr: SocketAddr,
        target: &str,
        protocols: &[&str],
        headers: &[(&str, &str)],
    ) -> Result<(Client, ServerResponse), HttpReply> {
        let mut stream = connect_tcp(addr);
        let handshake = ClientHandshake::new();
        let mut request = Vec::new();
        handshake.write_request(&mut request, &addr.to_string(), target, protocols, headers);
        stream.write_all(&request).expect("send the upgrade request");
        let mut buf = Vec::new();
        loop {
            match handshake.parse_response(&buf, protocols) {
                Ok(Some((response, head_len))) => {
                    // Frames the server sent right after the 101 (from `open`) may be in `buf`.
                    buf.drain(..head_len);
                    let client = Client {
                        stream,
                        decoder: Decoder::new(DecoderConfig::client(CLIENT_MAX_MESSAGE)),
                        pending: buf,
                        rng: MASK_SEED.fetch_add(0x6d2b_79f5, Ordering::Relaxed) | 1,
                        auto_pong: false,
                        pings_answered: 0,
                    };
                    return Ok((client, response));
                }
                Ok(None) => {
                    assert!(read_some(&mut stream, &mut buf) > 0, "server closed during the handshake");
                }
                Err(ClientHandshakeError::Status(_)) => return Err(read_http_reply(&mut stream, &mut buf)),
                Err(e) => panic!("bad handshake response: {e}"),
            }
        }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// From now on, answer pings as browsers do, without returning them from `recv`.
    pub fn answer_pings(&mut self) {
        self.auto_pong = true;
    }

    /// A fresh masking key (xorshift32).
    fn next_mask(&mut self) -> [u8; 4] {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 17;
        self.rng ^= self.rng << 5;
        self.rng.to_le_bytes()
    }

    /// Send one whole masked frame.
    pub fn send(&mut self, opcode: OpCode, payload: &[u8]) {
        let mut wire = Vec::with_capacity(payload.len() + 14);
        append_frame(&mut wire, FrameSpec::client(opcode, self.next_mask()), payload);
        self.send_raw(&wire);
    }

    pub fn send_text(&mut self, text: &str) {
        self.send(OpCode::Text, text.as_bytes());
    }

    pub fn send_binary(&mut self, data: &[u8]) {
        self.send(OpCode::Binary, data);
    }

    /// Send a close frame; `None` sends one without a status code.
    pub fn send_close(&mut self, code: Option<u16>, reason: &str) {
        let payload = match code {
            Some(code) => ClosePayload::new(CloseCode(code), reason),
            None => ClosePayload::empty(),
        };
        self.send(OpCode::Close, payload.as_bytes());
    }

    /// Write bytes as they are (for malformed frames).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send to the server");
    }

    /// The next frame already read, if a whole one is buffered.
    fn next_buffered(&mut self) -> Option<Frame> {
        while !self.pending.is_empty() {
            let (used, event) = match self.decoder.decode(&mut self.pending) {
                Ok(step) => step,
                Err(e) => panic!("the server broke the protocol: {e}"),
            };
            let frame = event.map(Frame::from);
            self.pending.drain(..used);
            if frame.is_some() {
                return frame;
            }
        }
        None
    }

    /// Wait at most `timeout` for the next frame.
    pub fn recv(&mut self, timeout: Duration) -> Recv {
        let deadline = Instant::now() + timeout;
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match self.next_buffered() {
                Some(Frame::Ping(payload)) if self.auto_pong => {
                    self.send(OpCode::Pong, &payload);
                    self.pings_answered += 1;
                    continue;
                }
                Some(frame) => return Recv::Frame(frame),
                None => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Recv::Timeout;
            }
            self.stream.set_read_timeout(Some(left)).expect("set a read timeout");
            match self.stream.read(&mut chunk) {
                Ok(0) => return Recv::Eof,
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(e) => match e.kind() {
                    ErrorKind::WouldBlock | ErrorKind::TimedOut => return Recv::Timeout,
                    ErrorKind::Interrupted => {}
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
                        return Recv::Eof;
                    }
                    _ => panic!("read from the server failed: {e}"),
                },
            }
        }
    }

    /// The next frame; panics on timeout or EOF.
    pub fn expect_frame(&mut self) -> Frame {
        match self.recv(PATIENCE) {
            Recv::Frame(frame) => frame,
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    /// The next frame, which must be a text message.
    pub fn expect_text(&mut self) -> String {
        match self.expect_frame() {
            Frame::Text(text) => text,
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    /// The next frame, which must be a close frame: its code and reason.
    pub fn expect_close(&mut self) -> (Option<u16>, String) {
        match self.expect_frame() {
            Frame::Close(code, reason) => (code, reason),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }

    /// The server must close the TCP connection next, without sending another frame. Returns
    /// how long that took. The client then closes its side too, as a real one would: the
    /// server is waiting for that to release the connection.
    pub fn expect_eof(mut self) -> Duration {
        let start = Instant::now();
        match self.recv(PATIENCE) {
            Recv::Eof => start.elapsed(),
            other => panic!("expected the server to close the connection, got {other:?}"),
        }
    }

    /// Send `text` and expect it back (the handler echoes): proves the connection still works.
    pub fn assert_echo(&mut self, text: &str) {
        self.send_text(text);
        assert_eq!(self.expect_text(), text);
    }

    /// The full close handshake started by the client: send a normal close, expect the echo
    /// and then the server's EOF.
    pub fn close_normally(mut self) {
        self.send_close(Some(1000), "bye");
        assert_eq!(self.expect_close(), (Some(1000), "bye".to_string()));
        self.expect_eof();
    }

    /// Wait `settle` so that whatever the server sent has arrived, then do a single read and
    /// decode every frame it returned.
    pub fn read_once_after(&mut self, settle: Duration) -> Vec<Frame> {
        assert!(self.next_buffered().is_none(), "frames were already waiting");
        std::thread::sleep(settle);
        let mut chunk = vec![0u8; 256 * 1024];
        self.stream.set_read_timeout(Some(PATIENCE)).expect("set a read timeout");
        let n = self.stream.read(&mut chunk).expect("read from the server");
        self.pending.extend_from_slice(&chunk[..n]);
        std::iter::from_fn(|| self.next_buffered()).collect()
    }
}

/// A TCP connection to the server, with read and write timeouts.
pub fn connect_tcp(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, PATIENCE).expect("connect to the test server");
    stream.set_read_timeout(Some(PATIENCE)).expect("set a read timeout");
    stream.set_write_timeout(Some(PATIENCE)).expect("set a write timeout");
    // Each write of a test is meant to leave at once, as its own segment.
    stream.set_nodelay(true).expect("set TCP_NODELAY");
    stream
}

/// Read once (with the stream's timeout) and append to `buf`; 0 at EOF. Panics on timeout.
fn read_some(stream: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk) {
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            n
        }
        Err(e) if e.kind() == ErrorKind::ConnectionReset => 0,
        Err(e) => panic!("reading the server's answer failed: {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// A parsed HTTP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    /// First value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Read one response (head, then a `Content-Length` body) from `stream`, starting with the
/// bytes already in `buf`; what follows it stays in `buf`.
pub fn read_http_reply(stream: &mut TcpStream, buf: &mut Vec<u8>) -> HttpReply {
    let head_len = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        assert!(read_some(stream, buf) > 0, "server closed before the end of the response head");
    };
    let head = String::from_utf8(buf[..head_len].to_vec()).expect("response head is UTF-8");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status code");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let body_len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().expect("numeric Content-Length"));
    while buf.len() < head_len + body_len {
        assert!(read_some(stream, buf) > 0, "server closed before the end of the body");
    }
    let body = buf[head_len..head_len + body_len].to_vec();
    buf.drain(..head_len + body_len);
    HttpReply { status, headers, body }
}

/// Send a request in `parts`, each its own write with a pause between them so that the server
/// reads them separately, and read the response.
pub fn http_exchange(addr: SocketAddr, parts: &[&[u8]]) -> HttpReply {
    let mut stream = connect_tcp(addr);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        stream.write_all(part).expect("send the request");
    }
    read_http_reply(&mut stream, &mut Vec::new())
}

/// A bodiless request with `Connection: close`.
pub fn http_get(addr: SocketAddr, method: &str, target: &str) -> HttpReply {
    let request = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    http_exchange(addr, &[request.as_bytes()])
}
