// chatd web client: one module, no framework, no build step.
// Every piece of user text reaches the DOM through textContent, never as HTML.
// The protocol is described in docs/protocol.md.

const BASE = new URL(".", location.href); // where chatd lives (works under a path prefix)
const HISTORY_PAGE = 50;
const TYPING_SEND_EVERY = 2000; // the server forwards at most one per 2 s
const TYPING_SHOW_FOR = 5000;
const QUICK_REACTIONS = ["👍", "❤️", "😂", "😮", "😢", "🙏"];
const JUMP_MAX_PAGES = 20; // how far back a jump to a quoted message may load history
const MAX_ATTACHMENTS = 10; // per message, as the server allows
const THUMB_BOX = 240; // CSS px: a thumbnail is shown within this square
const THUMB_CACHE = 300; // thumbnails kept as blob URLs; the oldest are let go

const $ = (id) => document.getElementById(id);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function randomId() {
  if (crypto.randomUUID) return crypto.randomUUID(); // secure contexts only
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

// --- state ------------------------------------------------------------------------------

const state = {
  auth: null, // {access_token, refresh_token, expires_at, renew_at (ms)}
  me: null, // {user_uuid, name, email}
  chats: new Map(), // chat id -> ChatOverview-like object
  msgs: new Map(), // chat id -> {byId: Map, hasMore, loaded, loading}
  seen: new Map(), // chat id -> highest seq held without a gap (for sync)
  versions: new Map(), // chat id -> {at: version applied without a gap, ahead: Set of later ones}
  quotes: new Map(), // message id -> Message fetched to show a quote or the pin (null: loading)
  outbox: new Map(), // client_msg_id -> {chat_id, text, reply_to, mentions, attachments}
  trays: new Map(), // chat id -> files picked for the next message: [{file, status, loaded, upload, xhr, error}]
  thumbs: new Map(), // file id -> {url} of a fetched thumbnail, {failed: true}, or {} while loading
  blocked: new Set(), // user uuids I block: their group messages are shown collapsed
  unfolded: new Set(), // ids of collapsed messages the user chose to see anyway
  typing: new Map(), // chat id -> Map(user uuid -> timeout)
  current: null, // open chat id
  ws: null,
  wsReady: false,
  pending: new Map(), // request_id -> {resolve, reject}
  nextRequest: 1,
  retries: 0,
  reconnectTimer: null,
  refreshTimer: null,
  lastTypingSent: 0,
  editing: null, // id of the message the composer is editing
  replyTo: null, // id of the message the composer answers
  mentionPicks: new Map(), // user uuid -> name, picked in the composer since the last send
  highlight: null, // {id, until}: the message a jump landed on
  presence: new Map(), // user uuid -> {status, last_seen} (presence events, the chat list)
  onlineInGroup: new Map(), // chat id -> members online when last asked (get_presence)
  search: { q: "", results: [], next: null, seq: 0 }, // the sidebar's message search
};

// --- tokens -----------------------------------------------------------------------------

// How long the access token has left (ms), from its own exp claim: expires_in counts from
// when the server issued it, not from when it arrived. The claim is read without checking
// the signature (the page has no secret) and trusted within (0, expires_in]: outside that
// the two clocks disagree, and expires_in counted from now is the better guess.
function tokenLifetime(token, expiresIn) {
  const fallback = (expiresIn > 0 ? expiresIn : 900) * 1000;
  let exp;
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    exp = JSON.parse(atob(payload)).exp;
  } catch {
    return fallback;
  }
  if (typeof exp !== "number") return fallback;
  const left = exp * 1000 - Date.now();
  return left > 0 ? Math.min(left, fallback) : fallback;
}

function saveAuth(pair) {
  const now = Date.now();
  const left = tokenLifetime(pair.access_token, pair.expires_in);
  state.auth = {
    access_token: pair.access_token,
    refresh_token: pair.refresh_token,
    expires_at: now + left,
    // A minute before expiry, half-way through a short lifetime (as chatd.client does).
    renew_at: now + Math.max(left - 60000, left / 2),
  };
  sessionStorage.setItem("chatd.auth", JSON.stringify(state.auth));
  scheduleRefresh();
}

function loadAuth() {
  try {
    state.auth = JSON.parse(sessionStorage.getItem("chatd.auth"));
  } catch {
    state.auth = null;
  }
  return !!(state.auth && state.auth.refresh_token);
}

// When the access token is due for renewal (ms since the epoch).
function renewAt() {
  return state.auth.renew_at || state.auth.expires_at - 30000; // saved by an older page
}

function scheduleRefresh(retry = false) {
  clearTimeout(state.refreshTimer);
  if (!state.auth) return;
  // A failed renewal is tried again in 5 s; a 401 logs out, which stops this.
  const wait = retry ? 5000 : Math.max(0, renewAt() - Date.now());
  state.refreshTimer = setTimeout(() => refreshTokens().catch(() => scheduleRefresh(true)), wait);
}

// --- embedded in an app's page -------------------------------------------------------------
//
// /chat?embed in an <iframe> of an app that signs its users in itself (docs/embedding.md):
// the page has no login form; its tokens are the app's JWTs, asked of the parent page
// with postMessage {type: "chatd:token-request"} and given back as {type: "chatd:token",
// token}. Only the parent window is listened to, and which origins may be that parent is
// the server's Content-Security-Policy frame-ancestors (CHATD_EMBED_ORIGINS).
const EMBEDDED = new URLSearchParams(location.search).has("embed") && window.parent !== window;
const EMBED_TIMEOUT_MS = 10000;
let tokenWaiters = [];

function parentOrigin() {
  if (location.ancestorOrigins && location.ancestorOrigins.length) return location.ancestorOrigins[0];
  try {
    return new URL(document.referrer).origin;
  } catch {
    return "*"; // the request carries no secret
  }
}

window.addEventListener("message", (event) => {
  if (!EMBEDDED || event.source !== window.parent) return;
  const data = event.data;
  if (!data || data.type !== "chatd:token" || typeof data.token !== "string" || !data.token) return;
  const waiters = tokenWaiters;
  tokenWaiters = [];
  for (const waiter of waiters) waiter(data.token);
});

function tokenFromParent() {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("the page gave no chat token")), EMBED_TIMEOUT_MS);
    tokenWaiters.push((token) => {
      clearTimeout(timer);
      resolve(token);
    });
    window.parent.postMessage({ type: "chatd:token-request" }, parentOrigin());
  });
}

let refreshing = null;
// Refresh tokens work once: never run two refreshes at the same time.
function refreshTokens() {
  if (!refreshing && EMBEDDED) {
    refreshing = tokenFromParent()
      .then((token) => saveAuth({ access_token: token, refresh_token: null }))
      .finally(() => {
        refreshing = null;
      });
  }
  if (!refreshing) {
    const token = state.auth && state.auth.refresh_token;
    refreshing = (async () => {
      if (!token) throw new Error("not logged in");
      const res = await fetch(new URL("token/refresh", BASE), {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ refresh_token: token }),
      });
      if (res.status === 401) {
        logout("Your session ended; please log in again.");
        throw new Error("session ended");
      }
      if (!res.ok) throw new Error(`refresh failed: ${res.status}`);
      saveAuth(await res.json());
    })().finally(() => {
      refreshing = null;
    });
  }
  return refreshing;
}

async function accessToken() {
  // Timers of background tabs are throttled: a call past the renewal point renews first.
  if (state.auth && Date.now() >= renewAt()) await refreshTokens();
  return state.auth.access_token;
}

// --- REST -------------------------------------------------------------------------------

