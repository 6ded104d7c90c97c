//! Connection slots reused: a loop hands a closed connection's slot to the next one it accepts
//! (on io_uring the slot is also the socket's place in the ring's table of registered files).
//! Every connection in a reused slot echoes, and every closed one releases its socket: the peer
//! gets the end of the stream at once, not when the slot is taken again.

mod common;

use std::time::Duration;

use common::{Log, Recorder, TestServer};
use gale_server::{App, Behavior, Message};

/// One loop; "end" drops the connection from the server's side, anything else is echoed.
fn app(log: &Log<common::Ev>) -> App {
    let handler = Recorder::new(log, |ws, msg| match msg {
        Message::Text("end") => ws.end(),
        msg => {
            ws.send(msg);
        }
    });
    App::new().threads(1).ws("/ws", Behavior::default(), handler)
}

#[test]
fn connections_in_reused_slots_echo_and_close() {
    let log = Log::new();
    let server = TestServer::start(app(&log));
    for round in 0..4 {
        let mut clients: Vec<_> = (0..3).map(|_| server.connect("/ws")).collect();
        for (i, client) in clients.iter_mut().enumerate() {
            client.assert_echo(&format!("round {round}, client {i}"));
        }
        // Closed by the client, by the server, and by the client again: the server's socket
        // must be released each time, before any new connection could take its slot.
        let last = clients.pop().unwrap();
        let ended = clients.pop().unwrap();
        let first = clients.pop().unwrap();
        first.close_normally();
        let mut ended = ended;
        ended.send_text("end");
        let took = ended.expect_eof();
        assert!(took < Duration::from_secs(2), "the ended connection's socket closed after {took:?}");
        last.close_normally();
        common::wait_until("the closed connections are gone", || server.handle.connections() == 0);
    }
    server.stop_within(Duration::from_secs(3));
}
