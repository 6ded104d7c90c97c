//! The sending half of a connection: its socket, the bytes waiting to be written, and the
//! close state. Shared by the HTTP and WebSocket phases.

use std::io::{self, IoSlice, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream};
use std::os::fd::RawFd;

use gale_frame::{CloseCode, ClosePayload, FrameSpec, MAX_HEADER_LEN, OpCode, write_header};

use crate::app::ServerHandle;
use crate::behavior::{BackpressurePolicy, Behavior};
use crate::compress::SharedCodecs;
use crate::pubsub::{ConnId, LoopTopics};
use crate::tls::TlsSession;

/// Output buffers are flushed early once this many unsent bytes accumulate while the kernel is
/// taking everything: a handler that sends a lot in one go does not build a large buffer.
const CORK_FLUSH: usize = 64 * 1024;

/// Payloads at least this large are written straight from the caller's slice (header and
/// payload in one `writev`) when nothing is queued, instead of being copied first.
const DIRECT_WRITE_MIN: usize = 16 * 1024;

/// Output buffers larger than this are freed instead of going back to the pool.
const POOL_MAX_CAPACITY: usize = 256 * 1024;

/// Capacity kept in a loop's pool, over all its buffers: enough for the 256-byte buffers of
/// 8,192 subscribers, so that a fan-out through connections' own buffers (io_uring, or
/// subscribers that compress) reuses them publish after publish instead of allocating and
/// freeing one per subscriber. The allocator would keep most of that memory in the process
/// anyway; an idle connection holds no buffer either way.
const POOL_MAX_BYTES: usize = 2 << 20;

/// A data message is accepted whatever its size while a connection holds at most this many
/// bytes (or its `max_backpressure`, if smaller): room for a few control frames (a pong or a
/// close is at most 127 bytes) or the tail of an earlier send, which must not decide whether a
/// message is refused. Past it, a message is accepted only if it fits under `max_backpressure`.
/// Either way the held bytes stay within `max_backpressure` plus one message.
pub const CONTROL_ALLOWANCE: usize = 4096;

/// Whether a data message of `len` bytes may be queued on top of `held` bytes under `limit`.
#[inline]
pub(crate) fn admits(held: usize, len: usize, limit: usize) -> bool {
    held <= CONTROL_ALLOWANCE.min(limit) || held + len <= limit
}

/// A frame header for [`Link::send_parts`]: the first `len` bytes of `bytes` (none for a frame
/// encoded beforehand).
struct Head {
    bytes: [u8; MAX_HEADER_LEN],
    len: usize,
}

/// Result of a send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendStatus {
    /// Queued; the kernel has been taking everything so far.
    Sent,
    /// Queued behind bytes the kernel refused: see `buffered_amount` and wait for `drain`.
    Backpressure,
    /// Refused: it would exceed `max_backpressure`. With [`BackpressurePolicy::Close`] the
    /// connection is being dropped.
    Dropped,
    /// Refused: the connection is closing or closed.
    Closed,
}

/// Where the close handshake stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloseState {
    /// Open for sending.
    Open,
    /// We sent a close frame and wait for the peer's.
    Closing,
    /// No more frames may be sent.
    Closed,
}

/// When the socket should be closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    /// Not yet.
    No,
    /// Once every queued byte is written: then shut down our sending side and wait briefly
    /// for the peer's EOF, so that unread input does not turn the close into a reset that
    /// could destroy our last bytes (a close frame, an error response) before the peer reads
    /// them.
    AfterFlush,
    /// Our side is shut down; discard input until the peer's EOF or a short timeout.
    Linger,
    /// Now, dropping queued bytes.
    Now,
}

