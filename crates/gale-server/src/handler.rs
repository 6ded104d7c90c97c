//! What applications implement: WebSocket behaviours and HTTP handlers, and the request types
//! they are given.

use std::net::SocketAddr;

use gale_frame::CloseCode;
use gale_frame::handshake::{self, Request};

use crate::websocket::WebSocket;

/// A received data message, borrowed from the loop's buffers for the duration of the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A text message, valid UTF-8.
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
}

impl<'a> Message<'a> {
    /// The payload bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        match self {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
        }
    }

    /// Whether this is a text message.
    pub fn is_text(&self) -> bool {
        matches!(self, Message::Text(_))
    }
}

/// The request a client sent to open a WebSocket, for [`WsHandler::upgrade`] to inspect.
pub struct UpgradeRequest<'a> {
    pub(crate) req: &'a Request<'a>,
    pub(crate) remote: SocketAddr,
}

impl<'a> UpgradeRequest<'a> {
    /// Path of the request target, without the query.
    pub fn path(&self) -> &'a str {
        self.req.path()
    }

    /// Query string, without the `?`.
    pub fn query(&self) -> Option<&'a str> {
        self.req.query()
    }

    /// The value of a query parameter (not percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<&'a str> {
        self.query()?.split('&').find_map(|kv| match kv.split_once('=') {
            Some((k, v)) if k == name => Some(v),
            None if kv == name => Some(""),
            _ => None,
        })
    }

    /// First value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.req.header(name)
    }

    /// The host the request is for: the authority of an absolute-form request target
    /// (`GET http://host/path`), else the `Host` header.
    pub fn host(&self) -> Option<&'a str> {
        self.req.host()
    }

    /// The `Origin` header, which browsers always send.
    pub fn origin(&self) -> Option<&'a str> {
        self.req.header("origin")
    }

    /// The subprotocols the client offers, in its order of preference.
    pub fn protocols(&self) -> impl Iterator<Item = &'a str> + 'a {
        handshake::offered_protocols(self.req)
    }

    /// The first offered subprotocol that is in `supported`.
    pub fn select_protocol(&self, supported: &[&str]) -> Option<&'a str> {
        handshake::select_protocol(self.req, supported)
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }
}

/// A successful upgrade: the per-connection data and what to answer.
pub struct Accept<D> {
    pub(crate) data: D,
    pub(crate) protocol: Option<String>,
}

impl<D> Accept<D> {
    /// Accept with this per-connection data and no subprotocol.
    pub fn new(data: D) -> Self {
        Accept { data, protocol: None }
    }

    /// Answer with this subprotocol (it should be one the client offered).
    pub fn protocol(mut self, protocol: impl Into<String>) -> Self {
        self.protocol = Some(protocol.into());
        self
    }
}

/// A refused upgrade or HTTP request: the status and a one-line reason sent as the body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// HTTP status, e.g. 401, 403.
    pub status: u16,
    /// Why, in one line.
    pub reason: String,
}

impl Reject {
    /// A rejection with this status and reason.
    pub fn new(status: u16, reason: impl Into<String>) -> Self {
        Reject { status, reason: reason.into() }
    }
}

