//! The gateway's HTTP endpoints: the publish API for backends, topic info and history, health,
//! metrics, the demo page and the JavaScript client.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use gale_server::{HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::auth::key_matches;
use super::broker::{BrokerRequest, HistoryReply, PresenceReply, PublishReply};
use super::gateway::Gateway;
use super::history::{HistoryQuery, parse_query};
use super::presence::ListLimit;
use super::protocol::{CommandError, MAX_FRAGMENT, Payload, check_topic, fragment, fragment_len};
use super::publish::{BatchReply, PublishOptions, http_options, item_result, parse_batch};
use super::topics::PublishError;

/// The demo page, embedded.
pub const DEMO_PAGE: &str = include_str!("demo.html");

/// The JavaScript client (`clients/js/gale-client.js`), embedded: pages import it from
/// `/gale-client.js` without a bundler.
pub const CLIENT_JS: &str = include_str!("../../../../clients/js/gale-client.js");

/// `GET /gale-client.js`: the client library as an ES module. `no-cache` makes browsers
/// revalidate it, so a page never runs a client older than the gateway it talks to; any
/// origin may import it (it holds nothing private), as pages on other origins listed in
/// `auth.allowed_origins` do.
pub(super) fn client_js() -> HttpResponse {
    HttpResponse::new(200, "text/javascript; charset=utf-8", CLIENT_JS)
        .header("Cache-Control", "no-cache")
        .header("Access-Control-Allow-Origin", "*")
        .header("X-Content-Type-Options", "nosniff")
}

/// An error answer: `{"error": {"code", "reason"}}`.
pub(super) fn json_error(status: u16, reason: &str) -> HttpResponse {
    HttpResponse::json(
        status,
        serde_json::json!({ "error": { "code": status, "reason": reason } }).to_string(),
    )
}

/// `None` when the request carries the API key; else the response that refuses it.
pub(super) fn check_key(g: &Gateway, req: &HttpRequest<'_>) -> Option<HttpResponse> {
    let Some(expected) = g.settings.api_key.as_deref() else {
        return Some(json_error(
            403,
            "the HTTP API is disabled: no API key is configured (set auth.api_key or GALE_API_KEY)",
        ));
    };
    let given = req.header("authorization").and_then(|h| {
        let (scheme, key) = h.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
    });
    match given {
        Some(key) if key_matches(key, expected) => None,
        Some(_) => Some(json_error(401, "wrong API key").header("WWW-Authenticate", "Bearer")),
        None => Some(
            json_error(401, "missing API key: send Authorization: Bearer KEY")
                .header("WWW-Authenticate", "Bearer"),
        ),
    }
}

