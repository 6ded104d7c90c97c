#[path = "/tmp/mask_orig.rs"]
#[allow(dead_code, missing_docs)]
mod old;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gale_benches::{Aligned, KEY};
use std::hint::black_box;
fn cmp(c: &mut Criterion) {
    let cases = [
        (64, 0, "64B"),
        (64, 6, "64B+6"),
        (320, 6, "320B+6"),
        (1024, 0, "1KiB"),
        (1024, 8, "1KiB+8"),
        (65536, 0, "64KiB"),
        (65536, 14, "64KiB+14"),
    ];
    for (len, offset, label) in cases {
        let fill: Vec<u8> = (0..len as u32).map(|i| (i * 31 + 7) as u8).collect();
        let mut buf = Aligned::new(&fill, offset);
        let mut group = c.benchmark_group(format!("cmp/{label}"));
        group.throughput(Throughput::Bytes(len as u64));
        let news = gale_frame::mask::kernels();
        let olds = old::kernels();
        for (n, o) in news.iter().zip(olds.iter()).skip(2) {
            group.bench_function(BenchmarkId::new("old", o.name), |b| {
                b.iter(|| (o.run)(black_box(buf.bytes()), black_box(KEY)))
            });
            group.bench_function(BenchmarkId::new("new", n.name), |b| {
                b.iter(|| (n.run)(black_box(buf.bytes()), black_box(KEY)))
            });
        }
        group.bench_function("old/apply_mask", |b| {
            b.iter(|| old::apply_mask(black_box(buf.bytes()), black_box(KEY), 0))
        });
        group.bench_function("new/apply_mask", |b| {
            b.iter(|| gale_frame::apply_mask(black_box(buf.bytes()), black_box(KEY), 0))
        });
        group.finish();
    }
}
criterion_group!(benches, cmp);
criterion_main!(benches);
