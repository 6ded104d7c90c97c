//! `peer-raw-tcp-fanout`: the ceiling of a fan-out server on this machine. It speaks just enough
//! of the plain fan-out protocol of `gale-loadgen fanout --protocol plain` for the load generator
//! to run against it (connections to `/sub` subscribe, every message a connection to `/pub`
//! sends goes to all subscribers) and does nothing else: no topic table, no per-connection
//! state machine, no limits, no timers.
//!
//! `--threads` event loops, each with its own `mio` poll (edge-triggered epoll) and its own
//! `SO_REUSEPORT` listener on the same port, so the kernel spreads connections over them as it
//! does over Gale's loops. The upgrade is answered with gale-frame's handshake functions (it is
//! not on the measured path). A publisher's frames are unmasked and appended, re-framed as
//! unmasked server frames, to its loop's batch; after each poll iteration the batch is written
//! to every subscriber socket of the loop, so the publishes that arrived in one iteration leave
//! in one `write` per subscriber, as in Gale. What a socket does not take is kept and sent when
//! it is writable again (no backlog limit: the ceiling drops nothing). What subscribers send is
//! read and discarded. `TCP_NODELAY` is set.
//!
//! With more than one loop, a loop that received publishes first appends its batch to every
//! other loop's [`Mailbox`] (one copy per loop, under a mutex) and wakes that loop (`mio::Waker`,
//! an eventfd) only when its mailbox was empty, so one wake per receiving iteration at most; a
//! woken loop moves its mailbox into its own batch and writes it out like its own publishes.

use std::io::{self, ErrorKind, Read, Write};
use std::sync::{Arc, Mutex};

use clap::Parser;
use gale_frame::handshake::{self, AcceptOptions};
use gale_peers::Args;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use slab::Slab;

const READ_BUFFER: usize = 512 * 1024;
const LISTENER: Token = Token(usize::MAX);
const WAKER: Token = Token(usize::MAX - 1);

fn main() -> io::Result<()> {
    let args = Args::parse();
    let (port, listeners) = gale_peers::reuseport_listeners(args.port, args.threads.get())?;
    // Every poll and its waker exist before any loop starts, so each loop can reach the others.
    let mut polls = Vec::new();
    let mut mailboxes = Vec::new();
    for _ in &listeners {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        mailboxes.push(Mailbox { bytes: Mutex::new(Vec::new()), waker });
        polls.push(poll);
    }
    let mailboxes: Arc<[Mailbox]> = mailboxes.into();
    let loops: Vec<_> = listeners
        .into_iter()
        .zip(polls)
        .enumerate()
        .map(|(index, (listener, poll))| {
            let mailboxes = Arc::clone(&mailboxes);
            std::thread::spawn(move || event_loop(index, listener, poll, &mailboxes))
        })
        .collect();
    gale_peers::announce("raw-tcp-fanout", "ws", port)?;
    for handle in loops {
        handle.join().expect("event loop panicked")?;
    }
    Ok(())
}

