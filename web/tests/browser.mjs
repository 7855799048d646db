// Browser test of herald.js and the demo page, in headless Chromium (Debian's package)
// driven by playwright-core. Run by server/tests/browser.rs, which starts the cluster
// (Redis + 3 dev-mode nodes + 1 node without dev mode) and passes it as JSON in argv[2].
//
// The script asks the Rust side to kill, stop or restart processes by printing a line
// `@@<command> <arg>` on stdout and waiting for `ok` on stdin; `@@pass` at the end says
// every check held. Any failure throws: the script exits non-zero with the reason.

import { createInterface } from "node:readline";
import { readFileSync } from "node:fs";
import { createHmac } from "node:crypto";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const config = JSON.parse(process.argv[2] ?? "{}");
const { nodes, plain, apiKey } = config;
const CHROMIUM = process.env.HERALD_CHROMIUM || "/usr/bin/chromium";
/** Every wait is bounded; generous because the machine may be busy. */
const WAIT = 30_000;
const harness = readFileSync(fileURLToPath(new URL("./harness.js", import.meta.url)), "utf8");
const started = Date.now();

function say(text) {
  process.stdout.write(`[browser ${((Date.now() - started) / 1000).toFixed(1)}s] ${text}\n`);
}

// ---- talking to the Rust side ----------------------------------------------------------

const lines = [];
const lineWaiters = [];
createInterface({ input: process.stdin }).on("line", (line) => {
  const w = lineWaiters.shift();
  if (w) w(line);
  else lines.push(line);
});

/** Asks the Rust side to do something to the cluster; resolves when it is done. */
async function control(command) {
  say(`asking: ${command}`);
  process.stdout.write(`@@${command}\n`);
  const line = lines.length > 0 ? lines.shift() : await new Promise((r) => lineWaiters.push(r));
  assert.equal(line.trim(), "ok", `${command}: ${line}`);
}

// ---- the HTTP API ---------------------------------------------------------------------

const down = new Set();

