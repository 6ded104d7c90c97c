//! The send side: frames written into the caller's buffers, without allocating.
//!
//! Server frames go out unmasked; client frames carry a fresh key chosen by the caller and
//! are masked while being copied. [`SharedFrame`] encodes a message once so that a publish
//! to many connections copies bytes instead of framing them again.

use std::sync::Arc;

use crate::close::CloseCode;
use crate::header::{FrameHeader, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, OpCode, RSV1, header_len};
use crate::mask::apply_mask;

/// The output buffer cannot hold the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferTooSmall {
    /// Bytes the frame needs.
    pub needed: usize,
}

impl std::fmt::Display for BufferTooSmall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "output buffer too small: frame needs {} bytes", self.needed)
    }
}

impl std::error::Error for BufferTooSmall {}

/// How one frame is to be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameSpec {
    /// The opcode (`Continuation` for the second and later fragments).
    pub opcode: OpCode,
    /// Last fragment of the message.
    pub fin: bool,
    /// Set RSV1: the message is compressed (first fragment only).
    pub compressed: bool,
    /// Masking key; `Some` for frames a client sends.
    pub mask: Option<[u8; 4]>,
}

impl FrameSpec {
    /// A whole, unmasked, uncompressed message: what a server sends.
    pub const fn server(opcode: OpCode) -> Self {
        FrameSpec { opcode, fin: true, compressed: false, mask: None }
    }

    /// A whole, uncompressed message masked with `key`: what a client sends.
    pub const fn client(opcode: OpCode, key: [u8; 4]) -> Self {
        FrameSpec { opcode, fin: true, compressed: false, mask: Some(key) }
    }

    fn header(&self, payload_len: usize) -> FrameHeader {
        FrameHeader {
            fin: self.fin,
            rsv: if self.compressed { RSV1 } else { 0 },
            opcode: self.opcode,
            mask: self.mask,
            payload_len: payload_len as u64,
        }
    }
}

/// Bytes a frame takes on the wire.
#[inline]
pub const fn frame_len(payload_len: usize, masked: bool) -> usize {
    header_len(payload_len as u64, masked) + payload_len
}

/// Write the header for a payload of `payload_len` bytes into `out`; returns its length.
/// For a masked frame the caller must mask the payload itself (see [`crate::apply_mask`]).
///
/// # Panics
/// If `out` is shorter than the header (at most [`MAX_HEADER_LEN`] bytes).
#[inline]
pub fn write_header(out: &mut [u8], spec: FrameSpec, payload_len: usize) -> usize {
    spec.header(payload_len).encode(out)
}

/// Write a whole frame (header, then the payload, masked if the spec says so) into `out`.
/// Returns the frame's length.
#[inline]
pub fn encode_frame(out: &mut [u8], spec: FrameSpec, payload: &[u8]) -> Result<usize, BufferTooSmall> {
    let needed = frame_len(payload.len(), spec.mask.is_some());
    if out.len() < needed {
        return Err(BufferTooSmall { needed });
    }
    let n = write_header(out, spec, payload.len());
    let body = &mut out[n..needed];
    body.copy_from_slice(payload);
    if let Some(key) = spec.mask {
        apply_mask(body, key, 0);
    }
    Ok(needed)
}

/// Append a whole frame to `out`. Allocates only if `out` lacks the capacity.
#[inline]
pub fn append_frame(out: &mut Vec<u8>, spec: FrameSpec, payload: &[u8]) {
    let mut header = [0u8; MAX_HEADER_LEN];
    let n = write_header(&mut header, spec, payload.len());
    out.reserve(n + payload.len());
    out.extend_from_slice(&header[..n]);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = spec.mask {
        apply_mask(&mut out[start..], key, 0);
    }
}

/// The payload of a close frame: a code and a reason, the reason cut at a character boundary
/// to fit the 125-byte limit of control frames.
#[derive(Clone, Copy, Debug)]
pub struct ClosePayload {
    bytes: [u8; MAX_CONTROL_PAYLOAD],
    len: u8,
}

