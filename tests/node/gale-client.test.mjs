// gale-client (clients/js) against the real `gale serve`, in Node with the ws package.
//
// Covers the library route (/gale-client.js), command round trips and errors, command
// timeouts and the bounded queue, close codes that stop the client, exact recovery across a
// TCP connection cut under the client and across a stalled (silent) connection, a server
// SIGKILLed and restarted on the same port, and token expiry (4001) answered with a fresh
// token from getToken(), and a server-side disconnect that stops the client (4403) or lets it
// reconnect (4500); and, against a scripted server, that the client itself drops
// duplicate and stale deliveries and reports a gap.
//
// Run: node --test tests/node/   (GALE_BIN overrides target/debug/gale)

import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import WebSocket, { WebSocketServer } from 'ws';

import { GaleClient } from '../../clients/js/gale-client.js';
import { REPO_ROOT, restartGaleServe, startGaleServe } from '../lib/gale-process.mjs';
import { httpPublish, makeToken, sleep, startProxy, waitFor } from '../lib/gateway-helpers.mjs';

const API_KEY = 'client-suite-key';
const WAIT_MS = 10_000;
const TEST = { timeout: 30_000 };
// Short delays so that every reconnect in these tests takes milliseconds.
const FAST = {
  WebSocket,
  minReconnectDelay: 20,
  maxReconnectDelay: 100,
  timeout: 3000,
  connectTimeout: 2000,
  pingInterval: 200,
  idleTimeout: 2000,
};

/** Callbacks that record every delivery and recovery of a subscription. */
function recorder() {
  const rec = { got: [], recoveries: [], errors: [] };
  rec.onMessage = (data, d) => rec.got.push({ epoch: d.epoch, seq: d.seq, data });
  rec.onRecovered = (info) => rec.recoveries.push(info);
  rec.onError = (err) => rec.errors.push(err);
  return rec;
}

