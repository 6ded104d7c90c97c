//! The HTTP edge of `gale echo`, over raw sockets: `/healthz` with keep-alive, pipelining,
//! HEAD and HTTP/1.0; the status of every refused request (405, 400, 426, 431, 411, 413) and the
//! shape of error responses (a one-line plain-text body naming the problem, `Connection:
//! close`, then the server closes); requests arriving in many small pieces; the slowloris
//! timeout; and the WebSocket upgrade requests the handshake refuses.

mod shared;
mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Bound on every read: generous, so that a loaded machine does not fail the tests.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The server drops connections that have not sent a whole request within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A response as read off the wire.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The body as text: failures then show the server's one-line reason.
        write!(f, "{} {:?} {:?}", self.status, self.headers, String::from_utf8_lossy(&self.body))
    }
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> usize {
        self.header("content-length").expect("Content-Length").parse().expect("numeric Content-Length")
    }

    fn body_text(&self) -> &str {
        std::str::from_utf8(&self.body).expect("UTF-8 body")
    }
}

/// A raw HTTP/1.1 connection to the shared `gale echo`.
struct Conn {
    stream: TcpStream,
    /// Bytes read but not yet consumed (a pipelined response may follow the current one).
    buf: Vec<u8>,
}

impl Conn {
    fn open() -> Conn {
        let stream = TcpStream::connect(shared::echo_addr()).expect("connect");
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Conn { stream, buf: Vec::new() }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write the request");
    }

    /// Read more bytes into the buffer; returns how many (0 at EOF).
    fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                n
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!(
                    "no answer within {READ_TIMEOUT:?}; got so far: {:?}",
                    String::from_utf8_lossy(&self.buf)
                )
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }

    /// The next response; `head_only` for the answer to a HEAD request (no body follows).
    fn read_response(&mut self, head_only: bool) -> Response {
        let head_len = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(self.fill() > 0, "connection closed before a full response head");
        };
        let head = String::from_utf8(self.buf[..head_len - 4].to_vec()).expect("ASCII head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status code");
        assert!(status_line.starts_with("HTTP/1.1 "), "status line {status_line:?}");
        let headers = lines
            .map(|l| {
                let (n, v) = l.split_once(':').expect("a header line");
                (n.trim().to_string(), v.trim().to_string())
            })
            .collect();
        self.buf.drain(..head_len);
        let mut response = Response { status, headers, body: Vec::new() };
        let len = if head_only { 0 } else { response.content_length() };
        while self.buf.len() < len {
            assert!(self.fill() > 0, "connection closed inside a response body");
        }
        response.body = self.buf.drain(..len).collect();
        response
    }

    fn response(&mut self) -> Response {
        self.read_response(false)
    }

    /// Send `request` and read the response.
    fn exchange(&mut self, request: &[u8]) -> Response {
        self.send(request);
        self.response()
    }

    /// The server must close the connection: nothing more arrives, then EOF.
    fn expect_closed(&mut self) {
        assert!(
            self.buf.is_empty(),
            "unexpected bytes after the response: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
        let mut byte = [0u8; 1];
        match self.stream.read(&mut byte) {
            Ok(0) => {}
            Ok(_) => panic!("unexpected bytes after the response"),
            Err(e) => panic!("expected EOF, got {e}"),
        }
    }
}

/// A GET request for `/healthz` with extra header lines (each ending in CRLF).
fn healthz(method: &str, extra: &str) -> Vec<u8> {
    format!("{method} /healthz HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n").into_bytes()
}

fn assert_healthz_ok(response: &Response, keep_alive: bool) {
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.body_text(), "ok\n");
    assert_eq!(response.header("connection"), Some(if keep_alive { "keep-alive" } else { "close" }));
}

