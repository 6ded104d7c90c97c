// gale-client's history against the real `gale serve`, in Node with the ws package: the
// `history` command, the two-step "read the history, then subscribe `since` its position"
// (a topic with messages, and a brand-new topic whose history has no epoch), the `history`
// option of `subscribe`, and its reload when recovery is impossible (the gateway SIGKILLed
// and restarted). A publisher publishes all along over HTTP: every message must reach the
// page exactly once, in order, whether it came from the history, a recovery or live.
//
// Run: node --test tests/node/   (GALE_BIN overrides target/debug/gale)

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import WebSocket from 'ws';

import { GaleClient } from '../../clients/js/gale-client.js';
import { restartGaleServe, startGaleServe } from '../lib/gale-process.mjs';
import { httpPublish, sleep, waitFor } from '../lib/gateway-helpers.mjs';

const API_KEY = 'history-suite-key';
const WAIT_MS = 10_000;
const TEST = { timeout: 30_000 };
const FAST = { WebSocket, minReconnectDelay: 20, maxReconnectDelay: 100, timeout: 3000, connectTimeout: 2000 };

/** Callbacks that record every message (marked when it came from the history) and report. */
function recorder() {
  const rec = { got: [], histories: [], recoveries: [], errors: [] };
  rec.onMessage = (data, d, info) => rec.got.push({ epoch: d.epoch, seq: d.seq, n: data.n, history: info.history });
  // `at`: how many messages came before this read's.
  rec.onHistory = (reply, info) => rec.histories.push({ ...reply, reload: info.reload, at: rec.got.length });
  rec.onRecovered = (info) => rec.recoveries.push(info);
  rec.onError = (err) => rec.errors.push(err);
  return rec;
}

/**
 * Publish `{ n }` with n = from + 1, from + 2, ... to `topic` over HTTP, every few ms, until
 * `stop()`; failed publishes (the gateway down) are not counted. `last` is the answer to the
 * latest, `seq` its seq (0 before the first).
 */
function publisher(gale, topic, from = 0) {
  const state = { count: 0, last: null, running: true, get seq() { return this.last?.seq ?? 0; } };
  const loop = (async () => {
    let n = from;
    while (state.running) {
      try {
        state.last = await httpPublish(gale.httpUrl, API_KEY, topic, { n: n + 1 });
        n += 1;
        state.count += 1;
      } catch {
        await sleep(20);
      }
      await sleep(2);
    }
  })();
  state.stop = async () => {
    state.running = false;
    await loop;
  };
  return state;
}

/**
 * Messages numbered `from`..`to` of one epoch, each once and in order, with payloads n =
 * seq + `shift`.
 */
function assertRun(got, from, to, shift = 0) {
  const want = Array.from({ length: to - from + 1 }, (_, i) => from + i);
  assert.deepEqual(got.map((g) => g.seq), want, 'seq: every message once, in order');
  assert.deepEqual(got.map((g) => g.n - shift), want, 'payloads in order');
  assert.equal(new Set(got.map((g) => g.epoch)).size, 1, 'one epoch');
}

