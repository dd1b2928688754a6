"""Chats: create_chat, the chat list (list_chats, get_chat) with unread counts, and your
notification settings per chat (set_notifications)."""

from __future__ import annotations

import uuid

import asyncpg
from msgspec import UNSET

from chatd import metrics
from chatd.handlers.base import (
    FRAME_BUDGET_BYTES,
    Context,
    fetch_chat,
    fetch_members,
    file_id_text,
    fit_in_frame,
    member_ids,
    parse_user_ids,
)
from chatd.integrations import enqueue_chat_event
from chatd.node import Node
from chatd.protocol import (
    FORBIDDEN,
    INVALID,
    MAX_GROUP_MEMBERS,
    MAX_GROUP_NAME_CHARS,
    NOT_FOUND,
    RATE_LIMITED,
    Chat,
    ChatCreated,
    ChatError,
    ChatOverview,
    ChatPage,
    CreateChat,
    Created,
    GetChat,
    ListChats,
    NotificationsChanged,
    NotificationSettings,
    SetNotifications,
    clean_text,
    no_such_chat,
)
from chatd.store import MESSAGE_COLUMNS, NOT_HIDDEN, UNREAD_COUNT, message_from_row

# --- create_chat --------------------------------------------------------------------------


async def create_chat(ctx: Context, action: CreateChat) -> Created[Chat]:
    """Create a chat; a private pair's chat may exist already (created=False)."""
    others = parse_user_ids(action.user_ids, exclude=ctx.user_id)
    if action.type == "private":
        if len(others) != 1:
            raise ChatError(INVALID, "a private chat needs exactly one other user")
        name = None
    else:
        if action.name is None:
            raise ChatError(INVALID, "a group chat needs a name")
        name = clean_text(action.name, "name", min_len=1, max_len=MAX_GROUP_NAME_CHARS)
        if len(others) + 1 > MAX_GROUP_MEMBERS:
            raise ChatError(INVALID, f"a group has at most {MAX_GROUP_MEMBERS} members")

    # Counted before anything is stored, given back when nothing was (a private chat that
    # exists already, a refusal, a failure): one chat, and every other user put into it.
    me, limits = str(ctx.user_id), ctx.node.limits
    wait = await limits.create_chat.take(me)
    if wait:
        raise ChatError(RATE_LIMITED, "too many chats created; slow down", retry_after=wait)
    wait = await limits.add_members.take(me, len(others))
    if wait:
        await limits.create_chat.give_back(me)
        raise ChatError(
            RATE_LIMITED, "too many members added to chats; slow down", retry_after=wait
        )
    stored = False
    try:
        async with ctx.node.pool.acquire() as conn, conn.transaction():
            await require_users(conn, others, by=ctx.user_id)
            if action.type == "private":
                chat_id, created = await _private_chat(conn, ctx.user_id, others[0])
            else:
                await count_group_creation(conn, ctx.user_id, limits.groups_per_day)
                chat_id = await conn.fetchval(
                    "INSERT INTO chats (type, name) VALUES ('group', $1) RETURNING id", name
                )
                await insert_members(conn, chat_id, [ctx.user_id], role="owner")
                await insert_members(conn, chat_id, others)
                created = True
            chat = await fetch_chat(conn, chat_id)
            if created:
                await enqueue_chat_event(conn, chat_id, ChatCreated(chat))
        stored = created  # committed
    finally:
        if not stored:
            await limits.create_chat.give_back(me)
            await limits.add_members.give_back(me, len(others))

    if created:
        await ctx.node.publish(member_ids(chat), ChatCreated(chat))
    return Created(chat, created)


# One user's group creations are counted one at a time (their users row is the lock; NO
# KEY UPDATE leaves others free to add them to chats), rows older than a day are pruned,
# and what is left is the day's count, oldest first.
_LOCK_CREATOR = "SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE"
_GROUPS_TODAY = """
WITH pruned AS (
    DELETE FROM group_creations WHERE user_id = $1 AND created_at <= now() - interval '1 day'
)
SELECT count(*) AS n, extract(epoch FROM min(created_at) + interval '1 day' - now()) AS wait
FROM group_creations WHERE user_id = $1 AND created_at > now() - interval '1 day'
"""


