//! The Redis side of the broker: its key layout and its Lua scripts.
//!
//! With one primary, a topic `T`'s keys are `gale:T:seq`, `gale:T:log`, `gale:T:epoch`, its
//! idempotency keys `gale:T|idem:KEY`, its presence keys `gale:T:p:…` and its channel `gale:T`;
//! the registry of topics is `gale:topics`. In a Redis Cluster the topic is a hash tag
//! (`gale:{T}:seq`, …, channel `gale:{T}`), so that all of a topic's keys are in one slot and a
//! publish to it is one script on one shard; the registry is one sorted set per slot
//! (`gale:topics:{B}`, `B` fourteen `0`s and `1`s that put the key in that slot), next to the
//! topics it counts;
//! channels are sharded (`SPUBLISH`/`SSUBSCRIBE`): a message crosses only its topic's shard.

use super::CONTROL_CHANNEL;

/// The set of topics with state in Redis, shared by the cluster: member, the topic; score,
/// when its keys expire (ms, Redis's clock; `+inf` without a TTL).
pub(super) const REGISTRY: &str = "gale:topics";

/// The error code of a publish refused because the cluster holds `limits.max_topics` topics.
pub(super) const FULL: &str = "GALEFULL";

/// Lua, the start of a script whose `KEYS[1]` is the registry: forget the topics whose keys
/// have expired, and set `now` (ms). (Redis 5 and later replicate a script by its effects, so
/// reading the clock before writing is allowed.)
macro_rules! forget_expired_lua {
    () => {
        r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
"#
    };
}

