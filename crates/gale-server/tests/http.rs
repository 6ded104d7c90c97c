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
