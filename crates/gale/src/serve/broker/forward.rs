//! Forwarding into the event loops: once and in order per node, catch-up from the topic logs,
//! subscriptions with recovery (the replay), and history reads.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use gale_server::{ConnId, HttpResponse};
use serde_json::value::RawValue;

use super::super::api::json_error;
use super::super::gateway::Client;
use super::super::history::{HistoryPage, HistoryQuery};
use super::super::presence::is_event;
use super::super::protocol::{CommandError, Reply, error_reply};
use super::super::topics::{Position, PublishError};
use super::listener::Listen;
use super::replay::Wanted;
use super::scripts::Layout;
use super::topology::{COMMAND_TIMEOUT, unavailable};
use super::{Broker, BrokerRequest, HistoryReply, Shared};

/// What the broker knows of a topic this node forwards.
pub(super) struct Forwarding {
    pub(super) epoch: String,
    /// The last sequence number forwarded into this node.
    pub(super) last: u64,
}

impl Forwarding {
    /// The topic's epoch in Redis is `epoch`: if that is a new one (Redis lost the topic's
    /// state), forward it from its first message.
    pub(super) fn set_epoch(&mut self, epoch: &str) {
        if self.epoch != epoch {
            self.epoch = epoch.to_string();
            self.last = 0;
        }
    }
}

/// The start of a channel message that is not to be delivered to one connection: `\u{1}`,
/// the node, `:`, the connection's id, a newline; then the delivery.
pub(super) const EXCLUDE_MARK: char = '\u{1}';

/// What goes before a delivery on the channel for a publish that leaves out `exclude` on
/// `node`.
pub(super) fn exclusion_prefix(node: &str, exclude: Option<ConnId>) -> String {
    exclude.map_or_else(String::new, |c| format!("{EXCLUDE_MARK}{node}:{}\n", c.to_bits()))
}

/// A channel message's delivery, and the connection of `node` not to deliver it to.
pub(super) fn split_exclusion<'a>(message: &'a str, node: &str) -> (&'a str, Option<ConnId>) {
    let Some(rest) = message.strip_prefix(EXCLUDE_MARK) else { return (message, None) };
    let Some((head, delivery)) = rest.split_once('\n') else { return (message, None) };
    (delivery, excluded_on(head, node))
}

/// The connection of `node` that `prefix` (as `exclusion_prefix` made it, kept with a log
/// entry) leaves out.
pub(super) fn exclusion_of(prefix: &str, node: &str) -> Option<ConnId> {
    excluded_on(prefix.strip_prefix(EXCLUDE_MARK)?.strip_suffix('\n')?, node)
}

/// The connection named by `node:conn` if the node is `node`.
pub(super) fn excluded_on(head: &str, node: &str) -> Option<ConnId> {
    head.split_once(':').filter(|(n, _)| *n == node).and_then(|(_, c)| c.parse().ok()).map(ConnId::from_bits)
}

/// Entries of a topic's log read per round trip: a replay or a catch-up holds at most this many
/// beyond what it keeps, however long the history.
pub(super) const LOG_PAGE: usize = 32;

/// A page of a topic's log as Redis answers `XRANGE`: each entry's id and fields.
pub(super) type LogPage = Vec<(String, Vec<(String, String)>)>;

/// The `XRANGE` of `log` from sequence number `from` to `to` (inclusive; `None`: to its end),
/// at most `count` entries.
fn log_range(log: &str, from: u64, to: Option<u64>, count: usize) -> redis::Cmd {
    let end = to.map_or_else(|| "+".to_string(), |t| format!("{t}-1"));
    let mut cmd = redis::cmd("XRANGE");
    cmd.arg(log).arg(format!("{from}-1")).arg(end).arg("COUNT").arg(count);
    cmd
}

