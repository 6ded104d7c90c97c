//! Streaming UTF-8 validation on top of `simdutf8`.
//!
//! Text arrives in pieces: a message may be split into frames, and a frame into reads, at any
//! byte, including inside a multi-byte sequence. [`Utf8Stream`] validates each piece as it
//! arrives and reports an error in the piece that holds the first invalid byte (a message
//! is failed as early as its bytes allow, which Autobahn's section 6 checks), keeping at most
//! three bytes of an unfinished sequence between pieces.

use crate::ascii::{SHORT_MAX, ascii_prefix_len, is_short_ascii};

/// The input is not valid UTF-8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Utf8Error;

impl std::fmt::Display for Utf8Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid UTF-8")
    }
}

impl std::error::Error for Utf8Error {}

/// Incremental validator for one text message. Four bytes of state.
#[derive(Clone, Copy, Debug, Default)]
pub struct Utf8Stream {
    /// The start of a sequence that the last piece cut off.
    partial: [u8; 3],
    partial_len: u8,
}

impl Utf8Stream {
    /// A validator at the start of a message.
    pub const fn new() -> Self {
        Utf8Stream { partial: [0; 3], partial_len: 0 }
    }

    /// Forget any unfinished sequence, to start a new message.
    #[inline]
    pub fn reset(&mut self) {
        self.partial_len = 0;
    }

    /// Whether the bytes fed so far end on a character boundary.
    #[inline]
    pub fn is_complete(&self) -> bool {
        self.partial_len == 0
    }

    /// Validate the next piece of the message. Fails if the bytes so far cannot be the start
    /// of valid UTF-8. An ASCII prefix of a long piece is checked by a faster scan than
    /// simdutf8's, which pays fixed costs per call that add up over many pieces.
    #[inline]
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Utf8Error> {
        if self.partial_len != 0 {
            bytes = self.finish_partial(bytes)?;
        }
        bytes = &bytes[ascii_prefix_len(bytes)..];
        if bytes.is_empty() {
            return Ok(());
        }
        let head_len = bytes.len() - incomplete_tail_len(bytes);
        let (head, tail) = bytes.split_at(head_len);
        if simdutf8::basic::from_utf8(head).is_err() {
            return Err(Utf8Error);
        }
        if !tail.is_empty() {
            check_prefix(tail)?;
            self.partial[..tail.len()].copy_from_slice(tail);
            self.partial_len = tail.len() as u8;
        }
        Ok(())
    }

    /// Validate the last piece of a message: like [`feed`](Self::feed), and the message must
    /// not end inside a sequence. Resets the validator for the next message.
    #[inline]
    pub fn finish(&mut self, bytes: &[u8]) -> Result<(), Utf8Error> {
        if self.partial_len == 0 {
            // Nothing carried over: the last piece must be valid on its own, which one call
            // checks without looking for a cut-off sequence at its end.
            return validate(bytes);
        }
        self.feed(bytes)?;
        let complete = self.partial_len == 0;
        self.partial_len = 0;
        if complete { Ok(()) } else { Err(Utf8Error) }
    }

    /// Complete the sequence left over from the previous piece with bytes from this one;
    /// returns what is left of `bytes`.
    #[cold]
    fn finish_partial<'b>(&mut self, bytes: &'b [u8]) -> Result<&'b [u8], Utf8Error> {
        let have = self.partial_len as usize;
        let need = sequence_len(self.partial[0]) - have;
        let take = need.min(bytes.len());
        let mut seq = [0u8; 4];
        seq[..have].copy_from_slice(&self.partial[..have]);
        seq[have..have + take].copy_from_slice(&bytes[..take]);
        if take < need {
            check_prefix(&seq[..have + take])?;
            self.partial[..have + take].copy_from_slice(&seq[..have + take]);
            self.partial_len = (have + take) as u8;
            return Ok(&[]);
        }
        if std::str::from_utf8(&seq[..have + take]).is_err() {
            return Err(Utf8Error);
        }
        self.partial_len = 0;
        Ok(&bytes[take..])
    }
}

