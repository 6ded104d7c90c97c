//! The client's side of permessage-deflate: what the server accepted, the compressor and
//! decompressor it implies, and how many bytes compression saved.

use std::cell::Cell;

use gale_frame::deflate::{Deflater, InflateError, Inflater, MAX_WINDOW_BITS};
use gale_frame::handshake::parse_extensions;

/// What the client offers: permessage-deflate, letting the server limit our window.
pub const OFFER: &str = "permessage-deflate; client_max_window_bits";

/// Bytes before and after compression, for one thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireBytes {
    /// Payload bytes of messages sent.
    pub sent_payload: u64,
    /// Their bytes on the wire (compressed when negotiated), frame headers excluded.
    pub sent_wire: u64,
    /// Payload bytes of messages received, after inflating.
    pub received_payload: u64,
    /// Their bytes on the wire.
    pub received_wire: u64,
}

thread_local! {
    /// Counters of this client thread (each engine runs on its own thread).
    static WIRE: Cell<WireBytes> = const { Cell::new(WireBytes { sent_payload: 0, sent_wire: 0, received_payload: 0, received_wire: 0 }) };
}

/// Count a message sent (`payload` bytes, `wire` on the wire).
pub fn count_sent(payload: usize, wire: usize) {
    WIRE.with(|w| {
        let mut v = w.get();
        v.sent_payload += payload as u64;
        v.sent_wire += wire as u64;
        w.set(v);
    });
}

/// Count a message received.
pub fn count_received(payload: usize, wire: usize) {
    WIRE.with(|w| {
        let mut v = w.get();
        v.received_payload += payload as u64;
        v.received_wire += wire as u64;
        w.set(v);
    });
}

/// This thread's counters.
pub fn wire_bytes() -> WireBytes {
    WIRE.with(|w| w.get())
}

/// A connection's compression once the server accepted it.
pub struct ClientDeflate {
    deflater: Deflater,
    inflater: Inflater,
    /// Reused buffers: the payload before compression, and after.
    pub(crate) plain: Vec<u8>,
    pub(crate) packed: Vec<u8>,
}

impl ClientDeflate {
    /// The compression the server's `Sec-WebSocket-Extensions` answer sets up, if it accepted
    /// permessage-deflate.
    pub fn from_response(value: &str) -> Option<ClientDeflate> {
        let mut offers = Vec::new();
        parse_extensions(value, &mut offers).ok()?;
        let agreed = offers.iter().find(|o| o.name.eq_ignore_ascii_case("permessage-deflate"))?;
        let has = |name: &str| agreed.params.iter().any(|(n, _)| *n == name);
        let client_bits = agreed
            .params
            .iter()
            .find(|(n, _)| *n == "client_max_window_bits")
            .and_then(|(_, v)| v.and_then(|v| v.parse::<u8>().ok()))
            .unwrap_or(MAX_WINDOW_BITS);
        Some(ClientDeflate {
            deflater: Deflater::new(client_bits, 6, !has("client_no_context_takeover")),
            inflater: Inflater::new(!has("server_no_context_takeover")),
            plain: Vec::new(),
            packed: Vec::new(),
        })
    }

    /// Compress `plain` into `packed` (replacing what it held).
    pub fn compress(&mut self) {
        self.packed.clear();
        self.deflater.compress(&self.plain, &mut self.packed);
    }

    /// Inflate a received message into `out`.
    pub fn inflate(&mut self, payload: &[u8], out: &mut Vec<u8>, max: usize) -> Result<(), InflateError> {
        self.inflater.inflate(payload, out, max)
    }
}
