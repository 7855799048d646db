// herald.js — the browser client of Herald (protocol v1). A dependency-free ES module,
// served by every node at /herald.js; types in /herald.d.ts; guide in
// docs/client-browser.md.
//
// What it does for the application:
// - connects to a URL (or asks `/v1/connect` for a node) and fails over between nodes;
// - sends `hello` with `resume` so every channel, the personal `user:<sub>` included,
//   continues from the last offset the application saw, on whichever node;
// - delivers each channel's messages once and in order: it drops any offset at or below
//   the last one seen in the same epoch (a duplicate after a resume is never handed on);
// - reports loss it cannot repair (`resync` frames, and `recovered: false` after a
//   resume) as a "resync" event, so the application reloads that channel's state;
// - reconnects with exponential backoff and full jitter, obeying the close codes;
// - answers `ping` with `pong` and reconnects when the node falls silent for
//   2 × heartbeat_ms (a half-open TCP connection never reports itself);
// - (v1.1) refreshes the token in the open session when the node says `expiring`,
//   follows channels the server adds or removes (`subscribed` / `unsubscribed`), and
//   stops for good on 4410 (kicked);
// - (v1.1) hands ephemeral messages (`"ephemeral":true`: typing indicators, no offset,
//   never stored) to the application as an "ephemeral" event, outside the offset
//   tracking, and publishes them with `publish(channel, data, {ephemeral: true})`;
// - (v1.1) acknowledges the messages of the personal channel once they are handed to
//   the application (`ack`, coalesced over ACK_DELAY_MS; `autoAck: false` and `ack()`
//   for manual acks), so the backend learns which notifications no device saw;
// - skips any frame it does not understand or that has the wrong shape, so nothing a
//   node sends can break or wedge it.

/** Close codes after which reconnecting cannot help: stop and report. */
const FATAL_CLOSE = new Set([1009, 4400, 4403]);
const CLOSE_UNAUTHORIZED = 4401;
/** The backend removed the user: stop, and never reconnect on our own. */
const CLOSE_KICKED = 4410;
const CLOSE_DRAINING = 4503;
const CLOSE_TOO_MANY = 4429;
/** Durations taken from frames are capped (setTimeout misbehaves above 2^31 - 1 ms). */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** heartbeat_ms above this (12 h) is taken as this. */
const MAX_HEARTBEAT_MS = 12 * 3600 * 1000;
/** Token refresh retries: the first waits ~250 ms, doubling up to 5 s, until the deadline. */
const REFRESH_RETRY_MIN_MS = 250;
const REFRESH_RETRY_MAX_MS = 5_000;
/** A channel name as the protocol allows it (what a node would accept in `resume`). */
const CHANNEL_RE = /^[A-Za-z0-9_.:@=-]{1,256}$/;
/** How long a URL that failed (or is draining) is avoided when there is a choice. */
const AVOID_MS = 10_000;
/**
 * A connection that lasted this long resets the backoff. A shorter one does not, so a
 * node that welcomes and then closes at once (4429, say) is not hammered.
 */
const STABLE_MS = 5_000;
/** Auto-acks are coalesced over this long: a burst of personal messages is one frame. */
const ACK_DELAY_MS = 100;

/**
 * An error of the client. `code` is the protocol's error code for a refused command
 * (`bad_request`, `forbidden`, `not_found`, `rate_limited`, `unavailable`, `internal`)
 * or one of the client's own: `disconnected` (the connection dropped before the reply
 * came, so a publish may or may not have happened), `timeout`, `closed` (the client was
 * closed), `close_<code>` (the server closed the connection with a code that stops the
 * client; `close_4410` when kicked), `token` (getToken failed), `connect` (no node found),
 * `protocol` (the node's reply had the wrong shape), `unsubscribed` (the server removed
 * the channel before it was confirmed).
 */
export class HeraldError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {{closeCode?: number, fatal?: boolean, channel?: string}} [extra]
   */
  constructor(code, message, extra = {}) {
    super(message);
    this.name = "HeraldError";
    /** @type {string} */
    this.code = code;
    /** The WebSocket close code, when the error comes from a close. */
    this.closeCode = extra.closeCode;
    /** True when the client stopped because of it (state "closed"). */
    this.fatal = Boolean(extra.fatal);
    /** The channel concerned, for subscription errors. */
    this.channel = extra.channel;
  }
}

/**
 * A connection to Herald that survives node restarts. See herald.d.ts for every option.
 */
