"""MessageWriter (group commit) against the real database: sends that share a batch.

These drive the writer directly, so the order in which sends join a batch is known.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import asyncpg
import pytest

from chatd import writer as writer_module
from chatd.client import Api, ChatdError
from chatd.config import Settings
from chatd.db import create_pool, migrate
from chatd.hub import Hub, LocalBus, Outbound
from chatd.protocol import ChatError
from chatd.writer import MessageWriter
from tests.conftest import scratch_database


@pytest.fixture
async def writer(database_url: str) -> AsyncIterator[MessageWriter]:
    pool = await create_pool(database_url, 4)
    writer = MessageWriter(pool, LocalBus(Hub()))
    try:
        yield writer
    finally:
        await writer.close()
        await pool.close()


async def group_of(owner: Api, *members: Api) -> int:
    body = {"type": "group", "name": "w", "user_ids": [m.user_uuid for m in members]}
    return (await owner.call("POST", "/chats", json=body))["id"]


async def fetch(database_url: str, query: str, *args: object) -> list[asyncpg.Record]:
    """`query`'s rows, on a connection of its own."""
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def count(database_url: str, chat_id: int) -> int:
    rows = await fetch(database_url, "SELECT count(*) FROM messages WHERE chat_id = $1", chat_id)
    return rows[0][0]


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


async def backends_storing_batches(database_url: str, application: str) -> list[int]:
    """The backends of `application` whose last statement was a send batch."""
    query = """
    SELECT pid FROM pg_stat_activity
    WHERE datname = current_database() AND application_name = $1 AND query = $2"""
    rows = await fetch(database_url, query, application, writer_module._STORE_BATCH)
    return [row["pid"] for row in rows]


async def test_the_writer_keeps_its_connection_and_replaces_it_once_closed(
    alice: Api, database_url: str
) -> None:
    # Its own name: other tests' servers store batches in the same database.
    application = f"chatd_writer_{uuid.uuid4().hex[:8]}"
    joiner = "&" if "?" in database_url else "?"
    pool = await create_pool(f"{database_url}{joiner}application_name={application}", 4)
    writer = MessageWriter(pool, LocalBus(Hub()))
    try:
        chat_id = await group_of(alice)
        me = uuid.UUID(alice.user_uuid)
        for n in range(1, 4):
            await writer.store(me, chat_id, f"m{n}", None)
        # One backend stored all three batches, and it stays out of the pool between them.
        [backend] = await backends_storing_batches(database_url, application)
        assert pool.get_size() - pool.get_idle_size() == 1

        admin = await asyncpg.connect(database_url)
        try:  # the database drops it, as a restart would (and waits until it is gone)
            assert await admin.fetchval("SELECT pg_terminate_backend($1, 10000)", backend)
        finally:
            await admin.close()
        for _ in range(200):  # until the client has seen it go: the pool then counts it out
            if pool.get_size() == pool.get_idle_size():
                break
            await asyncio.sleep(0.05)
        message, new = await asyncio.wait_for(writer.store(me, chat_id, "after", None), 10)
        assert (message.seq, new) == (4, True)
        assert await backends_storing_batches(database_url, application) not in ([], [backend])

        await writer.close()  # before the pool closes, which waits for every connection
        assert pool.get_idle_size() == pool.get_size()
    finally:
        await writer.close()
        await pool.close()


async def test_a_writer_keeps_no_connection_from_a_pool_too_small_to_spare_one(
    database_url: str, alice: Api
) -> None:
    pool = await create_pool(database_url, writer_module.MAX_BATCHES_IN_FLIGHT)
    try:
        writer = MessageWriter(pool, LocalBus(Hub()))
        chat_id = await group_of(alice)
        await writer.store(uuid.UUID(alice.user_uuid), chat_id, "hi", None)
        assert pool.get_idle_size() == pool.get_size()
    finally:
        await pool.close()


