"""Messages: send_message, get_message, and catching up: the unread snapshot a socket
starts with, and sync after a reconnect.

Sends are stored by the node's MessageWriter (chatd/writer.py), in batches.
"""

from __future__ import annotations

from dataclasses import replace

import asyncpg
from msgspec import UNSET

from chatd.handlers.base import FRAME_BUDGET_BYTES, Context, fit_in_frame, parse_user_ids
from chatd.handlers.blocks import blocked_ids
from chatd.handlers.files import claim_uploads
from chatd.protocol import (
    INVALID,
    MAX_TEXT_CHARS,
    NOT_FOUND,
    RATE_LIMITED,
    REJECTED,
    UNAVAILABLE,
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
    encode,
    no_such_chat,
)
from chatd.store import MESSAGE_COLUMNS, NOT_HIDDEN, message_from_row
from chatd.writer import NO_EXTRAS, Extras

# --- send_message -----------------------------------------------------------------------

# Whether the caller is a member, what reply_to is in this chat (NULL: not a message of
# it), and how many of the mentioned users are members. Only for sends that carry them.
_CHECK_EXTRAS = """
SELECT EXISTS (SELECT 1 FROM chat_members WHERE chat_id = $1 AND user_id = $2) AS is_member,
       (SELECT deleted FROM messages WHERE id = $3 AND chat_id = $1) AS reply_deleted,
       (SELECT count(*) FROM chat_members WHERE chat_id = $1 AND user_id = ANY($4::uuid[]))
           AS mentioned
"""


async def send_message(ctx: Context, action: SendMessage) -> Created[Message]:
    """Store and fan out a message; a retry (same client_msg_id) gets the original back.

    Attachments are the caller's uploads; with them, the text may be empty."""
    min_len = 0 if action.attachments else 1
    text = clean_text(action.text, "text", min_len=min_len, max_len=MAX_TEXT_CHARS)
    extras = NO_EXTRAS
    if action.reply_to is not None or action.mentions or action.attachments:
        try:
            extras = await _checked_extras(ctx, action)
        except ChatError:
            # A retry whose reply_to was deleted since, say: its original is the answer.
            original = await retried(ctx, action.chat_id, action.client_msg_id)
            if original is None:
                raise
            return original
    return await store_message(ctx, action.chat_id, text, action.client_msg_id, extras)


async def _checked_extras(ctx: Context, action: SendMessage) -> Extras:
    attachments = await claim_uploads(ctx, action.attachments)
    if action.reply_to is None and not action.mentions:
        return Extras(attachments=attachments)  # membership: the writer checks it
    mentions = tuple(parse_user_ids(action.mentions))
    row = await ctx.node.pool.fetchrow(
        _CHECK_EXTRAS, action.chat_id, ctx.user_id, action.reply_to, list(mentions)
    )
    if not row["is_member"]:
        raise no_such_chat()
    if action.reply_to is not None and row["reply_deleted"] is None:
        raise ChatError(INVALID, "reply_to is not a message of this chat")
    if row["reply_deleted"]:
        raise ChatError(INVALID, "reply_to is a deleted message")
    if row["mentioned"] != len(mentions):
        raise ChatError(INVALID, "mentions must be members of the chat")
    return Extras(reply_to=action.reply_to, mentions=mentions, attachments=attachments)


async def retried(ctx: Context, chat_id: int, client_msg_id: str | None) -> Created[Message] | None:
    """The message a send with this client_msg_id stored before, if any (as a retry)."""
    original = await ctx.node.writer.original(ctx.user_id, chat_id, client_msg_id)
    return None if original is None else Created(original, created=False)


