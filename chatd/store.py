"""What the handlers and the MessageWriter share about stored messages: their columns as
the wire shows them, and the all-read watermark behind read receipts.

Every write to a chat (messages, read pointers, membership) first locks its chats row,
so they happen one at a time per chat; the functions here expect that lock to be held.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import asyncpg
import msgspec

from chatd.hub import Bus, publish
from chatd.protocol import (
    Attachment,
    ForwardedFrom,
    Message,
    MessageRead,
    MessageReadData,
    MessagesRead,
    MessagesReadData,
    Reaction,
)

# A message is "read" once its seq is at or below the chat's all-read watermark.
MESSAGE_COLUMNS = """
    m.id, m.chat_id, m.seq, m.sender_id, m.text, m.created_at, m.client_msg_id,
    m.seq <= c.read_seq AS is_read,
    m.version, m.edited_at, m.deleted, m.reply_to, m.mentions, m.forwarded_from, m.reactions,
    m.attachments
"""

_reactions = msgspec.json.Decoder(list[Reaction])
_forwarded = msgspec.json.Decoder(ForwardedFrom)
_attachments = msgspec.json.Decoder(list[Attachment])


def message_from_row(row: asyncpg.Record) -> Message:
    """A row of MESSAGE_COLUMNS as the wire shows it."""
    mentions, forwarded, reactions = row["mentions"], row["forwarded_from"], row["reactions"]
    return Message(
        id=row["id"],
        chat_id=row["chat_id"],
        seq=row["seq"],
        sender_uuid=str(row["sender_id"]),
        text=row["text"],
        timestamp=row["created_at"],
        read_status="read" if row["is_read"] else "unread",
        client_msg_id=row["client_msg_id"],
        edited_at=row["edited_at"],
        deleted=row["deleted"],
        reply_to=row["reply_to"],
        mentions=[str(user_id) for user_id in mentions] if mentions else [],
        forwarded_from=_forwarded.decode(forwarded) if forwarded else None,
        reactions=_reactions.decode(reactions) if reactions else [],
        version=row["version"],
        attachments=_attachments.decode(row["attachments"]) if row["attachments"] else [],
    )


# A member's unread messages in a chat: `c` the chats row, `cm` their chat_members row, $1
# the member. The chat list shows it (unread_count) and notifications carry it: one
# expression, so a badge cannot drift from the list.
#
# It starts from last_seq - read_seq: sending moves the sender's pointer to their own
# message, so every message above a pointer is someone else's. From that go the ones
# deleted for everyone and those the member hid: both few, each found by an index range
# above the pointer. No COUNT over the messages themselves, however many.
UNREAD_COUNT = """(
    c.last_seq - cm.read_seq
      - (SELECT count(*) FROM messages d
         WHERE d.chat_id = c.id AND d.deleted AND d.seq > cm.read_seq)
      - (SELECT count(*) FROM hidden_messages h JOIN messages hm ON hm.id = h.message_id
         WHERE h.user_id = $1 AND h.chat_id = c.id AND h.seq > cm.read_seq
           AND NOT hm.deleted)
)"""

# Clauses for the caller's view of messages `m`: $1 is always the caller.
NOT_HIDDEN = """NOT EXISTS (
    SELECT 1 FROM hidden_messages h WHERE h.user_id = $1 AND h.chat_id = m.chat_id AND h.seq = m.seq
)"""


# --- the all-read watermark -----------------------------------------------------------------

# Up to this many messages of one sender becoming read at once get one message_read each;
# more get a single messages_read range, so a bulk change cannot flood the sender's socket.
RECEIPTS_ONE_BY_ONE = 100

# Every member's own pointer is at or above their own messages (sending moves it), so
# "read by everyone but the sender" is simply seq <= min(read_seq) over all members:
# one index probe per chat on chat_members_read_idx, whatever the group size. One row
# per (chat, sender) of the messages that just became read by all.
# `{chats}` picks the chats: one, or an array of them.
_ADVANCE_WATERMARK = """
WITH target AS (
    SELECT c.id AS chat_id, c.read_seq AS old_seq,
           (SELECT min(read_seq) FROM chat_members WHERE chat_id = c.id) AS new_seq
    FROM chats c
    WHERE {chats}
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
          AND NOT deleted  -- no receipts for messages deleted for everyone
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
# One chat per execution: with a scalar id, PostgreSQL settles on a generic plan once
# (prepared by asyncpg), while for an array of ids it replanned every call (a generic
# plan must assume ~10 ids), which made each call about four times dearer.
ADVANCE_WATERMARK = _ADVANCE_WATERMARK.format(chats="c.id = $1::bigint")
# Every chat of an array: only for a caller that forces the generic plan (the writer's
# chatd_store_batch), where one execution for a batch's chats beats one a chat.
ADVANCE_WATERMARKS = _ADVANCE_WATERMARK.format(chats="c.id = ANY($1::bigint[])")


async def advance_read_watermarks(
    conn: asyncpg.Connection, chat_ids: list[int]
) -> list[asyncpg.Record]:
    """Move each chat's all-read watermark up to its members' lowest pointer.

    Returns one row per (chat, sender) of the messages that just became read by all
    (empty where a watermark did not move); each row also carries the chat's new
    `watermark`. The caller must hold the chats' locks, so each message is reported once.
    """
    # One round trip for all the chats (asyncpg pipelines the executions).
    return await conn.fetchmany(ADVANCE_WATERMARK, [(c, RECEIPTS_ONE_BY_ONE) for c in chat_ids])


async def publish_read_receipts(bus: Bus, rows: Iterable[asyncpg.Record]) -> None:
    """Tell each sender which of their messages became read (rows of advance_read_watermarks)."""
    for row in rows:
        if not row["sender_is_member"]:
            continue  # senders who left hear nothing more from the chat
        sender: tuple[uuid.UUID] = (row["sender_id"],)
        chat_id = row["chat_id"]
        if row["n"] > RECEIPTS_ONE_BY_ONE:
            data = MessagesReadData(chat_id=chat_id, up_to_message_id=row["last_id"])
            await publish(bus, sender, MessagesRead(data))
            continue
        for message_id in row["ids"]:
            await publish(bus, sender, MessageRead(MessageReadData(message_id, chat_id)))


# Everyone who shares a chat with $1, and $1: who hears of a new name or avatar.
_CONTACTS = """
SELECT DISTINCT other.user_id FROM chat_members mine
JOIN chat_members other ON other.chat_id = mine.chat_id
WHERE mine.user_id = $1
"""


async def contacts_of(conn: asyncpg.Connection, user_id: uuid.UUID) -> list[uuid.UUID]:
    """The users who share a chat with `user_id`, and `user_id` when in any chat."""
    return [r["user_id"] for r in await conn.fetch(_CONTACTS, user_id)]
