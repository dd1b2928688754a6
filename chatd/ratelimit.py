"""Rate limits: one GCRA bucket per key (an email, an IP, a user), in this process.

GCRA is a token bucket that keeps a single float per key: the time at which the key's
bucket is full again. A key whose time has passed is the same as a key never seen, so it
is forgotten; and the table never holds more than `max_keys` keys, however many emails
or addresses an attacker cycles through (past that, the least recently used are dropped:
those get a fresh bucket, the price of bounded memory; a key being refused counts as
used, so hammering one email keeps it remembered).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from chatd.metrics import RATE_LIMITED

DEFAULT_MAX_KEYS = 100_000

_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
_RATE = re.compile(r"(\d+)\s*/\s*(\d*)\s*([a-z]+?)s?")


@dataclass(frozen=True)
class Rate:
    """`count` events per `period` seconds, of which up to `burst` may come at once."""

    count: int
    period: float
    burst: int

    @property
    def interval(self) -> float:
        return self.period / self.count

    def __str__(self) -> str:
        return f"{self.count}/{self.period:g}s (burst {self.burst})"


def parse_rate(text: str, burst: int | None = None) -> Rate | None:
    """'10/min', '5/s', '100/15min', '20/h' → a Rate; 'off', 'none' or '0' → None (no limit).

    Without `burst`, the whole `count` may come at once (then one per period/count).
    """
    text = text.strip().lower()
    if text in ("off", "none", "0", "unlimited"):
        return None
    match = _RATE.fullmatch(text)
    unit = _UNITS.get(match.group(3)) if match else None
    if match is None or unit is None:
        raise ValueError(f"{text!r} is not a rate like 10/min, 5/s, 100/15min or off")
    count, periods = int(match.group(1)), int(match.group(2) or 1)
    if count <= 0 or periods <= 0:
        raise ValueError(f"{text!r}: count and period must be positive (or use off)")
    return Rate(count, float(periods * unit), burst or count)


class RateLimiter:
    """Per-key limits; `take` answers 0 when the event may happen, else seconds to wait."""

    def __init__(self, name: str, rate: Rate | None, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.name = name  # the `limit` label of chatd_rate_limited_total
        self.rate = rate
        self.max_keys = max_keys
        self._full_at: dict[str, float] = {}  # least recently used first

    def wait(self, key: str) -> float:
        """Seconds until `key` may have one more event (0: now); counts nothing."""
        rate = self.rate
        if rate is None:
            return 0.0
        full_at = self._full_at.get(key)
        if full_at is None:
            return 0.0
        return max(0.0, full_at + rate.interval - rate.burst * rate.interval - time.monotonic())

    def take(self, key: str) -> float:
        """Count one event for `key`; when over the limit count nothing and return the wait."""
        return take_all([(self, key)])

    def _count(self, key: str) -> None:
        rate = self.rate
        if rate is None:
            return
        now = time.monotonic()
        full_at = max(self._full_at.pop(key, now), now)  # re-inserted: most recently used
        self._full_at[key] = full_at + rate.interval
        self._forget(now)

    def _touch(self, key: str) -> None:
        """A refused key becomes most recently used: hammering it keeps it remembered."""
        full_at = self._full_at.pop(key, None)
        if full_at is not None:
            self._full_at[key] = full_at

    def give_back(self, key: str) -> None:
        """Undo one `take` that succeeded (the event turned out not to count)."""
        rate = self.rate
        full_at = self._full_at.get(key)
        if rate is None or full_at is None:
            return
        now = time.monotonic()
        if full_at - rate.interval <= now:
            del self._full_at[key]
        else:
            self._full_at[key] = full_at - rate.interval

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


def take_all(limits: list[tuple[RateLimiter, str]]) -> float:
    """Count one event against every limit, or, when one refuses it, against none.

    Answers 0 when the event may happen, else the seconds until every limit allows it.
    """
    waits = [(limiter, limiter.wait(key)) for limiter, key in limits]
    longest = max((wait for _, wait in waits), default=0.0)
    if longest > 0:
        for (limiter, key), (_, wait) in zip(limits, waits, strict=True):
            if wait > 0:
                RATE_LIMITED.labels(limiter.name).inc()
                limiter._touch(key)
        return longest
    for limiter, key in limits:
        limiter._count(key)
    return 0.0


class Limits:
    """Every limit of one chatd process, configured by Settings (CHATD_*_RATE)."""

    def __init__(
        self,
        login_email: Rate | None,
        login_ip: Rate | None,
        register: Rate | None,
        message: Rate | None,
        typing: Rate | None,
    ) -> None:
        self.login_email = RateLimiter("login_email", login_email)
        self.login_ip = RateLimiter("login_ip", login_ip)
        self.register = RateLimiter("register", register)
        self.message = RateLimiter("message", message)
        self.typing = RateLimiter("typing", typing)
