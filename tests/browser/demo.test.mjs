// The gateway's demo page (`gale serve`, GET /) in headless Chromium: two pages join the same
// room; a message typed in one appears in the other; one page loses its connection while the
// other keeps sending, then reconnects with `since` and shows exactly the missed messages, in
// order, once each. Screenshots go to target/test-output/browser/.
//
// Run: node --test tests/browser/   (GALE_BIN overrides target/debug/gale)

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { chromium } from 'playwright-core';

import { makeCertificate, outputDir, startGaleServe } from '../lib/gale-process.mjs';

const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
const OUTPUT_DIR = outputDir('browser');
const TIMEOUT_MS = 90_000;
const TEST = { timeout: 2 * TIMEOUT_MS };

async function openRoom(browser, url) {
  const page = await browser.newPage({ viewport: { width: 1000, height: 700 } });
  page.setDefaultTimeout(TIMEOUT_MS);
  page.on('pageerror', (err) => console.error(`page error: ${err.message}`));
  await page.goto(url);
  await page.waitForFunction(() => window.galeDemo?.state === 'open' && window.galeDemo.position);
  return page;
}

async function say(page, text) {
  await page.fill('#text', text);
  await page.click('form#send button');
}

const received = (page) => page.evaluate(() => window.galeDemo.received.map((d) => [d.seq, d.data.text]));

describe('gale serve demo page with headless Chromium', () => {
  let browser, gale;
  before(async () => {
    mkdirSync(OUTPUT_DIR, { recursive: true });
    gale = await startGaleServe('demo', 'browser');
    browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: TIMEOUT_MS });
  });
  after(async () => {
    await browser?.close();
    await gale?.stop();
  });

  it('delivers between two pages and recovers what a dropped page missed', TEST, async () => {
    const room = `${gale.httpUrl}/#browser${process.env.GALE_BACKEND || ''}`;
    const alice = await openRoom(browser, room);
    const bob = await openRoom(browser, room);
    assert.equal(await alice.evaluate(() => window.galeDemo.ws.readyState), 1);
    assert.match(await alice.textContent('#state'), /open/);

    await say(alice, 'hello from alice 弹幕');
    await bob.waitForFunction(() => window.galeDemo.received.length === 1);
    assert.deepEqual(await received(bob), [[1, 'hello from alice 弹幕']]);
    assert.match(await bob.textContent('#log'), /hello from alice 弹幕/);

    // Bob's connection drops; he stays away for 1.5 s while Alice sends three messages.
    await bob.evaluate(() => window.galeDemo.dropConnection(1500));
    await bob.waitForFunction(() => window.galeDemo.state === 'closed');
    for (const text of ['while away 1', 'while away 2', 'while away 3']) {
      await say(alice, text);
    }
    await alice.waitForFunction(() => window.galeDemo.received.length === 4);
    // Bob reconnects by himself and recovers exactly the three he missed.
    await bob.waitForFunction(() => window.galeDemo.connects === 2 && window.galeDemo.received.length === 4);
    assert.deepEqual(await received(bob), [
      [1, 'hello from alice 弹幕'], [2, 'while away 1'], [3, 'while away 2'], [4, 'while away 3'],
    ]);
    const notices = await bob.evaluate(() => window.galeDemo.notices);
    assert.ok(notices.some((n) => /recovered 3 missed/.test(n)), JSON.stringify(notices));
    // And the room goes on live for both.
    await say(bob, 'back again');
    await alice.waitForFunction(() => window.galeDemo.received.length === 5);
    await bob.waitForFunction(() => window.galeDemo.received.length === 5);
    assert.deepEqual((await received(alice)).at(-1), [5, 'back again']);
    assert.equal(await bob.evaluate(() => window.galeDemo.ws.bufferedAmount), 0);

    await alice.screenshot({ path: join(OUTPUT_DIR, `demo-alice.png`) });
    await bob.screenshot({ path: join(OUTPUT_DIR, `demo-bob.png`) });
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
    const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1000, height: 700 } });
    const open = async () => {
      const page = await context.newPage();
      page.setDefaultTimeout(TIMEOUT_MS);
      page.on('pageerror', (err) => console.error(`page error: ${err.message}`));
      await page.goto(`${gale.httpUrl}/#tls`);
      await page.waitForFunction(() => window.galeDemo?.state === 'open' && window.galeDemo.position);
      return page;
    };
    const alice = await open();
    const bob = await open();
    assert.equal(await alice.evaluate(() => window.galeDemo.ws.url.slice(0, 6)), 'wss://');
    await say(alice, 'over TLS 🔒');
    await bob.waitForFunction(() => window.galeDemo.received.length === 1);
    assert.deepEqual(await received(bob), [[1, 'over TLS 🔒']]);
    await bob.screenshot({ path: join(OUTPUT_DIR, `demo-tls.png`) });
    await context.close();
  });
});
