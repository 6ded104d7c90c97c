//! Choosing the backend: `--backend auto` runs io_uring when the kernel allows it and falls back
//! to epoll with a log line saying why; `--backend uring` where io_uring is unavailable is a
//! clear error. "Unavailable" is made real by a seccomp filter that refuses `io_uring_setup`
//! in the server process, as container runtimes do.

mod support;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{Gale, gale_bin};

/// A seccomp filter: `io_uring_setup` fails with EPERM, everything else is allowed.
fn deny_io_uring(cmd: &mut Command) {
    // SAFETY: prctl and seccomp are async-signal-safe system calls; the filter program lives on
    // the child's stack for the duration of the call, which copies it into the kernel.
    unsafe {
        cmd.pre_exec(|| {
            let filter = [
                // Load the system call number.
                libc::sock_filter {
                    code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
                    jt: 0,
                    jf: 0,
                    k: 0,
                },
                libc::sock_filter {
                    code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 1,
                    k: libc::SYS_io_uring_setup as u32,
                },
                libc::sock_filter {
                    code: (libc::BPF_RET | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 0,
                    k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
                },
                libc::sock_filter {
                    code: (libc::BPF_RET | libc::BPF_K) as u16,
                    jt: 0,
                    jf: 0,
                    k: libc::SECCOMP_RET_ALLOW,
                },
            ];
            let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog as *const _) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn echo(backend: &str) -> Command {
    let mut cmd = Command::new(gale_bin());
    cmd.args(["echo", "--port", "0", "--threads", "1", "--backend", backend]);
    cmd
}

#[test]
fn forced_uring_where_it_is_refused_is_a_clear_error() {
    let mut cmd = echo("uring");
    deny_io_uring(&mut cmd);
    let out = cmd.stdin(Stdio::null()).output().expect("run gale");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("io_uring is unavailable") && err.contains("not permitted"), "{err}");
}

#[test]
fn auto_falls_back_to_epoll_and_says_why() {
    let mut cmd = echo("auto");
    deny_io_uring(&mut cmd);
    cmd.env("RUST_LOG", "info");
    let mut gale = Gale::start(&mut cmd);
    let mut ws = tokio_tungstenite::tungstenite::connect(gale.url("/")).expect("connect").0;
    ws.send("still echoing".into()).unwrap();
    assert_eq!(ws.read().unwrap().into_text().unwrap().as_str(), "still echoing");
    drop(ws);
    assert!(gale.terminate(Duration::from_secs(10)).is_some());
    let log = gale.stderr();
    assert!(log.contains("io_uring unavailable") && log.contains("using epoll"), "{log}");
}

#[test]
fn auto_uses_io_uring_where_the_kernel_allows_it() {
    // The machines this project runs on have io_uring; say so plainly if one does not.
    let mut gale = Gale::start(&mut echo("auto"));
    let line = gale.banner.clone();
    assert!(line.contains("io_uring backend"), "auto chose: {line}");
    gale.terminate(Duration::from_secs(10));
}