/// The behaviour of a WebSocket route. One value serves every connection on every loop, so
/// methods take `&self`; per-connection state lives in [`WsHandler::Data`].
///
/// Every method but `message` has a default that does nothing (`upgrade` accepts with
/// `Data::default()` when the data type has a default; see [`WsHandler::upgrade`]).
pub trait WsHandler: Send + Sync + 'static {
    /// Per-connection data, created by [`upgrade`](WsHandler::upgrade).
    type Data: Send + 'static;

    /// Decide whether to accept a client: authenticate it, pick a subprotocol, create its data.
    fn upgrade(&self, req: &UpgradeRequest<'_>) -> Result<Accept<Self::Data>, Reject>;

    /// The connection is open; sends are allowed from here.
    fn open(&self, _ws: &mut WebSocket<'_, Self::Data>) {}

    /// A whole message arrived.
    fn message(&self, ws: &mut WebSocket<'_, Self::Data>, msg: Message<'_>);

    /// A ping arrived; the pong has already been queued.
    fn ping(&self, _ws: &mut WebSocket<'_, Self::Data>, _payload: &[u8]) {}

    /// A pong arrived.
    fn pong(&self, _ws: &mut WebSocket<'_, Self::Data>, _payload: &[u8]) {}

    /// Bytes the kernel had refused have all been sent: the connection can take more.
    fn drain(&self, _ws: &mut WebSocket<'_, Self::Data>) {}

    /// The connection closed. Called once per opened connection, with the peer's close code
    /// (1005 if its close frame had none), the code of a protocol error we closed with, our own
    /// code for a close we started, or 1006 if the TCP connection ended without a close frame.
    /// Sends are refused from here on.
    fn close(&self, _ws: &mut WebSocket<'_, Self::Data>, _code: CloseCode, _reason: &str) {}
}

/// A plain HTTP request, with its body.
pub struct HttpRequest<'a> {
    pub(crate) req: &'a Request<'a>,
    pub(crate) body: &'a [u8],
    pub(crate) remote: SocketAddr,
    /// Set by [`HttpRequest::defer`].
    pub(crate) deferred: &'a std::cell::Cell<bool>,
    pub(crate) conn: crate::ConnId,
    pub(crate) handle: &'a crate::ServerHandle,
}

/// Answers a deferred HTTP request ([`HttpRequest::defer`]) from any thread. Dropped without
/// an answer, it answers 500 so that the client is not left waiting.
pub struct Responder {
    handle: crate::ServerHandle,
    conn: crate::ConnId,
    answered: bool,
}

impl Responder {
    /// Send the response. The connection gets it between two event batches of its loop and
    /// then goes on with any requests the client pipelined after this one.
    pub fn respond(mut self, response: HttpResponse) {
        self.answered = true;
        let _ = self.handle.respond(self.conn, response);
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self
                .handle
                .respond(self.conn, HttpResponse::text(500, "the request was dropped unanswered\n"));
        }
    }
}

impl<'a> HttpRequest<'a> {
    /// Answer this request later, from any thread, through the returned [`Responder`]; what
    /// the handler returns is then ignored. The connection reads no further request until the
    /// answer is sent (HTTP/1.1 answers in order). An answer that does not come within the
    /// server's handshake timeout is replaced by a 503 (rendered as the application renders
    /// the path's errors), and the connection closes after it.
    pub fn defer(&self) -> Responder {
        self.deferred.set(true);
        Responder { handle: self.handle.clone(), conn: self.conn, answered: false }
    }

    /// The method, e.g. `GET`.
    pub fn method(&self) -> &'a str {
        self.req.method
    }

    /// Path of the request target, without the query.
    pub fn path(&self) -> &'a str {
        self.req.path()
    }

    /// Query string, without the `?`.
    pub fn query(&self) -> Option<&'a str> {
        self.req.query()
    }

    /// First value of a header (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.req.header(name)
    }

    /// The request body (empty without `Content-Length`).
    pub fn body(&self) -> &'a [u8] {
        self.body
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote
    }
}

/// An HTTP response to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers besides `Content-Length` and `Connection`, which the server adds.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// A response with a body and a content type.
    pub fn new(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        HttpResponse {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.into(),
        }
    }

    /// A `text/plain` response.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, "text/plain; charset=utf-8", body.into().into_bytes())
    }

    /// An `application/json` response; `body` must already be JSON.
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, "application/json", body.into().into_bytes())
    }

    /// A `text/html` response.
    pub fn html(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self::new(status, "text/html; charset=utf-8", body)
    }

    /// Add a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// Renders the error answers the server itself gives (400, 404, 405, 411, 413, 417, 431, ...)
/// in an application's format, for the paths it was registered for with
/// [`App::render_errors`](crate::App::render_errors). Any `Fn(u16, &str) -> HttpResponse` is
/// one.
pub trait ErrorRenderer: Send + Sync + 'static {
    /// The response for `status`, with `reason` (one line, no newline) saying why. The server
    /// adds the headers the status calls for (`Allow` with 405, ...) and, except with 404,
    /// closes the connection after it.
    fn render(&self, status: u16, reason: &str) -> HttpResponse;
}

impl<F> ErrorRenderer for F
where
    F: Fn(u16, &str) -> HttpResponse + Send + Sync + 'static,
{
    fn render(&self, status: u16, reason: &str) -> HttpResponse {
        self(status, reason)
    }
}

/// A handler for plain HTTP requests. Any `Fn(&HttpRequest) -> HttpResponse` is one.
pub trait HttpHandler: Send + Sync + 'static {
    /// Answer a request.
    fn handle(&self, req: &HttpRequest<'_>) -> HttpResponse;
}

impl<F> HttpHandler for F
where
    F: Fn(&HttpRequest<'_>) -> HttpResponse + Send + Sync + 'static,
{
    fn handle(&self, req: &HttpRequest<'_>) -> HttpResponse {
        self(req)
    }
}
