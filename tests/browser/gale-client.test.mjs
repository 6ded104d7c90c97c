// gale-client in headless Chromium: a page of the gateway's origin imports the library from
// `/gale-client.js` (served by gale serve, no bundler), subscribes and publishes with the
// browser's own WebSocket; when the gateway is SIGKILLed and restarted, the `online` event
// makes the client reconnect at once instead of waiting out its backoff.
//
// Run: node --test tests/browser/   (GALE_BIN overrides target/debug/gale)

import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { chromium } from 'playwright-core';

import { startGale, startGaleServe } from '../lib/gale-process.mjs';

const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
const TIMEOUT_MS = 20_000;
const TEST = { timeout: 3 * TIMEOUT_MS };

// The application page: a module script that imports the client from the gateway.
const PAGE = `<!doctype html>
<meta charset="utf-8">
<title>gale-client test page</title>
<script type="module">
  import { GaleClient } from '/gale-client.js';
  const state = window.app = { got: [], recoveries: [], events: [], ready: null, error: null };
  try {
    // A path: the client resolves it against the page (ws:// for http://).
    const client = state.client = new GaleClient('/ws', { minReconnectDelay: 15000, maxReconnectDelay: 30000 });
    for (const name of ['connecting', 'connected', 'disconnected']) client.on(name, (e) => state.events.push([name, e.code ?? null]));
    const sub = client.subscribe('chat:browser', {
      onMessage: (data, d) => state.got.push([d.seq, data]),
      onRecovered: (info) => state.recoveries.push(info),
    });
    state.ready = await sub.ready;
    state.published = await client.publish('chat:browser', { text: 'from the page 弹幕' });
  } catch (err) {
    state.error = String(err);
  }
</script>`;

describe('gale-client in headless Chromium', () => {
  let browser, gale;
  before(async () => {
    gale = await startGaleServe('client-browser', 'browser');
    browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: TIMEOUT_MS });
  });
  after(async () => {
    await browser?.close();
    await gale?.stop();
  });

  it('imports /gale-client.js, subscribes, publishes and receives; reconnects when online', TEST, async () => {
    const page = await browser.newPage();
    page.setDefaultTimeout(TIMEOUT_MS);
    const pageErrors = [];
    page.on('pageerror', (err) => pageErrors.push(err.message));
    const scripts = [];
    page.on('response', (res) => scripts.push([res.url(), res.status(), res.headers()['content-type']]));
    // The application page, at the gateway's origin: a document loaded from the gateway
    // (/healthz), its content replaced by the page; /gale-client.js and /ws go to the gateway.
    // (A page the test answered itself would count as public, and Chromium's local network
    // access checks would refuse its connection to 127.0.0.1.)
    await page.goto(`${gale.httpUrl}/healthz`);
    await page.setContent(PAGE);
    await page.waitForFunction(() => window.app?.published || window.app?.error);
    assert.equal(await page.evaluate(() => window.app.error), null, pageErrors.join('\n'));
    assert.deepEqual(scripts.find(([url]) => url.endsWith('/gale-client.js')), [
      `${gale.httpUrl}/gale-client.js`, 200, 'text/javascript; charset=utf-8',
    ]);
    await page.waitForFunction(() => window.app.got.length === 1);
    assert.deepEqual(await page.evaluate(() => window.app.got), [[1, { text: 'from the page 弹幕' }]]);
    assert.equal(await page.evaluate(() => window.app.published.seq), 1);

    // The gateway dies; the client waits at least 15 s before its next attempt. A restarted
    // gateway and an `online` event bring it back at once.
    const port = new URL(gale.url).port;
    process.kill(gale.pid, 'SIGKILL');
    await gale.exited;
    await page.waitForFunction(() => window.app.client.state === 'waiting');
    gale = await startGale('client-browser-2', 'browser', [], { command: ['serve', '--listen', `127.0.0.1:${port}`] });
    const start = Date.now();
    await page.evaluate(() => window.dispatchEvent(new Event('online')));
    await page.waitForFunction(() => window.app.recoveries.length === 1);
    assert.ok(Date.now() - start < 10_000, 'reconnected well before the 15 s backoff');
    const recovery = await page.evaluate(() => window.app.recoveries[0]);
    assert.equal(recovery.recovered, false);
    assert.match(recovery.reason, /epoch/);
    await page.evaluate(() => window.app.client.publish('chat:browser', { text: 'after the restart' }));
    await page.waitForFunction(() => window.app.got.length === 2);
    assert.deepEqual(await page.evaluate(() => window.app.got[1]), [1, { text: 'after the restart' }]);
    assert.deepEqual(pageErrors, []);
    await page.evaluate(() => window.app.client.close());
  });
});
