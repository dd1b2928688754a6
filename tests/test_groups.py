"""Group administration end to end: roles, add/remove/leave, rename, set_role, delete.

Every rule is checked against the real server, over the socket actions and, where a route
exists, over REST: who may do what (owner > admin > member), which events reach whom, that
a removed member loses the chat at once, that ownership is handed on when the owner leaves,
that private chats refuse all of it, that read receipts stay right when membership changes,
and that every refusal leaves the chat exactly as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import httpx
import pytest

from chatd.client import Api, ChatdError, Socket
from chatd.protocol import MAX_GROUP_MEMBERS, MAX_USERS_PER_CALL
from tests.conftest import Server, bulk_users

NO_SUCH_CHAT = 2**62  # a chat id that cannot exist in a test database
ADMIN_EVENTS = ("member_added", "member_removed", "chat_updated", "chat_deleted")


# --- helpers ------------------------------------------------------------------------------


async def quiet(sock: Socket, action: str, wait: float = 0.3) -> list[dict]:
    """The `action` events that arrived within `wait` seconds."""
    await asyncio.sleep(wait)
    return [e for e in sock.pending_events() if e["action"] == action]


@contextlib.asynccontextmanager
async def sockets(*apis: Api) -> AsyncIterator[list[Socket]]:
    """One open /connect socket per api (repeat an api for several sockets), all closed after."""
    opened: list[Socket] = []
    try:
        for api in apis:
            opened.append(await api.connect())
        yield opened
    finally:
        for sock in opened:
            await sock.close()


async def make_group(owner: Socket, *members: Api, name: str = "team") -> dict[str, Any]:
    return await owner.request(
        "create_chat", type="group", name=name, user_ids=[m.user_uuid for m in members]
    )


def roles(chat: dict[str, Any]) -> list[tuple[str, str]]:
    """(user_uuid, role) of every member, in the order the chat lists them."""
    return [(m["user_uuid"], m["role"]) for m in chat["members"]]


async def socket_error(sock: Socket, action: str, **fields: Any) -> str:
    """The error code a socket action fails with."""
    with pytest.raises(ChatdError) as error:
        await sock.request(action, **fields)
    return error.value.code


async def rest_error(call: Awaitable[Any]) -> tuple[int | None, str]:
    """The (status, code) a REST call fails with."""
    with pytest.raises(ChatdError) as error:
        await call
    return error.value.status, error.value.code


# --- roles --------------------------------------------------------------------------------


async def test_creator_owns_the_group_and_members_are_listed_in_join_order(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with sockets(alice) as (a,):
        chat = await make_group(a, carol, bob)
        assert chat["members"] == [
            {"user_uuid": alice.user_uuid, "name": "Alice", "role": "owner", "avatar": None},
            {"user_uuid": carol.user_uuid, "name": "Carol", "role": "member", "avatar": None},
            {"user_uuid": bob.user_uuid, "name": "Bob", "role": "member", "avatar": None},
        ]
        assert (await alice.chat(chat["id"]))["role"] == "owner"
        assert (await bob.chat(chat["id"]))["role"] == "member"

        private = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        assert sorted(m["role"] for m in private["members"]) == ["member", "member"]
        assert (await alice.chat(private["id"]))["role"] == "member"


# --- add_members --------------------------------------------------------------------------


async def test_member_added_reaches_every_socket_of_old_and_new_members(
    alice: Api, bob: Api, carol: Api, make_user
) -> None:
    dave = await make_user("Dave")
    async with sockets(alice, alice, bob, carol, carol, dave) as (a1, a2, b, c1, c2, d):
        chat = await make_group(a1, bob)
        updated = await a1.request(
            "add_members", chat_id=chat["id"], user_ids=[dave.user_uuid, carol.user_uuid]
        )
        assert roles(updated) == [
            (alice.user_uuid, "owner"),
            (bob.user_uuid, "member"),
            (dave.user_uuid, "member"),
            (carol.user_uuid, "member"),
        ]
        expected = {
            "action": "member_added",
            "data": {
                "chat": updated,
                "user_uuids": [dave.user_uuid, carol.user_uuid],
                "by": alice.user_uuid,
            },
        }
        for sock in (a1, a2, b, c1, c2, d):
            assert await sock.next_event("member_added") == expected
        assert (await carol.chat(chat["id"]))["members"] == updated["members"]


async def test_adding_existing_members_is_ignored(alice: Api, bob: Api, carol: Api) -> None:
    async with sockets(alice, bob) as (a, b):
        chat = await make_group(a, bob)
        await b.next_event("chat_created")
        before = await alice.chat(chat["id"])

        # Only existing members: nothing happens, and nobody is told anything.
        again = await a.request(
            "add_members", chat_id=chat["id"], user_ids=[bob.user_uuid, alice.user_uuid]
        )
        assert again["members"] == before["members"]
        assert await quiet(b, "member_added") == []
        assert await alice.chat(chat["id"]) == before

        # Mixed: only the newcomer is added and reported.
        await a.request(
            "add_members", chat_id=chat["id"], user_ids=[bob.user_uuid, carol.user_uuid]
        )
        event = await b.next_event("member_added")
        assert event["data"]["user_uuids"] == [carol.user_uuid]
        assert [m["user_uuid"] for m in event["data"]["chat"]["members"]] == [
            alice.user_uuid,
            bob.user_uuid,
            carol.user_uuid,
        ]


async def test_adding_an_unknown_user_adds_nobody(alice: Api, bob: Api, carol: Api) -> None:
    async with sockets(alice, bob, carol) as (a, b, c):
        chat = await make_group(a, bob)
        before = await alice.chat(chat["id"])
        ghost = str(uuid.uuid4())
        code = await socket_error(
            a, "add_members", chat_id=chat["id"], user_ids=[carol.user_uuid, ghost]
        )
        assert code == "not_found"
        status, code = await rest_error(
            alice.call(
                "POST", f"/chats/{chat['id']}/members", json={"user_ids": [carol.user_uuid, ghost]}
            )
        )
        assert (status, code) == (404, "not_found")

        assert await alice.chat(chat["id"]) == before
        assert await rest_error(carol.chat(chat["id"])) == (404, "not_found")
        assert await quiet(b, "member_added") == []
        assert await quiet(c, "member_added", wait=0) == []


async def test_plain_members_may_not_add_and_outsiders_get_not_found(
    alice: Api, bob: Api, carol: Api, make_user
) -> None:
    dave = await make_user("Dave")
    async with sockets(alice, bob, carol) as (a, b, c):
        chat = await make_group(a, bob)
        before = await alice.chat(chat["id"])
        add = {"user_ids": [dave.user_uuid]}

        assert await socket_error(b, "add_members", chat_id=chat["id"], **add) == "forbidden"
        assert await rest_error(bob.call("POST", f"/chats/{chat['id']}/members", json=add)) == (
            403,
            "forbidden",
        )
        # An outsider cannot tell the chat exists: same answer as for a chat that does not.
        for chat_id in (chat["id"], NO_SUCH_CHAT):
            assert await socket_error(c, "add_members", chat_id=chat_id, **add) == "not_found"
            assert await rest_error(carol.call("POST", f"/chats/{chat_id}/members", json=add)) == (
                404,
                "not_found",
            )

        assert await alice.chat(chat["id"]) == before
        assert await quiet(a, "member_added") == []


async def test_a_new_member_starts_caught_up_but_can_read_history_and_gets_new_messages(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with sockets(alice) as (a,):
        chat = await make_group(a, bob)
        old = [
            await a.request("send_message", chat_id=chat["id"], text=f"old {n}") for n in range(3)
        ]

        await alice.call(
            "POST", f"/chats/{chat['id']}/members", json={"user_ids": [carol.user_uuid]}
        )

        overview = await carol.chat(chat["id"])
        assert overview["unread_count"] == 0
        assert overview["read_upto"] == old[-1]["id"]
        async with await carol.connect() as c:
            assert [m for m in c.unread["data"] if m["chat_id"] == chat["id"]] == []
            history = await carol.history(chat["id"])
            assert [m["id"] for m in history["messages"]] == [m["id"] for m in old]

            new = await a.request("send_message", chat_id=chat["id"], text="welcome")
            assert (await c.next_event("new_message"))["data"] == new
        assert (await carol.chat(chat["id"]))["unread_count"] == 1
        async with await carol.connect() as c:
            assert [m["id"] for m in c.unread["data"]] == [new["id"]]


async def test_add_members_over_rest_returns_the_chat_and_tells_the_new_member(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with sockets(carol) as (c,):
        created = await alice.call(
            "POST", "/chats", json={"type": "group", "name": "rest", "user_ids": [bob.user_uuid]}
        )
        chat = await alice.call(
            "POST", f"/chats/{created['id']}/members", json={"user_ids": [carol.user_uuid]}
        )
        assert roles(chat) == [
            (alice.user_uuid, "owner"),
            (bob.user_uuid, "member"),
            (carol.user_uuid, "member"),
        ]
        event = await c.next_event("member_added")
        assert event["data"] == {
            "chat": chat,
            "user_uuids": [carol.user_uuid],
            "by": alice.user_uuid,
        }


# --- remove_member ------------------------------------------------------------------------


async def test_removal_is_told_to_the_removed_and_the_remaining_members(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with sockets(alice, bob, carol, carol) as (a, b, c1, c2):
        chat = await make_group(a, bob, carol)
        after = await a.request("remove_member", chat_id=chat["id"], user_uuid=carol.user_uuid)
        assert roles(after) == [(alice.user_uuid, "owner"), (bob.user_uuid, "member")]
        expected = {
            "action": "member_removed",
            "data": {"chat_id": chat["id"], "user_uuid": carol.user_uuid, "by": alice.user_uuid},
        }
        for sock in (a, b, c1, c2):
            assert await sock.next_event("member_removed") == expected
        assert (await bob.chat(chat["id"]))["members"] == after["members"]


async def test_a_removed_member_loses_the_chat_at_once(alice: Api, bob: Api, carol: Api) -> None:
    async with sockets(alice, bob, carol) as (a, b, c):
        chat = await make_group(a, bob, carol)
        old = await a.request("send_message", chat_id=chat["id"], text="before")
        for sock in (b, c):
            assert (await sock.next_event("new_message"))["data"]["id"] == old["id"]

        await alice.call("DELETE", f"/chats/{chat['id']}/members/{carol.user_uuid}")
        await c.next_event("member_removed")

        new = await a.request("send_message", chat_id=chat["id"], text="after")
        assert (await b.next_event("new_message"))["data"]["id"] == new["id"]
        assert await quiet(c, "new_message") == []

        assert await rest_error(carol.history(chat["id"])) == (404, "not_found")
        assert await rest_error(carol.chat(chat["id"])) == (404, "not_found")
        assert await rest_error(carol.call("GET", f"/messages/{old['id']}")) == (404, "not_found")
        assert await socket_error(c, "send_message", chat_id=chat["id"], text="hi?") == "not_found"
        assert await socket_error(c, "get_chat", chat_id=chat["id"]) == "not_found"
        synced = await c.request("sync", chats={str(chat["id"]): 0})
        assert synced["chats"][str(chat["id"])] == {
            "messages": [],
            "has_more": False,
            "error": "not_found",
        }
        listed = [x["id"] for x in (await carol.chats())["chats"]]
        assert chat["id"] not in listed
        async with await carol.connect() as again:  # "before" was unread; it is not any more
            assert [m for m in again.unread["data"] if m["chat_id"] == chat["id"]] == []
        assert [m["text"] for m in (await bob.history(chat["id"]))["messages"]] == [
            "before",
            "after",
        ]


async def test_a_removed_sender_hears_nothing_more_from_the_chat(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with sockets(alice, bob, carol) as (a, b, c):
        chat = await make_group(a, bob, carol)
        mine = await c.request("send_message", chat_id=chat["id"], text="from carol")
        await a.request("remove_member", chat_id=chat["id"], user_uuid=carol.user_uuid)
        await c.next_event("member_removed")

        # Her message becomes read by everyone left, but she is no longer told.
        await a.request("mark_read", message_ids=[mine["id"]])
        await b.request("mark_read", message_ids=[mine["id"]])
        assert (await alice.history(chat["id"]))["messages"][0]["read_status"] == "read"
        await b.request("typing", chat_id=chat["id"])
        assert (await a.next_event("typing"))["data"]["user_uuid"] == bob.user_uuid
        await a.request("rename_chat", chat_id=chat["id"], name="without carol")
        await a.request("set_role", chat_id=chat["id"], user_uuid=bob.user_uuid, role="admin")
        await b.next_event("chat_updated")
        await a.request("send_message", chat_id=chat["id"], text="after carol")

        await asyncio.sleep(0.3)
        assert [e["action"] for e in c.pending_events()] == []


async def test_removing_yourself_is_leaving(alice: Api, bob: Api, carol: Api) -> None:
    async with sockets(alice, bob) as (a, b):
        chat = await make_group(a, bob, carol)
        ack = await a.request("remove_member", chat_id=chat["id"], user_uuid=alice.user_uuid)
        assert ack is None
        removed = await b.next_event("member_removed")
        assert removed["data"] == {
            "chat_id": chat["id"],
            "user_uuid": alice.user_uuid,
            "by": alice.user_uuid,
        }
        updated = await b.next_event("chat_updated")
        assert roles(updated["data"]) == [(bob.user_uuid, "owner"), (carol.user_uuid, "member")]
        assert await rest_error(alice.chat(chat["id"])) == (404, "not_found")


async def test_the_owner_cannot_be_removed(alice: Api, bob: Api) -> None:
    async with sockets(alice, bob) as (a, b):
        chat = await make_group(a, bob)
        await a.request("set_role", chat_id=chat["id"], user_uuid=bob.user_uuid, role="admin")
        before = await alice.chat(chat["id"])

        code = await socket_error(b, "remove_member", chat_id=chat["id"], user_uuid=alice.user_uuid)
        assert code == "forbidden"
        assert await rest_error(
            bob.call("DELETE", f"/chats/{chat['id']}/members/{alice.user_uuid}")
        ) == (403, "forbidden")

        assert await alice.chat(chat["id"]) == before
        assert await quiet(a, "member_removed") == []


async def test_an_admin_cannot_remove_another_admin_but_the_owner_can(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with sockets(alice, bob, carol) as (a, b, c):
        chat = await make_group(a, bob, carol)
        for admin in (bob, carol):
            await a.request("set_role", chat_id=chat["id"], user_uuid=admin.user_uuid, role="admin")
        before = await alice.chat(chat["id"])

        code = await socket_error(b, "remove_member", chat_id=chat["id"], user_uuid=carol.user_uuid)
        assert code == "forbidden"
        assert await rest_error(
            bob.call("DELETE", f"/chats/{chat['id']}/members/{carol.user_uuid}")
        ) == (403, "forbidden")
        assert await alice.chat(chat["id"]) == before
        assert await quiet(c, "member_removed") == []

        after = await a.request("remove_member", chat_id=chat["id"], user_uuid=carol.user_uuid)
        assert roles(after) == [(alice.user_uuid, "owner"), (bob.user_uuid, "admin")]
        assert (await c.next_event("member_removed"))["data"]["by"] == alice.user_uuid


async def test_an_admin_may_add_remove_and_rename_but_a_member_may_not_remove(
    alice: Api, bob: Api, carol: Api, make_user
) -> None:
    dave = await make_user("Dave")
    async with sockets(alice, bob, carol) as (a, b, c):
        chat = await make_group(a, bob, carol)
        code = await socket_error(c, "remove_member", chat_id=chat["id"], user_uuid=bob.user_uuid)
        assert code == "forbidden"
        assert [m["user_uuid"] for m in (await alice.chat(chat["id"]))["members"]] == [
            alice.user_uuid,
            bob.user_uuid,
            carol.user_uuid,
        ]

        await a.request("set_role", chat_id=chat["id"], user_uuid=bob.user_uuid, role="admin")
        await b.request("add_members", chat_id=chat["id"], user_ids=[dave.user_uuid])
        assert (await a.next_event("member_added"))["data"]["by"] == bob.user_uuid
        await b.request("remove_member", chat_id=chat["id"], user_uuid=carol.user_uuid)
        assert (await c.next_event("member_removed"))["data"]["by"] == bob.user_uuid
        renamed = await b.request("rename_chat", chat_id=chat["id"], name="bob's")
        assert roles(renamed) == [
            (alice.user_uuid, "owner"),
            (bob.user_uuid, "admin"),
            (dave.user_uuid, "member"),
        ]
        assert renamed["name"] == "bob's"


async def test_removing_a_non_member_is_not_found(alice: Api, bob: Api, carol: Api) -> None:
    async with sockets(alice, bob) as (a, b):
        chat = await make_group(a, bob)
        before = await alice.chat(chat["id"])
        for target in (carol.user_uuid, str(uuid.uuid4())):
            code = await socket_error(a, "remove_member", chat_id=chat["id"], user_uuid=target)
            assert code == "not_found"
            assert await rest_error(
                alice.call("DELETE", f"/chats/{chat['id']}/members/{target}")
            ) == (404, "not_found")
        assert await alice.chat(chat["id"]) == before
        assert await quiet(b, "member_removed") == []


async def test_outsiders_get_not_found_for_every_action_like_a_missing_chat(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with sockets(alice, carol) as (a, c):
        chat = await make_group(a, bob)
        await a.request("send_message", chat_id=chat["id"], text="private matters")
        before = await alice.chat(chat["id"])
        for chat_id in (chat["id"], NO_SUCH_CHAT):
            attempts = [
                ("add_members", {"user_ids": [carol.user_uuid]}),
                ("remove_member", {"user_uuid": bob.user_uuid}),
                ("leave_chat", {}),
                ("rename_chat", {"name": "mine"}),
                ("set_role", {"user_uuid": bob.user_uuid, "role": "admin"}),
                ("delete_chat", {}),
            ]
            for action, fields in attempts:
                code = await socket_error(c, action, chat_id=chat_id, **fields)
                assert code == "not_found", (chat_id, action)
            routes = [
                ("POST", f"/chats/{chat_id}/members", {"user_ids": [carol.user_uuid]}),
                ("DELETE", f"/chats/{chat_id}/members/{bob.user_uuid}", None),
                ("DELETE", f"/chats/{chat_id}/members/{carol.user_uuid}", None),
                ("PATCH", f"/chats/{chat_id}", {"name": "mine"}),
                ("PATCH", f"/chats/{chat_id}/members/{bob.user_uuid}", {"role": "admin"}),
                ("DELETE", f"/chats/{chat_id}", None),
            ]
            for method, path, body in routes:
                failure = await rest_error(carol.call(method, path, json=body))
                assert failure == (404, "not_found"), (method, path)
        assert await alice.chat(chat["id"]) == before
        await asyncio.sleep(0.3)
        assert [e for e in a.pending_events() if e["action"] in ADMIN_EVENTS] == []


# --- leave_chat ---------------------------------------------------------------------------


async def test_a_member_leaving_is_told_to_everyone_and_ownership_stays(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with sockets(alice, bob, carol) as (a, b, c):
        chat = await make_group(a, bob, carol)
        assert await b.request("leave_chat", chat_id=chat["id"]) is None
        expected = {
            "action": "member_removed",
            "data": {"chat_id": chat["id"], "user_uuid": bob.user_uuid, "by": bob.user_uuid},
        }
        for sock in (a, b, c):
            assert await sock.next_event("member_removed") == expected
        assert await quiet(a, "chat_updated") == []
        assert roles(await alice.chat(chat["id"])) == [
            (alice.user_uuid, "owner"),
            (carol.user_uuid, "member"),
        ]
        assert await rest_error(bob.chat(chat["id"])) == (404, "not_found")


async def test_an_owner_leaving_hands_ownership_to_the_oldest_admin(
    alice: Api, bob: Api, carol: Api, make_user
) -> None:
    dave = await make_user("Dave")
    async with sockets(alice, bob, carol, dave) as (a, b, c, d):
        chat = await make_group(a, bob, carol, dave)
        # Dave is promoted first, but Carol joined before him: the oldest admin is Carol.
        # Bob is older than both, but a plain member.
        for admin in (dave, carol):
            await a.request("set_role", chat_id=chat["id"], user_uuid=admin.user_uuid, role="admin")

        await a.request("leave_chat", chat_id=chat["id"])
        for sock in (b, c, d):
            removed = await sock.next_event("member_removed")
            assert removed["data"] == {
                "chat_id": chat["id"],
                "user_uuid": alice.user_uuid,
                "by": alice.user_uuid,
            }
            updated = await sock.next_event("chat_updated")
            assert roles(updated["data"]) == [
                (bob.user_uuid, "member"),
                (carol.user_uuid, "owner"),
                (dave.user_uuid, "admin"),
            ]
        assert (await carol.chat(chat["id"]))["role"] == "owner"
        # The new owner holds the owner's powers.
        await c.request("set_role", chat_id=chat["id"], user_uuid=bob.user_uuid, role="admin")


async def test_an_owner_leaving_without_admins_hands_ownership_to_the_oldest_member(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with sockets(alice, bob, carol) as (a, b, c):
        chat = await make_group(a, bob, carol)
        await alice.call("DELETE", f"/chats/{chat['id']}/members/{alice.user_uuid}")
        for sock in (a, b, c):
            assert (await sock.next_event("member_removed"))["data"]["user_uuid"] == alice.user_uuid
        for sock in (b, c):
            updated = await sock.next_event("chat_updated")
            assert roles(updated["data"]) == [(bob.user_uuid, "owner"), (carol.user_uuid, "member")]
        assert await quiet(a, "chat_updated") == []  # the leaver is told only of leaving
        overview = await carol.chat(chat["id"])
        assert [m["role"] for m in overview["members"]].count("owner") == 1


async def test_the_last_member_leaving_deletes_the_chat(alice: Api, bob: Api) -> None:
    async with sockets(alice, bob) as (a, b):
        chat = await make_group(a, bob)
        message = await a.request("send_message", chat_id=chat["id"], text="soon gone")
        await b.request("leave_chat", chat_id=chat["id"])
        await a.next_event("member_removed")

        await a.request("leave_chat", chat_id=chat["id"])
        gone = await a.next_event("chat_deleted")
        assert gone == {
            "action": "chat_deleted",
            "data": {"chat_id": chat["id"], "by": alice.user_uuid},
        }
        assert await quiet(b, "chat_deleted") == []  # Bob had left already
        for api in (alice, bob):
            assert await rest_error(api.chat(chat["id"])) == (404, "not_found")
            assert await rest_error(api.history(chat["id"])) == (404, "not_found")
            assert await rest_error(api.call("GET", f"/messages/{message['id']}")) == (
                404,
                "not_found",
            )


async def test_leaving_over_rest_is_deleting_your_own_membership(alice: Api, bob: Api) -> None:
    async with sockets(alice, bob) as (a, b):
        chat = await make_group(a, bob)
        # Bob is a plain member: removing others is forbidden, but leaving is his right.
        assert await bob.call("DELETE", f"/chats/{chat['id']}/members/{bob.user_uuid}") is None
        for sock in (a, b):
            event = await sock.next_event("member_removed")
            assert event["data"] == {
                "chat_id": chat["id"],
                "user_uuid": bob.user_uuid,
                "by": bob.user_uuid,
            }
        assert roles(await alice.chat(chat["id"])) == [(alice.user_uuid, "owner")]
        assert await rest_error(bob.history(chat["id"])) == (404, "not_found")


# --- rename_chat --------------------------------------------------------------------------


async def test_rename_tells_every_member_the_new_name(alice: Api, bob: Api) -> None:
    async with sockets(alice, bob, bob) as (a, b1, b2):
        chat = await make_group(a, bob, name="old")
        renamed = await a.request("rename_chat", chat_id=chat["id"], name="  New name  ")
        assert renamed["name"] == "New name"
        assert renamed["members"] == chat["members"]
        for sock in (a, b1, b2):
            assert await sock.next_event("chat_updated") == {
                "action": "chat_updated",
                "data": renamed,
            }

        over_rest = await alice.call("PATCH", f"/chats/{chat['id']}", json={"name": "Third"})
        assert over_rest["name"] == "Third"
        assert (await b1.next_event("chat_updated"))["data"] == over_rest
        assert (await bob.chat(chat["id"]))["name"] == "Third"


async def test_rename_needs_a_name_of_1_to_100_characters(alice: Api, bob: Api) -> None:
    async with sockets(alice, bob) as (a, b):
        chat = await make_group(a, bob, name="keep")
        before = await alice.chat(chat["id"])
        for bad in ("", "   ", "x" * 101, "\u200b", "\u3164\u2800", "\u202e\u2066 \ufe0f"):
            code = await socket_error(a, "rename_chat", chat_id=chat["id"], name=bad)
            assert code == "invalid", bad
            assert await rest_error(
                alice.call("PATCH", f"/chats/{chat['id']}", json={"name": bad})
            ) == (422, "invalid")
        assert await alice.chat(chat["id"]) == before
        assert await quiet(b, "chat_updated") == []

        longest = await a.request("rename_chat", chat_id=chat["id"], name=" " + "y" * 100 + " ")
        assert longest["name"] == "y" * 100


async def test_a_plain_member_cannot_rename(alice: Api, bob: Api) -> None:
    async with sockets(alice, bob) as (a, b):
        chat = await make_group(a, bob, name="keep")
        before = await alice.chat(chat["id"])
        assert await socket_error(b, "rename_chat", chat_id=chat["id"], name="mine") == "forbidden"
        assert await rest_error(
            bob.call("PATCH", f"/chats/{chat['id']}", json={"name": "mine"})
        ) == (403, "forbidden")
        assert await alice.chat(chat["id"]) == before
        assert await quiet(a, "chat_updated") == []


# --- set_role -----------------------------------------------------------------------------


async def test_the_owner_promotes_and_demotes_and_members_are_told(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with sockets(alice, bob, carol) as (a, b, c):
        chat = await make_group(a, bob, carol)
        promoted = await a.request(
            "set_role", chat_id=chat["id"], user_uuid=bob.user_uuid, role="admin"
        )
        assert roles(promoted) == [
            (alice.user_uuid, "owner"),
            (bob.user_uuid, "admin"),
            (carol.user_uuid, "member"),
        ]
        for sock in (a, b, c):
            assert await sock.next_event("chat_updated") == {
                "action": "chat_updated",
                "data": promoted,
            }
        assert (await bob.chat(chat["id"]))["role"] == "admin"

        demoted = await alice.call(
            "PATCH", f"/chats/{chat['id']}/members/{bob.user_uuid}", json={"role": "member"}
        )
        assert roles(demoted)[1] == (bob.user_uuid, "member")
        assert (await c.next_event("chat_updated"))["data"] == demoted
        assert await socket_error(b, "rename_chat", chat_id=chat["id"], name="x") == "forbidden"


async def test_making_someone_owner_hands_the_ownership_over(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with sockets(alice, bob, carol) as (a, b, c):
        chat = await make_group(a, bob, carol)
        after = await a.request(
            "set_role", chat_id=chat["id"], user_uuid=bob.user_uuid, role="owner"
        )
        assert roles(after) == [
            (alice.user_uuid, "admin"),
            (bob.user_uuid, "owner"),
            (carol.user_uuid, "member"),
        ]
        for sock in (a, b, c):
            assert (await sock.next_event("chat_updated"))["data"] == after
        assert (await alice.chat(chat["id"]))["role"] == "admin"
        assert (await bob.chat(chat["id"]))["role"] == "owner"

        # Alice is an admin now: owner-only actions are closed to her, open to Bob.
        code = await socket_error(
            a, "set_role", chat_id=chat["id"], user_uuid=carol.user_uuid, role="admin"
        )
        assert code == "forbidden"
        assert await socket_error(a, "delete_chat", chat_id=chat["id"]) == "forbidden"
        handed_back = await bob.call(
            "PATCH", f"/chats/{chat['id']}/members/{alice.user_uuid}", json={"role": "owner"}
        )
        assert roles(handed_back)[:2] == [(alice.user_uuid, "owner"), (bob.user_uuid, "admin")]


async def test_set_role_refusals_change_nothing(alice: Api, bob: Api, carol: Api) -> None:
    async with sockets(alice, bob, carol) as (a, b, c):
        chat = await make_group(a, bob, carol)
        await a.request("set_role", chat_id=chat["id"], user_uuid=bob.user_uuid, role="admin")
        await c.next_event("chat_updated")
        before = await alice.chat(chat["id"])

        def set_role(sock: Socket, user: Api | str, role: str) -> Awaitable[str]:
            target = user if isinstance(user, str) else user.user_uuid
            return socket_error(sock, "set_role", chat_id=chat["id"], user_uuid=target, role=role)

        assert await set_role(a, alice, "member") == "invalid"  # own role
        assert await set_role(a, alice, "owner") == "invalid"
        assert await set_role(b, carol, "admin") == "forbidden"  # admins may not
        assert await set_role(b, alice, "member") == "forbidden"
        assert await set_role(c, bob, "member") == "forbidden"  # nor members
        assert await set_role(c, carol, "admin") == "forbidden"  # not even their own
        assert await set_role(a, str(uuid.uuid4()), "admin") == "not_found"
        assert await set_role(a, carol, "superuser") == "invalid"

        members = f"/chats/{chat['id']}/members"
        assert await rest_error(
            alice.call("PATCH", f"{members}/{alice.user_uuid}", json={"role": "admin"})
        ) == (422, "invalid")
        assert await rest_error(
            bob.call("PATCH", f"{members}/{carol.user_uuid}", json={"role": "admin"})
        ) == (403, "forbidden")
        assert await rest_error(
            alice.call("PATCH", f"{members}/{uuid.uuid4()}", json={"role": "admin"})
        ) == (404, "not_found")

        after = await alice.chat(chat["id"])
        assert after == before
        assert [m["role"] for m in after["members"]].count("owner") == 1
        assert await quiet(c, "chat_updated") == []


# --- delete_chat --------------------------------------------------------------------------


async def test_the_owner_deletes_the_chat_and_its_messages_for_everyone(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with sockets(alice, bob, bob, carol) as (a, b1, b2, c):
        chat = await make_group(a, bob, carol)
        message = await b1.request("send_message", chat_id=chat["id"], text="doomed")
        assert await a.request("delete_chat", chat_id=chat["id"]) is None
        expected = {
            "action": "chat_deleted",
            "data": {"chat_id": chat["id"], "by": alice.user_uuid},
        }
        for sock in (a, b1, b2, c):
            assert await sock.next_event("chat_deleted") == expected

        for api in (alice, bob, carol):
            assert await rest_error(api.history(chat["id"])) == (404, "not_found")
            assert await rest_error(api.chat(chat["id"])) == (404, "not_found")
            assert await rest_error(api.call("GET", f"/messages/{message['id']}")) == (
                404,
                "not_found",
            )
            assert chat["id"] not in [x["id"] for x in (await api.chats())["chats"]]
        assert await socket_error(b1, "send_message", chat_id=chat["id"], text="?") == "not_found"


async def test_delete_chat_over_rest(alice: Api, bob: Api) -> None:
    async with sockets(bob) as (b,):
        created = await alice.call(
            "POST", "/chats", json={"type": "group", "name": "rest", "user_ids": [bob.user_uuid]}
        )
        assert await alice.call("DELETE", f"/chats/{created['id']}") is None
        event = await b.next_event("chat_deleted")
        assert event["data"] == {"chat_id": created["id"], "by": alice.user_uuid}
        assert await rest_error(alice.chat(created["id"])) == (404, "not_found")


async def test_only_the_owner_may_delete_the_chat(alice: Api, bob: Api, carol: Api) -> None:
    async with sockets(alice, bob, carol) as (a, b, c):
        chat = await make_group(a, bob, carol)
        await a.request("set_role", chat_id=chat["id"], user_uuid=bob.user_uuid, role="admin")
        message = await a.request("send_message", chat_id=chat["id"], text="still here")
        before = await alice.chat(chat["id"])

        for sock, api in ((b, bob), (c, carol)):  # an admin, a member
            assert await socket_error(sock, "delete_chat", chat_id=chat["id"]) == "forbidden"
            assert await rest_error(api.call("DELETE", f"/chats/{chat['id']}")) == (
                403,
                "forbidden",
            )
        assert await alice.chat(chat["id"]) == before
        assert (await bob.call("GET", f"/messages/{message['id']}"))["text"] == "still here"
        assert await quiet(a, "chat_deleted") == []


# --- private chats ------------------------------------------------------------------------


async def test_private_chats_refuse_all_administration(
    alice: Api, bob: Api, carol: Api, http: httpx.AsyncClient
) -> None:
    async with sockets(alice, bob) as (a, b):
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        await a.request("send_message", chat_id=chat["id"], text="just us")
        before = await alice.chat(chat["id"])
        cid = chat["id"]

        refused = [
            ("add_members", {"user_ids": [carol.user_uuid]}),
            ("remove_member", {"user_uuid": bob.user_uuid}),
            ("remove_member", {"user_uuid": alice.user_uuid}),
            ("leave_chat", {}),
            ("rename_chat", {"name": "ours"}),
            ("set_role", {"user_uuid": bob.user_uuid, "role": "admin"}),
            ("set_role", {"user_uuid": bob.user_uuid, "role": "owner"}),
            ("set_role", {"user_uuid": alice.user_uuid, "role": "admin"}),
            ("delete_chat", {}),
        ]
        for action, fields in refused:
            assert await socket_error(a, action, chat_id=cid, **fields) == "forbidden", action

        auth = {"Authorization": f"Bearer {alice.access_token}"}
        routes = [
            ("POST", f"/chats/{cid}/members", {"user_ids": [carol.user_uuid]}),
            ("DELETE", f"/chats/{cid}/members/{bob.user_uuid}", None),
            ("DELETE", f"/chats/{cid}/members/{alice.user_uuid}", None),
            ("PATCH", f"/chats/{cid}", {"name": "ours"}),
            ("PATCH", f"/chats/{cid}/members/{bob.user_uuid}", {"role": "admin"}),
            ("DELETE", f"/chats/{cid}", None),
        ]
        for method, path, body in routes:
            response = await http.request(method, path, json=body, headers=auth)
            assert response.status_code == 403, (method, path)
            error = response.json()["error"]
            assert error["code"] == "forbidden"
            assert isinstance(error["message"], str) and error["message"]

        assert await alice.chat(cid) == before
        assert await rest_error(carol.chat(cid)) == (404, "not_found")
        await asyncio.sleep(0.3)
        for sock in (a, b):
            changes = [e for e in sock.pending_events() if e["action"] in ADMIN_EVENTS]
            assert changes == []


# --- read receipts and membership ---------------------------------------------------------


async def test_removing_the_last_unread_member_makes_the_message_read(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with sockets(alice, bob, carol) as (a, b, c):
        chat = await make_group(a, bob, carol)
        message = await a.request("send_message", chat_id=chat["id"], text="read me")
        await b.request("mark_read", message_ids=[message["id"]])
        assert await quiet(a, "message_read") == []  # Carol has not read it

        await a.request("remove_member", chat_id=chat["id"], user_uuid=carol.user_uuid)
        receipt = await a.next_event("message_read")
        assert receipt == {
            "action": "message_read",
            "data": {"message_id": message["id"], "chat_id": chat["id"]},
        }
        assert (await alice.history(chat["id"]))["messages"][0]["read_status"] == "read"
        assert await quiet(a, "message_read") == []  # once
        assert await quiet(c, "message_read", wait=0) == []


async def test_the_last_unread_member_leaving_makes_the_message_read(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with sockets(alice, carol) as (a, c):
        chat = await make_group(a, bob, carol)
        message = await a.request("send_message", chat_id=chat["id"], text="read me")
        await c.request("mark_read", message_ids=[message["id"]])
        assert await quiet(a, "message_read") == []  # Bob has not read it

        await bob.call("DELETE", f"/chats/{chat['id']}/members/{bob.user_uuid}")
        receipt = await a.next_event("message_read")
        assert receipt["data"] == {"message_id": message["id"], "chat_id": chat["id"]}
        assert (await carol.history(chat["id"]))["messages"][0]["read_status"] == "read"


async def test_everyone_leaving_at_once_deletes_the_chat_exactly_once(make_user) -> None:
    users = [await make_user(f"L{n}") for n in range(6)]
    async with sockets(*users) as socks:
        chat = await make_group(socks[0], *users[1:])
        results = await asyncio.gather(
            *[s.request("leave_chat", chat_id=chat["id"]) for s in socks]
        )
        assert results == [None] * len(socks)
        # A leaver's events are queued before its ack, so every chat_deleted is here already.
        await asyncio.sleep(0.1)
        told = [
            [e["data"] for e in sock.pending_events() if e["action"] == "chat_deleted"]
            for sock in socks
        ]
        assert sorted(len(t) for t in told) == [0] * (len(socks) - 1) + [1]
        ((last, event),) = [(user, t[0]) for user, t in zip(users, told, strict=True) if t]
        assert event == {"chat_id": chat["id"], "by": last.user_uuid}
        for user in users:
            assert await rest_error(user.chat(chat["id"])) == (404, "not_found")


async def test_many_messages_read_at_once_come_as_one_range_receipt(
    alice: Api, bob: Api, carol: Api
) -> None:
    """Over 100 of one sender's messages becoming read at once: one messages_read, no flood."""
    async with sockets(alice, bob, carol) as (a, b, c):
        chat = await make_group(a, bob, carol)
        sent = await asyncio.gather(
            *(a.request("send_message", chat_id=chat["id"], text=f"{n}") for n in range(250))
        )
        last = max(m["id"] for m in sent)
        await b.request("mark_read", message_ids=[last])
        await c.request("mark_read", message_ids=[sorted(m["id"] for m in sent)[99]])
        receipts = [e for e in await quiet_all(a) if e["action"] == "message_read"]
        assert len(receipts) == 100  # Carol's read made the first 100 read by all, one by one

        await a.request("remove_member", chat_id=chat["id"], user_uuid=carol.user_uuid)
        events = [e for e in await quiet_all(a) if e["action"] in ("message_read", "messages_read")]
        assert events == [
            {"action": "messages_read", "data": {"chat_id": chat["id"], "up_to_message_id": last}}
        ]
        history = (await alice.history(chat["id"], page_size=200))["messages"]
        assert {m["read_status"] for m in history} == {"read"}


