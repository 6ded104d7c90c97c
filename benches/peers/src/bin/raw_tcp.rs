//! `peer-raw-tcp`: a raw TCP echo with no WebSocket at all (no handshake, no framing), the ceiling
//! of what the kernel allows on this machine.
//!
//! `--threads` event loops, each with its own `mio` poll (edge-triggered epoll) and its own
//! `SO_REUSEPORT` listener on the same port, so the kernel spreads
//! connections over them. A readable socket is read into the loop's 512 KiB buffer until a short
//! read or `WouldBlock`, and every chunk is written straight back; what the socket does not take
//! is kept and the connection stops reading until it is writable again. `TCP_NODELAY` is set.

use std::io::{self, ErrorKind, Read, Write};

use clap::Parser;
use gale_peers::Args;
use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};
use slab::Slab;

const READ_BUFFER: usize = 512 * 1024;
const LISTENER: Token = Token(usize::MAX);

fn main() -> io::Result<()> {
    let args = Args::parse();
    let (port, listeners) = gale_peers::reuseport_listeners(args.port, args.threads.get())?;
    let loops: Vec<_> = listeners.into_iter().map(|l| std::thread::spawn(move || event_loop(l))).collect();
    gale_peers::announce("raw-tcp", "tcp", port)?;
    for handle in loops {
        handle.join().expect("event loop panicked")?;
    }
    Ok(())
}

fn event_loop(mut listener: TcpListener) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut conns: Slab<Conn> = Slab::new();
    let mut buf = vec![0; READ_BUFFER];
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
    loop {
        if let Err(err) = poll.poll(&mut events, None) {
            if err.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        for event in &events {
            if event.token() == LISTENER {
                accept_all(&listener, poll.registry(), &mut conns)?;
                continue;
            }
            let key = event.token().0;
            let open = conns.get_mut(key).is_some_and(|conn| conn.pump(event, &mut buf));
            if !open && conns.contains(key) {
                let mut conn = conns.remove(key);
                let _ = poll.registry().deregister(&mut conn.stream);
            }
        }
    }
}

/// Accepts until `WouldBlock` (edge-triggered) and registers each connection.
fn accept_all(listener: &TcpListener, registry: &Registry, conns: &mut Slab<Conn>) -> io::Result<()> {
    while let Some(mut stream) = gale_peers::accept_ready("raw-tcp", listener) {
        let entry = conns.vacant_entry();
        registry.register(&mut stream, Token(entry.key()), Interest::READABLE | Interest::WRITABLE)?;
        entry.insert(Conn { stream, pending: Vec::new() });
    }
    Ok(())
}

struct Conn {
    stream: TcpStream,
    /// Bytes read but not yet taken by the socket; nothing more is read until they are.
    pending: Vec<u8>,
}

impl Conn {
    /// Echoes everything there is to read. Returns false once the connection is finished.
    fn pump(&mut self, event: &Event, buf: &mut [u8]) -> bool {
        // A short read proves the socket drained, unless the peer already shut down: then read on
        // to see the end, since no further edge will come.
        let closing = event.is_read_closed() || event.is_error();
        loop {
            if !self.pending.is_empty() {
                match write_some(&mut self.stream, &self.pending) {
                    Ok(n) => drop(self.pending.drain(..n)),
                    Err(_) => return false,
                }
                if !self.pending.is_empty() {
                    return true;
                }
            }
            let n = match self.stream.read(buf) {
                Ok(0) => return false,
                Ok(n) => n,
                Err(err) if err.kind() == ErrorKind::WouldBlock => return true,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            };
            match write_some(&mut self.stream, &buf[..n]) {
                Ok(written) if written < n => {
                    self.pending.extend_from_slice(&buf[written..n]);
                    return true;
                }
                Ok(_) => {}
                Err(_) => return false,
            }
            if n < buf.len() && !closing {
                return true;
            }
        }
    }
}

/// Writes as much of `data` as the socket takes now.
fn write_some(stream: &mut TcpStream, data: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < data.len() {
        match stream.write(&data[written..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(err) if err.kind() == ErrorKind::WouldBlock => break,
            Err(err) if err.kind() == ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        }
    }
    Ok(written)
}
