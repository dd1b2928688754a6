"""The typing indicator (forwarded to the other members, never stored, throttled per user)
and presence as asked for: get_presence, GET /users/{uuid} (chatd/presence.py tells)."""

from __future__ import annotations

from chatd.handlers.base import Context, parse_user_id, parse_user_ids
from chatd.protocol import (
    NOT_FOUND,
    RATE_LIMITED,
    ChatError,
    GetPresence,
    GetUser,
    PresenceList,
    Typing,
    TypingData,
    TypingEvent,
    UserProfile,
    no_such_chat,
)

_OTHER_MEMBERS = """
SELECT EXISTS (SELECT 1 FROM chat_members WHERE chat_id = $1 AND user_id = $2) AS is_member,
       ARRAY(SELECT user_id FROM chat_members WHERE chat_id = $1 AND user_id <> $2) AS others
"""


async def typing(ctx: Context, action: Typing) -> None:
    gate = ctx.node.typing_gate
    # Claim before the query, so two sockets of one user cannot both get through.
    if not await gate.claim(ctx.user_id, action.chat_id):
        return None  # dropped silently
    # The gate bounds each chat; this bounds the user, who could name many chats (each a
    # query and a fan-out). Repeats the gate drops cost nothing and do not count.
    wait = await ctx.node.limits.typing.take(str(ctx.user_id))
    if wait:
        await gate.release(ctx.user_id, action.chat_id)
        raise ChatError(RATE_LIMITED, "too many typing events; slow down", retry_after=wait)
    row = await ctx.node.pool.fetchrow(_OTHER_MEMBERS, action.chat_id, ctx.user_id)
    if not row["is_member"]:
        await gate.release(ctx.user_id, action.chat_id)
        raise no_such_chat()
    notice = TypingEvent(TypingData(chat_id=action.chat_id, user_uuid=str(ctx.user_id)))
    await ctx.node.publish(row["others"], notice)
    return None


# --- presence ------------------------------------------------------------------------------

# Users visible to $1: themselves, and those sharing a chat with them.
_VISIBLE = """
SELECT u.id, u.name, u.share_presence, u.last_seen_at
FROM users u
WHERE u.id = ANY($2::uuid[]) AND u.deleted_at IS NULL
  AND (u.id = $1 OR EXISTS (
        SELECT 1 FROM chat_members mine JOIN chat_members theirs USING (chat_id)
        WHERE mine.user_id = $1 AND theirs.user_id = u.id))
"""


async def get_presence(ctx: Context, action: GetPresence) -> PresenceList:
    """Presence of the users asked for that the caller shares a chat with (or is); the
    others are left out, so the answer tells nothing about users the caller cannot see."""
    user_ids = parse_user_ids(action.user_ids)
    rows = await ctx.node.pool.fetch(_VISIBLE, ctx.user_id, user_ids)
    presence = await ctx.node.presence.presence_of(rows)
    return PresenceList([presence[u] for u in user_ids if u in presence])


_USER = "SELECT id, name FROM users WHERE id = $1 AND deleted_at IS NULL"


async def get_user(ctx: Context, action: GetUser) -> UserProfile:
    """A user's name (as the user list shows it), and their presence when visible."""
    user_id = parse_user_id(action.user_uuid, "user_uuid")
    async with ctx.node.pool.acquire() as conn:
        user = await conn.fetchrow(_USER, user_id)
        if user is None:
            raise ChatError(NOT_FOUND, "no such user")
        rows = await conn.fetch(_VISIBLE, ctx.user_id, [user_id])
    presence = await ctx.node.presence.presence_of(rows)
    return UserProfile(str(user_id), user["name"], presence.get(user_id))
