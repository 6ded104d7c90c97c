//! The readiness backend: one `mio::Poll` (epoll, edge-triggered) per loop.
//!
//! Per iteration: wait for events; read each readable socket into the loop's shared buffer and
//! hand the bytes to its connection (one write per read batch, with everything the handlers
//! sent); accept new connections; run due timers; close finished connections.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::app::{LoopContext, LoopSeed, ServerHandle, Shared, Task};
use crate::conn::{Conn, ConnCx, Delivery};
use crate::fanout::SharedBatch;
use crate::link::Scratch;
use crate::timer::TimerWheel;

use super::{WAKER, accepted_link};

const LISTENER: Token = Token(usize::MAX - 2);

/// Reads per readable event before the connection yields to others; with a 512 KiB buffer
/// this is 2 MiB per connection per iteration.
const MAX_READS: usize = 4;

/// Accepts per iteration before the loop serves its existing connections again.
const MAX_ACCEPTS: usize = 512;

/// How long accepting pauses after the process runs out of descriptors (EMFILE/ENFILE). The
/// pending connections wait in the backlog; a closed connection resumes accepting at once.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

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

pub(crate) struct EpollLoop {
    index: usize,
    poll: Poll,
    listener: Option<mio::net::TcpListener>,
    rx: Receiver<Task>,
    handle: ServerHandle,
    conns: Slab<Conn>,
    buf: Vec<u8>,
    env: Env,
    /// The listener has connections we have not accepted yet.
    accept_pending: bool,
    accept_paused_until: Option<Instant>,
    /// The last accept ran out of descriptors (logged once per episode).
    out_of_descriptors: bool,
    /// Connections that hit `MAX_READS` and may have more input.
    read_pending: Vec<usize>,
    due: Vec<(u32, u32)>,
    shutdown_deadline: Option<Instant>,
    /// Subscribers a published message goes to (reused).
    recipients: Vec<u32>,
    /// Connections that got published messages since the last flush.
    touched: Vec<usize>,
    /// Published frames owed to idle subscribers, written at the end of a run of publishes.
    batch: SharedBatch,
}

impl EpollLoop {
    pub(crate) fn new(
        seed: LoopSeed,
        poll: Poll,
        shared: Arc<Shared>,
        handle: ServerHandle,
    ) -> io::Result<Self> {
        let mut listener = mio::net::TcpListener::from_std(seed.listener);
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let buf = vec![0u8; shared.config.recv_buffer.max(4096)];
        Ok(EpollLoop {
            index: seed.index,
            poll,
            listener: Some(listener),
            rx: seed.rx,
            handle: handle.clone(),
            conns: Slab::new(),
            buf,
            env: Env { shared, pool: Scratch::new(handle.clone(), seed.index), wheel: TimerWheel::new() },
            accept_pending: true,
            accept_paused_until: None,
            out_of_descriptors: false,
            read_pending: Vec::new(),
            due: Vec::new(),
            shutdown_deadline: None,
            recipients: Vec::new(),
            touched: Vec::new(),
            batch: SharedBatch::default(),
        })
    }

