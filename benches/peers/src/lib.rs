//! What the peer echo servers share: the command line (`--port`, `--threads`), the single
//! `<name> listening on <scheme>://127.0.0.1:<port>` line a harness waits for, the message size
//! limit, the tokio accept loop of the three tokio-based peers, and the listener and accept
//! step of the two mio-based ones.
//!
//! Each peer is a binary of this crate (`src/bin/`); see `benches/peers/README.md`.

use std::future::Future;
use std::io::{self, ErrorKind, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::time::Duration;

use clap::Parser;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

/// Largest message every peer accepts (16 MiB), so all of them take the same loads.
pub const MAX_MESSAGE: usize = 16 << 20;

/// Command line common to every peer.
#[derive(Parser, Debug, Clone, Copy)]
pub struct Args {
    /// TCP port to listen on, on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Worker threads (tokio runtime workers, or event loops for the raw TCP peers).
    #[arg(long, default_value_t = available_cores())]
    pub threads: NonZeroUsize,
}

fn available_cores() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

/// Prints the one stdout line that says the server accepts connections, and flushes it.
pub fn announce(name: &str, scheme: &str, port: u16) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{name} listening on {scheme}://127.0.0.1:{port}")?;
    out.flush()
}

/// Runs a tokio multi-thread runtime with `args.threads` workers, listens on 127.0.0.1, announces
/// `name`, and spawns `handle` on every accepted connection (with `TCP_NODELAY` set, as Gale and
/// uWebSockets do). Never returns unless the runtime or the listener cannot be set up.
pub fn serve_tokio<H, F>(name: &str, args: Args, handle: H) -> io::Result<()>
where
    H: Fn(TcpStream) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.get())
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, args.port)).await?;
        announce(name, "ws", listener.local_addr()?.port())?;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(handle(stream));
                }
                Err(err) => {
                    // Out of descriptors or a connection reset before accept: back off briefly.
                    eprintln!("{name}: accept: {err}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
}

/// `count` non-blocking `SO_REUSEPORT` listeners on 127.0.0.1:`port` (0 picks a free one),
/// one per mio loop, and the port they share: the kernel spreads connections over them.
pub fn reuseport_listeners(port: u16, count: usize) -> io::Result<(u16, Vec<mio::net::TcpListener>)> {
    let first = reuseport_listener(port)?;
    let port = first.local_addr()?.port();
    let mut listeners = vec![first];
    for _ in 1..count {
        listeners.push(reuseport_listener(port)?);
    }
    Ok((port, listeners))
}

/// A non-blocking `SO_REUSEPORT` listener on 127.0.0.1:`port`.
fn reuseport_listener(port: u16) -> io::Result<mio::net::TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())?;
    socket.listen(1024)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

/// The next connection a mio `listener` has ready, with `TCP_NODELAY` set: edge-triggered
/// loops call it until `None`. `None` too when accept failed (a connection reset before it,
/// or out of descriptors; logged under `name`): the next event tries again.
pub fn accept_ready(name: &str, listener: &mio::net::TcpListener) -> Option<mio::net::TcpStream> {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                return Some(stream);
            }
            Err(err) if err.kind() == ErrorKind::WouldBlock => return None,
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            Err(err) => {
                eprintln!("{name}: accept: {err}");
                return None;
            }
        }
    }
}
