//! The opening handshake (RFC 6455 section 4): parsing and validating a client's upgrade
//! request, computing `Sec-WebSocket-Accept`, building the 101 and error responses, and the
//! client's side of the same exchange.
//!
//! Nothing here does I/O: requests are parsed from a byte buffer that may hold only part of
//! them, and responses are written into a `Vec<u8>`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha1::{Digest, Sha1};
use std::fmt::Write as _;

/// The transfer codings of the HTTP registry (RFC 9110 section 18.9 and the aliases RFC 9112
/// section 7.2 keeps); any other is one this server does not know.
const KNOWN_CODINGS: [&str; 6] = ["chunked", "gzip", "x-gzip", "deflate", "compress", "x-compress"];

/// Largest request or response head we accept (request line and headers). Larger heads get
/// 431 Request Header Fields Too Large.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Most header fields in a request head; more gets 431.
pub const MAX_HEADERS: usize = 64;

/// The GUID that RFC 6455 appends to the client's key.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// An HTTP error to answer a request with: status, a one-line reason, and headers the status
/// calls for (e.g. `Sec-WebSocket-Version: 13` with 426).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpError {
    /// The status code (400, 426, 431, ...).
    pub status: u16,
    /// Why the request was refused, one line; sent as the response body.
    pub reason: &'static str,
    /// Extra response headers the status requires.
    pub headers: &'static [(&'static str, &'static str)],
}

impl HttpError {
    const fn new(status: u16, reason: &'static str) -> Self {
        HttpError { status, reason, headers: &[] }
    }

    /// Write the full response for this error into `out`.
    pub fn write_response(&self, out: &mut Vec<u8>) {
        write_error_response(out, self.status, self.reason, self.headers);
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, status_text(self.status), self.reason)
    }
}

impl std::error::Error for HttpError {}

const UPGRADE_HEADERS: &[(&str, &str)] = &[("Upgrade", "websocket")];
const VERSION_HEADERS: &[(&str, &str)] = &[("Sec-WebSocket-Version", "13")];

/// A parsed HTTP/1.x request head, borrowing the buffer it was parsed from.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The method, e.g. `GET`.
    pub method: &'a str,
    /// The request target as sent: path and optional query.
    pub target: &'a str,
    /// The minor HTTP version: 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub minor_version: u8,
    headers: [httparse::Header<'a>; MAX_HEADERS],
    header_count: usize,
}

