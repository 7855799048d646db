// The demo page's script (served at /demo.js): a small social app on herald.js.
// Everything a user typed or a message carried reaches the page through textContent,
// never as HTML.

import { HeraldClient } from "/herald.js";

const $ = (id) => document.getElementById(id);
const USER_RE = /^[A-Za-z0-9_.@-]{1,128}$/;
const ROOM_RE = /^[A-Za-z0-9_.:@=-]{1,200}$/;
const PRESENCE_EVERY_MS = 2000;
/** At most one typing signal per this long while the user types (an ephemeral publish). */
const TYPING_EVERY_MS = 1500;
/** A typing indicator disappears this long after the last signal. */
const TYPING_SHOWN_MS = 4000;

/** @type {HeraldClient | null} */
let client = null;
let room = null;
let presenceTimer = null;
/** The room's people seen since joining it: user → online (true) or offline (false). */
let members = new Map();
/** Whether the room's presence was read once (no "is online" lines for the first list). */
let membersKnown = false;
/** Who is typing in the room: user → when the indicator expires (ms). */
const typing = new Map();
let typingTimer = null;
let lastTypingSent = 0;

// ---- small DOM helpers -------------------------------------------------------------

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text != null) e.textContent = String(text);
  return e;
}

function append(list, item, keep = 200) {
  list.append(item);
  while (list.children.length > keep) list.firstElementChild.remove();
  list.scrollTop = list.scrollHeight;
}

function time() {
  return new Date().toLocaleTimeString();
}

function log(text, kind = "") {
  append($("log"), el("li", kind, `${time()}  ${text}`));
}

function show(id, text) {
  const p = $(id);
  p.textContent = text;
  p.hidden = !text;
}

/** A message's text: its `text` field, else the JSON itself. */
function describe(data) {
  if (data && typeof data === "object" && typeof data.text === "string") return data.text;
  return JSON.stringify(data);
}

// ---- signing in ---------------------------------------------------------------------

async function devToken(user) {
  const r = await fetch(`/dev/token?user=${encodeURIComponent(user)}`, { cache: "no-store" });
  if (r.status === 404) {
    const e = new Error("no-dev");
    e.noDev = true;
    throw e;
  }
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body?.error?.message ?? `HTTP ${r.status}`);
  return body.token;
}

async function signInWithName(event) {
  event.preventDefault();
  show("sign-in-error", "");
  const user = $("user-name").value.trim();
  if (!USER_RE.test(user)) {
    show("sign-in-error", "A user name is 1–128 characters of A–Z a–z 0–9 _ . @ -");
    return;
  }
  try {
    const token = await devToken(user);
    start({ token, getToken: () => devToken(user) });
  } catch (e) {
    if (e.noDev) {
      $("token-box").open = true;
      show(
        "token-why",
        "This node is not in dev mode: GET /dev/token answered 404, so it hands out no " +
          "tokens. Paste a token signed with the node's key (for example one made by " +
          "your backend) to connect.",
      );
      $("token-input").focus();
    } else {
      show("sign-in-error", `Could not get a token: ${e.message}`);
    }
  }
}

function signInWithToken(event) {
  event.preventDefault();
  show("sign-in-error", "");
  const token = $("token-input").value.trim();
  if (token) start({ token });
}

function start(auth) {
  const wsUrl = new URL("/ws", location.href);
  wsUrl.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const options = { url: wsUrl.toString(), ...auth };
  if ($("use-connect").checked) options.connectUrl = "/v1/connect";
  client = new HeraldClient(options);
  wire(client);
  $("sign-in").hidden = true;
  $("app").hidden = false;
  $("sign-out").hidden = false;
  client.connect().then(
    (w) => {
      $("me").textContent = w.user;
      $("personal").textContent = `user:${w.user}`;
      join($("room-input").value.trim());
    },
    (e) => log(`could not connect: ${e.message}`, "bad"),
  );
}

function signOut() {
  announce("left");
  client?.close();
  client = null;
  room = null;
  clearInterval(presenceTimer);
  resetRoom();
  for (const id of ["notifications", "chat", "presence", "log"]) $(id).replaceChildren();
  $("me").textContent = "–";
  $("node").textContent = "–";
  $("url").textContent = "";
  $("room-name").textContent = "–";
  setState("signed out");
  $("sign-out").hidden = true;
  $("app").hidden = true;
  $("sign-in").hidden = false;
}

// ---- the client's events ------------------------------------------------------------

function setState(state) {
  const pill = $("state");
  pill.textContent = state;
  pill.className = `pill state-${state.replace(/\s+/g, "-")}`;
}

