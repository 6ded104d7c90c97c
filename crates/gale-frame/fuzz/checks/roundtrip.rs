//! The `message_roundtrip` target: messages encoded as masked client frames, data messages
//! cut into fragments with pings and pongs between them, decoded by a server in any read
//! sizes, must come back exactly as sent.
//!
//! The fuzz target builds a [`Plan`] with `arbitrary`; this module cannot depend on it, so a
//! plan also has a byte format of its own ([`Plan::to_bytes`], [`Plan::from_bytes`]), which is
//! what regression files of this target hold. Layout, little-endian, missing bytes zero:
//! - key count (u8), then 4 bytes per key;
//! - read count (u8), then a u32 per read size;
//! - messages until the end, each a tag byte (`tag % 4`: text, binary, ping, pong), then
//!   - text and binary: chunk length (u32), chunk, repeat (u32), cut count (u8), then per cut
//!     a length (u32) and a control tag (`% 3`: none, ping, pong), a control message being a
//!     length (u8) and its payload;
//!   - ping and pong: length (u8) and payload.

use super::decoder::{Outcome, Owned, feed};
use gale_frame::{
    Decoder, DecoderConfig, FrameHeader, FrameSpec, MAX_CONTROL_PAYLOAD, OpCode, append_frame, apply_mask,
    encode_frame, frame_len,
};

/// Largest data payload a plan builds: above 64 KiB, so that 64-bit lengths are covered.
pub const MAX_PAYLOAD: usize = 80 * 1024;

/// Largest read size, key count and cut count a plan keeps: what the byte format can hold,
/// and far more than a fuzzer needs.
const MAX_READ: usize = 1 << 16;
const MAX_LIST: usize = u8::MAX as usize;

/// What to send and how to cut it into reads. Built only through the constructors, which
/// bring any value into the range the byte format holds, so that every plan round-trips.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Masking keys, one per frame in turn; never empty.
    keys: Vec<[u8; 4]>,
    /// Read sizes in turn, each at least 1; empty means a single read.
    reads: Vec<usize>,
    messages: Vec<Message>,
}

/// One message of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// A text or binary message.
    Data(Data),
    /// A ping or pong on its own.
    Control(Control),
}

/// A data message: `chunk` repeated, sent as one or more fragments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Data {
    text: bool,
    /// Valid UTF-8 when `text`.
    chunk: Vec<u8>,
    /// Copies of `chunk` after the first.
    repeat: u32,
    /// Where the fragments end, all but the last.
    cuts: Vec<Cut>,
}

/// The end of a non-final fragment and the control message sent right after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cut {
    /// Payload bytes in the fragment (clamped to what is left of the message).
    len: u32,
    control: Option<Control>,
}

/// A ping or a pong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Control {
    pong: bool,
    /// At most 125 bytes.
    payload: Vec<u8>,
}

impl Plan {
    /// A plan; no keys means the all-zero key, read sizes are clamped to 1..=65,536, and the
    /// key and read lists to 255 entries.
    pub fn new(keys: Vec<[u8; 4]>, reads: Vec<usize>, messages: Vec<Message>) -> Self {
        let mut keys = keys;
        keys.truncate(MAX_LIST);
        if keys.is_empty() {
            keys.push([0; 4]);
        }
        let reads = reads.into_iter().take(MAX_LIST).map(|r| r.clamp(1, MAX_READ)).collect();
        Plan { keys, reads, messages }
    }

