//! The WebSocket side of the `App` API, driven in-process by a raw client: the upgrade decision
//! and per-connection data, each callback, the close code the handler sees on every way a
//! connection can end (and what the client sees on the wire), and corking of the sends made in
//! one callback.

mod common;

use std::time::Duration;

use common::{Client, ConnData, Ev, Frame, Log, Recorder, TestServer, assert_between};
use gale_frame::{FrameSpec, OpCode, append_frame};
use gale_server::{
    Accept, App, Behavior, CloseCode, Message, Reject, SendStatus, UpgradeRequest, WebSocket, WsHandler,
};

// ---------------------------------------------------------------------------------------------
// A scripted route: messages are commands, anything else is echoed
// ---------------------------------------------------------------------------------------------

struct Scripted {
    server: TestServer,
    log: Log<Ev>,
    /// What sends made right after `ws.close()` or `ws.end()` returned.
    after_close: Log<SendStatus>,
}

/// Serve `/ws` with a [`Recorder`] whose messages act as commands: `kick` closes with 4001,
/// `end` drops the connection, `burst` sends three messages; anything else is echoed.
fn start_scripted(behavior: Behavior) -> Scripted {
    let log = Log::new();
    let after_close = Log::new();
    let after = after_close.clone();
    let handler = Recorder::new(&log, move |ws: &mut WebSocket<'_, ConnData>, msg| match msg {
        Message::Text("kick") => {
            ws.close(CloseCode(4001), "kick");
            after.push(ws.send_text("after kick"));
        }
        Message::Text("end") => {
            ws.end();
            after.push(ws.send_text("after end"));
        }
        Message::Text("burst") => {
            for part in ["one", "two", "three"] {
                ws.send_text(part);
            }
        }
        other => {
            ws.send(other);
        }
    });
    let server = TestServer::start(App::new().threads(1).ws("/ws", behavior, handler));
    Scripted { server, log, after_close }
}

fn start_default() -> Scripted {
    start_scripted(Behavior::default())
}

impl Scripted {
    /// Stop the server, then check every connection's callbacks began with `open` and ended with
    /// a single `close`.
    fn finish(self) {
        self.server.stop();
        self.log.assert_lifecycles();
    }
}

// ---------------------------------------------------------------------------------------------
// Upgrade
// ---------------------------------------------------------------------------------------------

#[test]
fn data_created_in_upgrade_is_seen_by_open_message_and_close() {
    let s = start_default();
    // The recorder takes each connection's id from the query and counts its messages in the
    // per-connection data.
    let mut first = s.server.connect("/ws?id=41");
    let mut second = s.server.connect("/ws?id=42");
    first.assert_echo("a");
    second.assert_echo("b");
    first.assert_echo("c");
    first.close_normally();
    second.close_normally();
    s.log.wait_close(41);
    s.log.wait_close(42);
    let first_events = s.log.of(41);
    assert_eq!(first_events.len(), 4, "{first_events:?}");
    assert_eq!(first_events[0], Ev::Open { id: 41 });
    assert_eq!(first_events[1], Ev::Text { id: 41, text: "a".into() });
    assert_eq!(first_events[2], Ev::Text { id: 41, text: "c".into() });
    assert!(matches!(first_events[3], Ev::Close { id: 41, messages: 2, .. }), "{first_events:?}");
    let second_events = s.log.of(42);
    assert!(matches!(second_events.last(), Some(Ev::Close { id: 42, messages: 1, .. })), "{second_events:?}");
    s.finish();
}

/// What a gatekeeping handler saw of an upgrade request.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    path: String,
    token: Option<String>,
    room: Option<String>,
    client: Option<String>,
    origin: Option<String>,
    protocols: Vec<String>,
}

/// Accepts only `?token=secret`, offers `superchat` when the client does, and records what it
/// saw and which other callbacks ran.
struct Gate {
    seen: Log<Seen>,
    callbacks: Log<&'static str>,
}

impl WsHandler for Gate {
    type Data = ();

    fn upgrade(&self, req: &UpgradeRequest<'_>) -> Result<Accept<()>, Reject> {
        let owned = |v: Option<&str>| v.map(str::to_string);
        self.seen.push(Seen {
            path: req.path().to_string(),
            token: owned(req.query_param("token")),
            room: owned(req.query_param("room")),
            client: owned(req.header("x-client")),
            origin: owned(req.origin()),
            protocols: req.protocols().map(str::to_string).collect(),
        });
        if req.query_param("token") != Some("secret") {
            return Err(Reject::new(401, "missing token"));
        }
        let accept = Accept::new(());
        Ok(match req.select_protocol(&["superchat"]) {
            Some(p) => accept.protocol(p),
            None => accept,
        })
    }

    fn open(&self, _ws: &mut WebSocket<'_, ()>) {
        self.callbacks.push("open");
    }

    fn message(&self, _ws: &mut WebSocket<'_, ()>, _msg: Message<'_>) {
        self.callbacks.push("message");
    }

