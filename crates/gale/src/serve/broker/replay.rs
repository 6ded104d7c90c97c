//! Replays for recovering subscriptions, read from the topics' logs once for all the subscribes
//! that queued up together (a reconnect storm's clients come back within moments of each other,
//! most at the same position), not once per client: read ahead for a batch of requests, all its
//! topics in one round trip per node, and extended only where a subscribe needs more.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::forward::{LOG_PAGE, LogPage, each_delivery, position_of, read_log, redis_ms};
use super::scripts::Lua;
use super::topology::Redis;

/// Past this many bytes of deliveries held, the spans are dropped before the next read: the
/// memory a batch of requests may hold for replays, whatever the histories' sizes.
const MAX_HELD: usize = 8 << 20;

/// The most entries of one topic's log read ahead for a batch, one page: a longer replay is
/// read page by page when its subscribe comes, so that its size is checked as it is read.
const MAX_AHEAD: u64 = LOG_PAGE as u64;

/// The most bytes of one topic's log read ahead for a batch: with at most `BATCH` topics, a
/// read-ahead's answer stays under 16 MiB, whatever the messages' sizes.
const AHEAD_BYTES: usize = 64 << 10;

/// Why a replay cannot be made: the log no longer holds every missed message.
const GONE: &str = "missed messages are no longer in the history";

/// Why a replay is refused: it is more than the connection may queue.
const TOO_LARGE: &str = "missed messages are more than a connection may queue";

/// One entry of a topic's log.
struct Entry {
    seq: u64,
    delivery: String,
    /// When a message published with a time to live expires (ms, Redis's clock).
    expires: Option<u64>,
}

/// What was read of one topic's log: every entry it held for the sequence numbers `from..=to`
/// of `epoch`, in order.
struct Span {
    epoch: String,
    from: u64,
    to: u64,
    entries: Vec<Entry>,
}

/// A range of a topic's log that the subscribes of a batch will replay.
pub(super) struct Wanted {
    pub(super) topic: String,
    pub(super) log: String,
    pub(super) slot: u16,
    pub(super) epoch: String,
    pub(super) from: u64,
    pub(super) to: u64,
    /// The most any of those subscribes may be replayed.
    pub(super) max_bytes: usize,
}

/// The spans of topics' logs read for the subscribes of one batch of requests; emptied when
/// the next batch begins (`clear`), so no answer comes from a read older than its batch.
#[derive(Default)]
pub(super) struct LogSpans {
    spans: HashMap<String, Span>,
    /// Bytes of deliveries held in `spans`.
    held: usize,
    /// The version of the slot map they were read under.
    generation: u64,
}