    /// Decode a plan from the byte format; any bytes give a plan.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut r = Reader(bytes);
        let keys = (0..r.u8()).map(|_| r.array()).collect();
        let reads = (0..r.u8()).map(|_| r.u32() as usize).collect();
        let mut messages = Vec::new();
        while !r.0.is_empty() {
            let tag = r.u8() % 4;
            messages.push(if tag < 2 {
                let len = r.u32() as usize;
                let chunk = r.bytes(len).to_vec();
                let repeat = r.u32();
                let cuts = (0..r.u8()).map(|_| Cut::new(r.u32(), r.control())).collect();
                Message::Data(Data::new(tag == 0, chunk, repeat, cuts))
            } else {
                Message::Control(r.control_body(tag == 3))
            });
        }
        Plan::new(keys, reads, messages)
    }

    /// Encode the plan in the byte format.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![self.keys.len() as u8];
        self.keys.iter().for_each(|k| out.extend_from_slice(k));
        out.push(self.reads.len() as u8);
        self.reads.iter().for_each(|&r| out.extend_from_slice(&(r as u32).to_le_bytes()));
        for message in &self.messages {
            match message {
                Message::Data(d) => {
                    out.push(if d.text { 0 } else { 1 });
                    out.extend_from_slice(&(d.chunk.len() as u32).to_le_bytes());
                    out.extend_from_slice(&d.chunk);
                    out.extend_from_slice(&d.repeat.to_le_bytes());
                    out.push(d.cuts.len() as u8);
                    for cut in &d.cuts {
                        out.extend_from_slice(&cut.len.to_le_bytes());
                        match &cut.control {
                            None => out.push(0),
                            Some(c) => {
                                out.push(if c.pong { 2 } else { 1 });
                                c.write_body(&mut out);
                            }
                        }
                    }
                }
                Message::Control(c) => {
                    out.push(if c.pong { 3 } else { 2 });
                    c.write_body(&mut out);
                }
            }
        }
        out
    }

    /// The frames of every message, masked with the plan's keys in turn.
    fn wire(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut keys = self.keys.iter().copied().cycle();
        let mut frame = |out: &mut Vec<u8>, opcode, fin, payload: &[u8]| {
            let mask = keys.next();
            append_frame(out, FrameSpec { opcode, fin, compressed: false, mask }, payload);
        };
        for message in &self.messages {
            match message {
                Message::Control(c) => frame(&mut out, c.opcode(), true, &c.payload),
                Message::Data(d) => {
                    let payload = d.payload();
                    let mut rest = &payload[..];
                    let mut opcode = if d.text { OpCode::Text } else { OpCode::Binary };
                    for cut in &d.cuts {
                        let (fragment, after) = rest.split_at((cut.len as usize).min(rest.len()));
                        frame(&mut out, opcode, false, fragment);
                        if let Some(c) = &cut.control {
                            frame(&mut out, c.opcode(), true, &c.payload);
                        }
                        opcode = OpCode::Continuation;
                        rest = after;
                    }
                    frame(&mut out, opcode, true, rest);
                }
            }
        }
        out
    }

    /// The events a decoder must report for this plan.
    fn expected(&self) -> Vec<Owned> {
        let mut events = Vec::new();
        for message in &self.messages {
            match message {
                Message::Control(c) => events.push(c.event()),
                Message::Data(d) => {
                    events.extend(d.cuts.iter().filter_map(|cut| cut.control.as_ref().map(Control::event)));
                    let payload = d.payload();
                    events.push(if d.text {
                        Owned::Text(String::from_utf8(payload).expect("text chunks are UTF-8"))
                    } else {
                        Owned::Binary(payload)
                    });
                }
            }
        }
        events
    }

    /// The largest data payload in the plan.
    fn largest_payload(&self) -> usize {
        let sizes = self.messages.iter().map(|m| match m {
            Message::Data(d) => d.chunk.len() * (d.repeat as usize + 1),
            Message::Control(_) => 0,
        });
        sizes.max().unwrap_or(0)
    }
}

impl Data {
    /// A data message. Text that is not UTF-8 is repaired with U+FFFD; the chunk is cut to
    /// [`MAX_PAYLOAD`] (at a character boundary for text) and `repeat` lowered so that the
    /// whole message stays within it; the cut list keeps at most 255 cuts.
    pub fn new(text: bool, chunk: Vec<u8>, repeat: u32, cuts: Vec<Cut>) -> Self {
        let mut chunk = chunk;
        if text {
            chunk = String::from_utf8_lossy(&chunk).into_owned().into_bytes();
            let mut end = chunk.len().min(MAX_PAYLOAD);
            // Step back over continuation bytes to the start of the cut character.
            while end < chunk.len() && chunk[end] & 0xC0 == 0x80 {
                end -= 1;
            }
            chunk.truncate(end);
        } else {
            chunk.truncate(MAX_PAYLOAD);
        }
        let repeat = match chunk.len() {
            0 => 0,
            n => repeat.min((MAX_PAYLOAD / n - 1) as u32),
        };
        let mut cuts = cuts;
        cuts.truncate(MAX_LIST);
        Data { text, chunk, repeat, cuts }
    }

