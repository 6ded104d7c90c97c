//! Who may do what: topic patterns, connection tokens (JWT HS256), anonymous namespaces, the
//! origin allowlist, and the HTTP API key.

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;

/// A topic pattern: `*` matches any run of characters (none included); everything else
/// matches itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pattern {
    parts: Vec<String>,
}

impl Pattern {
    /// Parse a pattern; it must not be empty.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err("a topic pattern must not be empty".into());
        }
        Ok(Pattern { parts: text.split('*').map(str::to_string).collect() })
    }

    /// Whether `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        let (first, rest) = self.parts.split_first().expect("split yields at least one part");
        let Some(mut tail) = topic.strip_prefix(first.as_str()) else { return false };
        let Some((last, middle)) = rest.split_last() else { return tail.is_empty() };
        for part in middle {
            match tail.find(part.as_str()) {
                Some(i) => tail = &tail[i + part.len()..],
                None => return false,
            }
        }
        tail.len() >= last.len() && tail.ends_with(last.as_str())
    }
}

/// What a connection may do.
#[derive(Clone, Debug, Default)]
pub struct Rights {
    /// The token's subject; `None` for anonymous clients.
    pub user: Option<String>,
    /// When the token expires (seconds since the Unix epoch); the connection ends then.
    pub expires: Option<u64>,
    subscribe: Vec<Pattern>,
    publish: Vec<Pattern>,
    /// Topics whose history may be read: each also in `subscribe`.
    history: Vec<Pattern>,
    /// The token's `info` claim (a JSON object), shown with the user in presence.
    pub info: Option<std::sync::Arc<str>>,
    /// Personal namespaces: their topics are only their owner's (see [`Rights::owns`]).
    personal: Vec<Pattern>,
}

impl Rights {
    /// The rights of a client without a token, from the namespaces' (pattern, subscribe,
    /// publish, history).
    pub fn anonymous(namespaces: &[(Pattern, bool, bool, bool)]) -> Rights {
        let mut r = Rights::default();
        for (p, sub, publ, history) in namespaces {
            if *sub {
                r.subscribe.push(p.clone());
                if *history {
                    r.history.push(p.clone());
                }
            }
            if *publ {
                r.publish.push(p.clone());
            }
        }
        r
    }

    /// Make the topics of these namespaces personal: only their owner may use them.
    pub fn with_personal(mut self, personal: Vec<Pattern>) -> Rights {
        self.personal = personal;
        self
    }

    /// Whether `topic` is not personal, or is this connection's own: a connection with a
    /// token whose `sub` is the part of the topic after its last `#`.
    pub fn owns(&self, topic: &str) -> bool {
        if self.personal.is_empty() || !self.personal.iter().any(|p| p.matches(topic)) {
            return true;
        }
        matches!((&self.user, super::presence::owner(topic)), (Some(u), Some(o)) if u == o)
    }

    /// May subscribe to `topic`.
    pub fn may_subscribe(&self, topic: &str) -> bool {
        self.subscribe.iter().any(|p| p.matches(topic)) && self.owns(topic)
    }

    /// May read the history of `topic`: never a topic it may not subscribe to.
    pub fn may_read_history(&self, topic: &str) -> bool {
        self.history.iter().any(|p| p.matches(topic)) && self.may_subscribe(topic)
    }

    /// May publish to `topic`.
    pub fn may_publish(&self, topic: &str) -> bool {
        self.publish.iter().any(|p| p.matches(topic)) && self.owns(topic)
    }
}

/// The claims of a connection token.
#[derive(Debug, Deserialize)]
struct Claims {
    /// The user id.
    sub: String,
    /// Expiry, seconds since the Unix epoch.
    exp: u64,
    /// Topic patterns the holder may subscribe to, and read the history of.
    #[serde(default)]
    subscribe: Vec<String>,
    /// Topic patterns the holder may publish to.
    #[serde(default)]
    publish: Vec<String>,
    /// What presence shows of the holder besides `sub`: a JSON object.
    #[serde(default)]
    info: Option<Box<serde_json::value::RawValue>>,
}

/// Check a token and return the rights it grants on top of the anonymous ones. The error is
/// the one-line reason the client gets.
pub fn verify_token(token: &str, secret: Option<&[u8]>, anonymous: &Rights) -> Result<Rights, String> {
    let Some(secret) = secret else {
        return Err("this gateway accepts no tokens (no jwt_secret configured)".into());
    };
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation.leeway = 0;
    validation.validate_nbf = true;
    let data = jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret), &validation)
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => "token expired".to_string(),
            ErrorKind::InvalidSignature => "token signature is invalid".to_string(),
            ErrorKind::InvalidAlgorithm => "token must be signed with HS256".to_string(),
            ErrorKind::MissingRequiredClaim(c) => format!("token has no `{c}` claim"),
            _ => format!("token is malformed: {e}"),
        })?;
    let c = data.claims;
    let mut rights = anonymous.clone();
    rights.user = Some(c.sub);
    rights.expires = Some(c.exp);
    if let Some(info) = c.info {
        if !info.get().trim_start().starts_with('{') {
            return Err("token claim `info` must be a JSON object".into());
        }
        rights.info = Some(info.get().into());
    }
    for (list, into) in [(c.subscribe, &mut rights.subscribe), (c.publish, &mut rights.publish)] {
        for p in list {
            into.push(Pattern::parse(&p).map_err(|e| format!("token claims: {e}"))?);
        }
    }
    // What a token lets its holder subscribe to, it lets it read the history of (a
    // subscription with `since` would replay it anyway).
    rights.history.extend_from_slice(&rights.subscribe[anonymous.subscribe.len()..]);
    Ok(rights)
}

