//! Publish/subscribe through the App API: subscriptions on several loops, publishes from other
//! threads and from handlers, excluding the sender, clean-up on close, and slow subscribers.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Recv, TestServer, wait_until};
use gale_server::{
    Accept, App, BackpressurePolicy, Behavior, Message, Reject, UpgradeRequest, WebSocket, WsHandler,
};

/// Messages are commands: `sub T`, `unsub T`, `is T` (answers `yes`/`no`), `pub T text` and
/// `pubx T text` (publish, excluding the sender).
struct Commands;

impl WsHandler for Commands {
    type Data = ();

    fn upgrade(&self, _req: &UpgradeRequest<'_>) -> Result<Accept<()>, Reject> {
        Ok(Accept::new(()))
    }

    fn message(&self, ws: &mut WebSocket<'_, ()>, msg: Message<'_>) {
        let Message::Text(text) = msg else { return };
        let mut parts = text.splitn(3, ' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some("sub"), Some(t), None) => {
                let fresh = ws.subscribe(t);
                ws.send_text(if fresh { "subscribed" } else { "already" });
            }
            (Some("unsub"), Some(t), None) => {
                let was = ws.unsubscribe(t);
                ws.send_text(if was { "unsubscribed" } else { "not subscribed" });
            }
            (Some("is"), Some(t), None) => {
                ws.send_text(if ws.is_subscribed(t) { "yes" } else { "no" });
            }
            (Some("count"), None, None) => {
                ws.send_text(&ws.subscription_count().to_string());
            }
            (Some("pub"), Some(t), Some(body)) => {
                ws.publish(t, Message::Text(body), false);
            }
            (Some("pubx"), Some(t), Some(body)) => {
                ws.publish(t, Message::Text(body), true);
            }
            _ => {
                ws.send_text("?");
            }
        }
    }
}

fn start(threads: usize, behavior: Behavior) -> TestServer {
    TestServer::start(App::new().threads(threads).ws("/ps", behavior, Commands))
}

/// Send `command` and return the answer.
fn ask(client: &mut Client, command: &str) -> String {
    client.send_text(command);
    client.expect_text()
}

fn subscribe(server: &TestServer, topic: &str) -> Client {
    let mut c = server.connect("/ps");
    assert_eq!(ask(&mut c, &format!("sub {topic}")), "subscribed");
    c
}

/// At least `n` subscribers of `topic` on a two-loop server, more if needed until both loops
/// hold some: the kernel spreads accepts over the loops by a hash of the connection, so any
/// fixed number can all land on one (8 do, once in 128 runs).
fn subscribe_on_both_loops(server: &TestServer, topic: &str, n: usize) -> Vec<Client> {
    let mut subs: Vec<Client> = (0..n).map(|_| subscribe(server, topic)).collect();
    let on_both = || (0..2).all(|i| server.handle.loop_stats(i).connections > 0);
    while !on_both() {
        assert!(subs.len() < 256, "256 connections, all on one loop");
        subs.push(subscribe(server, topic));
    }
    subs
}

#[test]
fn publish_from_another_thread_reaches_every_subscriber_on_every_loop_in_order() {
    let server = start(2, Behavior::default());
    let mut subs = subscribe_on_both_loops(&server, "news", 16);
    let mut other = subscribe(&server, "sport");
    assert_eq!(server.handle.num_subscribers("news"), subs.len());
    assert_eq!(server.handle.num_subscribers("sport"), 1);
    assert_eq!(server.handle.num_subscribers("nothing"), 0);

    let handle = server.handle.clone();
    let publisher = std::thread::spawn(move || {
        for i in 0..200 {
            assert!(handle.publish_text("news", &format!("n{i}")) > 0);
        }
    });
    publisher.join().unwrap();
    for c in &mut subs {
        for i in 0..200 {
            assert_eq!(c.expect_text(), format!("n{i}"));
        }
    }
    // A topic's messages never reach subscribers of another.
    assert!(matches!(other.recv(Duration::from_millis(200)), Recv::Timeout));
    assert_eq!(server.handle.publish_text("nobody", "x"), 0, "no loop gets a topic without subscribers");
    let out: u64 = (0..2).map(|i| server.handle.loop_stats(i).messages_out).sum();
    assert!(out >= 16 * 200, "messages out counted: {out}");
    drop((subs, other));
    server.stop();
}

