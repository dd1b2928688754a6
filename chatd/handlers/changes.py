"""Changes to stored messages: edit, delete (for everyone or for me), react and unreact,
forward, pin and unpin, and an edited message's earlier texts (GET /messages/{id}/edits).

Every change but a hide takes the chat's lock and bumps its version, so changes are
numbered gapless and in commit order like seq; `sync` replays them from a version. Each
is told to the chat's members after its commit, as the whole message (message_updated)
or the whole chat (chat_updated for pins).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
import emoji as emoji_data

from chatd import app_hooks
from chatd.handlers.base import ROLE_RANK, Context, fetch_chat, lock_chat, role_of
from chatd.handlers.files import claim_attachments
from chatd.handlers.messages import (
    VISIBLE_MESSAGE,
    ask_hook,
    no_such_message,
    retried,
    store_message,
)
from chatd.node import Node
from chatd.protocol import (
    FORBIDDEN,
    INVALID,
    MAX_TEXT_CHARS,
    NOT_FOUND,
    RATE_LIMITED,
    REJECTED,
    Chat,
    ChatError,
    ChatUpdated,
    Created,
    DeletedMessage,
    DeleteMessage,
    Edit,
    EditList,
    EditMessage,
    ForwardedFrom,
    ForwardMessage,
    GetEdits,
    Message,
    MessageHidden,
    MessageHiddenData,
    MessageUpdated,
    PinMessage,
    React,
    UnpinMessage,
    Unreact,
    clean_text,
)
from chatd.store import MESSAGE_COLUMNS, NOT_HIDDEN, message_from_row
from chatd.writer import Extras

MAX_EDITS = 100  # earlier texts kept per message
MAX_EMOJI_PER_MESSAGE = 20
MAX_EMOJI_PER_USER = 10  # on one message

# --- the message's chat, locked --------------------------------------------------------------

_CHAT_OF = "SELECT chat_id FROM messages WHERE id = $1"

# Read with the chat locked: the caller's membership and hides as they are now.
_LOCKED_MESSAGE = f"""
SELECT {MESSAGE_COLUMNS}, NOT {NOT_HIDDEN} AS hidden
FROM messages m
JOIN chats c ON c.id = m.chat_id
JOIN chat_members cm ON cm.chat_id = m.chat_id AND cm.user_id = $1
WHERE m.id = $2
"""

# The next version, and who to tell about it.
_BUMP_VERSION = """
UPDATE chats SET version = version + 1 WHERE id = $1
RETURNING version, (SELECT array_agg(user_id) FROM chat_members WHERE chat_id = $1) AS member_ids
"""


async def _lock_message(
    conn: asyncpg.Connection, ctx: Context, message_id: int, *, hidden_ok: bool = False
) -> tuple[asyncpg.Record, asyncpg.Record]:
    """Lock the chat of a message the caller can see: (the chat's lock row, the message).

    not_found when there is no such message, its chat is not the caller's, or the caller
    hid it (unless `hidden_ok`: the row's `hidden` says so).
    """
    chat_id = await conn.fetchval(_CHAT_OF, message_id)
    if chat_id is None:
        raise no_such_message()
    try:
        chat = await lock_chat(conn, chat_id, ctx.user_id)
    except ChatError:
        raise no_such_message() from None
    message = await conn.fetchrow(_LOCKED_MESSAGE, ctx.user_id, message_id)
    if message is None or (message["hidden"] and not hidden_ok):
        raise no_such_message()
    return chat, message


@contextlib.asynccontextmanager
async def counted_change(ctx: Context) -> AsyncIterator[None]:
    """Count a change against the user's change rate limit; a refused one (a ChatError)
    is given back, as a refused send is."""
    limiter, key = ctx.node.limits.change, str(ctx.user_id)
    wait = await limiter.take(key)
    if wait:
        raise ChatError(RATE_LIMITED, "too many changes; slow down", retry_after=wait)
    try:
        yield
    except ChatError as exc:
        if exc.code != REJECTED:  # a rejected text counts: the hook is not free to call
            await limiter.give_back(key)
        raise


async def _may_moderate(
    conn: asyncpg.Connection, chat: asyncpg.Record, ctx: Context, chat_id: int
) -> bool:
    """Whether the caller is an owner or admin of this group (the lock is held)."""
    if chat["type"] != "group":
        return False
    role = await role_of(conn, chat_id, ctx.user_id)
    return role is not None and ROLE_RANK[role] >= ROLE_RANK["admin"]


async def _announce(ctx: Context, member_ids: list[uuid.UUID], message: Message) -> None:
    await ctx.node.publish(member_ids, MessageUpdated(message))


# --- edit_message ---------------------------------------------------------------------------

_KEEP_OLD_TEXT = """
INSERT INTO message_edits (message_id, text, written_at)
SELECT id, text, coalesce(edited_at, created_at) FROM messages WHERE id = $1
"""

_EDIT = f"""
UPDATE messages m
SET text = $2, edited_at = clock_timestamp(), version = $3, changed = true
FROM chats c
WHERE m.id = $1 AND c.id = m.chat_id
RETURNING {MESSAGE_COLUMNS}
"""


# The before-send hook's view of an edit: the caller's own message, in a chat of theirs.
_EDITED = """
SELECT m.chat_id, c.type, m.text FROM messages m
JOIN chats c ON c.id = m.chat_id
JOIN chat_members cm ON cm.chat_id = m.chat_id AND cm.user_id = $1
WHERE m.id = $2 AND m.sender_id = $1 AND NOT m.deleted AND m.forwarded_from IS NULL
"""


async def edit_message(ctx: Context, action: EditMessage) -> Message:
    """Change your message's text; the same text again changes nothing. With the
    before-send hook, the new text is the hook's to allow, reject or rewrite (asked before
    the chat is locked: the lock is never held across an HTTP call)."""
    text = clean_text(action.text, "text", min_len=1, max_len=MAX_TEXT_CHARS)
    async with counted_change(ctx):
        if ctx.node.before_send is not None:
            text = await _before_edit(ctx, action.message_id, text)
        return await _edit(ctx, action, text)


async def _before_edit(ctx: Context, message_id: int, text: str) -> str:
    row = await ctx.node.pool.fetchrow(_EDITED, ctx.user_id, message_id)
    if row is None or row["text"] == text:
        return text  # refused (or a no-op) under the lock, for the reason that applies
    payload = {
        "chat_id": row["chat_id"],
        "chat_type": row["type"],
        "sender_uuid": str(ctx.user_id),
        "text": text,
        "client_msg_id": None,
        "reply_to": None,
        "mentions": [],
        "attachments": [],
        "forwarded": False,
        "edit_of": message_id,
    }
    return await ask_hook(ctx, payload, text, min_len=1)


async def _edit(ctx: Context, action: EditMessage, text: str) -> Message:
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        _, row = await _lock_message(conn, ctx, action.message_id)
        if row["sender_id"] != ctx.user_id:
            raise ChatError(FORBIDDEN, "only the sender may edit a message")
        if row["deleted"]:
            raise ChatError(INVALID, "a deleted message cannot be edited")
        if row["forwarded_from"] is not None:
            # Its text is attributed to someone else, who did not write an edited one.
            raise ChatError(INVALID, "a forwarded message cannot be edited")
        if row["text"] == text:
            return message_from_row(row)
        edits = await conn.fetchval(
            "SELECT count(*) FROM message_edits WHERE message_id = $1", action.message_id
        )
        if edits >= MAX_EDITS:
            raise ChatError(INVALID, f"a message can be edited at most {MAX_EDITS} times")
        bump = await conn.fetchrow(_BUMP_VERSION, row["chat_id"])
        await conn.execute(_KEEP_OLD_TEXT, action.message_id)
        message = message_from_row(
            await conn.fetchrow(_EDIT, action.message_id, text, bump["version"])
        )
        await app_hooks.enqueue_message_updated(conn, message)
    await _announce(ctx, bump["member_ids"], message)
    return message


async def list_edits(ctx: Context, action: GetEdits) -> EditList:
    """A message's earlier texts, oldest first (members only)."""
    async with ctx.node.pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            if await conn.fetchrow(VISIBLE_MESSAGE, ctx.user_id, action.message_id) is None:
                raise no_such_message()
            rows = await conn.fetch(
                "SELECT text, written_at FROM message_edits WHERE message_id = $1"
                " ORDER BY replaced_at",
                action.message_id,
            )
    return EditList(edits=[Edit(text=r["text"], timestamp=r["written_at"]) for r in rows])


# --- delete_message -------------------------------------------------------------------------

# A tombstone: the id, seq, sender and time stay (seq stays gapless); the rest goes, with
# the earlier texts, the reactions and the mentions.
# What a delete for everyone leaves of a message: a tombstone (its seq stays).
_TOMBSTONE = """text = '', deleted = true, changed = true, edited_at = NULL, reply_to = NULL,
    mentions = NULL, forwarded_from = NULL, reactions = NULL, attachments = NULL"""

_ERASE = f"""
WITH edits AS (
    DELETE FROM message_edits WHERE message_id = $1
), reactions AS (
    DELETE FROM message_reactions WHERE message_id = $1
), mentioned AS (
    DELETE FROM mentions WHERE chat_id = $3 AND seq = $4
), files AS (
    -- Released: the collector deletes what nothing else refers to (chatd/files.py).
    DELETE FROM message_files WHERE message_id = $1
)
UPDATE messages m
SET {_TOMBSTONE}, version = $2
FROM chats c
WHERE m.id = $1 AND c.id = m.chat_id
RETURNING {MESSAGE_COLUMNS}
"""

# Every message of one sender in one chat as tombstones, with one new version of the chat
# (so a sync from before it replays them all). Runs with the chat locked.
_ERASE_SENDERS = f"""
WITH doomed AS (
    SELECT id, seq FROM messages WHERE chat_id = $1 AND sender_id = $2 AND NOT deleted
), edits AS (
    DELETE FROM message_edits WHERE message_id IN (SELECT id FROM doomed)
), reactions AS (
    DELETE FROM message_reactions WHERE message_id IN (SELECT id FROM doomed)
), mentioned AS (
    DELETE FROM mentions WHERE chat_id = $1 AND seq IN (SELECT seq FROM doomed)
), files AS (
    DELETE FROM message_files WHERE message_id IN (SELECT id FROM doomed)
)
UPDATE messages m
SET {_TOMBSTONE}, version = $3
FROM chats c
WHERE m.id IN (SELECT id FROM doomed) AND c.id = m.chat_id
RETURNING {MESSAGE_COLUMNS}
"""


async def erase_messages_of(
    conn: asyncpg.Connection, chat_id: int, sender_id: uuid.UUID
) -> tuple[list[Message], Chat | None, list[uuid.UUID]]:
    """Delete for everyone every message of `sender_id` in a chat whose lock the transaction
    holds, as delete_message does one: tombstones under one new version of the chat.

    Returns the tombstones in seq order, the chat when a pin went with them, and the
    members to announce both to after the commit; nothing changes when there is none.
    """
    if not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM messages WHERE chat_id = $1 AND sender_id = $2"
        " AND NOT deleted)",
        chat_id,
        sender_id,
    ):
        return [], None, []
    bump = await conn.fetchrow(_BUMP_VERSION, chat_id)
    rows = await conn.fetch(_ERASE_SENDERS, chat_id, sender_id, bump["version"])
    tombstones = sorted(map(message_from_row, rows), key=lambda m: m.seq)
    unpinned = await conn.fetchval(
        "UPDATE chats SET pinned_message_id = NULL WHERE id = $1"
        " AND pinned_message_id = ANY($2::bigint[]) RETURNING id",
        chat_id,
        [m.id for m in tombstones],
    )
    chat_after = await fetch_chat(conn, chat_id) if unpinned else None
    return tombstones, chat_after, bump["member_ids"]


