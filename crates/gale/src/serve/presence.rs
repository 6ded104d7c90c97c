//! Presence: who is subscribed to a topic now (`GET /api/presence/{topic}`, the `presence`
//! command) and how many (`GET /api/presence_stats/{topic}`, `presence_stats`), kept only for
//! the topics of namespaces with `presence` or `join_leave` on; join and leave events; and the
//! rule of personal topics.
//!
//! On a single node the members are kept here, per topic: the listed ones (connections with a
//! token) by client id, a count of anonymous connections, and a count of connections per user,
//! so that the counts are read in O(1) whatever the topic's size. In cluster mode Redis keeps
//! them (see `broker`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::auth::Pattern;
use super::protocol::{CommandError, push_json_string};

/// What the namespaces turn on for their topics: `(pattern, presence, join_leave)`.
#[derive(Clone, Debug, Default)]
pub struct PresenceRules {
    rules: Vec<(Pattern, bool, bool)>,
}

/// What is kept for a topic whose namespace tracks presence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracked {
    /// Clients may ask who is there (`presence`, `presence_stats`).
    pub presence: bool,
    /// Subscribers get join and leave events.
    pub join_leave: bool,
}

impl PresenceRules {
    /// Rules from the namespaces that turn presence or join/leave events on.
    pub fn new(rules: Vec<(Pattern, bool, bool)>) -> PresenceRules {
        PresenceRules { rules: rules.into_iter().filter(|(_, p, j)| *p || *j).collect() }
    }

    /// Whether no namespace tracks presence: then nothing is ever tracked.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// What is kept for `topic`: `None` when no namespace of it tracks presence.
    pub fn tracked(&self, topic: &str) -> Option<Tracked> {
        if self.rules.is_empty() {
            return None;
        }
        let mut found: Option<Tracked> = None;
        for (pattern, presence, join_leave) in &self.rules {
            if pattern.matches(topic) {
                let t = found.get_or_insert(Tracked { presence: false, join_leave: false });
                t.presence |= *presence;
                t.join_leave |= *join_leave;
            }
        }
        found
    }
}

/// The user a personal topic belongs to: the part after its last `#` (`user:#42` is user
/// `42`'s); `None` if it has no `#`.
pub fn owner(topic: &str) -> Option<&str> {
    topic.rsplit_once('#').map(|(_, user)| user)
}

/// Who a connection is, as presence shows it.
#[derive(Clone, Debug)]
pub struct Member {
    /// The client id: unique across nodes (the node's id, then a counter).
    pub client: Arc<str>,
    /// The token's `sub`; `None` for anonymous connections, which are counted, not listed.
    pub user: Option<Arc<str>>,
    /// The token's `info` claim (a JSON object, as it came).
    pub info: Option<Arc<str>>,
}

impl Member {
    /// `{"client","user","info"}` (`info` only when the token had one).
    pub fn write_json(&self, out: &mut String) {
        out.push_str("{\"client\":");
        push_json_string(out, &self.client);
        out.push_str(",\"user\":");
        match &self.user {
            Some(u) => push_json_string(out, u),
            None => out.push_str("null"),
        }
        if let Some(info) = &self.info {
            out.push_str(",\"info\":");
            out.push_str(info);
        }
        out.push('}');
    }

    /// The JSON of one member, alone.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(64);
        self.write_json(&mut out);
        out
    }
}

/// A join or leave event as subscribers get it: `{"op","topic","client","user","info"}`;
/// `member_json` is [`Member::to_json`]'s.
pub fn event(op: &str, topic: &str, member_json: &str) -> String {
    let mut out = String::with_capacity(32 + topic.len() + member_json.len());
    out.push_str("{\"op\":\"");
    out.push_str(op);
    out.push_str("\",\"topic\":");
    push_json_string(&mut out, topic);
    out.push(',');
    // The member's fields, after its opening brace.
    out.push_str(&member_json[1..]);
    out
}

/// Whether a channel message is a join or leave event rather than a numbered delivery.
pub fn is_event(text: &str) -> bool {
    text.starts_with("{\"op\":")
}

/// Counts of a topic's presence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Subscribed connections, anonymous ones included.
    pub connections: u64,
    /// Distinct users among them (connections with a token).
    pub users: u64,
}

impl Stats {
    /// The answer's fields after the topic: `"connections","users"`.
    pub fn write_fields(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = write!(out, "\"connections\":{},\"users\":{}", self.connections, self.users);
    }
}