/// A loop's traffic counters, copied to [`crate::app::LoopStats`] once per iteration.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counters {
    pub(crate) messages_in: u64,
    pub(crate) bytes_in: u64,
    pub(crate) messages_out: u64,
    pub(crate) bytes_out: u64,
    /// Messages refused because a connection was past `max_backpressure`.
    pub(crate) dropped: u64,
    /// Times a connection stopped being read because its held bytes passed its limit.
    pub(crate) reads_paused: u64,
    /// Connections dropped because their held bytes stayed past the limit for
    /// `backpressure_timeout`.
    pub(crate) backpressure_timeouts: u64,
    /// Sends submitted zero-copy (io_uring).
    pub(crate) zero_copy_sends: u64,
    /// Receives that ended for want of a provided buffer (io_uring).
    pub(crate) receive_buffer_shortages: u64,
}

/// What a loop lends its connections: a pool of output buffers (a connection borrows one while
/// it has bytes to send), the compression state shared between connections, the loop's topic
/// table and counters, and the server's handle (to publish).
pub(crate) struct Scratch {
    free: Vec<Vec<u8>>,
    /// Capacity of the buffers in `free`.
    free_bytes: usize,
    pub(crate) codecs: SharedCodecs,
    pub(crate) topics: LoopTopics,
    pub(crate) counters: Counters,
    pub(crate) handle: ServerHandle,
    /// Where decrypted input goes before the connection sees it (TLS).
    pub(crate) plain: Vec<u8>,
    /// Bytes the loop's connections may hold for messages not yet received whole.
    pub(crate) partial_budget: gale_frame::PartialBudget,
    index: usize,
    next_serial: u64,
}

impl Scratch {
    pub(crate) fn new(handle: ServerHandle, index: usize) -> Self {
        Scratch {
            free: Vec::new(),
            free_bytes: 0,
            codecs: SharedCodecs::default(),
            topics: LoopTopics::new(handle.registry(), index),
            counters: Counters::default(),
            partial_budget: handle.partial_budget(index),
            handle,
            plain: Vec::new(),
            index,
            next_serial: 0,
        }
    }

    /// The id of a new connection in slot `key`.
    pub(crate) fn next_id(&mut self, key: usize) -> ConnId {
        self.next_serial += 1;
        ConnId::new(self.index, key, self.next_serial)
    }

    /// A buffer for at least `need` bytes: a pooled one, else a new one sized to the need.
    /// (A fan-out touches thousands of connections at once; giving each a fresh 16 KiB
    /// buffer for a 100-byte message made the allocator map and unmap pages every publish.)
    fn take(&mut self, need: usize) -> Vec<u8> {
        match self.free.pop() {
            Some(buf) => {
                self.free_bytes -= buf.capacity();
                buf
            }
            None => Vec::with_capacity(need.max(256).next_power_of_two()),
        }
    }

    /// Take back a buffer a connection or a send no longer needs (freed if the pool is full).
    pub(crate) fn give(&mut self, mut buf: Vec<u8>) {
        let capacity = buf.capacity();
        if capacity <= POOL_MAX_CAPACITY && self.free_bytes + capacity <= POOL_MAX_BYTES {
            buf.clear();
            self.free_bytes += capacity;
            self.free.push(buf);
        }
    }
}

/// The sending half of a connection.
///
/// It is part of every slab entry, so it holds only what the send path and an idle
/// connection need; what is rare (TLS, the close handshake, an IPv6 peer) is in [`Cold`],
/// allocated on first need.
pub(crate) struct Link {
    pub(crate) stream: TcpStream,
    /// The connection's id (its loop, its slot, a serial), for excluding it from its own
    /// publishes and finding it from other threads.
    pub(crate) id: ConnId,
    /// Bytes not yet handed to the kernel. Holds a pooled buffer only while non-empty.
    out: Vec<u8>,
    /// The peer's address when it is IPv4 (an IPv6 one is in `cold`): 6 bytes instead of 32.
    remote_v4: SocketAddrV4,
    /// What few connections need, or need only while closing; `None` for an idle plain
    /// connection.
    pub(crate) cold: Option<Box<Cold>>,
    pub(crate) close: CloseState,
    pub(crate) finish: Finish,
    /// The kernel refused bytes at the last write; a writable event will follow.
    pub(crate) blocked: bool,
    /// The backend allows writing from inside handlers (no write of ours in flight).
    pub(crate) direct: bool,
    /// The socket failed (reset, broken pipe): the connection is dead.
    pub(crate) broken: bool,
    /// The connection has output to flush at the end of the loop iteration.
    pub(crate) dirty: bool,
    /// A message was refused for backpressure since the held bytes were last empty: the peer
    /// is not keeping up, so it is not read until they are (see [`Link::over_limit`]).
    refused: bool,
    /// Held bytes past which the connection is not read: the route's `max_backpressure`
    /// (saturated at 4 GiB), or the HTTP phase's limit before an upgrade. A `u32` beside the
    /// flags, where the struct has room, so the slab entry does not grow.
    pub(crate) out_limit: u32,
    /// Bytes handed to the kernel in a send that has not completed (completion backends).
    pub(crate) in_kernel: usize,
    /// epoll: the index of this connection's run in the loop's shared fan-out batch, valid
    /// while that run names this connection's slot (see `crate::fanout`). 24 bits, like the
    /// slot number itself, in bytes the struct has free.
    shared_run: [u8; 3],
}

