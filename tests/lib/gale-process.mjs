// Start and stop a `gale echo` or `gale serve` process for the Node and browser client suites.
//
// The binary comes from $GALE_BIN (default: target/debug/gale under the repo root). It
// listens on --port 0, so the real address is read from the one line it prints on stdout.
// It is stopped by its own PID only: other engineers' servers on this machine are never
// touched, and a server that ignores SIGTERM is SIGKILLed so it cannot outlive the suite.

import { execFileSync, spawn } from 'node:child_process';
import { createWriteStream, mkdirSync } from 'node:fs';
import { once } from 'node:events';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');

/**
 * Where a suite's logs and screenshots go: target/test-output/SUITE/LANE. The lane keeps runs
 * side by side apart (the test command runs both backends at once): GALE_TEST_LANE if set,
 * else the backend.
 */
export function outputDir(suite) {
  const lane = process.env.GALE_TEST_LANE || process.env.GALE_BACKEND || 'auto';
  return join(REPO_ROOT, 'target', 'test-output', suite, lane);
}

// Generous: the machine is shared with concurrent builds, and a debug binary starts slowly.
const START_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 30_000;
const READY_LINE = /^gale (?:echo|serve) listening on (wss?:\/\/([^\s/]+):(\d+))\S* \(/;

export function galeBin() {
  const bin = process.env.GALE_BIN || 'target/debug/gale';
  return isAbsolute(bin) ? bin : join(REPO_ROOT, bin);
}

/** Wait for `emitter` to emit `event`, or reject after `ms`. */
export async function onceWithin(emitter, event, ms, what = event) {
  const signal = AbortSignal.timeout(ms);
  try {
    return await once(emitter, event, { signal });
  } catch (err) {
    if (signal.aborted) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    throw err;
  }
}

/**
 * Start `gale echo --port 0 --threads 2 ...extraArgs`. Resolves to
 * { url, httpUrl, pid, terminate(), exited, stop() } once the address line is printed.
 * `logDir` receives the server's stderr (tracing logs), for investigating failures.
 */
export async function startGale(name, logDir, extraArgs = [], { command = ['echo', '--port', '0'], env = {} } = {}) {
  const dir = outputDir(logDir);
  mkdirSync(dir, { recursive: true });
  const log = createWriteStream(join(dir, `gale-${name}.log`));
  // GALE_BACKEND (epoll, uring or auto) picks the backend; the test command runs each suite
  // once per backend.
  const backend = process.env.GALE_BACKEND ? ['--backend', process.env.GALE_BACKEND] : [];
  const child = spawn(galeBin(), [...command, '--threads', '2', ...backend, ...extraArgs], {
    cwd: REPO_ROOT,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  child.stderr.pipe(log);
  const exited = new Promise((res) => child.once('exit', (code, signal) => res({ code, signal })));

  const lines = createInterface({ input: child.stdout });
  let line;
  try {
    [line] = await Promise.race([
      onceWithin(lines, 'line', START_TIMEOUT_MS, 'the gale address line'),
      once(child, 'error').then(([err]) => Promise.reject(err)),
      exited.then(({ code }) => Promise.reject(new Error(`gale exited early with ${code}`))),
    ]);
  } catch (err) {
    child.kill('SIGKILL');
    throw err;
  }
  const match = READY_LINE.exec(line);
  if (!match) {
    child.kill('SIGKILL');
    throw new Error(`unexpected first line from gale: ${JSON.stringify(line)}`);
  }
  const [, url, host, port] = match;

  const terminate = () => {
    // Signal the process we spawned, by its PID, and only while it still runs.
    if (child.exitCode === null && child.signalCode === null) process.kill(child.pid, 'SIGTERM');
  };
  const stop = async () => {
    terminate();
    const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
    const result = await exited;
    clearTimeout(timer);
    lines.close();
    return result;
  };
  const scheme = url.startsWith('wss://') ? 'https' : 'http';
  return { url, httpUrl: `${scheme}://${host}:${port}`, pid: child.pid, terminate, exited, stop };
}

/** Start `gale serve` (the gateway) on a free loopback port; same result as {@link startGale}. */
export function startGaleServe(name, logDir, extraArgs = [], env = {}) {
  return startGale(name, logDir, extraArgs, { command: ['serve', '--listen', '127.0.0.1:0'], env });
}

/**
 * Start `gale serve` again on `listen` (`127.0.0.1:PORT`), after the process that held it was
 * killed: the port may take a moment to be free again (io_uring tears its ring down, listening
 * socket included, asynchronously after the process dies), so try for up to 3 s.
 */
export async function restartGaleServe(name, logDir, listen, extraArgs = []) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await startGale(name, logDir, extraArgs, { command: ['serve', '--listen', listen] });
    } catch (err) {
      if (attempt === 30) throw err;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
}

/** A throwaway self-signed certificate for localhost and 127.0.0.1 in `dir` (openssl). */
export function makeCertificate(dir) {
  mkdirSync(dir, { recursive: true });
  const cert = join(dir, 'cert.pem');
  const key = join(dir, 'key.pem');
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1',
    '-addext', 'basicConstraints=critical,CA:FALSE',
  ], { stdio: 'ignore' });
  return { cert, key };
}
