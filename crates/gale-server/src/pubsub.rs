//! Publish/subscribe: topics, their subscribers on each loop, and fan-out across loops.
//!
//! Each loop keeps its own table of topic -> local subscribers ([`LoopTopics`]); the server
//! keeps one [`Registry`] saying, per topic, which loops have subscribers and how many there
//! are in all. A publish frames the message once into a [`Published`] (compressed at most once
//! per window size, by the first loop that needs it) and hands an `Arc` of it to each loop that
//! has subscribers, through the loop's mailbox; a loop without subscribers for the topic never
//! sees it. Each loop copies the frame into the output buffers of its subscribers, and every
//! subscriber gets one write per loop iteration however many messages arrived.
//!
//! A subscription sees exactly the messages published after `subscribe` returned. Every
//! publish takes the next value of one server-wide counter; a subscriber records the counter
//! when it subscribes and skips messages numbered at or below it that were already on their
//! way. Applications that keep history (the gateway) use this to replay the past and then
//! go live without a gap or a duplicate.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use gale_frame::deflate::{MAX_WINDOW_BITS, MIN_WINDOW_BITS};
use gale_frame::{FrameSpec, OpCode, append_frame};

use crate::compress::SharedCodecs;

/// Identifies a connection within a server: for excluding the sender from a publish, and for
/// acting on the connection from another thread ([`crate::ServerHandle::post_to`]). It holds
/// the loop, the connection's slot in it, and a serial number that tells a later connection
/// in the same slot apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId(pub(crate) u64);

impl ConnId {
    /// The id of connection number `serial` of loop `index`, in slot `key`.
    pub(crate) fn new(index: usize, key: usize, serial: u64) -> Self {
        ConnId(((index as u64 & 0xFFFF) << 48) | ((key as u64 & 0xFF_FFFF) << 24) | (serial & 0xFF_FFFF))
    }

    /// The id as a number, to name the connection outside the process (a message that
    /// comes back through a broker, to be delivered to everyone but its publisher).
    pub fn to_bits(self) -> u64 {
        self.0
    }

    /// The id [`to_bits`](Self::to_bits) gave. A number that names no connection only fails
    /// to match one.
    pub fn from_bits(bits: u64) -> Self {
        ConnId(bits)
    }

    /// The loop the connection belongs to.
    pub(crate) fn loop_index(self) -> usize {
        (self.0 >> 48) as usize
    }

    /// The connection's slot in its loop.
    pub(crate) fn key(self) -> usize {
        ((self.0 >> 24) & 0xFF_FFFF) as usize
    }

    /// The low 24 bits of the connection's serial number in its loop: enough to tell it from
    /// the connections that held its slot before.
    pub(crate) fn serial(self) -> u32 {
        (self.0 & 0xFF_FFFF) as u32
    }
}

/// What every thread knows of a topic.
pub(crate) struct TopicGlobal {
    /// Subscribers over all loops.
    subscribers: AtomicUsize,
    /// Bit `i` of word `i / 64`: loop `i` has subscribers.
    loops: Box<[AtomicU64]>,
    /// Per loop: subscribers counted by [`Registry::prepare`] that the loop has not added yet.
    pending: Box<[AtomicUsize]>,
}

/// The server-wide topic table.
pub(crate) struct Registry {
    topics: RwLock<HashMap<Arc<str>, Arc<TopicGlobal>>>,
    /// Numbers publishes; see the module docs.
    serial: AtomicU64,
    loop_words: usize,
    loops: usize,
}

impl Registry {
    pub(crate) fn new(loops: usize) -> Self {
        Registry {
            topics: RwLock::default(),
            serial: AtomicU64::new(0),
            loop_words: loops.div_ceil(64),
            loops,
        }
    }

    fn new_topic(&self) -> Arc<TopicGlobal> {
        Arc::new(TopicGlobal {
            subscribers: AtomicUsize::new(0),
            loops: (0..self.loop_words).map(|_| AtomicU64::new(0)).collect(),
            pending: (0..self.loops).map(|_| AtomicUsize::new(0)).collect(),
        })
    }

    /// Count one more subscriber of `t` on loop `index` and route the topic there; returns the
    /// publish number the subscriber starts after. The bit is set before the number is read
    /// (see [`Registry::route`]).
    fn join(&self, t: &TopicGlobal, index: usize) -> u64 {
        t.loops[index / 64].fetch_or(1u64 << (index % 64), Ordering::SeqCst);
        t.subscribers.fetch_add(1, Ordering::SeqCst);
        self.serial.load(Ordering::SeqCst)
    }