impl<'a> Request<'a> {
    /// The path part of the target (before `?`). An absolute-form target
    /// (`http://host:port/path?query`, RFC 9112 section 3.2.2) gives its path, `/` when empty.
    pub fn path(&self) -> &'a str {
        target_path(self.target)
    }

    /// The query part of the target (after `?`), if any.
    pub fn query(&self) -> Option<&'a str> {
        split_target(self.target).1.split_once('?').map(|(_, q)| q)
    }

    /// The host the request is for: the authority of an absolute-form target (which RFC 9112
    /// section 3.2.2 says replaces `Host`), else the `Host` header.
    pub fn host(&self) -> Option<&'a str> {
        split_target(self.target).0.or_else(|| self.header("host"))
    }

    /// All header fields, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + '_ {
        self.headers[..self.header_count].iter().map(|h| (h.name, h.value))
    }

    /// The first value of a header, case-insensitive name, if it is valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.header_values(name).next()
    }

    /// Every value of a header (it may appear several times), as UTF-8 strings; values that are
    /// not UTF-8 are skipped.
    pub fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'a str> + 's {
        self.headers[..self.header_count]
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .filter_map(|h| std::str::from_utf8(h.value).ok())
    }

    fn header_count_of(&self, name: &str) -> usize {
        self.headers[..self.header_count].iter().filter(|h| h.name.eq_ignore_ascii_case(name)).count()
    }

    /// Whether any value of `name`, read as a comma-separated list, holds `token`
    /// (case-insensitive).
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.header_values(name).flat_map(split_list).any(|t| t.eq_ignore_ascii_case(token))
    }

    /// The raw values of a header, whatever bytes they hold.
    fn raw_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'a [u8]> + 's {
        self.headers[..self.header_count]
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    /// The value of `Content-Length`, if present and well formed: one field of digits only
    /// (RFC 9112 section 6.3). Anything else, bytes that are not UTF-8 included, is 400.
    pub fn content_length(&self) -> Result<Option<u64>, HttpError> {
        let mut values = self.raw_values("content-length");
        let Some(first) = values.next() else { return Ok(None) };
        if values.next().is_some() {
            return Err(HttpError::new(400, "more than one Content-Length header"));
        }
        // Digits only: `parse` would also take a sign, a list ("5, 5") or a stray byte, which a
        // proxy in front may read differently (request smuggling).
        let digits = first.trim_ascii();
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err(HttpError::new(400, "malformed Content-Length"));
        }
        digits
            .iter()
            .try_fold(0u64, |n, &d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
            .map(Some)
            .ok_or(HttpError::new(400, "Content-Length too large"))
    }

    /// The length of the request body, for a server that reads bodies by `Content-Length`
    /// only (RFC 9112 section 6.3): 0 without one. Any `Transfer-Encoding` is refused: with
    /// `Content-Length` too, in HTTP/1.0, unreadable or without `chunked` last it is 400
    /// (the body's end cannot be known); with a coding not in the registry, 501 (RFC 9112
    /// section 6.1); a well-formed chunked body is 411 (send `Content-Length`). Every refusal
    /// means the connection must close after the answer.
    pub fn body_length(&self) -> Result<u64, HttpError> {
        let mut codings = self.raw_values("transfer-encoding").peekable();
        if codings.peek().is_some() {
            if self.raw_values("content-length").next().is_some() {
                return Err(HttpError::new(400, "both Content-Length and Transfer-Encoding"));
            }
            if self.minor_version == 0 {
                return Err(HttpError::new(400, "Transfer-Encoding in an HTTP/1.0 request"));
            }
            let (mut last, mut unknown) = (None, None);
            for value in codings {
                let value = std::str::from_utf8(value).ok();
                let mut any = false;
                for coding in value.into_iter().flat_map(|v| v.split(',')) {
                    let name = coding.split(';').next().unwrap_or_default().trim_matches([' ', '\t']);
                    if !is_token(name) {
                        return Err(HttpError::new(400, "malformed Transfer-Encoding"));
                    }
                    any = true;
                    last = Some(name);
                    if unknown.is_none() && !KNOWN_CODINGS.iter().any(|k| k.eq_ignore_ascii_case(name)) {
                        unknown = Some(name);
                    }
                }
                if !any {
                    return Err(HttpError::new(400, "malformed Transfer-Encoding"));
                }
            }
            if !last.is_some_and(|c| c.eq_ignore_ascii_case("chunked")) {
                return Err(HttpError::new(400, "Transfer-Encoding without chunked last"));
            }
            if unknown.is_some() {
                return Err(HttpError::new(501, "unknown transfer coding in Transfer-Encoding"));
            }
            return Err(HttpError::new(411, "chunked request bodies are not supported; send Content-Length"));
        }
        Ok(self.content_length()?.unwrap_or(0))
    }

    /// Whether the client waits for `100 Continue` before sending the body (`Expect:
    /// 100-continue`, RFC 9110 section 10.1.1). HTTP/1.0 requests' expectations are ignored,
    /// as the RFC says; any other expectation is 417.
    pub fn expects_continue(&self) -> Result<bool, HttpError> {
        if self.minor_version == 0 {
            return Ok(false);
        }
        let mut expects = false;
        for value in self.raw_values("expect") {
            let value = std::str::from_utf8(value).unwrap_or("\u{fffd}");
            for member in value.split(',').map(|m| m.trim_matches([' ', '\t'])) {
                if !member.eq_ignore_ascii_case("100-continue") {
                    return Err(HttpError::new(
                        417,
                        "unsupported expectation: only Expect: 100-continue is understood",
                    ));
                }
                expects = true;
            }
        }
        Ok(expects)
    }
}

/// The authority (of an absolute-form target) and the path and query of a request target.
fn split_target(target: &str) -> (Option<&str>, &str) {
    if target.starts_with('/') {
        return (None, target);
    }
    // absolute-form: scheme "://" authority path-abempty [ "?" query ] (RFC 9112 3.2.2).
    match target.split_once("://") {
        Some((scheme, rest))
            if scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)) =>
        {
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            (Some(&rest[..end]), &rest[end..])
        }
        _ => (None, target),
    }
}