export class HeraldClient {
  /** @param {import("./herald.d.ts").HeraldOptions} options */
  constructor(options = {}) {
    const list = (v) => (v == null ? [] : Array.isArray(v) ? v.slice() : [v]);
    const urls = list(options.url).map(toWsUrl);
    const connect = list(options.connectUrl).map(resolveHttp);
    for (const base of list(options.api)) {
      connect.push(resolveHttp(String(base).replace(/\/+$/, "") + "/v1/connect"));
    }
    if (urls.length === 0 && connect.length === 0) {
      throw new TypeError("HeraldClient needs `url`, `connectUrl` or `api`");
    }
    if (options.token == null && typeof options.getToken !== "function") {
      throw new TypeError("HeraldClient needs `token` or `getToken`");
    }
    this._urls = urls;
    this._connectUrls = connect;
    /** WebSocket URLs learned from `/v1/connect`, kept as fallbacks when it cannot answer. */
    this._learned = [];
    this._token = options.token ?? null;
    this._getToken = typeof options.getToken === "function" ? options.getToken : null;
    this._backoffMin = options.backoffMinMs ?? 250;
    this._backoffMax = options.backoffMaxMs ?? 15_000;
    this._connectTimeout = options.connectTimeoutMs ?? 10_000;
    this._requestTimeout = options.requestTimeoutMs ?? 10_000;
    this._autoAck = options.autoAck !== false;
    /** The auto-ack to send ({offset, epoch}) and its timer. */
    this._ackPending = null;
    this._ackTimer = null;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    this._fetch = options.fetch ?? globalThis.fetch?.bind(globalThis);

    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
    /**
     * The channels the application wants, with the last position it was handed.
     * @type {Map<string, {offset: number|null, epoch: string|null, confirmed: boolean,
     *   waiters: Array<{resolve: Function, reject: Function}>}>}
     */
    this._subs = new Map();
    for (const [channel, pos] of Object.entries(options.resume ?? {})) {
      this._subs.set(channel, newSub(pos));
    }

    this._state = "disconnected";
    this._user = null;
    this._heartbeatMs = 25_000;
    this._welcomeAt = 0;
    this._helloResume = null;
    this._ws = null;
    this._welcome = null;
    this._url = null;
    this._nextId = 1;
    /** Commands sent on the current socket, by id. */
    this._pending = new Map();
    /** Commands waiting for a connection. */
    this._queue = [];
    this._attempt = 0;
    this._avoid = new Map();
    this._urlIndex = 0;
    this._connectIndex = 0;
    this._timer = null;
    this._watchdog = null;
    this._lastFrameAt = 0;
    this._reconnectAfter = null;
    this._started = false;
    this._connectWaiters = [];
    this._generation = 0;
    /** Token refresh of the current socket: {ws, deadline, failures, timer, running}. */
    this._refresh = null;
    this._onOnline = () => {
      if (this._state === "disconnected" && this._started) this._retryNow();
    };
  }

  // ---- public API ----------------------------------------------------------------

  /** "connecting" | "connected" | "disconnected" | "closed" */
  get state() {
    return this._state;
  }
  /** The id of the node this client is connected to (welcome's `node`), or null. */
  get node() {
    return this._welcome?.node ?? null;
  }
  /** The session id of the current connection, or null. */
  get session() {
    return this._welcome?.session ?? null;
  }
  /** The user id the node authenticated (the token's `sub`), or null before the first welcome. */
  get user() {
    return this._user ?? null;
  }
  /** The WebSocket URL of the current or last connection, or null. */
  get url() {
    return this._url;
  }
  /** The welcome frame of the current connection, or null. */
  get welcome() {
    return this._welcome;
  }

  /**
   * The last position handed to the application on `channel`, or null. Store these
   * (e.g. in localStorage) and pass them as `resume` to continue after a page reload.
   */
  position(channel) {
    const s = this._subs.get(channel);
    return s && s.epoch != null ? { offset: s.offset, epoch: s.epoch } : null;
  }

  /** Every channel's last position (see {@link position}). */
  positions() {
    const out = {};
    for (const [channel, s] of this._subs) {
      if (s.epoch != null) out[channel] = { offset: s.offset, epoch: s.epoch };
    }
    return out;
  }

  /** The channels this client is (or will be, once connected) subscribed to. */
  channels() {
    return [...this._subs.keys()];
  }

