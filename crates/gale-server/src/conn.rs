//! The connection state machine, free of I/O: bytes in, handler calls and bytes out.
//!
//! A connection starts in the HTTP phase: requests are parsed and answered (keep-alive,
//! pipelining) until one upgrades to a WebSocket route. In the WebSocket phase, each read goes
//! through the frame decoder in place and events go to the route's handler. Both backends
//! drive this same code; they only move bytes and report readiness, timer expiry and EOF.

use gale_frame::deflate::{InflateError, negotiate};
use gale_frame::handshake::{
    AcceptOptions, Request, extension_offers, is_upgrade_request, parse_request, request_line_path,
    validate_upgrade, write_accept_response, write_error_head, write_error_response,
};
use gale_frame::{CloseCode, ClosePayload, DataKind, Decoder, DecoderConfig, Event, OpCode, ProtocolError};

use crate::app::ServerConfig;
use crate::compress::SendMode;
use crate::compress::{self, ConnCompression};
use crate::handler::{HttpRequest, HttpResponse, Message, UpgradeRequest};
use crate::link::{CloseState, Finish, Link, Scratch};
use crate::pubsub::Published;
use crate::routes::{HttpMatch, Routes, WsRoute};
use crate::tls::Opened;
use crate::websocket::{Callback, Session, WebSocket};

/// An HTTP client whose responses pile up past this is not reading them: drop it.
const HTTP_OUT_LIMIT: usize = 4 << 20;

/// What a connection needs from its loop while it handles an event.
pub(crate) struct ConnCx<'a> {
    pub(crate) routes: &'a Routes,
    pub(crate) config: &'a ServerConfig,
    /// The handshake timeout in ticks.
    pub(crate) handshake_ticks: u32,
    pub(crate) pool: &'a mut Scratch,
    /// The current tick of the loop's timer wheel.
    pub(crate) now: u32,
}

/// One client connection: the slab entry of its loop, so every byte counts for an idle
/// connection (see `connection_state_stays_small` below). What only the HTTP phase needs is in
/// its variant of `phase`; what only a closing, TLS or IPv6 connection needs is in the link's
/// cold state, allocated on demand.
pub(crate) struct Conn {
    pub(crate) link: Link,
    phase: Phase,
    /// Tick of this connection's live timer-wheel entry; 0 when it has none.
    pub(crate) timer_at: u32,
    /// Tick of the last bytes received.
    last_seen: u32,
    /// The peer shut down its sending side: nothing more to read.
    pub(crate) read_closed: bool,
    /// The WebSocket phase's `close` callback has been delivered. Here rather than in
    /// [`WsApp`], whose padding it would grow, as `route` would.
    reported: bool,
    /// The WebSocket route's index in `Routes::ws` (0 in the HTTP phase).
    route: u16,
    /// Tick reading stopped because the held output passed the link's limit; 0 while reading.
    paused_since: u32,
}

/// How a published message reaches a connection (see [`Conn::delivery`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Not at all: not an open WebSocket, or the publisher that excluded itself.
    Skip,
    /// As the message's uncompressed frame, which the loop may write from its shared batch:
    /// nothing is queued for the connection and nothing stands in the way. Holds the
    /// route's `max_backpressure`.
    Shared(usize),
    /// Through the connection's own output buffer ([`Conn::deliver`]).
    Own,
}

/// How long a lingering close waits for the peer's EOF, in ticks.
const LINGER_TICKS: u32 = 8;

enum Phase {
    Http(HttpPhase),
    Ws(WsPhase),
}

/// A request head or body that arrived in pieces.
struct HttpPhase {
    buf: Vec<u8>,
    /// A handler deferred its answer: how to write it once it comes. Requests that follow
    /// wait in `buf`.
    awaiting: Option<Awaiting>,
    /// `100 Continue` went out for the request at the start of `buf`, whose body is awaited.
    continued: bool,
    /// Tick at which the HTTP phase (or the current keep-alive request) began.
    since: u32,
}

/// How a response is written: whether the connection stays open after it, and whether the
/// body is left out (HEAD).
#[derive(Clone, Copy, Debug)]
struct ResponseMode {
    keep_alive: bool,
    head_only: bool,
}

impl ResponseMode {
    fn of(req: &Request<'_>) -> ResponseMode {
        let keep_alive = if req.minor_version >= 1 {
            !req.header_has_token("connection", "close")
        } else {
            req.header_has_token("connection", "keep-alive")
        };
        ResponseMode { keep_alive, head_only: req.method == "HEAD" }
    }
}

/// A deferred answer being awaited: how to write it, and the request's path (an answer that
/// never comes is a 503 rendered as the application renders that path's errors).
struct Awaiting {
    mode: ResponseMode,
    path: Box<str>,
}

/// Requests piled up behind a deferred answer past this close the connection.
const AWAITING_LIMIT: usize = 1 << 20;

struct WsPhase {
    decoder: Decoder,
    app: WsApp,
}

/// The WebSocket state besides the decoder, so that it can be borrowed while a decoded event
/// borrows the decoder.
struct WsApp {
    session: Session,
    /// Tick an automatic ping went out, 0 when none is outstanding.
    ping_at: u32,
    /// Tick of the read that brought the first byte of the frame or message being received,
    /// 0 when none is: what `Behavior::message_timeout` counts from.
    message_since: u32,
}

