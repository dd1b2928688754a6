"""Messages: send_message, get_message, and sync (catching up after a reconnect)."""

from __future__ import annotations

import uuid

import asyncpg

from chatd.handlers.base import (
    FRAME_BUDGET_BYTES,
    MESSAGE_COLUMNS,
    Context,
    fit_in_frame,
    lock_chat,
    message_from_row,
    no_such_chat,
)
from chatd.handlers.reads import advance_read_watermark, publish_read_receipts
from chatd.hub import Outbound
from chatd.protocol import (
    INVALID,
    MAX_TEXT_CHARS,
    NOT_FOUND,
    ChatError,
    GetMessage,
    Message,
    NewMessage,
    SendMessage,
    Sync,
    SyncedChat,
    SyncResult,
    clean_text,
    encode_text,
)

# --- send_message -------------------------------------------------------------------------

# Runs with the chat locked, so it reads the membership as it is now: a member removed
# while we waited for the lock gets no row, and stores nothing.
_INSERT_MESSAGE = """
WITH sender AS (
    SELECT read_seq FROM chat_members WHERE chat_id = $1 AND user_id = $2
), chat AS (
    UPDATE chats SET last_seq = last_seq + 1, activity = nextval('chat_activity_seq')
    WHERE id = $1 AND EXISTS (SELECT 1 FROM sender)
    RETURNING id, last_seq
), msg AS (
    INSERT INTO messages (chat_id, seq, sender_id, text, client_msg_id)
    SELECT id, last_seq, $2, $3, $4 FROM chat
    RETURNING id, seq, created_at
), sender_has_read AS (
    UPDATE chat_members SET read_seq = (SELECT seq FROM msg)
    WHERE chat_id = $1 AND user_id = $2
)
SELECT msg.id, msg.seq, msg.created_at,
       (SELECT read_seq FROM sender) AS sender_read_seq,
       ARRAY(SELECT user_id FROM chat_members WHERE chat_id = $1) AS member_ids
FROM msg
"""

_FIND_BY_CLIENT_ID = f"""
SELECT {MESSAGE_COLUMNS}
FROM messages m JOIN chats c ON c.id = m.chat_id
WHERE m.sender_id = $1 AND m.client_msg_id = $2
"""


async def send_message(ctx: Context, action: SendMessage) -> Message:
    message, _ = await store_message(ctx, action)
    return message


async def store_message(ctx: Context, action: SendMessage) -> tuple[Message, bool]:
    """Store and fan out a message; return it and whether it is new (not a retry)."""
    text = clean_text(action.text, "text", min_len=1, max_len=MAX_TEXT_CHARS)
    client_msg_id = action.client_msg_id
    if client_msg_id is not None and "\x00" in client_msg_id:
        raise ChatError(INVALID, "client_msg_id must not contain NUL characters", 422)

    async with ctx.pool.acquire() as conn:
        if client_msg_id is not None:
            original = await _original(conn, ctx.user_id, client_msg_id, action.chat_id)
            if original is not None:
                return original, False
        try:
            async with conn.transaction():
                chat = await lock_chat(conn, action.chat_id, ctx.user_id)
                row = await conn.fetchrow(
                    _INSERT_MESSAGE, action.chat_id, ctx.user_id, text, client_msg_id
                )
                if row is None:
                    raise no_such_chat()
                newly_read: list[asyncpg.Record] = []
                watermark = chat["read_seq"]
                # Only a sender who was holding the watermark back can move it by sending.
                if row["sender_read_seq"] <= watermark:
                    newly_read = await advance_read_watermark(conn, action.chat_id)
                    if newly_read:
                        watermark = newly_read[0]["watermark"]
        except asyncpg.UniqueViolationError:
            # A concurrent retry with the same client_msg_id committed first.
            original = await _original(conn, ctx.user_id, client_msg_id, action.chat_id)
            if original is None:
                raise
            return original, False

    message = Message(
        id=row["id"],
        chat_id=action.chat_id,
        seq=row["seq"],
        sender_uuid=str(ctx.user_id),
        text=text,
        timestamp=row["created_at"],
        read_status="read" if row["seq"] <= watermark else "unread",
        client_msg_id=client_msg_id,
    )
    await ctx.bus.publish(row["member_ids"], Outbound(encode_text(NewMessage(message)), message.id))
    await publish_read_receipts(ctx.bus, action.chat_id, newly_read)
    return message, True


