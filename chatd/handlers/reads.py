"""Read pointers: mark_read, and its REST form (POST /chats/{id}/read).

Moving a pointer may move the chat's all-read watermark, which sends read receipts to
the senders (chatd/store.py).
"""

from __future__ import annotations

import asyncpg

from chatd.handlers.base import Context
from chatd.protocol import NOT_FOUND, ChatError, MarkRead, Read, ReadUpto
from chatd.store import advance_read_watermarks, publish_read_receipts

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
    return await _read_up_to(ctx, action.message_ids)


async def read_chat(ctx: Context, action: Read) -> ReadUpto:
    return await _read_up_to(ctx, [action.up_to], chat_id=action.chat_id)


async def _read_up_to(ctx: Context, message_ids: list[int], chat_id: int | None = None) -> ReadUpto:
    """Move the caller's pointer in each chat to the newest of `message_ids` in it.

    With `chat_id`, every id must be a message of that chat. All or nothing: any id the
    caller cannot see fails the whole call with not_found.
    """
    ids = sorted(set(message_ids))
    receipts: list[asyncpg.Record] = []
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        targets = await conn.fetch(_MESSAGES_VISIBLE_TO, ids, ctx.user_id, chat_id)
        if sum(t["n"] for t in targets) != len(ids):
            raise ChatError(NOT_FOUND, "no such message in a chat of yours")
        chat_ids = sorted(t["chat_id"] for t in targets)
        # Lock the chats (in id order, like every other locker) so watermarks move serially.
        await conn.execute(
            "SELECT 1 FROM chats WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE", chat_ids
        )
        for target in sorted(targets, key=lambda t: t["chat_id"]):
            # Matches no row if the caller was removed meanwhile: nothing to move then.
            moved = await conn.execute(_MOVE_POINTER, target["chat_id"], ctx.user_id, target["seq"])
            if moved != "UPDATE 0":
                receipts += await advance_read_watermarks(conn, [target["chat_id"]])
        pointers = await conn.fetch(_POINTERS_AS_IDS, ctx.user_id, chat_ids)

    await publish_read_receipts(ctx.node.bus, receipts)
    return ReadUpto(read_upto={p["chat_id"]: p["id"] for p in pointers})