/// The path of a request target, as [`Request::path`] gives it.
fn target_path(target: &str) -> &str {
    let rest = split_target(target).1;
    match rest.split_once('?').map_or(rest, |(p, _)| p) {
        "" => "/",
        path => path,
    }
}

/// The path of the request at the start of `buf` read from its request line alone, for a
/// head that failed to parse (too large, malformed headers), so that the error answer can be
/// chosen by path. `None` when the request line is not complete or not `METHOD TARGET VERSION`.
pub fn request_line_path(buf: &[u8]) -> Option<&str> {
    let buf = &buf[..buf.len().min(MAX_HEAD_BYTES)];
    let line = &buf[..buf.iter().position(|&b| b == b'\n')?];
    let line = std::str::from_utf8(line.strip_suffix(b"\r").unwrap_or(line)).ok()?;
    let mut parts = line.split(' ');
    let (_method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    (version.starts_with("HTTP/") && parts.next().is_none()).then(|| target_path(target))
}

/// Parse a request head from the start of `buf`.
///
/// Returns `Ok(None)` when the head is incomplete and may still fit the size limit, and
/// otherwise the request and the length of its head. A head over [`MAX_HEAD_BYTES`] or with
/// more than [`MAX_HEADERS`] fields fails with 431; anything malformed with 400.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request<'_>, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let limited = &buf[..buf.len().min(MAX_HEAD_BYTES)];
    let status = req.parse(limited).map_err(|e| match e {
        httparse::Error::TooManyHeaders => HttpError::new(431, "too many header fields"),
        httparse::Error::Version => HttpError::new(400, "malformed HTTP version"),
        httparse::Error::Token => HttpError::new(400, "malformed request line"),
        httparse::Error::HeaderName => HttpError::new(400, "malformed header name"),
        httparse::Error::HeaderValue => HttpError::new(400, "malformed header value"),
        _ => HttpError::new(400, "malformed request"),
    })?;
    let head_len = match status {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if buf.len() >= MAX_HEAD_BYTES => {
            return Err(HttpError::new(431, "request head larger than 8 KiB"));
        }
        httparse::Status::Partial => return Ok(None),
    };
    let method = req.method.unwrap_or_default();
    let target = req.path.unwrap_or_default();
    let minor_version = req.version.unwrap_or_default();
    let header_count = req.headers.len();
    Ok(Some((Request { method, target, minor_version, headers, header_count }, head_len)))
}

/// A validated WebSocket upgrade request: what the server needs to answer it.
#[derive(Clone, Copy, Debug)]
pub struct Upgrade<'a> {
    /// The `Sec-WebSocket-Key` header, 24 base64 characters.
    pub key: &'a str,
    /// The `Origin` header, if any (browsers always send it).
    pub origin: Option<&'a str>,
    /// The `Host` header.
    pub host: &'a str,
}

impl Upgrade<'_> {
    /// The `Sec-WebSocket-Accept` value answering this request.
    pub fn accept_key(&self) -> AcceptKey {
        AcceptKey::for_key(self.key.as_bytes())
    }
}

/// Whether a request asks for a WebSocket upgrade at all (`Upgrade: websocket`). Requests that
/// do not are plain HTTP; on a WebSocket route they get 426.
pub fn is_upgrade_request(req: &Request<'_>) -> bool {
    req.header_has_token("upgrade", "websocket")
}