/// The TLS session in a link's cold state, if any: a function of the field alone, so that
/// the link's other fields (its queued bytes) can be borrowed beside it.
#[inline]
fn tls_in(cold: &mut Option<Box<Cold>>) -> Option<&mut TlsSession> {
    cold.as_deref_mut().and_then(|c| c.tls.as_deref_mut())
}

/// The rarely used state of a connection, boxed behind [`Link::cold`] when first needed: with
/// TLS or an IPv6 peer from the start, otherwise when the connection begins to close.
#[derive(Default)]
pub(crate) struct Cold {
    /// TLS, when the listener has it: `out` holds plaintext, sealed into records on flush.
    pub(crate) tls: Option<Box<TlsSession>>,
    /// The close frame we sent, reported to the handler when the handshake ends.
    sent_close: Option<Box<ClosePayload>>,
    /// Tick the WebSocket close handshake began, 0 while open.
    pub(crate) close_since: u32,
    /// Tick the lingering close began.
    pub(crate) linger_since: u32,
    /// The peer's address when it is IPv6.
    remote_v6: Option<SocketAddrV6>,
}

impl Link {
    pub(crate) fn new(stream: TcpStream, remote: SocketAddr, id: ConnId) -> Self {
        let (remote_v4, cold) = match remote {
            SocketAddr::V4(v4) => (v4, None),
            SocketAddr::V6(v6) => (
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
                Some(Box::new(Cold { remote_v6: Some(v6), ..Cold::default() })),
            ),
        };
        Link {
            stream,
            id,
            out: Vec::new(),
            remote_v4,
            cold,
            close: CloseState::Open,
            finish: Finish::No,
            blocked: false,
            direct: true,
            broken: false,
            dirty: false,
            refused: false,
            out_limit: u32::MAX,
            in_kernel: 0,
            shared_run: [0xFF; 3],
        }
    }

    /// The index of this connection's run in the loop's shared batch, when it has one there.
    #[inline]
    pub(crate) fn shared_run(&self) -> u32 {
        u32::from_le_bytes([self.shared_run[0], self.shared_run[1], self.shared_run[2], 0])
    }

    /// Remember the index of this connection's run in the loop's shared batch (below 2^24).
    #[inline]
    pub(crate) fn set_shared_run(&mut self, index: u32) {
        let [a, b, c, _] = index.to_le_bytes();
        self.shared_run = [a, b, c];
    }

    /// The peer's address.
    pub(crate) fn remote(&self) -> SocketAddr {
        match self.cold.as_ref().and_then(|c| c.remote_v6) {
            Some(v6) => SocketAddr::V6(v6),
            None => SocketAddr::V4(self.remote_v4),
        }
    }

    /// The rarely used state, allocated now if it was not.
    #[cold]
    pub(crate) fn cold_mut(&mut self) -> &mut Cold {
        self.cold.get_or_insert_with(Box::default)
    }

    /// The TLS session, if the connection has one.
    #[inline]
    pub(crate) fn tls(&mut self) -> Option<&mut TlsSession> {
        tls_in(&mut self.cold)
    }

