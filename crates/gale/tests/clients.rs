//! Conformance of `gale echo` against an independent client, tokio-tungstenite.
//!
//! Covers: echo of text and binary messages at the payload-length encoding boundaries (0, 125,
//! 126, 65535, 65536 bytes) and at the 16 MiB default limit; fragmented messages (split inside
//! UTF-8 sequences, empty fragments, a ping between fragments); ping/pong; 100 pipelined
//! messages; every close path (client close with a code and reason, without a code, with an
//! application code, server close on SIGTERM, server close on protocol errors with 1007, 1002
//! and 1009); subprotocol selection; and handshake rejections as tungstenite reports them.
//!
//! Tests that only need the default server share one (see `shared`); tests that stop the server
//! or need other options start their own.

mod shared;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::error::{ProtocolError, SubProtocolError};
use tokio_tungstenite::tungstenite::handshake::client::{Request, Response};
use tokio_tungstenite::tungstenite::http::{self, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Bytes, Error, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async_with_config};

use support::Gale;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Bound on any single step: generous, so that a loaded machine does not fail the tests, but a
/// hang still does.
const STEP: Duration = Duration::from_secs(30);

/// Payload lengths around the 7-bit, 16-bit and 64-bit length encodings.
const BOUNDARY_SIZES: [usize; 5] = [0, 125, 126, 65535, 65536];

/// The server's default `--max-payload`: the largest message it accepts.
const LARGEST: usize = 16 << 20;

// ---------------------------------------------------------------------------------------------
// Client helpers

async fn within<T>(what: &str, step: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP, step).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

fn config() -> WebSocketConfig {
    // The server answers a 16 MiB message with one 16 MiB frame; tungstenite's default frame
    // limit is exactly 16 MiB, so leave room above it.
    WebSocketConfig::default().max_message_size(Some(64 << 20)).max_frame_size(Some(64 << 20))
}

fn request(addr: SocketAddr) -> Request {
    format!("ws://{addr}/echo").into_client_request().expect("a valid ws:// URL")
}

fn request_with(addr: SocketAddr, header: &'static str, value: &'static str) -> Request {
    let mut req = request(addr);
    req.headers_mut().insert(header, HeaderValue::from_static(value));
    req
}

async fn handshake(req: Request) -> Result<(Ws, Response), Error> {
    within("handshake", connect_async_with_config(req, Some(config()), true)).await
}

async fn connect(addr: SocketAddr) -> Ws {
    handshake(request(addr)).await.expect("handshake with gale echo").0
}

async fn send(ws: &mut Ws, msg: Message) {
    within("send", ws.send(msg)).await.expect("send");
}

/// The next message; fails if the stream ends or errs.
async fn next(ws: &mut Ws) -> Message {
    match within("read a message", ws.next()).await {
        Some(Ok(msg)) => msg,
        Some(Err(e)) => panic!("read failed: {e}"),
        None => panic!("the connection ended early"),
    }
}

/// A short description of a message, so a failure does not print 16 MiB.
fn summary(msg: &Message) -> String {
    match msg {
        Message::Text(t) => format!("Text({} bytes, starts {:?})", t.len(), &t.as_str()[..t.len().min(32)]),
        Message::Binary(b) => format!("Binary({} bytes, starts {:?})", b.len(), &b[..b.len().min(32)]),
        other => format!("{other:?}"),
    }
}

async fn expect_message(ws: &mut Ws, want: &Message) {
    let got = next(ws).await;
    assert!(&got == want, "got {}, expected {}", summary(&got), summary(want));
}

async fn expect_echo(ws: &mut Ws, msg: Message) {
    send(ws, msg.clone()).await;
    expect_message(ws, &msg).await;
}

/// The next message must be a close frame with `code`; returns its reason.
async fn expect_close_code(ws: &mut Ws, code: u16) -> String {
    match next(ws).await {
        Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), code, "close code (reason {:?})", frame.reason);
            frame.reason.to_string()
        }
        other => panic!("expected a close frame with {code}, got {}", summary(&other)),
    }
}

