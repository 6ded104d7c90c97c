//! Publishes: pipelined publish scripts, each answered with its own result.

use std::sync::atomic::Ordering;

use gale_server::HttpResponse;

use super::super::api::{json_error, published};
use super::super::gateway::Client;
use super::super::protocol::{CommandError, Reply};
use super::super::publish::{PublishOptions, item_result};
use super::super::topics::{PublishError, new_epoch};
use super::forward::exclusion_prefix;
use super::scripts::{FULL, SLOTS};
use super::topology::{is_transient, server_reason, unavailable};
use super::{Broker, PublishReply};

/// A publish waiting for the broker: its topics, its payload fragment, where its answer goes,
/// its options.
pub(super) type Publish = (Vec<String>, String, PublishReply, PublishOptions);

/// A topic published to: its name, sequence number, epoch, and whether it was an idempotent
/// retry (nothing published, the first publish's position).
pub(super) type Placed = (String, u64, String, bool);

/// The topics of a request with their positions, read from its script's answer; or why they
/// were not published.
pub(super) fn positions(
    topics: &[String],
    answer: Option<redis::Value>,
) -> Result<Vec<Placed>, CommandError> {
    let refused = |why: String| CommandError::new(500, format!("Redis refused the publish: {why}"));
    let answer = answer.ok_or_else(|| refused("no answer".into()))?;
    let found: Vec<(u64, String, u8)> = match redis::from_redis_value::<redis::RedisResult<_>>(answer) {
        Ok(Ok(found)) => found,
        Ok(Err(e)) if e.code() == Some(FULL) => return Err(PublishError::TooManyTopics.into()),
        Ok(Err(e)) if is_transient(&e) => return Err(unavailable(&server_reason(&e))),
        Ok(Err(e)) => return Err(refused(server_reason(&e))),
        Err(e) => return Err(refused(format!("unexpected answer: {e}"))),
    };
    if found.len() != topics.len() {
        return Err(refused(format!("{} positions for {} topics", found.len(), topics.len())));
    }
    Ok(topics.iter().zip(found).map(|(t, (seq, epoch, dup))| (t.clone(), seq, epoch, dup == 1)).collect())
}

/// How many topics each slot's registry held when last counted (cluster only): what the
/// other slots hold is what `limits.max_topics` leaves to a slot.
#[derive(Default)]
pub(super) struct TopicCounts {
    per_slot: Vec<u64>,
    total: u64,
    /// The count script's calls for one version of the slot map: made again only when it
    /// changes.
    calls: Option<CountCalls>,
}

/// The count script's calls for the slot map of `generation`: per primary, its slots and its
/// call (with the slot that routes it).
struct CountCalls {
    generation: u64,
    nodes: Vec<(usize, Vec<u16>)>,
    cmds: Vec<(u16, redis::Cmd)>,
}

