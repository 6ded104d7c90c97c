//! Listening sockets: one per loop on the same address, spread by the kernel with
//! `SO_REUSEPORT`, after a check that no other socket listens there.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

/// Bind a non-blocking listener with `SO_REUSEADDR` and `SO_REUSEPORT`.
pub(crate) fn bind_reuseport(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).map_err(|e| io::Error::new(e.kind(), format!("cannot bind {addr}: {e}")))?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Fail with `AddrInUse` if any socket already listens on `addr` (port 0 is not checked: the
/// kernel picks a free port).
///
/// `SO_REUSEPORT` would let our listeners join those of another process of the same user
/// (another `gale` included) and take a share of its connections. A bind without
/// `SO_REUSEPORT` conflicts with every listening socket on the port, whatever its options, so
/// a probe socket bound that way, and closed at once, finds them. `SO_REUSEADDR` keeps the
/// probe from tripping over connections of an earlier run left in `TIME_WAIT`.
pub(crate) fn ensure_port_free(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    probe.set_reuse_address(true)?;
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("cannot listen on {addr}: another process is already listening there"),
        )),
        Err(e) => Err(io::Error::new(e.kind(), format!("cannot bind {addr}: {e}"))),
    }
}