/** A server-side control request (`POST /api/OP`) to `gale`; its JSON answer. */
async function control(gale, op, body) {
  const res = await fetch(`${gale.httpUrl}/api/${op}`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  assert.equal(res.status, 200, await res.clone().text());
  return res.json();
}

/** Deliveries of one epoch numbered 1..n, each carrying `{ n: seq }`, once and in order. */
function assertExactly(got, n) {
  const want = Array.from({ length: n }, (_, i) => i + 1);
  assert.deepEqual(got.map((g) => g.seq), want, 'seq: every message once, in order');
  assert.deepEqual(got.map((g) => g.data.n), want, 'payloads in order');
  assert.equal(new Set(got.map((g) => g.epoch)).size, 1, 'one epoch');
}

/** Record a client's events. */
function events(client) {
  const seen = [];
  for (const name of ['connecting', 'connected', 'disconnected', 'error']) client.on(name, (arg) => seen.push([name, arg]));
  return seen;
}

describe('gale-client with gale serve', () => {
  let gale;
  const clients = [];
  const client = (url, options = {}) => {
    const c = new GaleClient(url, { ...FAST, ...options });
    clients.push(c);
    return c;
  };
  before(async () => {
    gale = await startGaleServe('client', 'node-client', ['--api-key', API_KEY]);
    gale.ws = `${gale.url}/ws`;
  });
  after(async () => {
    await Promise.all(clients.map((c) => c.close()));
    await gale?.stop();
  });

  it('serves /gale-client.js as an importable ES module', TEST, async () => {
    const res = await fetch(`${gale.httpUrl}/gale-client.js`);
    assert.equal(res.status, 200);
    assert.equal(res.headers.get('content-type'), 'text/javascript; charset=utf-8');
    assert.equal(res.headers.get('cache-control'), 'no-cache');
    const body = await res.text();
    assert.equal(body, readFileSync(join(REPO_ROOT, 'clients/js/gale-client.js'), 'utf8'));
    // The served text is the module itself: import it and use it.
    const served = await import(`data:text/javascript,${encodeURIComponent(body)}`);
    const c = new served.GaleClient(gale.ws, { WebSocket });
    clients.push(c);
    assert.equal(typeof (await c.ping()), 'number');
  });

  it('subscribes, publishes, unsubscribes and answers pings', TEST, async () => {
    const alice = client(gale.ws);
    const bob = client(gale.ws);
    const seen = events(alice);
    const a = recorder();
    const b = recorder();
    const subA = alice.subscribe('chat:round', a);
    const subB = bob.subscribe('chat:round', b);
    const ready = await subA.ready;
    await subB.ready;
    assert.equal(ready.seq, 0);
    assert.equal(subA.state, 'subscribed');
    assert.deepEqual(seen.map(([name]) => name), ['connecting', 'connected']);

    const first = await alice.publish('chat:round', { n: 1 });
    assert.deepEqual(first, { topic: 'chat:round', epoch: ready.epoch, seq: 1 });
    assert.equal((await bob.publish('chat:round', { n: 2 })).seq, 2);
    await waitFor(() => a.got.length === 2 && b.got.length === 2, WAIT_MS, 'two deliveries each');
    assertExactly(a.got, 2);
    assertExactly(b.got, 2);
    assert.deepEqual(subB.position, { epoch: ready.epoch, seq: 2 });
    assert.ok((await alice.ping()) >= 0);

    // An HTTP publish of bytes arrives as a Uint8Array.
    await fetch(`${gale.httpUrl}/api/publish/chat:round`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/octet-stream' },
      body: new Uint8Array([0, 1, 255]),
    });
    await waitFor(() => a.got.length === 3, WAIT_MS, 'the binary delivery');
    assert.deepEqual([...a.got[2].data], [0, 1, 255]);

    // Unsubscribed: nothing more arrives (the publish reply comes after any delivery would).
    await subA.unsubscribe();
    assert.equal(subA.state, 'unsubscribed');
    await alice.publish('chat:round', { n: 4 });
    await waitFor(() => b.got.length === 4, WAIT_MS, 'bob gets the fourth');
    assert.equal(a.got.length, 3);
    // Subscribing again right after leaving works (the client waits for the unsubscribe).
    const again = alice.subscribe('chat:round', recorder());
    again.unsubscribe();
    const third = alice.subscribe('chat:round', recorder());
    assert.equal((await third.ready).seq, 4);
  });

  it('rejects commands with the gateway\'s code and reason', TEST, async () => {
    const c = client(gale.ws);
    await assert.rejects(c.publish('news:sports', { n: 1 }), (err) => {
      assert.equal(err.name, 'GaleError');
      assert.equal(err.code, 403);
      assert.equal(err.reason, 'not allowed to publish to news:sports');
      return true;
    });
    const rec = recorder();
    const sub = c.subscribe('no spaces allowed', rec);
    await assert.rejects(sub.ready, (err) => err.code === 400 && /topic/.test(err.reason));
    assert.equal(sub.state, 'failed');
    assert.equal(rec.errors[0].code, 400);
    c.subscribe('chat:twice');
    assert.throws(() => c.subscribe('chat:twice'), (err) => err.code === 409);
    // The connection survives the errors.
    assert.equal((await c.publish('chat:twice', { n: 1 })).seq, 1);
  });

  it('times out a command that gets no reply', TEST, async () => {
    const proxy = await startProxy(new URL(gale.url).port);
    try {
      const c = client(proxy.url, { timeout: 300, idleTimeout: 20_000, pingInterval: 10_000 });
      await c.ping();
      proxy.stall();
      const start = Date.now();
      await assert.rejects(c.publish('chat:timeout', { n: 1 }), (err) => {
        assert.equal(err.code, 'TIMEOUT');
        assert.equal(err.reason, 'no reply to publish within 300 ms');
        return true;
      });
      assert.ok(Date.now() - start < 2000);
    } finally {
      await proxy.close();
    }
  });

  it('queues commands while disconnected, up to maxQueued', TEST, async () => {
    const proxy = await startProxy(new URL(gale.url).port);
    await proxy.close(); // nothing listens there any more
    const c = client(proxy.url, { maxQueued: 3 });
    const queued = [1, 2, 3].map((n) => c.publish('chat:queue', { n }));
    await assert.rejects(c.publish('chat:queue', { n: 4 }), (err) => {
      assert.equal(err.code, 'QUEUE_FULL');
      assert.match(err.reason, /3 commands are already waiting \(maxQueued = 3\)/);
      return true;
    });
    await c.close();
    for (const p of queued) await assert.rejects(p, (err) => err.code === 'CLOSED');
    assert.equal(c.state, 'closed');
  });

  it('sends queued commands once connected, in order', TEST, async () => {
    const c = client(gale.ws);
    const replies = await Promise.all([1, 2, 3].map((n) => c.publish('chat:flush', { n })));
    assert.deepEqual(replies.map((r) => r.seq), [1, 2, 3]);
  });

  it('stops on a close code that retrying would repeat (1009)', TEST, async () => {
    const c = client(gale.ws);
    const seen = events(c);
    await c.ping();
    // Larger than websocket.max_payload (64 KiB): the gateway closes with 1009.
    await assert.rejects(c.publish('chat:big', 'x'.repeat(70_000)), (err) => err.code === 1009);
    assert.equal(c.state, 'closed');
    const disconnected = seen.find(([name]) => name === 'disconnected')[1];
    assert.equal(disconnected.code, 1009);
    assert.equal(disconnected.willReconnect, false);
    assert.equal(seen.at(-1)[0], 'error');
    await assert.rejects(c.ping(), (err) => err.code === 'CLOSED');
  });

  it('recovers exactly what was missed while its TCP connection was cut', TEST, async () => {
    const proxy = await startProxy(new URL(gale.url).port);
    try {
      const c = client(proxy.url);
      const rec = recorder();
      await c.subscribe('chat:cut', rec).ready;
      let n = 0;
      const publish = async (count) => {
        for (let i = 0; i < count; i++) await httpPublish(gale.httpUrl, API_KEY, 'chat:cut', { n: ++n });
      };
      for (let cut = 1; cut <= 3; cut++) {
        await publish(40);
        proxy.cut();
        // Published while the client is away (its next attempt is 20-40 ms away at least).
        await publish(20);
        await waitFor(() => rec.recoveries.length === cut, WAIT_MS, `recovery ${cut}`);
      }
      await publish(40);
      await waitFor(() => rec.got.length >= n, WAIT_MS, `${n} deliveries`);
      await sleep(50);
      assertExactly(rec.got, n);
      assert.equal(rec.recoveries.length, 3);
      for (const r of rec.recoveries) assert.equal(r.recovered, true, JSON.stringify(r));
      assert.ok(rec.recoveries.some((r) => r.missed > 0), JSON.stringify(rec.recoveries));
    } finally {
      await proxy.close();
    }
  });

  it('replaces a connection that stalls silently and recovers', TEST, async () => {
    const proxy = await startProxy(new URL(gale.url).port);
    try {
      const c = client(proxy.url, { pingInterval: 100, idleTimeout: 400 });
      const seen = events(c);
      const rec = recorder();
      await c.subscribe('chat:stall', rec).ready;
      await httpPublish(gale.httpUrl, API_KEY, 'chat:stall', { n: 1 });
      await waitFor(() => rec.got.length === 1, WAIT_MS, 'the first delivery');
      proxy.stall();
      for (let n = 2; n <= 10; n++) await httpPublish(gale.httpUrl, API_KEY, 'chat:stall', { n });
      await waitFor(() => rec.got.length === 10, WAIT_MS, 'the stalled messages');
      assertExactly(rec.got, 10);
      const drop = seen.find(([name]) => name === 'disconnected')[1];
      assert.match(drop.reason, /nothing received for \d+ ms/);
      assert.equal(rec.recoveries[0].recovered, true);
    } finally {
      await proxy.close();
    }
  });
});