/// Check a request against RFC 6455 section 4.2.1.
pub fn validate_upgrade<'a>(req: &Request<'a>) -> Result<Upgrade<'a>, HttpError> {
    if req.method != "GET" {
        return Err(HttpError::new(400, "WebSocket upgrade requires the GET method"));
    }
    if req.minor_version < 1 {
        return Err(HttpError::new(400, "WebSocket upgrade requires HTTP/1.1"));
    }
    if !is_upgrade_request(req) {
        return Err(HttpError {
            status: 426,
            reason: "this resource requires a WebSocket upgrade (Upgrade: websocket)",
            headers: UPGRADE_HEADERS,
        });
    }
    if !req.header_has_token("connection", "upgrade") {
        return Err(HttpError::new(400, "Connection header must include Upgrade"));
    }
    let Some(host) = req.host() else {
        return Err(HttpError::new(400, "missing Host header"));
    };
    let version_ok = req.header_count_of("sec-websocket-version") == 1
        && req.header("sec-websocket-version").map(str::trim) == Some("13");
    if !version_ok {
        return Err(HttpError {
            status: 426,
            reason: "unsupported WebSocket version; this server speaks version 13",
            headers: VERSION_HEADERS,
        });
    }
    if req.header_count_of("sec-websocket-key") != 1 {
        return Err(HttpError::new(400, "exactly one Sec-WebSocket-Key header is required"));
    }
    let key = req.header("sec-websocket-key").unwrap_or_default().trim();
    if !is_valid_key(key) {
        return Err(HttpError::new(400, "Sec-WebSocket-Key must be 16 bytes in base64"));
    }
    Ok(Upgrade { key, origin: req.header("origin"), host })
}

fn is_valid_key(key: &str) -> bool {
    let mut decoded = [0u8; 18];
    key.len() == 24 && matches!(BASE64.decode_slice(key, &mut decoded), Ok(16))
}

/// Split a comma-separated header value into trimmed, non-empty items.
pub fn split_list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(|t| t.trim_matches([' ', '\t'])).filter(|t| !t.is_empty())
}

/// The subprotocols a request offers, in the client's order of preference.
pub fn offered_protocols<'a>(req: &'a Request<'a>) -> impl Iterator<Item = &'a str> + 'a {
    req.header_values("sec-websocket-protocol").flat_map(split_list)
}

/// Pick a subprotocol: the first one the client offers that the server supports.
pub fn select_protocol<'a>(req: &'a Request<'a>, supported: &[&str]) -> Option<&'a str> {
    offered_protocols(req).find(|p| supported.contains(p))
}

/// One extension offer from `Sec-WebSocket-Extensions`, e.g.
/// `permessage-deflate; client_max_window_bits; server_max_window_bits=10`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtensionOffer<'a> {
    /// The extension token, e.g. `permessage-deflate`.
    pub name: &'a str,
    /// Parameters in order: name, and the value with quotes removed if one was given.
    pub params: Vec<(&'a str, Option<&'a str>)>,
}

/// Parse every extension offer in the request, in order. Malformed offers fail with 400.
pub fn extension_offers<'a>(req: &Request<'a>) -> Result<Vec<ExtensionOffer<'a>>, HttpError> {
    let mut offers = Vec::new();
    for value in req.header_values("sec-websocket-extensions") {
        parse_extensions(value, &mut offers)?;
    }
    Ok(offers)
}

/// Parse one `Sec-WebSocket-Extensions` value (RFC 6455 section 9.1) and append its offers.
pub fn parse_extensions<'a>(value: &'a str, out: &mut Vec<ExtensionOffer<'a>>) -> Result<(), HttpError> {
    let bad = HttpError::new(400, "malformed Sec-WebSocket-Extensions header");
    for offer in split_outside_quotes(value, ',') {
        let offer = offer.trim_matches([' ', '\t']);
        if offer.is_empty() {
            continue;
        }
        let mut parts = split_outside_quotes(offer, ';').map(|p| p.trim_matches([' ', '\t']));
        let name = parts.next().unwrap_or_default();
        if !is_token(name) {
            return Err(bad);
        }
        let mut params = Vec::new();
        for part in parts {
            let (pname, pvalue) = match part.split_once('=') {
                Some((n, v)) => (n.trim_matches([' ', '\t']), Some(v.trim_matches([' ', '\t']))),
                None => (part, None),
            };
            if !is_token(pname) {
                return Err(bad);
            }
            let pvalue = match pvalue {
                Some(v) if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') => {
                    let inner = &v[1..v.len() - 1];
                    if !is_token(inner) {
                        return Err(bad);
                    }
                    Some(inner)
                }
                Some(v) if is_token(v) => Some(v),
                Some(_) => return Err(bad),
                None => None,
            };
            params.push((pname, pvalue));
        }
        out.push(ExtensionOffer { name, params });
    }
    Ok(())
}

