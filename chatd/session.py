"""One WebSocket connection on /connect, from authentication to close.

A session reads frames and runs their handlers one at a time (so one socket's sends keep
their order), and starts a writer task that writes what its Outbox (chatd/outbox.py, the
sans-I/O part) says to. Everything the socket receives, replies and events alike, goes
through that outbox.

Most sockets are idle most of the time, and each object one keeps is multiplied by the
sockets a process holds. So the session reads in the task uvicorn runs it in (no reader
task of its own), and its writer task lives only while the outbox has something to write.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.datastructures import Headers, QueryParams
from starlette.websockets import WebSocket, WebSocketDisconnect

from chatd import logs
from chatd.auth import bearer_token
from chatd.db import is_unavailable
from chatd.handlers import dispatch
from chatd.handlers.base import Context, authenticate
from chatd.handlers.messages import unread_snapshot
from chatd.hub import Outbound, WriteStep
from chatd.metrics import ERRORS, QUEUE_OVERFLOWS
from chatd.node import Node
from chatd.outbox import Close, Outbox, text_frame
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
    encode,
    retry_after_ms,
)
from chatd.rest import client_address
from chatd.websocket_protocol import SERVER_SHUTDOWN, SHUTDOWN_DEADLINE, SOCKET, WebSocketProtocol

log = logging.getLogger("chatd")

# Frames handed to the socket in one system call, at most (but always a whole frame): the
# buffer's high-water mark is checked between such writes.
WRITE_BYTES = 64 * 1024


async def connect_endpoint(websocket: WebSocket) -> None:
    node: Node = websocket.app.state.node
    settings = node.settings
    logs.conn_id.set(logs.new_id())  # this task serves one socket: its log lines carry the id
    await websocket.accept()
    # Read from the handshake here, uncached (websocket.headers would keep a copy): once
    # authenticated, the socket keeps none of it, see forget_handshake.
    headers = Headers(scope=websocket.scope)
    if not origin_allowed(headers, settings.allowed_origins):
        # Cross-site WebSocket hijacking: another site's page would ride on the user's
        # token (from its own ?token= guess or a leaked one) with the browser's help.
        await close_quietly(websocket, CLOSE_POLICY_VIOLATION, "origin not allowed")
        return
    token = bearer_token(headers.get("authorization"))
    token = token or QueryParams(websocket.scope["query_string"]).get("token")
    del headers
    try:
        ctx = await authenticate(node, token, client_address(websocket))
    except ChatError as exc:
        if exc.code == UNAVAILABLE:  # the identity provider's keys could not be had
            await close_quietly(websocket, CLOSE_TRY_AGAIN_LATER, exc.message)
            return
        # Accept-then-close: a refused upgrade would show a browser no close code at all.
        reason = "missing, invalid or expired access token, or a revoked session"
        await close_quietly(websocket, CLOSE_POLICY_VIOLATION, reason)
        return
    except Exception as exc:
        if not is_unavailable(exc):  # the session's first check here asks the database
            raise
        log.warning("database unavailable for a new socket's session: %r", exc)
        await close_quietly(websocket, CLOSE_TRY_AGAIN_LATER, "database unavailable; retry")
        return

    del token
    forget_handshake(websocket)
    user_id = ctx.user_id
    logs.user_id.set(str(user_id))
    session = Session(
        websocket,
        user_id,
        ctx.session_id,
        settings.send_queue_size,
        settings.write_timeout,
        node.hub.writes,
        # Each statement is bounded by db_timeout, but not the wait for a pooled connection
        # behind others that hang: bound the whole action, a few statements' worth.
        action_timeout=3 * settings.db_timeout,
    )
    node.hub.add(session)  # from here on, events for this user are held until the snapshot
    started = time.monotonic()
    counted = False  # in presence: from a working socket on
    log.info("session started")
    try:
        try:
            await node.bus.watch(user_id)  # events from other processes, too
        except Exception:
            log.exception("cannot subscribe to events for user %s", user_id)
            await session.close_now(CLOSE_TRY_AGAIN_LATER, "event stream unavailable; retry")
            return
        try:
            session.send_snapshot(await unread_snapshot(ctx))
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            log.warning("database unavailable for a new socket: %r", exc)
            await session.close_now(CLOSE_TRY_AGAIN_LATER, "database unavailable; retry")
            return
        # Only a socket that works pushes the user's oldest one over the cap.
        await node.bus.admit(session)
        node.presence.connected(user_id)
        counted = True
        await session.run(ctx, settings.max_frame_bytes, node.drain)
    except asyncio.CancelledError:
        # uvicorn cancels what is left when the shutdown grace period ends (an action
        # stuck on a database that does not answer): one line, not a traceback.
        if SHUTDOWN_DEADLINE not in websocket.scope:
            raise
        log.warning("session cut off at the end of the shutdown grace period")
    finally:
        node.hub.remove(session)
        if counted:
            node.presence.disconnected(user_id)
        await node.bus.release(session)
        await node.bus.unwatch(user_id)  # balances watch, even one that failed
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


def forget_handshake(websocket: WebSocket) -> None:
    """Drop the handshake's headers from the scope (the middleware and uvicorn share it):
    a socket open for hours would keep them, a KiB or more each, for nothing."""
    websocket.scope["headers"] = []


def origin_allowed(headers: Headers, allowed: tuple[str, ...]) -> bool:
    """Non-browser clients send no Origin; browsers may come from chatd itself or the list."""
    origin = headers.get("origin")
    if origin is None or "*" in allowed:
        return True
    origin = origin.rstrip("/")
    if origin in allowed:
        return True
    host = headers.get("host", "")
    return origin.split("://", 1)[-1] == host  # same origin: the page chatd served


class Session:
    """The asyncio shell around one socket's Outbox: it reads in the task that runs it, and
    writes in a writer task started whenever the outbox has something to write."""

    __slots__ = (
        "_context",
        "_reader",
        "_reader_stopped",
        "_write_due",
        "_writer",
        "_writer_interrupted",
        "_writes",
        "action_timeout",
        "id",
        "outbox",
        "reading",
        "sending_since",
        "session_id",
        "shutdown_deadline",
        "socket",
        "user_id",
        "websocket",
        "write_timeout",
    )

    def __init__(
        self,
        websocket: WebSocket,
        user_id: uuid.UUID,
        session_id: uuid.UUID | None,
        queue_size: int,
        write_timeout: float,
        writes: WriteStep,
        action_timeout: float,
    ) -> None:
        self.websocket = websocket
        # The connection itself, for frames made beforehand (the same bytes to every member).
        self.socket: WebSocketProtocol = websocket.scope[SOCKET]
        self.user_id = user_id
        self.session_id = session_id  # revoking it closes this socket (Hub.revoke)
        self.id = uuid.uuid4().hex  # names it to other processes (the per-user socket cap)
        self.write_timeout = write_timeout
        self.action_timeout = action_timeout  # past it, an action answers `unavailable`
        self.outbox = Outbox(queue_size, wakeup=self._start_writer, on_overflow=self._overflowed)
        self._writes = writes
        self._write_due = False  # in _writes: the outbox is written at the end of this step
        # Loop time at which the frame being sent was handed to the socket (None: not
        # sending). The hub's watchdog drops a client whose socket takes none for too long.
        self.sending_since: float | None = None
        # The task of run() once it runs (writers start from then on), the writer while
        # one is writing or once one has ended the socket (sent the close, or failed).
        self._reader: asyncio.Task[Any] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._writer_interrupted = False
        self._reader_stopped = False  # the writer ended the socket: run() cancelled reading
        self._context: contextvars.Context | None = None  # run()'s, for the writers
        self.reading = True  # may still start an action
        self.shutdown_deadline: float | None = None  # set when the server is shutting down

    # --- outgoing (the hub's Subscriber) -----------------------------------------------------

    @property
    def close_reason(self) -> tuple[int, str] | None:
        """The close code and reason chatd chose, when chatd closed the socket."""
        return self.outbox.close_reason

    def enqueue(self, event: Outbound) -> None:
        self.outbox.enqueue(event)

    def close_soon(self, code: int, reason: str) -> None:
        self.outbox.close(code, reason)

    def check_writer(self, now: float) -> None:
        """The socket has taken no frame for write_timeout: the client stopped reading."""
        if self.sending_since is None or now - self.sending_since <= self.write_timeout:
            return
        if self.close_reason is None:  # an overflow has counted and said why already
            QUEUE_OVERFLOWS.inc()
            self.outbox.close(CLOSE_TRY_AGAIN_LATER, "client too slow: not reading")
        self._interrupt_writer()

    def _overflowed(self) -> None:
        # The client is not reading fast enough: drop it rather than buffer without bound.
        QUEUE_OVERFLOWS.inc()
        self._interrupt_writer()  # stuck on this client: stop now

    def _interrupt_writer(self) -> None:
        # uvicorn's send waits while the transport's buffer is full: cancel that wait, and
        # the writer goes on to the close (queued behind the buffer, see websocket_protocol).
        if self.sending_since is not None and self._writer is not None:
            self._writer_interrupted = True
            self._writer.cancel()

    def send_snapshot(self, snapshot: UnreadMessages) -> None:
        """Send the unread snapshot first, then the held events it does not contain."""
        self.outbox.release(text_frame(encode(snapshot)), {m.id for m in snapshot.data})

    async def close_now(self, code: int, reason: str) -> None:
        """Close before the session runs (its writer is not there to do it)."""
        self.outbox.close(code, reason)
        await close_quietly(self.websocket, code, reason)

    def reply(self, request_id: str | None, data: Any) -> None:
        self.outbox.push(text_frame(encode(Ack(request_id=request_id, data=data))))

    def reply_error(
        self, request_id: str | None, code: str, message: str, retry_after: float | None = None
    ) -> None:
        ERRORS.labels(code).inc()
        body = ErrorBody(code, message)
        if retry_after is not None:
            body.retry_after_ms = retry_after_ms(retry_after)
        self.outbox.push(text_frame(encode(Error(request_id=request_id, error=body))))

    def _start_writer(self) -> None:
        """The outbox may have something new: write it at the end of this loop step, with
        whatever else comes for the socket meanwhile, unless a writer task is running (or
        has ended the socket), or the session does not run yet."""
        if self._writer is None and self._reader is not None and not self._write_due:
            self._write_due = True
            self._writes.add(self._write_step)

    def _write_step(self) -> None:
        """Write the outbox now if the socket takes it without waiting, else start a
        writer task (unless one is running already)."""
        self._write_due = False
        if self._writer is None and self._reader is not None and not self._write_now():
            # In the session's context (its log ids), not that of whoever pushed the frame.
            loop = asyncio.get_running_loop()
            self._writer = loop.create_task(self._write_loop(), context=self._context)
            self._writer.add_done_callback(self._writer_stopped)

    def _write_now(self) -> bool:
        """Write the outbox's frames while the socket takes them without waiting, many in
        one system call; whether that emptied it. The usual case by far: an event costs no
        task and no wakeup. A close, and frames behind a full buffer, are the writer
        task's."""
        socket, outbox = self.socket, self.outbox
        while socket.can_write() and (frames := outbox.take_frames(WRITE_BYTES)):
            socket.write_frames(frames)
        return outbox.empty

    def _writer_stopped(self, writer: asyncio.Task[None]) -> None:
        if writer is not self._writer:
            return  # it went idle (another may be writing already)
        # It sent the close, or the socket failed under it: stop reading, as the socket is
        # done (an action in flight included).
        if self.reading and self._reader is not None:
            self._reader_stopped = True
            self._reader.cancel()

    async def _write_loop(self) -> None:
        # No timer per frame (it cost ~10% of the server's CPU in a fan-out): the hub's
        # watchdog looks at sending_since once a second instead.
        loop = asyncio.get_running_loop()
        while True:
            step = self.outbox.next()
            if step is None:
                self._writer = None  # idle: the next frame starts another writer
                return
            elif isinstance(step, Close):
                await self.websocket.close(step.code, step.reason)
                return
            else:
                self.sending_since = loop.time()
                try:
                    await self.socket.send_frame(step)
                except asyncio.CancelledError:
                    if not self._writer_interrupted:
                        raise
                    self._writer_interrupted = False  # on to the close the outbox holds
                finally:
                    self.sending_since = None

    # --- incoming --------------------------------------------------------------------------

    async def run(
        self,
        ctx: Context,
        max_frame_bytes: int,
        drain: Callable[[float], Awaitable[None]],
    ) -> None:
        """Serve the socket until either side closes it: read here until the client closes
        (or the server shuts down), or until the writer ends the socket."""
        reader = self._reader = asyncio.current_task()
        assert reader is not None
        self._context = contextvars.copy_context()
        self._start_writer()  # what came before (the snapshot)
        try:
            try:
                await self._read_loop(ctx, max_frame_bytes)
            except asyncio.CancelledError:
                # Ours (the writer ended the socket) is taken back; any other goes on.
                if not self._reader_stopped or reader.uncancel() > 0:
                    raise
            finally:
                self.reading = False
            if self._reader_stopped:
                return
            deadline = self.shutdown_deadline
            if deadline is not None:
                # Once no socket here can start an action and every send has fanned out
                # (to this outbox too), send what is queued, then close. A socket still
                # stuck at the deadline is aborted (chatd/websocket_protocol.py).
                await drain(deadline)
                self.outbox.close_when_flushed(CLOSE_SERVICE_RESTART, SERVER_SHUTDOWN)
                left = deadline - asyncio.get_running_loop().time()
                await self._wait_for_writer(max(0.0, left) + 1)
            if self.close_reason is not None:
                # We are closing the socket ourselves: let the writer send the close frame.
                await self._wait_for_writer(5)
        finally:
            self._reader = None  # no writer starts from here on
            writer = self._writer
            if writer is not None:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)

    async def _wait_for_writer(self, timeout: float) -> None:
        if self._write_due:
            self._write_step()  # now, not at the end of the step: it may start the writer
        if self._writer is not None:
            await asyncio.wait((self._writer,), timeout=timeout)

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
