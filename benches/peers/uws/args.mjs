// The command line every uWebSockets.js peer takes: `--port P` (0 picks a free port) and
// `--threads N` (accepted so every peer takes the same command line; uWS.js runs on Node's one
// event-loop thread and ignores it).

import { parseArgs } from 'node:util';

/** The port asked for; exits with a message naming `name` when it is not a port number. */
export function portArg(name) {
  const { values } = parseArgs({
    options: {
      port: { type: 'string', default: '0' },
      threads: { type: 'string' },
    },
  });
  const port = Number(values.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    console.error(`${name}: bad --port ${values.port}`);
    process.exit(2);
  }
  return port;
}
