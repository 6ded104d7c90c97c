//! The echo scenario: every connection sends numbered messages and checks each echo byte for
//! byte. Closed loop (`pipeline` messages in flight, the next sent when one comes back) or open
//! loop (`--rate`: messages sent on a fixed schedule whatever the server does, latency measured
//! from the scheduled time so that a stalled server cannot hide it).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::conn::{Failure, Io};
use crate::engine::{Cx, Driver, latency_histogram};
use crate::payload::{Kind, Payloads, chat_message};

/// How messages are paced.
#[derive(Clone, Copy, Debug)]
pub enum Pacing {
    /// Keep this many messages in flight per connection.
    Closed { pipeline: usize },
    /// Send one message per connection every `interval`.
    Open { interval: Duration },
}

/// Echo results of one thread.
#[derive(Clone, Debug)]
pub struct EchoStats {
    /// Echoes received inside the measurement window.
    pub messages: u64,
    /// Payload bytes of those echoes.
    pub bytes: u64,
    /// Round-trip latency of those echoes, microseconds.
    pub latency_us: Histogram<u64>,
    /// Echoes that did not match what was sent (wrong bytes, wrong order, wrong type).
    pub mismatches: u64,
    /// All messages sent, warm-up included.
    pub sent: u64,
}

impl EchoStats {
    fn new() -> Self {
        EchoStats { messages: 0, bytes: 0, latency_us: latency_histogram(), mismatches: 0, sent: 0 }
    }

    /// Add another thread's figures.
    pub fn merge(&mut self, o: &EchoStats) {
        self.messages += o.messages;
        self.bytes += o.bytes;
        let _ = self.latency_us.add(&o.latency_us);
        self.mismatches += o.mismatches;
        self.sent += o.sent;
    }
}

/// Per-connection echo state.
#[derive(Default)]
pub struct EchoConn {
    next_seq: u64,
    /// Messages in flight: sequence number and (scheduled) send time.
    inflight: VecDeque<(u64, Instant)>,
    /// Open loop: when the next message is due.
    next_due: Option<Instant>,
    /// Raw TCP mode: the start of a message split across reads.
    partial: Vec<u8>,
}

/// The echo driver of one thread.
pub struct Echo {
    payloads: Payloads,
    /// Send chat messages ([`chat_message`]) instead of the fixed-size payloads.
    chat: bool,
    pacing: Pacing,
    raw: bool,
    /// Echoes received in `[from, until)` are measured.
    pub from: Instant,
    /// End of the measurement window.
    pub until: Instant,
    /// Results.
    pub stats: EchoStats,
    /// A description of the first mismatch, for the report.
    pub first_mismatch: Option<String>,
    started: u64,
}

impl Echo {
    /// An echo driver; the window is set by the caller once connections are up.
    pub fn new(payloads: Payloads, chat: bool, pacing: Pacing, raw: bool) -> Self {
        let now = Instant::now();
        Echo {
            payloads,
            chat,
            pacing,
            raw,
            from: now,
            until: now,
            stats: EchoStats::new(),
            first_mismatch: None,
            started: 0,
        }
    }

    fn send(&mut self, io: &mut Io, st: &mut EchoConn, cx: &mut Cx, at: Instant) {
        let seq = st.next_seq;
        st.next_seq += 1;
        st.inflight.push_back((seq, at));
        let payloads = &self.payloads;
        if self.chat {
            let msg = chat_message(seq);
            io.send(&mut cx.rng, Kind::Text, msg.len(), |b| b.copy_from_slice(msg.as_bytes()));
        } else if self.raw {
            io.send_raw(payloads.size(), |b| payloads.write(seq, b));
        } else {
            io.send(&mut cx.rng, payloads.kind(), payloads.size(), |b| payloads.write(seq, b));
        }
        self.stats.sent += 1;
    }

