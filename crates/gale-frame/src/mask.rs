//! XOR masking of payloads in place (RFC 6455 section 5.3), with SIMD kernels.
//!
//! Every kernel takes the key already rotated to the phase of the first byte, so a frame
//! whose payload arrives in several reads continues mid-key: the byte at payload offset `i`
//! is XORed with `key[i % 4]`. On x86_64 the best kernel (AVX-512, AVX2, SSE2) is chosen once
//! at first use from the CPU's features; aarch64 always has NEON; other targets use a
//! portable loop that works eight bytes at a time.

use std::sync::atomic::{AtomicU8, Ordering};

/// Buffers shorter than this skip the dispatch and use the inline word loop (which the
/// compiler vectorizes with SSE2): for the short messages that dominate chat traffic the call
/// through the selector costs more than it saves. Measured on Zen 4, the inline loop is faster
/// up to 127 bytes (64 bytes: 3.5 ns against 5.2 ns through the AVX-512 kernel).
const SMALL: usize = 128;

/// Buffers up to this length are masked inline by [`mask_short`]: two loads and two stores,
/// no call, and a loop only for the one to three bytes of the shortest buffers (a 20-byte
/// chat message took 46 instructions to unmask through [`mask_words`], most of them the call
/// and the set-up of a loop that runs twice; 12 now).
const SHORT: usize = 32;

/// XOR `buf` with `key`, where `buf` starts at byte `phase` of the payload (any value; only
/// `phase % 4` matters). Masking and unmasking are the same operation.
///
/// Always inline: for a short message the call cost as much as the masking, and the decoder
/// calls it on every message.
#[inline(always)]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], phase: usize) {
    let key = rotate_key(key, phase);
    if buf.len() <= SHORT {
        mask_short(buf, key);
    } else if buf.len() < SMALL {
        mask_words(buf, key);
    } else {
        dispatch(buf, key);
    }
}

/// The key as seen from byte `phase` of the payload.
#[inline]
pub fn rotate_key(key: [u8; 4], phase: usize) -> [u8; 4] {
    // One rotate instruction; `<[u8]>::rotate_left` with a run-time amount becomes calls to
    // `memcpy` and `memmove`.
    u32::from_le_bytes(key).rotate_right(8 * (phase & 3) as u32).to_le_bytes()
}

/// A named masking kernel, for tests and benchmarks that compare them.
#[derive(Clone, Copy)]
pub struct Kernel {
    /// Short name: `bytes`, `words`, `sse2`, `avx2`, `avx512` or `neon`.
    pub name: &'static str,
    /// Mask `buf` with a key already rotated to the phase of `buf[0]`.
    pub run: fn(&mut [u8], [u8; 4]),
}

/// Every kernel this CPU can run, slowest first.
pub fn kernels() -> Vec<Kernel> {
    let mut list = vec![Kernel { name: "bytes", run: mask_bytes }, Kernel { name: "words", run: mask_words }];
    #[cfg(target_arch = "x86_64")]
    {
        list.push(Kernel { name: "sse2", run: x86::sse2 });
        if std::is_x86_feature_detected!("avx2") {
            list.push(Kernel { name: "avx2", run: x86::avx2_checked });
        }
        if std::is_x86_feature_detected!("avx512f") {
            list.push(Kernel { name: "avx512", run: x86::avx512_checked });
        }
    }
    #[cfg(target_arch = "aarch64")]
    list.push(Kernel { name: "neon", run: arm::neon });
    list
}

/// Name of the kernel [`apply_mask`] uses for buffers of 128 bytes and more.
pub fn selected_kernel() -> &'static str {
    match level() {
        Level::Avx512 => "avx512",
        Level::Avx2 => "avx2",
        Level::Sse2 => "sse2",
        Level::Neon => "neon",
        Level::Words => "words",
    }
}

