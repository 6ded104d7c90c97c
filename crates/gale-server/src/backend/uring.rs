//! The completion backend: one io_uring instance per loop.
//!
//! - Accepting: one multishot accept on the loop's listener.
//! - Receiving: one multishot receive per connection, into the loop's ring of provided buffers
//!   ([`BufRing`]); the bytes are handed to the connection in place and the buffer goes back
//!   to the ring at once, so no connection holds a receive buffer.
//! - Sending: at the end of each batch of completions, every connection with queued bytes gets
//!   one send of all of them; bytes queued while a send is in flight wait for its completion.
//!   A connection's socket is also in the ring's table of registered files (slot = its slab
//!   key, the first [`FIXED_FILES`] slots), so a send does not look the descriptor up and
//!   take a reference to the file each time.
//!   Sends from `ServerConfig::uring_send_zc` bytes up are zero-copy (`SEND_ZC`), when set.
//! - Waking: a read on the loop's eventfd, which other threads signal.
//! - Timers: the wait for completions carries the timer wheel's timeout.
//! - Submission is batched: SQEs pile up during a batch and go to the kernel with the wait.
//!
//! Ownership rules (no use-after-free):
//! - A send's buffer is moved out of the connection into the loop's table of sends in flight
//!   ([`InFlight`]) and stays there until the send's last completion (for a zero-copy send,
//!   the kernel's notification that it no longer reads the buffer); only then does it return
//!   to the pool. A send of a run of the shared fan-out batch holds a reference to the
//!   batch's bytes instead ([`SendBuf::Shared`]), which live until the last such send ends.
//! - A provided buffer is the kernel's until a completion names it; the bytes named are ours
//!   until released, and the buffer returns to the ring at its last completion.
//! - A closing connection cancels its operations and keeps its slab slot and its descriptor
//!   until every operation it had in flight has completed; only then is the descriptor closed,
//!   so a reused descriptor number can never receive a stale operation. Completions carry the
//!   slot's generation as well, and stale ones are ignored.
//! - On exit the loop cancels everything and waits for the completions before freeing memory
//!   the kernel may still write to.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use io_uring::{IoUring, SubmissionQueue, Submitter, cqueue, opcode, squeue, types};
use slab::Slab;

use super::accepted_link;
use super::bufring::{BufRing, Received};
use crate::app::{LoopContext, LoopSeed, ServerHandle, Shared, Task};
use crate::conn::{Conn, ConnCx, Delivery};
use crate::fanout::SharedBatch;
use crate::link::{Counters, Scratch};
use crate::timer::TimerWheel;

/// Submission queue size; the completion queue is twice as large.
const RING_ENTRIES: u32 = 4096;
/// Buffer group of the receive ring.
const BGID: u16 = 1;
/// Slots in each ring's table of registered files (fewer if `RLIMIT_NOFILE` is lower): the
/// connections in slab slots below it send through the table; the others by descriptor.
/// The kernel keeps a pointer per slot (128 KiB per loop).
const FIXED_FILES: u32 = 16_384;

/// How long accepting pauses after running out of descriptors.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// What a completion is for: the top byte of its user data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Accept = 1,
    Recv = 2,
    Send = 3,
    Wake = 4,
    Cancel = 5,
}

/// User data: op (8 bits) | generation (24 bits) | slab key (32 bits).
fn user_data(op: Op, gen_: u32, key: usize) -> u64 {
    ((op as u64) << 56) | (((gen_ & 0xFF_FFFF) as u64) << 32) | (key as u64 & 0xFFFF_FFFF)
}

fn decode_user_data(ud: u64) -> (u8, u32, usize) {
    ((ud >> 56) as u8, ((ud >> 32) & 0xFF_FFFF) as u32, (ud & 0xFFFF_FFFF) as usize)
}

/// Whether this kernel can run the backend; the reason if not. Probed once per process.
///
/// The probe runs on a thread of its own: tearing down an io_uring instance queues work for
/// the thread that created it, which interrupts that thread's next blocking system call with
/// `EINTR` when the call has a timeout. The caller's thread must not pay for our probe.
pub(crate) fn probe() -> Result<(), String> {
    static RESULT: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    RESULT
        .get_or_init(|| {
            std::thread::Builder::new()
                .name("gale-uring-probe".into())
                .spawn(probe_now)
                .map_err(|e| format!("cannot start the probe: {e}"))?
                .join()
                .unwrap_or_else(|_| Err("the probe panicked".into()))
        })
        .clone()
}

