//! Backpressure: a handler floods a client that does not read, with 64 KiB messages numbered in
//! their first four bytes, until sends are refused.
//!
//! With `BackpressurePolicy::Drop`, the buffer never holds more than `max_backpressure` (or one
//! message), excess messages are `Dropped`, the connection stays open, `drain` fires once the
//! client catches up, and the client receives exactly the accepted messages, in order. With
//! `BackpressurePolicy::Close`, hitting the limit drops the connection and the handler sees 1006.

mod common;

use std::time::Duration;

use common::{Client, ConnData, Ev, Frame, Log, PATIENCE, Recorder, Recv, TestServer};
use gale_server::{App, BackpressurePolicy, Behavior, Message, SendStatus, WebSocket};

const MESSAGE: usize = 64 * 1024;
const LIMIT: usize = 1 << 20;
/// Loopback socket buffers hold a few MiB at most: a flood of this many messages that never
/// meets backpressure means the server does not apply it.
const MAX_MESSAGES: u32 = 1000;
/// The flood stops after this many refusals in a row.
const REFUSALS: usize = 3;

/// What one flood did, reported by the handler.
#[derive(Clone, Debug)]
struct Flood {
    /// The status of each send, indexed by message number.
    statuses: Vec<SendStatus>,
    /// The largest `buffered_amount()` seen after a send.
    max_buffered: usize,
}

impl Flood {
    /// Numbers of the messages the server accepted.
    fn accepted(&self) -> Vec<u32> {
        (0..self.statuses.len() as u32)
            .filter(|&i| matches!(self.statuses[i as usize], SendStatus::Sent | SendStatus::Backpressure))
            .collect()
    }
}

/// On `flood`, send numbered 64 KiB messages until [`REFUSALS`] are refused in a row or the
/// connection is closed; echo anything else.
fn flood_then_echo(reports: Log<Flood>) -> impl Fn(&mut WebSocket<'_, ConnData>, Message<'_>) + Send + Sync {
    move |ws, msg| {
        if msg != Message::Text("flood") {
            ws.send(msg);
            return;
        }
        let mut payload = vec![0x5a; MESSAGE];
        let mut flood = Flood { statuses: Vec::new(), max_buffered: 0 };
        let mut refused = 0;
        for seq in 0..MAX_MESSAGES {
            payload[..4].copy_from_slice(&seq.to_le_bytes());
            let status = ws.send_binary(&payload);
            flood.max_buffered = flood.max_buffered.max(ws.buffered_amount());
            flood.statuses.push(status);
            match status {
                SendStatus::Dropped => refused += 1,
                SendStatus::Closed => break,
                SendStatus::Sent | SendStatus::Backpressure => refused = 0,
            }
            if refused == REFUSALS {
                break;
            }
        }
        reports.push(flood);
    }
}

/// Serve a flooding route with `policy`, connect, and trigger a flood the client does not read.
fn flood_with(policy: BackpressurePolicy) -> (TestServer, Client, Log<Ev>, Flood) {
    flood_with_recorder(policy, |recorder| recorder)
}

/// [`flood_with`], with the handler adjusted by `customize`.
fn flood_with_recorder(
    policy: BackpressurePolicy,
    customize: impl FnOnce(Recorder) -> Recorder,
) -> (TestServer, Client, Log<Ev>, Flood) {
    let log = Log::new();
    let reports = Log::new();
    let behavior = Behavior { max_backpressure: LIMIT, backpressure_policy: policy, ..Behavior::default() };
    let handler = customize(Recorder::new(&log, flood_then_echo(reports.clone())));
    let server = TestServer::start(App::new().threads(1).ws("/ws", behavior, handler));
    let mut client = server.connect("/ws");
    client.send_text("flood");
    let flood = reports.wait_for("the flood", |r| !r.is_empty()).remove(0);
    assert!(
        flood.max_buffered <= LIMIT.max(MESSAGE + 14),
        "buffered_amount reached {} with max_backpressure {LIMIT}",
        flood.max_buffered
    );
    assert!(
        flood.statuses.contains(&SendStatus::Dropped),
        "no send was refused in {} messages: {:?}",
        flood.statuses.len(),
        &flood.statuses[flood.statuses.len().saturating_sub(5)..]
    );
    (server, client, log, flood)
}

/// The number a flood message carries, after checking its size.
fn seq_of(frame: Frame) -> u32 {
    match frame {
        Frame::Binary(data) => {
            assert_eq!(data.len(), MESSAGE, "a flood message arrived with the wrong size");
            u32::from_le_bytes(data[..4].try_into().expect("four bytes"))
        }
        other => panic!("expected a flood message, got {other:?}"),
    }
}