impl LogSpans {
    /// The deliveries a client at `since` missed of `topic` (whose log is `log`), in `epoch`, up
    /// to `last`: from what this batch already read of the topic where that holds `since + 1`,
    /// reading only what lies after it; otherwise read page by page (and kept for the others
    /// if nothing of the topic is). Refused when they pass `max_bytes` (a read stops there), or
    /// when the log no longer holds every one of them. `reads` counts the reads of the log.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn replay(
        &mut self,
        cmd: &mut redis::Connection,
        topic: &str,
        log: &str,
        epoch: &str,
        since: u64,
        last: u64,
        max_bytes: usize,
        reads: &AtomicU64,
    ) -> redis::RedisResult<Result<Vec<String>, &'static str>> {
        if since >= last {
            return Ok(Ok(Vec::new()));
        }
        if self.held > MAX_HELD {
            self.clear();
        }
        let (from, to) = (since + 1, last);
        let mine = |s: &Span| s.epoch == epoch;
        let holds_from = |s: &Span| mine(s) && s.from <= from && from <= s.to.saturating_add(1);
        match self.spans.get_mut(topic) {
            Some(span) if holds_from(span) => {
                if to > span.to {
                    let (after, whole) = read_range(cmd, log, span.to + 1, to, max_bytes, reads)?;
                    if !whole {
                        // Past the budget: refused, and the part read is not kept.
                        let kept = span.entries.iter().filter(|e| e.seq >= from);
                        return Ok(cut_short(missed_in(kept.chain(&after), since, last, max_bytes)));
                    }
                    self.held += held_by(&after);
                    span.entries.extend(after);
                    span.to = to;
                }
            }
            span => {
                let keep = span.is_none_or(|s| !mine(s));
                let (entries, whole) = read_range(cmd, log, from, to, max_bytes, reads)?;
                if !whole {
                    return Ok(cut_short(missed_in(entries.iter(), since, last, max_bytes)));
                }
                if !keep {
                    // The batch keeps another part of this topic's log: answered from this read.
                    return answer(cmd, entries.iter(), epoch, since, last, max_bytes);
                }
                let bytes = held_by(&entries);
                self.keep(topic.to_string(), Span { epoch: epoch.to_string(), from, to, entries }, bytes);
            }
        }
        let Some(span) = self.spans.get(topic) else { return Ok(Err(GONE)) };
        let start = span.entries.partition_point(|e| e.seq < from);
        let missed = span.entries[start..].iter().take_while(|e| e.seq <= to);
        answer(cmd, missed, epoch, since, last, max_bytes)
    }

    /// Read ahead, in one pipelined round trip per node, the ranges `wanted` names (per topic,
    /// with its log, slot and epoch, the sequence numbers the subscribes of this batch will
    /// replay) with `script` (`READ_AHEAD_LUA`): at most `MAX_AHEAD` entries and
    /// `AHEAD_BYTES` per topic, so the answer is bounded whatever the messages' sizes. A range
    /// longer than that, or one Redis does not answer, is left to its subscribes. `reads`
    /// counts the ranges asked for.
    pub(super) fn read_ahead(
        &mut self,
        redis: &mut Redis,
        script: &Lua,
        wanted: Vec<Wanted>,
        reads: &AtomicU64,
    ) {
        let wanted: Vec<Wanted> =
            wanted.into_iter().filter(|w| w.from <= w.to && w.to - w.from < MAX_AHEAD).collect();
        if wanted.is_empty() {
            return;
        }
        self.under(redis.generation());
        let cmds: Vec<(u16, redis::Cmd)> = wanted
            .iter()
            .map(|w| {
                let mut cmd = script.call();
                cmd.arg(1).arg(&w.log).arg(w.from).arg(w.to).arg(w.max_bytes.min(AHEAD_BYTES));
                (w.slot, cmd)
            })
            .collect();
        reads.fetch_add(cmds.len() as u64, Ordering::Relaxed);
        let (answers, _) = redis.pipeline(&cmds, None);
        for (w, answer) in wanted.into_iter().zip(answers) {
            let read =
                answer.and_then(|v| redis::from_redis_value::<(LogPage, u8)>(v).map_err(|e| e.to_string()));
            // Cut short by the budget: left to the subscribes, which read it page by page.
            let Ok((page, 1)) = read else { continue };
            let (mut entries, mut bytes) = (Vec::new(), 0);
            let (_, whole) = each_delivery(page, |seq, delivery, expires, _| {
                bytes += delivery.len();
                entries.push(Entry { seq, delivery, expires });
                true
            });
            if !whole || self.held + bytes > MAX_HELD {
                continue;
            }
            self.keep(w.topic, Span { epoch: w.epoch, from: w.from, to: w.to, entries }, bytes);
        }
    }

    /// Keep `span`, whose entries hold `bytes`, as what was read of `topic`, in place of what
    /// was.
    fn keep(&mut self, topic: String, span: Span, bytes: usize) {
        self.held += bytes;
        if let Some(old) = self.spans.insert(topic, span) {
            self.held -= held_by(&old.entries);
        }
    }

    /// Forget every span if the slot map changed since they were read (a failover: the node
    /// that serves a topic now may not hold all that its old primary did).
    pub(super) fn under(&mut self, generation: u64) -> &mut LogSpans {
        if generation != self.generation {
            self.clear();
            self.generation = generation;
        }
        self
    }

    /// Forget every span: the batch of requests they were read for is over.
    pub(super) fn clear(&mut self) {
        self.spans.clear();
        self.held = 0;
    }
}

/// The entries of `log` for the sequence numbers `from..=to`, in order (those it holds), and
/// false if the read stopped at the entry that took it past `budget` bytes (a gap, or an entry
/// not of ours, is for `missed_in` to find).
fn read_range(
    cmd: &mut redis::Connection,
    log: &str,
    from: u64,
    to: u64,
    budget: usize,
    reads: &AtomicU64,
) -> redis::RedisResult<(Vec<Entry>, bool)> {
    reads.fetch_add(1, Ordering::Relaxed);
    let (mut entries, mut bytes) = (Vec::new(), 0);
    // A replay includes the messages a publisher left itself out of, as on a single node: it
    // asked for what it missed.
    read_log(cmd, log, from, Some(to), |seq, delivery, expires, _| {
        bytes += delivery.len();
        entries.push(Entry { seq, delivery, expires });
        bytes <= budget
    })?;
    Ok((entries, bytes <= budget))
}

