//! Per-route settings for WebSocket connections.

use std::time::Duration;

/// What happens to a send that would push a connection's buffered bytes past
/// [`Behavior::max_backpressure`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackpressurePolicy {
    /// Refuse the message ([`crate::SendStatus::Dropped`]); the connection stays open.
    Drop,
    /// Refuse the message and drop the connection (the client sees 1006).
    Close,
}

/// permessage-deflate (RFC 7692) for a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Never negotiated.
    Disabled,
    /// No context takeover either way: one compressor and one decompressor per loop serve
    /// every connection, which holds no compression state. The cheapest in memory.
    Shared,
    /// Context takeover: each connection gets its own compressor and decompressor (created at
    /// first use) with this window (9..=15 bits; 2^bits bytes), for better ratios on similar
    /// messages.
    Dedicated {
        /// Window size in bits.
        window_bits: u8,
    },
}

/// How a connection idle for [`Behavior::idle_timeout`] is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdleClose {
    /// Send close 1001 and wait [`Behavior::close_timeout`] for the client's answer.
    GoingAway,
    /// Drop the TCP connection without a close frame.
    Silent,
}

/// Settings of a WebSocket route.
#[derive(Clone, Debug)]
pub struct Behavior {
    /// Largest message accepted, summed over its fragments; larger ones close with 1009 as
    /// soon as a frame header announces them.
    pub max_payload: usize,
    /// Close a connection after this long without receiving anything. `None`: never.
    pub idle_timeout: Option<Duration>,
    /// How an idle connection is closed.
    pub idle_close: IdleClose,
    /// Send a ping after this long without receiving anything (keeps NAT and proxies open and
    /// detects dead peers). `None`: no automatic pings.
    pub ping_interval: Option<Duration>,
    /// After an automatic ping, drop the connection if nothing arrives within this time.
    pub pong_timeout: Duration,
    /// Longest time from a message's first byte to its last: a message still unfinished
    /// after it closes the connection with 1008 (policy violation). Bytes that arrive count
    /// as activity for [`idle_timeout`](Self::idle_timeout) and the pings, so that a slow
    /// upload of a large message stays open; this is what ends one that never completes.
    /// `None`: never. Default 10 minutes: the default 16 MiB
    /// [`max_payload`](Self::max_payload) at 256 kbit/s, a weak mobile uplink, takes 9 minutes.
    pub message_timeout: Option<Duration>,
    /// Most bytes held for a connection that the kernel will not take yet (data, control
    /// frames, TLS records, sends in flight). A message is refused when it would take the
    /// held bytes past this, unless they are at most [`crate::CONTROL_ALLOWANCE`] (a few
    /// control frames): the limit is never overshot by more than one message. While the
    /// held bytes are past it (pongs and replies count too), the connection is not read, so
    /// a peer that sends without reading is held back by its own TCP window.
    pub max_backpressure: usize,
    /// What a send over [`max_backpressure`](Self::max_backpressure) does.
    pub backpressure_policy: BackpressurePolicy,
    /// A connection that is not read for this long — its held bytes past
    /// [`max_backpressure`](Self::max_backpressure), or not yet empty after a message to it
    /// was refused — is dropped without a close frame (it reads nothing, so it could not
    /// receive one); the handler's `close` gets 1006.
    pub backpressure_timeout: Duration,
    /// After sending a close frame, how long to wait for the client's before dropping TCP.
    pub close_timeout: Duration,
    /// permessage-deflate.
    pub compression: Compression,
    /// Messages shorter than this are sent uncompressed even when compression is on (they
    /// would not shrink enough to pay for it). `None`: 1 KiB with [`Compression::Shared`]
    /// (without context, short messages barely shrink while every message pays for a fresh
    /// compressor state), 64 bytes with [`Compression::Dedicated`].
    pub compress_min_size: Option<usize>,
}

impl Behavior {
    /// The smallest message that is compressed (see [`Behavior::compress_min_size`]).
    pub fn compress_threshold(&self) -> usize {
        self.compress_min_size.unwrap_or(match self.compression {
            Compression::Shared => 1024,
            _ => 64,
        })
    }
}

impl Default for Behavior {
    fn default() -> Self {
        Behavior {
            max_payload: 16 << 20,
            idle_timeout: Some(Duration::from_secs(120)),
            idle_close: IdleClose::GoingAway,
            ping_interval: None,
            pong_timeout: Duration::from_secs(10),
            message_timeout: Some(Duration::from_secs(600)),
            max_backpressure: 1 << 20,
            backpressure_policy: BackpressurePolicy::Drop,
            // Longer than a network stall a live peer recovers from (six TCP retransmissions
            // back off for about 13 s), short enough that a peer that stopped reading frees
            // its buffers and its slot within half a minute.
            backpressure_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(5),
            compression: Compression::Disabled,
            compress_min_size: None,
        }
    }
}
