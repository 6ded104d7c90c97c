//! Interleaved comparison, robust to a noisy machine: each variant is timed in short batches,
//! the variants taking turns, and the minimum over the batches is kept (interference only
//! ever adds time). Prints ns per call and the ratios the codec budgets are about:
//! SIMD unmasking against the 32-bit-word loop, streaming UTF-8 against one-shot simdutf8.

use std::hint::black_box;
use std::time::Instant;

use gale_benches::{Aligned, KEY, Text, mask_u32_loop, stream_validate};

const ROUNDS: usize = 300;

/// Minimum ns per call of each variant over `ROUNDS` interleaved batches of `iters` calls.
fn race(iters: usize, variants: &mut [(&str, &mut dyn FnMut())]) -> Vec<f64> {
    let mut best = vec![f64::INFINITY; variants.len()];
    for round in 0..ROUNDS {
        for j in 0..variants.len() {
            let i = (j + round) % variants.len();
            let f = &mut variants[i].1;
            let t = Instant::now();
            for _ in 0..iters {
                f();
            }
            best[i] = best[i].min(t.elapsed().as_nanos() as f64 / iters as f64);
        }
    }
    best
}

fn batch(bytes: usize) -> usize {
    (16_384 / bytes.max(1)).clamp(8, 256)
}

fn gib(bytes: usize, ns: f64) -> f64 {
    bytes as f64 / ns * 1e9 / (1u64 << 30) as f64
}

fn main() {
    println!("unmask (min ns per call, GiB/s; ratio = u32_loop / apply_mask)");
    for (len, offset) in [(64, 0), (64, 6), (1024, 0), (1024, 8), (65536, 0), (65536, 14)] {
        let fill: Vec<u8> = (0..len as u32).map(|i| (i * 31 + 7) as u8).collect();
        let (mut a, mut b, mut c) =
            (Aligned::new(&fill, offset), Aligned::new(&fill, offset), Aligned::new(&fill, offset));
        let best = race(
            batch(len),
            &mut [
                ("apply_mask", &mut || gale_frame::apply_mask(black_box(a.bytes()), black_box(KEY), 0)),
                ("fastwebsockets", &mut || fastwebsockets::unmask(black_box(b.bytes()), black_box(KEY))),
                ("u32_loop", &mut || mask_u32_loop(black_box(c.bytes()), black_box(KEY))),
            ],
        );
        println!(
            "{len:>6}+{offset:<2} apply_mask {:8.2} ns {:6.1} GiB/s | fastwebsockets {:8.2} ns | u32_loop {:8.2} ns {:6.1} GiB/s | ratio {:.2}x",
            best[0],
            gib(len, best[0]),
            best[1],
            best[2],
            gib(len, best[2]),
            best[2] / best[0]
        );
    }
    println!("utf8 (min ns per call; ratio = stream / simdutf8)");
    for text in [Text::Ascii, Text::Cjk, Text::Emoji] {
        for len in [64, 4096, 65536] {
            let s = text.generate(len);
            let bytes = s.as_bytes();
            let best = race(
                batch(len),
                &mut [
                    ("stream_1500", &mut || assert!(stream_validate(black_box(bytes), 1500))),
                    ("stream_whole", &mut || assert!(stream_validate(black_box(bytes), usize::MAX))),
                    ("simdutf8", &mut || assert!(simdutf8::basic::from_utf8(black_box(bytes)).is_ok())),
                ],
            );
            println!(
                "{:>8} {len:>6} stream_1500 {:9.2} ns | stream_whole {:9.2} ns | simdutf8 {:9.2} ns | ratio {:.2}x / {:.2}x",
                text.name(),
                best[0],
                best[1],
                best[2],
                best[0] / best[2],
                best[1] / best[2]
            );
        }
    }
}
