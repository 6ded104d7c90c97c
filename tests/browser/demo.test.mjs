// The gateway's demo page (`gale serve`, GET /) in headless Chromium. Two visitors join a room;
// what one types flies across the other's stage (in lanes that never overlap) and enters the
// chat log. A visitor whose connection drops while the other keeps talking comes back by
// itself and recovers exactly the missed messages. A third visitor arriving later sees the
// room's recent history. The gateway is SIGKILLed and restarted on the same port: the pages
// reconnect without a reload, find that recovery is impossible (a new epoch) and reload the
// history. No console error and no failed request (the favicon included) on the way, apart
// from the browser's own reports of connections refused while the gateway is down.
// Screenshots go to target/test-output/browser/BACKEND/.
//
// Run: node --test tests/browser/   (GALE_BIN overrides target/debug/gale)

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { chromium } from 'playwright-core';

import { makeCertificate, outputDir, restartGaleServe, startGaleServe } from '../lib/gale-process.mjs';

const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
const OUTPUT_DIR = outputDir('browser');
const TIMEOUT_MS = 20_000;
const TEST = { timeout: 4 * TIMEOUT_MS };
const VIEWPORT = { width: 1100, height: 760 };
/** What Chromium logs, as a console error, for a WebSocket it could not open. */
const REFUSED = /WebSocket connection to .* failed/;

/**
 * Open the demo page at `url` and wait until it has joined its room. Console errors, page
 * errors and failed requests are collected in `page.problems` as [when, what].
 */
async function openRoom(context, url) {
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT_MS);
  page.problems = [];
  const note = (what) => page.problems.push(what);
  page.on('console', (msg) => msg.type() === 'error' && note(`console: ${msg.text()}`));
  page.on('pageerror', (err) => note(`page error: ${err.message}`));
  page.on('response', (res) => res.status() >= 400 && note(`HTTP ${res.status()} ${res.url()}`));
  page.on('requestfailed', (req) => !req.url().startsWith('ws') && note(`failed: ${req.url()} ${req.failure()?.errorText}`));
  await page.goto(url);
  await page.waitForFunction(() => window.galeDemo?.state === 'connected' && window.galeDemo.historyLoads === 1 && window.galeDemo.position);
  return page;
}

async function say(page, text) {
  await page.fill('#text', text);
  await page.click('form#send button');
}

/** [seq, text] of every message the page has shown, in order. */
const received = (page) => page.evaluate(() => window.galeDemo.received.map((d) => [d.seq, d.data.text]));
const waitReceived = (page, n) => page.waitForFunction((n) => window.galeDemo.received.length === n, n);

/** The danmaku comments on the stage: their text, lane and box, as drawn now. */
function bullets(page) {
  return page.evaluate(() => {
    const stage = document.getElementById('stage').getBoundingClientRect();
    const boxes = [...document.querySelectorAll('#stage .bullet')].map((el) => {
      const r = el.getBoundingClientRect();
      return { text: el.textContent, lane: Number(el.dataset.lane), left: r.left, right: r.right, top: r.top, bottom: r.bottom };
    });
    return { stage: { left: stage.left, right: stage.right, top: stage.top, bottom: stage.bottom }, boxes };
  });
}

/** No two comments' boxes intersect (comments waiting off stage, to the right, included). */
function assertNoOverlap(boxes) {
  for (let i = 0; i < boxes.length; i++) {
    for (let j = i + 1; j < boxes.length; j++) {
      const [a, b] = [boxes[i], boxes[j]];
      const apart = a.right <= b.left || b.right <= a.left || a.bottom <= b.top || b.bottom <= a.top;
      assert.ok(apart, `comments overlap: ${JSON.stringify(a)} and ${JSON.stringify(b)}`);
    }
  }
}

/**
 * A TCP proxy to the gateway that one visitor goes through: `cut()` breaks its connections
 * and refuses new ones until `restore()`, as a network that goes away for a while.
 */