/// A list of a topic's members, as read: at most `max_clients` of them and no more bytes than
/// a connection may queue.
#[derive(Debug, Default)]
pub struct PresencePage {
    /// The counts.
    pub stats: Stats,
    /// The members listed, each as its JSON.
    clients: Vec<String>,
    bytes: usize,
    /// Listed members were left out.
    more: bool,
}

impl PresencePage {
    /// An empty page of a topic with these counts.
    pub fn new(stats: Stats) -> PresencePage {
        PresencePage { stats, ..PresencePage::default() }
    }

    /// Offer a member's JSON; false (and `more` set) once the page is full.
    pub fn offer(&mut self, limit: &ListLimit, member_json: String) -> bool {
        if self.clients.len() >= limit.max_clients
            || (!self.clients.is_empty() && self.bytes + member_json.len() > limit.max_bytes)
        {
            self.more = true;
            return false;
        }
        self.bytes += member_json.len() + 1;
        self.clients.push(member_json);
        true
    }

    /// Members were left out before the page was offered them (the cluster's cap).
    pub fn mark_more(&mut self) {
        self.more = true;
    }

    /// The answer's fields after the topic: `"connections","users","more","clients"`.
    pub fn write_fields(&self, out: &mut String) {
        out.reserve(self.bytes + 96);
        self.stats.write_fields(out);
        out.push_str(if self.more { ",\"more\":true" } else { ",\"more\":false" });
        out.push_str(",\"clients\":[");
        for (i, c) in self.clients.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(c);
        }
        out.push(']');
    }
}

/// How much one presence list may hold.
#[derive(Clone, Copy, Debug)]
pub struct ListLimit {
    /// Members listed at most (`presence.max_clients`).
    pub max_clients: usize,
    /// Bytes of members at most (past the first): half of what a connection may queue.
    pub max_bytes: usize,
}

/// The answer to a presence read, HTTP or command: `{"topic", …fields}` without the braces'
/// envelope of a command reply.
pub fn body(topic: &str, fields: impl FnOnce(&mut String)) -> String {
    let mut out = String::from("{\"topic\":");
    push_json_string(&mut out, topic);
    out.push(',');
    fields(&mut out);
    out.push('}');
    out
}

/// One topic's members on this node.
#[derive(Default)]
struct TopicPresence {
    /// Listed members by client id: user and info.
    listed: BTreeMap<Arc<str>, Member>,
    /// Anonymous connections.
    anonymous: u64,
    /// Connections per user.
    users: HashMap<Arc<str>, u32>,
}

/// The presence of every tracked topic on this node (single-node mode).
#[derive(Default)]
pub struct Presence {
    topics: Mutex<HashMap<String, TopicPresence>>,
    /// Memberships held, over all topics (a gauge).
    pub members: AtomicU64,
}

impl Presence {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TopicPresence>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `member` subscribed to `topic`.
    pub fn join(&self, topic: &str, member: &Member) {
        let mut topics = self.lock();
        let t = topics.entry(topic.to_string()).or_default();
        match &member.user {
            None => t.anonymous += 1,
            Some(user) => {
                if t.listed.insert(member.client.clone(), member.clone()).is_some() {
                    return;
                }
                *t.users.entry(user.clone()).or_default() += 1;
            }
        }
        self.members.fetch_add(1, Ordering::Relaxed);
    }

    /// `member` left `topic` (unsubscribed, or disconnected).
    pub fn leave(&self, topic: &str, member: &Member) {
        let mut topics = self.lock();
        let Some(t) = topics.get_mut(topic) else { return };
        match &member.user {
            None if t.anonymous > 0 => t.anonymous -= 1,
            None => return,
            Some(user) => {
                if t.listed.remove(&member.client).is_none() {
                    return;
                }
                if let Some(n) = t.users.get_mut(user) {
                    *n -= 1;
                    if *n == 0 {
                        t.users.remove(user);
                    }
                }
            }
        }
        self.members.fetch_sub(1, Ordering::Relaxed);
        if t.anonymous == 0 && t.listed.is_empty() {
            topics.remove(topic);
        }
    }

    /// The counts of `topic`: O(1).
    pub fn stats(&self, topic: &str) -> Stats {
        self.lock().get(topic).map_or_else(Stats::default, |t| Stats {
            connections: t.anonymous + t.listed.len() as u64,
            users: t.users.len() as u64,
        })
    }

