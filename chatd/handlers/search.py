"""Message search: full text over the caller's chats, newest first, with highlight offsets.

The column is `messages.search` (migrations/0010), `to_tsvector('russian', text)` stored,
with a GIN index over the messages not deleted for everyone. The 'russian'
configuration stems Cyrillic words with the Russian Snowball stemmer and Latin words with
the English one, so "привет" finds "Привет, мир!" and "приветы", and "run" finds
"running" (docs/protocol.md, "Search", tells why not 'simple').

Newest first is the hard part: a common word matches a large share of the history, and
"every match, sorted" is as slow as the history is long. So a page is found in two ways:

1. **Windows.** In each of the caller's chats, walk its newest messages (below `before`)
   down the (chat_id, seq) index, testing each against the query, until the page is full
   or a window of `_window()` messages is used up. What this finds is provably the newest
   matches down to a boundary: every message above the highest point where a chat's walk
   stopped short has been looked at. When that proven part fills the page, it is the
   answer: a common word costs about (page size / its frequency) messages per chat.
2. **The index.** Otherwise (a rare word, or many quiet chats), the GIN index finds every
   match in the caller's chats, which is then few by construction, and they are sorted.

Within a chat ids grow with seq (messages are inserted in seq order under the chat's
lock), so "newest" is "highest id" both within a chat and across them.
"""

from __future__ import annotations

import uuid

import asyncpg

from chatd.handlers.base import Context
from chatd.protocol import (
    RATE_LIMITED,
    ChatError,
    Highlight,
    SearchHit,
    SearchMessages,
    SearchResults,
    no_such_chat,
)
from chatd.store import MESSAGE_COLUMNS, NOT_HIDDEN, message_from_row

# The text-search configuration: the stored column (migrations/0010) is computed with it.
CONFIG = "russian"
_MATCHES = "m.search @@ q.query"  # messages.search: to_tsvector(CONFIG, text), stored


def _query(param: str) -> str:
    return f"(SELECT websearch_to_tsquery('{CONFIG}'::regconfig, {param}) AS query) q"


# Messages tested per search in the windows, over all the chats searched.
WINDOW_BUDGET = 4000
_NO_CURSOR = 2**63 - 1

_CHATS = "SELECT chat_id FROM chat_members WHERE user_id = $1"

# $1 caller, $2 query text, $3 chat ids, $4 before, $5 window, $6 matches wanted per chat.
# Per chat: its newest matches in the window (up to $6), and where the window ended when
# it was used up. A query of stop words alone matches nothing (numnode = 0).
_WINDOWS = f"""
WITH q AS (SELECT websearch_to_tsquery('{CONFIG}'::regconfig, $2) AS query)
SELECT c.chat_id, w.hits,
       CASE WHEN cardinality(w.hits) < $6 THEN
           (SELECT id FROM messages
            WHERE chat_id = c.chat_id AND id < $4 AND NOT deleted
            ORDER BY seq DESC OFFSET $5 - 1 LIMIT 1)
       END AS window_end
FROM unnest($3::bigint[]) AS c(chat_id)
CROSS JOIN q
CROSS JOIN LATERAL (SELECT ARRAY(
    SELECT m.id FROM (
        SELECT id, seq, search FROM messages
        WHERE chat_id = c.chat_id AND id < $4 AND NOT deleted
        ORDER BY seq DESC LIMIT $5
    ) m
    WHERE {_MATCHES}
      AND NOT EXISTS (SELECT 1 FROM hidden_messages h
                      WHERE h.user_id = $1 AND h.chat_id = c.chat_id AND h.seq = m.seq)
    ORDER BY m.seq DESC LIMIT $6
) AS hits) w
WHERE numnode(q.query) > 0
"""

# Every match in the chats, newest first, found through the GIN index. Only asked when
# the windows found matches sparse, so "every match" is few; "id + 0" keeps the planner
# from walking the primary key newest first instead, which would read the whole table
# when its estimate of the query's frequency is wrong.
_BY_INDEX = f"""
SELECT m.id
FROM messages m, {_query("$2")}
WHERE m.chat_id = ANY($3::bigint[]) AND m.id < $4 AND NOT m.deleted
  AND numnode(q.query) > 0 AND {_MATCHES} AND {NOT_HIDDEN}
ORDER BY m.id + 0 DESC
LIMIT $5
"""

