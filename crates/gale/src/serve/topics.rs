//! Per-topic state: the sequence number, the epoch, and the recent history that lets a client
//! that reconnects get exactly what it missed.
//!
//! Publishing to a topic and subscribing to it with recovery both run under the topic's lock:
//! the next sequence number, the history entry and the hand-off to the event loops happen
//! together, and a subscriber replays the history and goes live at one point between two
//! publishes (the server's pub/sub skips messages published before a subscription; see
//! `gale_server`'s `subscribe`), so nothing is lost or delivered twice.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::history::{HistoryPage, HistoryQuery};
use super::protocol::{CommandError, Payload, delivery};
use super::publish::{PublishLimits, PublishOptions, RememberedKeys};

/// Where a client stands in a topic's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// The topic's epoch: changes when its numbering restarts (a restart, or state expired).
    pub epoch: String,
    /// The last sequence number received.
    pub seq: u64,
}

impl Position {
    /// Whether this position, given to recover from, is in the numbering `epoch`. An empty
    /// epoch with `seq` 0 is: the client saw the topic without state (no epoch yet), so
    /// whatever the current epoch holds came after.
    pub fn in_epoch(&self, epoch: &str) -> bool {
        self.epoch == epoch || (self.epoch.is_empty() && self.seq == 0)
    }
}

/// One topic.
struct TopicState {
    epoch: String,
    seq: u64,
    /// (seq, when, the delivery as sent) of the last messages, oldest first: always the
    /// newest messages without a gap, so that recovery is exact or impossible, never partial.
    history: VecDeque<(u64, Instant, Arc<str>)>,
    /// Bytes of `history`.
    bytes: usize,
    last_activity: Instant,
    /// Forgotten by a sweep: whoever locked it after that must look the topic up again.
    removed: bool,
    /// (seq, when it expires) of the retained messages published with a time to live, oldest
    /// first.
    deadlines: VecDeque<(u64, Instant)>,
}

impl TopicState {
    /// The newest message whose time to live has passed at `now`: messages up to it are no
    /// longer retained.
    fn expired_until(&self, now: Instant) -> Option<u64> {
        self.deadlines.iter().rev().find(|(_, at)| *at <= now).map(|(seq, _)| *seq)
    }
}

/// What a publish did.
#[derive(Debug, PartialEq, Eq)]
pub struct Published {
    /// The message's position.
    pub pos: Position,
    /// A retry with a remembered idempotency key: `pos` is the first publish's, and nothing
    /// was published now.
    pub duplicate: bool,
}

/// What a subscription with `since` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    /// No `since` was given.
    NotAsked,
    /// These deliveries, in order, are exactly what was missed.
    Recovered(Vec<Arc<str>>),
    /// Recovery is not possible; the reason.
    Impossible(&'static str),
}

/// Why a publish failed.
#[derive(Debug, PartialEq, Eq)]
pub enum PublishError {
    /// The gateway holds state for `max_topics` topics already.
    TooManyTopics,
    /// The idempotency key cannot be remembered: its source's bound is full of keys still
    /// within their window. Nothing was published.
    TooManyKeys,
}

impl From<PublishError> for CommandError {
    /// What clients and the HTTP API are told, in single-node and cluster mode alike.
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::TooManyTopics => {
                CommandError::new(503, "the gateway holds its maximum number of topics")
            }
            PublishError::TooManyKeys => CommandError::new(
                503,
                "the gateway remembers its maximum number of idempotency keys: nothing was published, retry later",
            ),
        }
    }
}

/// How much history is kept.
#[derive(Clone, Copy, Debug)]
pub struct HistoryLimits {
    /// Messages per topic.
    pub size: usize,
    /// Age of the oldest message kept; `None`: no limit.
    pub ttl: Option<Duration>,
    /// Bytes per topic.
    pub topic_bytes: usize,
    /// Bytes over all topics.
    pub total_bytes: usize,
}