async def store_message(
    ctx: Context, chat_id: int, text: str, client_msg_id: str | None, extras: Extras
) -> Created[Message]:
    """A send or a forward: rate-limited per user, stored once per client_msg_id."""
    if client_msg_id is not None and "\x00" in client_msg_id:
        raise ChatError(INVALID, "client_msg_id must not contain NUL characters")
    writer = ctx.node.writer
    limits = ctx.node.limits
    # Socket and REST sends alike; bots have their own rate (CHATD_BOT_MESSAGE_RATE).
    limit, key = (limits.bot_message if ctx.is_bot else limits.message), str(ctx.user_id)
    wait = await limit.take(key)
    if wait:
        # A retry of a stored message is answered even now: it stores nothing. Looked up
        # only when refused, so a normal send costs no extra query.
        original = await retried(ctx, chat_id, client_msg_id)
        if original is not None:
            return original
        raise ChatError(RATE_LIMITED, "too many messages; slow down", retry_after=wait)
    try:
        if ctx.node.before_send is not None:
            checked = await before_send(ctx, chat_id, text, client_msg_id, extras)
            if isinstance(checked, Created):
                await limit.give_back(key)
                return checked  # a retry of a message the hook let through before
            text = checked
        stored = await writer.store(ctx.user_id, chat_id, text, client_msg_id, extras)
    except ChatError as exc:
        if exc.code != REJECTED:  # a rejected message counts: the hook is not free to call
            await limit.give_back(key)
        raise
    except BaseException:
        await limit.give_back(key)  # refused or failed: the retry must not pay twice
        raise
    if not stored.created:
        await limit.give_back(key)  # a retry, answered with the message stored before
    return stored


# --- the before-send hook (chatd/hooks.py) ------------------------------------------------

_CHAT_TYPE_OF_MEMBER = """
SELECT c.type FROM chats c JOIN chat_members cm ON cm.chat_id = c.id AND cm.user_id = $2
WHERE c.id = $1
"""


async def before_send(
    ctx: Context, chat_id: int, text: str, client_msg_id: str | None, extras: Extras
) -> str | Created[Message]:
    """The text to store, as the hook allows or rewrites it; `rejected` with the hook's
    reason; `unavailable` when it failed and the policy is fail-closed. A retry of a
    stored message is answered with it, without asking the hook again.

    Membership is checked first: the hook never hears of a chat the sender is not in (its
    answer could otherwise tell them the chat exists).
    """
    assert ctx.node.before_send is not None
    original = await retried(ctx, chat_id, client_msg_id) if client_msg_id else None
    if original is not None:
        return original
    chat_type = await ctx.node.pool.fetchval(_CHAT_TYPE_OF_MEMBER, chat_id, ctx.user_id)
    if chat_type is None:
        raise no_such_chat()
    payload = {
        "chat_id": chat_id,
        "chat_type": chat_type,
        "sender_uuid": str(ctx.user_id),
        "text": text,
        "client_msg_id": client_msg_id,
        "reply_to": extras.reply_to,
        "mentions": [str(m) for m in extras.mentions],
        "attachments": [a.id for a in extras.attachments],
        "forwarded": extras.forwarded_from is not None,
        "edit_of": None,
    }
    return await ask_hook(ctx, payload, text, min_len=0 if extras.attachments else 1)


async def ask_hook(ctx: Context, payload: dict[str, object], text: str, *, min_len: int) -> str:
    """The hook's verdict on a text about to be stored (a send or an edit): the text to
    store, or `rejected`, or `unavailable` when it failed and the policy is fail-closed."""
    assert ctx.node.before_send is not None
    verdict = await ctx.node.before_send.check(payload)
    if verdict.action == "reject":
        raise ChatError(REJECTED, verdict.reason or "the message was rejected")
    if verdict.action == "rewrite":
        try:
            return clean_text(verdict.text or "", "text", min_len=min_len, max_len=MAX_TEXT_CHARS)
        except ChatError:
            verdict = replace(verdict, action="failed")
    if verdict.action == "failed" and not ctx.node.settings.before_send_fail_open:
        raise ChatError(UNAVAILABLE, "the message could not be checked; retry")
    return text


