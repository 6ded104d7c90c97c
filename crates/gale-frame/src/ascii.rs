//! How many leading bytes of a buffer are ASCII, found with wide OR-reductions.
//!
//! Most text on a WebSocket (JSON, chat in Latin script) is ASCII, and ASCII needs no UTF-8
//! state machine: a block is valid when no byte has its top bit set. simdutf8 has the same
//! shortcut, but 64 bytes a step and with a copy of its partial last block into a padded
//! buffer; this scan ORs 128 bytes a step and reads the last bytes with one overlapping load.
//! That matters when text arrives in pieces of a packet or so: [`Utf8Stream`](crate::Utf8Stream)
//! skips the ASCII prefix of each piece and hands only the rest to simdutf8.

/// Inputs shorter than this are left to the validator: for them a call and a dispatch cost
/// more than the shortcut saves.
const MIN_LEN: usize = 256;

/// The length of a prefix of `bytes` that is all ASCII: `bytes.len()` when every byte is,
/// otherwise some count not past the first non-ASCII byte (it may stop short of it by up to
/// one block; 0 for short inputs). Every such prefix ends on a character boundary.
#[inline]
pub(crate) fn ascii_prefix_len(bytes: &[u8]) -> usize {
    if bytes.len() < MIN_LEN { 0 } else { scan(bytes) }
}

/// Inputs up to this length are checked by [`is_short_ascii`]; longer ones are left to the
/// validator, whose own ASCII path is as fast from there on.
pub(crate) const SHORT_MAX: usize = 64;

/// Whether `bytes`, at most [`SHORT_MAX`] long, is all ASCII: a few overlapping word loads
/// ORed together. For short text std's validator (where simdutf8 sends inputs under 64
/// bytes) costs about five instructions a byte; this costs about one a word.
#[inline]
pub(crate) fn is_short_ascii(bytes: &[u8]) -> bool {
    debug_assert!(bytes.len() <= SHORT_MAX);
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let n = bytes.len();
    let word = |i: usize| u64::from_ne_bytes(bytes[i..i + 8].try_into().unwrap());
    // Words that overlap when `n` is not a multiple of 8: up to 32 bytes without a loop.
    let bits = if n > 32 {
        let mut bits = word(n - 8);
        let mut i = 0;
        while i + 8 < n {
            bits |= word(i);
            i += 8;
        }
        bits
    } else if n > 16 {
        word(0) | word(8) | word(n - 16) | word(n - 8)
    } else if n >= 8 {
        word(0) | word(n - 8)
    } else if n >= 4 {
        let word = |i: usize| u64::from(u32::from_ne_bytes(bytes[i..i + 4].try_into().unwrap()));
        word(0) | word(n - 4)
    } else if n > 0 {
        // The first, middle and last byte cover all of 1 to 3 bytes.
        u64::from(bytes[0] | bytes[n / 2] | bytes[n - 1])
    } else {
        0
    };
    bits & HIGH == 0
}

/// Out of line, so that callers validating short text stay as small as before.
#[inline(never)]
fn scan(bytes: &[u8]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected on this CPU on the line above, and `bytes` holds at
        // least `MIN_LEN >= 32` bytes.
        return unsafe { x86::prefix_avx2(bytes) };
    }
    prefix_words(bytes)
}

/// Portable scan, 32 bytes a step as four 8-byte words.
fn prefix_words(bytes: &[u8]) -> usize {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let mut chunks = bytes.chunks_exact(32);
    let mut done = 0;
    for c in &mut chunks {
        let word = |i: usize| u64::from_ne_bytes(c[i..i + 8].try_into().unwrap());
        if (word(0) | word(8) | word(16) | word(24)) & HIGH != 0 {
            return done;
        }
        done += 32;
    }
    if chunks.remainder().is_ascii() { bytes.len() } else { done }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2, and `bytes` must hold at least 32 bytes.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn prefix_avx2(bytes: &[u8]) -> usize {
        debug_assert!(bytes.len() >= 32);
        let p = bytes.as_ptr();
        let load = |at: usize| {
            // SAFETY: every caller below passes `at + 32 <= bytes.len()`; the load has no
            // alignment requirement.
            unsafe { _mm256_loadu_si256(p.add(at) as *const __m256i) }
        };
        let n = bytes.len();
        let mut at = 0;
        while at + 128 <= n {
            let any = _mm256_or_si256(
                _mm256_or_si256(load(at), load(at + 32)),
                _mm256_or_si256(load(at + 64), load(at + 96)),
            );
            // The sign bit of each byte is its top bit.
            if _mm256_movemask_epi8(any) != 0 {
                return at;
            }
            at += 128;
        }
        while at + 32 <= n {
            if _mm256_movemask_epi8(load(at)) != 0 {
                return at;
            }
            at += 32;
        }
        // The last 1 to 31 bytes: one load of the last 32, which overlaps bytes already seen.
        if at < n && _mm256_movemask_epi8(load(n - 32)) != 0 {
            return at;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What a prefix length must satisfy: all ASCII, and the whole input when the input is
    /// ASCII and not too short for the shortcut.
    fn check(bytes: &[u8], got: usize) {
        assert!(got <= bytes.len());
        assert!(bytes[..got].is_ascii(), "prefix of {got} is not ASCII");
        if bytes.is_ascii() && bytes.len() >= MIN_LEN {
            assert_eq!(got, bytes.len());
        }
    }

    #[test]
    fn one_high_byte_anywhere() {
        for len in [0, 1, 31, 32, 63, 64, 65, 127, 128, 129, 200, 1500, 4096] {
            let ascii = vec![b'a'; len];
            check(&ascii, ascii_prefix_len(&ascii));
            check(&ascii, prefix_words(&ascii));
            for at in 0..len {
                let mut b = ascii.clone();
                b[at] = 0x80 | (at as u8);
                check(&b, ascii_prefix_len(&b));
                check(&b, prefix_words(&b));
            }
        }
    }

    #[test]
    fn short_ascii_sees_a_high_bit_at_every_position() {
        for len in 0..=SHORT_MAX {
            let ascii = vec![b'a'; len];
            assert!(is_short_ascii(&ascii), "all ASCII, {len} bytes");
            for at in 0..len {
                let mut b = ascii.clone();
                b[at] = 0x80;
                assert!(!is_short_ascii(&b), "high byte at {at} of {len} missed");
            }
        }
    }

    proptest! {
        #[test]
        fn prefix_is_ascii(bytes in proptest::collection::vec(prop_oneof![9 => 0u8..0x80, 1 => any::<u8>()], 0..700)) {
            check(&bytes, ascii_prefix_len(&bytes));
            check(&bytes, prefix_words(&bytes));
        }
    }
}
