//! permessage-deflate (RFC 7692): negotiation, and per-message compression and decompression.
//!
//! Negotiation reads every offer of `Sec-WebSocket-Extensions` in order and accepts the first
//! one that fits the server's [`DeflateConfig`]. An offer with an unknown parameter, a
//! duplicated parameter or an out-of-range value is declined (RFC 7692 section 7.1: a server
//! must decline such an offer) and the next offer is considered; when none fits, the
//! connection goes on without compression, which every client must accept.
//!
//! Compression runs on `zlib-rs` (the Rust zlib that `flate2` also uses as a backend), called
//! directly because its configuration exposes zlib's `memLevel`, which decides most of a
//! compressor's memory and of the cost of resetting it between messages; `flate2` does not.
//!
//! Window sizes: zlib cannot compress with a 256-byte
//! window (`windowBits` 8; zlib itself silently uses 9), so an offer that limits the server to
//! `server_max_window_bits=8` is declined rather than answered with a window the client did
//! not allow. Decompression always uses a 32 KiB window, which reads any smaller one, so any
//! `client_max_window_bits` value is fine.
//!
//! A message is compressed with a sync flush and sent without the trailing `00 00 ff ff`;
//! on receipt the tail is put back before inflating. The inflated size counts against the
//! message size limit while inflating, so a small "bomb" stops as soon as it would exceed it.

use crate::handshake::ExtensionOffer;

/// The extension's token.
pub const EXTENSION: &str = "permessage-deflate";

/// The tail a sync flush leaves, removed from messages on the wire.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Smallest window the compressor can honour.
pub const MIN_WINDOW_BITS: u8 = 9;
/// Largest window RFC 7692 allows.
pub const MAX_WINDOW_BITS: u8 = 15;

/// What the server is willing to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeflateConfig {
    /// Largest window the server compresses with (9..=15).
    pub server_max_window_bits: u8,
    /// Always announce `server_no_context_takeover`: compress every message on its own, so one
    /// compressor can serve many connections.
    pub server_no_context_takeover: bool,
    /// Always ask for `client_no_context_takeover`: the client compresses every message on its
    /// own, so one decompressor can serve many connections.
    pub client_no_context_takeover: bool,
    /// Largest window to ask clients to compress with, when they allow us to choose (9..=15).
    pub client_max_window_bits: u8,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        DeflateConfig {
            server_max_window_bits: MAX_WINDOW_BITS,
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            client_max_window_bits: MAX_WINDOW_BITS,
        }
    }
}

/// What was agreed with one client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeflateParams {
    /// The server compresses each message on its own.
    pub server_no_context_takeover: bool,
    /// The client compresses each message on its own.
    pub client_no_context_takeover: bool,
    /// Window the server compresses with.
    pub server_max_window_bits: u8,
    /// Window the client compresses with, if we limited it.
    pub client_max_window_bits: Option<u8>,
}

impl DeflateParams {
    /// The `Sec-WebSocket-Extensions` value that answers the offer.
    pub fn response(&self) -> String {
        let mut s = String::from(EXTENSION);
        if self.server_no_context_takeover {
            s.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            s.push_str("; client_no_context_takeover");
        }
        if self.server_max_window_bits < MAX_WINDOW_BITS {
            s.push_str(&format!("; server_max_window_bits={}", self.server_max_window_bits));
        }
        if let Some(bits) = self.client_max_window_bits {
            s.push_str(&format!("; client_max_window_bits={bits}"));
        }
        s
    }
}