async def mark_as_having_bots(database_url: str, *chat_ids: int) -> None:
    """Make the writer store these chats' batches in a transaction of several statements,
    as it does for chats with bots (no bot is there: no text of the tests concerns one)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE chats SET bots = 1 WHERE id = ANY($1)", list(chat_ids))
    finally:
        await conn.close()


@pytest.mark.parametrize("path", ["one round trip", "transaction"])
async def test_one_batch_over_several_chats_stores_each_in_its_order(
    writer: MessageWriter, alice: Api, database_url: str, path: str
) -> None:
    # Three chats in one batch: each is locked once, in id order. (In a transaction the
    # lock statement takes one parameter per chat, their number rounded up to four.)
    chats = [await group_of(alice) for _ in range(3)]
    if path == "transaction":
        await mark_as_having_bots(database_url, *chats)
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


class RecordingBus(LocalBus):
    """The LocalBus, keeping every event it was given with its recipients."""

    def __init__(self) -> None:
        super().__init__(Hub())
        self.events: list[tuple[list[uuid.UUID], dict[str, Any]]] = []

    async def publish(self, user_ids: Iterable[uuid.UUID], event: Outbound) -> None:
        self.events.append((list(user_ids), json.loads(event.text)))


@pytest.mark.parametrize("path", ["one round trip", "transaction"])
async def test_one_batch_moves_the_watermark_of_each_of_its_chats(
    alice: Api, bob: Api, database_url: str, path: str
) -> None:
    # Bob's message in each chat is read by all once Alice, who had not read it, sends
    # there: one batch of her sends moves every chat's watermark, and Bob hears of each.
    chats = [await group_of(alice, bob) for _ in range(3)]
    if path == "transaction":
        await mark_as_having_bots(database_url, *chats)
    pool = await create_pool(database_url, 4)
    bus = RecordingBus()
    writer = MessageWriter(pool, bus)
    try:
        me, him = uuid.UUID(alice.user_uuid), uuid.UUID(bob.user_uuid)
        his = [(await writer.store(him, c, "unread", None)).value for c in chats]
        bus.events.clear()
        sends = [writer.store(me, c, "read it", None) for c in chats]
        stored = await asyncio.wait_for(asyncio.gather(*sends), 10)
        assert all(message.read_status == "unread" for message, _ in stored)
    finally:
        await writer.close()
        await pool.close()
    receipts = sorted(
        (event["data"]["chat_id"], event["data"]["message_id"], recipients)
        for recipients, event in bus.events
        if event["action"] == "message_read"
    )
    assert receipts == [(m.chat_id, m.id, [him]) for m in his]
    watermarks = await fetch(
        database_url, "SELECT read_seq FROM chats WHERE id = ANY($1) ORDER BY id", chats
    )
    assert [r["read_seq"] for r in watermarks] == [1, 1, 1]


@pytest.fixture
async def statements(database_url: str) -> AsyncIterator[tuple[MessageWriter, list[str]]]:
    """A writer on one connection, and every statement it sends."""
    sent: list[str] = []

    async def log_queries(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda logged: sent.append(logged.query))

    async def keep_session(conn: asyncpg.Connection) -> None:
        pass  # as chatd's pool: no reset query on release

    pool = await asyncpg.create_pool(
        database_url, min_size=1, max_size=1, init=log_queries, reset=keep_session
    )
    try:
        yield MessageWriter(pool, LocalBus(Hub())), sent
    finally:
        await pool.close()


async def test_a_batch_is_one_statement_committed_before_its_sender_hears(
    statements: tuple[MessageWriter, list[str]], alice: Api, database_url: str
) -> None:
    writer, sent = statements
    chat_id = await group_of(alice)
    me = uuid.UUID(alice.user_uuid)
    await writer.store(me, chat_id, "first", None)  # defines the connection's functions
    assert any("FUNCTION pg_temp.chatd_store_batch" in q for q in sent)
    sent.clear()
    message, new = await writer.store(me, chat_id, "second", "k-1")
    assert sent == [writer_module._STORE_BATCH]  # no BEGIN, no COMMIT: one round trip
    assert (message.seq, new) == (2, True)
    assert await count(database_url, chat_id) == 2  # committed: another connection sees it
    sent.clear()
    retry, new = await writer.store(me, chat_id, "second", "k-1")
    assert (retry.id, new) == (message.id, False)
    assert sent[0] == writer_module._STORE_BATCH and "BEGIN;" not in sent
    assert await count(database_url, chat_id) == 2


async def burst(writer: MessageWriter, me: uuid.UUID, chat_id: int, texts: list[str]) -> None:
    """Store `texts` as one batch: queued together before the writer takes any."""
    await asyncio.wait_for(
        asyncio.gather(*(writer.store(me, chat_id, text, None) for text in texts)), 10
    )


async def test_a_lingering_writer_holds_sends_only_after_a_batch_of_several(
    statements: tuple[MessageWriter, list[str]], alice: Api, database_url: str
) -> None:
    writer, sent = statements
    writer.linger = 60.0  # CHATD_SEND_LINGER_MS allows at most 1 s; here, far past any wait
    chat_id = await group_of(alice)
    me = uuid.UUID(alice.user_uuid)
    for n in range(1, 4):  # a light load: each send stored at once, in a batch of its own
        message, _ = await asyncio.wait_for(writer.store(me, chat_id, f"{n}", None), 10)
        assert message.seq == n
    several = [f"{n}" for n in range(4, 4 + writer_module.LINGER_FROM)]
    await burst(writer, me, chat_id, several)  # not held either: the last batch held one
    sent.clear()
    held = []
    for n in range(8, 13):  # one by one: without the linger, each a batch of its own
        held.append(asyncio.create_task(writer.store(me, chat_id, f"{n}", None)))
        await asyncio.sleep(0.02)
    assert not any(task.done() for task in held) and sent == []
    assert writer.busy  # what shutdown waits on
    writer.stop_lingering()  # as shutdown does: the held sends go now, together
    stored = await asyncio.wait_for(asyncio.gather(*held), 10)
    assert [(m.seq, m.text) for m, _ in stored] == [(n, f"{n}") for n in range(8, 13)]
    assert sent == [writer_module._STORE_BATCH]
    assert await count(database_url, chat_id) == 12


async def test_held_sends_are_stored_when_the_linger_is_over_and_then_it_lets_go(
    statements: tuple[MessageWriter, list[str]], alice: Api
) -> None:
    writer, sent = statements
    writer.linger = 0.5
    chat_id = await group_of(alice)
    me = uuid.UUID(alice.user_uuid)
    await burst(writer, me, chat_id, [f"{n}" for n in range(writer_module.LINGER_FROM)])
    sent.clear()
    second = asyncio.create_task(writer.store(me, chat_id, "a", None))
    await asyncio.sleep(0.01)
    third = asyncio.create_task(writer.store(me, chat_id, "b", None))
    stored = await asyncio.wait_for(asyncio.gather(second, third), 10)
    assert [m.text for m, _ in stored] == ["a", "b"]
    assert sent == [writer_module._STORE_BATCH]  # one batch for both, once the linger was over
    # That batch held fewer than LINGER_FROM sends: the load is light again, and the next
    # send is stored at once, however long the linger.
    writer.linger = 60.0
    message, _ = await asyncio.wait_for(writer.store(me, chat_id, "c", None), 10)
    assert message.text == "c"


def test_the_linger_setting_is_5_ms_by_default_and_bounded() -> None:
    env = {"CHATD_SECRET": "s" * 40}
    assert Settings.from_env(env).send_linger_ms == 5
    assert Settings.from_env({**env, "CHATD_SEND_LINGER_MS": "0"}).send_linger_ms == 0
    for bad in ("-1", "1001", "5ms"):
        with pytest.raises(SystemExit, match="CHATD_SEND_LINGER_MS"):
            Settings.from_env({**env, "CHATD_SEND_LINGER_MS": bad})


async def test_a_chat_with_bots_is_stored_in_a_transaction_and_only_once(
    statements: tuple[MessageWriter, list[str]], alice: Api, database_url: str
) -> None:
    writer, sent = statements
    me = uuid.UUID(alice.user_uuid)
    await writer.store(me, await group_of(alice), "first", None)  # defines the functions
    chat_id = await group_of(alice)
    await mark_as_having_bots(database_url, chat_id)
    sent.clear()
    message, new = await writer.store(me, chat_id, "hi", None)
    assert (message.seq, new) == (1, True)
    # The function saw the bots, stored nothing and said so; then the transaction did.
    calls = [q for q in sent if q == writer_module._STORE_BATCH]
    assert len(calls) == 1 and sent.index("BEGIN;") > sent.index(calls[0])
    assert await count(database_url, chat_id) == 1


async def test_a_message_is_read_once_every_member_has_read_it(
    writer: MessageWriter, alice: Api, bob: Api
) -> None:
    me = uuid.UUID(alice.user_uuid)
    alone = await group_of(alice)  # the sender is everyone: read as soon as stored
    message, _ = await writer.store(me, alone, "note to self", None)
    assert message.read_status == "read"
    shared = await group_of(alice, bob)
    message, _ = await writer.store(me, shared, "hello", None)
    assert message.read_status == "unread"


async def test_without_temporary_functions_batches_still_store(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A role that may not create temporary objects gets the transaction of several
    round trips for every batch, with one warning, and loses nothing."""
    role = f"chatd_notemp_{uuid.uuid4().hex[:10]}"
    try:
        async with scratch_database(database_url, "chatd_notemp") as own_url:
            await asyncio.to_thread(migrate, own_url)
            owner = await asyncpg.connect(own_url)
            try:
                name = await owner.fetchval("SELECT current_database()")
                await owner.execute(
                    f"""
                    REVOKE TEMPORARY ON DATABASE "{name}" FROM PUBLIC;
                    CREATE ROLE "{role}" LOGIN;
                    GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public
                        TO "{role}";
                    GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO "{role}";
                    """
                )
                me = await owner.fetchval(
                    "INSERT INTO users (name, email, password_hash) VALUES ('a', 'a@x', 'x')"
                    " RETURNING id"
                )
                chat_id = await owner.fetchval(
                    "INSERT INTO chats (type, name) VALUES ('group', 'g') RETURNING id"
                )
                await owner.execute(
                    "INSERT INTO chat_members (chat_id, user_id, role) VALUES ($1, $2, 'owner')",
                    chat_id,
                    me,
                )
            finally:
                await owner.close()
            pool = await asyncpg.create_pool(own_url, user=role, min_size=1, max_size=1)
            try:
                writer = MessageWriter(pool, LocalBus(Hub()))
                for n in range(1, 4):
                    message, new = await writer.store(me, chat_id, f"m{n}", f"k-{n}")
                    assert (message.seq, new) == (n, True)
                warnings = [
                    r for r in caplog.records if "TEMPORARY on the database" in r.getMessage()
                ]
                assert len(warnings) == 1  # once, not per batch
            finally:
                await pool.close()
            assert await count(own_url, chat_id) == 3
    finally:  # after the database, which holds the role's grants
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        finally:
            await admin.close()