/// Read as many flood messages as `flood` accepted and return their numbers.
fn receive_accepted(client: &mut Client, flood: &Flood) -> Vec<u32> {
    (0..flood.accepted().len()).map(|_| seq_of(client.expect_frame())).collect()
}

#[test]
fn drop_policy_bounds_the_buffer_and_refuses_excess_messages() {
    let (server, mut client, log, flood) = flood_with(BackpressurePolicy::Drop);
    // The kernel refused bytes before the server did: some sends were queued behind them.
    assert!(flood.statuses.contains(&SendStatus::Backpressure), "no Backpressure before Dropped");
    let first_dropped = flood.statuses.iter().position(|s| *s == SendStatus::Dropped).expect("checked above");
    assert!(
        flood.statuses[..first_dropped]
            .iter()
            .all(|s| matches!(s, SendStatus::Sent | SendStatus::Backpressure)),
        "only Sent or Backpressure before the first Dropped: {:?}",
        flood.statuses
    );
    // Refusing messages does not close the connection.
    assert!(!log.snapshot().iter().any(|e| matches!(e, Ev::Close { .. })), "the connection was closed");
    receive_accepted(&mut client, &flood);
    client.close_normally();
    server.stop();
    log.assert_lifecycles();
}

#[test]
fn drop_policy_delivers_exactly_the_accepted_messages_then_drains() {
    let (server, mut client, log, flood) = flood_with(BackpressurePolicy::Drop);
    assert_eq!(
        receive_accepted(&mut client, &flood),
        flood.accepted(),
        "the client must get every accepted message, in order"
    );
    log.wait_for("drain", |evs| evs.iter().any(|e| matches!(e, Ev::Drain { .. })));
    // The echo comes right after the last accepted message: no refused message slipped in, and
    // the drained connection takes new sends.
    client.assert_echo("after drain");
    client.close_normally();
    server.stop();
    log.assert_lifecycles();
}

#[test]
fn close_policy_drops_the_connection_at_the_limit() {
    let (server, mut client, log, flood) = flood_with(BackpressurePolicy::Close);
    let first_dropped = flood.statuses.iter().position(|s| *s == SendStatus::Dropped).expect("checked above");
    assert!(
        flood.statuses[first_dropped + 1..].iter().all(|s| *s == SendStatus::Closed),
        "sends after the limit was hit must be refused as Closed: {:?}",
        &flood.statuses[first_dropped..]
    );
    assert_eq!(log.wait_close(0), (1006, String::new()));
    // The client gets accepted messages (not necessarily all: the server may discard what it
    // still held), in order, then the end of the connection without a close frame.
    let accepted = flood.accepted();
    let mut next = 0;
    loop {
        match client.recv(PATIENCE) {
            Recv::Frame(frame) => {
                assert_eq!(seq_of(frame), accepted[next], "messages out of order");
                next += 1;
            }
            Recv::Eof => break,
            Recv::Timeout => panic!("the connection was not dropped"),
        }
    }
    assert!(next <= accepted.len());
    server.stop();
    let closes = log.of(0).into_iter().filter(|e| matches!(e, Ev::Close { .. })).count();
    assert_eq!(closes, 1, "close is delivered exactly once");
}

/// Read frames until none arrives for a moment: what the kernel held for the client.
fn read_until_quiet(client: &mut Client) -> usize {
    let mut frames = 0;
    while let Recv::Frame(_) = client.recv(Duration::from_millis(300)) {
        frames += 1;
    }
    frames
}

#[test]
fn close_policy_delivers_no_callback_after_close() {
    // Hold the loop inside `close` until the client has read everything the kernel held. When
    // the loop resumes, the kernel can take all the bytes the connection still had queued, so a
    // flush that follows empties the buffer: that must not lead to a `drain` on a connection
    // whose `close` was already delivered.
    let (in_close, in_close_rx) = crossbeam_channel::bounded::<()>(1);
    let (resume, resume_rx) = crossbeam_channel::bounded::<()>(1);
    let hold = move || {
        let _ = in_close.send(());
        let _ = resume_rx.recv_timeout(PATIENCE);
    };
    let (server, mut client, log, _) =
        flood_with_recorder(BackpressurePolicy::Close, |recorder| recorder.on_close(hold));
    in_close_rx.recv_timeout(PATIENCE).expect("the close callback runs");
    assert!(read_until_quiet(&mut client) > 0, "the kernel held flood messages");
    resume.send(()).expect("the loop waits in close");
    while let Recv::Frame(_) = client.recv(PATIENCE) {}
    server.stop();
    log.assert_lifecycles();
}