    /// Whether a published frame may be written to this connection from the loop's shared
    /// batch (`crate::fanout`) instead of being queued here: open, plain TCP, nothing queued,
    /// in flight or refused, and the socket taking everything so far.
    #[inline]
    pub(crate) fn takes_shared(&self) -> bool {
        self.out.is_empty()
            && self.in_kernel == 0
            && self.direct
            && !self.blocked
            && !self.refused
            && !self.broken
            && self.close == CloseState::Open
            && self.finish == Finish::No
            && self.is_plain()
    }

    /// Queue bytes owed to this connection from the loop's shared batch (already counted as
    /// sent messages), ahead of what it queues next.
    pub(crate) fn queue_shared(&mut self, pool: &mut Scratch, bytes: &[u8]) {
        self.ensure_buf(pool, bytes.len());
        self.out.extend_from_slice(bytes);
        self.dirty = true;
    }

    /// The socket did not take the whole of this connection's run of shared frames: queue the
    /// rest and wait for a writable event, or mark the connection broken, as `flush` would.
    pub(crate) fn shared_unsent(&mut self, pool: &mut Scratch, rest: &[u8], end: WriteEnd) {
        match end {
            WriteEnd::Broken => self.broken = true,
            WriteEnd::Blocked | WriteEnd::Done => {
                self.ensure_buf(pool, rest.len());
                self.out.extend_from_slice(rest);
                self.blocked = end == WriteEnd::Blocked;
                self.dirty = !self.blocked;
            }
        }
    }

    /// Whether the connection is plain TCP (no TLS): a pointer check while it has no cold state.
    #[inline]
    pub(crate) fn is_plain(&self) -> bool {
        self.cold.as_ref().is_none_or(|c| c.tls.is_none())
    }

    /// The connection's slot in its loop's table.
    #[inline]
    pub(crate) fn key(&self) -> u32 {
        self.id.key() as u32
    }

    /// Bytes the kernel has not taken yet: queued here, or in a send still in flight.
    #[inline]
    pub(crate) fn buffered(&self) -> usize {
        self.queued() + self.in_kernel
    }

    /// Bytes queued here and not yet handed to the kernel (plaintext, and sealed records).
    #[inline]
    pub(crate) fn queued(&self) -> usize {
        self.out.len() + self.cold.as_ref().and_then(|c| c.tls.as_ref()).map_or(0, |t| t.sealed.len())
    }

    /// Whether a message was refused since the held bytes were last empty.
    #[inline]
    pub(crate) fn refused(&self) -> bool {
        self.refused
    }

    /// Whether the peer's input must wait: the held bytes are past the limit, or a message
    /// was refused and they have not emptied since (with the drop policy the held bytes never
    /// pass the limit, yet a peer that sends without reading must still be held back).
    #[inline]
    pub(crate) fn over_limit(&self) -> bool {
        let held = self.buffered();
        held > self.out_limit as usize || (self.refused && held != 0)
    }

    /// Take the queued bytes to hand them to the kernel in one send (completion backends);
    /// report its completion with [`Link::sent`].
    pub(crate) fn take_queued(&mut self, pool: &mut Scratch) -> Vec<u8> {
        self.dirty = false;
        let out = match tls_in(&mut self.cold) {
            Some(tls) => {
                if tls.sealed.capacity() == 0 {
                    tls.sealed = pool.take(self.out.len() + 64);
                }
                tls.seal(&mut self.out);
                // The plaintext buffer is empty now: back to the pool, not kept for life.
                if self.out.capacity() != 0 {
                    pool.give(std::mem::take(&mut self.out));
                }
                std::mem::take(&mut tls.sealed)
            }
            None => std::mem::take(&mut self.out),
        };
        self.in_kernel = out.len();
        out
    }

    /// A send of bytes taken with [`Link::take_queued`] completed (the backend returns its
    /// buffer to the pool once the kernel is done with it); returns whether a buffer the kernel
    /// had been slow to take is now empty (time to call `drain`).
    pub(crate) fn sent(&mut self) -> bool {
        self.in_kernel = 0;
        if self.queued() == 0 {
            self.refused = false;
        }
        if self.queued() == 0 && self.blocked {
            self.blocked = false;
            return true;
        }
        false
    }

