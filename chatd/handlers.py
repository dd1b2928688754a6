"""The dispatcher and the action handlers, each with the SQL it runs.

A handler is a plain async function `(ctx, action) -> ack data`. It raises ChatError
for anything the client got wrong, and tells other sockets about changes only after
its transaction has committed.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg

from chatd.hub import Bus, Outbound
from chatd.protocol import (
    INVALID,
    MAX_GROUP_NAME_CHARS,
    MAX_TEXT_CHARS,
    NOT_FOUND,
    Chat,
    ChatCreated,
    ChatError,
    CreateChat,
    MarkRead,
    Member,
    Message,
    MessageRead,
    NewMessage,
    ReadReceipt,
    ReadUpto,
    SendMessage,
    clean_text,
    encode_text,
)


@dataclass(slots=True)
class Context:
    """What a handler may use: the database, the bus, and who is asking."""

    pool: asyncpg.Pool
    bus: Bus
    user_id: uuid.UUID


# --- messages as the wire shows them -----------------------------------------------------

# A message is "read" once its seq is at or below the chat's all-read watermark.
MESSAGE_COLUMNS = """
    m.id, m.chat_id, m.seq, m.sender_id, m.text, m.created_at, m.client_msg_id,
    m.seq <= c.read_seq AS is_read
"""


def message_from_row(row: asyncpg.Record) -> Message:
    return Message(
        id=row["id"],
        chat_id=row["chat_id"],
        seq=row["seq"],
        sender_uuid=str(row["sender_id"]),
        text=row["text"],
        timestamp=row["created_at"],
        read_status="read" if row["is_read"] else "unread",
        client_msg_id=row["client_msg_id"],
    )


# --- create_chat --------------------------------------------------------------------------

MAX_GROUP_INVITES = 1000


async def create_chat(ctx: Context, action: CreateChat) -> Chat:
    others = _parse_user_ids(action.user_ids, exclude=ctx.user_id)
    if action.type == "private":
        if len(others) != 1:
            raise ChatError(INVALID, "a private chat needs exactly one other user", 422)
        name = None
    else:
        if action.name is None:
            raise ChatError(INVALID, "a group chat needs a name", 422)
        name = clean_text(action.name, "name", min_len=1, max_len=MAX_GROUP_NAME_CHARS)
        if len(others) > MAX_GROUP_INVITES:
            raise ChatError(INVALID, f"at most {MAX_GROUP_INVITES} users per call", 422)

    async with ctx.pool.acquire() as conn, conn.transaction():
        found = await conn.fetchval("SELECT count(*) FROM users WHERE id = ANY($1::uuid[])", others)
        if found != len(others):
            raise ChatError(NOT_FOUND, "one of user_ids is not a user", 404)
        if action.type == "private":
            chat_id, created = await _private_chat(conn, ctx.user_id, others[0])
        else:
            chat_id = await conn.fetchval(
                "INSERT INTO chats (type, name) VALUES ('group', $1) RETURNING id", name
            )
            await _add_members(conn, chat_id, [ctx.user_id, *others])
            created = True
        chat = await fetch_chat(conn, chat_id)

    if created:
        member_ids = [uuid.UUID(m.user_uuid) for m in chat.members]
        await ctx.bus.publish(member_ids, Outbound(encode_text(ChatCreated(chat))))
    return chat


def _parse_user_ids(raw: list[str], *, exclude: uuid.UUID) -> list[uuid.UUID]:
    ids: dict[uuid.UUID, None] = {}
    for value in raw:
        try:
            user_id = uuid.UUID(value)
        except ValueError:
            raise ChatError(INVALID, f"user_ids: {value[:64]!r} is not a UUID", 422) from None
        if user_id != exclude:
            ids[user_id] = None
    return list(ids)


async def _private_chat(
    conn: asyncpg.Connection, me: uuid.UUID, other: uuid.UUID
) -> tuple[int, bool]:
    """Return (chat id, created?) for the one private chat of this pair."""
    key = ":".join(sorted((str(me), str(other))))
    # A concurrent create of the same pair waits on the unique index, then finds ours.
    chat_id = await conn.fetchval(
        "INSERT INTO chats (type, private_key) VALUES ('private', $1)"
        " ON CONFLICT (private_key) DO NOTHING RETURNING id",
        key,
    )
    if chat_id is None:
        return await conn.fetchval("SELECT id FROM chats WHERE private_key = $1", key), False
    await _add_members(conn, chat_id, [me, other])
    return chat_id, True


async def _add_members(conn: asyncpg.Connection, chat_id: int, user_ids: list[uuid.UUID]) -> None:
    await conn.execute(
        "INSERT INTO chat_members (chat_id, user_id) SELECT $1, unnest($2::uuid[])",
        chat_id,
        user_ids,
    )


async def fetch_chat(conn: asyncpg.Connection, chat_id: int) -> Chat:
    chat = await conn.fetchrow(
        "SELECT id, type, name, created_at FROM chats WHERE id = $1", chat_id
    )
    members = await conn.fetch(
        "SELECT u.id, u.name FROM chat_members cm JOIN users u ON u.id = cm.user_id"
        " WHERE cm.chat_id = $1 ORDER BY cm.joined_at, u.name, u.id",
        chat_id,
    )
    return Chat(
        id=chat["id"],
        type=chat["type"],
        name=chat["name"],
        created_at=chat["created_at"],
        members=[Member(user_uuid=str(m["id"]), name=m["name"]) for m in members],
    )


# --- send_message -------------------------------------------------------------------------

# Locking the chat row serialises senders of one chat until commit: seq order = commit order.
_LOCK_CHAT_FOR_SEND = """
SELECT c.read_seq AS chat_read_seq, cm.read_seq AS my_read_seq
FROM chats c JOIN chat_members cm ON cm.chat_id = c.id AND cm.user_id = $2
WHERE c.id = $1
FOR UPDATE OF c
"""

_INSERT_MESSAGE = """
WITH chat AS (
    UPDATE chats SET last_seq = last_seq + 1 WHERE id = $1 RETURNING id, last_seq
), msg AS (
    INSERT INTO messages (chat_id, seq, sender_id, text, client_msg_id)
    SELECT id, last_seq, $2, $3, $4 FROM chat
    RETURNING id, seq, created_at
), sender_has_read AS (
    UPDATE chat_members SET read_seq = (SELECT seq FROM msg)
    WHERE chat_id = $1 AND user_id = $2
)
SELECT msg.id, msg.seq, msg.created_at,
       ARRAY(SELECT user_id FROM chat_members WHERE chat_id = $1) AS member_ids