/// Hand the deliveries of `page` to `each` (as `read_log` does) until it returns false; the
/// sequence number of the last entry, and whether the page went on to its end (false: `each`
/// stopped, or an id not of the form `seq-n`, none of ours, ended the log there).
pub(super) fn each_delivery(
    page: LogPage,
    mut each: impl FnMut(u64, String, Option<u64>, Option<String>) -> bool,
) -> (u64, bool) {
    let mut reached = 0;
    for (id, fields) in page {
        let Some(seq) = entry_seq(&id) else { return (reached, false) };
        reached = seq;
        let expires = fields.iter().find(|(k, _)| k == "x").and_then(|(_, x)| x.parse().ok());
        let exclude = fields.iter().find(|(k, _)| k == "e").map(|(_, e)| e.clone());
        if let Some((_, d)) = fields.into_iter().find(|(k, _)| k == "d")
            && !each(seq, d, expires, exclude)
        {
            return (reached, false);
        }
    }
    (reached, true)
}

/// Read the deliveries of a topic's log from sequence number `from` to `to` (inclusive; `None`:
/// to its end), page by page, handing each with its sequence number, its expiry (ms,
/// Redis's clock; for messages published with a time to live) and the connection it leaves
/// out (`exclusion_prefix`, for a publish with `exclude_self`) to `each` until it returns
/// false. Entries without a delivery are skipped.
pub(super) fn read_log(
    cmd: &mut redis::Connection,
    log: &str,
    mut from: u64,
    to: Option<u64>,
    mut each: impl FnMut(u64, String, Option<u64>, Option<String>) -> bool,
) -> redis::RedisResult<()> {
    loop {
        let page: LogPage = log_range(log, from, to, LOG_PAGE).query(cmd)?;
        let full = page.len() == LOG_PAGE;
        let (reached, went_on) = each_delivery(page, &mut each);
        if !went_on || !full || to.is_some_and(|t| reached >= t) {
            return Ok(());
        }
        // The next page starts after the last entry's sequence number: a publish writes one
        // entry per number (id `seq-1`).
        from = reached.saturating_add(1);
    }
}

/// The sequence number of a log entry's id (`seq-n`).
pub(super) fn entry_seq(id: &str) -> Option<u64> {
    let (seq, n) = id.split_once('-')?;
    n.parse::<u64>().ok()?;
    seq.parse().ok()
}

/// A page of `topic`'s history from its stream, read as `query` asks: the position and the
/// oldest entry in one round trip, then the entries after `query.since` up to that position,
/// page by page, until the page is full. A topic without an epoch has no state: an empty page.
pub(super) fn read_history(
    cmd: &mut redis::Connection,
    layout: &Layout,
    topic: &str,
    query: &HistoryQuery,
) -> redis::RedisResult<HistoryPage> {
    type Entries = Vec<(String, Vec<(String, String)>)>;
    let (seq_key, log, epoch_key, _) = layout.keys(topic);
    let (seq, epoch, oldest, newest, time): (Option<u64>, Option<String>, Entries, Entries, (u64, u64)) =
        redis::pipe()
            .get(&seq_key)
            .get(&epoch_key)
            .cmd("XRANGE")
            .arg(&log)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .cmd("XREVRANGE")
            .arg(&log)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .cmd("TIME")
            .query(cmd)?;
    let now = redis_ms(time);
    let Some(epoch) = epoch else {
        return Ok(HistoryPage::new(None, 0, None, query));
    };
    let seq_of = |entries: &Entries| entries.first().and_then(|(id, _)| entry_seq(id));
    // As a publish numbers: a sequence key lost while the log survived goes on from the log.
    let seq = seq.unwrap_or(0).max(seq_of(&newest).unwrap_or(0));
    let mut page = HistoryPage::new(Some(epoch.clone()), seq, seq_of(&oldest), query);
    read_log(cmd, &log, query.since.saturating_add(1), Some(seq), |n, d, expires, _| {
        // A message whose time to live has passed ends the retention of those before it.
        if expires.is_some_and(|x| x <= now) {
            page.expired(n);
            return true;
        }
        // An entry of another epoch (the topic expired and started again meanwhile) ends it.
        position_of(&d).is_some_and(|(e, _)| e == epoch) && page.offer(query, n, d)
    })?;
    Ok(page)
}

/// Redis's `TIME` in milliseconds.
pub(super) fn redis_ms((secs, micros): (u64, u64)) -> u64 {
    secs * 1000 + micros / 1000
}