/// The topic named by the rest of the path after `prefix`, percent-decoded and checked.
fn topic_from_path(path: &str, prefix: &str) -> Result<String, HttpResponse> {
    let raw = path.strip_prefix(prefix).unwrap_or_default();
    let topic = percent_decode(raw).ok_or_else(|| json_error(400, "bad percent-encoding in the topic"))?;
    check_topic(&topic).map_err(|e| json_error(e.code, &e.reason))?;
    Ok(topic)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn publish_failed(e: PublishError) -> HttpResponse {
    let e = CommandError::from(e);
    json_error(e.code, &e.reason)
}

/// The answer to a publish of one topic: `{"topic", "epoch", "seq", "subscribers"}`; for an
/// idempotent retry also `"duplicate": true` and the header `Idempotent-Replayed: true`.
pub(super) fn published(
    topic: &str,
    epoch: &str,
    seq: u64,
    subscribers: usize,
    duplicate: bool,
) -> HttpResponse {
    let mut body =
        serde_json::json!({"topic": topic, "epoch": epoch, "seq": seq, "subscribers": subscribers});
    if duplicate {
        body["duplicate"] = true.into();
        return HttpResponse::json(200, body.to_string()).header("Idempotent-Replayed", "true");
    }
    HttpResponse::json(200, body.to_string())
}

/// `POST /api/publish/{topic}`: the body is the payload; `Idempotency-Key` and `?ttl=` are
/// its options.
pub fn publish(g: &Arc<Gateway>, req: &HttpRequest<'_>) -> HttpResponse {
    if let Some(refused) = check_key(g, req) {
        return refused;
    }
    let topic = match topic_from_path(req.path(), "/api/publish/") {
        Ok(t) => t,
        Err(r) => return r,
    };
    let opts = match http_options(req.header("idempotency-key"), req.query()) {
        Ok(o) => o,
        Err(e) => return json_error(e.code, &e.reason),
    };
    let payload = match Payload::from_body(req.header("content-type"), req.body()) {
        Ok(p) => p,
        Err(why) => return json_error(400, &why),
    };
    if fragment_len(&payload) > MAX_FRAGMENT {
        // Text full of characters JSON must escape: its delivery would outgrow what every
        // subscriber is configured to hold (see `config`).
        return json_error(
            413,
            "this text is too long once escaped as a JSON string: send it as application/octet-stream",
        );
    }
    if let Some(b) = g.broker.get() {
        // Cluster mode: answered (and counted) once Redis has numbered it.
        let reply = PublishReply::Http(req.defer());
        // Refused requests are answered by `send` itself.
        b.send(BrokerRequest::Publish { topics: vec![topic], fragment: fragment(&payload), reply, opts });
        return HttpResponse::text(202, "deferred");
    }
    match g.publish_with(&topic, &payload, &opts) {
        Ok(done) => {
            if !done.duplicate {
                g.stats.http_publishes.fetch_add(1, Ordering::Relaxed);
            }
            let subscribers = g.handle.get().map_or(0, |h| h.num_subscribers(&topic));
            published(&topic, &done.pos.epoch, done.pos.seq, subscribers, done.duplicate)
        }
        Err(e) => publish_failed(e),
    }
}

/// `POST /api/publish_batch`: `[{"topic", "data", "idempotency_key"?, "ttl"?}, ...]`, each
/// item published on its own (different data to different topics); the answer lists each
/// item's result in order.
pub fn publish_batch(g: &Arc<Gateway>, req: &HttpRequest<'_>) -> HttpResponse {
    if let Some(refused) = check_key(g, req) {
        return refused;
    }
    let items = match parse_batch(req.body(), g.settings.publish.max_batch_items) {
        Ok(items) => items,
        Err(e) => return json_error(e.code, &e.reason),
    };
    g.stats.batch_items.fetch_add(items.len() as u64, Ordering::Relaxed);
    // Items refused before publishing are answered in place; the others are published.
    let mut results = vec![serde_json::Value::Null; items.len()];
    let mut publishable = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match check_topic(&item.topic).and_then(|()| item.options()) {
            Ok(opts) => publishable.push((i, opts)),
            Err(e) => results[i] = item_result(&item.topic, Err(&e)),
        }
    }
    if let Some(b) = g.broker.get() {
        let batch = BatchReply::new(req.defer(), results, publishable.len());
        for (i, opts) in publishable {
            let item = &items[i];
            let reply = PublishReply::Batch(batch.clone(), i);
            let fragment = fragment(&Payload::Json(item.data.get()));
            // A refused request's item is answered by `send` itself.
            b.send(BrokerRequest::Publish { topics: vec![item.topic.clone()], fragment, reply, opts });
        }
        return HttpResponse::text(202, "deferred");
    }
    for (i, opts) in publishable {
        let item = &items[i];
        results[i] = match g.publish_with(&item.topic, &Payload::Json(item.data.get()), &opts) {
            Ok(done) => {
                if !done.duplicate {
                    g.stats.http_publishes.fetch_add(1, Ordering::Relaxed);
                }
                item_result(&item.topic, Ok((&done.pos.epoch, done.pos.seq, done.duplicate)))
            }
            Err(e) => item_result(&item.topic, Err(&CommandError::from(e))),
        };
    }
    HttpResponse::json(200, serde_json::json!({ "results": results }).to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Broadcast<'a> {
    topics: Vec<String>,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// `POST /api/broadcast`: `{"topics": [...], "data": <JSON>}`.
pub fn broadcast(g: &Arc<Gateway>, req: &HttpRequest<'_>) -> HttpResponse {
    if let Some(refused) = check_key(g, req) {
        return refused;
    }
    if req.header("idempotency-key").is_some() {
        // Silently ignored, a retried broadcast would be published twice.
        return json_error(
            400,
            "a broadcast takes no Idempotency-Key: publish to each topic with POST /api/publish_batch",
        );
    }
    let body: Broadcast<'_> = match std::str::from_utf8(req.body()).map_err(|e| e.to_string()).and_then(|t| {
        serde_json::from_str(t).map_err(|e| format!("body must be {{\"topics\": [...], \"data\": ...}}: {e}"))
    }) {
        Ok(b) => b,
        Err(why) => return json_error(400, &why),
    };
    if body.topics.is_empty() || body.topics.len() > 1000 {
        return json_error(400, "topics must list 1 to 1000 topics");
    }
    for t in &body.topics {
        if let Err(e) = check_topic(t) {
            return json_error(e.code, &format!("{t:?}: {}", e.reason));
        }
    }
    if let Some(b) = g.broker.get() {
        let reply = PublishReply::Http(req.defer());
        let fragment = fragment(&Payload::Json(body.data.get()));
        b.send(BrokerRequest::Publish {
            topics: body.topics,
            fragment,
            reply,
            opts: PublishOptions::default(),
        });
        return HttpResponse::text(202, "deferred");
    }
    // All or nothing (as in cluster mode, where one script publishes to all the topics): a
    // partial broadcast answered with an error would be published twice by a backend that
    // retries it.
    if !g.topics.room_for(&body.topics) {
        return publish_failed(PublishError::TooManyTopics);
    }
    let mut results = Vec::with_capacity(body.topics.len());
    for t in &body.topics {
        match g.publish(t, &Payload::Json(body.data.get())) {
            Ok(pos) => {
                g.stats.http_publishes.fetch_add(1, Ordering::Relaxed);
                results.push(serde_json::json!({"topic": t, "epoch": pos.epoch, "seq": pos.seq}));
            }
            Err(e) => return publish_failed(e),
        }
    }
    HttpResponse::json(200, serde_json::json!({ "results": results }).to_string())
}

