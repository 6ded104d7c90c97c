//! One client connection: TCP connect (optionally from a chosen source address), the opening
//! handshake, and masked frames out / decoded frames in, on top of `gale-frame`.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use gale_frame::handshake::{ClientHandshake, ClientHandshakeError};
use gale_frame::{Decoder, DecoderConfig, FrameSpec, OpCode, write_header};
use socket2::{Domain, Protocol, Socket, Type};

use crate::deflate::{ClientDeflate, count_sent};
use crate::payload::Kind;
use fastrand::Rng;

/// Where a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// TCP connect in progress.
    Connecting,
    /// Upgrade request sent, waiting for the 101.
    Handshaking,
    /// Frames flow.
    Open,
}

/// Why a connection could not be opened or was lost.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Failure {
    /// The server refused the TCP connection.
    Refused,
    /// Connect or handshake took longer than the timeout.
    Timeout,
    /// The server answered the upgrade with this HTTP status.
    Status(u16),
    /// The connection was reset or closed before it opened.
    Reset,
    /// No local port left for this source address (spread over `--source-ips`).
    NoPorts,
    /// This process hit its open-files limit (use `--procs`).
    FdLimit,
    /// The handshake response was invalid.
    Handshake(String),
    /// The server broke the protocol or closed unexpectedly while open.
    Protocol(String),
    /// Anything else.
    Other(String),
}

impl Failure {
    /// A short label for reports.
    pub fn label(&self) -> String {
        match self {
            Failure::Refused => "refused".into(),
            Failure::Timeout => "timeout".into(),
            Failure::Status(s) => format!("http_{s}"),
            Failure::Reset => "reset".into(),
            Failure::NoPorts => "no_local_ports".into(),
            Failure::FdLimit => "fd_limit".into(),
            Failure::Handshake(_) => "bad_handshake".into(),
            Failure::Protocol(_) => "protocol".into(),
            Failure::Other(_) => "other".into(),
        }
    }

    /// In words, the cause a [`label`](Failure::label) names (reports count failures and
    /// lost connections by label; people read this).
    pub fn describe(label: &str) -> String {
        match label {
            "refused" => "connection refused".into(),
            "timeout" => "timed out".into(),
            "reset" => "connection reset".into(),
            "no_local_ports" => "no local port left for the source address (spread over --source-ips)".into(),
            "fd_limit" => "open-files limit reached (use --procs)".into(),
            "bad_handshake" => "bad handshake".into(),
            "protocol" => "closed by the server, or a protocol error".into(),
            "other" => "other error".into(),
            other => match other.strip_prefix("http_") {
                Some(status) => format!("HTTP {status} instead of 101"),
                None => other.into(),
            },
        }
    }

    /// Classify an I/O error.
    pub fn from_io(e: &io::Error) -> Failure {
        if e.kind() == io::ErrorKind::InvalidData {
            // TLS refused (certificate, protocol): a failed handshake.
            return Failure::Handshake(e.to_string());
        }
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) => Failure::Refused,
            Some(libc::ETIMEDOUT) => Failure::Timeout,
            Some(libc::ECONNRESET | libc::EPIPE) => Failure::Reset,
            Some(libc::EADDRNOTAVAIL | libc::EADDRINUSE) => Failure::NoPorts,
            Some(libc::EMFILE | libc::ENFILE) => Failure::FdLimit,
            _ => Failure::Other(e.to_string()),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Handshake(why) => write!(f, "bad handshake: {why}"),
            Failure::Protocol(why) | Failure::Other(why) => f.write_str(why),
            _ => f.write_str(&Failure::describe(&self.label())),
        }
    }
}

/// The sending half, which scenarios act on while a decoded frame borrows the receiving half.
pub struct Io {
    pub(crate) stream: mio::net::TcpStream,
    out: Vec<u8>,
    sent: usize,
    /// Whether frames are masked with fresh random keys (`false`: the all-zero key).
    random_masks: bool,
    /// Open, or closing: no more data frames.
    pub(crate) open: bool,
    /// permessage-deflate, when the server accepted it.
    pub(crate) deflate: Option<Box<ClientDeflate>>,
    /// TLS (`wss://`): `out` holds plaintext, sealed into records on flush.
    tls: Option<Box<rustls::ClientConnection>>,
}