/// The first acceptable permessage-deflate offer, if any.
pub fn negotiate(offers: &[ExtensionOffer<'_>], cfg: &DeflateConfig) -> Option<DeflateParams> {
    offers.iter().filter(|o| o.name.eq_ignore_ascii_case(EXTENSION)).find_map(|o| accept(o, cfg))
}

/// Accept one offer, or decline it (`None`) for an invalid or unsatisfiable parameter.
fn accept(offer: &ExtensionOffer<'_>, cfg: &DeflateConfig) -> Option<DeflateParams> {
    let mut server_nct = false;
    let mut client_nct = false;
    let mut server_bits: Option<u8> = None;
    // Some(None): the client allows a window limit without proposing one.
    let mut client_bits: Option<Option<u8>> = None;
    let mut seen = [false; 4];
    for &(name, value) in &offer.params {
        let slot = match name {
            "server_no_context_takeover" => 0,
            "client_no_context_takeover" => 1,
            "server_max_window_bits" => 2,
            "client_max_window_bits" => 3,
            _ => return None,
        };
        if std::mem::replace(&mut seen[slot], true) {
            return None;
        }
        match (slot, value) {
            (0, None) => server_nct = true,
            (1, None) => client_nct = true,
            (2, Some(v)) => server_bits = Some(window_bits(v)?),
            (3, None) => client_bits = Some(None),
            (3, Some(v)) => client_bits = Some(Some(window_bits(v)?)),
            _ => return None,
        }
    }
    let server_max = server_bits.unwrap_or(MAX_WINDOW_BITS).min(cfg.server_max_window_bits);
    if server_max < MIN_WINDOW_BITS {
        return None;
    }
    let client_max = match client_bits {
        // The client did not say it can limit its window: we must not ask it to.
        None => None,
        Some(proposed) => {
            let wanted = cfg.client_max_window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
            let bits = proposed.map_or(wanted, |p| p.min(wanted));
            (bits < MAX_WINDOW_BITS || proposed.is_some()).then_some(bits)
        }
    };
    Some(DeflateParams {
        server_no_context_takeover: server_nct || cfg.server_no_context_takeover,
        client_no_context_takeover: client_nct || cfg.client_no_context_takeover,
        server_max_window_bits: server_max,
        client_max_window_bits: client_max,
    })
}

/// A window-bits value: digits only, 8 to 15.
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.len() > 2 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
}

/// zlib's `memLevel`: how much memory the compressor's hash table and output buffer use
/// (1..=9; zlib's default is 8). Each step down halves both: at 8 a compressor holds about
/// 256 KiB with a 15-bit window, at 1 about 72 KiB — and a per-message reset clears less.
pub const DEFAULT_MEM_LEVEL: u8 = 8;

/// Compresses messages for one sender (a connection, or a loop with no context takeover).
pub struct Deflater {
    raw: zlib_rs::Deflate,
    takeover: bool,
}

impl Deflater {
    /// A compressor with this window and level and zlib's default memory level; without
    /// `takeover` every message starts afresh.
    pub fn new(window_bits: u8, level: u32, takeover: bool) -> Self {
        Self::with_memory(window_bits, level, DEFAULT_MEM_LEVEL, takeover)
    }

    /// A compressor with an explicit memory level (see [`DEFAULT_MEM_LEVEL`]).
    pub fn with_memory(window_bits: u8, level: u32, mem_level: u8, takeover: bool) -> Self {
        let bits = window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
        let config = zlib_rs::DeflateConfig {
            level: level.min(9) as i32,
            method: zlib_rs::Method::Deflated,
            // Negative: raw DEFLATE, no zlib header.
            window_bits: -i32::from(bits),
            mem_level: i32::from(mem_level.clamp(1, 9)),
            strategy: zlib_rs::Strategy::Default,
        };
        Deflater { raw: zlib_rs::Deflate::new_with_config(config), takeover }
    }

    /// Append `input` compressed, without the `00 00 ff ff` tail, to `out`.
    pub fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.reserve(input.len() / 2 + 64);
        let mut rest = input;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(64));
            }
            let (in_before, out_before) = (self.raw.total_in(), self.raw.total_out());
            // A sync flush of what is left. It only fails on a broken stream state, which a
            // compressor of ours never reaches.
            let _ =
                self.raw.compress_uninit(rest, out.spare_capacity_mut(), zlib_rs::DeflateFlush::SyncFlush);
            let written = (self.raw.total_out() - out_before) as usize;
            // SAFETY: the compressor initialised exactly `written` bytes at the start of the
            // spare capacity it was given (its output counter advanced by that much).
            unsafe { out.set_len(out.len() + written) };
            rest = &rest[(self.raw.total_in() - in_before) as usize..];
            // The flush is complete once it no longer fills the space it was given.
            if rest.is_empty() && out.len() < out.capacity() {
                break;
            }
        }
        if out.len() >= start + 4 && out[out.len() - 4..] == TAIL {
            out.truncate(out.len() - 4);
        }
        if !self.takeover {
            self.raw.reset();
        }
    }
}

