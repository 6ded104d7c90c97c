// Type declarations for gale-client (gale-client.js).

/**
 * A position in a topic's numbering: what a subscription resumes from. `epoch` is null (with
 * `seq` 0) when the topic had no state at the history read it comes from.
 */
export interface Position {
  epoch: string | null;
  seq: number;
}

/** The close code the gateway uses when a connection's token expires (4001). */
export const TOKEN_EXPIRED: 4001;

/** Whether a close code means that connecting again would fail the same way. */
export function isFatalCloseCode(code: number): boolean;

/**
 * An error from the gateway (`code`: its numeric error code, the HTTP status that refused the
 * upgrade, or a close code) or from the client (`code`: one of the strings below).
 */
export class GaleError extends Error {
  readonly name: 'GaleError';
  readonly code: number | 'TIMEOUT' | 'DISCONNECTED' | 'CLOSED' | 'QUEUE_FULL' | 'UNSUBSCRIBED' | 'TOKEN' | 'PROTOCOL';
  readonly reason: string;
  constructor(code: GaleError['code'], reason: string);
}

/** A WebSocket constructor: the browser's, Node's global one, or the `ws` package. */
export type WebSocketConstructor = new (url: string) => any;

export interface GaleClientOptions {
  /** A connection token (JWT), sent as `?token=`. */
  token?: string;
  /** Called for the first connection and after the gateway closes with 4001. */
  getToken?: () => string | Promise<string>;
  /** The WebSocket to use (default: `globalThis.WebSocket`). */
  WebSocket?: WebSocketConstructor;
  /** Milliseconds a command may wait for its reply, queueing included (10000). */
  timeout?: number;
  /** Milliseconds an attempt may take to open (10000). */
  connectTimeout?: number;
  /** Smallest delay before reconnecting, in ms (500). */
  minReconnectDelay?: number;
  /** Largest delay before reconnecting, in ms (15000). */
  maxReconnectDelay?: number;
  /** Send a ping after this many ms without receiving anything (20000). */
  pingInterval?: number;
  /** Replace the connection after this many ms without receiving anything (45000). */
  idleTimeout?: number;
  /** Commands (publish, ping) that may wait for a connection or a reply at once (1000). */
  maxQueued?: number;
  /** In browsers, reconnect at once on `online` and when the page becomes visible (true). */
  browserEvents?: boolean;
  /**
   * A subscription the server made (`POST /api/subscribe`): return handlers to receive its
   * messages (the client then keeps the subscription across reconnects), or nothing to ignore it.
   */
  onServerSubscribe?: (notice: GaleEvent) => Omit<SubscribeOptions, 'since' | 'history'> | undefined;
}

/** The defaults of every option. */
export const DEFAULTS: Readonly<Required<Omit<GaleClientOptions, 'token' | 'getToken' | 'WebSocket' | 'onServerSubscribe'>>> &
  Readonly<Pick<GaleClientOptions, 'token' | 'getToken' | 'WebSocket' | 'onServerSubscribe'>>;

/** A message as the gateway delivers it. */
export interface Delivery {
  topic: string;
  epoch: string;
  seq: number;
  /** The payload, when it is JSON (or a string). */
  data?: unknown;
  /** The payload in base64, for bytes published over HTTP. */
  binary?: string;
}

/** The gateway's answer to a history read (`client.history`, the `history` option). */
export interface HistoryReply {
  topic: string;
  /** The topic's epoch when it was read; null when the topic has no state. */
  epoch: string | null;
  /** The topic's last seq when it was read (0 without state). */
  seq: number;
  /** The oldest message retained, or null. */
  first_seq: number | null;
  /** Messages after `sinceSeq` are no longer retained: the answer does not start right after it. */
  truncated: boolean;
  /** Retained messages follow the last one returned: read on with `sinceSeq` = its seq. */
  more: boolean;
  /** Oldest first, without a gap: each exactly the delivery subscribers received. */
  messages: Delivery[];
}

/** Where a message handed to `onMessage` comes from. */
export interface MessageInfo {
  /** True for the messages of a history read (the `history` option), false otherwise. */
  history: boolean;
}

/** What a subscribe reply said, and, after a `since`, whether recovery worked. */
export interface SubscribeInfo {
  topic: string;
  epoch: string;
  seq: number;
  /** Present when the subscribe asked for recovery (or continuity broke while subscribed). */
  recovered?: boolean;
  /** How many missed messages follow, when recovered. */
  missed?: number;
  /** Why recovery was impossible: the application should reload its state. */
  reason?: string;
  /**
   * Recovery was impossible and the subscription (with the `history` option) reads the
   * history again: `onHistory` with `reload: true` and its messages follow.
   */
  reloading?: boolean;
}

