//! The `conn` target: one connection of `gale-server` fed arbitrary client bytes.
//!
//! Input layout (missing bytes read as zero):
//! - byte 0, flags: bit 0 the backend's way of writing (0 readiness, as epoll; 1 completion,
//!   as io_uring); bits 1-2 the route: 0 echo, 1 echo with shared deflate, 2 echo with
//!   per-connection deflate, 3 none (no request is written: the body is all the client
//!   sends); bit 3 the body is frame records (below) instead of raw bytes; bit 4 a keep-alive
//!   `GET /healthz` goes before the upgrade; bits 5-6 the permessage-deflate offer (none, plain,
//!   `client_max_window_bits`, both `no_context_takeover`); bit 7 the server shuts down at the
//!   end;
//! - byte 1: how many schedule bytes follow, `b % 16 + 1`; the schedule is used in turn until
//!   every byte is sent. Schedule byte `b`, by `b & 3`: 0 send the next `(b >> 2) + 1` bytes;
//!   1 send the next `((b >> 2) + 1) * 64` bytes; 2 the socket is writable (the peer reads,
//!   or the send in flight completes); 3 `(b >> 2) * 4` timer ticks pass, or the peer shuts
//!   down its side when `b >> 2` is 63;
//! - the rest, the body: raw bytes, or frame records `[h0, h1, (len), payload]`: `h0` is the
//!   frame's first byte as is (FIN, RSV, opcode); `h1 & 0x3f` the payload length (62: a 16-bit
//!   length follows, modulo 20 000; 63: a 16-bit length follows, sent in the 64-bit form, which
//!   is not minimal); `h1` bit 6 leaves the frame unmasked; bit 7 sends an RSV1 payload as is
//!   instead of compressing it. The check masks and compresses records itself, so that fuzzing
//!   reaches the states behind a valid frame.
//!
//! Invariants: no panic; the output is a sequence of well-formed HTTP responses, then, after a
//! 101, server frames that `gale-frame`'s client decoder accepts (unmasked, minimal lengths,
//! valid close codes and UTF-8), compressed ones inflating to valid messages; nothing follows
//! a close frame; a close frame carries the code of the first protocol error in what the client
//! sent (as an independent server decoder sees it), the client's own close code echoed, 1001
//! (shutdown, idle) or, with deflate, 1007/1009 from inflating; the bytes the connection holds
//! stay within the backpressure limit plus one message (plus what the input could amplify);
//! a connection given time ends.

use gale_frame::deflate::{Deflater, Inflater};
use gale_frame::{Decoder, DecoderConfig, Event, apply_mask};
use gale_server::fuzzing::{self, Harness, Mode, Probe};

/// The client's mask key for every frame record.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The parts of an input, see the module documentation.
pub struct Input {
    /// How the backend writes.
    pub mode: Mode,
    /// Everything the client sends.
    pub wire: Vec<u8>,
    /// Where the WebSocket bytes start in `wire` (after the requests), if a request is written.
    pub ws_start: Option<usize>,
    /// The schedule bytes.
    pub schedule: Vec<u8>,
    /// Shut the server down at the end.
    pub shutdown: bool,
}

const OFFERS: [Option<&str>; 4] = [
    None,
    Some("permessage-deflate"),
    Some("permessage-deflate; client_max_window_bits"),
    Some("permessage-deflate; client_no_context_takeover; server_no_context_takeover"),
];

