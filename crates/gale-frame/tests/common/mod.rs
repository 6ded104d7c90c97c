//! Helpers shared by the integration tests: owned copies of events and a driver that feeds a
//! decoder read by read.

#![allow(dead_code)]

use gale_frame::{Decoder, ProtocolError};

/// The fuzz checks' owned copy of an event, to compare across reads.
#[path = "../../fuzz/checks/decoder.rs"]
mod decoder_checks;
pub use decoder_checks::Owned;

/// Feed `bytes` to `dec` in reads of the given sizes (cycled); collect events until the end
/// or the first error.
pub fn feed(dec: &mut Decoder, bytes: &[u8], read_sizes: &[usize]) -> (Vec<Owned>, Option<ProtocolError>) {
    let mut events = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while start < bytes.len() {
        let size = read_sizes.get(i % read_sizes.len().max(1)).copied().unwrap_or(bytes.len()).max(1);
        i += 1;
        let end = (start + size).min(bytes.len());
        let mut read = bytes[start..end].to_vec();
        start = end;
        let mut pos = 0;
        loop {
            match dec.decode(&mut read[pos..]) {
                Ok((n, Some(ev))) => {
                    events.push(Owned::from(&ev));
                    pos += n;
                }
                Ok((n, None)) => {
                    assert_eq!(pos + n, read.len(), "None must mean the read was consumed");
                    break;
                }
                Err(e) => return (events, Some(e)),
            }
        }
    }
    (events, None)
}

/// Feed everything in one read.
pub fn feed_all(dec: &mut Decoder, bytes: &[u8]) -> (Vec<Owned>, Option<ProtocolError>) {
    feed(dec, bytes, &[bytes.len().max(1)])
}