impl Conn {
    pub(crate) fn new(mut link: Link, now: u32) -> Self {
        link.out_limit = HTTP_OUT_LIMIT as u32;
        Conn {
            link,
            phase: Phase::Http(HttpPhase { buf: Vec::new(), awaiting: None, continued: false, since: now }),
            timer_at: 0,
            last_seen: now,
            read_closed: false,
            reported: false,
            route: 0,
            paused_since: 0,
        }
    }

    /// Whether the bytes held for the peer are past the limit, so that its input must wait:
    /// checked after every read, a compare of fields the read just touched.
    #[inline]
    pub(crate) fn output_over_limit(&self) -> bool {
        self.link.over_limit()
    }

    /// Whether reading is paused until the held output drains.
    #[inline]
    pub(crate) fn reading_paused(&self) -> bool {
        self.paused_since != 0
    }

    /// Stop reading: the held output passed the limit. The peer's further input stays in the
    /// kernel, and its TCP window closes on it.
    pub(crate) fn pause_reading(&mut self, cx: &mut ConnCx<'_>) {
        if self.paused_since == 0 {
            self.paused_since = cx.now.max(1);
            cx.pool.counters.reads_paused += 1;
        }
    }

    /// If reading is paused and the held output is back within the limit, resume it; returns
    /// whether it did (the backend must then read again: input may be waiting).
    pub(crate) fn resume_reading(&mut self, now: u32) -> bool {
        if self.paused_since == 0 || self.output_over_limit() {
            return false;
        }
        let paused = now.saturating_sub(self.paused_since);
        self.paused_since = 0;
        // The peer read what we held: it is alive. The input that waited meanwhile (a pong
        // among it) was not ours to see, so neither the idle nor the pong timeout runs from
        // before the pause; nor does the time we did not read count against a message.
        self.last_seen = now;
        if let Phase::Ws(ws) = &mut self.phase {
            ws.app.ping_at = 0;
            if ws.app.message_since != 0 {
                ws.app.message_since += paused;
            }
        }
        true
    }

    /// Whether there is nothing for the backend to act on: no bytes queued, reading not
    /// paused, not finishing. A send completion that leaves a connection so (and calls no
    /// `drain`) changes nothing that settling it would look at, its deadline included: the
    /// state the deadline is computed from is changed by input, timers, callbacks and
    /// queued output, each of which settles the connection itself.
    #[inline]
    pub(crate) fn quiet(&self) -> bool {
        self.paused_since == 0
            && self.link.finish == Finish::No
            && !self.link.broken
            && self.link.queued() == 0
    }

    /// Whether the socket should be closed now.
    pub(crate) fn should_close(&self) -> bool {
        self.link.should_close(self.read_closed)
    }

    /// After a flush: once a finishing connection has written everything, shut down our
    /// sending side and linger for the peer's EOF. Over TLS, `close_notify` goes first (and
    /// needs another flush): returns true when there is something new to write.
    pub(crate) fn after_flush(&mut self, now: u32) -> bool {
        if self.link.finish == Finish::AfterFlush
            && self.link.buffered() == 0
            && !self.read_closed
            && !self.link.broken
        {
            if let Some(tls) = self.link.tls()
                && !tls.notified
            {
                tls.notify_close();
                self.link.dirty = true;
                return true;
            }
            let _ = self.link.stream.shutdown(std::net::Shutdown::Write);
            self.link.finish = Finish::Linger;
            self.link.cold_mut().linger_since = now;
        }
        false
    }

    /// Bytes arrived from the socket: decrypted first over TLS, then handled as plaintext.
    pub(crate) fn on_input(&mut self, data: &mut [u8], cx: &mut ConnCx<'_>) {
        if self.link.is_plain() {
            self.on_data(data, cx);
            return;
        }
        if self.link.finishing() {
            return;
        }
        let Some(tls) = self.link.tls() else { return };
        let mut plain = std::mem::take(&mut cx.pool.plain);
        let (opened, filled) = tls.open(data, &mut plain);
        if !tls.sealed.is_empty() {
            // Handshake records or an alert to send.
            self.link.dirty = true;
        }
        if let Opened::Failed = opened {
            // Nothing more is read; the alert (or plain-HTTP answer) goes out, then TCP closes.
            self.link.close = CloseState::Closed;
            self.link.finish = Finish::AfterFlush;
        }
        if filled > 0 {
            self.on_data(&mut plain[..filled], cx);
        } else if let Opened::Data = opened {
            self.last_seen = cx.now;
        }
        if let Opened::Closed = opened {
            // close_notify: the TLS equivalent of EOF.
            cx.pool.plain = plain;
            self.on_eof(cx);
            return;
        }
        // Larger than a full receive buffer plus a record: one huge read made it so; do not
        // keep that for every later one.
        if plain.len() > cx.config.recv_buffer + (64 << 10) {
            plain = Vec::new();
        }
        cx.pool.plain = plain;
        self.after_callbacks(cx);
    }

    /// Bytes arrived. `data` may be modified in place (WebSocket payloads are unmasked there).
    pub(crate) fn on_data(&mut self, data: &mut [u8], cx: &mut ConnCx<'_>) {
        if self.link.finishing() {
            // Closing: input is read only to see the peer's EOF.
            return;
        }
        self.last_seen = cx.now;
        cx.pool.counters.bytes_in += data.len() as u64;
        match &mut self.phase {
            Phase::Http(_) => self.http_data(data, cx),
            Phase::Ws(ws) => {
                ws.app.ping_at = 0;
                self.ws_data(data, cx);
            }
        }
        self.after_callbacks(cx);
    }