async function startProxy(port) {
  let holdUntil = 0;
  const sockets = new Set();
  const server = net.createServer((client) => {
    if (Date.now() < holdUntil) return client.resetAndDestroy();
    const upstream = net.connect(port, '127.0.0.1');
    sockets.add(client).add(upstream);
    const end = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
    client.pipe(upstream).pipe(client);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    cut() {
      holdUntil = Infinity;
      for (const s of sockets) s.resetAndDestroy();
    },
    restore() {
      holdUntil = 0;
    },
    close: () => new Promise((r) => {
      for (const s of sockets) s.destroy();
      server.close(r);
    }),
  };
}

describe('gale serve demo page with headless Chromium', () => {
  let browser, gale, proxy;
  before(async () => {
    mkdirSync(OUTPUT_DIR, { recursive: true });
    gale = await startGaleServe('demo', 'browser');
    proxy = await startProxy(new URL(gale.url).port);
    browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: TIMEOUT_MS });
  });
  after(async () => {
    await browser?.close();
    await proxy?.close();
    await gale?.stop();
  });

  it('shows history, flies comments in lanes, recovers a drop and survives a gateway restart', TEST, async () => {
    const context = await browser.newContext({ viewport: VIEWPORT });
    const room = `#browser${process.env.GALE_BACKEND || ''}`;
    const alice = await openRoom(context, `${gale.httpUrl}/${room}`);
    const bob = await openRoom(context, `${proxy.url}/${room}`);
    assert.equal(await alice.evaluate(() => window.galeDemo.client.socket.readyState), 1);
    assert.match(await alice.textContent('#state'), /^connected/);
    assert.match(await alice.textContent('#log'), /no recent messages/);
    assert.match(await alice.textContent('#ready'), /^1 \(OPEN\)/);
    assert.match(await alice.textContent('#buffered'), /^0 bytes/);
    assert.notEqual(await alice.textContent('#protocol'), '–');
    assert.match(await alice.textContent('#extensions'), /permessage-deflate|\(none\)/);

    // A burst of comments: on Bob's stage they take several lanes, and none overlaps another.
    const burst = ['hello from alice 弹幕', 'GOAL! 1-0', 'what a pass', 'replay please', 'ref!!', 'unbelievable', '加油', 'the crowd goes wild'];
    // Sent in one go (the page's own send, as the form uses), so that the burst arrives at once
    // and flies together however slow the machine makes each round trip to the browser.
    await alice.evaluate(async (texts) => {
      for (const text of texts) await window.galeDemo.say(text);
    }, burst);
    await waitReceived(bob, burst.length);
    assert.deepEqual(await received(bob), burst.map((text, i) => [i + 1, text]));
    const log = await bob.textContent('#log');
    for (const text of burst) assert.ok(log.includes(text), `the log shows ${text}`);
    // Once the first comment has flown wholly onto the stage, the screenshot shows the burst.
    const inside = ({ stage }, b) => b.left >= stage.left && b.right <= stage.right && b.top >= stage.top && b.bottom <= stage.bottom;
    let drawn;
    for (const deadline = Date.now() + 5000; Date.now() < deadline; await bob.waitForTimeout(100)) {
      drawn = await bullets(bob);
      if (drawn.boxes.some((b) => b.text === burst[0] && inside(drawn, b))) break;
    }
    await bob.screenshot({ path: join(OUTPUT_DIR, 'demo-danmaku.png') });
    const { boxes } = drawn;
    assert.ok(boxes.some((b) => b.text === burst[0] && inside(drawn, b)), `the first comment on the stage: ${JSON.stringify(drawn)}`);
    assert.deepEqual(boxes.map((b) => b.text), burst, 'one flying comment per message');
    assert.ok(new Set(boxes.map((b) => b.lane)).size >= 2, 'a burst takes several lanes');
    assertNoOverlap(boxes);

    // Bob's network goes away while Alice talks; once it is back he reconnects by himself and
    // recovers exactly what he missed.
    const bobMarker = await bob.evaluate(() => (window.sameDocument = Math.random()));
    proxy.cut();
    await bob.waitForFunction(() => window.galeDemo.state !== 'connected');
    assert.match(await bob.textContent('#state'), /reconnecting/);
    const away = ['while away 1', 'while away 2', 'while away 3'];
    for (const text of away) await say(alice, text);
    await waitReceived(alice, 11);
    // The network comes back only now: Bob must recover all three (however slow the sends were).
    proxy.restore();
    await bob.waitForFunction(() => window.galeDemo.connects === 2 && window.galeDemo.received.length === 11);
    assert.deepEqual((await received(bob)).slice(8), [[9, 'while away 1'], [10, 'while away 2'], [11, 'while away 3']]);
    assert.ok((await bob.evaluate(() => window.galeDemo.notices)).some((n) => /recovered 3 missed messages/.test(n)));
    assert.match(await bob.textContent('#state'), /recovered 3 missed/);
    bob.problems = bob.problems.filter((p) => !REFUSED.test(p)); // while the network was away

    // A visitor arriving now sees the room's recent messages at once.
    const carol = await openRoom(context, `${gale.httpUrl}/${room}`);
    assert.deepEqual(await received(carol), await received(alice));
    assert.match(await carol.textContent('#log'), /joined chat:browser.*: 11 recent messages/);
    assert.ok((await carol.textContent('#log')).includes('while away 3'));
    await carol.screenshot({ path: join(OUTPUT_DIR, 'demo-history.png') });

    // The gateway is SIGKILLed and restarted on the same port: the pages reconnect without a
    // reload, cannot recover (a new epoch) and show the new history.
    const port = new URL(gale.url).port;
    process.kill(gale.pid, 'SIGKILL');
    await gale.exited;
    await alice.waitForFunction(() => window.galeDemo.state !== 'connected');
    gale = await restartGaleServe('demo-restarted', 'browser', `127.0.0.1:${port}`);
    for (const page of [alice, bob, carol]) {
      await page.waitForFunction(() => window.galeDemo.state === 'connected' && window.galeDemo.historyLoads === 2);
      assert.match(await page.textContent('#log'), /could not recover: reloaded history \(no recent messages\)/);
      page.problems = page.problems.filter((p) => !REFUSED.test(p)); // while the gateway was down
    }
    assert.equal(await bob.evaluate(() => window.sameDocument), bobMarker, 'the page was not reloaded');
    await say(bob, 'back after the restart');
    for (const page of [alice, bob, carol]) {
      await waitReceived(page, 1);
      assert.deepEqual(await received(page), [[1, 'back after the restart']]);
    }
    assert.equal(await bob.evaluate(() => window.galeDemo.client.socket.bufferedAmount), 0);
    await alice.screenshot({ path: join(OUTPUT_DIR, 'demo-restarted.png') });

    for (const page of [alice, bob, carol]) assert.deepEqual(page.problems, [], 'no console error, no failed request');
    await context.close();
  });
});