impl ClosePayload {
    /// Build the payload for `code` and `reason`.
    pub fn new(code: CloseCode, reason: &str) -> Self {
        let mut bytes = [0u8; MAX_CONTROL_PAYLOAD];
        bytes[..2].copy_from_slice(&code.0.to_be_bytes());
        let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        bytes[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
        ClosePayload { bytes, len: (2 + cut) as u8 }
    }

    /// An empty payload: a close frame without a status code.
    pub fn empty() -> Self {
        ClosePayload { bytes: [0; MAX_CONTROL_PAYLOAD], len: 0 }
    }

    /// The encoded payload.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// A server frame encoded once and shared: publishing to many connections clones the `Arc`
/// and copies these bytes into each connection's output, without framing again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedFrame {
    bytes: Arc<[u8]>,
}

impl SharedFrame {
    /// Encode a whole unmasked message.
    pub fn new(opcode: OpCode, payload: &[u8]) -> Self {
        Self::with_spec(FrameSpec::server(opcode), payload)
    }

    /// Encode a whole unmasked message with the given spec (e.g. compressed).
    pub fn with_spec(spec: FrameSpec, payload: &[u8]) -> Self {
        let mut out = Vec::with_capacity(frame_len(payload.len(), spec.mask.is_some()));
        append_frame(&mut out, spec, payload);
        SharedFrame { bytes: out.into() }
    }

    /// The frame as it goes on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_examples_encode_exactly() {
        let mut out = [0u8; 64];
        let n = encode_frame(&mut out, FrameSpec::server(OpCode::Text), b"Hello").unwrap();
        assert_eq!(&out[..n], &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);

        let key = [0x37, 0xfa, 0x21, 0x3d];
        let n = encode_frame(&mut out, FrameSpec::client(OpCode::Text, key), b"Hello").unwrap();
        assert_eq!(&out[..n], &[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]);

        let first = FrameSpec { fin: false, ..FrameSpec::server(OpCode::Text) };
        let n = encode_frame(&mut out, first, b"Hel").unwrap();
        assert_eq!(&out[..n], &[0x01, 0x03, 0x48, 0x65, 0x6c]);
        let n = encode_frame(&mut out, FrameSpec::server(OpCode::Continuation), b"lo").unwrap();
        assert_eq!(&out[..n], &[0x80, 0x02, 0x6c, 0x6f]);

        let n = encode_frame(&mut out, FrameSpec::server(OpCode::Ping), b"Hello").unwrap();
        assert_eq!(&out[..n], &[0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
    }

    #[test]
    fn rfc_256_and_64k_binary_headers() {
        let payload = vec![7u8; 256];
        let mut v = Vec::new();
        append_frame(&mut v, FrameSpec::server(OpCode::Binary), &payload);
        assert_eq!(&v[..4], &[0x82, 0x7E, 0x01, 0x00]);
        assert_eq!(v.len(), 260);
        let payload = vec![7u8; 65536];
        let mut v = Vec::new();
        append_frame(&mut v, FrameSpec::server(OpCode::Binary), &payload);
        assert_eq!(&v[..10], &[0x82, 0x7F, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00]);
        assert_eq!(v.len(), 65546);
    }

    #[test]
    fn too_small_buffer_is_reported() {
        let mut out = [0u8; 6];
        assert_eq!(
            encode_frame(&mut out, FrameSpec::server(OpCode::Text), b"Hello"),
            Err(BufferTooSmall { needed: 7 })
        );
    }

    #[test]
    fn close_payload_truncates_on_char_boundary() {
        let p = ClosePayload::new(CloseCode(4000), "bye");
        assert_eq!(p.as_bytes(), &[0x0F, 0xA0, b'b', b'y', b'e']);
        let long = "é".repeat(100);
        let p = ClosePayload::new(CloseCode::NORMAL, &long);
        assert!(p.as_bytes().len() <= 125);
        assert!(std::str::from_utf8(&p.as_bytes()[2..]).is_ok());
        assert_eq!(p.as_bytes().len(), 124);
    }

    #[test]
    fn shared_frame_matches_append() {
        let f = SharedFrame::new(OpCode::Text, b"tick");
        let mut v = Vec::new();
        append_frame(&mut v, FrameSpec::server(OpCode::Text), b"tick");
        assert_eq!(f.as_bytes(), &v[..]);
    }
}