async def test_retry_lookups_probe_the_key_even_when_planned_on_an_empty_table(
    database_url: str,
) -> None:
    """A connection plans the writer's statements once, often while `messages` is still
    empty (a new deployment); the plan stays until PostgreSQL analyzes the table. The
    lookups of a retry must then still probe the (sender_id, client_msg_id) key, not walk
    every message of the sender (the sender's own index, partial on NOT deleted for that
    reason, cannot serve them)."""
    async with scratch_database(database_url, "chatd_plans") as own_url:
        await asyncio.to_thread(migrate, own_url)
        conn = await asyncpg.connect(own_url)
        try:
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            for name, query in (
                ("batch", writer_module._INSERT_MESSAGES),
                ("lookup", writer_module._FIND_BY_CLIENT_IDS),
            ):
                await conn.execute(f"PREPARE {name} AS {query}")
            sender = "{" + str(uuid.uuid4()) + "}"
            nulls = ", ".join(["'{NULL}'"] * 4)
            plans = [
                "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN EXECUTE {statement}"))
                for statement in (
                    f"batch('{{1}}', '{sender}', '{{t}}', '{{k}}', {nulls})",
                    f"lookup('{sender}', '{{k}}')",
                )
            ]
        finally:
            await conn.close()
    for plan in plans:
        assert "messages_sender_id_client_msg_id_key" in plan, plan
        assert "messages_sender_idx" not in plan, plan