/// Why a compressed message could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the size limit (close with 1009).
    TooBig,
    /// It is not valid DEFLATE data (close with 1007).
    Corrupt,
}

/// Decompresses messages from one sender (a connection, or a loop whose clients do not take
/// over context).
pub struct Inflater {
    raw: zlib_rs::Inflate,
    takeover: bool,
}

impl Inflater {
    /// A decompressor with a 32 KiB window (it reads any sender's); without `takeover` it is
    /// reset after every message.
    pub fn new(takeover: bool) -> Self {
        Self::with_window(takeover, MAX_WINDOW_BITS)
    }

    /// A decompressor for a sender known to use at most a `window_bits` window (its memory is
    /// about 7 KiB plus the window).
    pub fn with_window(takeover: bool, window_bits: u8) -> Self {
        Inflater {
            raw: zlib_rs::Inflate::new(false, window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS)),
            takeover,
        }
    }

    /// Inflate one message (`input` without its tail) into `out`, failing as soon as the
    /// output would exceed `max` bytes. `out` is never grown past `max` bytes of capacity: a
    /// message that inflates to more is refused when the output is full at the limit and
    /// zlib still has a byte to give.
    pub fn inflate(&mut self, input: &[u8], out: &mut Vec<u8>, max: usize) -> Result<(), InflateError> {
        out.clear();
        let result = self.inflate_part(input, out, max).and_then(|_| self.inflate_part(&TAIL, out, max));
        if !self.takeover || result.is_err() {
            self.raw.reset(false);
        }
        result
    }

    fn inflate_part(&mut self, mut input: &[u8], out: &mut Vec<u8>, max: usize) -> Result<(), InflateError> {
        // Where zlib writes once `out` is full at the limit: any byte it puts there is one
        // too many.
        let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        loop {
            let limit = out.capacity().min(max);
            if out.len() == limit && limit < max {
                // Grow by doubling (256 bytes to 1 MiB at a time), never past `max`.
                let grow = out.capacity().clamp(256, 1 << 20);
                out.reserve_exact(grow.min(max - out.len()));
            }
            let room = out.capacity().min(max) - out.len();
            let at_limit = room == 0;
            let space = if at_limit { &mut probe[..] } else { &mut out.spare_capacity_mut()[..room] };
            let space_len = space.len();
            let (in_before, out_before) = (self.raw.total_in(), self.raw.total_out());
            let status = self
                .raw
                .decompress_uninit(input, space, zlib_rs::InflateFlush::SyncFlush)
                .map_err(|_| InflateError::Corrupt)?;
            let produced = (self.raw.total_out() - out_before) as usize;
            if at_limit {
                if produced > 0 {
                    return Err(InflateError::TooBig);
                }
            } else {
                // SAFETY: the decompressor initialised exactly `produced` bytes at the start
                // of the spare capacity it was given (its output counter advanced by that much).
                unsafe { out.set_len(out.len() + produced) };
            }
            let used = (self.raw.total_in() - in_before) as usize;
            input = &input[used..];
            match status {
                zlib_rs::Status::StreamEnd => {
                    // A final block: legal, but the next message starts a new stream.
                    if !input.is_empty() {
                        return Err(InflateError::Corrupt);
                    }
                    self.raw.reset(false);
                    return Ok(());
                }
                // The output was not filled: the flush is complete.
                _ if input.is_empty() && produced < space_len => return Ok(()),
                _ if used == 0 && produced == 0 => return Err(InflateError::Corrupt),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::parse_extensions;

    fn offers(v: &str) -> Vec<ExtensionOffer<'_>> {
        let mut out = Vec::new();
        parse_extensions(v, &mut out).unwrap();
        out
    }

    #[test]
    fn plain_offer_is_accepted_as_is() {
        let p = negotiate(&offers("permessage-deflate"), &DeflateConfig::default()).unwrap();
        assert_eq!(p.response(), "permessage-deflate");
    }

    #[test]
    fn browser_offer_with_client_max_window_bits() {
        let cfg = DeflateConfig::default();
        let p = negotiate(&offers("permessage-deflate; client_max_window_bits"), &cfg).unwrap();
        assert_eq!(p.response(), "permessage-deflate");
        let cfg = DeflateConfig { client_max_window_bits: 10, ..cfg };
        let p = negotiate(&offers("permessage-deflate; client_max_window_bits"), &cfg).unwrap();
        assert_eq!(p.response(), "permessage-deflate; client_max_window_bits=10");
    }

    #[test]
    fn server_settings_are_announced() {
        let cfg = DeflateConfig {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: 12,
            ..DeflateConfig::default()
        };
        let p = negotiate(&offers("permessage-deflate"), &cfg).unwrap();
        assert_eq!(
            p.response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12"
        );
    }

    #[test]
    fn client_limits_are_honoured() {
        let o = offers(
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits=11; server_no_context_takeover",
        );
        let p = negotiate(&o, &DeflateConfig::default()).unwrap();
        assert_eq!(p.server_max_window_bits, 10);
        assert_eq!(p.client_max_window_bits, Some(11));
        assert!(p.server_no_context_takeover);
        assert_eq!(
            p.response(),
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=10; client_max_window_bits=11"
        );
    }

    #[test]
    fn invalid_offers_are_declined_and_the_next_one_taken() {
        let cfg = DeflateConfig::default();
        for bad in [
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=0x9",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; unknown_param",
            // Our compressor cannot honour a 256-byte window.
            "permessage-deflate; server_max_window_bits=8",
        ] {
            assert_eq!(negotiate(&offers(bad), &cfg), None, "{bad}");
            let two = format!("{bad}, permessage-deflate; client_max_window_bits");
            assert!(negotiate(&offers(&two), &cfg).is_some(), "fallback after {bad}");
        }
        assert_eq!(negotiate(&offers("x-webkit-deflate-frame"), &cfg), None);
    }

    fn roundtrip(takeover: bool, msgs: &[&[u8]]) -> Vec<usize> {
        let mut d = Deflater::new(15, 6, takeover);
        let mut i = Inflater::new(takeover);
        let mut sizes = Vec::new();
        for m in msgs {
            let mut c = Vec::new();
            d.compress(m, &mut c);
            assert!(!c.ends_with(&TAIL));
            sizes.push(c.len());
            let mut back = Vec::new();
            i.inflate(&c, &mut back, 1 << 20).unwrap();
            assert_eq!(&back, m);
        }
        sizes
    }

    #[test]
    fn rfc_hello_example() {
        // RFC 7692 section 7.2.3.1: "Hello" compressed without context takeover.
        let mut back = Vec::new();
        Inflater::new(false).inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], &mut back, 100).unwrap();
        assert_eq!(back, b"Hello");
        // Section 7.2.3.3: an uncompressed (stored) block.
        Inflater::new(false)
            .inflate(&[0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00], &mut back, 100)
            .unwrap();
        assert_eq!(back, b"Hello");
        let mut c = Vec::new();
        Deflater::new(15, 6, false).compress(b"Hello", &mut c);
        let mut back = Vec::new();
        Inflater::new(false).inflate(&c, &mut back, 100).unwrap();
        assert_eq!(back, b"Hello");
    }

    #[test]
    fn context_takeover_compresses_repeats_better() {
        let msg = br#"{"user":"alice","room":"lobby","text":"hello everyone, how are you today?"}"#;
        let with = roundtrip(true, &[msg, msg, msg]);
        let without = roundtrip(false, &[msg, msg, msg]);
        assert!(with[2] < without[2] / 2, "{with:?} vs {without:?}");
        assert_eq!(without[0], without[2]);
    }

    #[test]
    fn empty_large_and_incompressible_messages() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let noise: Vec<u8> = (0..70_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        roundtrip(false, &[b"", &big, &noise, b"x"]);
        roundtrip(true, &[b"", &big, &noise, b"x"]);
    }

    #[test]
    fn bombs_stop_at_the_limit() {
        let zeros = vec![0u8; 10 << 20];
        let mut c = Vec::new();
        Deflater::new(15, 6, false).compress(&zeros, &mut c);
        assert!(c.len() < 20_000);
        let mut out = Vec::new();
        let mut i = Inflater::new(false);
        assert_eq!(i.inflate(&c, &mut out, 1 << 20), Err(InflateError::TooBig));
        assert!(out.capacity() <= 1 << 20, "grew past the limit: {}", out.capacity());
        // The inflater is usable again afterwards.
        let mut small = Vec::new();
        Deflater::new(15, 6, false).compress(b"ok", &mut small);
        i.inflate(&small, &mut out, 100).unwrap();
        assert_eq!(out, b"ok");
    }

    /// The output buffer never grows past the limit, whatever the limit and however far the
    /// message would inflate: a bomb costs the limit, not twice it.
    #[test]
    fn inflate_buffer_never_grows_past_the_limit() {
        let bomb = {
            let mut c = Vec::new();
            Deflater::new(15, 1, false).compress(&vec![0u8; 64 << 20], &mut c);
            c
        };
        for max in [0, 1, 255, 256, 257, 65_536, 1_000_003, 16 << 20] {
            let mut out = Vec::new();
            assert_eq!(
                Inflater::new(false).inflate(&bomb, &mut out, max),
                Err(InflateError::TooBig),
                "{max}"
            );
            assert!(out.capacity() <= max, "limit {max}: the buffer grew to {}", out.capacity());
        }
    }

    /// A message exactly at the limit is accepted into a buffer of exactly that size; one
    /// byte more is refused without growing it.
    #[test]
    fn inflate_limit_is_exact() {
        let noise: Vec<u8> = (0..200_001u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for len in [0usize, 1, 255, 256, 257, 70_000, 200_001] {
            let msg = &noise[..len];
            let mut c = Vec::new();
            Deflater::new(15, 6, false).compress(msg, &mut c);
            let mut out = Vec::new();
            Inflater::new(false).inflate(&c, &mut out, len).unwrap();
            assert_eq!(out, msg);
            assert!(out.capacity() <= len, "{len}-byte message in a {}-byte buffer", out.capacity());
            if len > 0 {
                let mut out = Vec::new();
                assert_eq!(Inflater::new(false).inflate(&c, &mut out, len - 1), Err(InflateError::TooBig));
                assert!(out.capacity() < len, "limit {}: the buffer grew to {}", len - 1, out.capacity());
            }
        }
    }

    /// A buffer that already has room past the limit (the loop's reused one) is not grown,
    /// and the limit still holds.
    #[test]
    fn inflate_into_a_larger_buffer_keeps_the_limit() {
        let mut c = Vec::new();
        Deflater::new(15, 6, false).compress(&[7u8; 5000], &mut c);
        let mut out = Vec::with_capacity(10_000);
        assert_eq!(Inflater::new(false).inflate(&c, &mut out, 4999), Err(InflateError::TooBig));
        assert_eq!(out.capacity(), 10_000);
        Inflater::new(false).inflate(&c, &mut out, 5000).unwrap();
        assert_eq!(out, [7u8; 5000]);
        assert_eq!(out.capacity(), 10_000);
    }

    #[test]
    fn garbage_is_corrupt() {
        let mut out = Vec::new();
        assert_eq!(
            Inflater::new(false).inflate(&[0xff, 0xff, 0xff, 0xff], &mut out, 1000),
            Err(InflateError::Corrupt)
        );
    }
}
