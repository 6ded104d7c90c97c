//! The server to load: parsed from a `ws://` or `tcp://` URL.

use std::net::{SocketAddr, ToSocketAddrs};

/// How to talk to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// WebSocket over TCP.
    Ws,
    /// WebSocket over TLS.
    Wss,
    /// Raw TCP: no handshake, no framing; the server echoes bytes (the kernel's ceiling).
    Tcp,
}

/// A parsed URL.
#[derive(Clone, Debug)]
pub struct Target {
    /// `ws` or `tcp`.
    pub scheme: Scheme,
    /// `host:port` as written, for the `Host` header.
    pub authority: String,
    /// The host alone (the TLS server name).
    pub host: String,
    /// Resolved address.
    pub addr: SocketAddr,
    /// Path and query, at least `/`.
    pub path: String,
}

impl Target {
    /// Parse `ws://host:port/path` or `tcp://host:port`.
    pub fn parse(url: &str) -> Result<Target, String> {
        let (scheme, rest) = if let Some(r) = url.strip_prefix("ws://") {
            (Scheme::Ws, r)
        } else if let Some(r) = url.strip_prefix("wss://") {
            (Scheme::Wss, r)
        } else if let Some(r) = url.strip_prefix("tcp://") {
            (Scheme::Tcp, r)
        } else {
            return Err(format!(
                "{url}: the URL must start with ws:// or wss:// (or tcp:// for a raw TCP echo)"
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(format!("{url}: no host"));
        }
        let (host, port) = split_port(authority);
        let default_port = if scheme == Scheme::Wss { 443 } else { 80 };
        let with_port = format!("{host}:{}", port.unwrap_or(default_port));
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{url}: cannot resolve {authority}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url}: {authority} resolves to no address"))?;
        Ok(Target {
            scheme,
            authority: authority.to_string(),
            host: host.to_string(),
            addr,
            path: path.to_string(),
        })
    }
}

/// `host[:port]` split into the host and the port, if one is given (`[::1]:9001` and a bare
/// `::1` included).
pub fn split_port(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') => match port.parse() {
            Ok(p) => (host, Some(p)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = Target::parse("ws://127.0.0.1:9001/chat?x=1").unwrap();
        assert_eq!((t.scheme, t.addr.port(), t.path.as_str()), (Scheme::Ws, 9001, "/chat?x=1"));
        let t = Target::parse("tcp://127.0.0.1:7").unwrap();
        assert_eq!((t.scheme, t.path.as_str()), (Scheme::Tcp, "/"));
        assert!(Target::parse("http://x").unwrap_err().contains("ws://"));
        let t = Target::parse("wss://localhost:9443/x").unwrap();
        assert_eq!((t.scheme, t.host.as_str(), t.addr.port()), (Scheme::Wss, "localhost", 9443));
        assert_eq!(Target::parse("wss://127.0.0.1").unwrap().addr.port(), 443);
        assert!(Target::parse("ws://").is_err());
    }
}
