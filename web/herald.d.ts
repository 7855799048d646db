// Types of herald.js, the browser client of Herald (protocol v1, with the v1.1 additions).
// Served by every node at /herald.d.ts; the guide is docs/client-browser.md.

/** A position in a channel's stream: the last offset seen, in an epoch. */
export interface Position {
  /** Offsets count 1, 2, 3 … per channel; 0 means "before the first message". */
  offset: number;
  /** Names the channel's current history; offsets of another epoch mean nothing. */
  epoch: string;
}

/** The answer to a subscribe (also each entry of welcome's `subscriptions`). */
export interface SubscribeResult extends Position {
  /** True: every message after the asked position follows, in order, exactly once. */
  recovered: boolean;
}

/** A message on a subscribed channel. */
export interface HeraldMessage<T = unknown> extends Position {
  channel: string;
  /**
   * Who published it: the publisher's user id, set by the server, for a message sent
   * from a client socket; what the backend gave for a server API publish. Absent: the
   * application's server sent it. No client can set or forge it.
   */
  from?: string;
  /** Whatever JSON the publisher sent. */
  data: T;
}

/**
 * An ephemeral message (v1.1; typing indicators, "is viewing" markers): no offset, never
 * stored or recovered, delivered only while the channel is live. It does not move the
 * channel's position.
 */
export interface HeraldEphemeral<T = unknown> {
  channel: string;
  /** Who published it, as in {@link HeraldMessage.from}. */
  from?: string;
  /** Whatever JSON the publisher sent. */
  data: T;
}

/**
 * Continuity on a channel was lost and could not be repaired: reload the channel's
 * state from the application, then continue; messages go on from `offset + 1` in `epoch`.
 * `reason` is "resync" for the node's resync frame, "not_recovered" when a resume came
 * back with `recovered: false`.
 */
export interface ResyncEvent extends Position {
  channel: string;
  reason: "resync" | "not_recovered";
}

/** The node's welcome frame. */
export interface Welcome {
  type: "welcome";
  session: string;
  /** The id of the node this connection is on. */
  node: string;
  /** The user id from the token's `sub`. */
  user: string;
  heartbeat_ms: number;
  subscriptions: Record<string, SubscribeResult>;
  errors?: Record<string, { code: string; message: string }>;
}

export type HeraldState = "connecting" | "connected" | "disconnected" | "closed";

/** Error codes of refused commands (the protocol's) and of the client itself. */
export type HeraldErrorCode =
  | "bad_request"
  | "forbidden"
  | "not_found"
  | "rate_limited"
  | "unavailable"
  | "internal"
  | "disconnected"
  | "timeout"
  | "closed"
  | "token"
  | "connect"
  | "protocol"
  | "unsubscribed"
  | `close_${number}`;

/** An error with the protocol's (or the client's) error code. */
export class HeraldError extends Error {
  constructor(
    code: string,
    message: string,
    extra?: { closeCode?: number; fatal?: boolean; channel?: string },
  );
  readonly name: "HeraldError";
  code: HeraldErrorCode | string;
  /** The WebSocket close code, for errors that come from a close. */
  closeCode?: number;
  /** True when the client stopped because of this error (state "closed"). */
  fatal: boolean;
  /** The channel concerned, for subscription errors. */
  channel?: string;
}

export interface HeraldOptions {
  /**
   * WebSocket URL(s) of nodes or of a balancer: `ws://host:port/ws`. An `http(s)://`
   * URL or a relative path works too. With several, the client moves on to the next
   * after a failure or a drain. Also the fallback when `/v1/connect` cannot answer.
   */
  url?: string | string[];
  /**
   * `/v1/connect` endpoint(s) (`http://host:port/v1/connect`, or a relative path on the
   * page's origin). Before each connection the client asks them, in turn, for the
   * least-loaded node and connects to the URL it answers. Cross-origin endpoints need
   * CORS, which Herald does not send: use the page's own origin or a proxy.
   */
  connectUrl?: string | string[];
  /** Base URL(s) of nodes: the same as `connectUrl: base + "/v1/connect"`. */
  api?: string | string[];
  /** A client token (JWT). Without `getToken`, a 4401 close stops the client. */
  token?: string;
  /**
   * Returns a fresh token; called before the first connection, after each 4401, and when
   * the node says the session's token is `expiring` (the client then sends `refresh` in
   * the open session, retrying shortly until the token's expiry). It should return a
   * new token each time: returning the expiring one again counts as a failed refresh.
   */
  getToken?: () => string | Promise<string>;
  /** Positions to continue from (e.g. saved from {@link HeraldClient.positions}). */
  resume?: Record<string, Position>;
  /** Smallest backoff cap in ms (default 250): the first retry waits random(0, 250). */
  backoffMinMs?: number;
  /** Largest backoff cap in ms (default 15000). */
  backoffMaxMs?: number;
  /** Time from opening a socket to `welcome` before giving up on it (default 10000). */
  connectTimeoutMs?: number;
  /** How long publish, presence and unsubscribe wait for their reply (default 10000). */
  requestTimeoutMs?: number;
  /**
   * Acknowledge the messages of the personal channel `user:<sub>` automatically once
   * they are handed to the application (default true). Acks are coalesced: at most one
   * `ack` frame per 100 ms, with the latest offset. Set false to ack yourself with
   * {@link HeraldClient.ack} when the user has really seen them: the backend is told
   * about messages no device acked in time (`message.unacked`, for a mobile push).
   */
  autoAck?: boolean;
  /** A WebSocket implementation (default: the global one). */
  WebSocket?: typeof WebSocket;
  /** A fetch implementation for `/v1/connect` (default: the global one). */
  fetch?: typeof fetch;
}

