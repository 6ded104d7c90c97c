//! Running out of file descriptors (EMFILE): `gale echo --threads 1` under a 64-descriptor limit
//! is offered far more connections than it can accept. It must not spin while the rest wait in
//! the listen backlog, must serve the waiting connections once descriptors are freed, must
//! serve brand-new connections afterwards, and must stay up throughout.

mod support;

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};

use tokio_tungstenite::tungstenite::{self, Message};

use support::{Gale, echo_command_with_threads};

/// RLIMIT_NOFILE of the server.
const FD_LIMIT: u64 = 64;

/// Connections opened at once: nearly twice what the server can hold.
const OFFERED: usize = 120;

/// Connections closed to free descriptors.
const CLOSED: usize = 40;

/// Bound on every wait and read: generous, so that a loaded machine does not fail the test.
const PATIENCE: Duration = Duration::from_secs(10);

fn gale_with_fd_limit(limit: u64) -> Gale {
    let mut cmd = echo_command_with_threads(1);
    // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Gale::start(&mut cmd)
}

/// Descriptors the process has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| dir.count())
}

/// Poll `check` until it holds or `PATIENCE` runs out; returns whether it held.
fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < PATIENCE {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, PATIENCE).expect("connect (the backlog has room)");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream.set_write_timeout(Some(PATIENCE)).unwrap();
    stream
}

/// Complete a WebSocket handshake on `stream` and have `text` echoed.
fn handshake_and_echo(addr: SocketAddr, stream: TcpStream, text: &str) {
    let (mut ws, _) = tungstenite::client(format!("ws://{addr}/"), stream)
        .unwrap_or_else(|e| panic!("handshake for {text:?} failed: {e}"));
    ws.send(Message::text(text)).expect("send");
    assert_eq!(ws.read().expect("read the echo"), Message::text(text));
    let _ = ws.close(None);
}

#[test]
fn server_survives_running_out_of_descriptors() {
    let gale = gale_with_fd_limit(FD_LIMIT);
    let (addr, pid) = (gale.addr, gale.pid());
    let idle_fds = open_fds(pid);
    let mut conns: Vec<TcpStream> = (0..OFFERED).map(|_| connect(addr)).collect();

    // The server accepts until it hits the limit; the rest stay in the listen backlog.
    assert!(
        eventually(|| open_fds(pid) as u64 >= FD_LIMIT),
        "the server never reached its descriptor limit ({} open)",
        open_fds(pid)
    );

    // Accepting keeps failing with EMFILE: the server must wait, not retry in a busy loop.
    let before = gale.cpu_time();
    std::thread::sleep(Duration::from_secs(2));
    let spent = gale.cpu_time().saturating_sub(before);
    assert!(spent < Duration::from_millis(500), "{spent:?} of CPU in 2 s while out of descriptors");

    // Closing connections frees descriptors; the server must then take connections from the
    // backlog. Indices from FD_LIMIT on could not have been accepted before (the server holds
    // a few descriptors of its own), and there is now room for CLOSED more.
    drop(conns.drain(..CLOSED));
    let waiting: Vec<TcpStream> =
        conns.drain(FD_LIMIT as usize - CLOSED..FD_LIMIT as usize - CLOSED + 10).collect();
    for (i, stream) in waiting.into_iter().enumerate() {
        handshake_and_echo(addr, stream, &format!("waited in the backlog {i}"));
    }

    // With every old connection gone, a brand-new one is served too.
    drop(conns);
    handshake_and_echo(addr, connect(addr), "brand new");

    let mut gale = gale;
    assert!(matches!(gale.child.try_wait(), Ok(None)), "the server exited");
    // Every descriptor of the closed connections is released.
    assert!(
        eventually(|| open_fds(pid) <= idle_fds),
        "{} descriptors open after every connection closed, {idle_fds} before any",
        open_fds(pid)
    );
}
