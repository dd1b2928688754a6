"""One WebSocket connection on /connect, from authentication to close.

A session reads frames and runs their handlers one at a time (so one socket's sends keep
their order), and owns a writer task that drains the socket's bounded outbox. Everything
the socket receives — replies and events alike — goes through that outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from starlette.websockets import WebSocket, WebSocketDisconnect

from chatd import logs
from chatd.auth import ACCESS, InvalidToken, bearer_token, read_token
from chatd.db import is_unavailable
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
    CLOSE_POLICY_VIOLATION,
    CLOSE_SERVICE_RESTART,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    DATABASE_UNAVAILABLE_MESSAGE,
    INTERNAL,
    UNAVAILABLE,
    Ack,
    ChatError,
    Error,
    ErrorBody,
    UnreadMessages,
    decode_action,
    encode_text,
    retry_after_ms,
)
from chatd.websocket_protocol import SERVER_SHUTDOWN, SHUTDOWN_DEADLINE

log = logging.getLogger("chatd")


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
    logs.conn_id.set(logs.new_id())  # this task serves one socket: its log lines carry the id
    await websocket.accept()
    if not origin_allowed(websocket, state.settings.allowed_origins):
        # Cross-site WebSocket hijacking: another site's page would ride on the user's
        # token (from its own ?token= guess or a leaked one) with the browser's help.
        await close_quietly(websocket, CLOSE_POLICY_VIOLATION, "origin not allowed")
        return
    token = bearer_token(websocket.headers.get("authorization"))
    token = token or websocket.query_params.get("token")
    try:
        user_id = read_token(state.settings.secret, token or "", ACCESS)
    except InvalidToken:
        # Accept-then-close: a refused upgrade would show a browser no close code at all.
        reason = "missing, invalid or expired access token"
        await close_quietly(websocket, CLOSE_POLICY_VIOLATION, reason)
        return

    logs.user_id.set(str(user_id))
    settings = state.settings
    session = Session(
        websocket,
        user_id,
        settings.send_queue_size,
        settings.write_timeout,
        # Each statement is bounded by db_timeout, but not the wait for a pooled connection
        # behind others that hang: bound the whole action, a few statements' worth.
        action_timeout=3 * settings.db_timeout,
    )
    ctx = Context(state.pool, state.bus, user_id, state.typing_gate, state.writer, state.limits)
    state.hub.add(session)  # from here on, events for this user are held until the snapshot
    started = time.monotonic()
    log.info("session started")
    try:
        try:
            await state.bus.watch(user_id)  # events from other processes, too
        except Exception:
            log.exception("cannot subscribe to events for user %s", user_id)
            await session.close_now(CLOSE_TRY_AGAIN_LATER, "event stream unavailable; retry")
            return
        try:
            await session.send_unread_snapshot(state.pool)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            log.warning("database unavailable for a new socket: %r", exc)
            await session.close_now(CLOSE_TRY_AGAIN_LATER, "database unavailable; retry")
            return
        # Only a socket that works pushes the user's oldest one over the cap.
        await state.bus.admit(session)
        await session.run(
            ctx,
            state.settings.max_frame_bytes,
            lambda deadline: state.hub.wait_quiet(state.writer, deadline),
        )
    except asyncio.CancelledError:
        # uvicorn cancels what is left when the shutdown grace period ends (an action
        # stuck on a database that does not answer): one line, not a traceback.
        if SHUTDOWN_DEADLINE not in websocket.scope:
            raise
        log.warning("session cut off at the end of the shutdown grace period")
    finally:
        state.hub.remove(session)
        await state.bus.release(session)
        await state.bus.unwatch(user_id)  # balances watch, even one that failed
        code, reason = session.close_reason or (None, "closed by the client or the network")
        log.info(
            "session ended: %s",
            reason,
            extra={"close_code": code, "seconds": round(time.monotonic() - started, 3)},
        )


async def close_quietly(websocket: WebSocket, code: int, reason: str) -> None:
    """Close; a client that has gone already is not an error worth a traceback."""
    with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
        await websocket.close(code, reason)


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
    def __init__(
        self,
        websocket: WebSocket,
        user_id: uuid.UUID,
        queue_size: int,
        write_timeout: float = 10,
        action_timeout: float = 30,
    ) -> None:
        self.websocket = websocket
        self.user_id = user_id
        self.id = uuid.uuid4().hex  # names it to other processes (the per-user socket cap)
        self._queue_size = queue_size
        self.write_timeout = write_timeout
        self.action_timeout = action_timeout  # past it, an action answers `unavailable`
        # Loop time at which the frame being sent was handed to the socket (None: not
        # sending). Hub.watch_writers drops a client whose socket takes none for too long.
        self.sending_since: float | None = None
        self._writer: asyncio.Task[None] | None = None
        self._writer_interrupted = False
        self._outbox: deque[str] = deque()
        self._wakeup = asyncio.Event()
        # Events that arrive while the unread snapshot is being taken wait here.
        self._held: list[Outbound] | None = []
        self._close: tuple[int, str] | None = None
        self._close_when_flushed: tuple[int, str] | None = None
        self.reading = True  # may still start an action
        self.shutdown_deadline: float | None = None  # set when the server is shutting down

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
        self._interrupt_writer()  # stuck on this client: stop now

    def stalled(self) -> None:
        """The socket has taken no frame for write_timeout: the client stopped reading."""
        if self._close is None:  # an overflow has counted and said why already
            QUEUE_OVERFLOWS.inc()
            self.close_soon(CLOSE_TRY_AGAIN_LATER, "client too slow: not reading")
        self._interrupt_writer()

    def _interrupt_writer(self) -> None:
        # uvicorn's send waits while the transport's buffer is full: cancel that wait, and
        # the writer goes on to the close (queued behind the buffer, see websocket_protocol).
        if self.sending_since is not None and self._writer is not None:
            self._writer_interrupted = True
            self._writer.cancel()

    @property
    def close_reason(self) -> tuple[int, str] | None:
        """The close code and reason chatd chose, when chatd closed the socket."""
        return self._close

    async def close_now(self, code: int, reason: str) -> None:
        """Close before the session runs (its writer is not there to do it)."""
        self._close = (code, reason)
        await close_quietly(self.websocket, code, reason)

    def close_soon(self, code: int, reason: str) -> None:
        if self._close is None:
            self._close = (code, reason)
            self._wakeup.set()

    def reply(self, request_id: str | None, data: Any) -> None:
        self._push(encode_text(Ack(request_id=request_id, data=data)))

    def reply_error(
        self, request_id: str | None, code: str, message: str, retry_after: float | None = None
    ) -> None:
        ERRORS.labels(code).inc()
        body = ErrorBody(code, message)
        if retry_after is not None:
            body.retry_after_ms = retry_after_ms(retry_after)
        self._push(encode_text(Error(request_id=request_id, error=body)))

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
        # No timer per frame (it cost ~10% of the server's CPU in a fan-out): the hub's
        # watchdog looks at sending_since once a second instead.
        loop = asyncio.get_running_loop()
        while True:
            while self._outbox and self._close is None:
                self.sending_since = loop.time()
                try:
                    await self.websocket.send_text(self._outbox.popleft())
                except asyncio.CancelledError:
                    if not self._writer_interrupted:
                        raise
                    self._writer_interrupted = False
                    self._outbox.clear()
                finally:
                    self.sending_since = None
            if self._close is None:
                self._close = self._close_when_flushed
            if self._close is not None:
                code, reason = self._close
                await self.websocket.close(code, reason)
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    # --- incoming --------------------------------------------------------------------------

    async def run(
        self,
        ctx: Context,
        max_frame_bytes: int,
        wait_quiet: Callable[[float], Awaitable[None]],
    ) -> None:
        """Serve the socket until either side closes it."""
        reader = asyncio.create_task(self._read_loop(ctx, max_frame_bytes))
        reader.add_done_callback(self._stopped_reading)
        writer = self._writer = asyncio.create_task(self._write_loop())
        try:
            await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
            deadline = self.shutdown_deadline
            if reader.done() and deadline is not None:
                # Once no socket here can start an action and every send has fanned out
                # (to this outbox too), send what is queued, then close. A socket still
                # stuck at the deadline is aborted (chatd/websocket_protocol.py).
                await wait_quiet(deadline)
                self._close_when_flushed = (CLOSE_SERVICE_RESTART, SERVER_SHUTDOWN)
                self._wakeup.set()
                left = deadline - asyncio.get_running_loop().time()
                await asyncio.wait((writer,), timeout=max(0.0, left) + 1)
            if reader.done() and self._close is not None:
                # We are closing the socket ourselves: let the writer send the close frame.
                await asyncio.wait((writer,), timeout=5)
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)

    def _stopped_reading(self, reader: asyncio.Task[None]) -> None:
        self.reading = False

    async def _read_loop(self, ctx: Context, max_frame_bytes: int) -> None:
        while True:
            try:
                message = await self.websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if message["type"] == "websocket.disconnect":
                self.shutdown_deadline = message.get(SHUTDOWN_DEADLINE)
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
            async with asyncio.timeout(self.action_timeout):  # TimeoutError: unavailable
                result = await dispatch(ctx, action)
        except ChatError as exc:
            self.reply_error(exc.request_id or request_id, exc.code, exc.message, exc.retry_after)
        except Exception as exc:
            if is_unavailable(exc):
                log.warning("database unavailable: %r", exc, extra={"request": request_id})
                self.reply_error(request_id, UNAVAILABLE, DATABASE_UNAVAILABLE_MESSAGE)
            else:
                log.exception("action failed", extra={"request": request_id})
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