_UNPIN_DELETED = """
UPDATE chats SET pinned_message_id = NULL WHERE id = $1 AND pinned_message_id = $2
"""

_HIDE = """
INSERT INTO hidden_messages (user_id, chat_id, seq, message_id, version)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT DO NOTHING
"""


async def delete_message(ctx: Context, action: DeleteMessage) -> DeletedMessage:
    """Delete for everyone (a tombstone), or hide for yourself; a repeat changes nothing."""
    answer = DeletedMessage(
        chat_id=0, message_id=action.message_id, for_everyone=action.for_everyone
    )
    chat_after: Chat | None = None
    async with counted_change(ctx), ctx.node.pool.acquire() as conn, conn.transaction():
        # A message you hid is still yours to delete for everyone.
        chat, row = await _lock_message(conn, ctx, action.message_id, hidden_ok=True)
        chat_id = answer.chat_id = row["chat_id"]
        if not action.for_everyone:
            if row["hidden"]:
                return answer
            # Stamped with the chat's version, read under its lock: a sync that has seen a
            # later version has seen this hide too.
            await conn.execute(
                _HIDE, ctx.user_id, chat_id, row["seq"], action.message_id, chat["version"]
            )
        elif row["deleted"]:
            return answer
        else:
            if row["sender_id"] != ctx.user_id and not await _may_moderate(
                conn, chat, ctx, chat_id
            ):
                raise ChatError(
                    FORBIDDEN, "only the sender, or a group's owner or admins, may delete it"
                )
            bump = await conn.fetchrow(_BUMP_VERSION, chat_id)
            tombstone = message_from_row(
                await conn.fetchrow(_ERASE, action.message_id, bump["version"], chat_id, row["seq"])
            )
            await app_hooks.enqueue_message_updated(conn, tombstone)
            if chat["pinned_message_id"] == action.message_id:
                await conn.execute(_UNPIN_DELETED, chat_id, action.message_id)
                chat_after = await fetch_chat(conn, chat_id)  # one change: the same version

    if not action.for_everyone:
        hidden = MessageHidden(MessageHiddenData(chat_id=chat_id, message_id=action.message_id))
        await ctx.node.publish([ctx.user_id], hidden)
        return answer
    await _announce(ctx, bump["member_ids"], tombstone)
    if chat_after is not None:
        await ctx.node.publish(bump["member_ids"], ChatUpdated(chat_after))
    return answer


