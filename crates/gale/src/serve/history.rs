//! Reading a topic's retained messages without subscribing (`GET /api/history/{topic}` and the
//! `history` command): what to read, the page read (the same on a single node, from the
//! topic's history, and in cluster mode, from its Redis stream), and the answer's JSON.

use std::sync::Arc;

use super::protocol::{CommandError, push_json_string};

/// How many messages one read may return: `history.default_limit` when none is asked for,
/// at most `history.max_limit`.
#[derive(Clone, Copy, Debug)]
pub struct ReadLimits {
    /// Messages returned when the request names no `limit`.
    pub default_limit: usize,
    /// The largest `limit` a request may ask for.
    pub max_limit: usize,
}

impl ReadLimits {
    /// The limit to read with: `asked`, or the default; 400 naming `limit` outside 1..=max.
    pub fn limit(&self, asked: Option<u64>) -> Result<usize, CommandError> {
        match asked {
            None => Ok(self.default_limit),
            Some(n) if n >= 1 && n <= self.max_limit as u64 => Ok(n as usize),
            Some(n) => Err(CommandError::new(400, format!("limit: {n} is not from 1 to {}", self.max_limit))),
        }
    }
}

/// What to read: the messages after `since` (0: from the oldest retained), at most `limit`,
/// and no more than `max_bytes` of them (but always one, if there is one).
#[derive(Clone, Copy, Debug)]
pub struct HistoryQuery {
    /// Read messages numbered after this.
    pub since: u64,
    /// The most messages.
    pub limit: usize,
    /// The most bytes of messages (past the first).
    pub max_bytes: usize,
}

/// The query of `GET /api/history/{topic}?since_seq=N&limit=M`; 400 naming the parameter
/// that is malformed, repeated or unknown.
pub fn parse_query(query: Option<&str>, limits: &ReadLimits) -> Result<(u64, usize), CommandError> {
    let (mut since, mut limit): (Option<u64>, Option<u64>) = (None, None);
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match name {
            "since_seq" => &mut since,
            "limit" => &mut limit,
            other => {
                return Err(CommandError::new(
                    400,
                    format!("unknown query parameter {other:?}: expected since_seq or limit"),
                ));
            }
        };
        if slot.is_some() {
            return Err(CommandError::new(400, format!("{name}: given twice")));
        }
        let n = value.parse().map_err(|_| {
            CommandError::new(400, format!("{name}: {value:?} is not a whole number of 0 or more"))
        })?;
        *slot = Some(n);
    }
    Ok((since.unwrap_or(0), limits.limit(limit)?))
}

/// A page of a topic's history, as read.
#[derive(Debug, Default)]
pub struct HistoryPage {
    /// The topic's epoch; `None` if it has no state (never published to, or forgotten).
    pub epoch: Option<String>,
    /// The topic's last sequence number (0 without state).
    pub seq: u64,
    /// The oldest message retained, if any.
    pub first_seq: Option<u64>,
    /// The query's `since`.
    since: u64,
    /// The messages read, oldest first, with their sequence numbers: deliveries as sent.
    messages: Vec<(u64, Arc<str>)>,
    /// Bytes of `messages`.
    bytes: usize,
}

impl HistoryPage {
    /// An empty page of a topic at `epoch`/`seq`, for `query`.
    pub fn new(epoch: Option<String>, seq: u64, first_seq: Option<u64>, query: &HistoryQuery) -> HistoryPage {
        HistoryPage { epoch, seq, first_seq, since: query.since, ..HistoryPage::default() }
    }

    /// Offer the retained message `seq` (offered in order); returns whether to go on. Taken if
    /// it is after `since`, not past the topic's `seq`, right after the last one taken (the
    /// page has no gap) and within the query's limits.
    pub fn offer(&mut self, query: &HistoryQuery, seq: u64, text: impl Into<Arc<str>> + AsRef<str>) -> bool {
        if seq <= self.since {
            return true;
        }
        let len = text.as_ref().len();
        let follows = self.messages.last().is_none_or(|(last, _)| seq == last + 1);
        let fits = self.messages.is_empty() || self.bytes + len <= query.max_bytes;
        if seq > self.seq || !follows || !fits || self.messages.len() >= query.limit {
            return false;
        }
        self.bytes += len;
        self.messages.push((seq, text.into()));
        self.messages.len() < query.limit
    }

    /// The message `seq`, read in order, has expired: it and the messages before it are no
    /// longer retained, so the page starts again after it.
    pub fn expired(&mut self, seq: u64) {
        self.messages.clear();
        self.bytes = 0;
        self.first_seq = Some(seq + 1).filter(|first| *first <= self.seq);
    }

    /// Messages after `since` were dropped from retention: the page does not start right
    /// after it.
    pub fn truncated(&self) -> bool {
        self.since < self.seq && self.messages.first().is_none_or(|(seq, _)| *seq > self.since + 1)
    }

    /// Retained messages after the page's last remain (the limit or the byte bound stopped it).
    pub fn more(&self) -> bool {
        self.messages.last().is_some_and(|(seq, _)| *seq < self.seq)
    }

