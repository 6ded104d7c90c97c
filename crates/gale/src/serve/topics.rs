//! Per-topic state: the sequence number, the epoch, and the recent history that lets a client
//! that reconnects get exactly what it missed.
//!
//! Publishing to a topic and subscribing to it with recovery both run under the topic's lock:
//! the next sequence number, the history entry and the hand-off to the event loops happen
//! together, and a subscriber replays the history and goes live at one point between two
//! publishes (the server's pub/sub skips messages published before a subscription; see
//! `gale_server`'s `subscribe`), so nothing is lost or delivered twice.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::protocol::{Payload, delivery};

/// Where a client stands in a topic's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// The topic's epoch: changes when its numbering restarts (a restart, or state expired).
    pub epoch: String,
    /// The last sequence number received.
    pub seq: u64,
}

/// One topic.
struct TopicState {
    epoch: String,
    seq: u64,
    /// (seq, when, the delivery as sent) of the last messages, oldest first.
    history: VecDeque<(u64, Instant, Arc<str>)>,
    last_activity: Instant,
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
}

/// The gateway's topics.
pub struct Topics {
    map: Mutex<HashMap<String, Arc<Mutex<TopicState>>>>,
    history_size: usize,
    history_ttl: Option<Duration>,
    max_topics: usize,
}

impl Topics {
    /// Topics keeping `history_size` messages for at most `history_ttl`.
    pub fn new(history_size: usize, history_ttl: Option<Duration>, max_topics: usize) -> Self {
        Topics { map: Mutex::default(), history_size, history_ttl, max_topics }
    }

    fn state(&self, topic: &str, create: bool) -> Result<Option<Arc<Mutex<TopicState>>>, PublishError> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(topic) {
            return Ok(Some(s.clone()));
        }
        if !create {
            return Ok(None);
        }
        if map.len() >= self.max_topics {
            return Err(PublishError::TooManyTopics);
        }
        let state = Arc::new(Mutex::new(TopicState {
            epoch: new_epoch(),
            seq: 0,
            history: VecDeque::new(),
            last_activity: Instant::now(),
        }));
        map.insert(topic.to_string(), state.clone());
        Ok(Some(state))
    }

    /// Publish `payload` to `topic`: number it, keep it in the history, and hand the delivery
    /// (encoded once for every subscriber) to `send`. Returns the position assigned.
    pub fn publish(
        &self,
        topic: &str,
        payload: &Payload<'_>,
        send: impl FnOnce(&str),
    ) -> Result<Position, PublishError> {
        let state = self.state(topic, true)?.expect("created");
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        s.seq += 1;
        let now = Instant::now();
        s.last_activity = now;
        let text: Arc<str> = delivery(topic, &s.epoch, s.seq, payload).into();
        if self.history_size > 0 {
            if s.history.len() == self.history_size {
                s.history.pop_front();
            }
            let seq = s.seq;
            s.history.push_back((seq, now, text.clone()));
        }
        self.expire(&mut s, now);
        send(&text);
        Ok(Position { epoch: s.epoch.clone(), seq: s.seq })
    }

    /// Subscribe at the current position: `go_live` runs under the topic's lock, after the
    /// missed messages (if `since` was given) are collected. Returns the current position and
    /// what recovery found.
    pub fn subscribe(
        &self,
        topic: &str,
        since: Option<&Position>,
        go_live: impl FnOnce(),
    ) -> Result<(Position, Recovery), PublishError> {
        let state = self.state(topic, true)?.expect("created");
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        self.expire(&mut s, now);
        s.last_activity = now;
        let recovery = match since {
            None => Recovery::NotAsked,
            Some(p) if p.epoch != s.epoch => {
                Recovery::Impossible("epoch changed: the topic's history was reset")
            }
            Some(p) if p.seq > s.seq => Recovery::Impossible("position is ahead of the topic"),
            Some(p) if p.seq == s.seq => Recovery::Recovered(Vec::new()),
            Some(p) => {
                let oldest = s.history.front().map_or(s.seq + 1, |(seq, _, _)| *seq);
                if oldest > p.seq + 1 {
                    Recovery::Impossible("missed messages are no longer in the history")
                } else {
                    Recovery::Recovered(
                        s.history
                            .iter()
                            .filter(|(seq, _, _)| *seq > p.seq)
                            .map(|(_, _, t)| t.clone())
                            .collect(),
                    )
                }
            }
        };
        go_live();
        Ok((Position { epoch: s.epoch.clone(), seq: s.seq }, recovery))
    }

    /// The current position of `topic`, if it has state.
    pub fn position(&self, topic: &str) -> Option<Position> {
        let state = self.state(topic, false).ok()??;
        let s = state.lock().unwrap_or_else(|e| e.into_inner());
        Some(Position { epoch: s.epoch.clone(), seq: s.seq })
    }

    /// Topics with state.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Forget topics nobody subscribes to whose history has expired (or that had no activity
    /// for the history's lifetime, or an hour without one). `subscribers` tells how many a
    /// topic has now.
    pub fn sweep(&self, subscribers: impl Fn(&str) -> usize) {
        let idle = self.history_ttl.unwrap_or(Duration::from_secs(3600));
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|topic, state| {
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            self.expire(&mut s, now);
            subscribers(topic) > 0 || now.duration_since(s.last_activity) < idle
        });
    }

    fn expire(&self, s: &mut TopicState, now: Instant) {
        if let Some(ttl) = self.history_ttl {
            while s.history.front().is_some_and(|(_, at, _)| now.duration_since(*at) > ttl) {
                s.history.pop_front();
            }
        }
    }
}

