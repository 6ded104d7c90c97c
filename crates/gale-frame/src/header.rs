//! Frame header decoding and encoding (RFC 6455 section 5.2).
//!
//! Layout: `FIN RSV1 RSV2 RSV3 opcode(4) | MASK len(7) | [ext len 16/64] | [mask key 4]`.
//! A header is 2 to 14 bytes long.
//!
//! Length encodings must be minimal: a 16-bit length below 126 or a 64-bit length below
//! 65,536 is rejected with 1002. RFC 6455 section 5.2 says the minimal number of bytes MUST
//! be used; no conforming sender produces anything else, and refusing the alternative keeps
//! one canonical encoding per frame (which also keeps fuzzed round trips exact).

use crate::close::ProtocolError;

/// The longest possible frame header: 2 + 8 (64-bit length) + 4 (mask key).
pub const MAX_HEADER_LEN: usize = 14;

/// Longest payload a control frame may carry.
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A frame's opcode. Reserved opcodes (3-7, 11-15) have no variant: they fail to decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpCode {
    /// Continues a fragmented message.
    Continuation = 0x0,
    /// First frame of a text message.
    Text = 0x1,
    /// First frame of a binary message.
    Binary = 0x2,
    /// Close control frame.
    Close = 0x8,
    /// Ping control frame.
    Ping = 0x9,
    /// Pong control frame.
    Pong = 0xA,
}

