// The cluster dashboard (served at /admin.js for the page /admin).
//
// Everything comes from the node's documented server API, called on this origin with the
// API key as `Authorization: Bearer`. The key is kept in this tab's sessionStorage only:
// it survives a reload, not the tab. Every value from the API is written with
// textContent, never as HTML: user ids, channel names and message data are untrusted.

const KEY = "herald-admin-key";
/** How often the node list is polled. */
const POLL_MS = 2000;
/** Samples kept for the charts: 5 minutes of 2 s samples. */
const KEEP = 150;
const WINDOW_MS = KEEP * POLL_MS;
/** Every API call gives up after this long. */
const TIMEOUT_MS = 5000;
/** Messages shown of a channel's history. */
const LAST_MESSAGES = 20;
/** Line colours of the nodes in the charts (the total is drawn in ink). */
const PALETTE = ["#3657d6", "#16794c", "#d9480f", "#7c3aed", "#0e7490", "#c2255c", "#a15c00", "#5c940d"];

const $ = (id) => document.getElementById(id);

/** An API error with the HTTP status and the server's message. */
class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Calls the API with the key; the parsed JSON answer, or an ApiError. */
async function api(method, path, body) {
  const key = sessionStorage.getItem(KEY) ?? "";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(TIMEOUT_MS),
      cache: "no-store",
    });
  } catch (e) {
    throw new ApiError(0, `this node did not answer (${e.name === "TimeoutError" ? "timeout" : e.message})`);
  }
  let json = null;
  try {
    json = await response.json();
  } catch {
    // Not JSON: a balancer's error page, for example.
  }
  if (!response.ok) {
    if (response.status === 401) signOut("The node refused the API key (401 unauthorized). Check HERALD_API_KEY and sign in again.");
    throw new ApiError(response.status, json?.error?.message ?? `HTTP ${response.status}`);
  }
  return json;
}

// ---- formatting ------------------------------------------------------------------------

