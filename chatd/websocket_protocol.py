"""uvicorn's websockets-sansio protocol, with chatd's shutdown and stalled-peer handling.

Graceful shutdown (SIGTERM, or Ctrl-C once). uvicorn shuts down by closing its listening
sockets, calling `shutdown()` on every open connection, waiting up to
`timeout_graceful_shutdown` (CHATD_SHUTDOWN_GRACE) for them to close, cancelling what is
left, and only then running the lifespan shutdown. Its own protocol answers `shutdown()`
by sending close 1012 and dropping the connection at once, so a send in flight could
commit without its ack (or its events) going out. Here `shutdown()` tells the app
instead: the session sees a disconnect with reason `SERVER_SHUTDOWN` where its next action
would be, so it finishes the action in hand and reads no more. Once no socket of the
process is in the middle of an action and no send batch is in flight, each session sends
what it has queued, then closes with 1012. A client that stops reading cannot hold this
up: just before the grace period ends its connection is aborted, which ends its session
(uvicorn would cancel it a moment later, with a traceback in the log).

A peer that stops reading. uvicorn's `send` waits while the transport's write buffer is
above its high-water mark: that is the backpressure a Session relies on (its writer
stalls, its bounded outbox fills, and the client is dropped). But a close would wait for
that same buffer forever, and uvicorn's close timer and keepalive timeout call
`transport.close()`, which also waits for the buffer to drain first. A client that never
reads again would keep its connection, buffer and file descriptor for good. Here a close
is queued behind what is buffered at once, and a connection whose closing handshake does
not finish in time is aborted.

Frames the app never sees count too. websockets answers every ping with a pong, written
straight to the transport (not through the app's bounded outbox), and uvicorn keeps
reading: a client that floods pings (or any frames) and never reads would grow the write
buffer without bound. So what the transport holds for one socket is bounded:

- While the write buffer is above its high-water mark (64 KiB), reading is paused: a
  peer that does not read cannot make the server produce anything more, and its own
  sends back up into its TCP window. The buffer then holds at most the high-water mark
  plus the pongs of one read, or plus one frame of the app's (up to 768 KiB, but for a
  Chat of a full group: about 1 MB, 3.7 MiB with the longest names).
- Writes that stay paused for `write_timeout` (CHATD_WRITE_TIMEOUT) mean a peer that takes
  no frame, pongs included: the socket is closed with 1013, like the app's own stalled
  writer (session.py) does for its frames, and aborted if it has not gone
  `write_timeout` later. The app's watchdog only sees a stall while it is sending.
- A write buffer over `socket_buffer_bytes` (CHATD_SOCKET_BUFFER_BYTES, default 4 MiB,
  above what the app's flow control can reach) closes the socket with 1008 and aborts it
  at once: the backstop, should anything write past the pause.
The close frame is queued behind the buffer, which a peer that does not read never gets
to: hence the abort.

A refused handshake. websockets answers a request it cannot parse (a request line over
8 KiB: 414; header lines too long or too many: 431) by queueing the answer; uvicorn never
wrote it and kept the connection open. Here the answer is written and the connection
closed.

Memory per idle socket. With 10,000 sockets open, every object a socket keeps counts:
once the socket is accepted, the handshake's request headers and response are dropped,
and the receive queue and the writable flag are an `Inbox` and a `Flag` rather than
asyncio's Queue and Event (an empty deque is about 700 bytes: a Queue holds four, an
Event one).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import State

from chatd.http_protocol import peer, settings_of
from chatd.protocol import CLOSE_POLICY_VIOLATION, CLOSE_SERVICE_RESTART, CLOSE_TRY_AGAIN_LATER

log = logging.getLogger("chatd")

SERVER_SHUTDOWN = "server shutting down"
# Set in the connection's scope and in the disconnect notice when the server shuts down:
# the loop time by which every session must be done. A key no client can send (a client's
# own close reason could say "server shutting down").
SHUTDOWN_DEADLINE = "chatd.shutdown_deadline"
# The scope's key for the connection itself: the session writes its frames straight to it.
SOCKET = "chatd.socket"


class Flag:
    """asyncio.Event's set, clear, is_set and wait, with no deque until someone waits."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)


class Inbox:
    """What uvicorn's protocol uses of asyncio.Queue (put_nowait, get, empty), unbounded,
    holding a deque only while something waits in it."""

    __slots__ = ("_items", "_ready")

    def __init__(self) -> None:
        self._items: deque[Any] | None = None
        self._ready = Flag()  # set while _items holds something

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        self._ready.set()

    async def get(self) -> Any:
        while not self._items:
            await self._ready.wait()
        item = self._items.popleft()
        if not self._items:
            self._items = None
            self._ready.clear()
        return item


def give_up_after(grace: float) -> float:
    """Seconds into a shutdown after which sockets stop waiting: ahead of uvicorn's cancel."""
    return grace - min(1.0, grace / 4)


class WebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, config: Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]
        self.writable.set()
        settings = settings_of(config)
        self.buffer_budget = settings.socket_buffer_bytes
        self.write_timeout = settings.write_timeout
        self.writes_paused = False  # the transport's buffer is above its high-water mark
        self.stall_timer: asyncio.TimerHandle | None = None
        self.failed = False  # chatd closed the socket here, behind the app's back

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            self._refuse_handshake()
            return
        if self.writes_paused:
            self._pause_reading()  # uvicorn resumed reading for the app (receive)
        self._check_budget()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.writes_paused = True
        self._pause_reading()
        if self.stall_timer is None and not self.close_sent:
            self.stall_timer = self.loop.call_later(self.write_timeout, self._stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        self.writes_paused = False
        self._cancel_stall_timer()
        if not self.read_paused and not self.transport.is_closing():
            self.transport.resume_reading()  # unless uvicorn paused it for the app

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_stall_timer()
        super().connection_lost(exc)

    async def receive(self) -> Any:
        message = await super().receive()
        if self.writes_paused:
            self._pause_reading()  # uvicorn resumed reading: the buffer is still full
        return message

    def shutdown(self) -> None:
        if not self.handshake_complete or self.close_sent or self.transport.is_closing():
            super().shutdown()  # not (or no longer) a chatd session: uvicorn's way
            return
        self.stop_keepalive()
        grace = self.config.timeout_graceful_shutdown or 10.0
        deadline = self.loop.time() + give_up_after(grace)
        self.scope[SHUTDOWN_DEADLINE] = deadline  # type: ignore[literal-required]
        self.loop.call_at(deadline, self.transport.abort)
        notice = {"type": "websocket.disconnect", "code": CLOSE_SERVICE_RESTART}
        self.queue.put_nowait({**notice, "reason": SERVER_SHUTDOWN, SHUTDOWN_DEADLINE: deadline})

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if not self.handshake_complete:  # accepted by websockets: the app runs next
            self.scope[SOCKET] = self  # type: ignore[literal-required]

    # --- frames made beforehand (chatd/outbox.py), written without the ASGI send ---------
    # An event to a group is framed once and the same bytes are written to every member's
    # socket: no ASGI message, coroutine or framing per recipient. What uvicorn's send of
    # a `websocket.send` does besides writing (refusing a closed socket, pausing reads
    # while the buffer is full, the budget) is done here the same way.

    def can_write(self) -> bool:
        """Whether a frame can be written now without waiting: the connection is open and
        the transport's buffer is under its high-water mark."""
        return (
            self.writable.is_set()
            and not (self.failed or self.close_sent or self.disconnected)
            and self.conn.state is State.OPEN
            and not self.transport.is_closing()
        )

    def write_frames(self, frames: Sequence[bytes]) -> None:
        """Write whole frames, in one system call; only when `can_write()`."""
        self.transport.writelines(frames)
        if self.writes_paused:
            self._pause_reading()
        self._check_budget()

    async def send_frame(self, frame: bytes) -> None:
        """Write a whole frame once the buffer has room; ClientDisconnected when the
        connection is closing or gone."""
        await self.writable.wait()
        if not self.can_write():
            raise ClientDisconnected
        self.write_frames((frame,))

    async def send(self, message: Any) -> None:
        if self.failed and message["type"] in ("websocket.send", "websocket.close"):
            if message["type"] == "websocket.send":
                raise ClientDisconnected  # starlette: WebSocketDisconnect
            return  # closed already
        if message["type"] != "websocket.close" or self.writable.is_set():
            await super().send(message)
        else:
            # The buffer is full: write the close frame behind it without waiting (this
            # path of send never awaits once writable), then keep the pause in force.
            self.writable.set()
            try:
                await super().send(message)
            finally:
                if not self.disconnected:
                    self.writable.clear()
        if message["type"] == "websocket.accept" and self.handshake_complete:
            # The handshake is done: its request and response are not read again (the app
            # reads the scope). websockets' parser keeps the request: empty its headers.
            self.request.headers.clear()
            self.request = self.response = None  # type: ignore[assignment]
        if message["type"] == "websocket.close" and self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self._abort)
        if self.writes_paused:
            self._pause_reading()  # uvicorn resumes reading on close
        self._check_budget()

    async def run_asgi(self) -> None:
        await super().run_asgi()
        if self.close_timer is None and not self.disconnected:
            # The app ended without a closing handshake (uvicorn called close(), which
            # waits for the buffer to drain): give the peer as long as a handshake gets.
            self.close_timer = self.loop.call_later(self.close_timeout, self._abort)

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        self._abort()  # the peer is gone; its buffered data will never be read

    def _abort(self) -> None:
        self.close_timer = None
        self.transport.abort()

    # --- what the transport may hold ---------------------------------------------------

    def _pause_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def _cancel_stall_timer(self) -> None:
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None

    def _check_budget(self) -> None:
        if self.transport.is_closing():
            return
        buffered = self.transport.get_write_buffer_size()
        if buffered > self.buffer_budget:
            self._fail(CLOSE_POLICY_VIOLATION, f"write buffer over {self.buffer_budget} bytes")
            self._abort()

    def _stalled(self) -> None:
        """Writes have been paused for write_timeout: the peer takes no frame, pongs included."""
        self.stall_timer = None
        if self.close_sent or self.transport.is_closing():
            return  # closing already, with its own deadline
        self._fail(CLOSE_TRY_AGAIN_LATER, "client too slow: not reading")
        self.close_timer = self.loop.call_later(self.write_timeout, self._abort)

    def _fail(self, code: int, reason: str) -> None:
        """Queue a close frame behind the buffer and tell the app the socket is gone."""
        log.warning(
            "closing socket of %s: %s (%d)",
            peer(self.client),
            reason,
            code,
            extra={"code": code, "buffered": self.transport.get_write_buffer_size()},
        )
        self.failed = True
        self.stop_keepalive()
        if not self.close_sent:
            self.close_sent = True
            self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
            self.conn.fail(code, reason)
            self.transport.write(b"".join(self.conn.data_to_send()))

    def _refuse_handshake(self) -> None:
        """websockets refused the request (e.g. 414): write its answer, which uvicorn drops."""
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.close()
        if self.transport.get_write_buffer_size():
            self.transport.abort()