    /// The peer shut down its side (EOF) or the socket failed.
    pub(crate) fn on_eof(&mut self, cx: &mut ConnCx<'_>) {
        self.read_closed = true;
        if self.awaiting() && !self.link.broken {
            // A client may send its request and shut down its side: the deferred answer (and
            // those of requests queued behind it) still go out, within the handshake timeout.
            return;
        }
        // Let a queued answer (a close reply, an HTTP response) go out before closing.
        self.link.finish =
            if self.link.buffered() > 0 && !self.link.broken { Finish::AfterFlush } else { Finish::Now };
        if let Phase::Ws(_) = &self.phase {
            self.closing_since(cx.now);
        }
        self.report_close_if_ending(cx, true);
    }

    /// Record the tick the close handshake began, if it was not yet.
    fn closing_since(&mut self, now: u32) {
        let cold = self.link.cold_mut();
        if cold.close_since == 0 {
            cold.close_since = now;
        }
    }

    /// The socket can take more bytes.
    pub(crate) fn on_writable(&mut self, cx: &mut ConnCx<'_>) {
        if self.link.flush() {
            self.call(cx, Callback::Drain);
        }
        self.after_callbacks(cx);
    }

    /// Call `drain` if the last flush emptied a buffer the kernel had refused.
    pub(crate) fn drained(&mut self, cx: &mut ConnCx<'_>) {
        self.call(cx, Callback::Drain);
        self.after_callbacks(cx);
    }

    /// The server is shutting down: start closing.
    pub(crate) fn on_shutdown(&mut self, cx: &mut ConnCx<'_>) {
        match &mut self.phase {
            Phase::Http(_) => {
                if self.link.finish == Finish::No {
                    self.link.finish = Finish::AfterFlush;
                }
            }
            Phase::Ws(_) => {
                self.link.queue_close(
                    cx.pool,
                    ClosePayload::new(CloseCode::GOING_AWAY, "server shutting down"),
                    CloseState::Closing,
                );
            }
        }
        self.after_callbacks(cx);
    }

    /// The socket is about to be closed: deliver the `close` callback if it is still due.
    pub(crate) fn on_teardown(&mut self, cx: &mut ConnCx<'_>) {
        if self.link.finish == Finish::No {
            self.link.finish = Finish::Now;
        }
        self.report_close_if_ending(cx, true);
        if let Phase::Ws(ws) = &mut self.phase {
            // Its unfinished message goes back to the loop's budget now, not when the slot is
            // freed (io_uring waits for the connection's operations to end first).
            ws.decoder.finish();
        }
    }

    /// How `msg` reaches this connection: not at all (as [`Conn::deliver`] would skip it), as
    /// the shared uncompressed frame written from the loop's batch, or through its own buffer.
    /// Reads only this connection's slot and its route.
    #[inline]
    pub(crate) fn delivery(&self, msg: &Published, routes: &Routes) -> Delivery {
        let Phase::Ws(ws) = &self.phase else { return Delivery::Skip };
        if self.reported || msg.exclude == Some(self.link.id) {
            return Delivery::Skip;
        }
        let behavior = &routes.ws[self.route as usize].behavior;
        let uncompressed = !msg.compress
            || matches!(ws.app.session.compression.mode(), SendMode::Plain)
            || msg.payload().len() < behavior.compress_threshold();
        if uncompressed && self.paused_since == 0 && self.link.takes_shared() {
            Delivery::Shared(behavior.max_backpressure)
        } else {
            Delivery::Own
        }
    }

    /// Queue a published message for this connection (if it is an open WebSocket and not the
    /// publisher that excluded itself): the shared frame, the shared compressed frame, or a
    /// frame compressed with the connection's own context.
    pub(crate) fn deliver(&mut self, msg: &Published, cx: &mut ConnCx<'_>) {
        let Phase::Ws(ws) = &mut self.phase else { return };
        if self.reported || msg.exclude == Some(self.link.id) {
            return;
        }
        let route = &cx.routes.ws[self.route as usize];
        let behavior = &route.behavior;
        let compress = msg.compress && msg.payload().len() >= behavior.compress_threshold();
        match ws.app.session.compression.mode() {
            SendMode::WithoutContext(bits) if compress => {
                let pool = &mut *cx.pool;
                let frame = msg.deflated(bits, &mut pool.codecs);
                self.link.send_encoded(pool, behavior, frame);
            }
            SendMode::OwnContext if compress => {
                WebSocket::erased(&mut self.link, &mut ws.app.session, cx.pool, behavior).send_data(
                    msg.opcode(),
                    msg.payload(),
                    true,
                );
            }
            _ => {
                self.link.send_encoded(cx.pool, behavior, msg.frame());
            }
        }
        self.after_callbacks(cx);
    }

    /// Run a closure posted to this connection, if it is an open WebSocket.
    pub(crate) fn run_on(&mut self, f: crate::app::OnConn, cx: &mut ConnCx<'_>) {
        let Phase::Ws(ws) = &mut self.phase else { return };
        if self.reported {
            return;
        }
        let route = &cx.routes.ws[self.route as usize];
        f(&mut WebSocket::erased(&mut self.link, &mut ws.app.session, cx.pool, &route.behavior));
        self.after_callbacks(cx);
    }

