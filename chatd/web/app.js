// chatd web client: one module, no framework, no build step.
// Every piece of user text reaches the DOM through textContent, never as HTML.
// The protocol is described in docs/protocol.md.

const BASE = new URL(".", location.href); // where chatd lives (works under a path prefix)
const HISTORY_PAGE = 50;
const TYPING_SEND_EVERY = 2000; // the server forwards at most one per 2 s
const TYPING_SHOW_FOR = 5000;

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
  outbox: new Map(), // client_msg_id -> {chat_id, text}
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

let refreshing = null;
// Refresh tokens work once: never run two refreshes at the same time.
function refreshTokens() {
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

async function syncChats(ids) {
  let todo = ids.filter((id) => state.chats.has(id) || state.seen.has(id));
  while (todo.length) {
    const chats = {};
    for (const id of todo.slice(0, 1000)) chats[id] = state.seen.get(id) || 0;
    const reply = await request("sync", { chats, limit: 200 });
    const again = [];
    for (const [key, entry] of Object.entries(reply.chats)) {
      const id = Number(key);
      if (entry.error === "not_found") {
        removeChat(id);
        continue;
      }
      for (const m of entry.messages) addMessage(m);
      if (entry.has_more) again.push(id);
    }
    todo = [...again, ...todo.slice(1000)];
  }
}

let syncQueued = null;
function syncSoon(chatId) {
  // A seq gap: fill it with a sync shortly (several gaps share one call).
  if (!syncQueued) {
    syncQueued = new Set();
    setTimeout(() => {
      const ids = [...syncQueued];
      syncQueued = null;
      if (state.wsReady) syncChats(ids).catch(() => {});
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
      addMessage(d);
      clearTyping(d.chat_id, d.sender_uuid);
      markReadIfVisible();
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
      if (state.chats.has(d.chat.id)) upsertChat(d.chat);
      else fetchChat(d.chat.id);
      return;
    case "member_removed":
      if (d.user_uuid === state.me.user_uuid) removeChat(d.chat_id);
      else {
        const chat = state.chats.get(d.chat_id);
        if (chat) upsertChat({ id: d.chat_id, members: chat.members.filter((u) => u.user_uuid !== d.user_uuid) });
      }
      return;
    case "chat_updated":
      upsertChat(d);
      return;
    case "chat_deleted":
      removeChat(d.chat_id);
      return;
    case "typing":
      showTyping(d.chat_id, d.user_uuid);
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
    if (m.chat_id === state.current) renderMessages();
    return false;
  }
  s.byId.set(m.id, { ...m });
  if (!fromHistory) {
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
    } else if (k !== "unread_count") chat[k] = v;
  }
  chat.active = Math.max(
    chat.active || 0,
    Date.parse(chat.created_at) || 0,
    chat.last_message ? Date.parse(chat.last_message.timestamp) || 0 : 0,
  );
  state.chats.set(data.id, chat);
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
  const chat = state.chats.get(chatId);
  const member = chat && (chat.members || []).find((u) => u.user_uuid === uuid);
  return member ? member.name : "Someone";
}

function unread(chat) {
  return Math.max(0, (chat.last_seq || 0) - (chat.read_seq || 0));
}

// --- rendering --------------------------------------------------------------------------

function renderChatList() {
  const list = $("chat-list");
  const chats = [...state.chats.values()].sort((a, b) => b.active - a.active || b.id - a.id);
  list.replaceChildren(
    ...chats.map((chat) => {
      const li = el("li");
      const button = el("button", "chat-item");
      button.type = "button";
      button.dataset.chatId = chat.id;
      if (chat.id === state.current) button.setAttribute("aria-current", "true");
      const top = el("span", "chat-item-top");
      top.append(el("span", "chat-name", chatTitle(chat)));
      const count = unread(chat);
      if (count > 0) {
        const badge = el("span", "badge", count > 99 ? "99+" : count);
        badge.setAttribute("aria-label", `${count} unread`);
        top.append(badge);
      }
      const last = chat.last_message;
      const preview = last
        ? `${last.sender_uuid === state.me.user_uuid ? "You: " : ""}${last.text}`
        : "No messages yet";
      button.append(top, el("span", "chat-preview", preview));
      button.addEventListener("click", () => openChat(chat.id));
      li.append(button);
      return li;
    }),
  );
  $("no-chats").hidden = chats.length > 0;
}

function formatTime(ts) {
  const d = new Date(ts);
  if (Number.isNaN(d.getTime())) return "";
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay
    ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : d.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

function messageItem(m, chat, pending = false) {
  const mine = m.sender_uuid === state.me.user_uuid;
  const li = el("li", mine ? "message mine" : "message");
  if (m.id) li.dataset.messageId = m.id;
  if (!mine && chat && chat.type === "group") li.append(el("span", "sender", memberName(m.chat_id, m.sender_uuid)));
  li.append(el("span", "text", m.text));
  const meta = el("span", "meta");
  meta.append(el("time", "time", pending ? "" : formatTime(m.timestamp)));
  if (mine) {
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
}

function renderChatHeader() {
  const chat = state.chats.get(state.current);
  $("chat-title").textContent = chat ? chatTitle(chat) : "Pick a chat";
  renderTyping();
}

// --- opening a chat, history, reading ---------------------------------------------------

async function openChat(chatId) {
  state.current = chatId;
  document.body.classList.toggle("in-chat", chatId !== null);
  $("composer").hidden = chatId === null;
  renderChatHeader();
  renderChatList();
  const scroller = $("messages-scroll");
  renderMessages();
  scroller.scrollTop = scroller.scrollHeight;
  if (chatId === null) return;
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
  request("send_message", { chat_id: out.chat_id, text: out.text, client_msg_id })
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

function send() {
  const input = $("message-input");
  const text = input.value.trim();
  if (!text || state.current === null) return;
  const client_msg_id = randomId();
  const out = { chat_id: state.current, text, timestamp: new Date().toISOString() };
  state.outbox.set(client_msg_id, out);
  input.value = "";
  autoGrow();
  renderMessages();
  $("messages-scroll").scrollTop = $("messages-scroll").scrollHeight;
  if (state.wsReady) sendOut(client_msg_id, out);
}

function onTypingInput() {
  autoGrow();
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

function showAuth(message = "") {
  $("app-view").hidden = true;
  $("auth-view").hidden = false;
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
  $("me-name").textContent = state.me.name;
  $("auth-view").hidden = true;
  $("app-view").hidden = false;
  openChat(null);
  await loadChatList();
  connect();
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
  for (const key of ["chats", "msgs", "seen", "outbox", "typing"]) state[key].clear();
  state.current = null;
  setConnStatus("");
  showAuth(message);
}

// --- wiring -----------------------------------------------------------------------------

function init() {
  $("auth-form").addEventListener("submit", submitAuth);
  $("auth-toggle").addEventListener("click", toggleRegister);
  $("logout").addEventListener("click", () => logout());
  $("back").addEventListener("click", () => openChat(null));
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  const input = $("message-input");
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  input.addEventListener("input", onTypingInput);
  $("messages-scroll").addEventListener("scroll", () => {
    const chatId = state.current;
    if ($("messages-scroll").scrollTop < 80 && chatId !== null && store(chatId).loaded) {
      loadHistory(chatId, true);
    }
  });
  document.addEventListener("visibilitychange", markReadIfVisible);
  window.addEventListener("focus", markReadIfVisible);
  $("new-chat").addEventListener("click", openNewChat);
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

  if (loadAuth()) {
    scheduleRefresh();
    start().catch(() => logout());
  } else {
    showAuth();
  }
}

init();
