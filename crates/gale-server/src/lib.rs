//! `gale-server`: a WebSocket and HTTP/1.1 server with one event loop per core.
//!
//! Each loop owns a listener on the shared port (`SO_REUSEPORT`), its connections, one
//! receive buffer and a pool of send buffers. Connections run through a sans-IO state machine
//! (HTTP requests, the upgrade, then RFC 6455 frames via `gale-frame`), driven by a backend
//! that only moves bytes. Applications describe routes with [`App`]: WebSocket behaviours
//! ([`WsHandler`]) and plain HTTP handlers ([`HttpHandler`]). Connections subscribe to topics
//! ([`WebSocket::subscribe`]); a message published to a topic from any thread
//! ([`ServerHandle::publish_text`], [`WebSocket::publish`]) is framed once and written by each
//! loop to its local subscribers.

#![warn(missing_docs)]

mod app;
mod backend;
mod behavior;
mod compress;
mod conn;
mod fanout;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod handler;
mod link;
mod listener;
mod pubsub;
mod routes;
mod timer;
mod tls;
mod websocket;

pub use app::{
    App, Backend, LoopContext, LoopGone, LoopSnapshot, Running, Server, ServerConfig, ServerHandle,
};
pub use behavior::{BackpressurePolicy, Behavior, Compression, IdleClose};
pub use gale_frame::CloseCode;
pub use handler::{
    Accept, ErrorRenderer, HttpHandler, HttpRequest, HttpResponse, Message, Reject, Responder,
    UpgradeRequest, WsHandler,
};
pub use link::{CONTROL_ALLOWANCE, SendStatus};
pub use pubsub::ConnId;
pub use websocket::WebSocket;