#[test]
fn a_publish_to_more_subscribers_than_the_ring_has_entries_reaches_each() {
    // io_uring: one publish is a send per idle subscriber, more than the submission queue
    // holds (4,096), so the queue fills and is handed to the kernel midway. (epoll: as many
    // `send`s.) 9,000 descriptors in this process, under the 20,000 allowed.
    let server = start(1, Behavior::default());
    let mut subs: Vec<Client> = (0..4_500).map(|_| subscribe(&server, "all")).collect();
    for i in 0..3 {
        assert_eq!(server.handle.publish_text("all", &format!("m{i}")), 1);
    }
    for c in &mut subs {
        for i in 0..3 {
            assert_eq!(c.expect_text(), format!("m{i}"));
        }
    }
    drop(subs);
    server.stop();
}

#[test]
fn subscriptions_are_per_connection_and_end_with_it() {
    let server = start(2, Behavior::default());
    let mut a = subscribe(&server, "room");
    assert_eq!(ask(&mut a, "sub room"), "already");
    assert_eq!(ask(&mut a, "is room"), "yes");
    assert_eq!(ask(&mut a, "is hall"), "no");
    assert_eq!(ask(&mut a, "sub hall"), "subscribed");
    assert_eq!(ask(&mut a, "count"), "2");
    let b = subscribe(&server, "room");
    assert_eq!(server.handle.num_subscribers("room"), 2);
    assert_eq!(ask(&mut a, "unsub room"), "unsubscribed");
    assert_eq!(ask(&mut a, "unsub room"), "not subscribed");
    assert_eq!(ask(&mut a, "is room"), "no");
    assert_eq!(ask(&mut a, "count"), "1");
    assert_eq!(ask(&mut a, "unsub hall"), "unsubscribed");
    assert_eq!(server.handle.num_subscribers("room"), 1);
    server.handle.publish_text("room", "hello");
    assert!(matches!(a.recv(Duration::from_millis(200)), Recv::Timeout), "unsubscribed");
    // Dropping the TCP connection ends its subscriptions.
    drop(b);
    wait_until("the closed subscriber is gone", || server.handle.num_subscribers("room") == 0);
    wait_until("the topic is forgotten", || server.handle.num_topics() == 0);
    drop(a);
    server.stop();
}

#[test]
fn handlers_publish_with_or_without_the_sender() {
    let server = start(2, Behavior::default());
    let mut a = subscribe(&server, "chat");
    let mut b = subscribe(&server, "chat");
    a.send_text("pub chat one");
    assert_eq!(a.expect_text(), "one");
    assert_eq!(b.expect_text(), "one");
    a.send_text("pubx chat two");
    assert_eq!(b.expect_text(), "two");
    assert_eq!(ask(&mut a, "is chat"), "yes", "the sender did not get its own message back");
    // A publisher need not subscribe.
    let mut c = server.connect("/ps");
    c.send_text("pub chat three");
    assert_eq!(a.expect_text(), "three");
    assert_eq!(b.expect_text(), "three");
    drop((a, b, c));
    server.stop();
}

#[test]
fn a_slow_subscriber_is_cut_off_without_slowing_the_others() {
    let behavior = Behavior {
        max_backpressure: 256 * 1024,
        backpressure_policy: BackpressurePolicy::Close,
        ..Behavior::default()
    };
    let server = start(1, behavior);
    let mut fast = subscribe(&server, "feed");
    let slow = subscribe(&server, "feed");
    slow.stream().set_nonblocking(false).unwrap();
    // `slow` never reads: the kernel buffers fill, then its backlog reaches the limit.
    let body = "x".repeat(16 * 1024);
    let started = Instant::now();
    let mut received = 0usize;
    for i in 0..400 {
        server.handle.publish_text("feed", &format!("{i:04}{body}"));
        // The fast subscriber keeps up.
        while received <= i {
            let text = fast.expect_text();
            assert_eq!(&text[..4], format!("{received:04}"));
            received += 1;
        }
    }
    assert!(started.elapsed() < Duration::from_secs(20));
    wait_until("the slow subscriber is dropped", || server.handle.num_subscribers("feed") == 1);
    let dropped = server.handle.loop_stats(0).dropped;
    assert!(dropped >= 1, "the refused message is counted");
    drop((fast, slow));
    server.stop();
}