async function api(method, path, body, retry = true) {
  const headers = { authorization: `Bearer ${await accessToken()}` };
  if (body !== undefined) headers["content-type"] = "application/json";
  const res = await fetch(new URL(path, BASE), {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 401 && retry) {
    await refreshTokens();
    return api(method, path, body, false);
  }
  if (res.status === 204) return null;
  const data = await res.json().catch(() => null);
  if (!res.ok) {
    const message = (data && data.error && data.error.message) || `HTTP ${res.status}`;
    throw new Error(message);
  }
  return data;
}

async function publicPost(path, body) {
  const res = await fetch(new URL(path, BASE), {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const data = await res.json().catch(() => null);
  if (!res.ok) throw new Error((data && data.error && data.error.message) || `HTTP ${res.status}`);
  return data;
}

// --- the socket -------------------------------------------------------------------------

function setConnStatus(text) {
  const node = $("conn-status");
  node.textContent = text || "";
  node.hidden = !text;
}

async function connect() {
  clearTimeout(state.reconnectTimer);
  if (!state.auth) return;
  let token;
  try {
    token = await accessToken();
  } catch {
    if (state.auth) scheduleReconnect();
    return;
  }
  const url = new URL("connect", BASE);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("token", token);
  const ws = new WebSocket(url);
  state.ws = ws;
  state.wsReady = false;
  let first = true;
  ws.onmessage = (event) => {
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      return;
    }
    if (first && frame.action === "unread_messages") {
      first = false;
      onConnected(frame).catch((err) => console.error(err));
      return;
    }
    handleFrame(frame);
  };
  ws.onclose = (event) => {
    if (state.ws !== ws) return;
    state.ws = null;
    state.wsReady = false;
    for (const { reject } of state.pending.values()) reject(new Error("disconnected"));
    state.pending.clear();
    if (!state.auth) return;
    if (event.code === 1008 && event.reason.startsWith("too many sockets")) {
      // This user opened more tabs or devices than the server allows, and this socket
      // is the oldest. Coming straight back would close another one: wait for the user.
      setConnStatus("disconnected: too many open tabs or devices (reload to reconnect)");
    } else if (event.code === 1008) {
      // The token was refused (expired): refresh, then come back.
      refreshTokens().then(() => scheduleReconnect(), () => {});
    } else {
      scheduleReconnect();
    }
  };
}

function scheduleReconnect() {
  clearTimeout(state.reconnectTimer);
  const delay = Math.min(15000, 500 * 2 ** state.retries) * (0.75 + Math.random() / 2);
  state.retries += 1;
  setConnStatus("reconnecting…");
  state.reconnectTimer = setTimeout(connect, delay);
}

function request(action, fields = {}) {
  return new Promise((resolve, reject) => {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
      reject(new Error("not connected"));
      return;
    }
    const request_id = String(state.nextRequest++);
    state.pending.set(request_id, { resolve, reject });
    state.ws.send(JSON.stringify({ action, request_id, ...fields }));
  });
}

function sendFrame(action, fields = {}) {
  if (state.ws && state.wsReady) state.ws.send(JSON.stringify({ action, ...fields }));
}

async function onConnected(snapshot) {
  state.wsReady = true;
  state.blocked = new Set(snapshot.blocked || []); // left out when I block nobody
  const reconnect = state.seen.size > 0;
  for (const m of snapshot.data) addMessage(m);
  // After a reconnect: fetch what was missed, chat by chat, from the last seq we hold.
  if (reconnect) await syncChats([...state.seen.keys()]);
  await loadChatList();
  state.retries = 0;
  setConnStatus("");
  // Messages typed while offline go out now, with their original client_msg_id.
  for (const [client_msg_id, out] of state.outbox) sendOut(client_msg_id, out);
  markReadIfVisible();
}

// The sync point of a chat: the new form {seq, version} once its version is known.
function syncPoint(chatId) {
  const seq = state.seen.get(chatId) || 0;
  const v = state.versions.get(chatId);
  return v ? { seq, version: v.at } : seq;
}

async function syncChats(ids) {
  let todo = ids.filter((id) => state.chats.has(id) || state.seen.has(id));
  while (todo.length) {
    const chats = {};
    for (const id of todo.slice(0, 1000)) chats[id] = syncPoint(id);
    const reply = await request("sync", { chats, limit: 200 });
    const again = [];
    for (const [key, entry] of Object.entries(reply.chats)) {
      const id = Number(key);
      if (entry.error === "not_found") {
        removeChat(id);
        continue;
      }
      if (entry.too_long) restartChat(id, entry);
      else applySynced(id, entry);
      if (entry.has_more) again.push(id);
    }
    todo = [...again, ...todo.slice(1000)];
  }
}

function applySynced(chatId, entry) {
  for (const m of entry.messages) addMessage(m);
  for (const m of entry.updated || []) applyUpdate(m);
  for (const id of entry.hidden || []) hideMessage(chatId, id);
  if (state.chats.has(chatId) && entry.pinned_message_id !== undefined) {
    upsertChat({ id: chatId, pinned_message_id: entry.pinned_message_id });
  }
  // The answer's seq covers messages hidden from us, which never arrive.
  if (entry.seq > (state.seen.get(chatId) || 0)) state.seen.set(chatId, entry.seq);
  advanceSeen(chatId);
  if (typeof entry.version === "number") setVersion(chatId, entry.version);
}

// Too much changed while we were away: drop what we hold of the chat and load it afresh.
function restartChat(chatId, entry) {
  const s = store(chatId);
  s.byId.clear();
  s.loaded = false;
  s.hasMore = true;
  state.seen.set(chatId, entry.seq);
  state.versions.set(chatId, { at: entry.version, ahead: new Set() });
  if (chatId === state.current) loadHistory(chatId, false);
}

// Chat versions: every change to a chat's messages has the next version. Events may come
// out of order, so `at` only moves over versions seen without a gap; a gap that stays is
// filled by a sync.
function noteVersion(chatId, version) {
  const v = state.versions.get(chatId);
  if (!v || typeof version !== "number" || version <= v.at) return;
  v.ahead.add(version);
  while (v.ahead.delete(v.at + 1)) v.at += 1;
  if (v.ahead.size) syncSoon(chatId);
}

// Everything up to `version` is applied (a sync answer, or a chat first seen).
function setVersion(chatId, version) {
  let v = state.versions.get(chatId);
  if (!v) state.versions.set(chatId, (v = { at: version, ahead: new Set() }));
  v.at = Math.max(v.at, version);
  for (const x of v.ahead) if (x <= v.at) v.ahead.delete(x);
  while (v.ahead.delete(v.at + 1)) v.at += 1;
}

function hasGap(chatId) {
  const v = state.versions.get(chatId);
  if (v && v.ahead.size) return true;
  const seen = state.seen.get(chatId) || 0;
  for (const m of store(chatId).byId.values()) if (m.seq > seen) return true;
  return false;
}

let syncQueued = null;
function syncSoon(chatId) {
  // A seq or version gap: fill it with a sync shortly (several gaps share one call), unless
  // what was missing arrived meanwhile.
  if (!syncQueued) {
    syncQueued = new Set();
    setTimeout(() => {
      const ids = [...syncQueued].filter(hasGap);
      syncQueued = null;
      if (state.wsReady && ids.length) syncChats(ids).catch(() => {});
    }, 300);
  }
  syncQueued.add(chatId);
}

function handleFrame(frame) {
  const d = frame.data;
  switch (frame.action) {
    case "ack":
    case "error": {
      const waiter = state.pending.get(frame.request_id);
      if (!waiter) {
        if (frame.action === "error") console.warn("chatd error", frame.error);
        return;
      }
      state.pending.delete(frame.request_id);
      if (frame.action === "ack") waiter.resolve(d);
      else {
        const { code, message, retry_after_ms: retryAfterMs } = frame.error;
        waiter.reject(Object.assign(new Error(message), { code, retryAfterMs }));
      }
      return;
    }
    case "new_message":
      if (!state.chats.has(d.chat_id)) fetchChat(d.chat_id);
      if (addMessage(d)) notifyHidden(d);
      clearTyping(d.chat_id, d.sender_uuid);
      markReadIfVisible();
      return;
    case "message_updated":
      noteVersion(d.chat_id, d.version);
      applyUpdate(d);
      return;
    case "message_hidden":
      hideMessage(d.chat_id, d.message_id);
      return;
    case "chat_created":
      upsertChat({ ...d, last_message: null, last_seq: 0, read_seq: 0, unread_count: 0 });
      return;
    case "message_read":
      setRead(d.chat_id, (m) => m.id === d.message_id);
      return;
    case "messages_read":
      setRead(d.chat_id, (m) => m.id <= d.up_to_message_id && m.sender_uuid === state.me.user_uuid);
      return;
    case "member_added":
      commandCache.delete(d.chat.id); // a bot may have come: its commands too
      if (state.chats.has(d.chat.id)) upsertChat(d.chat);
      else fetchChat(d.chat.id);
      return;
    case "member_removed":
      commandCache.delete(d.chat_id);
      if (d.user_uuid === state.me.user_uuid) removeChat(d.chat_id);
      else {
        const chat = state.chats.get(d.chat_id);
        if (chat) upsertChat({ id: d.chat_id, members: chat.members.filter((u) => u.user_uuid !== d.user_uuid) });
      }
      return;
    case "chat_updated": {
      // Pins change the chat's version; renames and roles do not.
      const chat = state.chats.get(d.id);
      const pinChanged = chat && chat.pinned_message_id !== d.pinned_message_id;
      upsertChat(d);
      if (pinChanged) noteVersion(d.id, d.version);
      return;
    }
    case "user_updated":
      updateUser(d);
      return;
    case "blocks_changed":
      state.blocked = new Set(d.blocked);
      renderMessages();
      return;
    case "chat_deleted":
      removeChat(d.chat_id);
      return;
    case "typing":
      showTyping(d.chat_id, d.user_uuid);
      return;
    case "presence":
      state.presence.set(d.user_uuid, d);
      renderChatList();
      renderChatHeader();
      return;
    case "notifications_changed":
      if (state.chats.has(d.chat_id)) upsertChat({ id: d.chat_id, mute_until: d.mute_until, notify: d.notify });
      return;
    default:
  }
}

// --- chats and messages ---------------------------------------------------------------

function store(chatId) {
  let s = state.msgs.get(chatId);
  if (!s) {
    s = { byId: new Map(), hasMore: true, loaded: false, loading: false };
    state.msgs.set(chatId, s);
  }
  return s;
}

function sortedMessages(chatId) {
  return [...store(chatId).byId.values()].sort((a, b) => a.seq - b.seq);
}

function advanceSeen(chatId) {
  // Highest seq held with no gap below it (starting from what we knew).
  let seen = state.seen.get(chatId) || 0;
  const bySeq = new Set([...store(chatId).byId.values()].map((m) => m.seq));
  while (bySeq.has(seen + 1)) seen += 1;
  state.seen.set(chatId, seen);
  return seen;
}

// Replace a message we hold with a newer state of it (an edit, a delete, reactions).
// A read receipt never goes back to unread.
function replaceMessage(known, m) {
  if ((m.version || 0) < (known.version || 0)) return false;
  const read = known.read_status === "read";
  Object.assign(known, m);
  if (read) known.read_status = "read";
  return true;
}

// Add a message from any source (live, snapshot, sync, history, ack). Returns false for a
// message we already hold: the same id is one message, whatever the path it came by.
function addMessage(m, fromHistory = false) {
  const s = store(m.chat_id);
  if (m.client_msg_id && state.outbox.has(m.client_msg_id) && m.sender_uuid === state.me.user_uuid) {
    state.outbox.delete(m.client_msg_id);
  }
  const known = s.byId.get(m.id);
  if (known) {
    if (m.read_status === "read") known.read_status = "read";
    replaceMessage(known, m);
    if (m.chat_id === state.current) renderMessages();
    return false;
  }
  s.byId.set(m.id, { ...m });
  if (!fromHistory) {
    noteVersion(m.chat_id, m.version);
    const seen = advanceSeen(m.chat_id);
    if (m.seq > seen && state.chats.has(m.chat_id)) syncSoon(m.chat_id);
  }
  const chat = state.chats.get(m.chat_id);
  if (chat) {
    if (m.seq >= (chat.last_seq || 0)) {
      chat.last_seq = m.seq;
      chat.last_message = { ...m };
    }
    if (m.sender_uuid === state.me.user_uuid) chat.read_seq = Math.max(chat.read_seq || 0, m.seq);
    chat.active = Math.max(chat.active || 0, Date.parse(m.timestamp) || 0);
    renderChatList();
  }
  if (m.chat_id === state.current) renderMessages();
  return true;
}

// A message changed (message_updated, a sync's `updated`, an ack): replace the copy we
// hold; one we do not hold is not fetched.
function applyUpdate(m) {
  const known = store(m.chat_id).byId.get(m.id);
  if (known) replaceMessage(known, m);
  const quoted = state.quotes.get(m.id);
  if (quoted) replaceMessage(quoted, m);
  const chat = state.chats.get(m.chat_id);
  if (chat && chat.last_message && chat.last_message.id === m.id) replaceMessage(chat.last_message, m);
  if (m.deleted) {
    if (state.editing === m.id || state.replyTo === m.id) clearComposeMode();
    if (chat && countedInBase(chat, m)) fetchChat(m.chat_id);
  }
  if (chat) renderChatList();
  if (m.chat_id === state.current) renderMessages();
}

// The message was deleted for us only: it goes, from this chat and from its preview.
function hideMessage(chatId, messageId) {
  const s = store(chatId);
  const m = s.byId.get(messageId);
  s.byId.delete(messageId);
  if (state.editing === messageId || state.replyTo === messageId) clearComposeMode();
  const chat = state.chats.get(chatId);
  if (chat) {
    const wasLast = chat.last_message && chat.last_message.id === messageId;
    if (wasLast) chat.last_message = null; // the server tells which message is last now
    if (wasLast || (m && countedInBase(chat, m))) fetchChat(chatId);
    renderChatList();
  }
  if (chatId === state.current) renderMessages();
}

function setRead(chatId, test) {
  const chat = state.chats.get(chatId);
  if (chat && chat.last_message && test(chat.last_message)) chat.last_message.read_status = "read";
  let changed = false;
  for (const m of store(chatId).byId.values()) {
    if (m.read_status !== "read" && test(m)) {
      m.read_status = "read";
      changed = true;
    }
  }
  if (changed && chatId === state.current) renderMessages();
  if (chat) renderChatList();
}

function upsertChat(data) {
  const chat = state.chats.get(data.id) || {
    last_message: null,
    last_seq: 0,
    read_seq: 0,
  };
  for (const [k, v] of Object.entries(data)) {
    if (v === undefined) continue;
    if (k === "last_seq" || k === "read_seq") chat[k] = Math.max(chat[k] || 0, v);
    else if (k === "last_message") {
      if (v && (!chat.last_message || v.seq >= chat.last_message.seq)) chat.last_message = v;
    } else if (k === "presence") {
      if (v) state.presence.set(v.user_uuid, v);
    } else if (k !== "unread_count" && k !== "unread_mentions") chat[k] = v;
  }
  if (data.unread_count !== undefined) {
    // The server's exact counts as of its last_seq; later messages are counted as they come.
    chat.base = {
      last_seq: data.last_seq || 0,
      read_seq: data.read_seq || 0,
      unread: data.unread_count,
      mentions: data.unread_mentions || 0,
    };
  }
  chat.active = Math.max(
    chat.active || 0,
    Date.parse(chat.created_at) || 0,
    chat.last_message ? Date.parse(chat.last_message.timestamp) || 0 : 0,
  );
  state.chats.set(data.id, chat);
  if (typeof data.version === "number" && !state.versions.has(data.id)) setVersion(data.id, data.version);
  // Messages up to the server's last_seq come from /history when the chat is opened; sync
  // only has to fetch what comes after.
  const seen = state.seen.get(data.id) || 0;
  state.seen.set(data.id, Math.max(seen, data.last_seq || 0));
  renderChatList();
  if (data.id === state.current) renderChatHeader();
  return chat;
}

function removeChat(chatId) {
  state.chats.delete(chatId);
  state.msgs.delete(chatId);
  state.seen.delete(chatId);
  state.versions.delete(chatId);
  if (state.current === chatId) openChat(null);
  renderChatList();
}

async function fetchChat(chatId) {
  try {
    upsertChat(await api("GET", `chats/${chatId}`));
  } catch {
    /* gone again, or not ours */
  }
}

async function loadChatList() {
  let before = null;
  // A few pages are plenty for a small client; the rest arrive with their activity.
  for (let page = 0; page < 10; page++) {
    const q = before ? `chats?limit=200&before=${before}` : "chats?limit=200";
    const reply = await api("GET", q);
    for (const c of reply.chats) upsertChat(c);
    if (!reply.has_more) break;
    before = reply.next_before;
  }
}

function chatTitle(chat) {
  if (!chat) return "";
  if (chat.type === "group") return chat.name || "Group";
  const other = (chat.members || []).find((u) => u.user_uuid !== state.me.user_uuid);
  return other ? other.name : "Just you";
}

function memberName(chatId, uuid) {
  if (uuid === state.me.user_uuid) return "You";
  const member = memberOf(chatId, uuid);
  return member ? member.name : "Someone";
}

function memberOf(chatId, uuid) {
  const chat = state.chats.get(chatId);
  return chat && (chat.members || []).find((u) => u.user_uuid === uuid);
}

function myRole(chat) {
  if (!chat) return null;
  if (chat.role) return chat.role;
  const me = (chat.members || []).find((u) => u.user_uuid === state.me.user_uuid);
  return me ? me.role : null;
}

function isAdmin(chat) {
  const role = myRole(chat);
  return role === "owner" || role === "admin";
}

function mentionsMe(m) {
  return !m.deleted && (m.mentions || []).includes(state.me.user_uuid);
}

const NO_BASE = { last_seq: 0, read_seq: 0, unread: 0, mentions: 0 };

// Whether the server's last counts included this message as unread: a change to it (a
// delete, a hide) makes them stale.
function countedInBase(chat, m) {
  const base = chat.base || NO_BASE;
  return m.sender_uuid !== state.me.user_uuid && m.seq > (chat.read_seq || 0) && m.seq <= base.last_seq;
}

// Unread messages and mentions: the server's counts up to its last_seq (deleted and hidden
// messages left out), then the messages we hold above it, counted here.
function unread(chat) {
  const base = chat.base || NO_BASE;
  const readSeq = chat.read_seq || 0;
  let count = 0;
  let mentions = 0;
  if (readSeq <= base.read_seq) {
    count = base.unread;
    mentions = base.mentions;
  } else if (readSeq < base.last_seq) {
    // Read part of the way since (this page always reads to the newest): at most what is left.
    count = Math.min(base.unread, base.last_seq - readSeq);
    mentions = Math.min(base.mentions, count);
  }
  const from = Math.max(readSeq, base.last_seq);
  for (const m of store(chat.id).byId.values()) {
    if (m.seq <= from || m.deleted || m.sender_uuid === state.me.user_uuid) continue;
    count += 1;
    if (mentionsMe(m)) mentions += 1;
  }
  return { count, mentions };
}

// --- rendering --------------------------------------------------------------------------

// What a message says in one line: its text, or what it carries when it has none.
function messageSummary(m) {
  if (m.text || !(m.attachments && m.attachments.length)) return m.text;
  if (m.attachments.length > 1) return `📎 ${m.attachments.length} files`;
  const [a] = m.attachments;
  return `${isImage(a) ? "🖼" : "📎"} ${a.name}`;
}

function previewText(m) {
  if (m.deleted) return "message deleted";
  return `${m.sender_uuid === state.me.user_uuid ? "You: " : ""}${messageSummary(m)}`;
}

// Each chat's list entry lives as long as the chat, and a render only changes what is
// inside it: the list renders on every message and presence change, and a click whose
// button was replaced between its mousedown and mouseup is lost (the button's insides
// take no pointer events, style.css, so the button itself is what gets pressed).
const chatItems = new Map(); // chat id -> its <li>

function chatItem(chatId) {
  let li = chatItems.get(chatId);
  if (!li) {
    const button = el("button", "chat-item");
    button.type = "button";
    button.dataset.chatId = chatId;
    button.addEventListener("click", () => openChat(chatId));
    li = el("li");
    li.append(button);
    chatItems.set(chatId, li);
  }
  return li;
}

function renderChatList() {
  const list = $("chat-list");
  const chats = [...state.chats.values()].sort((a, b) => b.active - a.active || b.id - a.id);
  for (const id of chatItems.keys()) if (!state.chats.has(id)) chatItems.delete(id);
  const items = chats.map((chat) => {
    const li = chatItem(chat.id);
    const button = li.firstChild;
    if (chat.id === state.current) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
    const top = el("span", "chat-item-top");
    top.append(chatAvatar(chat), el("span", "chat-name", chatTitle(chat)));
    const notes = []; // what the marks mean: the button's tooltip (its insides have none)
    const mark = (className, text, label) => {
      const span = el("span", className, text);
      span.setAttribute("aria-label", label);
      top.append(span);
      notes.push(label);
    };
    const seen = partnerPresence(chat);
    if (seen && seen.status === "online") mark("presence-dot", "", "online");
    if (isMuted(chat)) mark("muted-mark", "🔕", "muted");
    const { count, mentions } = unread(chat);
    if (mentions > 0) {
      mark("badge mention-badge", "@", `${mentions} unread ${mentions === 1 ? "mention" : "mentions"}`);
    }
    if (count > 0) mark("badge", count > 99 ? "99+" : count, `${count} unread`);
    button.title = notes.join(", ");
    const last = chat.last_message;
    button.replaceChildren(top, el("span", "chat-preview", last ? previewText(last) : "No messages yet"));
    return li;
  });
  // Moved only when the order changed: taking the pressed button out loses its click too.
  const shown = list.children;
  if (shown.length !== items.length || items.some((li, i) => shown[i] !== li)) list.replaceChildren(...items);
  $("no-chats").hidden = chats.length > 0;
  updateTitle();
}

function formatTime(ts) {
  const d = new Date(ts);
  if (Number.isNaN(d.getTime())) return "";
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

// A message of the chat by id: held, or fetched once to show a quote or the pinned banner
// (undefined until it arrives, null when it cannot be had).
function lookupMessage(chatId, id) {
  const held = store(chatId).byId.get(id);
  if (held) return held;
  if (state.quotes.has(id)) return state.quotes.get(id) || undefined;
  state.quotes.set(id, null);
  api("GET", `messages/${id}`)
    .then((m) => state.quotes.set(id, m))
    .catch(() => state.quotes.set(id, { id, chat_id: chatId, missing: true }))
    .finally(() => {
      if (chatId === state.current) {
        renderMessages();
        renderPinBanner();
      }
    });
  return undefined;
}

function snippet(m) {
  if (!m) return "…";
  if (m.missing) return "message unavailable";
  if (m.deleted) return "message deleted";
  const text = messageSummary(m);
  return text.length > 120 ? `${text.slice(0, 120)}…` : text;
}

function quoteBlock(chatId, replyTo) {
  const original = lookupMessage(chatId, replyTo);
  const quote = el("button", "quote");
  quote.type = "button";
  quote.dataset.replyTo = replyTo;
  quote.title = "Show the original message";
  if (original && !original.missing) quote.append(el("span", "quote-name", memberName(chatId, original.sender_uuid)));
  quote.append(el("span", "quote-text", snippet(original)));
  quote.addEventListener("click", () => jumpTo(chatId, replyTo));
  return quote;
}

function reactionBar(m) {
  const bar = el("div", "reactions");
  for (const r of m.reactions || []) {
    const mine = r.users.includes(state.me.user_uuid);
    const button = el("button", "reaction", `${r.emoji} ${r.count}`);
    button.type = "button";
    button.dataset.emoji = r.emoji;
    button.setAttribute("aria-pressed", String(mine));
    button.title = mine ? "Take your reaction back" : "React with this too";
    button.addEventListener("click", () => toggleReaction(m, r.emoji, mine));
    bar.append(button);
  }
  return bar;
}

function messageItem(m, chat, pending = false) {
  const mine = m.sender_uuid === state.me.user_uuid;
  const li = el("li", mine ? "message mine" : "message");
  if (m.id) li.dataset.messageId = m.id;
  if (m.deleted) li.classList.add("deleted");
  if (mentionsMe(m)) li.classList.add("mentions-me");
  if (state.highlight && state.highlight.id === m.id) li.classList.add("highlight");
  if (!mine && chat && chat.type === "group") {
    const member = memberOf(m.chat_id, m.sender_uuid);
    const sender = el("span", "sender");
    sender.append(
      avatarEl(member && member.avatar, memberName(m.chat_id, m.sender_uuid), m.sender_uuid, "small"),
      memberName(m.chat_id, m.sender_uuid),
    );
    li.append(sender);
  }
  if (!mine && !m.deleted && state.blocked.has(m.sender_uuid) && !state.unfolded.has(m.id)) {
    // Someone I block, in a group we share: folded until asked for (docs/protocol.md#blocking).
    li.classList.add("collapsed");
    const show = el("button", "unfold", "Message from someone you blocked — show");
    show.type = "button";
    show.addEventListener("click", () => {
      state.unfolded.add(m.id);
      renderMessages();
    });
    li.append(show);
    return li;
  }
  if (m.deleted) {
    li.append(el("span", "text tombstone", "message deleted"));
  } else {
    if (m.forwarded_from) li.append(el("span", "forwarded", `Forwarded from ${m.forwarded_from.sender_name}`));
    if (m.reply_to) li.append(quoteBlock(m.chat_id, m.reply_to));
    if (m.attachments && m.attachments.length) li.append(attachmentsBlock(m.attachments));
    if (m.text) li.append(el("span", "text", m.text));
    if (m.reactions && m.reactions.length) li.append(reactionBar(m));
  }
  const meta = el("span", "meta");
  if (m.edited_at && !m.deleted) {
    const edited = el("span", "edited", "edited");
    edited.title = `Edited ${formatTime(m.edited_at)}`;
    meta.append(edited);
  }
  meta.append(el("time", "time", pending ? "" : formatTime(m.timestamp)));
  if (mine && !m.deleted) {
    let mark = "✓";
    let label = "Sent";
    if (pending) [mark, label] = ["…", "Sending"];
    else if (m.read_status === "read") [mark, label] = ["✓✓", "Read"];
    const status = el("span", "status", mark);
    status.dataset.status = pending ? "sending" : m.read_status;
    status.title = label;
    status.setAttribute("aria-label", label);
    meta.append(status);
  }
  li.append(meta);
  if (!pending) {
    const more = el("button", "menu-button", "⋯");
    more.type = "button";
    more.title = "Message actions";
    more.setAttribute("aria-label", "Message actions");
    more.setAttribute("aria-haspopup", "menu");
    more.addEventListener("click", (e) => {
      e.stopPropagation();
      openMenu(m, more);
    });
    li.append(more);
  }
  return li;
}

function renderMessages() {
  const list = $("messages");
  const scroller = $("messages-scroll");
  const chatId = state.current;
  if (chatId === null) {
    list.replaceChildren();
    return;
  }
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 40;
  const chat = state.chats.get(chatId);
  const items = sortedMessages(chatId).map((m) => messageItem(m, chat));
  for (const [client_msg_id, out] of state.outbox) {
    if (out.chat_id !== chatId) continue;
    items.push(messageItem({ ...out, client_msg_id, sender_uuid: state.me.user_uuid }, chat, true));
  }
  list.replaceChildren(...items);
  const s = store(chatId);
  $("history-state").textContent = s.loading ? "Loading…" : s.loaded && !s.hasMore ? "Start of the conversation" : "";
  if (atBottom) scroller.scrollTop = scroller.scrollHeight;
  renderPinBanner();
}

function renderChatHeader() {
  const chat = state.chats.get(state.current);
  $("chat-title").textContent = chat ? chatTitle(chat) : "Pick a chat";
  const picture = $("chat-avatar");
  picture.hidden = !chat;
  if (chat) {
    const mayChange = chat.type === "group" && isAdmin(chat);
    picture.replaceChildren(chatAvatar(chat));
    picture.disabled = !mayChange;
    picture.title = mayChange ? "Change the group's photo" : "";
    picture.setAttribute("aria-label", mayChange ? "Change the group's photo" : chatTitle(chat));
  }
  $("chat-settings").hidden = !chat;
  $("chat-settings").textContent = chat && isMuted(chat) ? "🔕" : "🔔";
  renderChatStatus(chat);
  renderTyping();
  renderPinBanner();
}

function renderPinBanner() {
  const banner = $("pin-banner");
  const chat = state.chats.get(state.current);
  const id = chat && chat.pinned_message_id;
  banner.hidden = !id;
  if (!id) return;
  banner.dataset.messageId = id;
  $("pin-text").textContent = snippet(lookupMessage(chat.id, id));
}

// --- opening a chat, history, reading ---------------------------------------------------

async function openChat(chatId) {
  if (chatId !== state.current) {
    clearComposeMode();
    state.mentionPicks.clear();
    state.highlight = null;
  }
  closeMenu();
  hideMentions();
  state.current = chatId;
  document.body.classList.toggle("in-chat", chatId !== null);
  $("composer").hidden = chatId === null;
  $("drop-zone").hidden = true;
  renderTray();
  renderChatHeader();
  renderChatList();
  const scroller = $("messages-scroll");
  renderMessages();
  scroller.scrollTop = scroller.scrollHeight;
  if (chatId === null) return;
  askGroupPresence(chatId);
  $("message-input").focus();
  const s = store(chatId);
  if (!s.loaded) await loadHistory(chatId, false);
  markReadIfVisible();
}

async function loadHistory(chatId, older) {
  const s = store(chatId);
  if (s.loading || (older && !s.hasMore)) return;
  s.loading = true;
  const scroller = $("messages-scroll");
  const oldest = sortedMessages(chatId)[0];
  let path = `history/${chatId}?page_size=${HISTORY_PAGE}`;
  if (older && oldest) path = `history/${chatId}?before=${oldest.id}&limit=${HISTORY_PAGE}`;
  if (chatId === state.current) renderMessages();
  try {
    const reply = await api("GET", path);
    const heightBefore = scroller.scrollHeight;
    const topBefore = scroller.scrollTop;
    for (const m of reply.messages) addMessage(m, true);
    if (!older) {
      // The newest page is gapless up to the top of the chat.
      const top = reply.messages.at(-1);
      if (top && top.seq > (state.seen.get(chatId) || 0)) state.seen.set(chatId, top.seq);
      advanceSeen(chatId);
    }
    s.hasMore = reply.has_more;
    s.loaded = true;
    s.loading = false;
    if (chatId === state.current) {
      renderMessages();
      if (older) scroller.scrollTop = topBefore + (scroller.scrollHeight - heightBefore);
      else scroller.scrollTop = scroller.scrollHeight;
      // Not enough to scroll yet: fetch the next older page straight away.
      if (s.hasMore && scroller.scrollHeight <= scroller.clientHeight) loadHistory(chatId, true);
    }
  } catch (err) {
    s.loading = false;
    if (chatId === state.current) $("history-state").textContent = `Could not load history: ${err.message}`;
  }
}

function markReadIfVisible() {
  const chatId = state.current;
  if (chatId === null || document.visibilityState !== "visible" || !state.wsReady) return;
  const chat = state.chats.get(chatId);
  const newest = sortedMessages(chatId).at(-1);
  if (!chat || !newest || newest.seq <= (chat.read_seq || 0)) return;
  const before = chat.read_seq || 0;
  chat.read_seq = newest.seq; // optimistic; the ack confirms
  renderChatList();
  request("mark_read", { message_ids: [newest.id] }).catch(() => {
    if (chat.read_seq === newest.seq) chat.read_seq = before; // try again after a reconnect
    renderChatList();
  });
}

// --- sending and typing -----------------------------------------------------------------

function sendOut(client_msg_id, out) {
  const fields = { chat_id: out.chat_id, text: out.text, client_msg_id };
  if (out.attachments && out.attachments.length) fields.attachments = out.attachments.map((a) => a.id);
  if (out.reply_to) fields.reply_to = out.reply_to;
  if (out.mentions && out.mentions.length) fields.mentions = out.mentions;
  request("send_message", fields)
    .then((m) => addMessage(m))
    .catch((err) => {
      if (err.code === "rate_limited") {
        // Sending too fast: nothing was stored; send it again once allowed.
        setTimeout(() => {
          if (state.outbox.has(client_msg_id) && state.wsReady) sendOut(client_msg_id, out);
        }, err.retryAfterMs || 1000);
      } else if (err.code) {
        // Refused by the server (not a dropped connection): drop it and say why.
        state.outbox.delete(client_msg_id);
        if (out.chat_id === state.current) renderMessages();
        alert(`Message not sent: ${err.message}`);
      }
      // Otherwise it stays in the outbox and goes again after the reconnect.
    });
}

// The members picked with @ whose "@Name" is still in the text.
function pickedMentions(text) {
  return [...state.mentionPicks].filter(([, name]) => text.includes(`@${name}`)).map(([uuid]) => uuid);
}

function send() {
  const input = $("message-input");
  const text = input.value.trim();
  if (state.editing !== null) {
    saveEdit(text);
    return;
  }
  if (state.current === null) return;
  const tray = trayOf(state.current);
  if (!text && !tray.length) return;
  if (tray.some((item) => item.status === "uploading")) {
    notify("Wait until the files are uploaded.");
    return;
  }
  if (tray.some((item) => item.status === "failed")) {
    notify("Remove the files that could not be uploaded first.");
    return;
  }
  const client_msg_id = randomId();
  const out = { chat_id: state.current, text, timestamp: new Date().toISOString() };
  if (tray.length) out.attachments = tray.map((item) => attachmentOf(item.upload));
  state.trays.delete(state.current);
  renderTray();
  if (state.replyTo !== null) out.reply_to = state.replyTo;
  const mentions = pickedMentions(text);
  if (mentions.length) out.mentions = mentions;
  state.outbox.set(client_msg_id, out);
  input.value = "";
  state.mentionPicks.clear();
  clearComposeMode();
  autoGrow();
  renderMessages();
  $("messages-scroll").scrollTop = $("messages-scroll").scrollHeight;
  if (state.wsReady) sendOut(client_msg_id, out);
}

// --- avatars and group photos -------------------------------------------------------------

const AVATAR_COLOURS = ["#b03a2e", "#7d3c98", "#2e6fd0", "#148f77", "#b9770e", "#2d6a4f", "#6e4b3a", "#34495e"];

function initials(name) {
  const words = (name || "?").trim().split(/\s+/).filter(Boolean);
  const picked = words.length > 1 ? [words[0], words.at(-1)] : [words[0] || "?"];
  return picked.map((w) => [...w][0].toUpperCase()).join("");
}

// A round picture: the thumbnail of `fileId` (fetched and cached like any thumbnail) over
// the initials of `name`, on a colour picked by `seed`. The initials show until the image
// arrives, and stay when there is none or it cannot be had. The initials are drawn by CSS
// (data-initials), so they are not part of the text around them.
function avatarEl(fileId, name, seed, size = "") {
  const span = el("span", size ? `avatar ${size}` : "avatar");
  span.dataset.initials = initials(name);
  span.setAttribute("aria-hidden", "true");
  let hash = 0;
  for (const ch of seed || name || "") hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  span.style.background = AVATAR_COLOURS[hash % AVATAR_COLOURS.length];
  if (fileId) {
    const img = el("img", "avatar-img");
    img.alt = "";
    img.dataset.fileId = fileId;
    const thumb = state.thumbs.get(fileId);
    if (thumb && thumb.url) img.src = thumb.url;
    else if (!thumb) loadThumb(fileId);
    if (!thumb || !thumb.failed) span.append(img);
  }
  return span;
}

// A group shows its photo; a private chat the other member's avatar.
function chatAvatar(chat) {
  if (chat.type === "group") return avatarEl(chat.photo, chat.name || "Group", `chat:${chat.id}`);
  const other = (chat.members || []).find((u) => u.user_uuid !== state.me.user_uuid) || state.me;
  return avatarEl(other.avatar, other.name, other.user_uuid);
}

function renderMe() {
  $("me-name").textContent = state.me.name;
  $("me-avatar").replaceChildren(avatarEl(state.me.avatar, state.me.name, state.me.user_uuid));
}

// Someone's new name or avatar: wherever they are shown.
function updateUser(user) {
  if (user.user_uuid === state.me.user_uuid) {
    state.me = { ...state.me, name: user.name, avatar: user.avatar };
    renderMe();
  }
  for (const chat of state.chats.values()) {
    for (const member of chat.members || []) {
      if (member.user_uuid !== user.user_uuid) continue;
      member.name = user.name;
      member.avatar = user.avatar;
    }
  }
  renderChatList();
  renderChatHeader();
  renderMessages();
}

let pictureFor = null; // "me", or the id of the group whose photo is being picked

function pickPicture(target) {
  pictureFor = target;
  $("picture-input").value = "";
  $("picture-input").click();
}

async function changePicture() {
  const file = $("picture-input").files[0];
  const target = pictureFor;
  if (!file || target === null) return;
  try {
    const image = await uploadImage(file);
    if (target === "me") {
      state.me = await api("PATCH", "me", { avatar: image.upload_id });
      renderMe();
    } else {
      upsertChat(await api("PATCH", `chats/${target}`, { photo: image.upload_id }));
    }
  } catch (err) {
    notify(`Could not change the picture: ${err.message}`);
  }
}

async function uploadImage(file, retry = true) {
  const res = await fetch(new URL(`uploads?name=${encodeURIComponent(file.name || "picture")}`, BASE), {
    method: "POST",
    headers: {
      authorization: `Bearer ${await accessToken()}`,
      "content-type": file.type || "application/octet-stream",
    },
    body: file,
  });
  if (res.status === 401 && retry) {
    await refreshTokens();
    return uploadImage(file, false);
  }
  const data = await res.json().catch(() => null);
  if (!res.ok) throw new Error((data && data.error && data.error.message) || `HTTP ${res.status}`);
  return data;
}

// --- files: uploading, thumbnails, the viewer, downloads --------------------------------

function isImage(a) {
  // The server sets width and height only for an image it decoded and made a thumbnail of.
  return !!(a.width && a.height);
}

function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  const units = ["KB", "MB", "GB"];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value < 10 ? value.toFixed(1) : Math.round(value)} ${units[unit]}`;
}

// The Attachment a message will carry, from the Upload the server answered.
function attachmentOf(upload) {
  const { upload_id: id, name, mime, size, width, height } = upload;
  return { id, name, mime, size, width, height };
}

// A GET with the access token (renewed once on a 401); the response, or an Error.
async function authorizedFetch(path, retry = true) {
  const res = await fetch(new URL(path, BASE), { headers: { authorization: `Bearer ${await accessToken()}` } });
  if (res.status === 401 && retry) {
    await refreshTokens();
    return authorizedFetch(path, false);
  }
  if (!res.ok) {
    const data = await res.json().catch(() => null);
    throw new Error((data && data.error && data.error.message) || `HTTP ${res.status}`);
  }
  return res;
}

function trayOf(chatId) {
  return state.trays.get(chatId) || [];
}

function addFiles(files) {
  const chatId = state.current;
  if (chatId === null || !files.length) return;
  const tray = trayOf(chatId);
  const room = MAX_ATTACHMENTS - tray.length;
  if (files.length > room) notify(`At most ${MAX_ATTACHMENTS} files go with one message.`);
  for (const file of files.slice(0, Math.max(0, room))) {
    const item = { file, status: "uploading", loaded: 0, upload: null, xhr: null, bar: null, error: "" };
    tray.push(item);
    upload(item);
  }
  state.trays.set(chatId, tray);
  renderTray();
  $("message-input").focus();
}

function removeFromTray(chatId, item) {
  item.status = "removed"; // an upload still waiting for a token then never starts
  if (item.xhr) item.xhr.abort();
  const tray = trayOf(chatId).filter((x) => x !== item);
  if (tray.length) state.trays.set(chatId, tray);
  else state.trays.delete(chatId);
  renderTray();
}

// POST /uploads with the file as the body. XMLHttpRequest, for its upload progress events.
async function upload(item, retry = true) {
  let token;
  try {
    token = await accessToken();
  } catch {
    uploadFailed(item, "not logged in");
    return;
  }
  if (item.status !== "uploading") return; // removed meanwhile
  const xhr = new XMLHttpRequest();
  item.xhr = xhr;
  xhr.open("POST", new URL(`uploads?name=${encodeURIComponent(item.file.name || "file")}`, BASE));
  xhr.setRequestHeader("authorization", `Bearer ${token}`);
  xhr.setRequestHeader("content-type", item.file.type || "application/octet-stream");
  xhr.upload.addEventListener("progress", (e) => {
    item.loaded = e.loaded;
    if (item.bar) item.bar.value = Math.min(item.loaded, item.file.size); // no redraw per event
  });
  xhr.addEventListener("load", () => {
    item.xhr = null;
    if (xhr.status === 401 && retry) {
      refreshTokens().then(
        () => upload(item, false),
        () => uploadFailed(item, "not logged in"),
      );
      return;
    }
    let data = null;
    try {
      data = JSON.parse(xhr.responseText);
    } catch {
      /* not JSON: said below by its status */
    }
    if (xhr.status === 201 && data) {
      item.status = "done";
      item.loaded = item.file.size;
      item.upload = data;
      renderTray();
    } else {
      uploadFailed(item, (data && data.error && data.error.message) || `HTTP ${xhr.status}`);
    }
  });
  // A server that refuses a too-large body early may close the connection before answering.
  xhr.addEventListener("error", () => uploadFailed(item, "the upload was interrupted or refused"));
  xhr.send(item.file);
}

function uploadFailed(item, message) {
  item.xhr = null;
  if (item.status !== "uploading") return;
  item.status = "failed";
  item.error = message;
  renderTray();
}

function renderTray() {
  const list = $("attach-tray");
  const chatId = state.current;
  const tray = chatId === null ? [] : trayOf(chatId);
  list.hidden = tray.length === 0;
  list.replaceChildren(
    ...tray.map((item) => {
      const li = el("li", `attach-item ${item.status}`);
      li.dataset.status = item.status;
      li.append(el("span", "attach-name", item.file.name || "file"), el("span", "attach-size", formatSize(item.file.size)));
      if (item.status === "uploading") {
        const bar = el("progress", "attach-progress");
        bar.max = Math.max(1, item.file.size);
        bar.value = Math.min(item.loaded, item.file.size);
        bar.setAttribute("aria-label", `Uploading ${item.file.name}`);
        item.bar = bar;
        li.append(bar);
      } else if (item.status === "failed") {
        li.append(el("span", "attach-error", `Not uploaded: ${item.error}`));
      } else {
        li.append(el("span", "attach-done", "✓"));
      }
      const remove = el("button", "attach-remove link", "✕");
      remove.type = "button";
      remove.setAttribute("aria-label", `Remove ${item.file.name}`);
      remove.addEventListener("click", () => removeFromTray(chatId, item));
      li.append(remove);
      return li;
    }),
  );
}

function wireDragAndDrop() {
  const zone = $("chat-view");
  const hasFiles = (e) => e.dataTransfer && [...e.dataTransfer.types].includes("Files");
  // Files dropped anywhere else must not make the browser leave the page to show them.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (e) => {
      if (hasFiles(e)) e.preventDefault();
    });
  }
  zone.addEventListener("dragover", (e) => {
    if (!hasFiles(e) || state.current === null) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
    $("drop-zone").hidden = false;
  });
  zone.addEventListener("dragleave", (e) => {
    if (!zone.contains(e.relatedTarget)) $("drop-zone").hidden = true;
  });
  zone.addEventListener("drop", (e) => {
    $("drop-zone").hidden = true;
    if (!hasFiles(e) || state.current === null) return;
    e.preventDefault();
    addFiles([...e.dataTransfer.files]);
  });
}

function attachmentsBlock(attachments) {
  const box = el("div", "attachments");
  for (const a of attachments) box.append(isImage(a) ? imageThumb(a) : fileChip(a));
  return box;
}

function imageThumb(a) {
  const button = el("button", "thumb");
  button.type = "button";
  button.dataset.fileId = a.id;
  button.title = `${a.name} (${a.width}×${a.height}, ${formatSize(a.size)})`;
  button.setAttribute("aria-label", `Open ${a.name}`);
  const img = el("img", "thumb-img");
  img.alt = a.name;
  // Its size is known before the bytes come: the list does not jump when they do.
  const scale = Math.min(1, THUMB_BOX / Math.max(a.width, a.height));
  img.width = Math.max(1, Math.round(a.width * scale));
  img.height = Math.max(1, Math.round(a.height * scale));
  img.dataset.fileId = a.id;
  const thumb = state.thumbs.get(a.id);
  if (thumb && thumb.url) img.src = thumb.url;
  else if (thumb && thumb.failed) button.classList.add("unavailable");
  else if (!thumb) loadThumb(a.id);
  button.append(img);
  button.addEventListener("click", () => openViewer(a));
  return button;
}

// Thumbnails come by an authorized fetch, kept as blob URLs (the list is redrawn often).
async function loadThumb(id) {
  state.thumbs.set(id, {});
  let entry;
  try {
    const blob = await (await authorizedFetch(`files/${id}/thumbnail`)).blob();
    entry = { url: URL.createObjectURL(blob) };
  } catch {
    entry = { failed: true };
  }
  if (!state.thumbs.has(id)) {
    if (entry.url) URL.revokeObjectURL(entry.url); // logged out meanwhile
    return;
  }
  state.thumbs.set(id, entry);
  while (state.thumbs.size > THUMB_CACHE) {
    const [oldest, old] = state.thumbs.entries().next().value;
    if (old.url) URL.revokeObjectURL(old.url);
    state.thumbs.delete(oldest);
  }
  for (const img of document.querySelectorAll("img.thumb-img, img.avatar-img")) {
    if (img.dataset.fileId !== id) continue;
    if (entry.url) img.src = entry.url;
    else if (img.classList.contains("avatar-img")) img.remove(); // the initials stay
    else img.parentElement.classList.add("unavailable");
  }
}

function fileChip(a) {
  const button = el("button", "file-chip");
  button.type = "button";
  button.dataset.fileId = a.id;
  button.title = `Download ${a.name}`;
  button.setAttribute("aria-label", `Download ${a.name}, ${formatSize(a.size)}`);
  button.append(el("span", "file-icon", "📄"), el("span", "file-name", a.name), el("span", "file-size", formatSize(a.size)));
  button.addEventListener("click", () => downloadFile(a));
  return button;
}

// A download through a signed link: the browser streams it to disk, nothing held here.
async function downloadFile(a) {
  let link;
  try {
    link = await api("POST", `files/${a.id}/link`);
  } catch (err) {
    notify(`Could not download ${a.name}: ${err.message}`);
    return;
  }
  // The link is relative to where chatd is served: resolve it against the page's base.
  const anchor = el("a");
  anchor.href = new URL(link.url.replace(/^\/+/, ""), BASE).href;
  anchor.download = a.name;
  document.body.append(anchor);
  anchor.click();
  anchor.remove();
}

let viewing = null; // {file, url} shown in the viewer

async function openViewer(a) {
  closeViewer();
  const shown = { file: a, url: null };
  viewing = shown;
  $("image-viewer-name").textContent = a.name;
  viewerState("Loading…");
  const img = $("image-viewer-img");
  img.hidden = true;
  img.alt = a.name;
  img.removeAttribute("src");
  $("image-viewer-download").onclick = () => downloadFile(a);
  if (!$("image-viewer").open) $("image-viewer").showModal();
  try {
    const blob = await (await authorizedFetch(`files/${a.id}`)).blob();
    if (viewing !== shown) return;
    shown.url = URL.createObjectURL(blob);
    img.src = shown.url;
    img.hidden = false;
    viewerState("");
  } catch (err) {
    if (viewing === shown) viewerState(`Could not load the picture: ${err.message}`);
  }
}

function viewerState(text) {
  $("image-viewer-state").textContent = text;
  $("image-viewer-state").hidden = !text;
}

function closeViewer() {
  if (viewing && viewing.url) URL.revokeObjectURL(viewing.url);
  viewing = null;
  const img = $("image-viewer-img");
  img.removeAttribute("src");
  img.hidden = true;
  if ($("image-viewer").open) $("image-viewer").close();
}

// A short message about something that did not work (an action refused, not connected).
let noticeTimer = null;
function notify(text) {
  const node = $("notice");
  node.textContent = text;
  node.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => {
    node.hidden = true;
  }, 5000);
}

// Run an action on the socket; a refusal is shown, not thrown.
async function act(action, fields) {
  try {
    return await request(action, fields);
  } catch (err) {
    notify(`Could not ${action.replace(/_/g, " ")}: ${err.message}`);
    return null;
  }
}

// --- editing and replying: the bar above the composer -----------------------------------

function showComposeBar(label, m) {
  $("compose-bar-label").textContent = label;
  $("compose-bar-text").textContent = snippet(m);
  $("compose-bar").hidden = false;
}

function clearComposeMode() {
  const wasEditing = state.editing !== null;
  state.editing = null;
  state.replyTo = null;
  $("compose-bar").hidden = true;
  if (wasEditing) {
    $("message-input").value = "";
    autoGrow();
  }
}

function startReply(m) {
  clearComposeMode();
  state.replyTo = m.id;
  showComposeBar(`Reply to ${memberName(m.chat_id, m.sender_uuid)}`, m);
  $("message-input").focus();
}

function startEdit(m) {
  clearComposeMode();
  state.editing = m.id;
  showComposeBar("Edit message", m);
  const input = $("message-input");
  input.value = m.text;
  autoGrow();
  input.focus();
  input.setSelectionRange(input.value.length, input.value.length);
}

// ↑ in an empty composer edits your newest message, as in most messengers. Not while one
// is still on its way: that one is the newest, and it cannot be edited yet.
function editLast() {
  for (const out of state.outbox.values()) if (out.chat_id === state.current) return;
  const me = state.me.user_uuid;
  const last = sortedMessages(state.current)
    .filter((m) => m.sender_uuid === me && !m.deleted)
    .at(-1);
  if (last) startEdit(last);
}

async function saveEdit(text) {
  const id = state.editing;
  const m = store(state.current).byId.get(id);
  clearComposeMode();
  if (!m || !text || text === m.text) return;
  const updated = await act("edit_message", { message_id: id, text });
  if (updated) applyUpdate(updated);
}

// --- message actions --------------------------------------------------------------------

function menuItem(label, onChoose, className) {
  const button = el("button", className || "menu-item", label);
  button.type = "button";
  button.setAttribute("role", "menuitem");
  button.addEventListener("click", (e) => {
    e.stopPropagation();
    closeMenu();
    onChoose();
  });
  return button;
}

function menuItems(m) {
  const chat = state.chats.get(m.chat_id);
  const mine = m.sender_uuid === state.me.user_uuid;
  const canPin = chat && (chat.type === "private" || isAdmin(chat));
  const items = [];
  if (!m.deleted) {
    const quick = el("div", "quick-reactions");
    quick.setAttribute("role", "group");
    quick.setAttribute("aria-label", "Quick reactions");
    for (const emoji of QUICK_REACTIONS) {
      const item = menuItem(emoji, () => react(m, emoji), "menu-item emoji");
      item.setAttribute("aria-label", `React ${emoji}`);
      quick.append(item);
    }
    items.push(quick, menuItem("Other reaction…", () => reactWithAny(m)));
    items.push(menuItem("Reply", () => startReply(m)));
    if (mine) items.push(menuItem("Edit", () => startEdit(m)));
    if (canPin && chat.pinned_message_id === m.id) items.push(menuItem("Unpin", () => unpin(m.chat_id)));
    else if (canPin) items.push(menuItem("Pin", () => pin(m)));
    items.push(menuItem("Forward…", () => openForward(m)));
  }
  items.push(menuItem("Delete for me", () => deleteMessage(m, false)));
  if (!m.deleted && (mine || (chat && chat.type === "group" && isAdmin(chat)))) {
    items.push(menuItem("Delete for everyone", () => deleteMessage(m, true), "menu-item danger"));
  }
  return items;
}

function openMenu(m, anchor) {
  const menu = $("message-menu");
  menu.replaceChildren(...menuItems(m));
  menu.dataset.messageId = m.id;
  menu.hidden = false;
  // Below the button, or above it when there is no room; opening away from the bubble
  // (the button sits left of your own messages, right of others'); kept inside the window.
  const at = anchor.getBoundingClientRect();
  const { width, height } = menu.getBoundingClientRect();
  const top = at.bottom + height > innerHeight ? Math.max(4, at.top - height) : at.bottom;
  const left = m.sender_uuid === state.me.user_uuid ? at.right - width : at.left;
  menu.style.top = `${top}px`;
  menu.style.left = `${Math.max(4, Math.min(left, innerWidth - width - 4))}px`;
  const first = menu.querySelector("button");
  if (first) first.focus();
}

function closeMenu() {
  $("message-menu").hidden = true;
}

async function react(m, emoji) {
  const updated = await act("react", { message_id: m.id, emoji });
  if (updated) applyUpdate(updated);
}

function reactWithAny(m) {
  const emoji = (prompt("React with which emoji?") || "").trim();
  if (emoji) react(m, emoji);
}

async function toggleReaction(m, emoji, mine) {
  const updated = await act(mine ? "unreact" : "react", { message_id: m.id, emoji });
  if (updated) applyUpdate(updated);
}

async function deleteMessage(m, forEveryone) {
  const question = forEveryone
    ? "Delete this message for everyone in the chat?"
    : "Delete this message for you? The others still see it.";
  if (!confirm(question)) return;
  const done = await act("delete_message", { message_id: m.id, for_everyone: forEveryone });
  if (done && !forEveryone) hideMessage(m.chat_id, m.id);
}

async function pin(m) {
  const chat = await act("pin_message", { message_id: m.id, chat_id: m.chat_id });
  if (chat) upsertChat(chat);
}

async function unpin(chatId) {
  const chat = await act("unpin_message", { chat_id: chatId });
  if (chat) upsertChat(chat);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Scroll to a message of the open chat and flash it, loading older pages until it is held.
async function jumpTo(chatId, id) {
  const s = store(chatId);
  for (let pages = 0; !s.byId.has(id) && pages < JUMP_MAX_PAGES; pages++) {
    if (state.current !== chatId) return;
    if (s.loading) await sleep(100);
    else if (!s.hasMore) break;
    else await loadHistory(chatId, true);
  }
  if (state.current !== chatId) return;
  if (!s.byId.has(id)) {
    notify("That message is not available.");
    return;
  }
  state.highlight = { id };
  renderMessages();
  const li = $("messages").querySelector(`[data-message-id="${id}"]`);
  if (li) li.scrollIntoView({ block: "center" });
  setTimeout(() => {
    if (state.highlight && state.highlight.id === id) {
      state.highlight = null;
      if (state.current === chatId) renderMessages();
    }
  }, 2000);
}

// --- presence ---------------------------------------------------------------------------

function partnerPresence(chat) {
  if (!chat || chat.type !== "private") return null;
  const other = (chat.members || []).find((u) => u.user_uuid !== state.me.user_uuid);
  return other ? state.presence.get(other.user_uuid) || null : null;
}

function lastSeenText(p) {
  if (!p) return "";
  if (p.status === "online") return "online";
  if (!p.last_seen) return "last seen a while ago";
  return `last seen ${formatTime(p.last_seen)}`;
}

function renderChatStatus(chat) {
  const status = $("chat-status");
  status.classList.remove("online");
  if (!chat) {
    status.textContent = "";
  } else if (chat.type === "private") {
    const p = partnerPresence(chat);
    status.textContent = lastSeenText(p);
    status.classList.toggle("online", !!p && p.status === "online");
  } else {
    const n = (chat.members || []).length;
    const online = state.onlineInGroup.get(chat.id);
    status.textContent = `${n} ${n === 1 ? "member" : "members"}${online ? `, ${online} online` : ""}`;
  }
}

// Groups are not told presence as it changes (big ones would cost too much): ask on open.
async function askGroupPresence(chatId) {
  const chat = state.chats.get(chatId);
  if (!chat || chat.type !== "group" || !state.wsReady) return;
  const ids = (chat.members || []).map((u) => u.user_uuid).slice(0, 1000);
  try {
    const reply = await request("get_presence", { user_ids: ids });
    for (const p of reply.presence) state.presence.set(p.user_uuid, p);
    const online = reply.presence.filter((p) => p.status === "online" && p.user_uuid !== state.me.user_uuid);
    state.onlineInGroup.set(chatId, online.length);
    if (state.current === chatId) renderChatStatus(chat);
  } catch {
    /* shown without it */
  }
}

// --- search -----------------------------------------------------------------------------

// Highlights are offsets in code points (the server's characters), not UTF-16 units.
function highlighted(text, highlights) {
  const chars = Array.from(text);
  const span = el("span", "search-text");
  let at = 0;
  for (const h of highlights) {
    if (h.start > at) span.append(document.createTextNode(chars.slice(at, h.start).join("")));
    span.append(el("mark", null, chars.slice(h.start, h.end).join("")));
    at = h.end;
  }
  if (at < chars.length) span.append(document.createTextNode(chars.slice(at).join("")));
  return span;
}

async function runSearch(more = false) {
  const q = $("search-input").value.trim();
  const results = $("search-results");
  const search = state.search;
  if (!q) {
    search.q = "";
    search.results = [];
    search.next = null;
    results.hidden = true;
    $("search-more").hidden = true;
    $("chat-list").hidden = false;
    $("no-chats").hidden = state.chats.size > 0;
    return;
  }
  const seq = ++search.seq;
  const fields = { q, limit: 20 };
  if (more && search.next) fields.before = search.next;
  let reply;
  try {
    reply = await request("search_messages", fields);
  } catch (err) {
    notify(`Search failed: ${err.message}`);
    return;
  }
  if (seq !== search.seq) return; // a newer search started meanwhile
  search.q = q;
  search.results = more ? [...search.results, ...reply.results] : reply.results;
  search.next = reply.has_more ? reply.next_before : null;
  renderSearch();
}

function renderSearch() {
  const results = $("search-results");
  const { results: hits } = state.search;
  results.hidden = false;
  $("chat-list").hidden = true;
  $("no-chats").hidden = true;
  results.replaceChildren(
    ...(hits.length ? hits : [null]).map((hit) => {
      const li = el("li");
      if (!hit) {
        li.append(el("p", "hint", "No messages found"));
        return li;
      }
      const m = hit.message;
      const button = el("button", "search-result");
      button.type = "button";
      button.dataset.messageId = m.id;
      button.append(el("span", "search-chat", chatTitle(state.chats.get(m.chat_id)) || "A chat"));
      button.append(highlighted(m.text, hit.highlights));
      button.append(el("span", "meta", formatTime(m.timestamp)));
      button.addEventListener("click", () => openFound(m));
      li.append(button);
      return li;
    }),
  );
  $("search-more").hidden = !state.search.next;
}

// Open the message's chat and scroll to it, loading history down to it.
async function openFound(m) {
  if (!state.chats.has(m.chat_id)) await fetchChat(m.chat_id);
  await openChat(m.chat_id);
  await jumpTo(m.chat_id, m.id);
}

// --- notifications ----------------------------------------------------------------------

function isMuted(chat) {
  return !!chat && !!chat.mute_until && Date.parse(chat.mute_until) > Date.now();
}

function wantsNotice(chat, m) {
  if (!chat || isMuted(chat)) return false;
  const level = chat.notify || "all";
  return level === "all" || (level === "mentions" && mentionsMe(m));
}

// The tab's title counts unread messages in chats that are not muted.
function updateTitle() {
  let total = 0;
  for (const chat of state.chats.values()) if (!isMuted(chat)) total += unread(chat).count;
  document.title = total > 0 ? `(${total > 99 ? "99+" : total}) chatd` : "chatd";
}

// A message while the tab is hidden: a system notification (the page's own, not a push).
function notifyHidden(m) {
  if (!document.hidden || !("Notification" in window) || Notification.permission !== "granted") return;
  if (m.sender_uuid === state.me.user_uuid) return;
  const chat = state.chats.get(m.chat_id);
  if (!wantsNotice(chat, m)) return;
  const sender = memberName(m.chat_id, m.sender_uuid);
  const title = chat.type === "group" ? `${sender} in ${chatTitle(chat)}` : sender;
  const notice = new Notification(title, { body: messageSummary(m) || "", tag: `chat-${m.chat_id}` });
  notice.onclick = () => {
    window.focus();
    openChat(m.chat_id);
    notice.close();
  };
}

function base64UrlToBytes(text) {
  const padded = text.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (text.length % 4)) % 4);
  return Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
}

// The prompt: permission for notifications, then (where the browser can) a Web Push
// subscription, so messages arrive even with no tab open.
function renderNotificationPrompt() {
  const button = $("enable-notifications");
  button.hidden = !("Notification" in window) || Notification.permission !== "default";
}

async function enableNotifications() {
  const permission = await Notification.requestPermission();
  renderNotificationPrompt();
  if (permission === "granted") await subscribePush();
}

async function subscribePush() {
  if (!("serviceWorker" in navigator) || !("PushManager" in window)) return;
  try {
    const registration = await navigator.serviceWorker.register("chat/sw.js");
    await navigator.serviceWorker.ready;
    let subscription = await registration.pushManager.getSubscription();
    if (!subscription) {
      const { public_key: key } = await api("GET", "push/vapid_public_key");
      subscription = await registration.pushManager.subscribe({
        userVisibleOnly: true,
        applicationServerKey: base64UrlToBytes(key),
      });
    }
    await api("POST", "push/subscriptions", subscription.toJSON());
  } catch (err) {
    console.warn("Web Push is not available here", err);
  }
}

function openNotifySettings() {
  const chat = state.chats.get(state.current);
  if (!chat) return;
  $("notify-level").value = chat.notify || "all";
  const until = chat.mute_until ? Date.parse(chat.mute_until) : 0;
  $("mute-for").value = until > Date.now() ? (until > Date.now() + 365 * 86400e3 ? "forever" : "") : "";
  $("notify-error").textContent = "";
  $("notify-dialog").showModal();
}

async function saveNotifySettings(event) {
  event.preventDefault();
  const chatId = state.current;
  const choice = $("mute-for").value;
  let muteUntil = null;
  if (choice === "forever") muteUntil = "2100-01-01T00:00:00Z";
  else if (choice) muteUntil = new Date(Date.now() + Number(choice) * 1000).toISOString();
  try {
    const settings = await request("set_notifications", {
      chat_id: chatId,
      notify: $("notify-level").value,
      mute_until: muteUntil,
    });
    upsertChat({ id: chatId, mute_until: settings.mute_until, notify: settings.notify });
    $("notify-dialog").close();
  } catch (err) {
    $("notify-error").textContent = err.message;
  }
}

// --- forwarding -------------------------------------------------------------------------

let forwarding = null; // the message being forwarded

function openForward(m) {
  forwarding = m;
  $("forward-error").textContent = "";
  const chats = [...state.chats.values()].sort((a, b) => b.active - a.active || b.id - a.id);
  $("forward-list").replaceChildren(
    ...chats.map((chat) => {
      const li = el("li");
      const button = el("button", "forward-target", chatTitle(chat));
      button.type = "button";
      button.dataset.chatId = chat.id;
      button.addEventListener("click", () => forwardTo(chat.id));
      li.append(button);
      return li;
    }),
  );
  $("forward-dialog").showModal();
}

async function forwardTo(chatId) {
  const m = forwarding;
  if (!m) return;
  try {
    const copy = await request("forward_message", { message_id: m.id, chat_id: chatId, client_msg_id: randomId() });
    addMessage(copy);
    $("forward-dialog").close();
    forwarding = null;
    openChat(chatId);
  } catch (err) {
    $("forward-error").textContent = err.message;
  }
}

// --- @-mentions -------------------------------------------------------------------------

const mentionState = { matches: [], active: 0, start: 0 };

// The "@query" just before the caret, if the caret is in one.
function mentionQuery() {
  const input = $("message-input");
  const before = input.value.slice(0, input.selectionStart);
  const match = /(?:^|\s)@([^\s@]{0,32})$/u.exec(before);
  return match ? { query: match[1], start: before.length - match[1].length - 1 } : null;
}

// --- slash commands: the commands of the chat's bots, offered on "/" ---------------------

const commandCache = new Map(); // chat id -> its bots' commands (a Promise while asked)

// The chat's commands as known now; asks the server once (only chats with a bot have any).
function chatCommands(chatId) {
  const chat = state.chats.get(chatId);
  if (!chat || !(chat.members || []).some((u) => u.is_bot)) return [];
  const known = commandCache.get(chatId);
  if (Array.isArray(known)) return known;
  if (!known) {
    commandCache.set(
      chatId,
      api("GET", `chats/${chatId}/commands`).then(
        (reply) => {
          commandCache.set(chatId, reply.commands);
          if (state.current === chatId) updateMentions();
        },
        () => commandCache.delete(chatId),
      ),
    );
  }
  return [];
}

// The "/name" being typed at the start of the message, if the caret is in it.
function commandQuery() {
  const input = $("message-input");
  const match = /^\/([a-z0-9_]{0,32})$/i.exec(input.value.slice(0, input.selectionStart));
  return match ? match[1].toLowerCase() : null;
}

function updateMentions() {
  const command = state.current === null ? null : commandQuery();
  if (command !== null) {
    mentionState.matches = chatCommands(state.current)
      .filter((c) => c.name.startsWith(command))
      .slice(0, 8)
      .map((c) => ({ command: c }));
    mentionState.start = 0;
    mentionState.active = 0;
    renderMentions();
    return;
  }
  const found = state.current === null ? null : mentionQuery();
  const chat = state.chats.get(state.current);
  if (!found || !chat) {
    hideMentions();
    return;
  }
  const q = found.query.toLowerCase();
  mentionState.matches = (chat.members || [])
    .filter((u) => u.user_uuid !== state.me.user_uuid)
    .filter((u) => u.name.toLowerCase().split(/\s+/).some((word) => word.startsWith(q)) || u.name.toLowerCase().startsWith(q))
    .slice(0, 8);
  mentionState.start = found.start;
  mentionState.active = 0;
  renderMentions();
}

function renderMentions() {
  const list = $("mention-list");
  list.hidden = mentionState.matches.length === 0;
  list.replaceChildren(
    ...mentionState.matches.map((u, i) => {
      const li = u.command
        ? el("li", "mention-option command-option", `/${u.command.name}`)
        : el("li", "mention-option", u.name);
      if (u.command) {
        const about = u.command.description ? `${u.command.description} · ` : "";
        li.append(el("span", "command-about", ` ${about}@${u.command.bot_username}`));
      }
      li.id = `mention-${i}`;
      li.setAttribute("role", "option");
      li.setAttribute("aria-selected", String(i === mentionState.active));
      // mousedown, not click: the textarea must keep its focus and caret.
      li.addEventListener("mousedown", (e) => {
        e.preventDefault();
        chooseMention(u);
      });
      return li;
    }),
  );
  $("message-input").setAttribute("aria-activedescendant", list.hidden ? "" : `mention-${mentionState.active}`);
}

function hideMentions() {
  mentionState.matches = [];
  $("mention-list").hidden = true;
  $("message-input").removeAttribute("aria-activedescendant");
}

function mentionsOpen() {
  return !$("mention-list").hidden;
}

function chooseMention(user) {
  const input = $("message-input");
  const end = input.selectionStart;
  const insert = user.command ? `/${user.command.name} ` : `@${user.name} `;
  input.value = input.value.slice(0, mentionState.start) + insert + input.value.slice(end);
  const caret = mentionState.start + insert.length;
  input.setSelectionRange(caret, caret);
  if (!user.command) state.mentionPicks.set(user.user_uuid, user.name);
  hideMentions();
  autoGrow();
}

// Keys of the mention list; true when the key was its own.
function mentionKey(e) {
  if (!mentionsOpen()) return false;
  const n = mentionState.matches.length;
  if (e.key === "ArrowDown" || e.key === "ArrowUp") {
    mentionState.active = (mentionState.active + (e.key === "ArrowDown" ? 1 : n - 1)) % n;
    renderMentions();
  } else if (e.key === "Enter" || e.key === "Tab") {
    chooseMention(mentionState.matches[mentionState.active]);
  } else if (e.key === "Escape") {
    hideMentions();
  } else {
    return false;
  }
  e.preventDefault();
  return true;
}

function onTypingInput() {
  autoGrow();
  updateMentions();
  const now = Date.now();
  if (state.current === null || !$("message-input").value.trim()) return;
  if (now - state.lastTypingSent < TYPING_SEND_EVERY) return;
  state.lastTypingSent = now;
  sendFrame("typing", { chat_id: state.current });
}

function showTyping(chatId, userUuid) {
  if (userUuid === state.me.user_uuid) return;
  let users = state.typing.get(chatId);
  if (!users) state.typing.set(chatId, (users = new Map()));
  clearTimeout(users.get(userUuid));
  users.set(userUuid, setTimeout(() => clearTyping(chatId, userUuid), TYPING_SHOW_FOR));
  renderTyping();
}

function clearTyping(chatId, userUuid) {
  const users = state.typing.get(chatId);
  if (!users || !users.has(userUuid)) return;
  clearTimeout(users.get(userUuid));
  users.delete(userUuid);
  renderTyping();
}

function renderTyping() {
  const users = state.typing.get(state.current);
  const names = users ? [...users.keys()].map((u) => memberName(state.current, u)) : [];
  let text = "";
  if (names.length === 1) text = `${names[0]} is typing…`;
  else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length > 2) text = "Several people are typing…";
  $("typing").textContent = text;
}

function autoGrow() {
  const input = $("message-input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 160)}px`;
}

