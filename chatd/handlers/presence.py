"""The typing indicator: forwarded to the other members, never stored, throttled per user."""

from __future__ import annotations

from chatd.handlers.base import Context
from chatd.protocol import RATE_LIMITED, ChatError, Typing, TypingData, TypingEvent, no_such_chat

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
