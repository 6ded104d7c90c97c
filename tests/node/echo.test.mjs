// `gale echo` seen by a third-party Node client: the `ws` package.
//
// Covers text (ASCII, CJK/emoji) and binary echo across the frame-length boundaries,
// subprotocol selection, ping/pong, close code/reason echo, fragmented sends (including a
// ping between fragments), concurrent connections, and close 1001 on SIGTERM.
//
// Run: node --test tests/node/   (GALE_BIN overrides target/debug/gale)

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, it } from 'node:test';
import WebSocket from 'ws';

import { onceWithin, startGale } from '../lib/gale-process.mjs';

// Frame payload lengths around the 7-bit / 16-bit / 64-bit length encodings, then a large one.
const SIZES = [0, 125, 126, 65535, 65536, 1 << 20];
// Every wait is bounded; generous because the machine is shared with builds.
const TIMEOUT_MS = 60_000;
const TEST = { timeout: 2 * TIMEOUT_MS };

function asciiText(size) {
  const alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789 ';
  return alphabet.repeat(Math.ceil(size / alphabet.length)).slice(0, size);
}

function unicodeText(minBytes) {
  // 1-, 2-, 3- and 4-byte UTF-8 sequences, so code points straddle frame and read boundaries.
  const unit = 'a ñ 漢字テスト 한국어 🚀🌍👍🏽 ';
  return unit.repeat(Math.floor(minBytes / Buffer.byteLength(unit)) + 1);
}

async function open(url, protocols = []) {
  const ws = new WebSocket(url, protocols);
  queueMessages(ws);
  await Promise.race([
    onceWithin(ws, 'open', TIMEOUT_MS, 'open'),
    onceWithin(ws, 'error', TIMEOUT_MS, 'error').then(([err]) => Promise.reject(err)),
  ]);
  return ws;
}

// Messages are queued from the start: ws emits every message of a read synchronously, so a
// listener attached after an await (e.g. after the pong that shared a segment with an echo)
// would miss them.
function queueMessages(ws) {
  const queue = [];
  const waiters = [];
  ws.on('message', (data, isBinary) => {
    const message = { data, isBinary };
    const waiter = waiters.shift();
    if (waiter) waiter.resolve(message);
    else queue.push(message);
  });
  ws.on('close', (code) => {
    for (const waiter of waiters.splice(0)) waiter.reject(new Error(`closed with ${code} while waiting for a message`));
  });
  ws.messages = { queue, waiters };
}

