"""Avatars and group photos: set, shown, announced, readable by whom they should be, and
released when replaced."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from PIL import Image

from chatd.client import Api, ChatdError
from tests.conftest import Server, new_user, start_server, stop_server


def png(color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(out, "PNG")
    return out.getvalue()


async def image(api: Api, color: tuple[int, int, int] = (200, 40, 40)) -> str:
    return (await api.upload(png(color), "face.png"))["upload_id"]


async def group(owner: Api, *members: Api) -> dict:
    body = {"type": "group", "name": "Photos", "user_ids": [m.user_uuid for m in members]}
    return await owner.call("POST", "/chats", json=body)


async def refused(call: object) -> str:
    with pytest.raises(ChatdError) as caught:
        await call  # type: ignore[misc]
    return caught.value.code


async def test_an_avatar_is_set_shown_announced_and_removed(
    alice: Api, bob: Api, carol: Api
) -> None:
    chat = await group(alice, bob)
    avatar = await image(alice)
    async with await bob.connect() as b, await carol.connect() as c:
        me = await alice.update_me(avatar=avatar)
        assert me["avatar"] == avatar and me["name"]
        event = await b.next_event("user_updated")
        assert event["data"] == {"user_uuid": alice.user_uuid, "name": me["name"], "avatar": avatar}
        # Carol shares no chat with Alice: she hears nothing.
        await asyncio.sleep(0.3)
        assert not [e for e in c.pending_events() if e["action"] == "user_updated"]

        # The same again changes nothing and announces nothing.
        await alice.update_me(avatar=avatar)
        await alice.update_me(name=me["name"])
        await asyncio.sleep(0.3)
        assert not [e for e in b.pending_events() if e["action"] == "user_updated"]

        assert (await alice.me())["avatar"] == avatar
        members = (await bob.chat(chat["id"]))["members"]
        assert {m["user_uuid"]: m["avatar"] for m in members} == {
            alice.user_uuid: avatar,
            bob.user_uuid: None,
        }
        # By her email: every test's Alice has her name, and the list shows one page.
        listed = await carol.call("GET", "/users_list", params={"q": alice.email})  # type: ignore[attr-defined]
        assert [(u["user_uuid"], u["avatar"]) for u in listed["users"]] == [
            (alice.user_uuid, avatar)
        ]

        # Anyone signed in may read an avatar (it is shown beside every message).
        assert await carol.download(avatar) == png()

        await alice.update_me(avatar=None)
        event = await b.next_event("user_updated")
        assert event["data"]["avatar"] is None
    assert (await alice.me())["avatar"] is None
    # No longer an avatar, not attached anywhere: only its uploader reads it now.
    assert await refused(carol.download(avatar)) == "not_found"
    assert await alice.download(avatar) == png()


async def test_an_avatar_must_be_your_own_image(alice: Api, bob: Api) -> None:
    text = (await alice.upload(b"just text", "notes.txt"))["upload_id"]
    bobs = await image(bob)
    html = (await alice.upload(b"<html><script>alert(1)</script>", "x.png"))["upload_id"]
    for bad in (text, bobs, html, str(uuid.uuid4()), "not-a-uuid"):
        assert await refused(alice.update_me(avatar=bad)) == "invalid"
    assert (await alice.me())["avatar"] is None  # nothing changed
    assert await refused(bob.download(text)) == "not_found"


async def test_a_group_photo_is_for_admins_and_members_see_it(
    alice: Api, bob: Api, carol: Api
) -> None:
    chat = await group(alice, bob)
    photo = await image(alice, (0, 90, 200))
    async with await bob.connect() as b:
        updated = await alice.call("PATCH", f"/chats/{chat['id']}", json={"photo": photo})
        assert updated["photo"] == photo and updated["name"] == "Photos"
        event = await b.next_event("chat_updated")
        assert event["data"]["photo"] == photo
    listed = await bob.chats()
    assert [c["photo"] for c in listed["chats"] if c["id"] == chat["id"]] == [photo]
    assert await bob.download(photo) == png((0, 90, 200))
    # Not a member: as if there were no such file.
    assert await refused(carol.download(photo)) == "not_found"

    # A plain member may not; an outsider cannot tell the chat exists; a name alone works.
    bobs = await image(bob)
    assert (
        await refused(bob.call("PATCH", f"/chats/{chat['id']}", json={"photo": bobs}))
        == "forbidden"
    )
    assert (
        await refused(carol.call("PATCH", f"/chats/{chat['id']}", json={"photo": None}))
        == "not_found"
    )
    renamed = await alice.call("PATCH", f"/chats/{chat['id']}", json={"name": "Renamed"})
    assert (renamed["name"], renamed["photo"]) == ("Renamed", photo)
    cleared = await alice.call("PATCH", f"/chats/{chat['id']}", json={"photo": None})
    assert cleared["photo"] is None

    # Private chats have no photo: they show the other member's avatar.
    private = await alice.call(
        "POST", "/chats", json={"type": "private", "user_ids": [carol.user_uuid]}
    )
    assert private["photo"] is None
    assert (
        await refused(alice.call("PATCH", f"/chats/{private['id']}", json={"photo": photo}))
        == "forbidden"
    )


async def test_update_chat_on_the_socket(alice: Api, bob: Api) -> None:
    chat = await group(alice, bob)
    photo = await image(alice)
    async with await alice.connect() as a:
        updated = await a.request("update_chat", chat_id=chat["id"], photo=photo, name="Both")
        assert (updated["name"], updated["photo"]) == ("Both", photo)
        # rename_chat still works, and keeps the photo.
        renamed = await a.request("rename_chat", chat_id=chat["id"], name="Again")
        assert (renamed["name"], renamed["photo"]) == ("Again", photo)


@pytest.fixture
async def gc_server(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Server]:
    workdir: Path = tmp_path_factory.mktemp("avatars-gc")
    server = start_server(database_url, workdir, CHATD_FILE_GRACE="1", CHATD_FILE_GC_INTERVAL="1")
    yield server
    stop_server(server)


async def test_replaced_avatars_and_photos_are_collected(
    gc_server: Server, database_url: str
) -> None:
    alice, bob = await new_user(gc_server, "Alice"), await new_user(gc_server, "Bob")
    try:
        old_avatar, new_avatar = await image(alice, (1, 1, 1)), await image(alice, (2, 2, 2))
        old_photo, new_photo = await image(alice, (3, 3, 3)), await image(alice, (4, 4, 4))
        chat = await group(alice, bob)
        await alice.update_me(avatar=old_avatar)
        await alice.call("PATCH", f"/chats/{chat['id']}", json={"photo": old_photo})
        await alice.update_me(avatar=new_avatar)
        await alice.call("PATCH", f"/chats/{chat['id']}", json={"photo": new_photo})

        conn = await asyncpg.connect(database_url)
        try:
            ids = [uuid.UUID(i) for i in (old_avatar, new_avatar, old_photo, new_photo)]
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                rows = await conn.fetch("SELECT id FROM files WHERE id = ANY($1)", ids)
                if len(rows) == 2:
                    break
                await asyncio.sleep(0.3)
            assert {r["id"] for r in rows} == {ids[1], ids[3]}
        finally:
            await conn.close()
        assert await bob.download(new_avatar) == png((2, 2, 2))
        assert await refused(alice.download(old_avatar)) == "not_found"
    finally:
        await alice.aclose()
        await bob.aclose()
