// In-page harness of the browser test (served by the test at /__test__/harness.js on a
// node's origin): creates HeraldClients from the node's /herald.js and records
// everything they hand to the application, for browser.mjs to check.

import { HeraldClient, HeraldError } from "/herald.js";

/** name → {client, record} */
const clients = {};

/** Creates and records a client; `options` are HeraldClient's. */
export function make(name, options) {
  const record = {
    messages: {},
    resyncs: [],
    states: [],
    nodes: [],
    errors: [],
    subscribed: [],
    disconnects: [],
    unsubscribed: [],
    kicked: [],
    refreshed: 0,
    /** Ephemeral messages: [channel, from, data], in arrival order. */
    ephemerals: [],
    /** Per channel, messages and resyncs in the order the application saw them. */
    timeline: {},
  };
  const note = (channel, kind, offset, epoch) =>
    (record.timeline[channel] ??= []).push([kind, offset, epoch]);
  const client = new HeraldClient(options);
  client.on("message", (m) => {
    (record.messages[m.channel] ??= []).push([m.offset, m.epoch, m.data]);
    note(m.channel, "message", m.offset, m.epoch);
  });
  client.on("ephemeral", (e) => record.ephemerals.push([e.channel, e.from ?? null, e.data]));
  client.on("resync", (r) => {
    record.resyncs.push(r);
    note(r.channel, "resync", r.offset, r.epoch);
  });
  client.on("state", (s) => record.states.push(s));
  client.on("welcome", (w) => record.nodes.push(w.node));
  client.on("disconnect", (d) => record.disconnects.push(d.code));
  client.on("error", (e) =>
    record.errors.push({ code: e.code, message: e.message, fatal: e.fatal, closeCode: e.closeCode }),
  );
  client.on("subscribed", (s) => record.subscribed.push(s));
  client.on("unsubscribed", (u) => record.unsubscribed.push(u));
  client.on("kicked", (k) => record.kicked.push(k));
  client.on("refreshed", () => record.refreshed++);
  clients[name] = { client, record };
  return client;
}

/** The client called `name`. */
export function client(name) {
  return clients[name].client;
}

/** The last offset `name` was handed on `channel` (0 if none). */
export function last(name, channel) {
  const list = clients[name]?.record.messages[channel];
  return list && list.length > 0 ? list[list.length - 1][0] : 0;
}

/** Everything recorded for `name`, with its state, node and positions. */
export function report(name) {
  const { client: c, record } = clients[name];
  return { state: c.state, node: c.node, user: c.user, positions: c.positions(), ...record };
}

/** Runs a command and returns {ok, value} or {ok: false, code, message, isHeraldError}. */
export async function attempt(promise) {
  try {
    return { ok: true, value: await promise };
  } catch (e) {
    return { ok: false, code: e.code, message: e.message, isHeraldError: e instanceof HeraldError };
  }
}

// ---- a fake node in the page ----------------------------------------------------------

/** Every FakeSocket created, in order. */
export const sockets = [];

/**
 * A stand-in for the browser's WebSocket (HeraldOptions.WebSocket) whose server side the
 * test drives: `push` delivers a frame to the client, `serverClose` closes with a code,
 * `sent` holds what the client sent (parsed). For frames a real node never sends.
 */
export class FakeSocket {
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.readyState = 0;
    sockets.push(this);
    setTimeout(() => {
      this.readyState = 1;
      this.onopen?.({});
    });
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close() {
    this.readyState = 3;
  }
  /** Delivers a frame: an object (sent as JSON), a string, or binary data. */
  push(frame) {
    const data = typeof frame === "string" || frame instanceof ArrayBuffer ? frame : JSON.stringify(frame);
    this.onmessage?.({ data });
  }
  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  /** The client's frames of a type, in order. */
  of(type) {
    return this.sent.filter((f) => f.type === type);
  }
}