async def count_group_creation(
    conn: asyncpg.Connection, user_id: uuid.UUID, per_day: int | None
) -> None:
    """Count a group created by `user_id` now, or refuse with rate_limited past `per_day`.

    Counted in the database: exact across processes, nodes and restarts. Runs inside the
    creating transaction, so a refused or failed creation counts nothing.
    """
    if per_day is None:
        return
    await conn.execute(_LOCK_CREATOR, user_id)
    today = await conn.fetchrow(_GROUPS_TODAY, user_id)
    if today["n"] >= per_day:
        metrics.RATE_LIMITED.labels("groups_per_day").inc()
        wait = max(1.0, float(today["wait"]))
        raise ChatError(
            RATE_LIMITED, f"at most {per_day} groups a day; retry later", retry_after=wait
        )
    await conn.execute("INSERT INTO group_creations (user_id) VALUES ($1)", user_id)


# How many of the users exist (a deleted account does not), and how many block `by`.
_USERS_AND_BLOCKS = """
SELECT count(*) AS found, count(b.blocker_id) AS blocking
FROM users u LEFT JOIN blocks b ON b.blocker_id = u.id AND b.blocked_id = $2
WHERE u.id = ANY($1::uuid[]) AND u.deleted_at IS NULL
"""


async def require_users(conn: asyncpg.Connection, user_ids: list[uuid.UUID], by: uuid.UUID) -> None:
    """Every one of `user_ids` is a user who has not blocked `by` (who would put them in a
    chat): else `not_found`, or `forbidden`."""
    row = await conn.fetchrow(_USERS_AND_BLOCKS, user_ids, by)
    if row["found"] != len(user_ids):
        raise ChatError(NOT_FOUND, "one of user_ids is not a user")
    if row["blocking"]:
        raise ChatError(FORBIDDEN, "one of user_ids does not accept chats with you")


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
    await insert_members(conn, chat_id, [me, other])
    return chat_id, True


# A new member has read nothing yet but starts at the latest message: unread starts at 0.
_INSERT_MEMBERS = """
INSERT INTO chat_members (chat_id, user_id, role, read_seq)
SELECT $1, u.id, $3, c.last_seq
FROM unnest($2::uuid[]) WITH ORDINALITY AS u(id, n), chats c
WHERE c.id = $1
ORDER BY u.n
ON CONFLICT (chat_id, user_id) DO NOTHING
RETURNING user_id
"""


async def insert_members(
    conn: asyncpg.Connection, chat_id: int, user_ids: list[uuid.UUID], role: str = "member"
) -> list[uuid.UUID]:
    """Add users (in the given order) who are not members yet; return those added."""
    rows = await conn.fetch(_INSERT_MEMBERS, chat_id, user_ids, role)
    return [row["user_id"] for row in rows]


# --- the chat list ------------------------------------------------------------------------

# unread_count: store.UNREAD_COUNT, the expression notifications use too.
_OVERVIEW = f"""
SELECT c.id, c.type, c.name, c.created_at, c.last_seq, c.activity, c.version,
       c.pinned_message_id, c.photo, cm.read_seq, cm.role, rm.id AS read_upto,
       cm.mute_until, cm.notify,
       {UNREAD_COUNT} AS unread_count,
       (SELECT count(*) FROM mentions mn
        WHERE mn.user_id = $1 AND mn.chat_id = c.id AND mn.seq > cm.read_seq
          AND NOT EXISTS (SELECT 1 FROM hidden_messages h
                          WHERE h.user_id = $1 AND h.chat_id = c.id AND h.seq = mn.seq))
           AS unread_mentions
FROM chat_members cm
JOIN chats c ON c.id = cm.chat_id
LEFT JOIN messages rm ON rm.chat_id = cm.chat_id AND rm.seq = cm.read_seq
WHERE cm.user_id = $1
"""

_PAGE = _OVERVIEW + " AND c.activity < $2 ORDER BY c.activity DESC LIMIT $3"
_ONE = _OVERVIEW + " AND c.id = $2"

# Each chat's newest message the caller did not hide.
_LAST_MESSAGES = f"""
SELECT {MESSAGE_COLUMNS}
FROM unnest($2::bigint[]) AS last(chat_id)
JOIN chats c ON c.id = last.chat_id
CROSS JOIN LATERAL (
    SELECT * FROM messages m
    WHERE m.chat_id = last.chat_id AND {NOT_HIDDEN}
    ORDER BY m.seq DESC
    LIMIT 1
) m
"""

