//! The listening thread: subscribed to the channels of the topics this node has local
//! subscribers for, it forwards their messages as they come.
//!
//! With one primary, one connection subscribes (`SUBSCRIBE`) to every channel. In a Redis
//! Cluster, channels are sharded: each is subscribed (`SSUBSCRIBE`) on the primary that owns its
//! slot, one connection per primary. A channel whose connection fails, or that Redis
//! unsubscribes because its slot moved (a reshard), loses its home: the thread reads the slot
//! map again, subscribes it where it now lives, then forwards from the topic's log what was
//! published meanwhile; until every channel has a home, the broker counts as down.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use redis::{ConnectionAddr, ConnectionInfo};

use super::forward::split_exclusion;
use super::scripts::SubscribeCommands;
use super::topology::{COMMAND_TIMEOUT, Redis, address, connection_lost};
use super::{CONTROL_CHANNEL, Shared};

/// The longest the listener sleeps with nothing to do (orders and messages wake it at once;
/// this bounds how late it notices a retry that is due).
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// Values read from one connection before the others get their turn.
const READ_BATCH: usize = 1024;

/// The token of the orders' waker in the listener's poll (connections use their node index).
const WAKE: Token = Token(usize::MAX);

/// Orders for the listening thread.
pub(super) enum Listen {
    /// Subscribe to a topic's channel; the answer says when Redis confirmed it.
    Subscribe(String, Sender<redis::RedisResult<()>>),
    /// Stop listening to a topic's channel.
    Unsubscribe(String),
}

/// The broker's side of the listener: orders, each waking the listener at once.
pub(super) struct Orders {
    tx: Sender<Listen>,
    waker: Arc<Waker>,
}

