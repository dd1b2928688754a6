"""Rate limits: one GCRA bucket per key (an email, an IP, a user).

GCRA is a token bucket that keeps a single number per key: the time at which the key's
bucket is full again. A key whose time has passed is the same as a key never seen, so it
is forgotten.

Without Redis the buckets live in this process: the table never holds more than
`max_keys` keys, however many emails or addresses an attacker cycles through (past that,
the least recently used are dropped: those get a fresh bucket, the price of bounded
memory; a key being refused counts as used, so hammering one email keeps it remembered).

With CHATD_REDIS_URL the buckets live in Redis (`RedisBuckets`), shared by every process
and node: one Lua script checks and counts all the buckets of an event in one round trip,
on Redis's clock, and each key expires when its bucket is full again. While Redis does
not answer, each process falls back to its own buckets (fail open to today's per-process
limits, with a log line), rather than refusing every login and message.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Sequence

import redis.asyncio as redis
from redis.exceptions import RedisError

from chatd.config import Rate, Settings
from chatd.metrics import RATE_LIMITED

log = logging.getLogger("chatd")

DEFAULT_MAX_KEYS = 100_000
# Redis not answering: per-process buckets for this long before asking it again.
REDIS_RETRY_SECONDS = 5.0
REDIS_TIMEOUT_SECONDS = 1.0
REDIS_CONNECTIONS = 32


class RateLimiter:
    """Per-key limits; `take` answers 0 when the event may happen, else seconds to wait.

    An event may cost more than one (add_members counts the users added); a cost above
    the burst is taken as the whole burst, so a request the burst allows is never
    refused for ever.
    """

    def __init__(
        self,
        name: str,
        rate: Rate | None,
        max_keys: int = DEFAULT_MAX_KEYS,
        remote: RedisBuckets | None = None,
    ) -> None:
        self.name = name  # the `limit` label of chatd_rate_limited_total
        self.rate = rate
        self.max_keys = max_keys
        self.remote = remote  # shared buckets; this process's own are the fallback
        self._full_at: dict[str, float] = {}  # least recently used first

    async def take(self, key: str, cost: int = 1) -> float:
        """Count `cost` events for `key`; when over the limit count nothing, return the wait."""
        return await take_all([(self, key)], cost)

    async def give_back(self, key: str, cost: int = 1) -> None:
        """Undo a `take` that succeeded (the events turned out not to count).

        Gives back at most what a take of `cost` counted (see `charged`).
        """
        if self.rate is None or cost <= 0:
            return
        cost = self._cost(cost)
        if self.remote is not None and await self.remote.give_back(self, key, cost):
            return
        self._give_back_here(key, cost)

    def charged(self, cost: int) -> int:
        """What a take of `cost` counts: a cost above the burst counts as the whole burst,
        so a big request is never refused for ever."""
        return cost if self.rate is None else self._cost(cost)

    def _cost(self, cost: int) -> int:
        assert self.rate is not None
        return max(1, min(cost, self.rate.burst))

    # --- the buckets of this process -------------------------------------------------------

    def _wait(self, key: str, cost: int) -> float:
        """Seconds until `key` may have `cost` more events (0: now); counts nothing."""
        rate = self.rate
        if rate is None:
            return 0.0
        full_at = self._full_at.get(key)
        if full_at is None:
            return 0.0
        now = time.monotonic()
        return max(0.0, max(full_at, now) + (self._cost(cost) - rate.burst) * rate.interval - now)

    def _count(self, key: str, cost: int) -> None:
        rate = self.rate
        if rate is None:
            return
        now = time.monotonic()
        full_at = max(self._full_at.pop(key, now), now)  # re-inserted: most recently used
        self._full_at[key] = full_at + self._cost(cost) * rate.interval
        self._forget(now)

    def _touch(self, key: str) -> None:
        """A refused key becomes most recently used: hammering it keeps it remembered."""
        full_at = self._full_at.pop(key, None)
        if full_at is not None:
            self._full_at[key] = full_at

    def _give_back_here(self, key: str, cost: int) -> None:
        rate = self.rate
        full_at = self._full_at.get(key)
        if rate is None or full_at is None:
            return
        full_at -= self._cost(cost) * rate.interval
        if full_at <= time.monotonic():
            del self._full_at[key]
        else:
            self._full_at[key] = full_at

    def _forget(self, now: float) -> None:
        """Drop full buckets from the least recent end, and whatever exceeds max_keys.

        A couple per event keeps up with the keys being added, in constant time.
        """
        table = self._full_at
        for _ in range(2):
            oldest = next(iter(table), None)
            if oldest is None or table[oldest] > now:
                break
            del table[oldest]
        while len(table) > self.max_keys:
            del table[next(iter(table))]

    def __len__(self) -> int:
        return len(self._full_at)


async def take_all(limits: Sequence[tuple[RateLimiter, str]], cost: int = 1) -> float:
    """Count `cost` events against every limit, or, when one refuses them, against none.

    Answers 0 when the events may happen, else the seconds until every limit allows them.
    """
    active = [(limiter, key) for limiter, key in limits if limiter.rate is not None]
    if not active or cost <= 0:
        return 0.0
    remote = active[0][0].remote
    waits = await remote.take(active, cost) if remote is not None else None
    here = waits is None  # no Redis, or Redis not answering: this process's buckets
    if waits is None:
        waits = [limiter._wait(key, cost) for limiter, key in active]
    longest = max(waits)
    if longest > 0:
        for (limiter, key), wait in zip(active, waits, strict=True):
            if wait > 0:
                RATE_LIMITED.labels(limiter.name).inc()
                if here:
                    limiter._touch(key)
        return longest
    if here:
        for limiter, key in active:
            limiter._count(key, cost)
    return 0.0


# KEYS: the buckets; ARGV: per bucket its interval and burst (microseconds, events), then
# the cost. Refused when any bucket would overflow: then nothing is counted, and the
# answer is each bucket's wait in microseconds. Redis's own clock: nodes may disagree.
_TAKE = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000000 + tonumber(now[2])
local cost = tonumber(ARGV[#ARGV])
local waits, tats, refused = {}, {}, false
for i, key in ipairs(KEYS) do
    local interval, burst = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
    local n = math.max(1, math.min(cost, burst))
    local tat = math.max(tonumber(redis.call('GET', key) or now), now) + n * interval
    local wait = tat - burst * interval - now
    if wait > 0 then refused = true else wait = 0 end
    waits[i], tats[i] = math.ceil(wait), tat
end
if refused then return waits end
for i, key in ipairs(KEYS) do
    redis.call('SET', key, string.format('%.0f', tats[i]),
               'PX', math.max(1, math.ceil((tats[i] - now) / 1000)))
end
return waits
"""