async function api(node, method, path, body) {
  const r = await fetch(`${node.http}${path}`, {
    method,
    headers: { Authorization: `Bearer ${apiKey}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(3_000),
  });
  const json = await r.json();
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${JSON.stringify(json)}`);
  return json;
}

let rr = 0;
/**
 * Publishes through any node that is up, trying the others when one fails (a node that
 * was just killed, or reconnecting to a restarted Redis), for 15 s at most.
 */
async function publish(channel, data) {
  const deadline = Date.now() + 15_000;
  let last;
  while (Date.now() < deadline) {
    const node = nodes[rr++ % nodes.length];
    if (down.has(node.id)) continue;
    try {
      return await api(node, "POST", "/v1/publish", { channel, data });
    } catch (e) {
      last = e;
      await sleep(50);
    }
  }
  throw new Error(`could not publish to ${channel}: ${last?.message}`);
}

/** The channel's latest offset and epoch, from a node that is up. */
async function latest(channel) {
  for (const node of nodes) {
    if (down.has(node.id)) continue;
    const h = await api(node, "GET", `/v1/channels/${channel}/history?limit=0`);
    return { offset: h.offset, epoch: h.epoch };
  }
  throw new Error("no node up");
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- pages ---------------------------------------------------------------------------

function watch(page, name) {
  page.on("pageerror", (e) => say(`${name}: page error: ${e.message}`));
  page.on("console", (m) => {
    // Refused connections (a node is down on purpose) and the /dev/token 404 of the
    // node without dev mode are expected.
    const expected = ["ERR_CONNECTION_REFUSED", "status of 404"];
    if (m.type() === "error" && !expected.some((e) => m.text().includes(e))) {
      say(`${name}: console: ${m.text()}`);
    }
  });
}

/**
 * A page on `node`'s origin, as the node served it (the demo page), with the harness
 * added as a module that imports the node's /herald.js. A real response, not one made
 * up by the test: Chromium's local-network checks treat a made-up page as public and
 * refuse its connections to 127.0.0.1. The harness is an inline script, which the demo
 * page's CSP forbids, so this context bypasses CSP (the demo tests below do not).
 */
async function testPage(browser, node, name) {
  const context = await browser.newContext({ bypassCSP: true });
  const page = await context.newPage();
  watch(page, name);
  await page.goto(`${node.http}/`);
  await page.addScriptTag({ type: "module", content: harness });
  await page.waitForFunction(() => globalThis.H !== undefined, null, { timeout: WAIT });
  return page;
}

/** Fails when `promise` takes longer than WAIT. */
async function within(promise, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out: ${what}`)), WAIT);
  });
  try {
    return await Promise.race([promise, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

const waitIn = (page, fn, arg, what) =>
  page.waitForFunction(fn, arg, { timeout: WAIT, polling: 50 }).catch((e) => {
    throw new Error(`timed out waiting for ${what}: ${e.message.split("\n")[0]}`);
  });

async function waitConnected(page, name) {
  await waitIn(page, (n) => H.client(n).state === "connected", name, `${name} connected`);
}

async function waitLast(page, name, channel, offset) {
  await waitIn(
    page,
    ([n, ch, off]) => H.last(n, ch) >= off,
    [name, channel, offset],
    `${name} to reach ${channel} offset ${offset}`,
  );
}

/** Every offset from `from` to `to` exactly once, in order, in one epoch. */
function assertExact(report, channel, from, to) {
  const got = (report.messages[channel] ?? []).map(([offset]) => offset);
  const want = [];
  for (let o = from; o <= to; o++) want.push(o);
  assert.deepEqual(got, want, `${channel}: every offset once, in order`);
  const epochs = new Set((report.messages[channel] ?? []).map(([, epoch]) => epoch));
  assert.equal(epochs.size, 1, `${channel}: one epoch`);
}

// ---- scenario 1: herald.js through node failures ------------------------------------------

async function nodeFailures(browser) {
  say("scenario 1: pushes through a node kill, a restart and a drain");
  const [n0] = nodes;
  const page = await testPage(browser, n0, "lib");
  const wsUrls = nodes.map((n) => `ws://${new URL(n.http).host}/ws`);

  // alice: one URL only, so she has to wait for her node to come back.
  // bob: asks /v1/connect (on the page's origin), falls back to every node's URL.
  await page.evaluate(
    ([url, urls]) => {
      const devToken = async (user) =>
        (await (await fetch(`/dev/token?user=${user}`)).json()).token;
      return Promise.all([
        devToken("alice").then((token) =>
          H.make("alice", { url, token, backoffMaxMs: 1000 }),
        ),
        devToken("bob").then((token) =>
          H.make("bob", { connectUrl: "/v1/connect", url: urls, token, backoffMaxMs: 1000 }),
        ),
      ]);
    },
    [wsUrls[0], wsUrls],
  );
  const subscribed = await within(
    page.evaluate(async () => {
      const out = [];
      for (const n of ["alice", "bob"]) {
        await H.client(n).connect();
        out.push(await H.client(n).subscribe("room:feed"));
      }
      return out;
    }),
    "alice and bob connect and subscribe",
  );
  for (const s of subscribed) assert.equal(s.offset, 0, "room:feed starts empty");

  // Commands resolve with their reply, or reject with the protocol's error code.
  const checks = await within(page.evaluate(async () => {
    const a = H.client("alice");
    return {
      forbidden: await H.attempt(a.subscribe("user:bob")),
      bad: await H.attempt(a.publish("not a channel!", 1)),
      presence: await H.attempt(a.presence("room:feed")),
      welcomeNode: a.node,
      user: a.user,
    };
  }), "commands and their errors");
  assert.equal(checks.forbidden.ok, false);
  assert.equal(checks.forbidden.code, "forbidden");
  assert.ok(checks.forbidden.isHeraldError);
  assert.equal(checks.bad.code, "bad_request");
  assert.equal(checks.presence.ok, true);
  assert.equal(checks.welcomeNode, n0.id);
  assert.equal(checks.user, "alice");

  const channels = ["user:alice", "user:bob", "room:feed"];
  let pushing = true;
  let pushed = 0;
  const pusher = (async () => {
    while (pushing) {
      for (const ch of channels) await publish(ch, { n: pushed, ch });
      pushed++;
      await sleep(40);
    }
  })();

  await waitLast(page, "alice", "room:feed", 5);
  await waitLast(page, "bob", "room:feed", 5);

  // SIGKILL alice's node (also the page's origin): no goodbye, no drain.
  down.add(n0.id);
  await control("kill 0");
  await sleep(1_000);
  await control("restart 0");
  down.delete(n0.id);
  const before = (await latest("user:alice")).offset;
  await waitLast(page, "alice", "user:alice", before);
  await waitConnected(page, "alice");
  say(`alice is back on ${await page.evaluate(() => H.client("alice").node)}`);

  // SIGTERM the node bob is on: it drains (reconnect frame, 4503) and bob moves.
  await waitConnected(page, "bob");
  const bobNode = await page.evaluate(() => H.client("bob").node);
  const j = nodes.findIndex((n) => n.id === bobNode);
  assert.ok(j >= 0, `bob is on a known node (${bobNode})`);
  down.add(bobNode);
  await control(`terminate ${j}`);
  await waitIn(
    page,
    (gone) => H.client("bob").state === "connected" && H.client("bob").node !== gone,
    bobNode,
    "bob on another node",
  );
  await control(`restart ${j}`);
  down.delete(bobNode);
  await sleep(500);

  pushing = false;
  await pusher;
  const ends = {};
  for (const ch of channels) ends[ch] = await latest(ch);
  say(`pushed ${pushed} rounds; last offsets ${JSON.stringify(ends)}`);
  await waitLast(page, "alice", "user:alice", ends["user:alice"].offset);
  await waitLast(page, "alice", "room:feed", ends["room:feed"].offset);
  await waitLast(page, "bob", "user:bob", ends["user:bob"].offset);
  await waitLast(page, "bob", "room:feed", ends["room:feed"].offset);

  const alice = await page.evaluate(() => H.report("alice"));
  const bob = await page.evaluate(() => H.report("bob"));
  assertExact(alice, "user:alice", 1, ends["user:alice"].offset);
  assertExact(alice, "room:feed", 1, ends["room:feed"].offset);
  assertExact(bob, "user:bob", 1, ends["user:bob"].offset);
  assertExact(bob, "room:feed", 1, ends["room:feed"].offset);
  assert.deepEqual(alice.resyncs, [], "alice: no loss");
  assert.deepEqual(bob.resyncs, [], "bob: no loss");
  assert.ok(alice.nodes.length >= 2, "alice reconnected");
  assert.ok(alice.nodes.every((n) => n === n0.id), "alice stayed on her only URL");
  assert.ok(bob.nodes.length >= 2, "bob reconnected");
  assert.ok(bob.disconnects.includes(4503), `bob saw the drain: ${bob.disconnects}`);
  assert.ok(
    alice.subscribed.some((s) => s.channel === "room:feed" && s.recovered),
    "alice's resume was recovered",
  );
  for (const r of [alice, bob]) {
    assert.ok(!r.states.includes("closed"), "never closed");
    assert.deepEqual(r.errors.filter((e) => e.fatal), []);
  }
  say(
    `alice: ${alice.messages["user:alice"].length}+${alice.messages["room:feed"].length} messages ` +
      `over ${alice.nodes.length} connections; bob: ${bob.messages["user:bob"].length}+` +
      `${bob.messages["room:feed"].length} over ${bob.nodes.join(" → ")}`,
  );
  await page.evaluate(() => {
    H.client("alice").close();
    H.client("bob").close();
  });
  return page;
}

// ---- scenario 2: recovered:false, resync, fatal close ---------------------------------------

async function lossReported(page) {
  say("scenario 2: resume beyond history (recovered:false), Redis restarted empty (resync)");
  const [, n1, n2] = nodes;
  const url1 = `ws://${new URL(n1.http).host}/ws`;
  const url2 = `ws://${new URL(n2.http).host}/ws`;
  const token = (await (await fetch(`${n1.http}/dev/token?user=carol`)).json()).token;

  await within(
    page.evaluate(
      async ([url, token]) => {
        const c = H.make("carol", { url, token });
        await c.connect();
        await c.subscribe("room:gap");
      },
      [url1, token],
    ),
    "carol connects and subscribes",
  );
  for (let i = 0; i < 3; i++) await publish("room:gap", { i });
  await waitLast(page, "carol", "room:gap", 3);
  const saved = await page.evaluate(() => {
    const c = H.client("carol");
    c.close();
    return c.positions();
  });
  assert.equal(saved["room:gap"].offset, 3);
  assert.ok(saved["user:carol"], "the personal channel has a position too");

  // While carol is away: more than history holds on room:gap, two pushes to her.
  for (let i = 0; i < config.historySize + 10; i++) await publish("room:gap", { i: i + 3 });
  await publish("user:carol", { text: "while away 1" });
  await publish("user:carol", { text: "while away 2" });
  const gapEnd = await latest("room:gap");

  await within(
    page.evaluate(
      async ([url, token, resume]) => {
        const c = H.make("carol2", { url, token, resume });
        await c.connect();
      },
      [url2, token, saved],
    ),
    "carol2 resumes",
  );
  await waitLast(page, "carol2", "user:carol", saved["user:carol"].offset + 2);
  let carol = await page.evaluate(() => H.report("carol2"));
  assert.deepEqual(
    carol.resyncs.map((r) => [r.channel, r.reason, r.offset]),
    [["room:gap", "not_recovered", gapEnd.offset]],
    "a resume beyond history is reported",
  );
  assert.equal(carol.messages["room:gap"], undefined, "no old room:gap message is handed on");
  assertExact(carol, "user:carol", saved["user:carol"].offset + 1, saved["user:carol"].offset + 2);
  assert.ok(carol.subscribed.some((s) => s.channel === "user:carol" && s.recovered));
  assert.ok(carol.subscribed.some((s) => s.channel === "room:gap" && !s.recovered));
  await publish("room:gap", { after: "resume" });
  await waitLast(page, "carol2", "room:gap", gapEnd.offset + 1);

  // Redis comes back empty: history and epochs are gone, and the client must hear it.
  await control("redis-restart");
  const fresh = await publish("room:gap", { after: "redis restart" });
  assert.notEqual(fresh.epoch, gapEnd.epoch, "a new epoch after Redis lost everything");
  // The resync goes to the new epoch, or to (0, "") when the node noticed the loss
  // before the publish (a channel without state reads as offset 0, empty epoch, and
  // offset 0 continues with any epoch).
  await waitIn(
    page,
    (epoch) =>
      H.report("carol2").resyncs.some(
        (r) => r.channel === "room:gap" && (r.epoch === epoch || (r.epoch === "" && r.offset === 0)),
      ),
    fresh.epoch,
    "carol2 to be told of the lost history (resync)",
  );
  const next = await publish("room:gap", { after: "resync" });
  assert.equal(next.epoch, fresh.epoch);
  await waitLast(page, "carol2", "room:gap", next.offset);
  carol = await page.evaluate(() => H.report("carol2"));
  // The application saw, on room:gap: the resume's resync, the old epoch's last message,
  // the resync to the new epoch, then the new epoch's messages from right after the
  // resync's position on, each once and in order.
  const timeline = carol.timeline["room:gap"];
  const at = timeline.findIndex(
    ([kind, , epoch]) => kind === "resync" && (epoch === fresh.epoch || epoch === ""),
  );
  assert.deepEqual(
    timeline.slice(0, at),
    [
      ["resync", gapEnd.offset, gapEnd.epoch],
      ["message", gapEnd.offset + 1, gapEnd.epoch],
    ],
    "before the resync: only the old epoch",
  );
  const resyncAt = timeline[at][1];
  const after = timeline.slice(at + 1);
  const want = [];
  for (let o = resyncAt + 1; o <= next.offset; o++) want.push(["message", o, fresh.epoch]);
  assert.deepEqual(after, want, "after the resync: the new epoch from its position on");
  say(`resync seen: ${JSON.stringify(carol.resyncs)}`);

  // A token the node refuses, with no getToken to ask again: stop and report.
  const refused = await within(
    page.evaluate(async (url) => {
      const c = H.make("mallory", { url, token: "not-a-jwt" });
      const r = await H.attempt(c.connect());
      return { r, report: H.report("mallory") };
    }, url2),
    "a refused token stops the client",
  );
  assert.equal(refused.r.ok, false);
  assert.equal(refused.r.code, "close_4401");
  assert.equal(refused.report.state, "closed");
  assert.equal(refused.report.errors[0]?.fatal, true);
  await page.evaluate(() => H.client("carol2").close());
}

// ---- scenario 3: the demo page ------------------------------------------------------------

async function demoPage(browser, node, user, query = "") {
  const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
  const page = await context.newPage();
  watch(page, `demo ${user}`);
  await page.goto(`${node.http}/?user=${user}${query}`);
  await page.click("#sign-in-form button");
  return page;
}

async function demo(browser) {
  say("scenario 3: the demo page, two users on two nodes");
  const [, n1, n2] = nodes;
  const dora = await demoPage(browser, n1, "dora");
  const eve = await demoPage(browser, n2, "eve");
  for (const [page, node, user] of [[dora, n1, "dora"], [eve, n2, "eve"]]) {
    await page.waitForSelector("#state.state-connected", { timeout: WAIT });
    await page.waitForFunction((id) => document.getElementById("node").textContent === id, node.id, {
      timeout: WAIT,
    });
    assert.equal(await page.textContent("#me"), user);
    assert.equal(await page.textContent("#state"), "connected");
    await page.waitForSelector("#chat-text:not([disabled])", { timeout: WAIT });
  }

  // dora pushes a notification to eve (client publish to user:eve).
  const nasty = '<img src=x id="pwned"> & "quotes"';
  await dora.fill("#notify-to", "eve");
  await dora.fill("#notify-text", `hi eve ${nasty}`);
  await dora.click("#notify-form button");
  await eve.waitForFunction(
    (text) => document.getElementById("notifications").textContent.includes(text),
    `hi eve ${nasty}`,
    { timeout: WAIT },
  );
  assert.match(await eve.textContent("#notifications"), /from dora/);
  assert.equal(await eve.$("#pwned"), null, "user data is text, never HTML");
  assert.match(await dora.textContent("#notify-result"), /Pushed to eve/);

  // A push from the backend reaches eve's notifications too.
  await publish("user:eve", { text: "from the backend" });
  await eve.waitForFunction(
    () => document.getElementById("notifications").textContent.includes("from the backend"),
    null,
    { timeout: WAIT },
  );

  // Room chat, both ways.
  await dora.fill("#chat-text", "hello from dora");
  await dora.press("#chat-text", "Enter");
  await eve.waitForFunction(
    () => document.getElementById("chat").textContent.includes("dora: hello from dora"),
    null,
    { timeout: WAIT },
  );
  await eve.fill("#chat-text", "hi dora, eve here");
  await eve.click("#chat-send");
  await dora.waitForFunction(
    () => document.getElementById("chat").textContent.includes("eve: hi dora, eve here"),
    null,
    { timeout: WAIT },
  );

  // Presence, refreshed: both pages list both users, online.
  for (const page of [dora, eve]) {
    await page.waitForFunction(
      () => {
        const online = [...document.querySelectorAll('#presence li[data-status="online"]')].map(
          (li) => li.dataset.user,
        );
        return online.includes("dora") && online.includes("eve");
      },
      null,
      { timeout: WAIT },
    );
  }

  // Typing indicator (ephemeral publishes): eve sees "dora is typing…", which expires
  // after a few seconds without keystrokes; dora never sees her own.
  await dora.type("#chat-text", "typing a thing");
  await eve.waitForFunction(
    () => document.getElementById("typing").textContent === "dora is typing…",
    null,
    { timeout: WAIT },
  );
  assert.equal(await dora.textContent("#typing"), "");
  await eve.waitForFunction(() => document.getElementById("typing").textContent === "", null, {
    timeout: WAIT,
  });
  // Nothing of it is in the room's history: only the two chat lines.
  const room = await api(nodes[0], "GET", "/v1/channels/room:lobby/history");
  assert.deepEqual(
    room.messages.map((m) => m.data.kind),
    ["chat", "chat"],
    "typing indicators are not stored",
  );
  await dora.fill("#chat-text", "");
  await dora.screenshot({ path: `${config.artifacts}/demo-dora.png`, fullPage: true }).catch(() => {});
  await eve.screenshot({ path: `${config.artifacts}/demo-eve.png`, fullPage: true }).catch(() => {});

  // A node without dev mode: /dev/token is 404, the page says so and takes a token.
  say("scenario 3b: a node without dev mode");
  const frank = await demoPage(browser, plain, "frank");
  await frank.waitForSelector("#token-why:not([hidden])", { timeout: WAIT });
  assert.match(await frank.textContent("#token-why"), /not in dev mode.*404/s);
  assert.equal(await frank.isVisible("#token-input"), true);
  await frank.fill("#token-input", plain.token);
  await frank.click("#token-form button");
  await frank.waitForSelector("#state.state-connected", { timeout: WAIT });
  await frank.waitForFunction((id) => document.getElementById("node").textContent === id, plain.id, {
    timeout: WAIT,
  });
  assert.equal(await frank.textContent("#me"), "frank");

  // "Ask /v1/connect": the page connects to whichever node is least loaded.
  const gus = await demoPage(browser, nodes[0], "gus", "&connect=1");
  await gus.waitForSelector("#state.state-connected", { timeout: WAIT });
  const gusNode = await gus.textContent("#node");
  const chosen = nodes.find((n) => n.id === gusNode);
  assert.ok(chosen, `gus is on a node of the cluster: ${gusNode}`);
  assert.equal(await gus.textContent("#url"), `ws://${new URL(chosen.http).host}/ws`);
  say(`gus: /v1/connect chose ${gusNode}`);

  // The state shown follows the connection: sign out closes it, and eve sees dora go
  // offline (kept in the list, marked offline, and said in the room's feed).
  await dora.click("#sign-out");
  assert.equal(await dora.textContent("#state"), "signed out");
  await eve.waitForFunction(
    () => document.querySelector('#presence li[data-user="dora"]')?.dataset.status === "offline",
    null,
    { timeout: WAIT },
  );
  assert.match(await eve.textContent("#chat"), /dora went offline/);
  // dora signs in again: online again, live.
  await dora.fill("#user-name", "dora");
  await dora.click("#sign-in-form button");
  await eve.waitForFunction(
    () => document.querySelector('#presence li[data-user="dora"]')?.dataset.status === "online",
    null,
    { timeout: WAIT },
  );
  assert.match(await eve.textContent("#chat"), /dora is online/);
  await eve.screenshot({ path: `${config.artifacts}/demo-eve-presence.png`, fullPage: true }).catch(() => {});
}

// ---- scenario 4: heartbeats and token refresh -----------------------------------------------

async function heartbeatAndToken(browser) {
  say("scenario 4: ping/pong with a 500 ms heartbeat; a refused token is asked for again");
  const page = await testPage(browser, plain, "plain");
  const result = await within(
    page.evaluate(async (good) => {
      let calls = 0;
      // The first token is refused (4401); the client must ask again and go on.
      const getToken = async () => (++calls === 1 ? "not-a-jwt" : good);
      const c = H.make("frank-lib", { url: "/ws", getToken, backoffMaxMs: 500 });
      const welcome = await c.connect();
      // Several heartbeat periods: the node pings, the client must answer, or 4408.
      await new Promise((r) => setTimeout(r, 2_500));
      const report = H.report("frank-lib");
      c.close();
      return { calls, heartbeat: welcome.heartbeat_ms, report, closed: c.state };
    }, plain.token),
    "a client on the plain node",
  );
  assert.equal(result.heartbeat, 500, "the node's heartbeat_ms");
  assert.equal(result.calls, 2, "getToken asked again after 4401");
  assert.deepEqual(result.report.disconnects, [4401], "no 4408: every ping was answered");
  assert.equal(result.report.nodes.length, 1, "one welcome");
  assert.equal(result.report.state, "connected");
  assert.equal(result.closed, "closed");
  assert.deepEqual(result.report.states, [
    "connecting",
    "disconnected",
    "connecting",
    "connected",
    "closed",
  ]);
}

// ---- scenario 5: frames no real node sends (a fake socket in the page) --------------------

async function fakeFrames(page) {
  say("scenario 5: odd and hostile frames, v1.1 frames, refresh, kicked (fake socket)");
  const out = await within(page.evaluate(() => H.fakeChecks()), "the fake-socket checks");
  say(`fake socket: ${out.odd} odd frames skipped, delivery went on`);
}

// ---- scenario 6: token refresh and kicks on a real node ------------------------------------

/** An HS256 token signed with the nodes' secret (the page cannot sign: it gets these). */
function mintToken(user, ttlSecs) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const head = b64({ alg: "HS256", typ: "JWT" });
  const exp = Math.floor(Date.now() / 1000) + ttlSecs;
  const body = b64({ sub: user, exp, channels: ["*"], publish: ["*"] });
  const sig = createHmac("sha256", config.secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

async function refreshAndKick(page) {
  say("scenario 6: 4 s tokens refreshed in one session; disconnect 4401 and kick 4410 via the API");
  const node = nodes[1];
  await page.exposeFunction("mintToken", mintToken);
  await within(
    page.evaluate(async (url) => {
      const getToken = () => globalThis.mintToken("rita", 4);
      await H.make("rita", { url, getToken, backoffMaxMs: 500 }).connect();
    }, `ws://${new URL(node.http).host}/ws`),
    "rita connects",
  );
  // Pushes while the session outlives two tokens (each refreshed at half its life).
  let pushed = 0;
  const deadline = Date.now() + WAIT;
  while ((await page.evaluate(() => H.report("rita").refreshed)) < 2) {
    assert.ok(Date.now() < deadline, "timed out waiting for two refreshes");
    await publish("user:rita", { n: pushed++ });
    await sleep(200);
  }
  const end = await latest("user:rita");
  await waitLast(page, "rita", "user:rita", end.offset);
  let rita = await page.evaluate(() => H.report("rita"));
  assertExact(rita, "user:rita", 1, end.offset);
  assert.equal(rita.nodes.length, 1, "one session across the token expiries");
  assert.deepEqual(rita.disconnects, [], "no disconnect");
  say(`rita: ${rita.refreshed} refreshes, ${pushed} messages, one session`);

  assert.equal((await api(node, "POST", "/v1/users/rita/disconnect", { reconnect: true })).sessions, 1);
  await waitIn(page, () => H.report("rita").nodes.length === 2, null, "rita back after 4401");
  assert.equal(await page.evaluate(() => H.client("rita").state), "connected");
  assert.equal((await api(node, "POST", "/v1/users/rita/disconnect", { reconnect: false })).sessions, 1);
  await waitIn(page, () => H.client("rita").state === "closed", null, "rita stopped by the kick");
  await sleep(500); // a reconnect would be under way by now (backoff ≤ 500 ms)
  rita = await page.evaluate(() => H.report("rita"));
  assert.deepEqual(rita.disconnects, [4401], "4401, then the kick (no disconnect event)");
  assert.deepEqual(rita.kicked.map((k) => k.code), [4410]);
  assert.equal(rita.nodes.length, 2, "no reconnect after the kick");
  assert.deepEqual(rita.errors.filter((e) => e.fatal), [], "a kick is not an error");
}

// ---- scenario 7: ephemeral messages -------------------------------------------------------

async function ephemeral(page) {
  say("scenario 7: ephemeral messages across nodes, apart from the stream");
  const wsUrls = nodes.map((n) => `ws://${new URL(n.http).host}/ws`);
  const result = await within(
    page.evaluate(async ([urlA, urlB]) => {
      const devToken = async (user) => (await (await fetch(`/dev/token?user=${user}`)).json()).token;
      const ivy = H.make("ivy", { url: urlA, token: await devToken("ivy") });
      const jay = H.make("jay", { url: urlB, token: await devToken("jay") });
      // Never connected: an ephemeral is refused at once, not queued.
      const idle = H.make("kim", { url: urlA, token: await devToken("kim") });
      const offline = await H.attempt(idle.publish("room:eph", 1, { ephemeral: true }));
      idle.close();
      await ivy.connect();
      await jay.connect();
      await jay.subscribe("room:eph");
      const first = await ivy.publish("room:eph", { n: 1 });
      const eph = await ivy.publish("room:eph", { typing: true }, { ephemeral: true });
      const second = await ivy.publish("room:eph", { n: 2 });
      return { offline, first, eph, second };
    }, [wsUrls[0], wsUrls[2]]),
    "ivy and jay connect, publish",
  );
  assert.equal(result.offline.ok, false);
  assert.equal(result.offline.code, "disconnected");
  assert.deepEqual(result.eph, { ephemeral: true });
  assert.equal(result.second.offset, result.first.offset + 1, "the ephemeral took no offset");
  // From the backend through another node, with its own `from`.
  const r = await api(nodes[1], "POST", "/v1/publish", {
    channel: "room:eph",
    data: { x: 1 },
    ephemeral: true,
    from: "bot",
  });
  assert.deepEqual(r, { channel: "room:eph", ephemeral: true });
  await waitIn(page, () => H.report("jay").ephemerals.length >= 2, null, "jay's two ephemerals");
  await waitLast(page, "jay", "room:eph", result.second.offset);
  const jay = await page.evaluate(() => H.report("jay"));
  assert.deepEqual(jay.ephemerals, [
    ["room:eph", "ivy", { typing: true }],
    ["room:eph", "bot", { x: 1 }],
  ]);
  assertExact(jay, "room:eph", 1, result.second.offset);
  assert.equal(jay.positions["room:eph"].offset, result.second.offset, "position untouched");
  assert.deepEqual(jay.resyncs, [], "no resync");
  await page.evaluate(() => {
    H.client("ivy").close();
    H.client("jay").close();
  });
}

// ---- scenario 8: delivery receipts (auto-ack and manual ack) -------------------------------

/** Polls `GET /v1/users/{user}/unread` until `acked` is `want`. */
async function waitAcked(node, user, want) {
  const deadline = Date.now() + WAIT;
  for (;;) {
    const u = await api(node, "GET", `/v1/users/${user}/unread`);
    if (u.acked === want) return u;
    assert.ok(Date.now() < deadline, `${user}: acked ${u.acked}, want ${want}`);
    await sleep(100);
  }
}

async function receipts(page) {
  say("scenario 8: herald.js acks the personal channel on its own; autoAck:false acks by hand");
  const node = nodes[2];
  const url = `ws://${new URL(node.http).host}/ws`;
  await within(
    page.evaluate(async (url) => {
      await H.make("ana", { url, getToken: () => globalThis.mintToken("ana", 600) }).connect();
      await H.make("ben", {
        url,
        getToken: () => globalThis.mintToken("ben", 600),
        autoAck: false,
      }).connect();
    }, url),
    "ana and ben connect",
  );
  let last;
  for (let i = 0; i < 10; i++) last = await publish("user:ana", { n: i });
  for (let i = 0; i < 3; i++) await publish("user:ben", { n: i });
  await waitLast(page, "ana", "user:ana", last.offset);
  await waitLast(page, "ben", "user:ben", 3);
  const ana = await waitAcked(node, "ana", last.offset);
  assert.deepEqual(ana.messages, [], "ana: nothing unread once auto-acked");

  await sleep(500); // several auto-ack delays: ben acks nothing by himself
  assert.equal((await api(node, "GET", "/v1/users/ben/unread")).acked, 0);
  const ok = await page.evaluate(() => H.attempt(H.client("ben").ack(2)));
  assert.ok(ok.ok, `ben.ack(2): ${JSON.stringify(ok)}`);
  const ben = await waitAcked(node, "ben", 2);
  assert.deepEqual(ben.messages.map((m) => m.offset), [3]);
  const bad = await page.evaluate(() => H.attempt(H.client("ben").ack(99)));
  assert.equal(bad.code, "bad_request", `ben.ack(99): ${JSON.stringify(bad)}`);
  say("ana auto-acked, ben acked by hand");
}

// ---- main ------------------------------------------------------------------------------

async function main() {
  assert.ok(
    Array.isArray(nodes) && nodes.length === 3 && config.historySize > 0,
    "argv[2]: {nodes: [3], plain, apiKey, historySize, artifacts}",
  );
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    // Playwright gives every launch a fresh temporary --user-data-dir.
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
    timeout: WAIT,
  });
  try {
    say(`chromium ${browser.version()}`);
    const page = await nodeFailures(browser);
    await fakeFrames(page);
    await demo(browser);
    await lossReported(page);
    await refreshAndKick(page);
    await ephemeral(page);
    await receipts(page);
    await heartbeatAndToken(browser);
  } finally {
    await browser.close();
  }
  say("all checks passed");
  process.stdout.write("@@pass\n");
}

main().then(
  () => process.exit(0),
  (e) => {
    process.stderr.write(`browser test failed: ${e?.stack ?? e}\n`);
    process.exit(1);
  },
);