impl Orders {
    /// Hand `order` to the listener and wake it.
    pub(super) fn send(&self, order: Listen) {
        if self.tx.send(order).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

impl Drop for Orders {
    /// The gateway is shutting down: the listener notices at once that no orders will come.
    fn drop(&mut self) {
        let _ = self.waker.wake();
    }
}

/// The thread that owns the subscribed connections: it forwards messages as they come. It
/// sleeps in one poll over its connections and the orders' waker, so an order (a new topic to
/// listen to) is carried out at once, not at the next timeout.
pub(super) struct Listener {
    /// Commands (catch-ups) and the slot map.
    redis: Redis,
    shared: Arc<Shared>,
    ctl: Receiver<Listen>,
    poll: Poll,
    events: Events,
}

/// The listener's connections and the channels waiting for one.
#[derive(Default)]
struct State {
    /// Per node (index in the topology), its subscribed connection.
    subs: HashMap<usize, Sub>,
    /// Nodes subscribed to before: a connection to one again counts as a reconnect.
    seen: HashSet<usize>,
    /// Channels to subscribe (again): their connection failed, or their slot moved.
    homeless: BTreeSet<String>,
    /// When to try the homeless channels again.
    retry_at: Option<Instant>,
    /// When every connection was last read whatever the poll said.
    swept_at: Option<Instant>,
    backoff: Duration,
    /// Messages received while a subscription was being confirmed: handled after it (and
    /// after the catch-up that follows it).
    held: Vec<(usize, Resp)>,
    /// Nodes whose connection is to be read: a poll reported it readable (that poll's events
    /// may be overwritten by the next one, inside an order, before the connection is read), or
    /// its read stopped at READ_BATCH.
    to_read: Vec<usize>,
}

impl Listener {
    /// A listener for `shared`'s topics, and the way to give it orders.
    pub(super) fn new(redis: Redis, shared: Arc<Shared>) -> io::Result<(Listener, Orders)> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let (tx, ctl) = crossbeam_channel::unbounded();
        let listener = Listener { redis, shared, ctl, poll, events: Events::with_capacity(64) };
        Ok((listener, Orders { tx, waker }))
    }

    pub(super) fn run(mut self) {
        let commands = self.shared.layout.subscribe_commands();
        let mut st = State { backoff: Duration::from_millis(100), ..State::default() };
        st.homeless.insert(CONTROL_CHANNEL.to_string());
        let mut down_reported = false;
        loop {
            // Homes for the channels that lost theirs (at start: the control channel).
            if !st.homeless.is_empty() && st.retry_at.is_none_or(|t| Instant::now() >= t) {
                let failed = self.rehome(&mut st, commands);
                if st.homeless.is_empty() {
                    if down_reported {
                        tracing::info!("broker: subscribed in Redis again");
                    }
                    down_reported = false;
                } else if !down_reported {
                    down_reported = true;
                    let why = failed.map_or_else(String::new, |e| e.to_string());
                    tracing::warn!(
                        channels = st.homeless.len(),
                        "broker: cannot subscribe in Redis: {why}; retrying (live deliveries resume \
                         from the topic logs once it answers)"
                    );
                }
            }
            // Orders.
            loop {
                match self.ctl.try_recv() {
                    Ok(Listen::Subscribe(topic, ack)) => {
                        let channel = self.shared.layout.channel(&topic);
                        let result = self.subscribe(&mut st, commands, &channel);
                        self.release(&mut st, commands);
                        let _ = ack.send(result);
                    }
                    Ok(Listen::Unsubscribe(topic)) => {
                        let channel = self.shared.layout.channel(&topic);
                        self.unsubscribe(&mut st, commands, &channel);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            self.shared.set_up(true, st.homeless.is_empty());
            // Then messages: each connection that the poll found readable, that was left
            // with values to read, or that holds bytes received meanwhile (an order's reply
            // read them) is read until it has nothing more, or for READ_BATCH values (then
            // the others and the orders get their turn, and the poll below does not wait).
            // The others are not read: a read that finds nothing is a system call per
            // connection per wake-up, and a cluster has one connection per primary.
            // The loops are woken once for what this pass forwards, not at its first message.
            // Once a second every connection is read, reported or not: a connection is read
            // only when the poll reports it, and a report gone missing would leave it unread
            // for good, a dead node's end of stream among it (its channels never rehomed).
            if st.swept_at.is_none_or(|t| t.elapsed() >= IDLE_WAIT) {
                st.swept_at = Some(Instant::now());
                st.to_read.extend(st.subs.keys().copied());
            }
            let shared = self.shared.clone();
            shared.handle.batched(|| {
                if self.read_ready(&mut st, commands) > 0 {
                    self.shared.status.listener_passes.fetch_add(1, Ordering::Relaxed);
                }
            });
            let more = !st.to_read.is_empty();
            // Sleep until a connection has something, an order comes, or a retry is due.
            // Every connection was read until it had nothing, so its next arrival wakes the
            // poll (which is edge-triggered).
            let wait = if more {
                Duration::ZERO
            } else if st.homeless.is_empty() {
                IDLE_WAIT
            } else {
                st.retry_at
                    .map_or(Duration::ZERO, |t| t.saturating_duration_since(Instant::now()))
                    .min(IDLE_WAIT)
            };
            if let Err(e) = self.wait(&mut st.to_read, wait)
                && e.kind() != io::ErrorKind::Interrupted
            {
                tracing::warn!("broker: the listener cannot wait for Redis: {e}");
                std::thread::sleep(wait.min(Duration::from_millis(100)));
            }
        }
    }

    /// Wait up to `timeout` for a connection or an order; the connections found readable join
    /// `to_read` (the poll is edge-triggered: a readiness not noted here is not reported again).
    fn wait(&mut self, to_read: &mut Vec<usize>, timeout: Duration) -> io::Result<()> {
        self.poll.poll(&mut self.events, Some(timeout))?;
        to_read.extend(self.events.iter().map(|e| e.token().0).filter(|&t| t != WAKE.0));
        Ok(())
    }

    /// Read the connections the polls found readable, those left unfinished, and those holding
    /// received bytes, each until it has nothing or for READ_BATCH values, and dispatch what
    /// they bring; how many values they brought.
    fn read_ready(&mut self, st: &mut State, commands: SubscribeCommands) -> usize {
        let mut nodes = std::mem::take(&mut st.to_read);
        for node in &nodes {
            if let Some(sub) = st.subs.get_mut(node) {
                sub.readable();
            }
        }
        nodes.extend(st.subs.iter().filter(|(_, sub)| sub.holds_bytes()).map(|(&node, _)| node));
        nodes.sort_unstable();
        nodes.dedup();
        let mut brought = 0;
        for node in nodes {
            let mut read = 0;
            while read < READ_BATCH {
                let Some(sub) = st.subs.get_mut(&node) else { break };
                match sub.read_now() {
                    Ok(Some(value)) => {
                        let State { subs, homeless, .. } = st;
                        let channels = &mut subs.get_mut(&node).expect("read above").channels;
                        self.dispatch(commands, value, channels, homeless);
                        read += 1;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(node = %address(self.redis.info(node)), "broker: Redis subscription lost: {e}");
                        self.lose(st, node);
                        break;
                    }
                }
            }
            if read == READ_BATCH {
                st.to_read.push(node);
            }
            brought += read;
        }
        brought
    }

    /// Subscribe `channel` on the node that serves it, following redirections; messages that
    /// come meanwhile are held (`release` handles them).
    fn subscribe(
        &mut self,
        st: &mut State,
        commands: SubscribeCommands,
        channel: &str,
    ) -> redis::RedisResult<()> {
        let slot = match self.shared.layout.topic_of(channel) {
            Some(topic) => self.shared.layout.slot(topic),
            None => self.shared.layout.control_slot(),
        };
        let mut last = None;
        for _ in 0..4 {
            let node = self.redis.node_of(slot)?;
            if !st.subs.contains_key(&node) {
                let sub = Sub::connect(self.redis.info(node))
                    .and_then(|sub| {
                        let fd = sub.stream.as_raw_fd();
                        self.poll.registry().register(&mut SourceFd(&fd), Token(node), Interest::READABLE)?;
                        Ok(sub)
                    })
                    .inspect_err(|_| self.redis.fail(node))?;
                if !st.seen.insert(node) {
                    self.shared.status.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                st.subs.insert(node, sub);
            }
            let State { subs, held, to_read, .. } = &mut *st;
            let sub = subs.get_mut(&node).expect("inserted above");
            let confirmed = sub.send(&[commands.subscribe, channel]).and_then(|()| {
                // An answer is due: read the socket at once, whatever its last read found
                // (its readiness may have been noted before this, and not reported again).
                sub.readable();
                let deadline = Instant::now() + COMMAND_TIMEOUT;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "no confirmation from Redis"));
                    }
                    match sub.read_now()? {
                        Some(Resp::Array(items))
                            if is_reply(&items, &commands.subscribe.to_lowercase(), channel) =>
                        {
                            return Ok(None);
                        }
                        Some(Resp::Error(e)) => return Ok(Some(e)),
                        Some(other) => held.push((node, other)),
                        // Woken by any connection or an order; the run loop reads the others.
                        None => match self.wait(to_read, left) {
                            Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e),
                            _ if to_read.contains(&node) => sub.readable(),
                            _ => {}
                        },
                    }
                }
            });
            match confirmed {
                Ok(None) => {
                    sub.channels.insert(channel.to_string());
                    return Ok(());
                }
                // Not this node's slot (the map is stale): read it again, and try there.
                Ok(Some(e)) if e.starts_with("MOVED ") => {
                    let _ = self.redis.check();
                    last = Some(e);
                }
                Ok(Some(e)) => {
                    return Err(io::Error::other(format!("Redis refused to subscribe: {e}")).into());
                }
                Err(e) => {
                    // Said as a read's failure says it: an outage's log tells every lost
                    // connection, whichever path found it.
                    tracing::warn!(node = %address(self.redis.info(node)), channel, "broker: Redis subscription lost: {e}");
                    self.lose(st, node);
                    return Err(e.into());
                }
            }
        }
        Err(io::Error::other(format!("Redis refused to subscribe: {}", last.unwrap_or_default())).into())
    }

