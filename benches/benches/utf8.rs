//! UTF-8 validation throughput: streaming `Utf8Stream` against one-shot validators.
//!
//! Text kinds: ASCII JSON chat, Chinese chat/danmaku JSON (CJK with ASCII keys and
//! punctuation), and emoji-heavy messages; sizes about 64 B, 4 KiB and 64 KiB. In one group
//! per text and size:
//! - `stream_1500`: the buffer fed to `Utf8Stream` in 1,500-byte pieces (one Ethernet MTU, so
//!   sequences get cut between pieces), the last piece through `finish`;
//! - `stream_whole`: the buffer through `Utf8Stream::finish` in one piece;
//! - `simdutf8`: `simdutf8::basic::from_utf8` on the whole buffer;
//! - `std`: `std::str::from_utf8` on the whole buffer.
//!
//! The budget is streaming within 1.5x of one-shot simdutf8 on the same bytes.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gale_benches::{Text, stream_validate};

const PIECE: usize = 1500;

fn utf8(c: &mut Criterion) {
    for text in [Text::Ascii, Text::Cjk, Text::Emoji] {
        for (len, label) in [(64, "64B"), (4096, "4KiB"), (65536, "64KiB")] {
            let s = text.generate(len);
            let bytes = s.as_bytes();
            assert!(stream_validate(bytes, PIECE) && stream_validate(bytes, usize::MAX));
            let mut group = c.benchmark_group(format!("utf8/{}/{label}", text.name()));
            group.throughput(Throughput::Bytes(bytes.len() as u64));
            group.bench_function("stream_1500", |b| b.iter(|| stream_validate(black_box(bytes), PIECE)));
            group
                .bench_function("stream_whole", |b| b.iter(|| stream_validate(black_box(bytes), usize::MAX)));
            group.bench_function("simdutf8", |b| {
                b.iter(|| simdutf8::basic::from_utf8(black_box(bytes)).is_ok())
            });
            group.bench_function("std", |b| b.iter(|| std::str::from_utf8(black_box(bytes)).is_ok()));
            group.finish();
        }
    }
}

criterion_group!(benches, utf8);
criterion_main!(benches);
