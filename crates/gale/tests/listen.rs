//! `gale echo` on a port another `gale` already listens on: a one-line start-up error naming
//! the address and a non-zero exit, not a port silently shared with the other process.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::{Gale, gale_bin};

#[test]
fn a_port_held_by_another_gale_is_a_start_up_error() {
    let first = Gale::echo(&[]);
    let (host, port) = (first.addr.ip().to_string(), first.addr.port().to_string());
    let mut cmd = std::process::Command::new(gale_bin());
    cmd.args(["echo", "--host", &host, "--port", &port, "--threads", "2"]);
    if let Ok(backend) = std::env::var("GALE_BACKEND") {
        cmd.args(["--backend", &backend]);
    }
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start");
    // A second server that started would run until killed: bound the wait.
    let start = std::time::Instant::now();
    while child.try_wait().expect("poll the child").is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the second gale started on a port the first one listens on");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("collect the output");
    assert!(!output.status.success(), "exit status {:?}", output.status);
    assert!(output.stdout.is_empty(), "it printed {:?}", String::from_utf8_lossy(&output.stdout));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr:?}");
    assert!(lines[0].contains(&first.addr.to_string()), "{stderr:?}");
    assert!(lines[0].contains("already listening"), "{stderr:?}");
    drop(first);
}