/// Epoch and sequence number of a delivery (the broker's own format).
pub(super) fn position_of(delivery: &str) -> Option<(String, u64)> {
    let epoch = delivery.split_once("\"epoch\":\"")?.1.split_once('"')?.0;
    let seq = delivery.split_once("\"seq\":")?.1.split(|c: char| !c.is_ascii_digit()).next()?;
    Some((epoch.to_string(), seq.parse().ok()?))
}

impl Shared {
    /// Hand a delivery from Redis to this node's subscribers (but `exclude`), once and in
    /// order.
    pub(super) fn forward(
        &self,
        topics: &mut HashMap<String, Forwarding>,
        topic: &str,
        delivery: &str,
        exclude: Option<ConnId>,
    ) {
        if is_event(delivery) {
            // A join or leave event: not numbered, delivered as it comes.
            if topics.contains_key(topic) {
                self.handle.publish_text(topic, delivery);
            }
            return;
        }
        let Some((epoch, seq)) = position_of(delivery) else { return };
        let Some(f) = topics.get_mut(topic) else { return };
        f.set_epoch(&epoch);
        if seq > f.last {
            f.last = seq;
            match exclude {
                Some(publisher) => self.handle.publish_text_except(topic, delivery, publisher),
                None => self.handle.publish_text(topic, delivery),
            };
            self.status.forwarded.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forward what the topic's stream holds beyond the last forwarded message.
    pub(super) fn catch_up(
        &self,
        cmd: &mut redis::Connection,
        topics: &mut HashMap<String, Forwarding>,
        topic: &str,
    ) -> redis::RedisResult<()> {
        let (_, log, epoch_key, _) = self.layout.keys(topic);
        // Redis may have lost the topic meanwhile and started a new epoch: forward it from 1.
        let current: Option<String> = redis::cmd("GET").arg(&epoch_key).query(cmd)?;
        if let (Some(e), Some(f)) = (current, topics.get_mut(topic)) {
            f.set_epoch(&e);
        }
        let from = topics.get(topic).map_or(0, |f| f.last) + 1;
        read_log(cmd, &log, from, None, |_, d, _, exclude| {
            let exclude = exclude.and_then(|e| exclusion_of(&e, &self.node));
            self.forward(topics, topic, &d, exclude);
            true
        })
    }
}

impl Broker {
    /// Read ahead, in one round trip per node, what the subscribes with a position in `batch`
    /// will replay: per topic this node forwards, from the lowest position in its epoch to the
    /// last message forwarded. Topics not forwarded yet, and positions at the last message,
    /// need no read.
    pub(super) fn read_ahead(&mut self, batch: &[BrokerRequest]) {
        let recovers = |r: &BrokerRequest| matches!(r, BrokerRequest::Subscribe { since: Some(_), .. });
        if !batch.iter().any(recovers) {
            // Most batches: publishes. The topics' lock is left to the listener.
            return;
        }
        let mut ranges: HashMap<&str, Wanted> = HashMap::new();
        {
            let topics = self.shared.topics();
            for request in batch {
                let BrokerRequest::Subscribe { topic, since: Some(p), max_replay, .. } = request else {
                    continue;
                };
                let Some(f) = topics.get(topic).filter(|f| p.in_epoch(&f.epoch) && p.seq < f.last) else {
                    continue;
                };
                let w = ranges.entry(topic).or_insert_with(|| Wanted {
                    topic: topic.clone(),
                    log: self.shared.layout.keys(topic).1,
                    slot: self.shared.layout.slot(topic),
                    epoch: f.epoch.clone(),
                    from: p.seq + 1,
                    to: f.last,
                    max_bytes: 0,
                });
                w.from = w.from.min(p.seq + 1);
                w.max_bytes = w.max_bytes.max(*max_replay);
            }
        }
        let wanted = ranges.into_values().collect();
        self.log_spans.read_ahead(
            &mut self.redis,
            &self.scripts.read_ahead,
            wanted,
            &self.shared.status.log_reads,
        );
    }

    /// Answer a history read with its page, or with why it failed.
    pub(super) fn answer_history(
        &self,
        reply: HistoryReply,
        topic: &str,
        page: Result<HistoryPage, CommandError>,
    ) {
        let stats = &self.shared.stats;
        match (reply, page) {
            (HistoryReply::Http(responder), Ok(page)) => {
                stats.http_histories.fetch_add(1, Ordering::Relaxed);
                responder.respond(HttpResponse::json(200, page.http_body(topic)));
            }
            (HistoryReply::Http(responder), Err(e)) => responder.respond(json_error(e.code, &e.reason)),
            (HistoryReply::Client(conn, id), Ok(page)) => {
                stats.client_histories.fetch_add(1, Ordering::Relaxed);
                let text = Reply::ok(id.as_deref(), "history")
                    .str("topic", topic)
                    .fields(|out| page.write_fields(out))
                    .finish();
                self.shared.send_to(conn, text);
            }
            (HistoryReply::Client(conn, id), Err(e)) => {
                self.shared.send_error(conn, id, e);
            }
        }
    }

    /// Subscribe a connection; true if it is subscribed (false: it was answered an error).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn subscribe(
        &mut self,
        conn: ConnId,
        topic: &str,
        since: Option<Position>,
        id: Option<Box<RawValue>>,
        max_replay: usize,
        server: bool,
    ) -> redis::RedisResult<bool> {
        let (_, log, _, _) = self.shared.layout.keys(topic);
        let slot = self.shared.layout.slot(topic);
        let listening = self.shared.topics().contains_key(topic);
        let shared = self.shared.clone();
        if !listening {
            // Listen first: whatever is published from now on arrives on the channel, and
            // what came before is in the stream. Then one round trip checks that the cluster
            // has room for the topic and reads where it is.
            let (ack_tx, ack_rx) = crossbeam_channel::bounded(1);
            self.listen.send(Listen::Subscribe(topic.to_string(), ack_tx));
            if !matches!(ack_rx.recv_timeout(COMMAND_TIMEOUT * 2), Ok(Ok(()))) {
                self.listen.send(Listen::Unsubscribe(topic.to_string()));
                self.reply_error(conn, topic, id, unavailable("cannot subscribe in Redis"));
                return Ok(false);
            }
        }
        // From here until the connection is subscribed, the listener forwards nothing (it
        // waits for the topics): what it receives meanwhile is numbered after `last` and is
        // forwarded after the subscription. The position is read with the topics held, so a
        // message published after that read cannot reach the listener before the topic is
        // there to be forwarded (it would be dropped: neither in the replay nor forwarded).
        let mut topics = shared.topics();
        if !listening && !topics.contains_key(topic) {
            let room = self.room_and_position(topic);
            if !matches!(room, Ok(Some(_))) {
                // Not to be forwarded: listened to by nothing here.
                self.listen.send(Listen::Unsubscribe(topic.to_string()));
            }
            match room? {
                Some((seq, epoch)) => {
                    topics.insert(
                        topic.to_string(),
                        Forwarding { epoch: epoch.unwrap_or_default(), last: seq.unwrap_or(0) },
                    );
                }
                None => {
                    drop(topics);
                    self.reply_error(conn, topic, id, PublishError::TooManyTopics.into());
                    return Ok(false);
                }
            }
        }
        if let Some(p) = &since
            && topics.get(topic).is_some_and(|f| f.epoch != p.epoch || p.seq > f.last)
        {
            // The client may have seen (on another node) messages this node has not forwarded
            // yet: bring this node up to date from Redis (epoch included) first, then judge its
            // position.
            self.redis.run(slot, |c| shared.catch_up(c, &mut topics, topic))?;
        }
        let f = &topics[topic];
        let (epoch, last) = (f.epoch.clone(), f.last);
        let mut replay: Vec<String> = Vec::new();
        let recovery: Option<Result<(), &'static str>> = match &since {
            None => None,
            Some(p) if !p.in_epoch(&epoch) => Some(Err("epoch changed: the topic's history was reset")),
            Some(p) if p.seq > last => Some(Err("position is ahead of the topic")),
            Some(p) if p.seq == last => Some(Ok(())),
            Some(p) => {
                // Read once for the subscribes to this topic that queued up together.
                let spans = self.log_spans.under(self.redis.generation());
                let reads = &shared.status.log_reads;
                match self
                    .redis
                    .run(slot, |c| spans.replay(c, topic, &log, &epoch, p.seq, last, max_replay, reads))?
                {
                    Ok(missed) => {
                        replay = missed;
                        Some(Ok(()))
                    }
                    Err(why) => Some(Err(why)),
                }
            }
        };
        let op = if server { "subscribed" } else { "subscribe" };
        let mut reply =
            Reply::ok(id.as_deref(), op).str("topic", topic).str("epoch", &epoch).raw("seq", last);
        if server {
            reply = reply.raw("server", true);
        }
        let stats = &self.shared.stats;
        reply = match recovery {
            None => reply,
            Some(Ok(())) => {
                stats.recovered.fetch_add(1, Ordering::Relaxed);
                reply.raw("recovered", true).raw("missed", replay.len())
            }
            Some(Err(why)) => {
                stats.not_recovered.fetch_add(1, Ordering::Relaxed);
                reply.raw("recovered", false).str("reason", why)
            }
        };
        let text = reply.finish();
        // The answer and the replay first, then the live subscription: both go through the
        // connection's loop mailbox ahead of anything forwarded after this point.
        let _ = self.shared.handle.post_to::<Client>(conn, move |ws| {
            ws.send_text(&text);
            for d in &replay {
                ws.send_text(d);
            }
        });
        let _ = self.shared.handle.subscribe(conn, topic);
        // Behind the subscription in the loop's mailbox: from then on `is_subscribed` says so.
        let name = topic.to_string();
        let _ = self.shared.handle.post_to::<Client>(conn, move |ws| {
            ws.data().pending.remove(&name);
        });
        drop(topics);
        Ok(true)
    }