    /// One echo came back.
    fn received(&mut self, io: &mut Io, st: &mut EchoConn, ok_kind: bool, payload: &[u8], cx: &mut Cx) {
        let Some((seq, sent_at)) = st.inflight.pop_front() else {
            self.mismatch("an echo arrived for a message never sent".into());
            return;
        };
        let same = if self.chat {
            payload == chat_message(seq).as_bytes()
        } else {
            self.payloads.verify(seq, payload)
        };
        if !ok_kind || !same {
            let what = if ok_kind { "payload differs" } else { "message type differs" };
            self.mismatch(format!("echo of message {seq}: {what} ({} bytes back)", payload.len()));
        } else if cx.now >= self.from && cx.now < self.until {
            self.stats.messages += 1;
            self.stats.bytes += payload.len() as u64;
            let us = cx.now.saturating_duration_since(sent_at).as_micros() as u64;
            let _ = self.stats.latency_us.record(us.max(1));
        }
        if let Pacing::Closed { .. } = self.pacing
            && cx.now < self.until
        {
            self.send(io, st, cx, cx.now);
        }
    }

    fn mismatch(&mut self, what: String) {
        self.stats.mismatches += 1;
        self.first_mismatch.get_or_insert(what);
    }
}

impl Driver for Echo {
    type State = EchoConn;

    fn on_start(&mut self, io: &mut Io, st: &mut EchoConn, cx: &mut Cx) {
        self.started += 1;
        match self.pacing {
            Pacing::Closed { pipeline } => {
                for _ in 0..pipeline.max(1) {
                    self.send(io, st, cx, cx.now);
                }
            }
            Pacing::Open { interval } => {
                // Spread the connections' schedules evenly over one interval, however many
                // there are: the fractional parts of k × the golden ratio fill [0, 1) evenly
                // at every count (k / 1000 would bunch 100 connections into a tenth of it,
                // sending in bursts that inflate the latency of a steady rate).
                let offset = interval.mul_f64((self.started as f64 * 0.618_033_988_749_895).fract());
                st.next_due = Some(cx.now + offset);
            }
        }
    }

    fn on_message(&mut self, io: &mut Io, st: &mut EchoConn, kind: Kind, payload: &[u8], cx: &mut Cx) {
        cx.progress.messages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if !self.raw {
            let ok_kind = kind == if self.chat { Kind::Text } else { self.payloads.kind() };
            self.received(io, st, ok_kind, payload, cx);
            return;
        }
        // Raw TCP: cut the byte stream into messages of the known size.
        let size = self.payloads.size().max(1);
        let mut rest = payload;
        if !st.partial.is_empty() {
            let take = (size - st.partial.len()).min(rest.len());
            st.partial.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if st.partial.len() < size {
                return;
            }
            let whole = std::mem::take(&mut st.partial);
            self.received(io, st, true, &whole, cx);
        }
        while rest.len() >= size {
            let (one, tail) = rest.split_at(size);
            self.received(io, st, true, one, cx);
            rest = tail;
        }
        st.partial.extend_from_slice(rest);
    }

    fn on_tick(&mut self, io: &mut Io, st: &mut EchoConn, cx: &mut Cx) {
        let Pacing::Open { interval } = self.pacing else { return };
        while let Some(due) = st.next_due {
            if due > cx.now || due >= self.until {
                break;
            }
            self.send(io, st, cx, due);
            st.next_due = Some(due + interval);
        }
    }

    fn tick(&self) -> Option<Duration> {
        match self.pacing {
            Pacing::Open { interval } => Some(interval.min(Duration::from_millis(1))),
            Pacing::Closed { .. } => None,
        }
    }

    fn set_window(&mut self, from: Instant, until: Instant) {
        self.from = from;
        self.until = until;
    }

    fn on_lost(&mut self, st: &mut EchoConn, why: &Failure, _cx: &mut Cx) {
        if !st.inflight.is_empty() {
            self.mismatch(format!("connection lost with {} messages in flight: {why}", st.inflight.len()));
        }
    }
}