// --- new chat dialog --------------------------------------------------------------------

const picked = new Map(); // user uuid -> name

function dialogKind() {
  return document.querySelector('input[name="kind"]:checked').value;
}

async function searchUsers() {
  const q = $("user-search").value.trim();
  const results = $("user-results");
  try {
    const reply = await api("GET", `users_list?limit=50&q=${encodeURIComponent(q)}`);
    if ($("user-search").value.trim() !== q) return; // a newer search is on its way
    const users = reply.users.filter((u) => u.user_uuid !== state.me.user_uuid);
    results.replaceChildren(
      ...users.map((u) => {
        const li = el("li");
        const label = el("label", "user-pick");
        const box = el("input");
        box.type = dialogKind() === "private" ? "radio" : "checkbox";
        box.name = "pick";
        box.value = u.user_uuid;
        box.checked = picked.has(u.user_uuid);
        box.addEventListener("change", () => {
          if (box.type === "radio") picked.clear();
          if (box.checked) picked.set(u.user_uuid, u.name);
          else picked.delete(u.user_uuid);
        });
        label.append(box, el("span", null, u.name));
        li.append(label);
        return li;
      }),
    );
    if (!users.length) results.replaceChildren(el("li", "hint", "Nobody found"));
  } catch (err) {
    $("new-chat-error").textContent = err.message;
  }
}