describe('gale-client when the gateway is SIGKILLed and restarted', () => {
  it('reports that recovery is impossible, never a duplicate or out of order', TEST, async () => {
    let gale = await startGaleServe('client-restart', 'node-client');
    const listen = `127.0.0.1:${new URL(gale.url).port}`;
    const wsUrl = `${gale.url}/ws`;
    const restart = () => restartGaleServe('client-restart-2', 'node-client', listen);
    const subscriber = new GaleClient(wsUrl, FAST);
    const publisher = new GaleClient(wsUrl, { ...FAST, timeout: 500 });
    try {
      const rec = recorder();
      await subscriber.subscribe('chat:restart', rec).ready;
      // The publisher publishes n = 1, 2, 3, ... every few ms, whatever happens.
      let n = 0;
      let publishing = true;
      const publishLoop = (async () => {
        while (publishing) {
          await publisher.publish('chat:restart', { n: ++n }).catch(() => {});
          await sleep(3);
        }
      })();
      await waitFor(() => rec.got.length >= 20, WAIT_MS, 'deliveries before the kill');
      process.kill(gale.pid, 'SIGKILL');
      await gale.exited;
      gale = await restart();
      await waitFor(() => rec.recoveries.length === 1, WAIT_MS, 'the recovery report');
      const resumedAt = rec.got.length;
      await waitFor(() => rec.got.length >= resumedAt + 20, WAIT_MS, 'deliveries after the restart');
      publishing = false;
      await publishLoop;

      const [report] = rec.recoveries;
      assert.equal(report.recovered, false);
      assert.match(report.reason, /epoch/);
      const epochs = [...new Set(rec.got.map((g) => g.epoch))];
      assert.equal(epochs.length, 2, 'one epoch before the restart, a new one after');
      assert.equal(report.epoch, epochs[1]);
      for (const epoch of epochs) {
        const seqs = rec.got.filter((g) => g.epoch === epoch).map((g) => g.seq);
        for (let i = 1; i < seqs.length; i++) assert.equal(seqs[i], seqs[i - 1] + 1, `epoch ${epoch}: ${seqs}`);
      }
      const ns = rec.got.map((g) => g.data.n);
      for (let i = 1; i < ns.length; i++) assert.ok(ns[i] > ns[i - 1], `payloads once and in order: ${ns}`);
    } finally {
      await subscriber.close();
      await publisher.close();
      await gale.stop();
    }
  });
});

