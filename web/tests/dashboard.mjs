// Browser test of the cluster dashboard (/admin) in headless Chromium (Debian's package)
// driven by playwright-core. Run by server/tests/dashboard.rs, which starts Redis and
// three nodes, holds two WebSockets of one user on two of them, and passes the cluster
// as JSON in argv[2]: {apiKey, nodes: [{id, http}], user, userNodes, artifacts}.
//
// Like browser.mjs, the script asks the Rust side for things by printing `@@<command>`
// and waiting for `ok` on stdin: `@@kicked` (check that the user's sockets closed with
// 4410), `@@kill i` (SIGKILL node i). `@@pass` at the end says every check held.
//
// Usage by hand, for a screenshot of a running cluster (no Rust side, no kick, no kill):
//   node dashboard.mjs '{"apiKey":"…","nodes":[{"id":"a","http":"http://127.0.0.1:8080"}],
//     "screenshot":"/tmp/dashboard.png","lingerMs":20000,"lookUp":"user-1"}'

import { createInterface } from "node:readline";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const config = JSON.parse(process.argv[2] ?? "{}");
const { nodes, apiKey, user, userNodes } = config;
const CHROMIUM = process.env.HERALD_CHROMIUM || "/usr/bin/chromium";
/** Every wait is bounded; generous because the machine may be busy. */
const WAIT = 30_000;
const started = Date.now();