/// Publishes delivered in one go, to two topics: a subscriber of one topic misses the other's
/// messages in between, so its frames are not one run of what the loop delivered; it still
/// gets its messages in order (a large one, written at once when nothing is queued, included),
/// and a subscriber of both gets every message in order.
#[test]
fn one_batch_of_publishes_to_two_topics_keeps_each_subscribers_order() {
    let server = start(1, Behavior::default());
    let mut both = subscribe(&server, "a");
    assert_eq!(ask(&mut both, "sub b"), "subscribed");
    let mut only_a = subscribe(&server, "a");
    let mut publisher = server.connect("/ps");
    let large = format!("a2{}", "L".repeat(20 * 1024));
    let published = ["a1".to_string(), "b1".to_string(), large.clone(), "b2".to_string(), "a3".to_string()];
    // One write: the loop reads the five publishes at once and delivers them together.
    let mut wire = Vec::new();
    for text in &published {
        let topic = &text[..1];
        let spec = gale_frame::FrameSpec::client(gale_frame::OpCode::Text, [1, 2, 3, 4]);
        gale_frame::append_frame(&mut wire, spec, format!("pub {topic} {text}").as_bytes());
    }
    publisher.send_raw(&wire);
    for expected in &published {
        assert_eq!(&both.expect_text(), expected);
    }
    for expected in ["a1", large.as_str(), "a3"] {
        assert_eq!(only_a.expect_text(), expected);
    }
    drop((both, only_a, publisher));
    server.stop();
}

/// Publishes delivered in one go count against a subscriber's `max_backpressure` as they would
/// one by one: with the drop policy, exactly the messages that fit arrive (a message is
/// admitted while at most the limit, here under 4 KiB, is held), and the rest are dropped.
#[test]
fn one_batch_of_publishes_is_held_to_the_subscribers_limit() {
    let behavior = Behavior {
        max_backpressure: 4000,
        backpressure_policy: BackpressurePolicy::Drop,
        ..Behavior::default()
    };
    let server = start(1, behavior);
    let mut subscriber = subscribe(&server, "t");
    let mut publisher = server.connect("/ps");
    // Ten frames of 1,005 bytes: held 0, 1005, 2010, 3015 admit the first four; 4020 is past
    // the limit and refuses the other six.
    let body = "x".repeat(1000);
    let mut wire = Vec::new();
    for i in 0..10 {
        let spec = gale_frame::FrameSpec::client(gale_frame::OpCode::Text, [1, 2, 3, 4]);
        gale_frame::append_frame(&mut wire, spec, format!("pub t {i}{body}").as_bytes());
    }
    publisher.send_raw(&wire);
    for i in 0..4 {
        assert_eq!(subscriber.expect_text(), format!("{i}{body}"));
    }
    assert!(matches!(subscriber.recv(Duration::from_millis(300)), Recv::Timeout), "only four fit");
    assert_eq!(server.handle.loop_stats(0).dropped, 6);
    drop((subscriber, publisher));
    server.stop();
}

// ---------------------------------------------------------------------------------------------
// Acting on connections from other threads
// ---------------------------------------------------------------------------------------------

/// Records the id of every connection it opens; messages are ignored.
struct Remember(std::sync::Arc<std::sync::Mutex<Vec<gale_server::ConnId>>>);

impl WsHandler for Remember {
    type Data = u32;

    fn upgrade(&self, _req: &UpgradeRequest<'_>) -> Result<Accept<u32>, Reject> {
        Ok(Accept::new(7))
    }

    fn open(&self, ws: &mut WebSocket<'_, u32>) {
        self.0.lock().unwrap().push(ws.id());
    }

    fn message(&self, _ws: &mut WebSocket<'_, u32>, _msg: Message<'_>) {}
}

fn start_remembering() -> (TestServer, std::sync::Arc<std::sync::Mutex<Vec<gale_server::ConnId>>>) {
    let ids = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let server =
        TestServer::start(App::new().threads(2).ws("/r", Behavior::default(), Remember(ids.clone())));
    (server, ids)
}

fn opened_id(ids: &std::sync::Mutex<Vec<gale_server::ConnId>>, n: usize) -> gale_server::ConnId {
    wait_until("the connection opened", || ids.lock().unwrap().len() > n);
    ids.lock().unwrap()[n]
}

#[test]
fn post_to_runs_on_the_connection_with_its_data() {
    let (server, ids) = start_remembering();
    let mut c = server.connect("/r");
    let id = opened_id(&ids, 0);
    server
        .handle
        .post_to::<u32>(id, |ws| {
            let n = *ws.data();
            ws.send_text(&format!("data is {n}"));
        })
        .unwrap();
    assert_eq!(c.expect_text(), "data is 7");
    // The wrong data type: nothing happens.
    server
        .handle
        .post_to::<String>(id, |ws| {
            ws.send_text("never");
        })
        .unwrap();
    // A closed connection: nothing happens, and its slot's next connection is not touched.
    drop(c);
    wait_until("closed", || server.handle.connections() == 0);
    let mut next = server.connect("/r");
    opened_id(&ids, 1);
    server
        .handle
        .post_to::<u32>(id, |ws| {
            ws.send_text("stale");
        })
        .unwrap();
    assert!(matches!(next.recv(Duration::from_millis(300)), Recv::Timeout));
    drop(next);
    server.stop();
}

