"""The search workload: GET /search for a common word, in a 1M-message database.

Seeded with SQL like the history workload (a million messages through the socket would
take longer than the measurement is worth): `--search-chats` groups created through the
API, the searching user in `--search-member-of` of them, each filled with
`--search-messages` / chats messages of words drawn from a small Russian and English
vocabulary, so every word is common. The searcher's pages are then timed, sequentially,
for a common word ("привет", in about a quarter of the messages, with its forms), a
phrase and a word found nowhere.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from typing import Any
from urllib.parse import quote

import msgspec

from chatd.bench import accounts
from chatd.bench.http11 import KeepAliveClient
from chatd.bench.stats import percentiles

VOCABULARY = (
    "привет мир как дела сегодня завтра встреча проект отчёт код сервер база данных работа "
    "кофе обед вечер утро новости приветы приветствую друзья работаю hello world meeting "
    "project deploy server database release coffee lunch tomorrow today report code review "
    "bug fix test build"
)
QUERIES = {"common word": "привет", "phrase": '"deploy release"', "no match": "несуществующее"}
PAGE = 20


class _Page(msgspec.Struct):
    results: list[msgspec.Raw]
    has_more: bool


_decode_page = msgspec.json.Decoder(_Page).decode

# A sentence of n random words (a function: an aggregate over the outer query's words
# alone would be evaluated once for the whole INSERT).
_SENTENCE = """
CREATE OR REPLACE FUNCTION pg_temp.bench_sentence(n int, w text[]) RETURNS text
LANGUAGE sql VOLATILE AS
$$ SELECT string_agg(w[1 + floor(random() * array_length(w, 1))::int], ' ')
   FROM generate_series(1, n) $$
"""
_SEED = """
INSERT INTO messages (chat_id, seq, sender_id, text)
SELECT $1, s, $2, pg_temp.bench_sentence(3 + (s % 9)::int, string_to_array($5, ' '))
FROM generate_series($3::bigint, $4::bigint) AS s
"""


async def seed_sql(
    database_url: str, chats: list[tuple[int, str]], per_chat: int, progress: accounts.Progress
) -> int:
    """Fill each (chat, sender) up to `per_chat` messages; return the messages in them."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    total = 0
    try:
        await conn.execute(_SENTENCE)
        for i, (chat_id, sender) in enumerate(chats):
            async with conn.transaction():
                last = await conn.fetchval(
                    "SELECT last_seq FROM chats WHERE id = $1 FOR UPDATE", chat_id
                )
                if last < per_chat:
                    await conn.execute(_SEED, chat_id, sender, last + 1, per_chat, VOCABULARY)
                    await conn.execute(
                        "UPDATE chats SET last_seq = $2, read_seq = $2 WHERE id = $1",
                        chat_id,
                        per_chat,
                    )
                    await conn.execute(
                        "UPDATE chat_members SET read_seq = $2 WHERE chat_id = $1",
                        chat_id,
                        per_chat,
                    )
            total += per_chat
            progress(f"search: seeding with SQL, chat {i + 1}/{len(chats)}")
        await conn.execute("ANALYZE messages")
    finally:
        await conn.close()
    return total


async def measure(base_url: str, token: str, q: str, seconds: float) -> dict[str, Any]:
    """First pages of `q`, one after the other, for `seconds`."""
    latencies = array("q")
    failures: dict[str, int] = {}
    client = KeepAliveClient(base_url, {"Authorization": f"Bearer {token}"})
    found = 0
    deadline = time.perf_counter() + seconds
    try:
        while time.perf_counter() < deadline:
            started = time.perf_counter_ns()
            status, body = await client.get(f"/search?q={quote(q)}&limit={PAGE}")
            elapsed = time.perf_counter_ns() - started
            if status != 200:
                failures[str(status)] = failures.get(str(status), 0) + 1
                continue
            found = len(_decode_page(body).results)
            latencies.append(elapsed)
    finally:
        await client.close()
    return {
        "query": q,
        "requests": len(latencies),
        "results_per_page": found,
        "latency_ms": percentiles(latencies),
        "failures": failures,
    }


def run(ctx: Any) -> dict[str, Any]:
    from chatd.bench import procs, workloads

    args = ctx.args
    if not args.database_url:
        raise RuntimeError("the search workload seeds with SQL: give --database-url")
    users = asyncio.run(
        accounts.make_users(ctx.base_url, 10, ctx.state, "search", args.reuse_users, ctx.progress)
    )
    kept = ctx.state.data.get("search") if args.reuse_users else None
    if kept and kept.get("searcher") == users[0].uuid:
        chat_ids = kept["chat_ids"]
    else:
        # The searcher is in the first --search-member-of groups; the others are the rest's.
        rooms = [
            users if i < args.search_member_of else users[1:] for i in range(args.search_chats)
        ]
        chat_ids = asyncio.run(
            accounts.create_chats(ctx.base_url, rooms, "group", "bench search", ctx.progress)
        )
        ctx.state.data["search"] = {"searcher": users[0].uuid, "chat_ids": chat_ids}
        ctx.state.save()
    per_chat = args.search_messages // len(chat_ids)
    senders = [(c, users[1].uuid) for c in chat_ids]
    messages = asyncio.run(seed_sql(args.database_url, senders, per_chat, ctx.progress))
    result: dict[str, Any] = {
        "workload": "search",
        "messages": messages,
        "chats": len(chat_ids),
        "searcher_chats": args.search_member_of,
        "searcher_messages": per_chat * args.search_member_of,
        "page_size": PAGE,
    }
    server = ctx.server_group()
    workloads.wait_quiet(server, ctx.progress, "search")
    for key, q in QUERIES.items():
        ctx.progress(f"search: {key} ({q}) for {args.search_seconds:g}s", force=True)
        meter = workloads.CpuMeter({"server": server, "postgres": procs.postgres_group()})
        meter.start()
        result[key] = asyncio.run(measure(ctx.base_url, users[0].token, q, args.search_seconds))
        result[key].update(meter.read())
    common = result["common word"]
    ctx.progress.done(
        f"search: p99 {common['latency_ms']['p99']} ms for a common word "
        f"({common['requests']} requests)"
    )
    return result
