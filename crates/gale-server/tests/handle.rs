//! Controlling a running server through its `ServerHandle`: running closures on a loop,
//! counting connections, and the graceful shutdown (close 1001 to every WebSocket, bounded by
//! `shutdown_timeout`); and many connections spread over two loops.

mod common;

use std::time::{Duration, Instant};

use common::{Client, Ev, Log, PATIENCE, Recorder, TestServer, assert_between, wait_until};
use gale_server::{App, Behavior, LoopGone, ServerConfig};

/// An echo route on two loops, with `shutdown_timeout` as given.
fn start_echo(shutdown_timeout: Duration) -> (TestServer, Log<Ev>) {
    let log = Log::new();
    let config = ServerConfig { threads: 2, shutdown_timeout, ..ServerConfig::default() };
    let app = App::new().config(config).ws("/ws", Behavior::default(), Recorder::echo(&log));
    (TestServer::start(app), log)
}

/// Connect `n` clients; each proves its connection works with an echo.
fn connect_many(server: &TestServer, n: usize) -> Vec<Client> {
    (0..n)
        .map(|i| {
            let mut client = server.connect(&format!("/ws?id={i}"));
            client.assert_echo(&format!("hello from {i}"));
            client
        })
        .collect()
}

/// Ask every loop for its index and connection count, through `post`.
fn loop_reports(server: &TestServer) -> Vec<(usize, usize)> {
    let (tx, rx) = crossbeam_channel::unbounded();
    for i in 0..server.handle.loops() {
        let tx = tx.clone();
        server
            .handle
            .post(i, move |cx| tx.send((cx.index(), cx.connections())).expect("the test waits"))
            .unwrap();
    }
    (0..server.handle.loops()).map(|_| rx.recv_timeout(PATIENCE).expect("posted closures run")).collect()
}

#[test]
fn post_runs_the_closure_on_the_chosen_loop() {
    let (server, log) = start_echo(Duration::from_secs(5));
    assert_eq!(server.handle.loops(), 2);
    let clients = connect_many(&server, 6);
    let mut reports = loop_reports(&server);
    reports.sort_unstable();
    assert_eq!(reports.iter().map(|r| r.0).collect::<Vec<_>>(), [0, 1], "each closure ran on its loop");
    assert_eq!(reports.iter().map(|r| r.1).sum::<usize>(), 6, "the loops hold the six connections");
    // Indexes wrap around the number of loops.
    let (tx, rx) = crossbeam_channel::bounded(1);
    server.handle.post(3, move |cx| tx.send(cx.index()).expect("the test waits")).unwrap();
    assert_eq!(rx.recv_timeout(PATIENCE), Ok(1));
    clients.into_iter().for_each(Client::close_normally);
    let handle = server.handle.clone();
    server.stop();
    assert_eq!(handle.post(0, |_| {}), Err(LoopGone), "a stopped loop takes no more work");
    log.assert_lifecycles();
}

#[test]
fn connections_counts_open_connections() {
    let (server, log) = start_echo(Duration::from_secs(5));
    assert_eq!(server.handle.connections(), 0);
    let clients = connect_many(&server, 20);
    wait_until("20 connections", || server.handle.connections() == 20);
    clients.into_iter().for_each(Client::close_normally);
    wait_until("no connections", || server.handle.connections() == 0);
    server.stop();
    log.assert_lifecycles();
}

#[test]
fn shutdown_closes_every_websocket_with_1001() {
    let (server, log) = start_echo(PATIENCE);
    let clients = connect_many(&server, 10);
    let start = Instant::now();
    server.handle.shutdown();
    assert!(server.handle.is_shutting_down());
    for mut client in clients {
        assert_eq!(client.expect_close(), (Some(1001), "server shutting down".into()));
        client.send_close(Some(1001), "");
        client.expect_eof();
    }
    // Every client answered: the loops exit without waiting for shutdown_timeout (10 s).
    server.stop();
    assert_between("the graceful shutdown", start.elapsed(), 0.0..=5.0);
    for id in 0..10 {
        assert_eq!(log.wait_close(id), (1001, "server shutting down".into()));
    }
    log.assert_lifecycles();
}

#[test]
fn shutdown_does_not_wait_past_shutdown_timeout_for_a_silent_client() {
    let (server, log) = start_echo(Duration::from_secs(1));
    let mut silent = server.connect("/ws");
    silent.assert_echo("hi");
    let start = Instant::now();
    server.handle.shutdown();
    assert_eq!(silent.expect_close(), (Some(1001), "server shutting down".into()));
    // The client never answers; the loops give up on it after shutdown_timeout.
    server.stop();
    assert_between("a shutdown with a silent client", start.elapsed(), 0.5..=4.0);
    silent.expect_eof();
    assert_eq!(log.wait_close(0).0, 1001);
    log.assert_lifecycles();
}

#[test]
fn many_connections_over_two_loops_each_echo() {
    let (server, log) = start_echo(Duration::from_secs(5));
    let mut clients = connect_many(&server, 200);
    // The kernel spreads connections over both loops' listeners.
    let reports = loop_reports(&server);
    assert!(reports.iter().all(|&(_, n)| n > 0), "a loop got no connection: {reports:?}");
    assert_eq!(reports.iter().map(|r| r.1).sum::<usize>(), 200);
    // Every connection still echoes once all are open.
    for (i, client) in clients.iter_mut().enumerate() {
        client.assert_echo(&format!("again {i}"));
    }
    clients.into_iter().for_each(Client::close_normally);
    server.stop();
    log.assert_lifecycles();
}