impl Input {
    /// Read the layout; any bytes are an input.
    pub fn parse(data: &[u8]) -> Input {
        let byte = |i: usize| data.get(i).copied().unwrap_or(0);
        let flags = byte(0);
        let mode = if flags & 1 == 0 { Mode::Readiness } else { Mode::Completion };
        let path = [
            Some(fuzzing::ECHO_PATH),
            Some(fuzzing::DEFLATE_SHARED_PATH),
            Some(fuzzing::DEFLATE_DEDICATED_PATH),
            None,
        ][(flags >> 1 & 3) as usize];
        let offer = OFFERS[(flags >> 5 & 3) as usize];
        let schedule_len = (byte(1) % 16 + 1) as usize;
        let schedule: Vec<u8> = (0..schedule_len).map(|i| byte(2 + i)).collect();
        let body = data.get(2 + schedule_len..).unwrap_or_default();
        let mut wire = Vec::new();
        let mut ws_start = None;
        if let Some(path) = path {
            if flags & 0x10 != 0 {
                wire.extend_from_slice(b"GET /healthz HTTP/1.1\r\nHost: fuzz\r\n\r\n");
            }
            wire.extend_from_slice(
                format!(
                    "GET {path} HTTP/1.1\r\nHost: fuzz\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                )
                .as_bytes(),
            );
            if let Some(offer) = offer {
                wire.extend_from_slice(format!("Sec-WebSocket-Extensions: {offer}\r\n").as_bytes());
            }
            wire.extend_from_slice(b"\r\n");
            ws_start = Some(wire.len());
        }
        if flags & 0x08 != 0 {
            encode_records(body, &mut wire);
        } else {
            wire.extend_from_slice(body);
        }
        Input { mode, wire, ws_start, schedule, shutdown: flags & 0x80 != 0 }
    }
}

/// Turn frame records into masked client frames (see the module documentation).
fn encode_records(mut body: &[u8], wire: &mut Vec<u8>) {
    // The client compresses every message on its own: valid whatever was negotiated.
    let mut deflater = Deflater::new(9, 6, false);
    let mut compressed = Vec::new();
    while body.len() >= 2 {
        let (h0, h1) = (body[0], body[1]);
        body = &body[2..];
        let (len, long) = match h1 & 0x3f {
            n @ 0..=61 => (n as usize, None),
            code => {
                let n = u16::from_be_bytes([
                    body.first().copied().unwrap_or(0),
                    body.get(1).copied().unwrap_or(0),
                ]);
                body = body.get(2..).unwrap_or_default();
                (if code == 62 { n as usize % 20_000 } else { n as usize }, Some(code == 63))
            }
        };
        let len = len.min(body.len());
        let mut payload = &body[..len];
        body = &body[len..];
        let data_frame = matches!(h0 & 0x0f, 1 | 2);
        if h0 & 0x40 != 0 && data_frame && h1 & 0x80 == 0 {
            deflater.compress(payload, &mut compressed);
            payload = &compressed;
        }
        let masked = h1 & 0x40 == 0;
        wire.push(h0);
        let mask_bit = if masked { 0x80 } else { 0 };
        match long {
            None if payload.len() < 126 => wire.push(mask_bit | payload.len() as u8),
            Some(true) => {
                wire.push(mask_bit | 127);
                wire.extend_from_slice(&(payload.len() as u64).to_be_bytes());
            }
            _ if payload.len() > 0xffff => {
                wire.push(mask_bit | 127);
                wire.extend_from_slice(&(payload.len() as u64).to_be_bytes());
            }
            _ => {
                wire.push(mask_bit | 126);
                wire.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            }
        }
        if masked {
            wire.extend_from_slice(&MASK);
        }
        let start = wire.len();
        wire.extend_from_slice(payload);
        if masked {
            apply_mask(&mut wire[start..], MASK, 0);
        }
    }
}

/// Heap the connection may hold: the backpressure limit plus one message (compressed
/// messages may grow by deflate's worst case), and a close frame.
const HELD_BASE: usize = fuzzing::MAX_BACKPRESSURE + fuzzing::MAX_PAYLOAD + fuzzing::MAX_PAYLOAD / 64 + 1024;

/// Ticks a connection may take to end once the peer has sent everything and shut down.
const END_TICKS: u32 = 64;

thread_local! {
    static HARNESS: std::cell::RefCell<Harness> =
        std::cell::RefCell::new(Harness::new().expect("bind the harness's listener"));
}

/// What one run produced, for the regression tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Status codes of the HTTP responses, in order.
    pub statuses: Vec<u16>,
    /// Data messages the server sent (inflated).
    pub messages: usize,
    /// The server's close frame: `Some(None)` for an empty one.
    pub close: Option<Option<u16>>,
}

