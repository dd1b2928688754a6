"""Messages: send_message, get_message, and catching up: the unread snapshot a socket
starts with, and sync after a reconnect.

Sends are stored by the node's MessageWriter (chatd/writer.py), in batches.
"""

from __future__ import annotations

from chatd.handlers.base import FRAME_BUDGET_BYTES, Context, fit_in_frame
from chatd.protocol import (
    INVALID,
    MAX_TEXT_CHARS,
    NOT_FOUND,
    RATE_LIMITED,
    ChatError,
    Created,
    GetMessage,
    Message,
    SendMessage,
    Sync,
    SyncedChat,
    SyncResult,
    UnreadMessages,
    clean_text,
)
from chatd.store import MESSAGE_COLUMNS, message_from_row

# --- send_message -----------------------------------------------------------------------


async def send_message(ctx: Context, action: SendMessage) -> Created[Message]:
    """Store and fan out a message; a retry (same client_msg_id) gets the original back."""
    text = clean_text(action.text, "text", min_len=1, max_len=MAX_TEXT_CHARS)
    client_msg_id = action.client_msg_id
    if client_msg_id is not None and "\x00" in client_msg_id:
        raise ChatError(INVALID, "client_msg_id must not contain NUL characters")
    writer = ctx.node.writer
    limit, key = ctx.node.limits.message, str(ctx.user_id)  # socket and REST sends alike
    wait = await limit.take(key)
    if wait:
        # A retry of a stored message is answered even now: it stores nothing. Looked up
        # only when refused, so a normal send costs no extra query.
        original = await writer.original(ctx.user_id, action.chat_id, client_msg_id)
        if original is not None:
            return Created(original, created=False)
        raise ChatError(RATE_LIMITED, "too many messages; slow down", retry_after=wait)
    try:
        stored = await writer.store(ctx.user_id, action.chat_id, text, client_msg_id)
    except BaseException:
        await limit.give_back(key)  # refused or failed: the retry must not pay twice
        raise
    if not stored.created:
        await limit.give_back(key)  # a retry, answered with the message stored before
    return stored


# --- get_message --------------------------------------------------------------------------

_VISIBLE_MESSAGE = f"""
SELECT {MESSAGE_COLUMNS}
FROM messages m
JOIN chats c ON c.id = m.chat_id
JOIN chat_members cm ON cm.chat_id = m.chat_id AND cm.user_id = $2
WHERE m.id = $1
"""


async def get_message(ctx: Context, action: GetMessage) -> Message:
    row = await ctx.node.pool.fetchrow(_VISIBLE_MESSAGE, action.message_id, ctx.user_id)
    if row is None:
        raise ChatError(NOT_FOUND, "no such message")
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
    async with ctx.node.pool.acquire() as conn:
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


# --- the unread snapshot ------------------------------------------------------------------

UNREAD_SNAPSHOT_LIMIT = 500

# Driven from the user's memberships: per chat with something unread, an index range on
# messages (chat_id, seq) — never a walk over the whole messages table in id order.
_UNREAD_SNAPSHOT = f"""
SELECT {MESSAGE_COLUMNS}
FROM chat_members cm
JOIN chats c ON c.id = cm.chat_id AND c.last_seq > cm.read_seq
CROSS JOIN LATERAL (
    SELECT * FROM messages
    WHERE chat_id = cm.chat_id AND seq > cm.read_seq AND sender_id <> $1
    ORDER BY seq
    LIMIT $2
) m
WHERE cm.user_id = $1
ORDER BY m.id
LIMIT $2
"""


async def unread_snapshot(ctx: Context) -> UnreadMessages:
    """The first frame of every socket: the caller's unread messages, oldest first.

    At most UNREAD_SNAPSHOT_LIMIT, and no more than one frame holds; `has_more` says
    some were left out (the chat list's unread counts and `sync` have the rest).
    """
    rows = await ctx.node.pool.fetch(_UNREAD_SNAPSHOT, ctx.user_id, UNREAD_SNAPSHOT_LIMIT + 1)
    messages, _ = fit_in_frame(
        (message_from_row(row) for row in rows[:UNREAD_SNAPSHOT_LIMIT]), FRAME_BUDGET_BYTES
    )
    return UnreadMessages(data=messages, has_more=len(rows) > len(messages))
