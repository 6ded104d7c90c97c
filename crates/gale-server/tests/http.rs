//! Plain HTTP routes of an `App`: what `get` and `post` handlers are given (method, path, query,
//! headers, a body that arrives in several reads), the responses they build, and the answers for
//! unknown paths (404) and wrong methods (405 with `Allow`).

mod common;

use std::io::Write;

use common::{Log, TestServer, connect_tcp, http_exchange, http_get, read_http_reply};
use gale_server::{App, HttpRequest, HttpResponse};

/// What a route handler saw of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    method: String,
    path: String,
    query: Option<String>,
    trace: Option<String>,
    body: Vec<u8>,
}

fn record(log: &Log<Seen>, req: &HttpRequest<'_>) {
    log.push(Seen {
        method: req.method().to_string(),
        path: req.path().to_string(),
        query: req.query().map(str::to_string),
        trace: req.header("x-trace").map(str::to_string),
        body: req.body().to_vec(),
    });
}

/// `GET /items*` answers JSON with a custom header; `POST /upload` answers with the body's size.
fn start(log: &Log<Seen>) -> TestServer {
    let (get_log, post_log) = (log.clone(), log.clone());
    let app = App::new()
        .threads(1)
        .get("/items*", move |req: &HttpRequest<'_>| {
            record(&get_log, req);
            HttpResponse::json(200, r#"{"items":[]}"#).header("X-Served-By", "gale-test")
        })
        .post("/upload", move |req: &HttpRequest<'_>| {
            record(&post_log, req);
            HttpResponse::json(201, format!(r#"{{"received":{}}}"#, req.body().len()))
        });
    TestServer::start(app)
}

#[test]
fn get_handler_sees_method_path_query_and_headers() {
    let log = Log::new();
    let server = start(&log);
    let request = format!(
        "GET /items/42?color=blue&size=9 HTTP/1.1\r\nHost: {}\r\nX-Trace: abc-123\r\nConnection: close\r\n\r\n",
        server.addr
    );
    let reply = http_exchange(server.addr, &[request.as_bytes()]);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("x-served-by"), Some("gale-test"));
    assert_eq!(reply.body_text(), r#"{"items":[]}"#);
    assert_eq!(
        log.snapshot(),
        [Seen {
            method: "GET".into(),
            path: "/items/42".into(),
            query: Some("color=blue&size=9".into()),
            trace: Some("abc-123".into()),
            body: Vec::new(),
        }]
    );
    server.stop();
}

#[test]
fn post_handler_gets_a_body_sent_in_several_writes() {
    let log = Log::new();
    let server = start(&log);
    let body: Vec<u8> = (0..10 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    let head = format!(
        "POST /upload?draft=1 HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        server.addr,
        body.len()
    );
    // The head alone, then the body in uneven pieces: the server must wait for all of it.
    let mut parts: Vec<&[u8]> = vec![head.as_bytes()];
    parts.extend(body.chunks(3000));
    let reply = http_exchange(server.addr, &parts);
    assert_eq!(reply.status, 201);
    assert_eq!(reply.body_text(), r#"{"received":10240}"#);
    let seen = log.snapshot();
    assert_eq!(seen.len(), 1, "the handler runs once, with the whole body");
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path, "/upload");
    assert_eq!(seen[0].query.as_deref(), Some("draft=1"));
    assert!(seen[0].body == body, "the body arrived altered ({} bytes)", seen[0].body.len());
    server.stop();
}

#[test]
fn keep_alive_connection_serves_pipelined_requests_in_order() {
    let log = Log::new();
    let server = start(&log);
    let mut stream = connect_tcp(server.addr);
    // Two requests in one write; HTTP/1.1 keeps the connection open by default.
    let requests =
        "GET /items?page=1 HTTP/1.1\r\nHost: test\r\n\r\nGET /items?page=2 HTTP/1.1\r\nHost: test\r\n\r\n";
    stream.write_all(requests.as_bytes()).expect("send the requests");
    let mut buf = Vec::new();
    for _ in 0..2 {
        let reply = read_http_reply(&mut stream, &mut buf);
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("connection"), Some("keep-alive"));
    }
    let queries: Vec<_> = log.snapshot().into_iter().map(|s| s.query).collect();
    assert_eq!(queries, [Some("page=1".to_string()), Some("page=2".to_string())]);
    server.stop();
}

#[test]
fn unknown_path_gets_404() {
    let log = Log::new();
    let server = start(&log);
    let reply = http_get(server.addr, "GET", "/nothing-here");
    assert_eq!(reply.status, 404);
    assert!(log.snapshot().is_empty(), "no handler runs");
    server.stop();
}

#[test]
fn wrong_method_gets_405_with_allow() {
    let log = Log::new();
    let server = start(&log);
    let reply = http_get(server.addr, "DELETE", "/upload");
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("POST"));
    let reply = http_get(server.addr, "PUT", "/items");
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("GET"));
    assert!(log.snapshot().is_empty(), "no handler runs");
    server.stop();
}

