//! Limits on the input a peer can make the server hold, and for how long: a message begun and
//! never finished is closed at `Behavior::message_timeout`; a request head or body trickled
//! byte by byte is dropped at `ServerConfig::handshake_timeout`; unfinished messages on a loop
//! share `ServerConfig::partial_message_budget`, and the connection whose message would pass
//! it is closed with 1013 while the others go on.
//!
//! The loops' timer wheel ticks every 250 ms and rounds timeouts to whole ticks, and the machine
//! may be loaded, so times are only checked within wide ranges.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Client, Ev, Frame, Log, Recorder, Recv, TestServer, assert_between, connect_tcp, wait_until};
use gale_frame::{FrameSpec, OpCode, append_frame};
use gale_server::{App, Behavior, HttpRequest, HttpResponse, ServerConfig};

/// One loop, an echo route at `/ws` with `behavior`, and a POST route at `/upload`.
fn server_with(config: ServerConfig, behavior: Behavior) -> (TestServer, Log<Ev>) {
    let log = Log::new();
    let app = App::new()
        .config(ServerConfig { threads: 1, ..config })
        .ws("/ws", behavior, Recorder::echo(&log))
        .post("/upload", |req: &HttpRequest<'_>| HttpResponse::text(200, format!("{}\n", req.body().len())));
    (TestServer::start(app), log)
}

/// A route whose messages time out after 1 s, with nothing else to close it meanwhile.
fn message_timeout_1s() -> Behavior {
    Behavior {
        message_timeout: Some(Duration::from_secs(1)),
        idle_timeout: Some(Duration::from_secs(60)),
        ..Behavior::default()
    }
}

/// A masked client frame.
fn frame(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    let spec = FrameSpec { opcode, fin, compressed: false, mask: Some([0x11, 0x22, 0x33, 0x44]) };
    append_frame(&mut wire, spec, payload);
    wire
}

/// Send `bytes` one at a time, `every` apart, reading meanwhile, until the server sends a
/// frame (returned with the time since the first byte) or the bytes run out (panics).
fn trickle_until_a_frame(client: &mut Client, bytes: &[u8], every: Duration) -> (Frame, Duration) {
    let start = Instant::now();
    for byte in bytes {
        // The server may have closed its side already; the read below says what it sent.
        let _ = (&mut client.stream()).write_all(&[*byte]);
        match client.recv(every) {
            Recv::Timeout => {}
            Recv::Frame(frame) => return (frame, start.elapsed()),
            Recv::Eof => panic!("the connection ended without a close frame"),
        }
    }
    panic!("the server let {} bytes trickle in over {:?} without closing", bytes.len(), start.elapsed());
}

#[test]
fn trickled_frame_is_closed_at_message_timeout_with_1008() {
    let (server, log) = server_with(ServerConfig::default(), message_timeout_1s());
    let mut client = server.connect("/ws");
    // A 100-byte message, one byte every 200 ms: 20 s if the server waited for it all, and
    // every byte is activity that keeps the idle timeout and the pings away.
    let wire = frame(OpCode::Binary, true, &[7; 100]);
    let (got, took) = trickle_until_a_frame(&mut client, &wire, Duration::from_millis(200));
    assert_eq!(got, Frame::Close(Some(1008), "message not completed in time".into()));
    assert_between("the message timeout", took, 0.9..=5.0);
    client.expect_eof();
    assert_eq!(log.wait_close(0), (1008, "message not completed in time".into()));
    server.stop();
    log.assert_lifecycles();
}

#[test]
fn pings_between_fragments_do_not_restart_the_message_clock() {
    let (server, log) = server_with(ServerConfig::default(), message_timeout_1s());
    let mut client = server.connect("/ws");
    let start = Instant::now();
    client.send_raw(&frame(OpCode::Text, false, b"first fragment of many"));
    // Whole control frames keep coming, but the message never goes on.
    let got = loop {
        client.send(OpCode::Ping, b"still here");
        match client.recv(Duration::from_millis(200)) {
            Recv::Frame(Frame::Pong(_)) | Recv::Timeout => {}
            Recv::Frame(other) => break other,
            Recv::Eof => panic!("the connection ended without a close frame"),
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never closed");
    };
    assert_eq!(got, Frame::Close(Some(1008), "message not completed in time".into()));
    assert_between("the message timeout", start.elapsed(), 0.9..=5.0);
    client.expect_eof();
    assert_eq!(log.wait_close(0).0, 1008);
    server.stop();
    log.assert_lifecycles();
}

#[test]
fn messages_streamed_back_to_back_each_within_the_timeout_stay_open() {
    let (server, log) = server_with(ServerConfig::default(), message_timeout_1s());
    let mut client = server.connect("/ws");
    // Every read the server makes ends inside a message, for 3 s (three timeouts), but each
    // message takes 0.6 s: the clock restarts with each one.
    let start = Instant::now();
    let mut sent = 0;
    let mut wire = frame(OpCode::Text, true, format!("message {sent}").as_bytes());
    client.send_raw(&wire[..wire.len() / 2]);
    while start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(300));
        let rest = wire[wire.len() / 2..].to_vec();
        sent += 1;
        wire = frame(OpCode::Text, true, format!("message {sent}").as_bytes());
        let mut bytes = rest;
        bytes.extend_from_slice(&wire[..wire.len() / 2]);
        client.send_raw(&bytes);
        assert_eq!(client.expect_text(), format!("message {}", sent - 1));
        std::thread::sleep(Duration::from_millis(300));
    }
    client.send_raw(&wire[wire.len() / 2..]);
    assert_eq!(client.expect_text(), format!("message {sent}"));
    assert!(sent >= 4, "only {sent} messages in 3 s");
    assert!(!log.snapshot().iter().any(|e| matches!(e, Ev::Close { .. })), "closed while messages completed");
    client.close_normally();
    server.stop();
    log.assert_lifecycles();
}