/// Validate a whole text payload in one call.
#[inline]
pub fn validate(bytes: &[u8]) -> Result<(), Utf8Error> {
    simdutf8::basic::from_utf8(bytes).map(|_| ()).map_err(|_| Utf8Error)
}

/// A whole text payload as `str`, if it is valid UTF-8. Short ASCII text (the bulk of small
/// messages) is recognised with a few word loads instead of a byte-by-byte validator.
#[inline]
pub fn to_str(bytes: &[u8]) -> Result<&str, Utf8Error> {
    if bytes.len() <= SHORT_MAX && is_short_ascii(bytes) {
        // SAFETY: every byte is ASCII (checked on the line above), and ASCII is valid UTF-8.
        return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    simdutf8::basic::from_utf8(bytes).map_err(|_| Utf8Error)
}

/// Length of the sequence a lead byte announces; 1 for ASCII and for bytes that cannot lead
/// (the validator rejects those on its own).
#[inline]
fn sequence_len(lead: u8) -> usize {
    match lead {
        0xC2..=0xDF => 2,
        0xE0..=0xEF => 3,
        0xF0..=0xF4 => 4,
        _ => 1,
    }
}

/// How many bytes at the end of `bytes` form a sequence that its lead byte says continues
/// past the end. At most 3.
#[inline]
fn incomplete_tail_len(bytes: &[u8]) -> usize {
    let n = bytes.len();
    for back in 1..=n.min(3) {
        let b = bytes[n - back];
        if b & 0xC0 != 0x80 {
            // Found the last byte that is not a continuation byte.
            return if sequence_len(b) > back { back } else { 0 };
        }
    }
    0
}

/// Fail if `prefix`, an unfinished sequence, can never be completed into valid UTF-8
/// (a bad lead byte, a continuation byte out of range such as `ED A0` or `F4 90`).
#[inline]
fn check_prefix(prefix: &[u8]) -> Result<(), Utf8Error> {
    match std::str::from_utf8(prefix) {
        // `error_len() == None` means "valid so far, but cut short".
        Err(e) if e.error_len().is_none() && e.valid_up_to() == 0 => Ok(()),
        _ => Err(Utf8Error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn streamed(bytes: &[u8], cuts: &[usize]) -> Result<(), Utf8Error> {
        let mut v = Utf8Stream::new();
        let mut start = 0;
        for &c in cuts {
            let c = c.clamp(start, bytes.len());
            v.feed(&bytes[start..c])?;
            start = c;
        }
        v.finish(&bytes[start..])
    }

    #[test]
    fn whole_and_split_valid_text() {
        let text = "héllo wörld — 你好，世界 🎉🚀 κόσμε".as_bytes();
        for cut in 0..=text.len() {
            assert_eq!(streamed(text, &[cut]), Ok(()), "cut {cut}");
        }
        for a in 0..=text.len() {
            for b in a..=text.len() {
                assert_eq!(streamed(text, &[a, b]), Ok(()));
            }
        }
    }

    #[test]
    fn byte_by_byte() {
        let text = "κόσμε 🎉 你好".as_bytes();
        let cuts: Vec<usize> = (0..text.len()).collect();
        assert_eq!(streamed(text, &cuts), Ok(()));
    }

    #[test]
    fn message_ending_mid_sequence_is_invalid() {
        let text = "🎉".as_bytes();
        for end in 1..4 {
            assert_eq!(streamed(&text[..end], &[]), Err(Utf8Error));
            assert_eq!(streamed(&text[..end], &[0, 1, 2]), Err(Utf8Error));
        }
    }

    /// Autobahn 6.4.1: `κόσμε` followed by `F4 90 80 80` (above U+10FFFF), then more valid
    /// text. The error must come with the piece holding `F4 90`, before the rest arrives.
    #[test]
    fn fails_fast_on_first_invalid_byte() {
        let mut v = Utf8Stream::new();
        v.feed("κόσμε".as_bytes()).unwrap();
        v.feed(&[0xF4]).unwrap();
        assert_eq!(v.feed(&[0x90]), Err(Utf8Error));

        let mut v = Utf8Stream::new();
        v.feed("κόσμε".as_bytes()).unwrap();
        assert_eq!(v.feed(&[0xF4, 0x90]), Err(Utf8Error));

        // A surrogate (ED A0 80) is refused at its second byte.
        let mut v = Utf8Stream::new();
        v.feed(&[b'a', 0xED]).unwrap();
        assert_eq!(v.feed(&[0xA0]), Err(Utf8Error));

        // Bytes that can never appear are refused on their own.
        for bad in [0xC0u8, 0xC1, 0xF5, 0xFF, 0x80] {
            let mut v = Utf8Stream::new();
            assert_eq!(v.feed(&[bad]), Err(Utf8Error), "{bad:#x}");
        }
        // Overlong three-byte form of '/' fails at E0 80.
        let mut v = Utf8Stream::new();
        assert_eq!(v.feed(&[0xE0, 0x80]), Err(Utf8Error));
    }

    fn arb_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            // Mostly valid text with a chance of corruption.
            (any::<String>(), any::<Option<(usize, u8)>>()).prop_map(|(s, corrupt)| {
                let mut b = s.into_bytes();
                if let Some((i, byte)) = corrupt
                    && !b.is_empty()
                {
                    let len = b.len();
                    b[i % len] = byte;
                }
                b
            }),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec(
                prop_oneof![Just(0xE4u8), Just(0xBD), Just(0xA0), Just(0xF0), Just(0x9F), Just(b'a')],
                0..40
            ),
            // Long, mostly ASCII text (past the ASCII shortcut's minimum), with a few
            // characters or stray bytes of any kind.
            proptest::collection::vec(
                prop_oneof![
                    40 => "[ -~]{1,8}".prop_map(String::into_bytes),
                    1 => any::<char>().prop_map(|c| c.to_string().into_bytes()),
                    1 => any::<u8>().prop_map(|b| vec![b]),
                ],
                0..120
            )
            .prop_map(|parts| parts.concat()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]
        #[test]
        fn whole_payload_verdict_equals_std(bytes in arb_bytes()) {
            prop_assert_eq!(to_str(&bytes).ok(), std::str::from_utf8(&bytes).ok());
            // Short payloads, where ASCII takes the word-load shortcut.
            let short = &bytes[..bytes.len().min(SHORT_MAX + 1)];
            prop_assert_eq!(to_str(short).ok(), std::str::from_utf8(short).ok());
        }

        #[test]
        fn verdict_equals_std(bytes in arb_bytes(), mut cuts in proptest::collection::vec(0usize..700, 0..6)) {
            cuts.sort_unstable();
            let want = std::str::from_utf8(&bytes).is_ok();
            prop_assert_eq!(streamed(&bytes, &cuts).is_ok(), want);
        }

        /// Fail fast: after every piece, the validator has failed exactly when the bytes so
        /// far can no longer be the start of valid UTF-8.
        #[test]
        fn fails_exactly_when_prefix_turns_invalid(bytes in arb_bytes(), mut cuts in proptest::collection::vec(0usize..700, 0..8)) {
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let is_valid_prefix = |p: &[u8]| match std::str::from_utf8(p) {
                Ok(_) => true,
                Err(e) => e.error_len().is_none(),
            };
            let mut v = Utf8Stream::new();
            let mut start = 0;
            for c in cuts {
                let c = c.min(bytes.len());
                let ok = v.feed(&bytes[start..c]).is_ok();
                prop_assert_eq!(ok, is_valid_prefix(&bytes[..c]), "after {} bytes", c);
                if !ok {
                    break;
                }
                start = c;
            }
        }
    }
}