#[test]
fn error_answers_to_head_requests_carry_no_body() {
    // RFC 9110 section 9.3.2: the head a GET would get, with no body after it. Each error
    // closes the connection, so everything up to EOF is the answer.
    let cases: [(&[u8], &str); 3] = [
        (b"HEAD /upload HTTP/1.1\r\nHost: test\r\n\r\n", "405"),
        (b"HEAD /items HTTP/1.1\r\n\r\n", "400"),
        (b"HEAD /items HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: rot13, chunked\r\n\r\n", "501"),
    ];
    let log = Log::new();
    let server = start(&log);
    for (request, status) in cases {
        let mut stream = connect_tcp(server.addr);
        stream.write_all(request).expect("send the request");
        let answer = String::from_utf8_lossy(&rest_until_eof(&mut stream, &mut Vec::new())).into_owned();
        let shown = String::from_utf8_lossy(request);
        assert!(answer.starts_with(&format!("HTTP/1.1 {status} ")), "{shown:?}: {answer:?}");
        assert!(answer.to_ascii_lowercase().contains("\r\ncontent-length: "), "{shown:?}: {answer:?}");
        assert!(answer.ends_with("\r\n\r\n"), "{shown:?}: a body followed the head: {answer:?}");
    }
    // Any other method gets the body that a HEAD answer announces.
    let mut stream = connect_tcp(server.addr);
    stream.write_all(b"POST /items HTTP/1.1\r\nHost: test\r\n\r\n").expect("send the request");
    let answer = String::from_utf8_lossy(&rest_until_eof(&mut stream, &mut Vec::new())).into_owned();
    assert!(answer.starts_with("HTTP/1.1 405 ") && !answer.ends_with("\r\n\r\n"), "{answer:?}");
    assert!(log.snapshot().is_empty(), "no handler ran: {:?}", log.snapshot());
    server.stop();
}

/// Read from `stream` until EOF: the server must close the connection without sending more
/// than what `buf` already holds. Returns what arrived meanwhile (empty when it closed).
fn rest_until_eof(stream: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> Vec<u8> {
    use std::io::Read;
    let mut rest = std::mem::take(buf);
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return rest,
            Ok(n) => rest.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return rest,
            Err(e) => panic!("expected the server to close the connection, got {e}"),
        }
    }
}

#[test]
fn requests_whose_body_cannot_be_delimited_get_400_411_or_501_and_close() {
    // RFC 9112 section 6.3. Each request is followed by a second one in the same write: if the
    // server misread where the first ends, it would serve the second (request smuggling).
    let cases: [(&[u8], u16); 18] = [
        (b"HTTP/1.1\r\nContent-Length: 34\xff", 400),
        (b"HTTP/1.1\r\nX-Folded: a\r\n Content-Length: 5", 400),
        (b"HTTP/1.1\r\nContent-Length: \xb3", 400),
        (b"HTTP/1.1\r\nTransfer-Encoding: chunked\xff", 400),
        (b"HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5", 400),
        (b"HTTP/1.1\r\nContent-Length: 5, 5", 400),
        (b"HTTP/1.1\r\nContent-Length: 1 2", 400),
        (b"HTTP/1.1\r\nContent-Length: -0", 400),
        (b"HTTP/1.1\r\nContent-Length :5", 400),
        (b"HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked", 400),
        (b"HTTP/1.1\r\nTransfer-Encoding: gzip", 400),
        (b"HTTP/1.1\r\nTransfer-Encoding: chunked, gzip", 400),
        (b"HTTP/1.1\r\nTransfer-Encoding: ,", 400),
        (b"HTTP/1.0\r\nTransfer-Encoding: chunked", 400),
        (b"HTTP/1.1\r\nTransfer-Encoding: gzip, chunked", 411),
        (b"HTTP/1.1\r\nTransfer-Encoding: X-Gzip, chunked", 411),
        // A coding this server does not know (RFC 9112 section 6.1).
        (b"HTTP/1.1\r\nTransfer-Encoding: rot13, chunked", 501),
        (b"HTTP/1.1\r\nTransfer-Encoding: rot13\r\nTransfer-Encoding: chunked", 501),
    ];
    let log = Log::new();
    let server = start(&log);
    for (version_and_headers, status) in cases {
        let mut request = b"POST /upload ".to_vec();
        request.extend_from_slice(version_and_headers);
        request.extend_from_slice(b"\r\nHost: test\r\n\r\n12345");
        request.extend_from_slice(b"GET /items?smuggled HTTP/1.1\r\nHost: test\r\n\r\n");
        let mut stream = connect_tcp(server.addr);
        stream.write_all(&request).expect("send the requests");
        let mut buf = Vec::new();
        let reply = read_http_reply(&mut stream, &mut buf);
        let shown = String::from_utf8_lossy(version_and_headers);
        assert_eq!(reply.status, status, "{shown:?}: {}", reply.body_text());
        assert_eq!(reply.header("connection"), Some("close"), "{shown:?}");
        let rest = rest_until_eof(&mut stream, &mut buf);
        assert!(rest.is_empty(), "{shown:?}: more after the refusal: {:?}", String::from_utf8_lossy(&rest));
    }
    assert!(log.snapshot().is_empty(), "no handler ran: {:?}", log.snapshot());
    server.stop();
}