/** Polls `cond` every 10 ms; throws `what` after 10 s. */
export async function until(what, cond) {
  const deadline = Date.now() + 10_000;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** The next FakeSocket after `n` sockets, once the client said hello on it. */
export async function socketAfter(n) {
  await until(`socket #${n + 1} and its hello`, () => sockets.length > n && sockets[n].of("hello").length > 0);
  return sockets[n];
}

function welcomeFrame(user, channels = [], errors = {}) {
  const subscriptions = {};
  for (const c of [`user:${user}`, ...channels]) subscriptions[c] = { offset: 0, epoch: "e", recovered: false };
  return { type: "welcome", session: "s1", node: "fake", user, heartbeat_ms: 25_000, subscriptions, errors };
}

function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

const nested = (depth) => "[".repeat(depth) + "1" + "]".repeat(depth);

/**
 * herald.js against frames no real node sends: odd and hostile ones are skipped and the
 * next message still arrives; v1.1 frames; refresh; kicked. Throws on the first failed
 * check; returns a summary.
 */
export async function fakeChecks() {
  const out = {};
  // -- 1. odd and hostile frames -----------------------------------------------------
  let base = sockets.length;
  const c = make("fake-odd", { url: "ws://fake.invalid/ws", token: "t", WebSocket: FakeSocket });
  const welcomed = c.connect();
  let ws = await socketAfter(base);
  ws.push(welcomeFrame("alice", []));
  await welcomed;
  const subscribing = c.subscribe("room:1");
  await until("subscribe sent", () => ws.of("subscribe").length === 1);
  ws.push({ type: "reply", id: ws.of("subscribe")[0].id, result: { offset: 0, epoch: "e", recovered: false } });
  await subscribing;
  const hostile = [
    new Uint8Array([0, 1, 2]).buffer,
    "not json",
    "",
    "[1,2]",
    "null",
    "42",
    '"a string"',
    '{"type":7}',
    '{"no":"type"}',
    '{"type":"message"}',
    '{"type":"message","channel":5,"offset":1,"epoch":"e","data":1}',
    '{"type":"message","channel":"room:1","offset":-1,"epoch":"e","data":1}',
    '{"type":"message","channel":"room:1","offset":1e400,"epoch":"e","data":1}',
    '{"type":"message","channel":"room:1","offset":123456789012345678901234567890,"epoch":"e","data":1}',
    '{"type":"message","channel":"room:1","offset":"3","epoch":"e","data":1}',
    '{"type":"message","channel":"room:1","offset":2.5,"epoch":"e","data":1}',
    '{"type":"message","channel":"room:1","offset":1,"data":1}',
    `{"type":"message","channel":"room:1","offset":1,"epoch":"e","data":${nested(100_000)}}`,
    '{"type":"message","channel":"room:other","offset":1,"epoch":"e","data":1}',
    '{"type":"message","channel":"user:bob","offset":1,"epoch":"e","data":1}',
    '{"type":"reply","id":999,"result":{}}',
    '{"type":"reply","id":"x","result":{}}',
    '{"type":"reply"}',
    '{"type":"welcome"}',
    '{"type":"welcome","session":"s2","node":"other","user":"mallory","heartbeat_ms":1,"subscriptions":{}}',
    '{"type":"resync","channel":"room:other","offset":5,"epoch":"x"}',
    '{"type":"resync","channel":"room:1"}',
    '{"type":"reconnect","reason":"x","after_ms":1e300}',
    '{"type":"expiring","in_ms":1e300}',
    '{"type":"expiring","in_ms":-5}',
    '{"type":"subscribed","channel":"bad name!","offset":1,"epoch":"e"}',
    '{"type":"subscribed","channel":"room:x"}',
    '{"type":"subscribed","channel":"__proto__","offset":"x","epoch":"e"}',
    '{"type":"unsubscribed","channel":"room:nope","reason":"server"}',
    '{"type":"unsubscribed"}',
    '{"type":"__proto__"}',
    '{"type":"ping","extra":{"deep":[1,2,3]}}',
  ];
  let offset = 0;
  for (const frame of hostile) {
    ws.push(frame);
    offset++;
    ws.push({ type: "message", channel: "room:1", offset, epoch: "e", data: { n: offset } });
  }
  ws.push({ type: "message", channel: "room:1", offset, epoch: "e", data: "duplicate" });
  ws.push({ type: "message", channel: "room:1", offset: 1, epoch: "e", data: "old" });
  const datas = [null, true, -1.5e300, "text", [], {}, JSON.parse(nested(64)), "x".repeat(1 << 20)];
  for (const data of datas) {
    offset++;
    ws.push({ type: "message", channel: "room:1", offset, epoch: "e", data, from: "bob", future: { a: [1] } });
  }
  let r = report("fake-odd");
  const got = (r.messages["room:1"] ?? []).map(([o]) => o);
  check(JSON.stringify(got) === JSON.stringify([...Array(offset).keys()].map((i) => i + 1)), `every good message once, in order: ${got}`);
  const tail = r.messages["room:1"].slice(-datas.length).map(([, , d]) => JSON.stringify(d));
  check(JSON.stringify(tail) === JSON.stringify(datas.map((d) => JSON.stringify(d))), "data of every JSON type arrives as sent");
  check(!r.messages["room:other"] && !r.messages["user:bob"], "no message of channels not followed");
  check(r.state === "connected" && r.user === "alice" && r.node === "fake", `still the same session: ${r.state} ${r.user} ${r.node}`);
  check(r.disconnects.length === 0 && r.errors.length === 0 && r.resyncs.length === 0, `nothing reported: ${JSON.stringify([r.disconnects, r.errors, r.resyncs])}`);
  check(r.subscribed.every((s) => !s.byServer), "bad subscribed frames skipped");
  check(ws.of("pong").length === 1, "the ping was answered");
  const pub = c.publish("room:1", 1);
  await until("publish sent", () => ws.of("publish").length === 1);
  ws.push({ type: "reply", id: ws.of("publish")[0].id, error: { code: "brand_new", message: "?" } });
  const e = await attempt(pub);
  check(!e.ok && e.code === "brand_new" && e.isHeraldError, `an unknown error code is passed on: ${JSON.stringify(e)}`);
  c.close();
  out.odd = hostile.length;

  // -- 2. the server adds and removes channels; a refused resume -----------------------
  base = sockets.length;
  const s = make("fake-sub", { url: "ws://fake.invalid/ws", token: "t", WebSocket: FakeSocket, backoffMinMs: 10 });
  s.connect();
  ws = await socketAfter(base);
  ws.push(welcomeFrame("alice"));
  ws.push({ type: "subscribed", channel: "room:9", offset: 3, epoch: "e" });
  ws.push({ type: "subscribed", channel: "room:10", offset: 0, epoch: "e" });
  for (let o = 1; o <= 4; o++) ws.push({ type: "message", channel: "room:9", offset: o, epoch: "e", data: o });
  ws.push({ type: "message", channel: "room:10", offset: 1, epoch: "e", data: 1 });
  r = report("fake-sub");
  check(JSON.stringify((r.messages["room:9"] ?? []).map(([o]) => o)) === "[4]", "room:9 from after the server's offset");
  check(last("fake-sub", "room:10") === 1, "room:10 delivered");
  check(JSON.stringify(r.subscribed.filter((x) => x.byServer).map((x) => x.channel)) === '["room:9","room:10"]', "subscribed events with byServer");
  ws.push({ type: "unsubscribed", channel: "room:9", reason: "server" });
  ws.push({ type: "message", channel: "room:9", offset: 5, epoch: "e", data: 5 });
  ws.push({ type: "message", channel: "room:10", offset: 2, epoch: "e", data: 2 });
  r = report("fake-sub");
  check(JSON.stringify(r.unsubscribed) === '[{"channel":"room:9","reason":"server"}]', `unsubscribed event: ${JSON.stringify(r.unsubscribed)}`);
  check(last("fake-sub", "room:9") === 4 && last("fake-sub", "room:10") === 2, "nothing after the unsubscribe");
  // A node cut off from Redis moves its clients like a drain: reason "unavailable",
  // then 4503; the client comes back after after_ms and resumes.
  ws.push({ type: "reconnect", reason: "unavailable", after_ms: 30 });
  ws.serverClose(4503, "node cut off from the broker; reconnect elsewhere");
  ws = await socketAfter(base + 1);
  const resume = ws.of("hello")[0].resume ?? {};
  check(resume["room:10"]?.offset === 2 && !("room:9" in resume), `resume: ${JSON.stringify(resume)}`);
  ws.push(welcomeFrame("alice", [], { "room:10": { code: "forbidden", message: "not allowed" } }));
  await until("welcome", () => s.state === "connected");
  r = report("fake-sub");
  check(r.errors.some((x) => x.code === "forbidden") && !s.channels().includes("room:10"), "a refused resume is dropped and reported");
  s.close();

  // A busy node (reconnect "busy", then 4429, before welcome): the client waits after_ms
  // plus a jitter of up to a second, not its own (10 ms) backoff.
  base = sockets.length;
  const b = make("fake-busy", { url: "ws://fake.invalid/ws", token: "t", WebSocket: FakeSocket, backoffMinMs: 10 });
  b.connect();
  ws = await socketAfter(base);
  ws.push({ type: "reconnect", reason: "busy", after_ms: 400 });
  const told = Date.now();
  ws.serverClose(4429, "busy");
  ws = await socketAfter(base + 1);
  const waited = Date.now() - told;
  check(waited >= 380 && waited < 1_900, `a busy answer is waited out: came back after ${waited} ms`);
  b.close();

  // -- 3. refresh ---------------------------------------------------------------------
  base = sockets.length;
  let calls = 0;
  const getToken = async () => {
    const n = ++calls;
    if (n > 1) await new Promise((res) => setTimeout(res, 200)); // a slow backend
    return `t${n}`;
  };
  const f = make("fake-refresh", { url: "ws://fake.invalid/ws", getToken, WebSocket: FakeSocket, backoffMinMs: 10 });
  f.connect();
  ws = await socketAfter(base);
  check(ws.of("hello")[0].token === "t1", "first token");
  ws.push(welcomeFrame("alice"));
  ws.push({ type: "expiring", in_ms: 20_000 });
  ws.push({ type: "message", channel: "user:alice", offset: 1, epoch: "e", data: 1 });
  check(last("fake-refresh", "user:alice") === 1, "delivery goes on while getToken runs");
  await until("refresh t2", () => ws.of("refresh").length === 1);
  let cmd = ws.of("refresh")[0];
  check(cmd.token === "t2", "refresh with a fresh token");
  ws.push({ type: "reply", id: cmd.id, error: { code: "unauthorized", message: "token expired" } });
  await until("refresh retried", () => ws.of("refresh").length === 2);
  cmd = ws.of("refresh")[1];
  check(cmd.token === "t3", "the retry asks getToken again");
  ws.push({ type: "reply", id: cmd.id, result: {} });
  await until("refreshed", () => report("fake-refresh").refreshed === 1);
  ws.serverClose(4503, "node draining");
  ws = await socketAfter(base + 1);
  check(ws.of("hello")[0].token === "t3" && calls === 3, "the next hello uses the refreshed token");
  ws.push(welcomeFrame("alice"));
  ws.push({ type: "expiring", in_ms: 1_000 });
  await until("refresh t4", () => ws.of("refresh").length === 1);
  ws.push({ type: "reply", id: ws.of("refresh")[0].id, error: { code: "forbidden", message: "another user" } });
  ws.serverClose(4401, "token expired");
  ws = await socketAfter(base + 2);
  check(ws.of("hello")[0].token === "t5", `4401 asks for a new token: ${ws.of("hello")[0].token}`);
  f.close();

  // -- 4. kicked ----------------------------------------------------------------------
  base = sockets.length;
  const k = make("fake-kick", { url: "ws://fake.invalid/ws", token: "t", WebSocket: FakeSocket, backoffMinMs: 10 });
  const kconnect = k.connect();
  ws = await socketAfter(base);
  ws.push(welcomeFrame("alice"));
  await kconnect;
  ws.serverClose(4410, "kicked");
  r = report("fake-kick");
  check(r.state === "closed", "closed when kicked");
  check(JSON.stringify(r.kicked) === '[{"code":4410,"reason":"kicked"}]', `kicked event: ${JSON.stringify(r.kicked)}`);
  const again = await attempt(k.publish("room:1", 1));
  check(!again.ok && again.code === "closed", "commands after the kick fail");
  await new Promise((res) => setTimeout(res, 300));
  check(sockets.length === base + 1, "no reconnect after 4410");
  return out;
}

// The test injects this file as an inline module: expose it to page.evaluate.
globalThis.H = { make, client, last, report, attempt, FakeSocket, sockets, fakeChecks };
