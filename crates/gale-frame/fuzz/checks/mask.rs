//! The `mask` target: every masking kernel, at any alignment and key phase, and
//! [`apply_mask`] on a payload split in two, must equal the byte-by-byte definition.
//!
//! Input layout: 4 bytes of key, a phase byte, an offset byte (`% 64`, where the payload
//! starts in its buffer, to vary alignment), a split byte (taken modulo the payload's length
//! plus one); the rest is the payload. Missing bytes read as zero.

use gale_frame::apply_mask;
use gale_frame::mask::{kernels, rotate_key};

/// RFC 6455 section 5.3, one byte at a time: byte `i` of the payload is XORed with
/// `key[i % 4]`, and `data` starts at byte `phase` of the payload.
fn reference(data: &[u8], key: [u8; 4], phase: usize) -> Vec<u8> {
    data.iter().enumerate().map(|(i, b)| b ^ key[(phase + i) % 4]).collect()
}

/// Mask the payload of one input every way there is and compare with the reference.
pub fn check(data: &[u8]) {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let key = [byte(0), byte(1), byte(2), byte(3)];
    let phase = usize::from(byte(4));
    let offset = usize::from(byte(5) % 64);
    let payload = data.get(7..).unwrap_or_default();
    let split = usize::from(byte(6)) % (payload.len() + 1);
    let want = reference(payload, key, phase);

    let mut got = payload.to_vec();
    apply_mask(&mut got, key, phase);
    assert_eq!(got, want, "apply_mask, {} bytes, phase {phase}", payload.len());

    // A payload that arrives in two reads continues mid-key.
    let mut got = payload.to_vec();
    let (head, tail) = got.split_at_mut(split);
    apply_mask(head, key, phase);
    apply_mask(tail, key, phase + split);
    assert_eq!(got, want, "apply_mask split at {split}");

    let filler = 0xA5;
    for kernel in kernels() {
        let mut buf = vec![filler; offset];
        buf.extend_from_slice(payload);
        (kernel.run)(&mut buf[offset..], rotate_key(key, phase));
        assert_eq!(buf[offset..], want[..], "kernel {}, offset {offset}, phase {phase}", kernel.name);
        assert!(buf[..offset].iter().all(|&b| b == filler), "kernel {} wrote before its buffer", kernel.name);
    }
}