    /// Whether this is an open WebSocket (it can take subscriptions).
    pub(crate) fn is_open_ws(&self) -> bool {
        matches!(&self.phase, Phase::Ws(_)) && !self.reported && self.link.close == CloseState::Open
    }

    /// The tick at which this connection next needs attention, if any.
    pub(crate) fn deadline(&self, cx: &ConnCx<'_>) -> Option<u32> {
        let cold = self.link.cold.as_deref();
        if self.link.finish == Finish::Linger {
            return Some(cold.map_or(0, |c| c.linger_since) + LINGER_TICKS + 1);
        }
        match &self.phase {
            // Timestamps are ticks, and an event happens partway through its tick: one more
            // tick makes every timeout at least as long as configured (never shorter).
            Phase::Http(http) => Some(http.since + cx.handshake_ticks + 1),
            Phase::Ws(ws) => {
                let route = &cx.routes.ws[self.route as usize];
                if self.link.close != CloseState::Open || self.link.finish != Finish::No {
                    let close_since = cold.map_or(0, |c| c.close_since);
                    return Some(close_since.max(1) + route.ticks.close + 1);
                }
                if self.paused_since != 0 {
                    // Not read: only the backpressure timeout runs.
                    return Some(self.paused_since + route.ticks.backpressure + 1);
                }
                let idle = route.ticks.idle.map(|t| self.last_seen + t + 1);
                let ping = route.ticks.ping.map(|t| {
                    if ws.app.ping_at != 0 {
                        ws.app.ping_at + route.ticks.pong + 1
                    } else {
                        self.last_seen + t + 1
                    }
                });
                let message = match (route.ticks.message, ws.app.message_since) {
                    (Some(t), since) if since != 0 => Some(since + t + 1),
                    _ => None,
                };
                [idle, ping, message].into_iter().flatten().min()
            }
        }
    }

    /// The connection's timer fired: act if its deadline has passed.
    pub(crate) fn on_timer(&mut self, cx: &mut ConnCx<'_>) {
        let Some(deadline) = self.deadline(cx) else { return };
        if cx.now < deadline {
            return;
        }
        let now = cx.now;
        let routes = cx.routes;
        if self.link.finish == Finish::Linger {
            self.link.finish = Finish::Now;
            self.after_callbacks(cx);
            return;
        }
        match &mut self.phase {
            // A deferred answer that did not come in time: the client is told, rather than
            // left with a connection closed in silence. A late answer finds nothing awaited.
            Phase::Http(http) if http.awaiting.is_some() => {
                let (path, head) =
                    http.awaiting.take().map(|a| (a.path, a.mode.head_only)).unwrap_or_default();
                let reason = "the answer did not come in time";
                self.http_error(cx, Some(&path), head, 503, reason, &[]);
            }
            // Handshake not finished, or an idle keep-alive connection: drop it (slowloris).
            Phase::Http(_) => self.link.finish = Finish::Now,
            Phase::Ws(ws) => {
                let route = &routes.ws[self.route as usize];
                if self.link.close != CloseState::Open || self.link.finish != Finish::No {
                    // The peer never answered our close, or never read it.
                    self.link.finish = Finish::Now;
                } else if self.paused_since != 0 {
                    // Past the limit for `backpressure_timeout`: the peer reads nothing, so a
                    // close frame could not reach it. Dropped; the handler sees 1006.
                    self.link.finish = Finish::Now;
                    cx.pool.counters.backpressure_timeouts += 1;
                } else if ws.app.message_since != 0
                    && route.ticks.message.is_some_and(|t| now > ws.app.message_since + t)
                {
                    // A message begun and never finished (trickled, or stalled): the peer is
                    // within the protocol but past our policy. Say so, stop reading, and give
                    // its bytes back to the loop's budget.
                    ws.decoder.finish();
                    let failure = ProtocolError {
                        code: CloseCode::POLICY_VIOLATION,
                        reason: "message not completed in time",
                    };
                    close_with(&mut ws.app, &mut self.reported, &mut self.link, route, cx.pool, failure);
                } else if route.ticks.idle.is_some_and(|t| now > self.last_seen + t) {
                    match route.behavior.idle_close {
                        crate::IdleClose::GoingAway => self.link.queue_close(
                            cx.pool,
                            ClosePayload::new(CloseCode::GOING_AWAY, "idle timeout"),
                            CloseState::Closing,
                        ),
                        crate::IdleClose::Silent => self.link.finish = Finish::Now,
                    }
                } else if ws.app.ping_at != 0 {
                    // No answer to our ping: the peer is gone.
                    self.link.finish = Finish::Now;
                } else {
                    self.link.queue_control(cx.pool, OpCode::Ping, b"");
                    ws.app.ping_at = now;
                }
            }
        }
        self.after_callbacks(cx);
    }

    /// Record state changes handlers made and deliver `close` when the connection is ending.
    fn after_callbacks(&mut self, cx: &mut ConnCx<'_>) {
        if let Phase::Ws(_) = &self.phase
            && self.link.close != CloseState::Open
        {
            self.closing_since(cx.now);
        }
        self.report_close_if_ending(cx, false);
    }

    /// Deliver `close` to the handler if the connection is ending and it was not delivered
    /// yet. `teardown` says the socket is going away whatever the state.
    fn report_close_if_ending(&mut self, cx: &mut ConnCx<'_>, teardown: bool) {
        let Phase::Ws(ws) = &mut self.phase else { return };
        let ending = self.link.finish == Finish::Now || self.link.broken || teardown;
        if self.reported || !ending {
            return;
        }
        let (code, reason) =
            if self.link.broken { (CloseCode::ABNORMAL, String::new()) } else { self.link.sent_close_info() };
        let route = &cx.routes.ws[self.route as usize];
        report_close(&mut ws.app, &mut self.reported, &mut self.link, route, cx.pool, code, &reason);
    }