const int = (n) => (Number.isFinite(n) ? Math.round(n).toLocaleString("en-US") : "–");
const rate = (n) => (n == null ? "–" : n < 10 ? n.toFixed(1) : int(n));
function bytes(n) {
  if (!Number.isFinite(n) || n <= 0) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

/**
 * Per-second rate of a counter between two samples of one node, on the node's own clock
 * (`sampled_at_ms`); null when there is no earlier sample, or the counter went back
 * (the node restarted).
 */
function perSecond(prev, cur, field) {
  if (!prev || !cur.sampled_at_ms || cur.sampled_at_ms <= prev.sampled_at_ms) return null;
  const delta = cur[field] - prev[field];
  if (!(delta >= 0)) return null;
  return (delta * 1000) / (cur.sampled_at_ms - prev.sampled_at_ms);
}

// ---- state -----------------------------------------------------------------------------

/** node id → {sample: the last registry entry with a new sampled_at_ms, rates} */
const known = new Map();
/** node id → colour, kept while the page lives so a node keeps its colour. */
const colours = new Map();
/** Chart samples, oldest first: {t, nodes: {id: {connections, pub, del}}, total: {…}} */
let samples = [];
let timer = null;
let polling = false;

function colour(id) {
  if (!colours.has(id)) colours.set(id, PALETTE[colours.size % PALETTE.length]);
  return colours.get(id);
}

// ---- signing in and out ----------------------------------------------------------------

function showSignedIn(on) {
  $("sign-in").hidden = on;
  $("app").hidden = !on;
  $("sign-out").hidden = !on;
  if (!on) setState("signed out", "state-closed");
}

function setState(text, cls) {
  const s = $("state");
  s.textContent = text;
  s.className = `pill ${cls}`;
}

/** Forgets the key and shows the sign-in form, with `why` when there is one. */
function signOut(why) {
  sessionStorage.removeItem(KEY);
  clearTimeout(timer);
  timer = null;
  known.clear();
  samples = [];
  showSignedIn(false);
  $("updated").textContent = "";
  const error = $("sign-in-error");
  error.textContent = why ?? "";
  error.hidden = !why;
  $("api-key").value = "";
}

async function signIn(key) {
  if (!/^[\x20-\x7e]+$/.test(key)) {
    // fetch() refuses such a header; say so rather than "the node did not answer".
    signOut("An API key is printable ASCII: check what was pasted.");
    return;
  }
  sessionStorage.setItem(KEY, key);
  try {
    await api("GET", "/v1/nodes");
  } catch (e) {
    if (e.status !== 401) {
      // Not a key problem (the node or Redis is down): keep the key and say what happened.
      showSignedIn(true);
      showAppError(`Signed in, but ${e.message}`);
      schedule(0);
    }
    return;
  }
  $("sign-in-error").hidden = true;
  showSignedIn(true);
  schedule(0);
}

function showAppError(text) {
  const e = $("app-error");
  e.textContent = text ?? "";
  e.hidden = !text;
}

// ---- the node table and totals ---------------------------------------------------------

function schedule(ms) {
  clearTimeout(timer);
  timer = setTimeout(poll, ms);
}

async function poll() {
  if (polling || !sessionStorage.getItem(KEY)) return;
  polling = true;
  try {
    const answer = await api("GET", "/v1/nodes");
    update(answer.nodes ?? []);
    showAppError(null);
    setState("live", "state-live");
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    if (e.status === 401) return; // signed out already
    setState("stale", "state-stale");
    showAppError(`Could not refresh: ${e.message}`);
  } finally {
    polling = false;
  }
  if (sessionStorage.getItem(KEY)) schedule(POLL_MS);
}

/** Takes a `/v1/nodes` answer: rates from the previous samples, table, totals, charts. */
function update(nodes) {
  const live = new Set(nodes.map((n) => n.id));
  for (const id of [...known.keys()]) if (!live.has(id)) known.delete(id);
  const point = { t: Date.now(), nodes: {}, total: { connections: 0, pub: 0, del: 0 } };
  const totals = { subscriptions: 0, published: 0, delivered: 0, pubKnown: false, delKnown: false };
  for (const n of nodes) {
    const entry = known.get(n.id);
    let state = entry ?? { sample: null, pub: null, del: null, cpu: null };
    if (!entry || (n.sampled_at_ms ?? 0) > (entry.sample?.sampled_at_ms ?? 0)) {
      // A new heartbeat since the last poll (otherwise keep the last rates).
      const prev = entry?.sample;
      state = {
        sample: n,
        pub: perSecond(prev, n, "messages_published_total"),
        del: perSecond(prev, n, "messages_delivered_total"),
        cpu: perSecond(prev, n, "cpu_seconds"),
      };
    }
    known.set(n.id, state);
    point.nodes[n.id] = { connections: n.connections, pub: state.pub, del: state.del };
    point.total.connections += n.connections ?? 0;
    point.total.pub += state.pub ?? 0;
    point.total.del += state.del ?? 0;
    totals.pubKnown ||= state.pub != null;
    totals.delKnown ||= state.del != null;
    totals.subscriptions += n.subscriptions ?? 0;
    totals.published += n.messages_published_total ?? 0;
    totals.delivered += n.messages_delivered_total ?? 0;
  }
  samples.push(point);
  while (samples.length > KEEP) samples.shift();
  renderTable(nodes);
  $("total-nodes").textContent = nodes.length;
  $("total-connections").textContent = int(point.total.connections);
  $("total-subscriptions").textContent = int(totals.subscriptions);
  $("total-pub-rate").textContent = totals.pubKnown ? rate(point.total.pub) : "–";
  $("total-del-rate").textContent = totals.delKnown ? rate(point.total.del) : "–";
  $("total-published").textContent = int(totals.published);
  $("total-delivered").textContent = int(totals.delivered);
  renderLegend(nodes);
  drawCharts(nodes);
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.append(td);
  return td;
}

function renderTable(nodes) {
  const body = $("nodes").tBodies[0];
  const rows = nodes.map((n) => {
    const s = known.get(n.id);
    const tr = document.createElement("tr");
    tr.dataset.node = n.id;
    const id = cell(tr, "", "id");
    const chip = document.createElement("i");
    chip.className = "chip";
    chip.style.background = colour(n.id);
    id.append(chip, document.createTextNode(n.id));
    cell(tr, n.url, "url");
    cell(tr, int(n.connections), "num connections");
    cell(tr, int(n.subscriptions), "num subscriptions");
    cell(tr, int(n.channels), "num channels");
    cell(tr, bytes(n.rss_bytes), "num rss");
    const cpu = cell(tr, s?.cpu == null ? "–" : `${(s.cpu * 100).toFixed(1)} %`, "num cpu");
    cpu.title = `${(n.cpu_seconds ?? 0).toFixed(1)} s of CPU since start`;
    cell(tr, int(n.open_fds), "num fds");
    cell(tr, rate(s?.pub), "num pub-rate");
    cell(tr, rate(s?.del), "num del-rate");
    cell(tr, int(n.messages_published_total), "num published");
    cell(tr, int(n.messages_delivered_total), "num delivered");
    const state = cell(tr, "", "state");
    const pill = document.createElement("span");
    pill.className = `pill ${n.draining ? "draining" : "online"}`;
    pill.textContent = n.draining ? "draining" : "live";
    state.append(pill);
    return tr;
  });
  body.replaceChildren(...rows);
}

function renderLegend(nodes) {
  const items = [...nodes.map((n) => [n.id, colour(n.id)]), ["total", "#1d2330"]].map(([name, c]) => {
    const span = document.createElement("span");
    const line = document.createElement("i");
    line.style.background = c;
    span.append(line, document.createTextNode(name));
    return span;
  });
  $("legend").replaceChildren(...items);
}

// ---- charts ----------------------------------------------------------------------------

function drawCharts(nodes) {
  const ids = nodes.map((n) => n.id);
  drawChart($("chart-connections"), ids, "connections");
  drawChart($("chart-pub"), ids, "pub");
  drawChart($("chart-del"), ids, "del");
}

/** One line per live node and one for the total, over the last WINDOW_MS. */
function drawChart(canvas, ids, field) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (width === 0 || height === 0) return;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  const pad = { left: 6, right: 6, top: 16, bottom: 14 };
  const now = Date.now();
  const series = [
    ...ids.map((id) => ({ colour: colour(id), lineWidth: 1.5, value: (p) => p.nodes[id]?.[field] })),
    { colour: "#1d2330", lineWidth: 2.5, value: (p) => p.total[field] },
  ];
  let max = 0;
  for (const p of samples) for (const s of series) max = Math.max(max, s.value(p) ?? 0);
  max = niceCeiling(max);
  const x = (t) => pad.left + ((t - (now - WINDOW_MS)) / WINDOW_MS) * (width - pad.left - pad.right);
  const y = (v) => height - pad.bottom - (v / max) * (height - pad.top - pad.bottom);
  // Grid: the top line with its value, the zero line, the time span.
  g.strokeStyle = "#dde1e7";
  g.lineWidth = 1;
  g.beginPath();
  g.moveTo(pad.left, y(max));
  g.lineTo(width - pad.right, y(max));
  g.moveTo(pad.left, y(0));
  g.lineTo(width - pad.right, y(0));
  g.stroke();
  g.fillStyle = "#667085";
  g.font = "11px system-ui, sans-serif";
  g.textBaseline = "bottom";
  g.fillText(int(max), pad.left, y(max) - 1);
  g.textBaseline = "top";
  g.fillText("−5 min", pad.left, y(0) + 1);
  const nowLabel = "now";
  g.fillText(nowLabel, width - pad.right - g.measureText(nowLabel).width, y(0) + 1);
  for (const s of series) {
    g.strokeStyle = s.colour;
    g.lineWidth = s.lineWidth;
    g.lineJoin = "round";
    g.beginPath();
    let drawing = false;
    for (const p of samples) {
      const v = s.value(p);
      if (v == null) {
        drawing = false; // a gap: the node was not there, or no rate yet
        continue;
      }
      if (drawing) g.lineTo(x(p.t), y(v));
      else g.moveTo(x(p.t), y(v));
      drawing = true;
    }
    g.stroke();
  }
}