describe('gale-client with expiring tokens', () => {
  const SECRET = 'client-suite-secret';
  let gale;
  before(async () => {
    // The gateway checks tokens on commands and on the pongs to its pings: ping every second,
    // so that a listener that sends nothing is closed within a second of its token's expiry.
    const config = join(REPO_ROOT, 'target', 'test-output', 'node-client', 'ping-every-second.toml');
    mkdirSync(dirname(config), { recursive: true });
    writeFileSync(config, '[websocket]\nping_interval = 1\n');
    const args = ['--config', config, '--api-key', API_KEY, '--jwt-secret', SECRET];
    gale = await startGaleServe('client-token', 'node-client', args);
    gale.ws = `${gale.url}/ws`;
  });
  after(async () => {
    await gale?.stop();
  });

  it('asks getToken again on 4001 and loses no message', TEST, async () => {
    const tokens = [];
    const getToken = async () => {
      // The first token expires within 1-2 s; the next ones last.
      const exp = Math.floor(Date.now() / 1000) + (tokens.length === 0 ? 2 : 60);
      tokens.push(exp);
      return makeToken(SECRET, 'ann', exp);
    };
    const c = new GaleClient(gale.ws, { ...FAST, getToken });
    try {
      const seen = events(c);
      const rec = recorder();
      await c.subscribe('chat:token', rec).ready;
      let n = 0;
      while (!seen.some(([name, e]) => name === 'disconnected' && e.code === 4001)) {
        await httpPublish(gale.httpUrl, API_KEY, 'chat:token', { n: ++n });
        await sleep(10);
        assert.ok(n < 1000, 'the token never expired');
      }
      for (let i = 0; i < 20; i++) await httpPublish(gale.httpUrl, API_KEY, 'chat:token', { n: ++n });
      await waitFor(() => rec.got.length >= n, WAIT_MS, `${n} deliveries`);
      assertExactly(rec.got, n);
      assert.equal(tokens.length, 2);
      assert.equal(rec.recoveries.length, 1);
      assert.equal(rec.recoveries[0].recovered, true);
      assert.equal(c.state, 'connected');
    } finally {
      await c.close();
    }
  });

  it('adopts a subscription the server makes, and ends one the server removes', TEST, async () => {
    const getToken = async () => makeToken(SECRET, 'lea', Math.floor(Date.now() / 1000) + 60);
    const adopted = recorder();
    const notices = [];
    const c = new GaleClient(gale.ws, {
      ...FAST,
      getToken,
      onServerSubscribe: (notice) => (notice.topic === 'chat:pushed' ? { ...adopted, onEvent: (e) => notices.push(e.op) } : undefined),
    });
    try {
      const all = [];
      c.on('event', (e) => all.push([e.op, e.topic]));
      const own = recorder();
      const mine = c.subscribe('chat:own', { ...own, onEvent: (e) => notices.push(e.op) });
      await mine.ready;
      assert.equal((await control(gale, 'subscribe', { user: 'lea', topic: 'chat:pushed' })).connections, 1);
      await waitFor(() => all.length === 1, WAIT_MS, 'the subscribed notice');
      for (let n = 1; n <= 3; n++) await httpPublish(gale.httpUrl, API_KEY, 'chat:pushed', { n });
      await waitFor(() => adopted.got.length === 3, WAIT_MS, 'deliveries of the adopted subscription');
      assertExactly(adopted.got, 3);
      assert.equal((await control(gale, 'unsubscribe', { user: 'lea', topic: 'chat:own' })).connections, 1);
      await waitFor(() => mine.state === 'unsubscribed', WAIT_MS, 'the subscription ended by the server');
      assert.deepEqual(all, [['subscribed', 'chat:pushed'], ['unsubscribed', 'chat:own']]);
      assert.deepEqual(notices, ['unsubscribed']);
      // After a reconnect the adopted subscription recovers; the ended one is not renewed.
      c.reconnect();
      await httpPublish(gale.httpUrl, API_KEY, 'chat:pushed', { n: 4 });
      await httpPublish(gale.httpUrl, API_KEY, 'chat:own', { n: 1 });
      await waitFor(() => adopted.got.length === 4, WAIT_MS, 'the adopted subscription after a reconnect');
      assertExactly(adopted.got, 4);
      assert.equal(own.got.length, 0);
    } finally {
      await c.close();
    }
  });

  it('stops on a server disconnect with 4403 and reconnects after one with 4500', TEST, async () => {
    const disconnect = (body) => control(gale, 'disconnect', body);
    const getToken = async () => makeToken(SECRET, 'kit', Math.floor(Date.now() / 1000) + 60);
    const c = new GaleClient(gale.ws, { ...FAST, getToken });
    try {
      const seen = events(c);
      await c.ping();
      assert.equal((await disconnect({ user: 'kit', reconnect: true })).connections, 1);
      await waitFor(() => seen.filter(([name]) => name === 'connected').length === 2, WAIT_MS, 'a reconnect');
      const first = seen.find(([name]) => name === 'disconnected')[1];
      assert.equal(first.code, 4500);
      assert.equal(first.willReconnect, true);
      await c.ping();
      assert.equal((await disconnect({ user: 'kit', reason: 'banned' })).connections, 1);
      await waitFor(() => c.state === 'closed', WAIT_MS, 'the client to stop');
      const last = seen.filter(([name]) => name === 'disconnected').at(-1)[1];
      assert.deepEqual([last.code, last.reason, last.willReconnect], [4403, 'banned', false]);
      await assert.rejects(c.ping(), (err) => err.code === 'CLOSED' || err.code === 4403);
    } finally {
      await c.close();
    }
  });

  it('stops on a token that getToken has just given and the gateway refuses', TEST, async () => {
    let asked = 0;
    const getToken = async () => {
      asked++;
      return makeToken('not-the-secret', 'mallory', Math.floor(Date.now() / 1000) + 60);
    };
    const c = new GaleClient(gale.ws, { ...FAST, getToken });
    const seen = events(c);
    await assert.rejects(c.ping(), (err) => {
      assert.equal(err.code, 401);
      assert.match(err.reason, /signature/i);
      return true;
    });
    assert.equal(asked, 1);
    assert.equal(c.state, 'closed');
    assert.equal(seen.filter(([name]) => name === 'error').length, 1);
  });

  it('stops on a static token that the gateway refuses', TEST, async () => {
    const expired = makeToken(SECRET, 'ann', Math.floor(Date.now() / 1000) - 10);
    const c = new GaleClient(gale.ws, { ...FAST, token: expired });
    const sub = c.subscribe('chat:static', recorder());
    await assert.rejects(sub.ready, (err) => err.code === 401 && /expired/.test(err.reason));
    assert.equal(sub.state, 'failed');
    assert.equal(c.state, 'closed');
  });
});