    /// Whether the socket should be closed now: forced, broken, or finished and flushed.
    #[inline]
    pub(crate) fn should_close(&self, read_closed: bool) -> bool {
        self.broken
            || self.finish == Finish::Now
            || (read_closed
                && matches!(self.finish, Finish::AfterFlush | Finish::Linger)
                && self.queued() == 0)
    }

    /// Whether the connection is on its way out (no more input is processed).
    #[inline]
    pub(crate) fn finishing(&self) -> bool {
        self.finish != Finish::No || self.broken
    }

    /// Append raw bytes produced by `fill` into the output buffer.
    pub(crate) fn push_with(&mut self, pool: &mut Scratch, fill: impl FnOnce(&mut Vec<u8>)) {
        self.ensure_buf(pool, 1024);
        fill(&mut self.out);
        self.dirty = true;
    }

    #[inline]
    fn ensure_buf(&mut self, pool: &mut Scratch, need: usize) {
        if self.out.capacity() == 0 {
            self.out = pool.take(need);
        }
    }

    /// Queue a control frame (pong, ping, close). Control frames are never refused (the
    /// protocol needs them); they count in the held bytes, and a connection whose held bytes
    /// pass `max_backpressure` is not read until they drain, which bounds the pongs a peer can
    /// make us queue.
    pub(crate) fn queue_control(&mut self, pool: &mut Scratch, opcode: OpCode, payload: &[u8]) {
        let mut header = [0u8; MAX_HEADER_LEN];
        let n = write_header(&mut header, FrameSpec::server(opcode), payload.len());
        self.ensure_buf(pool, n + payload.len());
        self.out.extend_from_slice(&header[..n]);
        self.out.extend_from_slice(payload);
        self.dirty = true;
    }

    /// Queue a close frame and move to `next` (Closing when we start the handshake, Closed when
    /// we answer the peer's close).
    pub(crate) fn queue_close(&mut self, pool: &mut Scratch, payload: ClosePayload, next: CloseState) {
        if self.close != CloseState::Open {
            return;
        }
        self.queue_control(pool, OpCode::Close, payload.as_bytes());
        self.close = next;
        if next == CloseState::Closing {
            self.cold_mut().sent_close = Some(Box::new(payload));
        }
    }

    /// Queue a data frame (with RSV1 when `compressed`), enforcing the backpressure limit.
    pub(crate) fn send_frame(
        &mut self,
        pool: &mut Scratch,
        behavior: &Behavior,
        opcode: OpCode,
        compressed: bool,
        payload: &[u8],
    ) -> SendStatus {
        let mut head = Head { bytes: [0; MAX_HEADER_LEN], len: 0 };
        let spec = FrameSpec { compressed, ..FrameSpec::server(opcode) };
        head.len = write_header(&mut head.bytes, spec, payload.len());
        self.send_parts(pool, behavior, &head, payload)
    }

    /// The status of a message [`can_accept`](Link::can_accept) turned down, applying the
    /// backpressure policy as a refused send would.
    pub(crate) fn refuse(&mut self, pool: &mut Scratch, behavior: &Behavior) -> SendStatus {
        if self.close != CloseState::Open || self.finish != Finish::No || self.broken {
            return SendStatus::Closed;
        }
        pool.counters.dropped += 1;
        self.refused = true;
        if behavior.backpressure_policy == BackpressurePolicy::Close {
            self.finish = Finish::Now;
        }
        SendStatus::Dropped
    }

    /// Whether a message of `len` bytes would be accepted now (open, and within the
    /// backpressure limit). Compression with context takeover checks this first: a compressed
    /// message that is then refused would leave the peer's decompressor out of step.
    pub(crate) fn can_accept(&self, behavior: &Behavior, len: usize) -> bool {
        let held = self.buffered();
        self.close == CloseState::Open
            && self.finish == Finish::No
            && !self.broken
            && admits(held, len, behavior.max_backpressure)
    }

