"""typing: forwarded to the other members' sockets, never stored, one per 2 s per chat."""

from __future__ import annotations

import asyncio

import pytest

from chatd.client import Api, ChatdError, Socket


async def typing_events(sock: Socket, wait: float = 0.3) -> list[dict]:
    await asyncio.sleep(wait)
    return [e for e in sock.pending_events() if e["action"] == "typing"]


async def test_typing_reaches_every_socket_of_the_other_members(
    alice: Api, bob: Api, carol: Api
) -> None:
    a1, a2 = await alice.connect(), await alice.connect()
    b1, b2, c = await bob.connect(), await bob.connect(), await carol.connect()
    try:
        chat = await a1.request(
            "create_chat", type="group", name="t", user_ids=[bob.user_uuid, carol.user_uuid]
        )
        assert await a1.request("typing", chat_id=chat["id"]) is None
        expected = {
            "action": "typing",
            "data": {"chat_id": chat["id"], "user_uuid": alice.user_uuid},
        }
        for sock in (b1, b2, c):
            assert await sock.next_event("typing") == expected
        assert await typing_events(a1) == [] and await typing_events(a2) == []
        # Never stored.
        assert (await bob.history(chat["id"]))["messages"] == []
    finally:
        for s in (a1, a2, b1, b2, c):
            await s.close()


async def test_typing_is_throttled_per_user_and_chat(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a, await alice.connect() as a2, await bob.connect() as b:
        one = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        two = await a.request("create_chat", type="group", name="t2", user_ids=[bob.user_uuid])
        for _ in range(5):  # a burst from one socket
            await a.request("typing", chat_id=one["id"])
        await a2.send({"action": "typing", "chat_id": one["id"]})  # and from another socket
        await a.request("typing", chat_id=two["id"])  # another chat has its own allowance
        events = await typing_events(b)
        assert sorted(e["data"]["chat_id"] for e in events) == [one["id"], two["id"]]

        await asyncio.sleep(2.0)  # the interval has passed
        await a.request("typing", chat_id=one["id"])
        assert [e["data"]["chat_id"] for e in await typing_events(b)] == [one["id"]]


async def test_typing_in_a_chat_you_are_not_in_is_not_found(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with await alice.connect() as a, await carol.connect() as c, await bob.connect() as b:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        for _ in range(2):  # refused every time, not just until a throttle kicks in
            with pytest.raises(ChatdError) as caught:
                await c.request("typing", chat_id=chat["id"])
            assert caught.value.code == "not_found"
        assert await typing_events(b) == []
        assert await typing_events(a) == []
