// gale-client: the JavaScript client of the `gale serve` push gateway (docs/GATEWAY.md).
//
// One dependency-free ES module, for browsers (native WebSocket) and Node 20+ (a global
// WebSocket, or the `ws` package passed as `{ WebSocket }`). `gale serve` serves this very
// file at /gale-client.js.
//
// What it does on top of the wire protocol:
// - every command carries an `id`; its reply settles the command's promise, or the command
//   times out;
// - each subscription remembers the epoch and last seq it delivered; after a drop the client
//   reconnects (exponential backoff with jitter, moving through a list of URLs), subscribes
//   again with `since`, delivers what was missed once and in order, and drops duplicates;
// - a subscription with `history: N` first reads the topic's N most recent messages, then
//   subscribes `since` the last of them, so nothing is missed or doubled in between; when
//   recovery is impossible after a reconnect it reads the history again;
// - tokens come from `getToken()`, asked again when the gateway closes with 4001;
// - a connection that receives nothing (its own pings included) for `idleTimeout` is
//   treated as dead and replaced;
// - memory is bounded: at most `maxQueued` commands wait for a connection or a reply, and
//   deliveries are handed to `onMessage` synchronously, never queued.

/** The close code the gateway uses when a connection's token expires. */
export const TOKEN_EXPIRED = 4001;

/** The defaults of every option (see README.md). */
export const DEFAULTS = Object.freeze({
  token: undefined,
  getToken: undefined,
  WebSocket: undefined,
  timeout: 10_000,
  connectTimeout: 10_000,
  minReconnectDelay: 500,
  maxReconnectDelay: 15_000,
  pingInterval: 20_000,
  idleTimeout: 45_000,
  maxQueued: 1000,
  browserEvents: true,
  onServerSubscribe: undefined,
});

/** Subscribe errors worth retrying on the same connection: rate limit, broker trouble. */
const RETRY_SUBSCRIBE = new Set([429, 500, 503]);

/** Whether a close code means that connecting again would fail the same way. */
export function isFatalCloseCode(code) {
  // 1002 protocol error, 1003 unsupported data, 1007 invalid payload, 1008 policy violation,
  // 1009 message too big, 1010 missing extension, 1015 TLS failure; 4000-4499 are the
  // application's refusals (like HTTP 4xx), except 4001, answered with a fresh token.
  if ([1002, 1003, 1007, 1008, 1009, 1010, 1015].includes(code)) return true;
  return code >= 4000 && code < 4500 && code !== TOKEN_EXPIRED;
}

/**
 * Whether an HTTP status answering the upgrade means that retrying would fail the same way:
 * all but 408, 429 and 5xx (a 2xx or 3xx says that the URL is not a WebSocket endpoint).
 */
function isFatalStatus(status) {
  return status < 500 && status !== 408 && status !== 429;
}

/**
 * An error from the gateway (`code` is its numeric code, an HTTP status refusing the upgrade,
 * or a close code) or from the client itself (`code` is one of the strings `TIMEOUT`,
 * `DISCONNECTED`, `CLOSED`, `QUEUE_FULL`, `UNSUBSCRIBED`, `TOKEN`, `PROTOCOL`).
 */
export class GaleError extends Error {
  constructor(code, reason) {
    super(`${reason} (${code})`);
    this.name = 'GaleError';
    this.code = code;
    this.reason = reason;
  }
}

const now = () => Date.now();

/** `url` as a ws:// or wss:// URL: http(s) is swapped, a path is resolved against the page. */
function websocketUrl(url) {
  const base = globalThis.location?.href;
  const u = base ? new URL(url, base) : new URL(url);
  if (u.protocol === 'http:') u.protocol = 'ws:';
  else if (u.protocol === 'https:') u.protocol = 'wss:';
  return u;
}

/** The payload of a delivery: `data`, or the bytes of `binary` (base64). */
function payloadOf(delivery) {
  if (delivery.binary === undefined) return delivery.data;
  return Uint8Array.from(atob(delivery.binary), (c) => c.charCodeAt(0));
}

/** Call an application callback; what it throws is reported, not propagated into the client. */
function callSafely(client, fn, ...args) {
  if (typeof fn !== 'function') return;
  try {
    fn(...args);
  } catch (err) {
    client.emitError(err);
  }
}

// Symbols for what the client calls on a subscription and the application does not.
const SUBSCRIBED = Symbol('subscribed');
const DELIVER = Symbol('deliver');
const EVENT = Symbol('event');
const END = Symbol('end');
const SINCE = Symbol('since');
const LOADED = Symbol('loaded');
const RELOAD = Symbol('reload');
const NEEDS_HISTORY = Symbol('needsHistory');

