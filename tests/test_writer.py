"""MessageWriter (group commit) against the real database: sends that share a batch.

These drive the writer directly, so the order in which sends join a batch is known.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from chatd.client import Api, ChatdError
from chatd.db import create_pool
from chatd.hub import Hub, LocalBus
from chatd.protocol import ChatError
from chatd.writer import MessageWriter


@pytest.fixture
async def writer(database_url: str) -> AsyncIterator[MessageWriter]:
    pool = await create_pool(database_url, 4)
    try:
        yield MessageWriter(pool, LocalBus(Hub()))
    finally:
        await pool.close()


async def group_of(owner: Api, *members: Api) -> int:
    body = {"type": "group", "name": "w", "user_ids": [m.user_uuid for m in members]}
    return (await owner.call("POST", "/chats", json=body))["id"]


async def count(database_url: str, chat_id: int) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM messages WHERE chat_id = $1", chat_id)
    finally:
        await conn.close()


async def test_a_retry_next_to_its_cancelled_original_still_gets_the_message(
    writer: MessageWriter, alice: Api, database_url: str
) -> None:
    chat_id = await group_of(alice)
    me = uuid.UUID(alice.user_uuid)
    original = asyncio.create_task(writer.store(me, chat_id, "once", "k-1"))
    retry = asyncio.create_task(writer.store(me, chat_id, "once", "k-1"))
    await asyncio.sleep(0)  # both queued in the same batch
    original.cancel()  # its socket went away
    message, new = await asyncio.wait_for(retry, 10)
    assert (message.text, message.seq, new) == ("once", 1, False)
    assert await count(database_url, chat_id) == 1


async def test_a_reused_key_is_judged_by_what_was_stored(
    writer: MessageWriter, alice: Api, bob: Api, database_url: str
) -> None:
    theirs = await group_of(bob)  # Alice is not in it
    mine = await group_of(alice)
    me = uuid.UUID(alice.user_uuid)
    results = await asyncio.gather(
        writer.store(me, theirs, "nope", "k-2"),
        writer.store(me, mine, "yes", "k-2"),
        return_exceptions=True,
    )
    refused, stored = results
    assert isinstance(refused, ChatError) and refused.code == "not_found"
    assert not isinstance(stored, BaseException)
    message, new = stored
    assert (message.chat_id, message.text, new) == (mine, "yes", True)
    assert await count(database_url, mine) == 1
    assert await count(database_url, theirs) == 0


async def test_sends_keep_coming_after_batches_finish(writer: MessageWriter, alice: Api) -> None:
    chat_id = await group_of(alice)
    me = uuid.UUID(alice.user_uuid)
    for n in range(20):  # quiet moments between sends: every one must still be answered
        message, _ = await asyncio.wait_for(writer.store(me, chat_id, f"{n}", None), 10)
        assert message.seq == n + 1
    # And ChatdError stays the client's name for a refusal (used by the socket tests).
    assert issubclass(ChatdError, Exception)


async def test_one_batch_over_several_chats_stores_each_in_its_order(
    writer: MessageWriter, alice: Api, database_url: str
) -> None:
    # Three chats in one batch: the lock statement takes one parameter per chat, their
    # number rounded up to four (the last chat repeated), and locks each once.
    chats = [await group_of(alice) for _ in range(3)]
    me = uuid.UUID(alice.user_uuid)
    sends = [
        writer.store(me, chat_id, f"{chat_id}-{n}", None) for n in range(2) for chat_id in chats
    ]
    stored = await asyncio.wait_for(asyncio.gather(*sends), 10)
    by_chat: dict[int, list[tuple[int, str]]] = {}
    for message, new in stored:
        assert new
        by_chat.setdefault(message.chat_id, []).append((message.seq, message.text))
    assert by_chat == {c: [(1, f"{c}-0"), (2, f"{c}-1")] for c in chats}
    assert [await count(database_url, c) for c in chats] == [2, 2, 2]
