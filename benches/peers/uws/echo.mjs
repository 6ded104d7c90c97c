// uws: an echo server on uWebSockets (uWS C++ through its Node.js binding, uWebSockets.js), the
// server Gale measures itself against.
//
// uWebSockets.js comes from the npm package `uwebsockets` 3.0.6, pinned in package-lock.json,
// which republishes the prebuilt binaries of the official uWebSockets.js builds (`npm ci` here,
// then `node echo.mjs --port P`). Node 20 loads its `uws_linux_x64_115.node`, an older v20 build
// that needs only glibc 2.27 (see ../README.md).
//
// uWebSockets.js runs on the one thread of Node's event loop: `--threads` is accepted so every
// peer takes the same command line, and ignored. Compression is off, messages up to 16 MiB are
// accepted, and `maxBackpressure: 0` never drops an echo when the client reads slower than it
// writes (the default, 64 KiB, drops sends). Pings are answered by uWS itself.

import { portArg } from './args.mjs';
import uWS from 'uwebsockets';

const port = portArg('uws');

uWS.App()
  .ws('/*', {
    compression: uWS.DISABLED,
    maxPayloadLength: 16 * 1024 * 1024,
    maxBackpressure: 0,
    idleTimeout: 120,
    message: (ws, message, isBinary) => {
      ws.send(message, isBinary);
    },
  })
  .listen('127.0.0.1', port, (listenSocket) => {
    if (!listenSocket) {
      console.error(`uws: cannot listen on 127.0.0.1:${port}`);
      process.exit(1);
    }
    process.stdout.write(`uws listening on ws://127.0.0.1:${uWS.us_socket_local_port(listenSocket)}\n`);
  });
