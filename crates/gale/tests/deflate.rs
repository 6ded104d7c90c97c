//! permessage-deflate (RFC 7692) against `gale echo`, over raw sockets with compression done by
//! the test: negotiation answers in each server mode, compressed echoes with and without
//! context takeover, fragmented compressed messages, small messages left uncompressed, and
//! the failures — a decompression bomb (1009), corrupt data and invalid UTF-8 (1007), RSV1
//! where it may not be (1002).

mod raw;
mod shared;
mod support;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use gale_frame::deflate::{Deflater, Inflater};
use raw::{BINARY, CONT, Client, FIN, TEXT, raw_frame};

/// RSV1: the message is compressed.
const RSV1: u8 = 0x40;

/// One server per compression mode, shared by the tests of the file.
fn server(mode: &'static str) -> SocketAddr {
    static SHARED: OnceLock<SocketAddr> = OnceLock::new();
    static DEDICATED: OnceLock<SocketAddr> = OnceLock::new();
    static OFF: OnceLock<SocketAddr> = OnceLock::new();
    static SHARED_DEFAULT: OnceLock<SocketAddr> = OnceLock::new();
    let (cell, args): (_, &'static [&'static str]) = match mode {
        "shared" => {
            (&SHARED, &["--compression", "shared", "--compress-min-size", "64", "--max-payload", "1048576"])
        }
        "shared-default" => (&SHARED_DEFAULT, &["--compression", "shared", "--max-payload", "1048576"]),
        "dedicated" => (&DEDICATED, &["--compression", "dedicated", "--max-payload", "1048576"]),
        _ => (&OFF, &["--compression", "off", "--max-payload", "1048576"]),
    };
    *cell.get_or_init(|| shared::start_shared(args))
}

/// Connect offering `extensions`; returns the client and the server's answer, if any.
fn connect(addr: SocketAddr, extensions: &str) -> (Client, Option<String>) {
    let request = format!(
        "GET /deflate HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: {extensions}\r\n\r\n",
        raw::KEY
    );
    let client = Client::handshake(addr, &[request.as_bytes()], Duration::ZERO);
    let answer = client
        .response
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("sec-websocket-extensions"))
        .map(|(_, v)| v.trim().to_string());
    (client, answer)
}

fn compress(d: &mut Deflater, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    d.compress(payload, &mut out);
    out
}

/// Read one echo: returns (was it compressed, the payload after inflating).
fn read_echo(client: &mut Client, inflater: &mut Inflater) -> (bool, Vec<u8>) {
    let f = client.read_frame();
    assert!(f.fin, "unfragmented echo: {}", f.describe());
    if f.rsv & RSV1 != 0 {
        let mut out = Vec::new();
        inflater.inflate(&f.payload, &mut out, 1 << 24).expect("the echo inflates");
        (true, out)
    } else {
        (false, f.payload)
    }
}

fn chat(i: usize) -> String {
    format!(
        r#"{{"type":"danmaku","room":"live-1001","user":{{"id":{i},"name":"吃瓜群众"}},"text":"主播好厉害！哈哈哈哈哈 666"}}"#
    )
}