    fn close(&self, _ws: &mut WebSocket<'_, ()>, _code: CloseCode, _reason: &str) {
        self.callbacks.push("close");
    }
}

fn start_gate() -> (TestServer, Log<Seen>, Log<&'static str>) {
    let seen = Log::new();
    let callbacks = Log::new();
    let gate = Gate { seen: seen.clone(), callbacks: callbacks.clone() };
    let server = TestServer::start(App::new().threads(1).ws("/rooms/*", Behavior::default(), gate));
    (server, seen, callbacks)
}

#[test]
fn rejected_upgrade_gets_the_status_and_reason_and_no_callbacks() {
    let (server, seen, callbacks) = start_gate();
    let reply =
        Client::try_connect(server.addr, "/rooms/lobby", &[], &[]).err().expect("the upgrade is refused");
    assert_eq!(reply.status, 401);
    assert_eq!(reply.body_text().trim_end(), "missing token");
    assert_eq!(seen.snapshot().len(), 1, "upgrade ran once");
    server.stop();
    assert_eq!(callbacks.snapshot(), Vec::<&str>::new(), "no callback for a refused upgrade");
}

#[test]
fn upgrade_sees_path_query_headers_origin_and_protocols() {
    let (server, seen, callbacks) = start_gate();
    let headers = [("X-Client", "test-suite"), ("Origin", "http://example.test")];
    let (client, _) = Client::try_connect(
        server.addr,
        "/rooms/lobby?token=secret&room=blue",
        &["chat", "superchat"],
        &headers,
    )
    .expect("the upgrade is accepted");
    assert_eq!(
        seen.snapshot(),
        vec![Seen {
            path: "/rooms/lobby".into(),
            token: Some("secret".into()),
            room: Some("blue".into()),
            client: Some("test-suite".into()),
            origin: Some("http://example.test".into()),
            protocols: vec!["chat".into(), "superchat".into()],
        }]
    );
    client.close_normally();
    server.stop();
    assert_eq!(callbacks.snapshot(), ["open", "close"]);
}

#[test]
fn accepted_subprotocol_is_answered_in_the_101() {
    let (server, _, _) = start_gate();
    let (chosen, _) = Client::try_connect(server.addr, "/rooms/a?token=secret", &["chat", "superchat"], &[])
        .expect("the upgrade is accepted");
    let (plain, plain_response) = Client::try_connect(server.addr, "/rooms/b?token=secret", &["chat"], &[])
        .expect("the upgrade is accepted");
    assert_eq!(plain_response.protocol, None, "no subprotocol when none was chosen");
    drop((chosen, plain));
    let (_, response) = Client::try_connect(server.addr, "/rooms/c?token=secret", &["superchat"], &[])
        .expect("the upgrade is accepted");
    assert_eq!(response.protocol.as_deref(), Some("superchat"));
    server.stop();
}

// ---------------------------------------------------------------------------------------------
// Callbacks
// ---------------------------------------------------------------------------------------------

#[test]
fn open_comes_once_then_text_and_binary_messages_in_order() {
    let s = start_default();
    let mut client = s.server.connect("/ws");
    client.assert_echo("hello");
    client.send_binary(&[0, 1, 2, 255]);
    assert_eq!(client.expect_frame(), Frame::Binary(vec![0, 1, 2, 255]));
    client.close_normally();
    s.log.wait_close(0);
    let events = s.log.of(0);
    assert_eq!(
        events[..3],
        [
            Ev::Open { id: 0 },
            Ev::Text { id: 0, text: "hello".into() },
            Ev::Binary { id: 0, data: vec![0, 1, 2, 255] },
        ]
    );
    s.finish();
}

#[test]
fn ping_is_answered_with_a_pong_queued_before_the_ping_callback() {
    let s = start_default();
    let mut client = s.server.connect("/ws");
    client.send(OpCode::Ping, b"are you there");
    assert_eq!(client.expect_frame(), Frame::Pong(b"are you there".to_vec()));
    let events = s.log.wait_for("the ping callback", |evs| evs.iter().any(|e| matches!(e, Ev::Ping { .. })));
    let Some(Ev::Ping { payload, buffered, .. }) = events.iter().find(|e| matches!(e, Ev::Ping { .. }))
    else {
        unreachable!()
    };
    assert_eq!(payload, b"are you there");
    // The pong (2-byte header + payload) was already queued when the callback ran.
    assert!(*buffered >= 2 + payload.len(), "buffered_amount in the ping callback: {buffered}");
    client.close_normally();
    s.finish();
}

#[test]
fn pong_reaches_the_pong_callback() {
    let s = start_default();
    let mut client = s.server.connect("/ws");
    client.send(OpCode::Pong, b"unsolicited");
    // The echo that follows proves the pong was handled first (frames are handled in order).
    client.assert_echo("after");
    let events = s.log.of(0);
    assert!(events.contains(&Ev::Pong { id: 0, payload: b"unsolicited".to_vec() }), "{events:?}");
    client.close_normally();
    s.finish();
}