    /// Answer a subscribe with an error; the topic is no longer pending for the connection.
    pub(super) fn reply_error(&self, conn: ConnId, topic: &str, id: Option<Box<RawValue>>, e: CommandError) {
        self.shared.stats.command_errors.fetch_add(1, Ordering::Relaxed);
        let name = topic.to_string();
        let _ = self.shared.handle.post_to::<Client>(conn, move |ws| {
            ws.data().pending.remove(&name);
            ws.send_text(&error_reply(id.as_deref(), &e));
        });
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn positions_are_read_from_deliveries() {
        let d = r#"{"topic":"chat:a","epoch":"00ff","seq":42,"data":{"seq":1}}"#;
        assert_eq!(super::position_of(d), Some(("00ff".to_string(), 42)));
        assert_eq!(super::position_of("{}"), None);
    }

    #[test]
    fn a_publisher_left_out_is_named_on_the_channel_for_its_own_node_only() {
        let conn = gale_server::ConnId::from_bits(0x0001_0000_0200_0003);
        let d = r#"{"topic":"t","epoch":"e","seq":1,"data":1}"#;
        let message = format!("{}{d}", super::exclusion_prefix("00aa", Some(conn)));
        assert_eq!(super::split_exclusion(&message, "00aa"), (d, Some(conn)));
        assert_eq!(super::split_exclusion(&message, "00bb"), (d, None));
        assert_eq!(super::split_exclusion(d, "00aa"), (d, None));
        assert_eq!(super::exclusion_prefix("00aa", None), "");
        // As kept with a log entry.
        let prefix = super::exclusion_prefix("00aa", Some(conn));
        assert_eq!(super::exclusion_of(&prefix, "00aa"), Some(conn));
        assert_eq!(super::exclusion_of(&prefix, "00bb"), None);
    }

    #[test]
    fn log_entries_are_numbered_by_their_ids() {
        assert_eq!(super::entry_seq("42-1"), Some(42));
        for bad in ["42", "x-1", "42-", "-1"] {
            assert_eq!(super::entry_seq(bad), None, "{bad}");
        }
    }
}
