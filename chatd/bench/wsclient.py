"""A minimal RFC 6455 client on a plain asyncio Protocol, for the load generator.

Why not the `websockets` library the SDK uses: each received frame goes through its
protocol parser, event queue and futures, and at tens of thousands of deliveries a second
on a 2-core box that Python takes the CPU the server is being measured with. This client
speaks the same protocol over the same sockets (HTTP/1.1 upgrade, masked client frames, no
extensions) but hands each received payload straight to a callback: about 6 µs of CPU per
delivery, sending included (half a core at 80,000 deliveries/s). It supports what the
bench needs and no more: no fragmentation on send, no compression, no TLS.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from collections.abc import Callable
from urllib.parse import urlsplit

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


class HandshakeError(Exception):
    """The server did not answer the upgrade with 101 and the right accept key."""


class WsClient(asyncio.Protocol):
    """One client WebSocket. Subclasses override `on_text`; `send_text` writes a frame."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.close_code: int | None = None  # the code the server closed with (1006: dropped)
        self.closed = asyncio.get_running_loop().create_future()
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._request = b""
        self._key = b""
        self._handshaking = True
        self._buf = bytearray()
        self._fragments: list[bytes] = []

    # --- called by the load generator ------------------------------------------------------

    def on_text(self, payload: memoryview) -> None:
        """A text (or binary) message arrived. `payload` is only valid during the call."""

    def on_close(self) -> None:
        """The connection is gone (close frame or dropped)."""

    def send_text(self, data: bytes) -> None:
        """Write one masked text frame. Never waits: the transport buffers."""
        if self.transport is None or self.close_code is not None:
            return
        n = len(data)
        if n < 126:
            header = bytes((0x81, 0x80 | n))
        elif n < 65536:
            header = struct.pack("!BBH", 0x81, 0xFE, n)
        else:
            header = struct.pack("!BBQ", 0x81, 0xFF, n)
        mask = os.urandom(4)
        self.transport.write(header + mask + apply_mask(data, mask))

    def close(self, code: int = 1000) -> None:
        if self.transport is not None and not self.transport.is_closing():
            payload = struct.pack("!H", code)
            mask = os.urandom(4)
            self.transport.write(
                bytes((0x88, 0x80 | len(payload))) + mask + apply_mask(payload, mask)
            )
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is None:
            self.close_code = 1006
        if not self._opened.done():
            self._opened.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(self.close_code)
        self.on_close()

    def data_received(self, data: bytes) -> None:
        if self._buf:
            self._buf += data
            data = bytes(self._buf)
            self._buf.clear()
        if self._handshaking:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._buf += data
                return
            self._finish_handshake(data[: end + 4])
            data = data[end + 4 :]
        view = memoryview(data)
        size = len(data)
        pos = 0
        while size - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            start = pos + 2
            if length == 126:
                if size - start < 2:
                    break
                (length,) = struct.unpack_from("!H", data, start)
                start += 2
            elif length == 127:
                if size - start < 8:
                    break
                (length,) = struct.unpack_from("!Q", data, start)
                start += 8
            if b1 & 0x80:  # servers never mask; tolerate it anyway
                start += 4
            end = start + length
            if end > size:
                break
            if b1 & 0x80:
                payload = memoryview(apply_mask(data[start:end], data[start - 4 : start]))
            else:
                payload = view[start:end]
            self._frame(b0 & 0x80, b0 & 0x0F, payload)
            pos = end
        if pos < size:
            self._buf += view[pos:]

    # --- internals -------------------------------------------------------------------------

    def _frame(self, fin: int, opcode: int, payload: memoryview) -> None:
        if opcode in (OP_TEXT, OP_BINARY):
            if fin:
                self.on_text(payload)
            else:
                self._fragments = [bytes(payload)]
        elif opcode == OP_CONT:
            self._fragments.append(bytes(payload))
            if fin:
                whole = b"".join(self._fragments)
                self._fragments = []
                self.on_text(memoryview(whole))
        elif opcode == OP_PING:
            self._control(OP_PONG, bytes(payload))
        elif opcode == OP_CLOSE:
            self.close_code = struct.unpack_from("!H", payload)[0] if len(payload) >= 2 else 1005
            self._control(OP_CLOSE, bytes(payload[:2]))
            if self.transport is not None:
                self.transport.close()

    def _control(self, opcode: int, payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        frame = bytes((0x80 | opcode, 0x80 | len(payload))) + mask + apply_mask(payload, mask)
        self.transport.write(frame)

    def _finish_handshake(self, head: bytes) -> None:
        self._handshaking = False
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        expected = base64.b64encode(hashlib.sha1(self._key + _GUID).digest())
        if len(status) < 2 or status[1] != b"101":
            error = HandshakeError(f"upgrade refused: {lines[0].decode(errors='replace')}")
        elif headers.get(b"sec-websocket-accept") != expected:
            error = HandshakeError("bad Sec-WebSocket-Accept")
        else:
            self._opened.set_result(None)
            return
        self._opened.set_exception(error)
        if self.transport is not None:
            self.transport.abort()


async def connect(
    factory: Callable[[], WsClient],
    url: str,
    headers: dict[str, str] | None = None,
    local_addr: tuple[str, int] | None = None,
    timeout: float = 30,
) -> WsClient:
    """Open `url` (ws://host:port/path?query) with a protocol made by `factory`."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16))
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()

    def make() -> WsClient:
        client = factory()
        client._request = request
        client._key = key
        return client

    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, client = await loop.create_connection(make, host, port, local_addr=local_addr)
        try:
            await client._opened
        except BaseException:
            client.abort()
            raise
    return client
