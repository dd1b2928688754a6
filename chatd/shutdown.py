"""Graceful shutdown of the WebSocket side (SIGTERM, or Ctrl-C once).

uvicorn shuts down by closing its listening sockets, calling `shutdown()` on every open
connection, waiting up to `timeout_graceful_shutdown` (CHATD_SHUTDOWN_GRACE) for them to
close, cancelling what is left, and only then running the lifespan shutdown. Its own
WebSocket protocol answers `shutdown()` by sending close 1012 and dropping the connection
at once, so a send in flight could commit without its ack (or its events) going out.

`GracefulWebSocketProtocol` instead tells the app: the session sees a disconnect with
reason `SERVER_SHUTDOWN` where its next action would be, so it finishes the action in hand
and reads no more. Once no socket of the process is in the middle of an action and no
send batch is in flight, each session sends what it has queued, then closes with 1012.
A client that stops reading cannot hold this up: just before the grace period ends its
connection is aborted, which ends its session (uvicorn would cancel it a moment later,
with a traceback in the log).
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

CLOSE_SERVICE_RESTART = 1012
SERVER_SHUTDOWN = "server shutting down"


def give_up_after(grace: float) -> float:
    """Seconds into a shutdown after which sockets stop waiting: ahead of uvicorn's cancel."""
    return grace - min(1.0, grace / 4)


class GracefulWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, except that the app closes on shutdown."""

    def shutdown(self) -> None:
        if not self.handshake_complete or self.close_sent or self.transport.is_closing():
            super().shutdown()  # not (or no longer) a chatd session: uvicorn's way
            return
        self.stop_keepalive()
        grace = self.config.timeout_graceful_shutdown
        if grace is not None:
            self.loop.call_later(give_up_after(grace), self.transport.abort)
        notice = {"type": "websocket.disconnect", "code": CLOSE_SERVICE_RESTART}
        self.queue.put_nowait({**notice, "reason": SERVER_SHUTDOWN})