describe('gale serve demo page over https and wss with headless Chromium', () => {
  let browser, gale;
  before(async () => {
    const { cert, key } = makeCertificate(join(OUTPUT_DIR, `tls`));
    gale = await startGaleServe('demo-tls', 'browser', ['--tls-cert', cert, '--tls-key', key]);
    browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: TIMEOUT_MS });
  });
  after(async () => {
    await browser?.close();
    await gale?.stop();
  });

  it('loads the page over https and talks over wss', TEST, async () => {
    assert.match(gale.url, /^wss:/);
    // The certificate is self-signed for this test: the browser context is told to accept it.
    const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: VIEWPORT });
    const alice = await openRoom(context, `${gale.httpUrl}/#tls`);
    const bob = await openRoom(context, `${gale.httpUrl}/#tls`);
    assert.equal(await alice.evaluate(() => window.galeDemo.client.socket.url.slice(0, 6)), 'wss://');
    await say(alice, 'over TLS 🔒');
    await waitReceived(bob, 1);
    assert.deepEqual(await received(bob), [[1, 'over TLS 🔒']]);
    const carol = await openRoom(context, `${gale.httpUrl}/#tls`);
    assert.deepEqual(await received(carol), [[1, 'over TLS 🔒']]);
    await bob.screenshot({ path: join(OUTPUT_DIR, 'demo-tls.png') });
    for (const page of [alice, bob, carol]) assert.deepEqual(page.problems, []);
    await context.close();
  });
});
