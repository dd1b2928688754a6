"""Blocking: a blocked user cannot open a private chat with you, write to you privately,
or add you to groups; in groups your client learns whom you block and collapses them."""

from __future__ import annotations

import uuid

import pytest

from chatd.client import Api, ChatdError
from tests.conftest import UserFactory


async def refused(call: object, status: int, code: str) -> None:
    with pytest.raises(ChatdError) as caught:
        await call  # type: ignore[misc]
    assert (caught.value.status, caught.value.code) == (status, code), caught.value


async def private_chat(a: Api, b: Api) -> dict:
    return await a.call("POST", "/chats", json={"type": "private", "user_ids": [b.user_uuid]})


async def send(api: Api, chat_id: int, text: str) -> dict:
    return await api.call("POST", f"/chats/{chat_id}/messages", json={"text": text})


async def test_block_and_unblock_tell_every_socket_of_the_blocker(
    make_user: UserFactory,
) -> None:
    alice, bob, carol = await make_user("Alice"), await make_user("Bob"), await make_user("Carol")
    async with await alice.connect() as first, await alice.connect() as second:
        assert "blocked" not in first.unread  # type: ignore[operator]
        listed = await first.request("block_user", user_uuid=bob.user_uuid)
        assert listed == {"blocked": [bob.user_uuid]}
        assert (await second.next_event("blocks_changed"))["data"] == listed
        again = await first.request("block_user", user_uuid=bob.user_uuid)
        assert again == listed  # no change, no event
        both = {"blocked": await alice.block(carol.user_uuid or "")}
        assert both == {"blocked": [carol.user_uuid, bob.user_uuid]}
        assert (await second.next_event("blocks_changed"))["data"] == both  # once
    users = (await alice.call("GET", "/me/blocks"))["users"]
    assert users == [
        {"user_uuid": carol.user_uuid, "name": "Carol", "avatar": None},
        {"user_uuid": bob.user_uuid, "name": "Bob", "avatar": None},
    ]
    async with await alice.connect() as fresh:
        assert fresh.unread["blocked"] == [carol.user_uuid, bob.user_uuid]  # type: ignore[index]
        left = await fresh.request("unblock_user", user_uuid=carol.user_uuid)
        assert left == {"blocked": [bob.user_uuid]}
        assert await fresh.request("unblock_user", user_uuid=carol.user_uuid) == left
    assert await alice.unblock(bob.user_uuid or "") == []
    assert (await bob.call("GET", "/me/blocks"))["users"] == []  # never Bob's list


async def test_bad_blocks_are_refused(make_user: UserFactory) -> None:
    alice = await make_user("Alice")
    await refused(alice.call("PUT", f"/me/blocks/{alice.user_uuid}"), 422, "invalid")
    await refused(alice.call("PUT", f"/me/blocks/{uuid.uuid4()}"), 404, "not_found")
    await refused(alice.call("PUT", "/me/blocks/not-a-uuid"), 422, "invalid")
    async with await alice.connect() as sock:
        await refused(sock.request("block_user", user_uuid="x"), None, "invalid")
        assert await sock.request("list_chats") is not None  # the socket lives on
    assert (await alice.call("GET", "/me/blocks"))["users"] == []


async def test_a_blocked_user_cannot_open_a_private_chat_or_write_in_one(
    make_user: UserFactory,
) -> None:
    alice, bob = await make_user("Alice"), await make_user("Bob")
    chat = await private_chat(bob, alice)
    await send(bob, chat["id"], "hello")
    await alice.call("PUT", f"/me/blocks/{bob.user_uuid}")

    await refused(private_chat(bob, alice), 403, "forbidden")
    await refused(send(bob, chat["id"], "are you there?"), 403, "forbidden")
    async with await bob.connect() as sock:
        await refused(
            sock.request("send_message", chat_id=chat["id"], text="socket too"), None, "forbidden"
        )
        await refused(
            sock.request("send_message", chat_id=chat["id"], text="retry", client_msg_id="k1"),
            None,
            "forbidden",
        )
    # Alice cannot write to him either while she blocks him; she can still read.
    await refused(send(alice, chat["id"], "go away"), 403, "forbidden")
    history = await alice.history(chat["id"])
    assert [m["text"] for m in history["messages"]] == ["hello"]
    assert (await private_chat(alice, bob))["id"] == chat["id"]  # hers to open

    await alice.call("DELETE", f"/me/blocks/{bob.user_uuid}")
    assert (await send(bob, chat["id"], "sorry"))["text"] == "sorry"


async def test_a_forward_into_a_blocked_private_chat_is_refused(make_user: UserFactory) -> None:
    alice, bob = await make_user("Alice"), await make_user("Bob")
    chat = await private_chat(bob, alice)
    group = await bob.call("POST", "/chats", json={"type": "group", "name": "G", "user_ids": []})
    note = await send(bob, group["id"], "look")
    await alice.call("PUT", f"/me/blocks/{bob.user_uuid}")
    forward = bob.call("POST", f"/messages/{note['id']}/forward", json={"chat_id": chat["id"]})
    await refused(forward, 403, "forbidden")
    assert (await alice.history(chat["id"]))["messages"] == []


async def test_a_blocked_user_cannot_add_you_to_groups(make_user: UserFactory) -> None:
    alice, bob, carol = await make_user("Alice"), await make_user("Bob"), await make_user("Carol")
    await alice.call("PUT", f"/me/blocks/{bob.user_uuid}")
    create = bob.call(
        "POST",
        "/chats",
        json={"type": "group", "name": "Trap", "user_ids": [carol.user_uuid, alice.user_uuid]},
    )
    await refused(create, 403, "forbidden")
    group = await bob.call(
        "POST", "/chats", json={"type": "group", "name": "G", "user_ids": [carol.user_uuid]}
    )
    add = bob.call("POST", f"/chats/{group['id']}/members", json={"user_ids": [alice.user_uuid]})
    await refused(add, 403, "forbidden")
    assert len((await bob.chat(group["id"]))["members"]) == 2
    assert (await alice.chats())["chats"] == []
    # Carol, whom Alice does not block, may add her; Bob's messages there reach her, and
    # her client knows to collapse them.
    await bob.call(
        "PATCH", f"/chats/{group['id']}/members/{carol.user_uuid}", json={"role": "admin"}
    )
    await carol.call("POST", f"/chats/{group['id']}/members", json={"user_ids": [alice.user_uuid]})
    async with await alice.connect() as sock:
        assert sock.unread["blocked"] == [bob.user_uuid]  # type: ignore[index]
        sent = await send(bob, group["id"], "in the group")
        event = await sock.next_event("new_message")
        assert event["data"]["id"] == sent["id"]
        assert event["data"]["sender_uuid"] in sock.unread["blocked"]  # type: ignore[index]
