"""Presence: online while a socket is open anywhere, offline after a grace, shown only to
those who share a chat, pushed to small chats and pulled in big ones."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatd.client import Api, ChatdError, Socket
from chatd.presence import GRACE
from tests.conftest import Server, start_server, stop_server


def presence_events(sock: Socket, user: Api) -> list[dict]:
    return [
        e["data"]
        for e in sock.pending_events()
        if e["action"] == "presence" and e["data"]["user_uuid"] == user.user_uuid
    ]


async def wait_presence(sock: Socket, user: Api, status: str, timeout: float) -> dict:
    while True:
        event = await sock.next_event("presence", timeout=timeout)
        if event["data"]["user_uuid"] == user.user_uuid and event["data"]["status"] == status:
            return event["data"]


async def test_online_offline_after_the_grace_and_last_seen(alice: Api, bob: Api) -> None:
    async with await bob.connect() as b:
        await b.request("create_chat", type="private", user_ids=[alice.user_uuid])
        a = await alice.connect()
        online = await wait_presence(b, alice, "online", 5)
        assert online["last_seen"] is None  # while online
        (me,) = (await b.request("get_presence", user_ids=[alice.user_uuid]))["presence"]
        assert me["status"] == "online"
        # A reconnect within the grace makes no event at all.
        await a.close()
        a = await alice.connect()
        await asyncio.sleep(GRACE + 1)
        assert presence_events(b, alice) == []
        await a.close()
        offline = await wait_presence(b, alice, "offline", GRACE + 5)
        assert offline["last_seen"] is not None
        assert presence_events(b, alice) == []  # once
        profile = await bob.call("GET", f"/users/{alice.user_uuid}")
        assert profile["presence"] == offline and profile["name"] == "Alice"
        chats = await bob.chats()
        (entry,) = chats["chats"]
        assert entry["presence"] == offline


async def test_presence_is_only_for_those_who_share_a_chat(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with await alice.connect() as a, await carol.connect() as c:
        # Carol shares nothing with Alice: left out, and no events.
        answer = await c.request("get_presence", user_ids=[alice.user_uuid, carol.user_uuid])
        assert [p["user_uuid"] for p in answer["presence"]] == [carol.user_uuid]
        assert (await carol.call("GET", f"/users/{alice.user_uuid}"))["presence"] is None
        with pytest.raises(ChatdError) as exc:
            await carol.call("GET", "/users/00000000-0000-4000-8000-000000000000")
        assert exc.value.status == 404
        with pytest.raises(ChatdError) as exc:
            await c.request("get_presence", user_ids=["not-a-uuid"])
        assert exc.value.code == "invalid"
        b = await bob.connect()
        await asyncio.sleep(0.5)
        assert presence_events(c, bob) == [] and presence_events(a, bob) == []
        await b.close()


async def test_hidden_presence(alice: Api, bob: Api) -> None:
    async with await bob.connect() as b:
        await b.request("create_chat", type="private", user_ids=[alice.user_uuid])
        async with await alice.connect():
            await wait_presence(b, alice, "online", 5)
            me = await alice.update_me(share_presence=False)
            assert me["share_presence"] is False
            hidden = await wait_presence(b, alice, "offline", 5)
            assert hidden["last_seen"] is None
            (seen,) = (await b.request("get_presence", user_ids=[alice.user_uuid]))["presence"]
            assert seen == {"user_uuid": alice.user_uuid, "status": "offline", "last_seen": None}
            await alice.update_me(share_presence=True)
            await wait_presence(b, alice, "online", 5)


async def test_small_groups_are_told(make_user) -> None:  # type: ignore[no-untyped-def]
    """A group within CHATD_PRESENCE_GROUP_LIMIT (100 here) hears its members' presence."""
    alice, bob, carol = [await make_user(n) for n in ("Alice", "Bob", "Carol")]
    async with await bob.connect() as b:
        await b.request(
            "create_chat", type="group", name="g", user_ids=[alice.user_uuid, carol.user_uuid]
        )
        async with await alice.connect():
            await wait_presence(b, alice, "online", 5)


@pytest.fixture(scope="module")
def small_limit_server(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    srv = start_server(
        database_url, Path(tmp_path_factory.mktemp("presence")), CHATD_PRESENCE_GROUP_LIMIT="2"
    )
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log()


async def test_groups_over_the_limit_are_not_told(small_limit_server: Server) -> None:
    from tests.conftest import new_user

    alice, bob, carol = [await new_user(small_limit_server, n) for n in ("Alice", "Bob", "Carol")]
    try:
        async with await bob.connect() as b:
            await b.request(
                "create_chat", type="group", name="g", user_ids=[alice.user_uuid, carol.user_uuid]
            )
            async with await alice.connect():
                await asyncio.sleep(1)
                assert presence_events(b, alice) == []
                # Pulled instead.
                (p,) = (await b.request("get_presence", user_ids=[alice.user_uuid]))["presence"]
                assert p["status"] == "online"
                # A private chat is always told.
                await b.request("create_chat", type="private", user_ids=[alice.user_uuid])
            await wait_presence(b, alice, "offline", GRACE + 5)
    finally:
        for api in (alice, bob, carol):
            await api.aclose()


async def test_a_reconnect_storm_makes_one_event_per_user(make_user) -> None:  # type: ignore[no-untyped-def]
    """50 users with 4 sockets each drop every socket and reconnect: their watcher hears
    nothing (the grace); then they all leave: one offline event per user."""
    watcher = await make_user("Watcher")
    users = [await make_user(f"U{i}") for i in range(50)]
    async with await watcher.connect() as w:
        for user in users:
            await w.request("create_chat", type="private", user_ids=[user.user_uuid])
        socks = [
            s for user in users for s in await asyncio.gather(*(user.connect() for _ in range(4)))
        ]
        await asyncio.sleep(1)
        w.pending_events()  # the online events
        for _ in range(3):  # flaps
            await asyncio.gather(*(s.abort() for s in socks))
            socks = [
                s
                for user in users
                for s in await asyncio.gather(*(user.connect() for _ in range(4)))
            ]
        await asyncio.sleep(GRACE + 1)
        assert [e for e in w.pending_events() if e["action"] == "presence"] == []
        await asyncio.gather(*(s.close() for s in socks))
        await asyncio.sleep(GRACE + 2)
        events = [e for e in w.pending_events() if e["action"] == "presence"]
        assert sorted(e["data"]["user_uuid"] for e in events) == sorted(u.user_uuid for u in users)
        assert {e["data"]["status"] for e in events} == {"offline"}
