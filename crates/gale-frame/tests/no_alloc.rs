//! The receive path of whole messages allocates nothing: a read that holds only whole
//! frames is decoded from the read buffer itself, to the end of the read.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use gale_frame::{Decoder, DecoderConfig, Event, FrameSpec, OpCode, append_frame};

/// The system allocator, counting allocations made by the thread that set `COUNTING`.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

// SAFETY: every call is passed to the system allocator unchanged; the count is a side effect.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.try_with(|c| c.get()).unwrap_or(false) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract for `layout` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated above by the system allocator with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Decode `read` to its end as a server loop does (until an event-less step), counting the
/// allocations made meanwhile and the messages seen.
fn decode_read(dec: &mut Decoder, read: &mut [u8]) -> (usize, usize) {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    let mut pos = 0;
    let mut messages = 0;
    loop {
        let (used, event) = dec.decode(&mut read[pos..]).expect("valid frames");
        pos += used;
        match event {
            Some(Event::Text(_) | Event::Binary(_)) => messages += 1,
            Some(_) => {}
            None => break,
        }
    }
    dec.release();
    COUNTING.with(|c| c.set(false));
    (messages, ALLOCATIONS.load(Ordering::Relaxed) - before)
}

#[test]
fn reads_of_whole_messages_allocate_nothing() {
    let mut wire = Vec::new();
    for i in 0..16u8 {
        let spec =
            |opcode| FrameSpec { opcode, fin: true, compressed: false, mask: Some([i, 7, 0x5A, 0xC3]) };
        if i % 2 == 0 {
            append_frame(&mut wire, spec(OpCode::Text), b"twenty bytes of text");
        } else {
            append_frame(&mut wire, spec(OpCode::Binary), &[i; 300]);
        }
    }
    let mut dec = Decoder::new(DecoderConfig::server(1 << 20));
    for round in 0..3 {
        let mut read = wire.clone();
        assert_eq!(decode_read(&mut dec, &mut read), (16, 0), "round {round}");
    }
}
