//! Timers of a WebSocket route, with short settings: the idle timeout (closing with 1001 or
//! silently), and automatic pings with the pong timeout that drops dead peers.
//!
//! The loops' timer wheel ticks every 250 ms and rounds timeouts to whole ticks, and the machine
//! may be loaded, so times are only checked within wide ranges.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Ev, Frame, Log, PATIENCE, Recorder, Recv, TestServer, assert_between};
use gale_server::{App, Behavior, IdleClose};

/// An echo route with `behavior`, and one connected client.
fn connect_with(behavior: Behavior) -> (TestServer, Client, Log<Ev>) {
    let log = Log::new();
    let server = TestServer::start(App::new().threads(1).ws("/ws", behavior, Recorder::echo(&log)));
    let client = server.connect("/ws");
    (server, client, log)
}

fn idle(after: Duration, how: IdleClose) -> Behavior {
    Behavior { idle_timeout: Some(after), idle_close: how, ..Behavior::default() }
}

/// Automatic pings every 500 ms, dropping peers that stay silent 1 s after one; no idle timeout.
fn pinging() -> Behavior {
    Behavior {
        idle_timeout: None,
        ping_interval: Some(Duration::from_millis(500)),
        pong_timeout: Duration::from_secs(1),
        ..Behavior::default()
    }
}

#[test]
fn idle_client_gets_close_1001_after_idle_timeout() {
    let (server, mut client, log) = connect_with(idle(Duration::from_secs(1), IdleClose::GoingAway));
    let start = Instant::now();
    let (code, _) = client.expect_close();
    assert_eq!(code, Some(1001));
    assert_between("the idle close", start.elapsed(), 0.5..=5.0);
    // Completing the handshake: the handler sees the code the server sent.
    client.send_close(Some(1001), "");
    client.expect_eof();
    assert_eq!(log.wait_close(0).0, 1001);
    server.stop();
    log.assert_lifecycles();
}

#[test]
fn idle_close_never_comes_before_idle_timeout() {
    let (server, first, log) = connect_with(idle(Duration::from_secs(1), IdleClose::GoingAway));
    let mut clients = [first, server.connect("/ws"), server.connect("/ws")];
    // Each client's last message lands at a different point of a 250 ms timer tick. Time runs
    // from before the send, so the client's measure can only be longer than the server's idle
    // time: load makes it longer still, never shorter.
    let mut starts = Vec::new();
    for (i, client) in clients.iter_mut().enumerate() {
        std::thread::sleep(Duration::from_millis(80 * i as u64));
        starts.push(Instant::now());
        client.send_text("last words");
    }
    for (mut client, start) in clients.into_iter().zip(starts) {
        assert_eq!(client.expect_text(), "last words");
        assert_eq!(client.expect_close().0, Some(1001));
        let idle_for = start.elapsed();
        assert!(
            idle_for >= Duration::from_secs(1),
            "closed as idle after {idle_for:?}, before the 1 s idle_timeout"
        );
        client.send_close(Some(1001), "");
        client.expect_eof();
    }
    server.stop();
    log.assert_lifecycles();
}

#[test]
fn silent_idle_close_drops_tcp_without_a_close_frame() {
    let (server, client, log) = connect_with(idle(Duration::from_secs(1), IdleClose::Silent));
    let waited = client.expect_eof();
    assert_between("the silent idle close", waited, 0.5..=5.0);
    assert_eq!(log.wait_close(0), (1006, String::new()));
    server.stop();
    log.assert_lifecycles();
}

#[test]
fn active_client_is_not_closed_by_idle_timeout() {
    let (server, mut client, log) = connect_with(idle(Duration::from_secs(1), IdleClose::GoingAway));
    let start = Instant::now();
    let mut sent = 0;
    // A message every 300 ms for 3 s: three idle timeouts long, but never 1 s of silence.
    while start.elapsed() < Duration::from_secs(3) {
        client.assert_echo(&format!("tick {sent}"));
        sent += 1;
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(sent >= 5, "only {sent} messages in 3 s");
    client.assert_echo("still open");
    assert!(!log.snapshot().iter().any(|e| matches!(e, Ev::Close { .. })), "closed while active");
    client.close_normally();
    server.stop();
    log.assert_lifecycles();
}

#[test]
fn silent_client_receives_pings() {
    let (server, mut client, log) = connect_with(pinging());
    let start = Instant::now();
    assert_eq!(client.expect_frame(), Frame::Ping(Vec::new()));
    assert_between("the first ping", start.elapsed(), 0.25..=5.0);
    // Another ping may come while closing.
    client.answer_pings();
    client.close_normally();
    server.stop();
    log.assert_lifecycles();
}

#[test]
fn client_answering_pings_stays_open() {
    let (server, mut client, log) = connect_with(pinging());
    // Only answer pings, as a browser would; stay otherwise silent for well past the pong
    // timeout.
    client.answer_pings();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(3500) {
        let got = client.recv(Duration::from_millis(100));
        assert_eq!(got, Recv::Timeout, "a client answering pings must get nothing else");
    }
    let pings = client.pings_answered;
    assert!(pings >= 2, "only {pings} pings in 3.5 s with a 500 ms interval");
    let pongs = log.snapshot().iter().filter(|e| matches!(e, Ev::Pong { .. })).count();
    assert!(pongs >= 2, "the pong callback saw {pongs} pongs");
    client.assert_echo("still open");
    client.close_normally();
    server.stop();
    log.assert_lifecycles();
}

#[test]
fn client_not_answering_pings_is_dropped_as_1006() {
    let (server, mut client, log) = connect_with(pinging());
    let start = Instant::now();
    // Read, but never answer: after a ping, the server waits pong_timeout and drops TCP.
    let mut pings = 0;
    loop {
        match client.recv(PATIENCE) {
            Recv::Frame(Frame::Ping(_)) => pings += 1,
            Recv::Eof => break,
            other => panic!("expected pings then the end of the connection, got {other:?}"),
        }
    }
    assert!(pings >= 1, "dropped without a ping first");
    // One ping after ~0.5 s, then ~1 s of silence: about 1.5 s in all.
    assert_between("dropping the dead peer", start.elapsed(), 0.75..=5.0);
    assert_eq!(log.wait_close(0), (1006, String::new()));
    server.stop();
    log.assert_lifecycles();
}
