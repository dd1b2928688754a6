"""A client that stops reading while others flood its chat.

It is disconnected with 1013 once its bounded queue is full, the server's memory stays
bounded (nothing is buffered for it without limit), and the other members keep getting
every message with no added delay. In a 1,000-member group, the members who read get every
message while one is stuck, and the one dropped catches up with sync.
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from chatd.client import Socket
from tests.conftest import (
    SOAK,
    Server,
    assert_no_tracebacks,
    bulk_users,
    new_user,
    start_server,
    stop_server,
)
from tests.memory import RssSampler, holds_connection_from

QUEUE_SIZE = 100
TEXT = "\U0001f600" * 4096  # the longest text allowed: ~16 KiB of UTF-8 in every frame
MESSAGES_PER_FLOOD = 1500 * SOAK
pytestmark = pytest.mark.timeout(120 * SOAK)
IN_FLIGHT = 16  # sends each sender keeps outstanding


@pytest.fixture
def slow_server(database_url: str, tmp_path: Path) -> Iterator[Server]:
    srv = start_server(database_url, tmp_path, CHATD_SEND_QUEUE_SIZE=str(QUEUE_SIZE))
    yield srv
    stop_server(srv)
    assert_no_tracebacks(srv)


async def metric(server: Server, name: str) -> float:
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


async def flood(senders: list[Socket], chat_id: int, tag: str, sent_at: dict[str, float]) -> None:
    """Send MESSAGES_PER_FLOOD messages, noting when each was sent, by client_msg_id."""
    keys = iter(f"{tag}-{n}" for n in range(MESSAGES_PER_FLOOD))

    async def lane(sock: Socket) -> None:
        for key in keys:
            sent_at[key] = time.monotonic()
            await sock.request(
                "send_message", timeout=60, chat_id=chat_id, text=TEXT, client_msg_id=key
            )

    await asyncio.gather(*(lane(sock) for sock in senders for _ in range(IN_FLIGHT)))


async def delivery_latencies(reader: Socket, sent_at_of: dict[str, float], tag: str) -> list[float]:
    """Read new_message events until every message of the flood came; their latencies."""
    latencies: dict[str, float] = {}
    while len(latencies) < MESSAGES_PER_FLOOD:
        event = await reader.next_event("new_message", timeout=60)
        key = event["data"]["client_msg_id"]
        if key.startswith(tag + "-"):
            latencies[key] = time.monotonic() - sent_at_of[key]
    return list(latencies.values())


async def stalled_socket(server: Server, token: str) -> websockets.ClientConnection:
    """A socket that reads its unread snapshot, then stops reading at the TCP level."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.setblocking(False)
    port = int(server.base_url.rsplit(":", 1)[1])
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    ws = await websockets.connect(
        server.ws_url,
        sock=sock,
        additional_headers={"Authorization": f"Bearer {token}"},
        max_size=None,
        max_queue=1,
    )
    assert json.loads(await ws.recv())["action"] == "unread_messages"
    ws.transport.pause_reading()
    return ws


async def test_a_client_that_stops_reading_is_dropped_and_costs_others_nothing(
    slow_server: Server,
) -> None:
    sender, reader, sleeper = [await new_user(slow_server, n) for n in ("s", "r", "z")]
    senders = [await sender.connect() for _ in range(2)]
    fast = await reader.connect()
    chat = await senders[0].request(
        "create_chat", type="group", name="flood", user_ids=[reader.user_uuid, sleeper.user_uuid]
    )
    pid = slow_server.process.pid

    # Without a stalled member: how fast the reading member gets the flood.
    sent_at: dict[str, float] = {}
    with RssSampler(pid) as calm_rss:
        flooding = asyncio.create_task(flood(senders, chat["id"], "calm", sent_at))
        calm = await delivery_latencies(fast, sent_at, "calm")
        await flooding

    overflows_before = await metric(slow_server, "chatd_queue_overflows_total")
    stalled = await stalled_socket(slow_server, sleeper.access_token)
    gone = await stalled_socket(slow_server, sleeper.access_token)  # never reads again
    gone_port = gone.transport.get_extra_info("sockname")[1]
    with RssSampler(pid) as stalled_rss:
        sent_at.clear()
        flooding = asyncio.create_task(flood(senders, chat["id"], "stalled", sent_at))
        latency_task = asyncio.create_task(delivery_latencies(fast, sent_at, "stalled"))
        # Dropped while the flood goes on: the overflow is counted and its socket is gone.
        deadline = time.monotonic() + 30
        while await metric(slow_server, "chatd_queue_overflows_total") < overflows_before + 2:
            assert time.monotonic() < deadline, "the stalled client was never dropped"
            await asyncio.sleep(0.1)
        # The client reads again: what was buffered, then the close frame saying why
        # (within the closing handshake's 10 s, after which the server aborts).
        stalled.transport.resume_reading()
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(30):
                while True:
                    await stalled.recv()
        await flooding
        with_stalled = await latency_task

    assert stalled.close_code == 1013
    assert stalled.close_reason.startswith("send queue overflow")

    # The server lets go of a client that never reads again: its closing handshake cannot
    # finish, so the connection is aborted (not kept with its buffer and file descriptor).
    deadline = time.monotonic() + 30
    while holds_connection_from(pid, gone_port):
        assert time.monotonic() < deadline, "the server still holds the stalled connection"
        await asyncio.sleep(0.2)
    gone.transport.abort()

    frame_bytes = len(TEXT.encode()) + 300
    flood_bytes = MESSAGES_PER_FLOOD * frame_bytes  # what buffering the flood for it would cost
    growth = stalled_rss.peak - stalled_rss.baseline
    calm_growth = calm_rss.peak - calm_rss.baseline
    print(
        f"\nRSS baseline {stalled_rss.baseline / 2**20:.1f} MiB; growth during the flood "
        f"{calm_growth / 2**20:.1f} MiB without and {growth / 2**20:.1f} MiB with the stalled "
        f"reader; buffering the flood for it would take {flood_bytes / 2**20:.1f} MiB"
    )
    assert growth < flood_bytes / 3

    calm_p50, slow_p50 = statistics.median(calm), statistics.median(with_stalled)
    calm_p95 = statistics.quantiles(calm, n=20)[-1]
    slow_p95 = statistics.quantiles(with_stalled, n=20)[-1]
    print(
        f"reader latency p50/p95: {calm_p50 * 1000:.0f}/{calm_p95 * 1000:.0f} ms without, "
        f"{slow_p50 * 1000:.0f}/{slow_p95 * 1000:.0f} ms with the stalled reader"
    )
    assert slow_p50 < 3 * calm_p50 + 0.25
    assert slow_p95 < 3 * calm_p95 + 0.5

    for sock in (*senders, fast):
        await sock.close()


