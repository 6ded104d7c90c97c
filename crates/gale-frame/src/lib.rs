//! `gale-frame`: the WebSocket codec of Gale (RFC 6455), with no I/O and no threads.
//!
//! - [`handshake`]: parse and validate upgrade requests, compute `Sec-WebSocket-Accept`, build
//!   101 and 4xx responses; the client side of the same exchange.
//! - [`FrameHeader`]: decode and encode frame headers.
//! - [`apply_mask`]: XOR masking in place with AVX-512/AVX2/SSE2/NEON kernels.
//! - [`Utf8Stream`]: UTF-8 validation of text that arrives in pieces, failing at the first
//!   invalid byte.
//! - [`Decoder`]: bytes of each read in, whole messages and control frames out, zero-copy when
//!   a message arrives in one read, with every receive-side rule of RFC 6455 checked.
//! - [`encode`](mod@encode): frames written into the caller's buffer; [`SharedFrame`] to
//!   encode once and send to many.
//!
//! ```
//! use gale_frame::{Decoder, DecoderConfig, Event, FrameSpec, OpCode, append_frame};
//!
//! // A client sends "Hello" masked; the server decodes it in place.
//! let mut wire = Vec::new();
//! append_frame(&mut wire, FrameSpec::client(OpCode::Text, [0x37, 0xfa, 0x21, 0x3d]), b"Hello");
//! let mut decoder = Decoder::new(DecoderConfig::server(16 << 20));
//! let (used, event) = decoder.decode(&mut wire).unwrap();
//! assert_eq!(used, 11);
//! assert_eq!(event, Some(Event::Text("Hello")));
//! ```

#![warn(missing_docs)]

mod ascii;
pub mod close;
pub mod decode;
pub mod deflate;
pub mod encode;
pub mod handshake;
pub mod header;
pub mod mask;
pub mod utf8;

pub use close::{CloseCode, ProtocolError};
pub use decode::{
    CloseFrame, DataKind, Decoder, DecoderConfig, Event, PartialBudget, Role, parse_close_payload,
};
pub use encode::{
    BufferTooSmall, ClosePayload, FrameSpec, SharedFrame, append_frame, encode_frame, frame_len, write_header,
};
pub use header::{FrameHeader, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, OpCode};
pub use mask::apply_mask;
pub use utf8::{Utf8Error, Utf8Stream};
