"""Read pointers and receipts: mark_read, and the all-read watermark behind message_read."""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from chatd.handlers.base import Context
from chatd.hub import Bus, Outbound
from chatd.protocol import (
    NOT_FOUND,
    ChatError,
    MarkRead,
    MessageRead,
    ReadReceipt,
    ReadUpto,
    encode_text,
)

# --- read receipts ------------------------------------------------------------------------

# Every member's own pointer is at or above their own messages (sending moves it), so
# "read by everyone but the sender" is simply seq <= min(read_seq) over all members:
# one index probe on chat_members_read_idx, whatever the group size.
_ADVANCE_WATERMARK = """
WITH target AS (
    SELECT min(read_seq) AS seq FROM chat_members WHERE chat_id = $1
), old AS (
    SELECT read_seq AS seq FROM chats WHERE id = $1
), moved AS (
    UPDATE chats SET read_seq = target.seq FROM target
    WHERE chats.id = $1 AND target.seq > chats.read_seq
    RETURNING chats.read_seq
)
SELECT m.id, m.sender_id, (SELECT read_seq FROM moved) AS watermark,
       EXISTS (
           SELECT 1 FROM chat_members s WHERE s.chat_id = $1 AND s.user_id = m.sender_id
       ) AS sender_is_member
FROM messages m, old, moved
WHERE m.chat_id = $1 AND m.seq > old.seq AND m.seq <= moved.read_seq
ORDER BY m.seq
"""


async def advance_read_watermark(
    conn: asyncpg.Connection, chat_id: int
) -> tuple[list[asyncpg.Record], int]:
    """Move the chat's all-read watermark up to its members' lowest pointer.

    Returns the messages that just became read by all (id, sender_id, sender_is_member)
    and the watermark.
    The caller must hold the chat row lock, so each message is reported exactly once.
    """
    rows = await conn.fetch(_ADVANCE_WATERMARK, chat_id)
    if rows:
        return rows, rows[0]["watermark"]
    return [], await conn.fetchval("SELECT read_seq FROM chats WHERE id = $1", chat_id)


async def publish_read_receipts(bus: Bus, chat_id: int, rows: Iterable[asyncpg.Record]) -> None:
    for row in rows:
        if not row["sender_is_member"]:
            continue  # senders who left hear nothing more from the chat
        receipt = MessageRead(ReadReceipt(message_id=row["id"], chat_id=chat_id))
        await bus.publish((row["sender_id"],), Outbound(encode_text(receipt)))


# --- mark_read ----------------------------------------------------------------------------

_MESSAGES_VISIBLE_TO = """
SELECT m.chat_id, max(m.seq) AS seq, count(*) AS n
FROM messages m JOIN chat_members cm ON cm.chat_id = m.chat_id AND cm.user_id = $2
WHERE m.id = ANY($1::bigint[])
GROUP BY m.chat_id
"""

_MOVE_POINTER = """
UPDATE chat_members SET read_seq = $3
WHERE chat_id = $1 AND user_id = $2 AND read_seq < $3
"""

_POINTERS_AS_IDS = """
SELECT cm.chat_id, m.id
FROM chat_members cm JOIN messages m ON m.chat_id = cm.chat_id AND m.seq = cm.read_seq
WHERE cm.user_id = $1 AND cm.chat_id = ANY($2::bigint[])
"""


async def mark_read(ctx: Context, action: MarkRead) -> ReadUpto:
    ids = sorted(set(action.message_ids))
    receipts: dict[int, list[asyncpg.Record]] = {}
    async with ctx.pool.acquire() as conn, conn.transaction():
        targets = await conn.fetch(_MESSAGES_VISIBLE_TO, ids, ctx.user_id)
        if sum(t["n"] for t in targets) != len(ids):
            raise ChatError(NOT_FOUND, "one of message_ids is not a message you can see", 404)
        chat_ids = sorted(t["chat_id"] for t in targets)
        # Lock the chats (in id order, like every other locker) so watermarks move serially.
        await conn.execute(
            "SELECT 1 FROM chats WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE", chat_ids
        )
        for target in sorted(targets, key=lambda t: t["chat_id"]):
            moved = await conn.execute(_MOVE_POINTER, target["chat_id"], ctx.user_id, target["seq"])
            if moved != "UPDATE 0":
                newly_read, _ = await advance_read_watermark(conn, target["chat_id"])
                receipts[target["chat_id"]] = newly_read
        pointers = await conn.fetch(_POINTERS_AS_IDS, ctx.user_id, chat_ids)

    for chat_id, rows in receipts.items():
        await publish_read_receipts(ctx.bus, chat_id, rows)
    return ReadUpto(read_upto={p["chat_id"]: p["id"] for p in pointers})