async def moderate_delete(node: Node, message_id: int) -> DeletedMessage:
    """Delete any message for everyone (an admin's moderation), as delete_message does;
    a message deleted already changes nothing."""
    chat_after: Chat | None = None
    async with node.pool.acquire() as conn, conn.transaction():
        chat_id = await conn.fetchval(_CHAT_OF, message_id)
        if chat_id is None:
            raise ChatError(NOT_FOUND, "no such message")
        pinned = await conn.fetchval(
            "SELECT pinned_message_id FROM chats WHERE id = $1 FOR UPDATE", chat_id
        )
        row = await conn.fetchrow("SELECT seq, deleted FROM messages WHERE id = $1", message_id)
        answer = DeletedMessage(chat_id=chat_id, message_id=message_id, for_everyone=True)
        if row["deleted"]:
            return answer
        bump = await conn.fetchrow(_BUMP_VERSION, chat_id)
        tombstone = message_from_row(
            await conn.fetchrow(_ERASE, message_id, bump["version"], chat_id, row["seq"])
        )
        await app_hooks.enqueue_message_updated(conn, tombstone)
        if pinned == message_id:
            await conn.execute(_UNPIN_DELETED, chat_id, message_id)
            chat_after = await fetch_chat(conn, chat_id)
    await node.publish(bump["member_ids"], MessageUpdated(tombstone))
    if chat_after is not None:
        await node.publish(bump["member_ids"], ChatUpdated(chat_after))
    return answer


