//! Presence in Redis: this node's members of topics that keep presence, joined, left and
//! refreshed, and reads of a topic's presence.

use std::sync::atomic::Ordering;

use gale_server::HttpResponse;

use super::super::api::json_error;
use super::super::presence::{ListLimit, Member, PresencePage, Stats, event};
use super::super::protocol::{CommandError, Reply};
use super::scripts::{JOIN_LUA, LEAVE_LUA, READ_PRESENCE_LUA, REFRESH_LUA, keys, presence_prefix};
use super::topology::connection_lost;
use super::{Broker, PresenceReply};

/// A topic's presence as Redis holds it: the counts, and the members if `list`.
pub(super) fn read_presence(
    cmd: &mut redis::Connection,
    topic: &str,
    list: bool,
    limit: &ListLimit,
) -> redis::RedisResult<PresencePage> {
    let (connections, users, more, members): (u64, u64, u8, Vec<String>) = redis::cmd("EVAL")
        .arg(READ_PRESENCE_LUA)
        .arg(1)
        .arg(presence_prefix(topic))
        .arg(u8::from(list))
        .arg(limit.max_clients)
        .query(cmd)?;
    let mut page = PresencePage::new(Stats { connections, users });
    for m in members {
        if !page.offer(limit, m) {
            break;
        }
    }
    if more == 1 {
        page.mark_more();
    }
    Ok(page)
}

