"""Presence: who is online, across processes and nodes, and telling their contacts.

A user is online while they hold at least one socket on any process. Each process knows
its own sockets (it counts them here); what the others hold is in Redis, or, without
Redis, there are no others.

With Redis, every process that holds a socket of a user keeps a field in the user's hash
`chatd:presence:<uuid>`: its origin → the time (ms) until which it vouches for the user.
A heartbeat renews every field of the process each HEARTBEAT seconds for TTL seconds, and
the latest such time of each user is also a score in `chatd:presence:expiry`. A process
that dies stops renewing: its fields expire, and the reaper (every process runs one, the
first to claim a user wins) finds the users whose every field expired, so they go
offline within TTL + REAP_EVERY seconds, and nobody has to clean anything up by hand.

Transitions are where the cost is, so they are few:
- a user's last socket here closing starts a GRACE; a socket of theirs opening in the
  meantime (here or on another process) means nothing happened: flapping networks and
  reconnect storms make no events;
- a process tells the contacts of a user at most one presence event per COALESCE
  seconds, carrying the state at the end of it;
- contacts are the online members of the user's private chats and of their groups of at
  most CHATD_PRESENCE_GROUP_LIMIT members: a big group learns presence by asking
  (get_presence), never by being told.

Users who do not share presence (PATCH /me {share_presence: false}) make no events and
are shown offline with last_seen null. last_seen is written to users.last_seen_at when a
user goes offline (once per transition).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import asyncpg
import redis.asyncio as redis
from redis.exceptions import RedisError

from chatd.db import QUERY_FAILED
from chatd.hub import Bus, publish
from chatd.metrics import PRESENCE_EVENTS
from chatd.protocol import Presence, PresenceEvent

log = logging.getLogger("chatd")

GRACE = 5.0  # seconds offline before it counts: absorbs reconnects
COALESCE = 3.0  # at most one event per user per this many seconds, from one process
HEARTBEAT = 10.0  # seconds between two renewals of this process's presence fields
TTL = 30.0  # seconds a field vouches for its user without a renewal
REAP_EVERY = 10.0  # seconds between two looks for users whose fields all expired
MAX_REMEMBERED = 10_000  # users whose last event is remembered, past which old ones go
KEY_PREFIX = "chatd:presence:"
EXPIRY_KEY = "chatd:presence:expiry"

# KEYS[1] the user's hash, KEYS[2] the expiry zset; ARGV: origin, until (ms), user.
# Answers 1 when no other process vouched for the user right now (they come online).
_ARRIVE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local others = 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if fields[i] ~= ARGV[1] and tonumber(fields[i + 1]) > now_ms then others = others + 1 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], 'GT', ARGV[2], ARGV[3])
if others == 0 then return 1 else return 0 end
"""

# KEYS[1] the user's hash, KEYS[2] the expiry zset; ARGV: origin (or '' for the reaper),
# user. Takes the origin's field (and every expired one) out; answers 1 when none is left
# alive (the user goes offline: the caller tells), else 0.
_LEAVE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if ARGV[1] ~= '' then redis.call('HDEL', KEYS[1], ARGV[1]) end
local alive, latest = 0, 0
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local until_ms = tonumber(fields[i + 1])
  if until_ms > now_ms then
    alive = alive + 1
    if until_ms > latest then latest = until_ms end
  else
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
if alive > 0 then
  redis.call('ZADD', KEYS[2], latest, ARGV[2])
  return 0
end
redis.call('DEL', KEYS[1])
return redis.call('ZREM', KEYS[2], ARGV[2])
"""

# Users who may be online: those with an unexpired field. KEYS: their hashes; ARGV: now.
_ONLINE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local answer = {}
for k = 1, #KEYS do
  local on = 0
  for _, until_ms in ipairs(redis.call('HVALS', KEYS[k])) do
    if tonumber(until_ms) > now_ms then on = 1 break end
  end
  answer[k] = on
end
return answer
"""

# The users to tell about one user's presence: the other members of their private chats
# and of their groups of at most $2 members.
_CONTACTS = """
SELECT DISTINCT other.user_id
FROM chat_members mine
JOIN chats c ON c.id = mine.chat_id
JOIN chat_members other ON other.chat_id = mine.chat_id AND other.user_id <> mine.user_id
WHERE mine.user_id = $1
  AND (c.type = 'private'
       OR (SELECT count(*) FROM chat_members n WHERE n.chat_id = c.id) <= $2)
"""

_SHARES = "SELECT share_presence, last_seen_at FROM users WHERE id = $1"
_LAST_SEEN = "UPDATE users SET last_seen_at = $2 WHERE id = $1"


