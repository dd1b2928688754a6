"""The typing indicator: forwarded to the other members, never stored, throttled per user."""

from __future__ import annotations

import time
import uuid

from chatd.handlers.base import Context, no_such_chat, rate_limited
from chatd.hub import Outbound
from chatd.protocol import Typing, TypingEvent, TypingNotice, encode_text
from chatd.ratelimit import RedisBuckets

TYPING_INTERVAL_SECONDS = 2.0


class TypingGate:
    """Lets through at most one typing event per (user, chat) per interval.

    In this process; with `remote` (CHATD_REDIS_URL) in the whole cluster, falling back
    to this process's own table while Redis does not answer.
    """

    def __init__(
        self, interval: float = TYPING_INTERVAL_SECONDS, remote: RedisBuckets | None = None
    ) -> None:
        self.interval = interval
        self.remote = remote
        self._last: dict[tuple[uuid.UUID, int], float] = {}
        self._prune_at = 10_000

    async def claim(self, user_id: uuid.UUID, chat_id: int) -> bool:
        """True when this event may go out; it then counts as the interval's one event."""
        if self.remote is not None:
            claimed = await self.remote.claim(f"typing_chat:{user_id}:{chat_id}", self.interval)
            if claimed is not None:
                return claimed
        now = time.monotonic()
        key = (user_id, chat_id)
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        if len(self._last) >= self._prune_at:
            self._forget_before(now - self.interval)
            self._prune_at = max(10_000, 2 * len(self._last))  # amortised: prune rarely
        self._last[key] = now
        return True

    async def release(self, user_id: uuid.UUID, chat_id: int) -> None:
        """Undo a claim for an event that did not go out."""
        if self.remote is not None and await self.remote.unclaim(
            f"typing_chat:{user_id}:{chat_id}"
        ):
            return
        self._last.pop((user_id, chat_id), None)

    def _forget_before(self, cutoff: float) -> None:
        self._last = {key: at for key, at in self._last.items() if at >= cutoff}


_OTHER_MEMBERS = """
SELECT EXISTS (SELECT 1 FROM chat_members WHERE chat_id = $1 AND user_id = $2) AS is_member,
       ARRAY(SELECT user_id FROM chat_members WHERE chat_id = $1 AND user_id <> $2) AS others
"""


async def typing(ctx: Context, action: Typing) -> None:
    # Claim before the query, so two sockets of one user cannot both get through.
    if not await ctx.typing_gate.claim(ctx.user_id, action.chat_id):
        return None  # dropped silently
    # The gate bounds each chat; this bounds the user, who could name many chats (each a
    # query and a fan-out). Repeats the gate drops cost nothing and do not count.
    wait = await ctx.limits.typing.take(str(ctx.user_id))
    if wait:
        await ctx.typing_gate.release(ctx.user_id, action.chat_id)
        raise rate_limited("too many typing events; slow down", wait)
    row = await ctx.pool.fetchrow(_OTHER_MEMBERS, action.chat_id, ctx.user_id)
    if not row["is_member"]:
        await ctx.typing_gate.release(ctx.user_id, action.chat_id)
        raise no_such_chat()
    notice = TypingEvent(TypingNotice(chat_id=action.chat_id, user_uuid=str(ctx.user_id)))
    await ctx.bus.publish(row["others"], Outbound(encode_text(notice)))
    return None
