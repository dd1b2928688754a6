"""DELETE /me (keep and erase) and GET /me/export, end to end against real servers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from chatd.client import Api, ChatdError
from chatd.handlers.accounts import DELETED_NAME, EXPORT_PAGE
from tests.conftest import (
    PASSWORD,
    Server,
    UserFactory,
    assert_no_tracebacks,
    new_user,
    start_server,
    stop_server,
)


@pytest.fixture(scope="module")
def erasing_server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        database_url, tmp_path_factory.mktemp("erase"), CHATD_DELETED_USER_MESSAGES="erase"
    )
    yield srv
    stop_server(srv)
    assert_no_tracebacks(srv)


async def delete_account(api: Api, password: str = PASSWORD) -> None:
    await api.call("DELETE", "/me", json={"password": password})


async def scene(alice: Api, bob: Api, carol: Api) -> tuple[dict, dict, list[dict]]:
    """Alice owns a group with Bob (admin) and Carol, and has a private chat with Bob;
    she has written in both."""
    group = await alice.call(
        "POST",
        "/chats",
        json={"type": "group", "name": "G", "user_ids": [carol.user_uuid, bob.user_uuid]},
    )
    await alice.call(
        "PATCH", f"/chats/{group['id']}/members/{bob.user_uuid}", json={"role": "admin"}
    )
    private = await alice.call(
        "POST", "/chats", json={"type": "private", "user_ids": [bob.user_uuid]}
    )
    sent = []
    for chat, text in ((group, "hello group"), (private, "hello bob"), (group, "pinned")):
        sent.append(await alice.call("POST", f"/chats/{chat['id']}/messages", json={"text": text}))
    await alice.call("PUT", f"/chats/{group['id']}/pin", json={"message_id": sent[2]["id"]})
    await bob.call("POST", f"/chats/{private['id']}/messages", json={"text": "hi alice"})
    return group, private, sent


async def test_deleting_needs_the_password_and_changes_nothing_without_it(
    make_user: UserFactory,
) -> None:
    alice = await make_user("Alice")
    for body in ({"password": "wrong password"}, {}):
        with pytest.raises(ChatdError) as caught:
            await alice.call("DELETE", "/me", json=body)
        assert caught.value.status in (403, 422)
    assert (await alice.me())["name"] == "Alice"


async def test_delete_keep_leaves_messages_from_deleted_account(
    server: Server, make_user: UserFactory
) -> None:
    alice, bob, carol = await make_user("Alice"), await make_user("Bob"), await make_user("Carol")
    group, private, _ = await scene(alice, bob, carol)
    other_session = Api(server.base_url)
    await other_session.login(alice.email, PASSWORD)  # type: ignore[attr-defined]
    async with await alice.connect() as alice_socket, await bob.connect() as bob_socket:
        await delete_account(alice)
        assert await alice_socket.wait_closed() == 1008
        removed = await bob_socket.next_event("member_removed")
        assert removed["data"]["user_uuid"] == alice.user_uuid
        updated = await bob_socket.next_event("chat_updated")
        owner = [m for m in updated["data"]["members"] if m["role"] == "owner"]
        assert [m["user_uuid"] for m in owner] == [bob.user_uuid]  # the admin inherits

    for api in (alice, other_session):
        with pytest.raises(ChatdError) as caught:
            await api.me()
        assert caught.value.status == 401
    with pytest.raises(ChatdError) as caught:
        await Api(server.base_url).login(alice.email, PASSWORD)  # type: ignore[attr-defined]
    assert caught.value.code == "invalid_credentials"

    # Her messages stay, from a member now named "Deleted account".
    texts = [m["text"] for m in (await bob.history(private["id"]))["messages"]]
    assert texts == ["hello bob", "hi alice"]
    members = {m["user_uuid"]: m["name"] for m in (await bob.chat(private["id"]))["members"]}
    assert members[alice.user_uuid] == DELETED_NAME
    assert [m["text"] for m in (await carol.history(group["id"]))["messages"]] == [
        "hello group",
        "pinned",
    ]
    assert alice.user_uuid not in [
        m["user_uuid"] for m in (await carol.chat(group["id"]))["members"]
    ]
    # Gone from the user list; nobody can put her in a chat; her address is free again.
    assert await bob.users(q=alice.email) == []  # type: ignore[attr-defined]
    with pytest.raises(ChatdError) as caught:
        await bob.call(
            "POST", "/chats", json={"type": "group", "name": "X", "user_ids": [alice.user_uuid]}
        )
    assert caught.value.status == 404
    again = Api(server.base_url)
    await again.register("Alice again", alice.email, PASSWORD)  # type: ignore[attr-defined]
    await again.login(alice.email, PASSWORD)  # type: ignore[attr-defined]
    assert again.user_uuid != alice.user_uuid
    for api in (other_session, again):
        await api.aclose()


async def test_delete_erase_deletes_the_messages_for_everyone(erasing_server: Server) -> None:
    alice = await new_user(erasing_server, "Alice")
    bob, carol = await new_user(erasing_server, "Bob"), await new_user(erasing_server, "Carol")
    group, private, sent = await scene(alice, bob, carol)
    held = (await bob.history(private["id"]))["messages"]
    async with await bob.connect() as bob_socket:
        await delete_account(alice)
        tombstones = {}
        while len(tombstones) < 3:
            event = await bob_socket.next_event("message_updated")
            tombstones[event["data"]["id"]] = event["data"]
        assert set(tombstones) == {m["id"] for m in sent}
        assert all(t["deleted"] and t["text"] == "" for t in tombstones.values())
        # The pinned message went with them; a sync from before replays the erasure.
        assert (await bob.chat(group["id"]))["pinned_message_id"] is None
        since = {"seq": held[-1]["seq"], "version": held[-1]["version"]}
        synced = await bob_socket.request("sync", chats={str(private["id"]): since})
        entry = synced["chats"][str(private["id"])]
        assert [m["id"] for m in entry["updated"] if m["deleted"]] == [sent[1]["id"]]
    history = (await bob.history(private["id"]))["messages"]
    assert [(m["text"], m["deleted"]) for m in history] == [("", True), ("hi alice", False)]
    for api in (alice, bob, carol):
        await api.aclose()


async def test_export_holds_the_profile_chats_and_own_messages(
    database_url: str, make_user: UserFactory
) -> None:
    alice, bob, carol = await make_user("Alice"), await make_user("Bob"), await make_user("Carol")
    group, private, sent = await scene(alice, bob, carol)
    await alice.call("PUT", f"/me/blocks/{carol.user_uuid}")
    uploaded = await alice.http.post(
        "/uploads",
        params={"name": "notes.txt"},
        content=b"my notes",
        headers={"Authorization": f"Bearer {alice.access_token}", "Content-Type": "text/plain"},
    )
    assert uploaded.status_code == 201, uploaded.text
    export = await alice.call("GET", "/me/export")
    assert [(f["id"], f["name"], f["size"]) for f in export["files"]] == [
        (uploaded.json()["upload_id"], "notes.txt", 8)
    ]
    assert export["profile"] == await alice.me()
    assert [s["current"] for s in export["sessions"]] == [True]
    assert export["blocked"] == [{"user_uuid": carol.user_uuid, "name": "Carol", "avatar": None}]
    assert [(c["id"], c["role"]) for c in export["chats"]] == [
        (group["id"], "owner"),
        (private["id"], "member"),
    ]
    assert [m["id"] for m in export["messages"]] == [m["id"] for m in sent]  # not Bob's
    assert (export["has_more"], export["next_after"]) == (False, None)

    # Page by page: a big history comes in pages of EXPORT_PAGE.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "WITH c AS (UPDATE chats SET last_seq = last_seq + $3 WHERE id = $1"
            " RETURNING last_seq - $3 AS base)"
            " INSERT INTO messages (chat_id, seq, sender_id, text)"
            " SELECT $1, c.base + n, $2, 'bulk ' || n FROM c, generate_series(1, $3) n",
            group["id"],
            uuid.UUID(alice.user_uuid or ""),
            EXPORT_PAGE,
        )
    finally:
        await conn.close()
    first = await alice.call("GET", "/me/export")
    assert len(first["messages"]) == EXPORT_PAGE and first["has_more"]
    rest = await alice.call("GET", "/me/export", params={"after": first["next_after"]})
    assert len(rest["messages"]) == 3 and not rest["has_more"]
    assert (len(first["files"]), rest["files"]) == (1, [])  # files: on the first page
    ids = [m["id"] for m in first["messages"] + rest["messages"]]
    assert ids == sorted(set(ids))
    whole = await alice.export()  # the SDK gathers the pages
    assert [m["id"] for m in whole["messages"]] == ids


async def test_export_needs_a_token(http: httpx.AsyncClient) -> None:
    assert (await http.get("/me/export")).status_code == 401
