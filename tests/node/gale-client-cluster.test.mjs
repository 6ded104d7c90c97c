// gale-client with two `gale serve` nodes on one redis-server (started here on a free
// loopback port, stopped by its PID): the client's node is SIGKILLed while a backend keeps
// publishing through the other node; the client moves to the other URL and recovers every
// message exactly once, in order.
//
// Run: node --test tests/node/   (GALE_BIN overrides target/debug/gale; skipped without redis-server)

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import WebSocket from 'ws';

import { GaleClient } from '../../clients/js/gale-client.js';
import { startGaleServe } from '../lib/gale-process.mjs';
import { haveRedis, httpPublish, sleep, startRedis, waitFor } from '../lib/gateway-helpers.mjs';

const API_KEY = 'cluster-client-key';
const TEST = { timeout: 30_000 };
const SKIP = haveRedis() ? false : 'redis-server is not installed: the cluster suite needs it';

describe('gale-client with a cluster of two nodes', { skip: SKIP }, () => {
  let redis, a, b;
  before(async () => {
    redis = await startRedis('node-client');
    const args = ['--broker', redis.url, '--api-key', API_KEY];
    [a, b] = await Promise.all([
      startGaleServe('cluster-a', 'node-client', args),
      startGaleServe('cluster-b', 'node-client', args),
    ]);
  });
  after(async () => {
    await a?.stop();
    await b?.stop();
    await redis?.stop();
  });

  it('moves to the other node when its node is SIGKILLed, and recovers exactly', TEST, async () => {
    const client = new GaleClient([`${a.url}/ws`, `${b.url}/ws`], {
      WebSocket,
      minReconnectDelay: 20,
      maxReconnectDelay: 100,
      timeout: 3000,
      connectTimeout: 2000,
    });
    try {
      const connected = [];
      client.on('connected', ({ url }) => connected.push(url));
      const got = [];
      const recoveries = [];
      const sub = client.subscribe('chat:cluster', {
        onMessage: (data, d) => got.push({ epoch: d.epoch, seq: d.seq, n: data.n }),
        onRecovered: (info) => recoveries.push(info),
      });
      await sub.ready;
      assert.deepEqual(connected, [`${a.url}/ws`]);

      // The backend publishes through node B throughout.
      let n = 0;
      const publish = async (count) => {
        for (let i = 0; i < count; i++) await httpPublish(b.httpUrl, API_KEY, 'chat:cluster', { n: ++n });
      };
      await publish(50);
      await waitFor(() => got.length === 50, 10_000, 'the first 50 through node A');
      process.kill(a.pid, 'SIGKILL');
      await a.exited;
      await publish(50);
      await waitFor(() => recoveries.length === 1, 10_000, 'recovery on node B');
      await publish(50);
      await waitFor(() => got.length >= 150, 10_000, '150 deliveries');
      await sleep(50);

      assert.deepEqual(connected, [`${a.url}/ws`, `${b.url}/ws`]);
      assert.equal(recoveries.length, 1, JSON.stringify(recoveries));
      assert.equal(recoveries[0].recovered, true, JSON.stringify(recoveries[0]));
      assert.ok(recoveries[0].missed > 0, JSON.stringify(recoveries[0]));
      const want = Array.from({ length: 150 }, (_, i) => i + 1);
      assert.deepEqual(got.map((g) => g.seq), want, 'every message once, in order');
      assert.deepEqual(got.map((g) => g.n), want);
      assert.equal(new Set(got.map((g) => g.epoch)).size, 1);
    } finally {
      await client.close();
    }
  });
});