/// The gateway's topics.
pub struct Topics {
    map: Mutex<HashMap<String, Arc<Mutex<TopicState>>>>,
    limits: HistoryLimits,
    max_topics: usize,
    /// Bytes of history over all topics.
    total: AtomicUsize,
    /// Idempotency keys and their bounds.
    publish: PublishLimits,
    /// Idempotency keys remembered over all topics: of the HTTP API, and of clients, each
    /// within its own bound (clients cannot push out the API's keys). Locked under a topic's
    /// lock, never the other way round.
    keys: [Mutex<RememberedKeys>; 2],
}

impl Topics {
    /// Topics keeping history within `limits`; at most `max_topics` of them.
    pub fn new(limits: HistoryLimits, max_topics: usize) -> Self {
        Topics {
            map: Mutex::default(),
            limits,
            max_topics,
            total: AtomicUsize::new(0),
            publish: PublishLimits::default(),
            keys: Default::default(),
        }
    }

    /// The same, remembering idempotency keys within `publish`'s window and bound.
    pub fn with_publish_limits(mut self, publish: PublishLimits) -> Self {
        self.publish = publish;
        self
    }

    /// Run `f` on the state of `topic` (created when `create`), under the topic's lock.
    fn with_state<R>(
        &self,
        topic: &str,
        create: bool,
        f: impl FnOnce(&mut TopicState) -> R,
    ) -> Result<Option<R>, PublishError> {
        loop {
            let state = {
                let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
                match map.get(topic) {
                    Some(s) => s.clone(),
                    None if !create => return Ok(None),
                    None if map.len() >= self.max_topics => return Err(PublishError::TooManyTopics),
                    None => {
                        let state = Arc::new(Mutex::new(TopicState {
                            epoch: new_epoch(),
                            seq: 0,
                            history: VecDeque::new(),
                            bytes: 0,
                            last_activity: Instant::now(),
                            removed: false,
                            deadlines: VecDeque::new(),
                        }));
                        map.insert(topic.to_string(), state.clone());
                        state
                    }
                }
            };
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            // A sweep may have forgotten the topic between the lookup and the lock: using
            // that state would fork the topic's numbering.
            if !s.removed {
                return Ok(Some(f(&mut s)));
            }
        }
    }

    /// Whether `topics` (a topic listed twice counts once) would fit.
    pub fn room_for(&self, topics: &[String]) -> bool {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let new: std::collections::HashSet<&str> =
            topics.iter().map(String::as_str).filter(|t| !map.contains_key(*t)).collect();
        map.len() + new.len() <= self.max_topics
    }

    /// Publish `payload` to `topic`: number it, keep it in the history, and hand the delivery
    /// (encoded once for every subscriber) to `send`. Returns the position assigned.
    pub fn publish(
        &self,
        topic: &str,
        payload: &Payload<'_>,
        send: impl FnOnce(&str),
    ) -> Result<Position, PublishError> {
        Ok(self.publish_with(topic, payload, &PublishOptions::default(), send)?.pos)
    }

    /// Publish with `opts`: a remembered idempotency key answers the first publish's position
    /// and publishes nothing, and a key that could not be remembered for its window publishes
    /// nothing either (`TooManyKeys`); a time to live is recorded with the history entry.
    /// (`exclude` is for `send`.)
    pub fn publish_with(
        &self,
        topic: &str,
        payload: &Payload<'_>,
        opts: &PublishOptions,
        send: impl FnOnce(&str),
    ) -> Result<Published, PublishError> {
        let done = self.with_state(topic, true, |s| {
            let now = Instant::now();
            let mut keys = None;
            if let Some(key) = &opts.idempotency_key {
                let mut held =
                    self.keys[usize::from(opts.from_client)].lock().unwrap_or_else(|e| e.into_inner());
                self.forget_keys(&mut held, now);
                if let Some((epoch, seq)) = held.get(topic, key) {
                    let pos = Position { epoch: epoch.to_string(), seq };
                    return Ok(Published { pos, duplicate: true });
                }
                // A key accepted is remembered for its whole window: past the bound, refuse
                // rather than forget a key a retry may still come with.
                if held.len() >= self.publish.idempotency_max_keys {
                    return Err(PublishError::TooManyKeys);
                }
                keys = Some((held, key));
            }
            s.seq += 1;
            s.last_activity = now;
            let text: Arc<str> = delivery(topic, &s.epoch, s.seq, payload).into();
            self.keep(s, text.clone(), now);
            if let Some(ttl) = opts.ttl
                && s.history.back().is_some_and(|(seq, _, _)| *seq == s.seq)
            {
                s.deadlines.push_back((s.seq, now + ttl));
            }
            if let Some((mut held, key)) = keys {
                held.insert(topic, key, &s.epoch, s.seq, now);
            }
            send(&text);
            Ok(Published { pos: Position { epoch: s.epoch.clone(), seq: s.seq }, duplicate: false })
        })?;
        done.expect("created")
    }