/// Write `bytes` one at a time, `every` apart, until the server closes the connection;
/// returns how long that took from the first byte. Panics if every byte went through.
fn trickle_until_closed(stream: &mut TcpStream, bytes: &[u8], every: Duration) -> Duration {
    let start = Instant::now();
    stream.set_read_timeout(Some(every)).expect("set a read timeout");
    let mut buf = [0u8; 4096];
    for byte in bytes {
        if stream.write_all(&[*byte]).is_err() {
            return start.elapsed();
        }
        match stream.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(n) => {
                panic!("the server waited for the trickled request: {:?}", String::from_utf8_lossy(&buf[..n]))
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return start.elapsed(),
        }
    }
    panic!("the server let {} bytes trickle in over {:?} without closing", bytes.len(), start.elapsed());
}

fn handshake_timeout_1s() -> ServerConfig {
    ServerConfig { handshake_timeout: Duration::from_secs(1), ..ServerConfig::default() }
}

#[test]
fn request_head_trickled_byte_by_byte_is_dropped_at_the_handshake_timeout() {
    let (server, log) = server_with(handshake_timeout_1s(), Behavior::default());
    let mut stream = connect_tcp(server.addr);
    let head = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    );
    // Each byte arrives well within the timeout of the one before: bytes must not restart it.
    let took = trickle_until_closed(&mut stream, head.as_bytes(), Duration::from_millis(100));
    assert_between("the handshake timeout", took, 0.9..=5.0);
    assert!(log.snapshot().is_empty(), "no WebSocket opened");
    server.stop();
}