fn probe_now() -> Result<(), String> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        && v.trim() == "2"
    {
        return Err("disabled by /proc/sys/kernel/io_uring_disabled".into());
    }
    let ring = build_ring(8).map_err(|e| format!("cannot create a ring: {e}"))?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| format!("cannot probe opcodes: {e}"))?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::Read::CODE, "read"),
        (opcode::AsyncCancel2::CODE, "async cancel"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("the kernel lacks the {name} opcode"));
        }
    }
    if !ring.params().is_feature_ext_arg() {
        return Err("the kernel lacks IORING_FEAT_EXT_ARG (wait with timeout)".into());
    }
    let bufs = BufRing::new(2, 64, 7, false).map_err(|e| e.to_string())?;
    bufs.register(&ring.submitter()).map_err(|e| format!("provided buffer rings unsupported: {e}"))?;
    let _ = ring.submitter().unregister_buf_ring(7);
    Ok(())
}

/// The smallest send made zero-copy: `configured` (0 = never) if the kernel has `SEND_ZC`.
fn send_zc_threshold(ring: &IoUring, configured: usize) -> usize {
    if configured == 0 {
        return usize::MAX;
    }
    let mut probe = io_uring::Probe::new();
    if ring.submitter().register_probe(&mut probe).is_ok() && probe.is_supported(opcode::SendZc::CODE) {
        configured
    } else {
        tracing::warn!("the kernel lacks SEND_ZC: zero-copy sends are off");
        usize::MAX
    }
}

/// Registers an empty table of files with the ring; returns its size (0 if the kernel refused).
fn register_fixed_files(ring: &IoUring) -> u32 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given and nothing else.
    let nofile = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur.min(u64::from(FIXED_FILES)) as u32
    } else {
        0
    };
    match ring.submitter().register_files_sparse(nofile) {
        Ok(()) => nofile,
        Err(e) => {
            tracing::debug!(error = %e, "no registered files: sends go by descriptor");
            0
        }
    }
}

/// A ring with the flags that suit one thread owning it: a single submitter, and completion
/// work deferred to when we wait (no interrupts of the loop thread).
fn build_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_cqsize(entries * 2)
        .build(entries)
        .or_else(|_| IoUring::builder().setup_coop_taskrun().setup_cqsize(entries * 2).build(entries))
        .or_else(|_| IoUring::new(entries))
}

/// A connection and the operations it has in flight. Eight bytes besides the connection:
/// an idle connection costs io_uring no more than epoll.
struct Entry {
    conn: Conn,
    /// The send in flight: its key in the loop's `sends`, or [`NO_SEND`].
    send: u32,
    /// Operations whose last completion has not arrived (receive, send, cancel): at most one
    /// of each.
    ops: u8,
    /// A multishot receive is armed.
    recv_armed: bool,
    /// Torn down: waiting for `ops` to reach zero before freeing the slot.
    closing: bool,
    /// Queued for a send at the end of the batch.
    dirty: bool,
}

/// [`Entry::send`] when no send is in flight.
const NO_SEND: u32 = u32::MAX;

impl Entry {
    /// Tells this connection's completions from those of an earlier one in the same slot:
    /// the serial of its id.
    fn generation(&self) -> u32 {
        self.conn.link.id.serial()
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.conn.link.stream.as_raw_fd())
    }
}

/// Queue `sqe` on `sq`; if the queue is full, hand the kernel what it holds first. Small, so
/// that a fan-out batch, which pushes thousands in a row, has it inline.
#[inline]
fn push_into(submitter: &Submitter<'_>, sq: &mut SubmissionQueue<'_>, sqe: &squeue::Entry) {
    // SAFETY: every SQE we build points only at memory that outlives its operation: send
    // buffers held in `sends` until their last completion or notification, the boxed eventfd
    // buffer, and the registered buffer ring (see the module docs).
    while unsafe { sq.push(sqe) }.is_err() {
        make_room(submitter, sq);
    }
}

/// The submission queue is full: hand the kernel what it holds.
#[cold]
#[inline(never)]
fn make_room(submitter: &Submitter<'_>, sq: &mut SubmissionQueue<'_>) {
    sq.sync();
    if let Err(e) = submitter.submit() {
        tracing::warn!(error = %e, "io_uring submit failed");
        std::thread::yield_now();
    }
    sq.sync();
}

/// Where a send goes: connection `key`'s socket `fd`, by its registered slot if the key is
/// below `fixed_files`; zero-copy from `zc_from` bytes.
struct SendTarget {
    key: usize,
    fd: types::Fd,
    fixed_files: u32,
    zc_from: usize,
}