function openNewChat() {
  picked.clear();
  $("user-search").value = "";
  $("group-name").value = "";
  $("new-chat-error").textContent = "";
  document.querySelector('input[name="kind"][value="private"]').checked = true;
  $("group-name-field").hidden = true;
  $("new-chat-dialog").showModal();
  $("user-search").focus();
  searchUsers();
}

async function createChat(event) {
  event.preventDefault();
  const kind = dialogKind();
  const body = { type: kind, user_ids: [...picked.keys()] };
  if (kind === "private" && body.user_ids.length !== 1) {
    $("new-chat-error").textContent = "Pick one person.";
    return;
  }
  if (kind === "group") {
    body.name = $("group-name").value.trim();
    if (!body.name) {
      $("new-chat-error").textContent = "Give the group a name.";
      return;
    }
  }
  try {
    const chat = await api("POST", "chats", body);
    upsertChat(chat);
    $("new-chat-dialog").close();
    openChat(chat.id);
  } catch (err) {
    $("new-chat-error").textContent = err.message;
  }
}

// --- logging in and out -----------------------------------------------------------------

let registering = false;

// CHATD_LOCAL_ACCOUNTS=false (the server marks the page): no password login or sign-up
// here; users come from an app's sign-in, which shows this page with ?embed.
const LOCAL_ACCOUNTS = document.documentElement.dataset.localAccounts !== "false";