# --- react, unreact -------------------------------------------------------------------------

_REACTIONS_NOW = """
SELECT count(*) FILTER (WHERE emoji = $3 AND user_id = $2) AS mine_already,
       count(*) FILTER (WHERE emoji = $3) AS used,
       count(DISTINCT emoji) AS distinct_emoji,
       count(*) FILTER (WHERE user_id = $2) AS mine
FROM message_reactions WHERE message_id = $1
"""

# The wire's reactions list, rebuilt from the rows: each emoji in the order it was first
# used, with its count and its newest 20 users.
_REBUILD_REACTIONS = f"""
UPDATE messages m SET version = $2, changed = true, reactions = (
    SELECT jsonb_agg(
        jsonb_build_object('emoji', r.emoji, 'count', r.n, 'users', r.users)
        ORDER BY r.first_at, r.emoji
    )
    FROM (
        SELECT emoji, count(*) AS n, min(created_at) AS first_at,
               (array_agg(user_id::text ORDER BY created_at DESC, user_id))[1:20] AS users
        FROM message_reactions WHERE message_id = $1
        GROUP BY emoji
    ) r
)
FROM chats c
WHERE m.id = $1 AND c.id = m.chat_id
RETURNING {MESSAGE_COLUMNS}
"""


# Every emoji Unicode lists, in its fully-qualified form (what keyboards send), keyed by
# the emoji without its variation selectors: "❤" and "❤️" are one reaction, stored as "❤️".
_FULLY_QUALIFIED = {
    key.replace("\ufe0f", ""): key
    for key, data in emoji_data.EMOJI_DATA.items()
    if data["status"] == emoji_data.STATUS["fully_qualified"]
}


