//! The shared fan-out batch of an epoll loop: published frames written to idle subscribers
//! straight from one loop-wide buffer.
//!
//! While a loop delivers a run of published messages, a subscriber with nothing queued and
//! nothing in its way (see [`crate::conn::Conn::delivery`]) does not get a copy of each frame
//! in its own output buffer. The loop appends each message's uncompressed frame once to
//! [`SharedBatch::bytes`], and the subscriber gets a [`Run`]: its socket and the range of that
//! buffer it is owed, which grows while it gets consecutive messages (the usual case: every
//! subscriber of a topic gets every message). At the end of the run the loop writes each range
//! with one `send`, from this compact list of runs, without coming back to the connections'
//! slots; only a connection whose socket does not take its range whole is visited again, to
//! queue the rest in its own buffer. So one delivery reads its subscriber's slot once, copies
//! nothing and allocates nothing per subscriber.
//!
//! io_uring does the same, except that it hands the batch over instead of writing it
//! ([`SharedBatch::hand_over`]): each run becomes a send pointing into the batch's bytes,
//! which are shared by those sends and freed with the last of them.
//!
//! A subscriber whose messages stop being consecutive (another topic's message came between
//! two of its own) or that must get bytes of its own (a compressed frame, a control frame, a
//! task posted to it) first has its range copied into its own buffer
//! ([`SharedBatch::take_run`]): its bytes leave in the order they were queued.

use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use crate::link::{Counters, Link, WriteEnd, admits, write_fd};

/// A batch above this size is freed after it is written, not kept for the next one.
const KEEP_CAPACITY: usize = 1 << 20;

/// A batch holding this many bytes is written before another message joins it. It keeps the
/// batch a per-loop cost whatever the messages' sizes: the part of a run that a socket does
/// not take is copied into the connection's own buffer, so without a bound a run of large
/// publishes to slow subscribers would be held twice, in the batch and in their buffers.
const WRITE_AT: usize = 256 << 10;

/// One subscriber's share of the batch.
#[derive(Clone, Copy, Debug)]
struct Run {
    fd: RawFd,
    /// The connection's slot; [`GONE`] once the run was taken back into its own buffer.
    key: u32,
    start: u32,
    end: u32,
}

/// [`Run::key`] of a run that is no longer written from the batch.
const GONE: u32 = u32::MAX;

/// Runs in one batch: a connection remembers its run's index in 24 bits. Subscribers past it
/// get their frames through their own buffers.
const MAX_RUNS: usize = (1 << 24) - 1;

/// A run that the socket did not take whole: what is left of it, and why.
pub(crate) struct Unsent<'a> {
    /// The connection's slot.
    pub(crate) key: usize,
    /// The bytes the kernel did not take.
    pub(crate) rest: &'a [u8],
    /// Whether the socket refused more for now or failed.
    pub(crate) end: WriteEnd,
}

/// The frames delivered in the current run of publishes, and who is owed which of them.
#[derive(Default)]
pub(crate) struct SharedBatch {
    bytes: Vec<u8>,
    runs: Vec<Run>,
    /// Where the current message's frame is in `bytes`, once appended.
    current: Option<(u32, u32)>,
}