    fn call(&mut self, cx: &mut ConnCx<'_>, cb: Callback<'_>) {
        // After `close` was delivered the handler hears nothing more of this connection.
        if let Phase::Ws(ws) = &mut self.phase
            && !self.reported
        {
            let route = &cx.routes.ws[self.route as usize];
            route.handler.call(&mut self.link, &mut ws.app.session, cx.pool, &route.behavior, cb);
        }
    }

    fn http_data(&mut self, data: &mut [u8], cx: &mut ConnCx<'_>) {
        let Phase::Http(http) = &mut self.phase else { return };
        if http.awaiting.is_some() {
            // Pipelined requests wait for the deferred answer.
            http.buf.extend_from_slice(data);
            if http.buf.len() > AWAITING_LIMIT + cx.config.max_body {
                self.link.finish = Finish::Now;
            }
            return;
        }
        if http.buf.is_empty() {
            let used = self.http_requests(data, cx);
            if let Phase::Http(http) = &mut self.phase
                && used < data.len()
                && self.link.finish == Finish::No
            {
                http.buf.extend_from_slice(&data[used..]);
            }
        } else {
            let mut buf = std::mem::take(&mut http.buf);
            buf.extend_from_slice(data);
            self.serve_buffered(buf, cx);
        }
    }

    /// Serve the requests in `buf` (bytes that waited in the HTTP phase) and keep what is left
    /// of them for later.
    fn serve_buffered(&mut self, mut buf: Vec<u8>, cx: &mut ConnCx<'_>) {
        let used = self.http_requests(&mut buf, cx);
        if let Phase::Http(http) = &mut self.phase
            && used < buf.len()
            && self.link.finish == Finish::No
        {
            buf.drain(..used);
            http.buf = buf;
        }
    }

