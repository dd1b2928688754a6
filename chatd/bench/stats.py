"""Small numeric helpers: percentiles of latency samples, progress output."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Sequence


def percentiles(samples_ns: Sequence[int] | Iterable[int]) -> dict[str, float | None]:
    """p50/p95/p99/max of nanosecond samples, in milliseconds (nearest rank)."""
    ordered = sorted(samples_ns)
    if not ordered:
        return {"p50": None, "p95": None, "p99": None, "max": None}

    def rank(p: float) -> float:
        index = min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))
        return round(ordered[index] / 1e6, 3)

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99), "max": round(ordered[-1] / 1e6, 3)}


class Progress:
    """One status line on stderr: rewritten in place on a terminal, throttled otherwise."""

    def __init__(self, stream=None, every: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self._last = 0.0
        self._shown = ""

    def __call__(self, message: str, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            if now - self._last >= 0.1 or force:
                self.stream.write("\r\x1b[K" + message[:200])
                self.stream.flush()
                self._last = now
                self._shown = message
        elif force or now - self._last >= self.every:
            self.stream.write(message + "\n")
            self.stream.flush()
            self._last = now

    def done(self, message: str = "") -> None:
        """End the status line (and print `message` as a permanent line)."""
        if self.tty and self._shown:
            self.stream.write("\r\x1b[K")
            self._shown = ""
        if message:
            self.stream.write(message + "\n")
        self.stream.flush()