/// The reference loop: one byte at a time.
pub fn mask_bytes(buf: &mut [u8], key: [u8; 4]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// Buffers of at most [`SHORT`] bytes: the first and the last word of the widest size that
/// fits, each XORed with the key at its own offset. Both words are read before either is
/// written back, so where they overlap each store writes the same, correctly masked bytes.
#[inline(always)]
fn mask_short(buf: &mut [u8], key: [u8; 4]) {
    let n = buf.len();
    debug_assert!(n <= SHORT);
    // The key repeated over a word, as seen from byte `at` of `buf`.
    let k32 = |at: usize| u32::from_ne_bytes(rotate_key(key, at));
    let k64 = |at: usize| u64::from(k32(at)) | u64::from(k32(at)) << 32;
    if n >= 16 {
        let k128 = |at: usize| u128::from(k64(at)) | u128::from(k64(at)) << 64;
        let first = u128::from_ne_bytes(buf[..16].try_into().unwrap()) ^ k128(0);
        let last = u128::from_ne_bytes(buf[n - 16..].try_into().unwrap()) ^ k128(n - 16);
        buf[n - 16..].copy_from_slice(&last.to_ne_bytes());
        buf[..16].copy_from_slice(&first.to_ne_bytes());
    } else if n >= 8 {
        let first = u64::from_ne_bytes(buf[..8].try_into().unwrap()) ^ k64(0);
        let last = u64::from_ne_bytes(buf[n - 8..].try_into().unwrap()) ^ k64(n - 8);
        buf[n - 8..].copy_from_slice(&last.to_ne_bytes());
        buf[..8].copy_from_slice(&first.to_ne_bytes());
    } else if n >= 4 {
        let first = u32::from_ne_bytes(buf[..4].try_into().unwrap()) ^ k32(0);
        let last = u32::from_ne_bytes(buf[n - 4..].try_into().unwrap()) ^ k32(n - 4);
        buf[n - 4..].copy_from_slice(&last.to_ne_bytes());
        buf[..4].copy_from_slice(&first.to_ne_bytes());
    } else {
        mask_bytes(buf, key);
    }
}

/// Portable loop, eight bytes at a time, then the tail byte by byte.
#[inline]
pub fn mask_words(buf: &mut [u8], key: [u8; 4]) {
    let k32 = u32::from_ne_bytes(key) as u64;
    let k64 = k32 | (k32 << 32);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let w = u64::from_ne_bytes(c.try_into().unwrap()) ^ k64;
        c.copy_from_slice(&w.to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so the key phase is unchanged; so does its
    // second half when it holds four bytes or more (a 20-byte message: two words, one half).
    let mut rest = chunks.into_remainder();
    if rest.len() >= 4 {
        let (half, tail) = rest.split_at_mut(4);
        let w = u32::from_ne_bytes((&*half).try_into().unwrap()) ^ k32 as u32;
        half.copy_from_slice(&w.to_ne_bytes());
        rest = tail;
    }
    mask_bytes(rest, key);
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Level {
    Words = 1,
    Sse2 = 2,
    Avx2 = 3,
    Avx512 = 4,
    Neon = 5,
}

/// 0 until the first call detects the CPU's features.
static LEVEL: AtomicU8 = AtomicU8::new(0);

#[inline]
fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        1 => Level::Words,
        2 => Level::Sse2,
        3 => Level::Avx2,
        4 => Level::Avx512,
        5 => Level::Neon,
        _ => detect(),
    }
}

#[cold]
fn detect() -> Level {
    let level = detect_level();
    LEVEL.store(level as u8, Ordering::Relaxed);
    level
}

#[cfg(target_arch = "x86_64")]
fn detect_level() -> Level {
    // `GALE_MASK_KERNEL` pins a lower kernel, to compare them in whole-server benchmarks.
    let wanted = std::env::var("GALE_MASK_KERNEL").ok();
    let allow = |name: &str| wanted.as_deref().is_none_or(|w| w == name);
    if allow("avx512") && std::is_x86_feature_detected!("avx512f") {
        Level::Avx512
    } else if allow("avx2") && std::is_x86_feature_detected!("avx2") {
        Level::Avx2
    } else if allow("sse2") {
        Level::Sse2
    } else {
        Level::Words
    }
}

#[cfg(target_arch = "aarch64")]
fn detect_level() -> Level {
    Level::Neon
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn detect_level() -> Level {
    Level::Words
}

#[inline]
fn dispatch(buf: &mut [u8], key: [u8; 4]) {
    match level() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Level::Avx512` is only stored after `avx512f` was detected on this CPU.
        Level::Avx512 => unsafe { x86::avx512(buf, key) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Level::Avx2` is only stored after `avx2` was detected on this CPU.
        Level::Avx2 => unsafe { x86::avx2(buf, key) },
        #[cfg(target_arch = "x86_64")]
        Level::Sse2 => x86::sse2(buf, key),
        #[cfg(target_arch = "aarch64")]
        Level::Neon => arm::neon(buf, key),
        _ => mask_words(buf, key),
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{mask_words, rotate_key};
    use std::arch::x86_64::*;

    /// Buffers at least this long are first brought to a boundary of the vector width, so
    /// that no load or store of the main loop straddles two cache lines. A payload sits a
    /// header's length (2 to 14 bytes) past the start of a read, so it is almost never
    /// aligned; unaligned, a 64 KiB one unmasks at about two thirds of the aligned speed.
    const ALIGN_FROM: usize = 256;

    /// Mask the start of `$buf` up to and including its first whole `$w`-byte-aligned vector
    /// when the buffer is at least `ALIGN_FROM` long, and rebind `$buf` and `$key` to the rest,
    /// which then starts on a `$w`-byte boundary, and the key at its phase. Both vectors, the
    /// unaligned one at the start and the aligned one that overlaps it, are loaded before
    /// either is stored, and the aligned one is stored last, so each byte is masked once.
    macro_rules! align_head {
        ($buf:ident, $key:ident, $w:expr, $vec:ty, $set1:ident, $loadu:ident, $storeu:ident, $xor:ident) => {
            let head = $buf.as_ptr().addr().wrapping_neg() & ($w - 1);
            let ($buf, $key) = if head != 0 && $buf.len() >= ALIGN_FROM {
                let p = $buf.as_mut_ptr();
                let next = rotate_key($key, head);
                // SAFETY: `head < $w` and the buffer holds at least `ALIGN_FROM >= 2 * $w`
                // bytes, so the `$w` bytes at `p` and at `p + head` are inside it; these
                // loads and stores have no alignment requirement.
                unsafe {
                    let first = $loadu(p as *const $vec);
                    let aligned = $loadu(p.add(head) as *const $vec);
                    $storeu(p as *mut $vec, $xor(first, $set1(i32::from_ne_bytes($key))));
                    $storeu(p.add(head) as *mut $vec, $xor(aligned, $set1(i32::from_ne_bytes(next))));
                }
                // `$w` is a multiple of 4: the key phase after the aligned vector is `next`.
                (&mut $buf[head + $w..], next)
            } else {
                ($buf, $key)
            };
        };
    }

    /// SSE2 is part of the x86_64 baseline, so this kernel needs no detection.
    pub fn sse2(buf: &mut [u8], key: [u8; 4]) {
        // SAFETY: every x86_64 CPU has SSE2.
        unsafe { sse2_impl(buf, key) }
    }

    #[target_feature(enable = "sse2")]
    unsafe fn sse2_impl(buf: &mut [u8], key: [u8; 4]) {
        align_head!(buf, key, 16, __m128i, _mm_set1_epi32, _mm_loadu_si128, _mm_storeu_si128, _mm_xor_si128);
        let k = _mm_set1_epi32(i32::from_ne_bytes(key));
        let mut chunks = buf.chunks_exact_mut(64);
        for c in &mut chunks {
            let p = c.as_mut_ptr() as *mut __m128i;
            // SAFETY: `c` is exactly 64 bytes, so the four 16-byte unaligned loads and
            // stores stay inside it.
            unsafe {
                let a = _mm_loadu_si128(p);
                let b = _mm_loadu_si128(p.add(1));
                let c2 = _mm_loadu_si128(p.add(2));
                let d = _mm_loadu_si128(p.add(3));
                _mm_storeu_si128(p, _mm_xor_si128(a, k));
                _mm_storeu_si128(p.add(1), _mm_xor_si128(b, k));
                _mm_storeu_si128(p.add(2), _mm_xor_si128(c2, k));
                _mm_storeu_si128(p.add(3), _mm_xor_si128(d, k));
            }
        }
        let mut rest = chunks.into_remainder().chunks_exact_mut(16);
        for c in &mut rest {
            let p = c.as_mut_ptr() as *mut __m128i;
            // SAFETY: `c` is exactly 16 bytes.
            unsafe { _mm_storeu_si128(p, _mm_xor_si128(_mm_loadu_si128(p), k)) };
        }
        // Every block above is a multiple of 4 bytes: the key phase is unchanged.
        mask_words(rest.into_remainder(), key);
    }

    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn avx2(buf: &mut [u8], key: [u8; 4]) {
        align_head!(
            buf,
            key,
            32,
            __m256i,
            _mm256_set1_epi32,
            _mm256_loadu_si256,
            _mm256_storeu_si256,
            _mm256_xor_si256
        );
        let k = _mm256_set1_epi32(i32::from_ne_bytes(key));
        let mut chunks = buf.chunks_exact_mut(128);
        for c in &mut chunks {
            let p = c.as_mut_ptr() as *mut __m256i;
            // SAFETY: `c` is exactly 128 bytes, so the four 32-byte unaligned loads and
            // stores stay inside it.
            unsafe {
                let a = _mm256_loadu_si256(p);
                let b = _mm256_loadu_si256(p.add(1));
                let c2 = _mm256_loadu_si256(p.add(2));
                let d = _mm256_loadu_si256(p.add(3));
                _mm256_storeu_si256(p, _mm256_xor_si256(a, k));
                _mm256_storeu_si256(p.add(1), _mm256_xor_si256(b, k));
                _mm256_storeu_si256(p.add(2), _mm256_xor_si256(c2, k));
                _mm256_storeu_si256(p.add(3), _mm256_xor_si256(d, k));
            }
        }
        let mut rest = chunks.into_remainder().chunks_exact_mut(32);
        for c in &mut rest {
            let p = c.as_mut_ptr() as *mut __m256i;
            // SAFETY: `c` is exactly 32 bytes.
            unsafe { _mm256_storeu_si256(p, _mm256_xor_si256(_mm256_loadu_si256(p), k)) };
        }
        mask_words(rest.into_remainder(), key);
    }

    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(buf: &mut [u8], key: [u8; 4]) {
        align_head!(
            buf,
            key,
            64,
            __m512i,
            _mm512_set1_epi32,
            _mm512_loadu_si512,
            _mm512_storeu_si512,
            _mm512_xor_si512
        );
        let k = _mm512_set1_epi32(i32::from_ne_bytes(key));
        let mut chunks = buf.chunks_exact_mut(256);
        for c in &mut chunks {
            let p = c.as_mut_ptr() as *mut __m512i;
            // SAFETY: `c` is exactly 256 bytes, so the four 64-byte unaligned loads and
            // stores stay inside it.
            unsafe {
                let a = _mm512_loadu_si512(p);
                let b = _mm512_loadu_si512(p.add(1));
                let c2 = _mm512_loadu_si512(p.add(2));
                let d = _mm512_loadu_si512(p.add(3));
                _mm512_storeu_si512(p, _mm512_xor_si512(a, k));
                _mm512_storeu_si512(p.add(1), _mm512_xor_si512(b, k));
                _mm512_storeu_si512(p.add(2), _mm512_xor_si512(c2, k));
                _mm512_storeu_si512(p.add(3), _mm512_xor_si512(d, k));
            }
        }
        let mut rest = chunks.into_remainder().chunks_exact_mut(64);
        for c in &mut rest {
            let p = c.as_mut_ptr() as *mut __m512i;
            // SAFETY: `c` is exactly 64 bytes.
            unsafe { _mm512_storeu_si512(p, _mm512_xor_si512(_mm512_loadu_si512(p), k)) };
        }
        // SAFETY: same CPU features as this function.
        unsafe { avx2(rest.into_remainder(), key) };
    }

    /// Entry for [`super::kernels`], which lists it only when AVX2 was detected.
    pub fn avx2_checked(buf: &mut [u8], key: [u8; 4]) {
        assert!(std::is_x86_feature_detected!("avx2"));
        // SAFETY: checked on the line above.
        unsafe { avx2(buf, key) }
    }

    /// Entry for [`super::kernels`], which lists it only when AVX-512F was detected.
    pub fn avx512_checked(buf: &mut [u8], key: [u8; 4]) {
        assert!(std::is_x86_feature_detected!("avx512f"));
        // SAFETY: checked on the line above.
        unsafe { avx512(buf, key) }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::mask_words;
    use std::arch::aarch64::*;

    /// NEON is part of the aarch64 baseline.
    pub fn neon(buf: &mut [u8], key: [u8; 4]) {
        let k = vreinterpretq_u8_u32(vdupq_n_u32(u32::from_ne_bytes(key)));
        let mut chunks = buf.chunks_exact_mut(64);
        for c in &mut chunks {
            let p = c.as_mut_ptr();
            // SAFETY: `c` is exactly 64 bytes, so the four 16-byte loads and stores stay
            // inside it; NEON loads and stores have no alignment requirement.
            unsafe {
                let a = vld1q_u8(p);
                let b = vld1q_u8(p.add(16));
                let c2 = vld1q_u8(p.add(32));
                let d = vld1q_u8(p.add(48));
                vst1q_u8(p, veorq_u8(a, k));
                vst1q_u8(p.add(16), veorq_u8(b, k));
                vst1q_u8(p.add(32), veorq_u8(c2, k));
                vst1q_u8(p.add(48), veorq_u8(d, k));
            }
        }
        let mut rest = chunks.into_remainder().chunks_exact_mut(16);
        for c in &mut rest {
            let p = c.as_mut_ptr();
            // SAFETY: `c` is exactly 16 bytes.
            unsafe { vst1q_u8(p, veorq_u8(vld1q_u8(p), k)) };
        }
        mask_words(rest.into_remainder(), key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(buf: &mut [u8], key: [u8; 4], phase: usize) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= key[(phase + i) % 4];
        }
    }

    #[test]
    fn rfc_masked_hello() {
        let mut payload = [0x7f, 0x9f, 0x4d, 0x51, 0x58];
        apply_mask(&mut payload, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(&payload, b"Hello");
    }

    #[test]
    fn every_kernel_every_length_and_offset() {
        let key = [0xA1, 0x5B, 0x3C, 0xD7];
        let data: Vec<u8> = (0..1200u32).map(|i| (i * 31 + 7) as u8).collect();
        for kernel in kernels() {
            for start in 0..40 {
                for len in (0..600).step_by(7).chain([0, 1, 31, 32, 63, 64, 127, 128, 255, 256]) {
                    let mut got = data[start..start + len].to_vec();
                    let mut want = got.clone();
                    (kernel.run)(&mut got, key);
                    reference(&mut want, key, 0);
                    assert_eq!(got, want, "{} start {start} len {len}", kernel.name);
                }
            }
        }
    }

    /// Long buffers at every address modulo 64, so that the aligning head of the SIMD
    /// kernels takes every length, including ones that are not a multiple of 4.
    #[test]
    fn every_kernel_every_alignment() {
        let key = [0xA1, 0x5B, 0x3C, 0xD7];
        let data: Vec<u8> = (0..1200u32).map(|i| (i * 31 + 7) as u8).collect();
        for kernel in kernels() {
            for start in 0..64 {
                for len in [255, 256, 257, 319, 320, 321, 1000, 1027] {
                    let mut got = data.clone();
                    let mut want = data[start..start + len].to_vec();
                    (kernel.run)(&mut got[start..start + len], key);
                    reference(&mut want, key, 0);
                    assert_eq!(
                        &got[start..start + len],
                        &want[..],
                        "{} start {start} len {len}",
                        kernel.name
                    );
                    assert_eq!(&got[..start], &data[..start]);
                    assert_eq!(&got[start + len..], &data[start + len..]);
                }
            }
        }
    }

    /// The inline path for short buffers, at every length it takes, every phase and every
    /// start address within a word.
    #[test]
    fn short_buffers_every_length_phase_and_start() {
        let key = [0xA1, 0x5B, 0x3C, 0xD7];
        let data: Vec<u8> = (0..64u32).map(|i| (i * 31 + 7) as u8).collect();
        for start in 0..16 {
            for len in 0..=SHORT + 1 {
                for phase in 0..4 {
                    let mut got = data.clone();
                    let mut want = data[start..start + len].to_vec();
                    apply_mask(&mut got[start..start + len], key, phase);
                    reference(&mut want, key, phase);
                    assert_eq!(&got[start..start + len], &want[..], "start {start} len {len} phase {phase}");
                    assert_eq!(&got[..start], &data[..start]);
                    assert_eq!(&got[start + len..], &data[start + len..]);
                }
            }
        }
    }

    #[test]
    fn split_payload_continues_mid_key() {
        let key = [1, 2, 3, 4];
        let data: Vec<u8> = (0..500u32).map(|i| i as u8).collect();
        let mut want = data.clone();
        reference(&mut want, key, 0);
        for cut in 0..data.len() {
            let mut got = data.clone();
            let (a, b) = got.split_at_mut(cut);
            apply_mask(a, key, 0);
            apply_mask(b, key, cut);
            assert_eq!(got, want, "cut {cut}");
        }
    }

    proptest! {
        #[test]
        fn kernels_equal_byte_loop(
            data in proptest::collection::vec(any::<u8>(), 0..3000),
            key in any::<[u8; 4]>(),
            phase in 0usize..8,
            offset in 0usize..64,
        ) {
            let offset = offset.min(data.len());
            let mut want = data[offset..].to_vec();
            reference(&mut want, key, phase);
            let mut got = data[offset..].to_vec();
            apply_mask(&mut got, key, phase);
            prop_assert_eq!(&got, &want);
            for kernel in kernels() {
                let mut got = data.clone();
                (kernel.run)(&mut got[offset..], rotate_key(key, phase));
                prop_assert_eq!(&got[offset..], &want[..], "kernel {}", kernel.name);
                prop_assert_eq!(&got[..offset], &data[..offset]);
            }
        }
    }
}