# KEYS[1]: the bucket; ARGV: interval (microseconds), burst, cost.
_GIVE_BACK = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000000 + tonumber(now[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat then return 0 end
local n = math.max(1, math.min(tonumber(ARGV[3]), tonumber(ARGV[2])))
tat = tat - n * tonumber(ARGV[1])
if tat <= now then
    redis.call('DEL', KEYS[1])
else
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000))
end
return 1
"""

# KEYS[1]: a once-per-interval key; ARGV[1]: the interval in ms. 1: claimed now.
_CLAIM = """
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 1 end
return 0
"""

_UNCLAIM = "return redis.call('DEL', KEYS[1])"

KEY_PREFIX = "chatd:rate:"


class RedisBuckets:
    """The buckets of every limit in Redis, shared by all processes and nodes.

    Every method answers None / False when Redis does not answer: the caller then uses
    its own process's buckets, and Redis is asked again after a few seconds.
    """

    def __init__(self, url: str, timeout: float = REDIS_TIMEOUT_SECONDS) -> None:
        # Bounded: past REDIS_CONNECTIONS, a check waits (up to `timeout`) for a free one.
        self._pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_CONNECTIONS,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self._redis = redis.Redis(connection_pool=self._pool)
        self._take = self._redis.register_script(_TAKE)
        self._give_back = self._redis.register_script(_GIVE_BACK)
        self._claim = self._redis.register_script(_CLAIM)
        self._unclaim = self._redis.register_script(_UNCLAIM)
        self._down_until: float | None = None  # monotonic; None: Redis is answering

    async def take(
        self, limits: Sequence[tuple[RateLimiter, str]], cost: int
    ) -> list[float] | None:
        """Each bucket's wait in seconds (all 0: counted everywhere), or None: unreachable."""
        keys, args = [], []
        for limiter, key in limits:
            assert limiter.rate is not None
            keys.append(KEY_PREFIX + limiter.name + ":" + key)
            args += [_microseconds(limiter.rate.interval), limiter.rate.burst]
        waits = await self._run(self._take, keys, [*args, cost])
        return None if waits is None else [int(w) / 1e6 for w in waits]

    async def give_back(self, limiter: RateLimiter, key: str, cost: int) -> bool:
        assert limiter.rate is not None
        args = [_microseconds(limiter.rate.interval), limiter.rate.burst, cost]
        return (
            await self._run(self._give_back, [KEY_PREFIX + limiter.name + ":" + key], args)
            is not None
        )

    async def claim(self, key: str, seconds: float) -> bool | None:
        """True once per `seconds` for `key` in the whole cluster; None: unreachable."""
        claimed = await self._run(self._claim, [KEY_PREFIX + key], [math.ceil(seconds * 1000)])
        return None if claimed is None else bool(claimed)

    async def unclaim(self, key: str) -> bool:
        """Undo a claim (the event did not go out); False: unreachable."""
        return await self._run(self._unclaim, [KEY_PREFIX + key], []) is not None

    async def _run(self, script: object, keys: list[str], args: list[int]) -> object | None:
        if self._down_until is not None:
            now = time.monotonic()
            if now < self._down_until:
                return None
            # One request probes; the others keep counting here until it has answered.
            self._down_until = now + REDIS_RETRY_SECONDS
        try:
            result = await script(keys=keys, args=args)  # type: ignore[operator]
        except (RedisError, OSError) as exc:
            if self._down_until is None:  # it was answering until now
                log.warning(
                    "Redis does not answer for rate limits (%r): each process counts its own "
                    "until it is back",
                    exc,
                )
            self._down_until = time.monotonic() + REDIS_RETRY_SECONDS
            return None
        if self._down_until is not None:
            log.info("Redis answers again: rate limits are shared again")
            self._down_until = None
        return result

    async def close(self) -> None:
        await self._redis.aclose()
        await self._pool.disconnect()