#[test]
fn content_length_with_surrounding_whitespace_is_read() {
    let log = Log::new();
    let server = start(&log);
    let request =
        b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: \t 5 \t\r\nConnection: close\r\n\r\nhello";
    let reply = http_exchange(server.addr, &[request]);
    assert_eq!(reply.status, 201, "{}", reply.body_text());
    assert_eq!(log.snapshot()[0].body, b"hello");
    server.stop();
}

#[test]
fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let log = Log::new();
    let server = start(&log);
    let mut stream = connect_tcp(server.addr);
    // Twice on one connection: each request gets its own 100, once.
    for round in 0..2 {
        let head =
            "POST /upload HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: 2048\r\n\r\n";
        stream.write_all(head.as_bytes()).expect("send the head");
        let mut buf = Vec::new();
        let interim = read_http_reply(&mut stream, &mut buf);
        assert_eq!(interim.status, 100, "round {round}");
        assert!(buf.is_empty(), "nothing but the 100 before the body: {:?}", String::from_utf8_lossy(&buf));
        // The body in two pieces: the second read must not bring another 100.
        stream.write_all(&[b'x'; 1000]).expect("send the body");
        std::thread::sleep(std::time::Duration::from_millis(20));
        stream.write_all(&[b'y'; 1048]).expect("send the body");
        let reply = read_http_reply(&mut stream, &mut buf);
        assert_eq!(reply.status, 201, "round {round}");
        assert_eq!(reply.body_text(), r#"{"received":2048}"#);
    }
    assert_eq!(log.snapshot().len(), 2);
    server.stop();
}

#[test]
fn expect_100_continue_with_the_body_already_sent_gets_only_the_answer() {
    let log = Log::new();
    let server = start(&log);
    let request = b"POST /upload HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\
                    Connection: close\r\n\r\nhi";
    let reply = http_exchange(server.addr, &[request]);
    assert_eq!(reply.status, 201);
    server.stop();
}

#[test]
fn expectations_that_cannot_be_met_are_refused_without_100() {
    let log = Log::new();
    let server = start(&log);
    // Too large: 413 on the head alone, so that the client never sends the body.
    let too_large =
        "POST /upload HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: 2000000\r\n\r\n";
    // Anything but 100-continue: 417 Expectation Failed.
    let unknown = "POST /upload HTTP/1.1\r\nHost: test\r\nExpect: 200-ok\r\nContent-Length: 2\r\n\r\n";
    // No route would take the body: its answer at once, never a 100 first.
    let no_route =
        "POST /nope HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: 1000\r\n\r\n";
    let wrong_method =
        "POST /items/7 HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: 1000\r\n\r\n";
    for (request, status) in [(too_large, 413), (unknown, 417), (no_route, 404), (wrong_method, 405)] {
        let mut stream = connect_tcp(server.addr);
        stream.write_all(request.as_bytes()).expect("send the head");
        let mut buf = Vec::new();
        let reply = read_http_reply(&mut stream, &mut buf);
        assert_eq!(reply.status, status, "{request:?}: {}", reply.body_text());
        assert!(rest_until_eof(&mut stream, &mut buf).is_empty());
    }
    assert!(log.snapshot().is_empty());
    server.stop();
}

#[test]
fn absolute_form_targets_are_routed_by_their_path() {
    // RFC 9112 section 3.2.2: a server MUST accept the absolute form.
    let log = Log::new();
    let server = start(&log);
    let request = format!(
        "GET http://{}/items/7?color=red HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.addr, server.addr
    );
    let reply = http_exchange(server.addr, &[request.as_bytes()]);
    assert_eq!(reply.status, 200, "{}", reply.body_text());
    let seen = log.snapshot();
    assert_eq!((seen[0].path.as_str(), seen[0].query.as_deref()), ("/items/7", Some("color=red")));
    // An empty path is `/`: no route here.
    let reply = http_get(server.addr, "GET", "HTTP://example.com?q=1");
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body_text(), "no route for /\n");
    server.stop();
}