# --- get_message --------------------------------------------------------------------------

# A message of a chat the caller is in, unless they hid it.
VISIBLE_MESSAGE = f"""
SELECT {MESSAGE_COLUMNS}
FROM messages m
JOIN chats c ON c.id = m.chat_id
JOIN chat_members cm ON cm.chat_id = m.chat_id AND cm.user_id = $1
WHERE m.id = $2 AND {NOT_HIDDEN}
"""


def no_such_message() -> ChatError:
    # The same answer whether the message does not exist, is in a chat the caller is not
    # in, or was hidden by the caller.
    return ChatError(NOT_FOUND, "no such message")


async def get_message(ctx: Context, action: GetMessage) -> Message:
    row = await ctx.node.pool.fetchrow(VISIBLE_MESSAGE, ctx.user_id, action.message_id)
    if row is None:
        raise no_such_message()
    return message_from_row(row)


# --- sync ---------------------------------------------------------------------------------

# The caller's chats among those asked, with how far each goes.
_SYNC_CHATS = """
SELECT c.id, c.last_seq, c.version, c.pinned_message_id
FROM chats c JOIN chat_members cm ON cm.chat_id = c.id AND cm.user_id = $1
WHERE c.id = ANY($2::bigint[])
"""

# The messages after each given seq that the caller did not hide, chat by chat in the
# order asked, at most $4 per chat (one more than a page: is there more?) and $5 in all:
# no more than a reply can carry is ever read.
_SYNC_MESSAGES = f"""
SELECT want.n, {MESSAGE_COLUMNS}
FROM unnest($2::bigint[], $3::bigint[]) WITH ORDINALITY AS want(chat_id, after_seq, n)
JOIN chats c ON c.id = want.chat_id
CROSS JOIN LATERAL (
    SELECT * FROM messages m
    WHERE m.chat_id = want.chat_id AND m.seq > want.after_seq AND {NOT_HIDDEN}
    ORDER BY m.seq
    LIMIT $4
) m
ORDER BY want.n, m.seq
LIMIT $5
"""

# The new form: messages at or below the client's seq changed since its version, at most
# $5 per chat (more is too_long) and $6 in all, in version order. A message the client
# holds was sent at or before its version: only a change (`changed`, a partial index) can
# have put it above.
_SYNC_UPDATED = f"""
SELECT want.n, {MESSAGE_COLUMNS}, NOT {NOT_HIDDEN} AS hidden
FROM unnest($2::bigint[], $3::bigint[], $4::bigint[]) WITH ORDINALITY
    AS want(chat_id, upto_seq, after_version, n)
JOIN chats c ON c.id = want.chat_id
CROSS JOIN LATERAL (
    SELECT * FROM messages
    WHERE chat_id = want.chat_id AND changed
      AND version > want.after_version AND seq <= want.upto_seq
    ORDER BY version
    LIMIT $5
) m
ORDER BY want.n, m.version
LIMIT $6
"""

# What the caller hid since the version before the client's. A hide changes no version
# (nobody else may learn of it), so one made while the chat was at exactly the client's
# version may be news to it; and one made at the version before may have been overtaken
# by the next change's event, before the socket dropped. At most $4 per chat, $5 in all.
_SYNC_HIDDEN = """
SELECT want.n, want.chat_id, h.message_id
FROM unnest($2::bigint[], $3::bigint[]) WITH ORDINALITY AS want(chat_id, from_version, n)
CROSS JOIN LATERAL (
    SELECT message_id, seq FROM hidden_messages
    WHERE user_id = $1 AND chat_id = want.chat_id AND version >= want.from_version - 1
    ORDER BY seq
    LIMIT $4
) h
ORDER BY want.n, h.seq
LIMIT $5
"""