    /// Stop listening to `channel` (nothing if it has no home).
    fn unsubscribe(&mut self, st: &mut State, commands: SubscribeCommands, channel: &str) {
        st.homeless.remove(channel);
        let home = st.subs.iter_mut().find(|(_, s)| s.channels.contains(channel)).map(|(n, _)| *n);
        let Some(node) = home else { return };
        let sub = st.subs.get_mut(&node).expect("found above");
        // Out of its set first: the confirmation, when it comes, is then known as ours.
        sub.channels.remove(channel);
        if sub.send(&[commands.unsubscribe, channel]).is_err() {
            self.lose(st, node);
        }
    }

    /// A node's connection failed: its channels wait for a home.
    fn lose(&mut self, st: &mut State, node: usize) {
        if let Some(sub) = st.subs.remove(&node) {
            let _ = self.poll.registry().deregister(&mut SourceFd(&sub.stream.as_raw_fd()));
            st.homeless.extend(sub.channels);
        }
        self.redis.fail(node);
        st.retry_at = None;
    }

    /// Subscribe the channels that lost their home where they live now, then forward what
    /// their topics published meanwhile, then the messages held.
    fn rehome(&mut self, st: &mut State, commands: SubscribeCommands) -> Option<redis::RedisError> {
        let mut rehomed = HashSet::new();
        let failed = self.redis.check().err().or_else(|| {
            let mut failed = None;
            for channel in st.homeless.clone() {
                match self.subscribe(st, commands, &channel) {
                    Ok(()) => {
                        st.homeless.remove(&channel);
                        rehomed.insert(channel);
                    }
                    Err(e) => failed = Some(e),
                }
            }
            failed
        });
        // Forward what the rehomed topics published meanwhile, while holding the topics so
        // that nothing newer is forwarded first.
        let shared = self.shared.clone();
        let mut topics = shared.topics();
        let names: Vec<String> =
            topics.keys().filter(|t| rehomed.contains(&shared.layout.channel(t))).cloned().collect();
        for topic in names {
            let slot = shared.layout.slot(&topic);
            match self.redis.run(slot, |c| shared.catch_up(c, &mut topics, &topic)) {
                Ok(()) => {}
                // Caught up at the next attempt.
                Err(e) if connection_lost(&e) => {
                    st.homeless.insert(shared.layout.channel(&topic));
                }
                // One topic whose keys Redis cannot read must not keep the node down.
                Err(e) => tracing::warn!(topic, error = %e, "cannot catch up on a topic"),
            }
        }
        drop(topics);
        self.release(st, commands);
        if failed.is_none() && st.homeless.is_empty() {
            st.backoff = Duration::from_millis(100);
            st.retry_at = None;
        } else {
            if let Some(e) = &failed {
                tracing::debug!("broker: cannot subscribe in Redis: {e}");
            }
            st.retry_at = Some(Instant::now() + st.backoff);
            st.backoff = (st.backoff * 2).min(Duration::from_secs(1));
        }
        failed
    }

