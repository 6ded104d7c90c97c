//! The `decoder` target: arbitrary bytes on the wire, fed to [`Decoder`] read by read.
//!
//! Input layout (missing bytes read as zero):
//! - byte 0: bit 0 picks the role (0 server, 1 client), bit 1 allows RSV1;
//! - byte 1: the maximum message size, `(b & 0x0f) << (2 * (b >> 4))`, so that the small
//!   limits which trip 1009 are as easy to reach as the large ones;
//! - byte 2: how many read sizes follow, `b % 8 + 1`; each following byte is a read of
//!   `b + 1` bytes, and the sizes are used in turn;
//! - the rest: the bytes on the wire.
//!
//! Besides the invariants checked on every event, the same bytes are decoded once in a single
//! read: how the peer's bytes happen to be split into reads must not change what is decoded.

use gale_frame::{DataKind, Decoder, DecoderConfig, Event, MAX_CONTROL_PAYLOAD, PartialBudget, Role};

/// An event with owned payloads, so that events of different runs can be compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owned {
    /// A text message.
    Text(String),
    /// A binary message.
    Binary(Vec<u8>),
    /// A text message not checked for UTF-8.
    UncheckedText(Vec<u8>),
    /// A message sent with RSV1, still compressed.
    Compressed(DataKind, Vec<u8>),
    /// A ping.
    Ping(Vec<u8>),
    /// A pong.
    Pong(Vec<u8>),
    /// A close frame: its code, if any, and its reason.
    Close(Option<u16>, String),
}

impl From<&Event<'_>> for Owned {
    fn from(event: &Event<'_>) -> Self {
        match *event {
            Event::Text(t) => Owned::Text(t.to_owned()),
            Event::Binary(b) => Owned::Binary(b.to_vec()),
            Event::UncheckedText(b) => Owned::UncheckedText(b.to_vec()),
            Event::Compressed { kind, payload } => Owned::Compressed(kind, payload.to_vec()),
            Event::Ping(p) => Owned::Ping(p.to_vec()),
            Event::Pong(p) => Owned::Pong(p.to_vec()),
            Event::Close(c) => Owned::Close(c.code.map(|code| code.0), c.reason.to_owned()),
        }
    }
}

/// What decoding a stream produced: the events up to the end of the input or up to the
/// first error, and that error's close code.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Events in the order they were decoded.
    pub events: Vec<Owned>,
    /// The close code of the first error, if there was one.
    pub error: Option<u16>,
}

/// The close codes RFC 6455 prescribes for what a decoder can detect: protocol error,
/// invalid payload, message too big.
pub const ERROR_CODES: [u16; 3] = [1002, 1007, 1009];

/// Heap a decoder may hold beyond twice what the peer sent: it reserves up to 64 KiB for a
/// message from the header alone, and a control frame buffer grows to at most 125 bytes.
/// Anything more would let a peer make us allocate memory it never sent.
const HEAP_ALLOWANCE: usize = 64 * 1024 + 2 * MAX_CONTROL_PAYLOAD;

/// The decoded input layout, see the module documentation.
struct Input<'a> {
    config: DecoderConfig,
    reads: Vec<usize>,
    wire: &'a [u8],
}

impl<'a> Input<'a> {
    /// Read the layout; any bytes are an input.
    fn parse(data: &'a [u8]) -> Self {
        let byte = |i: usize| data.get(i).copied().unwrap_or(0);
        let flags = byte(0);
        let size = byte(1);
        let read_count = usize::from(byte(2) % 8) + 1;
        let config = DecoderConfig {
            role: if flags & 1 == 0 { Role::Server } else { Role::Client },
            allow_rsv1: flags & 2 != 0,
            check_utf8: true,
            max_message_size: u64::from(size & 0x0f) << (2 * (size >> 4)),
        };
        let reads = (0..read_count).map(|i| usize::from(byte(3 + i)) + 1).collect();
        let wire = data.get(3 + read_count..).unwrap_or_default();
        Input { config, reads, wire }
    }
}

/// Build an input in the layout this target reads: `flags` and `size` as bytes 0 and 1,
/// `reads` as read sizes minus one (1 to 8 of them), then `wire`.
pub fn input(flags: u8, size: u8, reads: &[u8], wire: &[u8]) -> Vec<u8> {
    assert!((1..=8).contains(&reads.len()), "1 to 8 read sizes");
    let mut data = vec![flags, size, reads.len() as u8 - 1];
    data.extend_from_slice(reads);
    data.extend_from_slice(wire);
    data
}