function showAuth(message = "") {
  $("app-view").hidden = true;
  $("auth-view").hidden = false;
  if (EMBEDDED || !LOCAL_ACCOUNTS) {
    // No login here: an app signs in. Say why chat is not shown (embedded: the app will
    // hand over a token; alone: where to go instead).
    $("auth-form").hidden = true;
    $("embed-status").hidden = false;
    $("embed-status").textContent = EMBEDDED
      ? message || "Connecting to chat…"
      : `${message ? `${message} ` : ""}This chat server has no accounts of its own: sign in to the app that offers it, and open the chat there.`;
    return;
  }
  $("auth-error").textContent = message;
  $("auth-email").focus();
}

function toggleRegister() {
  registering = !registering;
  $("name-field").hidden = !registering;
  $("auth-title").textContent = registering ? "Create an account" : "Log in";
  $("auth-submit").textContent = registering ? "Create account" : "Log in";
  $("auth-toggle").textContent = registering ? "Have an account? Log in" : "New here? Create an account";
  $("auth-password").autocomplete = registering ? "new-password" : "current-password";
  $("auth-error").textContent = "";
}

async function submitAuth(event) {
  event.preventDefault();
  const email = $("auth-email").value.trim();
  const password = $("auth-password").value;
  $("auth-error").textContent = "";
  try {
    if (registering) {
      await publicPost("register", { name: $("auth-name").value.trim(), email, password });
    }
    saveAuth(await publicPost("login", { email, password }));
    $("auth-password").value = "";
    await start();
  } catch (err) {
    $("auth-error").textContent = err.message;
  }
}