async def quiet_all(sock: Socket, wait: float = 0.5) -> list[dict]:
    await asyncio.sleep(wait)
    return sock.pending_events()


async def test_a_group_holds_10000_members_and_no_more(
    alice: Api, bob: Api, server: Server, database_url: str
) -> None:
    """Filled 1000 at a time to the cap; a message reaches the members online; the
    10,001st is refused and changes nothing."""
    tokens = await bulk_users(database_url, server, MAX_GROUP_MEMBERS - 1)
    ids = list(tokens)
    async with sockets(alice) as (a,):
        chat = await a.request(
            "create_chat", type="group", name="big", user_ids=ids[: MAX_USERS_PER_CALL - 1]
        )
        for start in range(MAX_USERS_PER_CALL - 1, len(ids), MAX_USERS_PER_CALL):
            chunk = ids[start : start + MAX_USERS_PER_CALL]
            chat = await a.request("add_members", chat_id=chat["id"], user_ids=chunk)
        assert [m["user_uuid"] for m in chat["members"]] == [alice.user_uuid, *ids]
        assert roles(chat)[0] == (alice.user_uuid, "owner")
        assert {role for _, role in roles(chat)[1:]} == {"member"}

        online = [ids[0], ids[len(ids) // 2], ids[-1]]
        members = [await Socket.open(server.ws_url, tokens[user]) for user in online]
        try:
            # The 10,001st, alone or beside a member already in: refused, nobody added.
            for extra in ([bob.user_uuid], [ids[0], bob.user_uuid]):
                error = await socket_error(a, "add_members", chat_id=chat["id"], user_ids=extra)
                assert error == "invalid"
            assert (await alice.chat(chat["id"]))["members"] == chat["members"]
            assert await rest_error(bob.chat(chat["id"])) == (404, "not_found")

            sent = await a.request("send_message", chat_id=chat["id"], text="to all")
            for sock in members:  # no member_added came before it: the refusals told nobody
                event = await sock.next_event()
                assert event["action"] == "new_message"
                assert event["data"]["id"] == sent["id"]
            overview = await members[1].request("get_chat", chat_id=chat["id"])
            assert overview["members"] == chat["members"]
            assert overview["unread_count"] == 1
        finally:
            for sock in members:
                await sock.close()
