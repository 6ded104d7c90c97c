//! Output per connection: what a peer can make the server hold for it.
//!
//! - A client that floods pings and never reads is not read any more once the pongs held for
//!   it pass `max_backpressure`: what the server holds stays within the limit plus one read's
//!   worth of replies, however long the flood; once the client reads, reading resumes and
//!   every ping is answered, in order.
//! - A client that stays past the limit for `backpressure_timeout` is dropped (handler: 1006).
//! - With the drop policy the held bytes never pass the limit (echoes are refused instead),
//!   yet a client that sends messages and never reads is held back and dropped all the same:
//!   a refused message pauses reading until the held bytes empty. The same holds for a
//!   subscriber whose publishes are refused and who sends nothing at all.
//! - A pending pong does not make the server refuse a message larger than the limit: a
//!   fragmented 1.5 MiB message with a ping between its fragments is echoed (default limit,
//!   1 MiB).

mod common;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Client, Ev, Frame, Log, PATIENCE, Recorder, Recv, TestServer, assert_between, wait_until};
use gale_frame::{CloseCode, FrameSpec, OpCode, append_frame};
use gale_server::{
    Accept, App, Behavior, Message, Reject, ServerConfig, ServerHandle, UpgradeRequest, WebSocket, WsHandler,
};

/// The limit of the flooded route: small, so that the flood is many times larger.
const LIMIT: usize = 64 * 1024;
/// Pings in a flood, 131 bytes each on the wire: 21 MB, their pongs 20 MB, many times what
/// the kernel buffers for a client whose receive buffer is small.
const FLOOD: u32 = 160_000;
/// Payload of each ping: its number in the first four bytes, then filler, the largest a
/// control frame may carry.
const PING_PAYLOAD: usize = 125;
/// What one read's replies may add past the limit: epoll reads 512 KiB at a time
/// (`ServerConfig::recv_buffer`); io_uring handles one batch of receive completions, at most
/// its ring of provided buffers: 32 x 64 KiB with incremental buffers, 512 x 16 KiB (8 MiB)
/// with whole buffers on kernels before 6.12. The larger, so the test holds on both; the
/// flood's 20 MB of pongs is still far past it.
const ONE_READ: usize = 8 << 20;

/// Records, for the test, what the server held for its connections.
#[derive(Clone, Default)]
struct Held {
    /// Pings received.
    pings: Arc<AtomicUsize>,
    /// The largest `buffered_amount()` seen in a `ping` callback (the pong just queued).
    max_buffered: Arc<AtomicUsize>,
    /// Close codes the handler saw.
    closes: Log<u16>,
}

/// Echoes messages, lets the server answer pings, and records into [`Held`].
struct Watch(Held);

impl WsHandler for Watch {
    type Data = ();

    fn upgrade(&self, _req: &UpgradeRequest<'_>) -> Result<Accept<()>, Reject> {
        Ok(Accept::new(()))
    }

    fn message(&self, ws: &mut WebSocket<'_, ()>, msg: Message<'_>) {
        ws.send(msg);
    }

    fn ping(&self, ws: &mut WebSocket<'_, ()>, _payload: &[u8]) {
        self.0.pings.fetch_add(1, Ordering::Relaxed);
        self.0.max_buffered.fetch_max(ws.buffered_amount(), Ordering::Relaxed);
    }

    fn close(&self, _ws: &mut WebSocket<'_, ()>, code: CloseCode, _reason: &str) {
        self.0.closes.push(code.0);
    }
}

/// A one-loop server whose route holds at most [`LIMIT`] and drops a connection past it after
/// `timeout`.
fn start(timeout: Duration) -> (TestServer, Held) {
    let held = Held::default();
    let behavior = Behavior { max_backpressure: LIMIT, backpressure_timeout: timeout, ..Behavior::default() };
    let app = App::new().config(ServerConfig { threads: 1, ..ServerConfig::default() }).ws(
        "/ws",
        behavior,
        Watch(held.clone()),
    );
    (TestServer::start(app), held)
}

/// Connect a client whose receive buffer is small, so that the kernel holds little of what
/// the server sends it and the rest stays with the server (or, held back, with the client).
fn connect_small_window(server: &TestServer) -> Client {
    let client = server.connect("/ws");
    socket2::SockRef::from(client.stream()).set_recv_buffer_size(256 * 1024).expect("set SO_RCVBUF");
    client
}