impl Io {
    /// Queue a data message of `len` bytes whose payload `fill` writes, masked (and
    /// compressed when permessage-deflate was negotiated).
    #[inline]
    pub fn send(&mut self, rng: &mut Rng, kind: Kind, len: usize, fill: impl FnOnce(&mut [u8])) {
        let opcode = if kind == Kind::Text { OpCode::Text } else { OpCode::Binary };
        let Some(z) = self.deflate.as_mut() else {
            count_sent(len, len);
            self.frame(rng, opcode, len, fill);
            return;
        };
        z.plain.clear();
        z.plain.resize(len, 0);
        fill(&mut z.plain);
        z.compress();
        let packed = std::mem::take(&mut z.packed);
        count_sent(len, packed.len());
        self.frame_with(rng, opcode, true, packed.len(), |b| b.copy_from_slice(&packed));
        if let Some(z) = self.deflate.as_mut() {
            z.packed = packed;
        }
    }

    /// Queue a control or data frame.
    #[inline]
    pub fn frame(&mut self, rng: &mut Rng, opcode: OpCode, len: usize, fill: impl FnOnce(&mut [u8])) {
        self.frame_with(rng, opcode, false, len, fill);
    }

    /// Queue a frame, with RSV1 (compressed) if asked.
    #[inline]
    fn frame_with(
        &mut self,
        rng: &mut Rng,
        opcode: OpCode,
        compressed: bool,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) {
        let key = if self.random_masks { rng.u32(..).to_ne_bytes() } else { [0; 4] };
        let mut header = [0u8; gale_frame::MAX_HEADER_LEN];
        let spec = FrameSpec { compressed, ..FrameSpec::client(opcode, key) };
        let n = write_header(&mut header, spec, len);
        self.out.extend_from_slice(&header[..n]);
        let start = self.out.len();
        self.out.resize(start + len, 0);
        fill(&mut self.out[start..]);
        if self.random_masks {
            gale_frame::apply_mask(&mut self.out[start..], key, 0);
        }
    }

    /// Queue raw bytes (raw TCP mode).
    #[inline]
    pub fn send_raw(&mut self, len: usize, fill: impl FnOnce(&mut [u8])) {
        let start = self.out.len();
        self.out.resize(start + len, 0);
        fill(&mut self.out[start..]);
    }

    /// Queue a close frame; no data frames after it.
    pub fn close(&mut self, rng: &mut Rng) {
        if self.open {
            self.frame(rng, OpCode::Close, 2, |p| p.copy_from_slice(&1000u16.to_be_bytes()));
            self.open = false;
        }
    }

    /// Bytes queued and not yet written (over TLS, at least 1 while records wait).
    pub fn pending(&self) -> usize {
        self.out.len() - self.sent + self.tls.as_ref().map_or(0, |t| usize::from(t.wants_write()))
    }