export interface HeraldEvents {
  /** A message, at most once per offset and in order per channel. */
  message: HeraldMessage;
  /** An ephemeral message (see {@link HeraldEphemeral}), apart from `message`. */
  ephemeral: HeraldEphemeral;
  /** Loss that could not be repaired on a channel (see {@link ResyncEvent}). */
  resync: ResyncEvent;
  state: HeraldState;
  /** Each welcome: a (re)connection is up. */
  welcome: Welcome;
  /**
   * A subscription confirmed: at subscribe, again at every resume, and when the server
   * added a channel to the session (`byServer: true`; messages after `offset` follow).
   */
  subscribed: SubscribeResult & { channel: string; byServer?: boolean };
  /**
   * The server removed a channel from the session: `reason` "server" (server API) or
   * "permissions" (a refreshed token no longer allows it). The client no longer follows it.
   */
  unsubscribed: { channel: string; reason: string };
  /** The token was refreshed in the open session (after an `expiring` frame). */
  refreshed: Record<string, never>;
  /**
   * The backend removed the user (close 4410): the client stopped for good (state
   * "closed") and does not reconnect. Create a new client when the user may come back.
   */
  kicked: { code: 4410; reason: string };
  /** The connection dropped; the client retries unless `code` stops it. */
  disconnect: { code: number | null; reason: string };
  /**
   * Something went wrong. `fatal` errors stop the client (state "closed": 4400, 4403,
   * 1009, or 4401 without getToken); others report a channel that could not be resumed,
   * a failing getToken, a token refresh that failed (code "token"; the client reconnects
   * with a new token when the node closes 4401 at expiry) or an unreachable
   * `/v1/connect`, while the client keeps trying. A kick (4410) is reported as "kicked",
   * not here.
   */
  error: HeraldError;
}

/** A connection to Herald that survives node restarts. */
export class HeraldClient {
  constructor(options: HeraldOptions);
  /** "connecting" | "connected" | "disconnected" | "closed". */
  readonly state: HeraldState;
  /** The id of the node this client is on (welcome's `node`), or null. */
  readonly node: string | null;
  /** The current session id, or null. */
  readonly session: string | null;
  /** The user id the node authenticated, or null before the first welcome. */
  readonly user: string | null;
  /** The WebSocket URL of the current or last connection. */
  readonly url: string | null;
  /** The current welcome frame, or null. */
  readonly welcome: Welcome | null;

  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof HeraldEvents>(event: K, fn: (value: HeraldEvents[K]) => void): () => void;
  /** Removes a listener. */
  off<K extends keyof HeraldEvents>(event: K, fn: (value: HeraldEvents[K]) => void): void;

  /**
   * Starts the client; resolves with the welcome frame once connected (retrying in the
   * background meanwhile), rejects if the client is closed first.
   */
  connect(): Promise<Welcome>;
  /**
   * Subscribes; the subscription is resumed from the last offset seen after every
   * reconnect. Rejects with the node's error (`forbidden`, `bad_request` …).
   */
  subscribe(channel: string, options?: { since?: Position }): Promise<SubscribeResult>;
  /** Leaves a channel (not the personal one). */
  unsubscribe(channel: string): Promise<Record<string, never>>;
  /**
   * Publishes any JSON value. Rejects with "disconnected" if the connection dropped
   * before the reply: the message may or may not have been published.
   */
  publish(channel: string, data: unknown): Promise<Position>;
  /**
   * Publishes an ephemeral message (v1.1): no offset, not stored, only to the sessions
   * subscribed now (they get an `ephemeral` event). Resolves with `{ephemeral: true}`.
   * Not queued while disconnected: rejects at once with "disconnected". Over the node's
   * rate (HERALD_MAX_EPHEMERAL_PER_SEC): "rate_limited".
   */
  publish(channel: string, data: unknown, options: { ephemeral: true }): Promise<{ ephemeral: true }>;
  publish(channel: string, data: unknown, options?: { ephemeral?: boolean }): Promise<Position | { ephemeral: true }>;
  /**
   * Acknowledges the personal channel up to `offset` (cumulative, for every device of
   * the user). Rejects with `bad_request` beyond what this connection delivered.
   */
  ack(offset: number): Promise<Position>;
  /** Users in the channel on every node, with their connection counts. */
  presence(channel: string): Promise<Record<string, number>>;
  /** The last position handed to the application on a channel. */
  position(channel: string): Position | null;
  /** Every channel's last position: save it to resume after a page reload. */
  positions(): Record<string, Position>;
  /** The channels subscribed (or to subscribe once connected). */
  channels(): string[];
  /** Closes for good. */
  close(): void;
}
