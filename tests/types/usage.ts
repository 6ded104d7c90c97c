// Uses gale-client's public API as an application would, so that `tsc` checks the type
// declarations (clients/js/gale-client.d.ts) against it. The `@ts-expect-error` lines must
// fail to type-check: they prove the declarations are precise, not `any`.

import { GaleClient, GaleError, isFatalCloseCode, TOKEN_EXPIRED, type Delivery, type Position } from '../../clients/js/gale-client.js';

const client = new GaleClient(['ws://127.0.0.1:9001/ws', 'ws://127.0.0.1:9002/ws'], {
  getToken: async () => 'token',
  minReconnectDelay: 100,
  onServerSubscribe: (notice) => (notice.topic === 'user:#1' ? { onMessage: () => {} } : undefined),
});

client.on('disconnected', (e) => {
  const code: number = e.code;
  const again: boolean = e.willReconnect;
  console.log(code, again, isFatalCloseCode(code), code === TOKEN_EXPIRED);
});
client.on('event', (e) => console.log(e.op, e.user));

const sub = client.subscribe('chat:lobby', {
  history: 50,
  onMessage: (data: unknown, delivery: Delivery, info) => console.log(data, delivery.seq, info.history),
  onRecovered: (info) => info.recovered === false && console.log(info.reason),
  onEvent: (event) => console.log(event.op),
  onError: (err: GaleError) => console.log(err.code, err.reason),
});
const where: Position | null = sub.position;
console.log(where, sub.state);

async function main(): Promise<void> {
  const { epoch, seq } = await client.publish('chat:lobby', { text: 'hi' });
  const page = await client.history('chat:lobby', { sinceSeq: seq - 10, limit: 10 });
  const first: number = page.messages[0].seq;
  const rtt: number = await client.ping();
  console.log(epoch, first, rtt, client.socket?.bufferedAmount);
  await sub.unsubscribe();
  await client.close();
}
void main();

// @ts-expect-error: a topic is a string
client.subscribe(42);
// @ts-expect-error: no such option
new GaleClient('ws://127.0.0.1:9001/ws', { reconnectDelay: 5 });
// @ts-expect-error: no such event
client.on('message', () => {});
// @ts-expect-error: publish answers a position, not a string
const wrong: string = await client.publish('chat:lobby', 1);
console.log(wrong);