    /// Stop routing `global`'s topic to loop `index`, which has no local subscriber left,
    /// unless a subscriber is on its way there. Under the write lock, so that no publish is
    /// routed and no subscriber prepared while the bit changes.
    fn leave_loop(&self, global: &TopicGlobal, index: usize) {
        let _exclusive = self.topics.write().unwrap_or_else(|e| e.into_inner());
        if global.pending[index].load(Ordering::SeqCst) == 0 {
            global.loops[index / 64].fetch_and(!(1u64 << (index % 64)), Ordering::SeqCst);
        }
    }

    /// Subscribers of `topic` over all loops.
    pub(crate) fn subscribers(&self, topic: &str) -> usize {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        topics.get(topic).map_or(0, |t| t.subscribers.load(Ordering::Relaxed))
    }

    /// Topics with at least one subscriber.
    pub(crate) fn topic_count(&self) -> usize {
        self.topics.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Number the publish and call `deliver(loop)` for each loop with subscribers of `topic`;
    /// returns the publish's number, or `None` when nobody is subscribed.
    pub(crate) fn route(&self, topic: &str, mut deliver: impl FnMut(u64, usize)) -> Option<u64> {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        let t = topics.get(topic)?;
        // Numbering before reading the loop bits pairs with `LoopTopics::subscribe`, which sets
        // its bit before reading the number: a subscriber either sees this message's loop
        // bit set or records a number at or above it (and skips it).
        let serial = self.serial.fetch_add(1, Ordering::SeqCst) + 1;
        for (w, word) in t.loops.iter().enumerate() {
            let mut bits = word.load(Ordering::SeqCst);
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                deliver(serial, w * 64 + bit);
            }
        }
        Some(serial)
    }

    /// The shared entry of `topic`, created if needed; `f` runs under the table's lock so
    /// that an entry is never removed while a subscriber is being added to it.
    fn with_topic<R>(&self, topic: &Arc<str>, f: impl FnOnce(&Arc<TopicGlobal>) -> R) -> R {
        {
            let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = topics.get(topic) {
                return f(t);
            }
        }
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        let t = topics.entry(topic.clone()).or_insert_with(|| self.new_topic());
        f(t)
    }

    /// Count a subscriber of `topic` on loop `index` now, for a connection the loop will add
    /// when it gets the task `post` sends (see [`LoopTopics::settle_prepared`]). Under the write lock:
    /// a publish numbered after the serial handed to `post` is routed after `post` ran, so its
    /// task follows the subscription's in the loop's mailbox.
    pub(crate) fn prepare(&self, topic: &Arc<str>, index: usize, post: impl FnOnce(Arc<TopicGlobal>, u64)) {
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        let t = topics.entry(topic.clone()).or_insert_with(|| self.new_topic()).clone();
        t.pending[index].fetch_add(1, Ordering::SeqCst);
        let since = self.join(&t, index);
        post(t, since);
    }

    /// Drop the entry of `topic` if nobody subscribes to it any more.
    fn forget_if_unused(&self, topic: &str) {
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        if topics.get(topic).is_some_and(|t| t.subscribers.load(Ordering::SeqCst) == 0) {
            topics.remove(topic);
        }
    }
}

/// A message published to a topic, framed once for every subscriber.
pub(crate) struct Published {
    pub(crate) topic: Arc<str>,
    /// The uncompressed frame: header, then payload from `payload_at`.
    frame: Box<[u8]>,
    payload_at: usize,
    opcode: OpCode,
    /// Whether subscribers that negotiated compression may get it compressed.
    pub(crate) compress: bool,
    /// Compressed frames without context, one per window size, made when first needed.
    deflated: [OnceLock<Box<[u8]>>; (MAX_WINDOW_BITS - MIN_WINDOW_BITS + 1) as usize],
    /// The connection that published it, when it asked not to get it back.
    pub(crate) exclude: Option<ConnId>,
    /// Its number (see the module docs); set once routed.
    pub(crate) serial: u64,
}

impl Published {
    pub(crate) fn new(
        topic: Arc<str>,
        opcode: OpCode,
        payload: &[u8],
        compress: bool,
        exclude: Option<ConnId>,
    ) -> Self {
        let mut frame = Vec::with_capacity(payload.len() + 10);
        append_frame(&mut frame, FrameSpec::server(opcode), payload);
        let payload_at = frame.len() - payload.len();
        Published {
            topic,
            frame: frame.into_boxed_slice(),
            payload_at,
            opcode,
            compress,
            deflated: Default::default(),
            exclude,
            serial: 0,
        }
    }

    /// The frame without compression.
    pub(crate) fn frame(&self) -> &[u8] {
        &self.frame
    }