def _microseconds(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1e6))


class Limits:
    """Every limit of one chatd process, configured by Settings (CHATD_*_RATE).

    With CHATD_REDIS_URL, the buckets are shared by every process and node (RedisBuckets).
    """

    def __init__(self, settings: Settings) -> None:
        # Counted in the database, not in buckets (chatd/handlers/chats.py).
        self.groups_per_day = settings.groups_per_day
        redis_url = settings.redis_url
        self.remote = remote = RedisBuckets(redis_url) if redis_url else None
        self.login_email = RateLimiter("login_email", settings.login_email_rate, remote=remote)
        self.login_ip = RateLimiter("login_ip", settings.login_ip_rate, remote=remote)
        self.register = RateLimiter("register", settings.register_rate, remote=remote)
        self.message = RateLimiter("message", settings.message_rate, remote=remote)
        self.change = RateLimiter("change", settings.change_rate, remote=remote)
        self.typing = RateLimiter("typing", settings.typing_rate, remote=remote)
        self.search = RateLimiter("search", settings.search_rate, remote=remote)
        self.create_chat = RateLimiter("create_chat", settings.create_chat_rate, remote=remote)
        self.add_members = RateLimiter("add_members", settings.add_members_rate, remote=remote)
        self.bot_message = RateLimiter("bot_message", settings.bot_message_rate, remote=remote)
        self.hook = RateLimiter("hook", settings.hook_rate, remote=remote)
        self.app_key = RateLimiter("app_key", settings.app_key_rate, remote=remote)  # per key

    async def close(self) -> None:
        if self.remote is not None:
            await self.remote.close()


TYPING_INTERVAL_SECONDS = 2.0


class TypingGate:
    """Lets through at most one typing event per (user, chat) per interval.

    In this process; with `remote` (CHATD_REDIS_URL) in the whole cluster, falling back
    to this process's own table while Redis does not answer.
    """

    def __init__(
        self, interval: float = TYPING_INTERVAL_SECONDS, remote: RedisBuckets | None = None
    ) -> None:
        self.interval = interval
        self.remote = remote
        self._last: dict[tuple[uuid.UUID, int], float] = {}
        self._prune_at = 10_000

    async def claim(self, user_id: uuid.UUID, chat_id: int) -> bool:
        """True when this event may go out; it then counts as the interval's one event."""
        if self.remote is not None:
            claimed = await self.remote.claim(f"typing_chat:{user_id}:{chat_id}", self.interval)
            if claimed is not None:
                return claimed
        now = time.monotonic()
        key = (user_id, chat_id)
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        if len(self._last) >= self._prune_at:
            self._forget_before(now - self.interval)
            self._prune_at = max(10_000, 2 * len(self._last))  # amortised: prune rarely
        self._last[key] = now
        return True

    async def release(self, user_id: uuid.UUID, chat_id: int) -> None:
        """Undo a claim for an event that did not go out."""
        if self.remote is not None and await self.remote.unclaim(
            f"typing_chat:{user_id}:{chat_id}"
        ):
            return
        self._last.pop((user_id, chat_id), None)

    def _forget_before(self, cutoff: float) -> None:
        self._last = {key: at for key, at in self._last.items() if at >= cutoff}
