"""The durable delivery queue: what chatd must POST to other servers, sent until it arrives.

Bots' webhooks, Web Push and the push gateway all need the same thing: a request that
survives a crash, is retried with backoff while its receiver is down, keeps its order,
and is given up on (dead-lettered) after enough attempts. Each is a row of `deliveries`:

    async with conn.transaction():
        ...                                       # the change itself
        await enqueue(conn, "bot_webhook", bot_id, f"bot:{bot_id}:chat:{chat_id}", body)

The row exists if and only if the change commits, and the commit wakes every process's
queue (NOTIFY chatd_deliveries). A `DeliveryQueue` (one per process, `node.deliveries`)
claims due rows and hands each to the sender registered for its kind, which answers with
an `Attempt`: delivered, retry later, or drop.

Guarantees:
- At least once. A claim is a lease (locked_until), not an open transaction: a process
  killed mid-attempt leaves the row pending, and it is tried again when the lease ends.
  Receivers deduplicate by the delivery id (signing.DELIVERY).
- In order per `order_key`: only the oldest pending row of a key is ever claimed, so the
  next waits until it is delivered or dead.
- Bounded: at most `max_pending` pending rows per (kind, target), the oldest beyond that
  dead-lettered; delivered and dead rows deleted after `retention` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

import asyncpg
import httpx

from chatd import metrics
from chatd.db import is_unavailable

log = logging.getLogger("chatd.deliveries")

CHANNEL = "chatd_deliveries"
# An answer's body is read up to this (a bot's {"text": ...} reply fits many times over).
MAX_ANSWER_BYTES = 64 * 1024
# Longest wait between two retries of one delivery.
MAX_BACKOFF_SECONDS = 3600.0
# Seconds between looks for due rows nobody announced (retries, leases that ended).
POLL_SECONDS = 5.0
# Seconds between housekeeping rounds (the per-target cap, retention).
HOUSEKEEPING_SECONDS = 60.0


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DROP = "drop"  # never worth retrying: the target is gone, or refuses for good


@dataclass(frozen=True)
class Delivery:
    id: int
    kind: str
    target: int
    order_key: str
    body: bytes
    attempt: int  # 1 for the first
    created_at: datetime


@dataclass(frozen=True)
class Attempt:
    outcome: Outcome
    status: int | None = None  # the receiver's HTTP status, when it answered
    error: str | None = None


Sender = Callable[[Delivery], Awaitable[Attempt]]


# --- enqueueing: inside the caller's transaction ---------------------------------------

_ENQUEUE = f"""
WITH d AS (
    INSERT INTO deliveries (kind, target, order_key, body) VALUES ($1, $2, $3, $4)
    RETURNING id
)
SELECT id, pg_notify('{CHANNEL}', '') FROM d
"""

_ENQUEUE_MANY = f"""
WITH d AS (
    INSERT INTO deliveries (kind, target, order_key, body)
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bytea[])
    RETURNING id
)
SELECT count(*), pg_notify('{CHANNEL}', '') FROM d
"""


async def enqueue(
    conn: asyncpg.Connection, kind: str, target: int, order_key: str, body: bytes
) -> int:
    """Queue one delivery in the transaction `conn` is in; its id.

    Call it inside the transaction that commits what the delivery tells: it then exists
    exactly when that does, and the queues are woken at the commit.
    """
    row = await conn.fetchrow(_ENQUEUE, kind, target, order_key, body)
    assert row is not None
    return row["id"]


async def enqueue_many(
    conn: asyncpg.Connection, rows: Sequence[tuple[str, int, str, bytes]]
) -> None:
    """Queue several (kind, target, order_key, body) in one statement; in list order."""
    if rows:
        kinds, targets, keys, bodies = zip(*rows, strict=True)
        await conn.execute(_ENQUEUE_MANY, kinds, targets, keys, bodies)


# --- outbound URLs ---------------------------------------------------------------------


async def url_problem(url: str, allow_private: bool) -> str | None:
    """Why chatd must not POST to `url`, or None.

    Only http(s). Unless `allow_private`, the host must resolve to public addresses only:
    a user-given URL must not reach the loopback, the private network or the cloud's
    metadata service (SSRF). The name is resolved again when the request is made, so a
    hostile DNS server can still answer differently then; deployments that need more put
    an egress proxy in front (see docs/security.md).
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "not a URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "only http:// and https:// URLs"
    if parts.username or parts.password:
        return "no credentials in the URL"
    if allow_private:
        return None
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            parts.hostname,
            port or (443 if parts.scheme == "https" else 80),
            type=socket.SOCK_STREAM,
        )
    except OSError:
        return "the host does not resolve"
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if not address.is_global:
            return "the host is not a public address"
    return None


