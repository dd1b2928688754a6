"""Read pointers and receipts: mark_read, and the all-read watermark behind message_read."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import asyncpg

from chatd.handlers.base import Context
from chatd.hub import Bus, Outbound
from chatd.protocol import (
    NOT_FOUND,
    ChatError,
    MarkRead,
    MessageRead,
    MessagesRead,
    ReadRange,
    ReadReceipt,
    ReadUpto,
    encode_text,
)

# --- read receipts ------------------------------------------------------------------------

# Up to this many messages of one sender becoming read at once get one message_read each;
# more get a single messages_read range, so a bulk change cannot flood the sender's socket.
RECEIPTS_ONE_BY_ONE = 100

# Every member's own pointer is at or above their own messages (sending moves it), so
# "read by everyone but the sender" is simply seq <= min(read_seq) over all members:
# one index probe per chat on chat_members_read_idx, whatever the group size. One row
# per (chat, sender) of the messages that just became read by all.
_ADVANCE_WATERMARKS = """
WITH target AS (
    SELECT c.id AS chat_id, c.read_seq AS old_seq,
           (SELECT min(read_seq) FROM chat_members WHERE chat_id = c.id) AS new_seq
    FROM chats c
    WHERE c.id = ANY($1::bigint[])
), moved AS (
    UPDATE chats c SET read_seq = target.new_seq
    FROM target
    WHERE c.id = target.chat_id AND target.new_seq > target.old_seq
    RETURNING target.*
), newly_read AS (
    SELECT moved.chat_id, moved.new_seq, m.sender_id,
           count(*) AS n, max(m.id) AS last_id, (array_agg(m.id ORDER BY m.seq))[1:$2] AS ids
    FROM moved
    -- OFFSET 0 keeps this a per-chat range scan of messages (chat_id, seq); flattened
    -- into a join, the planner may scan every message instead.
    CROSS JOIN LATERAL (
        SELECT id, seq, sender_id FROM messages
        WHERE chat_id = moved.chat_id AND seq > moved.old_seq AND seq <= moved.new_seq
        OFFSET 0
    ) m
    GROUP BY moved.chat_id, moved.new_seq, m.sender_id
)
SELECT r.chat_id, r.sender_id, r.n, r.last_id, r.ids, r.new_seq AS watermark,
       EXISTS (
           SELECT 1 FROM chat_members s WHERE s.chat_id = r.chat_id AND s.user_id = r.sender_id
       ) AS sender_is_member
FROM newly_read r
"""


async def advance_read_watermarks(
    conn: asyncpg.Connection, chat_ids: list[int]
) -> list[asyncpg.Record]:
    """Move each chat's all-read watermark up to its members' lowest pointer.

    Returns one row per (chat, sender) of the messages that just became read by all
    (empty where a watermark did not move); each row also carries the chat's new
    `watermark`. The caller must hold the chats' locks, so each message is reported once.
    """
    return await conn.fetch(_ADVANCE_WATERMARKS, chat_ids, RECEIPTS_ONE_BY_ONE)


async def advance_read_watermark(conn: asyncpg.Connection, chat_id: int) -> list[asyncpg.Record]:
    return await advance_read_watermarks(conn, [chat_id])


async def publish_read_receipts(bus: Bus, rows: Iterable[asyncpg.Record]) -> None:
    for row in rows:
        if not row["sender_is_member"]:
            continue  # senders who left hear nothing more from the chat
        sender: tuple[uuid.UUID] = (row["sender_id"],)
        chat_id = row["chat_id"]
        if row["n"] > RECEIPTS_ONE_BY_ONE:
            event = MessagesRead(ReadRange(chat_id=chat_id, up_to_message_id=row["last_id"]))
            await bus.publish(sender, Outbound(encode_text(event)))
            continue
        for message_id in row["ids"]:
            receipt = MessageRead(ReadReceipt(message_id=message_id, chat_id=chat_id))
            await bus.publish(sender, Outbound(encode_text(receipt)))


# --- mark_read ----------------------------------------------------------------------------

_MESSAGES_VISIBLE_TO = """
SELECT m.chat_id, max(m.seq) AS seq, count(*) AS n
FROM messages m JOIN chat_members cm ON cm.chat_id = m.chat_id AND cm.user_id = $2
WHERE m.id = ANY($1::bigint[]) AND ($3::bigint IS NULL OR m.chat_id = $3)
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
    return await read_up_to(ctx, action.message_ids)


async def read_up_to(ctx: Context, message_ids: list[int], chat_id: int | None = None) -> ReadUpto:
    """Move the caller's pointer in each chat to the newest of `message_ids` in it.

    With `chat_id`, every id must be a message of that chat. All or nothing: any id the
    caller cannot see fails the whole call with not_found.
    """
    ids = sorted(set(message_ids))
    receipts: dict[int, list[asyncpg.Record]] = {}
    async with ctx.pool.acquire() as conn, conn.transaction():
        targets = await conn.fetch(_MESSAGES_VISIBLE_TO, ids, ctx.user_id, chat_id)
        if sum(t["n"] for t in targets) != len(ids):
            raise ChatError(NOT_FOUND, "no such message in a chat of yours", 404)
        chat_ids = sorted(t["chat_id"] for t in targets)
        # Lock the chats (in id order, like every other locker) so watermarks move serially.
        await conn.execute(
            "SELECT 1 FROM chats WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE", chat_ids
        )
        for target in sorted(targets, key=lambda t: t["chat_id"]):
            # Matches no row if the caller was removed meanwhile: nothing to move then.
            moved = await conn.execute(_MOVE_POINTER, target["chat_id"], ctx.user_id, target["seq"])
            if moved != "UPDATE 0":
                receipts[target["chat_id"]] = await advance_read_watermark(conn, target["chat_id"])
        pointers = await conn.fetch(_POINTERS_AS_IDS, ctx.user_id, chat_ids)

    for rows in receipts.values():
        await publish_read_receipts(ctx.bus, rows)
    return ReadUpto(read_upto={p["chat_id"]: p["id"] for p in pointers})