FROM msg
"""

_FIND_BY_CLIENT_ID = f"""
SELECT {MESSAGE_COLUMNS}
FROM messages m JOIN chats c ON c.id = m.chat_id
WHERE m.sender_id = $1 AND m.client_msg_id = $2
"""


async def send_message(ctx: Context, action: SendMessage) -> Message:
    text = clean_text(action.text, "text", min_len=1, max_len=MAX_TEXT_CHARS)
    client_msg_id = action.client_msg_id
    if client_msg_id is not None and "\x00" in client_msg_id:
        raise ChatError(INVALID, "client_msg_id must not contain NUL characters", 422)

    async with ctx.pool.acquire() as conn:
        if client_msg_id is not None:
            original = await _original(conn, ctx.user_id, client_msg_id, action.chat_id)
            if original is not None:
                return original
        try:
            async with conn.transaction():
                lock = await conn.fetchrow(_LOCK_CHAT_FOR_SEND, action.chat_id, ctx.user_id)
                if lock is None:
                    raise ChatError(NOT_FOUND, "no such chat", 404)
                row = await conn.fetchrow(
                    _INSERT_MESSAGE, action.chat_id, ctx.user_id, text, client_msg_id
                )
                newly_read: list[asyncpg.Record] = []
                watermark = lock["chat_read_seq"]
                # Only a sender who was holding the watermark back can move it by sending.
                if lock["my_read_seq"] <= watermark:
                    newly_read, watermark = await advance_read_watermark(conn, action.chat_id)
        except asyncpg.UniqueViolationError:
            # A concurrent retry with the same client_msg_id committed first.
            original = await _original(conn, ctx.user_id, client_msg_id, action.chat_id)
            if original is None:
                raise
            return original

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
    return message


async def _original(
    conn: asyncpg.Connection, sender: uuid.UUID, client_msg_id: str | None, chat_id: int
) -> Message | None:
    row = await conn.fetchrow(_FIND_BY_CLIENT_ID, sender, client_msg_id)
    if row is None:
        return None
    if row["chat_id"] != chat_id:
        raise ChatError(INVALID, "client_msg_id was already used in another chat", 422)
    return message_from_row(row)


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
SELECT m.id, m.sender_id, (SELECT read_seq FROM moved) AS watermark
FROM messages m, old, moved
WHERE m.chat_id = $1 AND m.seq > old.seq AND m.seq <= moved.read_seq
ORDER BY m.seq
"""


async def advance_read_watermark(
    conn: asyncpg.Connection, chat_id: int
) -> tuple[list[asyncpg.Record], int]:
    """Move the chat's all-read watermark up to its members' lowest pointer.

    Returns the messages that just became read by all (id, sender_id) and the watermark.
    The caller must hold the chat row lock, so each message is reported exactly once.
    """
    rows = await conn.fetch(_ADVANCE_WATERMARK, chat_id)
    if rows:
        return rows, rows[0]["watermark"]
    return [], await conn.fetchval("SELECT read_seq FROM chats WHERE id = $1", chat_id)


async def publish_read_receipts(bus: Bus, chat_id: int, rows: Iterable[asyncpg.Record]) -> None:
    for row in rows:
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


# --- the dispatcher -----------------------------------------------------------------------

Handler = Callable[[Context, Any], Awaitable[Any]]

HANDLERS: dict[type, Handler] = {
    CreateChat: create_chat,
    SendMessage: send_message,
    MarkRead: mark_read,
}


async def dispatch(ctx: Context, action: Any) -> Any:
    return await HANDLERS[type(action)](ctx, action)
