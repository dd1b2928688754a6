"""Several chatd processes sharing PostgreSQL and Redis: users on different nodes chat.

Two nodes run on different ports (as behind a load balancer); Alice talks to node A and
Bob to node B. A third server runs `--workers 2`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis.asyncio as redis

from chatd.client import Api, Socket
from tests.conftest import PASSWORD, ROOT, TEST_SECRET, Server, start_server, stop_server


@pytest.fixture(scope="module")
def nodes(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    workdir = tmp_path_factory.mktemp("cluster")
    a = start_server(database_url, workdir, CHATD_REDIS_URL=redis_url)
    b = start_server(database_url, workdir, CHATD_REDIS_URL=redis_url)
    yield a, b
    for node in (a, b):
        stop_server(node)
        assert "Traceback" not in node.log(), node.log()


async def on(node: Server, user: Api) -> Api:
    """The same user, talking to another node."""
    api = Api(node.base_url)
    await api.login(user.email, PASSWORD)  # type: ignore[attr-defined]
    return api


async def quiet(sock: Socket, wait: float = 0.3) -> list[dict]:
    await asyncio.sleep(wait)
    return sock.pending_events()


async def test_users_on_two_nodes_chat_and_read_each_other(
    nodes: tuple[Server, Server], alice: Api, bob: Api
) -> None:
    node_a, node_b = nodes
    alice_a, bob_b = await on(node_a, alice), await on(node_b, bob)
    async with await alice_a.connect() as a, await bob_b.connect() as b:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        assert (await b.next_event("chat_created"))["data"] == chat

        hello = await a.request("send_message", chat_id=chat["id"], text="from A")
        assert (await b.next_event("new_message"))["data"] == hello
        assert (await a.next_event("new_message"))["data"] == hello  # senders get it too
        answer = await b.request("send_message", chat_id=chat["id"], text="from B")
        assert (await a.next_event("new_message"))["data"] == answer

        # Read receipts both ways: Bob's answer read Alice's message; Alice reads his.
        assert (await a.next_event("message_read"))["data"]["message_id"] == hello["id"]
        await a.request("mark_read", message_ids=[answer["id"]])
        assert (await b.next_event("message_read"))["data"]["message_id"] == answer["id"]

        await a.request("typing", chat_id=chat["id"])
        assert (await b.next_event("typing"))["data"]["user_uuid"] == alice.user_uuid


async def test_group_membership_changes_reach_both_nodes(
    nodes: tuple[Server, Server], alice: Api, bob: Api, carol: Api
) -> None:
    node_a, node_b = nodes
    alice_a, bob_b, carol_b = (
        await on(node_a, alice),
        await on(node_b, bob),
        await on(node_b, carol),
    )
    async with (
        await alice_a.connect() as a,
        await bob_b.connect() as b,
        await carol_b.connect() as c,
    ):
        chat = await a.request("create_chat", type="group", name="g", user_ids=[bob.user_uuid])
        await b.next_event("chat_created")
        await a.request("set_role", chat_id=chat["id"], user_uuid=bob.user_uuid, role="admin")
        assert (await b.next_event("chat_updated"))["data"]["members"][1]["role"] == "admin"

        added = await b.request("add_members", chat_id=chat["id"], user_ids=[carol.user_uuid])
        for sock in (a, c):
            assert (await sock.next_event("member_added"))["data"]["chat"] == added
        await b.next_event("member_added")

        await a.request("remove_member", chat_id=chat["id"], user_uuid=carol.user_uuid)
        for sock in (a, b, c):
            event = await sock.next_event("member_removed")
            assert event["data"]["user_uuid"] == carol.user_uuid

        after = await a.request("send_message", chat_id=chat["id"], text="without carol")
        assert (await b.next_event("new_message"))["data"] == after
        assert [e for e in await quiet(c) if e["action"] == "new_message"] == []


async def test_a_user_on_both_nodes_gets_every_event_once_per_socket(
    nodes: tuple[Server, Server], alice: Api, bob: Api
) -> None:
    node_a, node_b = nodes
    alice_a, alice_b, bob_a = (
        await on(node_a, alice),
        await on(node_b, alice),
        await on(node_a, bob),
    )
    socks = [await alice_a.connect(), await alice_b.connect(), await alice_b.connect()]
    try:
        async with await bob_a.connect() as b:
            chat = await b.request("create_chat", type="private", user_ids=[alice.user_uuid])
            sent = [
                await b.request("send_message", chat_id=chat["id"], text=f"{n}") for n in range(5)
            ]
            for sock in socks:
                got = [
                    e["data"]["id"] for e in await quiet(sock, 0.5) if e["action"] == "new_message"
                ]
                assert got == [m["id"] for m in sent]
    finally:
        for sock in socks:
            await sock.close()


async def test_workers_share_events_through_redis(
    database_url: str, redis_url: str, tmp_path: Path, alice: Api, bob: Api
) -> None:
    server = start_server(database_url, tmp_path, CHATD_REDIS_URL=redis_url, CHATD_WORKERS="2")
    try:
        alice_w, bob_w = await on(server, alice), await on(server, bob)
        # Several sockets each, so both workers hold some (the kernel spreads connections).
        alice_socks = [await alice_w.connect() for _ in range(6)]
        bob_socks = [await bob_w.connect() for _ in range(6)]
        try:
            chat = await alice_socks[0].request(
                "create_chat", type="private", user_ids=[bob.user_uuid]
            )
            message = await alice_socks[0].request("send_message", chat_id=chat["id"], text="hi")
            for sock in alice_socks + bob_socks:
                events = [e for e in await quiet(sock, 0.2) if e["action"] == "new_message"]
                assert [e["data"]["id"] for e in events] == [message["id"]]
        finally:
            for sock in alice_socks + bob_socks:
                await sock.close()
        pids = {
            line.split("[")[1].split("]")[0]
            for line in server.log().splitlines()
            if "Started server process" in line
        }
        assert len(pids) == 2, server.log()
    finally:
        stop_server(server)


def test_workers_without_redis_refuse_to_start(database_url: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatd", "serve", "--workers", "2"],
        env={
            **os.environ,
            "CHATD_DATABASE_URL": database_url,
            "CHATD_SECRET": TEST_SECRET,
            "CHATD_DATA_DIR": str(tmp_path),
            "CHATD_REDIS_URL": "",
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "CHATD_REDIS_URL" in result.stderr


async def test_a_lost_redis_subscription_closes_sockets_so_clients_resync(
    nodes: tuple[Server, Server], redis_url: str, alice: Api, bob: Api
) -> None:
    node_a, node_b = nodes
    alice_a, bob_b = await on(node_a, alice), await on(node_b, bob)
    async with await alice_a.connect() as a:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        b = await bob_b.connect()
        client = redis.Redis.from_url(redis_url)
        try:
            await client.client_kill_filter(_type="pubsub")
        finally:
            await client.aclose()
        # Told to reconnect rather than left with a stream that silently misses events.
        assert await b.wait_closed() == 1012
        assert await a.wait_closed() == 1012

        async def connect_when_ready(api: Api) -> Socket:
            for _ in range(50):
                sock = await api.connect()
                if sock.ws.close_code is None:
                    return sock
                await asyncio.sleep(0.1)
            raise AssertionError("node did not recover")

        a, b = await connect_when_ready(alice_a), await connect_when_ready(bob_b)
        try:
            message = await a.request("send_message", chat_id=chat["id"], text="after the blip")
            assert (await b.next_event("new_message"))["data"] == message
        finally:
            await b.close()
            await a.close()


async def test_a_malformed_redis_message_is_ignored(
    nodes: tuple[Server, Server], redis_url: str, alice: Api, bob: Api
) -> None:
    node_a, node_b = nodes
    alice_a, bob_b = await on(node_a, alice), await on(node_b, bob)
    async with await alice_a.connect() as a, await bob_b.connect() as b:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        await b.next_event("chat_created")
        client = redis.Redis.from_url(redis_url)
        try:  # garbage on Bob's channel: someone else's publisher, or an older chatd
            await client.publish(f"chatd:user:{bob.user_uuid}", b"\xff not an envelope")
        finally:
            await client.aclose()
        message = await a.request("send_message", chat_id=chat["id"], text="still here")
        assert (await b.next_event("new_message"))["data"] == message
        assert b.ws.close_code is None


async def test_a_node_with_redis_is_ready(nodes: tuple[Server, Server]) -> None:
    async with httpx.AsyncClient(base_url=nodes[0].base_url) as http:
        response = await http.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "database": "ok", "redis": "ok"}
