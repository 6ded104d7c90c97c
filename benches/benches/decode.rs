//! Frame header decoding, whole-message decoding and frame encoding.
//!
//! - `header`: `FrameHeader::decode` on 2-, 4- and 10-byte headers, bare and with a mask key.
//! - `decode_one_read/*`: a masked client frame (20 B, 1 KiB, 64 KiB; text is Chinese chat
//!   JSON, binary is arbitrary bytes) decoded by a server `Decoder` from one read. The decoder
//!   unmasks in place, so each iteration first copies the pristine masked frame into a
//!   reused, cache-warm buffer, as `recv` would; `copy` times that copy alone, and the cost of
//!   decoding is `text`/`binary` minus `copy`. Included: header parsing, the connection-level
//!   checks, unmasking, UTF-8 validation for text, building the event.
//! - `decode_4KiB_reads/64KiB`: the same 64 KiB frames fed in 4 KiB reads, as a message that
//!   is bigger than one read arrives: also includes allocating the message buffer, copying
//!   each piece into it and streaming UTF-8 validation across the cuts.
//! - `encode`: `append_frame` of 20 B and 1 KiB server text frames into a reused `Vec`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gale_benches::{KEY, Text, client_frame};
use gale_frame::{Decoder, DecoderConfig, Event, FrameHeader, FrameSpec, OpCode, append_frame};

const MAX_MESSAGE: u64 = 16 << 20;

fn header(c: &mut Criterion) {
    let mut group = c.benchmark_group("header");
    for (payload_len, label) in [(5u64, "2"), (1024, "4"), (65536, "10")] {
        for mask in [None, Some(KEY)] {
            let h = FrameHeader { fin: true, rsv: 0, opcode: OpCode::Binary, mask, payload_len };
            let mut buf = [0u8; 14];
            let n = h.encode(&mut buf);
            assert_eq!(FrameHeader::decode(&buf[..n]).unwrap(), Some((h, n)));
            let id = if mask.is_some() { format!("{label}+mask") } else { label.to_string() };
            group.bench_function(id, |b| b.iter(|| FrameHeader::decode(black_box(&buf[..n]))));
        }
    }
    group.finish();
}

fn payloads(len: usize) -> [(OpCode, Vec<u8>); 2] {
    let text = Text::Cjk.generate(len).into_bytes();
    let binary = (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    [(OpCode::Text, text), (OpCode::Binary, binary)]
}

fn name(op: OpCode) -> &'static str {
    if op == OpCode::Text { "text" } else { "binary" }
}

/// Decode one whole message from `input`, fed in reads of at most `read` bytes; returns its
/// length.
fn decode(decoder: &mut Decoder, input: &mut [u8], read: usize) -> usize {
    let mut got = 0;
    for piece in input.chunks_mut(read) {
        let mut pos = 0;
        while pos < piece.len() {
            let (n, event) = decoder.decode(&mut piece[pos..]).expect("valid frame");
            pos += n;
            match black_box(event) {
                Some(Event::Text(t)) => got = t.len(),
                Some(Event::Binary(b)) => got = b.len(),
                Some(other) => panic!("unexpected {other:?}"),
                None => {}
            }
        }
    }
    got
}

fn decode_group(c: &mut Criterion, group_name: &str, len: usize, read: usize) {
    let frames = payloads(len).map(|(op, p)| (op, p.len(), client_frame(op, &p)));
    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Bytes(frames[0].2.len() as u64));
    let mut buf = vec![0u8; frames[1].2.len()];
    group.bench_function("copy", |b| {
        let wire = &frames[1].2;
        b.iter(|| black_box(&mut buf[..wire.len()]).copy_from_slice(black_box(wire)))
    });
    for (op, payload_len, wire) in &frames {
        let mut decoder = Decoder::new(DecoderConfig::server(MAX_MESSAGE));
        let input = &mut buf[..wire.len()];
        input.copy_from_slice(wire);
        assert_eq!(decode(&mut decoder, input, read), *payload_len);
        group.bench_function(name(*op), |b| {
            b.iter(|| {
                input.copy_from_slice(black_box(wire));
                decode(&mut decoder, input, read)
            })
        });
    }
    group.finish();
}

fn decoder(c: &mut Criterion) {
    for (len, label) in [(20, "20B"), (1024, "1KiB"), (65536, "64KiB")] {
        decode_group(c, &format!("decode_one_read/{label}"), len, usize::MAX);
    }
    decode_group(c, "decode_4KiB_reads/64KiB", 65536, 4096);
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    let mut out = Vec::with_capacity(2048);
    for (len, label) in [(20, "20B"), (1024, "1KiB")] {
        let payload = Text::Cjk.generate(len);
        group.throughput(Throughput::Bytes(payload.len() as u64));
        group.bench_function(format!("append_frame/{label}"), |b| {
            b.iter(|| {
                out.clear();
                append_frame(&mut out, FrameSpec::server(OpCode::Text), black_box(payload.as_bytes()));
                black_box(&out);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, header, decoder, encode);
criterion_main!(benches);
