"""History: a chat's messages a page at a time, newest page first (GET /history/{chat_id}).

Two ways to page: `page` and `page_size` (OFFSET, for a UI that numbers pages), or the
keyset cursor `before` with `limit`, which stays fast however deep it goes.
"""

from __future__ import annotations

from chatd.handlers.base import Context
from chatd.protocol import GetHistory, History, no_such_chat
from chatd.store import MESSAGE_COLUMNS, NOT_HIDDEN, message_from_row

_LAST_SEQ = """
SELECT c.last_seq FROM chats c
JOIN chat_members cm ON cm.chat_id = c.id AND cm.user_id = $2
WHERE c.id = $1
"""

# The messages the caller hid are left out.
_NEWEST_FIRST = f"""
SELECT {MESSAGE_COLUMNS}
FROM messages m JOIN chats c ON c.id = m.chat_id
WHERE m.chat_id = $2 AND m.seq < $3 AND {NOT_HIDDEN}
ORDER BY m.seq DESC
LIMIT $4 OFFSET $5
"""

# `before` is a keyset cursor on message ids: "older than this id", whether or not that id
# is a message of this chat. Within a chat ids grow with seq (a chat's messages are inserted
# in seq order under its row lock, and ids come from one sequence), so "id < before" is
# "seq < the seq bound below". The bound is found by primary key when `before` is a
# message of this chat (the cursor a client normally holds); otherwise by walking the
# chat's newest messages down to the first older one, no more than a deep page= OFFSET
# reads; a cursor at or below the chat's first id ("before=1") is answered by that first
# message alone. COALESCE evaluates each subquery only when those before it found nothing.
_BELOW_SEQ = """
SELECT coalesce(
    (SELECT seq FROM messages WHERE id = $2 AND chat_id = $1),
    (SELECT 1 WHERE $2 <= (SELECT id FROM messages WHERE chat_id = $1 ORDER BY seq LIMIT 1)),
    (SELECT seq + 1 FROM messages WHERE chat_id = $1 AND id < $2 ORDER BY seq DESC LIMIT 1),
    1
)
"""


async def history(ctx: Context, action: GetHistory) -> History:
    if action.before is not None:
        size, offset = action.limit, 0
    else:
        size, offset = action.page_size, (action.page - 1) * action.page_size
    async with ctx.node.pool.acquire() as conn:
        last_seq = await conn.fetchval(_LAST_SEQ, action.chat_id, ctx.user_id)
        if last_seq is None:
            raise no_such_chat()
        below_seq = last_seq + 1
        if action.before is not None:
            below_seq = await conn.fetchval(_BELOW_SEQ, action.chat_id, action.before)
        rows = await conn.fetch(
            _NEWEST_FIRST, ctx.user_id, action.chat_id, below_seq, size + 1, offset
        )

    page = rows[:size]
    page.reverse()
    return History(messages=[message_from_row(r) for r in page], has_more=len(rows) > size)
