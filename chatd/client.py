"""A small asyncio client for chatd: REST through httpx, /connect through websockets.

Three layers, each usable on its own:

- `Api`, the REST calls. One httpx.AsyncClient (one connection pool) per Api, made on
  first use; `await api.aclose()` or `async with Api(...) as api:` releases it.
- `Socket`, one /connect socket. `request()` sends an action and returns its ack's data;
  every other frame is an event, taken with `next_event()`, `pending_events()` or
  `async for event in sock.events()`.
- `Client`, for bots and scripts. It logs in, keeps its tokens fresh, reconnects with
  backoff and resumes with `sync`, so `events()` yields every message, and every change to
  a message (edit, delete, reaction, pin), exactly once.

    api = Api("http://127.0.0.1:8000")
    await api.login("alice@example.com", "secret123")
    async with await api.connect() as sock:
        chat = await sock.request("create_chat", type="group", name="team", user_ids=[bob])
        await sock.request("send_message", chat_id=chat["id"], text="hello")
        event = await sock.next_event("new_message")

Every event is a `Frame`: the frame's JSON object, a plain dict (`event["action"]`,
`event["data"]`), whose `typed` is the same frame as the chatd.protocol Struct its action
names (NewMessage, ChatCreated, ...), or None for a frame this client does not know (an
event a newer server added). `sock.unread` is a Frame too (UnreadMessages).

    async with Client("http://127.0.0.1:8000", email="bot@example.com", password="...") as c:
        async for event in c.events():
            match event.typed:
                case NewMessage(data=message) if message.sender_uuid != c.user_uuid:
                    await c.send(message.chat_id, "echo: " + message.text)

An app that signs its users in itself, and whose JWTs chatd accepts (docs/embedding.md),
gives the Client a token provider instead of a password; it is asked again before each
token expires and whenever chatd refuses one:

    async with Client("http://127.0.0.1:8000", token_provider=my_app.chat_token) as c: ...

Replies (`sock.request`, `c.send`, ...) and REST bodies are plain decoded JSON.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import functools
import inspect
import itertools
import json
import logging
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import websockets

from chatd.protocol import CLOSE_POLICY_VIOLATION, ServerFrame

try:
    import httpx
except ImportError as exc:  # it comes with the `client` extra (and with the server)
    raise ImportError("chatd.client needs httpx: pip install 'chatd[client]'") from exc

log = logging.getLogger("chatd.client")

T = TypeVar("T")

# Returns a fresh access token (the app's JWT), plainly or as an awaitable: Client's
# token_provider.
TokenProvider = Callable[[], str | Awaitable[str]]

CLOSE_ABNORMAL = 1006  # what a connection that died without a close frame reports
# The 1008 reason when the user opened more sockets than CHATD_MAX_SOCKETS_PER_USER allows.
SOCKET_CAP_REASON = "too many sockets for this user: closed the oldest"

# Below the server's idle keep-alive timeout (CHATD_KEEPALIVE_TIMEOUT, 5 s by default), so a
# pooled connection is not reused at the very moment the server closes it.
KEEPALIVE_EXPIRY = 4.0
ABORT_GRACE = 2.0  # seconds Socket.abort gives the closing handshake before cutting the TCP

_json_decoder = msgspec.json.Decoder()


class ChatdError(Exception):
    """The server answered with an error body or frame."""

    def __init__(
        self, code: str, message: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = retry_after  # rate_limited: seconds to wait before trying again
        # Client.request: the request had gone out on a socket that dropped before its
        # reply, so this answers a repeat and the first attempt may have been applied.
        self.resent = False

    @classmethod
    def from_body(cls, error: dict[str, Any], status: int | None = None) -> ChatdError:
        """From an error body: {"code", "message", "retry_after_ms"?}."""
        wait_ms = error.get("retry_after_ms")
        return cls(
            error.get("code", "?"),
            error.get("message", ""),
            status,
            wait_ms / 1000 if isinstance(wait_ms, int) else None,
        )


class ConnectionLost(ChatdError):
    """The socket closed before what was awaited from it came: the reply to a request (which
    may or may not have been applied), the first frame, or another event."""

    def __init__(self) -> None:
        super().__init__("connection_lost", "the socket closed")


class TokenRefused(ChatdError):
    """/connect closed with 1008 before its first frame: the access token was refused
    (missing, invalid or expired), or the Origin was not allowed."""

    def __init__(self, reason: str | None) -> None:
        super().__init__("unauthorized", reason or "access token refused")


class Frame(dict[str, Any]):
    """One frame from the server: its JSON object, as a dict, plus `typed`.

    `typed` is the same frame as the chatd.protocol Struct its "action" names (NewMessage,
    ChatCreated, ...), built on first use and kept. It is None for a frame this client cannot
    read: an action it does not know (an event a newer server added), or another shape.
    """

    @functools.cached_property
    def typed(self) -> ServerFrame | None:
        try:
            return msgspec.convert(self, ServerFrame)
        except msgspec.ValidationError:
            return None


class Api:
    """The REST surface. Methods return the decoded JSON body or raise ChatdError.

    All calls go through one httpx.AsyncClient, `http`. Close it with `aclose()` (or use
    the Api as an async context manager); an Api left open holds only idle connections.
    """

    def __init__(
        self,
        base_url: str,
        access_token: str | None = None,
        *,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
    ) -> None:
        """`keepalive_expiry`: seconds an idle pooled connection is reused; keep it below the
        idle timeout of the server (CHATD_KEEPALIVE_TIMEOUT) and of any proxy before it."""
        self.base_url = base_url.rstrip("/")
        self.access_token = access_token
        self.keepalive_expiry = keepalive_expiry
        self.refresh_token: str | None = None
        self.user_uuid: str | None = None
        self._http: httpx.AsyncClient | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        """The HTTP client of the running event loop, made on first use (so only inside one).

        An AsyncClient's connections belong to the loop that opened them, and an Api may
        outlive its loop (the tests make users in one `asyncio.run` and use them in the
        next): used from another loop, the Api starts a new client there. The old one is
        left to the garbage collector, as it cannot be closed from another loop.
        """
        loop = asyncio.get_running_loop()
        if self._http is None or self._http_loop is not loop:
            self._http = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=30,
                limits=httpx.Limits(keepalive_expiry=self.keepalive_expiry),
            )
            self._http_loop = loop
        return self._http

    @property
    def ws_url(self) -> str:
        """The /connect URL: base_url with ws:// (or wss://)."""
        return "ws" + self.base_url.removeprefix("http") + "/connect"

    async def aclose(self) -> None:
        """Close the HTTP client's connections. The Api stays usable: a later call opens a
        new client."""
        http, self._http = self._http, None
        if http is not None and self._http_loop is asyncio.get_running_loop():
            await http.aclose()

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request, with the access token unless `headers` has an Authorization;
        `kwargs` go to httpx. Returns the decoded body (None for 204)."""
        headers = dict(kwargs.pop("headers", {}))  # the caller's, unchanged: a retry reuses it
        if self.access_token and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.access_token}"
        response = await self.http.request(method, path, headers=headers, **kwargs)
        if response.status_code == 204:
            return None
        body = response.json()
        if response.is_error:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise ChatdError.from_body(error, response.status_code)
        return body

    async def register(self, name: str, email: str, password: str) -> dict[str, Any]:
        body = {"name": name, "email": email, "password": password}
        return await self.call("POST", "/register", json=body)

    async def login(self, email: str, password: str) -> dict[str, Any]:
        tokens = await self.call("POST", "/login", json={"email": email, "password": password})
        self._keep(tokens)
        self.user_uuid = (await self.me())["user_uuid"]
        return tokens

    async def refresh(self) -> dict[str, Any]:
        body = {"refresh_token": self.refresh_token}
        tokens = await self.call("POST", "/token/refresh", json=body)
        self._keep(tokens)
        return tokens

    def _keep(self, tokens: dict[str, Any]) -> None:
        self.access_token = tokens["access_token"]
        self.refresh_token = tokens["refresh_token"]

    async def me(self) -> dict[str, Any]:
        return await self.call("GET", "/me")

    async def update_me(self, **fields: Any) -> dict[str, Any]:
        """PATCH /me: `name=`, `avatar=` (an image's upload_id, or None to remove it),
        `share_presence=`."""
        return await self.call("PATCH", "/me", json=fields)

    async def update_chat(self, chat_id: int, **fields: Any) -> dict[str, Any]:
        """PATCH /chats/{id} (admins): `name=`, `photo=` (an upload_id, or None)."""
        return await self.call("PATCH", f"/chats/{chat_id}", json=fields)

    async def change_password(self, current: str, new: str) -> None:
        """Change the password; every other session of the account is signed out."""
        await self.call("POST", "/me/password", json={"current": current, "new": new})

    async def sessions(self) -> list[dict[str, Any]]:
        return (await self.call("GET", "/me/sessions"))["sessions"]

    async def revoke_session(self, session_id: str) -> None:
        await self.call("DELETE", f"/me/sessions/{session_id}")

    async def block(self, user_uuid: str) -> list[str]:
        """Block a user; answers everyone you block (docs/protocol.md#blocking)."""
        return (await self.call("PUT", f"/me/blocks/{user_uuid}"))["blocked"]

    async def unblock(self, user_uuid: str) -> list[str]:
        return (await self.call("DELETE", f"/me/blocks/{user_uuid}"))["blocked"]

    async def report(self, message_id: int, reason: str) -> dict[str, Any]:
        """Report a message to the server's admins (once per message)."""
        return await self.call("POST", f"/messages/{message_id}/report", json={"reason": reason})

    async def export(self) -> dict[str, Any]:
        """GET /me/export, every page of messages gathered into the first answer (which
        alone lists the files)."""
        archive = await self.call("GET", "/me/export")
        page = archive
        while page["has_more"]:
            page = await self.call("GET", "/me/export", params={"after": page["next_after"]})
            archive["messages"].extend(page["messages"])
        archive["has_more"], archive["next_after"] = False, None
        return archive

    async def logout(self) -> None:
        """Sign this session out; the Api forgets its tokens."""
        await self.call("POST", "/logout")
        self.access_token = self.refresh_token = None

    async def users(self, **params: Any) -> list[dict[str, Any]]:
        return (await self.call("GET", "/users_list", params=params))["users"]

    async def history(self, chat_id: int, **params: Any) -> dict[str, Any]:
        return await self.call("GET", f"/history/{chat_id}", params=params)

    async def chats(self, **params: Any) -> dict[str, Any]:
        return await self.call("GET", "/chats", params=params)

    async def chat(self, chat_id: int) -> dict[str, Any]:
        return await self.call("GET", f"/chats/{chat_id}")

    async def user(self, user_uuid: str) -> dict[str, Any]:
        """GET /users/{uuid}: the name, and the presence when you share a chat (else null)."""
        return await self.call("GET", f"/users/{user_uuid}")

    async def search(self, q: str, **params: Any) -> dict[str, Any]:
        """GET /search: `chat_id=`, `before=` (next_before of the last page), `limit=`.
        Each result's highlights are code point offsets: text[start:end]."""
        return await self.call("GET", "/search", params={"q": q, **params})

    async def mute(
        self, chat_id: int, until: datetime | None = None, *, notify: str | None = None
    ) -> dict[str, Any]:
        """Mute a chat until `until` (None: unmute), and set `notify` (all, mentions, none)
        when given."""
        body: dict[str, Any] = {"mute_until": until.isoformat() if until else None}
        if notify is not None:
            body["notify"] = notify
        return await self.call("PATCH", f"/chats/{chat_id}/notifications", json=body)

    async def subscribe_push(self, subscription: dict[str, Any]) -> dict[str, Any]:
        """Store a browser-style PushSubscription ({endpoint, keys: {p256dh, auth}})."""
        return await self.call("POST", "/push/subscriptions", json=subscription)

    async def unsubscribe_push(self, endpoint: str) -> None:
        await self.call("DELETE", "/push/subscriptions", json={"endpoint": endpoint})

    async def upload(
        self, file: str | os.PathLike[str] | bytes, name: str | None = None
    ) -> dict[str, Any]:
        """Upload a file (a path, streamed from disk, or bytes); returns the Upload, whose
        `upload_id` goes into a message's attachments. `name` defaults to the path's."""
        if isinstance(file, bytes):
            return await self.call(
                "POST", "/uploads", params={"name": name or "file"}, content=file
            )
        path = Path(file)

        async def chunks() -> AsyncIterator[bytes]:
            source = await asyncio.to_thread(path.open, "rb")
            try:
                while chunk := await asyncio.to_thread(source.read, 256 * 1024):
                    yield chunk
            finally:
                source.close()

        size = (await asyncio.to_thread(path.stat)).st_size
        headers = {"Content-Length": str(size)}
        params = {"name": name or path.name}
        return await self.call("POST", "/uploads", params=params, content=chunks(), headers=headers)

    async def download(self, file_id: str, *, thumbnail: bool = False) -> bytes:
        """A file's bytes (or its thumbnail's) that you may read; ChatdError not_found else."""
        path = f"/files/{file_id}/thumbnail" if thumbnail else f"/files/{file_id}"
        headers = {"Authorization": f"Bearer {self.access_token}"} if self.access_token else {}
        response = await self.http.get(path, headers=headers)
        if response.is_error:
            error = response.json().get("error", {})
            raise ChatdError.from_body(error, response.status_code)
        return response.content

    async def connect(self, timeout: float = 10) -> Socket:
        """Open /connect with the current access token; see Socket.open."""
        return await Socket.open(self.ws_url, self.access_token, timeout)


class Socket:
    """One /connect socket. Replies are matched to requests; every other frame is an event.

    Open one with `Socket.open` (or `Api.connect`). A task reads the socket from then on,
    so events queue up whether or not anyone is waiting for them. Once the socket has
    closed, `request` and `next_event` raise ConnectionLost (after the queued events are
    taken); `closed`, `close_code` and `close_reason` say what happened.
    """

    def __init__(self, ws: websockets.ClientConnection) -> None:
        """Take over an open connection; `Socket.open` is the way to get one."""
        self.ws = ws  # the websockets connection underneath, for tests that need the wire
        self.unread: Frame | None = None  # the first frame, unread_messages
        self._events: asyncio.Queue[Frame | None] = asyncio.Queue()  # None: closed, no more
        self._pending: dict[str, asyncio.Future[Frame | None]] = {}  # None: no reply will come
        self._ids = itertools.count(1)
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, token: str | None, timeout: float = 10) -> Socket:
        """Connect and wait for the first frame, the unread snapshot, kept as `unread`.

        The handshake and the first frame get `timeout` seconds each (TimeoutError). A
        socket closed with 1008 before its first frame raises TokenRefused; closed with
        anything else, ConnectionLost.
        """
        headers = {"Authorization": f"Bearer {token}"} if token else None
        ws = await websockets.connect(
            url, additional_headers=headers, max_size=None, open_timeout=timeout
        )
        sock = cls(ws)
        try:
            first = await sock.next_event(timeout=timeout)
        except ConnectionLost:
            if sock.close_code == CLOSE_POLICY_VIOLATION:
                raise TokenRefused(sock.close_reason) from None
            raise
        except BaseException:
            await sock.abort()
            raise
        if first.get("action") != "unread_messages":
            await sock.abort()
            raise ChatdError("protocol", f"expected unread_messages first, got {first}")
        sock.unread = first
        return sock

    # -- state ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """The connection has closed and every frame it brought has been read (some may
        still wait in the event queue)."""
        return self._reader.done()

    @property
    def close_code(self) -> int | None:
        """The code of the close frame received (or 1006 when none came); None while open."""
        return self.ws.close_code

    @property
    def close_reason(self) -> str | None:
        """The reason of the close frame received (SOCKET_CAP_REASON, say); None while open."""
        return self.ws.close_reason

    async def wait_closed(self, timeout: float | None = 10) -> int | None:
        """Wait until the socket closes (the server closes it, or the network drops it);
        return the close code."""
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._reader)
        return self.close_code

    # -- requests ------------------------------------------------------------------------

    async def request(self, action: str, timeout: float = 10, **fields: Any) -> Any:
        """Send an action and return its ack's data.

        Raises ChatdError for an error reply, ConnectionLost when the socket closes before
        the reply (the action may or may not have been applied), TimeoutError after
        `timeout` seconds.
        """
        request_id = f"r{next(self._ids)}"
        reply = asyncio.get_running_loop().create_future()
        self._pending[request_id] = reply
        try:
            if self.closed:  # else the reader, when it ends, answers `reply` with None
                raise ConnectionLost()
            await self.send({"action": action, "request_id": request_id, **fields})
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that arrives together with the reply (CPython gh-86296).
            async with asyncio.timeout(timeout):
                frame = await reply
        finally:
            self._pending.pop(request_id, None)
        if frame is None:
            raise ConnectionLost()
        if frame["action"] == "error":
            raise ChatdError.from_body(frame["error"])
        return frame["data"]

    async def send(self, frame: dict[str, Any]) -> None:
        """Send one frame as it is; raises ConnectionLost when the socket has closed."""
        try:
            # json, not msgspec: a lone surrogate goes out escaped, for the server to refuse.
            await self.ws.send(json.dumps(frame))
        except websockets.ConnectionClosed:
            raise ConnectionLost() from None

    # -- events --------------------------------------------------------------------------

    async def next_event(self, action: str | None = None, timeout: float | None = 10) -> Frame:
        """The next event; with `action`, the next of that action (others are dropped).

        Raises TimeoutError after `timeout` seconds, and ConnectionLost when the socket
        has closed and no event is left in the queue.
        """
        async with asyncio.timeout(timeout):
            while True:
                frame = await self._events.get()
                if frame is None:
                    self._events.put_nowait(None)  # the end, for every later reader too
                    raise ConnectionLost()
                if action is None or frame.get("action") == action:
                    return frame

    def pending_events(self) -> list[Frame]:
        """Take every event received so far, without waiting."""
        frames = []
        while not self._events.empty():
            frame = self._events.get_nowait()
            if frame is None:
                self._events.put_nowait(None)
                break
            frames.append(frame)
        return frames

    async def events(self) -> AsyncIterator[Frame]:
        """Every event in order, until the socket has closed and the queue is empty."""
        while True:
            try:
                frame = await self.next_event(timeout=None)
            except ConnectionLost:
                return
            yield frame

    # -- closing -------------------------------------------------------------------------

    async def close(self) -> None:
        """The closing handshake; returns once the connection is closed and read to the end."""
        await self.ws.close()
        await self._reader

    async def abort(self) -> None:
        """Close without trusting the peer, which may be gone: the closing handshake gets
        ABORT_GRACE seconds, then (or at once, if this is cancelled) the TCP connection is
        cut."""
        try:
            async with asyncio.timeout(ABORT_GRACE):
                await self.ws.close()
        except (TimeoutError, websockets.WebSocketException, OSError):
            pass
        finally:
            self.ws.transport.abort()  # a no-op once the handshake has closed it
        await asyncio.wait({self._reader})  # raises no reader error, yet lets our cancel in

    async def __aenter__(self) -> Socket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _read(self) -> None:
        """Route each frame: the reply to a pending request, or an event. At the end, tell
        every waiter that nothing more will come."""
        try:
            async for text in self.ws:
                frame = _frame(text)
                if frame is None:
                    log.warning("ignored a frame that is not a JSON object: %.100r", text)
                    continue
                if frame.get("action") in ("ack", "error"):
                    reply = self._pending.pop(frame.get("request_id") or "", None)
                    if reply is not None:
                        if not reply.done():  # its requester may have been cancelled
                            reply.set_result(frame)
                        continue
                self._events.put_nowait(frame)
        except websockets.ConnectionClosed:
            pass
        finally:
            for reply in self._pending.values():
                if not reply.done():
                    reply.set_result(None)
            self._events.put_nowait(None)


@dataclasses.dataclass
class ChatCursor:
    """How far a Client's view of one chat goes: the per-chat version of Telegram's `pts`.

    The view holds every message of the chat up to `seq` (those hidden for this user aside)
    exactly as the server had them at chat version `version`. A versioned event (a new or
    updated message, a pin) is applied when it is the next change, `version + 1`; one at
    or below `version` is already in the view; one further ahead waits for the changes
    before it, and `sync` fills a gap that stays.
    """

    seq: int
    version: int
    pinned_message_id: int | None
    chat: dict[str, Any]  # the Chat (CHAT_FIELDS) as last told: name, members, ...
    # The version `pinned_message_id` is known as of. A chat_updated of an older version
    # tells an older pin; one of a later version (even below `version`: the unpin half of
    # a delete may come after later changes) tells a newer one.
    pin_version: int = 0
    # A delete for everyone of the pinned message is one change with two events at one
    # version: message_updated, then chat_updated with no pin. When an unpin's
    # chat_updated is applied first, its version is kept here: a message event of that
    # version is still applied, once, and a sync asks from just below it, in case the
    # socket dropped before that event came.
    unpaired: int | None = None

    def sync_point(self) -> dict[str, int]:
        """The chat's entry in a sync request."""
        version = self.version if self.unpaired is None else min(self.version, self.unpaired - 1)
        return {"seq": self.seq, "version": version}