_NO_CURSOR = 2**63 - 1


async def list_chats(ctx: Context, action: ListChats) -> ChatPage:
    before = action.before or _NO_CURSOR
    async with ctx.node.pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await conn.fetch(_PAGE, ctx.user_id, before, action.limit + 1)
            chats = await _overviews(conn, ctx.user_id, rows[: action.limit], ctx.node)
    # Big groups make big entries: a page ends early rather than outgrow a client's frame.
    fitting, _ = fit_in_frame(chats, FRAME_BUDGET_BYTES)
    chats = fitting or chats[:1]
    has_more = len(rows) > len(chats)
    return ChatPage(
        chats=chats,
        has_more=has_more,
        next_before=rows[len(chats) - 1]["activity"] if has_more else None,
    )


async def get_chat(ctx: Context, action: GetChat) -> ChatOverview:
    async with ctx.node.pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            row = await conn.fetchrow(_ONE, ctx.user_id, action.chat_id)
            if row is None:
                raise no_such_chat()
            (chat,) = await _overviews(conn, ctx.user_id, [row], ctx.node)
    return chat


async def _overviews(
    conn: asyncpg.Connection,
    user_id: uuid.UUID,
    rows: list[asyncpg.Record],
    node: Node,
) -> list[ChatOverview]:
    """Four queries for a whole page: the chats, their members, their last messages, and
    the presence of the other member of the private ones."""
    chat_ids = [row["id"] for row in rows]
    members = await fetch_members(conn, chat_ids)
    partners = {
        row["id"]: uuid.UUID(m.user_uuid)
        for row in rows
        if row["type"] == "private"
        for m in members[row["id"]]
        if m.user_uuid != str(user_id)
    }
    presence = {}
    if partners:
        found = await conn.fetch(_PARTNERS, list(set(partners.values())))
        presence = await node.presence.presence_of(found)
    with_messages = [row["id"] for row in rows if row["last_seq"] > 0]
    last_messages = {
        m["chat_id"]: message_from_row(m)
        for m in await conn.fetch(_LAST_MESSAGES, user_id, with_messages)
    }
    return [
        ChatOverview(
            id=row["id"],
            type=row["type"],
            name=row["name"],
            created_at=row["created_at"],
            members=members[row["id"]],
            last_message=last_messages.get(row["id"]),
            last_seq=row["last_seq"],
            read_upto=row["read_upto"],
            read_seq=row["read_seq"],
            unread_count=row["unread_count"],
            unread_mentions=row["unread_mentions"],
            role=row["role"],
            version=row["version"],
            pinned_message_id=row["pinned_message_id"],
            photo=file_id_text(row["photo"]),
            mute_until=row["mute_until"],
            notify=row["notify"],
            presence=presence.get(partners.get(row["id"])),  # type: ignore[arg-type]
        )
        for row in rows
    ]


_PARTNERS = """
SELECT id, share_presence, last_seen_at FROM users WHERE id = ANY($1::uuid[])
"""


# --- notification settings ----------------------------------------------------------------

# $3: whether mute_until is given (null unmutes); $5: notify, or null to keep it.
_SET_NOTIFICATIONS = """
UPDATE chat_members
SET mute_until = CASE WHEN $3 THEN $4 ELSE mute_until END,
    notify = coalesce($5, notify)
WHERE chat_id = $1 AND user_id = $2
RETURNING chat_id, mute_until, notify
"""


async def set_notifications(ctx: Context, action: SetNotifications) -> NotificationSettings:
    """Change the caller's notification settings of a chat they are in; every socket of
    theirs hears the new settings (notifications_changed)."""
    mute_given = action.mute_until is not UNSET
    notify = None if action.notify is UNSET else action.notify
    row = await ctx.node.pool.fetchrow(
        _SET_NOTIFICATIONS,
        action.chat_id,
        ctx.user_id,
        mute_given,
        action.mute_until if mute_given else None,
        notify,
    )
    if row is None:
        raise no_such_chat()
    settings = NotificationSettings(row["chat_id"], row["mute_until"], row["notify"])
    await ctx.node.publish([ctx.user_id], NotificationsChanged(settings))
    return settings