/// An app whose `/api/*` errors are JSON.
fn start_api() -> TestServer {
    let app = App::new()
        .threads(1)
        .get("/api/items", |_req: &HttpRequest<'_>| HttpResponse::json(200, "[]"))
        .get("/plain", |_req: &HttpRequest<'_>| HttpResponse::text(200, "plain\n"))
        .render_errors("/api/*", |status: u16, reason: &str| {
            HttpResponse::json(status, format!(r#"{{"status":{status},"reason":"{reason}"}}"#))
        });
    TestServer::start(app)
}

#[test]
fn errors_of_a_rendered_prefix_use_the_applications_format() {
    let server = start_api();
    let big_head = format!("GET /api/items HTTP/1.1\r\nHost: t\r\nX-Filler: {}\r\n\r\n", "a".repeat(9000));
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"GET /api/nothing HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".to_vec(), 404, "no route"),
        (b"DELETE /api/items HTTP/1.1\r\nHost: t\r\n\r\n".to_vec(), 405, "method"),
        (b"POST /api/items HTTP/1.1\r\nHost: t\r\nContent-Length: 2000000\r\n\r\n".to_vec(), 413, "body"),
        (
            b"POST /api/items HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            411,
            "chunked",
        ),
        (b"GET /api/items HTTP/1.1\r\nHost: t\r\nContent-Length: x\r\n\r\n".to_vec(), 400, "Content-Length"),
        (b"GET /api/items HTTP/1.1\r\nHost: t\r\nBad Header: 1\r\n\r\n".to_vec(), 400, "header name"),
        (big_head.into_bytes(), 431, "8 KiB"),
    ];
    for (request, status, naming) in cases {
        let reply = http_exchange(server.addr, &[&request]);
        let body = reply.body_text();
        assert_eq!(reply.status, status, "{body}");
        assert_eq!(reply.header("content-type"), Some("application/json"), "{status}: {body}");
        assert!(body.starts_with(&format!(r#"{{"status":{status},"#)) && body.contains(naming), "{body}");
        if status == 405 {
            assert_eq!(reply.header("allow"), Some("GET"));
        }
    }
    // Elsewhere the server's own plain-text answers stay.
    let reply = http_get(server.addr, "GET", "/nothing");
    assert_eq!((reply.status, reply.header("content-type")), (404, Some("text/plain; charset=utf-8")));
    let reply = http_get(server.addr, "POST", "/plain");
    assert_eq!((reply.status, reply.header("content-type")), (405, Some("text/plain; charset=utf-8")));
    server.stop();
}

#[test]
fn a_deferred_answer_that_never_comes_is_a_503_at_the_handshake_timeout() {
    // The handlers keep their responders (so no drop answers 500) until the test ends.
    let held: std::sync::Arc<std::sync::Mutex<Vec<gale_server::Responder>>> = Default::default();
    let (api_held, plain_held) = (held.clone(), held.clone());
    let config = gale_server::ServerConfig {
        handshake_timeout: std::time::Duration::from_secs(1),
        ..gale_server::ServerConfig::default()
    };
    let app = App::new()
        .threads(1)
        .config(config)
        .get("/api/slow", move |req: &HttpRequest<'_>| {
            api_held.lock().unwrap().push(req.defer());
            HttpResponse::text(200, "ignored")
        })
        .get("/slow", move |req: &HttpRequest<'_>| {
            plain_held.lock().unwrap().push(req.defer());
            HttpResponse::text(200, "ignored")
        })
        .render_errors("/api/*", |status: u16, reason: &str| {
            HttpResponse::json(status, format!(r#"{{"status":{status},"reason":"{reason}"}}"#))
        });
    let server = TestServer::start(app);
    for (path, content_type) in [("/api/slow", "application/json"), ("/slow", "text/plain; charset=utf-8")] {
        let started = std::time::Instant::now();
        let mut stream = connect_tcp(server.addr);
        stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()).unwrap();
        let mut buf = Vec::new();
        let reply = read_http_reply(&mut stream, &mut buf);
        let waited = started.elapsed();
        assert_eq!((reply.status, reply.header("content-type")), (503, Some(content_type)), "{path}");
        assert!(reply.body_text().contains("did not come in time"), "{path}: {}", reply.body_text());
        assert_eq!(reply.header("connection"), Some("close"), "{path}");
        assert!(waited >= std::time::Duration::from_millis(900), "{path}: answered after {waited:?}");
        // The connection closes after it; an answer coming now is dropped.
        let mut rest = [0u8; 64];
        assert_eq!(std::io::Read::read(&mut stream, &mut rest).unwrap_or(0), 0, "{path}");
    }
    for responder in std::mem::take(&mut *held.lock().unwrap()) {
        responder.respond(HttpResponse::text(200, "too late"));
    }
    server.stop();
}
