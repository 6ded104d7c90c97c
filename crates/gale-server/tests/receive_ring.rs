//! io_uring's ring of provided receive buffers, made far too small for the traffic: many
//! connections send bursts of mixed-size text at once, so receives find every buffer in use
//! (and wait), and, in incremental mode, share buffers and continue where another stopped.
//! Every echo must still come back whole and in order. Runs only where the backend under test
//! resolves to io_uring.

mod common;

use common::{Log, Recorder, TestServer};
use gale_server::{App, Backend, Behavior};

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

fn echo_through(count: u16, size: usize, incremental: bool) -> u64 {
    let log = Log::new();
    let behavior = Behavior { max_backpressure: 16 << 20, ..Behavior::default() };
    let app = App::new().threads(1).uring_receive_buffers(count, size, incremental).ws(
        "/ws",
        behavior,
        Recorder::echo(&log),
    );
    let server = TestServer::start(app);
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
    let shortages = server.handle.loop_stats(0).receive_buffer_shortages;
    for client in clients {
        client.close_normally();
    }
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
        let shortages = echo_through(2, 4096, true);
        assert!(shortages > 0, "the ring never ran dry: the test did not test the shortage");
    }
}

#[test]
fn tiny_ring_of_whole_buffers_echoes_everything() {
    if on_uring() {
        let shortages = echo_through(2, 4096, false);
        assert!(shortages > 0, "the ring never ran dry: the test did not test the shortage");
    }
}

#[test]
fn default_ring_echoes_everything() {
    if on_uring() {
        let config = gale_server::ServerConfig::default();
        echo_through(config.uring_buffers, config.uring_buffer_size, config.uring_incremental);
    }
}
