//! The `handshake` target: the whole input is parsed both as a client's request head, by the
//! server-side functions, and as a server's response head, by [`ClientHandshake`].

use gale_frame::handshake::{
    AcceptKey, AcceptOptions, ClientHandshake, ClientHandshakeError, HttpError, MAX_HEAD_BYTES,
    extension_offers, is_upgrade_request, parse_request, select_protocol, validate_upgrade,
    write_accept_response,
};

/// The statuses the server side may refuse a request with.
pub const ERROR_STATUSES: [u16; 3] = [400, 426, 431];

/// Subprotocols the checks pretend to support.
pub const SUPPORTED: [&str; 2] = ["chat", "superchat"];

/// The client the response is checked for: its key is `AAAAAAAAAAAAAAAAAAAAAA==`.
pub fn client() -> ClientHandshake {
    ClientHandshake::with_nonce([0; 16])
}

/// What the handshake functions made of one input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// `parse_request`: the head length, `None` if incomplete, or the error status.
    pub request: Result<Option<usize>, u16>,
    /// `validate_upgrade` on a parsed request: 101 if it passes, or the error status.
    pub upgrade: Option<u16>,
    /// `parse_response` for [`client`] offering [`SUPPORTED`]: the head length and chosen
    /// subprotocol, `None` if incomplete, or the error.
    pub response: Result<Option<(usize, Option<String>)>, ClientHandshakeError>,
}

/// Run every handshake function on `data`; they must not panic, and their answers must be
/// consistent with each other.
pub fn check(data: &[u8]) -> Verdict {
    let (request, upgrade) = match parse_request(data) {
        Ok(None) => (Ok(None), None),
        Err(e) => {
            check_error(&e);
            (Err(e.status), None)
        }
        Ok(Some((req, n))) => {
            assert!(0 < n && n <= data.len().min(MAX_HEAD_BYTES), "head of {n} bytes in {}", data.len());
            // The head alone parses the same; a byte less is incomplete.
            assert!(matches!(parse_request(&data[..n]), Ok(Some((_, m))) if m == n));
            assert!(matches!(parse_request(&data[..n - 1]), Ok(None)), "a cut head parsed");
            let _ = (req.path(), req.query(), req.headers().count(), is_upgrade_request(&req));
            if let Err(e) = req.content_length() {
                check_error(&e);
            }
            match extension_offers(&req) {
                Ok(offers) => assert!(offers.iter().all(|o| !o.name.is_empty())),
                Err(e) => check_error(&e),
            }
            let protocol = select_protocol(&req, &SUPPORTED);
            assert!(protocol.is_none_or(|p| SUPPORTED.contains(&p)), "chose {protocol:?}");
            let upgrade = match validate_upgrade(&req) {
                Ok(up) => {
                    assert_eq!(up.key.len(), 24);
                    if up.key == client().key() {
                        check_accepted(up.accept_key(), protocol);
                    }
                    101
                }
                Err(e) => {
                    check_error(&e);
                    e.status
                }
            };
            (Ok(Some(n)), Some(upgrade))
        }
    };
    let response = match client().parse_response(data, &SUPPORTED) {
        Ok(Some((resp, n))) => {
            assert!(n <= data.len(), "head of {n} bytes in {}", data.len());
            assert!(resp.protocol.as_deref().is_none_or(|p| SUPPORTED.contains(&p)));
            Ok(Some((n, resp.protocol)))
        }
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };
    Verdict { request, upgrade, response }
}

/// A refusal has an expected status, and the response written for it reads back as that
/// status.
fn check_error(e: &HttpError) {
    assert!(ERROR_STATUSES.contains(&e.status), "status {} for {:?}", e.status, e.reason);
    let mut out = Vec::new();
    e.write_response(&mut out);
    assert_eq!(client().parse_response(&out, &[]), Err(ClientHandshakeError::Status(e.status)));
}

/// The 101 a server writes for the request of [`client`] is accepted by that client, with
/// the subprotocol the server chose.
fn check_accepted(accept: AcceptKey, protocol: Option<&str>) {
    let mut out = Vec::new();
    write_accept_response(&mut out, &accept, &AcceptOptions { protocol, ..AcceptOptions::default() });
    let (resp, n) = client().parse_response(&out, &SUPPORTED).expect("own 101 accepted").expect("complete");
    assert_eq!((n, resp.protocol.as_deref()), (out.len(), protocol));
}
