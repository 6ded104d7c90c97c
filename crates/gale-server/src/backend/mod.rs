//! Event-loop implementations. Each drives [`crate::conn::Conn`] and moves bytes; none of them
//! knows the protocol.

mod bufring;
mod epoll;
mod uring;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use crate::app::{LoopIo, LoopSeed, ServerHandle, Shared};

pub(crate) use uring::probe as probe_uring;

/// Token of the waker each epoll loop registers, shared with the handle that wakes it.
pub(crate) const WAKER: mio::Token = mio::Token(usize::MAX - 1);

/// A loop that is set up (its poller or ring created, its listener registered) and ready to run.
pub(crate) enum Loop {
    Epoll(Box<epoll::EpollLoop>),
    Uring(Box<uring::UringLoop>),
}

impl Loop {
    /// Set up one loop on the current thread (an io_uring instance belongs to the thread that
    /// creates it).
    pub(crate) fn new(mut seed: LoopSeed, shared: Arc<Shared>, handle: ServerHandle) -> io::Result<Loop> {
        match std::mem::replace(&mut seed.io, LoopIo::Taken) {
            LoopIo::Epoll(poll) => {
                Ok(Loop::Epoll(Box::new(epoll::EpollLoop::new(seed, poll, shared, handle)?)))
            }
            LoopIo::Uring(eventfd) => {
                Ok(Loop::Uring(Box::new(uring::UringLoop::new(seed, eventfd, shared, handle)?)))
            }
            LoopIo::Taken => Err(io::Error::other("event loop started twice")),
        }
    }

    /// Run until the server shuts down.
    pub(crate) fn run(self) -> io::Result<()> {
        match self {
            Loop::Epoll(l) => l.run(),
            Loop::Uring(l) => l.run(),
        }
    }
}

/// The sending half of a connection just accepted into slot `key`, with its TLS session when
/// the server has TLS; `None` (logged) if the session cannot be made.
pub(crate) fn accepted_link(
    stream: std::net::TcpStream,
    remote: std::net::SocketAddr,
    key: usize,
    pool: &mut crate::link::Scratch,
    shared: &Shared,
) -> Option<crate::link::Link> {
    let mut link = crate::link::Link::new(stream, remote, pool.next_id(key));
    if let Some(acceptor) = &shared.tls {
        match acceptor.session() {
            Ok(session) => link.cold_mut().tls = Some(Box::new(session)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a TLS session");
                return None;
            }
        }
    }
    Some(link)
}

/// A non-blocking eventfd, to wake a loop from other threads.
pub(crate) fn eventfd() -> io::Result<Arc<OwnedFd>> {
    // SAFETY: eventfd takes no pointers; it returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    Ok(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Add one to an eventfd's counter, waking whoever waits on it.
pub(crate) fn signal_eventfd(fd: &OwnedFd) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: `fd` is a live eventfd (borrowed for the call) and `one` is 8 readable bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    // EAGAIN means the counter is saturated: the loop is already due to wake.
    if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
