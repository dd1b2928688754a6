"""Writes that queue on the same chat: each decides on the chat as it is once it holds the lock.

A test holds the chat's row lock from its own connection, queues requests behind it in a
known order, then lets go; the requests then run one after the other, as under load.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import asyncpg

from chatd.client import Api, ChatdError


@contextlib.asynccontextmanager
async def chat_locked(database_url: str, chat_id: int) -> AsyncIterator[None]:
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM chats WHERE id = $1 FOR UPDATE", chat_id)
            yield
    finally:
        await conn.close()


async def outcome(call: Awaitable[Any]) -> tuple[int, str]:
    """(status, error code or "ok") of a REST call."""
    try:
        await call
    except ChatdError as exc:
        return exc.status or 0, exc.code
    return 200, "ok"


async def queued(database_url: str, chat_id: int, *calls: Awaitable[Any]) -> list[tuple[int, str]]:
    """Run `calls` one after the other in the chat's lock queue; return their outcomes."""
    tasks = []
    async with chat_locked(database_url, chat_id):
        for call in calls:
            tasks.append(asyncio.ensure_future(outcome(call)))
            await asyncio.sleep(0.3)  # let it reach the lock before the next one queues
    return list(await asyncio.gather(*tasks))


async def group(owner: Api, *members: Api) -> int:
    body = {"type": "group", "name": "g", "user_ids": [m.user_uuid for m in members]}
    return (await owner.call("POST", "/chats", json=body))["id"]


def roles(chat: dict) -> dict[str, str]:
    return {m["user_uuid"]: m["role"] for m in chat["members"]}


async def test_a_member_removed_while_their_send_waits_stores_nothing(
    alice: Api, bob: Api, database_url: str
) -> None:
    chat_id = await group(alice, bob)
    results = await queued(
        database_url,
        chat_id,
        alice.call("DELETE", f"/chats/{chat_id}/members/{bob.user_uuid}"),
        bob.call("POST", f"/chats/{chat_id}/messages", json={"text": "too late"}),
    )
    assert results == [(200, "ok"), (404, "not_found")]
    assert (await alice.history(chat_id))["messages"] == []
    assert (await alice.chat(chat_id))["last_seq"] == 0


async def test_two_ownership_handovers_in_a_row_leave_one_owner(
    alice: Api, bob: Api, carol: Api, database_url: str
) -> None:
    chat_id = await group(alice, bob, carol)
    members = f"/chats/{chat_id}/members"
    results = await queued(
        database_url,
        chat_id,
        alice.call("PATCH", f"{members}/{bob.user_uuid}", json={"role": "owner"}),
        alice.call("PATCH", f"{members}/{carol.user_uuid}", json={"role": "owner"}),
    )
    assert results == [(200, "ok"), (403, "forbidden")]  # Alice is no longer the owner
    assert roles(await alice.chat(chat_id)) == {
        alice.user_uuid: "admin",
        bob.user_uuid: "owner",
        carol.user_uuid: "member",
    }


async def test_an_heir_leaving_right_after_the_handover_passes_ownership_on(
    alice: Api, bob: Api, carol: Api, database_url: str
) -> None:
    chat_id = await group(alice, bob, carol)
    results = await queued(
        database_url,
        chat_id,
        alice.call("PATCH", f"/chats/{chat_id}/members/{bob.user_uuid}", json={"role": "owner"}),
        bob.call("DELETE", f"/chats/{chat_id}/members/{bob.user_uuid}"),
    )
    assert results == [(200, "ok"), (200, "ok")]
    # Bob left as the owner: the oldest admin (Alice, demoted by the handover) takes over.
    assert roles(await carol.chat(chat_id)) == {alice.user_uuid: "owner", carol.user_uuid: "member"}


async def test_a_former_owner_cannot_act_on_rights_they_lost_while_waiting(
    alice: Api, bob: Api, carol: Api, database_url: str
) -> None:
    chat_id = await group(alice, bob, carol)
    await alice.call("PATCH", f"/chats/{chat_id}/members/{bob.user_uuid}", json={"role": "admin"})
    results = await queued(
        database_url,
        chat_id,
        alice.call("DELETE", f"/chats/{chat_id}/members/{alice.user_uuid}"),  # leaves
        alice.call("DELETE", f"/chats/{chat_id}"),
    )
    assert results == [(200, "ok"), (404, "not_found")]
    assert roles(await bob.chat(chat_id)) == {bob.user_uuid: "owner", carol.user_uuid: "member"}

    # An admin demoted while their add_members waits adds nobody.
    await bob.call("PATCH", f"/chats/{chat_id}/members/{carol.user_uuid}", json={"role": "admin"})
    results = await queued(
        database_url,
        chat_id,
        bob.call("PATCH", f"/chats/{chat_id}/members/{carol.user_uuid}", json={"role": "member"}),
        carol.call("POST", f"/chats/{chat_id}/members", json={"user_ids": [alice.user_uuid]}),
    )
    assert results == [(200, "ok"), (403, "forbidden")]
    assert roles(await bob.chat(chat_id)) == {bob.user_uuid: "owner", carol.user_uuid: "member"}