  /** Adds a listener; returns a function that removes it. */
  on(event, fn) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(fn);
    return () => this.off(event, fn);
  }

  /** Removes a listener. */
  off(event, fn) {
    this._handlers.get(event)?.delete(fn);
  }

  /**
   * Starts the client (once) and resolves with the welcome frame when connected. The
   * client keeps retrying in the background; the promise rejects only when the client
   * is closed first (close(), or a close code that stops it).
   */
  connect() {
    if (this._state === "closed") {
      return Promise.reject(new HeraldError("closed", "the client is closed"));
    }
    if (this._state === "connected") return Promise.resolve(this._welcome);
    const p = new Promise((resolve, reject) => this._connectWaiters.push({ resolve, reject }));
    if (!this._started) {
      this._started = true;
      globalThis.addEventListener?.("online", this._onOnline);
      this._open();
    }
    return p;
  }

  /**
   * Subscribes to `channel` and resolves with `{offset, epoch, recovered}`. With
   * `since`, missed messages after that position are delivered first (when history
   * still has them). The subscription is remembered: after a reconnect it is resumed
   * from the last offset seen. Called while disconnected, it resolves once connected.
   */
  subscribe(channel, options = {}) {
    if (this._state === "closed") {
      return Promise.reject(new HeraldError("closed", "the client is closed"));
    }
    const existing = this._subs.get(channel);
    if (existing) {
      if (existing.confirmed) {
        return Promise.reject(
          new HeraldError("bad_request", `already subscribed to ${channel}`, { channel }),
        );
      }
      return new Promise((resolve, reject) => existing.waiters.push({ resolve, reject }));
    }
    const sub = newSub(options.since ?? null);
    const p = new Promise((resolve, reject) => sub.waiters.push({ resolve, reject }));
    this._subs.set(channel, sub);
    if (this._state === "connected") this._sendSubscribe(channel, sub);
    return p;
  }

  /**
   * Leaves `channel`. Resolves when the node confirms, or at once when disconnected
   * (the next connection simply does not resume it).
   */
  async unsubscribe(channel) {
    if (this._user != null && channel === `user:${this._user}`) {
      throw new HeraldError("forbidden", "the personal channel cannot be left", { channel });
    }
    const sub = this._subs.get(channel);
    if (sub) {
      this._subs.delete(channel);
      settle(sub.waiters, new HeraldError("closed", `unsubscribed from ${channel}`, { channel }));
    }
    if (this._state !== "connected") return {};
    try {
      return await this._request({ type: "unsubscribe", channel });
    } catch (e) {
      // The subscription ends with the connection anyway.
      if (e.code === "disconnected") return {};
      throw e;
    }
  }

  /**
   * Publishes `data` (any JSON value) to `channel`; resolves with `{offset, epoch}`.
   * Waits for a connection if needed (at most requestTimeoutMs). If the connection drops
   * before the reply, rejects with code "disconnected": the message may or may not have
   * been published, so it is not sent twice behind the application's back.
   * With `{ephemeral: true}` (v1.1): no offset, not stored, only to current subscribers
   * (their "ephemeral" event); resolves with `{ephemeral: true}`; rejects at once with
   * "disconnected" when not connected.
   */
  publish(channel, data, options = {}) {
    const frame = { type: "publish", channel, data: data === undefined ? null : data };
    if (options?.ephemeral === true) {
      // Ephemeral (v1.1): resolves with `{ephemeral: true}`. Never queued for a later
      // connection: a typing indicator sent late is worse than none.
      if (this._state !== "connected") {
        return Promise.reject(new HeraldError("disconnected", "not connected; ephemeral messages are not queued"));
      }
      frame.ephemeral = true;
    }
    return this._request(frame);
  }

  /**
   * Acknowledges the messages of the personal channel `user:<sub>` up to `offset`
   * (cumulative; any device of the user acking counts for the user), in the epoch the
   * client is in. Resolves with `{offset, epoch}`; rejects with `bad_request` when the
   * offset is beyond what this connection delivered or the epoch changed. For manual
   * acks (`autoAck: false`): call it when the user has seen the messages, not per
   * message (each call is a frame counted against the rate limit).
   */
  ack(offset) {
    if (this._user == null) {
      return Promise.reject(new HeraldError("disconnected", "not connected yet: no personal channel"));
    }
    const channel = `user:${this._user}`;
    const sub = this._subs.get(channel);
    const frame = { type: "ack", channel, offset };
    if (sub?.epoch) frame.epoch = sub.epoch;
    return this._request(frame);
  }

  /** Who is in `channel`, on every node: resolves with `{user: connections}`. */
  async presence(channel) {
    const result = await this._request({ type: "presence", channel });
    return result.users ?? {};
  }

  /** Closes the client for good: state "closed", pending commands reject with "closed". */
  close() {
    if (this._state === "closed") return;
    this._shutdown(null);
  }

  // ---- connection -----------------------------------------------------------------

  _setState(state) {
    if (this._state === state) return;
    this._state = state;
    this._emit("state", state);
  }

  _emit(event, value) {
    const handlers = this._handlers.get(event);
    if (!handlers) return;
    for (const fn of [...handlers]) {
      try {
        fn(value);
      } catch (e) {
        // An application handler's bug must not break the protocol state machine.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  /** One connection attempt: token, node choice, socket, hello. */
  async _open() {
    const generation = ++this._generation;
    this._setState("connecting");
    let token;
    let url;
    try {
      token = await this._currentToken();
      if (generation !== this._generation) return;
      url = await this._chooseUrl();
      if (generation !== this._generation) return;
    } catch (e) {
      if (generation !== this._generation) return;
      this._emit("error", e instanceof HeraldError ? e : new HeraldError("connect", String(e)));
      this._scheduleRetry();
      return;
    }
    this._url = url;
    let ws;
    try {
      ws = new this._WebSocket(url);
    } catch (e) {
      this._avoid.set(url, Date.now());
      this._emit("error", new HeraldError("connect", `cannot open ${url}: ${e?.message ?? e}`));
      this._scheduleRetry();
      return;
    }
    this._ws = ws;
    const opened = Date.now();
    this._lastFrameAt = opened;
    this._armWatchdog(this._connectTimeout);
    ws.onopen = () => {
      const resume = {};
      for (const [channel, s] of this._subs) {
        if (s.epoch != null) resume[channel] = { offset: s.offset, epoch: s.epoch };
      }
      this._helloResume = resume;
      const hello = { type: "hello", token };
      if (Object.keys(resume).length > 0) hello.resume = resume;
      this._sendRaw(hello);
    };
    ws.onmessage = (ev) => {
      if (this._ws !== ws) return;
      this._lastFrameAt = Date.now();
      if (typeof ev.data !== "string") return; // binary: not a protocol frame
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (frame === null || typeof frame !== "object" || Array.isArray(frame)) return;
      this._frame(frame);
    };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._lost(ev.code, ev.reason);
    };
    ws.onerror = () => {
      // onclose follows with the details; nothing to do here.
    };
  }

  async _currentToken() {
    if (this._token != null) return this._token;
    try {
      const t = await this._getToken();
      if (typeof t !== "string" || t === "") throw new Error("getToken returned no token");
      this._token = t;
      return t;
    } catch (e) {
      throw new HeraldError("token", `getToken failed: ${e?.message ?? e}`);
    }
  }

  /**
   * Which node to try: `/v1/connect` when configured (the least-loaded node), else the
   * next URL of the list, skipping URLs that failed or drained recently when another one
   * is available ("prefer another node").
   */
  async _chooseUrl() {
    const now = Date.now();
    const fresh = (u) => !((this._avoid.get(u) ?? -Infinity) + AVOID_MS > now);
    for (let i = 0; i < this._connectUrls.length; i++) {
      const idx = (this._connectIndex + i) % this._connectUrls.length;
      const endpoint = this._connectUrls[idx];
      try {
        const answer = await this._askConnect(endpoint);
        this._connectIndex = idx;
        if (typeof answer?.url === "string") {
          if (!this._learned.includes(answer.url)) this._learned.push(answer.url);
          if (fresh(answer.url)) return answer.url;
        }
      } catch {
        // Try the next endpoint, then the known URLs.
      }
    }
    const candidates = [...this._urls, ...this._learned.filter((u) => !this._urls.includes(u))];
    if (candidates.length === 0) {
      throw new HeraldError("connect", "no node: /v1/connect did not answer");
    }
    for (let i = 0; i < candidates.length; i++) {
      const idx = (this._urlIndex + i) % candidates.length;
      if (fresh(candidates[idx])) {
        this._urlIndex = idx;
        return candidates[idx];
      }
    }
    // Every URL failed recently: keep rotating through them.
    this._urlIndex = (this._urlIndex + 1) % candidates.length;
    return candidates[this._urlIndex];
  }

  async _askConnect(endpoint) {
    if (!this._fetch) throw new Error("no fetch");
    const ctl = typeof AbortController === "function" ? new AbortController() : null;
    const timer = setTimeout(() => ctl?.abort(), Math.min(this._connectTimeout, 5_000));
    try {
      const r = await this._fetch(endpoint, { signal: ctl?.signal, cache: "no-store" });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      return await r.json();
    } finally {
      clearTimeout(timer);
    }
  }

  _armWatchdog(ms) {
    clearTimeout(this._watchdog);
    this._watchdog = setTimeout(() => this._checkWatchdog(), Math.min(ms, MAX_TIMER_MS));
  }

  /** No frame for too long (hello unanswered, or 2 × heartbeat_ms): the link is dead. */
  _checkWatchdog() {
    if (!this._ws) return;
    const limit = this._welcome ? 2 * this._heartbeatMs : this._connectTimeout;
    const left = this._lastFrameAt + limit - Date.now();
    if (left > 0) {
      this._armWatchdog(left);
      return;
    }
    const ws = this._ws;
    this._lost(null, this._welcome ? "heartbeat timeout" : "no welcome in time");
    try {
      ws.close(4000, "client watchdog");
    } catch {
      // Already closing.
    }
  }

  _frame(frame) {
    switch (frame?.type) {
      case "welcome":
        return this._onWelcome(frame);
      case "message":
        return this._onMessage(frame);
      case "reply":
        return this._onReply(frame);
      case "ping":
        return this._sendRaw({ type: "pong" });
      case "resync":
        return this._onResync(frame);
      case "reconnect":
        // The node drains (4503 next), is cut off from its broker (4503 next), or is
        // busy (4429 next). Its after_ms is when to come back (capped: a bogus huge
        // value must not park the client).
        this._reconnectAfter = clampMs(frame.after_ms, this._backoffMax);
        return;
      case "expiring":
        return this._onExpiring(frame);
      case "subscribed":
        return this._onServerSubscribed(frame);
      case "unsubscribed":
        return this._onServerUnsubscribed(frame);
      default:
        // Frames this version does not know are ignored (forward compatibility).
        return;
    }
  }

  _onWelcome(w) {
    // One welcome per socket; one of the wrong shape is ignored, and the connect
    // watchdog replaces the socket if no proper one comes.
    if (this._welcome != null) return;
    if (
      typeof w.user !== "string" ||
      typeof w.session !== "string" ||
      w.subscriptions === null ||
      typeof w.subscriptions !== "object"
    ) {
      return;
    }
    if (this._user != null && w.user !== this._user) {
      // Another user's token: the old personal channel is not ours any more.
      this._subs.delete(`user:${this._user}`);
    }
    this._user = w.user;
    this._welcome = w;
    this._welcomeAt = Date.now();
    this._reconnectAfter = null;
    this._avoid.delete(this._url);
    const resumed = this._helloResume ?? {};
    const personal = `user:${w.user}`;
    if (!this._subs.has(personal)) this._subs.set(personal, newSub(null));
    const confirmed = new Set();
    for (const [channel, result] of Object.entries(w.subscriptions)) {
      const sub = this._subs.get(channel);
      if (!sub || !isPosition(result)) continue;
      confirmed.add(channel);
      this._applyResult(channel, sub, result, resumed[channel] ?? null);
    }
    const errors = w.errors !== null && typeof w.errors === "object" ? w.errors : {};
    for (const [channel, err] of Object.entries(errors)) {
      const sub = this._subs.get(channel);
      if (!sub) continue;
      this._subs.delete(channel);
      const e = new HeraldError(String(err?.code ?? "internal"), String(err?.message ?? ""), {
        channel,
      });
      if (sub.waiters.length > 0) settle(sub.waiters, e);
      else this._emit("error", e);
    }
    const hb = Number(w.heartbeat_ms);
    this._heartbeatMs = Number.isFinite(hb) && hb > 0 ? Math.min(hb, MAX_HEARTBEAT_MS) : 25_000;
    this._armWatchdog(2 * this._heartbeatMs);
    this._setState("connected");
    this._emit("welcome", w);
    for (const [channel, sub] of this._subs) {
      if (!confirmed.has(channel)) this._sendSubscribe(channel, sub);
    }
    const waiting = this._queue;
    this._queue = [];
    for (const cmd of waiting) this._send(cmd);
    if (this._ackPending && this._ackTimer == null) {
      this._ackTimer = setTimeout(() => this._flushAck(), ACK_DELAY_MS);
    }
    settle(this._connectWaiters, null, w);
  }

  /**
   * Applies a subscribe result. When the node recovered from our position, the missed
   * messages follow, so the position stays where it was; otherwise it moves to the
   * node's, and a resume that was not recovered is reported as a resync.
   */
  _applyResult(channel, sub, result, asked) {
    if (!(result.recovered && asked)) {
      sub.offset = result.offset;
      sub.epoch = result.epoch;
      if (asked && !result.recovered) {
        this._emit("resync", {
          channel,
          offset: result.offset,
          epoch: result.epoch,
          reason: "not_recovered",
        });
      }
    }
    sub.confirmed = true;
    const waiters = sub.waiters;
    sub.waiters = [];
    for (const w of waiters) w.resolve({ ...result });
    this._emit("subscribed", { channel, ...result });
  }

  _sendSubscribe(channel, sub) {
    const since = sub.epoch != null ? { offset: sub.offset, epoch: sub.epoch } : null;
    const frame = { type: "subscribe", channel };
    if (since) frame.since = since;
    this._send({
      frame,
      resolve: (result) => {
        if (this._subs.get(channel) !== sub) return;
        if (isPosition(result)) {
          this._applyResult(channel, sub, result, since);
          return;
        }
        // A reply of the wrong shape: forget the channel rather than guess a position.
        this._subs.delete(channel);
        const e = new HeraldError("protocol", "malformed subscribe reply", { channel });
        if (sub.waiters.length > 0) settle(sub.waiters, e);
        else this._emit("error", e);
      },
      reject: (e) => {
        if (e.code === "disconnected") return; // resubscribed on the next connection
        if (this._subs.get(channel) === sub) this._subs.delete(channel);
        e.channel = channel;
        if (sub.waiters.length > 0) settle(sub.waiters, e);
        else this._emit("error", e);
      },
      durable: true,
    });
  }

  _onMessage(m) {
    if (m.ephemeral === true) return this._onEphemeral(m);
    if (!isPosition(m)) return; // wrong shape (or an offset beyond 2^53): skipped
    const sub = this._subs.get(m.channel);
    if (!sub) return; // left meanwhile
    if (sub.offset != null && sameStream(sub.offset, sub.epoch, m.epoch) && m.offset <= sub.offset) {
      return;
    }
    sub.offset = m.offset;
    sub.epoch = m.epoch;
    const message = { channel: m.channel, offset: m.offset, epoch: m.epoch, data: m.data };
    // The publisher's user id, set by the server (absent: the application's server).
    if (typeof m.from === "string") message.from = m.from;
    this._emit("message", message);
    if (this._autoAck && this._user != null && m.channel === `user:${this._user}`) {
      // Handed to the application: ack it, coalesced with the rest of the burst.
      this._ackPending = { offset: m.offset, epoch: m.epoch };
      if (this._ackTimer == null) this._ackTimer = setTimeout(() => this._flushAck(), ACK_DELAY_MS);
    }
  }

  /**
   * Sends the coalesced auto-ack (no id: only a refusal would be answered, and nobody
   * waits). While disconnected it waits for the next welcome; it is dropped when the
   * personal channel moved to another epoch meanwhile.
   */
  _flushAck() {
    this._ackTimer = null;
    const pending = this._ackPending;
    if (!pending || this._user == null) return;
    if (this._state !== "connected") return; // sent after the next welcome
    this._ackPending = null;
    const channel = `user:${this._user}`;
    const sub = this._subs.get(channel);
    if (sub && sub.epoch !== pending.epoch) return;
    this._sendRaw({ type: "ack", channel, offset: pending.offset, epoch: pending.epoch });
  }

  /** An ephemeral message: no offset, so it never touches the channel's position. */
  _onEphemeral(m) {
    if (typeof m.channel !== "string" || !this._subs.has(m.channel)) return; // left meanwhile
    const message = { channel: m.channel, data: m.data };
    if (typeof m.from === "string") message.from = m.from;
    this._emit("ephemeral", message);
  }

  _onResync(r) {
    if (!isPosition(r)) return;
    const sub = this._subs.get(r.channel);
    if (!sub) return;
    sub.offset = r.offset;
    sub.epoch = r.epoch;
    this._emit("resync", { channel: r.channel, offset: r.offset, epoch: r.epoch, reason: "resync" });
  }

  _onReply(r) {
    const cmd = this._pending.get(r.id);
    if (!cmd) return;
    this._pending.delete(r.id);
    clearTimeout(cmd.timer);
    if (r.error) {
      cmd.reject(new HeraldError(String(r.error.code ?? "internal"), String(r.error.message ?? "")));
    } else {
      const result = r.result;
      cmd.resolve(result !== null && typeof result === "object" ? result : {});
    }
  }

  // ---- v1.1: token refresh, server-side subscriptions ----------------------------------

  /**
   * The token expires in `in_ms`: get a fresh one from getToken and send `refresh`,
   * retrying with a short backoff until the deadline. Runs beside message delivery (the
   * event loop keeps dispatching frames while getToken is pending). Without getToken
   * there is nothing to refresh: at the deadline the node closes 4401 and the client stops.
   */
  _onExpiring(f) {
    const inMs = Number(f.in_ms);
    if (!this._getToken || !Number.isFinite(inMs) || inMs < 0) return;
    const deadline = Date.now() + Math.min(inMs, MAX_TIMER_MS);
    const r = this._refresh;
    if (r && r.ws === this._ws) {
      r.deadline = deadline; // one refresh at a time; it now has until the new deadline
      if (r.running || r.timer != null) return;
    }
    this._stopRefresh();
    this._refresh = { ws: this._ws, deadline, failures: 0, timer: null, running: false };
    this._refreshNow();
  }

  async _refreshNow() {
    const r = this._refresh;
    if (!r || r.ws !== this._ws || this._state !== "connected") return;
    r.timer = null;
    r.running = true;
    let why;
    try {
      const token = await this._getToken();
      if (this._refresh !== r || r.ws !== this._ws) return;
      if (typeof token !== "string" || token === "") throw new Error("getToken returned no token");
      // A cached token that is the one expiring is no refresh: try again shortly.
      if (token === this._token) throw new Error("getToken returned the expiring token");
      await this._refreshWith(token);
      if (this._refresh !== r) return;
      this._token = token; // the next hello uses it too
      this._refresh = null;
      this._emit("refreshed", {});
      return;
    } catch (e) {
      why = e;
    }
    if (this._refresh !== r || r.ws !== this._ws) return;
    r.running = false;
    // Another user's token: asking again gives the same answer. At the deadline the node
    // closes 4401 and the reconnect path asks getToken for whatever it has then.
    if (why instanceof HeraldError && why.code === "forbidden") {
      this._refresh = null;
      this._emit("error", new HeraldError("token", `token refresh refused: ${why.message}`));
      return;
    }
    if (why instanceof HeraldError && (why.code === "disconnected" || why.code === "closed")) {
      return; // the socket is gone; the next hello has a token anyway
    }
    const cap = Math.min(REFRESH_RETRY_MAX_MS, REFRESH_RETRY_MIN_MS * 2 ** Math.min(r.failures, 10));
    r.failures++;
    const delay = cap / 2 + (Math.random() * cap) / 2;
    if (Date.now() + delay >= r.deadline) {
      this._refresh = null;
      this._emit(
        "error",
        new HeraldError("token", `token refresh failed: ${why?.message ?? why}; reconnecting at expiry`),
      );
      return;
    }
    r.timer = setTimeout(() => this._refreshNow(), delay);
  }

  /** Sends `refresh` on the current socket; resolves on `{}`, rejects with the node's error. */
  _refreshWith(token) {
    return new Promise((resolve, reject) => {
      const cmd = { frame: { type: "refresh", token }, resolve, reject, durable: false };
      cmd.timer = setTimeout(() => {
        for (const [id, c] of this._pending) if (c === cmd) this._pending.delete(id);
        reject(new HeraldError("timeout", "no reply to refresh in time"));
      }, this._requestTimeout);
      this._send(cmd);
    });
  }

  _stopRefresh() {
    if (this._refresh) clearTimeout(this._refresh.timer);
    this._refresh = null;
  }

  /**
   * The server added a channel (server API): follow it from the given position, like a
   * subscription of our own (deduplicated, resumed after a reconnect).
   */
  _onServerSubscribed(f) {
    if (!isPosition(f) || !CHANNEL_RE.test(f.channel)) return;
    let sub = this._subs.get(f.channel);
    if (!sub) {
      sub = newSub(null);
      this._subs.set(f.channel, sub);
    }
    if (sub.epoch == null) {
      sub.offset = f.offset;
      sub.epoch = f.epoch;
    }
    sub.confirmed = true;
    const result = { offset: f.offset, epoch: f.epoch, recovered: false };
    settle(sub.waiters, null, result);
    this._emit("subscribed", { channel: f.channel, ...result, byServer: true });
  }

  /** The server removed a channel (server API, or a refreshed token no longer allows it). */
  _onServerUnsubscribed(f) {
    if (typeof f.channel !== "string") return;
    const sub = this._subs.get(f.channel);
    if (!sub) return;
    this._subs.delete(f.channel);
    const reason = typeof f.reason === "string" ? f.reason : "";
    settle(
      sub.waiters,
      new HeraldError("unsubscribed", `the server removed ${f.channel} (${reason})`, {
        channel: f.channel,
      }),
    );
    this._emit("unsubscribed", { channel: f.channel, reason });
  }

  /** A command that resolves with its reply, waiting for a connection if needed. */
  _request(frame) {
    if (this._state === "closed") {
      return Promise.reject(new HeraldError("closed", "the client is closed"));
    }
    return new Promise((resolve, reject) => {
      const cmd = { frame, resolve, reject, durable: false };
      cmd.timer = setTimeout(() => {
        this._queue = this._queue.filter((c) => c !== cmd);
        for (const [id, c] of this._pending) if (c === cmd) this._pending.delete(id);
        reject(new HeraldError("timeout", `no reply to ${frame.type} in time`));
      }, this._requestTimeout);
      if (this._state === "connected") this._send(cmd);
      else this._queue.push(cmd);
    });
  }

  _send(cmd) {
    const id = this._nextId++;
    this._pending.set(id, cmd);
    this._sendRaw({ ...cmd.frame, id });
  }

  _sendRaw(frame) {
    try {
      this._ws?.send(JSON.stringify(frame));
    } catch {
      // The socket is closing; onclose takes over.
    }
  }

  /** The connection is gone (close code, or null when the client gave up on it). */
  _lost(code, reason) {
    const ws = this._ws;
    this._ws = null;
    this._stopRefresh();
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    clearTimeout(this._watchdog);
    const hadWelcome = this._welcome != null;
    if (hadWelcome && Date.now() - this._welcomeAt >= STABLE_MS) this._attempt = 0;
    this._welcome = null;
    this._helloResume = null;
    const pending = [...this._pending.values()];
    this._pending.clear();
    for (const cmd of pending) {
      clearTimeout(cmd.timer);
      cmd.reject(new HeraldError("disconnected", "the connection dropped before the reply"));
    }

    if (code === CLOSE_KICKED) {
      // Not an error of the client: the backend removed the user. Stop for good.
      this._shutdown(
        new HeraldError("close_4410", closeText(code, reason), { closeCode: code, fatal: true }),
        { event: "kicked", value: { code, reason: reason ?? "" } },
      );
      return;
    }
    if (code != null && FATAL_CLOSE.has(code)) {
      this._shutdown(
        new HeraldError(`close_${code}`, closeText(code, reason), { closeCode: code, fatal: true }),
      );
      return;
    }
    if (code === CLOSE_UNAUTHORIZED) {
      if (!this._getToken) {
        this._shutdown(
          new HeraldError("close_4401", closeText(code, reason), { closeCode: code, fatal: true }),
        );
        return;
      }
      this._token = null; // ask getToken again
    }
    if (code === CLOSE_DRAINING || (!hadWelcome && this._url)) {
      // Prefer another node: a draining node, or one that did not get us as far as welcome.
      this._avoid.set(this._url, Date.now());
    }
    this._setState("disconnected");
    this._emit("disconnect", { code, reason: reason ?? "" });
    if (code === CLOSE_DRAINING) {
      const jitter = this._reconnectAfter ?? Math.random() * 1000;
      this._reconnectAfter = null;
      this._schedule(jitter);
    } else if (code === CLOSE_TOO_MANY && this._reconnectAfter != null) {
      // A busy node said when to come back: that time plus a jitter of up to a second,
      // so a burst it refused does not return as one.
      const after = this._reconnectAfter;
      this._reconnectAfter = null;
      this._schedule(after + Math.random() * Math.min(after, 1000));
    } else {
      this._scheduleRetry();
    }
  }

  /** Exponential backoff with full jitter: random(0, min(max, min × 2^attempt)). */
  _scheduleRetry() {
    if (this._state === "closed") return;
    const cap = Math.min(this._backoffMax, this._backoffMin * 2 ** Math.min(this._attempt, 30));
    this._attempt++;
    this._setState("disconnected");
    this._schedule(Math.random() * cap);
  }

  _schedule(ms) {
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this._open(), ms);
  }

  _retryNow() {
    this._schedule(0);
  }

  /**
   * Stops for good. `error` rejects what waits and is emitted as "error", unless `instead`
   * names another event to emit (4410 emits "kicked").
   */
  _shutdown(error, instead = null) {
    this._generation++;
    this._stopRefresh();
    clearTimeout(this._timer);
    clearTimeout(this._watchdog);
    globalThis.removeEventListener?.("online", this._onOnline);
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(1000, "client closed");
      } catch {
        // Already closed.
      }
    }
    this._welcome = null;
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    this._ackPending = null;
    const closed = error ?? new HeraldError("closed", "the client is closed");
    for (const cmd of [...this._pending.values(), ...this._queue]) {
      clearTimeout(cmd.timer);
      cmd.reject(closed);
    }
    this._pending.clear();
    this._queue = [];
    for (const sub of this._subs.values()) settle(sub.waiters, closed);
    settle(this._connectWaiters, closed);
    this._setState("closed");
    if (instead) this._emit(instead.event, instead.value);
    else if (error) this._emit("error", error);
  }
}