impl Broker {
    /// Run every request's publish scripts, one pipeline per node (one script per request and
    /// slot of its topics), then answer each request with its own result: a script Redis
    /// refuses fails only its own request. If a node's connection fails, every request with
    /// a script for it gets 503, and so does a request whose scripts were not all carried out
    /// (a broadcast over slots on several shards may then be published to some of them).
    pub(super) fn publish_batch(&mut self, batch: Vec<Publish>) -> redis::RedisResult<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let layout = &self.shared.layout;
        // Per request, its topics grouped by slot (the indexes of each group's topics), with
        // the slot's room for new topics.
        let mut grouped: Vec<Vec<(u16, u64, Vec<usize>)>> = Vec::with_capacity(batch.len());
        for (topics, ..) in &batch {
            let mut by_slot: Vec<(u16, u64, Vec<usize>)> = Vec::new();
            for (i, topic) in topics.iter().enumerate() {
                let slot = layout.slot(topic);
                match by_slot.iter_mut().find(|(s, ..)| *s == slot) {
                    Some((.., group)) => group.push(i),
                    None => by_slot.push((slot, 0, vec![i])),
                }
            }
            grouped.push(by_slot);
        }
        // The rooms in a loop of their own: each reads the count of a slot among 16,384, most
        // often a cache miss, and here the misses overlap instead of each stalling a script.
        for (slot, room, _) in grouped.iter_mut().flatten() {
            *room = self.room(*slot);
        }
        let mut cmds = Vec::with_capacity(batch.len());
        // Per request, its scripts: the index of each in `cmds`, with the topics it publishes to.
        let mut scripts: Vec<Vec<(usize, Vec<usize>)>> = Vec::with_capacity(batch.len());
        for ((topics, fragment, _, opts), by_slot) in batch.iter().zip(grouped) {
            let mut mine = Vec::with_capacity(by_slot.len());
            for (slot, room, group) in by_slot {
                let names: Vec<&str> = group.iter().map(|&i| topics[i].as_str()).collect();
                // An idempotency key is for a publish to one topic (a publish or a batch item).
                let idem = opts.idempotency_key.as_deref().filter(|_| topics.len() == 1);
                cmds.push((slot, self.publish_script(slot, room, &names, fragment, opts, idem)));
                mine.push((cmds.len() - 1, group));
            }
            scripts.push(mine);
        }
        let (mut answers, lost) = self.redis.pipeline(&cmds, self.ack_replicas);
        for ((topics, _, reply, _), mine) in batch.into_iter().zip(scripts) {
            let mut placed: Vec<Option<Placed>> = vec![None; topics.len()];
            let mut failed = None;
            for (c, group) in mine {
                let names: Vec<String> = group.iter().map(|&i| topics[i].clone()).collect();
                let answer = std::mem::replace(&mut answers[c], Err(String::new()));
                let found = match answer {
                    Err(why) => Err(unavailable(&why)),
                    Ok(value) => positions(&names, Some(value)),
                };
                match found {
                    Ok(found) => {
                        for (&i, p) in group.iter().zip(found) {
                            placed[i] = Some(p);
                        }
                    }
                    Err(e) => failed = failed.or(Some(e)),
                }
            }
            match failed {
                None => self.answer_published(reply, &placed.into_iter().flatten().collect::<Vec<_>>()),
                Some(e) => {
                    if e.code == 503 {
                        self.shared.status.failed_publishes.fetch_add(1, Ordering::Relaxed);
                    }
                    self.answer_publish_error(reply, &topics, e)
                }
            }
        }
        lost.map_or(Ok(()), Err)
    }

    /// The publish script's call for `topics`, all in `slot` (which has `room` for topics),
    /// with the idempotency key `idem`.
    fn publish_script(
        &self,
        slot: u16,
        room: u64,
        topics: &[&str],
        fragment: &str,
        opts: &PublishOptions,
        idem: Option<&str>,
    ) -> redis::Cmd {
        let layout = &self.shared.layout;
        let mut script = self.scripts.publish.call();
        script.arg(1 + topics.len() * 3 + usize::from(idem.is_some()));
        script.arg(layout.registry(slot).as_str());
        let keyed: Vec<_> = topics.iter().map(|t| layout.keys(t)).collect();
        for (seq_key, log, epoch_key, _) in &keyed {
            script.arg(seq_key).arg(log).arg(epoch_key);
        }
        if let Some(key) = idem {
            script.arg(layout.idempotency_key(topics[0], key));
        }
        let window_ms = self.idempotency_window.as_millis().max(1) as u64;
        let msg_ttl_ms = opts.ttl.map_or(0, |t| t.as_millis().max(1) as u64);
        script.arg(fragment).arg(self.history).arg(self.ttl_ms).arg(room);
        script.arg(window_ms).arg(msg_ttl_ms).arg(exclusion_prefix(&self.shared.node, opts.exclude));
        for (topic, (_, _, _, channel)) in topics.iter().zip(&keyed) {
            let json = serde_json::to_string(topic).unwrap_or_default();
            script.arg(topic).arg(json).arg(channel).arg(new_epoch());
        }
        script
    }

    /// Whether `topic` may be subscribed to — it has state in Redis, or the cluster has room
    /// for one more topic (as a subscription to a new topic takes a place on a single node) —
    /// and if so its sequence number and epoch in Redis (none if it has no state): one round
    /// trip.
    pub(super) fn room_and_position(
        &mut self,
        topic: &str,
    ) -> redis::RedisResult<Option<(Option<u64>, Option<String>)>> {
        let layout = &self.shared.layout;
        let slot = layout.slot(topic);
        let (seq_key, _, epoch_key, _) = layout.keys(topic);
        let mut room = self.scripts.room.call();
        room.arg(3).arg(layout.registry(slot).as_str()).arg(seq_key).arg(epoch_key);
        room.arg(topic).arg(self.room(slot));
        let answer: (u8, Option<u64>, Option<String>) = self.redis.run(slot, |c| room.query(c))?;
        Ok(match answer {
            (1, seq, epoch) => Some((seq, epoch)),
            _ => None,
        })
    }

    /// The most topics the registry of `slot` may hold: `limits.max_topics`, less what the
    /// other slots held when last counted (cluster).
    fn room(&self, slot: u16) -> u64 {
        let counts = &self.topic_counts;
        let mine = counts.per_slot.get(usize::from(slot)).copied().unwrap_or(0);
        (self.max_topics as u64).saturating_sub(counts.total - mine)
    }

    /// Count the topics of every slot again (cluster only): one call of the count script per
    /// primary, all at once (one round trip), each reading the registries of the slots it
    /// serves; the answer names only the registries that hold topics. A slot whose count fails
    /// (its node, or the slot itself, moved or failed) keeps the last one. `Ok(false)` if a
    /// slot has no primary in the slot map or a primary did not answer: the requests for
    /// their slots fail meanwhile.
    pub(super) fn count_topics(&mut self) -> redis::RedisResult<bool> {
        let layout = &self.shared.layout;
        if !layout.is_cluster() {
            return Ok(true);
        }
        let generation = self.redis.generation();
        let CountCalls { nodes, cmds, .. } = match self.topic_counts.calls.take() {
            Some(calls) if calls.generation == generation => calls,
            _ => {
                let nodes = self.redis.slots_by_node();
                let cmds = nodes
                    .iter()
                    .map(|(_, slots)| {
                        let mut names = String::with_capacity(slots.len() * 20);
                        for &s in slots {
                            names.push_str(layout.registry(s).as_str());
                            names.push(' ');
                        }
                        let mut count = self.scripts.count.call();
                        count.arg(1).arg(layout.registry(slots[0]).as_str()).arg(names);
                        (slots[0], count)
                    })
                    .collect();
                CountCalls { generation, nodes, cmds }
            }
        };
        let mut served = nodes.iter().map(|(_, slots)| slots.len()).sum::<usize>() == SLOTS;
        let (answers, lost) = self.redis.pipeline(&cmds, None);
        let counts = &mut self.topic_counts;
        counts.per_slot.resize(SLOTS, 0);
        for ((node, slots), answer) in nodes.iter().zip(answers) {
            let found = match answer.map(redis::from_redis_value::<redis::RedisResult<Vec<u8>>>) {
                Ok(Ok(Ok(found))) => found,
                // Down for a while (a cluster without a majority, a failover): so are its slots.
                Ok(Ok(Err(e))) if is_transient(&e) => {
                    served = false;
                    continue;
                }
                Ok(found) => {
                    let why = found.map_or_else(
                        |e| e.to_string(),
                        |e| e.err().map(|e| e.to_string()).unwrap_or_default(),
                    );
                    let node = self.redis.describe_node(*node);
                    tracing::warn!(node, "broker: cannot count topics: {why}");
                    continue;
                }
                Err(_) => {
                    served = false;
                    continue;
                }
            };
            // Slots not named hold no topics; a count of -1 keeps the slot's last one.
            let mut read = vec![0; slots.len()];
            for pair in found.chunks_exact(6) {
                let place = usize::from(u16::from_be_bytes([pair[0], pair[1]]));
                let n = i32::from_be_bytes([pair[2], pair[3], pair[4], pair[5]]);
                if let Some(count) = place.checked_sub(1).and_then(|i| read.get_mut(i)) {
                    *count = n;
                }
            }
            for (&s, n) in slots.iter().zip(read) {
                if let Ok(n) = u64::try_from(n) {
                    counts.per_slot[usize::from(s)] = n;
                }
            }
        }
        counts.total = counts.per_slot.iter().sum();
        counts.calls = Some(CountCalls { generation, nodes, cmds });
        lost.map_or(Ok(served), Err)
    }

    pub(super) fn answer_published(&self, reply: PublishReply, results: &[Placed]) {
        let stats = &self.shared.stats;
        let replays = results.iter().filter(|(.., dup)| *dup).count() as u64;
        if replays > 0 {
            stats.idempotent_replays.fetch_add(replays, Ordering::Relaxed);
        }
        let fresh = results.len() as u64 - replays;
        match reply {
            PublishReply::Http(responder) => {
                stats.http_publishes.fetch_add(fresh, Ordering::Relaxed);
                if let [(topic, seq, epoch, dup)] = results {
                    let subscribers = self.shared.handle.num_subscribers(topic);
                    responder.respond(published(topic, epoch, *seq, subscribers, *dup));
                    return;
                }
                let list: Vec<_> = results
                    .iter()
                    .map(|(t, s, e, _)| serde_json::json!({"topic": t, "epoch": e, "seq": s}))
                    .collect();
                responder
                    .respond(HttpResponse::json(200, serde_json::json!({ "results": list }).to_string()));
            }
            PublishReply::Batch(batch, i) => {
                stats.http_publishes.fetch_add(fresh, Ordering::Relaxed);
                if let Some((topic, seq, epoch, dup)) = results.first() {
                    batch.fill(i, item_result(topic, Ok((epoch, *seq, *dup))));
                }
            }
            PublishReply::Client(conn, id) => {
                stats.client_publishes.fetch_add(fresh, Ordering::Relaxed);
                let Some((topic, seq, epoch, dup)) = results.first().cloned() else { return };
                let _ = self.shared.handle.post_to::<Client>(conn, move |ws| {
                    let mut reply = Reply::ok(id.as_deref(), "publish")
                        .str("topic", &topic)
                        .str("epoch", &epoch)
                        .raw("seq", seq);
                    if dup {
                        reply = reply.raw("duplicate", true);
                    }
                    ws.send_text(&reply.finish());
                });
            }
        }
    }

    /// Answer a publish that was not carried out.
    pub(super) fn answer_publish_error(&self, reply: PublishReply, topics: &[String], e: CommandError) {
        match reply {
            PublishReply::Http(responder) => responder.respond(json_error(e.code, &e.reason)),
            PublishReply::Batch(batch, i) => {
                batch.fill(i, item_result(topics.first().map_or("", String::as_str), Err(&e)))
            }
            PublishReply::Client(conn, id) => {
                self.shared.send_error(conn, id, e);
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn each_publish_gets_its_own_answer() {
        let topics = || vec!["a".to_string(), "b".to_string()];
        let answer = |resp: &[u8]| Some(redis::parse_redis_value(resp).unwrap());
        let ok = super::positions(
            &topics(),
            answer(b"*2\r\n*3\r\n:7\r\n$2\r\ne1\r\n:0\r\n*3\r\n:1\r\n$2\r\ne2\r\n:1\r\n"),
        );
        assert_eq!(ok.unwrap(), [("a".into(), 7, "e1".into(), false), ("b".into(), 1, "e2".into(), true)]);
        let refused =
            super::positions(&topics(), answer(b"-WRONGTYPE gale:a:log holds a string\r\n")).unwrap_err();
        assert_eq!((refused.code, refused.reason.contains("WRONGTYPE gale:a:log")), (500, true));
        // The cluster's topic limit is told as a single node tells it.
        let full = super::positions(&topics(), answer(b"-GALEFULL the cluster is full\r\n")).unwrap_err();
        assert_eq!(full, super::PublishError::TooManyTopics.into());
        // Never trust the shape of an answer: too few positions, or none at all.
        assert_eq!(
            super::positions(&topics(), answer(b"*1\r\n*3\r\n:7\r\n$2\r\ne1\r\n:0\r\n")).unwrap_err().code,
            500
        );
        assert_eq!(super::positions(&topics(), None).unwrap_err().code, 500);
    }
}