    /// Handle the messages held while subscriptions were confirmed.
    fn release(&mut self, st: &mut State, commands: SubscribeCommands) {
        for (node, value) in std::mem::take(&mut st.held) {
            let State { subs, homeless, .. } = &mut *st;
            let mut none = HashSet::new();
            let channels = subs.get_mut(&node).map_or(&mut none, |s| &mut s.channels);
            self.dispatch(commands, value, channels, homeless);
        }
    }

    /// Handle one value from a subscribed connection whose channels are `channels`: a message
    /// is forwarded (or applied, on the control channel); an unsubscription this node did not
    /// ask for (its slot moved away) sends the channel to `homeless`.
    fn dispatch(
        &self,
        commands: SubscribeCommands,
        value: Resp,
        channels: &mut HashSet<String>,
        homeless: &mut BTreeSet<String>,
    ) {
        let items = match value {
            Resp::Array(items) => items,
            Resp::Error(e) => {
                tracing::warn!("broker: Redis said on a subscribed connection: {e}");
                return;
            }
            _ => return,
        };
        let text = |i: usize| match items.get(i) {
            Some(Resp::Text(t)) => std::str::from_utf8(t).ok(),
            _ => None,
        };
        let (Some(kind), Some(channel)) = (text(0), text(1)) else { return };
        if kind == commands.message {
            let Some(payload) = text(2) else {
                tracing::warn!(channel, "ignoring a message that is not UTF-8 text");
                return;
            };
            if channel == CONTROL_CHANNEL {
                self.shared.control(payload);
            } else if let Some(topic) = self.shared.layout.topic_of(channel) {
                let (delivery, exclude) = split_exclusion(payload, &self.shared.node);
                let mut topics = self.shared.topics();
                self.shared.forward(&mut topics, topic, delivery, exclude);
            }
        } else if kind == commands.unsubscribe.to_lowercase() && channels.remove(channel) {
            tracing::info!(channel, "broker: the channel's slot moved; subscribing where it lives now");
            homeless.insert(channel.to_string());
        }
    }
}

/// Whether `items` is the confirmation `kind` (`subscribe`, `ssubscribe`) of `channel`.
fn is_reply(items: &[Resp], kind: &str, channel: &str) -> bool {
    matches!(items, [Resp::Text(k), Resp::Text(c), ..] if k == kind.as_bytes() && c == channel.as_bytes())
}