/// The SQE that sends `rest` to `to` for the send in flight `skey`.
fn send_sqe(to: SendTarget, rest: &[u8], skey: usize, counters: &mut Counters) -> squeue::Entry {
    let zero_copy = rest.len() >= to.zc_from;
    if zero_copy {
        counters.zero_copy_sends += 1;
    }
    // The same send by registered slot or by descriptor (two types, so built twice).
    macro_rules! send_to {
        ($target:expr) => {
            if zero_copy {
                opcode::SendZc::new($target, rest.as_ptr(), rest.len() as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
            } else {
                opcode::Send::new($target, rest.as_ptr(), rest.len() as u32).flags(libc::MSG_NOSIGNAL).build()
            }
        };
    }
    let sqe = if to.key < to.fixed_files as usize {
        send_to!(types::Fixed(to.key as u32))
    } else {
        send_to!(to.fd)
    };
    sqe.user_data(user_data(Op::Send, 0, skey))
}

/// A send whose buffer the kernel may still read. Its completions name its key in the loop's
/// `sends` (not the connection's): a zero-copy send's buffer can outlive its connection.
struct InFlight {
    buf: SendBuf,
    /// Bytes of `buf` the kernel has taken so far.
    done: usize,
    /// The connection sending it, or [`DETACHED`] once the send is over for the connection
    /// while the kernel still holds the buffer.
    conn: u32,
    /// Zero-copy notifications still to come: the kernel reads the buffer until the peer has
    /// acknowledged the bytes, long after the send's result.
    notifs: u8,
}

/// The bytes of a send in flight.
enum SendBuf {
    /// The connection's own queued bytes, back to the pool when the send is over.
    Own(Vec<u8>),
    /// A run of the loop's shared fan-out batch (`crate::fanout`): `start..end` of bytes that
    /// other sends share, freed with the last of them.
    Shared { bytes: Rc<Vec<u8>>, start: usize, end: usize },
}

impl SendBuf {
    fn bytes(&self) -> &[u8] {
        match self {
            SendBuf::Own(buf) => buf,
            SendBuf::Shared { bytes, start, end } => &bytes[*start..*end],
        }
    }

    /// The kernel is done with the bytes: an own buffer goes back to the pool.
    fn release(self, pool: &mut Scratch) {
        if let SendBuf::Own(buf) = self {
            pool.give(buf);
        }
    }
}

/// [`InFlight::conn`] of a send that is over for its connection.
const DETACHED: u32 = u32::MAX;

/// The entry a completion is for, if the slot still holds the same connection.
fn entry(conns: &mut Slab<Entry>, key: usize, generation: u32) -> Option<&mut Entry> {
    conns.get_mut(key).filter(|e| e.generation() == generation)
}

/// What the connections borrow from their loop.
struct Env {
    shared: Arc<Shared>,
    pool: Scratch,
    wheel: TimerWheel,
}

impl Env {
    fn cx(&mut self) -> ConnCx<'_> {
        ConnCx {
            routes: &self.shared.routes,
            config: &self.shared.config,
            handshake_ticks: self.shared.handshake_ticks,
            pool: &mut self.pool,
            now: self.wheel.now(),
        }
    }
}

pub(crate) struct UringLoop {
    index: usize,
    ring: IoUring,
    bufs: BufRing,
    listener: Option<std::net::TcpListener>,
    eventfd: Arc<OwnedFd>,
    /// Where the eventfd read lands; boxed so its address is stable while the read is in flight.
    wake_buf: Box<[u8; 8]>,
    rx: Receiver<Task>,
    handle: ServerHandle,
    conns: Slab<Entry>,
    /// Sends in flight, by [`Entry::send`].
    sends: Slab<InFlight>,
    /// Sends of at least this many bytes are zero-copy; `usize::MAX` when off.
    send_zc_from: usize,
    /// Slots in the ring's table of registered files: a connection whose key is below it has
    /// its socket there, at its key.
    fixed_files: u32,
    env: Env,
    accept_armed: bool,
    accept_paused_until: Option<Instant>,
    out_of_descriptors: bool,
    dirty: Vec<usize>,
    due: Vec<(u32, u32)>,
    completions: Vec<(u64, i32, u32)>,
    shutdown_deadline: Option<Instant>,
    /// Subscribers a published message goes to (reused).
    recipients: Vec<u32>,
    /// Published frames owed to idle subscribers, sent at the end of a run of publishes.
    batch: SharedBatch,
}

impl UringLoop {
    pub(crate) fn new(
        seed: LoopSeed,
        eventfd: Arc<OwnedFd>,
        shared: Arc<Shared>,
        handle: ServerHandle,
    ) -> io::Result<Self> {
        let ring = build_ring(RING_ENTRIES)?;
        let bufs = BufRing::for_loop(&ring.submitter(), &shared.config, BGID)?;
        let send_zc_from = send_zc_threshold(&ring, shared.config.uring_send_zc);
        let fixed_files = register_fixed_files(&ring);
        let mut lp = UringLoop {
            index: seed.index,
            ring,
            bufs,
            listener: Some(seed.listener),
            eventfd,
            wake_buf: Box::new([0; 8]),
            rx: seed.rx,
            handle: handle.clone(),
            conns: Slab::new(),
            sends: Slab::new(),
            send_zc_from,
            fixed_files,
            env: Env { shared, pool: Scratch::new(handle.clone(), seed.index), wheel: TimerWheel::new() },
            accept_armed: false,
            accept_paused_until: None,
            out_of_descriptors: false,
            dirty: Vec::new(),
            due: Vec::new(),
            completions: Vec::with_capacity(1024),
            shutdown_deadline: None,
            recipients: Vec::new(),
            batch: SharedBatch::default(),
        };
        lp.arm_accept();
        lp.arm_wake();
        Ok(lp)
    }

