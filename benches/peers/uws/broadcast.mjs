// uws broadcast: the plain fan-out protocol of `gale-loadgen fanout --protocol plain` on
// uWebSockets.js (npm `uwebsockets` 3.0.6, see echo.mjs): connections to /sub subscribe to one
// topic, and every message a connection to /pub sends is published to it with uWS's own
// pub/sub (`app.publish`), which frames a message once for all subscribers. One thread (Node's
// event loop); `--threads` is accepted and ignored. Compression off; `maxBackpressure` 1 MiB
// (a subscriber further behind misses messages, as in Gale's default).

import { portArg } from './args.mjs';
import uWS from 'uwebsockets';

const port = portArg('uws-broadcast');

const TOPIC = 'all';
const app = uWS.App();
const common = { compression: uWS.DISABLED, maxPayloadLength: 16 * 1024 * 1024, idleTimeout: 120 };
app
  .ws('/sub', { ...common, maxBackpressure: 1024 * 1024, open: (ws) => ws.subscribe(TOPIC) })
  .ws('/pub', {
    ...common,
    message: (ws, message, isBinary) => {
      app.publish(TOPIC, message, isBinary);
    },
  })
  .listen('127.0.0.1', port, (listenSocket) => {
    if (!listenSocket) {
      console.error(`uws-broadcast: cannot listen on 127.0.0.1:${port}`);
      process.exit(1);
    }
    process.stdout.write(`uws-broadcast listening on ws://127.0.0.1:${uWS.us_socket_local_port(listenSocket)}\n`);
  });