function say(text) {
  process.stdout.write(`[dashboard ${((Date.now() - started) / 1000).toFixed(1)}s] ${text}\n`);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- talking to the Rust side ----------------------------------------------------------

const lines = [];
const lineWaiters = [];
createInterface({ input: process.stdin }).on("line", (line) => {
  const w = lineWaiters.shift();
  if (w) w(line);
  else lines.push(line);
});

async function control(command) {
  say(`asking: ${command}`);
  process.stdout.write(`@@${command}\n`);
  const line = lines.length > 0 ? lines.shift() : await new Promise((r) => lineWaiters.push(r));
  assert.equal(line.trim(), "ok", `${command}: ${line}`);
}

// ---- the API, from outside the page ----------------------------------------------------

async function api(node, method, path, body) {
  const r = await fetch(`${node.http}${path}`, {
    method,
    headers: { Authorization: `Bearer ${apiKey}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: AbortSignal.timeout(5_000),
  });
  const json = await r.json();
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${JSON.stringify(json)}`);
  return json;
}

// ---- page helpers ----------------------------------------------------------------------

const text = (page, selector) => page.locator(selector).first().textContent({ timeout: WAIT });

/** Waits until `fn(arg)` holds in the page. */
const waitIn = (page, fn, arg, what) =>
  page.waitForFunction(fn, arg, { timeout: WAIT, polling: 100 }).catch((e) => {
    throw new Error(`timed out waiting for ${what}: ${e.message.split("\n")[0]}`);
  });

/** The node ids in the table. */
const tableNodes = (page) =>
  page.$$eval("#nodes tbody tr", (rows) => rows.map((r) => r.dataset.node).sort());

async function signIn(page, key) {
  await page.fill("#api-key", key);
  await page.click("#sign-in-form button[type=submit]");
}

// ---- the scenario ----------------------------------------------------------------------

async function wrongKey(page) {
  say("a wrong key shows a clear message");
  await page.goto(`${nodes[0].http}/admin`);
  await signIn(page, "not-the-key");
  await page.locator("#sign-in-error").waitFor({ state: "visible", timeout: WAIT });
  const message = await text(page, "#sign-in-error");
  assert.match(message, /refused the API key \(401/, message);
  assert.equal(await page.locator("#app").isVisible(), false, "no dashboard without the key");
  assert.equal(await page.evaluate(() => sessionStorage.length), 0, "a refused key is not kept");
}

async function signedIn(page) {
  say("sign in: every node of the registry is in the table");
  await signIn(page, apiKey);
  await page.locator("#app").waitFor({ state: "visible", timeout: WAIT });
  assert.equal(await page.locator("#sign-in-error").isVisible(), false);
  const want = nodes.map((n) => n.id).sort();
  await waitIn(
    page,
    (ids) => [...document.querySelectorAll("#nodes tbody tr")].map((r) => r.dataset.node).sort().join() === ids.join(),
    want,
    `the table to list ${want}`,
  );
  // The key is in this tab's sessionStorage, not in localStorage.
  assert.equal(await page.evaluate(() => sessionStorage.getItem("herald-admin-key")), apiKey);
  assert.equal(await page.evaluate(() => localStorage.length), 0);
  // A node's row carries the figures from its heartbeat.
  const row = await page.$eval(`#nodes tr[data-node="${nodes[0].id}"]`, (tr) =>
    Object.fromEntries([...tr.cells].map((c) => [c.className.replace("num ", ""), c.textContent])),
  );
  say(`row of ${nodes[0].id}: ${JSON.stringify(row)}`);
  assert.match(row.rss, /MiB|KiB|GiB/, "RSS shown");
  assert.match(row.fds, /^\d+$/, "descriptors shown");
  assert.equal(row.state, "live");
  assert.ok(row.url.startsWith("ws://"), row.url);
  if (user) {
    // kim's personal channel is subscribed on the two nodes that hold her sockets.
    await waitIn(
      page,
      (id) => document.querySelector(`#nodes tr[data-node="${id}"] td.channels`)?.textContent === "1",
      userNodes[0],
      "a session's channel counted",
    );
  }
}

async function countersMove(page) {
  say("the counters move under load");
  const before = Number((await text(page, "#total-published")).replace(/,/g, ""));
  let publishing = true;
  let sent = 0;
  const load = (async () => {
    while (publishing) {
      const node = nodes[sent % nodes.length];
      // To the user when there is one (deliveries on two nodes), else to a channel.
      const body = user ? { user, data: { n: sent } } : { channel: "dashboard:load", data: { n: sent } };
      await api(node, "POST", "/v1/publish", body);
      sent++;
      await sleep(20);
    }
  })();
  try {
    // Deliveries need a subscriber: the user's sockets, when the Rust side holds them.
    await waitIn(
      page,
      (deliveries) => {
        const n = (id) => Number(document.getElementById(id).textContent.replace(/,/g, ""));
        return n("total-pub-rate") > 0 && (!deliveries || n("total-del-rate") > 0);
      },
      Boolean(user),
      "non-zero publish and delivery rates",
    );
  } finally {
    publishing = false;
    await load;
  }
  const after = Number((await text(page, "#total-published")).replace(/,/g, ""));
  say(`published ${sent}; page: total published ${before} → ${after}, ` +
    `${await text(page, "#total-pub-rate")} pub/s, ${await text(page, "#total-del-rate")} deliv/s`);
  assert.ok(after > before, "the total of published messages grew");
  // The charts are drawn (something other than the background on the canvas).
  const inked = await page.$eval("#chart-pub", (c) => {
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let n = 0;
    for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
    return n;
  });
  assert.ok(inked > 100, `the publish chart is drawn (${inked} pixels)`);
}

async function lookUpChannel(page) {
  say("look up a channel, publish a test message to it");
  const channel = "room:dash";
  await api(nodes[1], "POST", "/v1/publish", { channel, data: { html: "<b>not bold</b>" } });
  await page.fill("#channel-input", channel);
  await page.click("#channel-form button");
  await page.locator("#channel-result").waitFor({ state: "visible", timeout: WAIT });
  assert.equal(await text(page, "#channel-offset"), "1");
  assert.ok((await text(page, "#channel-epoch")).length > 0);
  // Untrusted data is shown as text.
  assert.match(await text(page, "#channel-history li"), /<b>not bold<\/b>/);
  assert.equal(await page.locator("#channel-history b").count(), 0, "no markup from data");
  await page.click("#publish-form button");
  await waitIn(
    page,
    () => /published: offset 2/.test(document.getElementById("publish-answer").textContent),
    null,
    "the test message's offset",
  );
  await waitIn(
    page,
    () => document.querySelector("#channel-history li")?.textContent.includes("test from the dashboard"),
    null,
    "the test message at the top of the history",
  );
  assert.equal(await text(page, "#channel-offset"), "2");
}

async function lookUpUser(page) {
  say(`look up ${user}: online on ${userNodes}`);
  const want = [...userNodes].sort().join();
  const deadline = Date.now() + WAIT;
  for (;;) {
    await page.fill("#user-input", user);
    await page.click("#user-form button");
    await page.locator("#user-result").waitFor({ state: "visible", timeout: WAIT });
    const shown = await page.$$eval("#user-nodes tbody tr", (rows) =>
      rows.map((r) => `${r.dataset.node}=${r.cells[1].textContent}`),
    );
    if (shown.map((s) => s.split("=")[0]).sort().join() === want) {
      assert.deepEqual(shown.map((s) => s.split("=")[1]), ["1", "1"], "one session on each node");
      break;
    }
    assert.ok(Date.now() < deadline, `user presence never showed ${want}: ${shown}`);
    await sleep(200);
  }
  assert.equal(await text(page, "#user-online"), "online");
  assert.equal(await text(page, "#user-connections"), "2");
}

async function kick(page) {
  say(`kick ${user}`);
  await page.click("#user-kick");
  await waitIn(
    page,
    () => !document.getElementById("user-answer").hidden || !document.getElementById("user-error").hidden,
    null,
    "the kick's answer",
  );
  const error = await page.locator("#user-error").isVisible();
  assert.ok(!error, `the page says: ${await text(page, "#user-error")}`);
  const answer = await text(page, "#user-answer");
  say(`page says: ${answer}`);
  assert.match(answer, /"sessions":2/, answer);
  await control("kicked");
  // The page looks the user up again after a kick: now offline.
  await waitIn(
    page,
    () => document.getElementById("user-online").textContent === "offline",
    null,
    `${user} offline after the kick`,
  );
}

async function nodeVanishes(page) {
  const gone = nodes[2];
  say(`node ${gone.id} dies: it leaves the table`);
  await control("kill 2");
  const want = nodes.slice(0, 2).map((n) => n.id).sort();
  await waitIn(
    page,
    (ids) => [...document.querySelectorAll("#nodes tbody tr")].map((r) => r.dataset.node).sort().join() === ids.join(),
    want,
    `the table to list only ${want}`,
  );
  assert.deepEqual(await tableNodes(page), want);
}

async function screenshot(page, path) {
  // Let the charts gather a few more points first when asked (by hand).
  if (config.lingerMs) await sleep(config.lingerMs);
  await page.screenshot({ path, fullPage: false });
  say(`screenshot: ${path}`);
}

// ---- main ------------------------------------------------------------------------------

async function main() {
  assert.ok(Array.isArray(nodes) && nodes.length > 0 && apiKey, "argv[2]: {apiKey, nodes: [...]}");
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
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
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const page = await context.newPage();
    page.on("pageerror", (e) => say(`page error: ${e.message}`));
    page.on("console", (m) => {
      // The refused key's 401 is expected.
      if (m.type() === "error" && !m.text().includes("401")) say(`console: ${m.text()}`);
    });
    await wrongKey(page);
    await signedIn(page);
    await countersMove(page);
    await lookUpChannel(page);
    if (user) {
      await lookUpUser(page);
      if (config.artifacts) await screenshot(page, `${config.artifacts}/dashboard.png`);
      await kick(page);
      await nodeVanishes(page);
    }
    if (config.screenshot) {
      if (config.lookUp) {
        // By hand: show one user in the screenshot.
        await page.fill("#user-input", config.lookUp);
        await page.click("#user-form button");
        await page.locator("#user-result").waitFor({ state: "visible", timeout: WAIT });
      }
      await screenshot(page, config.screenshot);
    }
  } finally {
    await browser.close();
  }
  say("all checks passed");
  process.stdout.write("@@pass\n");
}

main().then(
  () => process.exit(0),
  (e) => {
    process.stderr.write(`dashboard test failed: ${e?.stack ?? e}\n`);
    process.exit(1);
  },
);
