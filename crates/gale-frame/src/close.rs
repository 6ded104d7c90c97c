//! Close codes (RFC 6455 section 7.4) and the protocol errors that map to them.

use std::fmt;

/// A WebSocket close status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// 1000: the purpose of the connection has been fulfilled.
    pub const NORMAL: CloseCode = CloseCode(1000);
    /// 1001: the endpoint is going away (server shutdown, idle timeout, page navigation).
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    /// 1002: the peer broke the protocol.
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    /// 1003: a data type the endpoint cannot accept.
    pub const UNSUPPORTED_DATA: CloseCode = CloseCode(1003);
    /// 1005: no status code was present (never sent on the wire).
    pub const NO_STATUS: CloseCode = CloseCode(1005);
    /// 1006: the connection closed without a close frame (never sent on the wire).
    pub const ABNORMAL: CloseCode = CloseCode(1006);
    /// 1007: a text message was not valid UTF-8, or the payload was inconsistent with its type.
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    /// 1008: the message violates the endpoint's policy.
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    /// 1009: the message is too big to process.
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    /// 1010: the client expected an extension the server did not negotiate.
    pub const MANDATORY_EXTENSION: CloseCode = CloseCode(1010);
    /// 1011: the server hit an unexpected condition.
    pub const INTERNAL_ERROR: CloseCode = CloseCode(1011);
    /// 1012: the service is restarting.
    pub const SERVICE_RESTART: CloseCode = CloseCode(1012);
    /// 1013: try again later (temporary overload).
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);

    /// Whether this code may appear in a close frame on the wire.
    ///
    /// Valid: 1000-1003, 1007-1014 (1012-1014 are registered with IANA since RFC 6455 was
    /// published, and browsers send them) and the application ranges 3000-4999.
    /// Invalid: anything below 1000, 1004-1006 (reserved or local-only), 1015 (TLS failure,
    /// local-only), 1016-2999 (unassigned) and 5000 and above.
    pub fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        CloseCode(code)
    }
}

/// A violation of the protocol by the peer: the close code to send and a short reason.
///
/// The reason is static so that reporting an error never allocates; it fits in a close frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProtocolError {
    /// The close code RFC 6455 prescribes for this violation.
    pub code: CloseCode,
    /// What went wrong, in a few words.
    pub reason: &'static str,
}

impl ProtocolError {
    pub(crate) const fn protocol(reason: &'static str) -> Self {
        ProtocolError { code: CloseCode::PROTOCOL_ERROR, reason }
    }
    pub(crate) const fn too_big(reason: &'static str) -> Self {
        ProtocolError { code: CloseCode::MESSAGE_TOO_BIG, reason }
    }
    pub(crate) const fn try_again_later(reason: &'static str) -> Self {
        ProtocolError { code: CloseCode::TRY_AGAIN_LATER, reason }
    }
    pub(crate) const fn invalid_payload(reason: &'static str) -> Self {
        ProtocolError { code: CloseCode::INVALID_PAYLOAD, reason }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason, self.code)
    }
}

impl std::error::Error for ProtocolError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_validity_by_range() {
        let valid = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014];
        let valid_app = [3000, 3999, 4000, 4999];
        let invalid = [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535];
        for c in valid.into_iter().chain(valid_app) {
            assert!(CloseCode(c).is_valid_on_wire(), "{c} should be valid");
        }
        for c in invalid {
            assert!(!CloseCode(c).is_valid_on_wire(), "{c} should be invalid");
        }
    }
}
