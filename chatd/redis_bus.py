"""Delivery across processes and nodes through Redis pub/sub, routed by user.

Each user has a channel, `chatd:user:<uuid>`. A process subscribes to the channels of the
users that have a socket on it, so an event costs one PUBLISH per recipient user and
reaches only the processes that hold their sockets: traffic does not grow with the
number of nodes.

An event is delivered to this process's own sockets at once, and published for the
others; a process ignores its own publications when they come back. Publishing is
batched: every event queued while a pipeline is in flight goes out in the next one.

Pub/sub is fire-and-forget: what a process misses while its subscription is down is
gone. So when the subscription breaks, the process closes its sockets with 1012
(service restart): clients reconnect and `sync`, and nothing is silently lost.

The per-user socket cap holds across processes too: each user's open sockets are a
sorted set in Redis (`chatd:sockets:<uuid>`, oldest first). A socket that works is added
and, in the same script, the oldest past the cap are taken out; those of other
processes are told to close through the user's channel (their process is subscribed to
it, as it holds a socket of that user). A process that died leaves its entries behind:
they are the oldest, so they are the first to go.

Revoked sessions go to every process on one channel, `chatd:revocations`: any process
may have remembered a session as live (chatd/revocations.py). While that subscription
is down, processes remember no session and ask the database on each check.
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

CHANNEL_PREFIX = b"chatd:user:"
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


class Envelope(msgspec.Struct, array_like=True, omit_defaults=True):
    """What travels on a user's channel: the event as its recipients' sockets get it.

    Or, with `close` set, a socket of the user to close (past the cap); omitted when
    unset, so events keep the three-field form older chatd processes read.
    """

    origin: str  # the publishing process, which has delivered it locally already
    text: str
    message_id: int | None
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


def channel(user_id: uuid.UUID) -> bytes:
    return CHANNEL_PREFIX + str(user_id).encode()


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
        # The last event heard: an event reaches this process once per recipient user
        # here, one after the other (the publisher pipelines them), so it is decoded and
        # framed once for all of them.
        self._heard: tuple[bytes, Envelope, Outbound] | None = None
        # publishing
        self._outbox: deque[tuple[list[bytes], bytes]] = deque()
        self._outbox_ready = asyncio.Event()
        self._outbox_empty = asyncio.Event()
        self._outbox_empty.set()
        self._dropping = False  # log a full outbox once, not per event
        # subscribing
        self._watchers: dict[uuid.UUID, int] = {}  # user → sockets here
        self._ready: dict[bytes, asyncio.Future[None]] = {}  # channel → subscription confirmed
        self._unconfirmed: dict[bytes, int] = {}  # channel → (un)subscribe replies to come
        self._conn: redis.Connection | None = None
        self._connected = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self, timeout: float = 10) -> None:
        self.hub.revocations_lost("redis")  # until the revocations channel is confirmed
        self._ready[REVOCATIONS] = asyncio.get_running_loop().create_future()
        self._tasks = [
            asyncio.create_task(self._subscribe_loop()),
            asyncio.create_task(self._publish_loop()),
        ]
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
            await asyncio.wait_for(asyncio.shield(self._ready[REVOCATIONS]), timeout)
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
        if len(self._outbox) >= MAX_QUEUED_PUBLICATIONS:
            if not self._dropping:
                log.error("Redis publish queue full: dropping events for other processes")
                self._dropping = True
            return
        self._dropping = False
        payload = self._encode(Envelope(self.origin, event.text, event.message_id))
        self._queue([channel(u) for u in user_ids], payload)

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
        self._queue([REVOCATIONS], self._encode(note))

    def _queue(self, channels: list[bytes], payload: bytes) -> None:
        self._outbox.append((channels, payload))
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
                    close = Envelope(self.origin, "", None, close=socket_id)
                    self._queue([channel(socket.user_id)], self._encode(close))
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
                for channels, payload in batch:
                    for name in channels:
                        pipe.publish(name, payload)
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
        self._watchers[user_id] = self._watchers.get(user_id, 0) + 1
        name = channel(user_id)
        ready = self._ready.get(name)
        if ready is None:
            ready = self._ready[name] = asyncio.get_running_loop().create_future()
            if self._connected.is_set():
                await self._send("SUBSCRIBE", name)
            # else: the reconnect subscribes every watched channel
        await asyncio.wait_for(asyncio.shield(ready), timeout)

    async def unwatch(self, user_id: uuid.UUID) -> None:
        left = self._watchers.get(user_id, 0) - 1
        if left > 0:
            self._watchers[user_id] = left
            return
        self._watchers.pop(user_id, None)
        name = channel(user_id)
        self._ready.pop(name, None)
        if self._connected.is_set():
            with contextlib.suppress(RedisError, OSError):
                await self._send("UNSUBSCRIBE", name)

    async def _send(self, command: str, *names: bytes) -> None:
        assert self._conn is not None
        for name in names:
            self._unconfirmed[name] = self._unconfirmed.get(name, 0) + 1
        await self._conn.send_command(command, *names)

    async def _subscribe_loop(self) -> None:
        backoff = 0.1
        while True:
            pinger = None
            try:
                self._conn = self._pool.make_connection()
                await self._conn.connect()
                self._unconfirmed.clear()
                self._connected.set()  # from here on, watch() subscribes by itself
                if self._ready:
                    await self._send("SUBSCRIBE", *self._ready)
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
                if was_connected:
                    log.warning(
                        "Redis subscription lost (%r): closing this process's sockets so "
                        "their clients reconnect and sync",
                        exc,
                    )
                    # Every watched channel must be confirmed again before it counts.
                    loop = asyncio.get_running_loop()
                    for name, ready in self._ready.items():
                        if ready.done():
                            self._ready[name] = loop.create_future()
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
        if kind == b"message" and reply[1] == REVOCATIONS:
            self._on_revocation(reply[2])
            return
        if kind == b"message":
            payload = reply[2]
            try:
                if self._heard is not None and self._heard[0] == payload:
                    _, envelope, event = self._heard
                else:
                    envelope = self._decode(payload)
                    event = Outbound(envelope.text, envelope.message_id)
                    self._heard = (payload, envelope, event)
                user_id = uuid.UUID(reply[1][len(CHANNEL_PREFIX) :].decode())
            except (msgspec.DecodeError, ValueError):
                log.warning("ignoring a malformed message on Redis channel %r", reply[1])
                return
            if envelope.origin == self.origin:
                return
            if envelope.close is not None:
                self.hub.evict_by_id(user_id, envelope.close)
            else:
                self.hub.deliver((user_id,), event)
            return
        if kind in (b"subscribe", b"unsubscribe"):
            name = reply[1]
            left = self._unconfirmed.get(name, 1) - 1
            ready = self._ready.get(name)
            if left > 0:
                self._unconfirmed[name] = left
                return
            self._unconfirmed.pop(name, None)
            # Only the reply to the latest command tells the channel's current state.
            if kind == b"subscribe" and ready is not None and not ready.done():
                ready.set_result(None)
                if name == REVOCATIONS:
                    self.hub.revocations_heard("redis")
        # b"pong": the connection is alive; nothing else to do

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