    /// Queue bytes that are already a complete frame (a shared, pre-encoded message).
    pub(crate) fn send_encoded(
        &mut self,
        pool: &mut Scratch,
        behavior: &Behavior,
        frame: &[u8],
    ) -> SendStatus {
        self.send_parts(pool, behavior, &Head { bytes: [0; MAX_HEADER_LEN], len: 0 }, frame)
    }

    fn send_parts(
        &mut self,
        pool: &mut Scratch,
        behavior: &Behavior,
        head: &Head,
        body: &[u8],
    ) -> SendStatus {
        if self.close != CloseState::Open || self.finish != Finish::No || self.broken {
            return SendStatus::Closed;
        }
        let len = head.len + body.len();
        if self.out.len() >= CORK_FLUSH && self.direct && !self.blocked {
            self.flush();
        }
        if !admits(self.buffered(), len, behavior.max_backpressure) {
            return self.refuse(pool, behavior);
        }
        pool.counters.messages_out += 1;
        pool.counters.bytes_out += len as u64;
        if self.out.is_empty()
            && self.direct
            && !self.blocked
            && self.is_plain()
            && body.len() >= DIRECT_WRITE_MIN
        {
            // Large payload: write it from the caller's slice, copy only what the kernel refuses.
            let head = &head.bytes[..head.len];
            let written = self.write_vectored(head, body);
            if written < len {
                self.ensure_buf(pool, len - written);
                if written < head.len() {
                    self.out.extend_from_slice(&head[written..]);
                    self.out.extend_from_slice(body);
                } else {
                    self.out.extend_from_slice(&body[written - head.len()..]);
                }
                self.dirty = true;
            }
            return if self.blocked { SendStatus::Backpressure } else { SendStatus::Sent };
        }
        self.ensure_buf(pool, len);
        self.out.reserve(MAX_HEADER_LEN + body.len());
        // The whole header array is a fixed-size copy (two stores); what follows the header
        // is cut off at once, before the payload overwrites it. A copy of `len` bytes was a
        // byte loop.
        let at = self.out.len();
        self.out.extend_from_slice(&head.bytes);
        self.out.truncate(at + head.len);
        self.out.extend_from_slice(body);
        self.dirty = true;
        if self.in_kernel != 0 {
            // Completion backends: these bytes wait behind a send the kernel has not finished.
            self.blocked = true;
        }
        if self.blocked { SendStatus::Backpressure } else { SendStatus::Sent }
    }

    fn write_vectored(&mut self, head: &[u8], body: &[u8]) -> usize {
        let (written, end) = write_some(&self.stream, head, body);
        match end {
            WriteEnd::Done => {}
            WriteEnd::Blocked => self.blocked = true,
            WriteEnd::Broken => self.broken = true,
        }
        written
    }

    /// Write queued bytes until the kernel refuses. Returns true if the buffer emptied after
    /// the kernel had refused bytes before (time to call `drain`).
    pub(crate) fn flush(&mut self) -> bool {
        self.dirty = false;
        if self.queued() == 0 || self.broken || self.finish == Finish::Now {
            return false;
        }
        let was_blocked = self.blocked;
        let buf = match tls_in(&mut self.cold) {
            Some(tls) => {
                tls.seal(&mut self.out);
                &mut tls.sealed
            }
            None => &mut self.out,
        };
        let (written, end) = write_some(&self.stream, &[], buf);
        match end {
            WriteEnd::Done => {
                buf.clear();
                self.blocked = false;
                self.refused = self.in_kernel != 0 && self.refused;
                was_blocked
            }
            WriteEnd::Blocked => {
                buf.drain(..written);
                self.blocked = true;
                false
            }
            WriteEnd::Broken => {
                buf.drain(..written);
                self.broken = true;
                false
            }
        }
    }

