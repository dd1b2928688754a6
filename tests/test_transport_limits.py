"""What one connection may cost the server: bounded buffers, heads and timeouts.

Raw TCP clients, because each attack here is one that no well-behaved WebSocket or HTTP
library would make: a ping flood from a client that never reads its pongs, request heads
sent a byte at a time or not at all, over-long URLs and headers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, assert_no_tracebacks, new_user, start_server, stop_server
from tests.memory import RssSampler, holds_connection_from

pytestmark = pytest.mark.timeout(120)

MiB = 2**20
# What the flood tries to push: buffering its pongs would cost the server more than this.
FLOOD_BYTES = 64 * MiB
MAX_GROWTH = 30 * MiB  # what the server's memory may grow by during the flood


def port_of(server: Server) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One client-to-server frame (clients must mask), payload under 126 bytes."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


PING = masked_frame(0x9, b"p" * 125)  # the longest ping payload allowed


def upgrade_request(path: str, token: str | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_head(sock: socket.socket, timeout: float = 20) -> bytes:
    """Read until the end of a response head (or EOF); what came."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def raw_websocket(server: Server, token: str) -> socket.socket:
    """A logged-in WebSocket over a plain socket with a tiny receive window."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect(("127.0.0.1", port_of(server)))
    sock.sendall(upgrade_request("/connect", token))
    assert read_head(sock).startswith(b"HTTP/1.1 101"), "the upgrade was not accepted"
    return sock


def ping_flood(sock: socket.socket, total: int, seconds: float) -> tuple[int, bool]:
    """Send pings, never reading, until `total` bytes, `seconds`, or the server drops us.

    Returns the bytes sent and whether the server closed (or reset) the connection.
    """
    block = PING * 8192  # ~1 MiB
    view = memoryview(block)
    sent, offset = 0, 0
    deadline = time.monotonic() + seconds
    sock.settimeout(0.5)
    while sent < total and time.monotonic() < deadline:
        try:
            n = sock.send(view[offset:])
        except TimeoutError:
            continue  # the server is not reading: we are blocked
        except (BrokenPipeError, ConnectionResetError):
            return sent, True
        sent += n
        offset = (offset + n) % len(block)
    return sent, False


def assert_serves(server: Server) -> None:
    assert httpx.get(server.base_url + "/healthz", timeout=10).status_code == 200


async def assert_sockets_work(server: Server) -> None:
    """A normal client can still log in, connect and send."""
    alice, bob = await new_user(server, "alice"), await new_user(server, "bob")
    sock = await alice.connect()
    chat = await sock.request("create_chat", type="private", user_ids=[bob.user_uuid])
    sent = await sock.request("send_message", chat_id=chat["id"], text="still here")
    assert sent["text"] == "still here"
    await sock.close()


async def wait_until_released(pid: int, client_port: int, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while holds_connection_from(pid, client_port):
        assert time.monotonic() < deadline, "the server still holds the flooding connection"
        await asyncio.sleep(0.2)


# --- the WebSocket transport ----------------------------------------------------------------


@pytest.fixture
def stall_server(database_url: str, tmp_path: Path) -> Iterator[Server]:
    srv = start_server(database_url, tmp_path, CHATD_WRITE_TIMEOUT="2")
    yield srv
    stop_server(srv)
    assert_no_tracebacks(srv)


@pytest.fixture
def budget_server(database_url: str, tmp_path: Path) -> Iterator[Server]:
    # A budget below the transport's 64 KiB high-water mark: the pause never comes first.
    srv = start_server(database_url, tmp_path, CHATD_SOCKET_BUFFER_BYTES="32768")
    yield srv
    stop_server(srv)
    assert_no_tracebacks(srv)


async def flood_and_measure(server: Server) -> tuple[int, bool, RssSampler, int]:
    user = await new_user(server, "flooder")
    sock = await asyncio.to_thread(raw_websocket, server, user.access_token)
    client_port = sock.getsockname()[1]
    try:
        with RssSampler(server.process.pid) as rss:
            sent, dropped = await asyncio.to_thread(ping_flood, sock, FLOOD_BYTES, 60)
    finally:
        sock.close()
    print(
        f"\nping flood: sent {sent / MiB:.1f} MiB, dropped: {dropped}; server RSS "
        f"{rss.baseline / MiB:.1f} MiB, grew by {rss.growth / MiB:.1f} MiB"
    )
    return sent, dropped, rss, client_port


async def test_a_ping_flood_that_never_reads_is_bounded_then_dropped(
    stall_server: Server,
) -> None:
    sent, dropped, rss, client_port = await flood_and_measure(stall_server)
    # The server stopped reading once its write buffer was full, so the pongs it holds
    # are bounded; the client took no frame for CHATD_WRITE_TIMEOUT, so it was dropped.
    assert rss.growth < MAX_GROWTH
    assert dropped, f"the flooding connection is still open after {sent / MiB:.0f} MiB"
    assert sent < FLOOD_BYTES / 2, "the server kept reading pings it could not answer"
    await wait_until_released(stall_server.process.pid, client_port)
    assert "client too slow: not reading (1013)" in stall_server.log()
    assert_serves(stall_server)
    await assert_sockets_work(stall_server)


async def test_a_socket_over_its_buffer_budget_is_closed_at_once(budget_server: Server) -> None:
    sent, dropped, rss, client_port = await flood_and_measure(budget_server)
    assert dropped, f"the flooding connection is still open after {sent / MiB:.0f} MiB"
    assert rss.growth < MAX_GROWTH
    await wait_until_released(budget_server.process.pid, client_port)
    assert "write buffer over 32768 bytes (1008)" in budget_server.log()
    assert_serves(budget_server)
    await assert_sockets_work(budget_server)


# --- HTTP heads ---------------------------------------------------------------------------

HEADER_TIMEOUT = 2
KEEPALIVE_TIMEOUT = 1


@pytest.fixture(scope="module")
def http_server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        database_url,
        tmp_path_factory.mktemp("http-limits"),
        CHATD_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
        CHATD_KEEPALIVE_TIMEOUT=str(KEEPALIVE_TIMEOUT),
    )
    yield srv
    stop_server(srv)
    assert_no_tracebacks(srv)


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port_of(server)), timeout=20)


def read_to_eof(sock: socket.socket, seconds: float = 20) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and how long that took.

    Fails if the server has not closed the connection within `seconds`.
    """
    started = time.monotonic()
    data = b""
    sock.settimeout(seconds)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open; sent {data[:80]!r}") from None
    return data, time.monotonic() - started


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body, from a keep-alive connection."""
    head = read_head(sock)
    header_end = head.index(b"\r\n\r\n") + 4
    length = next(
        int(line.split(b":", 1)[1])
        for line in head[:header_end].split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    body = head[header_end:]
    while len(body) < length:
        body += sock.recv(65536)
    return head[:header_end] + body


def trickle(sock: socket.socket, seconds: float) -> bool:
    """Send a header one byte every 0.5 s, as slowloris does; whether the server hung up.

    Stops once the server answers or closes (it is then readable).
    """
    sock.sendall(b"X-Slow: ")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.5)
        if readable:
            return True
        try:
            sock.sendall(b"a")
        except (BrokenPipeError, ConnectionResetError):
            return True
    return False


@pytest.mark.parametrize("after_a_request", [False, True], ids=["new", "keep-alive"])
def test_a_slowloris_head_is_cut_off_after_the_header_timeout(
    http_server: Server, after_a_request: bool
) -> None:
    with connect(http_server) as sock:
        if after_a_request:  # the next request on a keep-alive connection is slow
            sock.sendall(get("/healthz"))
            assert read_response(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        assert trickle(sock, 20), "a head sent a byte at a time kept the connection open"
        data, _ = read_to_eof(sock)
        assert data.startswith(b"HTTP/1.1 408"), data
        assert b"connection: close" in data.lower()
        assert time.monotonic() - started >= HEADER_TIMEOUT - 0.5
    assert_serves(http_server)


def test_a_silent_connection_is_closed_after_the_header_timeout(http_server: Server) -> None:
    with connect(http_server) as sock:
        data, seconds = read_to_eof(sock)
    assert data == b""
    assert seconds >= HEADER_TIMEOUT - 0.5
    assert_serves(http_server)


def test_an_idle_keep_alive_connection_is_closed_after_its_timeout(http_server: Server) -> None:
    with connect(http_server) as sock:
        for _ in range(2):  # keep-alive works: a second request on the same connection
            sock.sendall(get("/healthz"))
            assert read_response(sock).startswith(b"HTTP/1.1 200")
        data, seconds = read_to_eof(sock)
    assert data == b""
    # CHATD_KEEPALIVE_TIMEOUT (1 s here) is what counts, not uvicorn's default of 5.
    assert KEEPALIVE_TIMEOUT - 0.5 <= seconds < KEEPALIVE_TIMEOUT + 3.5


@pytest.mark.parametrize("upgrade", [True, False], ids=["websocket", "http"])
def test_an_over_long_url_gets_414_and_a_closed_connection(
    http_server: Server, upgrade: bool
) -> None:
    path = "/connect?token=" + "a" * 8192
    request = upgrade_request(path) if upgrade else get(path)
    with connect(http_server) as sock:
        sock.sendall(request)
        data, _ = read_to_eof(sock)
    assert data.startswith(b"HTTP/1.1 414"), data[:200]
    # chatd's error object, as for every other refusal a REST client parses.
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["code"] == "invalid"
    assert_serves(http_server)


def test_a_refused_websocket_handshake_gets_its_answer_and_a_closed_connection(
    http_server: Server,
) -> None:
    # A header line over the 8 KiB websockets takes: it answers 431 (uvicorn dropped that).
    request = upgrade_request("/connect").replace(
        b"\r\n\r\n", b"\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n"
    )
    with connect(http_server) as sock:
        sock.sendall(request)
        data, _ = read_to_eof(sock)
    assert data.startswith(b"HTTP/1.1 431"), data[:200]
    assert_serves(http_server)


def test_a_long_url_under_the_limit_is_served(http_server: Server) -> None:
    response = httpx.get(http_server.base_url + "/healthz?pad=" + "a" * 7000, timeout=10)
    assert response.status_code == 200


def test_an_over_large_head_gets_431_and_a_closed_connection(http_server: Server) -> None:
    with connect(http_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for n in range(40):  # 40 headers of 4 KiB: well over the 64 KiB a head may take
            try:
                sock.sendall(f"X-Pad-{n}: {'a' * 4096}\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                break
        data, _ = read_to_eof(sock)
    assert data.startswith(b"HTTP/1.1 431"), data[:200]
    assert_serves(http_server)


def test_worker_processes_have_the_same_limits(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    srv = start_server(
        database_url,
        tmp_path,
        CHATD_WORKERS="2",
        CHATD_REDIS_URL=redis_url,
        CHATD_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
    )
    try:
        # Several connections, so both workers (the kernel spreads accepts) take some.
        silent = [connect(srv) for _ in range(6)]
        for sock in silent:
            with sock:
                data, seconds = read_to_eof(sock)
                assert data == b""
                # CHATD_HEADER_TIMEOUT (2 s here), not the default of 10 s
                assert seconds < HEADER_TIMEOUT + 5
        with connect(srv) as sock:
            sock.sendall(upgrade_request("/connect?token=" + "a" * 8192))
            data, _ = read_to_eof(sock)
        assert data.startswith(b"HTTP/1.1 414"), data[:200]
        assert_serves(srv)
    finally:
        stop_server(srv)
    assert_no_tracebacks(srv)