#[test]
fn subscribe_from_another_thread_sees_every_later_publish() {
    let (server, ids) = start_remembering();
    let mut clients: Vec<Client> = (0..6).map(|_| server.connect("/r")).collect();
    let conns: Vec<_> = (0..6).map(|i| opened_id(&ids, i)).collect();
    for round in 0..40 {
        let topic = format!("t{round}");
        for &id in &conns {
            server.handle.subscribe(id, &topic).unwrap();
        }
        // Published right after subscribe returned, before the loops ran their tasks.
        server.handle.publish_text(&topic, &format!("m{round}"));
    }
    for c in &mut clients {
        for round in 0..40 {
            assert_eq!(c.expect_text(), format!("m{round}"));
        }
    }
    assert_eq!(server.handle.num_subscribers("t0"), 6);
    drop(clients);
    wait_until("subscriptions end with the connections", || server.handle.num_subscribers("t0") == 0);
    // Subscribing a connection that is gone takes the count back.
    server.handle.subscribe(conns[0], "late").unwrap();
    wait_until("the count is taken back", || server.handle.num_subscribers("late") == 0);
    // A topic leaves the registry just after its count reaches zero, so wait for that too.
    wait_until("no topic is left", || server.handle.num_topics() == 0);
    server.stop();
}

#[test]
fn deferred_http_answers_keep_pipelined_requests_in_order() {
    let app = App::new()
        .threads(1)
        .get("/slow", |req: &gale_server::HttpRequest<'_>| {
            let responder = req.defer();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                responder.respond(gale_server::HttpResponse::text(200, "late"));
            });
            gale_server::HttpResponse::text(200, "ignored")
        })
        .get("/dropped", |req: &gale_server::HttpRequest<'_>| {
            drop(req.defer());
            gale_server::HttpResponse::text(200, "ignored")
        })
        .get("/fast", |_req: &gale_server::HttpRequest<'_>| gale_server::HttpResponse::text(200, "fast"));
    let server = TestServer::start(app);
    let mut stream = common::connect_tcp(server.addr);
    use std::io::Write;
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /fast HTTP/1.1\r\nHost: x\r\n\r\nGET /dropped HTTP/1.1\r\nHost: x\r\n\r\nGET /fast HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let replies: Vec<_> = (0..4).map(|_| common::read_http_reply(&mut stream, &mut buf)).collect();
    let got: Vec<(u16, String)> = replies.iter().map(|r| (r.status, r.body_text())).collect();
    // A client that shuts down its sending side after its request still gets the answer.
    let mut half = common::connect_tcp(server.addr);
    half.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    half.shutdown(std::net::Shutdown::Write).unwrap();
    let late = common::read_http_reply(&mut half, &mut Vec::new());
    assert_eq!((late.status, late.body_text()), (200, "late".to_string()));
    assert_eq!(
        got,
        vec![
            (200, "late".to_string()),
            (200, "fast".to_string()),
            (500, "the request was dropped unanswered\n".to_string()),
            (200, "fast".to_string()),
        ]
    );
    server.stop();
}

#[test]
fn publishes_inside_batched_all_arrive_in_order_nested_or_cut_by_a_panic() {
    let server = start(2, Behavior::default());
    let mut subs = subscribe_on_both_loops(&server, "news", 8);

    let handle = server.handle.clone();
    let publisher = std::thread::spawn(move || {
        handle.batched(|| {
            for i in 0..50 {
                assert!(handle.publish_text("news", &format!("n{i}")) > 0);
            }
            // Nested: wakes at the end of the outer call.
            handle.batched(|| handle.publish_text("news", "nested"));
        });
        // A panic inside still wakes the loops for what was published before it.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            handle.batched(|| {
                handle.publish_text("news", "before the panic");
                panic!("in batched");
            })
        }));
        assert!(panicked.is_err());
    });
    for c in &mut subs {
        for i in 0..50 {
            assert_eq!(c.expect_text(), format!("n{i}"));
        }
        assert_eq!(c.expect_text(), "nested");
        assert_eq!(c.expect_text(), "before the panic");
    }
    publisher.join().unwrap();
    drop(subs);
    server.stop();
}
