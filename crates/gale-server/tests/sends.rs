//! Sends the kernel has not finished: a connection torn down while the peer has stopped
//! reading (with bytes taken by the kernel but not acknowledged, and with bytes the kernel
//! could not take), and large sends taken in parts by a slow reader. On io_uring with
//! `GALE_SEND_ZC` these are the zero-copy sends whose buffers outlive their results.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{Frame, Log, Recorder, TestServer, wait_until};
use gale_server::{App, BackpressurePolicy, Behavior, Message};

const MESSAGE: usize = 64 * 1024;
const MESSAGES: u32 = 128;

/// `flood` sends 128 binary messages of 64 KiB, numbered; `end` ends the connection.
fn app(log: &Log<common::Ev>) -> App {
    let behavior = Behavior {
        max_backpressure: 64 << 20,
        backpressure_policy: BackpressurePolicy::Drop,
        ..Behavior::default()
    };
    let handler = Recorder::new(log, |ws, msg| match msg {
        Message::Text("flood") => {
            let mut payload = vec![0x5a; MESSAGE];
            for seq in 0..MESSAGES {
                payload[..4].copy_from_slice(&seq.to_le_bytes());
                ws.send_binary(&payload);
            }
        }
        Message::Text("end") => ws.end(),
        _ => {}
    });
    App::new().threads(1).ws("/ws", behavior, handler)
}

/// A server, and a client that has asked it for the flood.
fn flooding() -> (TestServer, common::Client) {
    let log = Log::new();
    let server = TestServer::start(app(&log));
    let mut client = server.connect("/ws");
    client.send_text("flood");
    (server, client)
}

/// The client reads part of the flood, so that sends move from the server into the socket
/// buffers, then stops reading and has the server end the connection: the server must let it
/// go at once (not wait for the unread bytes to be acknowledged), and the client, reading
/// again, gets what was sent and then the end of the stream.
#[test]
fn a_connection_ended_while_its_peer_stopped_reading_goes_at_once() {
    let (server, mut client) = flooding();
    std::thread::sleep(Duration::from_millis(300));
    let mut stream = client.stream().try_clone().unwrap();
    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    let start = Instant::now();
    while got < 3 << 20 && start.elapsed() < Duration::from_secs(3) {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(got >= 3 << 20, "read {got} bytes of the flood");
    client.send_text("end");
    wait_until("the ended connection is gone", || server.handle.connections() == 0);
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let eof = loop {
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(_) => break false,
        }
    };
    assert!(eof, "the client gets the end of the stream");
    if common::test_send_zc() > 0 && common::test_backend() == gale_server::Backend::Uring {
        assert!(server.handle.loop_stats(0).zero_copy_sends > 0, "the sends were zero-copy");
    }
    server.stop_within(Duration::from_secs(3));
}

/// The client never reads: the server's send waits for room and is cancelled when the
/// connection ends.
#[test]
fn a_connection_ended_with_a_blocked_send_goes_at_once() {
    let (server, mut client) = flooding();
    std::thread::sleep(Duration::from_millis(300));
    client.send_text("end");
    wait_until("the ended connection is gone", || server.handle.connections() == 0);
    server.stop_within(Duration::from_secs(3));
}

/// A slow reader: large sends are taken in parts; every byte arrives, in order.
#[test]
fn sends_taken_in_parts_arrive_whole_and_in_order() {
    let (server, mut client) = flooding();
    std::thread::sleep(Duration::from_millis(200));
    for seq in 0..MESSAGES {
        if seq % 8 == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        match client.expect_frame() {
            Frame::Binary(d) => {
                assert_eq!(d.len(), MESSAGE);
                assert_eq!(u32::from_le_bytes(d[..4].try_into().unwrap()), seq);
                assert!(d[4..].iter().all(|&b| b == 0x5a), "payload of message {seq}");
            }
            f => panic!("message {seq}: {f:?}"),
        }
    }
    server.stop();
}