function wire(c) {
  c.on("state", (s) => {
    if (c !== client) return;
    setState(s);
    log(`state: ${s}`);
    if (s !== "connected") $("node").textContent = "–";
  });
  c.on("welcome", (w) => {
    if (c !== client) return;
    $("node").textContent = w.node;
    $("url").textContent = c.url ?? "";
    log(`connected to node ${w.node} as ${w.user}`, "good");
  });
  c.on("disconnect", (d) => {
    if (c !== client) return;
    log(`connection closed${d.code != null ? ` (code ${d.code})` : ""}; reconnecting`, "warn");
  });
  c.on("subscribed", (s) => {
    if (c !== client) return;
    log(`in ${s.channel} at offset ${s.offset}${s.recovered ? " (recovered)" : ""}`);
  });
  c.on("resync", (r) => {
    if (c !== client) return;
    log(`resync on ${r.channel}: messages were lost (${r.reason}); continuing at ${r.offset}`, "warn");
  });
  c.on("error", (e) => {
    if (c !== client) return;
    log(`error: ${e.message}`, "bad");
  });
  c.on("message", (m) => {
    if (c !== client) return;
    if (m.channel === `user:${c.user}`) notification(m);
    else if (m.channel === room) chat(m);
  });
  // Ephemeral messages: typing indicators and join/leave hints. No offset, never stored:
  // a reconnecting page does not get old ones, which is what an indicator wants.
  c.on("ephemeral", (e) => {
    if (c !== client || e.channel !== room || !e.from || e.from === c.user) return;
    const kind = e.data && typeof e.data === "object" ? e.data.kind : null;
    if (kind === "typing") {
      typing.set(e.from, Date.now() + TYPING_SHOWN_MS);
      renderTyping();
    } else if (kind === "joined" || kind === "left") {
      // Someone came or went: read presence now rather than at the next poll (nodes
      // send presence changes in batches every 100 ms, so look twice).
      refreshPresence();
      setTimeout(refreshPresence, 400);
    }
  });
}

function notification(m) {
  const li = el("li", "item");
  // `from` is set by the server (never by the sender): absent means the server.
  const from = m.from ?? "server";
  li.append(el("span", "meta", `${time()} #${m.offset} from `), el("b", "", from), el("span", "", ": "));
  li.append(el("span", "text", describe(m.data)));
  append($("notifications"), li);
}

function chat(m) {
  const li = el("li", "item");
  const from = m.from ?? "server";
  // They sent what they were typing.
  if (typing.delete(from)) renderTyping();
  if (from === client.user) li.classList.add("mine");
  li.append(el("b", "", from), el("span", "", ": "), el("span", "text", describe(m.data)));
  append($("chat"), li);
}

// ---- notifications ------------------------------------------------------------------

async function pushNotification(event) {
  event.preventDefault();
  const to = $("notify-to").value.trim();
  const text = $("notify-text").value;
  if (!USER_RE.test(to)) {
    $("notify-result").textContent = "Not a valid user name.";
    return;
  }
  try {
    const r = await client.publish(`user:${to}`, { kind: "notification", text });
    $("notify-result").textContent = `Pushed to ${to} (offset ${r.offset}).`;
    $("notify-text").value = "";
  } catch (e) {
    $("notify-result").textContent = `Not pushed: ${e.code}: ${e.message}`;
  }
}

// ---- the room -----------------------------------------------------------------------

async function join(name) {
  if (!client) return;
  if (!ROOM_RE.test(name)) {
    log("a room name is 1–200 characters of A–Z a–z 0–9 _ . : @ = -", "bad");
    return;
  }
  const channel = `room:${name}`;
  if (channel === room) return;
  const previous = room;
  if (previous) announce("left");
  room = channel;
  resetRoom();
  $("room-name").textContent = channel;
  $("chat").replaceChildren();
  $("presence").replaceChildren();
  $("chat-text").disabled = true;
  $("chat-send").disabled = true;
  if (previous) client.unsubscribe(previous).catch((e) => log(`leave ${previous}: ${e.message}`, "bad"));
  try {
    await client.subscribe(channel);
    if (room !== channel) return;
    $("chat-text").disabled = false;
    $("chat-send").disabled = false;
    announce("joined");
    refreshPresence();
    // Nodes send presence changes in batches (every 100 ms): look again shortly.
    setTimeout(refreshPresence, 400);
    clearInterval(presenceTimer);
    presenceTimer = setInterval(refreshPresence, PRESENCE_EVERY_MS);
  } catch (e) {
    log(`could not join ${channel}: ${e.code}: ${e.message}`, "bad");
    if (room === channel) room = null;
  }
}

