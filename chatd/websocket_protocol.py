"""uvicorn's websockets-sansio protocol, made safe against a peer that stops reading.

uvicorn's `send` waits while the transport's write buffer is above its high-water mark:
that is the backpressure a Session relies on (its writer stalls, its bounded outbox fills,
and the client is dropped). But a close would wait for that same buffer forever, and
uvicorn's close timer and keepalive timeout call `transport.close()`, which also waits for
the buffer to drain first. A client that never reads again would keep its connection,
buffer and file descriptor for good. Here a close is queued behind what is buffered at
once, and a connection whose closing handshake does not finish in time is aborted.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class WebSocketProtocol(WebSocketsSansIOProtocol):
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
