"""PostgreSQL's CPU per send batch, for each of the writer's two ways of storing one.

    python -m chatd.bench.batchcost postgresql://postgres@127.0.0.1/scratch --batches 3000

Migrates the database it is given (use a scratch one: it adds ten users, a group and the
messages), then stores one send a batch through MessageWriter, `--batches` of them each
way and `--rounds` times over, alternating: in one round trip (chatd_store_batch) and in
a transaction of its own (the writer's fallback, the only way before the function); and,
as a floor, the same number of bare autocommitted one-row INSERTs into messages (in a
chat of their own): what any durable send costs PostgreSQL at least, whatever the
server, before membership, seq, pointers or receipts. All of it goes over one pooled
connection, whose backend's user and system CPU are read from /proc: PostgreSQL must run
on this machine. Nothing else should load it meanwhile. Compare the ways within a run:
they alternate, so they share the machine's noise.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

import asyncpg

from chatd.db import create_pool, migrate
from chatd.hub import Hub, LocalBus
from chatd.writer import MessageWriter

GROUP_SIZE = 10
_TICKS = os.sysconf("SC_CLK_TCK")


# The floor: one row with its indexes and search column, one commit (one WAL flush).
_BARE_INSERT = (
    "INSERT INTO messages (chat_id, seq, sender_id, text, version) VALUES ($1, $2, $3, $4, $2)"
)
WAYS = ("one round trip", "transaction", "floor")


def backend_cpu(pid: int) -> tuple[float, float]:
    """(user, system) seconds of CPU the process `pid` has used."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


async def seed_group(url: str) -> tuple[uuid.UUID, int]:
    """A group of GROUP_SIZE new users; returns its owner (the sender) and its id."""
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
        chat_id = await conn.fetchval(
            "INSERT INTO chats (type, name) VALUES ('group', 'batchcost') RETURNING id"
        )
        await conn.executemany(
            "INSERT INTO chat_members (chat_id, user_id, role) VALUES ($1, $2, $3)",
            [(chat_id, user, "owner" if n == 0 else "member") for n, user in enumerate(users)],
        )
        return users[0], chat_id
    finally:
        await conn.close()


async def measure(url: str, batches: int, rounds: int) -> list[str]:
    """One line a round and way: PostgreSQL CPU (user + system) and wall time a batch."""
    await asyncio.to_thread(migrate, url)
    sender, chat_id = await seed_group(url)
    pool = await create_pool(url, 1)
    writer = MessageWriter(pool, LocalBus(Hub()))
    floor_chat, floor_seq = 0, 0

    async def store(way: str, text: str) -> None:
        nonlocal floor_seq
        if way == "floor":
            floor_seq += 1
            async with pool.acquire() as conn:
                await conn.execute(_BARE_INSERT, floor_chat, floor_seq, sender, text)
        else:
            writer._at_once = way == "one round trip"  # the writer's fallback switch, by hand
            await writer.store(sender, chat_id, text, None)

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
                    start = time.perf_counter()
                    for n in range(batches):
                        await store(way, f"message {n}")
                    wall = time.perf_counter() - start
                    try:
                        user1, system1 = backend_cpu(pid)
                    except FileNotFoundError:
                        pass
                    else:
                        if await backend_pid() == pid:
                            break
                    # The pool replaced its connection meanwhile (it does after 50,000
                    # queries): measure this way again.
                lines.append(
                    f"round {round_}, {way:>14}: PostgreSQL CPU "
                    f"{1000 * (user1 - user0 + system1 - system0) / batches:.3f} ms a batch "
                    f"(system {1000 * (system1 - system0) / batches:.3f}), "
                    f"wall {1000 * wall / batches:.3f} ms"
                )
    finally:
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
    args = parser.parse_args(argv)
    for line in asyncio.run(measure(args.database_url, args.batches, args.rounds)):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