# The page's messages as the wire shows them, with the matches marked by \x01 ... \x02
# (characters a text could hold are made spaces first, so offsets stay the text's own).
_PAGE = f"""
SELECT {MESSAGE_COLUMNS},
       ts_headline('{CONFIG}'::regconfig, translate(m.text, E'\\x01\\x02', '  '), q.query,
                   'StartSel=' || chr(1) || ', StopSel=' || chr(2) || ', HighlightAll=true')
           AS marked
FROM messages m JOIN chats c ON c.id = m.chat_id, {_query("$1")}
WHERE m.id = ANY($2::bigint[])
"""


async def search_messages(ctx: Context, action: SearchMessages) -> SearchResults:
    """The caller's newest messages matching `q` below `before`: in `chat_id`, or in every
    chat the caller is in now (`not_found` for a chat they are not in)."""
    wait = await ctx.node.limits.search.take(str(ctx.user_id))
    if wait:
        raise ChatError(RATE_LIMITED, "too many searches; slow down", retry_after=wait)
    q = action.q.strip()
    before = action.before or _NO_CURSOR
    want = action.limit + 1  # one more tells whether there is a next page
    async with ctx.node.pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            chat_ids = await _chats(conn, ctx.user_id, action.chat_id)
            ids: list[int] = []
            if chat_ids and q:
                ids = await _newest_matches(conn, ctx.user_id, q, chat_ids, before, want)
            rows = await conn.fetch(_PAGE, q, ids[: action.limit]) if ids else []
    by_id = {row["id"]: row for row in rows}
    page = [by_id[i] for i in ids[: action.limit] if i in by_id]
    has_more = len(ids) > action.limit
    return SearchResults(
        results=[
            SearchHit(message=message_from_row(row), highlights=highlights(row["marked"]))
            for row in page
        ],
        has_more=has_more,
        next_before=page[-1]["id"] if has_more and page else None,
    )


async def _chats(conn: asyncpg.Connection, user_id: uuid.UUID, chat_id: int | None) -> list[int]:
    if chat_id is None:
        return [row["chat_id"] for row in await conn.fetch(_CHATS, user_id)]
    member = await conn.fetchval(_CHATS + " AND chat_id = $2", user_id, chat_id)
    if member is None:
        raise no_such_chat()
    return [chat_id]


def _window(chats: int, want: int) -> int:
    return max(want, WINDOW_BUDGET // chats)


async def _newest_matches(
    conn: asyncpg.Connection,
    user_id: uuid.UUID,
    q: str,
    chat_ids: list[int],
    before: int,
    want: int,
) -> list[int]:
    """Ids of the newest `want` matches, newest first (fewer when there are no more)."""
    window = _window(len(chat_ids), want)
    found: list[int] = []
    boundary = 0  # every message above it, in every chat, has been tested
    for row in await conn.fetch(_WINDOWS, user_id, q, chat_ids, before, window, want):
        hits = row["hits"]
        found.extend(hits)
        if len(hits) == want:
            boundary = max(boundary, hits[-1])  # older matches of this chat are unknown
        elif row["window_end"] is not None:
            boundary = max(boundary, row["window_end"])  # the window ran out
    found.sort(reverse=True)
    proven = [i for i in found if i >= boundary]
    if len(proven) >= want or boundary == 0:
        return proven[:want]
    return [row["id"] for row in await conn.fetch(_BY_INDEX, user_id, q, chat_ids, before, want)]


def highlights(marked: str) -> list[Highlight]:
    """Offsets of the \\x01 ... \\x02 marks of ts_headline, in the unmarked text."""
    spans: list[Highlight] = []
    position, start = 0, None
    for char in marked:
        if char == "\x01":
            start = position
        elif char == "\x02":
            if start is not None and position > start:
                spans.append(Highlight(start, position))
            start = None
        else:
            position += 1
    return spans
