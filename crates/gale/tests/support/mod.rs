//! Starting `gale` as a child process for integration tests.
//!
//! Each test starts its own server on a free port (`--port 0`), reads the address it printed,
//! and the server is stopped when the guard is dropped. Servers only listen on loopback.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running `gale` process, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Gale {
    pub child: Child,
    pub addr: SocketAddr,
    /// The line the server printed with its address.
    pub banner: String,
    stderr: Option<std::thread::JoinHandle<String>>,
}

/// `gale echo --port 0 --threads 2` on the backend under test (`GALE_BACKEND`: epoll, uring
/// or auto; auto when unset). The test command runs the suites once per backend.
pub fn echo_command() -> Command {
    echo_command_with_threads(2)
}

/// `gale echo --port 0 --threads N` on the backend under test.
pub fn echo_command_with_threads(threads: usize) -> Command {
    let mut cmd = Command::new(gale_bin());
    cmd.args(["echo", "--port", "0", "--threads", &threads.to_string()]);
    if let Ok(backend) = std::env::var("GALE_BACKEND") {
        cmd.args(["--backend", &backend]);
    }
    cmd
}

/// Path of the `gale` binary built for these tests.
pub fn gale_bin() -> &'static str {
    env!("CARGO_BIN_EXE_gale")
}

impl Gale {
    /// `gale echo --port 0` with extra arguments.
    pub fn echo(extra: &[&str]) -> Gale {
        let mut cmd = echo_command();
        cmd.args(extra);
        Gale::start(&mut cmd)
    }

    /// Start a prepared command that prints `... listening on ws://ADDR ...` on stdout.
    pub fn start(cmd: &mut Command) -> Gale {
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gale");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if let Some(rest) = line.split("://").nth(1) {
                    // `ws://ADDR` (gale echo) or `ws://ADDR/ws` (gale serve).
                    let url = rest.split_whitespace().next().unwrap_or_default();
                    let addr = url.split('/').next().unwrap_or_default().to_string();
                    let _ = tx.send((addr, line.clone()));
                }
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let (addr, banner) = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok((addr, line)) => (addr.parse().expect("address printed by gale"), line),
            Err(_) => {
                let _ = child.kill();
                panic!("gale did not print its address: {}", stderr.join().unwrap_or_default());
            }
        };
        Gale { child, addr, banner, stderr: Some(stderr) }
    }

    /// `ws://ADDR` + path.
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send SIGTERM and wait up to `timeout` for the process to exit; returns its status and
    /// how long it took.
    pub fn terminate(&mut self, timeout: Duration) -> Option<(std::process::ExitStatus, Duration)> {
        let start = Instant::now();
        signal(self.child.id(), "TERM");
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some((status, start.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Everything the process wrote to stderr (after it exited).
    pub fn stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr.take().map(|h| h.join().unwrap_or_default()).unwrap_or_default()
    }

    /// CPU time (user + system) the process has used, from /proc.
    pub fn cpu_time(&self) -> Duration {
        cpu_time_of(self.child.id())
    }
}

impl Drop for Gale {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            signal(self.child.id(), "TERM");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Send a signal by name to a process we started.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status();
}

/// User + system CPU time of a process, from `/proc/PID/stat`.
pub fn cpu_time_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    // The clock tick of /proc/PID/stat is 100 Hz on Linux.
    Duration::from_millis(ticks * 10)
}

/// Resident set size of a process, in bytes, from `/proc/PID/status`.
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
