//! The handle handlers use to act on a connection, and the type erasure that lets routes with
//! different per-connection data types live in one server.

use std::any::Any;
use std::net::SocketAddr;

use gale_frame::{CloseCode, ClosePayload, OpCode, SharedFrame};

use crate::behavior::Behavior;
use crate::compress::ConnCompression;
use crate::handler::{Message, Reject, UpgradeRequest, WsHandler};
use crate::link::{CloseState, Finish, Link, Scratch, SendStatus};
use crate::pubsub::ConnId;

/// A WebSocket connection, as seen from inside a handler call.
///
/// Sends are corked: everything sent while handling one batch of events (one read, one timer
/// tick) goes out in one write at the end of the batch, or earlier once 64 KiB accumulate.
pub struct WebSocket<'a, D> {
    pub(crate) link: &'a mut Link,
    pub(crate) data: &'a mut D,
    pub(crate) compression: &'a mut ConnCompression,
    pub(crate) pool: &'a mut Scratch,
    pub(crate) behavior: &'a Behavior,
}

impl<D> WebSocket<'_, D> {
    /// Send a text message (compressed when permessage-deflate was negotiated and the message
    /// is at least [`Behavior::compress_threshold`] bytes).
    pub fn send_text(&mut self, text: &str) -> SendStatus {
        self.send_data(OpCode::Text, text.as_bytes(), true)
    }

    /// Send a binary message (compressed like [`send_text`](Self::send_text)).
    pub fn send_binary(&mut self, data: &[u8]) -> SendStatus {
        self.send_data(OpCode::Binary, data, true)
    }

    /// Send a message of the same kind as `msg` (handy for echoing).
    pub fn send(&mut self, msg: Message<'_>) -> SendStatus {
        self.send_with(msg, true)
    }

    /// Send a message; `compress: false` sends it uncompressed whatever was negotiated (for
    /// payloads that are already compressed, such as images).
    pub fn send_with(&mut self, msg: Message<'_>, compress: bool) -> SendStatus {
        match msg {
            Message::Text(t) => self.send_data(OpCode::Text, t.as_bytes(), compress),
            Message::Binary(b) => self.send_data(OpCode::Binary, b, compress),
        }
    }

    /// Send a data frame, compressed as negotiated when `compress` allows.
    pub(crate) fn send_data(&mut self, opcode: OpCode, payload: &[u8], compress: bool) -> SendStatus {
        let compress =
            compress && self.compression.is_on() && payload.len() >= self.behavior.compress_threshold();
        if !compress {
            return self.link.send_frame(self.pool, self.behavior, opcode, false, payload);
        }
        // Deflate can grow incompressible data by a few bytes per block: check the limit with
        // that bound before compressing, so the compressor's context never includes a message
        // the peer will not get.
        if !self.link.can_accept(self.behavior, payload.len() + payload.len() / 1000 + 64) {
            return self.link.refuse(self.pool, self.behavior);
        }
        let mut out = std::mem::take(&mut self.pool.codecs.compressed);
        self.compression.compress(&mut self.pool.codecs, payload, &mut out);
        let status = self.link.send_frame(self.pool, self.behavior, opcode, true, &out);
        self.pool.codecs.compressed = out;
        status
    }

    /// Send a frame encoded once for many receivers.
    pub fn send_shared(&mut self, frame: &SharedFrame) -> SendStatus {
        self.link.send_encoded(self.pool, self.behavior, frame.as_bytes())
    }

    /// Send a ping (payload cut to 125 bytes).
    pub fn ping(&mut self, payload: &[u8]) -> SendStatus {
        if self.link.close != CloseState::Open {
            return SendStatus::Closed;
        }
        self.link.queue_control(self.pool, OpCode::Ping, &payload[..payload.len().min(125)]);
        SendStatus::Sent
    }

    /// Start the close handshake: send a close frame with `code` and `reason` (cut to fit), then
    /// wait for the client's close frame, at most [`Behavior::close_timeout`].
    pub fn close(&mut self, code: CloseCode, reason: &str) {
        self.link.queue_close(self.pool, ClosePayload::new(code, reason), CloseState::Closing);
    }

    /// Drop the TCP connection now, without a close frame. The `close` handler sees 1006.
    pub fn end(&mut self) {
        self.link.close = CloseState::Closed;
        self.link.finish = Finish::Now;
    }

    /// Bytes queued for this connection that the kernel has not taken yet.
    pub fn buffered_amount(&self) -> usize {
        self.link.buffered()
    }

    /// Whether messages can still be sent.
    pub fn is_open(&self) -> bool {
        self.link.close == CloseState::Open && self.link.finish == Finish::No && !self.link.broken
    }

    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.link.remote()
    }

    /// The per-connection data created by `upgrade`.
    pub fn data(&mut self) -> &mut D {
        self.data
    }

    /// The route's settings.
    pub fn behavior(&self) -> &Behavior {
        self.behavior
    }

    /// This connection's id (for [`ServerHandle::publish`](crate::ServerHandle::publish)'s
    /// `exclude`).
    pub fn id(&self) -> ConnId {
        self.link.id
    }

    /// Subscribe to `topic`: from now on, every message published to it reaches this
    /// connection (and none published before this call). Returns false if it already was
    /// subscribed. Subscriptions end with the connection.
    pub fn subscribe(&mut self, topic: &str) -> bool {
        if self.link.close != CloseState::Open {
            return false;
        }
        self.pool.topics.subscribe(topic, self.link.key())
    }

    /// Unsubscribe from `topic`; returns whether it was subscribed.
    pub fn unsubscribe(&mut self, topic: &str) -> bool {
        self.pool.topics.unsubscribe(topic, self.link.key())
    }

    /// Whether this connection is subscribed to `topic` (one lookup in the loop's topic
    /// table, however many topics the connection has).
    pub fn is_subscribed(&self, topic: &str) -> bool {
        self.pool.topics.has(topic, self.link.key())
    }

    /// How many topics this connection is subscribed to.
    pub fn subscription_count(&self) -> usize {
        self.pool.topics.of(self.link.key()).len()
    }

    /// The topics this connection is subscribed to.
    pub fn topics(&self) -> impl Iterator<Item = &str> {
        self.pool.topics.of(self.link.key()).iter().map(|t| &**t)
    }

    /// Publish `msg` to every subscriber of `topic` on every loop, this connection included
    /// unless `exclude_self`. Delivery happens after this handler returns, in the order of the
    /// calls. Returns the number of loops it went to (0: no subscribers).
    pub fn publish(&mut self, topic: &str, msg: Message<'_>, exclude_self: bool) -> usize {
        let (opcode, payload) = match msg {
            Message::Text(t) => (OpCode::Text, t.as_bytes()),
            Message::Binary(b) => (OpCode::Binary, b),
        };
        let exclude = exclude_self.then_some(self.link.id);
        self.pool.handle.publish(topic, opcode, payload, true, exclude)
    }

    /// The handle of the server this connection belongs to.
    pub fn server(&self) -> &crate::ServerHandle {
        &self.pool.handle
    }
}

