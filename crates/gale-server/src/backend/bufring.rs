//! A ring of provided buffers for io_uring multishot receive (`IORING_REGISTER_PBUF_RING`).
//!
//! The kernel picks a free buffer for each receive completion and tells us its id; we process
//! the bytes in place and hand the buffer back. No connection owns a receive buffer: a loop's
//! ring serves all of them.
//!
//! In incremental mode (`IOU_PBUF_RING_INC`, Linux 6.12) the kernel fills a buffer piece by
//! piece: each receive takes what is waiting, up to what is left of the buffer at the head of
//! the ring, and the next receive continues where it stopped, so a large buffer packs many
//! small receives and still takes a large one whole. A completion flagged `BUF_MORE` leaves the
//! buffer with the kernel; the one without it hands the buffer back to us.
//!
//! Ownership: a buffer belongs to the kernel from the moment it is published in the ring until
//! a completion names it; then the bytes it names are ours until [`BufRing::release`], which
//! publishes the buffer again unless the kernel keeps filling it past those bytes. The
//! memory of the ring and of the buffers lives as long as this value, which the loop drops
//! only after the io_uring instance it was registered with.

use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

use crate::app::ServerConfig;

/// Page alignment the kernel requires for the ring of entries.
const PAGE: usize = 4096;

/// `IOU_PBUF_RING_INC`: the kernel consumes each buffer piece by piece.
const INCREMENTAL: u16 = 2;

/// Buffers per loop and their size, filled piece by piece: 2 MiB, small enough to stay in the
/// CPU's cache, and each buffer large enough for a pipelined burst (docs/BENCHMARKS.md).
const INCREMENTAL_GEOMETRY: (u16, usize) = (32, 64 * 1024);
/// The same, each receive taking a whole buffer: many small buffers, so that small receives
/// do not hold large ones.
const WHOLE_GEOMETRY: (u16, usize) = (512, 16 * 1024);

/// The bytes a receive completion put in a provided buffer, and whether that completion
/// took the buffer out of the ring. Made only by [`BufRing::completed`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Received {
    bid: u16,
    len: u32,
    last: bool,
}

/// One loop's ring of provided receive buffers and the memory behind it.
pub(crate) struct BufRing {
    /// The entries the kernel reads: `entries` slots, the tail overlaid on the first one.
    ring: *mut BufRingEntry,
    ring_layout: Layout,
    /// The buffers, `entries` of `buf_size` bytes each, one allocation.
    bufs: *mut u8,
    bufs_layout: Layout,
    entries: u16,
    buf_size: usize,
    /// Our copy of the tail: how many buffers were ever published.
    tail: u16,
    /// Incremental mode: where the next completion naming each buffer starts. Empty when
    /// every completion starts at its buffer's start.
    filled: Box<[u32]>,
    /// Buffers that completions took out of the ring and that are not published again yet:
    /// zero whenever the loop is between batches, unless a buffer was lost.
    out: u32,
    /// Buffer group id.
    pub(crate) bgid: u16,
}

