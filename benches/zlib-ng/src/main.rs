//! zlib-rs (through `gale_frame::deflate`, exactly as the server calls it) against zlib-ng (the C
//! library, through `libz-ng-sys`) on the messages permessage-deflate sees in a chat/danmaku
//! stream: short JSON with repeating keys and Chinese text. Same parameters on both sides
//! (raw deflate, level 1, the server's window and memory levels), with and without context
//! takeover, compressing and inflating. The two take turns over many rounds and the fastest
//! round of each is kept (interference only ever adds time).
//!
//! Run: `cargo run --release` in this directory (needs cmake and a C compiler for zlib-ng).

use std::ffi::c_void;
use std::hint::black_box;
use std::time::{Duration, Instant};

use gale_frame::deflate::{Deflater, Inflater};
use libz_ng_sys as z;

const MESSAGES: usize = 1000;
const ROUNDS: usize = 40;

/// Chat messages like `gale-loadgen --payload chat`.
fn chat_messages() -> Vec<Vec<u8>> {
    let texts = [
        "主播好厉害！哈哈哈哈哈 666",
        "来了来了",
        "这波操作太秀了吧",
        "前方高能预警",
        "弹幕护体",
        "awsl 太可爱了",
    ];
    let names = ["吃瓜群众", "路人甲", "小明", "momo", "夜猫子"];
    (0..MESSAGES)
        .map(|i| {
            format!(
                r##"{{"type":"danmaku","room":"live-1001","seq":{i},"user":{{"id":{},"name":"{}","level":{}}},"text":"{}","color":"#{:06x}"}}"##,
                10_000 + i * 7 % 997,
                names[i % names.len()],
                i % 40,
                texts[i * 5 % texts.len()],
                (i * 2_654_435_761) % 0xff_ffff
            )
            .into_bytes()
        })
        .collect()
}

// zlib-ng wants allocator functions (its struct has non-nullable function pointers).
unsafe extern "C" {
    fn calloc(n: usize, size: usize) -> *mut c_void;
    fn free(p: *mut c_void);
}

extern "C" fn zalloc(_opaque: *mut c_void, items: z::uInt, size: z::uInt) -> *mut c_void {
    // SAFETY: calloc takes any sizes and returns null or a fresh allocation.
    unsafe { calloc(items as usize, size as usize) }
}

extern "C" fn zfree(_opaque: *mut c_void, p: *mut c_void) {
    // SAFETY: `p` came from `zalloc` (zlib-ng frees only what it allocated).
    unsafe { free(p) }
}

fn new_stream() -> Box<z::z_stream> {
    Box::new(z::z_stream {
        next_in: std::ptr::null_mut(),
        avail_in: 0,
        total_in: 0,
        next_out: std::ptr::null_mut(),
        avail_out: 0,
        total_out: 0,
        msg: std::ptr::null_mut(),
        state: std::ptr::null_mut(),
        zalloc,
        zfree,
        opaque: std::ptr::null_mut(),
        data_type: 0,
        adler: 0,
        reserved: 0,
    })
}

/// A zlib-ng raw-deflate compressor, used the way the server uses zlib-rs.
struct NgDeflater {
    s: Box<z::z_stream>,
    takeover: bool,
}

impl NgDeflater {
    fn new(bits: i32, mem_level: i32, takeover: bool) -> Self {
        let mut s = new_stream();
        // SAFETY: `s` is a fully initialised stream with allocator functions; the version and
        // size are the library's own.
        let rc = unsafe {
            z::deflateInit2_(
                &mut *s,
                1,
                8,
                -bits,
                mem_level,
                0,
                z::zlibVersion(),
                size_of::<z::z_stream>() as i32,
            )
        };
        assert_eq!(rc, z::Z_OK);
        NgDeflater { s, takeover }
    }

    fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.reserve(input.len() + 64);
        // SAFETY: the stream was initialised by deflateInit2_; next_in/next_out point into
        // live buffers whose lengths are passed with them, and are not used after the call.
        unsafe {
            if !self.takeover {
                z::deflateReset(&mut *self.s);
            }
            self.s.next_in = input.as_ptr() as *mut u8;
            self.s.avail_in = input.len() as u32;
            self.s.next_out = out.as_mut_ptr();
            self.s.avail_out = out.capacity() as u32;
            let rc = z::deflate(&mut *self.s, z::Z_SYNC_FLUSH);
            assert_eq!(rc, z::Z_OK);
            out.set_len(out.capacity() - self.s.avail_out as usize);
        }
        // permessage-deflate drops the sync flush's empty stored block.
        out.truncate(out.len() - 4);
    }
}