/// The publish script: one per request, for all its topics. KEYS: the registry, then three
/// per topic (its sequence number, its log, its epoch), then for a publish to one topic with an
/// idempotency key, that key's key; ARGV: the payload fragment, the history size, the TTL in
/// ms (0: none), the most topics the registry may hold (with one primary, `limits.max_topics`;
/// in a cluster, what the other slots leave of it), the idempotency window in ms, the
/// message's time to live in ms (0: none), what goes before the delivery on the channel (who
/// not to deliver it to, or nothing), then four per topic (its name, its name as JSON, its
/// channel, a fresh epoch). Everything is checked before anything is written: a refused publish
/// leaves no trace, and a publish to several topics goes to all of them or none. Each topic's
/// answer is {seq, epoch, 1 if it is an idempotent retry (nothing published) else 0}.
const PUBLISH_LUA: &str = concat!(
    r#"
local n = math.floor((#KEYS - 1) / 3)
local idem = nil
if (#KEYS - 1) % 3 == 1 then idem = KEYS[#KEYS] end
local function key(i, k) return KEYS[1 + 3 * (i - 1) + k] end
local function arg(i, k) return ARGV[7 + 4 * (i - 1) + k] end
local kinds = {'string', 'stream', 'string'}
for i = 1, n do
  for k = 1, 3 do
    local kind = redis.call('TYPE', key(i, k)).ok
    if kind ~= 'none' and kind ~= kinds[k] then
      return redis.error_reply('WRONGTYPE ' .. key(i, k) .. ' holds a ' .. kind .. ', not a ' .. kinds[k])
    end
  end
  local seq = redis.call('GET', key(i, 1))
  if seq and not string.match(seq, '^%d+$') then
    return redis.error_reply('WRONGTYPE ' .. key(i, 1) .. ' holds no sequence number')
  end
end
-- A retry of a remembered idempotency key: the first publish's position, nothing published.
if idem then
  local prior = redis.call('GET', idem)
  if prior then
    local e, s = string.match(prior, '^(%x+):(%d+)$')
    if e then return {{tonumber(s), e, 1}} end
  end
end
-- The last sequence number in a topic's log (0 when empty): a sequence key lost while its log
-- survived (deleted, evicted) continues from there, so XADD below cannot fail.
local function last_logged(log)
  local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
  if #last == 0 then return 0 end
  return tonumber(string.match(last[1][1], '^(%d+)-')) or 0
end
"#,
    forget_expired_lua!(),
    r#"
local new, seen = 0, {}
for i = 1, n do
  local name = arg(i, 1)
  if not seen[name] and not redis.call('ZSCORE', KEYS[1], name) then new = new + 1 end
  seen[name] = true
end
if new > 0 and redis.call('ZCARD', KEYS[1]) + new > tonumber(ARGV[4]) then
  return redis.error_reply('GALEFULL the cluster holds its maximum number of topics')
end
local ttl = tonumber(ARGV[3])
local expires = '+inf'
if ttl > 0 then expires = now + ttl end
local msg_ttl = tonumber(ARGV[6])
local out = {}
for i = 1, n do
  local seq_key, log, epoch_key = key(i, 1), key(i, 2), key(i, 3)
  local epoch = redis.call('GET', epoch_key)
  if not epoch then
    epoch = arg(i, 4)
    redis.call('SET', epoch_key, epoch)
  end
  local seq = math.max(tonumber(redis.call('GET', seq_key) or '0'), last_logged(log)) + 1
  redis.call('SET', seq_key, seq)
  local d = '{"topic":' .. arg(i, 2) .. ',"epoch":"' .. epoch .. '","seq":' .. seq .. ',' .. ARGV[1] .. '}'
  local fields = {'d', d}
  -- Its expiry (ms, Redis's clock) goes with it: reads leave it out once past.
  if msg_ttl > 0 then fields[#fields + 1] = 'x'; fields[#fields + 1] = now + msg_ttl end
  -- So does the connection left out: a node that forwards it from the log (a catch-up)
  -- leaves it out as the channel message would have.
  if ARGV[7] ~= '' then fields[#fields + 1] = 'e'; fields[#fields + 1] = ARGV[7] end
  redis.call('XADD', log, 'MAXLEN', '~', ARGV[2], seq .. '-1', unpack(fields))
  if idem then redis.call('SET', idem, epoch .. ':' .. seq, 'PX', ARGV[5]) end
  for _, k in ipairs({seq_key, log, epoch_key}) do
    if ttl > 0 then
      -- An idle topic is forgotten whole: the next publish starts a new epoch.
      redis.call('PEXPIRE', k, ttl)
    else
      -- Kept for good, even if an earlier configuration gave it a TTL.
      redis.call('PERSIST', k)
    end
  end
  redis.call('ZADD', KEYS[1], expires, arg(i, 1))
  redis.call('PUBLISH', arg(i, 3), ARGV[7] .. d)
  out[i] = {seq, epoch, 0}
end
return out
"#
);

/// Whether a subscription may start, and where the topic is: `{1, seq, epoch}` if the topic
/// has state or one more topic would fit (`seq` and `epoch` false when the topic has none), else
/// `{0, false, false}`. KEYS: the registry, the topic's sequence number, its epoch; ARGV: the topic, the most
/// topics the registry may hold.
const ROOM_LUA: &str = concat!(
    forget_expired_lua!(),
    r#"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  return {1, redis.call('GET', KEYS[2]), redis.call('GET', KEYS[3])}
end
return {0, false, false}
"#
);

/// Count the topics of the slots of one node of a Redis Cluster: six bytes for each registry
/// named in ARGV[1] (their names, separated by spaces) that holds topics, its place there
/// (from 1; 16 bits, big-endian) and its count (32 bits, signed, big-endian; -1 for one this
/// node cannot read: its slot moved). KEYS[1]: one of those registries (it routes the call to
/// the node). The registries are in different slots, which Redis 7 allows a script that says
/// so (and checks that each is this node's); they are read, never written. One string each
/// way rather than one value per slot, and fixed-size binary pairs rather than text: the
/// gateway sends and reads one string per node each second, not thousands of values, and
/// reading 7,000 pairs of text numbers (10,000 topics) cost it more than the rest of the count.
const COUNT_LUA: &str = r#"#!lua flags=no-writes,allow-cross-slot-keys
local out, i = {}, 0
for registry in string.gmatch(ARGV[1], '%S+') do
  i = i + 1
  local n = redis.pcall('ZCARD', registry)
  if type(n) ~= 'number' then n = -1 end
  if n ~= 0 then
    out[#out + 1] = struct.pack('>Hi', i, n)
  end
end
return table.concat(out)
"#;

/// Lua, the start of every presence script: KEYS[1] is the topic's presence prefix
/// (`gale:T:p:`, or `gale:{T}:p:` in a Redis Cluster). Sets `now` (ms) and the topic's keys, and first forgets the nodes whose
/// presence expired (their score, the time of their last refresh plus the TTL, is past):
/// their members leave the counts and their hashes are deleted, and where join/leave events
/// are sent (`ev` is set: a member with a token joined with an event) each of their members
/// with a token is sent its leave event. A node's members with a token are in `n:NODE`
/// (client id → member JSON), its anonymous ones in `a:NODE` (client id → ''), so that a list
/// scans only members it shows. (A topic holds no character JSON escapes, nor braces, so the
/// topic, its JSON and its channel are cut from `p`.)
macro_rules! presence_lua {
    () => {
        r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local p = KEYS[1]
local nodes, users, conns, events = p .. 'nodes', p .. 'users', p .. 'conns', p .. 'ev'
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', nodes, '-inf', now)) do
  local members, anons, tally = p .. 'n:' .. dead, p .. 'a:' .. dead, p .. 'u:' .. dead
  if redis.call('EXISTS', events) == 1 then
    local channel = string.sub(p, 1, #p - 3)
    -- The topic is the channel after `gale:`, without the braces of its hash tag (cluster).
    local topic = (string.gsub(string.sub(channel, 6), '^{(.*)}$', '%1'))
    local head = '{"op":"leave","topic":"' .. topic .. '",'
    for _, m in ipairs(redis.call('HVALS', members)) do
      if m ~= '' then redis.call('PUBLISH', channel, head .. string.sub(m, 2)) end
    end
  end
  local gone = redis.call('HLEN', members) + redis.call('HLEN', anons)
  if gone > 0 and redis.call('DECRBY', conns, gone) <= 0 then redis.call('DEL', conns) end
  local t = redis.call('HGETALL', tally)
  for i = 1, #t, 2 do
    if redis.call('HINCRBY', users, t[i], -tonumber(t[i + 1])) <= 0 then redis.call('HDEL', users, t[i]) end
  end
  redis.call('DEL', members, anons, tally)
  redis.call('ZREM', nodes, dead)
end
"#
    };
}

/// Lua, after `presence_lua!` in scripts of one node (ARGV[1], the node; ARGV[2], the TTL in
/// ms): the node's keys, and a function that marks the node alive and keeps the topic's keys
/// for three TTLs (a dead node's hashes outlive its score, so that they are reaped, not lost).
macro_rules! node_lua {
    () => {
        r#"
local node, ttl = ARGV[1], tonumber(ARGV[2])
local members, anons, tally = p .. 'n:' .. node, p .. 'a:' .. node, p .. 'u:' .. node
local function alive()
  redis.call('ZADD', nodes, now + ttl, node)
  for _, k in ipairs({nodes, users, conns, members, anons, tally, events}) do redis.call('PEXPIRE', k, 3 * ttl) end
end
"#
    };
}

/// A member joins: ARGV after the node's: the client id, the user (`''`: anonymous), the
/// member's JSON (`''`: not listed), the channel, the join event (`''`: none).
const JOIN_LUA: &str = concat!(
    presence_lua!(),
    node_lua!(),
    r#"
local client, user, member, channel, ev = ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local held = members
if user == '' then held = anons end
if redis.call('HSET', held, client, member) == 1 then
  redis.call('INCR', conns)
  if user ~= '' then
    redis.call('HINCRBY', tally, user, 1)
    redis.call('HINCRBY', users, user, 1)
  end
end
if ev ~= '' then
  redis.call('SET', events, '1')
  redis.call('PUBLISH', channel, ev)
end
alive()
return 1
"#
);

/// A member leaves: ARGV as for a join (the event is the leave event).
const LEAVE_LUA: &str = concat!(
    presence_lua!(),
    node_lua!(),
    r#"
local client, user, channel, ev = ARGV[3], ARGV[4], ARGV[6], ARGV[7]
local held = members
if user == '' then held = anons end
if redis.call('HDEL', held, client) == 1 then
  if redis.call('DECR', conns) <= 0 then redis.call('DEL', conns) end
  if user ~= '' then
    if redis.call('HINCRBY', tally, user, -1) <= 0 then redis.call('HDEL', tally, user) end
    if redis.call('HINCRBY', users, user, -1) <= 0 then redis.call('HDEL', users, user) end
  end
  if ev ~= '' then redis.call('PUBLISH', channel, ev) end
end
return 1
"#
);

/// The node's periodic refresh of a topic: 1, or 0 if its presence there was forgotten (the
/// node was silent past the TTL, or Redis lost it): the node then joins its members again.
const REFRESH_LUA: &str = concat!(
    presence_lua!(),
    node_lua!(),
    r#"
if not redis.call('ZSCORE', nodes, node) then return 0 end
alive()
return 1
"#
);

/// Read a topic's presence: ARGV: 1 to list the members too, the most to list. Answers
/// `{connections, users, more, {member JSON…}}`. A list scans only members with a token (the
/// anonymous ones are in hashes of their own), at most `max` of them and one step of 256.
const READ_PRESENCE_LUA: &str = concat!(
    presence_lua!(),
    r#"
local c = tonumber(redis.call('GET', conns) or '0')
local u = redis.call('HLEN', users)
local out, more, max = {}, 0, tonumber(ARGV[2])
if ARGV[1] == '1' then
  for _, node in ipairs(redis.call('ZRANGE', nodes, 0, -1)) do
    local cursor = '0'
    repeat
      local r = redis.call('HSCAN', p .. 'n:' .. node, cursor, 'COUNT', 256)
      cursor = r[1]
      for i = 2, #r[2], 2 do
        if r[2][i] ~= '' then
          if #out >= max then more = 1 else out[#out + 1] = r[2][i] end
        end
      end
    until cursor == '0' or more == 1
    if more == 1 then break end
  end
end
return {c, u, more, out}
"#
);

/// A range of a topic's log read ahead for recovering subscriptions: the entries of `KEYS[1]`
/// from sequence number `ARGV[1]` to `ARGV[2]`, as `XRANGE` gives them, while their fields fit
/// in `ARGV[3]` bytes; then 1 if that was all of them, 0 if the budget cut them short. So that
/// one round trip for many topics holds a bounded answer, whatever the messages' sizes.
const READ_AHEAD_LUA: &str = r#"
local entries = redis.call('XRANGE', KEYS[1], ARGV[1] .. '-1', ARGV[2] .. '-1')
local out, bytes, budget = {}, 0, tonumber(ARGV[3])
for _, e in ipairs(entries) do
  for i = 2, #e[2], 2 do
    bytes = bytes + #e[2][i]
  end
  if bytes > budget then return {out, 0} end
  out[#out + 1] = e
end
return {out, 1}
"#;

/// Hash slots of a Redis Cluster.
pub(super) const SLOTS: usize = 16384;

/// CRC16/XMODEM, Redis Cluster's key hash.
const fn crc16(data: &[u8]) -> u16 {
    let mut crc = 0u16;
    let mut i = 0;
    while i < data.len() {
        crc ^= (data[i] as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
            bit += 1;
        }
        i += 1;
    }
    crc
}

/// Characters of the hash tag of a slot's registry, each `0` or `1`. CRC16/XMODEM is linear
/// over GF(2) (it starts from zero), so the slot of such a tag is that of fourteen `0`s XOR, for
/// each `1`, the slot bits that a one-bit change of that character flips; those fourteen values
/// span the fourteen bits of a slot, so every slot has exactly one tag, and finding it takes a
/// few XORs instead of a table that a publish would read from memory.
const TAG_LEN: usize = 14;

/// The slot of the tag of fourteen `0`s, and per bit of a slot, the characters to set to `1` to
/// flip that bit alone: the inverse of the map from tags to slots.
const TAG_SOLUTION: (u16, [u16; TAG_LEN]) = solve_tags();

/// Computes `TAG_SOLUTION` (Gauss-Jordan elimination over GF(2), at compile time).
const fn solve_tags() -> (u16, [u16; TAG_LEN]) {
    let mask = (SLOTS - 1) as u16;
    // Per row: the slot bits flipped, and the tag characters that flip them.
    let mut rows = [(0u16, 0u16); TAG_LEN];
    let mut i = 0;
    while i < TAG_LEN {
        let mut one = [0u8; TAG_LEN];
        one[i] = 1;
        rows[i] = (crc16(&one) & mask, 1 << i);
        i += 1;
    }
    let mut bit = 0;
    while bit < TAG_LEN {
        let mut pivot = bit;
        // Past the end (a compile error) if the characters did not span every slot.
        while rows[pivot].0 >> bit & 1 == 0 {
            pivot += 1;
        }
        let row = rows[pivot];
        rows[pivot] = rows[bit];
        rows[bit] = row;
        let mut k = 0;
        while k < TAG_LEN {
            if k != bit && rows[k].0 >> bit & 1 == 1 {
                rows[k] = (rows[k].0 ^ row.0, rows[k].1 ^ row.1);
            }
            k += 1;
        }
        bit += 1;
    }
    let mut solution = [0u16; TAG_LEN];
    let mut j = 0;
    while j < TAG_LEN {
        solution[j] = rows[j].1;
        j += 1;
    }
    (crc16(&[b'0'; TAG_LEN]) & mask, solution)
}

/// The name of a registry of topics, made where it is used (it is short and fixed in size).
pub(super) struct RegistryName {
    bytes: [u8; REGISTRY_NAME_MAX],
    len: usize,
}

/// The start of the name of a slot's registry; the tag and `}` follow.
const REGISTRY_IN_SLOT: &str = "gale:topics:{";

/// The length of a slot's registry name, the longest.
const REGISTRY_NAME_MAX: usize = REGISTRY_IN_SLOT.len() + TAG_LEN + 1;

impl RegistryName {
    /// `gale:topics`, with one primary.
    fn single() -> RegistryName {
        let mut bytes = [0; REGISTRY_NAME_MAX];
        bytes[..REGISTRY.len()].copy_from_slice(REGISTRY.as_bytes());
        RegistryName { bytes, len: REGISTRY.len() }
    }

    /// `gale:topics:{B}`, in `slot`.
    fn in_slot(slot: u16) -> RegistryName {
        let (base, solution) = TAG_SOLUTION;
        let flips = slot ^ base;
        let mut tag = 0u16;
        for (bit, chars) in solution.iter().enumerate() {
            if flips >> bit & 1 == 1 {
                tag ^= chars;
            }
        }
        let mut bytes = [0; REGISTRY_NAME_MAX];
        let (start, rest) = bytes.split_at_mut(REGISTRY_IN_SLOT.len());
        start.copy_from_slice(REGISTRY_IN_SLOT.as_bytes());
        for (i, c) in rest[..TAG_LEN].iter_mut().enumerate() {
            *c = b'0' + (tag >> i & 1) as u8;
        }
        rest[TAG_LEN] = b'}';
        RegistryName { len: bytes.len(), bytes }
    }

    /// The name.
    pub(super) fn as_str(&self) -> &str {
        // ASCII by construction.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or(REGISTRY)
    }
}

/// The hash slot of a Redis key, as Redis Cluster computes it: of its hash tag (what is between
/// the first `{` and the next `}`, if not empty), else of the whole key.
pub(super) fn key_slot(key: &str) -> u16 {
    let tagged = key
        .split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(tag, _)| tag)
        .filter(|tag| !tag.is_empty());
    crc16(tagged.unwrap_or(key).as_bytes()) % SLOTS as u16
}

/// Where the broker keeps things in Redis: with one primary, or hash-tagged by topic for a
/// Redis Cluster.
pub(super) struct Layout {
    /// Keys are hash-tagged and channels sharded.
    cluster: bool,
}

impl Layout {
    /// The layout for one primary, or for a Redis Cluster.
    pub(super) fn new(cluster: bool) -> Layout {
        Layout { cluster }
    }

    /// Keys are hash-tagged and channels sharded (a Redis Cluster).
    pub(super) fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The keys of `topic`: its sequence number, its log, its epoch, and its channel. Made for
    /// every topic of every publish, so each is one allocation of the right size, copied
    /// together without the formatting machinery.
    pub(super) fn keys(&self, topic: &str) -> (String, String, String, String) {
        (self.key(topic, ":seq"), self.key(topic, ":log"), self.key(topic, ":epoch"), self.channel(topic))
    }

    /// The channel of `topic`: `gale:T`, or `gale:{T}` in a cluster.
    pub(super) fn channel(&self, topic: &str) -> String {
        self.key(topic, "")
    }

    /// `gale:`, then `T` (or `{T}` in a cluster: the hash tag that keeps a topic's keys in one
    /// slot), then `suffix`, in one allocation of the right size.
    fn key(&self, topic: &str, suffix: &str) -> String {
        let mut key = String::with_capacity("gale:{}".len() + topic.len() + suffix.len());
        key.push_str("gale:");
        if self.cluster {
            key.push('{');
            key.push_str(topic);
            key.push('}');
        } else {
            key.push_str(topic);
        }
        key.push_str(suffix);
        key
    }

    /// The topic of a channel (`None`: not a topic's channel).
    pub(super) fn topic_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        let name = channel.strip_prefix("gale:")?;
        if self.cluster { name.strip_prefix('{')?.strip_suffix('}') } else { Some(name) }
    }

    /// The Redis key of an idempotency key of `topic`: `gale:T|idem:KEY`. `|` is in no topic
    /// name (nor in idempotency keys), so it is never another topic's key, whatever the `:` or
    /// `#` in either.
    pub(super) fn idempotency_key(&self, topic: &str, key: &str) -> String {
        self.key(topic, &format!("|idem:{key}"))
    }

    /// The prefix of a topic's presence keys (`KEYS[1]` of the presence scripts).
    pub(super) fn presence_prefix(&self, topic: &str) -> String {
        self.key(topic, ":p:")
    }

    /// The hash slot of `topic`'s keys (0 with one primary).
    pub(super) fn slot(&self, topic: &str) -> u16 {
        if self.cluster { crc16(topic.as_bytes()) % SLOTS as u16 } else { 0 }
    }

    /// The slot of the control channel.
    pub(super) fn control_slot(&self) -> u16 {
        if self.cluster { key_slot(CONTROL_CHANNEL) } else { 0 }
    }

    /// The registry of the topics in `slot`.
    pub(super) fn registry(&self, slot: u16) -> RegistryName {
        if self.cluster { RegistryName::in_slot(slot) } else { RegistryName::single() }
    }

    /// The command that publishes to a channel: `SPUBLISH` in a cluster (sharded pub/sub).
    pub(super) fn publish_command(&self) -> &'static str {
        if self.cluster { "SPUBLISH" } else { "PUBLISH" }
    }

    /// The command that subscribes to channels, and the kinds of its confirmation, of a message,
    /// and of an unsubscription.
    pub(super) fn subscribe_commands(&self) -> SubscribeCommands {
        if self.cluster {
            SubscribeCommands { subscribe: "SSUBSCRIBE", unsubscribe: "SUNSUBSCRIBE", message: "smessage" }
        } else {
            SubscribeCommands { subscribe: "SUBSCRIBE", unsubscribe: "UNSUBSCRIBE", message: "message" }
        }
    }
}

/// The pub/sub commands of a layout.
#[derive(Clone, Copy)]
pub(super) struct SubscribeCommands {
    /// `SUBSCRIBE` or `SSUBSCRIBE`.
    pub(super) subscribe: &'static str,
    /// `UNSUBSCRIBE` or `SUNSUBSCRIBE` (also the kind of its confirmation).
    pub(super) unsubscribe: &'static str,
    /// The kind of a message: `message` or `smessage`.
    pub(super) message: &'static str,
}

/// A Lua script: called by its SHA1 (`EVALSHA`), so that a call carries its keys and
/// arguments, not its text; the text is loaded (`SCRIPT LOAD`) where Redis answers
/// `NOSCRIPT` (a restarted node, a promoted replica, a node added, `SCRIPT FLUSH`).
pub(super) struct Lua {
    /// The script's text.
    pub(super) text: String,
    /// Its SHA1, in hex, as Redis names it.
    sha: String,
}

impl Lua {
    fn new(text: String) -> Lua {
        let sha = redis::Script::new(&text).get_hash().to_string();
        Lua { text, sha }
    }

    /// `EVALSHA` of this script; its number of keys, keys and arguments follow.
    pub(super) fn call(&self) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha);
        cmd
    }
}

/// The scripts as a layout runs them: in a cluster, their `PUBLISH` calls are `SPUBLISH`.
pub(super) struct Scripts {
    pub(super) publish: Lua,
    pub(super) room: Lua,
    pub(super) join: Lua,
    pub(super) leave: Lua,
    pub(super) refresh: Lua,
    pub(super) read_presence: Lua,
    /// Counts the topics of a cluster node's slots (cluster only).
    pub(super) count: Lua,
    /// Reads a range of a topic's log within a byte budget.
    pub(super) read_ahead: Lua,
}

impl Scripts {
    /// The scripts for `layout`.
    pub(super) fn new(layout: &Layout) -> Scripts {
        let adapt = |script: &str| {
            let command = format!("redis.call('{}', ", layout.publish_command());
            Lua::new(script.replace("redis.call('PUBLISH', ", &command))
        };
        Scripts {
            publish: adapt(PUBLISH_LUA),
            room: adapt(ROOM_LUA),
            join: adapt(JOIN_LUA),
            leave: adapt(LEAVE_LUA),
            refresh: adapt(REFRESH_LUA),
            read_presence: adapt(READ_PRESENCE_LUA),
            count: Lua::new(COUNT_LUA.to_string()),
            read_ahead: Lua::new(READ_AHEAD_LUA.to_string()),
        }
    }

    /// Every script's text: what a node that answers `NOSCRIPT` is given (the count script only
    /// in a cluster: its shebang flags need Redis 7, which only cluster mode requires).
    pub(super) fn texts(&self, layout: &Layout) -> Vec<String> {
        let mut all = [
            &self.publish,
            &self.room,
            &self.join,
            &self.leave,
            &self.refresh,
            &self.read_presence,
            &self.read_ahead,
        ]
        .map(|l| l.text.clone())
        .to_vec();
        if layout.is_cluster() {
            all.push(self.count.text.clone());
        }
        all
    }
}

#[cfg(test)]
mod tests {

    use super::{Layout, SLOTS, Scripts, key_slot};

    #[test]
    fn idempotency_keys_are_never_the_keys_of_a_topic() {
        for (layout, expected) in
            [(Layout::new(false), "gale:a|idem:seq"), (Layout::new(true), "gale:{a}|idem:seq")]
        {
            // Topic "a" with key "seq" must not be topic "a:idem"'s sequence number.
            let name = layout.idempotency_key("a", "seq");
            assert_eq!(name, expected);
            assert!(super::super::super::protocol::check_topic("a|idem").is_err());
            assert!(super::super::super::publish::check_key("x|y").is_err());
            let (seq, log, epoch, _) = layout.keys("a:idem");
            assert!(![seq, log, epoch].contains(&name));
        }
    }

    #[test]
    fn slots_are_those_redis_computes() {
        // `CLUSTER KEYSLOT` of these keys, as Redis answers.
        assert_eq!(key_slot("somekey"), 11058);
        assert_eq!(key_slot("foo{hash_tag}"), 2515);
        assert_eq!(key_slot("{}x"), key_slot("{}x"));
        assert_ne!(key_slot("{}x"), key_slot("x"), "an empty tag hashes the whole key");
    }

    #[test]
    fn a_topics_keys_share_its_slot_in_a_cluster() {
        let layout = Layout::new(true);
        for topic in ["chat:a", "x", "a.b-c_d@e#f/g"] {
            let slot = layout.slot(topic);
            let (seq, log, epoch, channel) = layout.keys(topic);
            let presence = layout.presence_prefix(topic) + "nodes";
            for key in [seq, log, epoch, channel.clone(), layout.idempotency_key(topic, "k"), presence] {
                assert_eq!(key_slot(&key), slot, "{key}");
            }
            assert_eq!(key_slot(layout.registry(slot).as_str()), slot);
            assert_eq!(layout.topic_of(&channel), Some(topic));
        }
        assert!((0..SLOTS as u16).all(|s| key_slot(layout.registry(s).as_str()) == s));
        let names: std::collections::HashSet<_> =
            (0..SLOTS as u16).map(|s| layout.registry(s).as_str().to_owned()).collect();
        assert_eq!(names.len(), SLOTS);
        assert_eq!(layout.registry(0).as_str().len(), "gale:topics:{}".len() + 14);
        assert!(
            layout
                .registry(12_345)
                .as_str()
                .trim_start_matches("gale:topics:{")
                .trim_end_matches('}')
                .bytes()
                .all(|c| c == b'0' || c == b'1')
        );
        assert_eq!(Layout::new(false).registry(9).as_str(), "gale:topics");
        let names = |seq: &str, log: &str, epoch: &str, channel: &str| {
            (seq.to_string(), log.to_string(), epoch.to_string(), channel.to_string())
        };
        assert_eq!(layout.keys("t"), names("gale:{t}:seq", "gale:{t}:log", "gale:{t}:epoch", "gale:{t}"));
        let single = Layout::new(false);
        assert_eq!(single.keys("t"), names("gale:t:seq", "gale:t:log", "gale:t:epoch", "gale:t"));
        assert_eq!(
            (single.keys("t").3, single.topic_of("gale:t"), single.slot("t")),
            ("gale:t".into(), Some("t"), 0)
        );
    }

    #[test]
    fn scripts_are_called_by_the_sha1_redis_gives_them() {
        // `SCRIPT LOAD "return 1"` answers this.
        let lua = super::Lua::new("return 1".into());
        let call = lua.call();
        let args: Vec<_> = call.args_iter().collect();
        assert!(matches!(args[..], [redis::Arg::Simple(b"EVALSHA"), redis::Arg::Simple(sha)]
            if sha == b"e0e1f9fabfc9d4800c877a703b823ac0578ff8db"));
        let scripts = Scripts::new(&Layout::new(true));
        assert!(scripts.texts(&Layout::new(true)).contains(&scripts.count.text));
        assert!(!scripts.texts(&Layout::new(false)).contains(&scripts.count.text), "Redis 7 only");
    }

    #[test]
    fn cluster_scripts_publish_on_sharded_channels() {
        let scripts = Scripts::new(&Layout::new(true));
        for s in [&scripts.publish, &scripts.join, &scripts.leave, &scripts.read_presence, &scripts.refresh] {
            assert!(!s.text.contains("'PUBLISH'"), "{}", s.text);
        }
        assert!(scripts.publish.text.contains("redis.call('SPUBLISH', "));
        assert!(Scripts::new(&Layout::new(false)).join.text.contains("redis.call('PUBLISH', "));
    }
}