/// Split on `sep`, except inside double quotes.
fn split_outside_quotes(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut start = 0;
    let mut in_quotes = false;
    let mut pieces = Vec::new();
    for (i, c) in s.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            c if c == sep && !in_quotes => {
                pieces.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    pieces.push(&s[start..]);
    pieces.into_iter()
}

/// An RFC 7230 token: visible ASCII except separators.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A `Sec-WebSocket-Accept` value: base64 of the SHA-1 of the key and the RFC's GUID.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AcceptKey([u8; 28]);

impl AcceptKey {
    /// Compute the accept value for a `Sec-WebSocket-Key`.
    pub fn for_key(key: &[u8]) -> AcceptKey {
        let mut sha = Sha1::new();
        sha.update(key);
        sha.update(ACCEPT_GUID);
        let digest = sha.finalize();
        let mut out = [0u8; 28];
        let n = BASE64.encode_slice(digest, &mut out).expect("20 bytes encode to 28");
        debug_assert_eq!(n, 28);
        AcceptKey(out)
    }

    /// The value as text.
    pub fn as_str(&self) -> &str {
        // Base64 output is ASCII.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for AcceptKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the server puts in its 101 response besides the accept key.
#[derive(Clone, Copy, Debug, Default)]
pub struct AcceptOptions<'a> {
    /// The chosen subprotocol.
    pub protocol: Option<&'a str>,
    /// The accepted extensions, as the `Sec-WebSocket-Extensions` value.
    pub extensions: Option<&'a str>,
    /// Any other headers.
    pub headers: &'a [(&'a str, &'a str)],
}

/// Write the `101 Switching Protocols` response.
pub fn write_accept_response(out: &mut Vec<u8>, accept: &AcceptKey, options: &AcceptOptions<'_>) {
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
    out.extend_from_slice(&accept.0);
    out.extend_from_slice(b"\r\n");
    if let Some(p) = options.protocol {
        push_header(out, "Sec-WebSocket-Protocol", p);
    }
    if let Some(e) = options.extensions {
        push_header(out, "Sec-WebSocket-Extensions", e);
    }
    for (name, value) in options.headers {
        push_header(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}

/// Write an error response with a plain-text one-line body and `Connection: close`.
pub fn write_error_response(out: &mut Vec<u8>, status: u16, reason: &str, headers: &[(&str, &str)]) {
    write_error_head(out, status, reason, headers);
    out.extend_from_slice(reason.lines().next().unwrap_or_default().as_bytes());
    out.push(b'\n');
}

/// Write the head of `write_error_response`'s answer and no body: the answer to a HEAD
/// request (RFC 9110 section 9.3.2), whose `Content-Length` is the body a GET would get.
pub fn write_error_head(out: &mut Vec<u8>, status: u16, reason: &str, headers: &[(&str, &str)]) {
    let reason = reason.lines().next().unwrap_or_default();
    let mut head = String::with_capacity(160);
    let _ = write!(
        head,
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        status_text(status),
        reason.len() + 1
    );
    out.extend_from_slice(head.as_bytes());
    for (name, value) in headers {
        push_header(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    // A header value must not carry a line break: it would smuggle a header.
    out.extend(value.bytes().filter(|&b| b != b'\r' && b != b'\n'));
    out.extend_from_slice(b"\r\n");
}

/// The reason phrase of common status codes.
pub fn status_text(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

/// The client's side of the handshake: a random key, the request, and the checks on the
/// server's answer.
#[derive(Clone, Copy, Debug)]
pub struct ClientHandshake {
    key: [u8; 24],
    expected: AcceptKey,
}

/// Why a server's handshake response was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientHandshakeError {
    /// The response head could not be parsed, or was over [`MAX_HEAD_BYTES`].
    Malformed(&'static str),
    /// The server answered with a status other than 101.
    Status(u16),
    /// The 101 lacked `Upgrade: websocket` or `Connection: Upgrade`.
    NotUpgraded,
    /// `Sec-WebSocket-Accept` was missing or did not match the key.
    BadAccept,
    /// The server chose a subprotocol we did not offer.
    UnexpectedProtocol(String),
}

impl std::fmt::Display for ClientHandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "malformed handshake response: {why}"),
            Self::Status(s) => write!(f, "server answered HTTP {s} {}", status_text(*s)),
            Self::NotUpgraded => f.write_str("server did not upgrade the connection"),
            Self::BadAccept => f.write_str("wrong Sec-WebSocket-Accept"),
            Self::UnexpectedProtocol(p) => write!(f, "server chose subprotocol {p:?}, which was not offered"),
        }
    }
}

impl std::error::Error for ClientHandshakeError {}

/// A server's accepted handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerResponse {
    /// The subprotocol the server chose.
    pub protocol: Option<String>,
    /// The `Sec-WebSocket-Extensions` the server accepted.
    pub extensions: Option<String>,
}

impl ClientHandshake {
    /// A handshake with a key from the operating system's random source.
    pub fn new() -> Self {
        let mut nonce = [0u8; 16];
        // A failing OS random source leaves a fixed nonce; the key only defeats caches.
        let _ = getrandom::fill(&mut nonce);
        Self::with_nonce(nonce)
    }

    /// A handshake with a given 16-byte nonce (for tests and reproducible runs).
    pub fn with_nonce(nonce: [u8; 16]) -> Self {
        let mut key = [0u8; 24];
        BASE64.encode_slice(nonce, &mut key).expect("16 bytes encode to 24");
        ClientHandshake { key, expected: AcceptKey::for_key(&key) }
    }

    /// The `Sec-WebSocket-Key` value.
    pub fn key(&self) -> &str {
        std::str::from_utf8(&self.key).unwrap_or_default()
    }

    /// Write the upgrade request for `target` (path and query) on `host`.
    pub fn write_request(
        &self,
        out: &mut Vec<u8>,
        host: &str,
        target: &str,
        protocols: &[&str],
        headers: &[(&str, &str)],
    ) {
        out.extend_from_slice(b"GET ");
        out.extend(target.bytes().filter(|b| !b.is_ascii_whitespace()));
        out.extend_from_slice(b" HTTP/1.1\r\n");
        push_header(out, "Host", host);
        out.extend_from_slice(
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ",
        );
        out.extend_from_slice(&self.key);
        out.extend_from_slice(b"\r\n");
        if !protocols.is_empty() {
            push_header(out, "Sec-WebSocket-Protocol", &protocols.join(", "));
        }
        for (name, value) in headers {
            push_header(out, name, value);
        }
        out.extend_from_slice(b"\r\n");
    }

    /// Parse and check the server's response head. Returns `Ok(None)` while it is
    /// incomplete; otherwise the outcome and the length of the head (bytes after it are
    /// WebSocket frames).
    pub fn parse_response(
        &self,
        buf: &[u8],
        offered: &[&str],
    ) -> Result<Option<(ServerResponse, usize)>, ClientHandshakeError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut headers);
        let limited = &buf[..buf.len().min(MAX_HEAD_BYTES)];
        let head_len = match resp.parse(limited) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => {
                return Err(ClientHandshakeError::Malformed("response head larger than 8 KiB"));
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(ClientHandshakeError::Malformed("not an HTTP/1.1 response")),
        };
        let code = resp.code.unwrap_or_default();
        if code != 101 {
            return Err(ClientHandshakeError::Status(code));
        }
        let values = |name: &'static str| {
            resp.headers
                .iter()
                .filter(move |h| h.name.eq_ignore_ascii_case(name))
                .filter_map(|h| std::str::from_utf8(h.value).ok())
        };
        let has_token =
            |name, token: &str| values(name).flat_map(split_list).any(|t| t.eq_ignore_ascii_case(token));
        if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
            return Err(ClientHandshakeError::NotUpgraded);
        }
        if values("sec-websocket-accept").next().map(str::trim) != Some(self.expected.as_str()) {
            return Err(ClientHandshakeError::BadAccept);
        }
        let protocol = values("sec-websocket-protocol").next().map(|p| p.trim().to_string());
        if let Some(p) = &protocol
            && !offered.contains(&p.as_str())
        {
            return Err(ClientHandshakeError::UnexpectedProtocol(p.clone()));
        }
        let extensions = values("sec-websocket-extensions").next().map(|e| e.trim().to_string());
        Ok(Some((ServerResponse { protocol, extensions }, head_len)))
    }
}

impl Default for ClientHandshake {
    fn default() -> Self {
        Self::new()
    }
}
