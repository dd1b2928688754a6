"""The durable delivery queue (chatd/deliveries.py) against real PostgreSQL and a real
HTTP receiver: order per key, retries, dead letters, leases after a crash, the cap, and
the signature a receiver checks.

Each test uses a kind of its own, so the session's server (whose queue sends only the
kinds it has senders for) and the other tests never touch its rows.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import msgspec
import pytest
from starlette.responses import Response

from chatd import signing
from chatd.deliveries import (
    Attempt,
    Delivery,
    DeliveryQueue,
    enqueue,
    enqueue_many,
    url_problem,
)
from tests.conftest import Server
from tests.receiver import Received, Receiver

SECRET = b"receiver-secret"


@pytest.fixture
async def pool(server: Server, database_url: str) -> AsyncIterator[asyncpg.Pool]:
    # `server` has migrated the database.
    async with asyncpg.create_pool(database_url, min_size=1, max_size=4) as pool:
        yield pool


@pytest.fixture
def kind() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def queue_for(pool: asyncpg.Pool, database_url: str, **options: object) -> DeliveryQueue:
    settings = {"retry_base": 0.05, "allow_private": True, **options}
    return DeliveryQueue(pool, database_url, **settings)  # type: ignore[arg-type]


def signed_sender(queue: DeliveryQueue, receiver: Receiver) -> Callable[..., object]:
    async def send(delivery: Delivery) -> Attempt:
        headers = signing.signature_headers(SECRET, delivery.body, delivery.id)
        attempt, _ = await queue.post(
            receiver.url(f"/{delivery.order_key}"), delivery.body, headers
        )
        return attempt

    return send


async def rows(pool: asyncpg.Pool, kind: str) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT id, order_key, state, attempts, last_status, last_error FROM deliveries"
        " WHERE kind = $1 ORDER BY id",
        kind,
    )


async def wait_states(pool: asyncpg.Pool, kind: str, states: set[str], timeout: float = 10) -> None:
    async def settled() -> bool:
        return {r["state"] for r in await rows(pool, kind)} <= states

    for _ in range(int(timeout / 0.05)):
        if await settled():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"deliveries not {states}: {await rows(pool, kind)}")


def body(n: int) -> bytes:
    return msgspec.json.encode({"n": n})


async def test_delivers_signed_in_order_per_key(
    pool: asyncpg.Pool, database_url: str, kind: str
) -> None:
    async with Receiver() as receiver:
        queue = queue_for(pool, database_url)
        queue.register(kind, signed_sender(queue, receiver))
        queue.start()
        try:
            async with pool.acquire() as conn, conn.transaction():
                await enqueue_many(conn, [(kind, 1, f"k{n % 2}", body(n)) for n in range(10)])
            received = await receiver.wait_for(10)
            await wait_states(pool, kind, {"delivered"})
        finally:
            await queue.stop()
    for key in ("/k0", "/k1"):
        numbers = [msgspec.json.decode(r.body)["n"] for r in received if r.path == key]
        assert numbers == sorted(numbers) and len(numbers) == 5
    for request in received:
        assert signing.verify(SECRET, request.body, request.headers)
        assert not signing.verify(b"another secret", request.body, request.headers)
        assert not signing.verify(SECRET, request.body + b" ", request.headers)
    ids = [int(r.headers["x-chatd-delivery"]) for r in received]
    assert sorted(ids) == [r["id"] for r in await rows(pool, kind)]


async def test_a_failing_delivery_is_retried_and_holds_back_its_key(
    pool: asyncpg.Pool, database_url: str, kind: str
) -> None:
    failures = {"left": 2}

    def answer(request: Received) -> Response:
        if msgspec.json.decode(request.body)["n"] == 0 and failures["left"]:
            failures["left"] -= 1
            return Response(status_code=503)
        return Response(b"{}")

    async with Receiver(answer) as receiver:
        queue = queue_for(pool, database_url)
        queue.register(kind, signed_sender(queue, receiver))
        queue.start()
        try:
            async with pool.acquire() as conn, conn.transaction():
                first = await enqueue(conn, kind, 1, "key", body(0))
                await enqueue(conn, kind, 1, "key", body(1))
            received = await receiver.wait_for(4)
            await wait_states(pool, kind, {"delivered"})
        finally:
            await queue.stop()
    # 0 failed twice, then arrived; 1 waited for it.
    assert [msgspec.json.decode(r.body)["n"] for r in received] == [0, 0, 0, 1]
    assert {r.headers["x-chatd-delivery"] for r in received[:3]} == {str(first)}
    state = await rows(pool, kind)
    assert [r["attempts"] for r in state] == [3, 1]
    assert state[0]["last_status"] == 200


async def test_dead_after_max_attempts_and_the_key_moves_on(
    pool: asyncpg.Pool, database_url: str, kind: str
) -> None:
    def answer(request: Received) -> Response:
        n = msgspec.json.decode(request.body)["n"]
        return Response(status_code=500 if n == 0 else 200)

    async with Receiver(answer) as receiver:
        queue = queue_for(pool, database_url, max_attempts=3)
        queue.register(kind, signed_sender(queue, receiver))
        queue.start()
        try:
            async with pool.acquire() as conn, conn.transaction():
                await enqueue(conn, kind, 1, "key", body(0))
                await enqueue(conn, kind, 1, "key", body(1))
            await receiver.wait_for(4)
            await wait_states(pool, kind, {"delivered", "dead"})
        finally:
            await queue.stop()
    dead, delivered = await rows(pool, kind)
    assert (dead["state"], dead["attempts"], dead["last_status"]) == ("dead", 3, 500)
    assert delivered["state"] == "delivered"


async def test_nothing_is_sent_for_a_rolled_back_change(
    pool: asyncpg.Pool, database_url: str, kind: str
) -> None:
    async with Receiver() as receiver:
        queue = queue_for(pool, database_url)
        queue.register(kind, signed_sender(queue, receiver))
        queue.start()
        try:
            async with pool.acquire() as conn:
                transaction = conn.transaction()
                await transaction.start()
                await enqueue(conn, kind, 1, "key", body(0))
                await transaction.rollback()
                async with conn.transaction():
                    await enqueue(conn, kind, 1, "key", body(1))
            received = await receiver.wait_for(1)
            await asyncio.sleep(0.3)
        finally:
            await queue.stop()
    assert [msgspec.json.decode(r.body)["n"] for r in received] == [1]
    assert len(receiver.requests) == 1


async def test_a_crashed_attempt_is_sent_again_when_its_lease_ends(
    pool: asyncpg.Pool, database_url: str, kind: str
) -> None:
    """A process that dies mid-attempt (here: a queue stopped while its sender hangs)
    leaves the delivery pending; another process sends it once the lease is over."""
    started = asyncio.Event()

    async def hang(delivery: Delivery) -> Attempt:
        started.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    crashed = queue_for(pool, database_url)
    crashed.lease = 1.0
    crashed.register(kind, hang)
    crashed.start()
    async with pool.acquire() as conn, conn.transaction():
        await enqueue(conn, kind, 1, "key", body(0))
    await asyncio.wait_for(started.wait(), 10)
    await crashed.stop(grace=0)  # nothing recorded, as after a kill -9
    [row] = await rows(pool, kind)
    assert (row["state"], row["attempts"]) == ("pending", 1)

    async with Receiver() as receiver:
        survivor = queue_for(pool, database_url)
        survivor.register(kind, signed_sender(survivor, receiver))
        survivor.start()
        try:
            [request] = await receiver.wait_for(1)
            await wait_states(pool, kind, {"delivered"})
        finally:
            await survivor.stop()
    assert request.headers["x-chatd-delivery"] == str(row["id"])
    [row] = await rows(pool, kind)
    assert row["attempts"] == 2


async def test_two_processes_share_the_queue_without_sending_twice(
    pool: asyncpg.Pool, database_url: str, kind: str
) -> None:
    async with Receiver() as receiver:
        queues = [queue_for(pool, database_url, concurrency=4) for _ in range(2)]
        for queue in queues:
            queue.register(kind, signed_sender(queue, receiver))
            queue.start()
        try:
            async with pool.acquire() as conn, conn.transaction():
                await enqueue_many(conn, [(kind, 1, f"k{n % 5}", body(n)) for n in range(60)])
            await receiver.wait_for(60)
            await wait_states(pool, kind, {"delivered"})
            await asyncio.sleep(0.3)
        finally:
            for queue in queues:
                await queue.stop()
    numbers = [msgspec.json.decode(r.body)["n"] for r in receiver.requests]
    assert sorted(numbers) == list(range(60))  # each once
    for key in range(5):
        in_key = [n for n in numbers if n % 5 == key]
        assert in_key == sorted(in_key)


async def test_refused_urls_are_dead_at_once(
    pool: asyncpg.Pool, database_url: str, kind: str
) -> None:
    queue = queue_for(pool, database_url, allow_private=False)

    async def send(delivery: Delivery) -> Attempt:
        attempt, _ = await queue.post("http://127.0.0.1:9/hook", delivery.body, {})
        return attempt

    queue.register(kind, send)
    queue.start()
    try:
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, kind, 1, "key", body(0))
        await wait_states(pool, kind, {"dead"})
    finally:
        await queue.stop()
    [row] = await rows(pool, kind)
    assert row["attempts"] == 1
    assert "not a public address" in row["last_error"]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://127.0.0.1/x", "not a public address"),
        ("http://localhost:8000/x", "not a public address"),
        ("http://10.1.2.3/x", "not a public address"),
        ("http://169.254.169.254/latest/meta-data", "not a public address"),
        ("http://[::1]/x", "not a public address"),
        ("http://[fd00::1]/x", "not a public address"),
        ("ftp://example.com/x", "only http"),
        ("file:///etc/passwd", "only http"),
        ("http://user:pw@example.com/x", "no credentials"),
        ("http://[::1/x", "not a URL"),
        ("http://8.8.8.8/x", None),
    ],
)
async def test_url_problem(url: str, problem: str | None) -> None:
    found = await url_problem(url, allow_private=False)
    assert (found is None) if problem is None else (found is not None and problem in found)


async def test_private_urls_allowed_when_configured() -> None:
    assert await url_problem("http://127.0.0.1:8000/x", allow_private=True) is None
    assert await url_problem("gopher://127.0.0.1/x", allow_private=True) is not None


async def test_housekeeping_caps_pending_and_forgets_old_rows(
    pool: asyncpg.Pool, database_url: str, kind: str
) -> None:
    queue = queue_for(pool, database_url, max_pending=3, retention=60)
    async with pool.acquire() as conn, conn.transaction():
        await enqueue_many(conn, [(kind, 1, "key", body(n)) for n in range(5)])
        await enqueue(conn, kind, 2, "other", body(9))  # another target: its own cap
        old = await enqueue(conn, kind, 3, "old", body(0))
        await conn.execute(
            "UPDATE deliveries SET state = 'delivered', finished_at = now() - interval '2 minutes'"
            " WHERE id = $1",
            old,
        )
    overflow, expired = await queue.housekeep()
    assert overflow >= 2 and expired >= 1
    state = await rows(pool, kind)
    assert [(r["state"], r["last_error"]) for r in state if r["order_key"] == "key"] == [
        ("dead", "queue_full"),
        ("dead", "queue_full"),
        ("pending", None),
        ("pending", None),
        ("pending", None),
    ]
    assert [r["state"] for r in state if r["order_key"] == "other"] == ["pending"]
    assert not [r for r in state if r["order_key"] == "old"]
    await queue.http.aclose()


def test_signature_refuses_stale_and_malformed_timestamps() -> None:
    headers = signing.signature_headers(SECRET, b"{}", 7, timestamp=1_000_000)
    assert signing.verify(SECRET, b"{}", headers, now=1_000_100)
    assert not signing.verify(SECRET, b"{}", headers, now=1_000_000 + 301)
    assert not signing.verify(SECRET, b"{}", headers, now=1_000_000 - 301)
    assert not signing.verify(SECRET, b"{}", {**headers, signing.TIMESTAMP: "-5"})
    assert not signing.verify(SECRET, b"{}", {})
    assert signing.verify(SECRET, b"{}", {k.upper(): v for k, v in headers.items()}, now=1_000_000)