# --- the queue -------------------------------------------------------------------------

# The oldest pending row of each key, due, not leased and of a kind this process sends;
# leased for `$2` seconds. (A process without a kind's sender, an older version during
# a rolling upgrade say, leaves its rows to the others.)
_CLAIM = """
WITH due AS (
    SELECT d.id FROM deliveries d
    WHERE d.state = 'pending' AND d.next_attempt_at <= now() AND d.kind = ANY($3::text[])
      AND (d.locked_until IS NULL OR d.locked_until <= now())
      AND NOT EXISTS (
          SELECT 1 FROM deliveries e
          WHERE e.state = 'pending' AND e.order_key = d.order_key AND e.id < d.id
      )
    ORDER BY d.next_attempt_at, d.id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE deliveries d
SET locked_until = now() + make_interval(secs => $2), attempts = d.attempts + 1
FROM due WHERE d.id = due.id
RETURNING d.id, d.kind, d.target, d.order_key, d.body, d.attempts, d.created_at
"""

_DELIVERED = """
UPDATE deliveries
SET state = 'delivered', finished_at = now(), locked_until = NULL,
    last_status = $2, last_error = NULL
WHERE id = $1
"""

_RETRY = """
UPDATE deliveries
SET next_attempt_at = now() + make_interval(secs => $2), locked_until = NULL,
    last_status = $3, last_error = $4
WHERE id = $1
"""

_DEAD = """
UPDATE deliveries
SET state = 'dead', finished_at = now(), locked_until = NULL, last_status = $2, last_error = $3
WHERE id = $1
"""

# Pending rows past the newest `$1` of their (kind, target): dead, oldest first.
_OVERFLOW = """
UPDATE deliveries SET state = 'dead', finished_at = now(), locked_until = NULL,
                      last_error = 'queue_full'
WHERE id IN (
    SELECT id FROM (
        SELECT id, row_number() OVER (PARTITION BY kind, target ORDER BY id DESC) AS newer
        FROM deliveries WHERE state = 'pending'
    ) ranked
    WHERE newer > $1
)
"""

_EXPIRED = """
DELETE FROM deliveries
WHERE state <> 'pending' AND finished_at < now() - make_interval(secs => $1)
"""