/// After the close handshake the server closes TCP: the stream must end cleanly, with no
/// further message and no reset.
async fn expect_end(ws: &mut Ws) {
    match within("the server to close TCP", ws.next()).await {
        None | Some(Err(Error::ConnectionClosed | Error::AlreadyClosed)) => {}
        Some(Ok(msg)) => panic!("expected the end of the stream, got {}", summary(&msg)),
        Some(Err(e)) => panic!("expected a clean end of the stream, got {e}"),
    }
}

fn text_of(len: usize) -> Message {
    Message::text((0..len).map(|i| char::from(b'a' + (i % 26) as u8)).collect::<String>())
}

fn binary_of(len: usize) -> Message {
    Message::binary((0..len).map(|i| (i * 31 + 7) as u8).collect::<Vec<u8>>())
}

/// A raw data frame (tungstenite masks it as a client must).
fn frame(kind: Data, payload: &[u8], fin: bool) -> Message {
    Message::Frame(Frame::message(Bytes::copy_from_slice(payload), OpCode::Data(kind), fin))
}

/// Send `parts` as one fragmented message of type `kind`.
async fn send_fragments(ws: &mut Ws, kind: Data, parts: &[&[u8]]) {
    for (i, part) in parts.iter().enumerate() {
        let kind = if i == 0 { kind } else { Data::Continue };
        let fin = i + 1 == parts.len();
        within("feed a fragment", ws.feed(frame(kind, part, fin))).await.expect("feed a fragment");
    }
    within("flush", ws.flush()).await.expect("flush");
}

fn close_frame(code: u16, reason: &'static str) -> CloseFrame {
    CloseFrame { code: CloseCode::from(code), reason: reason.into() }
}

/// Close from the client side; the server must echo the same close frame, then close TCP.
async fn client_close_is_echoed(sent: Option<CloseFrame>) {
    let mut ws = connect(shared::echo_addr()).await;
    send(&mut ws, Message::Close(sent.clone())).await;
    expect_message(&mut ws, &Message::Close(sent)).await;
    expect_end(&mut ws).await;
}

/// Send a frame that breaks the protocol; the server must close with `code`, then close TCP.
async fn violation_closes_with(addr: SocketAddr, bad: Message, code: u16) {
    let mut ws = connect(addr).await;
    expect_echo(&mut ws, Message::text("still fine")).await;
    send(&mut ws, bad).await;
    expect_close_code(&mut ws, code).await;
    expect_end(&mut ws).await;
}

/// The subprotocol the server chose, offering `offer` (a `Sec-WebSocket-Protocol` value).
async fn chosen_protocol(addr: SocketAddr, offer: Option<&'static str>) -> Option<String> {
    let req = match offer {
        Some(offer) => request_with(addr, "Sec-WebSocket-Protocol", offer),
        None => request(addr),
    };
    let (mut ws, response) = handshake(req).await.expect("handshake");
    expect_echo(&mut ws, Message::text("with a subprotocol")).await;
    let protocol = response.headers().get("Sec-WebSocket-Protocol").map(|v| v.to_str().unwrap().to_string());
    send(&mut ws, Message::Close(None)).await;
    protocol
}