/// Run `data` through a connection and check every invariant; panics on a violation.
pub fn check(data: &[u8]) -> Verdict {
    let input = Input::parse(data);
    HARNESS.with(|h| run(&mut h.borrow_mut(), &input))
}

fn run(h: &mut Harness, input: &Input) -> Verdict {
    let mut probe = h.connect(input.mode).expect("socket pair");
    let mut sent = 0;
    let wire = &input.wire;
    // Every schedule byte that sends nothing is followed by one that does within the
    // schedule's length, or the loop would not end: bound it.
    let mut steps = 0;
    while sent < wire.len() && !probe.closed() && steps < wire.len() + 4096 {
        let b = input.schedule[steps % input.schedule.len()];
        steps += 1;
        match b & 3 {
            0 | 1 => {
                let n = ((b >> 2) as usize + 1) * if b & 3 == 1 { 64 } else { 1 };
                let end = (sent + n).min(wire.len());
                probe.input(h, &wire[sent..end]);
                sent = end;
            }
            2 => probe.writable(h),
            _ if b >> 2 == 63 => probe.eof(h),
            _ => probe.advance(h, (b >> 2) as u32 * 4),
        }
        check_held(&probe, sent);
        if steps.is_multiple_of(input.schedule.len()) && !input.schedule.iter().any(|b| b & 3 < 2) {
            // Nothing in the schedule sends: send the rest at once.
            probe.input(h, &wire[sent..]);
            sent = wire.len();
        }
    }
    if sent < wire.len() {
        probe.input(h, &wire[sent..]);
    }
    check_held(&probe, wire.len());
    if input.shutdown {
        probe.shutdown(h);
    }
    assert!(probe.finish(h, END_TICKS), "connection still open {END_TICKS} ticks after the peer's EOF");
    check_output(input, probe.output())
}

fn check_held(probe: &Probe, sent: usize) {
    // HTTP answers can be a few times larger than the requests, pongs as large as the pings.
    let bound = HELD_BASE + 8 * sent;
    assert!(
        probe.held() <= bound,
        "connection holds {} bytes after {sent} bytes in (bound {bound})",
        probe.held()
    );
}

/// What the client's own bytes mean to an independent server decoder: the close code the
/// server must answer with (the first error's, or the client's close echoed).
fn expected_close(input: &Input, deflate: bool) -> Option<Option<u16>> {
    let start = input.ws_start?;
    let mut bytes = input.wire[start..].to_vec();
    let config = DecoderConfig { allow_rsv1: deflate, ..DecoderConfig::server(fuzzing::MAX_PAYLOAD as u64) };
    let mut decoder = Decoder::new(config);
    let mut pos = 0;
    loop {
        match decoder.decode(&mut bytes[pos..]) {
            Err(e) => break Some(Some(e.code.0)),
            Ok((used, event)) => {
                pos += used;
                match event {
                    None => break None,
                    Some(Event::Close(frame)) => break Some(frame.code.map(|c| c.0)),
                    Some(_) => {}
                }
            }
        }
        decoder.release();
    }
}