#[test]
fn request_body_trickled_byte_by_byte_is_dropped_at_the_handshake_timeout() {
    let (server, _log) = server_with(handshake_timeout_1s(), Behavior::default());
    let mut stream = connect_tcp(server.addr);
    let head = format!("POST /upload HTTP/1.1\r\nHost: {}\r\nContent-Length: 200\r\n\r\n", server.addr);
    stream.write_all(head.as_bytes()).expect("send the head");
    let start = Instant::now();
    trickle_until_closed(&mut stream, &[b'x'; 200], Duration::from_millis(100));
    assert_between("the handshake timeout", start.elapsed(), 0.9..=5.0);
    server.stop();
}

// ---------------------------------------------------------------------------------------------
// partial_message_budget

const MIB: usize = 1 << 20;

/// Bytes loop 0 holds for unfinished messages.
fn held(server: &TestServer) -> usize {
    server.handle.loop_stats(0).partial_message_bytes
}

/// Send all of a message's frame but its last byte.
fn all_but_the_last_byte(client: &mut Client, wire: &[u8]) {
    client.send_raw(&wire[..wire.len() - 1]);
}

#[test]
fn partial_message_budget_refuses_the_message_that_passes_it_with_1013() {
    // Room for two unfinished 1 MiB messages and half of a third.
    let config = ServerConfig { partial_message_budget: 5 * MIB / 2, ..ServerConfig::default() };
    let (server, log) = server_with(config, Behavior::default());
    let message = vec![9u8; MIB];
    let wire = frame(OpCode::Binary, true, &message);
    let last = &wire[wire.len() - 1..];

    let mut a = server.connect("/ws?id=1");
    let mut b = server.connect("/ws?id=2");
    all_but_the_last_byte(&mut a, &wire);
    all_but_the_last_byte(&mut b, &wire);
    // Each holds a buffer of exactly its message's size, no more.
    wait_until("two unfinished messages held", || held(&server) == 2 * MIB);

    // The third would pass the budget: refused, the bytes it held given back.
    let mut c = server.connect("/ws?id=3");
    all_but_the_last_byte(&mut c, &wire);
    assert_eq!(c.expect_close(), (Some(1013), "server busy: too much unfinished input".into()));
    c.expect_eof();
    assert_eq!(log.wait_close(3), (1013, "server busy: too much unfinished input".into()));
    wait_until("the refused message's bytes back", || held(&server) == 2 * MIB);

    // The others go on: A completes, which gives its megabyte back...
    a.send_raw(last);
    assert_eq!(a.expect_frame(), Frame::Binary(message.clone()));
    wait_until("a completed message's bytes back", || held(&server) == MIB);
    // ... and makes room for another connection's message.
    let mut d = server.connect("/ws?id=4");
    all_but_the_last_byte(&mut d, &wire);
    wait_until("the new message held", || held(&server) == 2 * MIB);
    d.send_raw(last);
    assert_eq!(d.expect_frame(), Frame::Binary(message.clone()));
    wait_until("its bytes back", || held(&server) == MIB);

    // A connection that goes away in the middle of its message gives it back too.
    drop(b);
    assert_eq!(log.wait_close(2).0, 1006);
    wait_until("a closed connection's bytes back", || held(&server) == 0);

    a.assert_echo("still open");
    d.assert_echo("still open");
    a.close_normally();
    d.close_normally();
    server.stop();
    log.assert_lifecycles();
}

#[test]
fn whole_messages_take_nothing_from_the_budget() {
    // A budget too small for any split message: messages that arrive whole still go through.
    let config = ServerConfig { partial_message_budget: 0, ..ServerConfig::default() };
    let (server, log) = server_with(config, Behavior::default());
    let mut client = server.connect("/ws");
    for i in 0..20 {
        client.assert_echo(&format!("whole message {i}"));
    }
    assert_eq!(held(&server), 0);
    // The first split one is refused.
    let wire = frame(OpCode::Text, true, b"split in two");
    client.send_raw(&wire[..8]);
    assert_eq!(client.expect_close().0, Some(1013));
    client.expect_eof();
    server.stop();
    log.assert_lifecycles();
}
