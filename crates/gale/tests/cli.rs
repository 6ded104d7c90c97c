//! The `gale` command line as an operator meets it: logs fit for files and shippers, the same
//! listen and thread flags on both commands, a broker that cannot be reached said out loud,
//! and configuration mistakes told in one line.

mod support;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::{Gale, echo_command, gale_bin};

/// `gale COMMAND` on the backend under test (`GALE_BACKEND`), with `args`.
fn gale(command: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(gale_bin());
    cmd.arg(command).args(args);
    if let Ok(backend) = std::env::var("GALE_BACKEND") {
        cmd.args(["--backend", &backend]);
    }
    cmd
}

/// `gale serve` on a free loopback port, on the backend under test.
fn serve_command() -> Command {
    gale("serve", &["--port", "0", "--threads", "2"])
}

/// Run a command that is expected to exit by itself (a usage or configuration error), within
/// a bounded time.
fn run_to_exit(cmd: &mut Command) -> Output {
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start gale");
    let start = Instant::now();
    while child.try_wait().expect("poll gale").is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("gale kept running: {cmd:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("collect the output")
}

/// Start a server with `RUST_LOG=info`, stop it with SIGTERM, and return what it logged.
fn logs_of(cmd: &mut Command) -> String {
    let mut gale = Gale::start(cmd.env("RUST_LOG", "info"));
    gale.terminate(Duration::from_secs(10)).expect("gale stops on SIGTERM");
    gale.stderr()
}

#[test]
fn text_logs_carry_no_colour_codes_when_stderr_is_not_a_terminal() {
    let logs = logs_of(&mut echo_command());
    // The shutdown line is always logged at info: without it this test would prove nothing.
    assert!(logs.contains("shutting down"), "{logs:?}");
    assert!(!logs.contains("\x1b["), "colour codes in piped logs: {logs:?}");
}

#[test]
fn json_logs_are_one_object_per_line_with_level_and_message_on_both_commands() {
    for (what, mut cmd) in [("echo", echo_command()), ("serve", serve_command())] {
        let logs = logs_of(cmd.args(["--log-format", "json"]));
        assert!(logs.lines().count() >= 1, "{what}: no logs: {logs:?}");
        for line in logs.lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {line:?}"));
            assert!(v["level"].is_string(), "{what}: no level: {line}");
            assert!(v["message"].is_string(), "{what}: no message: {line}");
        }
        assert!(logs.contains("shutting down"), "{what}: {logs:?}");
    }
    // Given before the command as well.
    let mut cmd = Command::new(gale_bin());
    cmd.args(["--log-format", "json"]).args(echo_command().get_args());
    let logs = logs_of(&mut cmd);
    for line in logs.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
    }
}

#[test]
fn both_commands_take_listen_or_host_and_port() {
    // `gale echo --listen`.
    let echo = Gale::start(&mut gale("echo", &["--listen", "127.0.0.1:0", "--threads", "2"]));
    assert_eq!(echo.addr.ip().to_string(), "127.0.0.1");
    assert_ne!(echo.addr.port(), 0);
    // `gale serve --port` alone keeps the default host.
    let serve = Gale::start(&mut serve_command());
    assert_eq!(serve.addr.ip().to_string(), "127.0.0.1");
    // `gale serve --host --port`, and `gale serve --listen`.
    let serve = Gale::start(&mut gale("serve", &["--host", "127.0.0.1", "--port", "0"]));
    assert_eq!(serve.addr.ip().to_string(), "127.0.0.1");
    let serve = Gale::start(&mut gale("serve", &["--listen", "127.0.0.1:0"]));
    assert_eq!(serve.addr.ip().to_string(), "127.0.0.1");
    // --listen with --host or --port is a usage error that names both flags.
    for (command, extra) in [
        ("echo", ["--port", "9001"]),
        ("echo", ["--host", "127.0.0.1"]),
        ("serve", ["--port", "9001"]),
        ("serve", ["--host", "127.0.0.1"]),
    ] {
        let out = run_to_exit(&mut gale(command, &["--listen", "127.0.0.1:0", extra[0], extra[1]]));
        assert_eq!(out.status.code(), Some(2), "{command} {extra:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let first = stderr.lines().next().unwrap_or_default();
        assert!(first.contains("--listen") && first.contains(extra[0]), "{command} {extra:?}: {stderr}");
        assert!(first.contains("cannot be used with"), "{command} {extra:?}: {stderr}");
    }
}

/// The thread count in a start-up line: `(1 thread, ` or `(4 threads, `.
fn threads_in(banner: &str) -> (usize, &str) {
    let inside = banner.split_once('(').expect("a '(' in the banner").1;
    let (n, rest) = inside.split_once(' ').expect("a count");
    let word = rest.split([',', ' ']).next().unwrap_or_default();
    (n.parse().unwrap_or_else(|_| panic!("no count in {banner:?}")), word)
}

#[test]
fn threads_zero_is_one_per_core_and_the_count_is_spelled_right() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_core = if cores == 1 { "thread" } else { "threads" };
    for command in ["echo", "serve"] {
        for (threads, expected) in [("0", (cores, per_core)), ("1", (1, "thread")), ("2", (2, "threads"))] {
            let server = Gale::start(&mut gale(command, &["--port", "0", "--threads", threads]));
            assert_eq!(
                threads_in(&server.banner),
                expected,
                "{command} --threads {threads}: {}",
                server.banner
            );
        }
    }
}