async function refreshPresence() {
  const c = client;
  const channel = room;
  if (!c || !channel || c.state !== "connected") return;
  try {
    const users = await c.presence(channel);
    if (c !== client || channel !== room) return;
    updateMembers(c, users);
  } catch (e) {
    if (e.code !== "disconnected" && e.code !== "closed") log(`presence: ${e.message}`, "warn");
  }
}

/**
 * Applies a presence reading: people who appeared are online, people seen before who
 * are gone are offline (and kept in the list as such). Each change after the first
 * reading is said in the room's feed.
 */
function updateMembers(c, users) {
  for (const u of Object.keys(users)) {
    if (members.get(u) !== true) {
      if (membersKnown && u !== c.user) systemLine(`${u} is online`);
      members.set(u, true);
    }
  }
  for (const [u, online] of members) {
    if (online && !(u in users)) {
      members.set(u, false);
      if (typing.delete(u)) renderTyping();
      if (u !== c.user) systemLine(`${u} went offline`);
    }
  }
  membersKnown = true;
  const sorted = [...members.keys()].sort((a, b) => Number(members.get(b)) - Number(members.get(a)) || a.localeCompare(b));
  const items = sorted.map((u) => {
    const online = members.get(u);
    const li = el("li", [u === c.user ? "me" : "", online ? "online" : "offline"].join(" ").trim());
    li.dataset.user = u;
    li.dataset.status = online ? "online" : "offline";
    li.title = online ? "online" : "offline";
    li.append(el("span", "dot"), el("span", "", u));
    if (online && users[u] > 1) li.append(el("small", "", ` ×${users[u]}`));
    return li;
  });
  $("presence").replaceChildren(...items);
}

function systemLine(text) {
  append($("chat"), el("li", "item system", `${time()}  ${text}`));
}

/** Forgets the room's people and typers (joining another room, signing out). */
function resetRoom() {
  members = new Map();
  membersKnown = false;
  typing.clear();
  lastTypingSent = 0;
  renderTyping();
}

/** "alice is typing…" from `typing`, dropping expired entries; re-arms its timer. */
function renderTyping() {
  const now = Date.now();
  for (const [u, until] of typing) if (until <= now) typing.delete(u);
  const who = [...typing.keys()].sort();
  let text = "";
  if (who.length === 1) text = `${who[0]} is typing…`;
  else if (who.length === 2) text = `${who[0]} and ${who[1]} are typing…`;
  else if (who.length > 2) text = `${who.length} people are typing…`;
  $("typing").textContent = text;
  clearTimeout(typingTimer);
  if (who.length > 0) {
    const next = Math.min(...typing.values()) - now;
    typingTimer = setTimeout(renderTyping, Math.max(50, next));
  }
}

/** An ephemeral hint to the room (`typing`, `joined`, `left`); best effort, never queued. */
function announce(kind) {
  const c = client;
  if (!c || !room || c.state !== "connected") return;
  c.publish(room, { kind }, { ephemeral: true }).catch((e) => {
    // rate_limited or a dropped connection: an indicator is not worth an error line.
    if (e.code !== "disconnected" && e.code !== "closed" && e.code !== "rate_limited") {
      log(`${kind}: ${e.message}`, "warn");
    }
  });
}

/** While the user types, tell the room, at most once per TYPING_EVERY_MS. */
function onTyping() {
  if (!$("chat-text").value) return;
  const now = Date.now();
  if (now - lastTypingSent < TYPING_EVERY_MS) return;
  lastTypingSent = now;
  announce("typing");
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-text").value;
  if (!text || !room) return;
  try {
    await client.publish(room, { kind: "chat", text });
    $("chat-text").value = "";
    // The next keystroke is a new message: tell the room again at once.
    lastTypingSent = 0;
  } catch (e) {
    log(`not sent: ${e.code}: ${e.message}`, "bad");
  }
}

// ---- start --------------------------------------------------------------------------

function init() {
  $("sign-in-form").addEventListener("submit", signInWithName);
  $("token-form").addEventListener("submit", signInWithToken);
  $("sign-out").addEventListener("click", signOut);
  $("notify-form").addEventListener("submit", pushNotification);
  $("join-form").addEventListener("submit", (e) => {
    e.preventDefault();
    join($("room-input").value.trim());
  });
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-text").addEventListener("input", onTyping);
  // Leaving the page: a last hint, so the room shows this user offline at once.
  addEventListener("pagehide", () => announce("left"));
  const params = new URLSearchParams(location.search);
  if (params.get("user")) $("user-name").value = params.get("user");
  if (params.get("room")) $("room-input").value = params.get("room");
  if (params.get("connect") === "1") $("use-connect").checked = true;
  $("user-name").focus();
}

init();