# A message is at least ~200 bytes of JSON, so a full reply never holds more than this.
SYNC_MAX_MESSAGES = FRAME_BUDGET_BYTES // 200
# A hidden id is at most 20 bytes of JSON. Hides are not changes: a user's own hides
# never make a sync too_long unless a reply could not hold them.
SYNC_MAX_HIDDEN = FRAME_BUDGET_BYTES // 20


async def sync(ctx: Context, action: Sync) -> SyncResult:
    """What a reconnecting client missed, chat by chat, so it misses nothing.

    Old form (a seq): the new messages after it. New form (a SyncPoint): those, and the
    changes since its version to the messages it holds. Per chat, at most `limit` new
    messages in seq order; `has_more` says to sync again from the answer's seq (and
    version). The reply stays under a frame budget: the changes of a chat come whole or
    not at all (deferred with has_more; too_long when they could never fit), and new
    messages come as many as fit. Read in one snapshot, so every part agrees.
    """
    # Below the reply's row limit, so the first chat's changes are never cut by it.
    max_changes = min(ctx.node.settings.sync_max_changes, SYNC_MAX_MESSAGES - 1)
    points = {
        chat_id: (point, None) if isinstance(point, int) else (point.seq, point.version)
        for chat_id, point in action.chats.items()
    }
    async with ctx.node.pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            chats = {
                row["id"]: row
                for row in await conn.fetch(_SYNC_CHATS, ctx.user_id, list(action.chats))
            }
            # Nothing held (seq 0): nothing held can have changed.
            versioned = [
                (c, seq, version)
                for c, (seq, version) in points.items()
                if c in chats and version is not None and 0 < seq and version < chats[c]["version"]
            ]
            changed = await conn.fetch(
                _SYNC_UPDATED,
                ctx.user_id,
                [c for c, _, _ in versioned],
                [seq for _, seq, _ in versioned],
                [version for _, _, version in versioned],
                max_changes + 1,
                SYNC_MAX_MESSAGES,
            )
            held = [(c, v) for c, (_, v) in points.items() if c in chats and v is not None]
            hidden_rows = await conn.fetch(
                _SYNC_HIDDEN,
                ctx.user_id,
                [c for c, _ in held],
                [v for _, v in held],
                SYNC_MAX_HIDDEN + 1,
                SYNC_MAX_HIDDEN + 1,
            )
            wanted = [
                (c, seq)
                for c, (seq, _) in points.items()
                if c in chats and chats[c]["last_seq"] > seq
            ]
            rows = await conn.fetch(
                _SYNC_MESSAGES,
                ctx.user_id,
                [chat_id for chat_id, _ in wanted],
                [seq for _, seq in wanted],
                action.limit + 1,
                SYNC_MAX_MESSAGES,
            )

    updated: dict[int, list[asyncpg.Record]] = {}
    for row in changed:
        updated.setdefault(row["chat_id"], []).append(row)
    # Chats whose changes the row limit cut (the last one read, and those after it) wait.
    cut_from = changed[-1]["n"] if len(changed) >= SYNC_MAX_MESSAGES else len(versioned) + 1
    deferred = {c for n, (c, _, _) in enumerate(versioned, 1) if n >= cut_from}
    hidden: dict[int, list[int]] = {}
    for row in hidden_rows:
        hidden.setdefault(row["chat_id"], []).append(row["message_id"])
    if len(hidden_rows) > SYNC_MAX_HIDDEN:  # the row limit cut them: those chats wait too
        deferred |= {c for n, (c, _) in enumerate(held, 1) if n >= hidden_rows[-1]["n"]}
    found: dict[int, list[asyncpg.Record]] = {}
    for row in rows:
        found.setdefault(row["chat_id"], []).append(row)
    # Chats the row limit may have cut (the last one read, and those after it) have more.
    cut = (
        {c for n, (c, _) in enumerate(wanted, 1) if n >= rows[-1]["n"]}
        if (len(rows) >= SYNC_MAX_MESSAGES)
        else set()
    )

    result: dict[int, SyncedChat] = {}
    budget = FRAME_BUDGET_BYTES
    for chat_id, (after_seq, after_version) in points.items():
        chat = chats.get(chat_id)
        if chat is None:
            result[chat_id] = SyncedChat(messages=[], has_more=False, error=NOT_FOUND)
            continue
        new = found.get(chat_id, [])
        if after_version is None:
            taken, budget, more = _take_new(new, action.limit, budget)
            result[chat_id] = SyncedChat(messages=taken, has_more=more or chat_id in cut)
            continue
        changes = updated.get(chat_id, [])
        hides = hidden.get(chat_id, [])
        if len(changes) > max_changes or len(hides) > SYNC_MAX_HIDDEN:
            result[chat_id] = _too_long(chat)
            continue
        entry = SyncedChat(
            messages=[],
            updated=[message_from_row(r) for r in changes if not r["hidden"]],
            hidden=hides,
            pinned_message_id=chat["pinned_message_id"],
            seq=after_seq,
            version=chat["version"],
            has_more=False,
            too_long=False,
        )
        size = len(encode(entry))
        if size > FRAME_BUDGET_BYTES:
            result[chat_id] = _too_long(chat)
            continue
        if chat_id in deferred or size > budget:
            # Not this time: the changes come whole or not at all. Sync again from here.
            entry.updated, entry.hidden = [], []
            entry.version, entry.has_more = after_version, True
            result[chat_id] = entry
            continue
        entry.messages, budget, more = _take_new(new, action.limit, budget - size)
        entry.has_more = more or chat_id in cut
        if entry.messages:
            entry.seq = entry.messages[-1].seq
        if not entry.has_more:
            entry.seq = max(after_seq, chat["last_seq"])  # what is left, you hid
        result[chat_id] = entry
    return SyncResult(chats=result)


