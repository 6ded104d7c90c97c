//! A raw RFC 6455 client for conformance tests, independent of Gale's own codec.
//!
//! It speaks to the server over a plain `TcpStream`: the opening handshake is written by hand,
//! client frames are encoded (and masked) here, and server frames are parsed by a small parser
//! of its own that also checks what RFC 6455 requires of a server's frames (unmasked, minimal
//! length encoding). Every read has a timeout, so a server that stays silent fails the test
//! instead of hanging it. Malformed frames are built byte by byte in the tests themselves.

#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Continuation frame.
pub const CONT: u8 = 0x0;
/// Text frame.
pub const TEXT: u8 = 0x1;
/// Binary frame.
pub const BINARY: u8 = 0x2;
/// Close frame.
pub const CLOSE: u8 = 0x8;
/// Ping frame.
pub const PING: u8 = 0x9;
/// Pong frame.
pub const PONG: u8 = 0xA;
/// The FIN bit of the first header byte.
pub const FIN: u8 = 0x80;
/// The MASK bit of the second header byte.
pub const MASK_BIT: u8 = 0x80;

/// The `Sec-WebSocket-Key` of RFC 6455 section 1.3.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// The `Sec-WebSocket-Accept` that [`KEY`] must produce (RFC 6455 section 1.3).
pub const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// How long any single read may wait. Generous: the machine may be busy compiling.
pub const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// The upgrade request for `path`, with the RFC's sample key.
pub fn upgrade_request(addr: SocketAddr, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A fresh masking key for each frame, so that unmasking is exercised with varied keys
/// (including key bytes that differ at each phase of the mask).
pub fn next_key() -> [u8; 4] {
    static COUNTER: AtomicU32 = AtomicU32::new(1);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    (n.wrapping_mul(0x9E37_79B9) | 0x0101_0101).to_be_bytes()
}

/// XOR `payload` with `key` (masking and unmasking are the same operation).
pub fn apply_mask(payload: &mut [u8], key: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// A masked frame whose first header byte is `b0` (FIN, RSV bits, opcode as given), with the
/// minimal length encoding.
pub fn raw_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = Vec::with_capacity(len + 14);
    out.push(b0);
    if len < 126 {
        out.push(MASK_BIT | len as u8);
    } else if len <= 0xFFFF {
        out.push(MASK_BIT | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(MASK_BIT | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let key = next_key();
    out.extend_from_slice(&key);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], key);
    out
}

/// A whole message (or control frame) in one frame: FIN set.
pub fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    raw_frame(FIN | opcode, payload)
}

/// One fragment of a message.
pub fn fragment(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    raw_frame(if fin { FIN | opcode } else { opcode }, payload)
}

/// A message cut into frames of at most `size` payload bytes (a single frame if it fits).
pub fn fragmented(opcode: u8, payload: &[u8], size: usize) -> Vec<u8> {
    let pieces: Vec<&[u8]> = if payload.is_empty() { vec![payload] } else { payload.chunks(size).collect() };
    let last = pieces.len() - 1;
    let mut out = Vec::with_capacity(payload.len() + 14 * pieces.len());
    for (i, piece) in pieces.iter().enumerate() {
        let opcode = if i == 0 { opcode } else { CONT };
        out.extend_from_slice(&fragment(opcode, i == last, piece));
    }
    out
}

/// The payload of a close frame: the status code, then the reason (which may be invalid
/// UTF-8 on purpose).
pub fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    [&code.to_be_bytes()[..], reason].concat()
}

/// A close frame with a status code and a reason.
pub fn close_frame(code: u16, reason: &[u8]) -> Vec<u8> {
    frame(CLOSE, &close_payload(code, reason))
}

/// Only the header of a masked frame announcing `len` bytes in the 64-bit length field (any
/// value, even one RFC 6455 forbids), without its payload.
pub fn header_64(b0: u8, len: u64) -> Vec<u8> {
    let mut header = vec![b0, MASK_BIT | 127];
    header.extend_from_slice(&len.to_be_bytes());
    header.extend_from_slice(&next_key());
    header
}

/// Concatenate frames into one buffer, to be sent in a single write.
pub fn concat(frames: &[Vec<u8>]) -> Vec<u8> {
    frames.concat()
}