#[test]
fn help_says_that_gale_alone_runs_serve() {
    let out = run_to_exit(Command::new(gale_bin()).arg("--help"));
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("Without a command, `gale` runs `gale serve`"), "{help}");
    assert!(help.contains("--log-format"), "{help}");
}

#[test]
fn a_bad_configuration_is_one_line_naming_the_key_and_a_failed_start() {
    let dir = std::env::temp_dir().join(format!("gale-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[server]\nthreads = 2\n\n[websocket]\nmax_payload = \"64k\"\n").unwrap();
    let out = run_to_exit(serve_command().arg("--config").arg(&file));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "{:?}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line expected: {stderr:?}");
    let expected = format!(
        "gale: {}: websocket.max_payload: expected a whole number of bytes, got \"64k\"",
        file.display()
    );
    assert!(stderr.starts_with(&expected), "{stderr:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_printed_configuration_and_sizes_with_units_start_the_gateway() {
    let dir = std::env::temp_dir().join(format!("gale-cli-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let printed = run_to_exit(Command::new(gale_bin()).args(["serve", "--print-config"]));
    assert!(printed.status.success());
    let default = dir.join("default.toml");
    std::fs::write(&default, &printed.stdout).unwrap();
    drop(Gale::start(serve_command().arg("--config").arg(&default)));
    let units = dir.join("units.toml");
    std::fs::write(
        &units,
        "[server]\npartial_message_budget = \"16MiB\"\n[websocket]\nmax_payload = \"64KiB\"\n\
         max_backpressure = \"4MB\"\n[history]\ntopic_bytes = \"1MiB\"\ntotal_bytes = \"1GiB\"\n",
    )
    .unwrap();
    drop(Gale::start(serve_command().arg("--config").arg(&units)));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn echo_byte_flags_take_units_and_refuse_ambiguous_ones() {
    drop(Gale::echo(&[
        "--max-payload",
        "64KiB",
        "--partial-message-budget",
        "16MiB",
        "--compress-min-size",
        "1KB",
    ]));
    let out = run_to_exit(echo_command().args(["--max-payload", "64k"]));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr.lines().next().unwrap_or_default();
    assert!(first.contains("--max-payload"), "{stderr}");
    assert!(first.contains("expected a whole number of bytes, got \"64k\""), "{stderr}");
}

/// A running `gale` whose stderr is read line by line as it comes.
struct Watched {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Watched {
    fn start(cmd: &mut Command) -> Watched {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start gale");
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Watched { child, lines, seen: Vec::new() }
    }

    /// Wait up to `timeout` for a line holding `text`.
    fn wait_for(&mut self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no line with {text:?} within {timeout:?}; logged: {:#?}", self.seen);
    }

    /// Lines logged so far and within `settle` from now.
    fn drain(&mut self, settle: Duration) -> &[String] {
        while let Ok(line) = self.lines.recv_timeout(settle) {
            self.seen.push(line);
        }
        &self.seen
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on (for now).
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `redis-server` we started, killed on drop.
struct Redis(Child);

impl Redis {
    fn start(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is needed for this test (scripts/install-test-deps installs it)");
        Redis(child)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_unreachable_broker_is_warned_about_once_and_its_return_is_logged() {
    let port = closed_port();
    let mut cmd = serve_command();
    cmd.args(["--broker", &format!("redis://127.0.0.1:{port}")]).env("RUST_LOG", "info");
    let mut gale = Watched::start(&mut cmd);
    let warning = gale.wait_for("cannot reach Redis", Duration::from_secs(5));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains(&format!("127.0.0.1:{port}")), "the warning names the address: {warning}");
    // Retries every 100 ms to 2 s meanwhile: still one warning after several of them.
    let seen = gale.drain(Duration::from_millis(2500));
    let warnings = seen.iter().filter(|l| l.contains("cannot reach Redis")).count();
    assert_eq!(warnings, 1, "{seen:#?}");

    let _redis = Redis::start(port);
    let connected = gale.wait_for("connected to Redis", Duration::from_secs(10));
    assert!(connected.contains("INFO"), "{connected}");
    assert!(!gale.seen.iter().any(|l| l.contains('\x1b')), "{:#?}", gale.seen);
}