fn check_output(input: &Input, out: &[u8]) -> Verdict {
    let mut verdict = Verdict::default();
    let mut pos = 0;
    let head_possible = input.wire.windows(4).any(|w| w == b"HEAD");
    let mut upgraded = None;
    while pos < out.len() {
        let (status, head_len, body_len, extensions) = parse_response(&out[pos..]);
        verdict.statuses.push(status);
        pos += head_len;
        if status == 101 {
            upgraded = Some(extensions);
            break;
        }
        // A HEAD response announces a length it does not send.
        let rest = &out[pos..];
        if rest.len() >= body_len
            && (!head_possible || rest.len() == body_len || rest[body_len..].starts_with(b"HTTP/1.1 "))
        {
            pos += body_len;
        } else {
            assert!(
                head_possible,
                "response body cut short: {body_len} bytes announced, {} sent",
                rest.len()
            );
        }
    }
    let Some(extensions) = upgraded else { return verdict };
    let deflate = extensions.as_deref().map(deflate_params);
    let mut frames = out[pos..].to_vec();
    let config = DecoderConfig { allow_rsv1: deflate.is_some(), ..DecoderConfig::client(u64::MAX >> 1) };
    let mut decoder = Decoder::new(config);
    let mut inflater = deflate.map(|(takeover, bits)| Inflater::with_window(takeover, bits));
    let mut inflated = Vec::new();
    let mut pos = 0;
    loop {
        let (used, event) = match decoder.decode(&mut frames[pos..]) {
            Ok(step) => step,
            Err(e) => panic!("server frame rejected at byte {pos} of the WebSocket output: {e:?}"),
        };
        pos += used;
        match event {
            None => break,
            Some(Event::Compressed { kind, payload }) => {
                let inflater = inflater.as_mut().expect("RSV1 only once negotiated");
                inflater.inflate(payload, &mut inflated, 1 << 30).expect("server's deflate stream inflates");
                if kind == gale_frame::DataKind::Text {
                    assert!(std::str::from_utf8(&inflated).is_ok(), "compressed text is not UTF-8");
                }
                verdict.messages += 1;
            }
            Some(Event::Text(_) | Event::Binary(_)) => verdict.messages += 1,
            Some(Event::UncheckedText(_)) => unreachable!("the check's decoder checks UTF-8"),
            Some(Event::Ping(_) | Event::Pong(_)) => {}
            Some(Event::Close(frame)) => {
                verdict.close = Some(frame.code.map(|c| c.0));
                break;
            }
        }
        decoder.release();
    }
    assert_eq!(
        pos,
        frames.len(),
        "the server sent {} bytes after its close frame or a cut frame",
        frames.len() - pos
    );
    if let Some(code) = verdict.close {
        let expected = expected_close(input, deflate.is_some());
        let from_inflating = deflate.is_some() && matches!(code, Some(1007 | 1009));
        assert!(
            code == Some(1001) || from_inflating || input.ws_start.is_none() || expected == Some(code),
            "server closed with {code:?}; the client's bytes call for {expected:?}"
        );
    }
    verdict
}

/// Parse one response head: status, head length, announced body length, the
/// `Sec-WebSocket-Extensions` value. Panics if it is not a well-formed HTTP/1.1 response.
fn parse_response(out: &[u8]) -> (u16, usize, usize, Option<String>) {
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| {
        panic!("response head without its end: {:?}", String::from_utf8_lossy(&out[..out.len().min(200)]))
    });
    let head = std::str::from_utf8(&out[..end]).expect("response head is ASCII");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    assert!((100..600).contains(&status), "status {status}");
    let mut length = None;
    let mut extensions = None;
    let mut accept = None;
    for line in lines {
        let (name, value) = line.split_once(": ").unwrap_or_else(|| panic!("bad header line {line:?}"));
        assert!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "bad header name {name:?}"
        );
        assert!(value.bytes().all(|b| b == b'\t' || (b' '..0x7f).contains(&b)), "bad header value {value:?}");
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = Some(value.parse::<usize>().expect("Content-Length is a number")),
            "sec-websocket-extensions" => extensions = Some(value.to_owned()),
            "sec-websocket-accept" => accept = Some(value.to_owned()),
            _ => {}
        }
    }
    if status == 101 {
        assert_eq!(accept.as_deref(), Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "101 with the wrong accept key");
    } else {
        assert!(length.is_some(), "response {status} without Content-Length");
    }
    (status, end + 4, length.unwrap_or(0), extensions)
}

/// From the server's `permessage-deflate` answer: whether it keeps context between messages,
/// and its window.
fn deflate_params(value: &str) -> (bool, u8) {
    let mut takeover = true;
    let mut bits = 15;
    for param in value.split(';').map(str::trim).skip(1) {
        match param.split_once('=') {
            Some(("server_max_window_bits", v)) => bits = v.trim_matches('"').parse().expect("window bits"),
            None if param == "server_no_context_takeover" => takeover = false,
            _ => {}
        }
    }
    (takeover, bits)
}