    /// Forget the keys older than the window.
    fn forget_keys(&self, keys: &mut RememberedKeys, now: Instant) {
        if !keys.is_empty()
            && let Some(limit) = now.checked_sub(self.publish.idempotency_window)
        {
            keys.forget_before(limit);
        }
    }

    /// Idempotency keys remembered over all topics.
    pub fn remembered_keys(&self) -> usize {
        self.keys.iter().map(|k| k.lock().unwrap_or_else(|e| e.into_inner()).len()).sum()
    }

    /// Add the newest message to the history within the limits, dropping the oldest first.
    fn keep(&self, s: &mut TopicState, text: Arc<str>, now: Instant) {
        let l = &self.limits;
        let len = text.len();
        if l.size == 0 || len > l.topic_bytes {
            self.clear(s);
            return;
        }
        while s.history.len() >= l.size || s.bytes + len > l.topic_bytes {
            self.pop_oldest(s);
        }
        self.expire(s, now);
        // Over the global budget, this topic's own history goes first; if that is not enough
        // the message is not kept (the history stays gap-free: recovery to before it is then
        // impossible, and said so).
        while self.total.load(Ordering::Relaxed) + len > l.total_bytes && !s.history.is_empty() {
            self.pop_oldest(s);
        }
        if self.total.load(Ordering::Relaxed) + len > l.total_bytes {
            return;
        }
        s.bytes += len;
        self.total.fetch_add(len, Ordering::Relaxed);
        let seq = s.seq;
        s.history.push_back((seq, now, text));
    }

    fn pop_oldest(&self, s: &mut TopicState) {
        if let Some((seq, _, t)) = s.history.pop_front() {
            s.bytes -= t.len();
            self.total.fetch_sub(t.len(), Ordering::Relaxed);
            while s.deadlines.front().is_some_and(|(d, _)| *d <= seq) {
                s.deadlines.pop_front();
            }
        }
    }

    fn clear(&self, s: &mut TopicState) {
        while !s.history.is_empty() {
            self.pop_oldest(s);
        }
    }

    /// Subscribe at the current position: `go_live` runs under the topic's lock, after the
    /// missed messages (if `since` was given) are collected. Recovery that would replay more
    /// than `max_replay` bytes is refused (one connection could not queue it). Returns the
    /// current position and what recovery found.
    pub fn subscribe(
        &self,
        topic: &str,
        since: Option<&Position>,
        max_replay: usize,
        go_live: impl FnOnce(),
    ) -> Result<(Position, Recovery), PublishError> {
        let found = self.with_state(topic, true, |s| {
            let now = Instant::now();
            self.expire(s, now);
            s.last_activity = now;
            let recovery = match since {
                None => Recovery::NotAsked,
                Some(p) if !p.in_epoch(&s.epoch) => {
                    Recovery::Impossible("epoch changed: the topic's history was reset")
                }
                Some(p) if p.seq > s.seq => Recovery::Impossible("position is ahead of the topic"),
                Some(p) if p.seq == s.seq => Recovery::Recovered(Vec::new()),
                Some(p) => {
                    let oldest = s.history.front().map_or(s.seq + 1, |(seq, _, _)| *seq);
                    let missed = s.history.iter().filter(|(seq, _, _)| *seq > p.seq);
                    if oldest > p.seq + 1 {
                        Recovery::Impossible("missed messages are no longer in the history")
                    } else if missed.clone().map(|(_, _, t)| t.len()).sum::<usize>() > max_replay {
                        Recovery::Impossible("missed messages are more than a connection may queue")
                    } else {
                        Recovery::Recovered(missed.map(|(_, _, t)| t.clone()).collect())
                    }
                }
            };
            go_live();
            (Position { epoch: s.epoch.clone(), seq: s.seq }, recovery)
        })?;
        Ok(found.expect("created"))
    }