#[test]
fn shared_mode_asks_for_no_context_takeover_both_ways() {
    let (_, answer) = connect(server("shared"), "permessage-deflate; client_max_window_bits");
    assert_eq!(
        answer.as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
}

#[test]
fn dedicated_mode_keeps_context_and_honours_window_limits() {
    let (_, answer) = connect(server("dedicated"), "permessage-deflate; client_max_window_bits");
    assert_eq!(answer.as_deref(), Some("permessage-deflate"));
    let (_, answer) = connect(server("dedicated"), "permessage-deflate; server_max_window_bits=10");
    assert_eq!(answer.as_deref(), Some("permessage-deflate; server_max_window_bits=10"));
}

#[test]
fn declined_offers_leave_the_connection_uncompressed() {
    let (mut c, answer) = connect(server("shared"), "permessage-deflate; server_max_window_bits=8");
    assert_eq!(answer, None, "a 256-byte window cannot be honoured");
    // Without the extension, RSV1 is a protocol error.
    c.send(&raw_frame(FIN | RSV1 | TEXT, &compress(&mut Deflater::new(15, 6, false), b"hi")));
    c.expect_failure(1002);
    let (_, answer) = connect(server("shared"), "permessage-deflate; bogus=1, permessage-deflate");
    assert!(answer.is_some(), "the second, valid offer is taken");
    let (_, answer) = connect(server("off"), "permessage-deflate");
    assert_eq!(answer, None, "--compression off never negotiates");
}

#[test]
fn shared_mode_echoes_compressed_messages() {
    let (mut c, _) = connect(server("shared"), "permessage-deflate");
    let mut d = Deflater::new(15, 6, false);
    let mut inf = Inflater::new(false);
    for i in 0..5 {
        let msg = chat(i);
        c.send(&raw_frame(FIN | RSV1 | TEXT, &compress(&mut d, msg.as_bytes())));
        let (compressed, back) = read_echo(&mut c, &mut inf);
        assert!(compressed, "messages over the minimum size are compressed");
        assert_eq!(back, msg.as_bytes());
    }
    // A short message goes back uncompressed.
    c.send(&raw_frame(FIN | RSV1 | TEXT, &compress(&mut d, b"ok")));
    assert_eq!(read_echo(&mut c, &mut inf), (false, b"ok".to_vec()));
    // Uncompressed messages are allowed too.
    let big = vec![7u8; 100_000];
    c.send(&raw_frame(FIN | BINARY, &big));
    assert_eq!(read_echo(&mut c, &mut inf), (true, big));
}

#[test]
fn shared_mode_leaves_messages_under_1_kib_uncompressed_by_default() {
    let (mut c, _) = connect(server("shared-default"), "permessage-deflate");
    let mut d = Deflater::new(15, 6, false);
    let mut inf = Inflater::new(false);
    let msg = chat(1);
    c.send(&raw_frame(FIN | RSV1 | TEXT, &compress(&mut d, msg.as_bytes())));
    assert_eq!(read_echo(&mut c, &mut inf), (false, msg.clone().into_bytes()));
    let long = msg.repeat(10);
    c.send(&raw_frame(FIN | RSV1 | TEXT, &compress(&mut d, long.as_bytes())));
    assert_eq!(read_echo(&mut c, &mut inf), (true, long.into_bytes()));
}

#[test]
fn dedicated_mode_uses_context_takeover() {
    let (mut c, _) = connect(server("dedicated"), "permessage-deflate");
    let mut d = Deflater::new(15, 6, true);
    let mut inf = Inflater::new(true);
    let mut sizes = Vec::new();
    for _ in 0..3 {
        let msg = chat(42);
        c.send(&raw_frame(FIN | RSV1 | TEXT, &compress(&mut d, msg.as_bytes())));
        let f = c.read_frame();
        assert_ne!(f.rsv & RSV1, 0);
        sizes.push(f.payload.len());
        let mut out = Vec::new();
        inf.inflate(&f.payload, &mut out, 1 << 20).unwrap();
        assert_eq!(out, msg.as_bytes());
    }
    assert!(sizes[2] * 2 < sizes[0], "a repeated message compresses against the previous one: {sizes:?}");
}

#[test]
fn fragmented_compressed_message() {
    let (mut c, _) = connect(server("shared"), "permessage-deflate");
    let msg = chat(7).repeat(50);
    let packed = compress(&mut Deflater::new(15, 6, false), msg.as_bytes());
    let (a, b) = packed.split_at(packed.len() / 2);
    // RSV1 on the first fragment only.
    c.send(&[raw_frame(RSV1 | TEXT, a), raw_frame(FIN | CONT, b)].concat());
    assert_eq!(read_echo(&mut c, &mut Inflater::new(false)), (true, msg.into_bytes()));
}

#[test]
fn decompression_bomb_is_stopped_with_1009() {
    let (mut c, _) = connect(server("shared"), "permessage-deflate");
    // 16 MiB of zeros deflate to about 16 KiB; the server allows 1 MiB once inflated.
    let bomb = compress(&mut Deflater::new(15, 9, false), &vec![0u8; 16 << 20]);
    assert!(bomb.len() < 64 * 1024);
    c.send(&raw_frame(FIN | RSV1 | BINARY, &bomb));
    c.expect_failure(1009);
}

#[test]
fn corrupt_data_and_invalid_utf8_are_1007() {
    let (mut c, _) = connect(server("shared"), "permessage-deflate");
    c.send(&raw_frame(FIN | RSV1 | BINARY, &[0xff, 0xfe, 0xfd, 0xfc, 0x00]));
    c.expect_failure(1007);
    let (mut c, _) = connect(server("shared"), "permessage-deflate");
    let bad = compress(&mut Deflater::new(15, 6, false), &[b'a', 0xff, b'b']);
    c.send(&raw_frame(FIN | RSV1 | TEXT, &bad));
    c.expect_failure(1007);
}

#[test]
fn rsv1_on_continuation_or_control_frames_is_1002() {
    let (mut c, _) = connect(server("shared"), "permessage-deflate");
    c.send(&[raw_frame(TEXT, b"a"), raw_frame(FIN | RSV1 | CONT, b"b")].concat());
    c.expect_failure(1002);
    let (mut c, _) = connect(server("shared"), "permessage-deflate");
    c.send(&raw_frame(FIN | RSV1 | raw::PING, b""));
    c.expect_failure(1002);
}