    pub(crate) fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut due = std::mem::take(&mut self.due);
            self.env.wheel.advance(&mut due);
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_pending = true,
                    WAKER => self.run_tasks(),
                    Token(key) => self.on_event(
                        key,
                        event.is_readable() || event.is_read_closed() || event.is_error(),
                        event.is_writable(),
                    ),
                }
            }
            for key in std::mem::take(&mut self.read_pending) {
                if self.conns.contains(key) {
                    self.read(key);
                    self.settle(key);
                }
            }
            for &(key, tick) in &due {
                self.on_timer(key as usize, tick);
            }
            due.clear();
            self.due = due;
            self.accept();
            // Tasks posted by this loop's own handlers (publishes) go out in this iteration.
            self.run_tasks();
            self.handle.stats(self.index).store(self.conns.len(), &self.env.pool.counters);
            if let Some(deadline) = self.shutdown_deadline {
                if self.conns.is_empty() {
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                    for key in keys {
                        self.close(key);
                    }
                    return Ok(());
                }
            }
        }
    }

    fn poll_timeout(&self) -> Option<Duration> {
        // Tasks this loop posted to itself after it last ran them came with no wake.
        if self.handle.has_tasks(self.index)
            || !self.read_pending.is_empty()
            || (self.accept_pending && self.accept_paused_until.is_none() && self.listener.is_some())
        {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let mut timeout = self.env.wheel.timeout();
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                let d = at.saturating_duration_since(now);
                timeout = Some(timeout.map_or(d, |t| t.min(d)));
            }
        };
        consider(self.accept_paused_until.filter(|_| self.accept_pending));
        consider(self.shutdown_deadline);
        timeout
    }

    fn on_event(&mut self, key: usize, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        if writable && conn.link.buffered() > 0 {
            conn.on_writable(&mut self.env.cx());
        }
        if readable && !conn.read_closed {
            self.read(key);
        }
        self.settle(key);
    }

    /// Read until the socket is drained (a short read), EOF, `MAX_READS` full buffers, or the
    /// connection's held output passes its limit (then it is not read until that drains). The
    /// tasks a full read's handlers post to this loop run before the next read.
    fn read(&mut self, key: usize) {
        let mut conn = &mut self.conns[key];
        for _ in 0..MAX_READS {
            if conn.should_close() || conn.read_closed || conn.reading_paused() {
                return;
            }
            match (&conn.link.stream).read(&mut self.buf) {
                Ok(0) => {
                    conn.on_eof(&mut self.env.cx());
                    return;
                }
                Ok(n) => {
                    conn.on_input(&mut self.buf[..n], &mut self.env.cx());
                    // One write per read: everything the handlers sent for these bytes.
                    if conn.link.flush() {
                        conn.drained(&mut self.env.cx());
                    }
                    // A stream socket that returned less than asked is drained; new data
                    // raises a new edge.
                    let drained = n < self.buf.len();
                    if !drained && self.handle.has_tasks(self.index) {
                        // The handlers published (or posted work): what comes back to this
                        // connection counts against its limit only once delivered, so deliver
                        // it before reading on. A client that publishes to itself would
                        // otherwise have us hold several reads' worth of its publishes.
                        self.run_tasks();
                        let Some(again) = self.conns.get_mut(key) else { return };
                        conn = again;
                    }
                    if conn.output_over_limit() {
                        // The peer is not reading what we send: leave its input in the kernel.
                        // Data may be waiting there, and no new edge will say so: `settle`
                        // reads again once the output drains.
                        conn.pause_reading(&mut self.env.cx());
                        return;
                    }
                    if drained {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    conn.link.broken = true;
                    conn.on_eof(&mut self.env.cx());
                    return;
                }
            }
        }
        self.read_pending.push(key);
    }

    /// After a connection handled something: flush, close it if it is done, or make sure its
    /// timer is due no later than its deadline. Nothing if it is gone (a read that ran the
    /// loop's tasks may have closed it).
    fn settle(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        // A blocked connection is flushed by its writable event.
        if conn.link.dirty && !conn.link.blocked && conn.link.flush() {
            conn.drained(&mut self.env.cx());
        }
        if conn.after_flush(self.env.wheel.now()) {
            // TLS: the close_notify just queued goes out before the shutdown.
            if conn.link.flush() {
                conn.drained(&mut self.env.cx());
            }
            conn.after_flush(self.env.wheel.now());
        }
        if conn.should_close() {
            self.close(key);
            return;
        }
        if conn.reading_paused() {
            if conn.resume_reading(self.env.wheel.now()) {
                // Edge-triggered: input that waited raises no new edge.
                self.read_pending.push(key);
            }
        } else if conn.output_over_limit() && !conn.read_closed {
            // Past the limit without a read (a publish, a posted task): pause too, so the
            // backpressure timeout applies whatever filled the buffer.
            conn.pause_reading(&mut self.env.cx());
        }
        conn.link.recycle(&mut self.env.pool);
        let cx = self.env.cx();
        if let Some(deadline) = conn.deadline(&cx)
            && (conn.timer_at == 0 || deadline < conn.timer_at)
        {
            conn.timer_at = self.env.wheel.schedule(key as u32, deadline);
        }
    }

    fn on_timer(&mut self, key: usize, tick: u32) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        if conn.timer_at != tick {
            // A stale entry: the connection rescheduled earlier, or the slot was reused.
            return;
        }
        conn.timer_at = 0;
        conn.on_timer(&mut self.env.cx());
        self.settle(key);
    }

    fn close(&mut self, key: usize) {
        let mut conn = self.conns.remove(key);
        conn.on_teardown(&mut self.env.cx());
        conn.link.discard(&mut self.env.pool);
        // Dropping the stream closes the descriptor, which also removes it from epoll.
        drop(conn);
        // A descriptor was freed: accepting may work again.
        self.accept_paused_until = None;
    }

    fn accept(&mut self) {
        let Some(listener) = &self.listener else { return };
        if !self.accept_pending {
            return;
        }
        if let Some(until) = self.accept_paused_until {
            if Instant::now() < until {
                return;
            }
            self.accept_paused_until = None;
        }
        for _ in 0..MAX_ACCEPTS {
            match listener.accept() {
                Ok((stream, remote)) => {
                    if self.out_of_descriptors {
                        tracing::info!("accepting again");
                        self.out_of_descriptors = false;
                    }
                    let _ = stream.set_nodelay(true);
                    let stream: std::net::TcpStream = stream.into();
                    let entry = self.conns.vacant_entry();
                    let key = entry.key();
                    let fd = stream.as_raw_fd();
                    if let Err(e) = self.poll.registry().register(
                        &mut SourceFd(&fd),
                        Token(key),
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        tracing::warn!(error = %e, "cannot register an accepted connection");
                        continue;
                    }
                    let now = self.env.wheel.now();
                    let Some(link) = accepted_link(stream, remote, key, &mut self.env.pool, &self.env.shared)
                    else {
                        continue;
                    };
                    let conn = entry.insert(Conn::new(link, now));
                    let cx = self.env.cx();
                    if let Some(deadline) = conn.deadline(&cx) {
                        conn.timer_at = self.env.wheel.schedule(key as u32, deadline);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_pending = false;
                    break;
                }
                Err(e) if is_out_of_descriptors(&e) => {
                    if !self.out_of_descriptors {
                        tracing::warn!(error = %e, "out of descriptors: accepting paused until one frees up");
                        self.out_of_descriptors = true;
                    }
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    break;
                }
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    break;
                }
            }
        }
    }

    fn run_tasks(&mut self) {
        self.handle.awake(self.index);
        while let Ok(task) = self.rx.try_recv() {
            // Whatever another task queues for a subscriber goes after the frames the
            // subscriber is owed from the shared batch.
            if !matches!(task, Task::Publish(_)) {
                self.write_batch();
            }
            self.run_task(task);
        }
        self.write_batch();
        // One write per subscriber for everything published since the last one.
        for key in std::mem::take(&mut self.touched) {
            if self.conns.contains(key) {
                self.settle(key);
            }
        }
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
                    self.conns[key].run_on(f, &mut self.env.cx());
                    self.touched.push(key);
                }
            }
            Task::Respond(id, response) => {
                if let Some(key) = self.key_of(id) {
                    self.conns[key].deferred_response(&response, &mut self.env.cx());
                    self.touched.push(key);
                }
            }
            Task::Subscribe(id, name, global, since) => {
                let key = self.key_of(id).filter(|&k| self.conns[k].is_open_ws());
                self.env.pool.topics.settle_prepared(name, global, key.map(|k| k as u32), since);
            }
        }
    }

    /// Write every subscriber's run of the shared batch (one `send` each); a subscriber whose
    /// socket did not take it whole queues the rest (or is broken) and is settled with the
    /// touched ones.
    fn write_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let (conns, pool, touched) = (&mut self.conns, &mut self.env.pool, &mut self.touched);
        self.batch.write(|unsent| {
            if let Some(conn) = conns.get_mut(unsent.key) {
                conn.link.shared_unsent(pool, unsent.rest, unsent.end);
                touched.push(unsent.key);
            }
        });
    }

    /// The slot of connection `id`, if it is still there.
    fn key_of(&self, id: crate::pubsub::ConnId) -> Option<usize> {
        let key = id.key();
        self.conns.get(key).filter(|c| c.link.id == id).map(|_| key)
    }

    /// Deliver a published message to the local subscribers of its topic: owed from the shared
    /// batch by those that take it (one read of their slot, no copy), queued in their own
    /// buffers for the others.
    fn deliver(&mut self, msg: &crate::pubsub::Published) {
        if self.batch.is_full() {
            self.write_batch();
        }
        let mut keys = std::mem::take(&mut self.recipients);
        self.env.pool.topics.recipients(msg, &mut keys);
        self.batch.next_message();
        let frame = msg.frame();
        for &key in &keys {
            let Some(conn) = self.conns.get_mut(key as usize) else { continue };
            match conn.delivery(msg, &self.env.shared.routes) {
                Delivery::Skip => continue,
                Delivery::Shared(limit)
                    if self.batch.owe_to(key, &mut conn.link, frame, limit, &mut self.env.pool.counters) =>
                {
                    continue;
                }
                Delivery::Shared(_) | Delivery::Own => {}
            }
            let (was_dirty, was_refused) = (conn.link.dirty, conn.link.refused());
            // What it is owed from the batch goes first.
            if let Some(owed) = self.batch.take_run(key, conn.link.shared_run()) {
                conn.link.queue_shared(&mut self.env.pool, owed);
            }
            conn.deliver(msg, &mut self.env.cx());
            // A refused delivery leaves `dirty` as it was: settle the first one all the same,
            // so that reading pauses and the backpressure timeout applies.
            let refused = !was_refused && conn.link.refused();
            if (!was_dirty && conn.link.dirty) || refused || conn.link.finishing() {
                self.touched.push(key as usize);
            }
        }
        self.recipients = keys;
    }

    fn begin_shutdown(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        // Dropping the listener closes it: new connections go to other loops or are refused.
        self.listener = None;
        self.accept_pending = false;
        self.shutdown_deadline = Some(Instant::now() + self.env.shared.config.shutdown_timeout);
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.conns[key].on_shutdown(&mut self.env.cx());
            self.settle(key);
        }
    }
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}