    /// The whole message: the chunk and its repeats.
    fn payload(&self) -> Vec<u8> {
        self.chunk.repeat(self.repeat as usize + 1)
    }
}

impl Cut {
    /// The end of a fragment of `len` payload bytes, followed by `control` if any.
    pub fn new(len: u32, control: Option<Control>) -> Self {
        Cut { len, control }
    }
}

impl Control {
    /// A ping, or a pong when `pong`; the payload is cut to 125 bytes.
    pub fn new(pong: bool, payload: Vec<u8>) -> Self {
        let mut payload = payload;
        payload.truncate(MAX_CONTROL_PAYLOAD);
        Control { pong, payload }
    }

    /// The frame's opcode.
    fn opcode(&self) -> OpCode {
        if self.pong { OpCode::Pong } else { OpCode::Ping }
    }

    /// The event the decoder reports for it.
    fn event(&self) -> Owned {
        if self.pong { Owned::Pong(self.payload.clone()) } else { Owned::Ping(self.payload.clone()) }
    }

    /// Its length and payload, in the byte format.
    fn write_body(&self, out: &mut Vec<u8>) {
        out.push(self.payload.len() as u8);
        out.extend_from_slice(&self.payload);
    }
}

/// Reads the byte format; past the end every field reads as zero.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// The next `n` bytes, fewer at the end.
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        taken
    }

    /// The next `N` bytes, zero-padded at the end.
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let taken = self.bytes(N);
        out[..taken.len()].copy_from_slice(taken);
        out
    }

    /// The next byte.
    fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// The next little-endian u32.
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A control tag and, unless it says none, a control message.
    fn control(&mut self) -> Option<Control> {
        match self.u8() % 3 {
            0 => None,
            tag => Some(self.control_body(tag == 2)),
        }
    }

    /// A control message's length and payload.
    fn control_body(&mut self, pong: bool) -> Control {
        let len = usize::from(self.u8());
        Control::new(pong, self.bytes(len).to_vec())
    }
}

/// Encode `plan`, decode it in its read sizes, and check that every message comes back
/// unchanged, with nothing left over in the decoder.
pub fn check(plan: &Plan) {
    assert_eq!(&Plan::from_bytes(&plan.to_bytes()), plan, "the byte format must hold every plan");
    let wire = plan.wire();
    check_encode_frame(&wire, plan);
    // The limit is exactly the largest message: a message of the limit's size is allowed.
    let mut decoder = Decoder::new(DecoderConfig::server(plan.largest_payload() as u64));
    let outcome = feed(&mut decoder, &wire, &plan.reads);
    assert_eq!(outcome, Outcome { events: plan.expected(), error: None });
    assert!(!decoder.is_mid_message(), "whole messages left partial state");
    decoder.release();
    assert_eq!(decoder.heap_bytes(), 0);
}

/// `encode_frame` into an exact-size buffer writes what `append_frame` wrote, frame by frame.
fn check_encode_frame(wire: &[u8], plan: &Plan) {
    let mut rest = wire;
    let mut keys = plan.keys.iter().copied().cycle();
    while let Some((header, header_len)) = FrameHeader::decode(rest).expect("valid header") {
        let len = header.payload_len as usize;
        let mut payload = rest[header_len..header_len + len].to_vec();
        let key = keys.next();
        assert_eq!(header.mask, key, "frames take the keys in turn");
        apply_mask(&mut payload, key.unwrap_or_default(), 0);
        let spec = FrameSpec { opcode: header.opcode, fin: header.fin, compressed: false, mask: key };
        let mut out = vec![0; frame_len(len, true)];
        assert_eq!(encode_frame(&mut out, spec, &payload), Ok(out.len()));
        assert_eq!(out, rest[..header_len + len]);
        rest = &rest[header_len + len..];
    }
    assert!(rest.is_empty(), "the wire ends with a whole frame");
}
