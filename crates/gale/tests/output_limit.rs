//! `gale echo --max-backpressure` and `--backpressure-timeout`, end to end: a client that
//! floods pings and reads nothing is dropped once it has stayed past the limit for the
//! timeout, and a pong pending between the fragments of a message larger than the limit does
//! not cost the message its echo.

mod raw;
mod support;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use raw::{BINARY, CONT, Client, PING, PONG, close_frame, close_payload, fragment, frame};
use support::Gale;

/// Make the kernel hold little of what the server sends `client`, so that the server's output
/// backs up quickly.
fn small_receive_buffer(client: &Client) {
    let size: libc::c_int = 16 * 1024;
    // SAFETY: a valid socket descriptor, and a pointer to a c_int with its size.
    let rc = unsafe {
        libc::setsockopt(
            client.stream().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "set SO_RCVBUF");
}

#[test]
fn a_client_that_floods_pings_and_never_reads_is_dropped_after_the_timeout() {
    let gale = Gale::echo(&["--max-backpressure", "64KiB", "--backpressure-timeout", "1"]);
    let mut client = Client::connect(gale.addr);
    small_receive_buffer(&client);
    // 40,000 pings of 125 bytes (5 MB): their pongs are far more than 64 KiB and what the
    // kernel buffers for this client.
    let ping = frame(PING, &[0x55; 125]);
    let flood: Vec<u8> = ping.iter().copied().cycle().take(ping.len() * 40_000).collect();
    let mut writer = client.stream().try_clone().expect("clone the socket");
    let start = Instant::now();
    let sent = std::thread::spawn(move || writer.write_all(&flood));
    // The server stops reading at the limit and drops the connection a second later; a
    // server without the limit would answer every ping and keep the connection.
    client.expect_dropped_within(Duration::from_secs(10));
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(900), "dropped after {elapsed:?}, before the timeout");
    let _ = sent.join().expect("the writer thread");
}

#[test]
fn a_pending_pong_does_not_cost_a_message_larger_than_the_limit_its_echo() {
    // The default --max-backpressure (1 MiB), a 1.5 MiB message with a ping between its two
    // fragments, all in one write.
    let gale = Gale::echo(&[]);
    let mut client = Client::connect(gale.addr);
    let first: Vec<u8> = (0..(3u32 << 19)).map(|i| (i % 251) as u8).collect();
    let mut wire = fragment(BINARY, false, &first);
    wire.extend(frame(PING, b""));
    wire.extend(fragment(CONT, true, b"!"));
    client.send(&wire);
    client.expect_frame(PONG, b"");
    let mut whole = first;
    whole.push(b'!');
    client.expect_frame(BINARY, &whole);
    client.send(&close_frame(1000, b"done"));
    client.expect_close_reply(&close_payload(1000, b"done"));
}

#[test]
fn backpressure_flags_out_of_range_are_refused_by_name() {
    for (flag, value) in [("--backpressure-timeout", "0"), ("--max-backpressure", "10")] {
        let out = support::echo_command().args([flag, value]).output().expect("run gale echo");
        assert!(!out.status.success(), "{flag} {value} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(flag) && stderr.contains("invalid value"), "{flag} {value}: {stderr}");
    }
}
