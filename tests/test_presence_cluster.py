"""Presence across two nodes sharing Redis: seen from the other node, and offline within a
minute after the node holding a user's sockets is killed (nobody cleans up after it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from chatd.client import Api
from chatd.presence import GRACE, HEARTBEAT, REAP_EVERY, TTL
from tests.conftest import Server, new_user, start_server, stop_server
from tests.test_cluster import on


@pytest.fixture
def two_nodes(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    workdir = tmp_path_factory.mktemp("presence-cluster")
    a = start_server(database_url, workdir, CHATD_REDIS_URL=redis_url)
    b = start_server(database_url, workdir, CHATD_REDIS_URL=redis_url)
    yield a, b
    for node in (a, b):
        if node.process.poll() is None:
            stop_server(node)
        assert "Traceback" not in node.log(), node.log()


async def wait_status(sock, user: Api, status: str, timeout: float) -> dict:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        event = await sock.next_event("presence", timeout=max(0.1, deadline - time.monotonic()))
        if event["data"]["user_uuid"] == user.user_uuid and event["data"]["status"] == status:
            return event["data"]


async def test_presence_crosses_nodes_and_a_killed_node_goes_offline(
    two_nodes: tuple[Server, Server],
) -> None:
    node_a, node_b = two_nodes
    alice, bob = await new_user(node_a, "Alice"), await new_user(node_b, "Bob")
    alice_b = await on(node_b, alice)
    try:
        async with await bob.connect() as b:
            await b.request("create_chat", type="private", user_ids=[alice.user_uuid])
            a = await alice.connect()  # on node A
            await wait_status(b, alice, "online", 5)
            (seen,) = (await b.request("get_presence", user_ids=[alice.user_uuid]))["presence"]
            assert seen["status"] == "online"

            # Alice moves to node B within the grace: nothing happens.
            await a.close()
            a2 = await alice_b.connect()
            await asyncio.sleep(GRACE + 1)
            assert [e for e in b.pending_events() if e["action"] == "presence"] == []
            await a2.close()
            await wait_status(b, alice, "offline", GRACE + 5)

            # Alice on node A again; node A is killed: no socket closes cleanly, no grace
            # runs there. Node B's reaper sees her fields expire.
            a = await alice.connect()
            await wait_status(b, alice, "online", 5)
            killed = time.monotonic()
            node_a.process.kill()
            node_a.process.wait()
            offline = await wait_status(b, alice, "offline", 60)
            took = time.monotonic() - killed
            assert took < 60 and took <= TTL + HEARTBEAT + REAP_EVERY + 5, took
            assert offline["last_seen"] is not None
            (seen,) = (await b.request("get_presence", user_ids=[alice.user_uuid]))["presence"]
            assert seen["status"] == "offline"
    finally:
        for api in (alice, bob, alice_b):
            await api.aclose()
