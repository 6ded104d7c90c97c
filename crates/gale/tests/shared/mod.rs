//! One `gale echo` shared by every test of a test binary, for tests that only need the default
//! server and do not stop it.
//!
//! The server lives until the test binary exits: its guard is held by a thread that never
//! returns, and the kernel sends the server SIGTERM when that thread goes away with the process
//! (statics are never dropped, so a guard in a static would leak the process).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::{OnceLock, mpsc};
use std::time::Duration;

use crate::support::{Gale, echo_command};

/// Address of the shared `gale echo --threads 2`, started on first use.
pub fn echo_addr() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| start_shared(&[]))
}

/// Start a `gale echo` with `extra` arguments that lives until the test binary exits; callers
/// keep its address in a `OnceLock` to share it.
pub fn start_shared(extra: &'static [&'static str]) -> SocketAddr {
    start_shared_command(move || {
        let mut cmd = echo_command();
        cmd.args(extra);
        cmd
    })
}

/// Start the `gale` command that `make` prepares (it must print its address, as `gale echo`
/// and `gale serve` do) so that it lives until the test binary exits.
pub fn start_shared_command(make: impl FnOnce() -> Command + Send + 'static) -> SocketAddr {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("shared-gale".into())
        .spawn(move || {
            let mut cmd = make();
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    // PR_SET_PDEATHSIG fires when the thread that forked the child exits: this
                    // thread parks forever, so that happens only when the test binary exits.
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
            let gale = Gale::start(&mut cmd);
            let _ = tx.send(gale.addr);
            loop {
                std::thread::park();
            }
        })
        .expect("spawn the thread that owns the shared server");
    rx.recv_timeout(Duration::from_secs(30)).expect("the shared gale did not start")
}
