// Helpers for the gale-client suites: waiting on a condition, publishing over the HTTP API,
// a TCP proxy that can cut or stall its connections, HS256 tokens, and a throwaway
// redis-server for cluster mode (stopped by its own PID).

import { spawn, spawnSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { createWriteStream, mkdirSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';

import { REPO_ROOT } from './gale-process.mjs';

/** Resolve once `condition()` is truthy (polled every 5 ms); reject after `ms`. */
export async function waitFor(condition, ms, what) {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** POST `data` as JSON to `/api/publish/{topic}`; resolves to the gateway's answer. */
export async function httpPublish(httpUrl, apiKey, topic, data) {
  const res = await fetch(`${httpUrl}/api/publish/${encodeURIComponent(topic)}`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${apiKey}`, 'Content-Type': 'application/json' },
    body: JSON.stringify(data),
  });
  const body = await res.json();
  if (!res.ok) throw new Error(`publish ${topic}: ${res.status} ${JSON.stringify(body)}`);
  return body;
}

/** A free loopback TCP port (closed again, so a server can bind it). */
export async function freePort() {
  const server = net.createServer();
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const { port } = server.address();
  await new Promise((r) => server.close(r));
  return port;
}

/**
 * A TCP proxy on a free loopback port to `127.0.0.1:targetPort`. `cut()` destroys every
 * connection through it (both sides see the TCP connection die); `stall()` stops moving bytes
 * on the current connections without closing them (a dead network path).
 */
export async function startProxy(targetPort) {
  const pairs = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(targetPort, '127.0.0.1');
    const pair = { client, upstream };
    pairs.add(pair);
    const end = () => {
      pairs.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on('error', end).on('close', end);
    upstream.on('error', end).on('close', end);
    client.pipe(upstream);
    upstream.pipe(client);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: server.address().port,
    url: `ws://127.0.0.1:${server.address().port}/ws`,
    get connections() {
      return pairs.size;
    },
    cut() {
      for (const { client, upstream } of pairs) {
        client.resetAndDestroy();
        upstream.destroy();
      }
      pairs.clear();
    },
    stall() {
      for (const { client, upstream } of pairs) {
        client.unpipe(upstream);
        upstream.unpipe(client);
        client.pause();
        upstream.pause();
      }
    },
    async close() {
      this.cut();
      await new Promise((r) => server.close(r));
    },
  };
}

const base64url = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');

/** An HS256 JWT for `sub` that expires at `exp` (Unix seconds). */
export function makeToken(secret, sub, exp) {
  const unsigned = `${base64url({ alg: 'HS256', typ: 'JWT' })}.${base64url({ sub, exp })}`;
  const signature = createHmac('sha256', secret).update(unsigned).digest('base64url');
  return `${unsigned}.${signature}`;
}

/** Whether redis-server can be run here. */
export function haveRedis() {
  return spawnSync('redis-server', ['--version'], { stdio: 'ignore' }).status === 0;
}

/** The process id of the Redis answering on `port` (`INFO server`), or null if none does yet. */
function servingPid(port) {
  return new Promise((resolve) => {
    let reply = '';
    const s = net.connect(port, '127.0.0.1');
    const done = (pid) => {
      s.destroy();
      resolve(pid);
    };
    s.setTimeout(500, () => done(null));
    s.once('error', () => done(null));
    s.once('close', () => done(null));
    s.once('connect', () => s.write('INFO server\r\n'));
    s.on('data', (d) => {
      reply += d.toString();
      const found = /process_id:(\d+)\r\n/.exec(reply);
      if (found) done(Number(found[1]));
    });
  });
}

/**
 * A throwaway redis-server without persistence on a free loopback port. Suites run side by
 * side, and a port found free can be taken by another suite's server before ours binds it
 * (ours then exits, and a plain PING would reach theirs): the server counts as started only
 * when the one answering is ours, and otherwise another port is tried. `stop()` ends it by
 * its PID.
 */
export async function startRedis(logDir) {
  const dir = join(REPO_ROOT, 'target', 'test-output', logDir);
  mkdirSync(dir, { recursive: true });
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = await freePort();
    const log = createWriteStream(join(dir, `redis-${port}.log`));
    const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    child.stdout.pipe(log);
    child.stderr.pipe(log);
    const exited = new Promise((r) => child.once('exit', r));
    const deadline = Date.now() + 20_000;
    let ours = false;
    while (Date.now() < deadline && child.exitCode === null) {
      if ((await servingPid(port)) === child.pid) {
        ours = true;
        break;
      }
      await sleep(20);
    }
    if (!ours) {
      child.kill('SIGKILL');
      await exited;
      continue;
    }
    return {
      url: `redis://127.0.0.1:${port}`,
      async stop() {
        if (child.exitCode === null && child.signalCode === null) process.kill(child.pid, 'SIGTERM');
        await exited;
      },
    };
  }
  throw new Error('redis-server did not start (see its logs)');
}