    /// Read the retained messages of `topic` that `query` asks for, under the topic's lock
    /// (so the page and the position it gives are one moment of the topic). A topic without
    /// state, or without a message yet, gets an empty page without an epoch; reading creates
    /// no state and does not count as activity.
    pub fn history(&self, topic: &str, query: &HistoryQuery) -> HistoryPage {
        let found = self.with_state(topic, false, |s| {
            self.expire(s, Instant::now());
            let first = s.history.front().map(|(seq, _, _)| *seq);
            // Before the first message, no epoch (as in cluster mode): such a topic may be
            // swept at any time and come back in another epoch, and a reader at seq 0 has
            // missed nothing of that one. `since` with no epoch and seq 0 recovers from its
            // first message, where the forgotten epoch would be "epoch changed".
            let epoch = (s.seq > 0).then(|| s.epoch.clone());
            let mut page = HistoryPage::new(epoch, s.seq, first, query);
            let start = s.history.partition_point(|(seq, _, _)| *seq <= query.since);
            for (seq, _, text) in s.history.range(start..) {
                if !page.offer(query, *seq, text.clone()) {
                    break;
                }
            }
            page
        });
        found.ok().flatten().unwrap_or_else(|| HistoryPage::new(None, 0, None, query))
    }

    /// The current position of `topic`, if it has state.
    pub fn position(&self, topic: &str) -> Option<Position> {
        self.with_state(topic, false, |s| Position { epoch: s.epoch.clone(), seq: s.seq }).ok()?
    }

