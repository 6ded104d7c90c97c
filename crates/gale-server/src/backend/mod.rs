//! Event-loop implementations. Each drives [`crate::conn::Conn`] and moves bytes; none of them
//! knows the protocol.

mod epoll;

use std::io;
use std::sync::Arc;

use crate::app::{Backend, LoopSeed, ServerHandle, Shared};

/// Token of the waker each loop registers, shared with the handle that wakes it.
pub(crate) const WAKER: mio::Token = mio::Token(usize::MAX - 1);

/// Run one loop until the server shuts down.
pub(crate) fn run(seed: LoopSeed, shared: Arc<Shared>, handle: ServerHandle) -> io::Result<()> {
    match shared.config.backend {
        Backend::Epoll => epoll::EpollLoop::new(seed, shared, handle)?.run(),
    }
}