/**
 * Whether a position (offset, epoch) and a stream in `otherEpoch` are the same stream:
 * offsets from another epoch mean nothing, except offset 0 ("nothing seen yet"), which
 * continues with any epoch. Mirrors `herald_protocol::same_stream` (shared/src/lib.rs).
 */
function sameStream(offset, epoch, otherEpoch) {
  return offset === 0 || epoch === otherEpoch;
}

function newSub(pos) {
  const ok = pos && typeof pos.epoch === "string" && Number.isInteger(pos.offset);
  return {
    offset: ok ? pos.offset : null,
    epoch: ok ? pos.epoch : null,
    confirmed: false,
    waiters: [],
  };
}

/** Whether `v` carries a usable `{offset, epoch}` (offsets beyond 2^53 are not). */
function isPosition(v) {
  return (
    v !== null &&
    typeof v === "object" &&
    Number.isSafeInteger(v.offset) &&
    v.offset >= 0 &&
    typeof v.epoch === "string" &&
    (v.channel === undefined || typeof v.channel === "string")
  );
}

/** A duration from a frame, as a number of ms within [0, max]. */
function clampMs(v, max) {
  const n = Number(v);
  return Number.isFinite(n) && n > 0 ? Math.min(n, max) : 0;
}

/** Settles and empties a waiter list: rejects with `error`, or resolves with `value`. */
function settle(waiters, error, value) {
  const list = waiters.splice(0, waiters.length);
  for (const w of list) {
    if (error) w.reject(error);
    else w.resolve(value);
  }
}

function closeText(code, reason) {
  const what = {
    1009: "a frame was too large",
    4400: "the node refused a frame as malformed",
    4401: "the token was refused",
    4403: "forbidden (origin not allowed)",
    4410: "kicked: the backend removed the user",
  }[code];
  return `connection closed with ${code}${what ? ` (${what})` : ""}${reason ? `: ${reason}` : ""}`;
}

/** Accepts ws(s):// URLs, http(s):// URLs of a node (→ its /ws) and relative paths. */
function toWsUrl(u) {
  const base = globalThis.location?.href;
  const url = new URL(String(u), base);
  if (url.protocol === "http:") url.protocol = "ws:";
  if (url.protocol === "https:") url.protocol = "wss:";
  if (url.pathname === "/" || url.pathname === "") url.pathname = "/ws";
  return url.toString();
}

function resolveHttp(u) {
  const base = globalThis.location?.href;
  return base ? new URL(String(u), base).toString() : String(u);
}