/// Decode one fuzz input in its chosen read sizes, check every invariant, and check that a
/// single read gives the same outcome. Returns that outcome.
pub fn check(data: &[u8]) -> Outcome {
    let input = Input::parse(data);
    let split = feed(&mut Decoder::new(input.config), input.wire, &input.reads);
    let whole = feed(&mut Decoder::new(input.config), input.wire, &[]);
    assert_eq!(split, whole, "read sizes {:?} changed the outcome", input.reads);
    // A budget that is never short changes nothing, and gets back every byte it lent.
    let budget = PartialBudget::new(usize::MAX);
    let mut budgeted = Decoder::with_budget(input.config, budget.clone());
    assert_eq!(feed(&mut budgeted, input.wire, &input.reads), split, "a budget changed the outcome");
    drop(budgeted);
    assert_eq!(budget.held(), 0, "bytes still taken from the budget after the decoder was dropped");
    split
}

/// Feed `wire` to `decoder` in reads of the sizes in `reads`, used in turn (one read of
/// everything when `reads` is empty), until the end or the first error, checking the
/// decoder's invariants on the way.
pub fn feed(decoder: &mut Decoder, wire: &[u8], reads: &[usize]) -> Outcome {
    let config = *decoder.config();
    let mut outcome = Outcome::default();
    let mut closed = false;
    let mut start = 0;
    let mut sizes = reads.iter().copied().cycle();
    while start < wire.len() {
        let size = sizes.next().unwrap_or(wire.len()).max(1);
        let end = wire.len().min(start + size);
        // Each read gets its own buffer, as from a socket: the decoder unmasks in place.
        let mut read = wire[start..end].to_vec();
        let read_len = read.len();
        start = end;
        let mut pos = 0;
        loop {
            match decoder.decode(&mut read[pos..]) {
                Ok((n, Some(event))) => {
                    assert!(!closed, "event {event:?} after a close frame");
                    assert!(pos + n <= read_len, "consumed {n} bytes of {}", read_len - pos);
                    check_event(&event, &config);
                    closed = matches!(event, Event::Close(_));
                    outcome.events.push(Owned::from(&event));
                    pos += n;
                }
                Ok((n, None)) => {
                    assert_eq!(pos + n, read_len, "no event, yet the read was not consumed");
                    break;
                }
                Err(e) => {
                    assert!(ERROR_CODES.contains(&e.code.0), "unexpected close code in {e:?}");
                    outcome.error = Some(e.code.0);
                    break;
                }
            }
        }
        check_memory(decoder, start);
        if outcome.error.is_some() {
            break;
        }
    }
    if closed || outcome.error.is_some() {
        // After a close frame or an error the decoder must swallow whatever still comes.
        assert!(decoder.is_finished());
        let mut more = [0x81, 0x00];
        assert!(matches!(decoder.decode(&mut more), Ok((2, None))), "input after the end was not ignored");
    }
    outcome
}

/// Check what an event promises: valid UTF-8, payload limits, no RSV1 unless negotiated.
fn check_event(event: &Event<'_>, config: &DecoderConfig) {
    // On the wire a compressed message may exceed the limit by deflate's worst-case
    // expansion ([`DecoderConfig::wire_limit`]); the limit applies to it once inflated.
    let (data_len, compressed) = match *event {
        Event::Text(t) => {
            assert!(std::str::from_utf8(t.as_bytes()).is_ok(), "text event is not UTF-8");
            (t.len(), false)
        }
        Event::Binary(b) => (b.len(), false),
        Event::UncheckedText(b) => {
            assert!(!config.check_utf8, "unchecked text from a decoder that checks UTF-8");
            (b.len(), false)
        }
        Event::Compressed { payload, .. } => {
            assert!(config.allow_rsv1, "compressed message without a negotiated extension");
            (payload.len(), true)
        }
        Event::Ping(p) | Event::Pong(p) => {
            assert!(p.len() <= MAX_CONTROL_PAYLOAD, "control payload of {} bytes", p.len());
            return;
        }
        Event::Close(c) => {
            assert!(c.code.is_none_or(|code| code.is_valid_on_wire()), "close code {:?}", c.code);
            assert!(c.code.is_some() || c.reason.is_empty(), "close reason without a code");
            assert!(std::str::from_utf8(c.reason.as_bytes()).is_ok(), "close reason is not UTF-8");
            return;
        }
    };
    let limit = config.wire_limit(compressed);
    assert!(data_len as u64 <= limit, "{data_len}-byte message over the limit of {limit}");
}

/// Between reads: with no partial frame or message, a released decoder holds no heap, and
/// it never holds much more than the peer has sent (`fed` bytes so far).
fn check_memory(decoder: &mut Decoder, fed: usize) {
    decoder.release();
    if !decoder.is_mid_message() {
        assert_eq!(decoder.heap_bytes(), 0, "heap held with no partial message");
    }
    let heap = decoder.heap_bytes();
    assert!(heap <= 2 * fed + HEAP_ALLOWANCE, "{heap} heap bytes after {fed} input bytes");
}
