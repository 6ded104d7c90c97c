//! RFC 6455 conformance of `gale echo`, driven over raw sockets with hand-built frames.
//!
//! The cases follow Autobahn|Testsuite: framing at the length-encoding boundaries and in chops
//! (1.x), pings and pongs (2.x), reserved bits (3.x), reserved opcodes (4.x), fragmentation
//! (5.x), UTF-8 validation including fail-fast (6.x), the close handshake and close codes
//! (7.x), large messages and the size limit (9.x), a slow reader (10.x), plus the opening
//! handshake over a raw socket and the masking and length-encoding rules. Every failure case
//! checks the exact close code and that the server then closes TCP; every echo is compared
//! byte for byte. `docs/CONFORMANCE.md` maps each test to its Autobahn section.
//!
//! All tests share one `gale echo` (see `shared`); each opens its own connections. Only the
//! size-limit test starts a second server, with `--max-payload 1048576`.

mod raw;
mod shared;
mod support;

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use raw::{BINARY, CLOSE, CONT, Client, FIN, MASK_BIT, PING, PONG, TEXT};
use raw::{close_frame, close_payload, concat, fragment, fragmented, frame, header_64, next_key, raw_frame};

/// Pause between chops of a chopped write: long enough for the server to read each chop
/// separately most of the time, short enough to keep the suite quick.
const CHOP_PAUSE: Duration = Duration::from_millis(1);

/// Payload lengths around the 7-bit, 16-bit and 64-bit length encodings (Autobahn 1.1, 1.2).
const BOUNDARY_LENGTHS: [usize; 7] = [0, 125, 126, 127, 128, 65535, 65536];

/// Message sizes of Autobahn 9.1/9.2, cut at the server's default 16 MiB limit.
const LARGE_SIZES: [usize; 5] = [64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20];

/// RFC 6455 close codes.
const NORMAL: u16 = 1000;
const PROTOCOL_ERROR: u16 = 1002;
const INVALID_PAYLOAD: u16 = 1007;
const TOO_BIG: u16 = 1009;

// ---------------------------------------------------------------------------------------------
// Building blocks of the cases

/// A connection to the shared server, past the handshake.
fn connect() -> Client {
    Client::connect(shared::echo_addr())
}

/// Runs named cases, keeps going after a failure, and fails once at the end with every
/// failing case listed, so that one run shows all the cases a bug breaks.
#[derive(Default)]
struct Cases {
    failed: Vec<String>,
    ran: usize,
}

impl Cases {
    fn run(&mut self, name: impl Into<String>, case: impl FnOnce()) {
        self.ran += 1;
        if let Err(e) = std::panic::catch_unwind(AssertUnwindSafe(case)) {
            let msg = e
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| e.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            self.failed.push(format!("{}: {msg}", name.into()));
        }
    }

    fn finish(self) {
        assert!(
            self.failed.is_empty(),
            "{} of {} cases failed:\n{}",
            self.failed.len(),
            self.ran,
            self.failed.join("\n")
        );
    }
}

/// Send `bytes` on a fresh connection and expect the server to fail it with `code`, then
/// close TCP.
fn assert_fails(bytes: &[u8], code: u16) {
    assert_fails_chopped(bytes, bytes.len().max(1), code);
}

/// Like [`assert_fails`], with `bytes` written `chunk` bytes at a time, so that the server
/// meets the violation in the middle of a frame it is still assembling.
fn assert_fails_chopped(bytes: &[u8], chunk: usize, code: u16) {
    let mut c = connect();
    c.send_chopped(bytes, chunk, CHOP_PAUSE);
    c.expect_failure(code);
}

/// Send `bytes` on a fresh connection: expect an echo of each `(opcode, payload)` in order,
/// then a failure with `code`, and nothing else (no pong, no further echo) before TCP closes.
fn assert_echoes_then_fails(bytes: &[u8], echoes: &[(u8, &[u8])], code: u16) {
    let mut c = connect();
    c.send(bytes);
    for &(opcode, payload) in echoes {
        c.expect_frame(opcode, payload);
    }
    c.expect_failure(code);
}

/// Start the close handshake with code 1000 and expect it to be answered and TCP closed.
fn close_normally(mut c: Client) {
    c.send(&close_frame(NORMAL, b""));
    c.expect_close_reply(&close_payload(NORMAL, b""));
}

/// Send one message and expect it back unchanged.
fn assert_echo(c: &mut Client, opcode: u8, payload: &[u8]) {
    c.send(&frame(opcode, payload));
    c.expect_frame(opcode, payload);
}

/// Valid UTF-8 of exactly `len` bytes mixing 1- to 4-byte characters (so that cuts fall
/// inside sequences), padded with ASCII.
fn text_payload(len: usize) -> Vec<u8> {
    const PATTERN: &str = "Hello-µ@ßöäüàá-UTF-8!! κόσμε 你好世界 😀🚀 ";
    let mut s = PATTERN.repeat(len / PATTERN.len() + 1);
    let mut cut = len;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    while s.len() < len {
        s.push('*');
    }
    s.into_bytes()
}

/// Binary payload of `len` bytes covering every byte value.
fn binary_payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8).collect()
}

fn payload_for(opcode: u8, len: usize) -> Vec<u8> {
    if opcode == TEXT { text_payload(len) } else { binary_payload(len) }
}

fn kind(opcode: u8) -> &'static str {
    if opcode == TEXT { "text" } else { "binary" }
}

// ---------------------------------------------------------------------------------------------
// Opening handshake

#[test]
fn handshake_answers_101_with_the_rfc_accept_key() {
    let c = connect();
    // RFC 6455 section 1.3: this key must produce exactly this accept value.
    assert!(c.response.starts_with("HTTP/1.1 101 "), "{}", c.response);
    assert!(c.response.contains(&format!("Sec-WebSocket-Accept: {}\r\n", raw::ACCEPT)), "{}", c.response);
    close_normally(c);
}