export interface SubscribeOptions {
  /** Resume from this position (kept from an earlier `subscription.position`, or a history read). */
  since?: Position;
  /**
   * Read this many of the topic's most recent messages first (at most the gateway's
   * `history.max_limit`, 1000), then subscribe from the last of them; read them again when
   * recovery is impossible. Ignored when `since` is given.
   */
  history?: number;
  /** Each message, once, in order: `data` (or a Uint8Array for bytes), the delivery, and whether it came from a history read. */
  onMessage?: (data: any, delivery: Delivery, info: MessageInfo) => void;
  /** A history read answered (the `history` option); its messages then go to `onMessage`. `reload`: a read after a failed recovery. */
  onHistory?: (reply: HistoryReply, info: { reload: boolean }) => void;
  /** After every subscribe with a position, and when continuity breaks while subscribed. */
  onRecovered?: (info: SubscribeInfo) => void;
  /** A subscribe the gateway refused (final unless the code is 429, 500 or 503). */
  onError?: (error: GaleError) => void;
  /** An event of the topic (`join`, `leave` in namespaces with join/leave events): not numbered, not in the history. */
  onEvent?: (event: GaleEvent) => void;
}

/** An event the gateway sends outside a topic's numbering (`join`, `leave`). */
export interface GaleEvent {
  op: string;
  topic?: string;
  client?: string;
  user?: string;
  info?: Record<string, unknown>;
  [field: string]: unknown;
}

export class Subscription {
  readonly topic: string;
  /** The `history` option (0 without it). */
  readonly history: number;
  /** The epoch of the last message delivered (or of the position subscribed from). */
  readonly epoch: string | null;
  /** The seq of the last message delivered (or of the position subscribed from). */
  readonly seq: number;
  readonly state: 'subscribing' | 'subscribed' | 'unsubscribed' | 'failed';
  /** Settles with the first subscribe reply, or the error that ended the subscription. */
  readonly ready: Promise<SubscribeInfo>;
  /** `{ epoch, seq }` of the last message delivered, or null before the first reply (or history read). */
  readonly position: Position | null;
  /** Stop receiving; resolves once the gateway confirmed (at once when not connected). */
  unsubscribe(): Promise<void>;
}

export interface ConnectingEvent {
  url: string;
  attempt: number;
}
export interface ConnectedEvent {
  url: string;
}
export interface DisconnectedEvent {
  /** The close code (1006 for a connection that failed, was cut, or went quiet). */
  code: number;
  reason: string;
  url: string;
  /** The HTTP status that refused the upgrade, when the WebSocket tells it (ws does). */
  status?: number;
  willReconnect: boolean;
  /** Milliseconds until the next attempt. */
  delay?: number;
}
export interface GaleClientEvents {
  connecting: ConnectingEvent;
  connected: ConnectedEvent;
  disconnected: DisconnectedEvent;
  error: Error;
  /** Every event the gateway sends (join, leave), whether or not a subscription takes it. */
  event: GaleEvent;
}

export class GaleClient {
  constructor(urls: string | string[], options?: GaleClientOptions);
  readonly state: 'idle' | 'connecting' | 'connected' | 'waiting' | 'closed';
  /** The URL in use, or tried next. */
  readonly url: string;
  /**
   * The current WebSocket (open or opening), or null: for reading `readyState`,
   * `bufferedAmount`, `protocol`, `extensions`, `url`. Do not send on it or close it.
   */
  readonly socket: any | null;
  on<E extends keyof GaleClientEvents>(event: E, listener: (arg: GaleClientEvents[E]) => void): this;
  off<E extends keyof GaleClientEvents>(event: E, listener: (arg: GaleClientEvents[E]) => void): this;
  subscribe(topic: string, options?: SubscribeOptions): Subscription;
  publish(topic: string, data: unknown): Promise<{ topic: string; epoch: string; seq: number }>;
  /** Read the retained messages after `sinceSeq` (0), at most `limit` (the gateway's default, 100). */
  history(topic: string, options?: { sinceSeq?: number; limit?: number }): Promise<HistoryReply>;
  /** A round trip; resolves to its time in ms. */
  ping(): Promise<number>;
  /** Drop the current connection (if any) and connect again now, recovering. */
  reconnect(): void;
  /** Close for good: waiting commands are rejected with CLOSED, subscriptions end. */
  close(): Promise<void>;
  /** Report an error to the `error` listeners. */
  emitError(error: unknown): void;
}