    /// Serve the complete requests at the start of `bytes`; returns how many bytes were used.
    /// On an upgrade, the rest of `bytes` is handed to the WebSocket phase.
    fn http_requests(&mut self, bytes: &mut [u8], cx: &mut ConnCx<'_>) -> usize {
        let mut pos = 0;
        while pos < bytes.len() && self.link.finish == Finish::No && !self.awaiting() {
            if self.link.buffered() > HTTP_OUT_LIMIT {
                self.link.finish = Finish::Now;
                break;
            }
            let (req, head_len) = match parse_request(&bytes[pos..]) {
                Ok(Some(found)) => found,
                Ok(None) => break,
                Err(e) => {
                    let path = request_line_path(&bytes[pos..]);
                    let head = bytes[pos..].starts_with(b"HEAD ");
                    self.http_error(cx, path, head, e.status, e.reason, e.headers);
                    break;
                }
            };
            let path = req.path();
            let head = req.method == "HEAD";
            // RFC 9112 section 6.3: a request whose body cannot be delimited surely is refused
            // and the connection closed, so that no byte of it is read as the next request.
            let framing = check_host(&req).and_then(|()| req.body_length());
            let body_len = match framing {
                Ok(n) => n,
                Err(e) => {
                    self.http_error(cx, Some(path), head, e.status, e.reason, e.headers);
                    break;
                }
            };
            if body_len > cx.config.max_body as u64 {
                // 413 rather than 417 for `Expect: 100-continue` too: it names the actual
                // problem, and is what a client that sent the body at once gets.
                self.http_error(
                    cx,
                    Some(path),
                    head,
                    413,
                    "request body larger than the server accepts",
                    &[],
                );
                break;
            }
            let expects_continue = match req.expects_continue() {
                Ok(expects) => expects,
                Err(e) => {
                    self.http_error(cx, Some(path), head, e.status, e.reason, e.headers);
                    break;
                }
            };
            let total = head_len + body_len as usize;
            let upgrade = is_upgrade_request(&req);
            let ws_route = cx.routes.find_ws(path);
            let http_route = cx.routes.find_http(req.method, path);
            if bytes.len() - pos < total {
                if expects_continue
                    && let Phase::Http(http) = &mut self.phase
                    && !http.continued
                {
                    if !(matches!(http_route, HttpMatch::Found(_)) || upgrade && ws_route.is_some()) {
                        // No route would take it: answer now, so the client never sends it.
                        self.refuse_unrouted(cx, path, head, ws_route.is_some(), &http_route);
                        break;
                    }
                    // The client waits for this before it sends the body.
                    http.continued = true;
                    self.link
                        .push_with(cx.pool, |out| out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n"));
                }
                break;
            }
            if let Phase::Http(http) = &mut self.phase {
                http.continued = false;
            }
            match (upgrade, ws_route, &http_route) {
                (true, Some(route), _) => {
                    if self.upgrade(route, &req, cx) {
                        let rest = pos + total;
                        self.ws_data(&mut bytes[rest..], cx);
                        return bytes.len();
                    }
                    break;
                }
                (_, _, &HttpMatch::Found(i)) => {
                    let body = &bytes[pos + head_len..pos + total];
                    let deferred = std::cell::Cell::new(false);
                    let hreq = HttpRequest {
                        req: &req,
                        body,
                        remote: self.link.remote(),
                        deferred: &deferred,
                        conn: self.link.id,
                        handle: &cx.pool.handle,
                    };
                    let response = cx.routes.http[i].handler.handle(&hreq);
                    if deferred.get() {
                        if let Phase::Http(http) = &mut self.phase {
                            let (mode, path) = (ResponseMode::of(&req), path.into());
                            http.awaiting = Some(Awaiting { mode, path });
                        }
                    } else {
                        self.http_respond(cx, &req, &response);
                    }
                }
                (_, _, HttpMatch::WrongMethod(_)) | (false, Some(_), HttpMatch::NotFound) => {
                    self.refuse_unrouted(cx, path, head, ws_route.is_some(), &http_route);
                    break;
                }
                (_, _, HttpMatch::NotFound) => {
                    let reason = format!("no route for {path}");
                    let response = cx
                        .routes
                        .render_error(path, 404, &reason)
                        .unwrap_or_else(|| HttpResponse::text(404, reason + "\n"));
                    self.http_respond(cx, &req, &response);
                }
            }
            pos += total;
            self.request_began(cx.now);
        }
        pos
    }

    /// Answer a request that awaits `100 Continue` but that no route would serve (404, 405,
    /// or 426 for a WebSocket route asked without an upgrade), and close: its body is never
    /// read.
    fn refuse_unrouted(
        &mut self,
        cx: &mut ConnCx<'_>,
        path: &str,
        head: bool,
        ws_route: bool,
        http_route: &HttpMatch,
    ) {
        match http_route {
            HttpMatch::WrongMethod(allowed) => {
                let allow = [("Allow", allowed.as_str())];
                self.http_error(cx, Some(path), head, 405, "method not allowed for this path", &allow);
            }
            _ if ws_route => self.http_error(
                cx,
                Some(path),
                head,
                426,
                "this resource requires a WebSocket upgrade (Upgrade: websocket)",
                &[("Upgrade", "websocket")],
            ),
            _ => self.http_error(cx, Some(path), head, 404, &format!("no route for {path}"), &[]),
        }
    }

    /// A request was answered: the handshake timeout runs for the next one from `now`.
    fn request_began(&mut self, now: u32) {
        if let Phase::Http(http) = &mut self.phase {
            http.since = now;
        }
    }

    /// Whether a deferred answer is pending.
    fn awaiting(&self) -> bool {
        matches!(&self.phase, Phase::Http(h) if h.awaiting.is_some())
    }

    /// The answer to a deferred request arrived: write it, then serve the requests that
    /// waited behind it.
    pub(crate) fn deferred_response(&mut self, response: &HttpResponse, cx: &mut ConnCx<'_>) {
        let Phase::Http(http) = &mut self.phase else { return };
        let Some(Awaiting { mode, .. }) = http.awaiting.take() else { return };
        if self.link.finishing() {
            return;
        }
        self.write_response(cx, mode, response);
        self.request_began(cx.now);
        let Phase::Http(http) = &mut self.phase else { return };
        let buf = std::mem::take(&mut http.buf);
        if !buf.is_empty() && self.link.finish == Finish::No {
            self.serve_buffered(buf, cx);
        }
        if self.read_closed && !self.awaiting() && self.link.finish == Finish::No {
            // The client is done sending: close once the answers are out.
            self.link.finish = Finish::AfterFlush;
        }
        self.after_callbacks(cx);
    }

    /// Write an HTTP response, keeping the connection open when the request allows it.
    fn http_respond(&mut self, cx: &mut ConnCx<'_>, req: &Request<'_>, response: &HttpResponse) {
        self.write_response(cx, ResponseMode::of(req), response);
    }

    fn write_response(&mut self, cx: &mut ConnCx<'_>, mode: ResponseMode, response: &HttpResponse) {
        let ResponseMode { keep_alive, head_only } = mode;
        self.link.push_with(cx.pool, |out| {
            use std::io::Write;
            let _ = write!(
                out,
                "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nConnection: {}\r\n",
                response.status,
                gale_frame::handshake::status_text(response.status),
                response.body.len(),
                if keep_alive { "keep-alive" } else { "close" }
            );
            for (name, value) in &response.headers {
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b": ");
                out.extend(value.bytes().filter(|&b| b != b'\r' && b != b'\n'));
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"\r\n");
            if !head_only {
                out.extend_from_slice(&response.body);
            }
        });
        if !keep_alive {
            self.link.finish = Finish::AfterFlush;
        }
    }

    /// Answer with an error and close once it is written: rendered by the application when it
    /// renders the errors of `path` (the request's, when known), else a one-line text; to a
    /// HEAD request (`head`), the head alone.
    fn http_error(
        &mut self,
        cx: &mut ConnCx<'_>,
        path: Option<&str>,
        head: bool,
        status: u16,
        reason: &str,
        headers: &[(&str, &str)],
    ) {
        if let Some(response) = path.and_then(|p| cx.routes.render_error(p, status, reason)) {
            let response = headers.iter().fold(response, |r, (name, value)| r.header(*name, *value));
            self.write_response(cx, ResponseMode { keep_alive: false, head_only: head }, &response);
            return;
        }
        self.link.push_with(cx.pool, |out| {
            if head {
                write_error_head(out, status, reason, headers)
            } else {
                write_error_response(out, status, reason, headers)
            }
        });
        self.link.finish = Finish::AfterFlush;
    }