    /// The listed members of `topic`, in client-id order, within `limit`.
    pub fn list(&self, topic: &str, limit: &ListLimit) -> PresencePage {
        let topics = self.lock();
        let Some(t) = topics.get(topic) else { return PresencePage::default() };
        let stats = Stats { connections: t.anonymous + t.listed.len() as u64, users: t.users.len() as u64 };
        let mut page = PresencePage::new(stats);
        for m in t.listed.values() {
            if !page.offer(limit, m.to_json()) {
                break;
            }
        }
        page
    }
}

/// Client ids: this node's random id and a counter.
pub struct ClientIds {
    node: String,
    next: AtomicU64,
}

impl ClientIds {
    /// Ids for a node called `node` (random: unique across the nodes of a cluster).
    pub fn new(node: String) -> ClientIds {
        ClientIds { node, next: AtomicU64::new(1) }
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The next connection's serial number.
    pub fn next(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// The client id of serial number `serial`.
    pub fn client_id(&self, serial: u64) -> Arc<str> {
        format!("{}-{serial}", self.node).into()
    }
}

/// A presence read (`presence`, `presence_stats`) of a topic that keeps none.
pub fn not_tracked(topic: &str) -> CommandError {
    CommandError::new(404, format!("no presence is kept for {topic}: turn on presence in its namespace"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(client: &str, user: Option<&str>, info: Option<&str>) -> Member {
        Member { client: client.into(), user: user.map(Into::into), info: info.map(Into::into) }
    }

    #[test]
    fn counts_follow_joins_and_leaves_and_anonymous_ones_are_not_listed() {
        let p = Presence::default();
        let (a1, a2, b, anon) = (
            member("n-1", Some("ann"), Some(r#"{"name":"Ann"}"#)),
            member("n-2", Some("ann"), None),
            member("n-3", Some("bob"), None),
            member("n-4", None, None),
        );
        for m in [&a1, &a2, &b, &anon] {
            p.join("t", m);
        }
        p.join("t", &a1); // twice: once
        assert_eq!(p.stats("t"), Stats { connections: 4, users: 2 });
        let limit = ListLimit { max_clients: 10, max_bytes: 1 << 20 };
        let mut out = String::new();
        p.list("t", &limit).write_fields(&mut out);
        let v: serde_json::Value = serde_json::from_str(&format!("{{{out}}}")).unwrap();
        assert_eq!(v["clients"].as_array().unwrap().len(), 3);
        assert_eq!(
            v["clients"][0],
            serde_json::json!({"client": "n-1", "user": "ann", "info": {"name": "Ann"}})
        );
        assert_eq!(v["more"], false);
        p.leave("t", &a1);
        p.leave("t", &anon);
        p.leave("t", &anon); // not there any more: nothing
        assert_eq!(p.stats("t"), Stats { connections: 2, users: 2 });
        p.leave("t", &a2);
        p.leave("t", &b);
        assert_eq!(p.stats("t"), Stats::default());
        assert!(p.lock().is_empty(), "an empty topic is forgotten");
        assert_eq!(p.members.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn lists_stop_at_the_cap() {
        let p = Presence::default();
        for i in 0..5 {
            p.join("t", &member(&format!("n-{i}"), Some("u"), None));
        }
        let page = p.list("t", &ListLimit { max_clients: 2, max_bytes: 1 << 20 });
        assert_eq!((page.clients.len(), page.more, page.stats.connections), (2, true, 5));
        let page = p.list("t", &ListLimit { max_clients: 10, max_bytes: 1 });
        assert_eq!((page.clients.len(), page.more), (1, true));
    }

    #[test]
    fn rules_events_and_owners() {
        let rules = PresenceRules::new(vec![
            (Pattern::parse("a:*").unwrap(), true, false),
            (Pattern::parse("a:x*").unwrap(), false, true),
            (Pattern::parse("b:*").unwrap(), false, false),
        ]);
        assert_eq!(rules.tracked("a:1"), Some(Tracked { presence: true, join_leave: false }));
        assert_eq!(rules.tracked("a:x1"), Some(Tracked { presence: true, join_leave: true }));
        assert_eq!(rules.tracked("b:1"), None);
        assert!(PresenceRules::new(vec![]).is_empty());
        let e = event("join", "a:1", &member("n-1", Some("ann"), Some("{}")).to_json());
        let v: serde_json::Value = serde_json::from_str(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"op": "join", "topic": "a:1", "client": "n-1", "user": "ann", "info": {}})
        );
        assert!(is_event(&e) && !is_event(r#"{"topic":"a","seq":1}"#));
        assert_eq!(owner("user:#42"), Some("42"));
        assert_eq!(owner("user:#a#b"), Some("b"));
        assert_eq!(owner("user:42"), None);
    }
}