describe('gale-client history with gale serve', () => {
  let gale;
  const clients = [];
  const client = () => {
    const c = new GaleClient(`${gale.url}/ws`, FAST);
    clients.push(c);
    return c;
  };
  before(async () => {
    gale = await startGaleServe('history', 'node-client', ['--api-key', API_KEY]);
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await gale?.stop();
  });

  it('reads a topic\'s history, and answers a topic without state with a null epoch', TEST, async () => {
    const c = client();
    for (let n = 1; n <= 5; n++) await httpPublish(gale.httpUrl, API_KEY, 'chat:read', { n });
    const all = await c.history('chat:read');
    assert.deepEqual(
      { ...all, messages: all.messages.map((m) => [m.seq, m.data.n]) },
      {
        topic: 'chat:read', epoch: all.epoch, seq: 5, first_seq: 1, truncated: false, more: false,
        messages: [[1, 1], [2, 2], [3, 3], [4, 4], [5, 5]],
      },
    );
    assert.match(all.epoch, /^[0-9a-f]+$/);
    const page = await c.history('chat:read', { sinceSeq: 2, limit: 2 });
    assert.deepEqual(page.messages.map((m) => m.seq), [3, 4]);
    assert.equal(page.more, true);
    const empty = await c.history('chat:never-published');
    assert.deepEqual(empty, {
      topic: 'chat:never-published', epoch: null, seq: 0, first_seq: null, truncated: false, more: false, messages: [],
    });
    await assert.rejects(c.history('chat:read', { limit: 0 }), (err) => err.code === 400 && /limit/.test(err.reason));
  });

  for (const fresh of [false, true]) {
    const what = fresh ? 'a brand-new topic (null epoch)' : 'a topic with messages';
    it(`history, then subscribe since its position, on ${what}: every message once, in order`, TEST, async () => {
      const topic = `chat:two-step-${fresh ? 'new' : 'old'}`;
      const c = client();
      let pub;
      if (!fresh) {
        for (let n = 1; n <= 30; n++) await httpPublish(gale.httpUrl, API_KEY, topic, { n });
        pub = publisher(gale, topic, 30);
        await waitFor(() => pub.count >= 5, WAIT_MS, 'publishing');
      }
      const h = await c.history(topic, { limit: 1000 });
      assert.equal(h.epoch === null, fresh);
      const loaded = h.messages.map((m) => ({ epoch: m.epoch, seq: m.seq, n: m.data.n }));
      if (fresh) {
        // The topic gets its first messages between the history read and the subscription.
        pub = publisher(gale, topic);
      }
      await waitFor(() => pub.seq >= h.seq + 10, WAIT_MS, 'messages published after the history read');
      const rec = recorder();
      const since = { epoch: h.epoch, seq: h.messages.at(-1)?.seq ?? h.seq };
      const ready = await c.subscribe(topic, { ...rec, since }).ready;
      assert.equal(ready.recovered, true, JSON.stringify(ready));
      assert.ok(ready.missed >= 10, `missed ${ready.missed}`);
      await sleep(50);
      await pub.stop();
      await waitFor(() => rec.got.at(-1)?.seq === pub.last.seq, WAIT_MS, 'the last message');
      const all = [...loaded, ...rec.got];
      assertRun(all, 1, pub.last.seq);
      assert.equal(all.at(-1).epoch, pub.last.epoch);
      assert.deepEqual(rec.errors, []);
    });
  }

  it('subscribe with history: N reads the N newest messages, then follows exactly', TEST, async () => {
    const topic = 'chat:option';
    for (let n = 1; n <= 60; n++) await httpPublish(gale.httpUrl, API_KEY, topic, { n });
    const pub = publisher(gale, topic, 60);
    await waitFor(() => pub.count >= 3, WAIT_MS, 'publishing');
    const c = client();
    const rec = recorder();
    const sub = c.subscribe(topic, { ...rec, history: 20 });
    await sub.ready;
    await waitFor(() => rec.got.filter((g) => !g.history).length >= 10, WAIT_MS, 'live messages');
    await pub.stop();
    await waitFor(() => rec.got.at(-1)?.seq === pub.last.seq, WAIT_MS, 'the last message');

    const fromHistory = rec.got.filter((g) => g.history);
    assert.equal(fromHistory.length, 20, 'the 20 newest');
    assert.ok(fromHistory[0].seq >= 63 - 20 + 1, `history starts at ${fromHistory[0].seq}`);
    assert.ok(rec.got.slice(0, 20).every((g) => g.history), 'the history comes first');
    assertRun(rec.got, fromHistory[0].seq, pub.last.seq);
    assert.equal(rec.histories.length, 1);
    assert.equal(rec.histories[0].reload, false);
    assert.deepEqual(rec.recoveries, [], 'loading is not a recovery');
    assert.deepEqual(sub.position, { epoch: pub.last.epoch, seq: pub.last.seq });
  });

  it('subscribe with history on a brand-new topic starts from its first message', TEST, async () => {
    const topic = 'chat:option-new';
    const c = client();
    const rec = recorder();
    const sub = c.subscribe(topic, { ...rec, history: 50 });
    await sub.ready;
    assert.deepEqual(rec.histories.map((h) => [h.epoch, h.seq, h.messages.length]), [[null, 0, 0]]);
    const pub = publisher(gale, topic);
    await waitFor(() => pub.count >= 20, WAIT_MS, 'publishing');
    await pub.stop();
    await waitFor(() => rec.got.at(-1)?.seq === pub.last.seq, WAIT_MS, 'the last message');
    assertRun(rec.got, 1, pub.last.seq);
  });
});

describe('gale-client history when the gateway is SIGKILLed and restarted', () => {
  it('reads the history again, and shows the new epoch exactly', TEST, async () => {
    let gale = await startGaleServe('history-restart', 'node-client', ['--api-key', API_KEY]);
    const listen = `127.0.0.1:${new URL(gale.url).port}`;
    const restart = () => restartGaleServe('history-restart-2', 'node-client', listen, ['--api-key', API_KEY]);
    const c = new GaleClient(`${gale.url}/ws`, FAST);
    const topic = 'chat:restart';
    const pub = publisher(gale, topic);
    try {
      const rec = recorder();
      const sub = c.subscribe(topic, { ...rec, history: 100 });
      await sub.ready;
      await waitFor(() => rec.got.length >= 20, WAIT_MS, 'messages before the kill');
      process.kill(gale.pid, 'SIGKILL');
      await gale.exited;
      gale = Object.assign(await restart(), { httpUrl: gale.httpUrl });
      await waitFor(() => rec.histories.length === 2, WAIT_MS, 'the history read again');
      const reloadedAt = rec.histories[1].at;
      await waitFor(() => rec.got.length >= reloadedAt + 30, WAIT_MS, 'messages after the restart');
      await pub.stop();
      await waitFor(() => rec.got.at(-1)?.seq === pub.last.seq && rec.got.at(-1)?.epoch === pub.last.epoch, WAIT_MS, 'the last message');

      assert.deepEqual(rec.recoveries.map((r) => [r.recovered, r.reloading]), [[false, true]]);
      assert.match(rec.recoveries[0].reason, /epoch/);
      assert.equal(rec.histories[1].reload, true);
      const [before, afterRestart] = [rec.got.slice(0, reloadedAt), rec.got.slice(reloadedAt)];
      assertRun(before, 1, before.length);
      // The new epoch from its first message: what was published before the client came
      // back arrives with the history, the rest live, each once.
      assertRun(afterRestart, 1, pub.last.seq, afterRestart[0].n - 1);
      assert.notEqual(before[0].epoch, afterRestart[0].epoch);
      const reread = rec.histories[1].messages.length;
      assert.ok(afterRestart.slice(0, reread).every((g) => g.history), 'the history read comes first');
    } finally {
      await pub.stop();
      await c.close();
      await gale.stop();
    }
  });
});