async function start() {
  state.me = await api("GET", "me");
  renderMe();
  $("auth-view").hidden = true;
  $("app-view").hidden = false;
  openChat(null);
  renderNotificationPrompt();
  await loadChatList();
  connect();
  if ("Notification" in window && Notification.permission === "granted") subscribePush();
}

// The log-out button: sign this session out on the server too (its tokens stop working
// and its sockets close everywhere), then forget it here whatever the server said.
async function signOut() {
  if (state.auth) await api("POST", "logout", undefined, false).catch(() => {});
  logout();
}

function logout(message = "") {
  const ws = state.ws;
  state.auth = null;
  state.ws = null;
  state.wsReady = false;
  if (ws) ws.close();
  clearTimeout(state.refreshTimer);
  clearTimeout(state.reconnectTimer);
  sessionStorage.removeItem("chatd.auth");
  for (const items of state.trays.values()) for (const item of items) if (item.xhr) item.xhr.abort();
  for (const thumb of state.thumbs.values()) if (thumb.url) URL.revokeObjectURL(thumb.url);
  closeViewer();
  for (const key of ["chats", "msgs", "seen", "versions", "quotes", "outbox", "typing", "mentionPicks", "trays", "thumbs", "blocked", "unfolded"]) {
    state[key].clear();
  }
  renderTray();
  clearComposeMode();
  closeMenu();
  state.current = null;
  setConnStatus("");
  showAuth(message);
}