/** 1, 2 or 5 times a power of ten, at least `v` (and at least 1). */
function niceCeiling(v) {
  if (v <= 1) return 1;
  const power = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 5, 10]) if (m * power >= v) return m * power;
  return 10 * power;
}

// ---- user ------------------------------------------------------------------------------

let currentUser = null;

async function lookUpUser(user) {
  const error = $("user-error");
  error.hidden = true;
  try {
    const p = await api("GET", `/v1/users/${encodeURIComponent(user)}/presence`);
    currentUser = p.user;
    $("user-name").textContent = p.user;
    const online = $("user-online");
    online.textContent = p.online ? "online" : "offline";
    online.className = `pill ${p.online ? "online" : "offline"}`;
    $("user-connections").textContent = p.connections;
    const rows = Object.entries(p.nodes ?? {}).map(([node, n]) => {
      const tr = document.createElement("tr");
      tr.dataset.node = node;
      cell(tr, node);
      cell(tr, String(n), "num");
      return tr;
    });
    $("user-nodes").tBodies[0].replaceChildren(...rows);
    $("user-nodes").hidden = rows.length === 0;
    $("user-result").hidden = false;
  } catch (e) {
    if (e.status === 401) return;
    $("user-result").hidden = true;
    error.textContent = e.message;
    error.hidden = false;
  }
}