    /// Give the output buffer back to the pool if it is empty.
    pub(crate) fn recycle(&mut self, pool: &mut Scratch) {
        if self.out.is_empty() && self.out.capacity() != 0 {
            pool.give(std::mem::take(&mut self.out));
        }
        if let Some(tls) = self.tls()
            && tls.sealed.is_empty()
            && tls.sealed.capacity() != 0
        {
            pool.give(std::mem::take(&mut tls.sealed));
        }
    }

    /// Forget queued bytes and free the buffer (the connection is going away).
    pub(crate) fn discard(&mut self, pool: &mut Scratch) {
        self.out.clear();
        if let Some(tls) = self.tls() {
            tls.sealed.clear();
        }
        self.recycle(pool);
    }

    /// The close code and reason we sent, if we started the close handshake.
    pub(crate) fn sent_close_info(&self) -> (CloseCode, String) {
        match self.cold.as_ref().and_then(|c| c.sent_close.as_ref()) {
            Some(p) => {
                let b = p.as_bytes();
                let code = if b.len() >= 2 {
                    CloseCode(u16::from_be_bytes([b[0], b[1]]))
                } else {
                    CloseCode::NO_STATUS
                };
                (code, String::from_utf8_lossy(b.get(2..).unwrap_or_default()).into_owned())
            }
            None => (CloseCode::ABNORMAL, String::new()),
        }
    }
}

/// Write `head` then `body` (one `writev` while both have bytes left) as far as the kernel
/// takes them; returns the number of bytes written, and whether the socket refused more
/// (`WouldBlock`) or failed.
fn write_some(stream: &TcpStream, head: &[u8], body: &[u8]) -> (usize, WriteEnd) {
    let mut written = 0;
    let total = head.len() + body.len();
    while written < total {
        let result = if written < head.len() {
            (&*stream).write_vectored(&[IoSlice::new(&head[written..]), IoSlice::new(body)])
        } else {
            (&*stream).write(&body[written - head.len()..])
        };
        match result {
            Ok(0) => return (written, WriteEnd::Broken),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (written, WriteEnd::Blocked),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return (written, WriteEnd::Broken),
        }
    }
    (written, WriteEnd::Done)
}

/// Write `bytes` to the socket `fd` as far as the kernel takes them, like [`write_some`], for
/// a caller that holds the descriptor and not the connection (`crate::fanout`).
pub(crate) fn write_fd(fd: RawFd, bytes: &[u8]) -> (usize, WriteEnd) {
    let mut written = 0;
    while written < bytes.len() {
        let rest = &bytes[written..];
        // SAFETY: `rest` is readable for its whole length. `fd` is the socket of a connection
        // in the caller's table, which closes none of them while it writes; a descriptor that
        // were closed all the same would only make the call fail.
        let n = unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
        if n > 0 {
            written += n as usize;
            continue;
        }
        if n == 0 {
            return (written, WriteEnd::Broken);
        }
        match io::Error::last_os_error().kind() {
            io::ErrorKind::WouldBlock => return (written, WriteEnd::Blocked),
            io::ErrorKind::Interrupted => {}
            _ => return (written, WriteEnd::Broken),
        }
    }
    (written, WriteEnd::Done)
}

/// How a [`write_some`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WriteEnd {
    /// Everything was written.
    Done,
    /// The kernel refused the rest for now.
    Blocked,
    /// The socket failed.
    Broken,
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, TcpListener, TcpStream};

    use super::Link;
    use crate::pubsub::ConnId;

    /// The peer's address is kept whole: an IPv4 one inline, an IPv6 one (with its flow label
    /// and scope) in the cold state, which only such a connection allocates from the start.
    #[test]
    fn remote_address_is_kept_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        for remote in ["192.0.2.7:4321", "[2001:db8::1]:443", "[fe80::1%3]:80"] {
            let remote: SocketAddr = remote.parse().unwrap();
            let stream = TcpStream::connect(addr).unwrap();
            let link = Link::new(stream, remote, ConnId::new(0, 1, 1));
            assert_eq!(link.remote(), remote);
            assert_eq!(link.cold.is_some(), remote.is_ipv6(), "cold state for {remote}");
        }
    }
}
