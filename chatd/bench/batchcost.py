"""PostgreSQL's CPU per send batch, for each of the writer's two ways of storing one.

    python -m chatd.bench.batchcost postgresql://postgres@127.0.0.1/scratch --batches 3000

Migrates the database it is given (use a scratch one: it adds ten users, a group and the
messages), then stores batches of `--sends` sends (default one) through MessageWriter,
`--batches` of them each way and `--rounds` times over, alternating: in one round trip
(chatd_store_batch) and in a transaction of its own (the writer's fallback, the only way
before the function); and, as a floor, the same number of bare autocommitted INSERTs of
`--sends` rows into messages (in a chat of their own): what any durable send costs
PostgreSQL at least, whatever the server, before membership, seq, pointers or receipts.

By default one member sends everything, so no all-read watermark ever moves. With
`--senders 10` the group's members take turns, as in `chatd bench fanout`: then nearly
every send moves its chat's watermark, and the batch reports read receipts too. With
`--chats 10` the sends go to ten groups in turn (of the same members), so a batch
spans several chats, as the fanout's batches do.

All of it goes over one pooled connection, whose backend's user and system CPU are read
from /proc: PostgreSQL must run on this machine. Nothing else should load it meanwhile.
Each line also gives chatd's own CPU a batch: this process's, the writer's Python and
asyncpg's work on the server's event loop (uvloop), sleeps and wakeups included; for the
floor, a bare `execute` through the pool. Compare the ways within a run: they
alternate, so they share the machine's noise.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import time
import uuid

import asyncpg

from chatd.db import create_pool, migrate
from chatd.hub import Hub, LocalBus
from chatd.writer import MessageWriter

GROUP_SIZE = 10
_TICKS = os.sysconf("SC_CLK_TCK")


# The floor: the rows with their indexes and search column, one commit (one WAL flush).
_BARE_INSERT = """
INSERT INTO messages (chat_id, seq, sender_id, text, version)
SELECT $1, seq, $3, text, seq FROM unnest($2::bigint[], $4::text[]) AS t(seq, text)
"""
WAYS = ("one round trip", "transaction", "floor")


def backend_cpu(pid: int) -> tuple[float, float]:
    """(user, system) seconds of CPU the process `pid` has used."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


async def seed_groups(url: str, chats: int) -> tuple[list[uuid.UUID], list[int]]:
    """`chats` groups of the same GROUP_SIZE new users; returns the users (the groups'
    owner first) and the groups' ids."""
    conn = await asyncpg.connect(url)
    try:
        users = [
            await conn.fetchval(
                "INSERT INTO users (name, email, password_hash) VALUES ($1, $2, 'x') RETURNING id",
                f"batchcost {n}",
                f"batchcost-{uuid.uuid4()}@example.com",
            )
            for n in range(GROUP_SIZE)
        ]
        chat_ids = []
        for _ in range(chats):
            chat_id = await conn.fetchval(
                "INSERT INTO chats (type, name) VALUES ('group', 'batchcost') RETURNING id"
            )
            await conn.executemany(
                "INSERT INTO chat_members (chat_id, user_id, role) VALUES ($1, $2, $3)",
                [(chat_id, user, "owner" if n == 0 else "member") for n, user in enumerate(users)],
            )
            chat_ids.append(chat_id)
        return users, chat_ids
    finally:
        await conn.close()


async def measure(
    url: str, batches: int, rounds: int, sends: int = 1, senders: int = 1, chats: int = 1
) -> list[str]:
    """One line a round and way: PostgreSQL CPU (user + system) and wall time a batch of
    `sends` sends, to `chats` groups in turn, in each taken in turn by its first
    `senders` members."""
    await asyncio.to_thread(migrate, url)
    members, chat_ids = await seed_groups(url, chats)
    # Send n goes to chat n mod chats, from the chat's next sender in turn.
    turns = itertools.cycle(
        [(chat_id, sender) for sender in members[:senders] for chat_id in chat_ids]
    )
    pool = await create_pool(url, 1)
    writer = MessageWriter(pool, LocalBus(Hub()))
    floor_chat, floor_seq = 0, 0

    async def store(way: str, text: str) -> None:
        nonlocal floor_seq
        if way == "floor":
            seqs = list(range(floor_seq + 1, floor_seq + sends + 1))
            floor_seq += sends
            async with pool.acquire() as conn:
                await conn.execute(_BARE_INSERT, floor_chat, seqs, members[0], [text] * sends)
        else:
            writer._at_once = way == "one round trip"  # the writer's fallback switch, by hand
            # Queued before the writer's drain first runs: one batch of them all.
            batch = [next(turns) for _ in range(sends)]
            await asyncio.gather(
                *(writer.store(sender, chat_id, text, None) for chat_id, sender in batch)
            )

    async def backend_pid() -> int:
        async with pool.acquire() as conn:
            return await conn.fetchval("SELECT pg_backend_pid()")

    lines = []
    try:
        async with pool.acquire() as conn:
            floor_chat = await conn.fetchval(
                "INSERT INTO chats (type, name) VALUES ('group', 'batchcost floor') RETURNING id"
            )
        for round_ in range(1, rounds + 1):
            for way in WAYS:
                await store(way, "warm up")
                while True:
                    pid = await backend_pid()
                    user0, system0 = backend_cpu(pid)
                    start, chatd_start = time.perf_counter(), time.process_time()
                    for n in range(batches):
                        await store(way, f"message {n}")
                    wall = time.perf_counter() - start
                    chatd_cpu = time.process_time() - chatd_start
                    try:
                        user1, system1 = backend_cpu(pid)
                    except FileNotFoundError:
                        pass
                    else:
                        if await backend_pid() == pid:
                            break
                    # The pool replaced its connection meanwhile (it does after 50,000
                    # queries): measure this way again.
                cpu = user1 - user0 + system1 - system0
                lines.append(
                    f"round {round_}, {way:>14}: PostgreSQL CPU "
                    f"{1000 * cpu / batches:.3f} ms a batch, "
                    f"{1000 * cpu / (batches * sends):.3f} a send "
                    f"(system {1000 * (system1 - system0) / batches:.3f}); "
                    f"chatd CPU {1000 * chatd_cpu / batches:.3f} ms a batch; "
                    f"wall {1000 * wall / batches:.3f} ms"
                )
    finally:
        await writer.close()
        await pool.close()
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chatd.bench.batchcost",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("database_url", help="a scratch database (it is migrated and written)")
    parser.add_argument("--batches", type=int, default=3000, help="batches each way a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sends", type=int, default=1, help="sends a batch")
    parser.add_argument(
        "--senders",
        type=int,
        default=1,
        choices=range(1, GROUP_SIZE + 1),
        metavar=f"1..{GROUP_SIZE}",
        help="members taking turns to send",
    )
    parser.add_argument("--chats", type=int, default=1, help="groups taking turns")
    args = parser.parse_args(argv)
    if min(args.batches, args.rounds, args.sends, args.chats) < 1:
        parser.error("--batches, --rounds, --sends and --chats must be at least 1")
    lines = measure(
        args.database_url, args.batches, args.rounds, args.sends, args.senders, args.chats
    )
    try:  # the server's loop (uvicorn picks uvloop where it is installed)
        from uvloop import run
    except ImportError:  # pragma: no cover - no uvloop on this platform
        run = asyncio.run
    for line in run(lines):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
