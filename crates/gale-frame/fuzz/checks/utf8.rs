//! The `utf8` target: text split into pieces at arbitrary points, fed to [`Utf8Stream`],
//! must get the verdict `std::str::from_utf8` gives the whole, and must fail in the very
//! piece that makes the text invalid.
//!
//! Input layout: byte 0 gives the number of cuts, `b % 8`; each cut is a little-endian u16
//! taken modulo the text's length plus one; the rest is the text.

use gale_frame::Utf8Stream;
use gale_frame::utf8::validate;

/// Build an input in the layout this target reads: up to 7 cut points, then `text`.
pub fn input(cuts: &[u16], text: &[u8]) -> Vec<u8> {
    assert!(cuts.len() < 8, "at most 7 cuts");
    let mut data = vec![cuts.len() as u8];
    cuts.iter().for_each(|c| data.extend_from_slice(&c.to_le_bytes()));
    data.extend_from_slice(text);
    data
}

/// Stream the text of one input in its pieces and compare with the standard library.
/// Returns whether the text is valid UTF-8.
pub fn check(data: &[u8]) -> bool {
    let count = usize::from(data.first().copied().unwrap_or(0) % 8);
    let rest = data.get(1..).unwrap_or_default();
    let (cut_bytes, text) = rest.split_at((2 * count).min(rest.len()));
    let mut cuts: Vec<usize> = cut_bytes
        .chunks(2)
        .map(|c| usize::from(u16::from_le_bytes([c[0], c.get(1).copied().unwrap_or(0)])) % (text.len() + 1))
        .collect();
    cuts.push(text.len());
    cuts.sort_unstable();

    let want = std::str::from_utf8(text).is_ok();
    assert_eq!(validate(text).is_ok(), want, "one-shot validation disagrees with std");
    let mut stream = Utf8Stream::new();
    let mut start = 0;
    for (i, &end) in cuts.iter().enumerate() {
        let piece = &text[start..end];
        let last = i + 1 == cuts.len();
        let fed = if last { stream.finish(piece) } else { stream.feed(piece) };
        let prefix = &text[..end];
        if last {
            assert_eq!(fed.is_ok(), want, "verdict differs from std after pieces ending at {cuts:?}");
        } else {
            // Fail fast: an error exactly when no continuation can make the prefix valid.
            let could_be_valid =
                std::str::from_utf8(prefix).map_or_else(|e| e.error_len().is_none(), |_| true);
            assert_eq!(fed.is_ok(), could_be_valid, "wrong verdict after {end} bytes");
            if fed.is_ok() {
                assert_eq!(stream.is_complete(), std::str::from_utf8(prefix).is_ok(), "after {end} bytes");
            }
        }
        if fed.is_err() {
            assert!(!want, "valid text refused after {end} bytes");
            return false;
        }
        start = end;
    }
    true
}
