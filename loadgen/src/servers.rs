//! Starting and stopping the servers a comparison runs against.
//!
//! A server is given as `NAME=COMMAND`. `{port}` in the command is replaced by a free port;
//! the server's URL is taken from a `listening on ws://…` (or `tcp://…`) line it prints, or is
//! `ws://127.0.0.1:{port}/` when it prints none. The command runs under `sh -c "exec …"` so
//! that the PID we measure is the server's own.

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
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
    /// Start `spec` and wait until it accepts connections.
    pub fn start(spec: &ServerSpec, path: &str) -> Result<RunningServer, String> {
        let port = free_port()?;
        let command = spec.command.replace("{port}", &port.to_string());
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {command}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: cannot start `{command}`: {e}", spec.name))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
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
        let mut server = RunningServer { child, url: String::new() };
        while Instant::now() < deadline {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!("{}: `{command}` exited at start ({status})", spec.name));
            }
            if let Ok(url) = rx.try_recv() {
                server.url = if url.starts_with("ws://") { format!("{url}{path}") } else { url };
                return Ok(server);
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                // Give a server that prints its address a moment to do so.
                server.url = rx
                    .recv_timeout(Duration::from_millis(200))
                    .map(|u| if u.starts_with("ws://") { format!("{u}{path}") } else { u })
                    .unwrap_or_else(|_| format!("ws://127.0.0.1:{port}{path}"));
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("{}: `{command}` did not accept connections within 15 s", spec.name))
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago.
fn free_port() -> Result<u16, String> {
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
}