/// A zlib-ng raw inflater for messages compressed without context takeover.
struct NgInflater {
    s: Box<z::z_stream>,
}

impl NgInflater {
    fn new() -> Self {
        let mut s = new_stream();
        // SAFETY: as for the deflater.
        let rc = unsafe { z::inflateInit2_(&mut *s, -15, z::zlibVersion(), size_of::<z::z_stream>() as i32) };
        assert_eq!(rc, z::Z_OK);
        NgInflater { s }
    }

    fn inflate(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut framed = Vec::with_capacity(input.len() + 4);
        framed.extend_from_slice(input);
        framed.extend_from_slice(&[0, 0, 0xff, 0xff]);
        out.clear();
        out.reserve(4096);
        // SAFETY: as for the deflater; `framed` and `out` outlive the call.
        unsafe {
            z::inflateReset(&mut *self.s);
            self.s.next_in = framed.as_mut_ptr();
            self.s.avail_in = framed.len() as u32;
            self.s.next_out = out.as_mut_ptr();
            self.s.avail_out = out.capacity() as u32;
            let rc = z::inflate(&mut *self.s, z::Z_SYNC_FLUSH);
            assert!(rc == z::Z_OK || rc == z::Z_STREAM_END, "inflate: {rc}");
            out.set_len(out.capacity() - self.s.avail_out as usize);
        }
    }
}

fn fastest(rounds: &[Duration]) -> f64 {
    rounds.iter().min().map_or(0.0, |d| d.as_nanos() as f64 / MESSAGES as f64)
}

fn main() {
    let msgs = chat_messages();
    let payload: usize = msgs.iter().map(Vec::len).sum();
    println!(
        "{MESSAGES} chat messages, {:.0} bytes each on average; fastest of {ROUNDS} interleaved rounds\n",
        payload as f64 / MESSAGES as f64
    );
    println!(
        "| operation | zlib-rs ns/msg | zlib-ng ns/msg | zlib-ng / zlib-rs | zlib-rs bytes out | zlib-ng bytes out |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    // (label, window bits, memory level, context takeover): the server's shared and dedicated
    // compressors (crates/gale-server/src/compress.rs).
    for (label, bits, mem, takeover) in [
        ("compress, no context takeover (shared)", 15, 1, false),
        ("compress, context takeover (dedicated, 15 bits)", 15, 7, true),
    ] {
        let (mut rs_t, mut ng_t) = (Vec::new(), Vec::new());
        let (mut rs_bytes, mut ng_bytes) = (0, 0);
        let mut out = Vec::new();
        for _ in 0..ROUNDS {
            let mut rs = Deflater::with_memory(bits as u8, 1, mem as u8, takeover);
            let t = Instant::now();
            rs_bytes = 0;
            for m in &msgs {
                // Deflater::compress appends, as the server's callers expect.
                out.clear();
                rs.compress(black_box(m), &mut out);
                rs_bytes += out.len();
            }
            rs_t.push(t.elapsed());
            let mut ng = NgDeflater::new(bits, mem, takeover);
            let t = Instant::now();
            ng_bytes = 0;
            for m in &msgs {
                ng.compress(black_box(m), &mut out);
                ng_bytes += out.len();
            }
            ng_t.push(t.elapsed());
        }
        let (a, b) = (fastest(&rs_t), fastest(&ng_t));
        println!("| {label} | {a:.0} | {b:.0} | {:.2} | {rs_bytes} | {ng_bytes} |", b / a);
    }
    // Inflate what a client compressed without context takeover (the shared inflater).
    let mut packed = Vec::new();
    let mut d = Deflater::new(15, 6, false);
    for m in &msgs {
        let mut out = Vec::new();
        d.compress(m, &mut out);
        packed.push(out);
    }
    let (mut rs_t, mut ng_t) = (Vec::new(), Vec::new());
    let mut out = Vec::new();
    let mut rs = Inflater::new(false);
    let mut ng = NgInflater::new();
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for p in &packed {
            out.clear();
            rs.inflate(black_box(p), &mut out, 1 << 20).expect("inflate");
        }
        rs_t.push(t.elapsed());
        let t = Instant::now();
        for (p, m) in packed.iter().zip(&msgs) {
            ng.inflate(black_box(p), &mut out);
            debug_assert_eq!(&out, m);
        }
        ng_t.push(t.elapsed());
    }
    let (a, b) = (fastest(&rs_t), fastest(&ng_t));
    println!("| inflate, no context takeover | {a:.0} | {b:.0} | {:.2} | {payload} | {payload} |", b / a);
}