/// `GET /api/topics/{topic}`.
pub fn topic_info(g: &Arc<Gateway>, req: &HttpRequest<'_>) -> HttpResponse {
    if let Some(refused) = check_key(g, req) {
        return refused;
    }
    let topic = match topic_from_path(req.path(), "/api/topics/") {
        Ok(t) => t,
        Err(r) => return r,
    };
    let subscribers = g.handle.get().map_or(0, |h| h.num_subscribers(&topic));
    if let Some(b) = g.broker.get() {
        b.send(BrokerRequest::TopicInfo { topic, subscribers, reply: req.defer() });
        return HttpResponse::text(202, "deferred");
    }
    let pos = g.topics.position(&topic);
    HttpResponse::json(
        200,
        serde_json::json!({
            "topic": topic,
            "subscribers": subscribers,
            "seq": pos.as_ref().map_or(0, |p| p.seq),
            "epoch": pos.map(|p| p.epoch),
        })
        .to_string(),
    )
}

/// `GET /api/history/{topic}?since_seq=N&limit=M`: the topic's retained messages after
/// `since_seq`, oldest first.
pub fn history(g: &Arc<Gateway>, req: &HttpRequest<'_>) -> HttpResponse {
    if let Some(refused) = check_key(g, req) {
        return refused;
    }
    let topic = match topic_from_path(req.path(), "/api/history/") {
        Ok(t) => t,
        Err(r) => return r,
    };
    let (since, limit) = match parse_query(req.query(), &g.settings.history_read) {
        Ok(q) => q,
        Err(e) => return json_error(e.code, &e.reason),
    };
    // The same bound as a client's `history` answer: what one connection may queue.
    let max_bytes = g.settings.behavior.max_backpressure / 2;
    let query = HistoryQuery { since, limit, max_bytes };
    if let Some(b) = g.broker.get() {
        b.send(BrokerRequest::History { topic, query, reply: HistoryReply::Http(req.defer()) });
        return HttpResponse::text(202, "deferred");
    }
    let page = g.topics.history(&topic, &query);
    g.stats.http_histories.fetch_add(1, Ordering::Relaxed);
    HttpResponse::json(200, page.http_body(&topic))
}

/// `GET /api/presence/{topic}`: who is subscribed (the connections with a token, up to
/// `presence.max_clients`) and the counts.
pub fn presence(g: &Arc<Gateway>, req: &HttpRequest<'_>) -> HttpResponse {
    presence_read(g, req, "/api/presence/", true)
}

/// `GET /api/presence_stats/{topic}`: how many connections and distinct users are subscribed.
pub fn presence_stats(g: &Arc<Gateway>, req: &HttpRequest<'_>) -> HttpResponse {
    presence_read(g, req, "/api/presence_stats/", false)
}