class PresenceTracker:
    """This process's share of presence (node.presence)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        bus: Bus,
        redis_url: str | None,
        group_limit: int,
        *,
        grace: float = GRACE,
        coalesce: float = COALESCE,
    ) -> None:
        self.pool = pool
        self.bus = bus
        self.group_limit = group_limit
        self.grace = grace
        self.coalesce = coalesce
        self.origin = uuid.uuid4().hex
        self._local: dict[uuid.UUID, int] = {}  # user → sockets here
        self._leaving: dict[uuid.UUID, asyncio.TimerHandle] = {}  # last socket closed
        self._told: dict[uuid.UUID, tuple[float, str]] = {}  # user → (when, status) told
        self._pending: dict[uuid.UUID, asyncio.TimerHandle] = {}  # coalesced event due
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._redis: redis.Redis | None = None
        if redis_url:
            self._redis = redis.Redis.from_url(
                redis_url, socket_timeout=5, socket_connect_timeout=5
            )
            self._arrive = self._redis.register_script(_ARRIVE)
            self._leave = self._redis.register_script(_LEAVE)
            self._online = self._redis.register_script(_ONLINE)
        self.events_sent = 0  # presence events published by this process (tests, bench)

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self._redis is not None:
            self._loops = [
                asyncio.create_task(self._heartbeat_loop()),
                asyncio.create_task(self._reap_loop()),
            ]

    async def stop(self) -> None:
        """Leave every user of this process at once: this process vouches for nobody now
        (a restart within the grace then makes no event, as another process's field or
        the returning socket's own keeps the user online)."""
        for task in self._loops:
            task.cancel()
        for handle in [*self._leaving.values(), *self._pending.values()]:
            handle.cancel()
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                pipe = self._redis.pipeline(transaction=False)
                for user_id in self._local:
                    pipe.hdel(_key(user_id), self.origin)
                await asyncio.wait_for(pipe.execute(), 2)
            await self._redis.aclose()
        for task in list(self._tasks):
            task.cancel()

    # --- sockets come and go -------------------------------------------------------------

    def connected(self, user_id: uuid.UUID) -> None:
        """A socket of the user works here (its snapshot is sent)."""
        count = self._local.get(user_id, 0)
        self._local[user_id] = count + 1
        if count:
            return
        leaving = self._leaving.pop(user_id, None)
        if leaving is not None:
            leaving.cancel()  # back within the grace: nothing happened
            return
        self._spawn(self._arrived(user_id))

    def disconnected(self, user_id: uuid.UUID) -> None:
        count = self._local.get(user_id, 0) - 1
        if count > 0:
            self._local[user_id] = count
            return
        self._local.pop(user_id, None)
        if count < 0:
            return
        loop = asyncio.get_running_loop()
        self._leaving[user_id] = loop.call_later(
            self.grace, lambda: self._spawn(self._left(user_id))
        )

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _arrived(self, user_id: uuid.UUID) -> None:
        first = True
        if self._redis is not None:
            try:
                first = bool(
                    await self._arrive(
                        keys=[_key(user_id), EXPIRY_KEY],
                        args=[self.origin, _until_ms(), str(user_id)],
                    )
                )
            except (RedisError, OSError) as exc:
                log.warning("presence: Redis does not answer (%r)", exc)
        if first:
            self._tell_soon(user_id)

    async def _left(self, user_id: uuid.UUID) -> None:
        self._leaving.pop(user_id, None)
        if user_id in self._local:
            return
        gone = True
        if self._redis is not None:
            try:
                gone = bool(
                    await self._leave(
                        keys=[_key(user_id), EXPIRY_KEY], args=[self.origin, str(user_id)]
                    )
                )
            except (RedisError, OSError) as exc:
                log.warning("presence: Redis does not answer (%r)", exc)
        if gone:
            await self._went_offline(user_id, datetime.now(UTC))

    async def _went_offline(self, user_id: uuid.UUID, at: datetime) -> None:
        try:
            await self.pool.execute(_LAST_SEEN, user_id, at)
        except QUERY_FAILED as exc:
            log.warning("presence: cannot store last_seen (%r)", exc)
        self._tell_soon(user_id)

    # --- asking --------------------------------------------------------------------------

    async def online(self, user_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        """Which of these users hold a socket anywhere (here, or within the grace)."""
        user_ids = list(user_ids)
        here = {u for u in user_ids if u in self._local or u in self._leaving}
        rest = [u for u in user_ids if u not in here]
        if self._redis is None or not rest:
            return here
        try:
            flags = await self._online(keys=[_key(u) for u in rest])
        except (RedisError, OSError) as exc:
            log.warning("presence: Redis does not answer (%r)", exc)
            return here
        return here | {u for u, flag in zip(rest, flags, strict=True) if flag}

    async def presence_of(self, rows: Iterable[asyncpg.Record]) -> dict[uuid.UUID, Presence]:
        """Presence as others see it, from rows of (id, share_presence, last_seen_at)."""
        rows = list(rows)
        online = await self.online(r["id"] for r in rows if r["share_presence"])
        answer = {}
        for row in rows:
            user_id = row["id"]
            if not row["share_presence"]:
                answer[user_id] = Presence(str(user_id), "offline", None)
            elif user_id in online:
                answer[user_id] = Presence(str(user_id), "online", None)
            else:
                answer[user_id] = Presence(str(user_id), "offline", row["last_seen_at"])
        return answer

    # --- telling -------------------------------------------------------------------------

    def _tell_soon(self, user_id: uuid.UUID) -> None:
        """Tell the user's contacts their presence now, or at the end of the coalescing
        interval when they were told within it (with the state as it is then)."""
        if user_id in self._pending:
            return
        told = self._told.get(user_id)
        wait = 0.0 if told is None else told[0] + self.coalesce - time.monotonic()
        if wait <= 0:
            self._spawn(self._tell(user_id))
            return
        loop = asyncio.get_running_loop()
        self._pending[user_id] = loop.call_later(
            wait, lambda: self._spawn(self._tell(user_id, due=True))
        )

    async def _tell(self, user_id: uuid.UUID, due: bool = False, hidden_too: bool = False) -> None:
        """Publish the user's presence to their contacts. `due`: a coalesced event, left
        out when it flapped back; `hidden_too`: told even when they do not share it (the
        moment they stop sharing: contacts then see offline, last_seen null)."""
        if due:
            self._pending.pop(user_id, None)
        try:
            row = await self.pool.fetchrow(_SHARES, user_id)
            if row is None:
                return
            presence = (await self.presence_of([{"id": user_id, **dict(row)}]))[user_id]
            if len(self._told) > MAX_REMEMBERED:
                self._forget_told()
            told = self._told.get(user_id)
            if due and told is not None and told[1] == presence.status:
                # Flapped back within the interval to what this process told last: nothing
                # to tell. (Only then: another process may have told otherwise since.)
                return
            self._told[user_id] = (time.monotonic(), presence.status)
            if not (row["share_presence"] or hidden_too):
                return
            contacts = [
                r["user_id"] for r in await self.pool.fetch(_CONTACTS, user_id, self.group_limit)
            ]
        except QUERY_FAILED as exc:
            log.warning("presence: cannot tell %s's contacts (%r)", user_id, exc)
            return
        if contacts:
            self.events_sent += 1
            PRESENCE_EVENTS.inc()
            await publish(self.bus, contacts, PresenceEvent(presence))

    def _forget_told(self) -> None:
        """Keep only what still coalesces: bounded however many users come and go."""
        horizon = time.monotonic() - self.coalesce
        self._told = {u: t for u, t in self._told.items() if t[0] > horizon}

    async def share_changed(self, user_id: uuid.UUID) -> None:
        """PATCH /me {share_presence} changed it: tell the contacts what they may see now."""
        await self._tell(user_id, hidden_too=True)

    # --- Redis upkeep --------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        assert self._redis is not None
        while True:
            await asyncio.sleep(HEARTBEAT)
            users = [*self._local, *self._leaving]
            until = _until_ms()
            try:
                for start in range(0, len(users), 1000):
                    pipe = self._redis.pipeline(transaction=False)
                    for user_id in users[start : start + 1000]:
                        pipe.hset(_key(user_id), self.origin, until)
                        pipe.pexpireat(_key(user_id), until)
                        pipe.zadd(EXPIRY_KEY, {str(user_id): until}, gt=True)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("presence: heartbeat failed (%r)", exc)

    async def _reap_loop(self) -> None:
        """Users whose every field expired (their process died) go offline."""
        assert self._redis is not None
        while True:
            await asyncio.sleep(REAP_EVERY)
            try:
                now_ms = int(time.time() * 1000)
                expired = await self._redis.zrangebyscore(EXPIRY_KEY, 0, now_ms, start=0, num=500)
                for raw in expired:
                    user_id = uuid.UUID(raw.decode())
                    gone = await self._leave(
                        keys=[_key(user_id), EXPIRY_KEY], args=["", str(user_id)]
                    )
                    if gone:  # this process won the claim
                        seen = datetime.fromtimestamp((now_ms / 1000) - TTL + HEARTBEAT, UTC)
                        await self._went_offline(user_id, seen)
            except (RedisError, OSError, ValueError) as exc:
                log.warning("presence: reaping failed (%r)", exc)


def _key(user_id: uuid.UUID) -> str:
    return KEY_PREFIX + str(user_id)


def _until_ms() -> int:
    return int((time.time() + TTL) * 1000)