impl SharedBatch {
    /// Whether the batch holds nothing (no frame, no subscriber owed one).
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.runs.is_empty() && self.bytes.is_empty()
    }

    /// Whether the batch is full: the backend writes (or hands over) it before the next
    /// message.
    #[inline]
    pub(crate) fn is_full(&self) -> bool {
        self.bytes.len() >= WRITE_AT
    }

    /// A new message is being delivered: its frame is appended when its first subscriber
    /// takes it from the batch.
    #[inline]
    pub(crate) fn next_message(&mut self) {
        self.current = None;
    }

    /// The run of the connection in slot `key`, whose slot remembers `index`, if it has one
    /// in this batch.
    #[inline]
    fn run_of(&self, key: u32, index: u32) -> Option<usize> {
        let i = index as usize;
        (i < self.runs.len() && self.runs[i].key == key).then_some(i)
    }

    /// Owe the current message's `frame` to the connection in slot `key` (socket `fd`, run
    /// `*index`), if its run ends where the frame begins or it has none, and `admit` allows
    /// the frame on top of what it is already owed. Returns false (nothing changed) otherwise:
    /// the connection takes its run back ([`take_run`](Self::take_run)) and gets the message
    /// through its own buffer.
    pub(crate) fn owe(
        &mut self,
        key: u32,
        fd: RawFd,
        index: &mut u32,
        frame: &[u8],
        admit: impl FnOnce(usize) -> bool,
    ) -> bool {
        let (start, end) = match self.current {
            Some(at) => at,
            None => {
                let start = self.bytes.len();
                let end = start + frame.len();
                if end > u32::MAX as usize {
                    return false;
                }
                self.bytes.extend_from_slice(frame);
                let at = (start as u32, end as u32);
                self.current = Some(at);
                at
            }
        };
        match self.run_of(key, *index) {
            Some(i) => {
                let run = &mut self.runs[i];
                if run.end != start || !admit((run.end - run.start) as usize) {
                    return false;
                }
                run.end = end;
            }
            None => {
                if self.runs.len() >= MAX_RUNS || !admit(0) {
                    return false;
                }
                *index = self.runs.len() as u32;
                self.runs.push(Run { fd, key, start, end });
            }
        }
        true
    }

    /// [`owe`](Self::owe) the current message's `frame` to the connection in slot `key`
    /// (`link`), held to its `max_backpressure` (`limit`), and count it as sent. False: the
    /// connection gets it through its own buffer.
    pub(crate) fn owe_to(
        &mut self,
        key: u32,
        link: &mut Link,
        frame: &[u8],
        limit: usize,
        counters: &mut Counters,
    ) -> bool {
        let mut run = link.shared_run();
        let fd = link.stream.as_raw_fd();
        if !self.owe(key, fd, &mut run, frame, |owed| admits(owed, frame.len(), limit)) {
            return false;
        }
        link.set_shared_run(run);
        counters.messages_out += 1;
        counters.bytes_out += frame.len() as u64;
        true
    }

    /// Stop writing the run of the connection in slot `key` (run `index`) from the batch and
    /// return its bytes, to be queued in the connection's own buffer before anything else.
    pub(crate) fn take_run(&mut self, key: u32, index: u32) -> Option<&[u8]> {
        let i = self.run_of(key, index)?;
        let run = &mut self.runs[i];
        run.key = GONE;
        Some(&self.bytes[run.start as usize..run.end as usize])
    }

    /// Hand the batch over to a backend whose sends outlive this call (io_uring): its bytes
    /// move into one shared buffer, and `send` gets each run still owed (the connection's
    /// slot, that buffer, the run's start and end in it). The batch starts empty.
    pub(crate) fn hand_over(&mut self, mut send: impl FnMut(usize, &Rc<Vec<u8>>, usize, usize)) {
        let bytes = Rc::new(std::mem::take(&mut self.bytes));
        for run in &self.runs {
            if run.key != GONE {
                send(run.key as usize, &bytes, run.start as usize, run.end as usize);
            }
        }
        self.runs.clear();
        self.current = None;
    }

    /// Write every run to its socket (one `send` each), then call `unsent` for each one the
    /// kernel did not take whole, and start an empty batch.
    pub(crate) fn write(&mut self, mut unsent: impl FnMut(Unsent<'_>)) {
        for run in &self.runs {
            if run.key == GONE {
                continue;
            }
            let bytes = &self.bytes[run.start as usize..run.end as usize];
            let (written, end) = write_fd(run.fd, bytes);
            if end != WriteEnd::Done {
                unsent(Unsent { key: run.key as usize, rest: &bytes[written..], end });
            }
        }
        self.runs.clear();
        self.bytes.clear();
        self.current = None;
        if self.bytes.capacity() > KEEP_CAPACITY {
            self.bytes = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_messages_extend_one_run_and_a_gap_refuses() {
        let mut batch = SharedBatch::default();
        let (mut a, mut b) = (MAX_RUNS as u32, MAX_RUNS as u32);
        batch.next_message();
        assert!(batch.owe(1, -1, &mut a, b"one", |_| true));
        assert!(batch.owe(2, -1, &mut b, b"one", |_| true));
        batch.next_message();
        assert!(batch.owe(1, -1, &mut a, b"two", |owed| owed == 3));
        // Connection 2 missed "two": "three" cannot extend its run.
        batch.next_message();
        assert!(batch.owe(1, -1, &mut a, b"three", |_| true));
        assert!(!batch.owe(2, -1, &mut b, b"three", |_| true));
        assert_eq!(batch.take_run(2, b), Some(&b"one"[..]));
        assert_eq!(batch.take_run(2, b), None, "taken back");
        // A remembered index that another connection's run holds is not this one's.
        assert_eq!(batch.take_run(7, a), None);
        assert_eq!(batch.take_run(1, a), Some(&b"onetwothree"[..]));
    }

    #[test]
    fn the_limit_is_checked_against_what_is_owed() {
        let mut batch = SharedBatch::default();
        let mut a = MAX_RUNS as u32;
        batch.next_message();
        assert!(!batch.owe(1, -1, &mut a, b"xx", |_| false));
        assert_eq!(a, MAX_RUNS as u32, "refused: no run");
        assert!(batch.owe(1, -1, &mut a, b"xx", |owed| owed == 0));
        batch.next_message();
        assert!(!batch.owe(1, -1, &mut a, b"yy", |owed| owed < 2));
        assert_eq!(batch.take_run(1, a), Some(&b"xx"[..]));
    }

    #[test]
    fn a_batch_is_full_once_it_holds_write_at_bytes_and_empty_after_it_is_written() {
        let mut batch = SharedBatch::default();
        let frame = vec![0u8; WRITE_AT / 4];
        for i in 0..4 {
            assert!(!batch.is_full(), "{i} frames");
            let mut run = MAX_RUNS as u32;
            batch.next_message();
            assert!(batch.owe(i, -1, &mut run, &frame, |_| true));
        }
        assert!(batch.is_full());
        // Sockets of -1 fail: each run is reported unsent, and the batch is empty after.
        let mut unsent = 0;
        batch.write(|_| unsent += 1);
        assert_eq!(unsent, 4);
        assert!(batch.is_empty() && !batch.is_full());
    }
}