def one_emoji(value: str) -> str:
    """`value`'s fully-qualified form when it is one emoji (a ZWJ sequence, a flag, a
    keycap, a skin tone on its base: one grapheme cluster), else `invalid`."""
    canonical = _FULLY_QUALIFIED.get(value.replace("\ufe0f", ""))
    if canonical is None:
        raise ChatError(INVALID, "emoji must be a single emoji")
    return canonical


async def react(ctx: Context, action: React) -> Message:
    """Add your reaction; one that is there already changes nothing."""
    emoji = one_emoji(action.emoji)
    async with counted_change(ctx), ctx.node.pool.acquire() as conn, conn.transaction():
        _, row = await _lock_message(conn, ctx, action.message_id)
        if row["deleted"]:
            raise ChatError(INVALID, "a deleted message cannot be reacted to")
        now = await conn.fetchrow(_REACTIONS_NOW, action.message_id, ctx.user_id, emoji)
        if now["mine_already"]:
            return message_from_row(row)
        if not now["used"] and now["distinct_emoji"] >= MAX_EMOJI_PER_MESSAGE:
            raise ChatError(INVALID, f"a message has at most {MAX_EMOJI_PER_MESSAGE} emoji")
        if now["mine"] >= MAX_EMOJI_PER_USER:
            raise ChatError(
                INVALID, f"at most {MAX_EMOJI_PER_USER} reactions of yours on one message"
            )
        await conn.execute(
            "INSERT INTO message_reactions (message_id, emoji, user_id) VALUES ($1, $2, $3)",
            action.message_id,
            emoji,
            ctx.user_id,
        )
        message, member_ids = await _reactions_changed(conn, row["chat_id"], action.message_id)
    await _announce(ctx, member_ids, message)
    return message


async def unreact(ctx: Context, action: Unreact) -> Message:
    """Take your reaction back; one that is not there changes nothing."""
    emoji = one_emoji(action.emoji)
    async with counted_change(ctx), ctx.node.pool.acquire() as conn, conn.transaction():
        # A reaction you left on a message you hid since is still yours to take back.
        _, row = await _lock_message(conn, ctx, action.message_id, hidden_ok=True)
        removed = await conn.execute(
            "DELETE FROM message_reactions WHERE message_id = $1 AND emoji = $2 AND user_id = $3",
            action.message_id,
            emoji,
            ctx.user_id,
        )
        if removed == "DELETE 0":
            return message_from_row(row)
        message, member_ids = await _reactions_changed(conn, row["chat_id"], action.message_id)
    await _announce(ctx, member_ids, message)
    return message


async def _reactions_changed(
    conn: asyncpg.Connection, chat_id: int, message_id: int
) -> tuple[Message, list[uuid.UUID]]:
    bump = await conn.fetchrow(_BUMP_VERSION, chat_id)
    row = await conn.fetchrow(_REBUILD_REACTIONS, message_id, bump["version"])
    message = message_from_row(row)
    await app_hooks.enqueue_message_updated(conn, message)
    return message, bump["member_ids"]


