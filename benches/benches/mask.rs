//! Unmasking throughput on payloads of 64 B, 1 KiB and 64 KiB.
//!
//! Compares, in one group per size, every kernel of `gale_frame::mask::kernels()` (called
//! through its function pointer), the dispatched `apply_mask`, and the 32-bit-word loop that
//! the other Rust servers ship: fastwebsockets' `unmask` through the real crate, and the same
//! loop as tungstenite's `apply_mask_fast32` (`mask_u32_loop`). The budget is SIMD >= 4x that
//! loop at 64 KiB.
//!
//! Masking is an XOR in place, so one buffer is reused: its contents alternate between masked
//! and clear, which costs the same. Buffers start on a page boundary; the `+6`, `+8` and
//! `+14` groups start that many bytes past one, where the payload of a masked frame of that
//! size lands after its header in a read buffer. `u32_scalar` is the same 32-bit loop with
//! vectorization blocked, to show what the compiler adds to the shipped loop.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gale_benches::{Aligned, KEY, mask_u32_loop, mask_u32_scalar};
use gale_frame::mask::kernels;

fn unmask(c: &mut Criterion) {
    let cases = [
        (64, 0, "64B"),
        (1024, 0, "1KiB"),
        (65536, 0, "64KiB"),
        (64, 6, "64B+6"),
        (1024, 8, "1KiB+8"),
        (65536, 14, "64KiB+14"),
    ];
    for (len, offset, label) in cases {
        let fill: Vec<u8> = (0..len as u32).map(|i| (i * 31 + 7) as u8).collect();
        let mut buf = Aligned::new(&fill, offset);
        let mut group = c.benchmark_group(format!("unmask/{label}"));
        group.throughput(Throughput::Bytes(len as u64));
        for kernel in kernels() {
            group.bench_function(BenchmarkId::new("kernel", kernel.name), |b| {
                b.iter(|| (kernel.run)(black_box(buf.bytes()), black_box(KEY)))
            });
        }
        group.bench_function("apply_mask", |b| {
            b.iter(|| gale_frame::apply_mask(black_box(buf.bytes()), black_box(KEY), 0))
        });
        group.bench_function("fastwebsockets", |b| {
            b.iter(|| fastwebsockets::unmask(black_box(buf.bytes()), black_box(KEY)))
        });
        group
            .bench_function("u32_loop", |b| b.iter(|| mask_u32_loop(black_box(buf.bytes()), black_box(KEY))));
        group.bench_function("u32_scalar", |b| {
            b.iter(|| mask_u32_scalar(black_box(buf.bytes()), black_box(KEY)))
        });
        group.finish();
    }
}

criterion_group!(benches, unmask);
criterion_main!(benches);