// --- wiring -----------------------------------------------------------------------------

function init() {
  $("auth-form").addEventListener("submit", submitAuth);
  $("auth-toggle").addEventListener("click", toggleRegister);
  $("logout").addEventListener("click", () => signOut());
  $("me-avatar").addEventListener("click", () => pickPicture("me"));
  $("chat-avatar").addEventListener("click", () => {
    if (state.current !== null) pickPicture(state.current);
  });
  $("picture-input").addEventListener("change", changePicture);
  $("back").addEventListener("click", () => openChat(null));
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  const input = $("message-input");
  input.addEventListener("keydown", (e) => {
    if (e.isComposing || mentionKey(e)) return;
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      send();
    } else if (e.key === "ArrowUp" && !input.value && state.current !== null) {
      e.preventDefault();
      editLast();
    } else if (e.key === "Escape" && (state.editing !== null || state.replyTo !== null)) {
      e.preventDefault();
      clearComposeMode();
    }
  });
  input.addEventListener("input", onTypingInput);
  input.addEventListener("paste", (e) => {
    const files = [...((e.clipboardData && e.clipboardData.files) || [])];
    if (!files.length || state.current === null) return;
    e.preventDefault(); // the files, not their names or an HTML copy of them
    addFiles(files);
  });
  $("attach").addEventListener("click", () => $("file-input").click());
  $("file-input").addEventListener("change", () => {
    addFiles([...$("file-input").files]);
    $("file-input").value = "";
  });
  wireDragAndDrop();
  $("image-viewer-close").addEventListener("click", closeViewer);
  $("image-viewer").addEventListener("close", closeViewer);
  $("image-viewer").addEventListener("click", (e) => {
    if (e.target === $("image-viewer")) closeViewer(); // a click on the backdrop
  });
  input.addEventListener("blur", hideMentions);
  $("compose-bar-cancel").addEventListener("click", clearComposeMode);
  $("pin-banner").addEventListener("click", () => {
    const chat = state.chats.get(state.current);
    if (chat && chat.pinned_message_id) jumpTo(chat.id, chat.pinned_message_id);
  });
  document.addEventListener("click", (e) => {
    if (!$("message-menu").contains(e.target)) closeMenu();
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && !$("message-menu").hidden) {
      closeMenu();
      input.focus();
    }
  });
  $("messages-scroll").addEventListener("scroll", closeMenu);
  $("forward-cancel").addEventListener("click", () => $("forward-dialog").close());
  $("messages-scroll").addEventListener("scroll", () => {
    const chatId = state.current;
    if ($("messages-scroll").scrollTop < 80 && chatId !== null && store(chatId).loaded) {
      loadHistory(chatId, true);
    }
  });
  document.addEventListener("visibilitychange", markReadIfVisible);
  window.addEventListener("focus", markReadIfVisible);
  $("new-chat").addEventListener("click", openNewChat);
  let messageSearchTimer = null;
  $("search-input").addEventListener("input", () => {
    clearTimeout(messageSearchTimer);
    messageSearchTimer = setTimeout(() => runSearch(false), 250);
  });
  $("search-more").addEventListener("click", () => runSearch(true));
  $("chat-settings").addEventListener("click", openNotifySettings);
  $("notify-form").addEventListener("submit", saveNotifySettings);
  $("notify-cancel").addEventListener("click", () => $("notify-dialog").close());
  $("enable-notifications").addEventListener("click", () => enableNotifications());
  $("new-chat-cancel").addEventListener("click", () => $("new-chat-dialog").close());
  $("new-chat-form").addEventListener("submit", createChat);
  let searchTimer = null;
  $("user-search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(searchUsers, 200);
  });
  for (const radio of document.querySelectorAll('input[name="kind"]')) {
    radio.addEventListener("change", () => {
      $("group-name-field").hidden = dialogKind() !== "group";
      picked.clear();
      searchUsers();
    });
  }

  if (EMBEDDED) {
    $("logout").hidden = true;
    startEmbedded();
  } else if (loadAuth()) {
    scheduleRefresh();
    start().catch(() => logout());
  } else {
    showAuth();
  }
}

// Embedded: the first token from the page, then chat; asked again a few seconds later
// when the page gives none or chatd refuses it.
async function startEmbedded() {
  showAuth();
  try {
    await refreshTokens();
    await start();
  } catch (err) {
    logout(`Chat is not available: ${err.message}`);
    setTimeout(startEmbedded, 5000);
  }
}

init();