/// The HTTP response the server refused `req` with.
async fn rejection(req: Request) -> http::Response<Option<Vec<u8>>> {
    match handshake(req).await {
        Err(Error::Http(response)) => *response,
        Err(e) => panic!("expected an HTTP rejection, got {e}"),
        Ok((_, response)) => panic!("the server accepted the upgrade: {response:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Echo

#[tokio::test]
async fn text_messages_at_length_boundaries_are_echoed() {
    let mut ws = connect(shared::echo_addr()).await;
    for len in BOUNDARY_SIZES {
        expect_echo(&mut ws, text_of(len)).await;
    }
}

#[tokio::test]
async fn binary_messages_at_length_boundaries_are_echoed() {
    let mut ws = connect(shared::echo_addr()).await;
    for len in BOUNDARY_SIZES {
        expect_echo(&mut ws, binary_of(len)).await;
    }
}

#[tokio::test]
async fn largest_text_message_is_echoed() {
    let mut ws = connect(shared::echo_addr()).await;
    expect_echo(&mut ws, text_of(LARGEST)).await;
}

#[tokio::test]
async fn largest_binary_message_is_echoed() {
    let mut ws = connect(shared::echo_addr()).await;
    expect_echo(&mut ws, binary_of(LARGEST)).await;
}

#[tokio::test]
async fn multibyte_text_is_echoed_unchanged() {
    let mut ws = connect(shared::echo_addr()).await;
    expect_echo(&mut ws, Message::text("héllo wörld ☃ 😀 ünïcödé ✓".repeat(1000))).await;
}

// ---------------------------------------------------------------------------------------------
// Fragmentation

#[tokio::test]
async fn fragmented_text_split_inside_characters_comes_back_whole() {
    let mut ws = connect(shared::echo_addr()).await;
    let text = "héllo wörld ☃ 😀 fragments";
    let bytes = text.as_bytes();
    // Byte 2 falls inside 'é' (bytes 1..3), 16 inside '☃' (14..17), 20 inside '😀' (18..22).
    let parts: [&[u8]; 4] = [&bytes[..2], &bytes[2..16], &bytes[16..20], &bytes[20..]];
    send_fragments(&mut ws, Data::Text, &parts).await;
    expect_message(&mut ws, &Message::text(text)).await;
}

#[tokio::test]
async fn fragmented_binary_comes_back_whole() {
    let mut ws = connect(shared::echo_addr()).await;
    let Message::Binary(payload) = binary_of(100_000) else { unreachable!() };
    let parts: Vec<&[u8]> = payload.chunks(10_000).collect();
    send_fragments(&mut ws, Data::Binary, &parts).await;
    expect_message(&mut ws, &Message::Binary(payload.clone())).await;
}

#[tokio::test]
async fn empty_fragments_are_part_of_the_message() {
    let mut ws = connect(shared::echo_addr()).await;
    send_fragments(&mut ws, Data::Text, &[b"", b"abc", b"", b"def", b""]).await;
    expect_message(&mut ws, &Message::text("abcdef")).await;
}

#[tokio::test]
async fn ping_between_fragments_is_answered_before_the_message() {
    let mut ws = connect(shared::echo_addr()).await;
    for msg in [frame(Data::Binary, b"first half, ", false), Message::Ping(Bytes::from_static(b"mid"))] {
        within("feed", ws.feed(msg)).await.expect("feed");
    }
    send(&mut ws, frame(Data::Continue, b"second half", true)).await;
    // The pong answers a frame that arrived before the message was complete.
    expect_message(&mut ws, &Message::Pong(Bytes::from_static(b"mid"))).await;
    expect_message(&mut ws, &Message::binary(b"first half, second half".to_vec())).await;
}

// ---------------------------------------------------------------------------------------------
// Ping, pipelining

#[tokio::test]
async fn ping_is_answered_with_pong_carrying_the_same_payload() {
    let mut ws = connect(shared::echo_addr()).await;
    for payload in [Vec::new(), b"hello".to_vec(), vec![0xa5; 125]] {
        send(&mut ws, Message::Ping(payload.clone().into())).await;
        expect_message(&mut ws, &Message::Pong(payload.into())).await;
    }
}

#[tokio::test]
async fn hundred_pipelined_messages_come_back_in_order() {
    let mut ws = connect(shared::echo_addr()).await;
    // Alternate kinds and sizes so that a reordering or a mix-up cannot go unnoticed.
    let messages: Vec<Message> = (0..100)
        .map(|i| if i % 2 == 0 { Message::text(format!("message {i}")) } else { binary_of(i * 50) })
        .collect();
    for msg in &messages {
        within("feed", ws.feed(msg.clone())).await.expect("feed");
    }
    within("flush", ws.flush()).await.expect("flush");
    for msg in &messages {
        expect_message(&mut ws, msg).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Close paths

#[tokio::test]
async fn client_close_with_code_and_reason_is_echoed() {
    client_close_is_echoed(Some(close_frame(1000, "done here"))).await;
}

#[tokio::test]
async fn client_close_without_code_is_answered_without_code() {
    client_close_is_echoed(None).await;
}

#[tokio::test]
async fn client_close_with_application_code_is_echoed() {
    client_close_is_echoed(Some(close_frame(4000, "bye"))).await;
}

#[tokio::test]
async fn sigterm_closes_with_going_away_and_exits_cleanly() {
    let gale = Gale::echo(&[]);
    let mut ws = connect(gale.addr).await;
    expect_echo(&mut ws, Message::text("before shutdown")).await;
    // `terminate` blocks while it waits for the process; the client must keep reading
    // meanwhile to answer the server's close.
    let stopping = tokio::task::spawn_blocking(move || {
        let mut gale = gale;
        let exit = gale.terminate(Duration::from_secs(10));
        (gale, exit)
    });
    expect_close_code(&mut ws, 1001).await;
    expect_end(&mut ws).await;
    let (_gale, exit) = within("gale to exit", stopping).await.expect("join");
    let (status, _took) = exit.expect("gale did not exit within 10 s of SIGTERM");
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

#[tokio::test]
async fn invalid_utf8_text_closes_with_1007() {
    // "κ" then bytes that can never appear in UTF-8.
    violation_closes_with(shared::echo_addr(), frame(Data::Text, &[0xce, 0xba, 0xff, 0xfe], true), 1007)
        .await;
}

#[tokio::test]
async fn continuation_without_a_message_closes_with_1002() {
    violation_closes_with(shared::echo_addr(), frame(Data::Continue, b"orphan", true), 1002).await;
}

#[tokio::test]
async fn message_over_max_payload_closes_with_1009() {
    let gale = Gale::echo(&["--max-payload", "1000"]);
    let mut ws = connect(gale.addr).await;
    expect_echo(&mut ws, binary_of(1000)).await;
    send(&mut ws, binary_of(1001)).await;
    expect_close_code(&mut ws, 1009).await;
    expect_end(&mut ws).await;
}

// ---------------------------------------------------------------------------------------------
// Subprotocols

#[tokio::test]
async fn first_offered_protocol_is_chosen_by_default() {
    assert_eq!(chosen_protocol(shared::echo_addr(), Some("chat, superchat")).await.as_deref(), Some("chat"));
}

#[tokio::test]
async fn protocol_flag_picks_the_servers_choice_among_the_offered() {
    let gale = Gale::echo(&["--protocol", "superchat"]);
    assert_eq!(chosen_protocol(gale.addr, Some("chat, superchat")).await.as_deref(), Some("superchat"));
}

#[tokio::test]
async fn no_offer_means_no_protocol_header() {
    assert_eq!(chosen_protocol(shared::echo_addr(), None).await, None);
}

#[tokio::test]
async fn no_protocol_header_when_nothing_offered_is_supported() {
    let gale = Gale::echo(&["--protocol", "superchat"]);
    // The server accepts without a subprotocol; tungstenite, having offered one, refuses that.
    match handshake(request_with(gale.addr, "Sec-WebSocket-Protocol", "chat")).await {
        Err(Error::Protocol(ProtocolError::SecWebSocketSubProtocolError(
            SubProtocolError::NoSubProtocol,
        ))) => {}
        Err(e) => panic!("expected a 101 without Sec-WebSocket-Protocol, got {e}"),
        Ok((_, response)) => {
            panic!("unexpected protocol: {:?}", response.headers().get("Sec-WebSocket-Protocol"))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake rejections
//
// tungstenite refuses to send a request without `Sec-WebSocket-Key`; an empty key stands in for
// a missing one here, and http.rs sends a request with none over a raw socket.

#[tokio::test]
async fn wrong_version_is_refused_with_426_naming_version_13() {
    let response = rejection(request_with(shared::echo_addr(), "Sec-WebSocket-Version", "8")).await;
    assert_eq!(response.status().as_u16(), 426);
    assert_eq!(response.headers().get("Sec-WebSocket-Version").map(|v| v.as_bytes()), Some(&b"13"[..]));
}

#[tokio::test]
async fn empty_key_is_refused_with_400() {
    let response = rejection(request_with(shared::echo_addr(), "Sec-WebSocket-Key", "")).await;
    assert_eq!(response.status().as_u16(), 400);
}

#[tokio::test]
async fn short_key_is_refused_with_400() {
    // Base64 of 10 bytes instead of 16.
    let response =
        rejection(request_with(shared::echo_addr(), "Sec-WebSocket-Key", "c2hvcnQga2V5IQ==")).await;
    assert_eq!(response.status().as_u16(), 400);
}