    /// The payload.
    pub(crate) fn payload(&self) -> &[u8] {
        &self.frame[self.payload_at..]
    }

    /// Text or binary.
    pub(crate) fn opcode(&self) -> OpCode {
        self.opcode
    }

    /// The frame compressed without context with a `window_bits` window (made by the first
    /// caller, shared by all).
    pub(crate) fn deflated(&self, window_bits: u8, codecs: &mut SharedCodecs) -> &[u8] {
        let slot = (window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS) - MIN_WINDOW_BITS) as usize;
        self.deflated[slot].get_or_init(|| {
            let mut compressed = std::mem::take(&mut codecs.compressed);
            codecs.deflate_without_context(window_bits, self.payload(), &mut compressed);
            let mut frame = Vec::with_capacity(compressed.len() + 10);
            let spec = FrameSpec { compressed: true, ..FrameSpec::server(self.opcode) };
            append_frame(&mut frame, spec, &compressed);
            codecs.compressed = compressed;
            frame.into_boxed_slice()
        })
    }
}

/// One topic's subscribers on one loop.
struct LocalTopic {
    global: Arc<TopicGlobal>,
    /// Connection key -> the publish number current when it subscribed.
    subscribers: HashMap<u32, u64>,
}

/// A loop's topic table, and each connection's topics (kept here rather than in the
/// connection, so that a connection without subscriptions pays nothing for them).
pub(crate) struct LoopTopics {
    registry: Arc<Registry>,
    index: usize,
    topics: HashMap<Arc<str>, LocalTopic>,
    by_conn: HashMap<u32, Vec<Arc<str>>>,
}

impl LoopTopics {
    pub(crate) fn new(registry: Arc<Registry>, index: usize) -> Self {
        LoopTopics { registry, index, topics: HashMap::new(), by_conn: HashMap::new() }
    }

    /// Subscribe connection `key`; returns false if it already was.
    pub(crate) fn subscribe(&mut self, topic: &str, key: u32) -> bool {
        match self.add(topic, key) {
            Some(name) => {
                self.by_conn.entry(key).or_default().push(name);
                true
            }
            None => false,
        }
    }

    /// Unsubscribe connection `key`; returns whether it was subscribed.
    pub(crate) fn unsubscribe(&mut self, topic: &str, key: u32) -> bool {
        let Some(list) = self.by_conn.get_mut(&key) else { return false };
        let Some(i) = list.iter().position(|t| &**t == topic) else { return false };
        list.swap_remove(i);
        if list.is_empty() {
            self.by_conn.remove(&key);
        }
        self.remove(topic, key)
    }

    /// End every subscription of connection `key` (it is closing).
    pub(crate) fn unsubscribe_all(&mut self, key: u32) {
        for topic in self.by_conn.remove(&key).unwrap_or_default() {
            self.remove(&topic, key);
        }
    }

    /// A subscription counted by [`Registry::prepare`] on another thread reached this loop:
    /// add connection `key` to the topic, or take the count back if the connection is gone
    /// (`None`, no longer an open WebSocket) or already a subscriber.
    pub(crate) fn settle_prepared(
        &mut self,
        name: Arc<str>,
        global: Arc<TopicGlobal>,
        key: Option<u32>,
        since: u64,
    ) {
        global.pending[self.index].fetch_sub(1, Ordering::SeqCst);
        if let Some(key) = key {
            let local = self
                .topics
                .entry(name.clone())
                .or_insert_with(|| LocalTopic { global: global.clone(), subscribers: HashMap::new() });
            if let std::collections::hash_map::Entry::Vacant(slot) = local.subscribers.entry(key) {
                slot.insert(since);
                self.by_conn.entry(key).or_default().push(name);
                return;
            }
        }
        self.uncount(&name, &global);
    }

    /// Take one subscriber off `topic`'s count, and stop routing it here if none is left.
    fn uncount(&mut self, topic: &str, global: &TopicGlobal) {
        let left = global.subscribers.fetch_sub(1, Ordering::SeqCst) - 1;
        if self.topics.get(topic).is_none_or(|l| l.subscribers.is_empty()) {
            self.registry.leave_loop(global, self.index);
            self.topics.remove(topic);
        }
        if left == 0 {
            self.registry.forget_if_unused(topic);
        }
    }

    /// Whether connection `key` is subscribed to `topic`.
    pub(crate) fn has(&self, topic: &str, key: u32) -> bool {
        self.topics.get(topic).is_some_and(|local| local.subscribers.contains_key(&key))
    }

    /// The topics connection `key` is subscribed to.
    pub(crate) fn of(&self, key: u32) -> &[Arc<str>] {
        self.by_conn.get(&key).map_or(&[], Vec::as_slice)
    }

