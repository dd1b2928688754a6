"""Messages that change: edit, delete, reply, react, mention, forward, pin, and the chat
version that numbers every change (sync replays them: tests/test_sync_changes.py)."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

import pytest

from chatd.client import Api, ChatdError, Socket
from tests.conftest import UserFactory


async def group(sock: Socket, *members: Api, name: str = "g") -> dict[str, Any]:
    return await sock.request(
        "create_chat", type="group", name=name, user_ids=[m.user_uuid for m in members]
    )


async def error_code(sock: Socket, action: str, **fields: Any) -> str:
    with pytest.raises(ChatdError) as error:
        await sock.request(action, **fields)
    return error.value.code


async def rest_error(api: Api, method: str, path: str, **kwargs: Any) -> tuple[int, str]:
    with pytest.raises(ChatdError) as error:
        await api.call(method, path, **kwargs)
    return error.value.status or 0, error.value.code


def drained(sock: Socket, action: str) -> list[dict[str, Any]]:
    return [e for e in sock.pending_events() if e["action"] == action]


# --- new messages carry the new fields --------------------------------------------------------


async def test_new_messages_carry_defaults_and_count_the_chat_version(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a:
        chat = await group(a, bob)
        assert chat["version"] == 0 and chat["pinned_message_id"] is None
        first = await a.request("send_message", chat_id=chat["id"], text="one")
        second = await a.request("send_message", chat_id=chat["id"], text="two")
    assert {k: first[k] for k in ("edited_at", "deleted", "reply_to", "mentions")} == {
        "edited_at": None,
        "deleted": False,
        "reply_to": None,
        "mentions": [],
    }
    assert first["forwarded_from"] is None and first["reactions"] == []
    assert (first["version"], second["version"]) == (1, 2)
    assert (await bob.chat(chat["id"]))["version"] == 2


# --- edit_message ----------------------------------------------------------------------------


async def test_edit_changes_the_text_for_everyone_and_keeps_the_old_one(
    alice: Api, bob: Api
) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        sent = await a.request("send_message", chat_id=chat["id"], text="helo")
        await b.next_event("new_message")
        edited = await a.request("edit_message", message_id=sent["id"], text="  hello ")
        assert edited["text"] == "hello"
        assert edited["edited_at"] is not None and edited["edited_at"].endswith("Z")
        assert edited["version"] == sent["version"] + 1
        assert edited["seq"] == sent["seq"] and edited["id"] == sent["id"]
        for sock in (a, b):
            event = await sock.next_event("message_updated")
            assert event["data"] == edited

        again = await a.request("edit_message", message_id=sent["id"], text="hello")
        assert again == edited  # the same text: no change, no version, no event
        await asyncio.sleep(0.2)
        assert drained(b, "message_updated") == []

        await a.request("edit_message", message_id=sent["id"], text="hello!")
        edits = await bob.call("GET", f"/messages/{sent['id']}/edits")
        assert [e["text"] for e in edits["edits"]] == ["helo", "hello"]
        assert edits["edits"][0]["timestamp"] == sent["timestamp"]
        assert edits["edits"][1]["timestamp"] == edited["edited_at"]


async def test_only_the_sender_edits_and_not_a_deleted_message(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        sent = await a.request("send_message", chat_id=chat["id"], text="mine")
        assert await error_code(b, "edit_message", message_id=sent["id"], text="x") == "forbidden"
        async with await carol.connect() as c:  # an outsider learns nothing
            assert await error_code(c, "edit_message", message_id=sent["id"], text="x") == (
                "not_found"
            )
        assert await error_code(a, "edit_message", message_id=sent["id"], text="  ") == "invalid"
        await a.request("delete_message", message_id=sent["id"])
        assert await error_code(a, "edit_message", message_id=sent["id"], text="x") == "invalid"
    assert (await alice.call("GET", f"/messages/{sent['id']}"))["text"] == ""


async def test_rest_edit_is_patch_on_the_message(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a:
        chat = await group(a, bob)
        sent = await a.request("send_message", chat_id=chat["id"], text="a")
    edited = await alice.call("PATCH", f"/messages/{sent['id']}", json={"text": "b"})
    assert edited["text"] == "b" and edited["version"] == sent["version"] + 1
    assert await rest_error(bob, "PATCH", f"/messages/{sent['id']}", json={"text": "c"}) == (
        403,
        "forbidden",
    )


# --- delete_message --------------------------------------------------------------------------


async def test_delete_for_everyone_leaves_a_tombstone_that_keeps_seq_gapless(
    alice: Api, bob: Api
) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        one = await a.request("send_message", chat_id=chat["id"], text="one")
        two = await a.request(
            "send_message", chat_id=chat["id"], text="two", mentions=[bob.user_uuid]
        )
        await b.request("react", message_id=two["id"], emoji="👍")
        await a.request("edit_message", message_id=two["id"], text="two!")
        answer = await a.request("delete_message", message_id=two["id"])
        assert answer == {"chat_id": chat["id"], "message_id": two["id"], "for_everyone": True}
        events = [await b.next_event("message_updated") for _ in range(3)]
        tombstone = events[-1]["data"]
        assert tombstone["deleted"] is True and tombstone["text"] == ""
        assert tombstone["reactions"] == [] and tombstone["mentions"] == []
        assert tombstone["edited_at"] is None
        assert (tombstone["id"], tombstone["seq"]) == (two["id"], two["seq"])
        assert tombstone["version"] == two["version"] + 3

        # Again: nothing changes, nobody is told.
        assert (await a.request("delete_message", message_id=two["id"]))["for_everyone"]
        await asyncio.sleep(0.2)
        assert drained(b, "message_updated") == []

    history = await bob.history(chat["id"])
    assert [(m["seq"], m["deleted"], m["text"]) for m in history["messages"]] == [
        (one["seq"], False, "one"),
        (two["seq"], True, ""),
    ]
    assert (await bob.call("GET", f"/messages/{two['id']}/edits"))["edits"] == []


async def test_who_may_delete_for_everyone(alice: Api, bob: Api, carol: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b, await carol.connect() as c:
        chat = await group(a, bob, carol)
        by_bob = await b.request("send_message", chat_id=chat["id"], text="bob's")
        by_carol = await c.request("send_message", chat_id=chat["id"], text="carol's")
        # A plain member may not delete another's message; the owner and admins may.
        assert await error_code(c, "delete_message", message_id=by_bob["id"]) == "forbidden"
        await a.request("set_role", chat_id=chat["id"], user_uuid=bob.user_uuid, role="admin")
        await b.request("delete_message", message_id=by_carol["id"])
        await a.request("delete_message", message_id=by_bob["id"])

        private = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        hers = await a.request("send_message", chat_id=private["id"], text="hi")
        assert await error_code(b, "delete_message", message_id=hers["id"]) == "forbidden"
    status = await rest_error(
        bob, "DELETE", f"/messages/{hers['id']}", params={"for_everyone": "true"}
    )
    assert status == (403, "forbidden")
    gone = await alice.call("DELETE", f"/messages/{hers['id']}")
    assert gone == {"chat_id": private["id"], "message_id": hers["id"], "for_everyone": True}


async def test_delete_for_me_hides_it_from_me_only(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a1, await alice.connect() as a2:
        async with await bob.connect() as b:
            chat = await group(a1, bob)
            keep = await b.request("send_message", chat_id=chat["id"], text="keep")
            hide = await b.request("send_message", chat_id=chat["id"], text="hide")
            unread = (await alice.chat(chat["id"]))["unread_count"]
            assert unread == 2
            answer = await a1.request("delete_message", message_id=hide["id"], for_everyone=False)
            assert answer == {
                "chat_id": chat["id"],
                "message_id": hide["id"],
                "for_everyone": False,
            }
            for sock in (a1, a2):
                event = await sock.next_event("message_hidden")
                assert event["data"] == {"chat_id": chat["id"], "message_id": hide["id"]}
            await asyncio.sleep(0.2)
            assert drained(b, "message_hidden") == []
            # Again: nothing to tell.
            await a1.request("delete_message", message_id=hide["id"], for_everyone=False)
            await asyncio.sleep(0.2)
            assert drained(a2, "message_hidden") == []

            # Gone for alice, everywhere; there for bob.
            assert [m["id"] for m in (await alice.history(chat["id"]))["messages"]] == [keep["id"]]
            assert [m["id"] for m in (await bob.history(chat["id"]))["messages"]] == [
                keep["id"],
                hide["id"],
            ]
            overview = await alice.chat(chat["id"])
            assert overview["unread_count"] == 1
            assert overview["last_message"]["id"] == keep["id"]
            assert (await bob.chat(chat["id"]))["last_message"]["id"] == hide["id"]
            assert await error_code(a1, "get_message", message_id=hide["id"]) == "not_found"
            assert await error_code(a1, "react", message_id=hide["id"], emoji="👍") == "not_found"
            synced = await a1.request("sync", chats={str(chat["id"]): 0})
            assert [m["id"] for m in synced["chats"][str(chat["id"])]["messages"]] == [keep["id"]]
        async with await alice.connect() as a3:
            assert [m["id"] for m in a3.unread["data"]] == [keep["id"]]
    hidden_rest = await alice.call(
        "DELETE", f"/messages/{keep['id']}", params={"for_everyone": "false"}
    )
    assert hidden_rest["for_everyone"] is False
    assert (await alice.chat(chat["id"]))["unread_count"] == 0
    assert (await alice.chat(chat["id"]))["last_message"] is None


async def test_deleted_messages_are_not_unread_and_get_no_receipts(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        sent = [await a.request("send_message", chat_id=chat["id"], text=f"{n}") for n in range(3)]
        await a.request("delete_message", message_id=sent[1]["id"])
        overview = await bob.chat(chat["id"])
        assert overview["unread_count"] == 2
        async with await bob.connect() as b2:
            assert [m["id"] for m in b2.unread["data"]] == [sent[0]["id"], sent[2]["id"]]
        await b.request("mark_read", message_ids=[sent[2]["id"]])
        receipts = {(await a.next_event("message_read"))["data"]["message_id"] for _ in range(2)}
        assert receipts == {sent[0]["id"], sent[2]["id"]}
        await asyncio.sleep(0.2)
        assert drained(a, "message_read") == []
        assert (await bob.chat(chat["id"]))["unread_count"] == 0


# --- reactions ------------------------------------------------------------------------------


async def test_reactions_are_a_set_per_user_and_emoji(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        sent = await a.request("send_message", chat_id=chat["id"], text="react to me")
        await b.next_event("new_message")
        first = await b.request("react", message_id=sent["id"], emoji="👍")
        assert first["reactions"] == [{"emoji": "👍", "count": 1, "users": [bob.user_uuid]}]
        assert first["version"] == sent["version"] + 1
        assert (await a.next_event("message_updated"))["data"] == first

        same = await b.request("react", message_id=sent["id"], emoji="👍")
        assert same == first  # no change, no version, no event
        both = await a.request("react", message_id=sent["id"], emoji="👍")
        assert both["reactions"] == [
            {"emoji": "👍", "count": 2, "users": [alice.user_uuid, bob.user_uuid]}
        ]
        heart = await a.request("react", message_id=sent["id"], emoji="❤️")
        assert [r["emoji"] for r in heart["reactions"]] == ["👍", "❤️"]

        gone = await b.request("unreact", message_id=sent["id"], emoji="👍")
        assert gone["reactions"][0] == {"emoji": "👍", "count": 1, "users": [alice.user_uuid]}
        nothing = await b.request("unreact", message_id=sent["id"], emoji="👍")
        assert nothing == gone
        await asyncio.sleep(0.2)
        updates = drained(b, "message_updated")
        assert [u["data"]["version"] for u in updates] == [
            sent["version"] + 1,
            sent["version"] + 2,
            sent["version"] + 3,
            sent["version"] + 4,
        ]


@pytest.mark.parametrize(
    "emoji", ["a", "👍👍", "👍 ", ":+1:", "\u200d", "1", "#", "👍a", "\U0001f44d\U0001f3fd\u200d"]
)
async def test_a_reaction_is_one_emoji(alice: Api, bob: Api, emoji: str) -> None:
    async with await alice.connect() as a:
        chat = await group(a, bob)
        sent = await a.request("send_message", chat_id=chat["id"], text="x")
        assert await error_code(a, "react", message_id=sent["id"], emoji=emoji) == "invalid"
    assert (await alice.call("GET", f"/messages/{sent['id']}"))["reactions"] == []


@pytest.mark.parametrize("emoji", ["👍🏽", "👨‍👩‍👧", "🇫🇷", "1️⃣", "❤️", "🏳️‍🌈"])
async def test_emoji_sequences_are_one_emoji(alice: Api, bob: Api, emoji: str) -> None:
    async with await alice.connect() as a:
        chat = await group(a, bob)
        sent = await a.request("send_message", chat_id=chat["id"], text="x")
    path = f"/messages/{sent['id']}/reactions/{quote(emoji)}"
    reacted = await alice.call("PUT", path)
    assert reacted["reactions"] == [{"emoji": emoji, "count": 1, "users": [alice.user_uuid]}]
    removed = await alice.call("DELETE", path)
    assert removed["reactions"] == []


async def test_an_emoji_with_or_without_its_variation_selector_is_one_reaction(
    alice: Api, bob: Api
) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        sent = await a.request("send_message", chat_id=chat["id"], text="x")
        await a.request("react", message_id=sent["id"], emoji="\u2764\ufe0f")
        same = await a.request("react", message_id=sent["id"], emoji="\u2764")
        assert same["reactions"] == [
            {"emoji": "\u2764\ufe0f", "count": 1, "users": [alice.user_uuid]}
        ]
        both = await b.request("react", message_id=sent["id"], emoji="\u2764")
        assert both["reactions"][0]["count"] == 2
        gone = await b.request("unreact", message_id=sent["id"], emoji="\u2764\ufe0f")
        assert gone["reactions"][0]["count"] == 1
        # A skin tone alone is a component, not an emoji.
        assert await error_code(a, "react", message_id=sent["id"], emoji="\U0001f3fd") == (
            "invalid"
        )


async def test_reaction_limits(alice: Api, bob: Api) -> None:
    many = "😀😁😂🤣😃😄😅😆😉😊😋😎😍😘🥰😗😙😚🙂🤗🤩"
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        sent = await a.request("send_message", chat_id=chat["id"], text="x")
        for emoji in many[:10]:
            await a.request("react", message_id=sent["id"], emoji=emoji)
        assert await error_code(a, "react", message_id=sent["id"], emoji=many[10]) == "invalid"
        for emoji in many[10:20]:
            await b.request("react", message_id=sent["id"], emoji=emoji)
        # 20 distinct emoji: a 21st is refused, one already there is fine.
        assert await error_code(b, "react", message_id=sent["id"], emoji=many[20]) == "invalid"
        await b.request("unreact", message_id=sent["id"], emoji=many[19])
        message = await b.request("react", message_id=sent["id"], emoji=many[0])
    assert len(message["reactions"]) == 19
    assert message["reactions"][0] == {
        "emoji": many[0],
        "count": 2,
        "users": [bob.user_uuid, alice.user_uuid],
    }


async def test_a_reaction_storm_ends_with_exact_counts(make_user: UserFactory) -> None:
    owner = await make_user("Owner")
    people = [await make_user(f"P{n}") for n in range(50)]
    async with await owner.connect() as o:
        chat = await group(o, *people)
        sent = await o.request("send_message", chat_id=chat["id"], text="storm")
    sockets = [await p.connect() for p in people]
    try:

        async def storm(n: int, sock: Socket) -> None:
            await sock.request("react", message_id=sent["id"], emoji="🔥")
            await sock.request("react", message_id=sent["id"], emoji="👍")
            if n % 2:
                await sock.request("unreact", message_id=sent["id"], emoji="👍")
            await sock.request("react", message_id=sent["id"], emoji="🔥")  # a no-op

        await asyncio.gather(*(storm(n, s) for n, s in enumerate(sockets)))
        final = await owner.call("GET", f"/messages/{sent['id']}")
        assert [(r["emoji"], r["count"]) for r in final["reactions"]] == [("🔥", 50), ("👍", 25)]
        assert len(final["reactions"][0]["users"]) == 20
        # Every change was one version: 50 + 50 + 25 of them.
        assert final["version"] == sent["version"] + 125
        assert (await owner.chat(chat["id"]))["version"] == final["version"]
        # Each member saw every change once, in version order.
        updates = [
            e["data"]["version"]
            for e in sockets[0].pending_events()
            if e["action"] == "message_updated"
        ]
        assert sorted(updates) == list(range(sent["version"] + 1, final["version"] + 1))
    finally:
        for sock in sockets:
            await sock.close()


# --- replies and mentions -------------------------------------------------------------------


async def test_reply_to_must_be_a_live_message_of_the_same_chat(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a:
        chat = await group(a, bob)
        other = await group(a, bob, name="other")
        original = await a.request("send_message", chat_id=chat["id"], text="question")
        elsewhere = await a.request("send_message", chat_id=other["id"], text="x")
        reply = await a.request(
            "send_message", chat_id=chat["id"], text="answer", reply_to=original["id"]
        )
        assert reply["reply_to"] == original["id"]
        for bad in (elsewhere["id"], 2**62):
            code = await error_code(a, "send_message", chat_id=chat["id"], text="x", reply_to=bad)
            assert code == "invalid"
        await a.request("delete_message", message_id=original["id"])
        code = await error_code(
            a, "send_message", chat_id=chat["id"], text="x", reply_to=original["id"]
        )
        assert code == "invalid"
    rest = await alice.call(
        "POST", f"/chats/{chat['id']}/messages", json={"text": "r", "reply_to": reply["id"]}
    )
    assert rest["reply_to"] == reply["id"]
    assert [m["seq"] for m in (await bob.history(chat["id"]))["messages"]] == [1, 2, 3]


async def test_mentions_must_be_members_and_count_exactly(alice: Api, bob: Api, carol: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        code = await error_code(
            a, "send_message", chat_id=chat["id"], text="x", mentions=[carol.user_uuid]
        )
        assert code == "invalid"
        assert (
            await error_code(a, "send_message", chat_id=chat["id"], text="x", mentions=["nope"])
            == "invalid"
        )
        one = await a.request(
            "send_message", chat_id=chat["id"], text="@Bob", mentions=[bob.user_uuid] * 2
        )
        assert one["mentions"] == [bob.user_uuid]
        two = await a.request(
            "send_message",
            chat_id=chat["id"],
            text="@Bob @Alice",
            mentions=[bob.user_uuid, alice.user_uuid],
        )
        await a.request("send_message", chat_id=chat["id"], text="no mention")
        entry = await bob.chat(chat["id"])
        assert (entry["unread_count"], entry["unread_mentions"]) == (3, 2)
        assert (await alice.chat(chat["id"]))["unread_mentions"] == 0  # her own messages

        await a.request("delete_message", message_id=one["id"])
        await b.request("delete_message", message_id=two["id"], for_everyone=False)
        entry = await bob.chat(chat["id"])
        assert (entry["unread_count"], entry["unread_mentions"]) == (1, 0)

        three = await a.request(
            "send_message", chat_id=chat["id"], text="@Bob", mentions=[bob.user_uuid]
        )
        assert (await bob.chat(chat["id"]))["unread_mentions"] == 1
        await b.request("mark_read", message_ids=[three["id"]])
        entry = (await bob.chats())["chats"][0]
        assert (entry["unread_count"], entry["unread_mentions"]) == (0, 0)


async def test_unread_counts_stay_exact_under_concurrent_sends_and_deletes(
    alice: Api, bob: Api
) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        first = [
            await a.request(
                "send_message", chat_id=chat["id"], text=f"{n}", mentions=[bob.user_uuid]
            )
            for n in range(20)
        ]

        async def send(n: int) -> None:
            await a.request(
                "send_message", chat_id=chat["id"], text=f"more {n}", mentions=[bob.user_uuid]
            )

        async def delete(message: dict[str, Any], for_everyone: bool) -> None:
            sock = a if for_everyone else b
            await sock.request(
                "delete_message", message_id=message["id"], for_everyone=for_everyone
            )

        await asyncio.gather(
            *(send(n) for n in range(20)),
            *(delete(m, n % 2 == 0) for n, m in enumerate(first[:10])),
        )
    entry = await bob.chat(chat["id"])
    visible = [m for m in (await bob.history(chat["id"], limit=100, before=2**62))["messages"]]
    live = [m for m in visible if not m["deleted"]]
    assert len(live) == 30
    assert (entry["unread_count"], entry["unread_mentions"]) == (30, 30)


# --- forward_message ------------------------------------------------------------------------


async def test_forward_copies_as_my_message_without_revealing_the_source(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        source = await group(a, bob, name="secret")
        target = await b.request("create_chat", type="private", user_ids=[carol.user_uuid])
        original = await a.request("send_message", chat_id=source["id"], text="news")
        copy = await b.request(
            "forward_message", message_id=original["id"], chat_id=target["id"], client_msg_id="f1"
        )
        assert copy["chat_id"] == target["id"] and copy["sender_uuid"] == bob.user_uuid
        assert copy["text"] == "news"
        assert copy["forwarded_from"] == {
            "sender_uuid": alice.user_uuid,
            "sender_name": "Alice",
            "timestamp": original["timestamp"],
        }
        again = await b.request(
            "forward_message", message_id=original["id"], chat_id=target["id"], client_msg_id="f1"
        )
        assert again == copy

        async with await carol.connect() as c:
            # Carol forwards the forward: it still names its first sender.
            mine = await c.request("create_chat", type="private", user_ids=[alice.user_uuid])
            copy2 = await c.request("forward_message", message_id=copy["id"], chat_id=mine["id"])
            assert copy2["forwarded_from"] == copy["forwarded_from"]
            # Not a message she can see, or not a chat she is in: not_found.
            code = await error_code(
                c, "forward_message", message_id=original["id"], chat_id=mine["id"]
            )
            assert code == "not_found"
            code = await error_code(
                c, "forward_message", message_id=copy["id"], chat_id=source["id"]
            )
            assert code == "not_found"
    assert [m["id"] for m in (await carol.history(target["id"]))["messages"]] == [copy["id"]]
    rest = await bob.call(
        "POST",
        f"/messages/{original['id']}/forward",
        json={"chat_id": target["id"]},
        headers={"Authorization": f"Bearer {bob.access_token}", "Idempotency-Key": "f1"},
    )
    assert rest == copy


# --- pins -----------------------------------------------------------------------------------


async def test_pins_bump_the_version_and_reach_every_member(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        sent = await a.request("send_message", chat_id=chat["id"], text="pin me")
        assert await error_code(b, "pin_message", message_id=sent["id"]) == "forbidden"
        pinned = await a.request("pin_message", message_id=sent["id"])
        assert pinned["pinned_message_id"] == sent["id"]
        assert pinned["version"] == sent["version"] + 1
        assert (await b.next_event("chat_updated"))["data"] == pinned
        assert await a.request("pin_message", message_id=sent["id"]) == pinned  # no change
        listed = (await bob.chats())["chats"][0]
        assert (listed["pinned_message_id"], listed["version"]) == (sent["id"], pinned["version"])

        unpinned = await a.request("unpin_message", chat_id=chat["id"])
        assert unpinned["pinned_message_id"] is None
        assert unpinned["version"] == pinned["version"] + 1
        assert await a.request("unpin_message", chat_id=chat["id"]) == unpinned

        # A delete for everyone of the pinned message unpins it, in the same change.
        await a.request("pin_message", message_id=sent["id"])
        await a.request("delete_message", message_id=sent["id"])
        tombstone = [e for e in drained(b, "message_updated")] or [
            await b.next_event("message_updated")
        ]
        chat_now = await bob.chat(chat["id"])
        assert chat_now["pinned_message_id"] is None
        assert chat_now["version"] == tombstone[-1]["data"]["version"]

    async with await carol.connect() as c:
        assert await error_code(c, "unpin_message", chat_id=chat["id"]) == "not_found"
    # REST; private chats let either member pin.
    private = await alice.call(
        "POST", "/chats", json={"type": "private", "user_ids": [bob.user_uuid]}
    )
    hers = await alice.call("POST", f"/chats/{private['id']}/messages", json={"text": "x"})
    got = await bob.call("PUT", f"/chats/{private['id']}/pin", json={"message_id": hers["id"]})
    assert got["pinned_message_id"] == hers["id"]
    assert await rest_error(
        bob, "PUT", f"/chats/{chat['id']}/pin", json={"message_id": hers["id"]}
    ) == (404, "not_found")
    assert (await bob.call("DELETE", f"/chats/{private['id']}/pin"))["pinned_message_id"] is None


# --- races ----------------------------------------------------------------------------------


async def test_concurrent_edit_delete_and_react_end_consistent(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        for round_ in range(10):
            sent = await a.request("send_message", chat_id=chat["id"], text=f"r{round_}")
            results = await asyncio.gather(
                a.request("edit_message", message_id=sent["id"], text=f"edited {round_}"),
                a.request("delete_message", message_id=sent["id"]),
                b.request("react", message_id=sent["id"], emoji="👍"),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, ChatdError):
                    assert result.code == "invalid"  # too late: it was deleted
                else:
                    assert not isinstance(result, BaseException)
            final = await bob.call("GET", f"/messages/{sent['id']}")
            assert final["deleted"] and final["text"] == "" and final["reactions"] == []
            assert (await bob.call("GET", f"/messages/{sent['id']}/edits"))["edits"] == []
            chat_version = (await bob.chat(chat["id"]))["version"]
            assert final["version"] == chat_version


async def test_review_findings_forwards_hides_and_pins(alice: Api, bob: Api, carol: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob, carol)
        sent = await a.request("send_message", chat_id=chat["id"], text="see you at 5")
        # A forward is attributed to its first sender: it cannot be edited into other words.
        copy = await b.request("forward_message", message_id=sent["id"], chat_id=chat["id"])
        code = await error_code(b, "edit_message", message_id=copy["id"], text="I resign")
        assert code == "invalid"
        # A reaction left on a message hidden since can still be taken back, and a sender
        # who hid their own message can still delete it for everyone.
        await b.request("react", message_id=sent["id"], emoji="🔥")
        mine = await b.request("send_message", chat_id=chat["id"], text="oops")
        for message in (sent, mine):
            await b.request("delete_message", message_id=message["id"], for_everyone=False)
        taken = await b.request("unreact", message_id=sent["id"], emoji="🔥")
        assert taken["reactions"] == []
        assert (await b.request("delete_message", message_id=mine["id"]))["for_everyone"]
        assert (await alice.call("GET", f"/messages/{mine['id']}"))["deleted"] is True
        # A plain member may not pin, whatever the message.
        await a.request("delete_message", message_id=copy["id"])
        async with await carol.connect() as c:
            code = await error_code(c, "pin_message", message_id=copy["id"])
        assert code == "forbidden"


async def test_refused_changes_do_not_count_against_the_change_limit(
    database_url: str, tmp_path: Any
) -> None:
    from tests.conftest import new_user, start_server, stop_server

    server = start_server(
        database_url, tmp_path, CHATD_CHANGE_RATE="2/min", CHATD_REGISTER_RATE="off"
    )
    try:
        alice, bob = await new_user(server, "Alice"), await new_user(server, "Bob")
        async with await alice.connect() as a, await bob.connect() as b:
            chat = await group(a, bob)
            sent = await a.request("send_message", chat_id=chat["id"], text="x")
            for _ in range(3):  # not bob's: refused, and not counted
                code = await error_code(b, "edit_message", message_id=sent["id"], text="y")
                assert code == "forbidden"
            await b.request("react", message_id=sent["id"], emoji="👍")
            await b.request("unreact", message_id=sent["id"], emoji="👍")
            code = await error_code(b, "react", message_id=sent["id"], emoji="👍")
            assert code == "rate_limited"
        await alice.aclose()
        await bob.aclose()
    finally:
        stop_server(server)
