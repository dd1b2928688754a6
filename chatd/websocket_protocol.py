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
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from chatd.protocol import CLOSE_SERVICE_RESTART

SERVER_SHUTDOWN = "server shutting down"
# Set in the connection's scope and in the disconnect notice when the server shuts down:
# the loop time by which every session must be done. A key no client can send (a client's
# own close reason could say "server shutting down").
SHUTDOWN_DEADLINE = "chatd.shutdown_deadline"


def give_up_after(grace: float) -> float:
    """Seconds into a shutdown after which sockets stop waiting: ahead of uvicorn's cancel."""
    return grace - min(1.0, grace / 4)


class WebSocketProtocol(WebSocketsSansIOProtocol):
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

    async def send(self, message: Any) -> None:
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
        if message["type"] == "websocket.close" and self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = self.loop.call_later(self.close_timeout, self._abort)

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
