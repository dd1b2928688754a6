"""The history workload: keyset pages (`?before=<id>&limit=50`) of a chat with 1M messages.

Seeding a million messages through the socket would take longer than the measurement is
worth, so with --database-url the bench writes them with SQL straight into the database
chatd uses, into a chat created through the API (so its membership is chatd's own): big
batches, each in a transaction holding the chat's row lock as send_message does, numbering
`seq` on from `chats.last_seq` without gaps and moving `last_seq` (and the members' read
pointers) to the end. Without a database URL it sends a smaller count through the API and
the report says so. The seeded chat is remembered in the state file and reused.
"""

from __future__ import annotations

import asyncio
import random
import time
from array import array
from typing import Any

import msgspec

from chatd.bench import accounts
from chatd.bench.http11 import KeepAliveClient
from chatd.bench.stats import percentiles
from chatd.bench.wsclient import WsClient, connect

BATCH = 100_000
PAGE = 50


class _Page(msgspec.Struct):
    messages: list[msgspec.Raw]
    has_more: bool


_decode_page = msgspec.json.Decoder(_Page).decode


async def seed_sql(
    database_url: str, chat_id: int, sender: str, target: int, progress: accounts.Progress
) -> int:
    """Insert messages until the chat holds `target`; return how many it holds."""
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        while True:
            async with conn.transaction():
                last = await conn.fetchval(
                    "SELECT last_seq FROM chats WHERE id = $1 FOR UPDATE", chat_id
                )
                if last is None:
                    raise RuntimeError(f"chat {chat_id} is not in {database_url}")
                if last >= target:
                    return last
                count = min(BATCH, target - last)
                await conn.execute(
                    """
                    INSERT INTO messages (chat_id, seq, sender_id, text, created_at)
                    SELECT $1, s, $2, 'history bench message ' || s,
                           now() - make_interval(secs => ($3 - s) * 0.001)
                    FROM generate_series($4::bigint, $3::bigint) AS s
                    """,
                    chat_id,
                    sender,
                    last + count,
                    last + 1,
                )
                await conn.execute(
                    "UPDATE chats SET last_seq = $2, read_seq = $2,"
                    " activity = nextval('chat_activity_seq') WHERE id = $1",
                    chat_id,
                    last + count,
                )
                await conn.execute(
                    "UPDATE chat_members SET read_seq = $2 WHERE chat_id = $1",
                    chat_id,
                    last + count,
                )
            progress(f"history: seeding with SQL {last + count:,}/{target:,} messages")
    finally:
        await conn.close()


async def sample_ids_sql(database_url: str, chat_id: int, last_seq: int, n: int) -> list[int]:
    """Ids of `n` random messages with a full page below them."""
    import asyncpg

    seqs = [random.randint(PAGE + 1, last_seq) for _ in range(n)]
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT id FROM messages WHERE chat_id = $1 AND seq = ANY($2::bigint[])", chat_id, seqs
        )
    finally:
        await conn.close()
    return [r["id"] for r in rows]


class _Sender(WsClient):
    """Sends through /connect with a window of requests in flight, collecting acked ids."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[int] = []
        self.ready = asyncio.get_running_loop().create_future()
        self.window = asyncio.Semaphore(200)

    def on_text(self, payload: memoryview) -> None:
        frame = msgspec.json.decode(payload)
        if frame.get("action") == "unread_messages" and not self.ready.done():
            self.ready.set_result(None)
        elif frame.get("action") == "ack":
            self.ids.append(frame["data"]["id"])
            self.window.release()
        elif frame.get("action") == "error":
            self.window.release()


async def seed_api(
    ws_base: str, token: str, chat_id: int, count: int, progress: accounts.Progress
) -> list[int]:
    sock = await connect(_Sender, f"{ws_base}/connect", {"Authorization": f"Bearer {token}"})
    assert isinstance(sock, _Sender)
    await sock.ready
    for i in range(count):
        await sock.window.acquire()
        body = {
            "action": "send_message",
            "chat_id": chat_id,
            "text": f"history bench message {i}",
            "request_id": str(i),
        }
        sock.send_text(msgspec.json.encode(body))
        if i % 1000 == 0:
            progress(f"history: seeding through the API {i:,}/{count:,} messages")
    for _ in range(200):
        await sock.window.acquire()
    sock.close()
    return sock.ids


async def measure(
    base_url: str, token: str, chat_id: int, ids: list[int], concurrency: int, seconds: float
) -> dict[str, Any]:
    """Fetch keyset pages at random positions for `seconds` with `concurrency` connections."""
    latencies = array("q")
    failures: dict[str, int] = {}
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        client = KeepAliveClient(base_url, {"Authorization": f"Bearer {token}"})
        try:
            while time.perf_counter() < deadline:
                before = random.choice(ids)
                started = time.perf_counter_ns()
                status, body = await client.get(f"/history/{chat_id}?before={before}&limit={PAGE}")
                elapsed = time.perf_counter_ns() - started
                if status != 200:
                    failures[str(status)] = failures.get(str(status), 0) + 1
                    continue
                if len(_decode_page(body).messages) != PAGE:
                    failures["short page"] = failures.get("short page", 0) + 1
                latencies.append(elapsed)
        finally:
            await client.close()

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "pages": len(latencies),
        "pages_per_s": round(len(latencies) / wall, 1),
        "latency_ms": percentiles(latencies),
        "failures": failures,
    }