#[test]
fn handshake_split_over_many_writes_succeeds() {
    let addr = shared::echo_addr();
    // Cut the request line itself and every header into odd pieces; the last piece holds the
    // end of the request and the start of a frame, whose rest follows in later pieces.
    let mut bytes = raw::upgrade_request(addr, "/split").into_bytes();
    bytes.extend_from_slice(&frame(TEXT, b"after a split handshake"));
    let parts: Vec<&[u8]> = bytes.chunks(5).collect();
    let mut c = Client::handshake(addr, &parts, CHOP_PAUSE);
    c.expect_frame(TEXT, b"after a split handshake");
    close_normally(c);
}

#[test]
fn frames_in_the_handshake_write_are_processed() {
    let addr = shared::echo_addr();
    let mut bytes = raw::upgrade_request(addr, "/eager").into_bytes();
    bytes.extend_from_slice(&frame(TEXT, b"in the same write"));
    bytes.extend_from_slice(&frame(PING, b"eager ping"));
    let mut c = Client::handshake(addr, &[&bytes], Duration::ZERO);
    c.expect_frame(TEXT, b"in the same write");
    c.expect_frame(PONG, b"eager ping");
    close_normally(c);
}

// ---------------------------------------------------------------------------------------------
// 1.x Framing

#[test]
fn text_messages_at_length_boundaries_are_echoed() {
    let mut c = connect();
    for len in BOUNDARY_LENGTHS {
        assert_echo(&mut c, TEXT, &text_payload(len));
    }
    close_normally(c);
}

#[test]
fn binary_messages_at_length_boundaries_are_echoed() {
    let mut c = connect();
    for len in BOUNDARY_LENGTHS {
        assert_echo(&mut c, BINARY, &binary_payload(len));
    }
    close_normally(c);
}

#[test]
fn frames_written_one_byte_at_a_time_are_echoed() {
    let mut c = connect();
    for (opcode, len) in [(TEXT, 0), (TEXT, 125), (BINARY, 126), (BINARY, 128)] {
        let payload = payload_for(opcode, len);
        c.send_chopped(&frame(opcode, &payload), 1, CHOP_PAUSE);
        c.expect_frame(opcode, &payload);
    }
    close_normally(c);
}

#[test]
fn frames_written_in_odd_chunk_sizes_are_echoed() {
    let mut c = connect();
    for (opcode, len, chunk) in [(TEXT, 128, 3), (BINARY, 300, 7), (TEXT, 65535, 997), (BINARY, 65536, 997)] {
        let payload = payload_for(opcode, len);
        c.send_chopped(&frame(opcode, &payload), chunk, CHOP_PAUSE);
        c.expect_frame(opcode, &payload);
    }
    close_normally(c);
}

#[test]
fn messages_across_the_server_read_buffer_are_echoed_in_order() {
    // Three 300 KiB messages in one write: some arrive whole in a read, some are cut by the
    // end of a read (the server reads at most 512 KiB at a time). Their echoes stay under the
    // server's 1 MiB send-buffer limit, so none is dropped while the client is not reading.
    let mut c = connect();
    let payloads: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 300 << 10]).collect();
    c.send(&concat(&payloads.iter().map(|p| frame(BINARY, p)).collect::<Vec<_>>()));
    for p in &payloads {
        c.expect_frame(BINARY, p);
    }
    close_normally(c);
}

#[test]
fn several_messages_in_one_write_are_echoed_in_order() {
    let mut c = connect();
    let payloads: Vec<Vec<u8>> = (0..20).map(|i| text_payload(i * 13)).collect();
    let frames: Vec<Vec<u8>> = payloads.iter().map(|p| frame(TEXT, p)).collect();
    c.send(&concat(&frames));
    for p in &payloads {
        c.expect_frame(TEXT, p);
    }
    close_normally(c);
}

// ---------------------------------------------------------------------------------------------
// 2.x Pings and pongs

#[test]
fn pings_get_pongs_with_the_same_payload() {
    let mut c = connect();
    let binary = [0x00, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0x00, 0xff];
    let payloads: [&[u8]; 4] = [b"", b"Hello, world!", &binary, &[0xfe; 125]];
    for payload in payloads {
        c.send(&frame(PING, payload));
        c.expect_frame(PONG, payload);
    }
    close_normally(c);
}

#[test]
fn ping_written_one_byte_at_a_time_gets_a_pong() {
    let mut c = connect();
    let payload = [0xfe; 125];
    c.send_chopped(&frame(PING, &payload), 1, CHOP_PAUSE);
    c.expect_frame(PONG, &payload);
    close_normally(c);
}

#[test]
fn ping_longer_than_125_bytes_fails_with_1002() {
    // 0x89 0xFE 0x00 0x7E: a ping announcing 126 bytes with the 16-bit length.
    assert_fails(&raw_frame(FIN | PING, &[0xfe; 126]), PROTOCOL_ERROR);
}

#[test]
fn unsolicited_pongs_are_ignored() {
    let mut c = connect();
    c.send(&concat(&[frame(PONG, b""), frame(PONG, b"unsolicited pong payload"), frame(TEXT, b"after")]));
    // The first frame back is the echo: the pongs got no answer.
    c.expect_frame(TEXT, b"after");
    close_normally(c);
}

#[test]
fn unsolicited_pong_then_ping_gets_only_the_pong_for_the_ping() {
    let mut c = connect();
    c.send(&concat(&[frame(PONG, b"unsolicited pong payload"), frame(PING, b"ping payload")]));
    c.expect_frame(PONG, b"ping payload");
    close_normally(c);
}

#[test]
fn ten_pings_get_ten_pongs_in_order() {
    let payloads: Vec<Vec<u8>> = (0..10).map(|i| format!("payload-{i}").into_bytes()).collect();
    let frames = concat(&payloads.iter().map(|p| frame(PING, p)).collect::<Vec<_>>());
    // In one write (2.10), then chopped into small writes (2.11).
    for chop in [frames.len(), 3] {
        let mut c = connect();
        c.send_chopped(&frames, chop, CHOP_PAUSE);
        for p in &payloads {
            c.expect_frame(PONG, p);
        }
        close_normally(c);
    }
}

// ---------------------------------------------------------------------------------------------
// 3.x Reserved bits