class DeliveryQueue:
    """This process's share of the delivery queue: claims due rows, sends each with the
    sender registered for its kind, and records the outcome.

    Several processes (workers, nodes) run one each over the same table; they never send
    the same attempt twice at once, and never two rows of one order key at once.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        database_url: str,
        *,
        concurrency: int = 8,
        timeout: float = 10.0,
        retry_base: float = 2.0,
        max_attempts: int = 12,
        max_pending: int = 10_000,
        retention: float = 3 * 86400,
        allow_private: bool = False,
    ) -> None:
        self.pool = pool
        self.database_url = database_url
        self.concurrency = concurrency
        self.timeout = timeout
        self.retry_base = retry_base
        self.max_attempts = max_attempts
        self.max_pending = max_pending
        self.retention = retention
        self.allow_private = allow_private
        # A lease outlives any attempt: the request's timeout, the answer, the bookkeeping.
        self.lease = 2 * timeout + 30
        self.http = httpx.AsyncClient(
            timeout=timeout,
            follow_redirects=False,  # a redirect could lead a request where url_problem forbids
            headers={"User-Agent": "chatd"},
        )
        self._senders: dict[str, Sender] = {}
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []

    def register(self, kind: str, sender: Sender) -> None:
        """Send the deliveries of `kind` with `sender`. This process claims only the
        kinds it has senders for."""
        self._senders[kind] = sender
        self._wake.set()

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run()),
            asyncio.create_task(self._listen()),
            asyncio.create_task(self._housekeeping()),
        ]

    async def stop(self, grace: float = 5.0) -> None:
        """Stop claiming; let the attempts in flight finish for up to `grace` seconds,
        then cancel the rest (their leases end, and another process or the next start
        sends them again)."""
        for task in self._tasks:
            task.cancel()
        if self._in_flight and grace > 0:
            await asyncio.wait(set(self._in_flight), timeout=grace)
        for task in self._in_flight:
            task.cancel()
        for task in [*self._tasks, *self._in_flight]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.http.aclose()

    def wake(self) -> None:
        self._wake.set()

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str]
    ) -> tuple[Attempt, bytes]:
        """POST `body` as JSON to `url`: DELIVERED on a 2xx answer, else RETRY; with the
        answer's body (its first MAX_ANSWER_BYTES).

        A URL that url_problem refuses is DROP: retrying cannot make it acceptable.
        """
        problem = await url_problem(url, self.allow_private)
        if problem is not None:
            return Attempt(Outcome.DROP, error=f"refused URL: {problem}"), b""
        try:
            async with self.http.stream(
                "POST",
                url,
                content=body,
                headers={"Content-Type": "application/json", **headers},
            ) as response:
                answer = bytearray()
                async for chunk in response.aiter_bytes():
                    answer += chunk
                    if len(answer) >= MAX_ANSWER_BYTES:
                        del answer[MAX_ANSWER_BYTES:]
                        break
        except httpx.HTTPError as exc:
            return Attempt(Outcome.RETRY, error=f"{type(exc).__name__}: {exc}"[:500]), b""
        if 200 <= response.status_code < 300:
            return Attempt(Outcome.DELIVERED, status=response.status_code), bytes(answer)
        return Attempt(Outcome.RETRY, status=response.status_code), bytes(answer)

    def backoff(self, attempt: int) -> float:
        """Seconds before the try after `attempt` failed: doubling from retry_base,
        capped, with jitter so a receiver that comes back is not hit by every retry at
        once."""
        delay = min(self.retry_base * 2 ** (attempt - 1), MAX_BACKOFF_SECONDS)
        return delay * random.uniform(0.75, 1.0)

    # --- the loops ---------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            free = self.concurrency - len(self._in_flight)
            claimed: list[asyncpg.Record] = []
            if free > 0 and self._senders:
                try:
                    claimed = await self.pool.fetch(_CLAIM, free, self.lease, list(self._senders))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the database is away: look again later
                    if is_unavailable(exc):  # expected: one line, not a traceback
                        log.warning("delivery queue: claiming failed (%r)", exc)
                    else:
                        log.warning("delivery queue: claiming failed", exc_info=True)
            for row in claimed:
                delivery = Delivery(
                    row["id"],
                    row["kind"],
                    row["target"],
                    row["order_key"],
                    row["body"],
                    row["attempts"],
                    row["created_at"],
                )
                task = asyncio.create_task(self._attempt(delivery))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
            if claimed and len(claimed) == free:
                continue  # there may be more due right now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)

    async def _attempt(self, delivery: Delivery) -> None:
        sender = self._senders[delivery.kind]
        started = time.perf_counter()
        try:
            attempt = await sender(delivery)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("delivery %d: its sender failed", delivery.id)
            attempt = Attempt(Outcome.RETRY, error=f"sender failed: {exc!r}"[:500])
        metrics.DELIVERY_SECONDS.labels(delivery.kind).observe(time.perf_counter() - started)
        try:
            await self._record(delivery, attempt)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the lease ends and the delivery is tried again
            log.warning("delivery %d: recording its outcome failed: %r", delivery.id, exc)
        self._wake.set()  # the next of its order key may go now

    async def _record(self, delivery: Delivery, attempt: Attempt) -> None:
        if attempt.outcome is Outcome.DELIVERED:
            await self.pool.execute(_DELIVERED, delivery.id, attempt.status)
            outcome = "delivered"
        elif attempt.outcome is Outcome.RETRY and delivery.attempt < self.max_attempts:
            delay = self.backoff(delivery.attempt)
            await self.pool.execute(_RETRY, delivery.id, delay, attempt.status, attempt.error)
            asyncio.get_running_loop().call_later(delay, self._wake.set)
            outcome = "retry"
        else:
            await self.pool.execute(_DEAD, delivery.id, attempt.status, attempt.error)
            outcome = "dead"
            log.warning(
                "delivery %d (%s) dead after %d attempts: %s",
                delivery.id,
                delivery.kind,
                delivery.attempt,
                attempt.error or attempt.status,
            )
        metrics.DELIVERIES.labels(delivery.kind, outcome).inc()

    def _heard(self, *_: object) -> None:
        self._wake.set()

    async def _listen(self) -> None:
        """Wake on every commit that queued something, in any process."""
        backoff = 0.1
        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self.database_url)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._heard)
                self._wake.set()  # anything queued while we were not listening
                backoff = 0.1
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 10)
                    if not lost.is_set():  # a connection that died silently fails a query
                        await asyncio.wait_for(conn.fetchval("SELECT 1"), 5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # polling carries on meanwhile
                log.warning("delivery queue lost its PostgreSQL listener (%r); retrying", exc)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=2)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5)

    async def _housekeeping(self) -> None:
        while True:
            try:
                await self.housekeep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("delivery queue housekeeping failed: %r", exc)
            await asyncio.sleep(HOUSEKEEPING_SECONDS)

    async def housekeep(self) -> tuple[int, int]:
        """Dead-letter what overflows the per-target cap, delete what retention ended:
        how many rows of each."""
        overflow = await self.pool.execute(_OVERFLOW, self.max_pending)
        expired = await self.pool.execute(_EXPIRED, self.retention)
        return int(overflow.split()[-1]), int(expired.split()[-1])