/** The next message, as { data: Buffer, isBinary }. */
function nextMessage(ws) {
  const { queue, waiters } = ws.messages;
  if (queue.length) return Promise.resolve(queue.shift());
  if (ws.readyState === WebSocket.CLOSED) return Promise.reject(new Error('closed while waiting for a message'));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no message within ${TIMEOUT_MS} ms`)), TIMEOUT_MS);
    const settle = (fn) => (value) => {
      clearTimeout(timer);
      fn(value);
    };
    waiters.push({ resolve: settle(resolve), reject: settle(reject) });
  });
}

/** Resolves to { code, reason } when the connection closes. */
async function closed(ws) {
  const [code, reason] = await onceWithin(ws, 'close', TIMEOUT_MS, 'close');
  return { code, reason: reason.toString() };
}

async function closeNormally(ws) {
  ws.close(1000);
  await closed(ws);
}

describe('gale echo with the ws client', () => {
  let server;
  before(async () => {
    server = await startGale('node', 'node');
  });
  after(async () => {
    await server.stop();
  });

  async function echo(message, options = {}) {
    const ws = await open(server.url);
    ws.send(message, options);
    const reply = await nextMessage(ws);
    await closeNormally(ws);
    return reply;
  }

  it('echoes ASCII text of every frame-length class', TEST, async () => {
    for (const size of SIZES) {
      const message = asciiText(size);
      const { data, isBinary } = await echo(message);
      assert.equal(isBinary, false, `size ${size}`);
      assert.equal(data.toString('utf8'), message, `size ${size}`);
    }
  });

  it('echoes CJK and emoji text', TEST, async () => {
    for (const minBytes of [10, 70_000, 1 << 20]) {
      const message = unicodeText(minBytes);
      const { data, isBinary } = await echo(message);
      assert.equal(isBinary, false);
      assert.equal(data.toString('utf8'), message, `~${minBytes} bytes`);
    }
  });

  it('echoes binary of every frame-length class byte for byte', TEST, async () => {
    for (const size of SIZES) {
      const message = randomBytes(size);
      const { data, isBinary } = await echo(message);
      assert.equal(isBinary, true, `size ${size}`);
      assert.ok(data.equals(message), `size ${size}: echoed bytes differ`);
    }
  });

  it('accepts the client\'s first offered subprotocol', TEST, async () => {
    for (const [offer, chosen] of [
      [['chat', 'superchat'], 'chat'],
      [['superchat', 'chat'], 'superchat'],
      [[], ''],
    ]) {
      const ws = await open(server.url, offer);
      assert.equal(ws.protocol, chosen, `offer ${JSON.stringify(offer)}`);
      await closeNormally(ws);
    }
  });

  it('answers pings with pongs carrying the same payload', TEST, async () => {
    const ws = await open(server.url);
    for (const payload of [Buffer.alloc(0), Buffer.from('are you there?'), randomBytes(125)]) {
      ws.ping(payload);
      const [pong] = await onceWithin(ws, 'pong', TIMEOUT_MS, 'pong');
      assert.ok(pong.equals(payload));
    }
    ws.send('after pings');
    assert.equal((await nextMessage(ws)).data.toString(), 'after pings');
    await closeNormally(ws);
  });

  it('echoes the close code and reason', TEST, async () => {
    // The last reason is the longest allowed: 123 bytes fill a 125-byte control payload.
    for (const [code, reason] of [[4000, 'bye'], [3001, '再见 👋'], [4999, 'r'.repeat(123)]]) {
      const ws = await open(server.url);
      const done = closed(ws);
      ws.close(code, reason);
      assert.deepEqual(await done, { code, reason });
    }
  });

  it('answers a close that has no code', TEST, async () => {
    const ws = await open(server.url);
    const done = closed(ws);
    ws.close();
    // Echoing the empty close gives 1005 ("no status received") in ws; answering 1000 is
    // also allowed by RFC 6455 7.4.1.
    assert.ok([1000, 1005].includes((await done).code));
  });

  it('reassembles a fragmented text message', TEST, async () => {
    const ws = await open(server.url);
    const fragments = ['Hel', 'lo, ', '', '漢字', ' 🚀', '!'];
    fragments.forEach((f, i) => ws.send(f, { fin: i === fragments.length - 1 }));
    const { data, isBinary } = await nextMessage(ws);
    assert.equal(isBinary, false);
    assert.equal(data.toString('utf8'), fragments.join(''));
    await closeNormally(ws);
  });

  it('reassembles a fragmented binary message with a ping in the middle', TEST, async () => {
    const ws = await open(server.url);
    const fragments = [randomBytes(1), randomBytes(126), randomBytes(70_000)];
    const pongReceived = onceWithin(ws, 'pong', TIMEOUT_MS, 'pong');
    ws.send(fragments[0], { binary: true, fin: false });
    // A control frame may come between fragments (RFC 6455 5.4); it must not break the message.
    ws.ping('mid-message');
    ws.send(fragments[1], { binary: true, fin: false });
    ws.send(fragments[2], { binary: true, fin: true });
    const [pong] = await pongReceived;
    assert.equal(pong.toString(), 'mid-message');
    const { data, isBinary } = await nextMessage(ws);
    assert.equal(isBinary, true);
    assert.ok(data.equals(Buffer.concat(fragments)));
    await closeNormally(ws);
  });

  it('serves 50 concurrent connections echoing 20 messages each, in order', TEST, async () => {
    const client = async (n) => {
      const ws = await open(server.url);
      const sent = Array.from({ length: 20 }, (_, i) => (i % 2 ? `conn ${n} msg ${i}` : randomBytes(n * 100 + i)));
      // Pipelined: all sends first, so the server must keep the order under load.
      for (const message of sent) ws.send(message);
      const received = [];
      for (let i = 0; i < sent.length; i++) {
        const { data, isBinary } = await nextMessage(ws);
        received.push(isBinary ? data : data.toString('utf8'));
      }
      assert.deepEqual(received, sent, `connection ${n}`);
      await closeNormally(ws);
    };
    await Promise.all(Array.from({ length: 50 }, (_, n) => client(n)));
  });
});

describe('gale echo shutdown', () => {
  it('closes every connection with 1001 on SIGTERM and exits 0', TEST, async () => {
    const server = await startGale('node-sigterm', 'node');
    try {
      const clients = await Promise.all([1, 2, 3].map(() => open(server.url)));
      for (const ws of clients) {
        ws.send('before shutdown');
        assert.equal((await nextMessage(ws)).data.toString(), 'before shutdown');
      }
      const closes = clients.map(closed);
      server.terminate();
      for (const result of await Promise.all(closes)) assert.equal(result.code, 1001);
      assert.deepEqual(await server.exited, { code: 0, signal: null });
    } finally {
      await server.stop();
    }
  });
});
