"""Migrations on a database that already holds data from the previous schema."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from chatd.db import migrate
from tests.conftest import scratch_database

# Users whose uuid order is not their creation order, so "smallest uuid" cannot pass.
ANN = uuid.UUID("00000000-0000-4000-8000-000000000003")
BEN = uuid.UUID("00000000-0000-4000-8000-000000000001")
CAT = uuid.UUID("00000000-0000-4000-8000-000000000002")


async def test_0002_gives_v1_groups_their_creator_as_owner_and_keeps_join_order(
    database_url: str,
) -> None:
    async with scratch_database(database_url, "chatd_migration") as url:
        await asyncio.to_thread(migrate, url, "0001_initial")
        conn = await asyncpg.connect(url)
        try:
            await _v1_data(conn)
            await asyncio.to_thread(migrate, url)
            rows = await conn.fetch(
                "SELECT chat_id, user_id, role FROM chat_members ORDER BY chat_id, join_order"
            )
            by_chat: dict[int, list[tuple[uuid.UUID, str]]] = {}
            for row in rows:
                by_chat.setdefault(row["chat_id"], []).append((row["user_id"], row["role"]))
            # Ann created group 1 with Ben and Cat (one transaction), and spoke first.
            assert by_chat[1] == [(ANN, "owner"), (BEN, "member"), (CAT, "member")]
            # Nobody spoke in group 2 (created by Cat): ties fall back to uuid order.
            assert by_chat[2] == [(BEN, "owner"), (CAT, "member")]
            assert sorted(role for _, role in by_chat[3]) == ["member", "member"]  # private

            # The chat list order: the chat with the latest message first.
            order = await conn.fetch("SELECT id FROM chats ORDER BY activity DESC")
            assert [r["id"] for r in order] == [1, 3, 2]

            # New rows continue both sequences.
            await conn.execute("INSERT INTO chats (type, name) VALUES ('group', 'new')")
            await conn.execute("INSERT INTO chat_members (chat_id, user_id) VALUES (1, $1)", DAN)
            newest = await conn.fetchrow(
                "SELECT max(join_order) AS j, (SELECT max(activity) FROM chats) AS a"
                " FROM chat_members"
            )
            assert newest["j"] > len(rows) and newest["a"] > 3
            assert (
                await conn.fetchval("SELECT join_order FROM chat_members WHERE user_id = $1", DAN)
                == newest["j"]
            )
        finally:
            await conn.close()


DAN = uuid.UUID("00000000-0000-4000-8000-000000000004")


async def _v1_data(conn: asyncpg.Connection) -> None:
    """What chatd v1 would have written: members inserted together, pointers moved later."""
    for user_id, user in ((ANN, "ann"), (BEN, "ben"), (CAT, "cat"), (DAN, "dan")):
        await conn.execute(
            "INSERT INTO users (id, name, email, password_hash) VALUES ($1, $2, $3, 'x')",
            user_id,
            user,
            f"{user}@example.com",
        )
    async with conn.transaction():  # group 1, by Ann
        await conn.execute("INSERT INTO chats (type, name) VALUES ('group', 'one')")
        await conn.execute(
            "INSERT INTO chat_members (chat_id, user_id) SELECT 1, unnest($1::uuid[])",
            [ANN, BEN, CAT],
        )
    async with conn.transaction():  # group 2, by Cat
        await conn.execute("INSERT INTO chats (type, name) VALUES ('group', 'two')")
        await conn.execute(
            "INSERT INTO chat_members (chat_id, user_id) SELECT 2, unnest($1::uuid[])",
            [CAT, BEN],
        )
    async with conn.transaction():  # private, Ben and Cat
        await conn.execute(
            "INSERT INTO chats (type, private_key) VALUES ('private', $1)", f"{BEN}:{CAT}"
        )
        await conn.execute(
            "INSERT INTO chat_members (chat_id, user_id) SELECT 3, unnest($1::uuid[])",
            [BEN, CAT],
        )
    for chat_id, sender in ((1, ANN), (1, BEN), (3, CAT), (1, CAT)):
        seq = await conn.fetchval(
            "UPDATE chats SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq", chat_id
        )
        await conn.execute(
            "INSERT INTO messages (chat_id, seq, sender_id, text) VALUES ($1, $2, $3, 'hi')",
            chat_id,
            seq,
            sender,
        )
        # Moving a pointer rewrites the row: heap order no longer says who joined first.
        await conn.execute(
            "UPDATE chat_members SET read_seq = $2 WHERE chat_id = $1 AND user_id = $3",
            chat_id,
            seq,
            sender,
        )


async def test_0003_gives_stored_emails_their_normal_form(database_url: str) -> None:
    # Oldest first: as the old check stored them (trimmed, lower-cased) -> as 0003 leaves them.
    rows = [
        ("ann@example.com", "ann@example.com"),
        ("ben@bücher.de", "ben@xn--bcher-kva.de"),  # the domain IDNA-encoded
        ("de\u0301a@example.com", "d\u00e9a@example.com"),  # NFC
        ("cat\u0301@example.com", "cat\u0301@example.com"),  # NFC already (no precomposed t́)
        ("eve@corp.local", "eve@corp.local"),  # refused now: kept, logs in as before
        ("e\u0301d@corp.local", "\u00e9d@corp.local"),  # refused now: kept, made NFC
        # One address in two spellings: the first to need the normal form takes it ...
        ("gil@straße.de", "gil@xn--strae-oqa.de"),
        ("gil@strasse.de", "gil@strasse.de"),  # (ß is not ss in IDNA 2008: another one)
        ("gil@\uff53traße.de", "gil@\uff53traße.de"),  # ... a later one keeps its old form
        # ... and an account already in normal form keeps it.
        ("hal@xn--bcher-kva.de", "hal@xn--bcher-kva.de"),
        ("hal@\uff42ücher.de", "hal@\uff42ücher.de"),  # fullwidth b
    ]
    async with scratch_database(database_url, "chatd_migration") as url:
        await asyncio.to_thread(migrate, url, "0002_chat_model")
        conn = await asyncpg.connect(url)
        try:
            for n, (email, _) in enumerate(rows):
                await conn.execute(
                    "INSERT INTO users (name, email, password_hash, created_at)"
                    " VALUES ('u', $1, 'x', now() + make_interval(secs => $2))",
                    email,
                    n,
                )
            await asyncio.to_thread(migrate, url)
            after = await conn.fetch("SELECT email FROM users ORDER BY created_at")
            assert [r["email"] for r in after] == [new for _, new in rows]
            assert (
                await conn.fetchval(
                    "SELECT count(*) FROM pg_indexes WHERE indexname = 'users_email_prefix_idx'"
                )
                == 0
            )
        finally:
            await conn.close()


async def test_0010_indexes_old_messages_and_notifies_nobody_of_them(database_url: str) -> None:
    async with scratch_database(database_url, "chatd_migration") as url:
        await asyncio.to_thread(migrate, url, "0008_deliveries")
        conn = await asyncpg.connect(url)
        try:
            for user_id, user in ((ANN, "ann"), (BEN, "ben")):
                await conn.execute(
                    "INSERT INTO users (id, name, email, password_hash) VALUES ($1, $2, $3, 'x')",
                    user_id,
                    user,
                    f"{user}@example.com",
                )
            chat = await conn.fetchval(
                "INSERT INTO chats (type, name, last_seq) VALUES ('group', 'g', 2) RETURNING id"
            )
            await conn.execute(
                "INSERT INTO chat_members (chat_id, user_id) VALUES ($1, $2), ($1, $3)",
                chat,
                ANN,
                BEN,
            )
            await conn.execute(
                "INSERT INTO messages (chat_id, seq, sender_id, text) VALUES"
                " ($1, 1, $2, 'Приветы из прошлого'), ($1, 2, $2, 'old news')",
                chat,
                ANN,
            )
            await asyncio.to_thread(migrate, url)
            # Old messages are searchable...
            found = await conn.fetch(
                "SELECT seq FROM messages WHERE search @@ websearch_to_tsquery('russian', $1)",
                "привет",
            )
            assert [r["seq"] for r in found] == [1]
            # ...but not news: Ben's unread messages notify nobody.
            pointers = await conn.fetch(
                "SELECT user_id, read_seq, notified_seq, notify, mute_until FROM chat_members"
            )
            assert {(r["notified_seq"], r["notify"], r["mute_until"]) for r in pointers} == {
                (2, "all", None)
            }
            assert {r["read_seq"] for r in pointers} == {0}
            shares = await conn.fetch("SELECT share_presence, last_seen_at FROM users")
            assert {(r["share_presence"], r["last_seen_at"]) for r in shares} == {(True, None)}
        finally:
            await conn.close()