/// Send `request` on a new connection: the answer must be an error response with `status`
/// whose body names the problem (contains `naming`), and the server must then close.
fn expect_refusal(request: &[u8], status: u16, naming: &str) -> Response {
    let mut conn = Conn::open();
    conn.send(request);
    let response = conn.response();
    assert_eq!(response.status, status, "{response:?}");
    assert_error_shape(&response, naming);
    conn.expect_closed();
    response
}

/// An error response: plain text, one line naming the problem, and `Connection: close`.
fn assert_error_shape(response: &Response, naming: &str) {
    let body = response.body_text();
    assert!(response.header("content-type").is_some_and(|t| t.starts_with("text/plain")), "{response:?}");
    assert_eq!(response.header("connection"), Some("close"), "{response:?}");
    assert!(body.ends_with('\n') && body.lines().count() == 1, "one-line body expected: {body:?}");
    assert!(body.to_lowercase().contains(&naming.to_lowercase()), "body {body:?} should name {naming:?}");
}

/// The headers of a valid upgrade request, for tests to break one at a time.
fn upgrade_headers() -> Vec<(&'static str, &'static str)> {
    vec![
        ("Host", "localhost"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ]
}

/// An upgrade request to `/echo` with `method`, after `change` edits the valid headers.
fn upgrade(method: &str, change: impl FnOnce(&mut Vec<(&'static str, &'static str)>)) -> Vec<u8> {
    let mut headers = upgrade_headers();
    change(&mut headers);
    let mut request = format!("{method} /echo HTTP/1.1\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

fn set(headers: &mut [(&'static str, &'static str)], name: &str, value: &'static str) {
    headers.iter_mut().filter(|(n, _)| *n == name).for_each(|(_, v)| *v = value);
}

fn remove(headers: &mut Vec<(&'static str, &'static str)>, name: &str) {
    headers.retain(|(n, _)| *n != name);
}

// ---------------------------------------------------------------------------------------------
// /healthz, keep-alive, pipelining

#[test]
fn healthz_answers_200_ok() {
    let mut conn = Conn::open();
    assert_healthz_ok(&conn.exchange(&healthz("GET", "")), true);
}

#[test]
fn keep_alive_serves_two_requests_on_one_connection() {
    let mut conn = Conn::open();
    assert_healthz_ok(&conn.exchange(&healthz("GET", "")), true);
    assert_healthz_ok(&conn.exchange(&healthz("GET", "")), true);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let mut conn = Conn::open();
    // Three requests in one write; their answers differ, so an order mix-up shows.
    let mut batch = healthz("GET", "");
    batch.extend(healthz("HEAD", ""));
    batch.extend(b"GET /other HTTP/1.1\r\nHost: localhost\r\n\r\n");
    conn.send(&batch);
    assert_healthz_ok(&conn.response(), true);
    let head = conn.read_response(true);
    assert_eq!((head.status, head.content_length()), (200, 3));
    assert_eq!(conn.response().status, 426);
    conn.expect_closed();
}

#[test]
fn head_healthz_has_headers_but_no_body() {
    let mut conn = Conn::open();
    conn.send(&healthz("HEAD", ""));
    let head = conn.read_response(true);
    assert_eq!((head.status, head.content_length()), (200, 3));
    // A body sent by mistake would be read as the start of the next response.
    assert_healthz_ok(&conn.exchange(&healthz("GET", "")), true);
}

#[test]
fn http10_request_without_keep_alive_is_closed_after_the_response() {
    let mut conn = Conn::open();
    assert_healthz_ok(&conn.exchange(b"GET /healthz HTTP/1.0\r\n\r\n"), false);
    conn.expect_closed();
}

#[test]
fn http10_request_with_keep_alive_stays_open() {
    let mut conn = Conn::open();
    let request = b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
    assert_healthz_ok(&conn.exchange(request), true);
    assert_healthz_ok(&conn.exchange(request), true);
}

#[test]
fn connection_close_is_honoured() {
    let mut conn = Conn::open();
    assert_healthz_ok(&conn.exchange(&healthz("GET", "Connection: close\r\n")), false);
    conn.expect_closed();
}

#[test]
fn request_split_into_many_small_writes_is_answered() {
    let mut conn = Conn::open();
    for byte in healthz("GET", "User-Agent: one byte at a time\r\n") {
        conn.send(&[byte]);
        // Nagle is off: the pause makes most bytes arrive as a segment of their own.
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_healthz_ok(&conn.response(), true);
}

// ---------------------------------------------------------------------------------------------
// Refused requests

#[test]
fn plain_get_on_a_websocket_path_gets_426() {
    let response = expect_refusal(b"GET /other HTTP/1.1\r\nHost: localhost\r\n\r\n", 426, "WebSocket");
    assert_eq!(response.header("upgrade"), Some("websocket"));
}

#[test]
fn post_to_healthz_gets_405_with_allow() {
    let request = healthz("POST", "Content-Length: 0\r\n");
    let response = expect_refusal(&request, 405, "method");
    assert!(response.header("allow").is_some_and(|a| a.contains("GET")), "{response:?}");
}

#[test]
fn malformed_request_line_gets_400() {
    expect_refusal(b"NOT A VALID REQUEST LINE\r\n\r\n", 400, "malformed");
}

#[test]
fn head_over_8_kib_gets_431() {
    let request = healthz("GET", &format!("X-Filler: {}\r\n", "a".repeat(9000)));
    expect_refusal(&request, 431, "8 KiB");
}

#[test]
fn seventy_headers_get_431() {
    let extra: String = (0..70).map(|i| format!("X-Header-{i}: {i}\r\n")).collect();
    expect_refusal(&healthz("GET", &extra), 431, "header");
}

#[test]
fn chunked_body_gets_411() {
    let mut request = healthz("POST", "Transfer-Encoding: chunked\r\n");
    request.extend(b"2\r\nok\r\n0\r\n\r\n");
    expect_refusal(&request, 411, "chunked");
}

#[test]
fn http11_request_without_host_gets_400() {
    // RFC 9112 section 3.2: a server MUST answer 400 to an HTTP/1.1 request without Host.
    expect_refusal(b"GET /healthz HTTP/1.1\r\n\r\n", 400, "Host");
}

#[test]
fn content_length_with_a_sign_gets_400() {
    // Content-Length is 1*DIGIT; reading "+5" as 5 is how request smuggling starts when a
    // proxy in front reads it differently.
    let mut request = healthz("GET", "Content-Length: +5\r\n");
    request.extend(b"hello");
    expect_refusal(&request, 400, "Content-Length");
}

#[test]
fn body_over_1_mib_gets_413() {
    // Refused on the head alone: the body is never sent.
    expect_refusal(&healthz("POST", "Content-Length: 2000000\r\n"), 413, "body");
}

#[test]
fn slowloris_connection_is_dropped_after_the_handshake_timeout() {
    let mut conn = Conn::open();
    conn.stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT + READ_TIMEOUT)).unwrap();
    conn.send(b"GET /heal");
    let start = Instant::now();
    conn.expect_closed();
    let took = start.elapsed();
    // Closed by the timeout (not at once, as for a refused request), and not much later.
    assert!(took >= HANDSHAKE_TIMEOUT / 2, "closed after {took:?}, before the handshake timeout");
    assert!(took < Duration::from_secs(15), "closed only after {took:?}");
}

// ---------------------------------------------------------------------------------------------
// Refused upgrades

#[test]
fn valid_upgrade_is_accepted() {
    // The baseline the refusals below break one header at a time.
    let mut conn = Conn::open();
    conn.send(&upgrade("GET", |_| {}));
    let response = conn.read_response(true);
    assert_eq!(response.status, 101, "{response:?}");
    assert_eq!(response.header("sec-websocket-accept"), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
}

#[test]
fn upgrade_with_version_8_gets_426_naming_version_13() {
    let request = upgrade("GET", |h| set(h, "Sec-WebSocket-Version", "8"));
    let response = expect_refusal(&request, 426, "version");
    assert_eq!(response.header("sec-websocket-version"), Some("13"));
}

#[test]
fn upgrade_with_key_of_wrong_length_gets_400() {
    // 10 bytes in base64: 16 characters instead of 24.
    expect_refusal(&upgrade("GET", |h| set(h, "Sec-WebSocket-Key", "c2hvcnQga2V5IQ==")), 400, "Key");
}

#[test]
fn upgrade_with_24_character_key_of_17_bytes_gets_400() {
    expect_refusal(&upgrade("GET", |h| set(h, "Sec-WebSocket-Key", "MTIzNDU2Nzg5MDEyMzQ1Njc=")), 400, "Key");
}

#[test]
fn upgrade_without_key_gets_400() {
    expect_refusal(&upgrade("GET", |h| remove(h, "Sec-WebSocket-Key")), 400, "Key");
}

#[test]
fn upgrade_without_host_gets_400() {
    expect_refusal(&upgrade("GET", |h| remove(h, "Host")), 400, "Host");
}

#[test]
fn upgrade_with_post_gets_400() {
    expect_refusal(&upgrade("POST", |_| {}), 400, "GET");
}

// ---------------------------------------------------------------------------------------------
// Request framing (RFC 9112 section 6.3), Expect, absolute-form targets

/// `request` followed, in the same write, by a second request: the server must answer the
/// first with `status` and close, never serving the second (request smuggling).
fn expect_refusal_without_smuggling(request: &[u8], status: u16, naming: &str) {
    let mut both = request.to_vec();
    both.extend(healthz("GET", ""));
    expect_refusal(&both, status, naming);
}

/// A `/healthz` request with raw header lines (any bytes, each ending in CRLF).
fn healthz_raw(method: &str, extra: &[u8]) -> Vec<u8> {
    let mut request = format!("{method} /healthz HTTP/1.1\r\nHost: localhost\r\n").into_bytes();
    request.extend_from_slice(extra);
    request.extend_from_slice(b"\r\n");
    request
}

#[test]
fn content_length_that_is_not_utf8_gets_400_and_the_next_request_is_not_served() {
    expect_refusal_without_smuggling(
        &healthz_raw("GET", b"Content-Length: 34\xff\r\n"),
        400,
        "Content-Length",
    );
}

#[test]
fn transfer_encoding_that_is_not_utf8_gets_400_not_a_skipped_411() {
    expect_refusal_without_smuggling(
        &healthz_raw("POST", b"Transfer-Encoding: chunked\xff\r\n"),
        400,
        "Transfer-Encoding",
    );
}

#[test]
fn ambiguous_framing_gets_400() {
    let cases: [&[u8]; 5] = [
        b"Content-Length: 3\r\nContent-Length: 3\r\n",
        b"Content-Length: 3, 3\r\n",
        b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked, identity\r\n",
        b"Content-Length: 0x3\r\n",
    ];
    for headers in cases {
        expect_refusal_without_smuggling(&healthz_raw("GET", headers), 400, "");
    }
}

#[test]
fn expect_100_continue_gets_100_before_the_body() {
    let mut conn = Conn::open();
    conn.send(&healthz("GET", "Expect: 100-continue\r\nContent-Length: 5\r\n"));
    let interim = conn.read_response(true);
    assert_eq!(interim.status, 100, "{interim:?}");
    conn.send(b"hello");
    assert_healthz_ok(&conn.response(), true);
}

#[test]
fn unknown_expectation_gets_417() {
    expect_refusal(&healthz("GET", "Expect: something-else\r\nContent-Length: 1\r\n"), 417, "expectation");
}

#[test]
fn absolute_form_target_is_served_by_its_path() {
    let mut conn = Conn::open();
    let request = b"GET http://localhost/healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
    assert_healthz_ok(&conn.exchange(request), true);
}
