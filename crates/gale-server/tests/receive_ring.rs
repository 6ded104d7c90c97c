//! io_uring's ring of provided receive buffers, made far too small for the traffic: many
//! connections send bursts of mixed-size text at once, so receives find every buffer in use
//! (and wait), and, in incremental mode, share buffers and continue where another stopped.
//! Every echo must still come back whole and in order, also after connections vanished in
//! the middle of their bursts. Runs only where the backend under test resolves to io_uring.

mod common;

use std::io::Write;

use common::{Log, Recorder, TestServer};
use gale_frame::{FrameSpec, OpCode, append_frame};
use gale_server::{App, Backend, Behavior, Message};

const CLIENTS: usize = 24;
const MESSAGES: usize = 40;

/// Message `seq` of client `client`: 1 to about 6,000 bytes of ASCII, accented, CJK and emoji
/// text, so that receives end inside messages and inside characters.
fn text(client: usize, seq: usize) -> String {
    let pieces = ["gale ", "é", "风", "🎉", "{\"k\":1}", "ß", "😀"];
    let len = (client * 977 + seq * 331) % 6000 + 1;
    let mut s = String::new();
    let mut i = client + seq;
    while s.len() < len {
        s.push_str(pieces[i % pieces.len()]);
        i += 1;
    }
    s
}

/// A one-loop server running `handler`, whose ring is `ring`: buffers, their size and
/// whether incremental; the defaults if `None`.
fn server(ring: Option<(u16, usize, bool)>, handler: Recorder) -> TestServer {
    let behavior = Behavior { max_backpressure: 16 << 20, ..Behavior::default() };
    let mut app = App::new().threads(1);
    if let Some((count, size, incremental)) = ring {
        app = app.uring_receive_buffers(count, size, incremental);
    }
    TestServer::start(app.ws("/ws", behavior, handler))
}

/// Every client sends all its messages, then reads every echo.
fn exchange(server: &TestServer) {
    let mut clients: Vec<_> = (0..CLIENTS).map(|_| server.connect("/ws")).collect();
    for (c, client) in clients.iter_mut().enumerate() {
        for seq in 0..MESSAGES {
            client.send_text(&text(c, seq));
        }
    }
    for (c, client) in clients.iter_mut().enumerate() {
        for seq in 0..MESSAGES {
            assert_eq!(client.expect_text(), text(c, seq), "client {c}, message {seq}");
        }
    }
    for client in clients {
        client.close_normally();
    }
}

/// One exchange through a fresh server; returns how often its ring ran dry.
fn echo_through(ring: Option<(u16, usize, bool)>) -> u64 {
    let server = server(ring, Recorder::echo(&Log::new()));
    exchange(&server);
    let shortages = server.handle.loop_stats(0).receive_buffer_shortages;
    server.stop();
    shortages
}

fn on_uring() -> bool {
    let on = common::test_backend().resolve().is_ok_and(|b| b == Backend::Uring);
    if !on {
        eprintln!("skipped: the backend under test is not io_uring");
    }
    on
}

#[test]
fn tiny_incremental_ring_echoes_everything() {
    if on_uring() {
        let shortages = echo_through(Some((2, 4096, true)));
        assert!(shortages > 0, "the ring never ran dry: the test did not test the shortage");
    }
}

#[test]
fn tiny_ring_of_whole_buffers_echoes_everything() {
    if on_uring() {
        let shortages = echo_through(Some((2, 4096, false)));
        assert!(shortages > 0, "the ring never ran dry: the test did not test the shortage");
    }
}

#[test]
fn default_ring_echoes_everything() {
    if on_uring() {
        echo_through(None);
    }
}

/// The server ends connections in the middle of their bursts (`end` drops the connection), so
/// completions that the kernel had already posted, naming buffers it may still be filling,
/// arrive for connections that are closing or gone. If any buffer were lost, a ring of two
/// would soon stay dry and the last exchange would never finish.
#[test]
fn tiny_ring_survives_connections_ended_mid_burst() {
    if !on_uring() {
        return;
    }
    let log = Log::new();
    let handler = Recorder::new(&log, |ws, msg| match msg {
        Message::Text("end") => ws.end(),
        msg => {
            ws.send(msg);
        }
    });
    let server = server(Some((2, 4096, true)), handler);
    for round in 0..8 {
        let mut clients: Vec<_> = (0..CLIENTS).map(|_| server.connect("/ws")).collect();
        for (c, client) in clients.iter_mut().enumerate() {
            // One write, so that the kernel holds the whole burst when the server reads it
            // and posts several receives for the connection in one batch.
            let mut burst = client_frame(&text(c, round));
            burst.extend(client_frame("end"));
            for seq in 0..MESSAGES {
                burst.extend(client_frame(&text(c + round, seq)));
            }
            // The server may have dropped the connection already.
            let _ = client.stream().write_all(&burst);
        }
        drop(clients);
        common::wait_until("the ended connections are gone", || server.handle.connections() == 0);
    }
    exchange(&server);
    assert!(server.handle.loop_stats(0).receive_buffer_shortages > 0, "the ring never ran dry");
    server.stop();
}

/// A masked text frame, as a client sends it.
fn client_frame(text: &str) -> Vec<u8> {
    let mut frame = Vec::new();
    append_frame(&mut frame, FrameSpec::client(OpCode::Text, [1, 2, 3, 4]), text.as_bytes());
    frame
}