    /// Write queued bytes until the kernel refuses.
    pub fn flush(&mut self) -> io::Result<()> {
        if let Some(tls) = self.tls.as_mut() {
            if self.sent < self.out.len() {
                // No buffer limit: rustls takes it all (before the handshake ends, to send
                // once it has).
                tls.writer().write_all(&self.out[self.sent..])?;
            }
            self.out.clear();
            self.sent = 0;
            while tls.wants_write() {
                match tls.write_tls(&mut self.stream) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            return Ok(());
        }
        while self.sent < self.out.len() {
            match self.stream.write(&self.out[self.sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        }
        Ok(())
    }
}

/// A client connection.
pub struct Conn {
    pub io: Io,
    pub state: State,
    handshake: ClientHandshake,
    /// Bytes of the handshake response received so far.
    head: Vec<u8>,
    pub decoder: Decoder,
    /// When the TCP connect started.
    pub started: Instant,
    raw: bool,
}

/// Options for opening connections.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Server address.
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Request target.
    pub path: String,
    /// Subprotocols to offer.
    pub protocols: Vec<String>,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// Raw TCP: no handshake, no framing.
    pub raw: bool,
    /// Mask frames with random keys (else the zero key).
    pub random_masks: bool,
    /// Largest message accepted from the server.
    pub max_message: u64,
    /// Check that text messages from the server are UTF-8. A scenario that compares every
    /// message byte for byte with the valid text it sent turns this off: the comparison
    /// already proves it.
    pub check_utf8: bool,
    /// Offer permessage-deflate.
    pub deflate: bool,
    /// TLS configuration and server name, for `wss://`.
    pub tls: Option<(std::sync::Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>)>,
}

/// Set `IP_BIND_ADDRESS_NO_PORT`: binding to a source address then leaves the port to be
/// chosen at connect time, unique per (source, destination) pair, instead of reserving one at
/// bind time from the address's single range (which also stalls once the range is crowded,
/// e.g. with sockets in TIME_WAIT from an earlier run).
fn bind_address_no_port(socket: &Socket) {
    let one: libc::c_int = 1;
    // SAFETY: the descriptor is a live socket owned by `socket`; the option value is a c_int
    // that lives for the call, and its size is passed with it.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

impl Conn {
    /// Start a non-blocking connect, from `source` if given.
    pub fn connect(opts: &ConnectOptions, source: Option<IpAddr>) -> Result<Conn, Failure> {
        let socket = Socket::new(Domain::for_address(opts.addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(|e| Failure::from_io(&e))?;
        socket.set_nonblocking(true).map_err(|e| Failure::from_io(&e))?;
        socket.set_tcp_nodelay(true).map_err(|e| Failure::from_io(&e))?;
        if let Some(ip) = source {
            bind_address_no_port(&socket);
            socket.bind(&SocketAddr::new(ip, 0).into()).map_err(|e| Failure::from_io(&e))?;
        }
        match socket.connect(&opts.addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(Failure::from_io(&e)),
        }
        let stream = mio::net::TcpStream::from_std(socket.into());
        let tls = match &opts.tls {
            Some((config, name)) => {
                let mut c = rustls::ClientConnection::new(config.clone(), name.clone())
                    .map_err(|e| Failure::Handshake(format!("TLS: {e}")))?;
                c.set_buffer_limit(None);
                Some(Box::new(c))
            }
            None => None,
        };
        Ok(Conn {
            io: Io {
                stream,
                out: Vec::new(),
                sent: 0,
                random_masks: opts.random_masks,
                open: false,
                deflate: None,
                tls,
            },
            state: State::Connecting,
            handshake: ClientHandshake::new(),
            head: Vec::new(),
            decoder: Decoder::new(DecoderConfig {
                check_utf8: opts.check_utf8,
                ..DecoderConfig::client(opts.max_message)
            }),
            started: Instant::now(),
            raw: opts.raw,
        })
    }

    /// The TCP connect finished (the socket became writable): check it and send the upgrade.
    /// Returns `true` when the connection is already open (raw TCP mode).
    pub fn on_connected(&mut self, opts: &ConnectOptions) -> Result<bool, Failure> {
        if let Ok(Some(e)) | Err(e) = self.io.stream.take_error() {
            return Err(Failure::from_io(&e));
        }
        if let Err(e) = self.io.stream.peer_addr() {
            return Err(if e.kind() == io::ErrorKind::NotConnected {
                Failure::Reset
            } else {
                Failure::from_io(&e)
            });
        }
        if self.raw {
            self.state = State::Open;
            self.io.open = true;
            return Ok(true);
        }
        let protocols: Vec<&str> = opts.protocols.iter().map(String::as_str).collect();
        let mut headers: Vec<(&str, &str)> =
            opts.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        if opts.deflate {
            headers.push(("Sec-WebSocket-Extensions", crate::deflate::OFFER));
        }
        self.handshake.write_request(&mut self.io.out, &opts.host, &opts.path, &protocols, &headers);
        self.state = State::Handshaking;
        self.io.flush().map_err(|e| Failure::from_io(&e))?;
        Ok(false)
    }

    /// Handshake bytes arrived. Once the connection is open, returns the offset in `data`
    /// where frames begin; `None` while the head is incomplete.
    pub fn on_handshake_bytes(
        &mut self,
        data: &[u8],
        opts: &ConnectOptions,
    ) -> Result<Option<usize>, Failure> {
        let offered: Vec<&str> = opts.protocols.iter().map(String::as_str).collect();
        let (buf, already): (&[u8], usize) = if self.head.is_empty() {
            (data, 0)
        } else {
            let already = self.head.len();
            self.head.extend_from_slice(data);
            (&self.head, already)
        };
        match self.handshake.parse_response(buf, &offered) {
            Ok(Some((response, head_len))) => {
                self.state = State::Open;
                self.io.open = true;
                if opts.deflate
                    && let Some(z) = response.extensions.as_deref().and_then(ClientDeflate::from_response)
                {
                    self.io.deflate = Some(Box::new(z));
                    let cfg = *self.decoder.config();
                    self.decoder.set_config(gale_frame::DecoderConfig { allow_rsv1: true, ..cfg });
                }
                self.head = Vec::new();
                Ok(Some((head_len - already).min(data.len())))
            }
            Ok(None) => {
                if self.head.is_empty() {
                    self.head.extend_from_slice(data);
                }
                Ok(None)
            }
            Err(ClientHandshakeError::Status(s)) => Err(Failure::Status(s)),
            Err(e) => Err(Failure::Handshake(e.to_string())),
        }
    }

    /// Read into `buf`; `Ok(0)` is EOF. Over TLS, `buf` gets plaintext, and `WouldBlock`
    /// means the socket is drained.
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.io.tls.is_none() {
            return self.io.stream.read(buf);
        }
        loop {
            let tls = self.io.tls.as_mut().expect("checked above");
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // TCP closed without close_notify: an EOF, reported as over ws://.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if tls.read_tls(&mut self.io.stream)? == 0 {
                return Ok(0);
            }
            if let Err(e) = tls.process_new_packets() {
                // Send the alert, then give up on the connection.
                let _ = tls.write_tls(&mut self.io.stream);
                return Err(io::Error::new(io::ErrorKind::InvalidData, crate::tls::describe(&e)));
            }
            if tls.wants_write() {
                // Handshake records to answer with.
                self.io.flush()?;
            }
        }
    }

    /// Whether a short read may leave bytes behind (TLS buffers records: read until
    /// `WouldBlock`).
    pub fn reads_until_would_block(&self) -> bool {
        self.io.tls.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_read_as_words() {
        let cases = [
            (Failure::Refused, "connection refused"),
            (Failure::Timeout, "timed out"),
            (Failure::Status(404), "HTTP 404 instead of 101"),
            (Failure::Reset, "connection reset"),
            (Failure::FdLimit, "open-files limit reached (use --procs)"),
            (Failure::Handshake("no Upgrade header".into()), "bad handshake: no Upgrade header"),
            (
                Failure::Protocol("server closed with 1001 going away".into()),
                "server closed with 1001 going away",
            ),
            (Failure::from_io(&io::Error::from_raw_os_error(libc::ECONNREFUSED)), "connection refused"),
        ];
        for (failure, words) in cases {
            assert_eq!(failure.to_string(), words, "{failure:?}");
        }
    }

    #[test]
    fn every_label_has_words() {
        let failures = [
            Failure::Refused,
            Failure::Timeout,
            Failure::Status(503),
            Failure::Reset,
            Failure::NoPorts,
            Failure::FdLimit,
            Failure::Handshake(String::new()),
            Failure::Protocol(String::new()),
            Failure::Other(String::new()),
        ];
        for f in failures {
            let label = f.label();
            let words = Failure::describe(&label);
            assert_ne!(words, label, "{label} has no words");
            assert!(!words.contains('_'), "{label}: {words}");
        }
    }
}