/// Loop `index` of `mailboxes.len()`: accepts on `listener`, serves its connections, and hands
/// its publishes to the other loops.
fn event_loop(
    index: usize,
    mut listener: TcpListener,
    mut poll: Poll,
    mailboxes: &[Mailbox],
) -> io::Result<()> {
    poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut server = Server { conns: Slab::new(), batch: Vec::new(), buf: vec![0; READ_BUFFER] };
    let mut events = Events::with_capacity(1024);
    loop {
        if let Err(err) = poll.poll(&mut events, None) {
            if err.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        let mut woken = false;
        for event in &events {
            if event.token() == LISTENER {
                server.accept_all(&listener, poll.registry())?;
            } else if event.token() == WAKER {
                woken = true;
            } else {
                let key = event.token().0;
                if !server.pump(key) {
                    server.close(key, poll.registry());
                }
            }
        }
        // The batch holds this loop's own publishes: they go to every other loop first, so the
        // others write while this one does; then what the others posted joins them.
        if !server.batch.is_empty() {
            for (other, mailbox) in mailboxes.iter().enumerate() {
                if other != index {
                    mailbox.post(&server.batch)?;
                }
            }
        }
        if woken {
            mailboxes[index].take_into(&mut server.batch);
        }
        server.flush_batch(poll.registry());
    }
}

/// Publishes handed to one loop by the others: the frames, ready to send, and the loop's waker.
struct Mailbox {
    bytes: Mutex<Vec<u8>>,
    waker: Waker,
}

impl Mailbox {
    /// Appends `frames`, and wakes the loop if nothing was waiting: a loop empties its whole
    /// mailbox when woken, so a non-empty mailbox already has a wake on its way.
    fn post(&self, frames: &[u8]) -> io::Result<()> {
        let was_empty = {
            let mut bytes = self.bytes.lock().expect("mailbox poisoned");
            let was_empty = bytes.is_empty();
            bytes.extend_from_slice(frames);
            was_empty
        };
        if was_empty { self.waker.wake() } else { Ok(()) }
    }

    /// Moves everything posted into `batch` (a swap when `batch` is empty, so the two buffers
    /// trade places and nothing is allocated in steady state).
    fn take_into(&self, batch: &mut Vec<u8>) {
        let mut bytes = self.bytes.lock().expect("mailbox poisoned");
        if batch.is_empty() {
            std::mem::swap(batch, &mut *bytes);
        } else {
            batch.extend_from_slice(&bytes);
            bytes.clear();
        }
    }
}

/// What a connection is, once its upgrade is answered.
enum Role {
    /// Reading the request head.
    Handshaking,
    /// Receives every publish; what it sends is discarded.
    Subscriber,
    /// Every message it sends is published.
    Publisher,
}

struct Conn {
    stream: TcpStream,
    role: Role,
    /// Bytes read but not yet used: an incomplete request head or an incomplete frame.
    input: Vec<u8>,
    /// Bytes the socket has not taken yet; new bytes queue behind them.
    pending: Vec<u8>,
}

struct Server {
    conns: Slab<Conn>,
    /// The frames published during this loop iteration, ready to send.
    batch: Vec<u8>,
    /// The loop's read buffer.
    buf: Vec<u8>,
}

impl Server {
    /// Accepts until `WouldBlock` (edge-triggered) and registers each connection.
    fn accept_all(&mut self, listener: &TcpListener, registry: &Registry) -> io::Result<()> {
        while let Some(mut stream) = gale_peers::accept_ready("raw-tcp-fanout", listener) {
            let entry = self.conns.vacant_entry();
            registry.register(&mut stream, Token(entry.key()), Interest::READABLE | Interest::WRITABLE)?;
            entry.insert(Conn { stream, role: Role::Handshaking, input: Vec::new(), pending: Vec::new() });
        }
        Ok(())
    }

    /// Sends what is pending and reads everything there is to read. Returns false once the
    /// connection is finished.
    fn pump(&mut self, key: usize) -> bool {
        let Some(conn) = self.conns.get_mut(key) else { return true };
        if !conn.pending.is_empty() && conn.send_pending().is_err() {
            return false;
        }
        loop {
            let n = match conn.stream.read(&mut self.buf) {
                Ok(0) => return false,
                Ok(n) => n,
                Err(err) if err.kind() == ErrorKind::WouldBlock => return true,
                Err(err) if err.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            };
            let data = &self.buf[..n];
            let open = match conn.role {
                Role::Subscriber => true,
                Role::Handshaking => conn.handshake(data, &mut self.batch),
                Role::Publisher => {
                    conn.input.extend_from_slice(data);
                    conn.take_frames(&mut self.batch)
                }
            };
            if !open {
                return false;
            }
        }
    }

    /// Writes this iteration's publishes to every subscriber: one `write` each, the rest kept.
    fn flush_batch(&mut self, registry: &Registry) {
        if self.batch.is_empty() {
            return;
        }
        let mut failed = Vec::new();
        for (key, conn) in &mut self.conns {
            if !matches!(conn.role, Role::Subscriber) {
                continue;
            }
            if !conn.pending.is_empty() {
                conn.pending.extend_from_slice(&self.batch);
                continue;
            }
            match write_some(&mut conn.stream, &self.batch) {
                Ok(n) => conn.pending.extend_from_slice(&self.batch[n..]),
                Err(_) => failed.push(key),
            }
        }
        self.batch.clear();
        for key in failed {
            self.close(key, registry);
        }
    }

    fn close(&mut self, key: usize, registry: &Registry) {
        if let Some(mut conn) = self.conns.try_remove(key) {
            let _ = registry.deregister(&mut conn.stream);
        }
    }
}

impl Conn {
    /// Gathers the request head; once complete, answers it (101 on `/sub` and `/pub`, an error
    /// otherwise) and takes the bytes after it as frames. Returns false to close.
    fn handshake(&mut self, data: &[u8], batch: &mut Vec<u8>) -> bool {
        self.input.extend_from_slice(data);
        let mut answer = Vec::new();
        let (role, head_len) = match handshake::parse_request(&self.input) {
            Ok(None) => return true,
            Ok(Some((req, head_len))) => {
                let role = match req.path() {
                    "/sub" => Some(Role::Subscriber),
                    "/pub" => Some(Role::Publisher),
                    _ => None,
                };
                match (role, handshake::validate_upgrade(&req)) {
                    (Some(role), Ok(upgrade)) => {
                        let accept = upgrade.accept_key();
                        handshake::write_accept_response(&mut answer, &accept, &AcceptOptions::default());
                        (Some(role), head_len)
                    }
                    (None, _) => {
                        handshake::write_error_response(&mut answer, 404, "use /sub or /pub", &[]);
                        (None, head_len)
                    }
                    (Some(_), Err(err)) => {
                        err.write_response(&mut answer);
                        (None, head_len)
                    }
                }
            }
            Err(err) => {
                err.write_response(&mut answer);
                (None, 0)
            }
        };
        let sent = write_some(&mut self.stream, &answer).is_ok_and(|n| n == answer.len());
        let Some(role) = role else { return false };
        self.role = role;
        self.input.drain(..head_len);
        match self.role {
            Role::Publisher => sent && self.take_frames(batch),
            _ => {
                self.input = Vec::new();
                sent
            }
        }
    }

    /// Appends every complete frame in `input` to `batch` as an unmasked server frame. Returns
    /// false on a close frame, a fragment, or a frame a client must not send (unmasked).
    fn take_frames(&mut self, batch: &mut Vec<u8>) -> bool {
        let mut at = 0;
        let open = loop {
            match client_frame(&self.input[at..]) {
                Frame::Incomplete => break true,
                Frame::Finished => break false,
                Frame::Complete { opcode, payload, len } => {
                    if opcode == 0x1 || opcode == 0x2 {
                        let start = at + len - payload;
                        let (key, body) = self.input[start - 4..at + len].split_at(4);
                        push_header(batch, opcode, body.len());
                        let from = batch.len();
                        batch.extend_from_slice(body);
                        for (i, byte) in batch[from..].iter_mut().enumerate() {
                            *byte ^= key[i % 4];
                        }
                    }
                    at += len;
                }
            }
        };
        self.input.drain(..at);
        open
    }

    /// Sends what is pending; `Err` when the connection failed.
    fn send_pending(&mut self) -> io::Result<()> {
        let n = write_some(&mut self.stream, &self.pending)?;
        self.pending.drain(..n);
        Ok(())
    }
}

/// What is at the start of a publisher's input.
enum Frame {
    /// Not a whole frame yet.
    Incomplete,
    /// A close frame, a fragment or an unmasked frame: the connection ends.
    Finished,
    /// A whole masked frame: its opcode, payload length and total length.
    Complete { opcode: u8, payload: usize, len: usize },
}

fn client_frame(input: &[u8]) -> Frame {
    let [first, second, ..] = *input else { return Frame::Incomplete };
    let (fin, opcode, masked) = (first & 0x80 != 0, first & 0x0f, second & 0x80 != 0);
    if !fin || !masked || opcode == 0x0 || opcode == 0x8 {
        return Frame::Finished;
    }
    let (payload, header) = match second & 0x7f {
        126 if input.len() >= 4 => (u16::from_be_bytes([input[2], input[3]]) as usize, 4),
        127 if input.len() >= 10 => {
            let mut len = [0; 8];
            len.copy_from_slice(&input[2..10]);
            (usize::try_from(u64::from_be_bytes(len)).unwrap_or(usize::MAX), 10)
        }
        126 | 127 => return Frame::Incomplete,
        n => (n as usize, 2),
    };
    if payload > gale_peers::MAX_MESSAGE {
        return Frame::Finished;
    }
    let len = header + 4 + payload;
    if input.len() < len { Frame::Incomplete } else { Frame::Complete { opcode, payload, len } }
}

/// A server frame header (FIN, no mask) for a `len`-byte payload.
fn push_header(out: &mut Vec<u8>, opcode: u8, len: usize) {
    out.push(0x80 | opcode);
    if len < 126 {
        out.push(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        out.push(126);
        out.extend_from_slice(&len.to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
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