impl<'a> WebSocket<'a, AnyData> {
    /// The handle of a connection whose data type is not known here.
    pub(crate) fn erased(
        link: &'a mut Link,
        session: &'a mut Session,
        pool: &'a mut Scratch,
        behavior: &'a Behavior,
    ) -> Self {
        let Session { data, compression } = session;
        WebSocket { link, data, compression, pool, behavior }
    }

    /// The same connection with its data as a `D`, if it is one.
    pub(crate) fn downcast<D: 'static>(&mut self) -> Option<WebSocket<'_, D>> {
        let data = self.data.downcast_mut::<D>()?;
        Some(WebSocket {
            link: self.link,
            data,
            compression: self.compression,
            pool: self.pool,
            behavior: self.behavior,
        })
    }
}

/// A callback to deliver to a handler.
pub(crate) enum Callback<'a> {
    Open,
    Message(Message<'a>),
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    Drain,
    Close(CloseCode, &'a str),
}

/// Per-connection data of any route, boxed. A zero-sized data type costs no allocation.
pub(crate) type AnyData = Box<dyn Any + Send>;

/// What a handler call needs of a connection besides its link: the application's data and the
/// connection's compression state.
pub(crate) struct Session {
    pub(crate) data: AnyData,
    pub(crate) compression: ConnCompression,
}

/// A [`WsHandler`] with its data type erased.
pub(crate) trait ErasedHandler: Send + Sync {
    fn upgrade(&self, req: &UpgradeRequest<'_>) -> Result<(AnyData, Option<String>), Reject>;
    fn call(
        &self,
        link: &mut Link,
        session: &mut Session,
        pool: &mut Scratch,
        behavior: &Behavior,
        cb: Callback<'_>,
    );
}

impl<H: WsHandler> ErasedHandler for H {
    fn upgrade(&self, req: &UpgradeRequest<'_>) -> Result<(AnyData, Option<String>), Reject> {
        let accept = WsHandler::upgrade(self, req)?;
        Ok((Box::new(accept.data), accept.protocol))
    }

    fn call(
        &self,
        link: &mut Link,
        session: &mut Session,
        pool: &mut Scratch,
        behavior: &Behavior,
        cb: Callback<'_>,
    ) {
        let mut erased = WebSocket::erased(link, session, pool, behavior);
        let Some(mut ws) = erased.downcast::<H::Data>() else {
            // The data was created by this handler's own `upgrade`; a mismatch cannot happen.
            debug_assert!(false, "per-connection data of the wrong type");
            return;
        };
        match cb {
            Callback::Open => self.open(&mut ws),
            Callback::Message(m) => self.message(&mut ws, m),
            Callback::Ping(p) => self.ping(&mut ws, p),
            Callback::Pong(p) => self.pong(&mut ws, p),
            Callback::Drain => self.drain(&mut ws),
            Callback::Close(code, reason) => self.close(&mut ws, code, reason),
        }
    }
}