/// A fresh epoch: 64 random bits in hex.
fn new_epoch() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // Unique enough without randomness: the clock.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b = (t.as_nanos() as u64).to_le_bytes();
    }
    format!("{:016x}", u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Payload<'_> {
        Payload::Text(s)
    }

    #[test]
    fn recovery_returns_exactly_what_was_missed_or_says_why_not() {
        let topics = Topics::new(3, None, 10);
        let mut sent = Vec::new();
        for m in ["a", "b", "c", "d"] {
            topics.publish("t", &text(m), |d| sent.push(d.to_string())).unwrap();
        }
        let pos = topics.position("t").unwrap();
        assert_eq!(pos.seq, 4);
        let at = |seq| Position { epoch: pos.epoch.clone(), seq };
        let (_, r) = topics.subscribe("t", Some(&at(2)), || {}).unwrap();
        assert_eq!(r, Recovery::Recovered(vec![sent[2].clone().into(), sent[3].clone().into()]));
        let (_, r) = topics.subscribe("t", Some(&at(4)), || {}).unwrap();
        assert_eq!(r, Recovery::Recovered(vec![]));
        let (_, r) = topics.subscribe("t", Some(&at(1)), || {}).unwrap();
        assert_eq!(r, Recovery::Recovered(sent[1..].iter().map(|s| s.clone().into()).collect()));
        let (_, r) = topics.subscribe("t", Some(&at(0)), || {}).unwrap();
        assert!(matches!(r, Recovery::Impossible(why) if why.contains("no longer")));
        let (_, r) = topics.subscribe("t", Some(&at(9)), || {}).unwrap();
        assert!(matches!(r, Recovery::Impossible(_)));
        let other = Position { epoch: "x".into(), seq: 1 };
        let (_, r) = topics.subscribe("t", Some(&other), || {}).unwrap();
        assert!(matches!(r, Recovery::Impossible(why) if why.contains("epoch")));
    }

    #[test]
    fn topics_are_bounded_and_idle_ones_are_swept() {
        let topics = Topics::new(3, Some(Duration::ZERO), 2);
        topics.publish("a", &text("x"), |_| {}).unwrap();
        topics.publish("b", &text("x"), |_| {}).unwrap();
        assert_eq!(topics.publish("c", &text("x"), |_| {}), Err(PublishError::TooManyTopics));
        std::thread::sleep(Duration::from_millis(5));
        topics.sweep(|t| usize::from(t == "a"));
        assert_eq!(topics.len(), 1);
        assert!(topics.position("a").is_some());
    }
}
