// `gale echo` seen by a real browser: headless Chromium (Debian's /usr/bin/chromium, never a
// downloaded build) driven by playwright-core. The test serves echo-page.html over http on
// 127.0.0.1 and the page uses the standard WebSocket API: open, the chosen subprotocol,
// byte-exact text and ArrayBuffer echo, readyState 0 -> 1 -> 2 -> 3, a clean close with
// 4000 "bye", and a clean close with 1001 when the server gets SIGTERM. Screenshots of the
// page's event log go to target/test-output/browser/.
//
// Run: node --test tests/browser/   (GALE_BIN overrides target/debug/gale)

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, mkdirSync } from 'node:fs';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { after, before, describe, it } from 'node:test';
import { chromium } from 'playwright-core';

import { onceWithin, outputDir, startGale } from '../lib/gale-process.mjs';

const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
const OUTPUT_DIR = outputDir('browser');
const PAGE = readFileSync(new URL('./echo-page.html', import.meta.url));
// Generous: Chromium starts slowly on a 2-core machine shared with builds.
const TIMEOUT_MS = 90_000;
const TEST = { timeout: 2 * TIMEOUT_MS };

/** A node:http server on a free loopback port that serves the test page at "/". */
async function servePage() {
  const server = createServer((req, res) => {
    if (req.method === 'GET' && req.url === '/') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' }).end(PAGE);
    } else {
      res.writeHead(404).end();
    }
  });
  server.listen(0, '127.0.0.1');
  await onceWithin(server, 'listening', TIMEOUT_MS, 'the page server');
  return { server, url: `http://127.0.0.1:${server.address().port}/` };
}

async function openPage(browser, pageUrl) {
  const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
  page.setDefaultTimeout(TIMEOUT_MS);
  // A script error in the page would otherwise only show up as a puzzling timeout.
  page.on('pageerror', (err) => console.error(`page error: ${err.message}`));
  await page.goto(pageUrl);
  return page;
}

describe('gale echo with headless Chromium', () => {
  let browser, pageServer, gale;
  before(async () => {
    mkdirSync(OUTPUT_DIR, { recursive: true });
    pageServer = await servePage();
    gale = await startGale('browser', 'browser');
    browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: TIMEOUT_MS });
  });
  after(async () => {
    await browser?.close();
    await gale?.stop();
    pageServer?.server.close();
  });

  it('echoes text and ArrayBuffer messages and closes cleanly with 4000 "bye"', TEST, async () => {
    const page = await openPage(browser, pageServer.url);
    const texts = ['hello', '', 'a ñ 漢字テスト 한국어 🚀🌍👍🏽', '漢🚀'.repeat(20_000)];
    const binary = randomBytes(100 * 1024);
    try {
      const result = await page.evaluate(
        ([url, texts, b64]) => window.runEcho(url, texts, b64),
        [gale.url, texts, binary.toString('base64')],
      );
      assert.equal(result.protocol, 'chat');
      // Chromium offers permessage-deflate; gale echo's default answers without context
      // takeover either way, and every echo below went through compression.
      assert.equal(result.extensions, 'permessage-deflate; server_no_context_takeover; client_no_context_takeover');
      assert.deepEqual(result.echoedTexts, texts);
      assert.equal(result.binaryIsArrayBuffer, true);
      assert.ok(Buffer.from(result.echoedBinary, 'base64').equals(binary), '100 KiB binary echo differs');
      assert.deepEqual(result.states, [0, 1, 2, 3]);
      assert.deepEqual(result.close, { code: 4000, reason: 'bye', wasClean: true, isCloseEvent: true });
    } finally {
      await page.screenshot({ path: join(OUTPUT_DIR, 'echo.png'), fullPage: true });
      await page.close();
    }
  });

  it('gets a clean close with 1001 when the server is sent SIGTERM', TEST, async () => {
    const doomed = await startGale('browser-sigterm', 'browser');
    const page = await openPage(browser, pageServer.url);
    try {
      assert.equal(await page.evaluate((url) => window.openForShutdown(url), doomed.url), 'before shutdown');
      doomed.terminate();
      const close = await page.evaluate(() => window.shutdownClose);
      assert.equal(close.code, 1001);
      assert.equal(close.wasClean, true);
      assert.equal(close.isCloseEvent, true);
      assert.deepEqual(close.states, [0, 1, 3]);
      assert.deepEqual(await doomed.exited, { code: 0, signal: null });
    } finally {
      await page.screenshot({ path: join(OUTPUT_DIR, 'shutdown.png'), fullPage: true });
      await page.close();
      await doomed.stop();
    }
  });
});