/// The replay of `entries` (the log's from `since + 1` on) to a client at `since` in `epoch`
/// with the topic at `last`, or why not. A log that Redis started again meanwhile (its
/// entries of another epoch) no longer holds what the client missed, and neither does one
/// whose missed message's time to live has passed; Redis's clock is asked only when a missed
/// message has one, so every other recovery (a reconnect storm's thousands) takes no round
/// trip for it.
fn answer<'a>(
    cmd: &mut redis::Connection,
    entries: impl Iterator<Item = &'a Entry>,
    epoch: &str,
    since: u64,
    last: u64,
    max_bytes: usize,
) -> redis::RedisResult<Result<Vec<String>, &'static str>> {
    let missed = match missed_in(entries, since, last, max_bytes) {
        Ok(missed) => missed,
        Err(why) => return Ok(Err(why)),
    };
    if !missed.iter().all(|e| of_epoch(e, epoch)) {
        return Ok(Err(GONE));
    }
    if missed.iter().any(|e| e.expires.is_some()) {
        let now = redis_ms(redis::cmd("TIME").query(cmd)?);
        if missed.iter().any(|e| e.expires.is_some_and(|x| x <= now)) {
            return Ok(Err(GONE));
        }
    }
    Ok(Ok(missed.iter().map(|e| e.delivery.clone()).collect()))
}

/// Whether `entry` is the message of its sequence number in `epoch` (its delivery says so).
fn of_epoch(entry: &Entry, epoch: &str) -> bool {
    position_of(&entry.delivery).is_some_and(|(e, seq)| e == epoch && seq == entry.seq)
}

/// The answer to a replay whose read stopped past the connection's budget: refused, for why
/// the entries read say (the log may have lacked one before the budget was passed).
fn cut_short(read: Result<Vec<&Entry>, &'static str>) -> Result<Vec<String>, &'static str> {
    Err(read.err().unwrap_or(TOO_LARGE))
}

fn held_by(entries: &[Entry]) -> usize {
    entries.iter().map(|e| e.delivery.len()).sum()
}

/// The entries missed by a client at `since` with the topic at `last`, from `entries` (the
/// log's from `since + 1` on, in order): all of `since + 1..=last`, one after the other, or why
/// not.
fn missed_in<'a>(
    entries: impl Iterator<Item = &'a Entry>,
    since: u64,
    last: u64,
    max_bytes: usize,
) -> Result<Vec<&'a Entry>, &'static str> {
    let (mut missed, mut bytes) = (Vec::new(), 0);
    for e in entries {
        if e.seq != since + 1 + missed.len() as u64 {
            return Err(GONE);
        }
        bytes += e.delivery.len();
        if bytes > max_bytes {
            return Err(TOO_LARGE);
        }
        missed.push(e);
    }
    if missed.len() as u64 != last - since {
        return Err(GONE);
    }
    Ok(missed)
}

#[cfg(test)]
mod tests {
    use super::{Entry, GONE, TOO_LARGE, missed_in, of_epoch};

    fn log(seqs: &[u64]) -> Vec<Entry> {
        seqs.iter().map(|&seq| Entry { seq, delivery: format!("m{seq}"), expires: None }).collect()
    }

    #[test]
    fn an_entry_of_another_epoch_is_not_the_message_missed() {
        let entry = |delivery: &str| Entry { seq: 5, delivery: delivery.to_string(), expires: None };
        assert!(of_epoch(&entry(r#"{"topic":"t","epoch":"e1","seq":5,"data":1}"#), "e1"));
        assert!(!of_epoch(&entry(r#"{"topic":"t","epoch":"e2","seq":5,"data":1}"#), "e1"));
        assert!(!of_epoch(&entry(r#"{"topic":"t","epoch":"e1","seq":6,"data":1}"#), "e1"));
        assert!(!of_epoch(&entry("not a delivery"), "e1"));
    }

    fn seqs(r: Result<Vec<&Entry>, &'static str>) -> Result<Vec<u64>, &'static str> {
        r.map(|m| m.iter().map(|e| e.seq).collect())
    }

    #[test]
    fn a_replay_is_every_message_after_the_position_up_to_the_last() {
        let entries = log(&[5, 6, 7]);
        assert_eq!(seqs(missed_in(entries.iter(), 4, 7, 1 << 20)), Ok(vec![5, 6, 7]));
    }

    #[test]
    fn a_replay_with_a_message_missing_from_the_log_is_refused() {
        // Trimmed from the front, a hole, or cut short at the end.
        assert_eq!(seqs(missed_in(log(&[6, 7]).iter(), 4, 7, 1 << 20)), Err(GONE));
        assert_eq!(seqs(missed_in(log(&[5, 7]).iter(), 4, 7, 1 << 20)), Err(GONE));
        assert_eq!(seqs(missed_in(log(&[5, 6]).iter(), 4, 7, 1 << 20)), Err(GONE));
    }

    #[test]
    fn a_replay_larger_than_the_connection_may_queue_is_refused() {
        // Three messages of two bytes each.
        assert_eq!(seqs(missed_in(log(&[5, 6, 7]).iter(), 4, 7, 6)), Ok(vec![5, 6, 7]));
        assert_eq!(seqs(missed_in(log(&[5, 6, 7]).iter(), 4, 7, 5)), Err(TOO_LARGE));
    }
}