/// A frame the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    /// RSV1-3 as they sit in the first byte.
    pub rsv: u8,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The status code of a close frame, `None` when it has no payload.
    pub fn close_code(&self) -> Option<u16> {
        (self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    /// One line for failure messages (long payloads cut short).
    pub fn describe(&self) -> String {
        let shown = &self.payload[..self.payload.len().min(32)];
        format!(
            "opcode {:#x} fin {} rsv {:#x} len {} payload {:02x?}{}",
            self.opcode,
            self.fin,
            self.rsv,
            self.payload.len(),
            shown,
            if self.payload.len() > 32 { "..." } else { "" }
        )
    }
}

/// How the client reads: all at once, or in small reads with pauses (a slow consumer).
#[derive(Clone, Copy, Debug)]
struct Pace {
    chunk: usize,
    pause: Duration,
}

/// One raw WebSocket connection to the server.
pub struct Client {
    stream: TcpStream,
    /// Bytes read but not yet parsed.
    inbuf: Vec<u8>,
    pace: Option<Pace>,
    /// The server's handshake response head.
    pub response: String,
}

impl Client {
    /// Connect and complete the opening handshake in one write.
    pub fn connect(addr: SocketAddr) -> Client {
        let request = upgrade_request(addr, "/protocol");
        Client::handshake(addr, &[request.as_bytes()], Duration::ZERO)
    }

    /// Connect and send the bytes of `parts` in separate writes, `pause` apart; the parts must
    /// hold an upgrade request (and possibly frames after it). Checks the 101 response.
    pub fn handshake(addr: SocketAddr, parts: &[&[u8]], pause: Duration) -> Client {
        let mut client = Client::tcp(addr);
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                std::thread::sleep(pause);
            }
            client.send(part);
        }
        client.read_response();
        client.check_upgraded();
        client
    }

    /// The TCP connection (to set socket options, or write from another thread).
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// A TCP connection, with no handshake yet.
    pub fn tcp(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect_timeout(&addr, READ_TIMEOUT).expect("connect to gale");
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(READ_TIMEOUT)).unwrap();
        // Every write goes out at once, so that chopped sends reach the server as chopped.
        stream.set_nodelay(true).unwrap();
        Client { stream, inbuf: Vec::new(), pace: None, response: String::new() }
    }

    /// Read the response head (up to the blank line); bytes after it stay buffered as frames.
    pub fn read_response(&mut self) {
        let end = loop {
            if let Some(i) = self.inbuf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let have = self.inbuf.len();
            if let Err(e) = self.fill(have + 1) {
                panic!(
                    "no complete handshake response ({e}); got {:?}",
                    String::from_utf8_lossy(&self.inbuf)
                );
            }
        };
        self.response = String::from_utf8(self.inbuf[..end].to_vec()).expect("response head is text");
        self.inbuf.drain(..end);
    }

    /// Check that the response is a 101 with the headers RFC 6455 section 4.2.2 requires.
    fn check_upgraded(&self) {
        let mut lines = self.response.split("\r\n");
        let status = lines.next().unwrap_or_default();
        assert!(status.starts_with("HTTP/1.1 101"), "expected 101, got {:?}", self.response);
        let header = |name: &str| {
            self.response
                .split("\r\n")
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
        };
        assert_eq!(
            header("Sec-WebSocket-Accept").as_deref(),
            Some(ACCEPT),
            "accept key in {:?}",
            self.response
        );
        assert!(header("Upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")), "Upgrade header");
        assert!(
            header("Connection").is_some_and(|v| v.to_ascii_lowercase().contains("upgrade")),
            "Connection header"
        );
    }

    /// Write bytes in one go.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to gale");
    }

    /// Write bytes in pieces of `chunk` bytes, `pause` apart, so that the server sees them in
    /// separate reads.
    pub fn send_chopped(&mut self, bytes: &[u8], chunk: usize, pause: Duration) {
        for piece in bytes.chunks(chunk) {
            self.send(piece);
            std::thread::sleep(pause);
        }
    }

    /// From now on, read at most `chunk` bytes at a time and sleep `pause` after each read.
    pub fn read_slowly(&mut self, chunk: usize, pause: Duration) {
        self.pace = Some(Pace { chunk, pause });
    }

    /// Read until `inbuf` holds at least `n` bytes.
    fn fill(&mut self, n: usize) -> io::Result<()> {
        while self.inbuf.len() < n {
            let want = match self.pace {
                Some(p) => p.chunk,
                None => (n - self.inbuf.len()).clamp(4096, 1 << 20),
            };
            let old = self.inbuf.len();
            self.inbuf.resize(old + want, 0);
            let result = self.stream.read(&mut self.inbuf[old..]);
            self.inbuf.truncate(old + *result.as_ref().unwrap_or(&0));
            match result {
                Ok(0) => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection"));
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            if let Some(p) = self.pace {
                std::thread::sleep(p.pause);
            }
        }
        Ok(())
    }

    /// Parse the next server frame, checking the rules for frames a server sends.
    pub fn try_read_frame(&mut self) -> io::Result<Frame> {
        self.fill(2)?;
        let (b0, b1) = (self.inbuf[0], self.inbuf[1]);
        assert_eq!(b1 & MASK_BIT, 0, "a server must not mask its frames (RFC 6455 5.1)");
        let (len, header_len) = match b1 & 0x7F {
            126 => {
                self.fill(4)?;
                let len = u16::from_be_bytes([self.inbuf[2], self.inbuf[3]]) as u64;
                assert!(len >= 126, "server used a non-minimal 16-bit length ({len})");
                (len, 4)
            }
            127 => {
                self.fill(10)?;
                let len = u64::from_be_bytes(self.inbuf[2..10].try_into().unwrap());
                assert!(len >> 63 == 0, "server set the top bit of a 64-bit length");
                assert!(len > 0xFFFF, "server used a non-minimal 64-bit length ({len})");
                (len, 10)
            }
            n => (n as u64, 2),
        };
        let total = header_len + len as usize;
        self.fill(total)?;
        let rest = self.inbuf.split_off(total);
        let mut payload = std::mem::replace(&mut self.inbuf, rest);
        payload.drain(..header_len);
        Ok(Frame { fin: b0 & FIN != 0, rsv: b0 & 0x70, opcode: b0 & 0x0F, payload })
    }

    /// The next server frame; fails the test on timeout or EOF.
    pub fn read_frame(&mut self) -> Frame {
        self.try_read_frame().unwrap_or_else(|e| panic!("expected a frame from the server: {e}"))
    }

    /// Expect one unfragmented frame with this opcode and exactly this payload.
    pub fn expect_frame(&mut self, opcode: u8, payload: &[u8]) {
        let frame = self.read_frame();
        assert!(
            frame.fin && frame.rsv == 0 && frame.opcode == opcode,
            "expected a final frame with opcode {opcode:#x} and {} payload bytes, got {}",
            payload.len(),
            frame.describe()
        );
        assert_same_bytes(&frame.payload, payload);
    }

    /// Expect a close frame with this code (`None`: no payload) and a valid reason; returns it.
    pub fn expect_close(&mut self, code: Option<u16>) -> Frame {
        let frame = self.read_frame();
        assert!(
            frame.opcode == CLOSE && frame.fin && frame.rsv == 0,
            "expected a close frame with code {code:?}, got {}",
            frame.describe()
        );
        assert_eq!(frame.close_code(), code, "close code; close frame: {}", frame.describe());
        assert!(frame.payload.len() <= 125, "close frame too long");
        assert!(
            std::str::from_utf8(frame.payload.get(2..).unwrap_or_default()).is_ok(),
            "close reason is UTF-8"
        );
        frame
    }

    /// Expect the answer to our close: a close frame with exactly `payload`; then send our EOF
    /// and expect the server's.
    pub fn expect_close_reply(&mut self, payload: &[u8]) {
        let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        let got = self.expect_close(code);
        assert_same_bytes(&got.payload, payload);
        self.shutdown_write();
        self.expect_eof();
    }

    /// Expect the server to have closed TCP: the next read is EOF, with no bytes before it.
    pub fn expect_eof(&mut self) {
        assert!(self.inbuf.is_empty(), "expected EOF, but more bytes arrived: {:02x?}", self.inbuf);
        let mut buf = [0u8; 256];
        match self.stream.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("expected EOF, but more bytes arrived: {:02x?}", &buf[..n]),
            Err(e) => panic!("expected EOF within {READ_TIMEOUT:?}, got: {e}"),
        }
    }

    /// Answer the server's close frame with one of our own and our EOF, as a well-behaved
    /// client does, then expect the server to close TCP with nothing more sent.
    pub fn finish_close(&mut self) {
        // The server may already be gone if it did not wait for us; that shows up as a
        // missing EOF below, so a failed write is not an error by itself.
        let _ = self.stream.write_all(&frame(CLOSE, b""));
        let _ = self.stream.shutdown(Shutdown::Write);
        self.expect_eof();
    }

    /// Keep the connection open without sending EOF and expect the server to drop it within
    /// `budget`: a write fails once the server's socket is gone (it answers with a reset).
    pub fn expect_dropped_within(&mut self, budget: Duration) {
        let start = std::time::Instant::now();
        // A lingering server reads and discards these bytes; a closed one resets.
        while self.stream.write(b"\0").is_ok() {
            assert!(start.elapsed() < budget, "the server still held the connection after {budget:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stop sending (TCP half-close) without a close frame.
    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Expect the server to fail the connection with `code`, then finish the close handshake
    /// and expect TCP to be closed.
    pub fn expect_failure(&mut self, code: u16) {
        self.expect_close(Some(code));
        self.finish_close();
    }
}

/// Compare payloads without printing megabytes when they differ.
pub fn assert_same_bytes(got: &[u8], want: &[u8]) {
    if got != want {
        let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
        let shown = |b: &[u8]| format!("{:02x?}", &b[first..b.len().min(first + 16)]);
        panic!(
            "payload differs: got {} bytes, want {}; first difference at byte {first}: got {} want {}",
            got.len(),
            want.len(),
            shown(got),
            shown(want)
        );
    }
}
