//! The opening handshake, server and client sides.

use gale_frame::handshake::{
    AcceptKey, AcceptOptions, ClientHandshake, ClientHandshakeError, ExtensionOffer, extension_offers,
    parse_request, select_protocol, validate_upgrade, write_accept_response, write_error_response,
};

const GOOD: &str = "GET /chat?room=1 HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n\
Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\n\
Sec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n";

fn with_header(replace: &str, by: &str) -> String {
    assert!(GOOD.contains(replace), "{replace}");
    GOOD.replacen(replace, by, 1)
}

fn status_of(request: &str) -> u16 {
    match parse_request(request.as_bytes()) {
        Err(e) => e.status,
        Ok(None) => panic!("incomplete"),
        Ok(Some((req, _))) => validate_upgrade(&req).map(|_| 101).unwrap_or_else(|e| e.status),
    }
}

#[test]
fn rfc_sample_accept_key() {
    assert_eq!(AcceptKey::for_key(b"dGhlIHNhbXBsZSBub25jZQ==").as_str(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

#[test]
fn valid_request_parses_and_validates() {
    let (req, n) = parse_request(GOOD.as_bytes()).unwrap().unwrap();
    assert_eq!(n, GOOD.len());
    assert_eq!(req.method, "GET");
    assert_eq!(req.path(), "/chat");
    assert_eq!(req.query(), Some("room=1"));
    let up = validate_upgrade(&req).unwrap();
    assert_eq!(up.key, "dGhlIHNhbXBsZSBub25jZQ==");
    assert_eq!(up.origin, Some("http://example.com"));
    assert_eq!(up.host, "server.example.com");
    assert_eq!(up.accept_key().as_str(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

#[test]
fn incomplete_request_needs_more_at_every_cut() {
    for cut in 0..GOOD.len() {
        assert!(parse_request(&GOOD.as_bytes()[..cut]).unwrap().is_none(), "cut {cut}");
    }
}

#[test]
fn bytes_after_the_head_are_not_consumed() {
    let mut bytes = GOOD.as_bytes().to_vec();
    bytes.extend([0x81, 0x80, 1, 2, 3, 4]);
    let (_, n) = parse_request(&bytes).unwrap().unwrap();
    assert_eq!(n, GOOD.len());
}

#[test]
fn header_matching_is_case_insensitive_and_accepts_lists() {
    let r = with_header("Upgrade: websocket", "upgrade: WebSocket");
    let r = r.replacen("Connection: Upgrade", "CONNECTION: keep-alive, Upgrade", 1);
    assert_eq!(status_of(&r), 101);
}

#[test]
fn rejections_have_the_right_status() {
    assert_eq!(status_of(&GOOD.replacen("GET", "POST", 1)), 400);
    assert_eq!(status_of(&GOOD.replacen("HTTP/1.1", "HTTP/1.0", 1)), 400);
    assert_eq!(status_of(&with_header("Upgrade: websocket\r\n", "")), 426);
    assert_eq!(status_of(&with_header("Upgrade: websocket", "Upgrade: h2c")), 426);
    assert_eq!(status_of(&with_header("Connection: Upgrade", "Connection: keep-alive")), 400);
    assert_eq!(status_of(&with_header("Host: server.example.com\r\n", "")), 400);
    assert_eq!(status_of(&with_header("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8")), 426);
    assert_eq!(status_of(&with_header("Sec-WebSocket-Version: 13\r\n", "")), 426);
    assert_eq!(status_of(&with_header("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", "")), 400);
    assert_eq!(
        status_of(&with_header("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ")),
        400,
        "key too short"
    );
    assert_eq!(status_of(&with_header("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZ!==")), 400);
    assert_eq!(
        status_of(&with_header("Origin", "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\nOrigin")),
        400,
        "two keys"
    );
    assert_eq!(status_of("GET / HTTP/1.1\r\nHo st: x\r\n\r\n"), 400);
    assert_eq!(status_of("\x01\x02garbage\r\n\r\n"), 400);
}

#[test]
fn version_error_carries_the_supported_version() {
    let r = with_header("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let (req, _) = parse_request(r.as_bytes()).unwrap().unwrap();
    let e = validate_upgrade(&req).unwrap_err();
    let mut out = Vec::new();
    e.write_response(&mut out);
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"), "{text}");
    assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"));
}

#[test]
fn oversized_heads_are_431() {
    let big = with_header("Origin:", &format!("X-Filler: {}\r\nOrigin:", "a".repeat(9000)));
    assert_eq!(parse_request(big.as_bytes()).unwrap_err().status, 431);
    // Still incomplete but already over the limit.
    let partial = format!("GET / HTTP/1.1\r\nX-Filler: {}", "a".repeat(9000));
    assert_eq!(parse_request(partial.as_bytes()).unwrap_err().status, 431);
    let many: String = (0..70).map(|i| format!("X-H{i}: v\r\n")).collect();
    let r = with_header("Origin:", &format!("{many}Origin:"));
    assert_eq!(parse_request(r.as_bytes()).unwrap_err().status, 431);
}

#[test]
fn subprotocol_is_the_first_offered_that_we_support() {
    let (req, _) = parse_request(GOOD.as_bytes()).unwrap().unwrap();
    assert_eq!(select_protocol(&req, &["superchat", "chat"]), Some("chat"));
    assert_eq!(select_protocol(&req, &["superchat"]), Some("superchat"));
    assert_eq!(select_protocol(&req, &["mqtt"]), None);
    let two_lines = with_header("chat, superchat", "chat\r\nSec-WebSocket-Protocol: v2.json");
    let (req, _) = parse_request(two_lines.as_bytes()).unwrap().unwrap();
    assert_eq!(select_protocol(&req, &["v2.json"]), Some("v2.json"));
}

#[test]
fn extension_offers_are_parsed() {
    let r = with_header(
        "Origin:",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits; server_max_window_bits=\"10\", \
         permessage-deflate\r\nSec-WebSocket-Extensions: x-webkit-deflate-frame\r\nOrigin:",
    );
    let (req, _) = parse_request(r.as_bytes()).unwrap().unwrap();
    let offers = extension_offers(&req).unwrap();
    assert_eq!(
        offers,
        vec![
            ExtensionOffer {
                name: "permessage-deflate",
                params: vec![("client_max_window_bits", None), ("server_max_window_bits", Some("10"))]
            },
            ExtensionOffer { name: "permessage-deflate", params: vec![] },
            ExtensionOffer { name: "x-webkit-deflate-frame", params: vec![] },
        ]
    );
    for bad in ["permessage-deflate; a=\"1", "permessage deflate", "; x", "p; =1", "p; a=b c"] {
        let r = with_header("Origin:", &format!("Sec-WebSocket-Extensions: {bad}\r\nOrigin:"));
        let (req, _) = parse_request(r.as_bytes()).unwrap().unwrap();
        assert_eq!(extension_offers(&req).unwrap_err().status, 400, "{bad}");
    }
}

#[test]
fn accept_response_format() {
    let mut out = Vec::new();
    let key = AcceptKey::for_key(b"dGhlIHNhbXBsZSBub25jZQ==");
    write_accept_response(&mut out, &key, &AcceptOptions { protocol: Some("chat"), ..Default::default() });
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n\r\n"
    );
}

#[test]
fn error_response_has_a_one_line_reason() {
    let mut out = Vec::new();
    write_error_response(&mut out, 404, "no route for /x\nsecond line", &[("X-Injected", "a\r\nEvil: 1")]);
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
    assert!(text.contains("Content-Length: 16\r\n"));
    assert!(text.contains("X-Injected: aEvil: 1\r\n"), "line breaks stripped from values");
    assert!(text.ends_with("\r\n\r\nno route for /x\n"));
}

#[test]
fn client_and_server_agree() {
    let client = ClientHandshake::new();
    let mut req_bytes = Vec::new();
    client.write_request(&mut req_bytes, "127.0.0.1:9001", "/echo", &["chat", "superchat"], &[("X-Id", "7")]);
    let (req, _) = parse_request(&req_bytes).unwrap().unwrap();
    let up = validate_upgrade(&req).unwrap();
    assert_eq!(req.header("x-id"), Some("7"));
    let proto = select_protocol(&req, &["superchat"]);
    let mut resp = Vec::new();
    write_accept_response(
        &mut resp,
        &up.accept_key(),
        &AcceptOptions { protocol: proto, ..Default::default() },
    );
    resp.extend([0x81, 0x00]);
    let (outcome, n) = client.parse_response(&resp, &["chat", "superchat"]).unwrap().unwrap();
    assert_eq!(outcome.protocol.as_deref(), Some("superchat"));
    assert_eq!(n, resp.len() - 2);
    for cut in 0..n {
        assert!(client.parse_response(&resp[..cut], &["chat", "superchat"]).unwrap().is_none());
    }
    // Two handshakes use different keys.
    assert_ne!(ClientHandshake::new().key(), client.key());
}

#[test]
fn client_rejects_bad_responses() {
    let client = ClientHandshake::with_nonce([7; 16]);
    let other = AcceptKey::for_key(b"AAAAAAAAAAAAAAAAAAAAAA==");
    let mut resp = Vec::new();
    write_accept_response(&mut resp, &other, &AcceptOptions::default());
    assert_eq!(client.parse_response(&resp, &[]), Err(ClientHandshakeError::BadAccept));

    let ok = AcceptKey::for_key(client.key().as_bytes());
    let mut resp = Vec::new();
    write_accept_response(&mut resp, &ok, &AcceptOptions { protocol: Some("evil"), ..Default::default() });
    assert_eq!(
        client.parse_response(&resp, &["chat"]),
        Err(ClientHandshakeError::UnexpectedProtocol("evil".into()))
    );

    let mut resp = Vec::new();
    write_error_response(&mut resp, 403, "forbidden origin", &[]);
    assert_eq!(client.parse_response(&resp, &[]), Err(ClientHandshakeError::Status(403)));

    let resp = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: x\r\n\r\n";
    assert_eq!(client.parse_response(resp, &[]), Err(ClientHandshakeError::NotUpgraded));
    assert!(matches!(
        client.parse_response(b"SSH-2.0\r\n\r\n", &[]),
        Err(ClientHandshakeError::Malformed(_))
    ));
}

#[test]
fn content_length_must_be_digits() {
    let with_length = |v: &str| format!("POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: {v}\r\n\r\n");
    let length = |v: &str| {
        let r = with_length(v);
        let (req, _) = parse_request(r.as_bytes()).unwrap().unwrap();
        req.content_length().map_err(|e| e.status)
    };
    assert_eq!(length("5"), Ok(Some(5)));
    assert_eq!(length(" 12 "), Ok(Some(12)));
    for bad in ["+5", "-1", "5 5", "0x10", "", "99999999999999999999999"] {
        assert_eq!(length(bad), Err(400), "{bad:?}");
    }
    let two = "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
    let (req, _) = parse_request(two.as_bytes()).unwrap().unwrap();
    assert_eq!(req.content_length().map_err(|e| e.status), Err(400));
}
