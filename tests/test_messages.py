"""send_message: fan-out, validation, idempotent retries and gapless per-chat seq."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from chatd.client import Api, ChatdError, Socket


async def group(sock: Socket, *members: Api, name: str = "g") -> dict:
    return await sock.request(
        "create_chat", type="group", name=name, user_ids=[m.user_uuid for m in members]
    )


async def test_message_reaches_every_socket_sender_included(alice: Api, bob: Api) -> None:
    a1, a2, b1, b2 = [await api.connect() for api in (alice, alice, bob, bob)]
    try:
        chat = await group(a1, bob)
        message = await a1.request("send_message", chat_id=chat["id"], text="  hello  ")
        assert set(message) == {
            "id",
            "chat_id",
            "seq",
            "sender_uuid",
            "text",
            "timestamp",
            "read_status",
            "client_msg_id",
            "edited_at",
            "deleted",
            "reply_to",
            "mentions",
            "forwarded_from",
            "reactions",
            "version",
            "attachments",
        }
        assert message["text"] == "hello"
        assert message["seq"] == 1
        assert message["chat_id"] == chat["id"]
        assert message["sender_uuid"] == alice.user_uuid
        assert message["read_status"] == "unread"
        assert message["client_msg_id"] is None
        assert message["timestamp"].endswith("Z")
        for sock in (a1, a2, b1, b2):
            event = await sock.next_event("new_message")
            assert event == {"action": "new_message", "data": message}
    finally:
        for sock in (a1, a2, b1, b2):
            await sock.close()


async def test_message_is_committed_before_it_is_delivered(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        await a.request("send_message", chat_id=chat["id"], text="persisted?")
        event = await b.next_event("new_message")
        history = await bob.history(chat["id"])
        assert event["data"]["id"] in [m["id"] for m in history["messages"]]


async def test_outsiders_cannot_send_or_learn_the_chat_exists(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with await alice.connect() as a, await carol.connect() as c:
        chat = await group(a, bob)
        for chat_id in (chat["id"], 2**62):
            with pytest.raises(ChatdError) as error:
                await c.request("send_message", chat_id=chat_id, text="let me in")
            assert error.value.code == "not_found"
        messages = await alice.history(chat["id"])
        assert messages["messages"] == []


# The invisible: zero-width space, ZWJ + bidi marks, word joiner, Hangul filler, braille
# blank, a variation selector, a tag character, ideographic space and line separator.
INVISIBLE_TEXTS = [
    "\u200b",
    "\u200d\u200e\u200f\u202e\u2066",
    " \u2060\t",
    "\u3164",
    "\u2800\u2800",
    "\ufe0f",
    "\U000e0041",
    "\u3000\u2028\u00ad",
]


@pytest.mark.parametrize("text", ["", "   \n\t ", "x" * 4097, "bad\x00byte", *INVISIBLE_TEXTS])
async def test_bad_text_is_invalid_and_changes_nothing(alice: Api, text: str) -> None:
    async with await alice.connect() as a:
        chat = await group(a)
        with pytest.raises(ChatdError) as error:
            await a.request("send_message", chat_id=chat["id"], text=text)
        assert error.value.code == "invalid"
        ok = await a.request("send_message", chat_id=chat["id"], text="x" * 4096)
        assert ok["seq"] == 1  # the failed send consumed no seq


async def test_invisible_characters_in_visible_text_are_kept(alice: Api) -> None:
    async with await alice.connect() as a:
        chat = await group(a)
        for text in ("👩\u200d💻", "\u200bx", "\u2800 ⠁", "\u3164ㅎ", "\u06dd"):  # ۝ is drawn
            sent = await a.request("send_message", chat_id=chat["id"], text=text)
            assert sent["text"] == text


async def test_unicode_text_round_trips(alice: Api) -> None:
    text = "héllo \u202eRTL\u202c 👋🏽 中文 \u200d"
    async with await alice.connect() as a:
        chat = await group(a)
        sent = await a.request("send_message", chat_id=chat["id"], text=text)
        assert sent["text"] == text.strip()
        assert (await alice.history(chat["id"]))["messages"][0]["text"] == text.strip()


async def test_same_client_msg_id_never_creates_a_second_message(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        first = await a.request(
            "send_message", chat_id=chat["id"], text="once", client_msg_id="c-1"
        )
        assert first["client_msg_id"] == "c-1"
        retry = await a.request(
            "send_message", chat_id=chat["id"], text="once", client_msg_id="c-1"
        )
        assert retry == first
        await b.next_event("new_message")
        await asyncio.sleep(0.2)
        assert [e for e in b.pending_events() if e["action"] == "new_message"] == []
        assert len((await bob.history(chat["id"]))["messages"]) == 1


async def test_concurrent_retries_create_one_message(alice: Api) -> None:
    sockets = [await alice.connect() for _ in range(4)]
    try:
        chat = await group(sockets[0])
        results = await asyncio.gather(
            *[
                s.request("send_message", chat_id=chat["id"], text="dup?", client_msg_id="same")
                for s in sockets
                for _ in range(5)
            ]
        )
        assert len({m["id"] for m in results}) == 1
        history = await alice.history(chat["id"])
        assert [m["seq"] for m in history["messages"]] == [1]
    finally:
        for s in sockets:
            await s.close()


async def test_a_removed_sender_retrying_learns_nothing(alice: Api, bob: Api) -> None:
    """A retry after removal answers as for a chat that does not exist, not the original."""
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        await b.request("send_message", chat_id=chat["id"], text="mine", client_msg_id="c-1")
        await a.request("remove_member", chat_id=chat["id"], user_uuid=bob.user_uuid)
        with pytest.raises(ChatdError) as retry:
            await b.request("send_message", chat_id=chat["id"], text="mine", client_msg_id="c-1")
        with pytest.raises(ChatdError) as nowhere:
            await b.request("send_message", chat_id=2**62, text="mine", client_msg_id="c-9")
        assert (retry.value.code, retry.value.message) == ("not_found", nowhere.value.message)
        assert len((await alice.history(chat["id"]))["messages"]) == 1


async def test_client_msg_id_is_per_sender(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        m1 = await a.request("send_message", chat_id=chat["id"], text="a", client_msg_id="k")
        m2 = await b.request("send_message", chat_id=chat["id"], text="b", client_msg_id="k")
        assert m1["id"] != m2["id"]


async def test_client_msg_id_reused_in_another_chat_is_invalid(alice: Api) -> None:
    async with await alice.connect() as a:
        one, two = await group(a, name="one"), await group(a, name="two")
        await a.request("send_message", chat_id=one["id"], text="a", client_msg_id="k")
        with pytest.raises(ChatdError) as error:
            await a.request("send_message", chat_id=two["id"], text="a", client_msg_id="k")
        assert error.value.code == "invalid"


async def test_seq_is_gapless_under_concurrent_senders(make_user) -> None:
    users = [await make_user(f"S{i}") for i in range(5)]
    sockets = [await u.connect() for u in users]
    try:
        chat = await group(sockets[0], *users[1:])
        for s in sockets:
            await s.next_event("chat_created")

        async def burst(sock: Socket, who: int) -> list[dict]:
            return await asyncio.gather(
                *[
                    sock.request("send_message", chat_id=chat["id"], text=f"{who}-{n}")
                    for n in range(20)
                ]
            )

        acks = [
            m
            for batch in await asyncio.gather(*[burst(s, i) for i, s in enumerate(sockets)])
            for m in batch
        ]
        assert sorted(m["seq"] for m in acks) == list(range(1, 101))
        # Everyone saw all 100, each once; per sender in the order it sent them.
        for sock in sockets:
            received = [(await sock.next_event("new_message"))["data"] for _ in range(100)]
            assert sorted(m["seq"] for m in received) == list(range(1, 101))
        history = await users[0].history(chat["id"], page_size=200)
        assert [m["seq"] for m in history["messages"]] == list(range(1, 101))
        # id order agrees with seq order inside a chat.
        ids = [m["id"] for m in history["messages"]]
        assert ids == sorted(ids)
    finally:
        for s in sockets:
            await s.close()


async def test_one_socket_keeps_its_own_send_order(alice: Api) -> None:
    async with await alice.connect() as a:
        chat = await group(a)
        for n in range(30):
            await a.send({"action": "send_message", "chat_id": chat["id"], "text": str(n)})
        received = [(await a.next_event("new_message"))["data"] for _ in range(30)]
        assert [m["text"] for m in received] == [str(n) for n in range(30)]
        assert [m["seq"] for m in received] == list(range(1, 31))


async def test_events_without_request_id_get_no_ack(alice: Api) -> None:
    async with await alice.connect() as a:
        chat = await group(a)
        await a.send({"action": "send_message", "chat_id": chat["id"], "text": "quiet"})
        await a.next_event("new_message")
        await asyncio.sleep(0.2)
        assert [e for e in a.pending_events() if e["action"] == "ack"] == []


async def test_client_msg_id_limits(alice: Api) -> None:
    async with await alice.connect() as a:
        chat = await group(a)
        for bad in ("", "x" * 65):
            with pytest.raises(ChatdError) as error:
                await a.request("send_message", chat_id=chat["id"], text="t", client_msg_id=bad)
            assert error.value.code == "invalid"
        ok = await a.request(
            "send_message", chat_id=chat["id"], text="t", client_msg_id=str(uuid.uuid4())
        )
        assert ok["seq"] == 1


async def test_sends_stored_together_keep_their_own_outcomes(
    alice: Api, bob: Api, carol: Api
) -> None:
    """Concurrent sends are committed in batches; each still gets its own answer."""
    async with await alice.connect() as a, await bob.connect() as b, await carol.connect() as c:
        ours = await group(a, bob, name="ours")
        other = await group(a, carol, name="other")
        await b.next_event("chat_created")
        results = await asyncio.gather(
            a.request("send_message", chat_id=ours["id"], text="1", client_msg_id="x"),
            c.request("send_message", chat_id=ours["id"], text="intruder"),  # not a member
            b.request("send_message", chat_id=ours["id"], text="2"),
            a.request("send_message", chat_id=other["id"], text="3", client_msg_id="x"),  # reused
            a.request("send_message", chat_id=ours["id"], text="1", client_msg_id="x"),  # retry
            c.request("send_message", chat_id=other["id"], text="4"),
            return_exceptions=True,
        )
        first, intruder, second, reused, retry, fourth = results
        assert isinstance(intruder, ChatdError) and intruder.code == "not_found"
        assert isinstance(reused, ChatdError) and reused.code == "invalid"
        assert (retry["id"], retry["seq"], retry["text"]) == (first["id"], first["seq"], "1")
        assert sorted([first["seq"], second["seq"]]) == [1, 2]
        assert fourth["seq"] == 1 and fourth["chat_id"] == other["id"]
        ours_history = (await alice.history(ours["id"]))["messages"]
        assert sorted(m["text"] for m in ours_history) == ["1", "2"]
        assert [m["text"] for m in (await alice.history(other["id"]))["messages"]] == ["4"]
        # Bob got each of the two messages of his chat once.
        await asyncio.sleep(0.2)
        got = [e["data"]["text"] for e in b.pending_events() if e["action"] == "new_message"]
        assert sorted(got) == ["1", "2"]


async def test_many_chats_at_once_stay_gapless(make_user) -> None:
    users = [await make_user(f"M{i}") for i in range(4)]
    sockets = [await u.connect() for u in users]
    try:
        chats = [await group(sockets[0], *users[1:], name=f"c{i}") for i in range(5)]
        sends = [
            sock.request("send_message", chat_id=chat["id"], text=f"{n}")
            for chat in chats
            for sock in sockets
            for n in range(10)
        ]
        acks = await asyncio.gather(*sends)
        for chat in chats:
            seqs = sorted(m["seq"] for m in acks if m["chat_id"] == chat["id"])
            assert seqs == list(range(1, 41))
            history = (await users[1].history(chat["id"], page_size=200))["messages"]
            assert [m["seq"] for m in history] == list(range(1, 41))
            view = await users[1].chat(chat["id"])
            mine = users[1].user_uuid
            assert view["read_seq"] == max(m["seq"] for m in history if m["sender_uuid"] == mine)
            assert view["unread_count"] == sum(
                1 for m in history if m["seq"] > view["read_seq"] and m["sender_uuid"] != mine
            )
    finally:
        for s in sockets:
            await s.close()
