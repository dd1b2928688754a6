"""create_chat: private and group chats, and chat_created to every socket of every member."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from chatd.client import Api, ChatdError


async def test_group_chat_reaches_every_socket_of_every_member(
    alice: Api, bob: Api, carol: Api
) -> None:
    a, b1, b2, c = [await api.connect() for api in (alice, bob, bob, carol)]
    try:
        chat = await a.request(
            "create_chat", type="group", name="  Team  ", user_ids=[bob.user_uuid, carol.user_uuid]
        )
        assert chat["type"] == "group"
        assert chat["name"] == "Team"
        assert chat["created_at"].endswith("Z")
        assert {m["user_uuid"] for m in chat["members"]} == {
            alice.user_uuid,
            bob.user_uuid,
            carol.user_uuid,
        }
        assert {m["name"] for m in chat["members"]} == {"Alice", "Bob", "Carol"}
        for sock in (a, b1, b2, c):
            event = await sock.next_event("chat_created")
            assert event["data"] == chat
    finally:
        for sock in (a, b1, b2, c):
            await sock.close()


async def test_group_of_one_is_allowed(alice: Api) -> None:
    async with await alice.connect() as sock:
        chat = await sock.request("create_chat", type="group", name="notes", user_ids=[])
        assert [m["user_uuid"] for m in chat["members"]] == [alice.user_uuid]


async def test_duplicate_and_self_ids_are_ignored(alice: Api, bob: Api) -> None:
    async with await alice.connect() as sock:
        chat = await sock.request(
            "create_chat",
            type="group",
            name="g",
            user_ids=[bob.user_uuid, bob.user_uuid.upper(), alice.user_uuid],
        )
        assert len(chat["members"]) == 2


async def test_private_chat_is_unique_per_pair(alice: Api, bob: Api) -> None:
    a, b = await alice.connect(), await bob.connect()
    try:
        first = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        assert first["type"] == "private"
        assert first["name"] is None
        assert (await b.next_event("chat_created"))["data"]["id"] == first["id"]
        again = await b.request("create_chat", type="private", user_ids=[alice.user_uuid])
        assert again == first
        # Nothing new was created, so nobody hears about it again.
        await asyncio.sleep(0.2)
        assert [e for e in a.pending_events() if e["action"] == "chat_created"] == [
            {"action": "chat_created", "data": first}
        ]
    finally:
        await a.close()
        await b.close()


async def test_concurrent_private_creates_make_one_chat(make_user) -> None:
    x, y = await make_user("X"), await make_user("Y")
    sx, sy = await x.connect(), await y.connect()
    try:
        results = await asyncio.gather(
            *[sx.request("create_chat", type="private", user_ids=[y.user_uuid]) for _ in range(5)],
            *[sy.request("create_chat", type="private", user_ids=[x.user_uuid]) for _ in range(5)],
        )
        assert len({chat["id"] for chat in results}) == 1
    finally:
        await sx.close()
        await sy.close()


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"type": "private", "user_ids": []}, "invalid"),
        ({"type": "private", "user_ids": ["SELF"]}, "invalid"),
        ({"type": "private", "user_ids": ["BOB", "CAROL"]}, "invalid"),
        ({"type": "group", "user_ids": ["BOB"]}, "invalid"),
        ({"type": "group", "name": "", "user_ids": ["BOB"]}, "invalid"),
        ({"type": "group", "name": "\u200b\u200d", "user_ids": ["BOB"]}, "invalid"),
        ({"type": "group", "name": " \u3164 ", "user_ids": ["BOB"]}, "invalid"),
        ({"type": "group", "name": "x" * 101, "user_ids": ["BOB"]}, "invalid"),
        ({"type": "group", "name": "ok", "user_ids": ["not-a-uuid"]}, "invalid"),
        ({"type": "group", "name": "ok", "user_ids": ["UNKNOWN"]}, "not_found"),
        ({"type": "private", "user_ids": ["UNKNOWN"]}, "not_found"),
    ],
)
async def test_create_chat_rejects_bad_requests(
    alice: Api, bob: Api, carol: Api, fields: dict, code: str
) -> None:
    names = {
        "SELF": alice.user_uuid,
        "BOB": bob.user_uuid,
        "CAROL": carol.user_uuid,
        "UNKNOWN": str(uuid.uuid4()),
    }
    fields = {**fields, "user_ids": [names.get(u, u) for u in fields["user_ids"]]}
    async with await alice.connect() as a, await bob.connect() as b:
        with pytest.raises(ChatdError) as error:
            await a.request("create_chat", **fields)
        assert error.value.code == code
        # Nothing was created: Bob hears nothing.
        await asyncio.sleep(0.1)
        assert b.pending_events() == []
