"""SIGTERM: sends in flight finish (ack and fan-out), every socket closes with 1012, nothing
new is accepted, and the process exits 0 within CHATD_SHUTDOWN_GRACE, even with a client
that stopped reading."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import struct
import subprocess
import time
import uuid
from pathlib import Path

import asyncpg
import pytest
import websockets

from chatd.client import Api, ConnectionLost, Socket
from tests.conftest import Server, new_user, start_server

CLOSE_SERVICE_RESTART = 1012
EXIT_MARGIN = 10  # seconds past the grace period: process teardown on a busy machine


async def keep_sending(sock: Socket, chat_id: int, acked: dict[str, int], sent: list[str]) -> None:
    """Send with client_msg_ids until the socket closes; record each ack."""
    while True:
        client_msg_id = str(uuid.uuid4())
        sent.append(client_msg_id)
        try:
            message = await sock.request(
                "send_message", chat_id=chat_id, text="x", client_msg_id=client_msg_id
            )
        except (ConnectionLost, TimeoutError):  # the socket closed before the ack
            return
        acked[client_msg_id] = message["id"]


async def stored_messages(database_url: str, chat_id: int) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(
            "SELECT id, seq, client_msg_id FROM messages WHERE chat_id = $1 ORDER BY seq", chat_id
        )
    finally:
        await conn.close()


async def wait_exit(process: subprocess.Popen[bytes], timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    return process.poll()


async def connection_refused(server: Server) -> bool:
    try:
        sock = await asyncio.wait_for(Socket.open(server.ws_url, None), 5)
    except (OSError, websockets.InvalidHandshake, TimeoutError):
        return True
    await sock.close()
    return False


def assert_no_tracebacks(server: Server) -> None:
    assert "Traceback" not in server.log(), server.log()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("linger_ms", ["0", "100"])  # 100: most sends wait for their batch
async def test_sigterm_finishes_sends_in_flight_then_closes_with_1012(
    database_url: str, tmp_path: Path, linger_ms: str
) -> None:
    grace = 10
    server = start_server(
        database_url,
        tmp_path,
        CHATD_SHUTDOWN_GRACE=str(grace),
        CHATD_SEND_LINGER_MS=linger_ms,
    )
    try:
        alice, bob, carol = [await new_user(server, n) for n in ("Alice", "Bob", "Carol")]
        sockets = [await api.connect() for api in (alice, alice, bob, carol)]
        chat = await sockets[0].request(
            "create_chat", type="group", name="g", user_ids=[bob.user_uuid, carol.user_uuid]
        )
        acked: dict[str, int] = {}
        sent: list[str] = []
        # Three senders, two of them with several sends outstanding at once.
        senders = [
            asyncio.create_task(keep_sending(sock, chat["id"], acked, sent))
            for sock in (sockets[0], sockets[0], sockets[0], sockets[2], sockets[2], sockets[3])
        ]
        await asyncio.sleep(1.5)
        assert len(acked) > 20, "the senders are under way"

        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(sock.wait_closed(grace + 5) for sock in sockets))
        assert codes == [CLOSE_SERVICE_RESTART] * len(sockets)
        assert await connection_refused(server)
        assert await wait_exit(server.process, grace + EXIT_MARGIN) == 0
        assert time.monotonic() - signalled < grace + EXIT_MARGIN
        await asyncio.gather(*senders)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()

    rows = await stored_messages(database_url, chat["id"])
    stored = {row["client_msg_id"]: row["id"] for row in rows}
    assert [row["seq"] for row in rows] == list(range(1, len(rows) + 1))
    assert len(stored) == len(rows), "no client_msg_id stored twice"
    # Every acked send is stored once, and every stored send was acked: the server read
    # no send it did not finish.
    assert stored == acked
    for sock in sockets:  # every member socket got every message's event (its own too)
        events = [e["data"]["id"] for e in sock.pending_events() if e["action"] == "new_message"]
        assert sorted(events) == sorted(acked.values())
    assert_no_tracebacks(server)


# --- a client that stops reading --------------------------------------------------------


def open_raw_websocket(port: int, token: str) -> socket.socket:
    """A WebSocket with a tiny receive buffer whose owner never reads it after the handshake."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # no autotuning: fills fast
    raw.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    raw.sendall(
        (
            f"GET /connect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += raw.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return raw


def text_frame(payload: str) -> bytes:
    """A masked client text frame."""
    data = payload.encode()
    mask = os.urandom(4)
    if len(data) < 126:
        header = struct.pack("!BB", 0x81, 0x80 | len(data))
    else:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, len(data))
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


@pytest.mark.timeout(90)
async def test_a_client_that_stops_reading_cannot_hold_the_shutdown(
    database_url: str, tmp_path: Path
) -> None:
    grace = 3
    server = start_server(database_url, tmp_path, CHATD_SHUTDOWN_GRACE=str(grace))
    port = int(server.base_url.rsplit(":", 1)[1])
    raw = None
    try:
        alice = await new_user(server, "Alice")
        async with await alice.connect() as a:
            chat = await a.request("create_chat", type="group", name="big", user_ids=[])
            for n in range(60):
                await a.request("send_message", chat_id=chat["id"], text=f"{n:04}" * 1024)
        raw = open_raw_websocket(port, alice.access_token or "")
        # Each sync answer is ~250 KB: far more than the socket buffers hold between us.
        sync = json.dumps({"action": "sync", "request_id": "s", "chats": {str(chat["id"]): 0}})
        raw.sendall(text_frame(sync) * 40)
        reader = await alice.connect()  # a well-behaved socket alongside
        await asyncio.sleep(1)

        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert await reader.wait_closed(grace + 5) == CLOSE_SERVICE_RESTART
        await asyncio.sleep(0.5)
        assert server.process.poll() is None, "still waiting for the stuck socket"
        assert await connection_refused(server)
        assert await wait_exit(server.process, grace + EXIT_MARGIN) == 0
        took = time.monotonic() - signalled
        assert grace / 2 < took < grace + EXIT_MARGIN, "held by the stuck socket, not past grace"
    finally:
        if raw is not None:
            raw.close()
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
    assert_no_tracebacks(server)


@pytest.mark.timeout(120)
async def test_every_worker_drains_on_sigterm(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    grace = 10
    server = start_server(
        database_url,
        tmp_path,
        CHATD_SHUTDOWN_GRACE=str(grace),
        CHATD_WORKERS="2",
        CHATD_REDIS_URL=redis_url,
    )
    try:
        alice, bob = await new_user(server, "Alice"), await new_user(server, "Bob")
        # Several sockets, so both workers (the kernel spreads accepts) hold some.
        sockets = [await api.connect() for api in (alice, bob) * 3]
        chat = await sockets[0].request(
            "create_chat", type="group", name="g", user_ids=[bob.user_uuid]
        )
        acked: dict[str, int] = {}
        sent: list[str] = []
        senders = [
            asyncio.create_task(keep_sending(sock, chat["id"], acked, sent)) for sock in sockets
        ]
        await asyncio.sleep(1.5)
        assert len(acked) > 20, "the senders are under way"

        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        codes = await asyncio.gather(*(sock.wait_closed(grace + 5) for sock in sockets))
        assert codes == [CLOSE_SERVICE_RESTART] * len(sockets)
        assert await wait_exit(server.process, grace + EXIT_MARGIN) == 0
        assert time.monotonic() - signalled < grace + EXIT_MARGIN
        await asyncio.gather(*senders)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()

    rows = await stored_messages(database_url, chat["id"])
    assert [row["seq"] for row in rows] == list(range(1, len(rows) + 1))
    assert {row["client_msg_id"]: row["id"] for row in rows} == acked
    assert_no_tracebacks(server)


async def test_a_client_cannot_pose_as_the_shutdown(server: Server, alice: Api, bob: Api) -> None:
    # A client's own close reason reaches the app like the server's shutdown notice does;
    # taken for one, the session would linger in the hub while other sockets are open
    # (the drain waits for them: ~9 s).
    from tests.test_logs import wait_for_line

    other = await bob.connect()
    try:
        async with websockets.connect(f"{server.ws_url}?token={alice.access_token}") as ws:
            await ws.recv()
            await ws.close(1000, "server shutting down")
        await wait_for_line(
            server,
            lambda r: r.get("user_id") == alice.user_uuid and r["msg"].startswith("session ended"),
            timeout=3,
        )
    finally:
        await other.close()