    /// The answer's fields after the topic: `"epoch","seq","first_seq","truncated","more",
    /// "messages"`, the messages as their deliveries.
    pub fn write_fields(&self, out: &mut String) {
        use std::fmt::Write;
        out.reserve(self.bytes + self.messages.len() + 128);
        out.push_str("\"epoch\":");
        match &self.epoch {
            Some(e) => push_json_string(out, e),
            None => out.push_str("null"),
        }
        let first = self.first_seq.map_or_else(|| "null".to_string(), |s| s.to_string());
        let _ = write!(
            out,
            ",\"seq\":{},\"first_seq\":{first},\"truncated\":{},\"more\":{},\"messages\":[",
            self.seq,
            self.truncated(),
            self.more()
        );
        for (i, (_, text)) in self.messages.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(text);
        }
        out.push(']');
    }

    /// The HTTP answer's body: `{"topic", …fields}`.
    pub fn http_body(&self, topic: &str) -> String {
        let mut out = String::from("{\"topic\":");
        push_json_string(&mut out, topic);
        out.push(',');
        self.write_fields(&mut out);
        out.push('}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ReadLimits = ReadLimits { default_limit: 100, max_limit: 1000 };

    fn page(seq: u64, retained: std::ops::RangeInclusive<u64>, q: &HistoryQuery) -> HistoryPage {
        let mut p = HistoryPage::new(Some("e".into()), seq, Some(*retained.start()), q);
        for s in retained {
            if !p.offer(q, s, format!("{{\"seq\":{s}}}")) {
                break;
            }
        }
        p
    }

    fn seqs(p: &HistoryPage) -> Vec<u64> {
        p.messages.iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn a_page_starts_after_since_and_stops_at_the_limit_or_the_bytes() {
        let q = HistoryQuery { since: 0, limit: 3, max_bytes: usize::MAX };
        let p = page(10, 5..=10, &q);
        assert_eq!(seqs(&p), [5, 6, 7]);
        assert!(p.truncated() && p.more());
        let q = HistoryQuery { since: 7, limit: 100, max_bytes: usize::MAX };
        let p = page(10, 5..=10, &q);
        assert_eq!(seqs(&p), [8, 9, 10]);
        assert!(!p.truncated() && !p.more());
        // Always one message, then only what fits.
        let q = HistoryQuery { since: 0, limit: 100, max_bytes: 1 };
        assert_eq!(seqs(&page(3, 1..=3, &q)), [1]);
        let q = HistoryQuery { since: 0, limit: 100, max_bytes: 20 };
        assert_eq!(seqs(&page(3, 1..=3, &q)), [1, 2]);
        // Ahead of the topic, or nothing retained.
        let q = HistoryQuery { since: 12, limit: 100, max_bytes: usize::MAX };
        let p = page(10, 5..=10, &q);
        assert!(seqs(&p).is_empty() && !p.truncated() && !p.more());
        let q = HistoryQuery { since: 0, limit: 100, max_bytes: usize::MAX };
        let p = HistoryPage::new(Some("e".into()), 4, None, &q);
        assert!(p.truncated() && !p.more());
    }

    #[test]
    fn an_expired_message_starts_the_page_again_after_it() {
        let q = HistoryQuery { since: 0, limit: 100, max_bytes: usize::MAX };
        let mut p = HistoryPage::new(Some("e".into()), 4, Some(1), &q);
        assert!(p.offer(&q, 1, "a"));
        p.expired(2);
        assert!(p.offer(&q, 3, "c") && p.offer(&q, 4, "d"));
        assert_eq!((seqs(&p), p.first_seq, p.truncated()), (vec![3, 4], Some(3), true));
        p.expired(4);
        assert_eq!((seqs(&p), p.first_seq), (vec![], None));
    }

    #[test]
    fn a_gap_ends_the_page() {
        let q = HistoryQuery { since: 0, limit: 100, max_bytes: usize::MAX };
        let mut p = HistoryPage::new(Some("e".into()), 9, Some(1), &q);
        assert!(p.offer(&q, 1, "a") && p.offer(&q, 2, "b"));
        assert!(!p.offer(&q, 4, "d"));
        assert_eq!(seqs(&p), [1, 2]);
        assert!(p.more());
    }

    #[test]
    fn the_answer_is_json_with_the_deliveries_as_sent() {
        let q = HistoryQuery { since: 1, limit: 100, max_bytes: usize::MAX };
        let p = page(3, 1..=3, &q);
        let v: serde_json::Value = serde_json::from_str(&p.http_body("chat:\"x\"")).unwrap();
        assert_eq!(v["topic"], "chat:\"x\"");
        assert_eq!(
            (v["epoch"].as_str(), v["seq"].as_u64(), v["first_seq"].as_u64()),
            (Some("e"), Some(3), Some(1))
        );
        assert_eq!((v["truncated"].as_bool(), v["more"].as_bool()), (Some(false), Some(false)));
        assert_eq!(v["messages"], serde_json::json!([{"seq": 2}, {"seq": 3}]));
        let none = HistoryPage::new(None, 0, None, &q);
        let v: serde_json::Value = serde_json::from_str(&none.http_body("t")).unwrap();
        assert_eq!((v["epoch"].is_null(), v["first_seq"].is_null()), (true, true));
        assert_eq!(v["messages"], serde_json::json!([]));
    }

    #[test]
    fn queries_are_checked_naming_the_parameter() {
        assert_eq!(parse_query(None, &LIMITS).unwrap(), (0, 100));
        assert_eq!(parse_query(Some("since_seq=5&limit=7"), &LIMITS).unwrap(), (5, 7));
        assert_eq!(parse_query(Some("limit=1000"), &LIMITS).unwrap(), (0, 1000));
        for (q, named) in [
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=x", "limit"),
            ("since_seq=-1", "since_seq"),
            ("since_seq=", "since_seq"),
            ("since_seq=1&since_seq=2", "since_seq"),
            ("sinceseq=1", "sinceseq"),
        ] {
            let e = parse_query(Some(q), &LIMITS).unwrap_err();
            assert_eq!(e.code, 400, "{q}");
            assert!(e.reason.contains(named), "{q}: {}", e.reason);
        }
    }
}