    /// Validate an upgrade, ask the route's handler, and switch to the WebSocket phase.
    fn upgrade(&mut self, route_index: usize, req: &Request<'_>, cx: &mut ConnCx<'_>) -> bool {
        let routes = cx.routes;
        let route = &routes.ws[route_index];
        let upgrade = match validate_upgrade(req) {
            Ok(u) => u,
            Err(e) => {
                self.http_error(cx, Some(req.path()), req.method == "HEAD", e.status, e.reason, e.headers);
                return false;
            }
        };
        let ureq = UpgradeRequest { req, remote: self.link.remote() };
        let (data, protocol) = match route.handler.upgrade(&ureq) {
            Ok(accepted) => accepted,
            Err(reject) => {
                let status = if (400..600).contains(&reject.status) { reject.status } else { 500 };
                self.http_error(cx, Some(req.path()), req.method == "HEAD", status, &reject.reason, &[]);
                return false;
            }
        };
        // permessage-deflate: the first acceptable offer, or none.
        let deflate = match compress::server_config(route.behavior.compression) {
            None => None,
            Some(cfg) => match extension_offers(req) {
                Ok(offers) => negotiate(&offers, &cfg),
                Err(e) => {
                    self.http_error(
                        cx,
                        Some(req.path()),
                        req.method == "HEAD",
                        e.status,
                        e.reason,
                        e.headers,
                    );
                    return false;
                }
            },
        };
        let extensions = deflate.map(|d| d.response());
        let accept = upgrade.accept_key();
        let options = AcceptOptions {
            protocol: protocol.as_deref(),
            extensions: extensions.as_deref(),
            ..Default::default()
        };
        self.link.push_with(cx.pool, |out| write_accept_response(out, &accept, &options));
        let decoder = DecoderConfig {
            allow_rsv1: deflate.is_some(),
            ..DecoderConfig::server(route.behavior.max_payload as u64)
        };
        let session = Session { data, compression: ConnCompression::new(deflate) };
        self.link.out_limit = u32::try_from(route.behavior.max_backpressure).unwrap_or(u32::MAX);
        self.route = route_index as u16;
        self.phase = Phase::Ws(WsPhase {
            decoder: Decoder::with_budget(decoder, cx.pool.partial_budget.clone()),
            app: WsApp { session, ping_at: 0, message_since: 0 },
        });
        self.call(cx, Callback::Open);
        true
    }

    /// Decode frames from `data` and deliver them.
    fn ws_data(&mut self, data: &mut [u8], cx: &mut ConnCx<'_>) {
        let routes = cx.routes;
        let Phase::Ws(ws) = &mut self.phase else { return };
        let route = &routes.ws[self.route as usize];
        let messages_before = cx.pool.counters.messages_in;
        let mut pos = 0;
        while self.link.finish == Finish::No && !self.link.broken {
            let (used, event) = match ws.decoder.decode(&mut data[pos..]) {
                Ok(step) => step,
                Err(e) => {
                    close_with(&mut ws.app, &mut self.reported, &mut self.link, route, cx.pool, e);
                    break;
                }
            };
            pos += used;
            let Some(event) = event else { break };
            let open = self.link.close == CloseState::Open;
            if matches!(
                event,
                Event::Text(_) | Event::Binary(_) | Event::UncheckedText(_) | Event::Compressed { .. }
            ) {
                cx.pool.counters.messages_in += 1;
            }
            let link = &mut self.link;
            let app = &mut ws.app;
            let call = |app: &mut WsApp, link: &mut Link, pool: &mut Scratch, cb: Callback<'_>| {
                route.handler.call(link, &mut app.session, pool, &route.behavior, cb)
            };
            match event {
                Event::Text(text) if open => call(app, link, cx.pool, Callback::Message(Message::Text(text))),
                Event::Binary(bytes) if open => {
                    call(app, link, cx.pool, Callback::Message(Message::Binary(bytes)))
                }
                // `UncheckedText` never comes: the server's decoder checks UTF-8.
                Event::Text(_) | Event::Binary(_) | Event::UncheckedText(_) => {}
                Event::Compressed { kind, payload } => {
                    if !open {
                        continue;
                    }
                    let mut out = std::mem::take(&mut cx.pool.codecs.inflated);
                    let result = app.session.compression.inflate(
                        &mut cx.pool.codecs,
                        payload,
                        &mut out,
                        route.behavior.max_payload,
                    );
                    let failure = match (result, kind) {
                        (Err(InflateError::TooBig), _) => Some(ProtocolError {
                            code: CloseCode::MESSAGE_TOO_BIG,
                            reason: "message too big once inflated",
                        }),
                        (Err(InflateError::Corrupt), _) => Some(ProtocolError {
                            code: CloseCode::INVALID_PAYLOAD,
                            reason: "invalid compressed data",
                        }),
                        (Ok(()), DataKind::Text) => match simdutf8::basic::from_utf8(&out) {
                            Ok(text) => {
                                call(app, link, cx.pool, Callback::Message(Message::Text(text)));
                                None
                            }
                            Err(_) => Some(ProtocolError {
                                code: CloseCode::INVALID_PAYLOAD,
                                reason: "invalid UTF-8 in text message",
                            }),
                        },
                        (Ok(()), DataKind::Binary) => {
                            call(app, link, cx.pool, Callback::Message(Message::Binary(&out)));
                            None
                        }
                    };
                    cx.pool.codecs.inflated = out;
                    cx.pool.codecs.trim();
                    if let Some(e) = failure {
                        close_with(app, &mut self.reported, link, route, cx.pool, e);
                        break;
                    }
                }
                Event::Ping(payload) => {
                    if open {
                        link.queue_control(cx.pool, OpCode::Pong, payload);
                    }
                    call(app, link, cx.pool, Callback::Ping(payload));
                }
                Event::Pong(payload) => call(app, link, cx.pool, Callback::Pong(payload)),
                Event::Close(frame) => {
                    match link.close {
                        CloseState::Open => {
                            // Echo the peer's code and reason, as RFC 6455 section 5.5.1 suggests.
                            let reply = match frame.code {
                                Some(code) => ClosePayload::new(code, frame.reason),
                                None => ClosePayload::empty(),
                            };
                            link.queue_close(cx.pool, reply, CloseState::Closed);
                            link.finish = Finish::AfterFlush;
                            let code = frame.code.unwrap_or(CloseCode::NO_STATUS);
                            report_close(app, &mut self.reported, link, route, cx.pool, code, frame.reason);
                        }
                        CloseState::Closing => {
                            // Our close was answered: the handshake is complete.
                            link.close = CloseState::Closed;
                            link.finish = Finish::AfterFlush;
                            let (code, reason) = link.sent_close_info();
                            report_close(app, &mut self.reported, link, route, cx.pool, code, &reason);
                        }
                        CloseState::Closed => link.finish = Finish::AfterFlush,
                    }
                    break;
                }
            }
        }
        ws.decoder.release();
        // The clock of `message_timeout`: it starts with the read that left part of a frame
        // or message behind, and restarts when a read completes a data message and leaves the
        // start of another (a ping between fragments does not restart it).
        if !ws.decoder.is_mid_message() {
            ws.app.message_since = 0;
        } else if ws.app.message_since == 0 || cx.pool.counters.messages_in != messages_before {
            ws.app.message_since = cx.now;
        }
    }
}

