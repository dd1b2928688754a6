"""A reconnect storm: 1,000 sockets with unread messages drop at once and come back at once.

Every socket comes back (no refusals, no close codes but normal ones, no `internal`) and
each gets exactly the unread snapshot its user should see.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import websockets

from chatd.client import Socket
from tests.conftest import SOAK, Server, bulk_users, start_server, stop_server

USERS = 100 * SOAK
SOCKETS_PER_USER = 10
GROUP_SIZE = 10
MESSAGES_PER_GROUP = 12
SENDERS_PER_GROUP = 4  # the other members have every message of the group unread


@pytest.fixture
def storm_server(database_url: str, tmp_path: Path) -> Iterator[Server]:
    srv = start_server(database_url, tmp_path)
    yield srv
    stop_server(srv)
    tracebacks = [line for line in srv.log().splitlines() if "Traceback" in line]
    assert not tracebacks, f"the server logged tracebacks:\n{srv.log()}"


@dataclass
class Sent:
    id: int
    chat_id: int
    seq: int
    sender: str


def groups_of(users: list[str]) -> list[list[str]]:
    """Two groups per user: one of ten neighbours, one of every tenth user."""
    rows = [users[i : i + GROUP_SIZE] for i in range(0, USERS, GROUP_SIZE)]
    columns = [users[i::GROUP_SIZE] for i in range(GROUP_SIZE)]
    return rows + columns


async def fill_groups(server: Server, tokens: dict[str, str]) -> list[Sent]:
    groups = groups_of(list(tokens))
    senders = sorted({user for members in groups for user in members[:SENDERS_PER_GROUP]})
    opened = await asyncio.gather(*(Socket.open(server.ws_url, tokens[u]) for u in senders))
    socks = dict(zip(senders, opened, strict=True))

    async def fill(members: list[str]) -> list[Sent]:
        owner = socks[members[0]]
        chat = await owner.request("create_chat", type="group", name="storm", user_ids=members[1:])
        sent = []
        for k in range(MESSAGES_PER_GROUP):
            sender = members[k % SENDERS_PER_GROUP]
            message = await socks[sender].request(
                "send_message", chat_id=chat["id"], text=f"message {k} of {chat['id']}"
            )
            sent.append(Sent(message["id"], chat["id"], message["seq"], sender))
        return sent

    try:
        per_group = await asyncio.gather(*(fill(members) for members in groups))
    finally:
        await asyncio.gather(*(sock.close() for sock in socks.values()))
    return [message for group in per_group for message in group]


def expected_unread(sent: list[Sent], user: str, chats: set[int]) -> list[int]:
    """Messages from others above the user's read pointer (which their own sends move)."""
    own_seq = {
        c: max((m.seq for m in sent if m.chat_id == c and m.sender == user), default=0)
        for c in chats
    }
    return sorted(
        m.id for m in sent if m.chat_id in chats and m.sender != user and m.seq > own_seq[m.chat_id]
    )


async def open_sockets(server: Server) -> float:
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        text = (await http.get("/metrics")).text
    return next(
        float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("chatd_open_sockets ")
    )


async def wait_open_sockets(server: Server, count: int, bound: float = 30) -> None:
    deadline = time.monotonic() + bound
    while (now := await open_sockets(server)) != count:
        assert time.monotonic() < deadline, f"{now} sockets open on the server, not {count}"
        await asyncio.sleep(0.1)


async def connect(server: Server, token: str) -> tuple[websockets.ClientConnection, dict]:
    ws = await websockets.connect(
        server.ws_url,
        additional_headers={"Authorization": f"Bearer {token}"},
        max_size=None,
        open_timeout=60,
    )
    async with asyncio.timeout(60):
        first = json.loads(await ws.recv())
    return ws, first


@pytest.mark.timeout(180 * SOAK)
async def test_a_thousand_sockets_drop_and_come_back_with_their_unread(
    storm_server: Server, database_url: str
) -> None:
    tokens = await bulk_users(database_url, storm_server, USERS, "storm")
    sent = await fill_groups(storm_server, tokens)
    chats_of: dict[str, set[int]] = {user: set() for user in tokens}
    for group_index, members in enumerate(groups_of(list(tokens))):
        chat_id = sent[group_index * MESSAGES_PER_GROUP].chat_id
        for member in members:
            chats_of[member].add(chat_id)
    expected = {user: expected_unread(sent, user, chats_of[user]) for user in tokens}
    assert sum(map(len, expected.values())) > USERS * MESSAGES_PER_GROUP  # plenty pending
    await wait_open_sockets(storm_server, 0)

    owners = [user for user in tokens for _ in range(SOCKETS_PER_USER)]

    def check(user: str, first: dict) -> None:
        assert first["action"] == "unread_messages"
        assert [m["id"] for m in first["data"]] == expected[user]
        assert all(m["sender_uuid"] != user for m in first["data"])
        assert first["has_more"] is False

    # First wave, opened a hundred at a time.
    gate = asyncio.Semaphore(100)

    async def gated(user: str) -> websockets.ClientConnection:
        async with gate:
            ws, first = await connect(storm_server, tokens[user])
        check(user, first)
        return ws

    sockets = await asyncio.gather(*(gated(user) for user in owners))
    await wait_open_sockets(storm_server, len(owners))

    # All dropped at once (as by a network blip: no closing handshake).
    for ws in sockets:
        ws.transport.abort()
    await wait_open_sockets(storm_server, 0)

    # All back at once.
    started = time.monotonic()
    results = await asyncio.gather(
        *(connect(storm_server, tokens[user]) for user in owners), return_exceptions=True
    )
    took = time.monotonic() - started
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"{len(failures)} sockets failed to reconnect: {failures[:3]}"
    for user, (_, first) in zip(owners, results, strict=True):
        check(user, first)
    await wait_open_sockets(storm_server, len(owners))
    print(f"\n{len(owners)} sockets reconnected with their unread snapshots in {took:.1f} s")

    sockets = [ws for ws, _ in results]
    await asyncio.gather(*(ws.close() for ws in sockets))
    assert {ws.close_code for ws in sockets} == {1000}
    async with httpx.AsyncClient(base_url=storm_server.base_url) as http:
        assert "chatd_errors_total{" not in (await http.get("/metrics")).text