/// A value of the Redis protocol (RESP2) as a subscribed connection receives it.
#[derive(Debug, PartialEq)]
enum Resp {
    /// A simple or bulk string.
    Text(Vec<u8>),
    /// An error reply.
    Error(String),
    Int(i64),
    Nil,
    Array(Vec<Resp>),
}

/// Arrays nested deeper than this are refused (pub/sub messages nest one level).
const MAX_DEPTH: usize = 8;

/// The first value in `buf` and the bytes it takes; `None` if it has not arrived whole.
fn parse(buf: &[u8]) -> Result<Option<(Resp, usize)>, String> {
    parse_nested(buf, 0)
}

fn parse_nested(buf: &[u8], depth: usize) -> Result<Option<(Resp, usize)>, String> {
    if depth > MAX_DEPTH {
        return Err("replies nested too deep".to_string());
    }
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
    if end == 0 {
        return Err("a reply line without a type".to_string());
    }
    let line = std::str::from_utf8(&buf[1..end]).map_err(|_| "a reply line is not UTF-8".to_string())?;
    let next = end + 2;
    let number = || line.parse::<i64>().map_err(|_| format!("not a number: {line:?}"));
    let value = match buf[0] {
        b'+' => (Resp::Text(line.as_bytes().to_vec()), next),
        b'-' => (Resp::Error(line.to_string()), next),
        b':' => (Resp::Int(number()?), next),
        b'$' => match usize::try_from(number()?) {
            Err(_) => (Resp::Nil, next),
            Ok(len) => {
                if buf.len() < next + len + 2 {
                    return Ok(None);
                }
                (Resp::Text(buf[next..next + len].to_vec()), next + len + 2)
            }
        },
        b'*' => match usize::try_from(number()?) {
            Err(_) => (Resp::Nil, next),
            Ok(n) => {
                let (mut items, mut at) = (Vec::with_capacity(n.min(16)), next);
                for _ in 0..n {
                    let Some((item, used)) = parse_nested(&buf[at..], depth + 1)? else { return Ok(None) };
                    items.push(item);
                    at += used;
                }
                (Resp::Array(items), at)
            }
        },
        other => return Err(format!("unexpected reply byte {other:#04x}")),
    };
    Ok(Some(value))
}

/// A subscribed connection to one node: its socket (non-blocking once connected), what it has
/// received and not yet parsed (from `start`), and the channels subscribed on it.
struct Sub {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    /// Where a read lands before it joins `buf`: made once, not zeroed again for every read.
    chunk: Box<[u8]>,
    /// The last read took less than `chunk` holds: the socket had nothing more then, and the
    /// poll reports what comes after (it is edge-triggered), so reading again before it does
    /// would only find nothing, a system call per connection per pass.
    drained: bool,
    channels: HashSet<String>,
}

impl Sub {
    /// A connection over `stream`, read `chunk` bytes at a time, with nothing received yet.
    fn over(stream: TcpStream, chunk: usize) -> Sub {
        let chunk = vec![0; chunk].into_boxed_slice();
        Sub { stream, buf: Vec::new(), start: 0, chunk, drained: false, channels: HashSet::new() }
    }

    /// Connect to a node (and authenticate, as its URL says).
    fn connect(info: &ConnectionInfo) -> io::Result<Sub> {
        let ConnectionAddr::Tcp(host, port) = info.addr() else {
            return Err(io::Error::other("only TCP addresses are supported"));
        };
        let addr = (host.as_str(), *port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::other(format!("{host} has no address")))?;
        let stream = TcpStream::connect_timeout(&addr, COMMAND_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(COMMAND_TIMEOUT))?;
        stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        let mut sub = Sub::over(stream, 16 * 1024);
        let settings = info.redis_settings();
        if let Some(password) = settings.password() {
            match settings.username() {
                Some(user) => sub.send(&["AUTH", user, password])?,
                None => sub.send(&["AUTH", password])?,
            }
            // Still blocking (up to the read timeout): the answer is the next value, read until
            // it is whole (a short read here is not the end of what comes).
            let answer = loop {
                let value = sub.read_now()?;
                if value.is_some() || !sub.drained {
                    break value;
                }
                sub.readable();
            };
            match answer {
                Some(Resp::Text(_)) => {}
                Some(Resp::Error(e)) => return Err(io::Error::other(format!("Redis refused AUTH: {e}"))),
                _ => return Err(io::Error::new(io::ErrorKind::TimedOut, "no answer to AUTH")),
            }
        }
        sub.stream.set_nonblocking(true)?;
        Ok(sub)
    }

