//! Replays the saved inputs of the `conn` fuzz target (`fuzz/regressions/conn/`) and
//! hand-made inputs through the same checks the target runs: on stable Rust, without a
//! fuzzer, in every `cargo test`.

#[path = "../fuzz/checks/mod.rs"]
mod checks;

use checks::conn::{Verdict, check};
use std::path::Path;

#[test]
fn saved_conn_inputs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/conn");
    let mut files: Vec<_> =
        std::fs::read_dir(&dir).into_iter().flatten().map(|e| e.unwrap().path()).collect();
    files.sort();
    for path in files {
        eprintln!("replaying {}", path.display());
        check(&std::fs::read(&path).unwrap());
    }
}

/// Flags byte: route bits 1-2, records bit 3, `/healthz` first bit 4, offer bits 5-6.
const ECHO: u8 = 0;
const SHARED: u8 = 1 << 1;
const DEDICATED: u8 = 2 << 1;
const RAW: u8 = 3 << 1;
const RECORDS: u8 = 1 << 3;
const HEALTHZ_FIRST: u8 = 1 << 4;
const OFFER_DEFLATE: u8 = 1 << 5;
const COMPLETION: u8 = 1;

/// An input: flags, a schedule that sends `chunk` bytes at a time (1..=64) and lets the
/// socket drain, then the body.
fn input(flags: u8, chunk: u8, body: &[u8]) -> Vec<u8> {
    let mut data = vec![flags, 1, (chunk - 1) << 2, 2];
    data.extend_from_slice(body);
    data
}

/// A text record of `text` (FIN, opcode 1), compressed when `rsv1`.
fn text(text: &str, rsv1: bool) -> Vec<u8> {
    let mut r = vec![if rsv1 { 0xc1 } else { 0x81 }, text.len() as u8];
    r.extend_from_slice(text.as_bytes());
    r
}

fn close(code: u16) -> Vec<u8> {
    let mut r = vec![0x88, 2];
    r.extend_from_slice(&code.to_be_bytes());
    r
}

fn verdict(statuses: &[u16], messages: usize, close: Option<Option<u16>>) -> Verdict {
    Verdict { statuses: statuses.to_vec(), messages, close }
}

#[test]
fn echo_then_close_on_both_write_paths() {
    let body = [text("hello", false), text("κόσμε", false), close(1000)].concat();
    for mode in [0, COMPLETION] {
        for chunk in [1, 7, 64] {
            let got = check(&input(ECHO | RECORDS | HEALTHZ_FIRST | mode, chunk, &body));
            assert_eq!(got, verdict(&[200, 101], 2, Some(Some(1000))), "mode {mode}, chunk {chunk}");
        }
    }
}

#[test]
fn compressed_echo_on_both_deflate_routes() {
    let body = [text("hello hello hello", true), text("plain", false), close(4000)].concat();
    for route in [SHARED, DEDICATED] {
        let got = check(&input(route | RECORDS | OFFER_DEFLATE, 5, &body));
        assert_eq!(got, verdict(&[101], 2, Some(Some(4000))), "route {route}");
    }
    // Not negotiated: RSV1 is a protocol error.
    let got = check(&input(SHARED | RECORDS, 5, &body));
    assert_eq!(got, verdict(&[101], 0, Some(Some(1002))));
}

#[test]
fn protocol_errors_close_with_the_rfc_code() {
    // Unmasked frame (record flag 0x40), invalid UTF-8, reserved opcode, too big.
    let unmasked = [0x81, 0x40 | 2, b'h', b'i'];
    assert_eq!(check(&input(ECHO | RECORDS, 3, &unmasked)).close, Some(Some(1002)));
    let bad_utf8 = [0x81, 2, 0xc0, 0xaf];
    assert_eq!(check(&input(ECHO | RECORDS, 3, &bad_utf8)).close, Some(Some(1007)));
    let reserved = [0x83, 0];
    assert_eq!(check(&input(ECHO | RECORDS, 3, &reserved)).close, Some(Some(1002)));
    let mut big = vec![0x82, 62, 0x30, 0x00];
    big.extend_from_slice(&[7; 12288]);
    assert_eq!(check(&input(ECHO | RECORDS, 64, &big)).close, Some(Some(1009)));
}

#[test]
fn raw_http_requests() {
    let got = check(&input(
        RAW,
        64,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nHEAD /healthz HTTP/1.1\r\nHost: a\r\n\r\n",
    ));
    assert_eq!(got.statuses, [200, 200]);
    assert_eq!(check(&input(RAW, 64, b"GET /nowhere HTTP/1.1\r\n\r\n")).statuses, [400]);
    assert_eq!(check(&input(RAW, 2, b"\x00\xff garbage\r\n\r\n")).statuses, [400]);
    let post = b"POST /body HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello";
    assert_eq!(check(&input(RAW, 4, post)).statuses, [200]);
}
