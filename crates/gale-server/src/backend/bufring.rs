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

/// Page alignment the kernel requires for the ring of entries.
const PAGE: usize = 4096;

/// `IOU_PBUF_RING_INC`: the kernel consumes each buffer piece by piece.
const INCREMENTAL: u16 = 2;

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
    /// Buffer group id.
    pub(crate) bgid: u16,
}

impl BufRing {
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
        let mut r =
            BufRing { ring, ring_layout, bufs, bufs_layout, entries, buf_size, tail: 0, filled, bgid };
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

    /// The `len` bytes a completion put in buffer `bid`.
    ///
    /// They are ours until [`release`](BufRing::release); `len` comes from the kernel's
    /// completion and is at most what is left of the buffer.
    pub(crate) fn get(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let start = self.filled.get(bid as usize).map_or(0, |&f| f as usize);
        assert!(
            bid < self.entries && start + len <= self.buf_size,
            "completion names a buffer we do not have"
        );
        // SAFETY: `bid` is in range and `start + len` within the buffer, so the slice lies
        // inside the buffers allocation; the kernel gave these bytes to us with the completion
        // and writes only past them until we publish the buffer again (and, in incremental
        // mode, only after them), and `&mut self` keeps us from handing them out twice.
        unsafe { std::slice::from_raw_parts_mut(self.bufs.add(bid as usize * self.buf_size + start), len) }
    }

    /// We are done with the `len` bytes a completion with `flags` put in buffer `bid`: give
    /// the buffer back to the kernel, unless the kernel keeps filling it (`BUF_MORE`).
    pub(crate) fn release(&mut self, bid: u16, len: usize, flags: u32) {
        if let Some(filled) = self.filled.get_mut(bid as usize) {
            if io_uring::cqueue::buffer_more(flags) {
                *filled += len as u32;
                return;
            }
            *filled = 0;
        }
        self.publish(bid);
        self.commit();
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
        // SAFETY: both pointers came from `alloc_zeroed` with these layouts and are freed once.
        unsafe {
            dealloc(self.ring.cast(), self.ring_layout);
            dealloc(self.bufs, self.bufs_layout);
        }
    }
}