    /// Topics with state.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Bytes of history kept over all topics.
    pub fn history_bytes(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Forget topics nobody subscribes to that never had a message, or whose last activity is
    /// older than the history's lifetime (an hour without one). `subscribers` tells how many
    /// a topic has now. The map is locked only to list and to remove, never while topics are
    /// examined.
    pub fn sweep(&self, subscribers: impl Fn(&str) -> usize) {
        let idle = self.limits.ttl.unwrap_or(Duration::from_secs(3600));
        let now = Instant::now();
        let all: Vec<(String, Arc<Mutex<TopicState>>)> = {
            let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        // Keys past their window go even when nobody publishes with keys any more, so that
        // they do not hold places of the bound. A topic forgotten keeps its keys: a retry is
        // answered the position its first publish had.
        for keys in &self.keys {
            self.forget_keys(&mut keys.lock().unwrap_or_else(|e| e.into_inner()), now);
        }
        for (topic, state) in all {
            if subscribers(&topic) > 0 {
                continue;
            }
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            self.expire(&mut s, now);
            if s.seq > 0 && now.duration_since(s.last_activity) < idle {
                continue;
            }
            // Remove it from the map under the topic's lock: anyone who finds it after this
            // creates a new state, anyone who locked it before sees `removed` and retries.
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            if subscribers(&topic) > 0 || !map.get(&topic).is_some_and(|m| Arc::ptr_eq(m, &state)) {
                continue;
            }
            map.remove(&topic);
            s.removed = true;
            self.clear(&mut s);
        }
    }

    fn expire(&self, s: &mut TopicState, now: Instant) {
        if let Some(ttl) = self.limits.ttl {
            while s.history.front().is_some_and(|(_, at, _)| now.duration_since(*at) > ttl) {
                self.pop_oldest(s);
            }
        }
        // Messages up to the newest expired one are no longer retained: drop them.
        if !s.deadlines.is_empty()
            && let Some(cut) = s.expired_until(now)
        {
            while s.history.front().is_some_and(|(seq, _, _)| *seq <= cut) {
                self.pop_oldest(s);
            }
            s.deadlines.retain(|(seq, _)| *seq > cut);
        }
    }
}

/// A fresh epoch: 64 bits in hex, never the same twice in a thread and unrelated across
/// threads and processes. A publish to a cluster passes one with every topic (the script keeps
/// it only for a new topic), so it is a step of a generator seeded once per thread from the
/// operating system's randomness, not a system call each time.
pub(super) fn new_epoch() -> String {
    thread_local! {
        static NEXT: std::cell::Cell<u64> = std::cell::Cell::new(random_seed());
    }
    // SplitMix64: the state steps by an odd constant (a full cycle of 2^64) and the output
    // is a bijection of the state, so no value repeats within a cycle.
    let state = NEXT.with(|next| {
        let state = next.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        next.set(state);
        state
    });
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    format!("{:016x}", z ^ (z >> 31))
}

/// 64 random bits (without randomness, the clock: unique enough for a seed).
fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b = (t.as_nanos() as u64).to_le_bytes();
    }
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Payload<'_> {
        Payload::Text(s)
    }

    fn limits(size: usize, ttl: Option<Duration>) -> HistoryLimits {
        HistoryLimits { size, ttl, topic_bytes: 1 << 20, total_bytes: 1 << 30 }
    }

    #[test]
    fn recovery_returns_exactly_what_was_missed_or_says_why_not() {
        let topics = Topics::new(limits(3, None), 10);
        let mut sent = Vec::new();
        for m in ["a", "b", "c", "d"] {
            topics.publish("t", &text(m), |d| sent.push(d.to_string())).unwrap();
        }
        let pos = topics.position("t").unwrap();
        assert_eq!(pos.seq, 4);
        let at = |seq| Position { epoch: pos.epoch.clone(), seq };
        let (_, r) = topics.subscribe("t", Some(&at(2)), usize::MAX, || {}).unwrap();
        assert_eq!(r, Recovery::Recovered(vec![sent[2].clone().into(), sent[3].clone().into()]));
        let (_, r) = topics.subscribe("t", Some(&at(4)), usize::MAX, || {}).unwrap();
        assert_eq!(r, Recovery::Recovered(vec![]));
        let (_, r) = topics.subscribe("t", Some(&at(1)), usize::MAX, || {}).unwrap();
        assert_eq!(r, Recovery::Recovered(sent[1..].iter().map(|s| s.clone().into()).collect()));
        let (_, r) = topics.subscribe("t", Some(&at(0)), usize::MAX, || {}).unwrap();
        assert!(matches!(r, Recovery::Impossible(why) if why.contains("no longer")));
        let (_, r) = topics.subscribe("t", Some(&at(9)), usize::MAX, || {}).unwrap();
        assert!(matches!(r, Recovery::Impossible(_)));
        let other = Position { epoch: "x".into(), seq: 1 };
        let (_, r) = topics.subscribe("t", Some(&other), usize::MAX, || {}).unwrap();
        assert!(matches!(r, Recovery::Impossible(why) if why.contains("epoch")));
    }

    #[test]
    fn history_reads_the_retained_messages_and_recovery_goes_on_from_them() {
        let topics = Topics::new(limits(3, None), 10);
        let q = |since, limit| HistoryQuery { since, limit, max_bytes: usize::MAX };
        // No state: no epoch, and reading creates none.
        let page = topics.history("t", &q(0, 10));
        assert_eq!((page.epoch.clone(), page.seq, page.truncated()), (None, 0, false));
        assert_eq!(topics.len(), 0);
        let mut sent = Vec::new();
        for m in ["a", "b", "c", "d", "e"] {
            topics.publish("t", &text(m), |d| sent.push(d.to_string())).unwrap();
        }
        let page = topics.history("t", &q(0, 2));
        let body: serde_json::Value = serde_json::from_str(&page.http_body("t")).unwrap();
        assert_eq!((body["seq"].as_u64(), body["first_seq"].as_u64()), (Some(5), Some(3)));
        assert_eq!((body["truncated"].as_bool(), body["more"].as_bool()), (Some(true), Some(true)));
        let parse = |d: &String| serde_json::from_str::<serde_json::Value>(d).unwrap();
        assert_eq!(body["messages"].as_array().unwrap(), &sent[2..4].iter().map(parse).collect::<Vec<_>>());
        // Recovery from the last message read gives exactly the rest.
        let pos = Position { epoch: page.epoch.clone().unwrap(), seq: 4 };
        let (_, r) = topics.subscribe("t", Some(&pos), usize::MAX, || {}).unwrap();
        assert_eq!(r, Recovery::Recovered(vec![sent[4].clone().into()]));
        let page = topics.history("t", &q(3, 10));
        assert!(!page.truncated() && !page.more());
        // A client that saw the topic without state recovers from its first message.
        let fresh = Topics::new(limits(3, None), 10);
        fresh.publish("n", &text("x"), |_| {}).unwrap();
        let nothing = Position { epoch: String::new(), seq: 0 };
        let (_, r) = fresh.subscribe("n", Some(&nothing), usize::MAX, || {}).unwrap();
        assert!(matches!(r, Recovery::Recovered(m) if m.len() == 1));
        let (_, r) = fresh.subscribe("n", Some(&Position { seq: 1, ..nothing }), usize::MAX, || {}).unwrap();
        assert!(matches!(r, Recovery::Impossible(why) if why.contains("epoch")));
    }

    #[test]
    fn epochs_are_sixteen_hex_digits_never_repeated() {
        let here: std::collections::HashSet<String> = (0..10_000).map(|_| new_epoch()).collect();
        assert_eq!(here.len(), 10_000);
        assert!(here.iter().all(|e| e.len() == 16 && e.bytes().all(|c| c.is_ascii_hexdigit())));
        // Another thread starts from a seed of its own.
        let there =
            std::thread::spawn(|| (0..10_000).map(|_| new_epoch()).collect::<Vec<_>>()).join().unwrap();
        assert!(there.iter().all(|e| !here.contains(e)));
    }

    #[test]
    fn a_topic_without_messages_has_no_epoch_to_lose() {
        let topics = Topics::new(limits(3, None), 10);
        // State (a subscription made it), but no message: the history read gives no epoch...
        topics.subscribe("t", None, usize::MAX, || {}).unwrap();
        let page = topics.history("t", &HistoryQuery { since: 0, limit: 10, max_bytes: usize::MAX });
        assert_eq!((page.epoch.clone(), page.seq, topics.len()), (None, 0, 1));
        // ...so once the sweep forgot the topic and it started again, the position it gave
        // recovers everything of the new epoch.
        let pos = Position { epoch: page.epoch.unwrap_or_default(), seq: page.seq };
        topics.sweep(|_| 0);
        assert_eq!(topics.len(), 0);
        let mut sent = Vec::new();
        topics.publish("t", &text("a"), |d| sent.push(d.to_string())).unwrap();
        let (_, r) = topics.subscribe("t", Some(&pos), usize::MAX, || {}).unwrap();
        assert_eq!(r, Recovery::Recovered(vec![sent[0].clone().into()]));
    }

    #[test]
    fn a_remembered_idempotency_key_answers_the_first_position_and_publishes_nothing() {
        let bound = PublishLimits { idempotency_max_keys: 2, ..PublishLimits::default() };
        let topics = Topics::new(limits(10, None), 10).with_publish_limits(bound);
        let keyed = |k: &str| PublishOptions { idempotency_key: Some(k.into()), ..PublishOptions::default() };
        let mut sent = 0;
        let first = topics.publish_with("t", &text("a"), &keyed("k1"), |_| sent += 1).unwrap();
        let again = topics.publish_with("t", &text("a"), &keyed("k1"), |_| sent += 1).unwrap();
        assert_eq!((first.duplicate, again.duplicate, sent), (false, true, 1));
        assert_eq!(again.pos, first.pos);
        // Keys are per topic.
        assert!(!topics.publish_with("u", &text("a"), &keyed("k1"), |_| {}).unwrap().duplicate);
        // Past the bound, a new key is refused, publishing nothing, and every key accepted is
        // still remembered; a publish without a key goes on.
        assert_eq!(topics.remembered_keys(), 2);
        let full = topics.publish_with("t", &text("b"), &keyed("k2"), |_| sent += 1);
        assert_eq!((full, sent), (Err(PublishError::TooManyKeys), 1));
        assert!(topics.publish_with("t", &text("a"), &keyed("k1"), |_| {}).unwrap().duplicate);
        assert!(topics.publish_with("u", &text("a"), &keyed("k1"), |_| {}).unwrap().duplicate);
        topics.publish("t", &text("c"), |_| {}).unwrap();
        assert_eq!(topics.position("t").unwrap().seq, 2);
        // Clients have a bound of their own: keys of clients on other topics cannot make the
        // HTTP API's keys be forgotten or refused.
        let topics = Topics::new(limits(10, Some(Duration::ZERO)), 10).with_publish_limits(bound);
        let client = |k: &str| PublishOptions { from_client: true, ..keyed(k) };
        topics.publish_with("orders:1", &text("a"), &keyed("o1"), |_| {}).unwrap();
        for k in ["c1", "c2"] {
            topics.publish_with(&format!("chat:{k}"), &text("a"), &client(k), |_| {}).unwrap();
        }
        let more = topics.publish_with("chat:x", &text("a"), &client("c3"), |_| {});
        assert_eq!(more, Err(PublishError::TooManyKeys));
        assert!(topics.publish_with("orders:1", &text("a"), &keyed("o1"), |_| {}).unwrap().duplicate);
        assert!(!topics.publish_with("orders:1", &text("b"), &keyed("o2"), |_| {}).unwrap().duplicate);
        assert!(topics.publish_with("orders:1", &text("b"), &keyed("o2"), |_| {}).unwrap().duplicate);
        // A topic forgotten by a sweep keeps its keys: a retry is answered the first position.
        let before = topics.position("chat:c1").unwrap();
        topics.sweep(|_| 0);
        assert_eq!(topics.len(), 0);
        let again = topics.publish_with("chat:c1", &text("a"), &client("c1"), |_| {}).unwrap();
        assert_eq!((again.duplicate, again.pos), (true, before));
        // Past the window, a sweep forgets keys even of topics that stay.
        let brief =
            PublishLimits { idempotency_window: Duration::from_millis(1), ..PublishLimits::default() };
        let topics = Topics::new(limits(10, None), 10).with_publish_limits(brief);
        topics.publish_with("t", &text("a"), &keyed("k1"), |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        topics.sweep(|_| 1);
        assert_eq!((topics.remembered_keys(), topics.len()), (0, 1));
        assert!(!topics.publish_with("t", &text("a"), &keyed("k1"), |_| {}).unwrap().duplicate);
    }

    #[test]
    fn an_expired_message_ends_the_history_before_it() {
        let topics = Topics::new(limits(10, None), 10);
        let short = PublishOptions { ttl: Some(Duration::from_millis(1)), ..PublishOptions::default() };
        topics.publish("t", &text("a"), |_| {}).unwrap();
        topics.publish_with("t", &text("b"), &short, |_| {}).unwrap();
        topics.publish("t", &text("c"), |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let page = topics.history("t", &HistoryQuery { since: 0, limit: 10, max_bytes: usize::MAX });
        let body: serde_json::Value = serde_json::from_str(&page.http_body("t")).unwrap();
        assert_eq!((body["first_seq"].as_u64(), body["truncated"].as_bool()), (Some(3), Some(true)));
        assert_eq!(body["messages"].as_array().unwrap().len(), 1);
        let epoch = topics.position("t").unwrap().epoch;
        let (_, r) = topics
            .subscribe("t", Some(&Position { epoch: epoch.clone(), seq: 1 }), usize::MAX, || {})
            .unwrap();
        assert!(matches!(r, Recovery::Impossible(why) if why.contains("no longer")));
        let (_, r) = topics.subscribe("t", Some(&Position { epoch, seq: 2 }), usize::MAX, || {}).unwrap();
        assert!(matches!(r, Recovery::Recovered(m) if m.len() == 1));
    }

    #[test]
    fn a_replay_too_big_for_one_connection_is_refused() {
        let topics = Topics::new(limits(10, None), 10);
        for _ in 0..4 {
            topics.publish("t", &text(&"x".repeat(100)), |_| {}).unwrap();
        }
        let p = topics.position("t").unwrap();
        let since = Position { epoch: p.epoch, seq: 0 };
        let (_, r) = topics.subscribe("t", Some(&since), 300, || {}).unwrap();
        assert!(matches!(r, Recovery::Impossible(why) if why.contains("queue")));
        let (_, r) = topics.subscribe("t", Some(&since), 10_000, || {}).unwrap();
        assert!(matches!(r, Recovery::Recovered(m) if m.len() == 4));
    }

    #[test]
    fn history_stays_within_its_byte_budgets_and_gap_free() {
        let l = HistoryLimits { size: 100, ttl: None, topic_bytes: 1000, total_bytes: 1500 };
        let topics = Topics::new(l, 10);
        let body = "y".repeat(200);
        for _ in 0..10 {
            topics.publish("a", &text(&body), |_| {}).unwrap();
        }
        assert!(topics.history_bytes() <= 1000, "per-topic budget: {}", topics.history_bytes());
        for _ in 0..10 {
            topics.publish("b", &text(&body), |_| {}).unwrap();
        }
        assert!(topics.history_bytes() <= 1500, "global budget: {}", topics.history_bytes());
        // Whatever was evicted, what is kept is the newest messages without a gap.
        let pos = topics.position("b").unwrap();
        let (_, r) =
            topics.subscribe("b", Some(&Position { seq: 9, ..pos.clone() }), usize::MAX, || {}).unwrap();
        assert!(matches!(r, Recovery::Recovered(m) if m.len() == 1));
        let (_, r) = topics.subscribe("b", Some(&Position { seq: 0, ..pos }), usize::MAX, || {}).unwrap();
        assert!(matches!(r, Recovery::Impossible(_)));
    }

    #[test]
    fn topics_are_bounded_and_idle_ones_are_swept() {
        let topics = Topics::new(limits(3, Some(Duration::ZERO)), 3);
        topics.publish("a", &text("x"), |_| {}).unwrap();
        topics.publish("b", &text("x"), |_| {}).unwrap();
        // A subscription creates state; once nobody is subscribed, a topic that never had a
        // message goes at the next sweep.
        topics.subscribe("c", None, usize::MAX, || {}).unwrap();
        assert_eq!(topics.publish("d", &text("x"), |_| {}), Err(PublishError::TooManyTopics));
        assert!(!topics.room_for(&["d".into()]));
        std::thread::sleep(Duration::from_millis(5));
        topics.sweep(|t| usize::from(t == "a"));
        assert_eq!(topics.len(), 1);
        // A topic listed twice takes one place.
        let limited = Topics::new(limits(3, None), 1);
        assert!(limited.room_for(&["n".into(), "n".into()]));
        assert!(!limited.room_for(&["n".into(), "m".into()]));
        assert!(topics.position("a").is_some());
        assert_eq!(
            topics.history_bytes(),
            topics
                .position("a")
                .map_or(0, |_| { delivery("a", &topics.position("a").unwrap().epoch, 1, &text("x")).len() })
        );
    }
}