fn presence_read(g: &Arc<Gateway>, req: &HttpRequest<'_>, prefix: &str, list: bool) -> HttpResponse {
    if let Some(refused) = check_key(g, req) {
        return refused;
    }
    let topic = match topic_from_path(req.path(), prefix) {
        Ok(t) => t,
        Err(r) => return r,
    };
    if req.query().is_some_and(|q| !q.is_empty()) {
        return json_error(400, "presence reads take no query parameters");
    }
    if g.settings.presence.rules.tracked(&topic).is_none() {
        let e = super::presence::not_tracked(&topic);
        return json_error(e.code, &e.reason);
    }
    let p = &g.settings.presence;
    // The same bound as a client's answer: what one connection may queue.
    let limit = ListLimit { max_clients: p.max_clients, max_bytes: g.settings.behavior.max_backpressure / 2 };
    if let Some(b) = g.broker.get() {
        let reply = PresenceReply::Http(req.defer());
        b.send(BrokerRequest::Presence { topic, list, limit, reply });
        return HttpResponse::text(202, "deferred");
    }
    g.stats.presence_reads.of(true, list).fetch_add(1, Ordering::Relaxed);
    let body = if list {
        let page = g.presence.list(&topic, &limit);
        super::presence::body(&topic, |out| page.write_fields(out))
    } else {
        let stats = g.presence.stats(&topic);
        super::presence::body(&topic, |out| stats.write_fields(out))
    };
    HttpResponse::json(200, body)
}

/// `GET /healthz`: 200 when the gateway works; 503 in cluster mode while Redis is
/// unreachable (so that a load balancer sends clients elsewhere).
pub fn health(g: &Arc<Gateway>) -> HttpResponse {
    let (connections, loops, subscribed) =
        g.handle.get().map_or((0, 0, 0), |h| (h.connections(), h.loops(), h.num_topics()));
    let broker = g.broker.get().map(|b| b.status.is_up());
    let (status, state) = match broker {
        Some(false) => (503, "degraded"),
        _ => (200, "ok"),
    };
    let mut body = serde_json::json!({
        "status": state, "connections": connections, "loops": loops, "topics_subscribed": subscribed,
    });
    match broker {
        // In cluster mode topics keep their state in Redis, not here.
        Some(up) => body["broker"] = serde_json::json!(if up { "up" } else { "down" }),
        None => body["topics"] = serde_json::json!(g.topics.len()),
    }
    HttpResponse::json(status, body.to_string())
}

/// A per-loop metric: name, type, help, and how to read it from a loop's counters.
type PerLoopMetric = (&'static str, &'static str, &'static str, fn(&gale_server::LoopSnapshot) -> u64);

/// One metric with a single value, in the Prometheus text format.
pub(super) fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
}