    /// Queue an SQE, submitting first if the queue is full.
    fn push(&mut self, sqe: squeue::Entry) {
        let (submitter, mut sq, _) = self.ring.split();
        push_into(&submitter, &mut sq, &sqe);
    }

    fn arm_accept(&mut self) {
        let Some(listener) = &self.listener else { return };
        let fd = listener.as_raw_fd();
        let sqe = opcode::AcceptMulti::new(types::Fd(fd))
            .flags(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK)
            .build()
            .user_data(user_data(Op::Accept, 0, 0));
        self.push(sqe);
        self.accept_armed = true;
    }

    fn arm_wake(&mut self) {
        let sqe = opcode::Read::new(types::Fd(self.eventfd.as_raw_fd()), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(user_data(Op::Wake, 0, 0));
        self.push(sqe);
    }

    fn arm_recv(&mut self, key: usize) {
        let e = &mut self.conns[key];
        if e.recv_armed || e.closing || e.conn.read_closed || e.conn.reading_paused() {
            return;
        }
        e.recv_armed = true;
        e.ops += 1;
        let sqe =
            opcode::RecvMulti::new(e.fd(), BGID).build().user_data(user_data(Op::Recv, e.generation(), key));
        self.push(sqe);
    }

    pub(crate) fn run(mut self) -> io::Result<()> {
        loop {
            self.wait()?;
            let mut due = std::mem::take(&mut self.due);
            self.env.wheel.advance(&mut due);
            let mut completions = std::mem::take(&mut self.completions);
            completions.clear();
            completions.extend(self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
            for &(ud, res, flags) in &completions {
                self.on_completion(ud, res, flags);
            }
            self.completions = completions;
            for &(key, tick) in &due {
                self.on_timer(key as usize, tick);
            }
            due.clear();
            self.due = due;
            // Tasks posted by this loop's own handlers (publishes) go out in this iteration.
            self.run_tasks();
            self.send_dirty();
            self.handle.stats(self.index).store(self.conns.len(), &self.env.pool.counters);
            if !self.accept_armed
                && self.listener.is_some()
                && self.accept_paused_until.is_none_or(|t| Instant::now() >= t)
            {
                self.accept_paused_until = None;
                self.arm_accept();
            }
            if let Some(deadline) = self.shutdown_deadline {
                if self.conns.is_empty() {
                    break;
                }
                if Instant::now() >= deadline {
                    let keys: Vec<usize> =
                        self.conns.iter().filter(|(_, e)| !e.closing).map(|(k, _)| k).collect();
                    for key in keys {
                        self.teardown(key);
                    }
                    break;
                }
            }
        }
        self.drain_before_exit();
        Ok(())
    }

    /// Submit queued SQEs and wait for at least one completion, or the next timer.
    fn wait(&mut self) -> io::Result<()> {
        let now = Instant::now();
        let mut timeout = self.env.wheel.timeout();
        if self.handle.has_tasks(self.index) {
            // Tasks this loop posted to itself after it last ran them came with no wake.
            timeout = Some(Duration::ZERO);
        }
        for at in [self.accept_paused_until.filter(|_| !self.accept_armed), self.shutdown_deadline]
            .into_iter()
            .flatten()
        {
            let d = at.saturating_duration_since(now);
            timeout = Some(timeout.map_or(d, |t| t.min(d)));
        }
        let result = match timeout {
            Some(t) => {
                let ts = types::Timespec::new().sec(t.as_secs()).nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn on_completion(&mut self, ud: u64, res: i32, flags: u32) {
        let (op, generation, key) = decode_user_data(ud);
        match op {
            x if x == Op::Accept as u8 => self.on_accept(res, flags),
            x if x == Op::Wake as u8 => {
                self.run_tasks();
                self.arm_wake();
            }
            x if x == Op::Recv as u8 => self.on_recv(key, generation, res, flags),
            x if x == Op::Send as u8 => self.on_send(key, res, flags),
            x if x == Op::Cancel as u8 => self.op_done(key, generation),
            _ => {}
        }
    }

    /// One of a connection's operations finished for good.
    fn op_done(&mut self, key: usize, generation: u32) {
        let Some(e) = entry(&mut self.conns, key, generation) else { return };
        e.ops = e.ops.saturating_sub(1);
        if e.closing && e.ops == 0 {
            self.free(key);
        }
    }

    fn on_accept(&mut self, res: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.accept_armed = false;
        }
        if res < 0 {
            let errno = -res;
            if matches!(errno, libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) {
                if !self.out_of_descriptors {
                    tracing::warn!(errno, "out of descriptors: accepting paused until one frees up");
                    self.out_of_descriptors = true;
                }
                self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
            } else if errno != libc::ECANCELED && errno != libc::ECONNABORTED && errno != libc::EINTR {
                tracing::warn!(errno, "accept failed");
                self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
            }
            return;
        }
        if self.out_of_descriptors {
            tracing::info!("accepting again");
            self.out_of_descriptors = false;
        }
        // SAFETY: a successful accept completion hands us a new descriptor nobody else owns.
        let stream = unsafe { TcpStream::from_raw_fd(res) };
        if self.shutdown_deadline.is_some() {
            return;
        }
        let _ = stream.set_nodelay(true);
        let Ok(remote) = stream.peer_addr() else { return };
        // The socket is non-blocking: io_uring operations still wait for readiness (it arms a
        // poll on EAGAIN), and the connection may write directly while no send is in flight.
        let slot = self.conns.vacant_entry().key();
        let Some(link) = accepted_link(stream, remote, slot, &mut self.env.pool, &self.env.shared) else {
            return;
        };
        // Registered only now that the connection is taken: a refused one must leave no
        // reference to its socket in the table.
        if slot < self.fixed_files as usize
            && let Err(e) =
                self.ring.submitter().register_files_update(slot as u32, &[link.stream.as_raw_fd()])
        {
            // Its sends would name an empty slot: refuse the connection (the kernel is out
            // of memory); dropping it closes the socket.
            tracing::warn!(error = %e, "cannot register an accepted connection's socket");
            return;
        }
        let now = self.env.wheel.now();
        let key = self.conns.insert(Entry {
            conn: Conn::new(link, now),
            send: NO_SEND,
            ops: 0,
            recv_armed: false,
            closing: false,
            dirty: false,
        });
        self.arm_recv(key);
        let e = &mut self.conns[key];
        let cx = self.env.cx();
        if let Some(deadline) = e.conn.deadline(&cx) {
            e.conn.timer_at = self.env.wheel.schedule(key as u32, deadline);
        }
        self.update_stats();
    }

    fn on_recv(&mut self, key: usize, generation: u32, res: i32, flags: u32) {
        let received = self.bufs.completed(res, flags);
        self.receive(key, generation, res, cqueue::more(flags), received);
        // Read or not (the connection gone, going, or no data), the bytes are done with.
        if let Some(received) = received {
            self.bufs.release(received);
        }
    }

    /// Act on a receive completion for connection `key`; `received` is what it put in a
    /// provided buffer, released by the caller afterwards.
    fn receive(&mut self, key: usize, generation: u32, res: i32, more: bool, received: Option<Received>) {
        let Some(e) = entry(&mut self.conns, key, generation) else { return };
        if !more {
            e.recv_armed = false;
            e.ops = e.ops.saturating_sub(1);
        }
        if e.closing {
            if e.ops == 0 {
                self.free(key);
            }
            return;
        }
        if res > 0 {
            // A receive with data always names its buffer.
            let Some(received) = received else { return };
            e.conn.on_input(self.bufs.get(received), &mut self.env.cx());
        } else if res == 0 {
            e.conn.on_eof(&mut self.env.cx());
        } else if -res == libc::ENOBUFS {
            // The buffer ring ran dry for a moment: receive again (below), once this batch of
            // completions has handed its buffers back.
            self.env.pool.counters.receive_buffer_shortages += 1;
        } else if -res != libc::ECANCELED {
            e.conn.link.broken = true;
            e.conn.on_eof(&mut self.env.cx());
        }
        self.settle(key);
        if !more && self.conns.contains(key) {
            self.arm_recv(key);
        }
    }

    /// A completion of send `skey`: its result (acted on at once), or a zero-copy send's
    /// notification that the kernel no longer reads the buffer.
    fn on_send(&mut self, skey: usize, res: i32, flags: u32) {
        let Some(sending) = self.sends.get_mut(skey) else { return };
        if cqueue::notif(flags) {
            sending.notifs = sending.notifs.saturating_sub(1);
            if sending.conn == DETACHED && sending.notifs == 0 {
                self.sends.remove(skey).buf.release(&mut self.env.pool);
            }
            return;
        }
        if cqueue::more(flags) {
            // Zero-copy: the buffer stays the kernel's until the notification.
            sending.notifs += 1;
        }
        let key = sending.conn as usize;
        let Some(e) = self.conns.get_mut(key).filter(|e| e.send as usize == skey) else {
            debug_assert!(false, "a send result for no connection");
            return;
        };
        e.ops = e.ops.saturating_sub(1);
        if res >= 0 {
            sending.done += res as usize;
            let len = sending.buf.bytes().len();
            if sending.done < len && !e.closing {
                // The kernel took part of it: send the rest before anything queued after it.
                e.conn.link.in_kernel = len - sending.done;
                e.conn.link.blocked = true;
                self.submit_send(key);
                return;
            }
        }
        // The send is over for the connection; its buffer goes back to the pool now, or at the
        // last notification.
        e.send = NO_SEND;
        if sending.notifs == 0 {
            self.sends.remove(skey).buf.release(&mut self.env.pool);
        } else {
            sending.conn = DETACHED;
        }
        if res < 0 {
            e.conn.link.in_kernel = 0;
            if !e.closing {
                e.conn.link.broken = true;
                e.conn.on_eof(&mut self.env.cx());
            }
        } else {
            e.conn.link.direct = true;
            if e.conn.link.sent() && !e.closing {
                e.conn.drained(&mut self.env.cx());
            } else if !e.closing && e.conn.quiet() {
                // The usual end of a fan-out send: settling would find nothing to do (as
                // epoll's `write_batch` does not settle a run the socket took whole).
                return;
            }
        }
        if e.closing {
            if e.ops == 0 {
                self.free(key);
            }
            return;
        }
        self.settle(key);
    }

    /// Hand the unsent rest of connection `key`'s send in flight to the kernel.
    fn submit_send(&mut self, key: usize) {
        let e = &mut self.conns[key];
        let sending = &self.sends[e.send as usize];
        let sqe = send_sqe(
            SendTarget { key, fd: e.fd(), fixed_files: self.fixed_files, zc_from: self.send_zc_from },
            &sending.buf.bytes()[sending.done..],
            e.send as usize,
            &mut self.env.pool.counters,
        );
        e.ops += 1;
        self.push(sqe);
    }

    /// After a connection handled something: queue it for a send, close it if it is done,
    /// keep its timer no later than its deadline.
    fn settle(&mut self, key: usize) {
        let Some(e) = self.conns.get_mut(key) else { return };
        if e.closing {
            return;
        }
        if e.conn.link.queued() > 0 && !e.dirty {
            e.dirty = true;
            self.dirty.push(key);
        }
        if e.conn.after_flush(self.env.wheel.now()) && !e.dirty {
            // close_notify to send before the shutdown.
            e.dirty = true;
            self.dirty.push(key);
        }
        if e.conn.should_close() {
            self.teardown(key);
            return;
        }
        if e.conn.reading_paused() {
            if e.conn.resume_reading(self.env.wheel.now()) {
                // Re-armed now, or when the cancelled receive's last completion comes.
                self.arm_recv(key);
            }
        } else if e.conn.output_over_limit() && !e.conn.read_closed {
            self.pause_reading(key);
        }
        let Some(e) = self.conns.get_mut(key) else { return };
        let cx = self.env.cx();
        if let Some(deadline) = e.conn.deadline(&cx)
            && (e.conn.timer_at == 0 || deadline < e.conn.timer_at)
        {
            e.conn.timer_at = self.env.wheel.schedule(key as u32, deadline);
        }
    }

    /// The connection's held output passed its limit: stop receiving (cancel the multishot
    /// receive; it is not re-armed while paused) so that its input stays in the kernel and
    /// its TCP window pushes back. Completions already in this batch are still handled.
    fn pause_reading(&mut self, key: usize) {
        let e = &mut self.conns[key];
        e.conn.pause_reading(&mut self.env.cx());
        if !e.recv_armed {
            return;
        }
        e.ops += 1;
        let sqe = opcode::AsyncCancel::new(user_data(Op::Recv, e.generation(), key))
            .build()
            .user_data(user_data(Op::Cancel, e.generation(), key));
        self.push(sqe);
    }

    /// One send per connection with queued bytes and none in flight.
    fn send_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &key in &dirty {
            let Some(e) = self.conns.get_mut(key) else { continue };
            e.dirty = false;
            if e.closing || e.send != NO_SEND || e.conn.link.queued() == 0 {
                continue;
            }
            let buf = e.conn.link.take_queued(&mut self.env.pool);
            e.conn.link.direct = false;
            let buf = SendBuf::Own(buf);
            e.send = self.sends.insert(InFlight { buf, done: 0, conn: key as u32, notifs: 0 }) as u32;
            self.submit_send(key);
        }
        let mut dirty = dirty;
        dirty.clear();
        if self.dirty.is_empty() {
            self.dirty = dirty;
        }
    }

    fn on_timer(&mut self, key: usize, tick: u32) {
        let Some(e) = self.conns.get_mut(key) else { return };
        if e.closing || e.conn.timer_at != tick {
            return;
        }
        e.conn.timer_at = 0;
        e.conn.on_timer(&mut self.env.cx());
        self.settle(key);
    }

    /// The connection is done: deliver `close`, cancel its operations, free it once they end.
    fn teardown(&mut self, key: usize) {
        let e = &mut self.conns[key];
        if e.closing {
            return;
        }
        e.closing = true;
        e.conn.on_teardown(&mut self.env.cx());
        e.conn.link.discard(&mut self.env.pool);
        if e.ops == 0 {
            self.free(key);
            return;
        }
        e.ops += 1;
        let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::fd(e.fd()).all())
            .build()
            .user_data(user_data(Op::Cancel, e.generation(), key));
        self.push(sqe);
    }

    /// Every operation of a closing connection has completed: close the descriptor.
    fn free(&mut self, key: usize) {
        let e = self.conns.remove(key);
        // With nothing in flight the send's result has come, which ended the send.
        debug_assert_eq!(e.send, NO_SEND);
        if key < self.fixed_files as usize {
            // The table holds a reference to the socket: without this it would stay open
            // (no FIN to the peer) until the slot is reused.
            if let Err(err) = self.ring.submitter().register_files_update(key as u32, &[-1]) {
                tracing::warn!(error = %err, "cannot unregister a closed connection's socket");
            }
        }
        // Dropping the stream closes the descriptor (and so frees what the kernel still held
        // of a zero-copy send: its notification follows).
        drop(e);
        self.update_stats();
        // A descriptor was freed: accepting may work again.
        if self.accept_paused_until.is_some() {
            self.accept_paused_until = Some(Instant::now());
        }
    }

    fn update_stats(&self) {
        self.handle.stats(self.index).store(self.conns.len(), &self.env.pool.counters);
    }

    fn run_tasks(&mut self) {
        self.handle.awake(self.index);
        while let Ok(task) = self.rx.try_recv() {
            // Whatever another task queues for a subscriber goes after the frames the
            // subscriber is owed from the shared batch.
            if !matches!(task, Task::Publish(_)) {
                self.send_batch();
            }
            self.run_task(task);
        }
        self.send_batch();
    }

    fn run_task(&mut self, task: Task) {
        match task {
            Task::Shutdown => self.begin_shutdown(),
            Task::Run(f) => {
                let mut cx = LoopContext { index: self.index, connections: self.conns.len() };
                f(&mut cx);
            }
            Task::Publish(msg) => self.deliver(&msg),
            Task::RunOn(id, f) => {
                if let Some(key) = self.key_of(id) {
                    self.conns[key].conn.run_on(f, &mut self.env.cx());
                    self.settle(key);
                }
            }
            Task::Respond(id, response) => {
                if let Some(key) = self.key_of(id) {
                    self.conns[key].conn.deferred_response(&response, &mut self.env.cx());
                    self.settle(key);
                }
            }
            Task::Subscribe(id, name, global, since) => {
                let key = self.key_of(id).filter(|&k| self.conns[k].conn.is_open_ws());
                self.env.pool.topics.settle_prepared(name, global, key.map(|k| k as u32), since);
            }
        }
    }

    /// Make each subscriber's run of the shared batch a send in flight (pointing into the
    /// batch's bytes, which the sends share), as `send_dirty` does with queued bytes.
    fn send_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let (conns, sends, counters) = (&mut self.conns, &mut self.sends, &mut self.env.pool.counters);
        let (fixed_files, zc_from) = (self.fixed_files, self.send_zc_from);
        // One view of the submission queue for the whole batch: its tail is published to the
        // kernel once, not once per send (a send per subscriber, thousands per publish).
        let (submitter, mut sq, _) = self.ring.split();
        self.batch.hand_over(|key, bytes, start, end| {
            // An owed connection has no send in flight and is not closing: nothing but
            // deliveries ran since it was owed, and those leave it alone.
            let Some(e) = conns.get_mut(key).filter(|e| !e.closing && e.send == NO_SEND) else {
                debug_assert!(false, "a run of the batch owed to a busy or closing connection");
                return;
            };
            e.conn.link.in_kernel = end - start;
            e.conn.link.direct = false;
            let buf = SendBuf::Shared { bytes: Rc::clone(bytes), start, end };
            let skey = sends.insert(InFlight { buf, done: 0, conn: key as u32, notifs: 0 });
            e.send = skey as u32;
            e.ops += 1;
            let target = SendTarget { key, fd: e.fd(), fixed_files, zc_from };
            push_into(&submitter, &mut sq, &send_sqe(target, &bytes[start..end], skey, counters));
        });
    }

    /// The slot of connection `id`, if it is still there and not closing.
    fn key_of(&self, id: crate::pubsub::ConnId) -> Option<usize> {
        let key = id.key();
        self.conns.get(key).filter(|e| !e.closing && e.conn.link.id == id).map(|_| key)
    }

    /// Deliver a published message to the local subscribers of its topic: owed from the shared
    /// batch by those that take it (no copy), queued in their own buffers for the others; the
    /// sends go out at the end of the run of publishes and with the other dirty connections.
    fn deliver(&mut self, msg: &crate::pubsub::Published) {
        if self.batch.is_full() {
            self.send_batch();
        }
        let mut keys = std::mem::take(&mut self.recipients);
        self.env.pool.topics.recipients(msg, &mut keys);
        self.batch.next_message();
        let frame = msg.frame();
        for &key in &keys {
            let Some(e) = self.conns.get_mut(key as usize) else { continue };
            if e.closing {
                continue;
            }
            match e.conn.delivery(msg, &self.env.shared.routes) {
                Delivery::Skip => continue,
                Delivery::Shared(limit)
                    if e.send == NO_SEND
                        && self.batch.owe_to(
                            key,
                            &mut e.conn.link,
                            frame,
                            limit,
                            &mut self.env.pool.counters,
                        ) =>
                {
                    continue;
                }
                Delivery::Shared(_) | Delivery::Own => {}
            }
            // What it is owed from the batch goes first.
            if let Some(owed) = self.batch.take_run(key, e.conn.link.shared_run()) {
                e.conn.link.queue_shared(&mut self.env.pool, owed);
            }
            e.conn.deliver(msg, &mut self.env.cx());
            self.settle(key as usize);
        }
        self.recipients = keys;
    }

    fn begin_shutdown(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        self.shutdown_deadline = Some(Instant::now() + self.env.shared.config.shutdown_timeout);
        if let Some(listener) = self.listener.take() {
            // The multishot accept holds the listener: cancel it, then close the socket.
            let sqe =
                opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(listener.as_raw_fd())).all())
                    .build()
                    .user_data(user_data(Op::Cancel, 0, usize::MAX & 0xFFFF_FFFF));
            self.push(sqe);
            let _ = self.ring.submit();
            drop(listener);
        }
        let keys: Vec<usize> = self.conns.iter().filter(|(_, e)| !e.closing).map(|(k, _)| k).collect();
        for key in keys {
            self.conns[key].conn.on_shutdown(&mut self.env.cx());
            self.settle(key);
        }
    }

    /// Cancel whatever is still in flight and wait for it, so that no operation outlives the
    /// memory it points at.
    fn drain_before_exit(&mut self) {
        let keys: Vec<usize> = self.conns.iter().filter(|(_, e)| !e.closing).map(|(k, _)| k).collect();
        for key in keys {
            self.teardown(key);
        }
        let give_up = Instant::now() + Duration::from_secs(2);
        while !(self.conns.is_empty() && self.sends.is_empty()) && Instant::now() < give_up {
            let ts = types::Timespec::new().nsec(50_000_000);
            let _ = self.ring.submitter().submit_with_args(1, &types::SubmitArgs::new().timespec(&ts));
            let batch: Vec<(u64, i32, u32)> =
                self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())).collect();
            for (ud, res, flags) in batch {
                let (op, generation, key) = decode_user_data(ud);
                match op {
                    x if x == Op::Recv as u8 => self.on_recv(key, generation, res, flags),
                    x if x == Op::Send as u8 => self.on_send(key, res, flags),
                    x if x == Op::Cancel as u8 => self.op_done(key, generation),
                    _ => {}
                }
            }
        }
        if !(self.conns.is_empty() && self.sends.is_empty()) {
            // Operations that would not complete: keep their memory alive rather than risk the
            // kernel writing into freed buffers; the process is on its way out.
            tracing::warn!(left = self.conns.len(), "io_uring operations still in flight at exit");
            std::mem::forget(std::mem::take(&mut self.conns));
            std::mem::forget(std::mem::take(&mut self.sends));
        } else {
            // Every buffer a completion took must be back in the ring: a lost one would shrink
            // the ring for good, unnoticed.
            debug_assert_eq!(self.bufs.out(), 0, "receive buffers not handed back");
        }
    }
}

impl Drop for UringLoop {
    fn drop(&mut self) {
        // The kernel stops using the buffer ring when the io_uring instance goes; unregister
        // first so the memory is not referenced while `bufs` is dropped after `ring`.
        let _ = self.ring.submitter().unregister_buf_ring(BGID);
    }
}

#[cfg(test)]
mod tests {
    /// The io_uring loop's slab entry is the connection and eight bytes of bookkeeping: an
    /// idle connection costs it no more user space than epoll, whose entry is the connection.
    #[test]
    fn entry_is_the_connection_and_eight_bytes() {
        let entry = std::mem::size_of::<super::Entry>();
        let conn = std::mem::size_of::<crate::conn::Conn>();
        eprintln!("io_uring Entry {entry} = Conn {conn} + {}", entry - conn);
        assert!(entry <= conn + 8, "Entry is {entry} bytes, Conn {conn}");
        assert!(entry <= crate::conn::tests::MAX_CONN_SIZE + 8, "Entry grew to {entry} bytes");
    }
}