BIG_GROUP = 1000
ROUND = 25  # sends in flight at once


async def test_a_stalled_member_of_a_big_group_holds_nobody_back_and_resumes_with_sync(
    slow_server: Server, database_url: str
) -> None:
    """One member of a 1,000-member group stops reading: the members who read get every
    message while it is stuck, it alone is dropped with 1013, and it catches up with sync."""
    tokens = await bulk_users(database_url, slow_server, BIG_GROUP, "big")
    ids = list(tokens)
    owner = await Socket.open(slow_server.ws_url, tokens[ids[0]])
    chat = await owner.request("create_chat", type="group", name="big", user_ids=ids[1:])
    readers = [await Socket.open(slow_server.ws_url, tokens[user]) for user in ids[1:4]]
    stalled = await stalled_socket(slow_server, tokens[ids[-1]])
    overflows_before = await metric(slow_server, "chatd_queue_overflows_total")

    async def send_round() -> list[int]:
        acks = await asyncio.gather(
            *(
                owner.request("send_message", timeout=60, chat_id=chat["id"], text=TEXT)
                for _ in range(ROUND)
            )
        )
        return [ack["id"] for ack in acks]

    # Send until the stalled member is dropped (its queue of QUEUE_SIZE overflows once the
    # TCP buffers between are full), then once more.
    sent: list[int] = []
    for _ in range(100):
        sent += await send_round()
        if await metric(slow_server, "chatd_queue_overflows_total") > overflows_before:
            break
    else:
        raise AssertionError("the stalled member was never dropped")
    sent += await send_round()

    # It has read nothing since its snapshot: every other member has every message.
    for reader in readers:
        got = [(await reader.next_event("new_message", timeout=60))["data"] for _ in sent]
        assert sorted(m["id"] for m in got) == sorted(sent)
        assert {m["chat_id"] for m in got} == {chat["id"]}
    # Dropped alone: the readers' sockets are open and counted no overflow.
    assert await metric(slow_server, "chatd_queue_overflows_total") == overflows_before + 1
    for reader in readers:
        assert (await reader.request("get_chat", chat_id=chat["id"]))["unread_count"] == len(sent)

    stalled.transport.resume_reading()
    with pytest.raises(websockets.ConnectionClosed):
        async with asyncio.timeout(30):
            while True:
                await stalled.recv()
    assert stalled.close_code == 1013
    assert stalled.close_reason.startswith("send queue overflow")

    # Back, it resumes with sync from the last seq it had (none: it read only the snapshot).
    again = await Socket.open(slow_server.ws_url, tokens[ids[-1]])
    synced: list[int] = []
    seq = 0
    while True:
        answer = await again.request("sync", chats={str(chat["id"]): seq}, limit=500)
        entry = answer["chats"][str(chat["id"])]
        synced += [m["id"] for m in entry["messages"]]
        seq = entry["messages"][-1]["seq"] if entry["messages"] else seq
        if not entry["has_more"]:
            break
    assert synced == sorted(sent)
    for sock in (owner, *readers, again):
        await sock.close()
