//! A ring of provided buffers for io_uring multishot receive (`IORING_REGISTER_PBUF_RING`).
//!
//! The kernel picks a free buffer for each receive completion and tells us its id; we process
//! the bytes in place and hand the buffer back. No connection owns a receive buffer: a loop's
//! ring serves all of them.
//!
//! Ownership: a buffer belongs to the kernel from the moment it is published in the ring until
//! a completion names it; then it is ours until [`BufRing::recycle`] publishes it again. The
//! memory of the ring and of the buffers lives as long as this value, which the loop drops
//! only after the io_uring instance it was registered with.

use std::alloc::{Layout, alloc, alloc_zeroed, dealloc};
use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

/// Page alignment the kernel requires for the ring of entries.
const PAGE: usize = 4096;

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
    /// Buffer group id.
    pub(crate) bgid: u16,
}

impl BufRing {
    /// Allocate `entries` (a power of two, at most 32768) buffers of `buf_size` bytes and
    /// publish them all.
    pub(crate) fn new(entries: u16, buf_size: usize, bgid: u16) -> io::Result<BufRing> {
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
        let mut r = BufRing { ring, ring_layout, bufs, bufs_layout, entries, buf_size, tail: 0, bgid };
        for bid in 0..entries {
            r.publish(bid);
        }
        r.commit();
        Ok(r)
    }

    /// Register the ring with `ring`'s kernel instance.
    pub(crate) fn register(&self, submitter: &io_uring::Submitter<'_>) -> io::Result<()> {
        // SAFETY: the ring memory is page aligned, holds `entries` entries, and lives until
        // this value is dropped, which the loop does after dropping the io_uring instance.
        unsafe { submitter.register_buf_ring_with_flags(self.ring as u64, self.entries, self.bgid, 0) }
    }

    /// The bytes a completion put in buffer `bid`.
    ///
    /// The buffer is ours until [`recycle`](BufRing::recycle); `len` comes from the kernel's
    /// completion and is at most the buffer size.
    pub(crate) fn get(&mut self, bid: u16, len: usize) -> &mut [u8] {
        assert!(bid < self.entries && len <= self.buf_size, "completion names a buffer we do not have");
        // SAFETY: `bid` is in range, so the slice lies inside the buffers allocation; the kernel
        // gave this buffer to us with the completion and does not touch it until we publish
        // it again, and `&mut self` keeps us from handing it out twice.
        unsafe { std::slice::from_raw_parts_mut(self.bufs.add(bid as usize * self.buf_size), len) }
    }

    /// Give buffer `bid` back to the kernel.
    pub(crate) fn recycle(&mut self, bid: u16) {
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