#[test]
fn reserved_bits_on_any_frame_fail_with_1002() {
    let mut cases = Cases::default();
    for rsv in 1..=7u8 {
        for opcode in [TEXT, BINARY, CONT, PING, PONG, CLOSE] {
            let payload: &[u8] = if opcode == CLOSE { &[0x03, 0xe8] } else { b"reserved bits" };
            cases.run(format!("rsv {rsv} opcode {opcode:#x}"), || {
                assert_fails(&raw_frame(FIN | (rsv << 4) | opcode, payload), PROTOCOL_ERROR)
            });
        }
    }
    cases.finish();
}

#[test]
fn message_before_a_frame_with_reserved_bits_is_echoed_first() {
    // 3.2: echo, then the failure; the ping after the bad frame is not answered.
    let bytes =
        concat(&[frame(TEXT, b"Hello, world!"), raw_frame(FIN | 0x20 | TEXT, b"bad"), frame(PING, b"")]);
    assert_echoes_then_fails(&bytes, &[(TEXT, b"Hello, world!")], PROTOCOL_ERROR);
}

#[test]
fn reserved_bits_sent_frame_by_frame_and_chopped_fail_with_1002() {
    let frames = [frame(TEXT, b"Hello, world!"), raw_frame(FIN | 0x30 | TEXT, b"bad"), frame(PING, b"")];
    // 3.3: one write per frame, with pauses; 3.4: one byte per write.
    for chop in [None, Some(1)] {
        let mut c = connect();
        match chop {
            None => {
                for f in &frames {
                    c.send(f);
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Some(n) => c.send_chopped(&concat(&frames), n, CHOP_PAUSE),
        }
        c.expect_frame(TEXT, b"Hello, world!");
        c.expect_failure(PROTOCOL_ERROR);
    }
}

// ---------------------------------------------------------------------------------------------
// 4.x Reserved opcodes

#[test]
fn reserved_opcodes_fail_with_1002() {
    let mut cases = Cases::default();
    for opcode in (3..=7u8).chain(11..=15) {
        for payload in [&b""[..], b"reserved opcode payload"] {
            cases.run(format!("opcode {opcode} with {} payload bytes", payload.len()), || {
                assert_fails(&raw_frame(FIN | opcode, payload), PROTOCOL_ERROR)
            });
        }
    }
    cases.finish();
}

#[test]
fn message_before_a_reserved_opcode_is_echoed_first() {
    // 4.1.3 / 4.2.3: the ping after the bad frame is not answered.
    for opcode in [5, 13] {
        let bytes = concat(&[frame(TEXT, b"Hello, world!"), raw_frame(FIN | opcode, b""), frame(PING, b"")]);
        assert_echoes_then_fails(&bytes, &[(TEXT, b"Hello, world!")], PROTOCOL_ERROR);
    }
}

// ---------------------------------------------------------------------------------------------
// 5.x Fragmentation

#[test]
fn fragmented_control_frames_fail_with_1002() {
    // 5.1, 5.2: ping and pong in two fragments; and a close with FIN clear.
    for opcode in [PING, PONG] {
        assert_fails(
            &concat(&[fragment(opcode, false, b"fragment1"), fragment(CONT, true, b"fragment2")]),
            PROTOCOL_ERROR,
        );
    }
    assert_fails(&fragment(CLOSE, false, &[0x03, 0xe8]), PROTOCOL_ERROR);
}

#[test]
fn messages_in_two_fragments_are_echoed_whole() {
    for opcode in [TEXT, BINARY] {
        let bytes = concat(&[fragment(opcode, false, b"fragment1"), fragment(CONT, true, b"fragment2")]);
        // 5.3 one write, 5.4 frame by frame (each frame is 6 header + 9 payload bytes), 5.5 one
        // byte per write.
        for chop in [bytes.len(), 15, 1] {
            let mut c = connect();
            c.send_chopped(&bytes, chop, CHOP_PAUSE);
            c.expect_frame(opcode, b"fragment1fragment2");
            close_normally(c);
        }
    }
}

#[test]
fn messages_in_many_fragments_are_echoed_whole() {
    let mut c = connect();
    for opcode in [TEXT, BINARY] {
        for (len, size) in [(1000, 1), (5000, 7), (65536, 1300), (100_000, 65535)] {
            let payload = payload_for(opcode, len);
            c.send(&fragmented(opcode, &payload, size));
            c.expect_frame(opcode, &payload);
        }
    }
    close_normally(c);
}

#[test]
fn fragmented_message_written_one_byte_at_a_time_is_echoed() {
    let mut c = connect();
    let payload = text_payload(60);
    c.send_chopped(&fragmented(TEXT, &payload, 7), 1, CHOP_PAUSE);
    c.expect_frame(TEXT, &payload);
    close_normally(c);
}

#[test]
fn ping_between_fragments_is_answered_before_the_echo() {
    let bytes = concat(&[
        fragment(TEXT, false, b"fragment1"),
        frame(PING, b"ping payload"),
        fragment(CONT, true, b"fragment2"),
    ]);
    // 5.6 one write, 5.7 chopped, 5.8 frame by frame with pauses.
    for chop in [bytes.len(), 1, 15] {
        let mut c = connect();
        c.send_chopped(&bytes, chop, CHOP_PAUSE);
        c.expect_frame(PONG, b"ping payload");
        c.expect_frame(TEXT, b"fragment1fragment2");
        close_normally(c);
    }
}

#[test]
fn pings_between_many_fragments_are_answered_in_order_before_the_echo() {
    // 5.19, 5.20: five fragments with a ping after the first and the fourth, sent with pauses.
    let mut c = connect();
    let parts = [b"fragment1", b"fragment2", b"fragment3", b"fragment4", b"fragment5"];
    for (i, part) in parts.iter().enumerate() {
        let opcode = if i == 0 { TEXT } else { CONT };
        c.send(&fragment(opcode, i == parts.len() - 1, &part[..]));
        if i == 0 || i == 3 {
            c.send(&frame(PING, format!("pongme {}!", i + 1).as_bytes()));
            c.expect_frame(PONG, format!("pongme {}!", i + 1).as_bytes());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    c.expect_frame(TEXT, b"fragment1fragment2fragment3fragment4fragment5");
    close_normally(c);
}

#[test]
fn ping_inside_a_split_character_keeps_the_text_valid() {
    // The validator's state for an unfinished character must survive a control frame.
    let mut c = connect();
    let text = "κ😀".as_bytes();
    c.send(&concat(&[
        fragment(TEXT, false, &text[..1]),
        frame(PING, b"between"),
        fragment(CONT, false, &text[1..4]),
        frame(PING, b"again"),
        fragment(CONT, true, &text[4..]),
    ]));
    c.expect_frame(PONG, b"between");
    c.expect_frame(PONG, b"again");
    c.expect_frame(TEXT, text);
    close_normally(c);
}

#[test]
fn pong_between_fragments_is_ignored() {
    let mut c = connect();
    c.send(&concat(&[
        fragment(BINARY, false, b"fragment1"),
        frame(PONG, b"unsolicited"),
        fragment(CONT, true, b"fragment2"),
    ]));
    c.expect_frame(BINARY, b"fragment1fragment2");
    close_normally(c);
}

#[test]
fn continuation_without_a_message_fails_with_1002() {
    let mut cases = Cases::default();
    // 5.9-5.11 (FIN set) and 5.12-5.14 (FIN clear), each in one write and one byte per write.
    for fin in [true, false] {
        let bytes = fragment(CONT, fin, b"non-continuation payload");
        for chop in [bytes.len(), 1] {
            cases
                .run(format!("fin {fin} chop {chop}"), || assert_fails_chopped(&bytes, chop, PROTOCOL_ERROR));
        }
    }
    cases.finish();
}

#[test]
fn continuation_after_a_finished_message_fails_with_1002() {
    // 5.15: the first message is echoed, then the stray continuation fails the connection.
    let bytes = concat(&[
        fragment(TEXT, false, b"fragment1"),
        fragment(CONT, true, b"fragment2"),
        fragment(CONT, false, b"fragment3"),
        fragment(CONT, true, b"fragment4"),
    ]);
    assert_echoes_then_fails(&bytes, &[(TEXT, b"fragment1fragment2")], PROTOCOL_ERROR);
}

#[test]
fn new_data_frame_inside_a_fragmented_message_fails_with_1002() {
    let mut cases = Cases::default();
    // 5.16-5.18: text or binary, final or not, where a continuation is due.
    for (first, second, fin) in
        [(TEXT, TEXT, true), (TEXT, TEXT, false), (TEXT, BINARY, true), (BINARY, TEXT, true)]
    {
        cases.run(format!("{} inside {} (fin {fin})", kind(second), kind(first)), || {
            assert_fails(
                &concat(&[fragment(first, false, b"fragment1"), fragment(second, fin, b"fragment2")]),
                PROTOCOL_ERROR,
            )
        });
    }
    cases.finish();
}

#[test]
fn empty_fragments_are_echoed_as_one_message() {
    let mut c = connect();
    for opcode in [TEXT, BINARY] {
        // All empty; empty first and last around a payload; a payload, then an empty final.
        let shapes: [[&[u8]; 3]; 3] = [[b"", b"", b""], [b"", b"middle", b""], [b"first", b"", b""]];
        for shape in shapes {
            c.send(&concat(&[
                fragment(opcode, false, shape[0]),
                fragment(CONT, false, shape[1]),
                fragment(CONT, true, shape[2]),
            ]));
            c.expect_frame(opcode, &shape.concat());
        }
    }
    close_normally(c);
}

// ---------------------------------------------------------------------------------------------
// 6.x UTF-8

/// "κόσμε" as Autobahn sends it: its "ό" is U+1F79, three bytes.
const KOSME: &[u8] = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5";

/// Valid texts of Autobahn section 6 (and a mix of scripts and emoji).
const VALID_UTF8: &[(&str, &[u8])] = &[
    ("6.2 Latin-1 supplement", "Hello-µ@ßöäüàá-UTF-8!!".as_bytes()),
    ("6.5.1 kosme", KOSME),
    ("6.7.1 U+0000", b"\x00"),
    ("6.7.2 U+0080", b"\xc2\x80"),
    ("6.7.3 U+0800", b"\xe0\xa0\x80"),
    ("6.7.4 U+10000", b"\xf0\x90\x80\x80"),
    ("6.9.1 U+007F", b"\x7f"),
    ("6.9.2 U+07FF", b"\xdf\xbf"),
    ("6.9.3 U+FFFF", b"\xef\xbf\xbf"),
    ("6.9.4 U+10FFFF", b"\xf4\x8f\xbf\xbf"),
    ("6.11.1 U+D7FF", b"\xed\x9f\xbf"),
    ("6.11.2 U+E000", b"\xee\x80\x80"),
    ("6.11.3 U+FFFD", b"\xef\xbf\xbd"),
    ("6.22 noncharacter U+FFFE", b"\xef\xbf\xbe"),
    ("6.22 noncharacter U+FDD0", b"\xef\xb7\x90"),
    ("6.22 noncharacter U+1FFFE", b"\xf0\x9f\xbf\xbe"),
    ("6.22 noncharacter U+10FFFE", b"\xf4\x8f\xbf\xbe"),
    (
        "mixed scripts and emoji",
        "Hello κόσμε 你好世界 こんにちは 안녕하세요 Привет שלום مرحبا 😀🚀🎉👍🏽 𝄞 ∑∫√ €".as_bytes(),
    ),
];

/// Invalid UTF-8 of Autobahn section 6 that fits in a constant; generated ones are added by
/// [`invalid_utf8_cases`].
const INVALID_UTF8: &[(&str, &[u8])] = &[
    ("6.3.1 kosme with a surrogate inside", b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited"),
    ("6.8.1 five-byte sequence", b"\xf8\x88\x80\x80\x80"),
    ("6.8.2 six-byte sequence", b"\xfc\x84\x80\x80\x80\x80"),
    ("6.10.1 U+1FFFFF", b"\xf7\xbf\xbf\xbf"),
    ("6.10.2 last five-byte sequence", b"\xfb\xbf\xbf\xbf\xbf"),
    ("6.10.3 last six-byte sequence", b"\xfd\xbf\xbf\xbf\xbf\xbf"),
    ("6.11.5 U+110000", b"\xf4\x90\x80\x80"),
    ("6.12.1 lone 0x80", b"\x80"),
    ("6.12.2 lone 0xBF", b"\xbf"),
    ("6.12.3 two continuation bytes", b"\x80\xbf"),
    ("6.12.4 three continuation bytes", b"\x80\xbf\x80"),
    ("6.12.5 four continuation bytes", b"\x80\xbf\x80\xbf"),
    ("6.12.6 five continuation bytes", b"\x80\xbf\x80\xbf\x80"),
    ("6.12.7 six continuation bytes", b"\x80\xbf\x80\xbf\x80\xbf"),
    ("6.14.1 C0 at the end", b"\xc0"),
    ("6.14.2 E0 80 at the end", b"\xe0\x80"),
    ("6.14.3 F0 80 80 at the end", b"\xf0\x80\x80"),
    ("6.14.4 F8 80 80 80 at the end", b"\xf8\x80\x80\x80"),
    ("6.14.5 FC 80 80 80 80 at the end", b"\xfc\x80\x80\x80\x80"),
    ("6.14.6 DF at the end", b"\xdf"),
    ("6.14.7 EF BF at the end", b"\xef\xbf"),
    ("6.14.8 F7 BF BF at the end", b"\xf7\xbf\xbf"),
    ("6.14.9 FB BF BF BF at the end", b"\xfb\xbf\xbf\xbf"),
    ("6.14.10 FD BF BF BF BF at the end", b"\xfd\xbf\xbf\xbf\xbf"),
    ("truncated kosme", b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce"),
    ("truncated 4-byte sequence after text", b"Hello \xf0\x9f\x98"),
    (
        "6.15.1 incomplete sequences concatenated",
        b"\xc0\xe0\x80\xf0\x80\x80\xf8\x80\x80\x80\xfc\x80\x80\x80\x80\xdf\xef\xbf\xf7\xbf\xbf\xfb\xbf\xbf\xbf\xfd\xbf\xbf\xbf\xbf",
    ),
    ("6.16.1 FE", b"\xfe"),
    ("6.16.2 FF", b"\xff"),
    ("6.16.3 FE FE FF FF", b"\xfe\xfe\xff\xff"),
    ("6.17.1 overlong / in 2 bytes", b"\xc0\xaf"),
    ("6.17.2 overlong / in 3 bytes", b"\xe0\x80\xaf"),
    ("6.17.3 overlong / in 4 bytes", b"\xf0\x80\x80\xaf"),
    ("6.17.4 overlong / in 5 bytes", b"\xf8\x80\x80\x80\xaf"),
    ("6.17.5 overlong / in 6 bytes", b"\xfc\x80\x80\x80\x80\xaf"),
    ("6.18.1 largest overlong 2-byte", b"\xc1\xbf"),
    ("6.18.2 largest overlong 3-byte", b"\xe0\x9f\xbf"),
    ("6.18.3 largest overlong 4-byte", b"\xf0\x8f\xbf\xbf"),
    ("6.18.4 largest overlong 5-byte", b"\xf8\x87\xbf\xbf\xbf"),
    ("6.18.5 largest overlong 6-byte", b"\xfc\x83\xbf\xbf\xbf\xbf"),
    ("6.19.1 overlong NUL in 2 bytes", b"\xc0\x80"),
    ("6.19.2 overlong NUL in 3 bytes", b"\xe0\x80\x80"),
    ("6.19.3 overlong NUL in 4 bytes", b"\xf0\x80\x80\x80"),
    ("6.19.4 overlong NUL in 5 bytes", b"\xf8\x80\x80\x80\x80"),
    ("6.19.5 overlong NUL in 6 bytes", b"\xfc\x80\x80\x80\x80\x80"),
    ("6.20.1 surrogate U+D800", b"\xed\xa0\x80"),
    ("6.20.2 surrogate U+DB7F", b"\xed\xad\xbf"),
    ("6.20.3 surrogate U+DB80", b"\xed\xae\x80"),
    ("6.20.4 surrogate U+DBFF", b"\xed\xaf\xbf"),
    ("6.20.5 surrogate U+DC00", b"\xed\xb0\x80"),
    ("6.20.6 surrogate U+DF80", b"\xed\xbe\x80"),
    ("6.20.7 surrogate U+DFFF", b"\xed\xbf\xbf"),
    ("6.21.1 surrogate pair D800 DC00", b"\xed\xa0\x80\xed\xb0\x80"),
    ("6.21.2 surrogate pair D800 DFFF", b"\xed\xa0\x80\xed\xbf\xbf"),
    ("6.21.3 surrogate pair DB7F DC00", b"\xed\xad\xbf\xed\xb0\x80"),
    ("6.21.4 surrogate pair DB7F DFFF", b"\xed\xad\xbf\xed\xbf\xbf"),
    ("6.21.5 surrogate pair DB80 DC00", b"\xed\xae\x80\xed\xb0\x80"),
    ("6.21.6 surrogate pair DB80 DFFF", b"\xed\xae\x80\xed\xbf\xbf"),
    ("6.21.7 surrogate pair DBFF DC00", b"\xed\xaf\xbf\xed\xb0\x80"),
    ("6.21.8 surrogate pair DBFF DFFF", b"\xed\xaf\xbf\xed\xbf\xbf"),
];

/// Every invalid case: the constant ones plus those generated over byte ranges.
fn invalid_utf8_cases() -> Vec<(String, Vec<u8>)> {
    let mut cases: Vec<(String, Vec<u8>)> =
        INVALID_UTF8.iter().map(|(name, bytes)| (name.to_string(), bytes.to_vec())).collect();
    // 6.12.8: all 64 continuation bytes in a row.
    cases.push(("6.12.8 all continuation bytes".into(), (0x80..=0xbf).collect()));
    // 6.13: every lead byte, each followed by a space instead of its continuation bytes.
    for (section, leads) in [
        ("6.13.1", 0xc0..=0xdf),
        ("6.13.2", 0xe0..=0xef),
        ("6.13.3", 0xf0..=0xf7),
        ("6.13.4", 0xf8..=0xfb),
        ("6.13.5", 0xfc..=0xfd),
    ] {
        cases.push((format!("{section} lone lead bytes"), leads.flat_map(|b: u8| [b, b' ']).collect()));
    }
    cases
}

#[test]
fn valid_utf8_texts_are_echoed_whole_fragmented_and_chopped() {
    let mut cases = Cases::default();
    for (name, text) in VALID_UTF8 {
        cases.run(*name, || {
            let mut c = connect();
            // Whole frame; one byte per fragment; one byte per write.
            assert_echo(&mut c, TEXT, text);
            c.send(&fragmented(TEXT, text, 1));
            c.expect_frame(TEXT, text);
            c.send_chopped(&frame(TEXT, text), 1, Duration::ZERO);
            c.expect_frame(TEXT, text);
            close_normally(c);
        });
    }
    cases.finish();
}

#[test]
fn invalid_utf8_in_one_frame_fails_with_1007() {
    let mut cases = Cases::default();
    for (name, bytes) in invalid_utf8_cases() {
        cases.run(name, || assert_fails(&frame(TEXT, &bytes), INVALID_PAYLOAD));
    }
    cases.finish();
}

#[test]
fn invalid_utf8_in_one_byte_fragments_fails_with_1007() {
    // The streaming validator: every sequence arrives cut at every byte.
    let mut cases = Cases::default();
    for (name, bytes) in invalid_utf8_cases() {
        cases.run(name, || assert_fails(&fragmented(TEXT, &bytes, 1), INVALID_PAYLOAD));
    }
    cases.finish();
}

#[test]
fn invalid_utf8_in_one_frame_written_one_byte_at_a_time_fails_with_1007() {
    // One frame that reaches the server in many reads: validated piece by piece, not whole.
    let mut cases = Cases::default();
    for (name, bytes) in invalid_utf8_cases() {
        cases.run(name, || assert_fails_chopped(&frame(TEXT, &bytes), 1, INVALID_PAYLOAD));
    }
    cases.finish();
}

#[test]
fn every_prefix_of_kosme_is_echoed_or_fails_with_1007() {
    // 6.6: growing prefixes of "κόσμε"; those that end inside a character are invalid.
    let kosme = KOSME;
    let mut cases = Cases::default();
    for len in 1..=kosme.len() {
        let prefix = &kosme[..len];
        cases.run(format!("prefix of {len} bytes"), || {
            if std::str::from_utf8(prefix).is_ok() {
                let mut c = connect();
                assert_echo(&mut c, TEXT, prefix);
                close_normally(c);
            } else {
                assert_fails(&frame(TEXT, prefix), INVALID_PAYLOAD);
            }
        });
    }
    cases.finish();
}

#[test]
fn invalid_first_fragment_fails_before_the_rest_is_sent() {
    // Fail-fast: the close must come while the message is still open, so the server cannot
    // have waited for the end of the message.
    let mut c = connect();
    c.send(&fragment(TEXT, false, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80"));
    c.expect_failure(INVALID_PAYLOAD);
}

#[test]
fn invalid_middle_fragment_fails_before_the_rest_is_sent() {
    // 6.4.1: "κόσμε", then the invalid U+110000 alone; "edited" is never sent.
    let mut c = connect();
    c.send(&fragment(TEXT, false, KOSME));
    std::thread::sleep(Duration::from_millis(20));
    c.send(&fragment(CONT, false, b"\xf4\x90\x80\x80"));
    c.expect_failure(INVALID_PAYLOAD);
}

#[test]
fn invalid_byte_in_the_first_part_of_a_frame_fails_before_the_rest_is_sent() {
    // 6.4.3, 6.4.4: one frame, sent only up to and including the first byte that makes the text
    // invalid; the server must not wait for the rest of the frame.
    let cases: [(&str, &[u8], usize); 4] = [
        ("U+110000 after kosme", b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90\x80\x80edited", 12),
        ("surrogate", b"Hello \xed\xa0\x80 world", 7),
        ("C0 lead byte", b"Hello \xc0\xaf world", 6),
        ("FF byte", b"Hello \xff world", 6),
    ];
    let mut results = Cases::default();
    for (name, payload, bad_at) in cases {
        results.run(name, || {
            let bytes = frame(TEXT, payload);
            let header = bytes.len() - payload.len();
            let mut c = connect();
            c.send(&bytes[..header + bad_at + 1]);
            c.expect_failure(INVALID_PAYLOAD);
        });
    }
    results.finish();
}

#[test]
fn text_split_inside_a_character_across_fragments_is_echoed() {
    let text = &[KOSME, " 😀 €".as_bytes()].concat();
    let mut c = connect();
    for cut in 1..text.len() {
        c.send(&concat(&[fragment(TEXT, false, &text[..cut]), fragment(CONT, true, &text[cut..])]));
        c.expect_frame(TEXT, text);
    }
    close_normally(c);
}

#[test]
fn text_split_inside_a_character_across_writes_is_echoed() {
    let text = &[KOSME, " 😀 €".as_bytes()].concat();
    let mut c = connect();
    for cut in 1..text.len() {
        let bytes = frame(TEXT, text);
        let at = bytes.len() - text.len() + cut;
        c.send(&bytes[..at]);
        std::thread::sleep(CHOP_PAUSE);
        c.send(&bytes[at..]);
        c.expect_frame(TEXT, text);
    }
    close_normally(c);
}

// ---------------------------------------------------------------------------------------------
// 7.x Close handling

/// Send a close frame with `payload` and expect exactly `reply` back, then TCP closed.
fn assert_close_answered(payload: &[u8], reply: &[u8]) {
    let mut c = connect();
    c.send(&frame(CLOSE, payload));
    c.expect_close_reply(reply);
}

#[test]
fn close_without_payload_gets_a_close_without_payload() {
    // 7.3.1: no status code came, so none goes back.
    assert_close_answered(b"", b"");
}

#[test]
fn close_with_code_and_reason_is_echoed() {
    // 7.3.3, 7.3.4, 7.3.5: code only, a short reason, and the longest reason (123 bytes).
    let longest = [b'*'; 123];
    for reason in [&b""[..], b"Hello World!", &longest] {
        let payload = close_payload(NORMAL, reason);
        assert_close_answered(&payload, &payload);
    }
}

#[test]
fn close_with_one_byte_payload_fails_with_1002() {
    // 7.3.2
    assert_fails(&frame(CLOSE, &[0x03]), PROTOCOL_ERROR);
}

#[test]
fn close_with_reason_over_123_bytes_fails_with_1002() {
    // 7.3.6: a 126-byte close payload is a control frame over the 125-byte limit.
    assert_fails(&close_frame(NORMAL, &[b'*'; 124]), PROTOCOL_ERROR);
}

#[test]
fn valid_close_codes_are_echoed() {
    // 7.7.x, plus 1012-1014 (registered with IANA after RFC 6455).
    let codes: [u16; 16] =
        [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999];
    let mut cases = Cases::default();
    for code in codes {
        cases.run(format!("code {code}"), || {
            let payload = close_payload(code, b"reason");
            assert_close_answered(&payload, &payload);
        });
    }
    cases.finish();
}

#[test]
fn invalid_close_codes_fail_with_1002() {
    // 7.9.x, 7.13.x
    let codes = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535];
    let mut cases = Cases::default();
    for code in codes {
        cases.run(format!("code {code}"), || assert_fails(&close_frame(code, b""), PROTOCOL_ERROR));
    }
    cases.finish();
}

#[test]
fn close_reason_with_invalid_utf8_fails_with_1007() {
    // 7.5.1, in one write and one byte per write (the close payload then arrives in pieces).
    let bytes = close_frame(NORMAL, b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited");
    assert_fails(&bytes, INVALID_PAYLOAD);
    assert_fails_chopped(&bytes, 1, INVALID_PAYLOAD);
}

#[test]
fn close_written_one_byte_at_a_time_is_answered() {
    let mut c = connect();
    let payload = close_payload(NORMAL, b"chopped close");
    c.send_chopped(&frame(CLOSE, &payload), 1, CHOP_PAUSE);
    c.expect_close_reply(&payload);
}

#[test]
fn invalid_close_code_written_one_byte_at_a_time_fails_with_1002() {
    assert_fails_chopped(&close_frame(1005, b"chopped"), 1, PROTOCOL_ERROR);
}

#[test]
fn message_before_close_is_echoed_then_the_close() {
    // 7.1.1 (small message), 7.1.6 (256 KiB message followed by a close and a ping: no pong).
    let large = text_payload(256 << 10);
    for payload in [&b"Hello World!"[..], &large] {
        let mut c = connect();
        c.send(&concat(&[frame(TEXT, payload), close_frame(NORMAL, b""), frame(PING, b"after close")]));
        c.expect_frame(TEXT, payload);
        c.expect_close_reply(&close_payload(NORMAL, b""));
    }
}

#[test]
fn frames_after_the_close_are_ignored() {
    let after: [(&str, Vec<u8>); 4] = [
        // 7.1.2: a second close is not answered.
        ("second close", close_frame(NORMAL, b"")),
        // 7.1.3: a ping after the close gets no pong.
        ("ping", frame(PING, b"payload")),
        // 7.1.4: a text message after the close is not echoed.
        ("text", frame(TEXT, b"payload")),
        // Nor is garbage checked once the close arrived.
        ("reserved opcode", raw_frame(FIN | 0x3, b"x")),
    ];
    let mut cases = Cases::default();
    for (name, bytes) in after {
        // In the same write as the close, and in a later write once the close was answered.
        cases.run(format!("{name} in the same write"), || {
            let mut c = connect();
            c.send(&concat(&[close_frame(NORMAL, b""), bytes.clone()]));
            c.expect_close_reply(&close_payload(NORMAL, b""));
        });
        cases.run(format!("{name} after the close reply"), || {
            let mut c = connect();
            c.send(&close_frame(NORMAL, b""));
            c.expect_close(Some(NORMAL));
            c.send(&bytes);
            c.shutdown_write();
            c.expect_eof();
        });
    }
    cases.finish();
}

#[test]
fn close_inside_a_fragmented_message_discards_the_message() {
    // 7.1.5: the first fragment, a close, then the last fragment: nothing is echoed.
    let mut c = connect();
    c.send(&concat(&[
        fragment(TEXT, false, b"fragment1"),
        close_frame(NORMAL, b""),
        fragment(CONT, true, b"fragment2"),
    ]));
    c.expect_close_reply(&close_payload(NORMAL, b""));
}

#[test]
fn close_and_eof_in_one_breath_get_the_close_reply() {
    let mut c = connect();
    c.send(&close_frame(NORMAL, b"bye"));
    c.shutdown_write();
    let got = c.expect_close(Some(NORMAL));
    raw::assert_same_bytes(&got.payload, &close_payload(NORMAL, b"bye"));
    c.expect_eof();
}

#[test]
fn violation_and_eof_in_one_breath_get_the_close_frame() {
    // The close frame must not be lost when the peer's EOF follows the bad frame at once.
    let mut c = connect();
    c.send(&raw_frame(FIN | 0x3, b"reserved opcode"));
    c.shutdown_write();
    c.expect_close(Some(PROTOCOL_ERROR));
    c.expect_eof();
}

/// How long a server may keep a connection whose close it sent while the peer stays silent:
/// about 2 s by design, with room for a loaded machine.
const LINGER_BUDGET: Duration = Duration::from_secs(10);

#[test]
fn silent_peer_is_dropped_after_a_violation() {
    let mut c = connect();
    c.send(&raw_frame(FIN | 0x3, b"reserved opcode"));
    c.expect_close(Some(PROTOCOL_ERROR));
    c.expect_eof();
    // No close reply and no EOF from us: the server must not hold the socket forever.
    c.expect_dropped_within(LINGER_BUDGET);
}

#[test]
fn silent_peer_is_dropped_after_the_close_handshake() {
    let mut c = connect();
    c.send(&close_frame(NORMAL, b""));
    c.expect_close(Some(NORMAL));
    c.expect_eof();
    c.expect_dropped_within(LINGER_BUDGET);
}

#[test]
fn eof_without_close_closes_the_connection() {
    let mut c = connect();
    assert_echo(&mut c, TEXT, b"before eof");
    c.shutdown_write();
    c.expect_eof();
}

// ---------------------------------------------------------------------------------------------
// Masking and length encodings

/// A frame with the MASK bit clear: the payload goes out as is.
fn unmasked_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![b0, payload.len() as u8];
    bytes.extend_from_slice(payload);
    bytes
}

#[test]
fn unmasked_client_frames_fail_with_1002() {
    let mut cases = Cases::default();
    for (opcode, payload) in [(TEXT, &b"Hello"[..]), (BINARY, b"\x00\x01"), (PING, b""), (CLOSE, b"\x03\xe8")]
    {
        cases.run(format!("opcode {opcode:#x}"), || {
            assert_fails(&unmasked_frame(FIN | opcode, payload), PROTOCOL_ERROR)
        });
    }
    cases.finish();
}

/// A masked frame of `payload` whose length is written in the 16-bit (`wide_16`) or the 64-bit
/// extended field, whatever the payload's size.
fn frame_with_wide_length(b0: u8, payload: &[u8], wide_16: bool) -> Vec<u8> {
    let key = next_key();
    let mut bytes = vec![b0];
    if wide_16 {
        bytes.push(MASK_BIT | 126);
        bytes.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    } else {
        bytes.push(MASK_BIT | 127);
        bytes.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    }
    bytes.extend_from_slice(&key);
    let start = bytes.len();
    bytes.extend_from_slice(payload);
    raw::apply_mask(&mut bytes[start..], key);
    bytes
}

#[test]
fn non_minimal_length_encodings_fail_with_1002() {
    let mut cases = Cases::default();
    // A 16-bit length under 126; a 64-bit length under 65,536.
    for (wide_16, len) in [(true, 0), (true, 5), (true, 125), (false, 5), (false, 126), (false, 65535)] {
        cases.run(format!("{} bytes in a {}-bit length", len, if wide_16 { 16 } else { 64 }), || {
            assert_fails(&frame_with_wide_length(FIN | BINARY, &binary_payload(len), wide_16), PROTOCOL_ERROR)
        });
    }
    cases.finish();
}

#[test]
fn length_with_the_top_bit_set_fails_with_1002() {
    // RFC 6455 5.2: the most significant bit of a 64-bit length must be 0. Only the header is
    // sent: the server must fail on it without waiting for a payload.
    for len in [0x8000_0000_0000_0005u64, u64::MAX] {
        assert_fails(&header_64(FIN | BINARY, len), PROTOCOL_ERROR);
    }
}

// ---------------------------------------------------------------------------------------------
// 9.x Large messages and the size limit

/// Echo a message of each of [`LARGE_SIZES`] on one connection, cut into frames of at most
/// `fragment_size` bytes.
fn assert_large_echoes(opcode: u8, fragment_size: usize) {
    let mut c = connect();
    for len in LARGE_SIZES {
        let payload = payload_for(opcode, len);
        c.send(&fragmented(opcode, &payload, fragment_size));
        c.expect_frame(opcode, &payload);
    }
    close_normally(c);
}

#[test]
fn large_text_messages_in_one_frame_are_echoed() {
    assert_large_echoes(TEXT, usize::MAX);
}

#[test]
fn large_binary_messages_in_one_frame_are_echoed() {
    assert_large_echoes(BINARY, usize::MAX);
}

#[test]
fn large_text_messages_in_64k_fragments_are_echoed() {
    assert_large_echoes(TEXT, 64 << 10);
}

#[test]
fn large_binary_messages_in_64k_fragments_are_echoed() {
    assert_large_echoes(BINARY, 64 << 10);
}

#[test]
fn one_mib_message_written_in_small_chops_is_echoed() {
    // 9.5/9.6 in small: the frame reaches the server in many short reads.
    let mut c = connect();
    for opcode in [TEXT, BINARY] {
        let payload = payload_for(opcode, 1 << 20);
        c.send_chopped(&frame(opcode, &payload), 4093, Duration::ZERO);
        c.expect_frame(opcode, &payload);
    }
    close_normally(c);
}

#[test]
fn size_limit_is_enforced_from_frame_headers() {
    const LIMIT: usize = 1 << 20;
    let server = support::Gale::echo(&["--max-payload", "1048576"]);
    let addr: SocketAddr = server.addr;
    let mut cases = Cases::default();
    cases.run("a message of exactly the limit is echoed", || {
        let mut c = Client::connect(addr);
        for opcode in [TEXT, BINARY] {
            assert_echo(&mut c, opcode, &payload_for(opcode, LIMIT));
        }
        close_normally(c);
    });
    cases.run("a header announcing limit + 1 bytes fails with 1009 at once", || {
        let mut c = Client::connect(addr);
        c.send(&header_64(FIN | BINARY, LIMIT as u64 + 1));
        c.expect_failure(TOO_BIG);
    });
    cases.run("fragments adding up past the limit fail with 1009", || {
        let half = binary_payload(LIMIT / 2);
        let mut c = Client::connect(addr);
        c.send(&concat(&[fragment(BINARY, false, &half), fragment(CONT, false, &half)]));
        // The header of a last 1-byte fragment, without its payload.
        let mut header = vec![FIN | CONT, MASK_BIT | 1];
        header.extend_from_slice(&next_key());
        c.send(&header);
        c.expect_failure(TOO_BIG);
    });
    cases.finish();
}

// ---------------------------------------------------------------------------------------------
// 10.x Slow consumers

#[test]
fn one_mib_echo_arrives_intact_to_a_slow_reader() {
    let mut c = connect();
    let payload = binary_payload(1 << 20);
    c.send(&frame(BINARY, &payload));
    // 4 KiB per read with a pause: the server must hold the rest and send it as the window opens.
    c.read_slowly(4096, Duration::from_millis(1));
    c.expect_frame(BINARY, &payload);
    close_normally(c);
}