impl Broker {
    /// Run a presence script (`JOIN_LUA`, `LEAVE_LUA`) for `member` on `topic`, with an `op`
    /// event for the subscribers if `join_leave` (counted once Redis has run it).
    pub(super) fn presence_change(
        &self,
        cmd: &mut redis::Connection,
        script: &str,
        op: &str,
        topic: &str,
        member: &Member,
        join_leave: bool,
    ) -> redis::RedisResult<()> {
        let ev = if join_leave { event(op, topic, &member.to_json()) } else { String::new() };
        self.presence_script(script, topic, member, &ev).query::<i64>(cmd)?;
        if join_leave {
            self.shared.stats.join_leave_events.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The presence script `script` (join or leave) of `member` on `topic`, with `event` for
    /// the subscribers (`""`: none).
    pub(super) fn presence_script(
        &self,
        script: &str,
        topic: &str,
        member: &Member,
        event: &str,
    ) -> redis::Cmd {
        let mut c = redis::cmd("EVAL");
        let json = if member.user.is_some() { member.to_json() } else { String::new() };
        c.arg(script)
            .arg(1)
            .arg(presence_prefix(topic))
            .arg(&self.presence.node)
            .arg(self.presence.ttl.as_millis() as u64)
            .arg(&*member.client)
            .arg(member.user.as_deref().unwrap_or(""))
            .arg(json)
            .arg(keys(topic).3)
            .arg(event);
        c
    }

    /// A connection of this node subscribed to a topic that keeps presence.
    pub(super) fn join(
        &mut self,
        cmd: &mut redis::Connection,
        topic: &str,
        member: Member,
        join_leave: bool,
    ) -> redis::RedisResult<()> {
        let json = if member.user.is_some() { member.to_json() } else { String::new() };
        let user = member.user.as_deref().unwrap_or("").to_string();
        let mine = self.present.entry(topic.to_string()).or_default();
        if mine.insert(member.client.clone(), (user, json)).is_none() {
            self.shared.status.presence_members.fetch_add(1, Ordering::Relaxed);
        }
        match self.presence_change(cmd, JOIN_LUA, "join", topic, &member, join_leave) {
            Ok(()) => Ok(()),
            // The refresh joins it again once Redis answers.
            Err(e) if connection_lost(&e) => {
                self.rejoin = true;
                Err(e)
            }
            Err(e) => {
                self.rejoin = true;
                tracing::warn!(topic, error = %e, "cannot record presence; joining again at the next refresh");
                Ok(())
            }
        }
    }

    /// Take a member out of this node's presence; false if it was not in it (its
    /// subscription failed, so it never joined).
    pub(super) fn forget_member(&mut self, topic: &str, client: &str) -> bool {
        let Some(mine) = self.present.get_mut(topic) else { return false };
        let was = mine.remove(client).is_some();
        if was {
            self.shared.status.presence_members.fetch_sub(1, Ordering::Relaxed);
        }
        if mine.is_empty() {
            self.present.remove(topic);
        }
        was
    }

    /// A connection of this node left a topic that keeps presence.
    pub(super) fn leave(
        &mut self,
        cmd: &mut redis::Connection,
        topic: &str,
        member: Member,
        join_leave: bool,
    ) -> redis::RedisResult<()> {
        if !self.forget_member(topic, &member.client) {
            return Ok(());
        }
        self.leave_in_redis(cmd, topic, member, join_leave)
    }

    /// Take a member that left out of Redis, with a leave event if `join_leave`; if the
    /// connection is lost, the leave waits for the next one.
    pub(super) fn leave_in_redis(
        &self,
        cmd: &mut redis::Connection,
        topic: &str,
        member: Member,
        join_leave: bool,
    ) -> redis::RedisResult<()> {
        match self.presence_change(cmd, LEAVE_LUA, "leave", topic, &member, join_leave) {
            Ok(()) => Ok(()),
            Err(e) if connection_lost(&e) => {
                self.leaves.borrow_mut().push((topic.to_string(), member, join_leave));
                Err(e)
            }
            Err(e) => {
                tracing::warn!(topic, error = %e, "cannot record presence");
                Ok(())
            }
        }
    }

    /// Mark this node's presence alive on every topic it has members of; where Redis forgot it
    /// (the node was silent past the TTL, or Redis lost its data), join its members again.
    pub(super) fn refresh_presence(&mut self, cmd: &mut redis::Connection) -> redis::RedisResult<()> {
        let mut leaves = std::mem::take(&mut *self.leaves.borrow_mut()).into_iter();
        while let Some((topic, member, join_leave)) = leaves.next() {
            if let Err(e) = self.leave_in_redis(cmd, &topic, member, join_leave) {
                // That one waits again; so do the ones after it, in order.
                self.leaves.borrow_mut().extend(leaves);
                return Err(e);
            }
        }
        let rejoin_all = std::mem::take(&mut self.rejoin);
        if self.present.is_empty() {
            return Ok(());
        }
        let ttl = self.presence.ttl.as_millis() as u64;
        let topics: Vec<String> = self.present.keys().cloned().collect();
        let mut pipe = redis::pipe();
        for t in &topics {
            let script = redis::cmd("EVAL")
                .arg(REFRESH_LUA)
                .arg(1)
                .arg(presence_prefix(t))
                .arg(&self.presence.node)
                .arg(ttl)
                .to_owned();
            pipe.add_command(script);
        }
        let alive: Vec<redis::Value> = pipe.ignore_errors().query(cmd)?;
        let (mut rejoin, mut rejoins) = (redis::pipe(), 0);
        for (topic, answer) in topics.iter().zip(alive) {
            if !rejoin_all && redis::from_redis_value::<i64>(answer).unwrap_or(0) == 1 {
                continue;
            }
            for (client, (user, json)) in &self.present[topic] {
                let script = redis::cmd("EVAL")
                    .arg(JOIN_LUA)
                    .arg(1)
                    .arg(presence_prefix(topic))
                    .arg(&self.presence.node)
                    .arg(ttl)
                    .arg(&**client)
                    .arg(user)
                    .arg(json)
                    .arg(keys(topic).3)
                    .arg("")
                    .to_owned();
                rejoin.add_command(script);
                rejoins += 1;
            }
        }
        if rejoins == 0 {
            return Ok(());
        }
        tracing::info!(members = rejoins, "broker: presence joined again in Redis");
        // A join Redis refuses fails alone, and is tried again at the next refresh.
        let answers: Vec<redis::Value> = rejoin.ignore_errors().query(cmd)?;
        let failed = answers
            .into_iter()
            .filter(|a| !matches!(redis::from_redis_value::<redis::RedisResult<i64>>(a.clone()), Ok(Ok(_))))
            .count();
        if failed > 0 {
            tracing::warn!(failed, "cannot record presence; joining again at the next refresh");
            self.rejoin = true;
        }
        Ok(())
    }

    /// Answer a presence read with what Redis holds, or with why it failed.
    pub(super) fn answer_presence(
        &self,
        reply: PresenceReply,
        topic: &str,
        list: bool,
        page: Result<PresencePage, CommandError>,
    ) {
        let stats = &self.shared.stats;
        let fields = |page: &PresencePage, out: &mut String| {
            if list { page.write_fields(out) } else { page.stats.write_fields(out) }
        };
        match (reply, page) {
            (PresenceReply::Http(responder), Ok(page)) => {
                stats.presence_reads.of(true, list).fetch_add(1, Ordering::Relaxed);
                let body = super::super::presence::body(topic, |out| fields(&page, out));
                responder.respond(HttpResponse::json(200, body));
            }
            (PresenceReply::Http(responder), Err(e)) => responder.respond(json_error(e.code, &e.reason)),
            (PresenceReply::Client(conn, id), Ok(page)) => {
                stats.presence_reads.of(false, list).fetch_add(1, Ordering::Relaxed);
                let op = if list { "presence" } else { "presence_stats" };
                let text = Reply::ok(id.as_deref(), op)
                    .str("topic", topic)
                    .fields(|out| fields(&page, out))
                    .finish();
                self.shared.send_to(conn, text);
            }
            (PresenceReply::Client(conn, id), Err(e)) => {
                self.shared.send_error(conn, id, e);
            }
        }
    }
}
