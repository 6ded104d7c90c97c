//! Starting and stopping the servers a comparison runs against.
//!
//! A server is given as `NAME=COMMAND`. `{port}` in the command is replaced by a free port;
//! the server's URL is taken from a `listening on ws://…` (or `tcp://…`) line it prints, or is
//! `ws://127.0.0.1:{port}/` when it prints none. The command runs under `sh -c "exec …"` so
//! that the PID we measure is the server's own. Its stderr goes to an unlinked temporary
//! file: nothing of it reaches our terminal, and when it exits at start its first line says why.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A server to compare.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    /// Short name for tables.
    pub name: String,
    /// Command line, with `{port}` where the port goes.
    pub command: String,
}

impl ServerSpec {
    /// Parse `NAME=COMMAND`.
    pub fn parse(s: &str) -> Result<ServerSpec, String> {
        match s.split_once('=') {
            Some((name, command)) if !name.trim().is_empty() && !command.trim().is_empty() => {
                Ok(ServerSpec { name: name.trim().to_string(), command: command.trim().to_string() })
            }
            _ => Err(format!("--server {s:?}: expected NAME=COMMAND, e.g. 'gale=gale echo --port {{port}}'")),
        }
    }
}

/// A running server, stopped on drop.
pub struct RunningServer {
    child: Child,
    /// Where to connect.
    pub url: String,
}

impl RunningServer {
    /// Start `spec` and wait until it accepts connections. The error says why it did not,
    /// without the server's name (the caller has it).
    pub fn start(spec: &ServerSpec, path: &str) -> Result<RunningServer, String> {
        Self::start_on(spec, free_port()?, path)
    }

    /// Start `spec` with `{port}` replaced by `port` (to start a server again on the port of
    /// one that was stopped), and wait until it accepts connections.
    pub fn start_on(spec: &ServerSpec, port: u16, path: &str) -> Result<RunningServer, String> {
        let command = spec.command.replace("{port}", &port.to_string());
        let (stderr, mut stderr_log) = unlinked_log()?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {command}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start `{}`: {e}", spec.command))?;
        let mut server = RunningServer { child, url: String::new() };
        let stdout = server.child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                for scheme in ["wss://", "ws://", "tcp://"] {
                    if let Some(rest) = line.split(scheme).nth(1) {
                        let addr =
                            rest.split(|c: char| c.is_whitespace() || c == '/').next().unwrap_or_default();
                        let _ = tx.send(format!("{scheme}{addr}"));
                    }
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = server.child.try_wait() {
                let first_line = {
                    let mut text = String::new();
                    let _ = stderr_log.read_to_string(&mut text);
                    text.lines().map(str::trim).find(|l| !l.is_empty()).map(str::to_string)
                };
                return Err(format!(
                    "`{}` exited at start: {}",
                    spec.command,
                    exit_reason(status, first_line)
                ));
            }
            if let Ok(url) = rx.try_recv() {
                server.url = if url.starts_with("ws://") { format!("{url}{path}") } else { url };
                return Ok(server);
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                // Give a server that prints its address a moment to do so.
                let printed = rx.recv_timeout(Duration::from_millis(200));
                if printed.is_err() && matches!(server.child.try_wait(), Ok(Some(_))) {
                    // What answered was not this server (say, the still-open listener of a
                    // killed one on the same port): this one exited; tell why above.
                    continue;
                }
                server.url = printed
                    .map(|u| if u.starts_with("ws://") { format!("{u}{path}") } else { u })
                    .unwrap_or_else(|_| format!("ws://127.0.0.1:{port}{path}"));
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("`{}` did not accept connections within 15 s", spec.command))
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the server has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Kill the server at once (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        // Signal only a child not yet reaped: its PID cannot name another process then. A
        // server that exited since is silently gone (no `kill` complaint on our stderr).
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.child.id().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        reap_within(&mut self.child, Duration::from_secs(5));
    }
}

/// Wait up to `within` for `child` to exit by itself, then kill it; either way it is reaped.
pub fn reap_within(child: &mut Child, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Why a server exited at start, in words: the shell's statuses for a command that is missing
/// or cannot run, else the first line the server wrote to stderr, with its exit status.
fn exit_reason(status: ExitStatus, first_stderr_line: Option<String>) -> String {
    let how = match (status.code(), status.signal()) {
        (Some(127), _) => return "command not found (exit status 127)".into(),
        (Some(126), _) => return "command cannot be run: not executable (exit status 126)".into(),
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "unknown status".into(),
    };
    match first_stderr_line {
        Some(line) => format!("{line} ({how})"),
        None => how,
    }
}

/// A temporary file for a server's stderr, already unlinked (it goes when both ends close):
/// the end to give the server, and ours to read from.
fn unlinked_log() -> Result<(File, File), String> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "gale-loadgen-{}-{}.stderr",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let cannot = |e: std::io::Error| format!("cannot create {}: {e}", path.display());
    let write = File::options().write(true).create_new(true).open(&path).map_err(cannot)?;
    let read = File::open(&path).map_err(cannot);
    let _ = std::fs::remove_file(&path);
    Ok((write, read?))
}

/// A port that was free a moment ago.
pub fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    l.local_addr().map(|a| a.port()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let s = ServerSpec::parse("gale=gale echo --port {port}").unwrap();
        assert_eq!((s.name.as_str(), s.command.as_str()), ("gale", "gale echo --port {port}"));
        assert!(ServerSpec::parse("nocommand").is_err());
        assert!(ServerSpec::parse("=x").is_err());
    }

    fn spec(command: &str) -> ServerSpec {
        ServerSpec { name: "x".into(), command: command.into() }
    }

    #[test]
    fn a_missing_command_is_named() {
        let e = RunningServer::start(&spec("/nonexistent/bin --port {port}"), "/").err().unwrap();
        assert_eq!(
            e,
            "`/nonexistent/bin --port {port}` exited at start: command not found (exit status 127)"
        );
    }

    #[test]
    fn a_server_that_exits_at_start_is_told_by_its_first_stderr_line() {
        let e = RunningServer::start(&spec("sh -c 'echo \"bad flag --x\" >&2; echo more >&2; exit 3'"), "/")
            .err()
            .unwrap();
        assert!(e.ends_with("exited at start: bad flag --x (exit status 3)"), "{e}");
    }
}