/** One topic's subscription; made by {@link GaleClient#subscribe}. */
export class Subscription {
  #client;
  #handlers;
  #settleReady;
  /** Whether this subscription asked for recovery (it had a position) the last time. */
  #asked = false;
  /** Whether it has a position to resume from (`since`, a subscribe reply or a history read). */
  #positioned = false;
  /** Whether its position comes from a history read not yet followed by a subscribe reply. */
  #justLoaded = false;
  /** Whether it has read the history before (a read now is a reload). */
  #loadedBefore = false;

  constructor(client, topic, { since, history, onMessage, onHistory, onRecovered, onError, onEvent } = {}) {
    if (history !== undefined && !(Number.isInteger(history) && history > 0)) {
      throw new RangeError('subscribe: history must be a whole number of messages, at least 1');
    }
    this.#client = client;
    this.#handlers = { onMessage, onHistory, onRecovered, onError, onEvent };
    /** The topic. */
    this.topic = topic;
    /** How many recent messages to read before subscribing (the `history` option), or 0. */
    this.history = history ?? 0;
    /** The epoch of the last message delivered (or of the position subscribed from). */
    this.epoch = since ? (since.epoch == null ? null : String(since.epoch)) : null;
    /** The seq of the last message delivered (or of the position subscribed from). */
    this.seq = since ? Number(since.seq) : 0;
    this.#positioned = Boolean(since);
    /** `subscribing`, `subscribed`, `unsubscribed` or `failed`. */
    this.state = 'subscribing';
    /** Settles with the first subscribe reply, or the error that ended the subscription. */
    this.ready = new Promise((resolve, reject) => {
      this.#settleReady = { resolve, reject };
    });
    this.ready.catch(() => {}); // awaiting it is optional
  }

  /**
   * `{ epoch, seq }` of the last message delivered: what to keep to resume later (`epoch` is
   * null when the topic had no state at the history read it comes from), or null.
   */
  get position() {
    return this.#positioned ? { epoch: this.epoch, seq: this.seq } : null;
  }

  /** Stop receiving. Resolves once the gateway has confirmed (at once if not connected). */
  unsubscribe() {
    return this.#client.leave(this);
  }

  /** The `since` of the next subscribe command (or undefined), noting whether it asked. */
  [SINCE]() {
    this.#asked = this.#positioned;
    return this.#asked ? { epoch: this.epoch, seq: this.seq } : undefined;
  }

  /** Whether the next subscribe must first read the history (the `history` option). */
  get [NEEDS_HISTORY]() {
    return this.history > 0 && !this.#positioned;
  }

