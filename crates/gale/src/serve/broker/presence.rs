//! Presence in Redis: this node's members of topics that keep presence, joined, left and
//! refreshed, and reads of a topic's presence.

use std::sync::atomic::Ordering;

use gale_server::HttpResponse;

use super::super::api::json_error;
use super::super::presence::{ListLimit, Member, PresencePage, Stats, event};
use super::super::protocol::{CommandError, Reply};
use super::scripts::{Layout, Lua};
use super::topology::connection_lost;
use super::{Broker, PresenceReply};

/// A topic's presence as Redis holds it: the counts, and the members if `list`.
pub(super) fn read_presence(
    cmd: &mut redis::Connection,
    layout: &Layout,
    script: &Lua,
    topic: &str,
    list: bool,
    limit: &ListLimit,
) -> redis::RedisResult<PresencePage> {
    let (connections, users, more, members): (u64, u64, u8, Vec<String>) = script
        .call()
        .arg(1)
        .arg(layout.presence_prefix(topic))
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
    /// Run the join (`join`) or leave script for `member` on `topic`, with its event for the
    /// subscribers if `join_leave` (counted once Redis has run it).
    pub(super) fn presence_change(
        &mut self,
        join: bool,
        topic: &str,
        member: &Member,
        join_leave: bool,
    ) -> redis::RedisResult<()> {
        let op = if join { "join" } else { "leave" };
        let ev = if join_leave { event(op, topic, &member.to_json()) } else { String::new() };
        let script = if join { &self.scripts.join } else { &self.scripts.leave };
        let call = self.presence_script(script, topic, member, &ev);
        self.redis.run(self.shared.layout.slot(topic), |c| call.query::<i64>(c))?;
        if join_leave {
            self.shared.stats.join_leave_events.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The presence script `script` (join or leave) of `member` on `topic`, with `event` for
    /// the subscribers (`""`: none).
    pub(super) fn presence_script(
        &self,
        script: &Lua,
        topic: &str,
        member: &Member,
        event: &str,
    ) -> redis::Cmd {
        let mut c = script.call();
        let json = if member.user.is_some() { member.to_json() } else { String::new() };
        c.arg(1)
            .arg(self.shared.layout.presence_prefix(topic))
            .arg(&self.presence.node)
            .arg(self.presence.ttl.as_millis() as u64)
            .arg(&*member.client)
            .arg(member.user.as_deref().unwrap_or(""))
            .arg(json)
            .arg(self.shared.layout.channel(topic))
            .arg(event);
        c
    }

    /// A connection of this node subscribed to a topic that keeps presence.
    pub(super) fn join(&mut self, topic: &str, member: Member, join_leave: bool) -> redis::RedisResult<()> {
        let json = if member.user.is_some() { member.to_json() } else { String::new() };
        let user = member.user.as_deref().unwrap_or("").to_string();
        let mine = self.present.entry(topic.to_string()).or_default();
        if mine.insert(member.client.clone(), (user, json)).is_none() {
            self.shared.status.presence_members.fetch_add(1, Ordering::Relaxed);
        }
        match self.presence_change(true, topic, &member, join_leave) {
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
    pub(super) fn leave(&mut self, topic: &str, member: Member, join_leave: bool) -> redis::RedisResult<()> {
        if !self.forget_member(topic, &member.client) {
            return Ok(());
        }
        self.leave_in_redis(topic, member, join_leave)
    }

    /// Take a member that left out of Redis, with a leave event if `join_leave`; if the
    /// connection is lost, the leave waits for the next one.
    pub(super) fn leave_in_redis(
        &mut self,
        topic: &str,
        member: Member,
        join_leave: bool,
    ) -> redis::RedisResult<()> {
        match self.presence_change(false, topic, &member, join_leave) {
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
    pub(super) fn refresh_presence(&mut self) -> redis::RedisResult<()> {
        let mut leaves = std::mem::take(&mut *self.leaves.borrow_mut()).into_iter();
        while let Some((topic, member, join_leave)) = leaves.next() {
            if let Err(e) = self.leave_in_redis(&topic, member, join_leave) {
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
        let layout = &self.shared.layout;
        let mut refresh = Vec::with_capacity(topics.len());
        for t in &topics {
            let mut script = self.scripts.refresh.call();
            script.arg(1).arg(layout.presence_prefix(t));
            script.arg(&self.presence.node).arg(ttl);
            refresh.push((layout.slot(t), script));
        }
        let (alive, lost) = self.redis.pipeline(&refresh, None);
        if let Some(e) = lost {
            return Err(e);
        }
        let mut rejoin = Vec::new();
        for (topic, answer) in topics.iter().zip(alive) {
            if !rejoin_all && answer.ok().and_then(|a| redis::from_redis_value::<i64>(a).ok()) == Some(1) {
                continue;
            }
            for (client, (user, json)) in &self.present[topic] {
                let mut script = self.scripts.join.call();
                script.arg(1).arg(layout.presence_prefix(topic));
                script.arg(&self.presence.node).arg(ttl).arg(&**client).arg(user).arg(json);
                script.arg(layout.channel(topic)).arg("");
                rejoin.push((layout.slot(topic), script));
            }
        }
        if rejoin.is_empty() {
            return Ok(());
        }
        tracing::info!(members = rejoin.len(), "broker: presence joined again in Redis");
        // A join Redis refuses fails alone, and is tried again at the next refresh.
        let (answers, lost) = self.redis.pipeline(&rejoin, None);
        if let Some(e) = lost {
            self.rejoin = true;
            return Err(e);
        }
        let failed = answers
            .into_iter()
            .filter(|a| {
                let joined = a.clone().ok().map(redis::from_redis_value::<redis::RedisResult<i64>>);
                !matches!(joined, Some(Ok(Ok(_))))
            })
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