impl BufRing {
    /// The ring a loop receives into, as `config` asks, registered with `submitter` as group
    /// `bgid`: incremental if asked and the kernel has it (Linux 6.12), otherwise whole
    /// buffers, in the geometry of the mode unless the configuration sets it.
    pub(crate) fn for_loop(
        submitter: &io_uring::Submitter<'_>,
        config: &ServerConfig,
        bgid: u16,
    ) -> io::Result<BufRing> {
        let geometry = |(count, size): (u16, usize)| {
            (config.uring_buffers.unwrap_or(count), config.uring_buffer_size.unwrap_or(size))
        };
        if config.uring_incremental {
            let (count, size) = geometry(INCREMENTAL_GEOMETRY);
            let bufs = BufRing::new(count, size, bgid, true)?;
            match bufs.register(submitter) {
                Ok(()) => return Ok(bufs),
                // An older kernel refuses the flag it does not know.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(
                        "io_uring: each receive takes a whole buffer (no incremental consumption: {e})"
                    )
                }
                Err(e) => return Err(e),
            }
        }
        let (count, size) = geometry(WHOLE_GEOMETRY);
        let bufs = BufRing::new(count, size, bgid, false)?;
        bufs.register(submitter)?;
        Ok(bufs)
    }

    /// Allocate `entries` (a power of two, at most 32768) buffers of `buf_size` bytes and
    /// publish them all; `incremental` for piece-by-piece consumption.
    pub(crate) fn new(entries: u16, buf_size: usize, bgid: u16, incremental: bool) -> io::Result<BufRing> {
        if !entries.is_power_of_two() || entries > 32768 || buf_size == 0 || buf_size > u32::MAX as usize {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad provided-buffer ring size"));
        }
        let ring_layout = Layout::from_size_align(entries as usize * size_of::<BufRingEntry>(), PAGE)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let bufs_layout = Layout::from_size_align(entries as usize * buf_size, PAGE)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: both layouts have a non-zero size (entries >= 1, buf_size >= 1).
        let ring = unsafe { alloc_zeroed(ring_layout) }.cast::<BufRingEntry>();
        // Not zeroed: the kernel writes each buffer before we read it, and untouched pages stay
        // out of the resident set until data first lands in them.
        // SAFETY: as above.
        let bufs = unsafe { alloc(bufs_layout) };
        if ring.is_null() || bufs.is_null() {
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, "cannot allocate receive buffers"));
        }
        let filled = if incremental { vec![0; entries as usize].into_boxed_slice() } else { Box::default() };
        let mut r = BufRing {
            ring,
            ring_layout,
            bufs,
            bufs_layout,
            entries,
            buf_size,
            tail: 0,
            filled,
            out: 0,
            bgid,
        };
        for bid in 0..entries {
            r.publish(bid);
        }
        r.commit();
        Ok(r)
    }

    /// Register the ring with `ring`'s kernel instance; fails if the kernel lacks provided
    /// buffer rings, or incremental mode when this ring uses it.
    pub(crate) fn register(&self, submitter: &io_uring::Submitter<'_>) -> io::Result<()> {
        let flags = if self.is_incremental() { INCREMENTAL } else { 0 };
        // SAFETY: the ring memory is page aligned, holds `entries` entries, and lives until
        // this value is dropped, which the loop does after dropping the io_uring instance.
        unsafe { submitter.register_buf_ring_with_flags(self.ring as u64, self.entries, self.bgid, flags) }
    }

    /// Whether receives fill buffers piece by piece.
    pub(crate) fn is_incremental(&self) -> bool {
        !self.filled.is_empty()
    }

    /// What receive completion (`res`, `flags`) put in a buffer, if it names one. Every
    /// completion goes through here, which counts the buffers that leave the ring.
    pub(crate) fn completed(&mut self, res: i32, flags: u32) -> Option<Received> {
        let bid = io_uring::cqueue::buffer_select(flags)?;
        assert!(bid < self.entries, "completion names a buffer we do not have");
        let len = res.max(0) as u32;
        // A whole buffer leaves the ring with its completion; in incremental mode, with the
        // completion that ends it: not `BUF_MORE`, and one without bytes consumed nothing
        // (`io_kbuf_commit`).
        let last = !self.is_incremental() || (len > 0 && !io_uring::cqueue::buffer_more(flags));
        self.out += u32::from(last);
        Some(Received { bid, len, last })
    }

    /// The bytes of `received`, ours until [`release`](BufRing::release).
    pub(crate) fn get(&mut self, received: Received) -> &mut [u8] {
        let Received { bid, len, .. } = received;
        let start = self.filled.get(bid as usize).map_or(0, |&f| f as usize);
        let len = len as usize;
        assert!(start + len <= self.buf_size, "completion past the end of its buffer");
        // SAFETY: `bid` is in range (checked by `completed`, the only maker of `Received`)
        // and `start + len` within the buffer, so the slice lies inside the buffers
        // allocation. The kernel handed these bytes to us with the completion and does not
        // write them again before the buffer is published anew: a whole buffer is ours until
        // then, and in incremental mode the kernel only writes past them. `&mut self` keeps
        // us from handing them out twice.
        unsafe { std::slice::from_raw_parts_mut(self.bufs.add(bid as usize * self.buf_size + start), len) }
    }

    /// We are done with `received`, read or not: the next completion naming its buffer
    /// starts after it, or, if it was the buffer's last, the buffer goes back to the kernel.
    pub(crate) fn release(&mut self, received: Received) {
        let Received { bid, len, last } = received;
        if let Some(filled) = self.filled.get_mut(bid as usize) {
            *filled = if last { 0 } else { *filled + len };
            debug_assert!(*filled as usize <= self.buf_size);
        }
        if last {
            self.out -= 1;
            self.publish(bid);
            self.commit();
        }
    }

    /// Buffers taken out of the ring by completions and not handed back.
    pub(crate) fn out(&self) -> u32 {
        self.out
    }

    /// Write buffer `bid` into the next free slot (not yet visible to the kernel).
    fn publish(&mut self, bid: u16) {
        let slot = (self.tail & (self.entries - 1)) as usize;
        // SAFETY: `slot` < `entries`, inside the ring allocation. The kernel only reads slots
        // between its head and our published tail, and this one is past the tail.
        let entry = unsafe { &mut *self.ring.add(slot) };
        // SAFETY: `bid` < `entries`, so the address is inside the buffers allocation.
        entry.set_addr(unsafe { self.bufs.add(bid as usize * self.buf_size) } as u64);
        entry.set_len(self.buf_size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Make published slots visible to the kernel.
    fn commit(&self) {
        // SAFETY: the tail is the `resv` field of the first entry, inside the ring allocation,
        // suitably aligned for a u16; the kernel reads it with acquire ordering.
        let tail = unsafe { AtomicU16::from_ptr(BufRingEntry::tail(self.ring).cast_mut()) };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: both pointers came from `alloc_zeroed` and `alloc` with these layouts and
        // are freed once.
        unsafe {
            dealloc(self.ring.cast(), self.ring_layout);
            dealloc(self.bufs, self.bufs_layout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `IORING_CQE_F_BUF_MORE`.
    const MORE: u32 = 1 << 4;
    /// `IORING_CQE_F_BUFFER` with buffer id 2.
    const BUF2: u32 = 1 | (2 << 16);

    fn published(r: &BufRing) -> u16 {
        r.tail
    }

    /// Where the next completion naming buffer `bid` would put its bytes.
    fn next_at(r: &mut BufRing, bid: u16) -> usize {
        r.get(Received { bid, len: 0, last: false }).as_ptr() as usize
    }

    /// In incremental mode a completion's bytes start where the last one naming the buffer
    /// stopped; the buffer is published again only at the completion without `BUF_MORE`,
    /// and a completion without bytes changes nothing.
    #[test]
    fn incremental_bookkeeping() {
        assert!(io_uring::cqueue::buffer_more(MORE));
        assert_eq!(io_uring::cqueue::buffer_select(BUF2), Some(2));
        let mut r = BufRing::new(4, 1024, 9, true).unwrap();
        assert_eq!(published(&r), 4);
        let base = next_at(&mut r, 2);
        let rx = r.completed(100, BUF2 | MORE).unwrap();
        assert_eq!(rx.bid, 2);
        r.get(rx).fill(1);
        r.release(rx);
        let rx = r.completed(50, BUF2 | MORE).unwrap();
        assert_eq!(r.get(rx).as_ptr() as usize, base + 100, "continues after the first piece");
        r.release(rx);
        let rx = r.completed(0, BUF2).unwrap();
        r.release(rx);
        assert_eq!(published(&r), 4, "nothing consumed: still the kernel's");
        assert_eq!(r.out(), 0);
        let rx = r.completed(10, BUF2).unwrap();
        assert_eq!(r.out(), 1, "the last piece takes the buffer out of the ring");
        assert_eq!(r.get(rx).as_ptr() as usize, base + 150);
        r.release(rx);
        assert_eq!(published(&r), 5, "... and its release hands it back");
        assert_eq!(r.out(), 0);
        assert_eq!(next_at(&mut r, 2), base, "a published buffer starts over");
    }

    /// Whole buffers: every completion starts at its buffer's start and hands it back.
    #[test]
    fn whole_buffer_bookkeeping() {
        let mut r = BufRing::new(4, 1024, 9, false).unwrap();
        let base = next_at(&mut r, 1);
        let flags = 1 | (1 << 16);
        let rx = r.completed(100, flags).unwrap();
        assert_eq!(rx.bid, 1);
        assert_eq!(r.out(), 1);
        r.release(rx);
        assert_eq!(published(&r), 5);
        assert_eq!(r.out(), 0);
        let rx = r.completed(100, flags).unwrap();
        assert_eq!(r.get(rx).as_ptr() as usize, base);
    }

    #[test]
    #[should_panic(expected = "a buffer we do not have")]
    fn completion_naming_an_unknown_buffer_panics() {
        let mut r = BufRing::new(4, 1024, 9, true).unwrap();
        r.completed(1, 1 | (4 << 16));
    }

    /// The loop's ring is incremental exactly when the kernel accepts an incremental ring
    /// (and the configuration asks for one), in the geometry of its mode.
    #[test]
    fn loop_ring_mode_follows_config_and_kernel() {
        if crate::backend::probe_uring().is_err() {
            eprintln!("skipped: no io_uring here");
            return;
        }
        let ring = io_uring::IoUring::new(8).unwrap();
        let submitter = ring.submitter();
        let probe = BufRing::new(2, 64, 9, true).unwrap();
        let kernel_has_it = probe.register(&submitter).is_ok();
        if kernel_has_it {
            submitter.unregister_buf_ring(9).unwrap();
        }
        drop(probe);

        let bufs = BufRing::for_loop(&submitter, &ServerConfig::default(), 1).unwrap();
        assert_eq!(bufs.is_incremental(), kernel_has_it);
        let want = if kernel_has_it { INCREMENTAL_GEOMETRY } else { WHOLE_GEOMETRY };
        assert_eq!((bufs.entries, bufs.buf_size), want);
        // Unregistered before its memory goes.
        submitter.unregister_buf_ring(1).unwrap();
        drop(bufs);

        let whole = ServerConfig { uring_incremental: false, ..ServerConfig::default() };
        let bufs = BufRing::for_loop(&submitter, &whole, 1).unwrap();
        assert!(!bufs.is_incremental());
        assert_eq!((bufs.entries, bufs.buf_size), WHOLE_GEOMETRY);
        submitter.unregister_buf_ring(1).unwrap();
    }
}