# --- forward_message ------------------------------------------------------------------------

_FORWARDABLE = f"""
SELECT {MESSAGE_COLUMNS}, u.name AS sender_name
FROM messages m
JOIN chats c ON c.id = m.chat_id
JOIN chat_members cm ON cm.chat_id = m.chat_id AND cm.user_id = $1
JOIN users u ON u.id = m.sender_id
WHERE m.id = $2 AND {NOT_HIDDEN}
"""


async def forward_message(ctx: Context, action: ForwardMessage) -> Created[Message]:
    """A copy of a message you can see, as your new message in a chat of yours. A forward
    of a forward names the first sender, and no message names the chat it came from."""
    row = await ctx.node.pool.fetchrow(_FORWARDABLE, ctx.user_id, action.message_id)
    if row is None or row["deleted"]:
        # A retry whose source went away since is answered with what it stored.
        original = await retried(ctx, action.chat_id, action.client_msg_id)
        if original is not None:
            return original
        if row is None:
            raise no_such_message()
        raise ChatError(INVALID, "a deleted message cannot be forwarded")
    source = message_from_row(row)
    forwarded = source.forwarded_from or ForwardedFrom(
        sender_uuid=source.sender_uuid, sender_name=row["sender_name"], timestamp=source.timestamp
    )
    # The copy carries the same files: each stays while any message refers to it.
    await claim_attachments(ctx, source.attachments)
    extras = Extras(forwarded_from=forwarded, attachments=tuple(source.attachments))
    return await store_message(ctx, action.chat_id, source.text, action.client_msg_id, extras)


# --- pin_message, unpin_message -------------------------------------------------------------

_SET_PIN = "UPDATE chats SET pinned_message_id = $2 WHERE id = $1"


async def pin_message(ctx: Context, action: PinMessage) -> Chat:
    async with counted_change(ctx), ctx.node.pool.acquire() as conn, conn.transaction():
        chat, row = await _lock_message(conn, ctx, action.message_id)
        chat_id = row["chat_id"]
        if action.chat_id is not None and action.chat_id != chat_id:
            raise no_such_message()
        await _require_pinner(conn, ctx, chat, chat_id)
        if row["deleted"]:
            raise ChatError(INVALID, "a deleted message cannot be pinned")
        after, member_ids = await _set_pin(conn, chat, chat_id, action.message_id)
    if member_ids:
        await ctx.node.publish(member_ids, ChatUpdated(after))
    return after


async def unpin_message(ctx: Context, action: UnpinMessage) -> Chat:
    async with counted_change(ctx), ctx.node.pool.acquire() as conn, conn.transaction():
        chat = await lock_chat(conn, action.chat_id, ctx.user_id)
        await _require_pinner(conn, ctx, chat, action.chat_id)
        after, member_ids = await _set_pin(conn, chat, action.chat_id, None)
    if member_ids:
        await ctx.node.publish(member_ids, ChatUpdated(after))
    return after


async def _require_pinner(
    conn: asyncpg.Connection, ctx: Context, chat: asyncpg.Record, chat_id: int
) -> None:
    """Groups: owners and admins pin; private chats: either member."""
    if chat["type"] == "group" and not await _may_moderate(conn, chat, ctx, chat_id):
        raise ChatError(FORBIDDEN, "only a group's owner or admins may pin")


async def _set_pin(
    conn: asyncpg.Connection, chat: asyncpg.Record, chat_id: int, message_id: int | None
) -> tuple[Chat, list[uuid.UUID]]:
    """Pin `message_id` (None: unpin) in a locked chat: the chat after, and who to tell
    (nobody when the pin was there already: nothing changed)."""
    if chat["pinned_message_id"] == message_id:
        return await fetch_chat(conn, chat_id), []
    bump = await conn.fetchrow(_BUMP_VERSION, chat_id)
    await conn.execute(_SET_PIN, chat_id, message_id)
    return await fetch_chat(conn, chat_id), bump["member_ids"]