class Client:
    """A long-lived chatd session for bots and scripts.

    It logs in, keeps the token pair fresh (refresh tokens are single-use, so renewals are
    serialised), holds one /connect socket and replaces it after a drop, with jittered and
    capped exponential backoff. After every (re)connect it resumes: `list_chats` gives the
    chats it has not seen their baseline (read pointer and version), then `sync` (the
    versioned form, `{chat_id: {"seq", "version"}}`) brings every chat up to date. A chat
    joined while connected gets its baseline from `get_chat` (its events wait for it).

    `events()` yields each change to a chat's messages exactly once and in the chat's
    version order, whichever of sync or the live stream brought it (see ChatCursor; one
    exception: the chat_updated that unpins a message deleted for everyone may come after
    a later change when the server's two events of that change were split by it):

    - `new_message` for every message above the baseline, in seq order per chat (live, or
      from sync; a message deleted for everyone meanwhile comes as its tombstone);
    - `message_updated` for an edit, a delete for everyone or a reaction change (the whole
      Message: replace yours); never for a message this client saw hidden;
    - `message_hidden {chat_id, message_id}` when this user deleted a message for
      themselves (on any device), once per message;
    - `chat_updated` for a pin or unpin (the Chat, with its `pinned_message_id` and
      `version`), and for renames and role changes. A pin change learned from sync comes as
      a `chat_updated` too: the Chat as this client last heard of it, with the new
      `pinned_message_id` and the version of the sync answer. A rename seen only in the
      chat list after a reconnect comes the same way;
    - `sync_too_long {chat_id, seq, version, pinned_message_id}`, an event of this client,
      not of the server: too much changed in that chat while away to replay. Reload the
      chat's history; the client goes on from `seq` and `version`;
    - every other server event as it comes.

    A `message_updated` is yielded for any message not known to be hidden, including ones
    below the baseline that were never yielded as `new_message` (older history an app may
    show); a message hidden before this Client started, on another device, is not known to
    be hidden. Ignore updates to messages you do not hold.
    """

    def __init__(
        self,
        base_url: str,
        email: str | None = None,
        password: str | None = None,
        *,
        token: str | None = None,
        backoff_base: float = 0.25,
        backoff_cap: float = 15.0,
        request_timeout: float = 10.0,
        sync_limit: int = 100,
        gap_grace: float = 0.5,
        token_provider: TokenProvider | None = None,
    ) -> None:
        """`sync_limit`: new messages per chat per sync request. `gap_grace`: seconds an
        event that arrived ahead of its chat's next version waits for the ones before it
        (events of changes committed back to back may come out of order) before a sync.
        `token`: an API token (a bot's `chatd_bot_…` or a personal access token) instead of
        an email and a password; it is never renewed, and its refusal stops the client.

        `token_provider`: instead of an email and a password, a callable (plain or async)
        that returns a fresh access token: the app's own JWT, when chatd accepts them
        (docs/embedding.md). It is called to start, a minute before the token it gave
        expires (by its `exp`), and whenever chatd refuses the token (401 on REST, 1008
        on /connect), so renewal goes through the app's own sign-in; no login or refresh
        token is ever used."""
        self.api = Api(base_url)
        self.token = token
        self.email = email
        self.password = password
        self.token_provider = token_provider
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.request_timeout = request_timeout
        self.sync_limit = sync_limit
        self.gap_grace = gap_grace
        self.reconnects = 0  # sockets opened after the first one
        self.renewals = 0  # token pairs obtained after the first login
        self.syncs = 0  # sync requests sent
        # Per chat: how far the view goes (read them; the client moves them).
        self.cursors: dict[int, ChatCursor] = {}
        # Per chat, by version: versioned events that cannot be applied yet.
        self._ahead: dict[int, dict[int, list[Frame]]] = {}
        self._gap_since: dict[int, float] = {}  # loop time each chat's wait began
        self._unlearned: set[int] = set()  # chats heard of through an event, no baseline yet
        self._hidden: dict[int, set[int]] = {}  # per chat: ids this user hid, as told
        self._events: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._socket: Socket | None = None
        self._socket_changed = asyncio.Condition()
        self._gap = asyncio.Event()
        self._token_lock = asyncio.Lock()
        self._token_ttl = 900.0  # the current access token's lifetime left when received
        self._renew_at = 0.0  # loop time at which _keep_fresh renews it
        self._stopped = False
        self._failure: BaseException | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def user_uuid(self) -> str | None:
        return self.api.user_uuid

    @property
    def held(self) -> dict[int, int]:
        """Per chat: the highest seq in the view, with nothing missing below it."""
        return {chat_id: cursor.seq for chat_id, cursor in self.cursors.items()}

    @property
    def socket(self) -> Socket | None:
        """The current /connect socket, None while reconnecting."""
        return self._socket

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Log in and wait for the first socket (retrying, with backoff, until it opens)."""
        await self._login()
        self._tasks = [asyncio.create_task(self._run())]
        if self.token is None:
            self._tasks.append(asyncio.create_task(self._keep_fresh()))
        first = asyncio.create_task(self._wait_socket())
        done, _ = await asyncio.wait({first, self._tasks[0]}, return_when=asyncio.FIRST_COMPLETED)
        if first not in done or first.exception() is not None:
            first.cancel()
            await self.close()
            raise self._failure or ChatdError("closed", "the client stopped")

    async def close(self) -> None:
        """Stop: close the socket and the Api's HTTP client; `events()` ends."""
        self._stopped = True
        for task in self._tasks:
            # Cancel until it is done: a cancel can be lost inside a wait that completes at
            # the same moment (Python 3.11), and one lost cancel would wait here forever.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1)
            if not task.cancelled():
                task.exception()  # retrieved: no "never retrieved" warning
        self._tasks = []
        self._events.put_nowait(None)
        async with self._socket_changed:
            self._socket_changed.notify_all()
        await self.api.aclose()

    # -- what callers use ---------------------------------------------------------------

    async def events(self) -> AsyncIterator[Frame]:
        """Every event as a Frame ({"action", "data"}, and `.typed`), until the client
        closes: each change exactly once, as the class docstring lists.

        Messages from `sync` come as `new_message`, changes from it as `message_updated`,
        `message_hidden` and `chat_updated`, as if they had come live.
        """
        while True:
            event = await self._events.get()
            if event is None:
                self._events.put_nowait(None)  # let other readers end as well
                if self._failure is not None:
                    raise self._failure
                return
            yield event

    async def send(
        self,
        chat_id: int,
        text: str,
        client_msg_id: str | None = None,
        *,
        reply_to: int | None = None,
        mentions: Iterable[str] = (),
        attachments: Iterable[str] = (),
    ) -> Any:
        """Send a message and return it. A drop before the ack is retried on the next socket
        with the same client_msg_id, so the message is stored once whatever happened; over
        the server's message rate limit, it waits as long as the server says, then retries.

        `reply_to`: a message of the same chat this one answers; `mentions`: uuids of
        members it mentions; `attachments`: upload_ids from `upload` (the text may then
        be empty)."""
        fields: dict[str, Any] = {"chat_id": chat_id, "text": text}
        fields["client_msg_id"] = client_msg_id or str(uuid.uuid4())
        if reply_to is not None:
            fields["reply_to"] = reply_to
        if mentions:
            fields["mentions"] = list(mentions)
        if attachments:
            fields["attachments"] = list(attachments)
        return await self._paced("send_message", fields)

    async def reply(
        self,
        chat_id: int,
        reply_to: int,
        text: str,
        client_msg_id: str | None = None,
        *,
        mentions: Iterable[str] = (),
    ) -> Any:
        """`send` with `reply_to`: a message answering message `reply_to` of the chat."""
        return await self.send(chat_id, text, client_msg_id, reply_to=reply_to, mentions=mentions)

    async def forward(self, message_id: int, chat_id: int, client_msg_id: str | None = None) -> Any:
        """Copy a message you can see into chat `chat_id` as your own new message (with
        `forwarded_from`); return it. Retried after drops with the same client_msg_id, like
        `send`, so it is stored once."""
        fields = {
            "message_id": message_id,
            "chat_id": chat_id,
            "client_msg_id": client_msg_id or str(uuid.uuid4()),
        }
        return await self._paced("forward_message", fields)

    async def edit(self, message_id: int, text: str) -> Any:
        """Change the text of a message you sent; return the Message. Retried after a drop
        (editing to the same text again changes nothing): do not edit one message from two
        tasks at once, or a retry may put back the text of the other."""
        return await self._paced("edit_message", {"message_id": message_id, "text": text})

    async def delete(self, message_id: int, *, for_everyone: bool = True) -> Any:
        """Delete a message for everyone (the sender, or a group's owner or admins), or for
        you only (`for_everyone=False`: any member; it is hidden from you). Returns
        `{chat_id, message_id, for_everyone}`. Retried after drops: deleting again changes
        nothing (the server acks a repeat, of either kind)."""
        fields = {"message_id": message_id, "for_everyone": for_everyone}
        return await self._paced("delete_message", fields)

    async def react(self, message_id: int, emoji: str) -> Any:
        """Add your reaction `emoji` (one emoji) to a message; return the Message. A set:
        reacting twice is one reaction, so it is retried after drops."""
        return await self._paced("react", {"message_id": message_id, "emoji": emoji})

    async def unreact(self, message_id: int, emoji: str) -> Any:
        """Take your reaction `emoji` back (a no-op when there is none); return the Message."""
        return await self._paced("unreact", {"message_id": message_id, "emoji": emoji})

    async def pin(self, message_id: int, chat_id: int | None = None) -> Any:
        """Pin a message in its chat (groups: owner and admins; private chats: either
        member); return the Chat. Pinning it again changes nothing, so it is retried."""
        fields: dict[str, Any] = {"message_id": message_id}
        if chat_id is not None:
            fields["chat_id"] = chat_id
        return await self._paced("pin_message", fields)

    async def unpin(self, chat_id: int) -> Any:
        """Unpin the chat's pinned message; return the Chat. Retried after drops."""
        return await self._paced("unpin_message", {"chat_id": chat_id})

    async def edits(self, message_id: int) -> list[dict[str, Any]]:
        """GET /messages/{id}/edits: the message's earlier texts, oldest first."""
        return (await self.rest("GET", f"/messages/{message_id}/edits"))["edits"]

    async def _paced(self, action: str, fields: dict[str, Any]) -> Any:
        """A request retried after drops, and after the wait a rate_limited answer names.
        An error's `resent` says whether any attempt had gone out on a socket that dropped."""
        resent = False
        while True:
            try:
                return await self.request(action, retry=True, **fields)
            except ChatdError as exc:
                exc.resent = resent = resent or exc.resent
                if exc.code != "rate_limited" or exc.retry_after is None:
                    raise
                await asyncio.sleep(exc.retry_after)

    async def create_chat(
        self, user_ids: Iterable[str], *, name: str | None = None, type: str | None = None
    ) -> Any:
        """Create a group (when named) or the private chat with one user; return the Chat."""
        kind = type or ("group" if name is not None else "private")
        fields: dict[str, Any] = {"type": kind, "user_ids": list(user_ids)}
        if name is not None:
            fields["name"] = name
        return await self.request("create_chat", **fields)

    async def mark_read(self, message_ids: int | Iterable[int]) -> Any:
        """Move the read pointers up to these messages (idempotent, so retried after drops)."""
        ids = [message_ids] if isinstance(message_ids, int) else list(message_ids)
        return await self.request("mark_read", retry=True, message_ids=ids)

    async def typing(self, chat_id: int) -> Any:
        return await self.request("typing", chat_id=chat_id)

    async def presence(self, user_uuids: str | Iterable[str]) -> dict[str, dict[str, Any]]:
        """get_presence: user uuid → {status, last_seen} for those you share a chat with
        (the others are not in the answer). `presence` events tell changes in private
        chats and small groups as they happen."""
        ids = [user_uuids] if isinstance(user_uuids, str) else list(user_uuids)
        answer = await self.request("get_presence", retry=True, user_ids=ids)
        return {p["user_uuid"]: p for p in answer["presence"]}

    async def search(self, q: str, **fields: Any) -> dict[str, Any]:
        """search_messages: `chat_id=`, `before=`, `limit=` (see Api.search)."""
        return await self.request("search_messages", retry=True, q=q, **fields)

    async def mute(
        self, chat_id: int, until: datetime | None = None, *, notify: str | None = None
    ) -> dict[str, Any]:
        """set_notifications: muted until `until` (None: unmuted); `notify` when given."""
        fields: dict[str, Any] = {"mute_until": until.isoformat() if until else None}
        if notify is not None:
            fields["notify"] = notify
        return await self.request("set_notifications", retry=True, chat_id=chat_id, **fields)

    async def history(self, chat_id: int, **params: Any) -> dict[str, Any]:
        """GET /history/{chat_id} (`page`/`page_size` or `before`/`limit`)."""
        return await self.rest("GET", f"/history/{chat_id}", params=params)

    async def chats(self, **params: Any) -> dict[str, Any]:
        return await self.rest("GET", "/chats", params=params)

    async def upload(
        self, file: str | os.PathLike[str] | bytes, name: str | None = None
    ) -> dict[str, Any]:
        """Upload a file (Api.upload); its `upload_id` goes to `send(attachments=[...])`."""
        return await self._renewing(self.api.upload, file, name)

    async def download(self, file_id: str, *, thumbnail: bool = False) -> bytes:
        """A file's bytes, or its thumbnail's (Api.download)."""
        return await self._renewing(self.api.download, file_id, thumbnail=thumbnail)

    async def rest(self, method: str, path: str, **kwargs: Any) -> Any:
        """A REST call; a 401 renews the tokens and tries once more."""
        return await self._renewing(self.api.call, method, path, **kwargs)

    async def _renewing(self, call: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        token = self.api.access_token
        try:
            return await call(*args, **kwargs)
        except ChatdError as exc:
            if exc.status != 401:
                raise
        await self._renew(token)
        return await call(*args, **kwargs)

    async def request(self, action: str, *, retry: bool = False, **fields: Any) -> Any:
        """Any /connect action; return its ack data. Without `retry` a drop before the reply
        raises ConnectionLost; with it the same frame is sent again on the next socket (an
        error answering such a repeat has `resent` set)."""
        sock = await self._wait_socket()
        resent = False
        while True:
            try:
                return await sock.request(action, self.request_timeout, **fields)
            except ConnectionLost:
                if not retry:
                    raise
            except ChatdError as exc:
                exc.resent = resent
                raise
            resent = True
            sock = await self._wait_socket(old=sock)

    # -- tokens -------------------------------------------------------------------------

    async def _login(self) -> None:
        if self.token_provider is not None or self.token is not None:
            if self.token_provider is not None:
                self._took(await self._provided())
            else:
                self.api.access_token = self.token
            self.api.user_uuid = (await self.api.me())["user_uuid"]
            return
        if self.email is None or self.password is None:
            raise ChatdError("invalid", "Client needs an email and a password, or a token_provider")
        self._took(await self.api.login(self.email, self.password))

    async def _provided(self) -> dict[str, Any]:
        """A fresh token from the token provider, taken as the Api's access token."""
        assert self.token_provider is not None
        token = self.token_provider()
        if inspect.isawaitable(token):
            token = await token
        if not isinstance(token, str) or not token:
            raise ChatdError("invalid", "the token provider returned no token")
        self.api.access_token, self.api.refresh_token = token, None
        return {"access_token": token}

    def _took(self, tokens: dict[str, Any]) -> None:
        """Schedule the renewal of a new pair: a minute before the access token expires,
        half-way for tokens that live less than two minutes."""
        self._token_ttl = token_lifetime(tokens["access_token"], tokens.get("expires_in"))
        self._renew_at = asyncio.get_running_loop().time() + max(
            self._token_ttl - 60, self._token_ttl / 2
        )

    async def _renew(self, stale: str | None) -> None:
        """Replace the token pair, unless someone did already since `stale` was in use."""
        async with self._token_lock:
            if self.api.access_token != stale:
                return
            if self.token_provider is not None:  # the app's sign-in renews, not chatd's
                self._took(await self._provided())
                self.renewals += 1
                return
            if self.token is not None:  # nothing to renew it with: revoked or expired
                raise ChatdError("unauthorized", "the API token was refused", 401)
            try:
                if self.api.refresh_token is None:
                    raise ChatdError("unauthorized", "no refresh token", 401)
                tokens = await self.api.refresh()
            except ChatdError as exc:
                if exc.status != 401:
                    raise
                # Spent, expired or revoked: only a fresh login helps.
                log.info("refresh token refused, logging in again")
                tokens = await self.api.login(self.email or "", self.password or "")
            self._took(tokens)
            self.renewals += 1

    async def _keep_fresh(self) -> None:
        """Renew the access token a minute before it expires (half-way for short ones)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(max(0.0, self._renew_at - loop.time()))
            if loop.time() < self._renew_at:
                continue  # renewed meanwhile (after a 1008 or a 401)
            try:
                await self._renew(self.api.access_token)
            except (httpx.HTTPError, ChatdError) as exc:
                log.warning("token renewal failed (%s), retrying", exc)
                await asyncio.sleep(min(5.0, self._token_ttl / 4))

    # -- the socket's life --------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        refused: str | None = None  # an access token /connect turned down with 1008
        try:
            while not self._stopped:
                token = self.api.access_token
                try:
                    if refused is not None:
                        await self._renew(refused)
                        refused = None
                        token = self.api.access_token
                    sock = await self._open()
                except TokenRefused:
                    refused = token
                    if attempt:
                        await self._backoff(attempt)
                    attempt += 1
                    continue
                except Exception as exc:
                    if not _transient(exc):
                        raise
                    log.info("connect failed (%s)", exc or type(exc).__name__)
                    await self._backoff(attempt)
                    attempt += 1
                    continue
                try:
                    code, resumed = await self._serve(sock)
                finally:
                    await self._set_socket(None)
                self.reconnects += 1
                attempt = 0 if resumed else attempt + 1
                log.info("socket closed with %s, reconnecting", code)
                if sock.close_reason == SOCKET_CAP_REASON:
                    # Replaced by a newer socket of the same user: no token problem, and
                    # coming straight back would close another one. Give way for a while.
                    await asyncio.sleep(self.backoff_cap)
                elif code == CLOSE_POLICY_VIOLATION:
                    refused = token
                else:
                    await self._backoff(attempt)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("chatd client stopped: %s", exc)
            self._failure = exc
            self._stopped = True
            self._events.put_nowait(None)
            async with self._socket_changed:
                self._socket_changed.notify_all()

    async def _backoff(self, attempt: int) -> None:
        """Full jitter: a random wait up to base * 2^attempt, capped."""
        await asyncio.sleep(
            random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))
        )

    async def _open(self) -> Socket:
        return await self.api.connect(self.request_timeout)

    async def _serve(self, sock: Socket) -> tuple[int, bool]:
        """Resume on a fresh socket, then follow it until it closes: (close code, resumed).

        The unread snapshot is not read: every chat syncs from its baseline, which brings
        the same messages, and the changes the snapshot cannot tell.
        """
        resumed = False
        pump: asyncio.Task[None] | None = None
        await self._set_socket(sock)
        try:
            # Before any live event is handled, so a chat's baseline comes from the chat
            # list rather than from whichever live event happens to come first.
            await self._learn_chats(sock)
            pump = asyncio.create_task(self._pump(sock))
            await self._sync(sock, list(self.cursors))
            resumed = True
            loop = asyncio.get_running_loop()
            while not pump.done():
                if self._unlearned:
                    await self._learn(sock, sorted(self._unlearned))
                    continue
                now = loop.time()
                due = [c for c, since in self._gap_since.items() if now - since >= self.gap_grace]
                if due:
                    for chat_id in due:
                        self._gap_since[chat_id] = now  # still open after the sync: wait again
                    await self._sync(sock, due)
                    continue
                self._gap.clear()
                wait = min(
                    (since + self.gap_grace - now for since in self._gap_since.values()),
                    default=None,
                )
                waiter = asyncio.ensure_future(self._gap.wait())
                await asyncio.wait({waiter, pump}, timeout=wait, return_when="FIRST_COMPLETED")
                waiter.cancel()
        except (ConnectionLost, TimeoutError) as exc:
            log.info("resume interrupted: %s", exc or type(exc).__name__)
        finally:
            await sock.abort()
            if pump is not None:
                await pump  # drains what was read before the close
        return sock.close_code or CLOSE_ABNORMAL, resumed

    async def _set_socket(self, sock: Socket | None) -> None:
        async with self._socket_changed:
            self._socket = sock
            self._socket_changed.notify_all()

    async def _wait_socket(self, old: Socket | None = None) -> Socket:
        def ready() -> bool:
            return self._stopped or (self._socket is not None and self._socket is not old)

        async with self._socket_changed:
            await self._socket_changed.wait_for(ready)
        if self._socket is None or self._stopped:
            raise self._failure or ChatdError("closed", "the client is closed")
        return self._socket

    async def _learn_chats(self, sock: Socket) -> None:
        """Give chats not seen before (created or joined while away) their read pointer and
        version as baseline: what is above the pointer is what arrived for us since. A chat
        already held whose name or members changed meanwhile is told as a chat_updated."""
        before = None
        while True:
            fields = {"limit": 200} if before is None else {"limit": 200, "before": before}
            page = await sock.request("list_chats", self.request_timeout, **fields)
            for chat in page["chats"]:
                self._baseline(chat, chat["read_seq"])
            if not page["has_more"]:
                return
            before = page["next_before"]

    async def _learn(self, sock: Socket, chat_ids: list[int]) -> None:
        """Baselines for chats first heard of through an event (joined, or an event that
        came before chat_created): `get_chat`'s read pointer and version; then sync them."""
        for chat_id in chat_ids:
            self._unlearned.discard(chat_id)
            if chat_id in self.cursors:
                continue
            try:
                chat = await sock.request("get_chat", self.request_timeout, chat_id=chat_id)
            except ChatdError as exc:
                if exc.code != "not_found":
                    raise
                self._forget(chat_id)  # gone again: its waiting events with it
                continue
            self._baseline(chat, chat["read_seq"])
        await self._sync(sock, chat_ids)

    def _baseline(self, chat: dict[str, Any], seq: int) -> None:
        """Start a chat's view at `seq` and the Chat's version, unless it has one already;
        then a held chat's name and members are compared with what the client knew."""
        chat_id = chat["id"]
        view = {field: chat[field] for field in CHAT_FIELDS if field in chat}
        cursor = self.cursors.get(chat_id)
        if cursor is None:
            self.cursors[chat_id] = ChatCursor(
                seq, chat["version"], chat["pinned_message_id"], view, chat["version"]
            )
            self._unlearned.discard(chat_id)
            self._drain(chat_id)
        elif _meta(view) != _meta(cursor.chat):
            cursor.chat.update(name=view["name"], members=view["members"])
            self._emit_chat(cursor)

    async def _sync(self, sock: Socket, chat_ids: list[int]) -> None:
        """Sync the chats from their cursors until none has more."""
        todo = [chat_id for chat_id in dict.fromkeys(chat_ids) if chat_id in self.cursors]
        while todo:
            batch, todo = todo[:1000], todo[1000:]
            points = {
                str(chat_id): cursor.sync_point()
                for chat_id in batch
                if (cursor := self.cursors.get(chat_id)) is not None
            }
            if not points:
                continue
            self.syncs += 1
            reply = await sock.request(
                "sync", self.request_timeout, chats=points, limit=self.sync_limit
            )
            for key, entry in reply["chats"].items():
                chat_id = int(key)
                if entry.get("error"):
                    self._forget(chat_id)
                elif self._apply_synced(chat_id, entry) and entry["has_more"]:
                    todo.append(chat_id)

    def _apply_synced(self, chat_id: int, entry: dict[str, Any]) -> bool:
        """Apply one chat's sync answer to its view; False when the chat is not held (any
        more). The answer was read at its `version`: what live events brought meanwhile is
        not told twice (a message at or below the cursor's seq, a change at or below its
        version), and the cursor never moves back."""
        cursor = self.cursors.get(chat_id)
        if cursor is None:
            return False
        held_version = cursor.version
        version = entry["version"]
        if entry.get("too_long"):
            cursor.seq = max(cursor.seq, entry["seq"])
            if version > held_version:
                cursor.version, cursor.unpaired = version, None
                cursor.pinned_message_id = entry["pinned_message_id"]
                cursor.pin_version = version
            data = {
                "chat_id": chat_id,
                "seq": cursor.seq,
                "version": cursor.version,
                "pinned_message_id": cursor.pinned_message_id,
            }
            self._events.put_nowait(Frame(action="sync_too_long", data=data))
            self._drain(chat_id)
            return True
        hidden = self._hidden.get(chat_id, set())
        for message in entry["messages"]:  # ascending; the ones we hid are not among them
            if message["seq"] <= cursor.seq:
                continue  # came live already
            cursor.seq = message["seq"]
            if message["id"] not in hidden:
                self._events.put_nowait(Frame(action="new_message", data=message))
        cursor.seq = max(cursor.seq, entry["seq"])  # past messages we hid, too
        for message in entry["updated"]:
            news = message["version"] > held_version or message["version"] == cursor.unpaired
            if news and message["id"] not in hidden:
                self._events.put_nowait(Frame(action="message_updated", data=message))
        cursor.version = max(cursor.version, version)
        if cursor.unpaired is not None and version >= cursor.unpaired:
            cursor.unpaired = None  # the answer told the change whole
        for message_id in entry["hidden"]:
            self._hide(chat_id, message_id)
        # With has_more the pin is the chat's latest, not the answer's version's: the last
        # answer, without has_more, brings it.
        pinned = entry["pinned_message_id"]
        if not entry["has_more"] and version >= max(held_version, cursor.pin_version):
            changed = pinned != cursor.pinned_message_id
            cursor.pinned_message_id, cursor.pin_version = pinned, version
            if changed:
                self._emit_chat(cursor)
        self._drain(chat_id)
        return True

    async def _pump(self, sock: Socket) -> None:
        """Handle the socket's events until it closes, then those still queued."""
        async for frame in sock.events():
            self._handle(frame)

    def _handle(self, frame: Frame) -> None:
        """One live event: a versioned one goes through its chat's cursor; the others pass,
        after the client has noted what they tell about the chats it follows."""
        action = frame.get("action")
        data = frame.get("data")
        if action in ("ack", "error"):
            if action == "error":
                log.warning("error frame without a waiting request: %s", frame.get("error"))
            return
        if action in VERSIONED_EVENTS and isinstance(data, dict):
            chat_id = data["id"] if action == "chat_updated" else data["chat_id"]
            self._ahead.setdefault(chat_id, {}).setdefault(data["version"], []).append(frame)
            if chat_id in self.cursors:
                self._drain(chat_id)
            else:  # before its chat_created, say: wait for a baseline
                self._unlearned.add(chat_id)
                self._gap.set()
            return
        if action == "message_hidden":
            self._hide(data["chat_id"], data["message_id"])
            return
        if action == "chat_created":
            self._baseline(data, 0)
        elif action == "member_added":
            chat = data["chat"]
            cursor = self.cursors.get(chat["id"])
            if cursor is not None:
                cursor.chat.update(name=chat["name"], members=chat["members"])
            elif self.user_uuid in data["user_uuids"]:
                self._unlearned.add(chat["id"])  # the Chat says no seq: ask for one
                self._gap.set()
        elif action == "chat_deleted" or (
            action == "member_removed" and data.get("user_uuid") == self.user_uuid
        ):
            self._forget(data["chat_id"])
        elif action == "member_removed" and (cursor := self.cursors.get(data["chat_id"])):
            members = cursor.chat.get("members", [])
            cursor.chat["members"] = [m for m in members if m["user_uuid"] != data["user_uuid"]]
        self._events.put_nowait(frame)

    def _drain(self, chat_id: int) -> None:
        """Apply the chat's waiting events in version order, as far as they go; a chat
        left waiting is noted for a sync after `gap_grace`."""
        cursor = self.cursors.get(chat_id)
        waiting = self._ahead.get(chat_id)
        if cursor is None or waiting is None:
            return
        while waiting:
            lowest = min(waiting)
            if lowest > cursor.version + 1:
                break
            frames = waiting.pop(lowest)
            blocked = [frame for frame in frames if not self._apply(cursor, frame)]
            if blocked:
                waiting[lowest] = blocked
                if len(blocked) == len(frames):
                    break  # nothing moved: the chat waits for a sync
        if waiting:
            if chat_id not in self._gap_since:
                self._gap_since[chat_id] = asyncio.get_running_loop().time()
                self._gap.set()
        else:
            self._ahead.pop(chat_id, None)
            self._gap_since.pop(chat_id, None)

    def _apply(self, cursor: ChatCursor, frame: Frame) -> bool:
        """Apply one versioned event at or below the cursor's next version: True when it is
        now in the view (applied, or there already), False when it must wait (it concerns
        messages the view does not reach yet)."""
        data = frame["data"]
        version = data["version"]
        if frame["action"] == "chat_updated":
            return self._apply_chat(cursor, frame)
        seq = data["seq"]
        if version == cursor.unpaired:  # the message half of an unpin already applied
            cursor.unpaired = None
            if seq <= cursor.seq and data["id"] not in self._hidden.get(data["chat_id"], ()):
                self._events.put_nowait(frame)
            return True
        if version <= cursor.version:
            return True  # had it
        if frame["action"] == "new_message":
            if seq > cursor.seq + 1:
                return False  # messages below it are not in the view yet
            if seq == cursor.seq + 1:
                cursor.seq = seq
                if data["id"] not in self._hidden.get(data["chat_id"], ()):
                    self._events.put_nowait(frame)
        else:
            if seq > cursor.seq:
                return False  # a change to a message the view does not reach yet
            if data["id"] not in self._hidden.get(data["chat_id"], ()):
                self._events.put_nowait(frame)
        cursor.version = version
        return True

    def _apply_chat(self, cursor: ChatCursor, frame: Frame) -> bool:
        """A chat_updated. A pin or unpin is the change of its version; a rename or a role
        change moves no version, so it is told when it tells something new."""
        data = frame["data"]
        version, pinned = data["version"], data["pinned_message_id"]
        view = {field: data[field] for field in CHAT_FIELDS if field in data}
        if version == cursor.version + 1:
            if pinned == cursor.pinned_message_id:
                return False  # a rename made after change `version`, which has not come
            cursor.version = version
            # An unpin may be the second event of a delete of the pinned message.
            cursor.unpaired = version if pinned is None else None
            cursor.pinned_message_id, cursor.pin_version = pinned, version
            cursor.chat.update(name=view["name"], members=view["members"])
            self._events.put_nowait(frame)
            return True
        # At or below the version held: its pin is news when it is newer than the one
        # known (the unpin half of a delete), its name and members when they differ.
        fresh_pin = version >= cursor.pin_version
        news = (fresh_pin and pinned != cursor.pinned_message_id) or _meta(view) != _meta(
            cursor.chat
        )
        cursor.chat.update(name=view["name"], members=view["members"])
        if fresh_pin:
            cursor.pinned_message_id, cursor.pin_version = pinned, version
        if news and fresh_pin:
            self._events.put_nowait(frame)
        elif news:  # a late rename, with a pin older than the one known: tell ours
            self._emit_chat(cursor)
        return True

    def _emit_chat(self, cursor: ChatCursor) -> None:
        """A chat_updated of the client's view: the Chat as last told, pin and version now."""
        data = {
            **cursor.chat,
            "version": cursor.version,
            "pinned_message_id": cursor.pinned_message_id,
        }
        self._events.put_nowait(Frame(action="chat_updated", data=data))

    def _hide(self, chat_id: int, message_id: int) -> None:
        """This user hid a message: tell it once, and drop its later changes."""
        hidden = self._hidden.setdefault(chat_id, set())
        if message_id not in hidden:
            hidden.add(message_id)
            data = {"chat_id": chat_id, "message_id": message_id}
            self._events.put_nowait(Frame(action="message_hidden", data=data))

    def _forget(self, chat_id: int) -> None:
        self.cursors.pop(chat_id, None)
        self._ahead.pop(chat_id, None)
        self._gap_since.pop(chat_id, None)
        self._hidden.pop(chat_id, None)
        self._unlearned.discard(chat_id)


# The fields of a Chat (chat_created, chat_updated, member_added's chat; a chat list entry
# has more), and the events that move a chat's version.
CHAT_FIELDS = ("id", "type", "name", "created_at", "members", "version", "pinned_message_id")
VERSIONED_EVENTS = frozenset({"new_message", "message_updated", "chat_updated"})


def _meta(chat: dict[str, Any]) -> tuple[Any, Any]:
    """What a chat_updated may change besides the pin: name and members (with roles)."""
    return chat.get("name"), chat.get("members")


def token_lifetime(token: str, expires_in: object = None) -> float:
    """Seconds the access token has left, from its own `exp` claim.

    `expires_in` counts from when the server issued the pair, not from when it arrived,
    and says nothing about how the server rounded `exp`; the claim is what the server
    checks. The payload is read without verifying the signature (the client has no
    secret, and a forged token only fools its own schedule). The claim is trusted only
    within (0, expires_in]: past that range the two clocks disagree, and `expires_in`
    counted from now is the better guess. Without a readable claim, `expires_in` (or 900).
    """
    fallback = float(expires_in) if isinstance(expires_in, int | float) and expires_in > 0 else 900
    exp = _claims(token).get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return fallback
    left = exp - time.time()
    return min(left, fallback) if left > 0 else fallback


def _claims(token: str) -> dict[str, Any]:
    """A JWT's payload, unverified; {} when it is not one."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


def _transient(exc: Exception) -> bool:
    """Worth another attempt: the network, the server restarting, a dropped socket."""
    if isinstance(exc, ChatdError):
        return isinstance(exc, ConnectionLost) or (exc.status or 0) >= 500
    return isinstance(exc, OSError | TimeoutError | websockets.WebSocketException | httpx.HTTPError)


def _frame(text: str | bytes) -> Frame | None:
    """A frame's text as a Frame; None when it is not a JSON object."""
    try:
        decoded = _json_decoder.decode(text)
    except msgspec.DecodeError:
        return None
    return Frame(decoded) if isinstance(decoded, dict) else None
