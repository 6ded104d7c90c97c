//! Helpers shared by the integration tests: owned copies of events and a driver that feeds a
//! decoder read by read.

#![allow(dead_code)]

use gale_frame::{CloseCode, DataKind, Decoder, Event, ProtocolError};

/// An event with owned payloads, to compare across reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owned {
    Text(String),
    Binary(Vec<u8>),
    UncheckedText(Vec<u8>),
    Compressed(DataKind, Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

impl From<Event<'_>> for Owned {
    fn from(e: Event<'_>) -> Self {
        match e {
            Event::Text(t) => Owned::Text(t.to_string()),
            Event::Binary(b) => Owned::Binary(b.to_vec()),
            Event::UncheckedText(b) => Owned::UncheckedText(b.to_vec()),
            Event::Compressed { kind, payload } => Owned::Compressed(kind, payload.to_vec()),
            Event::Ping(p) => Owned::Ping(p.to_vec()),
            Event::Pong(p) => Owned::Pong(p.to_vec()),
            Event::Close(c) => Owned::Close(c.code.map(|c: CloseCode| c.0), c.reason.to_string()),
        }
    }
}

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
                    events.push(Owned::from(ev));
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