/// The masked pings of a flood, numbered.
fn ping_flood() -> Vec<u8> {
    let mut wire = Vec::with_capacity(FLOOD as usize * (PING_PAYLOAD + 6));
    let mut payload = [0x70u8; PING_PAYLOAD];
    for seq in 0..FLOOD {
        payload[..4].copy_from_slice(&seq.to_le_bytes());
        let mask = seq.wrapping_mul(0x9e37_79b9).to_le_bytes();
        append_frame(&mut wire, FrameSpec::client(OpCode::Ping, mask), &payload);
    }
    wire
}

/// Write the flood on a thread of its own (the server may hold it back for a long while);
/// returns the thread, whose result says whether everything was written.
fn send_flood(client: &Client) -> JoinHandle<std::io::Result<()>> {
    let mut stream = client.stream().try_clone().expect("clone the client's socket");
    stream.set_write_timeout(Some(Duration::from_secs(60))).expect("set a write timeout");
    let wire = ping_flood();
    std::thread::spawn(move || stream.write_all(&wire))
}

/// Wait until the server has stopped reading the connection (or, if it never does, until it
/// has read the whole flood) and its ping count no longer moves.
fn wait_until_the_server_stops_reading(handle: &ServerHandle, held: &Held) {
    let start = Instant::now();
    let mut last = (usize::MAX, Instant::now());
    loop {
        let pings = held.pings.load(Ordering::Relaxed);
        let paused = handle.loop_stats(0).reads_paused > 0;
        if pings != last.0 {
            last = (pings, Instant::now());
        } else if (paused || pings == FLOOD as usize) && last.1.elapsed() > Duration::from_millis(500) {
            return;
        }
        assert!(start.elapsed() < 3 * PATIENCE, "the server kept reading pings: {pings} so far");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_ping_flood_is_held_to_the_limit_and_answered_once_the_client_reads() {
    let (server, held) = start(Duration::from_secs(60));
    let mut client = connect_small_window(&server);
    let writer = send_flood(&client);
    wait_until_the_server_stops_reading(&server.handle, &held);
    let max_buffered = held.max_buffered.load(Ordering::Relaxed);
    let pings = held.pings.load(Ordering::Relaxed);
    eprintln!("paused: held at most {max_buffered} bytes after {pings} pings");
    assert!(
        max_buffered <= LIMIT + ONE_READ,
        "the server held {max_buffered} bytes of pongs for a client that does not read \
         (max_backpressure {LIMIT}; {pings} pings of {FLOOD} read)"
    );
    assert!(pings < FLOOD as usize, "the server read the whole flood of a client that does not read");
    assert!(server.handle.loop_stats(0).reads_paused >= 1, "reading was never paused");

    // The client reads: the server reads again, and every ping gets its pong, in order.
    for seq in 0..FLOOD {
        match client.recv(PATIENCE) {
            Recv::Frame(Frame::Pong(payload)) => {
                assert_eq!(payload.len(), PING_PAYLOAD);
                let got = u32::from_le_bytes(payload[..4].try_into().expect("four bytes"));
                assert_eq!(got, seq, "pongs out of order");
            }
            other => panic!("expected pong {seq}, got {other:?}"),
        }
    }
    writer.join().expect("the writer thread").expect("the whole flood was written");
    assert_eq!(held.pings.load(Ordering::Relaxed), FLOOD as usize);
    // Reading paused and resumed many times; what the server held never passed the bound.
    let max_buffered = held.max_buffered.load(Ordering::Relaxed);
    assert!(max_buffered <= LIMIT + ONE_READ, "held {max_buffered} bytes while the client read");
    client.assert_echo("still open");
    client.close_normally();
    assert_eq!(held.closes.wait_for("close", |c| !c.is_empty()), vec![1000]);
    assert_eq!(server.handle.loop_stats(0).backpressure_timeouts, 0);
    server.stop();
}

#[test]
fn a_client_that_never_reads_is_dropped_after_the_backpressure_timeout() {
    let timeout = Duration::from_secs(1);
    let (server, held) = start(timeout);
    let mut client = connect_small_window(&server);
    let writer = send_flood(&client);
    wait_until("reading paused", || server.handle.loop_stats(0).reads_paused > 0);
    let paused = Instant::now();
    // Nothing is read: no close frame can reach the client, so the connection is dropped.
    assert_eq!(held.closes.wait_for("close", |c| !c.is_empty()), vec![1006]);
    // Timeouts are counted in 250 ms ticks: at least the timeout, at most a tick and a half
    // more (plus the 10 ms the pause took to be seen).
    assert_between("the backpressure timeout", paused.elapsed(), 0.74..=2.5);
    // (The loop publishes its counters at the end of the iteration that closed it.)
    wait_until("the timeout counted", || server.handle.loop_stats(0).backpressure_timeouts == 1);
    assert!(held.pings.load(Ordering::Relaxed) < FLOOD as usize, "the whole flood was read");
    // The client finds the end of the connection after what the kernel held for it.
    loop {
        match client.recv(PATIENCE) {
            Recv::Frame(Frame::Pong(_)) => {}
            Recv::Eof => break,
            other => panic!("expected pongs then the end of the connection, got {other:?}"),
        }
    }
    // Written whole into the kernel's buffers, or cut short by the reset: either is fine.
    let _ = writer.join().expect("the writer thread");
    wait_until("the connection is gone", || server.handle.connections() == 0);
    server.stop();
}

#[test]
fn a_client_whose_echoes_are_refused_is_not_read_and_is_dropped_after_the_timeout() {
    let timeout = Duration::from_secs(1);
    let (server, held) = start(timeout);
    assert_eq!(Behavior::default().backpressure_policy, gale_server::BackpressurePolicy::Drop);
    let client = connect_small_window(&server);
    // 4,096 messages of 16 KiB (64 MiB), echoed to a client that never reads.
    let mut wire = Vec::new();
    let payload = vec![0x5au8; 16 * 1024];
    for i in 0..4096u32 {
        append_frame(&mut wire, FrameSpec::client(OpCode::Binary, i.to_le_bytes()), &payload);
    }
    let mut stream = client.stream().try_clone().expect("clone the client's socket");
    stream.set_write_timeout(Some(Duration::from_secs(30))).expect("set a write timeout");
    let writer = std::thread::spawn(move || stream.write_all(&wire));
    wait_until("reading paused", || server.handle.loop_stats(0).reads_paused > 0);
    let paused = Instant::now();
    assert!(server.handle.loop_stats(0).dropped > 0, "paused without refusing an echo");
    assert_eq!(held.closes.wait_for("close", |c| !c.is_empty()), vec![1006]);
    assert_between("the backpressure timeout", paused.elapsed(), 0.74..=2.5);
    let read = server.handle.loop_stats(0).bytes_in;
    assert!(read < 32 << 20, "the server read {read} bytes of a client that reads nothing");
    let _ = writer.join().expect("the writer thread");
    wait_until("the connection is gone", || server.handle.connections() == 0);
    server.stop();
}

/// Subscribes every connection to topic `t`; records close codes.
struct Subscriber(Log<u16>);

impl WsHandler for Subscriber {
    type Data = ();

    fn upgrade(&self, _req: &UpgradeRequest<'_>) -> Result<Accept<()>, Reject> {
        Ok(Accept::new(()))
    }

    fn open(&self, ws: &mut WebSocket<'_, ()>) {
        ws.subscribe("t");
    }

    fn message(&self, _ws: &mut WebSocket<'_, ()>, _msg: Message<'_>) {}

    fn close(&self, _ws: &mut WebSocket<'_, ()>, code: CloseCode, _reason: &str) {
        self.0.push(code.0);
    }
}

#[test]
fn a_subscriber_whose_publishes_are_refused_is_dropped_after_the_timeout() {
    // Drop policy, no idle timeout, no pings: only the backpressure timeout can end it, and
    // nothing it sends (it sends nothing) makes the server look at it.
    let closes = Log::new();
    let behavior = Behavior {
        max_backpressure: LIMIT,
        backpressure_timeout: Duration::from_secs(1),
        idle_timeout: None,
        ping_interval: None,
        ..Behavior::default()
    };
    let app = App::new().config(ServerConfig { threads: 1, ..ServerConfig::default() }).ws(
        "/ws",
        behavior,
        Subscriber(closes.clone()),
    );
    let server = TestServer::start(app);
    let client = server.connect("/ws");
    socket2::SockRef::from(client.stream()).set_recv_buffer_size(16 * 1024).expect("set SO_RCVBUF");
    wait_until("subscribed", || server.handle.num_subscribers("t") == 1);
    let payload = vec![0x5au8; 16 * 1024];
    let start = Instant::now();
    while closes.snapshot().is_empty() {
        assert!(start.elapsed() < 3 * PATIENCE, "the subscriber was never dropped");
        server.handle.publish_binary("t", &payload);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(closes.snapshot(), vec![1006]);
    let stats = server.handle.loop_stats(0);
    // Reading pauses once the limit is crossed. With zero-copy sends, under load, the socket
    // has been seen to take more after that first pause, so that the backlog fell under the
    // limit once before the socket filled: reading may pause twice; more would mean it flaps.
    assert!(stats.dropped > 0 && (1..=2).contains(&stats.reads_paused), "{stats:?}");
    assert!(start.elapsed() < Duration::from_secs(5), "dropped only after {:?}", start.elapsed());
    drop(client);
    server.stop();
}

#[test]
fn time_spent_not_read_does_not_count_against_a_message_in_progress() {
    // A message begun, then a ping flood between its fragments that pauses reading for longer
    // than message_timeout: the pause is the server's doing, so once the client reads, the
    // message may still finish. The timeout leaves room for draining the flood's pongs once
    // reading resumes (that time does count), which took over 4 s once on a loaded machine.
    let held = Held::default();
    let behavior = Behavior {
        max_backpressure: LIMIT,
        message_timeout: Some(Duration::from_secs(8)),
        ..Behavior::default()
    };
    let app = App::new().config(ServerConfig { threads: 1, ..ServerConfig::default() }).ws(
        "/ws",
        behavior,
        Watch(held.clone()),
    );
    let server = TestServer::start(app);
    let mut client = connect_small_window(&server);
    let spec = |opcode, fin, mask| FrameSpec { opcode, fin, compressed: false, mask: Some(mask) };
    let mut first = Vec::new();
    append_frame(&mut first, spec(OpCode::Binary, false, [1, 2, 3, 4]), b"begun ");
    client.send_raw(&first);
    let writer = send_flood(&client);
    wait_until("reading paused", || server.handle.loop_stats(0).reads_paused > 0);
    // Longer than the timeout; what it leaves (8 s) is for the counted time before and after.
    std::thread::sleep(Duration::from_secs(9));
    for _ in 0..FLOOD {
        match client.recv(PATIENCE) {
            Recv::Frame(Frame::Pong(_)) => {}
            other => panic!("expected pongs, got {other:?}"),
        }
    }
    writer.join().expect("the writer thread").expect("the whole flood was written");
    let mut last = Vec::new();
    append_frame(&mut last, spec(OpCode::Continuation, true, [5, 6, 7, 8]), b"and finished");
    client.send_raw(&last);
    assert_eq!(client.expect_frame(), Frame::Binary(b"begun and finished".to_vec()));
    assert!(held.closes.snapshot().is_empty(), "closed: {:?}", held.closes.snapshot());
    client.close_normally();
    server.stop();
}

#[test]
fn a_pending_pong_does_not_refuse_a_message_larger_than_the_limit() {
    // The library's default limit (1 MiB), a message of 1.5 MiB split in two fragments with an
    // empty ping between them, all in one write: the pong is queued when the message
    // completes, and must not turn it away.
    let behavior = Behavior::default();
    assert_eq!(behavior.max_backpressure, 1 << 20);
    let log = Log::new();
    let server = TestServer::start(App::new().threads(1).ws("/ws", behavior, Recorder::echo(&log)));
    let mut client = server.connect("/ws");
    let first: Vec<u8> = (0..(3 << 19)).map(|i: u32| (i % 251) as u8).collect();
    let mut wire = Vec::new();
    let spec = |opcode, fin, mask| FrameSpec { opcode, fin, compressed: false, mask: Some(mask) };
    append_frame(&mut wire, spec(OpCode::Binary, false, [1, 2, 3, 4]), &first);
    append_frame(&mut wire, spec(OpCode::Ping, true, [5, 6, 7, 8]), b"");
    append_frame(&mut wire, spec(OpCode::Continuation, true, [9, 10, 11, 12]), b"!");
    client.send_raw(&wire);
    assert_eq!(client.expect_frame(), Frame::Pong(Vec::new()));
    let mut whole = first;
    whole.push(b'!');
    match client.expect_frame() {
        Frame::Binary(echo) => assert!(echo == whole, "the echo differs from the message"),
        other => panic!("expected the echo, got {other:?}"),
    }
    assert_eq!(server.handle.loop_stats(0).dropped, 0);
    client.close_normally();
    server.stop();
    assert!(
        log.snapshot().iter().any(|e| matches!(e, Ev::Binary { data, .. } if data.len() == (3 << 19) + 1))
    );
}

/// Publishes every message back to its own connection's topic, and records how many more
/// messages the server took from the connection before each publish reached it.
struct SelfPublisher {
    /// Messages received.
    messages: Arc<AtomicUsize>,
    /// The most messages received between one message and the delivery of its publish.
    max_lag: Arc<AtomicUsize>,
}

impl WsHandler for SelfPublisher {
    type Data = ();

    fn upgrade(&self, _req: &UpgradeRequest<'_>) -> Result<Accept<()>, Reject> {
        Ok(Accept::new(()))
    }

    fn open(&self, ws: &mut WebSocket<'_, ()>) {
        ws.subscribe("me");
    }

    fn message(&self, ws: &mut WebSocket<'_, ()>, msg: Message<'_>) {
        let this = self.messages.fetch_add(1, Ordering::Relaxed) + 1;
        ws.publish("me", msg, false);
        // Runs right after the publish is delivered: a loop runs its tasks in the order posted.
        let (messages, max_lag) = (self.messages.clone(), self.max_lag.clone());
        let _ = ws.server().post_to(ws.id(), move |_: &mut WebSocket<'_, ()>| {
            max_lag.fetch_max(messages.load(Ordering::Relaxed) - this, Ordering::Relaxed);
        });
    }
}

#[test]
fn a_client_publishing_to_itself_is_read_no_further_than_one_read_ahead_of_its_deliveries() {
    // Its publishes come back to it through the loop's mailbox, after the read that carried
    // them, and only then count against its limit: a loop that read on before delivering them
    // would hold several reads' worth of publishes for a client that never reads its own.
    // Small receive buffers (64 KiB a read on either backend) and a client that writes far
    // more than that at once.
    const READ: usize = 64 * 1024;
    const MESSAGE: usize = 1024;
    let messages = Arc::new(AtomicUsize::new(0));
    let max_lag = Arc::new(AtomicUsize::new(0));
    let behavior = Behavior { idle_timeout: None, ping_interval: None, ..Behavior::default() };
    let config = ServerConfig {
        threads: 1,
        recv_buffer: READ,
        uring_buffers: Some(4),
        uring_buffer_size: Some(READ / 4),
        ..ServerConfig::default()
    };
    let handler = SelfPublisher { messages: messages.clone(), max_lag: max_lag.clone() };
    let server = TestServer::start(App::new().config(config).ws("/ws", behavior, handler));
    let mut client = server.connect("/ws");
    wait_until("subscribed", || server.handle.num_subscribers("me") == 1);
    // 4 MiB of masked 1 KiB messages in one write, read back at the same time.
    const COUNT: usize = 4096;
    let mut wire = Vec::new();
    let payload = vec![0x42u8; MESSAGE];
    for seq in 0..COUNT as u32 {
        append_frame(&mut wire, FrameSpec::client(OpCode::Binary, seq.to_le_bytes()), &payload);
    }
    let mut stream = client.stream().try_clone().expect("clone the client's socket");
    stream.set_write_timeout(Some(PATIENCE)).expect("set a write timeout");
    let writer = std::thread::spawn(move || stream.write_all(&wire));
    for _ in 0..COUNT {
        match client.expect_frame() {
            Frame::Binary(data) => assert_eq!(data.len(), MESSAGE),
            other => panic!("expected a message back, got {other:?}"),
        }
    }
    writer.join().expect("writer thread").expect("write the messages");
    // Messages taken after one, before its publish came back: at most one read's worth.
    let lag = max_lag.load(Ordering::Relaxed);
    assert!(
        lag < READ / MESSAGE,
        "{lag} messages were read before a publish came back; one read holds {}",
        READ / MESSAGE
    );
    assert!(lag > 0, "every publish came back before the next message was read: the reads were not full");
    client.close_normally();
    server.stop();
}