    /// Add connection `key` to the topic's subscribers; returns the topic's shared name, or
    /// `None` if it already was one.
    fn add(&mut self, topic: &str, key: u32) -> Option<Arc<str>> {
        if let Some(local) = self.topics.get_mut(topic) {
            if local.subscribers.contains_key(&key) {
                return None;
            }
            let since = self.registry.serial.load(Ordering::SeqCst);
            local.subscribers.insert(key, since);
            local.global.subscribers.fetch_add(1, Ordering::SeqCst);
            let (name, _) = self.topics.get_key_value(topic)?;
            return Some(name.clone());
        }
        let name: Arc<str> = Arc::from(topic);
        let (registry, index) = (&self.registry, self.index);
        let (global, since) = registry.with_topic(&name, |t| (t.clone(), registry.join(t, index)));
        let mut subscribers = HashMap::new();
        subscribers.insert(key, since);
        self.topics.insert(name.clone(), LocalTopic { global, subscribers });
        Some(name)
    }

    /// Remove connection `key` from the topic's subscribers; returns whether it was one.
    fn remove(&mut self, topic: &str, key: u32) -> bool {
        let Some(local) = self.topics.get_mut(topic) else { return false };
        if local.subscribers.remove(&key).is_none() {
            return false;
        }
        let left = local.global.subscribers.fetch_sub(1, Ordering::SeqCst) - 1;
        if local.subscribers.is_empty() {
            let global = local.global.clone();
            self.registry.leave_loop(&global, self.index);
            self.topics.remove(topic);
            if left == 0 {
                self.registry.forget_if_unused(topic);
            }
        }
        true
    }

    /// The local subscribers that should get `msg`, into `out` (cleared first).
    pub(crate) fn recipients(&self, msg: &Published, out: &mut Vec<u32>) {
        out.clear();
        if let Some(local) = self.topics.get(&msg.topic) {
            out.extend(local.subscribers.iter().filter(|&(_, &since)| msg.serial > since).map(|(&k, _)| k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_only_to_loops_with_subscribers_and_skips_older_messages() {
        let registry = Arc::new(Registry::new(3));
        let mut l0 = LoopTopics::new(registry.clone(), 0);
        let mut l2 = LoopTopics::new(registry.clone(), 2);
        assert_eq!(registry.route("t", |_, _| panic!("no subscribers")), None);
        assert!(l2.subscribe("t", 7));
        assert!(!l2.subscribe("t", 7), "second subscribe is a no-op");
        assert_eq!(l2.of(7).len(), 1);
        assert!(l2.has("t", 7) && !l2.has("t", 8) && !l2.has("u", 7));
        let mut loops = Vec::new();
        let serial = registry.route("t", |_, l| loops.push(l)).unwrap();
        assert_eq!(loops, vec![2]);
        // A subscriber that arrives after the publish was numbered does not get it.
        assert!(l0.subscribe("t", 1));
        assert_eq!(registry.subscribers("t"), 2);
        let mut msg = Published::new("t".into(), OpCode::Text, b"hi", false, None);
        msg.serial = serial;
        let mut out = Vec::new();
        l0.recipients(&msg, &mut out);
        assert!(out.is_empty());
        l2.recipients(&msg, &mut out);
        assert_eq!(out, vec![7]);
        assert!(l2.unsubscribe("t", 7));
        assert!(!l2.unsubscribe("t", 7));
        assert!(!l2.has("t", 7));
        loops.clear();
        registry.route("t", |_, l| loops.push(l));
        assert_eq!(loops, vec![0]);
        assert!(l0.subscribe("u", 1));
        l0.unsubscribe_all(1);
        assert!(l0.of(1).is_empty());
        assert_eq!(registry.subscribers("t"), 0);
        assert_eq!(registry.topic_count(), 0, "an unused topic is forgotten");
    }

    #[test]
    fn frames_once_and_compresses_once_per_window() {
        let msg = Published::new("t".into(), OpCode::Text, &[b'a'; 300], true, None);
        assert_eq!(msg.frame()[0], 0x81);
        assert_eq!(msg.payload(), &[b'a'; 300][..]);
        let mut codecs = SharedCodecs::default();
        let a = msg.deflated(15, &mut codecs).as_ptr();
        let b = msg.deflated(15, &mut codecs).as_ptr();
        assert_eq!(a, b, "compressed once");
        let f = msg.deflated(15, &mut codecs);
        assert_eq!(f[0], 0xC1, "FIN, RSV1, text");
        assert!(f.len() < 40);
    }
}