    /// Send one command. Commands are small and rare; should the socket's buffer be full, the
    /// rest is written blocking, for up to the write timeout.
    fn send(&mut self, args: &[&str]) -> io::Result<()> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        let mut at = 0;
        while at < out.len() {
            match self.stream.write(&out[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.stream.set_nonblocking(false)?;
                    let rest = self.stream.write_all(&out[at..]);
                    self.stream.set_nonblocking(true)?;
                    return rest;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether bytes were received and not yet taken as values (the socket raises no new
    /// readiness for them).
    fn holds_bytes(&self) -> bool {
        self.start < self.buf.len()
    }

    /// The poll reported the socket readable: read it again, even after a short read.
    fn readable(&mut self) {
        self.drained = false;
    }

    /// The next value: one already received, else one the socket holds now. `Ok(None)`: none
    /// yet (the socket had nothing more, now or at its last read).
    fn read_now(&mut self) -> io::Result<Option<Resp>> {
        loop {
            if let Some((value, used)) = parse(&self.buf[self.start..]).map_err(io::Error::other)? {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Ok(Some(value));
            }
            // What is left is the start of a value: move it to the front once, not per value.
            self.buf.drain(..self.start);
            self.start = 0;
            if self.drained {
                return Ok(None);
            }
            match self.stream.read(&mut self.chunk) {
                Ok(0) => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "Redis closed the connection"));
                }
                Ok(n) => {
                    self.drained = n < self.chunk.len();
                    self.buf.extend_from_slice(&self.chunk[..n]);
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Ok(None);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Resp, Sub, parse};
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn after_a_short_read_the_socket_is_read_again_only_once_reported_readable() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let (mut redis, _) = server.accept().unwrap();
        stream.set_nonblocking(true).unwrap();
        let mut sub = Sub::over(stream, 64);
        // Loopback delivers a write before it returns.
        redis.write_all(b"$4\r\nab").unwrap();
        assert_eq!(sub.read_now().unwrap(), None, "half a value");
        assert!(sub.drained, "6 bytes of 64: nothing more was there");
        redis.write_all(b"cd\r\n").unwrap();
        assert_eq!(sub.read_now().unwrap(), None, "not read before the poll reports it");
        sub.readable();
        assert_eq!(sub.read_now().unwrap(), Some(Resp::Text(b"abcd".to_vec())));
        // A read that fills the chunk is not the last: the rest is read at once.
        let long = format!("${}\r\n{}\r\n", 100, "x".repeat(100));
        redis.write_all(long.as_bytes()).unwrap();
        sub.readable();
        assert_eq!(sub.read_now().unwrap(), Some(Resp::Text(vec![b'x'; 100])));
    }

    #[test]
    fn replies_are_parsed_only_once_whole() {
        let msg = b"*3\r\n$8\r\nsmessage\r\n$8\r\ngale:{t}\r\n$4\r\na\r\nb\r\n:1\r\n";
        let (value, used) = parse(msg).unwrap().unwrap();
        let text = |s: &[u8]| Resp::Text(s.to_vec());
        assert_eq!(value, Resp::Array(vec![text(b"smessage"), text(b"gale:{t}"), text(b"a\r\nb")]));
        assert_eq!(&msg[used..], b":1\r\n");
        for cut in 0..used {
            assert_eq!(parse(&msg[..cut]).unwrap(), None, "{cut} bytes");
        }
        assert_eq!(parse(b"-MOVED 1 h:2\r\n").unwrap().unwrap().0, Resp::Error("MOVED 1 h:2".into()));
        assert_eq!(parse(b"$-1\r\n").unwrap().unwrap().0, Resp::Nil);
        assert!(parse(b"\r\n").is_err());
        assert!(parse(&b"*1\r\n".repeat(100)).is_err());
        assert_eq!(parse(b":-3\r\n").unwrap().unwrap().0, Resp::Int(-3));
        assert!(parse(b"!x\r\n").is_err());
    }
}