/// RFC 9112 section 3.2: an HTTP/1.1 request carries exactly one `Host` header.
fn check_host(req: &Request<'_>) -> Result<(), gale_frame::handshake::HttpError> {
    let hosts = req.headers().filter(|(name, _)| name.eq_ignore_ascii_case("host")).count();
    if (req.minor_version >= 1 && hosts != 1) || hosts > 1 {
        let reason = if hosts == 0 { "missing Host header" } else { "more than one Host header" };
        return Err(gale_frame::handshake::HttpError { status: 400, reason, headers: &[] });
    }
    Ok(())
}

/// Close because of `failure` (a protocol error, or our policy): tell the peer why with its
/// code, close TCP once that is written, and deliver `close` to the handler.
fn close_with(
    app: &mut WsApp,
    reported: &mut bool,
    link: &mut Link,
    route: &WsRoute,
    pool: &mut Scratch,
    failure: ProtocolError,
) {
    let ProtocolError { code, reason } = failure;
    link.queue_close(pool, ClosePayload::new(code, reason), CloseState::Closed);
    link.finish = Finish::AfterFlush;
    report_close(app, reported, link, route, pool, code, reason);
}

/// Deliver the `close` callback once; sends are refused from then on.
fn report_close(
    app: &mut WsApp,
    reported: &mut bool,
    link: &mut Link,
    route: &WsRoute,
    pool: &mut Scratch,
    code: CloseCode,
    reason: &str,
) {
    if *reported {
        return;
    }
    *reported = true;
    link.close = CloseState::Closed;
    route.handler.call(link, &mut app.session, pool, &route.behavior, Callback::Close(code, reason));
    pool.topics.unsubscribe_all(link.key());
}

#[cfg(test)]
pub(crate) mod tests {
    use std::mem::size_of;

    use super::{Conn, HttpPhase, Phase, WsApp, WsPhase};
    use crate::link::{Cold, Link};

    /// The largest slab entry of the epoll loop (the io_uring loop's adds eight bytes, see
    /// `backend::uring`). An idle WebSocket costs its entry and little else; the budget is
    /// 256 bytes of user space per idle connection, allocator and slab slack included.
    pub(crate) const MAX_CONN_SIZE: usize = 192;

    /// Sizes of the connection state and its parts, printed with `--nocapture`.
    pub(crate) fn sizes() -> String {
        format!(
            "Conn {} = Link {} + Phase {} (WsPhase {}: Decoder {} + WsApp {}; HttpPhase {}) + own \
             fields; Cold {} (allocated on demand)",
            size_of::<Conn>(),
            size_of::<Link>(),
            size_of::<Phase>(),
            size_of::<WsPhase>(),
            size_of::<gale_frame::Decoder>(),
            size_of::<WsApp>(),
            size_of::<HttpPhase>(),
            size_of::<Cold>(),
        )
    }

    #[test]
    fn connection_state_stays_small() {
        let sizes = sizes();
        eprintln!("{sizes}");
        assert!(size_of::<Conn>() <= MAX_CONN_SIZE, "the connection state grew: {sizes}");
    }

    /// The slab's entry is an enum of a vacant slot's next-free index and the value: it must
    /// not add a tag word to the connection (it uses a niche of `Conn` instead).
    #[test]
    fn slab_slot_adds_nothing() {
        #[allow(dead_code)]
        enum SlabEntry<T> {
            Vacant(usize),
            Occupied(T),
        }
        assert_eq!(size_of::<SlabEntry<Conn>>(), size_of::<Conn>());
    }
}