describe('gale-client against a scripted server', () => {
  it('drops deliveries at or below the last seq and reports a gap', TEST, async () => {
    // A server that misbehaves on purpose: repeats, reorders and skips messages.
    const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    await new Promise((r) => wss.once('listening', r));
    wss.on('connection', (ws) => {
      ws.on('message', (text) => {
        const cmd = JSON.parse(text);
        if (cmd.op !== 'subscribe') return;
        ws.send(JSON.stringify({ id: cmd.id, ok: true, op: 'subscribe', topic: cmd.topic, epoch: 'e1', seq: 0 }));
        for (const seq of [1, 1, 2, 1, 4, 3, 5]) ws.send(JSON.stringify({ topic: cmd.topic, epoch: 'e1', seq, data: { n: seq } }));
      });
    });
    const c = new GaleClient(`ws://127.0.0.1:${wss.address().port}/ws`, FAST);
    try {
      const rec = recorder();
      c.subscribe('chat:scripted', rec);
      await waitFor(() => rec.got.length === 4, WAIT_MS, 'four deliveries');
      await sleep(50);
      assert.deepEqual(rec.got.map((g) => g.seq), [1, 2, 4, 5]);
      assert.equal(rec.recoveries.length, 1);
      assert.equal(rec.recoveries[0].recovered, false);
      assert.equal(rec.recoveries[0].reason, 'message 3 was not delivered');
    } finally {
      await c.close();
      await new Promise((r) => wss.close(r));
    }
  });

  it('hands join and leave events to onEvent, outside the numbering', TEST, async () => {
    // Events have no seq: taken for deliveries, they would break the numbering (a "new epoch")
    // and leave the subscription without a position to recover from.
    const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
    await new Promise((r) => wss.once('listening', r));
    const subscribes = [];
    wss.on('connection', (ws) => {
      ws.on('message', (text) => {
        const cmd = JSON.parse(text);
        if (cmd.op !== 'subscribe') return;
        subscribes.push(cmd);
        const topic = cmd.topic;
        if (subscribes.length > 1) {
          ws.send(JSON.stringify({ id: cmd.id, ok: true, op: 'subscribe', topic, epoch: 'e1', seq: 2, recovered: true, missed: 0 }));
          return;
        }
        ws.send(JSON.stringify({ id: cmd.id, ok: true, op: 'subscribe', topic, epoch: 'e1', seq: 0 }));
        ws.send(JSON.stringify({ topic, epoch: 'e1', seq: 1, data: { n: 1 } }));
        ws.send(JSON.stringify({ op: 'join', topic, client: 'n-1', user: 'ann', info: { name: 'Ann' } }));
        ws.send(JSON.stringify({ topic, epoch: 'e1', seq: 2, data: { n: 2 } }));
        ws.send(JSON.stringify({ op: 'leave', topic, client: 'n-1', user: 'ann' }));
        setTimeout(() => ws.terminate(), 50);
      });
    });
    const c = new GaleClient(`ws://127.0.0.1:${wss.address().port}/ws`, FAST);
    const all = [];
    c.on('event', (e) => all.push(e.op));
    try {
      const rec = recorder();
      const events = [];
      c.subscribe('room:scripted', { ...rec, onEvent: (e) => events.push([e.op, e.user]) });
      await waitFor(() => subscribes.length === 2, WAIT_MS, 'a resubscribe after the drop');
      assert.deepEqual(rec.got.map((g) => g.seq), [1, 2]);
      assert.deepEqual(events, [['join', 'ann'], ['leave', 'ann']]);
      assert.deepEqual(all, ['join', 'leave']);
      assert.deepEqual(subscribes[1].since, { epoch: 'e1', seq: 2 });
      assert.ok(rec.recoveries.every((r) => r.recovered !== false), JSON.stringify(rec.recoveries));
    } finally {
      await c.close();
      await new Promise((r) => wss.close(r));
    }
  });
});