  /** A history read answered: hand its messages over, and subscribe from its last one. */
  [LOADED](reply) {
    const reload = this.#loadedBefore;
    this.#loadedBefore = true;
    const last = reply.messages.at(-1);
    this.epoch = last ? last.epoch : reply.epoch;
    this.seq = last ? last.seq : reply.seq;
    this.#positioned = true;
    this.#justLoaded = true;
    callSafely(this.#client, this.#handlers.onHistory, reply, { reload });
    for (const m of reply.messages) {
      if (this.state === 'unsubscribed') return; // left from a callback
      callSafely(this.#client, this.#handlers.onMessage, payloadOf(m), m, { history: true });
    }
  }

  /**
   * Whether a subscribe reply that could not recover should make this subscription read the
   * history again (it has the `history` option, and its position is not a history read of
   * this very moment: that would only fail again). If so, report it and forget the position.
   */
  [RELOAD](reply) {
    if (!(this.history > 0 && this.#asked && reply.recovered === false && !this.#justLoaded)) return false;
    this.#positioned = false;
    this.state = 'subscribing';
    const info = { topic: this.topic, epoch: reply.epoch, seq: reply.seq, recovered: false, reason: reply.reason, reloading: true };
    callSafely(this.#client, this.#handlers.onRecovered, info);
    return true;
  }

  /** The gateway answered a subscribe command. */
  [SUBSCRIBED](reply) {
    // Recovered: keep the position, the missed deliveries follow. Otherwise the reply's
    // position is where deliveries start.
    if (!(this.#asked && reply.recovered)) {
      this.epoch = reply.epoch;
      this.seq = reply.seq;
    }
    this.#positioned = true;
    // The subscribe that follows a history read is one step of loading: only its failure
    // is news.
    const quiet = this.#justLoaded && reply.recovered === true;
    this.#justLoaded = false;
    this.state = 'subscribed';
    const info = { topic: this.topic, epoch: reply.epoch, seq: reply.seq };
    if (this.#asked) {
      info.recovered = reply.recovered === true;
      if (info.recovered) info.missed = reply.missed;
      else info.reason = reply.reason;
    }
    this.#settleReady?.resolve(info);
    this.#settleReady = null;
    if (this.#asked && !quiet) callSafely(this.#client, this.#handlers.onRecovered, info);
  }

  /** A delivery for this topic; duplicates (seq at or below the last, same epoch) are dropped. */
  [DELIVER](d) {
    if (this.state !== 'subscribed') return;
    if (d.epoch === this.epoch) {
      if (d.seq <= this.seq) return;
      if (d.seq > this.seq + 1) {
        const [from, to] = [this.seq + 1, d.seq - 1];
        this.#broken(d, from === to ? `message ${from} was not delivered` : `messages ${from} to ${to} were not delivered`);
      }
    } else if (this.seq > 0 || d.seq !== 1) {
      // (From seq 0, a first message numbered 1 loses nothing: in cluster mode a topic gets its
      // epoch at its first publish.)
      this.#broken(d, 'the topic started a new epoch');
    }
    this.epoch = d.epoch;
    this.seq = d.seq;
    callSafely(this.#client, this.#handlers.onMessage, payloadOf(d), d, { history: false });
  }

  /** An event of this topic (join, leave): handed on as it comes, outside the numbering. */
  [EVENT](event) {
    if (this.state !== 'subscribed') return;
    callSafely(this.#client, this.#handlers.onEvent, event);
  }

  /** Continuity was lost while subscribed (the gateway dropped messages, or a new epoch). */
  #broken(d, reason) {
    const info = { topic: this.topic, epoch: d.epoch, seq: d.seq - 1, recovered: false, reason };
    callSafely(this.#client, this.#handlers.onRecovered, info);
  }

  /** A subscribe failed; `final` ends the subscription. */
  [END](err, final, state = 'failed') {
    if (final) {
      this.state = state;
      this.#settleReady?.reject(err);
      this.#settleReady = null;
    }
    if (err && state === 'failed') callSafely(this.#client, this.#handlers.onError, err);
  }
}

/**
 * A connection to the gateway that stays up: see README.md for the options, events and
 * recovery semantics.
 */
export class GaleClient {
  #urls;
  #urlIndex = 0;
  #opts;
  #WebSocket;
  #listeners = new Map();
  /** `idle`, `connecting`, `connected`, `waiting` (to reconnect) or `closed`. */
  #state = 'idle';
  #ws = null;
  /** Bumped for every socket: events and replies of an older one are ignored. */
  #generation = 0;
  #attempt = 0;
  #retryTimer = null;
  #connectTimer = null;
  #liveTimer = null;
  #openedAt = 0;
  #lastReceived = 0;
  #probing = false;
  #token;
  #tokenStale;
  #tokenFresh = false;
  #refused = null;
  /** Whether the socket says why an upgrade was refused (the ws package does, browsers not). */
  #tellsStatus = false;
  #nextId = 1;
  /** Commands sent and waiting for their reply: id -> entry. */
  #pending = new Map();
  /** Application commands waiting for a connection, in order. */
  #queue = [];
  /** Application commands not answered yet (queued or sent): bounded by `maxQueued`. */
  #waiting = 0;
  #subs = new Map();
  /** Topics with an unsubscribe in flight on this connection: topic -> promise. */
  #leaving = new Map();
  /** Subscriptions left while their subscribe was in flight -> what resolves their leaving. */
  #undo = new Map();
  /** Subscriptions reading their history on this connection (not subscribed at the gateway). */
  #loading = new Set();
  #browserHooks = null;

  /**
   * @param {string|string[]} urls the gateway's WebSocket URL (`ws://host:9001/ws`), or a
   *   list tried in turn; http(s) URLs and, in a page, paths (`/ws`) are accepted too.
   * @param {object} [options] see README.md
   */
  constructor(urls, options = {}) {
    const list = (Array.isArray(urls) ? urls : [urls]).map((u) => websocketUrl(u));
    if (list.length === 0) throw new TypeError('GaleClient needs at least one URL');
    for (const key of Object.keys(options)) {
      if (!(key in DEFAULTS)) throw new TypeError(`GaleClient: unknown option ${JSON.stringify(key)}`);
    }
    this.#urls = list;
    this.#opts = { ...DEFAULTS, ...options };
    this.#WebSocket = this.#opts.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== 'function') {
      throw new TypeError('no WebSocket available: pass one as the WebSocket option (e.g. the ws package)');
    }
    const { minReconnectDelay: min, maxReconnectDelay: max } = this.#opts;
    if (!(min > 0 && max >= min)) throw new RangeError('need 0 < minReconnectDelay <= maxReconnectDelay');
    this.#token = this.#opts.token;
    this.#tokenStale = typeof this.#opts.getToken === 'function';
    if (this.#opts.browserEvents) this.#hookBrowser();
    // Connect once the caller has had the chance to add listeners.
    queueMicrotask(() => this.#state === 'idle' && this.#connect());
  }

  /** `idle`, `connecting`, `connected`, `waiting` or `closed`. */
  get state() {
    return this.#state;
  }

  /** The URL in use (or tried next). */
  get url() {
    return this.#urls[this.#urlIndex].href;
  }

  /**
   * The current WebSocket (open or opening), or null: for reading its figures
   * (`readyState`, `bufferedAmount`, `protocol`, `extensions`, `url`). Sending on it or
   * closing it bypasses the client; use the client's methods.
   */
  get socket() {
    return this.#ws;
  }

  // ---- events ------------------------------------------------------------------------

  /** Listen to `connecting`, `connected`, `disconnected` or `error`. */
  on(event, fn) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, new Set());
    this.#listeners.get(event).add(fn);
    return this;
  }

  /** Stop listening. */
  off(event, fn) {
    this.#listeners.get(event)?.delete(fn);
    return this;
  }

  #emit(event, arg) {
    for (const fn of [...(this.#listeners.get(event) ?? [])]) {
      try {
        fn(arg);
      } catch (err) {
        // A listener's own bug surfaces like any uncaught error, outside the client.
        setTimeout(() => {
          throw err;
        });
      }
    }
  }

  /** Report an error to the `error` listeners. (Used by subscriptions.) */
  emitError(err) {
    this.#emit('error', err);
  }

  // ---- commands ----------------------------------------------------------------------

  /**
   * Subscribe to `topic`. Returns the {@link Subscription} at once; it stays subscribed
   * across reconnects until `unsubscribe()` or `close()`.
   */
  subscribe(topic, options = {}) {
    if (this.#state === 'closed') throw new GaleError('CLOSED', 'the client is closed');
    if (this.#subs.has(topic)) throw new GaleError(409, `already subscribed to ${topic}`);
    const sub = new Subscription(this, topic, options);
    this.#subs.set(topic, sub);
    if (this.#state === 'connected') this.#sendSubscribe(sub);
    return sub;
  }

  /** Publish `data` (any JSON value) to `topic`; resolves to `{ topic, epoch, seq }`. */
  async publish(topic, data) {
    const reply = await this.#command({ op: 'publish', topic, data });
    return { topic: reply.topic, epoch: reply.epoch, seq: reply.seq };
  }

  /**
   * Read the retained messages of `topic` numbered after `sinceSeq` (default 0: from the
   * oldest retained), at most `limit` (default: the gateway's, 100). Resolves to the gateway's
   * answer: `{ topic, epoch, seq, first_seq, truncated, more, messages }`. Subscribe with
   * `since: { epoch, seq: <the last message's seq, or seq when there are none> }` to follow
   * on from it exactly (or use the `history` option of `subscribe`).
   */
  async history(topic, { sinceSeq, limit } = {}) {
    const cmd = { op: 'history', topic };
    if (sinceSeq !== undefined) cmd.since_seq = sinceSeq;
    if (limit !== undefined) cmd.limit = limit;
    const { topic: t, epoch, seq, first_seq, truncated, more, messages } = await this.#command(cmd);
    return { topic: t, epoch, seq, first_seq, truncated, more, messages };
  }

  /** A round trip to the gateway; resolves to the time it took, in milliseconds. */
  async ping() {
    const start = now();
    await this.#command({ op: 'ping' });
    return now() - start;
  }

  /** Drop the current connection (if any) and connect again now, recovering. */
  reconnect() {
    if (this.#state === 'closed') return;
    if (this.#state === 'connected' || this.#state === 'connecting') {
      this.#drop('reconnect() called', 0);
    } else {
      this.#connectNow();
    }
  }

  /** Close for good: commands not answered are rejected, subscriptions end. */
  close() {
    if (this.#state === 'closed') return Promise.resolve();
    const ws = this.#ws;
    const wasUp = this.#state === 'connected' || this.#state === 'connecting';
    this.#state = 'closed';
    this.#generation++;
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#connectTimer);
    clearInterval(this.#liveTimer);
    this.#unhookBrowser();
    this.#release(new GaleError('CLOSED', 'the client is closed'), true);
    for (const sub of this.#subs.values()) sub[END](new GaleError('CLOSED', 'the client is closed'), true, 'unsubscribed');
    this.#subs.clear();
    if (wasUp) this.#emit('disconnected', { code: 1000, reason: 'closed by the client', url: this.url, willReconnect: false });
    if (!ws || ws.readyState === 3) return Promise.resolve();
    return new Promise((resolve) => {
      ws.onclose = () => resolve();
      ws.onerror = () => {}; // closing while connecting is reported as an error: expected here
      try {
        ws.close(1000);
      } catch {
        resolve();
      }
    });
  }

  /** Send an application command now, or queue it until connected; bounded by `maxQueued`. */
  #command(cmd) {
    if (this.#state === 'closed') return Promise.reject(new GaleError('CLOSED', 'the client is closed'));
    if (this.#waiting >= this.#opts.maxQueued) {
      return Promise.reject(
        new GaleError('QUEUE_FULL', `${this.#waiting} commands are already waiting (maxQueued = ${this.#opts.maxQueued})`),
      );
    }
    return new Promise((resolve, reject) => {
      this.#waiting++;
      const entry = this.#entry(cmd, (err, reply) => {
        this.#waiting--;
        if (err) reject(err);
        else resolve(reply);
      });
      if (this.#state === 'connected') this.#send(entry);
      else this.#queue.push(entry);
    });
  }

  /** A command with its id and its timeout (counted from now, queueing included). */
  #entry(cmd, settle) {
    const entry = { id: this.#nextId++, cmd, settled: false, timer: null };
    entry.settle = (err, reply) => {
      if (entry.settled) return;
      entry.settled = true;
      clearTimeout(entry.timer);
      this.#pending.delete(entry.id);
      settle(err, reply);
    };
    const ms = this.#opts.timeout;
    entry.timer = setTimeout(() => {
      const i = this.#queue.indexOf(entry);
      if (i >= 0) this.#queue.splice(i, 1);
      entry.settle(new GaleError('TIMEOUT', `no reply to ${cmd.op} within ${ms} ms`));
    }, ms);
    return entry;
  }

  #send(entry) {
    this.#pending.set(entry.id, entry);
    entry.generation = this.#generation;
    this.#ws.send(JSON.stringify({ id: entry.id, ...entry.cmd }));
  }

  /** Reject what waits: the commands sent on the lost connection, and the queue too if `all`. */
  #release(err, all) {
    for (const entry of [...this.#pending.values()]) entry.settle(err);
    if (all) for (const entry of this.#queue.splice(0)) entry.settle(err);
  }

  // ---- subscriptions -----------------------------------------------------------------

  #sendSubscribe(sub) {
    const generation = this.#generation;
    const leaving = this.#leaving.get(sub.topic);
    if (leaving) {
      // The gateway still has the previous subscription to this topic: wait for it to go.
      const go = () => {
        if (generation === this.#generation && this.#subs.get(sub.topic) === sub) this.#sendSubscribe(sub);
      };
      leaving.then(go, go);
      return;
    }
    if (sub[NEEDS_HISTORY]) {
      this.#loadHistory(sub);
      return;
    }
    const entry = this.#entry({ op: 'subscribe', topic: sub.topic, since: sub[SINCE]() }, (err, reply) =>
      // Synchronous: the deliveries that follow the reply may be in the same read.
      this.#subscribed(sub, generation, err, reply),
    );
    this.#send(entry);
  }

  #subscribed(sub, generation, err, reply) {
    if (sub.state === 'unsubscribed') {
      // Left while this subscribe was in flight: undo it, then let a new subscription go.
      const finish = this.#undo.get(sub) ?? (() => {});
      this.#undo.delete(sub);
      if (!err && generation === this.#generation) this.#sendUnsubscribe(sub.topic).then(finish, finish);
      else finish();
      return;
    }
    if (generation !== this.#generation) return; // that connection is gone; resubscribed on the next
    if (!err) {
      if (sub[RELOAD](reply)) {
        // Recovery is impossible: leave, and read the history again before subscribing.
        this.#loading.add(sub);
        const go = () => {
          if (generation === this.#generation && this.#subs.get(sub.topic) === sub) this.#loadHistory(sub);
        };
        this.#sendUnsubscribe(sub.topic).then(go, go);
        return;
      }
      sub[SUBSCRIBED](reply);
      return;
    }
    this.#subscribeFailed(sub, generation, err);
  }

  /**
   * Read the `history` most recent messages of a subscription's topic, hand them over, then
   * subscribe from the last one. One read from the oldest retained message is enough when the
   * topic holds at most that many; otherwise a second one reads the newest.
   */
  #loadHistory(sub) {
    const generation = this.#generation;
    this.#loading.add(sub);
    const read = (sinceSeq, then) =>
      this.#send(
        this.#entry({ op: 'history', topic: sub.topic, since_seq: sinceSeq, limit: sub.history }, (err, reply) => {
          if (generation !== this.#generation || this.#subs.get(sub.topic) !== sub) return; // read again on the next connection
          if (err) {
            this.#loading.delete(sub);
            this.#subscribeFailed(sub, generation, err);
          } else {
            then(reply);
          }
        }),
      );
    const loaded = (reply) => {
      this.#loading.delete(sub);
      sub[LOADED](reply);
      if (generation === this.#generation && this.#subs.get(sub.topic) === sub) this.#sendSubscribe(sub);
    };
    read(0, (first) => (first.more ? read(Math.max(0, first.seq - sub.history), loaded) : loaded(first)));
  }

  /** The gateway refused a subscription's subscribe or history read. */
  #subscribeFailed(sub, generation, err) {
    if (err.code === 'TIMEOUT') {
      // The connection is not answering: replace it (the subscription is kept).
      this.#drop(`subscribe to ${sub.topic} timed out`);
    } else if (RETRY_SUBSCRIBE.has(err.code)) {
      sub[END](err, false);
      setTimeout(() => {
        if (generation === this.#generation && this.#subs.get(sub.topic) === sub) this.#sendSubscribe(sub);
      }, this.#backoffDelay(0));
    } else {
      this.#subs.delete(sub.topic);
      sub[END](err, true);
    }
  }

  /** Called by {@link Subscription#unsubscribe}. */
  leave(sub) {
    if (this.#subs.get(sub.topic) !== sub) return Promise.resolve();
    this.#subs.delete(sub.topic);
    const wasSubscribed = sub.state === 'subscribed';
    sub[END](new GaleError('UNSUBSCRIBED', `unsubscribed from ${sub.topic} before the gateway answered`), true, 'unsubscribed');
    // Reading its history: not subscribed at the gateway.
    if (this.#loading.delete(sub) || this.#state !== 'connected') return Promise.resolve();
    if (wasSubscribed) return this.#sendUnsubscribe(sub.topic);
    // The subscribe is in flight: it is undone when its reply comes (see #subscribed), and a
    // new subscription to the topic waits for that.
    const done = new Promise((resolve) => this.#undo.set(sub, resolve));
    this.#leaving.set(sub.topic, done);
    done.then(() => this.#leaving.get(sub.topic) === done && this.#leaving.delete(sub.topic));
    return done;
  }

  #sendUnsubscribe(topic) {
    const generation = this.#generation;
    const done = new Promise((resolve, reject) => {
      const entry = this.#entry({ op: 'unsubscribe', topic }, (err) => {
        if (this.#leaving.get(topic) === done) this.#leaving.delete(topic);
        // Not subscribed (404) or the connection is gone: either way it is not subscribed.
        if (!err || err.code === 404 || err.code === 'DISCONNECTED' || generation !== this.#generation) resolve();
        else reject(err);
      });
      this.#send(entry);
    });
    this.#leaving.set(topic, done);
    return done;
  }

  // ---- the connection ----------------------------------------------------------------

  async #connect() {
    if (this.#state === 'closed') return;
    this.#retryTimer = null;
    this.#state = 'connecting';
    const generation = ++this.#generation;
    const url = new URL(this.#urls[this.#urlIndex]);
    this.#emit('connecting', { url: url.href, attempt: this.#attempt });
    if (this.#tokenStale) {
      try {
        this.#token = await this.#fetchToken();
        this.#tokenStale = false;
        this.#tokenFresh = true;
      } catch (err) {
        if (generation !== this.#generation || this.#state === 'closed') return;
        this.#emit('error', new GaleError('TOKEN', `getToken failed: ${err?.message ?? err}`));
        this.#retry({ code: 1006, reason: 'getToken failed', url: url.href }, false);
        return;
      }
      if (generation !== this.#generation || this.#state === 'closed') return;
    }
    if (this.#token) url.searchParams.set('token', this.#token);
    this.#refused = null;
    let ws;
    try {
      ws = new this.#WebSocket(url.href);
    } catch (err) {
      this.#fail(new GaleError('PROTOCOL', `cannot open ${url.href}: ${err.message}`), { code: 1006, reason: err.message, url: url.href });
      return;
    }
    this.#ws = ws;
    this.#tellsStatus = typeof ws.on === 'function';
    const mine = (fn) => (ev) => generation === this.#generation && this.#ws === ws && fn(ev);
    ws.onopen = mine(() => this.#opened());
    ws.onmessage = mine((ev) => this.#received(ev.data));
    ws.onerror = () => {}; // the close event that follows says what happened
    ws.onclose = mine((ev) => this.#closed(ev.code, ev.reason));
    if (this.#tellsStatus) {
      // The ws package tells why an upgrade was refused (browsers do not): read the status
      // and the gateway's one-line reason, then end the attempt.
      ws.on('unexpected-response', (_req, res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (chunk) => {
          if (body.length < 1000) body += chunk;
        });
        const end = () => {
          // The gateway's reasons are one line; anything else is cut to its first line.
          const line = body.trim().split('\n', 1)[0].slice(0, 200);
          const reason = res.statusCode >= 200 && res.statusCode < 400 ? `${ws.url} is not a WebSocket endpoint` : line;
          if (this.#ws === ws) this.#refused = { status: res.statusCode, reason: reason || `HTTP ${res.statusCode}` };
          ws.terminate();
        };
        res.once('end', end);
        res.once('error', end);
      });
    }
    this.#connectTimer = setTimeout(
      mine(() => this.#drop(`not connected within ${this.#opts.connectTimeout} ms`)),
      this.#opts.connectTimeout,
    );
  }

  async #fetchToken() {
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no token within ${this.#opts.timeout} ms`)), this.#opts.timeout);
    });
    try {
      return await Promise.race([this.#opts.getToken(), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  #opened() {
    clearTimeout(this.#connectTimer);
    this.#state = 'connected';
    this.#openedAt = this.#lastReceived = now();
    this.#probing = false;
    this.#tokenFresh = false;
    this.#emit('connected', { url: this.url });
    for (const sub of this.#subs.values()) this.#sendSubscribe(sub);
    for (const entry of this.#queue.splice(0)) this.#send(entry);
    const { pingInterval, idleTimeout } = this.#opts;
    this.#liveTimer = setInterval(() => this.#checkLiveness(), Math.max(10, Math.min(pingInterval, idleTimeout) / 4));
  }

  /** Ping when quiet; replace the connection when nothing came for `idleTimeout`. */
  #checkLiveness() {
    const quiet = now() - this.#lastReceived;
    if (quiet >= this.#opts.idleTimeout) {
      this.#drop(`nothing received for ${quiet} ms`);
    } else if (quiet >= this.#opts.pingInterval && !this.#probing) {
      this.#probe();
    }
  }

  /** Send a ping of our own (any reply or delivery proves the connection alive). */
  #probe() {
    if (this.#state !== 'connected' || this.#probing) return;
    this.#probing = true;
    const generation = this.#generation;
    this.#send(
      this.#entry({ op: 'ping' }, () => {
        if (generation === this.#generation) this.#probing = false;
      }),
    );
  }

  #received(text) {
    this.#lastReceived = now();
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      this.#emit('error', new GaleError('PROTOCOL', `the gateway sent something that is not JSON: ${String(text).slice(0, 100)}`));
      return;
    }
    if (msg === null || typeof msg !== 'object') return;
    if (msg.id == null && msg.ok === true && (msg.op === 'subscribed' || msg.op === 'unsubscribed')) {
      this.#serverChanged(msg);
      return;
    }
    if ('ok' in msg || 'error' in msg) {
      const entry = msg.id == null ? undefined : this.#pending.get(msg.id);
      if (msg.error) {
        const err = new GaleError(msg.error.code, msg.error.reason);
        if (entry) entry.settle(err);
        else this.#emit('error', err);
      } else {
        entry?.settle(null, msg);
      }
      return;
    }
    if (typeof msg.op === 'string') {
      // An event (a join or leave): not numbered, not in the history, never a delivery.
      if (typeof msg.topic === 'string') this.#subs.get(msg.topic)?.[EVENT](msg);
      this.#emit('event', msg);
      return;
    }
    if (typeof msg.topic === 'string' && typeof msg.seq === 'number') this.#subs.get(msg.topic)?.[DELIVER](msg);
  }

  /**
   * The gateway's server-side API changed this connection's subscriptions: `unsubscribed`
   * ends the subscription (not resubscribed after a reconnect); `subscribed` becomes a
   * subscription if `onServerSubscribe` gives it handlers.
   */
  #serverChanged(notice) {
    const sub = this.#subs.get(notice.topic);
    if (notice.op === 'unsubscribed') {
      if (sub) {
        sub[EVENT](notice);
        this.#subs.delete(sub.topic);
        sub[END](new GaleError('UNSUBSCRIBED', `unsubscribed from ${sub.topic} by the server`), true, 'unsubscribed');
      }
    } else if (!sub && typeof this.#opts.onServerSubscribe === 'function') {
      let handlers;
      try {
        handlers = this.#opts.onServerSubscribe(notice);
      } catch (err) {
        this.#emit('error', err);
      }
      if (handlers) {
        const adopted = new Subscription(this, notice.topic, { ...handlers, since: undefined, history: undefined });
        this.#subs.set(notice.topic, adopted);
        adopted[SUBSCRIBED](notice);
      }
    }
    this.#emit('event', notice);
  }

  /** The current connection is dead (or unwanted): end it and go on as if it had closed. */
  #drop(reason, delay) {
    const ws = this.#ws;
    if (!ws) return;
    this.#ws = null;
    try {
      if (typeof ws.terminate === 'function') ws.terminate();
      else ws.close(1000);
    } catch {
      // already closing
    }
    this.#closed(1006, reason, delay);
  }

  #closed(code, reason, delay) {
    const url = this.url;
    const wasOpen = this.#state === 'connected';
    const refused = this.#refused;
    this.#refused = null;
    this.#ws = null;
    this.#generation++;
    clearTimeout(this.#connectTimer);
    clearInterval(this.#liveTimer);
    this.#leaving.clear();
    this.#loading.clear();
    for (const sub of this.#subs.values()) if (sub.state === 'subscribed') sub.state = 'subscribing';
    if (wasOpen && now() - this.#openedAt >= this.#opts.maxReconnectDelay) this.#attempt = 0;

    const event = { code, reason, url, willReconnect: true };
    // What retrying cannot mend ends the client, with this error.
    let fatal = null;
    let sameUrl = false;
    if (refused) {
      event.status = refused.status;
      event.reason = refused.reason;
      // A token kept from earlier is asked for again; one just fetched and refused is final.
      const retryToken = refused.status === 401 && this.#opts.getToken && !this.#tokenFresh;
      if (retryToken) this.#tokenStale = true;
      else if (isFatalStatus(refused.status)) fatal = new GaleError(refused.status, refused.reason);
    } else if (code === TOKEN_EXPIRED && wasOpen) {
      if (!this.#opts.getToken) fatal = new GaleError(code, reason || 'token expired');
      this.#tokenStale = true;
      sameUrl = true;
      delay = 0;
    } else if (isFatalCloseCode(code)) {
      fatal = new GaleError(code, reason || `closed with ${code}`);
    } else if (!wasOpen && !this.#tellsStatus && this.#opts.getToken) {
      // Browsers do not say why an upgrade failed: it may have been the token.
      this.#tokenStale = true;
    }
    const lost = fatal ?? new GaleError('DISCONNECTED', `the connection was lost before the reply (${code}${reason ? ` ${reason}` : ''})`);
    this.#release(lost, false);
    if (fatal) this.#fail(fatal, event);
    else this.#retry(event, sameUrl, delay);
  }

  /** Report the drop and schedule the next attempt (on the next URL unless `sameUrl`). */
  #retry(event, sameUrl, delay = this.#backoffDelay(this.#attempt++)) {
    if (!sameUrl) this.#urlIndex = (this.#urlIndex + 1) % this.#urls.length;
    this.#state = 'waiting';
    this.#emit('disconnected', { ...event, delay });
    if (this.#state !== 'waiting') return; // a listener closed the client
    this.#retryTimer = setTimeout(() => this.#connect(), delay);
  }

  /** A delay in [min, min(max, min * 2^(n+1))], uniformly. */
  #backoffDelay(n) {
    const { minReconnectDelay: min, maxReconnectDelay: max } = this.#opts;
    const cap = Math.min(max, min * 2 ** Math.min(n + 1, 30));
    return min + Math.random() * (cap - min);
  }

  /** Stop for good after an error that retrying would repeat. */
  #fail(err, event) {
    this.#state = 'closed';
    this.#unhookBrowser();
    this.#emit('disconnected', { ...event, willReconnect: false });
    this.#emit('error', err);
    this.#release(err, true);
    for (const sub of this.#subs.values()) sub[END](err, true);
    this.#subs.clear();
  }

  #connectNow() {
    if (this.#state !== 'waiting') return;
    clearTimeout(this.#retryTimer);
    this.#connect();
  }

  // ---- browsers: network and visibility ----------------------------------------------

  /** Coming back online or to the foreground: reconnect now, or check the connection. */
  #wake() {
    if (globalThis.document?.visibilityState === 'hidden') return;
    if (this.#state === 'waiting') this.#connectNow();
    else if (this.#state === 'connected') this.#probe();
  }

  #hookBrowser() {
    const win = globalThis.window;
    if (typeof win?.addEventListener !== 'function') return;
    const wake = () => this.#wake();
    win.addEventListener('online', wake);
    globalThis.document?.addEventListener?.('visibilitychange', wake);
    this.#browserHooks = wake;
  }

  #unhookBrowser() {
    const wake = this.#browserHooks;
    if (!wake) return;
    this.#browserHooks = null;
    globalThis.window.removeEventListener('online', wake);
    globalThis.document?.removeEventListener?.('visibilitychange', wake);
  }
}
