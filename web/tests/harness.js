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

// The test injects this file as an inline module: expose it to page.evaluate.
globalThis.H = { make, client, last, report, attempt };
