//! Receive-side rules of RFC 6455, one test per rule, with the RFC's own examples.

mod common;

use common::{Owned, feed, feed_all};
use gale_frame::{
    CloseCode, DataKind, Decoder, DecoderConfig, Event, FrameSpec, OpCode, PartialBudget, append_frame,
    header::RSV1,
};

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn server() -> Decoder {
    Decoder::new(DecoderConfig::server(1 << 20))
}

fn client() -> Decoder {
    Decoder::new(DecoderConfig::client(1 << 20))
}

/// A masked client frame.
fn cframe(opcode: OpCode, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    append_frame(&mut v, FrameSpec { opcode, fin, compressed: false, mask: Some(KEY) }, payload);
    v
}

fn error_code(dec: &mut Decoder, bytes: &[u8]) -> u16 {
    let (_, err) = feed_all(dec, bytes);
    err.expect("expected a protocol error").code.0
}

#[test]
fn rfc_unmasked_hello_at_client() {
    let (ev, err) = feed_all(&mut client(), &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
    assert_eq!((ev, err), (vec![Owned::Text("Hello".into())], None));
}

#[test]
fn rfc_masked_hello_at_server() {
    let bytes = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
    let (ev, err) = feed_all(&mut server(), &bytes);
    assert_eq!((ev, err), (vec![Owned::Text("Hello".into())], None));
}

#[test]
fn rfc_fragmented_hello() {
    let bytes = [0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f];
    let (ev, err) = feed_all(&mut client(), &bytes);
    assert_eq!((ev, err), (vec![Owned::Text("Hello".into())], None));
}

#[test]
fn rfc_ping_and_masked_pong() {
    let (ev, _) = feed_all(&mut client(), &[0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
    assert_eq!(ev, vec![Owned::Ping(b"Hello".to_vec())]);
    let (ev, _) =
        feed_all(&mut server(), &[0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]);
    assert_eq!(ev, vec![Owned::Pong(b"Hello".to_vec())]);
}

#[test]
fn rfc_256_bytes_and_64k_binary() {
    for len in [256usize, 65536] {
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let mut bytes = Vec::new();
        append_frame(&mut bytes, FrameSpec::server(OpCode::Binary), &payload);
        let (ev, err) = feed_all(&mut client(), &bytes);
        assert_eq!((ev, err), (vec![Owned::Binary(payload.clone())], None));
        let (ev, err) = feed(&mut client(), &bytes, &[1000, 7, 1]);
        assert_eq!((ev, err), (vec![Owned::Binary(payload)], None));
    }
}

#[test]
fn whole_message_in_one_read_is_zero_copy() {
    let mut bytes = cframe(OpCode::Binary, true, b"payload bytes");
    let range = bytes.as_ptr_range();
    let mut dec = server();
    let (n, ev) = dec.decode(&mut bytes).unwrap();
    let Some(Event::Binary(p)) = ev else { panic!("expected binary") };
    assert!(range.contains(&p.as_ptr()), "payload must borrow the read buffer");
    assert_eq!(p, b"payload bytes");
    assert_eq!(n, bytes.len());
    assert_eq!(dec.heap_bytes(), 0);
}

#[test]
fn split_message_buffer_is_freed_after_delivery() {
    let bytes = cframe(OpCode::Binary, true, &[9u8; 5000]);
    let mut dec = server();
    let (ev, _) = feed(&mut dec, &bytes, &[100]);
    assert_eq!(ev, vec![Owned::Binary(vec![9u8; 5000])]);
    dec.release();
    assert_eq!(dec.heap_bytes(), 0);
    assert!(!dec.is_mid_message());
}

#[test]
fn every_split_point_gives_the_same_events() {
    let mut bytes = cframe(OpCode::Text, false, "κόσμε ".as_bytes());
    bytes.extend(cframe(OpCode::Ping, true, b"p"));
    bytes.extend(cframe(OpCode::Continuation, true, "你好 🎉".as_bytes()));
    bytes.extend(cframe(OpCode::Binary, true, &[1, 2, 3]));
    bytes.extend(cframe(OpCode::Close, true, &[0x03, 0xE8, b'o', b'k']));
    let want = vec![
        Owned::Ping(b"p".to_vec()),
        Owned::Text("κόσμε 你好 🎉".into()),
        Owned::Binary(vec![1, 2, 3]),
        Owned::Close(Some(1000), "ok".into()),
    ];
    for size in 1..=bytes.len() {
        let (ev, err) = feed(&mut server(), &bytes, &[size]);
        assert_eq!((&ev, err), (&want, None), "read size {size}");
    }
    for cut in 0..bytes.len() {
        let (ev, err) = feed(&mut server(), &bytes, &[cut.max(1), bytes.len()]);
        assert_eq!((&ev, err), (&want, None), "cut {cut}");
    }
}

#[test]
fn control_frames_between_fragments() {
    let mut bytes = cframe(OpCode::Binary, false, b"ab");
    bytes.extend(cframe(OpCode::Ping, true, b"1"));
    bytes.extend(cframe(OpCode::Continuation, false, b"cd"));
    bytes.extend(cframe(OpCode::Pong, true, b"2"));
    bytes.extend(cframe(OpCode::Continuation, true, b"ef"));
    let (ev, err) = feed_all(&mut server(), &bytes);
    assert_eq!(err, None);
    assert_eq!(
        ev,
        vec![Owned::Ping(b"1".to_vec()), Owned::Pong(b"2".to_vec()), Owned::Binary(b"abcdef".to_vec())]
    );
}

#[test]
fn empty_messages_and_fragments() {
    let mut bytes = cframe(OpCode::Text, true, b"");
    bytes.extend(cframe(OpCode::Binary, false, b""));
    bytes.extend(cframe(OpCode::Continuation, false, b""));
    bytes.extend(cframe(OpCode::Continuation, true, b""));
    bytes.extend(cframe(OpCode::Ping, true, b""));
    let (ev, err) = feed(&mut server(), &bytes, &[1]);
    assert_eq!(err, None);
    assert_eq!(ev, vec![Owned::Text(String::new()), Owned::Binary(vec![]), Owned::Ping(vec![])]);
}

#[test]
fn unmasked_client_frame_is_1002() {
    let mut bytes = Vec::new();
    append_frame(&mut bytes, FrameSpec::server(OpCode::Text), b"hi");
    assert_eq!(error_code(&mut server(), &bytes), 1002);
}

#[test]
fn masked_server_frame_is_1002() {
    assert_eq!(error_code(&mut client(), &cframe(OpCode::Text, true, b"hi")), 1002);
}

#[test]
fn reserved_bits_are_1002() {
    for rsv in [0x40u8, 0x20, 0x10, 0x70] {
        let mut bytes = cframe(OpCode::Text, true, b"hi");
        bytes[0] |= rsv;
        assert_eq!(error_code(&mut server(), &bytes), 1002, "rsv {rsv:#x}");
    }
}

#[test]
fn rsv1_with_deflate_negotiated() {
    let cfg = DecoderConfig { allow_rsv1: true, ..DecoderConfig::server(1 << 20) };
    let mut bytes = cframe(OpCode::Text, false, &[0xf2, 0x48]);
    bytes[0] |= RSV1;
    bytes.extend(cframe(OpCode::Continuation, true, &[0xcd, 0xc9]));
    let (ev, err) = feed(&mut Decoder::new(cfg), &bytes, &[3]);
    assert_eq!(err, None);
    assert_eq!(ev, vec![Owned::Compressed(DataKind::Text, vec![0xf2, 0x48, 0xcd, 0xc9])]);

    // RSV1 is only allowed on the first frame of a message, never on control frames.
    let mut bytes = cframe(OpCode::Text, false, b"a");
    let mut cont = cframe(OpCode::Continuation, true, b"b");
    cont[0] |= RSV1;
    bytes.extend(cont);
    assert_eq!(error_code(&mut Decoder::new(cfg), &bytes), 1002);
    let mut ping = cframe(OpCode::Ping, true, b"");
    ping[0] |= RSV1;
    assert_eq!(error_code(&mut Decoder::new(cfg), &ping), 1002);
}

#[test]
fn reserved_opcodes_are_1002() {
    for op in [3u8, 4, 5, 6, 7, 11, 12, 13, 14, 15] {
        let mut bytes = cframe(OpCode::Binary, true, b"x");
        bytes[0] = 0x80 | op;
        assert_eq!(error_code(&mut server(), &bytes), 1002, "opcode {op}");
    }
}

#[test]
fn fragmentation_order_rules() {
    // Continuation with nothing to continue.
    assert_eq!(error_code(&mut server(), &cframe(OpCode::Continuation, true, b"x")), 1002);
    // A new data frame while a message is open.
    let mut bytes = cframe(OpCode::Text, false, b"a");
    bytes.extend(cframe(OpCode::Text, true, b"b"));
    assert_eq!(error_code(&mut server(), &bytes), 1002);
    // Fragmented control frame and oversized control frame.
    assert_eq!(error_code(&mut server(), &cframe(OpCode::Ping, false, b"x")), 1002);
    assert_eq!(error_code(&mut server(), &cframe(OpCode::Ping, true, &[0; 126])), 1002);
}

#[test]
fn size_limit_is_1009_before_the_payload_arrives() {
    let mut dec = Decoder::new(DecoderConfig::server(1000));
    let bytes = cframe(OpCode::Binary, true, &[0; 1001]);
    // Only the header (8 bytes) is fed.
    let (_, err) = feed_all(&mut dec, &bytes[..8]);
    assert_eq!(err.unwrap().code, CloseCode::MESSAGE_TOO_BIG);

    // Fragments adding up past the limit.
    let mut dec = Decoder::new(DecoderConfig::server(1000));
    let mut bytes = cframe(OpCode::Binary, false, &[0; 600]);
    bytes.extend(cframe(OpCode::Continuation, true, &[0; 401]));
    assert_eq!(error_code(&mut dec, &bytes), 1009);

    // Exactly at the limit is fine.
    let mut dec = Decoder::new(DecoderConfig::server(1000));
    let mut bytes = cframe(OpCode::Binary, false, &[0; 600]);
    bytes.extend(cframe(OpCode::Continuation, true, &[0; 400]));
    assert_eq!(feed_all(&mut dec, &bytes).1, None);
}

#[test]
fn invalid_utf8_is_1007() {
    assert_eq!(error_code(&mut server(), &cframe(OpCode::Text, true, &[0xff, 0xfe])), 1007);
    // A message ending inside a sequence, fragmented.
    let mut bytes = cframe(OpCode::Text, false, b"ok");
    bytes.extend(cframe(OpCode::Continuation, true, &[0xF0, 0x9F]));
    assert_eq!(error_code(&mut server(), &bytes), 1007);
}

/// Autobahn 6.4.x: the first fragment carries an invalid sequence; the error must come
/// before the rest of the message arrives.
#[test]
fn invalid_utf8_fails_fast() {
    let mut first = "κόσμε".as_bytes().to_vec();
    first.extend([0xF4, 0x90, 0x80, 0x80]);
    let bytes = cframe(OpCode::Text, false, &first);
    let (_, err) = feed_all(&mut server(), &bytes);
    assert_eq!(err.unwrap().code, CloseCode::INVALID_PAYLOAD);

    // One frame, arriving in pieces: the error comes with the piece holding F4 90.
    let bytes = cframe(OpCode::Text, true, &first);
    let header = 6;
    let upto_f4_90 = header + "κόσμε".len() + 2;
    let mut dec = server();
    let (_, err) = feed_all(&mut dec, &bytes[..upto_f4_90 - 1]);
    assert_eq!(err, None);
    let (_, err) = feed(&mut dec, &bytes[upto_f4_90 - 1..upto_f4_90], &[1]);
    assert_eq!(err.unwrap().code, CloseCode::INVALID_PAYLOAD);
}

/// With `check_utf8` off, text comes unchecked, whole or fragmented and in any reads, and
/// binary, control frames and close reasons are decoded as before.
#[test]
fn unchecked_text_comes_as_bytes() {
    let unchecked = || Decoder::new(DecoderConfig { check_utf8: false, ..DecoderConfig::server(1 << 20) });
    let bad = [b'o', b'k', 0xff, 0xfe];
    let (ev, err) = feed_all(&mut unchecked(), &cframe(OpCode::Text, true, &bad));
    assert_eq!((ev, err), (vec![Owned::UncheckedText(bad.to_vec())], None));
    let mut bytes = cframe(OpCode::Text, false, "κό".as_bytes());
    bytes.extend(cframe(OpCode::Ping, true, b"p"));
    bytes.extend(cframe(OpCode::Continuation, true, &[0xF0, 0x9F]));
    bytes.extend(cframe(OpCode::Binary, true, b"bin"));
    let mut whole = "κό".as_bytes().to_vec();
    whole.extend([0xF0, 0x9F]);
    let expected =
        vec![Owned::Ping(b"p".to_vec()), Owned::UncheckedText(whole), Owned::Binary(b"bin".to_vec())];
    for reads in [&[1usize][..], &[3, 7], &[bytes.len()]] {
        let (ev, err) = feed(&mut unchecked(), &bytes, reads);
        assert_eq!((&ev, err), (&expected, None), "reads {reads:?}");
    }
    // A close reason is still checked.
    let close = cframe(OpCode::Close, true, &[0x03, 0xE8, 0xff]);
    assert_eq!(error_code(&mut unchecked(), &close), 1007);
}

#[test]
fn close_frame_rules() {
    let close = |payload: &[u8]| cframe(OpCode::Close, true, payload);
    let (ev, _) = feed_all(&mut server(), &close(&[]));
    assert_eq!(ev, vec![Owned::Close(None, String::new())]);
    let (ev, _) = feed_all(&mut server(), &close(&[0x0F, 0xA0, b'b', b'y', b'e']));
    assert_eq!(ev, vec![Owned::Close(Some(4000), "bye".into())]);
    assert_eq!(error_code(&mut server(), &close(&[0x03])), 1002);
    for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000] {
        let b = code.to_be_bytes();
        assert_eq!(error_code(&mut server(), &close(&b)), 1002, "code {code}");
    }
    for code in [1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999] {
        let b = code.to_be_bytes();
        let (ev, err) = feed_all(&mut server(), &close(&b));
        assert_eq!((ev, err), (vec![Owned::Close(Some(code), String::new())], None));
    }
    assert_eq!(error_code(&mut server(), &close(&[0x03, 0xE8, 0xff])), 1007);
}

#[test]
fn input_after_close_is_ignored() {
    let mut bytes = cframe(OpCode::Close, true, &[0x03, 0xE8]);
    bytes.extend(cframe(OpCode::Text, true, b"late"));
    bytes.extend([0xFF, 0xFF]);
    let mut dec = server();
    let (ev, err) = feed_all(&mut dec, &bytes);
    assert_eq!((ev, err), (vec![Owned::Close(Some(1000), String::new())], None));
    assert!(dec.is_finished());
}

#[test]
fn non_minimal_lengths_are_rejected() {
    let bytes = [0x82, 0x80 | 126, 0, 5, 0, 0, 0, 0, 1, 2, 3, 4, 5];
    assert_eq!(error_code(&mut server(), &bytes), 1002);
}

#[test]
fn sixty_four_bit_length_with_top_bit_is_1002() {
    let bytes = [0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
    assert_eq!(error_code(&mut Decoder::new(DecoderConfig::server(u64::MAX)), &bytes), 1002);
}

#[test]
fn compressed_messages_may_exceed_the_limit_by_deflate_overhead_only() {
    let cfg = DecoderConfig { allow_rsv1: true, ..DecoderConfig::server(1024) };
    let compressed = |len: usize| {
        let mut bytes = cframe(OpCode::Binary, true, &vec![0u8; len]);
        bytes[0] |= RSV1;
        bytes
    };
    assert_eq!(feed_all(&mut Decoder::new(cfg), &compressed(1024 + 65)).1, None);
    assert_eq!(error_code(&mut Decoder::new(cfg), &compressed(1024 + 66)), 1009);
    // Uncompressed messages keep the exact limit.
    assert_eq!(error_code(&mut Decoder::new(cfg), &cframe(OpCode::Binary, true, &[0; 1025])), 1009);
    assert_eq!((cfg.wire_limit(true), cfg.wire_limit(false)), (1024 + 65, 1024));
}

// ---------------------------------------------------------------------------------------------
// Memory of unfinished messages: the buffer's size, and the budget decoders share.

/// Feed `bytes` to `dec` as one read; the events' owned copies, or the error's close code.
fn read(dec: &mut Decoder, bytes: &[u8]) -> Result<Vec<common::Owned>, u16> {
    let (events, err) = feed(dec, bytes, &[]);
    dec.release();
    match err {
        Some(e) => Err(e.code.0),
        None => Ok(events),
    }
}

#[test]
fn split_message_buffer_never_outgrows_the_message() {
    for len in [70_000usize, 1_000_003] {
        let bytes = cframe(OpCode::Binary, true, &vec![5u8; len]);
        for read_size in [1000, 65_537, 400_000] {
            let mut dec = server_of(2 << 20);
            let mut fed = 0;
            let mut events = Vec::new();
            while fed < bytes.len() {
                let end = (fed + read_size).min(bytes.len());
                events.extend(read(&mut dec, &bytes[fed..end]).unwrap());
                fed = end;
                assert!(dec.heap_bytes() <= len, "{len}-byte message held in {} bytes", dec.heap_bytes());
            }
            assert_eq!(events, vec![Owned::Binary(vec![5u8; len])]);
        }
    }
}

fn server_of(max: u64) -> Decoder {
    Decoder::new(DecoderConfig::server(max))
}

fn budgeted(budget: &PartialBudget) -> Decoder {
    Decoder::with_budget(DecoderConfig::server(1 << 20), budget.clone())
}

/// The first `cut` bytes of a masked binary frame of `len` bytes.
fn partial(len: usize, cut: usize) -> Vec<u8> {
    let mut bytes = cframe(OpCode::Binary, true, &vec![1u8; len]);
    bytes.truncate(cut);
    bytes
}

#[test]
fn budget_counts_exactly_what_unfinished_messages_hold() {
    let budget = PartialBudget::new(1 << 20);
    let mut a = budgeted(&budget);
    let mut b = budgeted(&budget);
    // Whole messages in one read take nothing.
    assert_eq!(read(&mut a, &cframe(OpCode::Binary, true, &[1; 300_000])).unwrap().len(), 1);
    assert_eq!(budget.held(), 0);
    let bytes = cframe(OpCode::Binary, true, &[1; 300_000]);
    read(&mut a, &bytes[..100_000]).unwrap();
    read(&mut b, &bytes[..5_000]).unwrap();
    assert_eq!(budget.held(), a.heap_bytes() + b.heap_bytes());
    assert!(budget.held() >= 105_000);
    read(&mut a, &bytes[100_000..250_000]).unwrap();
    assert_eq!(budget.held(), a.heap_bytes() + b.heap_bytes());
    // Completing a message gives its bytes back once it is released.
    assert_eq!(read(&mut a, &bytes[250_000..]).unwrap().len(), 1);
    assert_eq!(budget.held(), b.heap_bytes());
    // So does dropping a decoder in the middle of one.
    drop(b);
    assert_eq!(budget.held(), 0);
}

#[test]
fn message_that_would_grow_past_the_budget_is_1013_and_the_others_go_on() {
    let budget = PartialBudget::new(1_000_000);
    let (mut a, mut b, mut c) = (budgeted(&budget), budgeted(&budget), budgeted(&budget));
    let message = cframe(OpCode::Binary, true, &[1; 400_000]);
    read(&mut a, &message[..399_000]).unwrap();
    read(&mut b, &message[..399_000]).unwrap();
    let before = budget.held();
    assert!(before <= 800_000);
    // C grows past what is left: refused with 1013, holding nothing, the others untouched.
    read(&mut c, &message[..300_000]).expect_err("over the budget");
    let (_, err) = feed(&mut c, &message[..300_000], &[]);
    assert!(err.is_none(), "a refused decoder ignores further input");
    assert_eq!(budget.held(), before);
    assert_eq!(c.heap_bytes(), 0);
    let mut c = budgeted(&budget);
    assert_eq!(read(&mut c, &message[..300_000]), Err(CloseCode::TRY_AGAIN_LATER.0));
    // A completes: its bytes come back, and a new message fits.
    assert_eq!(read(&mut a, &message[399_000..]).unwrap(), vec![Owned::Binary(vec![1; 400_000])]);
    let mut d = budgeted(&budget);
    read(&mut d, &message[..399_000]).unwrap();
    assert_eq!(read(&mut d, &message[399_000..]).unwrap().len(), 1);
    assert_eq!(read(&mut b, &message[399_000..]).unwrap().len(), 1);
    assert_eq!(budget.held(), 0);
}

#[test]
fn budget_near_its_end_grows_a_buffer_exactly() {
    // Doubling would pass the budget; growing to exactly what the read needs does not.
    let budget = PartialBudget::new(150_000);
    let mut a = budgeted(&budget);
    let message = cframe(OpCode::Binary, true, &[3; 200_000]);
    read(&mut a, &message[..70_000]).unwrap();
    read(&mut a, &message[70_000..149_000]).unwrap();
    assert!(a.heap_bytes() <= 150_000);
    assert_eq!(budget.held(), a.heap_bytes());
    assert_eq!(read(&mut a, &message[149_000..151_000]), Err(1013));
    assert_eq!(budget.held(), 0);
}

#[test]
fn budget_is_given_back_on_error_close_and_finish() {
    let budget = PartialBudget::new(1 << 20);
    let first = cframe(OpCode::Text, false, &[b'a'; 100_000]);
    // An error in the middle of a fragmented message.
    let mut dec = budgeted(&budget);
    read(&mut dec, &first).unwrap();
    assert!(budget.held() >= 100_000);
    assert_eq!(read(&mut dec, &cframe(OpCode::Binary, true, b"x")), Err(1002));
    assert_eq!(budget.held(), 0);
    // A close frame in the middle of one.
    let mut dec = budgeted(&budget);
    read(&mut dec, &first).unwrap();
    let events = read(&mut dec, &cframe(OpCode::Close, true, &[0x03, 0xe8])).unwrap();
    assert_eq!(events, vec![Owned::Close(Some(1000), String::new())]);
    assert_eq!(budget.held(), 0);
    // A close frame split across reads, in the middle of one.
    let mut dec = budgeted(&budget);
    read(&mut dec, &first).unwrap();
    let close = cframe(OpCode::Close, true, &[0x03, 0xe8]);
    read(&mut dec, &close[..7]).unwrap();
    read(&mut dec, &close[7..]).unwrap();
    assert_eq!(budget.held(), 0);
    // The owner stops it.
    let mut dec = budgeted(&budget);
    read(&mut dec, &partial(500_000, 200_000)).unwrap();
    assert!(budget.held() >= 199_000);
    dec.finish();
    assert_eq!(budget.held(), 0);
    assert!(dec.is_finished());
    assert_eq!(read(&mut dec, &partial(10, 16)).unwrap(), vec![]);
    assert_eq!(budget.held(), 0);
}

/// Decode `bytes` from one read and from reads of one byte (which never take the shortcut
/// for a whole common frame), with several configurations, and require the same events, the
/// same close code, and the decoder to have ended (or not) alike.
fn same_both_ways(bytes: &[u8], what: &str) {
    for (server, limit, check_utf8) in [
        (true, 1 << 20, true),
        (false, 1 << 20, true),
        (true, 3, true),
        (true, 200, true),
        (true, 1 << 20, false),
    ] {
        let config = if server { DecoderConfig::server(limit) } else { DecoderConfig::client(limit) };
        let config = DecoderConfig { check_utf8, ..config };
        let (mut one_read, mut byte_reads) = (Decoder::new(config), Decoder::new(config));
        let whole = feed_all(&mut one_read, bytes);
        let bytewise = feed(&mut byte_reads, bytes, &[1]);
        // After an error or a close frame the decoder ignores the rest: both must have ended.
        assert_eq!(
            (whole.0, whole.1.map(|e| e.code), one_read.is_finished()),
            (bytewise.0, bytewise.1.map(|e| e.code), byte_reads.is_finished()),
            "{what}: server {server} limit {limit} utf8 {check_utf8}"
        );
    }
}

/// Every two-byte frame start (so every 7-bit length and the 16- and 64-bit markers), with a
/// key, a short payload (some of it not UTF-8) and a following frame: a whole short message
/// in one read takes a shortcut, and it must agree with the general path on every event and
/// close code, for either role, with or without the UTF-8 check, and with size limits on
/// either side of the payload.
#[test]
fn the_common_frame_shortcut_agrees_with_the_general_path() {
    let payloads: [&[u8]; 4] = [b"", b"hello, world: twenty", &[0xCE, 0xBA, 0xFF, 0x41], &[0x61; 125]];
    for b0 in 0..=255u8 {
        for b1 in 0..=255u8 {
            for payload in payloads {
                let mut bytes = vec![b0, b1];
                if b1 & 0x80 != 0 {
                    bytes.extend(KEY);
                }
                bytes.extend(&payload[..usize::from(b1 & 0x7F).min(payload.len())]);
                bytes.extend(cframe(OpCode::Binary, true, b"next"));
                same_both_ways(&bytes, &format!("{b0:#04x} {b1:#04x} payload {payload:?}"));
            }
        }
    }
}

/// A read that starts with the bytes of a short whole message while the decoder is inside
/// something else (a fragmented message, a header cut by the previous read, a payload cut by
/// it) must not be taken for that message.
#[test]
fn the_shortcut_waits_for_what_an_earlier_read_left_open() {
    // A fragmented message, then a new text message: 1002, not a message.
    let mut reads = cframe(OpCode::Text, false, b"ab");
    let cut = reads.len();
    reads.extend(cframe(OpCode::Text, true, b"cd"));
    let (events, err) = feed(&mut server(), &reads, &[cut, reads.len()]);
    assert_eq!((events, err.map(|e| e.code.0)), (vec![], Some(1002)));

    // A header cut after its first byte: the next read starts with 0x81, which is the
    // second header byte (masked, length 1), not the start of a text frame.
    let mut bytes = cframe(OpCode::Binary, true, b"z");
    assert_eq!(bytes[1], 0x81);
    bytes.extend(cframe(OpCode::Text, true, b"after"));
    let (events, err) = feed(&mut server(), &bytes, &[1, bytes.len()]);
    assert_eq!((events, err), (vec![Owned::Binary(b"z".to_vec()), Owned::Text("after".into())], None));

    // A payload cut by the end of a read, whose rest starts with what looks like a whole
    // 20-byte text frame on the wire.
    let lookalike = [[0x81, 0x94].as_slice(), &KEY, &[b'x' ^ KEY[0]; 20]].concat();
    let payload: Vec<u8> =
        [b"head".as_slice(), &lookalike].concat().iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]).collect();
    let bytes = cframe(OpCode::Binary, true, &payload);
    let header_and_head = bytes.len() - lookalike.len();
    assert_eq!(&bytes[header_and_head..], &lookalike[..], "the second read starts with the lookalike");
    let (events, err) = feed(&mut server(), &bytes, &[header_and_head, bytes.len()]);
    assert_eq!((events, err), (vec![Owned::Binary(payload)], None));
}