/// Whether a browser on `origin` may connect. With an empty allowlist only the gateway's own
/// origin (the `Host` the request was sent to) is allowed; `*` allows any. Clients that send
/// no `Origin` (not browsers) are not subject to it.
pub fn origin_allowed(origin: Option<&str>, host: Option<&str>, allowed: &[String]) -> bool {
    let Some(origin) = origin else { return true };
    let origin = origin.trim_end_matches('/');
    if allowed.is_empty() {
        let Some(host) = host else { return false };
        let bare = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
        return bare.is_some_and(|o| o.eq_ignore_ascii_case(host));
    }
    allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
}

/// Compare an API key in constant time (for equal lengths).
pub fn key_matches(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn patterns() {
        assert!(p("chat:*").matches("chat:lobby"));
        assert!(p("chat:*").matches("chat:"));
        assert!(!p("chat:*").matches("chats:x"));
        assert!(p("exact").matches("exact"));
        assert!(!p("exact").matches("exact2"));
        assert!(p("user:*:inbox").matches("user:42:inbox"));
        assert!(!p("user:*:inbox").matches("user:42:outbox"));
        assert!(p("*").matches("anything"));
        assert!(p("a*b*c").matches("abc"));
        assert!(!p("a*bc*c").matches("abc"));
        assert!(Pattern::parse("").is_err());
    }

    fn token(secret: &[u8], claims: serde_json::Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    fn exp(delta: i64) -> i64 {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        now as i64 + delta
    }

    #[test]
    fn tokens_grant_rights_and_bad_ones_are_refused_with_a_reason() {
        let anon = Rights::anonymous(&[(p("chat:*"), true, false, false)]);
        let secret = b"s3cret".as_slice();
        let good = token(
            secret,
            serde_json::json!({"sub": "ann", "exp": exp(60), "subscribe": ["vip:*"], "publish": ["chat:*"]}),
        );
        let r = verify_token(&good, Some(secret), &anon).unwrap();
        assert_eq!(r.user.as_deref(), Some("ann"));
        assert!(r.expires.is_some_and(|e| e.abs_diff(exp(60) as u64) <= 1));
        assert!(r.may_subscribe("vip:1") && r.may_subscribe("chat:x") && r.may_publish("chat:x"));
        assert!(!r.may_publish("vip:1"));
        assert!(!anon.may_publish("chat:x"));
        // History: where the token grants subscribing, not where a namespace turned it off.
        assert!(r.may_read_history("vip:1") && !r.may_read_history("chat:x"));
        assert!(!anon.may_read_history("chat:x") && !anon.may_read_history("vip:1"));

        let expired = token(secret, serde_json::json!({"sub": "ann", "exp": exp(-10)}));
        assert_eq!(verify_token(&expired, Some(secret), &anon).unwrap_err(), "token expired");
        let forged = token(b"other", serde_json::json!({"sub": "ann", "exp": exp(60)}));
        assert_eq!(verify_token(&forged, Some(secret), &anon).unwrap_err(), "token signature is invalid");
        let early = token(secret, serde_json::json!({"sub": "ann", "exp": exp(60), "nbf": exp(30)}));
        assert!(verify_token(&early, Some(secret), &anon).is_err(), "not valid before nbf");
        let no_exp = token(secret, serde_json::json!({"sub": "ann"}));
        assert!(verify_token(&no_exp, Some(secret), &anon).unwrap_err().contains("exp"));
        assert!(verify_token("garbage", Some(secret), &anon).unwrap_err().contains("malformed"));
        assert!(verify_token(&good, None, &anon).unwrap_err().contains("no jwt_secret"));
    }

    #[test]
    fn personal_topics_are_their_owners_only_and_info_is_an_object() {
        let anon = Rights::anonymous(&[(p("user:*"), true, true, true), (p("chat:*"), true, false, true)])
            .with_personal(vec![p("user:*")]);
        let secret = b"s3cret".as_slice();
        let t = token(secret, serde_json::json!({"sub": "42", "exp": exp(60), "info": {"name": "Ann"}}));
        let r = verify_token(&t, Some(secret), &anon).unwrap();
        assert!(r.may_subscribe("user:#42") && r.may_publish("user:#42") && r.may_read_history("user:#42"));
        assert!(!r.may_subscribe("user:#43") && !r.may_subscribe("user:42") && !r.may_subscribe("user:#42x"));
        assert!(r.may_subscribe("chat:#43"), "other namespaces are not personal");
        assert!(!anon.may_subscribe("user:#42"), "anonymous connections own no topic");
        assert_eq!(r.info.as_deref(), Some(r#"{"name":"Ann"}"#));
        let bad = token(secret, serde_json::json!({"sub": "42", "exp": exp(60), "info": "Ann"}));
        assert!(verify_token(&bad, Some(secret), &anon).unwrap_err().contains("info"));
    }

    #[test]
    fn origins() {
        let host = Some("127.0.0.1:9001");
        assert!(origin_allowed(None, host, &[]));
        assert!(origin_allowed(Some("http://127.0.0.1:9001"), host, &[]));
        assert!(!origin_allowed(Some("http://evil.example"), host, &[]));
        let list = vec!["https://app.example".to_string()];
        assert!(origin_allowed(Some("https://app.example"), host, &list));
        assert!(!origin_allowed(Some("http://127.0.0.1:9001"), host, &list));
        assert!(origin_allowed(Some("http://x"), host, &["*".to_string()]));
        assert!(key_matches("abc", "abc") && !key_matches("abd", "abc") && !key_matches("ab", "abc"));
    }
}