/** Disconnects (`reconnect: true`, close 4401) or kicks (`false`, close 4410) the user. */
async function disconnectUser(reconnect) {
  if (!currentUser) return;
  const user = currentUser;
  const answer = $("user-answer");
  const error = $("user-error");
  error.hidden = true;
  answer.hidden = true;
  try {
    const a = await api("POST", `/v1/users/${encodeURIComponent(user)}/disconnect`, { reconnect });
    answer.textContent = `${reconnect ? "disconnected" : "kicked"} ${user}: ${JSON.stringify(a)}`;
    answer.hidden = false;
  } catch (e) {
    if (e.status === 401) return;
    error.textContent = `${reconnect ? "disconnect" : "kick"} failed: ${e.message}`;
    error.hidden = false;
    return;
  }
  // Presence follows within a flush interval (100 ms) of the sockets closing.
  setTimeout(() => lookUpUser(user), 500);
}

// ---- channel ---------------------------------------------------------------------------

let currentChannel = null;

async function lookUpChannel(channel) {
  const error = $("channel-error");
  error.hidden = true;
  try {
    const path = `/v1/channels/${encodeURIComponent(channel)}`;
    const [presence, head] = await Promise.all([
      api("GET", `${path}/presence`),
      api("GET", `${path}/history?limit=0`),
    ]);
    const since = Math.max(0, head.offset - LAST_MESSAGES);
    const history = await api("GET", `${path}/history?since=${since}&limit=${LAST_MESSAGES}`);
    currentChannel = channel;
    $("channel-offset").textContent = history.offset;
    $("channel-epoch").textContent = history.epoch;
    const users = Object.entries(presence.users ?? {}).map(([user, n]) => {
      const li = document.createElement("li");
      li.textContent = `${user} (${n})`;
      return li;
    });
    if (users.length === 0) {
      const li = document.createElement("li");
      li.textContent = "nobody";
      users.push(li);
    }
    $("channel-presence").replaceChildren(...users);
    const messages = history.messages.toReversed().map((m) => {
      const li = document.createElement("li");
      li.dataset.offset = m.offset;
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = `#${m.offset}`;
      const text = JSON.stringify(m.data);
      li.append(meta, document.createTextNode(text.length > 500 ? `${text.slice(0, 500)}…` : text));
      return li;
    });
    if (messages.length === 0) {
      const li = document.createElement("li");
      li.textContent = "no messages in history";
      messages.push(li);
    }
    $("channel-history").replaceChildren(...messages);
    $("channel-result").hidden = false;
  } catch (e) {
    if (e.status === 401) return;
    $("channel-result").hidden = true;
    error.textContent = e.message;
    error.hidden = false;
  }
}

async function publishTest() {
  if (!currentChannel) return;
  const answer = $("publish-answer");
  let data;
  try {
    data = JSON.parse($("publish-data").value);
  } catch (e) {
    answer.textContent = `not JSON: ${e.message}`;
    answer.hidden = false;
    return;
  }
  try {
    const a = await api("POST", "/v1/publish", { channel: currentChannel, data });
    answer.textContent = `published: offset ${a.offset}, epoch ${a.epoch}`;
  } catch (e) {
    if (e.status === 401) return;
    answer.textContent = `publish failed: ${e.message}`;
  }
  answer.hidden = false;
  await lookUpChannel(currentChannel);
}

// ---- wiring ----------------------------------------------------------------------------

$("sign-in-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  if (key) signIn(key);
});
$("sign-out").addEventListener("click", () => signOut(null));
$("user-form").addEventListener("submit", (e) => {
  e.preventDefault();
  $("user-answer").hidden = true;
  lookUpUser($("user-input").value.trim());
});
$("user-disconnect").addEventListener("click", () => disconnectUser(true));
$("user-kick").addEventListener("click", () => disconnectUser(false));
$("channel-form").addEventListener("submit", (e) => {
  e.preventDefault();
  $("publish-answer").hidden = true;
  lookUpChannel($("channel-input").value.trim());
});
$("publish-form").addEventListener("submit", (e) => {
  e.preventDefault();
  publishTest();
});
window.addEventListener("resize", () => drawCharts([...known.keys()].map((id) => ({ id }))));

if (sessionStorage.getItem(KEY)) {
  // A reload of a signed-in tab: check the key again.
  signIn(sessionStorage.getItem(KEY));
} else {
  showSignedIn(false);
}
