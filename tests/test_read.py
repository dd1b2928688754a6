"""mark_read: read pointers, the ack, and exactly when message_read fires."""

from __future__ import annotations

import asyncio

import pytest

from chatd.client import Api, ChatdError, Socket


async def quiet(sock: Socket, action: str, wait: float = 0.3) -> list[dict]:
    """The `action` events that arrived within `wait` seconds."""
    await asyncio.sleep(wait)
    return [e for e in sock.pending_events() if e["action"] == action]


async def test_message_read_fires_when_the_last_other_member_reads(
    alice: Api, bob: Api, carol: Api
) -> None:
    a, b, c = await alice.connect(), await bob.connect(), await carol.connect()
    try:
        chat = await a.request(
            "create_chat", type="group", name="trio", user_ids=[bob.user_uuid, carol.user_uuid]
        )
        m = await a.request("send_message", chat_id=chat["id"], text="read me")

        ack = await b.request("mark_read", message_ids=[m["id"]])
        assert ack == {"read_upto": {str(chat["id"]): m["id"]}}
        assert await quiet(a, "message_read") == []  # Carol has not read it yet
        assert (await alice.history(chat["id"]))["messages"][0]["read_status"] == "unread"

        await c.request("mark_read", message_ids=[m["id"]])
        event = await a.next_event("message_read")
        assert event == {
            "action": "message_read",
            "data": {"message_id": m["id"], "chat_id": chat["id"]},
        }
        assert (await alice.history(chat["id"]))["messages"][0]["read_status"] == "read"

        # Once per message: reading again changes nothing and says nothing.
        await b.request("mark_read", message_ids=[m["id"]])
        await c.request("mark_read", message_ids=[m["id"]])
        assert await quiet(a, "message_read") == []
        # Readers are not told about receipts of messages they did not send.
        assert await quiet(b, "message_read") == []
        assert await quiet(c, "message_read") == []
    finally:
        for s in (a, b, c):
            await s.close()


async def test_pointer_covers_everything_before_it_and_never_moves_back(
    alice: Api, bob: Api
) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        sent = [await a.request("send_message", chat_id=chat["id"], text=f"{n}") for n in range(5)]

        ack = await b.request("mark_read", message_ids=[sent[3]["id"]])
        assert ack["read_upto"] == {str(chat["id"]): sent[3]["id"]}
        receipts = [(await a.next_event("message_read"))["data"]["message_id"] for _ in range(4)]
        assert receipts == [m["id"] for m in sent[:4]]

        ack = await b.request("mark_read", message_ids=[sent[1]["id"]])
        assert ack["read_upto"] == {str(chat["id"]): sent[3]["id"]}  # not backwards
        statuses = [m["read_status"] for m in (await bob.history(chat["id"]))["messages"]]
        assert statuses == ["read"] * 4 + ["unread"]


async def test_mark_read_spans_several_chats(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        one = await a.request("create_chat", type="group", name="one", user_ids=[bob.user_uuid])
        two = await a.request("create_chat", type="group", name="two", user_ids=[bob.user_uuid])
        m1 = await a.request("send_message", chat_id=one["id"], text="1")
        m2 = await a.request("send_message", chat_id=two["id"], text="2")
        ack = await b.request("mark_read", message_ids=[m1["id"], m2["id"]])
        assert ack["read_upto"] == {str(one["id"]): m1["id"], str(two["id"]): m2["id"]}


async def test_unknown_or_foreign_ids_apply_nothing(alice: Api, bob: Api, carol: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b, await carol.connect() as c:
        ours = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        theirs = await c.request("create_chat", type="private", user_ids=[alice.user_uuid])
        mine = await a.request("send_message", chat_id=ours["id"], text="for bob")
        foreign = await c.request("send_message", chat_id=theirs["id"], text="not for bob")
        for ids in ([mine["id"], foreign["id"]], [mine["id"], 2**62]):
            with pytest.raises(ChatdError) as error:
                await b.request("mark_read", message_ids=ids)
            assert error.value.code == "not_found"
        assert await quiet(a, "message_read") == []
        assert (await bob.history(ours["id"]))["messages"][0]["read_status"] == "unread"


async def test_sending_moves_the_senders_own_pointer(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        from_alice = await a.request("send_message", chat_id=chat["id"], text="question?")
        # Bob answering means Bob has read everything before his answer.
        await b.request("send_message", chat_id=chat["id"], text="answer")
        event = await a.next_event("message_read")
        assert event["data"]["message_id"] == from_alice["id"]
    # And Bob's answer does not come back to him as unread.
    async with await bob.connect() as b2:
        assert b2.unread["data"] == []


async def test_answers_move_the_watermark_only_once_every_member_has_answered(
    alice: Api, bob: Api, carol: Api
) -> None:
    a, b, c = await alice.connect(), await bob.connect(), await carol.connect()
    try:
        chat = await a.request(
            "create_chat", type="group", name="q", user_ids=[bob.user_uuid, carol.user_uuid]
        )
        question = await a.request("send_message", chat_id=chat["id"], text="who is in?")
        await b.request("send_message", chat_id=chat["id"], text="me")
        assert await quiet(a, "message_read") == []  # Carol has not read the question yet
        # Carol and Bob answer at once, in one batch or in two: Carol's answer is what
        # makes the question read by all. Bob's first answer stays unread by Alice.
        await asyncio.gather(
            c.request("send_message", chat_id=chat["id"], text="me too"),
            b.request("send_message", chat_id=chat["id"], text="and again"),
        )
        assert (await a.next_event("message_read"))["data"]["message_id"] == question["id"]
        assert await quiet(a, "message_read") == []
        assert await quiet(b, "message_read", wait=0) == []
        statuses = [m["read_status"] for m in (await alice.history(chat["id"]))["messages"]]
        assert statuses == ["read", "unread", "unread", "unread"]
    finally:
        for s in (a, b, c):
            await s.close()


async def test_receipts_are_exact_under_concurrent_readers(make_user) -> None:
    users = [await make_user(f"R{i}") for i in range(6)]
    sockets = [await u.connect() for u in users]
    try:
        chat = await sockets[0].request(
            "create_chat", type="group", name="r", user_ids=[u.user_uuid for u in users[1:]]
        )
        sent = [
            await sockets[0].request("send_message", chat_id=chat["id"], text=str(n))
            for n in range(10)
        ]
        # Every reader marks every message, in a scrambled concurrent storm.
        await asyncio.gather(
            *[
                s.request("mark_read", message_ids=[m["id"]])
                for m in reversed(sent)
                for s in sockets[1:]
            ]
        )
        receipts = [(await sockets[0].next_event("message_read"))["data"] for _ in range(10)]
        assert sorted(r["message_id"] for r in receipts) == [m["id"] for m in sent]
        assert await quiet(sockets[0], "message_read") == []
    finally:
        for s in sockets:
            await s.close()
