//! Replays the saved fuzz inputs under `fuzz/regressions/<target>/`, and hand-made inputs
//! for every target, through the same checks the fuzz targets run: on stable Rust, without
//! a fuzzer, in every `cargo test`.

#[path = "../fuzz/checks/mod.rs"]
mod checks;

use checks::decoder::{Outcome, Owned};
use checks::roundtrip::{Control, Cut, Data, Message, Plan};
use gale_frame::handshake::{AcceptKey, AcceptOptions, write_accept_response};
use gale_frame::{DataKind, FrameSpec, OpCode, append_frame};
use std::path::Path;

/// The fuzz targets, which are also the directory names under `fuzz/regressions/`.
const TARGETS: [&str; 5] = ["decoder", "message_roundtrip", "handshake", "utf8", "mask"];

/// Every saved input of `target`, with its file name, in a stable order.
fn saved_inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions").join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let mut inputs: Vec<_> = entries
        .map(|e| e.expect("list regressions").path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    inputs.sort();
    inputs
}

/// Run `check` on every saved input of `target`, naming the file that fails.
fn replay(target: &str, check: impl Fn(&[u8])) {
    for (name, data) in saved_inputs(target) {
        eprintln!("replaying {target}/{name}");
        check(&data);
    }
}

#[test]
fn regression_directories_name_targets() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    for entry in std::fs::read_dir(root).into_iter().flatten() {
        let name = entry.expect("list regressions").file_name();
        assert!(TARGETS.iter().any(|t| name == *t), "{name:?} is not a fuzz target");
    }
}

#[test]
fn saved_decoder_inputs() {
    replay("decoder", |data| {
        checks::decoder::check(data);
    });
}

#[test]
fn saved_message_roundtrip_inputs() {
    replay("message_roundtrip", |data| checks::roundtrip::check(&Plan::from_bytes(data)));
}

#[test]
fn saved_handshake_inputs() {
    replay("handshake", |data| {
        checks::handshake::check(data);
    });
}

#[test]
fn saved_utf8_inputs() {
    replay("utf8", |data| {
        checks::utf8::check(data);
    });
}

#[test]
fn saved_mask_inputs() {
    replay("mask", checks::mask::check);
}

// Decoder. Flags: bit 0 client role, bit 1 RSV1 allowed. Size 0x5f: 15 << 10 bytes.

const SERVER: u8 = 0;
const CLIENT: u8 = 1;
const LIMIT_15K: u8 = 0x5f;
/// Reads of 1 byte, then 3, then 200, in turn; and reads of one byte each, which keep
/// every frame off the single-read fast path.
const READ_PLANS: [&[u8]; 2] = [&[0, 2, 199], &[0]];

/// Decode `wire` with the given flags and size byte in each of [`READ_PLANS`] (the check
/// compares each with a single read).
fn decode(flags: u8, size: u8, wire: &[u8]) -> Outcome {
    let [first, rest @ ..] =
        READ_PLANS.map(|reads| checks::decoder::check(&checks::decoder::input(flags, size, reads, wire)));
    assert!(rest.iter().all(|outcome| *outcome == first));
    first
}

fn events(events: Vec<Owned>) -> Outcome {
    Outcome { events, error: None }
}

fn error(events: Vec<Owned>, code: u16) -> Outcome {
    Outcome { events, error: Some(code) }
}

