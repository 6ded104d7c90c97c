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

/// zlib compression level: the fastest, which keeps most of the gain on short chat-like
/// messages (it uses fixed Huffman codes instead of building a tree for every message).
const LEVEL: u32 = 1;

/// zlib memory level of the shared compressors: the smallest hash table, which is cleared
/// before every message.
const SHARED_MEM_LEVEL: u8 = 1;

/// zlib memory level for a dedicated compressor with a `window_bits` window: the hash table
/// scaled to the window (zlib's own default of 8 goes with 15 bits).
fn dedicated_mem_level(window_bits: u8) -> u8 {
    (window_bits.saturating_sub(8)).clamp(1, 8)
}

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
    /// Compress `payload` on its own (no context) with a `window_bits` window into `out`.
    pub(crate) fn deflate_without_context(&mut self, window_bits: u8, payload: &[u8], out: &mut Vec<u8>) {
        let bits = window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
        out.clear();
        self.deflaters[(bits - MIN_WINDOW_BITS) as usize]
            .get_or_insert_with(|| Deflater::with_memory(bits, LEVEL, SHARED_MEM_LEVEL, false))
            .compress(payload, out);
    }

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

/// How the messages a connection receives are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SendMode {
    /// Not at all.
    Plain,
    /// Each message on its own with this window: one compressed frame serves every such
    /// connection.
    WithoutContext(u8),
    /// With the connection's own compressor, which keeps context between messages.
    OwnContext,
}

/// A connection's compression: what was negotiated, and its own codecs when it keeps context.
/// One pointer, null when permessage-deflate is off: an idle connection that does not compress
/// pays eight bytes for it.
#[derive(Default)]
pub(crate) struct ConnCompression(Option<Box<Negotiated>>);

/// permessage-deflate as negotiated for a connection.
struct Negotiated {
    params: DeflateParams,
    deflater: Option<Box<Deflater>>,
    inflater: Option<Box<Inflater>>,
}

impl ConnCompression {
    /// Compression as negotiated (`None`: the connection does not compress).
    pub(crate) fn new(params: Option<DeflateParams>) -> Self {
        ConnCompression(params.map(|params| Box::new(Negotiated { params, deflater: None, inflater: None })))
    }

    /// Whether permessage-deflate was negotiated.
    pub(crate) fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// How messages to this connection are compressed.
    pub(crate) fn mode(&self) -> SendMode {
        match self.0.as_deref().map(|n| n.params) {
            None => SendMode::Plain,
            Some(p) if p.server_no_context_takeover => SendMode::WithoutContext(p.server_max_window_bits),
            Some(_) => SendMode::OwnContext,
        }
    }

    /// Compress `payload` for this connection into `out` (cleared first).
    pub(crate) fn compress(&mut self, shared: &mut SharedCodecs, payload: &[u8], out: &mut Vec<u8>) {
        let Some(n) = self.0.as_deref_mut() else { return };
        let p = n.params;
        out.clear();
        if p.server_no_context_takeover {
            shared.deflate_without_context(p.server_max_window_bits, payload, out);
        } else {
            n.deflater
                .get_or_insert_with(|| {
                    let bits = p.server_max_window_bits;
                    Box::new(Deflater::with_memory(bits, LEVEL, dedicated_mem_level(bits), true))
                })
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
        let Some(n) = self.0.as_deref_mut() else { return Err(InflateError::Corrupt) };
        let p = n.params;
        if p.client_no_context_takeover {
            shared.inflater.get_or_insert_with(|| Inflater::new(false)).inflate(payload, out, max)
        } else {
            let bits = p.client_max_window_bits.unwrap_or(MAX_WINDOW_BITS);
            n.inflater
                .get_or_insert_with(|| Box::new(Inflater::with_window(true, bits)))
                .inflate(payload, out, max)
        }
    }
}
