"""One WebSocket connection on /connect, from authentication to close.

A session reads frames and runs their handlers one at a time (so one socket's sends keep
their order), and owns a writer task that drains the socket's bounded outbox. Everything
the socket receives — replies and events alike — goes through that outbox.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from typing import Any

import asyncpg
from starlette.websockets import WebSocket, WebSocketDisconnect

from chatd.auth import ACCESS, InvalidToken, bearer_token, read_token
from chatd.handlers import dispatch
from chatd.handlers.base import (
    FRAME_BUDGET_BYTES,
    MESSAGE_COLUMNS,
    Context,
    fit_in_frame,
    message_from_row,
)
from chatd.hub import Outbound
from chatd.metrics import ERRORS, QUEUE_OVERFLOWS
from chatd.protocol import (
    INTERNAL,
    Ack,
    ChatError,
    Error,
    ErrorBody,
    UnreadMessages,
    decode_action,
    encode_text,
)

log = logging.getLogger("chatd")

CLOSE_POLICY_VIOLATION = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013

UNREAD_SNAPSHOT_LIMIT = 500

# Driven from the user's memberships: per chat with something unread, an index range on
# messages (chat_id, seq) — never a walk over the whole messages table in id order.
_UNREAD_SNAPSHOT = f"""
SELECT {MESSAGE_COLUMNS}
FROM chat_members cm
JOIN chats c ON c.id = cm.chat_id AND c.last_seq > cm.read_seq
CROSS JOIN LATERAL (
    SELECT * FROM messages
    WHERE chat_id = cm.chat_id AND seq > cm.read_seq AND sender_id <> $1
    ORDER BY seq
    LIMIT $2
) m
WHERE cm.user_id = $1
ORDER BY m.id
LIMIT $2
"""


async def connect_endpoint(websocket: WebSocket) -> None:
    state = websocket.app.state
    await websocket.accept()
    if not origin_allowed(websocket, state.settings.allowed_origins):
        # Cross-site WebSocket hijacking: another site's page would ride on the user's
        # token (from its own ?token= guess or a leaked one) with the browser's help.
        await websocket.close(CLOSE_POLICY_VIOLATION, "origin not allowed")
        return
    token = bearer_token(websocket.headers.get("authorization"))
    token = token or websocket.query_params.get("token")
    try:
        user_id = read_token(state.settings.secret, token or "", ACCESS)
    except InvalidToken:
        # Accept-then-close: a refused upgrade would show a browser no close code at all.
        await websocket.close(CLOSE_POLICY_VIOLATION, "missing, invalid or expired access token")
        return

    session = Session(websocket, user_id, state.settings.send_queue_size)
    ctx = Context(state.pool, state.bus, user_id, state.typing_gate, state.writer)
    state.hub.add(session)  # from here on, events for this user are held until the snapshot
    try:
        try:
            await state.bus.watch(user_id)  # events from other processes, too
        except Exception:
            log.exception("cannot subscribe to events for user %s", user_id)
            await websocket.close(CLOSE_TRY_AGAIN_LATER, "event stream unavailable; retry")
            return
        await session.send_unread_snapshot(state.pool)
        await session.run(ctx, state.settings.max_frame_bytes)
    finally:
        state.hub.remove(session)
        await state.bus.unwatch(user_id)  # balances watch, even one that failed


def origin_allowed(websocket: WebSocket, allowed: tuple[str, ...]) -> bool:
    """Non-browser clients send no Origin; browsers may come from chatd itself or the list."""
    origin = websocket.headers.get("origin")
    if origin is None or "*" in allowed:
        return True
    origin = origin.rstrip("/")
    if origin in allowed:
        return True
    host = websocket.headers.get("host", "")
    return origin.split("://", 1)[-1] == host  # same origin: the page chatd served


class Session:
    def __init__(self, websocket: WebSocket, user_id: uuid.UUID, queue_size: int) -> None:
        self.websocket = websocket
        self.user_id = user_id
        self._queue_size = queue_size
        self._outbox: deque[str] = deque()
        self._wakeup = asyncio.Event()
        # Events that arrive while the unread snapshot is being taken wait here.
        self._held: list[Outbound] | None = []
        self._close: tuple[int, str] | None = None

    # --- outgoing --------------------------------------------------------------------------

    def enqueue(self, event: Outbound) -> None:
        if self._held is not None:
            self._held.append(event)
            if len(self._held) > self._queue_size:
                self._overflow()
        else:
            self._push(event.text)

    def _push(self, text: str) -> None:
        if self._close is not None:
            return
        if len(self._outbox) >= self._queue_size:
            self._overflow()
            return
        self._outbox.append(text)
        self._wakeup.set()

    def _overflow(self) -> None:
        QUEUE_OVERFLOWS.inc()
        # The client is not reading fast enough: drop it rather than buffer without bound.
        self._outbox.clear()
        self._held = None
        self.close_soon(CLOSE_TRY_AGAIN_LATER, "send queue overflow: client too slow")

    def close_soon(self, code: int, reason: str) -> None:
        if self._close is None:
            self._close = (code, reason)
            self._wakeup.set()

    def reply(self, request_id: str | None, data: Any) -> None:
        self._push(encode_text(Ack(request_id=request_id, data=data)))

    def reply_error(self, request_id: str | None, code: str, message: str) -> None:
        ERRORS.labels(code).inc()
        self._push(encode_text(Error(request_id=request_id, error=ErrorBody(code, message))))

    async def send_unread_snapshot(self, pool: asyncpg.Pool) -> None:
        """Send unread_messages first, then the held events the snapshot does not contain."""
        rows = await pool.fetch(_UNREAD_SNAPSHOT, self.user_id, UNREAD_SNAPSHOT_LIMIT + 1)
        messages, _ = fit_in_frame(
            (message_from_row(row) for row in rows[:UNREAD_SNAPSHOT_LIMIT]), FRAME_BUDGET_BYTES
        )
        held, self._held = self._held or [], None
        self._push(encode_text(UnreadMessages(data=messages, has_more=len(rows) > len(messages))))
        in_snapshot = {m.id for m in messages}
        for event in held:
            if event.message_id is None or event.message_id not in in_snapshot:
                self._push(event.text)

    async def _write_loop(self) -> None:
        while True:
            while self._outbox and self._close is None:
                await self.websocket.send_text(self._outbox.popleft())
            if self._close is not None:
                code, reason = self._close
                await self.websocket.close(code, reason)
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    # --- incoming --------------------------------------------------------------------------

    async def run(self, ctx: Context, max_frame_bytes: int) -> None:
        """Serve the socket until either side closes it."""
        reader = asyncio.create_task(self._read_loop(ctx, max_frame_bytes))
        writer = asyncio.create_task(self._write_loop())
        try:
            await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and self._close is not None:
                # We are closing the socket ourselves: let the writer send the close frame.
                await asyncio.wait((writer,), timeout=5)
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)

    async def _read_loop(self, ctx: Context, max_frame_bytes: int) -> None:
        while True:
            try:
                message = await self.websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None:
                raw = message.get("bytes") or b""
            if _too_big(raw, max_frame_bytes):
                self.close_soon(CLOSE_TOO_BIG, "frame exceeds 64 KiB")
                return
            await self._handle(ctx, raw)

    async def _handle(self, ctx: Context, raw: str | bytes) -> None:
        request_id = None
        try:
            action = decode_action(raw)
            request_id = action.request_id
            result = await dispatch(ctx, action)
        except ChatError as exc:
            self.reply_error(exc.request_id or request_id, exc.code, exc.message)
        except Exception:
            log.exception("action failed (user %s)", self.user_id)
            self.reply_error(request_id, INTERNAL, "the server failed to handle this action")
        else:
            if request_id is not None:
                self.reply(request_id, result)


def _too_big(raw: str | bytes, limit: int) -> bool:
    """The limit clients see: uvicorn's own ws_max_size is higher, see cli.py."""
    if isinstance(raw, bytes):
        return len(raw) > limit
    # A character is at most 4 UTF-8 bytes: only encode when the answer is in doubt.
    return len(raw) * 4 > limit and len(raw.encode()) > limit