// ---------------------------------------------------------------------------------------------
// Close paths: the code the handler sees and what the client sees
// ---------------------------------------------------------------------------------------------

#[test]
fn client_close_with_code_is_echoed_and_reported() {
    let s = start_default();
    let mut client = s.server.connect("/ws");
    client.send_close(Some(1000), "done");
    assert_eq!(client.expect_close(), (Some(1000), "done".into()));
    client.expect_eof();
    assert_eq!(s.log.wait_close(0), (1000, "done".into()));
    s.finish();
}

#[test]
fn client_close_without_code_is_reported_as_1005() {
    let s = start_default();
    let mut client = s.server.connect("/ws");
    client.send_close(None, "");
    assert_eq!(
        client.expect_close(),
        (None, String::new()),
        "an empty close is answered with an empty close"
    );
    client.expect_eof();
    assert_eq!(s.log.wait_close(0).0, 1005);
    s.finish();
}

#[test]
fn unmasked_client_frame_is_a_protocol_error_1002() {
    let s = start_default();
    let mut client = s.server.connect("/ws");
    let mut unmasked = Vec::new();
    append_frame(&mut unmasked, FrameSpec::server(OpCode::Text), b"not masked");
    client.send_raw(&unmasked);
    let (code, _) = client.expect_close();
    assert_eq!(code, Some(1002));
    client.expect_eof();
    assert_eq!(s.log.wait_close(0).0, 1002);
    let texts = s.log.of(0).into_iter().filter(|e| matches!(e, Ev::Text { .. })).count();
    assert_eq!(texts, 0, "the offending frame is not delivered");
    s.finish();
}

#[test]
fn message_over_max_payload_is_refused_with_1009() {
    let s = start_scripted(Behavior { max_payload: 1024, ..Behavior::default() });
    let mut client = s.server.connect("/ws");
    client.assert_echo(&"x".repeat(1024));
    client.send_text(&"x".repeat(1025));
    assert_eq!(client.expect_close().0, Some(1009));
    client.expect_eof();
    assert_eq!(s.log.wait_close(0).0, 1009);
    s.finish();
}

#[test]
fn client_dropping_tcp_without_close_is_reported_as_1006() {
    let s = start_default();
    let mut client = s.server.connect("/ws");
    client.assert_echo("hi");
    drop(client);
    assert_eq!(s.log.wait_close(0), (1006, String::new()));
    s.finish();
}

#[test]
fn server_close_is_answered_and_reported_with_its_code() {
    let s = start_default();
    let mut client = s.server.connect("/ws");
    client.send_text("kick");
    assert_eq!(client.expect_close(), (Some(4001), "kick".into()));
    client.send_close(Some(4001), "kick");
    client.expect_eof();
    assert_eq!(s.log.wait_close(0), (4001, "kick".into()));
    assert_eq!(s.after_close.snapshot(), [SendStatus::Closed], "a send after ws.close() is refused");
    s.finish();
}

#[test]
fn unanswered_server_close_drops_tcp_after_close_timeout() {
    let s = start_scripted(Behavior { close_timeout: Duration::from_secs(1), ..Behavior::default() });
    let mut client = s.server.connect("/ws");
    client.send_text("kick");
    assert_eq!(client.expect_close(), (Some(4001), "kick".into()));
    // The client never answers: the server gives up after close_timeout (timer ticks are 250
    // ms, so it may round a little either way).
    let waited = client.expect_eof();
    assert_between("dropping an unanswered close", waited, 0.5..=5.0);
    let (code, _) = s.log.wait_close(0);
    // The close was started by the server; the handler is told the code it sent.
    assert_eq!(code, 4001);
    s.finish();
}

#[test]
fn end_drops_tcp_at_once_and_is_reported_as_1006() {
    let s = start_default();
    let mut client = s.server.connect("/ws");
    client.send_text("end");
    // No close frame, just the end of the connection, well before any timeout could act.
    let waited = client.expect_eof();
    assert_between("ws.end()", waited, 0.0..=3.0);
    assert_eq!(s.log.wait_close(0), (1006, String::new()));
    assert_eq!(s.after_close.snapshot(), [SendStatus::Closed], "a send after ws.end() is refused");
    s.finish();
}

// ---------------------------------------------------------------------------------------------
// Corking
// ---------------------------------------------------------------------------------------------

#[test]
fn sends_from_one_callback_leave_in_one_write() {
    let s = start_default();
    let mut client = s.server.connect("/ws");
    client.send_text("burst");
    // Give all the bytes time to arrive, then read once: the three messages must be there
    // together, in order, because they were written with a single write.
    let frames = client.read_once_after(Duration::from_millis(200));
    assert_eq!(frames, [Frame::Text("one".into()), Frame::Text("two".into()), Frame::Text("three".into())]);
    client.close_normally();
    s.finish();
}