def _take_new(
    rows: list[asyncpg.Record], limit: int, budget: int
) -> tuple[list[Message], int, bool]:
    """The first `limit` new messages, as many as fit `budget`: (them, the budget left,
    whether more remain)."""
    taken, budget = fit_in_frame(map(message_from_row, rows[:limit]), budget)
    return taken, budget, len(taken) < len(rows)


def _too_long(chat: asyncpg.Record) -> SyncedChat:
    """Too many changes to replay: the client refetches, then syncs from here."""
    return SyncedChat(
        messages=[],
        updated=[],
        hidden=[],
        pinned_message_id=chat["pinned_message_id"],
        seq=chat["last_seq"],
        version=chat["version"],
        has_more=False,
        too_long=True,
    )


# --- the unread snapshot ------------------------------------------------------------------

UNREAD_SNAPSHOT_LIMIT = 500

# Driven from the user's memberships: per chat with something unread, an index range on
# messages (chat_id, seq) — never a walk over the whole messages table in id order.
_UNREAD_SNAPSHOT = f"""
SELECT {MESSAGE_COLUMNS}
FROM chat_members cm
JOIN chats c ON c.id = cm.chat_id AND c.last_seq > cm.read_seq
CROSS JOIN LATERAL (
    SELECT * FROM messages m
    WHERE m.chat_id = cm.chat_id AND m.seq > cm.read_seq AND m.sender_id <> $1
      AND NOT m.deleted AND {NOT_HIDDEN}
    ORDER BY m.seq
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
    # The block list (at most MAX_BLOCKS uuids, ~40 KB) comes out of the frame's budget.
    blocked = await blocked_ids(ctx.node.pool, ctx.user_id)
    budget = FRAME_BUDGET_BYTES - len(encode(blocked))
    messages, _ = fit_in_frame(
        (message_from_row(row) for row in rows[:UNREAD_SNAPSHOT_LIMIT]), budget
    )
    return UnreadMessages(
        data=messages, has_more=len(rows) > len(messages), blocked=blocked or UNSET
    )