impl OpCode {
    /// The opcode for a 4-bit value, or `None` for a reserved one.
    #[inline]
    pub fn from_u8(v: u8) -> Option<OpCode> {
        Some(match v {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    /// Control frames (close, ping, pong) have the high opcode bit set.
    #[inline]
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// RSV1: set on the first frame of a compressed message (permessage-deflate).
pub const RSV1: u8 = 0x40;
/// RSV2: no extension we know uses it.
pub const RSV2: u8 = 0x20;
/// RSV3: no extension we know uses it.
pub const RSV3: u8 = 0x10;

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Final fragment of a message.
    pub fin: bool,
    /// The reserved bits as they sit in the first byte (`RSV1 | RSV2 | RSV3` mask).
    pub rsv: u8,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key, present on every client-to-server frame.
    pub mask: Option<[u8; 4]>,
    /// The payload length announced by the header.
    pub payload_len: u64,
}

impl FrameHeader {
    /// The RSV1 bit, which marks a compressed message.
    #[inline]
    pub fn rsv1(&self) -> bool {
        self.rsv & RSV1 != 0
    }

    /// Length of this header once encoded.
    #[inline]
    pub fn encoded_len(&self) -> usize {
        header_len(self.payload_len, self.mask.is_some())
    }

    /// Decode a header from the start of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` holds only part of a header, and otherwise the header and
    /// its length in bytes. Checks what the header alone can tell: reserved opcodes, control
    /// frames that are fragmented or longer than 125 bytes, a 64-bit length with its top bit
    /// set, and non-minimal length encodings, all with close code 1002. Rules that depend on
    /// the connection (masking direction, negotiated RSV bits, fragmentation order, size
    /// limits) are checked by [`crate::Decoder`].
    #[inline]
    pub fn decode(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, ProtocolError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let b0 = buf[0];
        let b1 = buf[1];
        let fin = b0 & 0x80 != 0;
        let rsv = b0 & (RSV1 | RSV2 | RSV3);
        let opcode = OpCode::from_u8(b0 & 0x0F).ok_or(ProtocolError::protocol("reserved opcode"))?;
        let masked = b1 & 0x80 != 0;
        let len7 = b1 & 0x7F;
        if opcode.is_control() {
            if !fin {
                return Err(ProtocolError::protocol("fragmented control frame"));
            }
            if len7 > MAX_CONTROL_PAYLOAD as u8 {
                return Err(ProtocolError::protocol("control frame longer than 125 bytes"));
            }
        }
        let (payload_len, mut pos) = match len7 {
            126 => {
                if buf.len() < 4 {
                    return Ok(None);
                }
                let len = u16::from_be_bytes([buf[2], buf[3]]) as u64;
                if len < 126 {
                    return Err(ProtocolError::protocol("non-minimal 16-bit length"));
                }
                (len, 4)
            }
            127 => {
                if buf.len() < 10 {
                    return Ok(None);
                }
                let mut be = [0u8; 8];
                be.copy_from_slice(&buf[2..10]);
                let len = u64::from_be_bytes(be);
                if len >> 63 != 0 {
                    return Err(ProtocolError::protocol("64-bit length with the top bit set"));
                }
                if len <= u16::MAX as u64 {
                    return Err(ProtocolError::protocol("non-minimal 64-bit length"));
                }
                (len, 10)
            }
            n => (n as u64, 2),
        };
        let mask = if masked {
            if buf.len() < pos + 4 {
                return Ok(None);
            }
            let key = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
            pos += 4;
            Some(key)
        } else {
            None
        };
        Ok(Some((FrameHeader { fin, rsv, opcode, mask, payload_len }, pos)))
    }

    /// Encode this header into the start of `out`, returning its length.
    ///
    /// # Panics
    /// If `out` is shorter than [`FrameHeader::encoded_len`] (at most [`MAX_HEADER_LEN`]).
    #[inline]
    pub fn encode(&self, out: &mut [u8]) -> usize {
        let mut b0 = self.opcode as u8 | (self.rsv & (RSV1 | RSV2 | RSV3));
        if self.fin {
            b0 |= 0x80;
        }
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        out[0] = b0;
        let mut pos = if self.payload_len < 126 {
            out[1] = mask_bit | self.payload_len as u8;
            2
        } else if self.payload_len <= u16::MAX as u64 {
            out[1] = mask_bit | 126;
            out[2..4].copy_from_slice(&(self.payload_len as u16).to_be_bytes());
            4
        } else {
            out[1] = mask_bit | 127;
            out[2..10].copy_from_slice(&self.payload_len.to_be_bytes());
            10
        };
        if let Some(key) = self.mask {
            out[pos..pos + 4].copy_from_slice(&key);
            pos += 4;
        }
        pos
    }
}

/// Length of a header for a payload of `payload_len` bytes, with or without a mask key.
#[inline]
pub const fn header_len(payload_len: u64, masked: bool) -> usize {
    let base = if payload_len < 126 {
        2
    } else if payload_len <= u16::MAX as u64 {
        4
    } else {
        10
    };
    if masked { base + 4 } else { base }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CloseCode;

    fn decode_all(bytes: &[u8]) -> (FrameHeader, usize) {
        FrameHeader::decode(bytes).unwrap().unwrap()
    }

    fn err(bytes: &[u8]) -> ProtocolError {
        FrameHeader::decode(bytes).unwrap_err()
    }

    #[test]
    fn rfc_single_frame_unmasked_hello() {
        let (h, n) = decode_all(&[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        assert_eq!(n, 2);
        assert!(h.fin);
        assert_eq!(h.opcode, OpCode::Text);
        assert_eq!(h.mask, None);
        assert_eq!(h.payload_len, 5);
    }

    #[test]
    fn rfc_single_frame_masked_hello() {
        let (h, n) = decode_all(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]);
        assert_eq!(n, 6);
        assert_eq!(h.mask, Some([0x37, 0xfa, 0x21, 0x3d]));
        assert_eq!(h.payload_len, 5);
    }

    #[test]
    fn rfc_fragmented_hello_headers() {
        let (h, _) = decode_all(&[0x01, 0x03, 0x48, 0x65, 0x6c]);
        assert!(!h.fin);
        assert_eq!(h.opcode, OpCode::Text);
        let (h, _) = decode_all(&[0x80, 0x02, 0x6c, 0x6f]);
        assert!(h.fin);
        assert_eq!(h.opcode, OpCode::Continuation);
    }

    #[test]
    fn rfc_ping_and_pong() {
        let (h, _) = decode_all(&[0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        assert_eq!(h.opcode, OpCode::Ping);
        let (h, n) = decode_all(&[0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]);
        assert_eq!(h.opcode, OpCode::Pong);
        assert_eq!(n, 6);
    }

    #[test]
    fn rfc_256_bytes_and_64k_lengths() {
        let (h, n) = decode_all(&[0x82, 0x7E, 0x01, 0x00]);
        assert_eq!((h.opcode, h.payload_len, n), (OpCode::Binary, 256, 4));
        let (h, n) = decode_all(&[0x82, 0x7F, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00]);
        assert_eq!((h.payload_len, n), (65536, 10));
    }

    #[test]
    fn partial_headers_need_more() {
        let full = [0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4];
        for cut in 0..full.len() {
            assert_eq!(FrameHeader::decode(&full[..cut]).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(decode_all(&full).1, 14);
    }

    #[test]
    fn rejects_reserved_opcodes() {
        for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            let e = err(&[0x80 | op, 0x00]);
            assert_eq!(e.code, CloseCode::PROTOCOL_ERROR, "opcode {op}");
        }
    }

    #[test]
    fn rejects_bad_control_frames() {
        assert_eq!(err(&[0x09, 0x00]).reason, "fragmented control frame");
        assert_eq!(err(&[0x89, 126, 0, 126]).reason, "control frame longer than 125 bytes");
        assert!(FrameHeader::decode(&[0x89, 125]).is_ok());
    }

    #[test]
    fn rejects_top_bit_and_non_minimal_lengths() {
        assert_eq!(err(&[0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0]).code, CloseCode::PROTOCOL_ERROR);
        assert_eq!(err(&[0x82, 126, 0, 125]).reason, "non-minimal 16-bit length");
        assert_eq!(err(&[0x82, 127, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF]).reason, "non-minimal 64-bit length");
        assert!(FrameHeader::decode(&[0x82, 126, 0, 126]).unwrap().is_some());
    }

    #[test]
    fn encode_decode_roundtrip_boundaries() {
        for len in [0u64, 1, 125, 126, 127, 65535, 65536, 1 << 32, (1 << 63) - 1] {
            for mask in [None, Some([1, 2, 3, 4])] {
                for (op, fin) in [(OpCode::Binary, true), (OpCode::Text, false), (OpCode::Continuation, true)]
                {
                    let h = FrameHeader { fin, rsv: RSV1, opcode: op, mask, payload_len: len };
                    let mut out = [0u8; MAX_HEADER_LEN];
                    let n = h.encode(&mut out);
                    assert_eq!(n, h.encoded_len());
                    assert_eq!(decode_all(&out[..n]), (h, n));
                }
            }
        }
    }
}