async def _original(
    conn: asyncpg.Connection, sender: uuid.UUID, client_msg_id: str | None, chat_id: int
) -> Message | None:
    row = await conn.fetchrow(_FIND_BY_CLIENT_ID, sender, client_msg_id)
    if row is None:
        return None
    if row["chat_id"] != chat_id:
        raise ChatError(INVALID, "client_msg_id was already used in another chat", 422)
    return message_from_row(row)


# --- get_message --------------------------------------------------------------------------

_VISIBLE_MESSAGE = f"""
SELECT {MESSAGE_COLUMNS}
FROM messages m
JOIN chats c ON c.id = m.chat_id
JOIN chat_members cm ON cm.chat_id = m.chat_id AND cm.user_id = $2
WHERE m.id = $1
"""


async def get_message(ctx: Context, action: GetMessage) -> Message:
    row = await ctx.pool.fetchrow(_VISIBLE_MESSAGE, action.message_id, ctx.user_id)
    if row is None:
        raise ChatError(NOT_FOUND, "no such message", 404)
    return message_from_row(row)


# --- sync ---------------------------------------------------------------------------------

# The caller's chats among those asked, with how far each goes.
_SYNC_CHATS = """
SELECT c.id, c.last_seq
FROM chats c JOIN chat_members cm ON cm.chat_id = c.id AND cm.user_id = $1
WHERE c.id = ANY($2::bigint[])
"""

# The messages after each given seq, chat by chat in the order asked, at most $3 per chat
# and $4 in all: no more than a reply can carry is ever read.
_SYNC_MESSAGES = f"""
SELECT {MESSAGE_COLUMNS}
FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS want(chat_id, after_seq, n)
JOIN chats c ON c.id = want.chat_id
CROSS JOIN LATERAL (
    SELECT * FROM messages
    WHERE chat_id = want.chat_id AND seq > want.after_seq
    ORDER BY seq
    LIMIT $3
) m
ORDER BY want.n, m.seq
LIMIT $4
"""

# A message is at least ~200 bytes of JSON, so a full reply never holds more than this.
SYNC_MAX_MESSAGES = FRAME_BUDGET_BYTES // 200


async def sync(ctx: Context, action: Sync) -> SyncResult:
    """Messages after each given seq, so a reconnecting client misses nothing.

    Missed messages come per chat in seq order, at most `limit` per chat; `has_more` says
    to sync that chat again from the last seq received. The reply stays under a frame
    budget: chats that did not fit come back short or empty, with has_more.
    """
    async with ctx.pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            last_seqs = {
                row["id"]: row["last_seq"]
                for row in await conn.fetch(_SYNC_CHATS, ctx.user_id, list(action.chats))
            }
            wanted = [
                (c, after) for c, after in action.chats.items() if last_seqs.get(c, 0) > after
            ]
            rows = await conn.fetch(
                _SYNC_MESSAGES,
                [chat_id for chat_id, _ in wanted],
                [after for _, after in wanted],
                action.limit,
                SYNC_MAX_MESSAGES,
            )

    found: dict[int, list[Message]] = {}
    for row in rows:
        found.setdefault(row["chat_id"], []).append(message_from_row(row))
    result: dict[int, SyncedChat] = {}
    budget = FRAME_BUDGET_BYTES
    for chat_id, after in action.chats.items():
        if chat_id not in last_seqs:
            result[chat_id] = SyncedChat(messages=[], has_more=False, error=NOT_FOUND)
            continue
        taken, budget = fit_in_frame(found.get(chat_id, ()), budget)
        reached = taken[-1].seq if taken else after
        result[chat_id] = SyncedChat(messages=taken, has_more=reached < last_seqs[chat_id])
    return SyncResult(chats=result)