/// `GET /metrics`, in the Prometheus text format.
pub fn metrics(g: &Arc<Gateway>) -> HttpResponse {
    let mut out = String::with_capacity(4096);
    if let Some(h) = g.handle.get() {
        let snaps: Vec<_> = (0..h.loops()).map(|i| h.loop_stats(i)).collect();
        let per_loop: [PerLoopMetric; 8] = [
            ("gale_connections", "gauge", "Open connections.", |s| s.connections as u64),
            ("gale_messages_received_total", "counter", "WebSocket messages received.", |s| s.messages_in),
            ("gale_messages_sent_total", "counter", "WebSocket messages sent, deliveries included.", |s| {
                s.messages_out
            }),
            ("gale_bytes_received_total", "counter", "Bytes received.", |s| s.bytes_in),
            ("gale_bytes_sent_total", "counter", "Bytes of WebSocket messages sent.", |s| s.bytes_out),
            ("gale_backpressure_drops_total", "counter", "Messages refused to slow clients.", |s| s.dropped),
            (
                "gale_reads_paused_total",
                "counter",
                "Times a client past max_backpressure stopped being read.",
                |s| s.reads_paused,
            ),
            (
                "gale_backpressure_timeouts_total",
                "counter",
                "Clients dropped after backpressure_timeout past max_backpressure.",
                |s| s.backpressure_timeouts,
            ),
        ];
        for (name, kind, help, get) in per_loop {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (i, s) in snaps.iter().enumerate() {
                let _ = writeln!(out, "{name}{{loop=\"{i}\"}} {}", get(s));
            }
        }
        metric(
            &mut out,
            "gale_topics_subscribed",
            "gauge",
            "Topics with at least one subscriber.",
            h.num_topics(),
        );
    }
    let s = &g.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    if g.broker.get().is_none() {
        // In cluster mode topics keep their state and history in Redis, not here.
        metric(
            &mut out,
            "gale_topics",
            "gauge",
            "Topics with state (sequence numbers, history).",
            g.topics.len(),
        );
        metric(
            &mut out,
            "gale_history_bytes",
            "gauge",
            "Bytes of history kept for recovery.",
            g.topics.history_bytes(),
        );
        metric(
            &mut out,
            "gale_idempotency_keys",
            "gauge",
            "Idempotency keys remembered.",
            g.topics.remembered_keys(),
        );
    }
    let _ = writeln!(
        out,
        "# HELP gale_publishes_total Messages published.\n# TYPE gale_publishes_total counter\ngale_publishes_total{{source=\"http\"}} {}\ngale_publishes_total{{source=\"client\"}} {}",
        load(&s.http_publishes),
        load(&s.client_publishes)
    );
    let _ = writeln!(
        out,
        "# HELP gale_recoveries_total Subscriptions with a position to recover from.\n# TYPE gale_recoveries_total counter\ngale_recoveries_total{{result=\"recovered\"}} {}\ngale_recoveries_total{{result=\"impossible\"}} {}",
        load(&s.recovered),
        load(&s.not_recovered)
    );
    let _ = writeln!(
        out,
        "# HELP gale_history_reads_total History reads answered (HTTP API, client commands).\n# TYPE gale_history_reads_total counter\ngale_history_reads_total{{source=\"http\"}} {}\ngale_history_reads_total{{source=\"client\"}} {}",
        load(&s.http_histories),
        load(&s.client_histories)
    );
    let pr = &s.presence_reads;
    let _ = writeln!(
        out,
        "# HELP gale_presence_requests_total Presence reads answered (HTTP API, client commands; lists and counts).\n# TYPE gale_presence_requests_total counter\ngale_presence_requests_total{{source=\"http\",kind=\"list\"}} {}\ngale_presence_requests_total{{source=\"http\",kind=\"stats\"}} {}\ngale_presence_requests_total{{source=\"client\",kind=\"list\"}} {}\ngale_presence_requests_total{{source=\"client\",kind=\"stats\"}} {}",
        load(&pr.http_list),
        load(&pr.http_stats),
        load(&pr.client_list),
        load(&pr.client_stats)
    );
    metric(
        &mut out,
        "gale_join_leave_events_total",
        "counter",
        "Join and leave events sent to subscribers.",
        load(&s.join_leave_events),
    );
    metric(
        &mut out,
        "gale_presence_members",
        "gauge",
        "Subscriptions of this node kept in presence (to topics whose namespace keeps it).",
        g.presence_members(),
    );
    metric(
        &mut out,
        "gale_idempotent_replays_total",
        "counter",
        "Publishes answered from a remembered idempotency key, not published again.",
        load(&s.idempotent_replays),
    );
    metric(
        &mut out,
        "gale_batch_items_total",
        "counter",
        "Items of POST /api/publish_batch requests.",
        load(&s.batch_items),
    );
    let _ = writeln!(
        out,
        "# HELP gale_token_refreshes_total refresh commands.\n# TYPE gale_token_refreshes_total counter\ngale_token_refreshes_total{{result=\"ok\"}} {}\ngale_token_refreshes_total{{result=\"refused\"}} {}",
        load(&s.refreshes),
        load(&s.refused_refreshes)
    );
    metric(
        &mut out,
        "gale_command_errors_total",
        "counter",
        "Client commands answered with an error.",
        load(&s.command_errors),
    );
    metric(
        &mut out,
        "gale_rejected_upgrades_total",
        "counter",
        "WebSocket upgrades refused (origin, token).",
        load(&s.rejected_upgrades),
    );
    super::control::write_metrics(g, &mut out);
    if let Some(b) = g.broker.get() {
        let st = &b.status;
        metric(
            &mut out,
            "gale_broker_up",
            "gauge",
            "Whether the Redis broker is connected.",
            u8::from(st.is_up()),
        );
        for (name, help, value) in [
            ("gale_broker_reconnects_total", "Connections to Redis after the first.", &st.reconnects),
            (
                "gale_broker_failed_publishes_total",
                "Publishes refused while Redis was unreachable.",
                &st.failed_publishes,
            ),
            ("gale_broker_forwarded_total", "Messages forwarded from Redis to this node.", &st.forwarded),
            ("gale_broker_pipelines_total", "Pipelines of commands written to Redis nodes.", &st.pipelines),
            ("gale_broker_pipelined_total", "Commands written in those pipelines.", &st.pipelined),
            (
                "gale_broker_log_reads_total",
                "Ranges of topic logs read for recovering subscriptions (shared by the subscribes that queue up together).",
                &st.log_reads,
            ),
            (
                "gale_broker_listener_passes_total",
                "Passes of the Redis listener that brought messages.",
                &st.listener_passes,
            ),
        ] {
            metric(&mut out, name, "counter", help, load(value));
        }
    }
    HttpResponse::new(200, "text/plain; version=0.0.4; charset=utf-8", out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("chat%3Alobby").as_deref(), Some("chat:lobby"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("bad%4"), None);
        assert_eq!(percent_decode("bad%zz"), None);
    }
}
