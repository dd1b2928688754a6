"""Delivery across processes and nodes through Redis pub/sub: one PUBLISH per event.

Every process subscribes to one shared channel, `chatd:events`. An event is delivered to
this process's own sockets at once and published once on that channel, whatever the
number of its recipients: the envelope carries their ids, 16 bytes each in one bytes
field. Every process decodes each event once and hands it, framed once, to the
recipients it holds sockets for; it ignores its own publications when they come back.
Publishing is batched: every event queued while a pipeline is in flight goes out in the
next one.

Pub/sub is fire-and-forget: what a process misses while its subscription is down is
gone. So when the subscription breaks, the process closes its sockets with 1012
(service restart): clients reconnect and `sync`, and nothing is silently lost. A new
socket's `watch` returns only once the subscription is confirmed: one opening while it
is being re-established waits for it (or gives up after its timeout).

The per-user socket cap holds across processes too: each user's open sockets are a
sorted set in Redis (`chatd:sockets:<uuid>`, oldest first). A socket that works is added
and, in the same script, the oldest past the cap are taken out; the processes holding
them are told to close them by a note on the events channel (the user as its one
recipient, and the socket's id). A process that died leaves its entries behind: they
are the oldest, so they are the first to go.

Revoked sessions go to every process on one channel, `chatd:revocations`: any process
may have remembered a session as live (chatd/revocations.py). While that subscription
is down, processes remember no session and ask the database on each check.

How it scales. With N processes and an event for R users, Redis parses one PUBLISH and
writes N copies, and each process decodes the event once and looks up R ids (a dict
lookup each), also when none of them is its own. Routing by user (a channel per user,
chatd's design before this one) cost R PUBLISHes, each built in Python by the publisher
(a 10,000-member group at 20 messages/s: 200,000 PUBLISH/s), and a process holding k of
the recipients heard the whole event k times. The shared channel wins while N is small
next to R, or the work per event is small: a few to a few dozen processes. The ids are
16 bytes a recipient, 160 KB an event for a 10,000-member group (routing by user sent
the event's text once per recipient instead). That is accepted: a memory copy and a
lookup per id. But Redis cuts off a subscriber that falls behind by its pubsub output
buffer limit (by default 32 MB, or 8 MB for a minute): about 200 such events, after
which that process closes its sockets with 1012 (docs/operations.md says how to raise
it). Shard when the cluster outgrows all this: many processes each holding a small share
of the users (each one decoding every event of the cluster for little), or Redis's one
core busy writing each event N times. Then publish to the processes that hold recipients
(a channel per process, found through a directory such as the presence hashes, which
name each user's processes), or shard by chat on Redis Cluster (SPUBLISH), at the price
of keeping that directory right.

Processes of the per-user design and of this one do not hear each other (other channels,
other envelopes): upgrade a cluster across that change by stopping every process and
then starting the new ones (docs/operations.md, Upgrading).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Iterable

import msgspec
import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from chatd.hub import Hub, Outbound, Subscriber
from chatd.metrics import REDIS_SUBSCRIPTION_LOST
from chatd.protocol import CLOSE_SERVICE_RESTART
from chatd.revocations import Revocation

log = logging.getLogger("chatd")

EVENTS = b"chatd:events"
REVOCATIONS = b"chatd:revocations"
SOCKETS_PREFIX = "chatd:sockets:"
# A user's socket set expires when none of their sockets opened for this long, so the
# entries a dead process left behind do not stay for ever.
SOCKETS_TTL_MS = 7 * 24 * 3600 * 1000
CAP_TIMEOUT_SECONDS = 2  # a socket does not wait longer than this on Redis to start
MAX_QUEUED_PUBLICATIONS = 100_000
# A pub/sub connection only ever reads: PING it so a silently dropped one is noticed.
PING_EVERY_SECONDS = 10
READ_TIMEOUT_SECONDS = 3 * PING_EVERY_SECONDS
ID_SIZE = 16  # bytes of a user id in Envelope.recipients


class Envelope(msgspec.Struct, array_like=True, omit_defaults=True):
    """What travels on the events channel: an event and who gets it.

    Or, with `close` set, a socket to close (past its user's cap): `recipients` is then
    that one user, and `text` empty.
    """

    origin: str  # the publishing process, which has delivered it locally already
    recipients: bytes  # the users' ids, 16 bytes each (UUID.bytes), concatenated
    text: str
    message_id: int | None = None
    close: str | None = None  # Session.id


# KEYS[1]: the user's sockets; ARGV: the new one, the cap, the TTL in ms. Answers the
# sockets to close (the oldest past the cap), already taken out of the set.
_ADMIT = """
local now = redis.call('TIME')
redis.call('ZADD', KEYS[1], tonumber(now[1]) * 1000000 + tonumber(now[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[2])
if over <= 0 then return {} end
local evicted = redis.call('ZRANGE', KEYS[1], 0, over - 1)
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, over - 1)
return evicted
"""


class RevocationNote(msgspec.Struct, array_like=True):
    """What travels on the revocations channel: a Revocation."""

    origin: str
    user_id: str
    session_ids: list[str] | None


def pack(user_ids: Iterable[uuid.UUID]) -> bytes:
    """Envelope.recipients for these users."""
    return b"".join([u.bytes for u in user_ids])


class RedisBus:
    def __init__(self, hub: Hub, url: str) -> None:
        self.hub = hub
        self.url = url
        self.origin = uuid.uuid4().hex
        # RESP2: pub/sub messages come back as replies to read (RESP3 pushes go elsewhere).
        self._pool = redis.ConnectionPool.from_url(
            url, protocol=2, socket_timeout=10, socket_connect_timeout=5, socket_keepalive=True
        )
        self._publisher = redis.Redis(connection_pool=self._pool)
        self._admit = self._publisher.register_script(_ADMIT)
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(Envelope).decode
        self._decode_revocation = msgspec.msgpack.Decoder(RevocationNote).decode
        # publishing: (channel, payload), one per event or note
        self._outbox: deque[tuple[bytes, bytes]] = deque()
        self._outbox_ready = asyncio.Event()
        self._outbox_empty = asyncio.Event()
        self._outbox_empty.set()
        self._dropping = False  # log a full outbox once, not per event
        # subscribing
        # The users with a socket here, by UUID.bytes (an event names its recipients so),
        # and how many sockets each: between watch and unwatch. A superset of the hub's
        # users, as a session adds its socket to the hub right before watch and removes
        # it before unwatch.
        self._local: dict[bytes, uuid.UUID] = {}
        self._watchers: dict[bytes, int] = {}
        # channel → its subscription confirmed on the current connection (start() makes
        # them; a lost subscription replaces the ones that were).
        self._ready: dict[bytes, asyncio.Future[None]] = {}
        self._conn: redis.Connection | None = None
        self._connected = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, timeout: float = 10) -> None:
        self.hub.revocations_lost("redis")  # until the revocations channel is confirmed
        loop = asyncio.get_running_loop()
        self._ready = {EVENTS: loop.create_future(), REVOCATIONS: loop.create_future()}
        self._tasks = [
            asyncio.create_task(self._subscribe_loop()),
            asyncio.create_task(self._publish_loop()),
        ]
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
            for ready in self._ready.values():
                await asyncio.wait_for(asyncio.shield(ready), timeout)
        except TimeoutError:
            await self.close()
            raise RuntimeError(f"cannot reach Redis at {redact(self.url)}") from None

    async def close(self, flush_timeout: float = 5) -> None:
        """Publish what is queued (for a while), then disconnect."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._outbox_empty.wait(), flush_timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._conn is not None:
            await self._conn.disconnect()
        await self._publisher.aclose()
        await self._pool.disconnect()

    async def problem(self) -> str | None:
        if not self._connected.is_set():
            return "the Redis subscription is down"
        try:
            await asyncio.wait_for(self._publisher.ping(), 2)
        except Exception as exc:
            return f"Redis does not answer: {exc!r}"
        return None

    # --- publishing --------------------------------------------------------------------------

    async def publish(self, user_ids: Iterable[uuid.UUID], event: Outbound) -> None:
        user_ids = list(user_ids)
        self.hub.deliver(user_ids, event)
        if not user_ids:
            return
        if len(self._outbox) >= MAX_QUEUED_PUBLICATIONS:
            if not self._dropping:
                log.error("Redis publish queue full: dropping events for other processes")
                self._dropping = True
            return
        self._dropping = False
        envelope = Envelope(self.origin, pack(user_ids), event.text, event.message_id)
        self._queue(EVENTS, self._encode(envelope))

    async def revoke(self, revocation: Revocation) -> None:
        self.hub.revoke(revocation)
        sessions = revocation.session_ids
        note = RevocationNote(
            self.origin,
            str(revocation.user_id),
            None if sessions is None else [str(s) for s in sessions],
        )
        # Never dropped for a full outbox, unlike events: a missed revocation would leave
        # a revoked token working on another process.
        self._queue(REVOCATIONS, self._encode(note))

    def _queue(self, channel: bytes, payload: bytes) -> None:
        self._outbox.append((channel, payload))
        self._outbox_empty.clear()
        self._outbox_ready.set()

    # --- the per-user socket cap -------------------------------------------------------------

    async def admit(self, socket: Subscriber) -> None:
        cap = self.hub.max_sockets_per_user
        if cap is not None:
            try:
                evicted = await asyncio.wait_for(
                    self._admit(
                        keys=[sockets_key(socket.user_id)],
                        args=[self._member(socket), cap, SOCKETS_TTL_MS],
                    ),
                    CAP_TIMEOUT_SECONDS,
                )
            except (RedisError, OSError, TimeoutError) as exc:
                log.warning(
                    "Redis does not answer for the socket cap (%r): counting this process's "
                    "sockets only",
                    exc,
                )
                evicted = []
            for member in evicted:
                origin, _, socket_id = member.decode().partition(":")
                if origin == self.origin:
                    self.hub.evict_by_id(socket.user_id, socket_id)
                else:  # a process that is gone leaves entries nobody answers: harmless
                    close = Envelope(self.origin, socket.user_id.bytes, "", close=socket_id)
                    self._queue(EVENTS, self._encode(close))
        self.hub.enforce_cap(socket.user_id)  # this process's share, whatever Redis said

    async def release(self, socket: Subscriber) -> None:
        if self.hub.max_sockets_per_user is None:
            return
        try:
            await asyncio.wait_for(
                self._publisher.zrem(sockets_key(socket.user_id), self._member(socket)),
                CAP_TIMEOUT_SECONDS,
            )
        except (RedisError, OSError, TimeoutError) as exc:
            # It stays in the set as the oldest entry: the first to be evicted.
            log.warning("Redis does not answer: socket %s stays counted (%r)", socket.id, exc)

    def _member(self, socket: Subscriber) -> str:
        return f"{self.origin}:{socket.id}"

    async def _publish_loop(self) -> None:
        backoff = 0.1
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                batch = [self._outbox.popleft() for _ in range(min(len(self._outbox), 1000))]
                pipe = self._publisher.pipeline(transaction=False)
                for channel, payload in batch:
                    pipe.publish(channel, payload)
                try:
                    await pipe.execute()
                    backoff = 0.1
                except ResponseError as exc:
                    # Redis ran every command and refused some: resending would duplicate.
                    log.error("Redis refused a publish (%s); events dropped", exc)
                except RedisError as exc:
                    # Retry the batch: a duplicate is better than a loss, and clients
                    # drop duplicates by message id.
                    log.warning("Redis publish failed (%s); retrying", exc)
                    self._outbox.extendleft(reversed(batch))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5)
            self._outbox_empty.set()

    # --- subscribing -------------------------------------------------------------------------

    async def watch(self, user_id: uuid.UUID, timeout: float = 10) -> None:
        """From return on, events for `user_id` published by other processes reach the hub.

        The user counts as local at once; the wait is for the events channel's
        subscription, which a socket opening while it is down (being re-established)
        must not take as working: it could miss events silently. Raises TimeoutError
        when the subscription is not confirmed within `timeout`.
        """
        key = user_id.bytes
        self._local[key] = user_id
        self._watchers[key] = self._watchers.get(key, 0) + 1
        # The future of the current connection: a loss noticed later replaces it, but
        # also closes this socket (it is in the hub already), so waiting on this one is
        # right.
        await asyncio.wait_for(asyncio.shield(self._ready[EVENTS]), timeout)

    async def unwatch(self, user_id: uuid.UUID) -> None:
        key = user_id.bytes
        left = self._watchers.get(key, 0) - 1
        if left > 0:
            self._watchers[key] = left
            return
        self._watchers.pop(key, None)
        self._local.pop(key, None)

    async def _subscribe_loop(self) -> None:
        backoff = 0.1
        while True:
            pinger = None
            try:
                self._conn = self._pool.make_connection()
                await self._conn.connect()
                self._connected.set()
                await self._conn.send_command("SUBSCRIBE", EVENTS, REVOCATIONS)
                pinger = asyncio.create_task(self._ping_loop(self._conn))
                backoff = 0.1
                while True:
                    reply = await self._conn.read_response(timeout=READ_TIMEOUT_SECONDS)
                    self._on_reply(reply)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure means events may have been missed
                was_connected = self._connected.is_set()
                self._connected.clear()
                with contextlib.suppress(Exception):
                    await self._conn.disconnect()
                # Each channel must be confirmed again before it counts; sockets that
                # wait (watch) for the one in progress go on waiting for the next.
                loop = asyncio.get_running_loop()
                for name, ready in self._ready.items():
                    if ready.done():
                        self._ready[name] = loop.create_future()
                if was_connected:
                    log.warning(
                        "Redis subscription lost (%r): closing this process's sockets so "
                        "their clients reconnect and sync",
                        exc,
                    )
                    self.hub.close_all(CLOSE_SERVICE_RESTART, "event stream interrupted")
                    self.hub.revocations_lost("redis")
                    REDIS_SUBSCRIPTION_LOST.inc()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5)
            finally:
                if pinger is not None:
                    pinger.cancel()

    async def _ping_loop(self, conn: redis.Connection) -> None:
        while True:
            await asyncio.sleep(PING_EVERY_SECONDS)
            await conn.send_command("PING")

    def _on_reply(self, reply: list) -> None:
        kind = reply[0]
        if kind == b"message":
            if reply[1] == EVENTS:
                self._on_event(reply[2])
            elif reply[1] == REVOCATIONS:
                self._on_revocation(reply[2])
        elif kind == b"subscribe":
            ready = self._ready.get(reply[1])
            if ready is not None and not ready.done():
                ready.set_result(None)
                if reply[1] == REVOCATIONS:
                    self.hub.revocations_heard("redis")
        # b"pong": the connection is alive; nothing else to do

    def _on_event(self, payload: bytes) -> None:
        """An event (or a close note) from any process, this one's included: decoded once,
        and framed once for all the recipients here."""
        try:
            envelope = self._decode(payload)
        except msgspec.DecodeError:
            log.warning("ignoring a malformed message on Redis channel %r", EVENTS)
            return
        ids = envelope.recipients
        if len(ids) % ID_SIZE:
            log.warning("ignoring a malformed message on Redis channel %r", EVENTS)
            return
        if envelope.origin == self.origin:
            return
        local = self._local
        if envelope.close is not None:
            user_id = local.get(ids[:ID_SIZE])
            if user_id is not None:
                self.hub.evict_by_id(user_id, envelope.close)
            return
        here = [
            user_id
            for i in range(0, len(ids), ID_SIZE)
            if (user_id := local.get(ids[i : i + ID_SIZE])) is not None
        ]
        if here:
            self.hub.deliver(here, Outbound(envelope.text, envelope.message_id))

    def _on_revocation(self, payload: bytes) -> None:
        try:
            note = self._decode_revocation(payload)
            sessions = note.session_ids
            revocation = Revocation(
                uuid.UUID(note.user_id),
                None if sessions is None else tuple(uuid.UUID(s) for s in sessions),
            )
        except (msgspec.DecodeError, ValueError):
            log.warning("ignoring a malformed revocation on Redis")
            return
        if note.origin != self.origin:
            self.hub.revoke(revocation)


def sockets_key(user_id: uuid.UUID) -> str:
    return SOCKETS_PREFIX + str(user_id)


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return scheme + sep + rest
