//! permessage-deflate in the server: which compressor and decompressor a connection uses.
//!
//! `Compression::Shared` asks every client for `server_no_context_takeover` and
//! `client_no_context_takeover`: each message is compressed and inflated on its own, so one
//! compressor (per window size) and one decompressor per loop serve all connections and a
//! connection holds no zlib state at all. `Compression::Dedicated` keeps context between
//! messages (better ratios for similar messages) at the price of a compressor and a
//! decompressor per connection, created at first use and sized by the negotiated window.

use gale_frame::deflate::{
    DeflateConfig, DeflateParams, Deflater, InflateError, Inflater, MAX_WINDOW_BITS, MIN_WINDOW_BITS,
};

use crate::behavior::Compression;

/// zlib compression level: fast, and most of the gain on short chat-like messages.
const LEVEL: u32 = 3;

/// Compression state one loop shares between its connections.
#[derive(Default)]
pub(crate) struct SharedCodecs {
    /// Compressors without context takeover, one per window size (9..=15).
    deflaters: [Option<Deflater>; (MAX_WINDOW_BITS - MIN_WINDOW_BITS + 1) as usize],
    /// Decompressor for clients that do not take over context.
    inflater: Option<Inflater>,
    /// Where messages are inflated; reused.
    pub(crate) inflated: Vec<u8>,
    /// Where messages are compressed; reused.
    pub(crate) compressed: Vec<u8>,
}

impl SharedCodecs {
    /// Free scratch buffers that a large message made large.
    pub(crate) fn trim(&mut self) {
        const KEEP: usize = 256 * 1024;
        if self.inflated.capacity() > KEEP {
            self.inflated = Vec::new();
        }
        if self.compressed.capacity() > KEEP {
            self.compressed = Vec::new();
        }
    }
}

/// What the server offers for a behaviour's compression setting.
pub(crate) fn server_config(mode: Compression) -> Option<DeflateConfig> {
    match mode {
        Compression::Disabled => None,
        Compression::Shared => Some(DeflateConfig {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            ..DeflateConfig::default()
        }),
        Compression::Dedicated { window_bits } => {
            let bits = window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
            Some(DeflateConfig {
                server_max_window_bits: bits,
                client_max_window_bits: bits,
                ..DeflateConfig::default()
            })
        }
    }
}

/// A connection's compression: what was negotiated, and its own codecs when it keeps context.
#[derive(Default)]
pub(crate) struct ConnCompression {
    params: Option<DeflateParams>,
    deflater: Option<Box<Deflater>>,
    inflater: Option<Box<Inflater>>,
}

impl ConnCompression {
    /// Compression as negotiated (`None`: the connection does not compress).
    pub(crate) fn new(params: Option<DeflateParams>) -> Self {
        ConnCompression { params, deflater: None, inflater: None }
    }

    /// Whether permessage-deflate was negotiated.
    pub(crate) fn is_on(&self) -> bool {
        self.params.is_some()
    }

    /// Compress `payload` for this connection into `out` (cleared first).
    pub(crate) fn compress(&mut self, shared: &mut SharedCodecs, payload: &[u8], out: &mut Vec<u8>) {
        let Some(p) = self.params else { return };
        out.clear();
        if p.server_no_context_takeover {
            let slot = (p.server_max_window_bits - MIN_WINDOW_BITS) as usize;
            shared.deflaters[slot]
                .get_or_insert_with(|| Deflater::new(p.server_max_window_bits, LEVEL, false))
                .compress(payload, out);
        } else {
            self.deflater
                .get_or_insert_with(|| Box::new(Deflater::new(p.server_max_window_bits, LEVEL, true)))
                .compress(payload, out);
        }
    }

    /// Inflate a received message into `out`, at most `max` bytes.
    pub(crate) fn inflate(
        &mut self,
        shared: &mut SharedCodecs,
        payload: &[u8],
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<(), InflateError> {
        let Some(p) = self.params else { return Err(InflateError::Corrupt) };
        if p.client_no_context_takeover {
            shared.inflater.get_or_insert_with(|| Inflater::new(false)).inflate(payload, out, max)
        } else {
            self.inflater.get_or_insert_with(|| Box::new(Inflater::new(true))).inflate(payload, out, max)
        }
    }
}
