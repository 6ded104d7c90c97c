//! The HTTP and command edges of `gale serve`, over raw sockets: every `/api/*` error is JSON
//! (the server's own 400, 404, 405, 411, 413 and 431 too), a request whose body cannot be
//! delimited publishes nothing and smuggles nothing, `Expect: 100-continue` and absolute-form
//! targets work for publishes, and an error reply to a command that carries an `id` carries
//! it back, whatever the mistake.

mod raw;
mod shared;
mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use raw::{TEXT, frame, upgrade_request};
use serde_json::Value;
use support::gale_bin;

const API_KEY: &str = "test-key";

/// One `gale serve` for the tests of this file, on the backend under test; it lives until the
/// test binary exits.
fn gateway() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        shared::start_shared_command(|| {
            let mut cmd = Command::new(gale_bin());
            cmd.args(["serve", "--listen", "127.0.0.1:0", "--threads", "2", "--api-key", API_KEY]);
            if let Ok(backend) = std::env::var("GALE_BACKEND") {
                cmd.args(["--backend", &backend]);
            }
            cmd
        })
    })
}

/// An HTTP response as read off the wire.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as JSON; fails the test if it is not.
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

fn connect() -> TcpStream {
    let stream = TcpStream::connect(gateway()).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Read one response (head, then a `Content-Length` body); bytes after it stay in `buf`.
fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Response {
    let mut chunk = [0u8; 16 * 1024];
    let head_len = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = stream.read(&mut chunk).expect("read the response");
        assert!(n > 0, "closed before a response: {:?}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_len - 4].to_vec()).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().expect("numeric Content-Length"));
    while buf.len() < head_len + len {
        let n = stream.read(&mut chunk).expect("read the body");
        assert!(n > 0, "closed inside a body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_len..head_len + len]).into_owned();
    buf.drain(..head_len + len);
    Response { status, headers, body }
}

/// Send `request` on a new connection and read one response.
fn exchange(request: &[u8]) -> Response {
    let mut stream = connect();
    stream.write_all(request).expect("send the request");
    read_response(&mut stream, &mut Vec::new())
}

/// The server must close `stream` with nothing more after what was read.
fn expect_closed(stream: &mut TcpStream, buf: &[u8]) {
    assert!(buf.is_empty(), "more after the response: {:?}", String::from_utf8_lossy(buf));
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => {}
        Ok(_) => panic!("more after the response"),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected EOF, got {e}"),
    }
}

fn auth() -> String {
    format!("Authorization: Bearer {API_KEY}\r\n")
}

/// `{"error": {"code": status, "reason": ...}}` as `application/json`.
fn assert_json_error(response: &Response, status: u16, naming: &str) {
    assert_eq!(response.status, status, "{response:?}");
    assert_eq!(response.header("content-type"), Some("application/json"), "{response:?}");
    let v = response.json();
    assert_eq!(v["error"]["code"], status, "{response:?}");
    let reason = v["error"]["reason"].as_str().expect("a reason");
    assert!(reason.to_lowercase().contains(&naming.to_lowercase()), "{reason:?} should name {naming:?}");
}

/// The topic's current sequence number (0 when nothing was published to it).
fn topic_seq(topic: &str) -> u64 {
    let request =
        format!("GET /api/topics/{topic} HTTP/1.1\r\nHost: t\r\n{}Connection: close\r\n\r\n", auth());
    let response = exchange(request.as_bytes());
    assert_eq!(response.status, 200, "{response:?}");
    response.json()["seq"].as_u64().expect("seq")
}

#[test]
fn every_api_error_is_json() {
    let a = auth();
    let big = "a".repeat(9000);
    let cases: Vec<(String, u16, &str)> = vec![
        (format!("GET /api/nothing HTTP/1.1\r\nHost: t\r\n{a}\r\n"), 404, "no route"),
        (format!("GET /api/publish/t HTTP/1.1\r\nHost: t\r\n{a}\r\n"), 405, "method"),
        (
            format!("POST /api/publish/t HTTP/1.1\r\nHost: t\r\n{a}Content-Length: 2000000\r\n\r\n"),
            413,
            "body",
        ),
        (
            format!("POST /api/publish/t HTTP/1.1\r\nHost: t\r\n{a}Transfer-Encoding: chunked\r\n\r\n"),
            411,
            "chunked",
        ),
        (
            format!("POST /api/publish/t HTTP/1.1\r\nHost: t\r\n{a}Content-Length: +1\r\n\r\nx"),
            400,
            "Content-Length",
        ),
        (
            format!("POST /api/publish/t HTTP/1.1\r\nHost: t\r\n{a}Expect: nothing\r\n\r\n"),
            417,
            "expectation",
        ),
        (format!("GET /api/topics/t HTTP/1.1\r\nHost: t\r\nX-Filler: {big}\r\n\r\n"), 431, "8 KiB"),
        (format!("GET /api/topics/t HTTP/1.1\r\n{a}\r\n"), 400, "Host"),
        ("POST /api/publish/t HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx".to_string(), 401, "key"),
    ];
    for (request, status, naming) in cases {
        let response = exchange(request.as_bytes());
        assert_json_error(&response, status, naming);
        if status == 405 {
            assert_eq!(response.header("allow"), Some("POST"));
        }
    }
    // Outside `/api/` the server's plain-text answers stay.
    let response = exchange(b"GET /nothing HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!((response.status, response.header("content-type")), (404, Some("text/plain; charset=utf-8")));
}

#[test]
fn a_publish_whose_length_is_not_utf8_publishes_nothing_and_smuggles_nothing() {
    let topic = "smuggle:a";
    let mut request = format!("POST /api/publish/{topic} HTTP/1.1\r\nHost: t\r\n{}", auth()).into_bytes();
    request.extend_from_slice(b"Content-Length: 34\xff\r\n\r\n");
    // What a proxy in front would have read as the first request's body; the gateway must not
    // run it as a second request.
    let smuggled =
        format!("POST /api/publish/{topic} HTTP/1.1\r\nHost: t\r\n{}Content-Length: 1\r\n\r\nx", auth());
    request.extend_from_slice(smuggled.as_bytes());
    let mut stream = connect();
    stream.write_all(&request).expect("send");
    let mut buf = Vec::new();
    assert_json_error(&read_response(&mut stream, &mut buf), 400, "Content-Length");
    expect_closed(&mut stream, &buf);
    assert_eq!(topic_seq(topic), 0, "nothing was published");
}

#[test]
fn a_publish_with_expect_100_continue_gets_100_then_its_answer() {
    let topic = "expect:a";
    let body = format!("\"{}\"", "z".repeat(2000));
    let head = format!(
        "POST /api/publish/{topic} HTTP/1.1\r\nHost: t\r\n{}Content-Type: application/json\r\n\
         Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        auth(),
        body.len()
    );
    let mut stream = connect();
    stream.write_all(head.as_bytes()).expect("send the head");
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut stream, &mut buf).status, 100);
    stream.write_all(body.as_bytes()).expect("send the body");
    let response = read_response(&mut stream, &mut buf);
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.json()["seq"], 1);
}

#[test]
fn a_publish_with_an_absolute_form_target_is_served() {
    let addr = gateway();
    let request = format!(
        "POST http://{addr}/api/publish/absolute:a HTTP/1.1\r\nHost: {addr}\r\n{}Content-Length: 2\r\n\r\nhi",
        auth()
    );
    let response = exchange(request.as_bytes());
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(response.json()["topic"], "absolute:a");
}

#[test]
fn command_errors_carry_the_id_back() {
    let addr = gateway();
    let mut ws = raw::Client::handshake(addr, &[upgrade_request(addr, "/ws").as_bytes()], Duration::ZERO);
    let mut ask = |command: &str| -> Value {
        ws.send(&frame(TEXT, command.as_bytes()));
        let reply = ws.read_frame();
        assert_eq!(reply.opcode, TEXT);
        serde_json::from_slice(&reply.payload).expect("a JSON reply")
    };
    // (command, the id the reply must carry: None = no `id` key at all)
    let cases: [(&str, Option<Value>); 9] = [
        (r#"{"id":1,"op":"ping","bogus":true}"#, Some(1.into())),
        (r#"{"id":"two","op":5}"#, Some("two".into())),
        (r#"{"id":[3],"topic":"t"}"#, Some(serde_json::json!([3]))),
        (
            r#"{"id":{"n":4},"op":"subscribe","topic":"t","since":{"epoch":"e"}}"#,
            Some(serde_json::json!({"n":4})),
        ),
        (r#"{"id":5,"op":"subscribe","topic":"t","since":{"epoch":"e","seq":-1}}"#, Some(5.into())),
        (r#"{"id":null,"op":"nope"}"#, Some(Value::Null)),
        (r#"{"id":null,"op":"ping","topic":7}"#, Some(Value::Null)),
        (r#"{"op":"ping","bogus":1}"#, None),
        (r#"not JSON"#, None),
    ];
    for (command, id) in cases {
        let reply = ask(command);
        assert_eq!(reply["error"]["code"], 400, "{command}: {reply}");
        assert_eq!(reply.get("id").cloned(), id, "{command}: {reply}");
    }
    // A good command with `"id": null` is answered with `"id": null` too.
    let reply = ask(r#"{"id":null,"op":"ping"}"#);
    assert_eq!((reply.get("id"), reply["ok"].as_bool()), (Some(&Value::Null), Some(true)), "{reply}");
}