/// The example frames of RFC 6455 section 5.7.
#[test]
fn decoder_rfc_examples() {
    let hello = || Owned::Text("Hello".into());
    assert_eq!(decode(CLIENT, LIMIT_15K, &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]), events(vec![hello()]));
    let masked = [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
    assert_eq!(decode(SERVER, LIMIT_15K, &masked), events(vec![hello()]));
    let fragmented = [0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f];
    assert_eq!(decode(CLIENT, LIMIT_15K, &fragmented), events(vec![hello()]));
    let ping = [0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
    assert_eq!(decode(CLIENT, LIMIT_15K, &ping), events(vec![Owned::Ping(b"Hello".to_vec())]));
    let pong = [0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
    assert_eq!(decode(SERVER, LIMIT_15K, &pong), events(vec![Owned::Pong(b"Hello".to_vec())]));

    let mut binary_256 = vec![0x82, 0x7E, 0x01, 0x00];
    binary_256.extend_from_slice(&[7; 256]);
    assert_eq!(decode(CLIENT, LIMIT_15K, &binary_256), events(vec![Owned::Binary(vec![7; 256])]));
    let mut binary_64k = vec![0x82, 0x7F, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00];
    binary_64k.extend_from_slice(&[9; 65536]);
    // Size 0x81: 1 << 16 bytes, exactly the message.
    assert_eq!(decode(CLIENT, 0x81, &binary_64k), events(vec![Owned::Binary(vec![9; 65536])]));
    assert_eq!(decode(CLIENT, 0x8f, &binary_64k[..40_000]), events(vec![]));
}

#[test]
fn decoder_truncated_and_malformed_headers() {
    // A 64-bit length cut short, at every length: nothing yet, and no error.
    let header = [0x82, 0x7F, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00];
    for cut in 0..header.len() {
        assert_eq!(decode(CLIENT, LIMIT_15K, &header[..cut]), events(vec![]), "cut at {cut}");
    }
    // The announced 65,536 bytes are over the 15 KiB limit before any payload arrives.
    assert_eq!(decode(CLIENT, LIMIT_15K, &header), error(vec![], 1009));
    // Top bit of the 64-bit length, non-minimal lengths, reserved opcode, RSV2.
    assert_eq!(decode(CLIENT, LIMIT_15K, &[0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0]), error(vec![], 1002));
    assert_eq!(decode(CLIENT, LIMIT_15K, &[0x82, 0x7E, 0x00, 0x7D]), error(vec![], 1002));
    assert_eq!(decode(CLIENT, LIMIT_15K, &[0x82, 0x7F, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF]), error(vec![], 1002));
    assert_eq!(decode(CLIENT, LIMIT_15K, &[0x83, 0x00]), error(vec![], 1002));
    assert_eq!(decode(CLIENT, LIMIT_15K, &[0xA2, 0x00]), error(vec![], 1002));
    // Masking in the wrong direction.
    assert_eq!(decode(SERVER, LIMIT_15K, &[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]), error(vec![], 1002));
}

#[test]
fn decoder_payload_rules() {
    let hello = || Owned::Text("Hello".into());
    let mut wire = vec![0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f];
    // Invalid UTF-8 (a surrogate) in a second message, after the first was delivered.
    wire.extend_from_slice(&[0x81, 0x03, 0xED, 0xA0, 0x80]);
    assert_eq!(decode(CLIENT, LIMIT_15K, &wire), error(vec![hello()], 1007));
    // A close frame with a reserved code, and one with a valid code and reason.
    assert_eq!(decode(CLIENT, LIMIT_15K, &[0x88, 0x02, 0x03, 0xED]), error(vec![], 1002));
    let close = [0x88, 0x05, 0x03, 0xE8, b'b', b'y', b'e', 0x81, 0x00];
    assert_eq!(decode(CLIENT, LIMIT_15K, &close), events(vec![Owned::Close(Some(1000), "bye".into())]));
    // RSV1 only once negotiated.
    let compressed = [0xC1, 0x02, 0xF2, 0x00];
    assert_eq!(decode(CLIENT, LIMIT_15K, &compressed), error(vec![], 1002));
    let want = Owned::Compressed(DataKind::Text, vec![0xF2, 0x00]);
    assert_eq!(decode(CLIENT | 2, LIMIT_15K, &compressed), events(vec![want]));
    // A limit of zero bytes still allows empty messages.
    assert_eq!(
        decode(CLIENT, 0x00, &[0x82, 0x00, 0x82, 0x01, 0x00]),
        error(vec![Owned::Binary(vec![])], 1009)
    );
}

// Message round trip.

/// A masked "Hello" fragmented as in RFC 6455 section 5.7, with a ping between the halves,
/// then a 125-byte pong, read byte by byte.
#[test]
fn roundtrip_fragmented_hello_with_control_between() {
    let ping = Control::new(false, b"between".to_vec());
    let hello = Data::new(true, b"Hello".to_vec(), 0, vec![Cut::new(3, Some(ping))]);
    let pong = Control::new(true, vec![0x55; 125]);
    let plan = Plan::new(
        vec![[0x37, 0xfa, 0x21, 0x3d]],
        vec![1],
        vec![Message::Data(hello), Message::Control(pong)],
    );
    checks::roundtrip::check(&plan);
}

/// Multi-byte characters cut mid-sequence by fragments and reads, and empty fragments.
#[test]
fn roundtrip_text_cut_inside_characters() {
    let text = "κόσμε 🎉 你好".as_bytes().to_vec();
    let cuts = vec![Cut::new(1, None), Cut::new(0, None), Cut::new(6, None), Cut::new(1, None)];
    let plan = Plan::new(
        vec![[1, 2, 3, 4], [0xff; 4]],
        vec![2, 3],
        vec![Message::Data(Data::new(true, text, 2, cuts))],
    );
    checks::roundtrip::check(&plan);
}

/// A binary message over 64 KiB (64-bit length) after an empty text message, in large reads.
#[test]
fn roundtrip_large_binary() {
    let chunk: Vec<u8> = (0..=255).collect();
    let big = Data::new(false, chunk, 299, vec![Cut::new(65_000, None)]);
    let empty = Data::new(true, Vec::new(), 7, Vec::new());
    let plan = Plan::new(Vec::new(), vec![5000, 65_536], vec![Message::Data(empty), Message::Data(big)]);
    checks::roundtrip::check(&plan);
}

/// The byte format is total and its constructors clamp: any bytes give a plan that
/// round-trips, including bytes that end mid-field.
#[test]
fn roundtrip_plan_format_accepts_any_bytes() {
    for data in
        [&b""[..], &[0xff; 40], &[0, 0, 1, 0xff, 0xff, 0xff, 0xff], b"\x01\x01\x02\x03\x04\x00\x00\x03\xc3"]
    {
        checks::roundtrip::check(&Plan::from_bytes(data));
    }
}

// Handshake.

const RFC_REQUEST: &str = "GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\n\
Sec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n";

#[test]
fn handshake_rfc_request() {
    let verdict = checks::handshake::check(RFC_REQUEST.as_bytes());
    assert_eq!((verdict.request, verdict.upgrade), (Ok(Some(RFC_REQUEST.len())), Some(101)));
    let cut = checks::handshake::check(&RFC_REQUEST.as_bytes()[..RFC_REQUEST.len() - 1]);
    assert_eq!((cut.request, cut.upgrade), (Ok(None), None));
}

#[test]
fn handshake_with_100_headers_and_oversized_head() {
    let mut many = String::from("GET / HTTP/1.1\r\n");
    for i in 0..100 {
        many.push_str(&format!("X-Header-{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(checks::handshake::check(many.as_bytes()).request, Err(431));
    let huge = format!("GET / HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(9000));
    assert_eq!(checks::handshake::check(huge.as_bytes()).request, Err(431));
    assert_eq!(checks::handshake::check(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n").request, Err(400));
}

#[test]
fn handshake_client_key_and_response() {
    // The request of the checks' client, so that the server's 101 is checked against it.
    let key = checks::handshake::client().key().to_owned();
    let request = RFC_REQUEST.replace("dGhlIHNhbXBsZSBub25jZQ==", &key);
    assert_eq!(checks::handshake::check(request.as_bytes()).upgrade, Some(101));
    let plain = RFC_REQUEST.replace("Upgrade: websocket\r\n", "");
    assert_eq!(checks::handshake::check(plain.as_bytes()).upgrade, Some(426));

    let mut response = Vec::new();
    let options = AcceptOptions { protocol: Some("chat"), ..AcceptOptions::default() };
    write_accept_response(&mut response, &AcceptKey::for_key(key.as_bytes()), &options);
    let head_len = response.len();
    response.extend_from_slice(&[0x81, 0x00]);
    let verdict = checks::handshake::check(&response);
    assert_eq!(verdict.response, Ok(Some((head_len, Some("chat".to_owned())))));
}

// UTF-8.

#[test]
fn utf8_valid_and_invalid_text() {
    let kosme = "κόσμε".as_bytes();
    assert!(checks::utf8::check(&checks::utf8::input(&[1, 3, 5], kosme)));
    // Autobahn 6.4.1: a code point above U+10FFFF in the middle of valid text.
    let mut above_max = kosme.to_vec();
    above_max.extend_from_slice(&[0xF4, 0x90, 0x80, 0x80, b'e', b'd', b'i', b't', b'e', b'd']);
    assert!(!checks::utf8::check(&checks::utf8::input(&[10, 11, 12], &above_max)));
    for bad in [&[0xED, 0xA0, 0x80][..], &[0xC0, 0xAF], &[0xE0, 0x80, 0xAF], &[0xF0, 0x9F, 0x8E]] {
        assert!(!checks::utf8::check(&checks::utf8::input(&[0, 1, 2], bad)), "{bad:x?}");
    }
    // An emoji cut after every byte, and cuts past the end of the text.
    assert!(checks::utf8::check(&checks::utf8::input(&[1, 2, 3, 4, 500], "a🎉".as_bytes())));
    assert!(checks::utf8::check(&[]));
}

// Masking.

#[test]
fn mask_around_every_kernel_block_size() {
    let payload: Vec<u8> = (0..1100u32).map(|i| (i * 7 + 3) as u8).collect();
    for len in [0, 1, 3, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1100] {
        for (phase, offset) in [(0, 0), (1, 1), (6, 63), (255, 17)] {
            let mut data = vec![0x37, 0xfa, 0x21, 0x3d, phase, offset, len as u8 / 2];
            data.extend_from_slice(&payload[..len]);
            checks::mask::check(&data);
        }
    }
}

/// The masked "Hello" of RFC 6455 section 5.7, unmasked by every way the check tries.
#[test]
fn mask_rfc_hello() {
    let mut frame = Vec::new();
    append_frame(&mut frame, FrameSpec::client(OpCode::Text, [0x37, 0xfa, 0x21, 0x3d]), b"Hello");
    assert_eq!(&frame[6..], &[0x7f, 0x9f, 0x4d, 0x51, 0x58]);
    let mut data = vec![0x37, 0xfa, 0x21, 0x3d, 0, 5, 2];
    data.extend_from_slice(&frame[6..]);
    checks::mask::check(&data);
}
