"""Which sessions are live: a per-process cache, kept right by revocations on the bus.

An access token names its session (`sid`). Checking that session in the database on
every request would cost a query per request; instead each process remembers, per
session, whether it was live when it last looked (one query per session per process),
and forgets it when a revocation comes over the bus (chatd/hub.py `Bus.revoke`, which
every process hears). Revocations are final (a revoked session never comes back, a
disabled account's sessions are all revoked), so a "revoked" answer is kept too.

The order that makes this safe: a revocation is committed first and published after.
A read that started before the commit and still says "live" ends before the revocation
arrives here, or a revocation arrived during the read: then the read is repeated (the
`generation` moved). While the bus cannot deliver revocations (its subscription is
down), nothing is remembered: every check asks the database.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass

import asyncpg

# One entry is a few hundred bytes: 100k sessions are tens of MiB at most.
MAX_ENTRIES = 100_000
_MAX_READS = 5  # a session being revoked over and over while we look: ask once more at most

# The first check of a session in a process also stamps its last_seen_at.
_CHECK = """
UPDATE sessions SET last_seen_at = now()
WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL
RETURNING true
"""


@dataclass(frozen=True, slots=True)
class Revocation:
    """Sessions of one user that are revoked: `session_ids`, or all of them when None."""

    user_id: uuid.UUID
    session_ids: tuple[uuid.UUID, ...] | None = None

    def covers(self, user_id: uuid.UUID, session_id: uuid.UUID | None) -> bool:
        return user_id == self.user_id and (
            self.session_ids is None or session_id in self.session_ids
        )


class SessionCache:
    def __init__(self, pool: asyncpg.Pool, max_entries: int = MAX_ENTRIES) -> None:
        self._pool = pool
        self._live: OrderedDict[uuid.UUID, tuple[uuid.UUID, bool]] = OrderedDict()
        self._max_entries = max_entries
        self.generation = 0  # moves on every revocation heard and every suspend/resume
        self._remembering = True

    async def is_live(self, session_id: uuid.UUID, user_id: uuid.UUID) -> bool:
        """Whether the user's session is live; from memory when this process knows."""
        known = self._live.get(session_id)
        if known is not None and known[0] == user_id:
            self._live.move_to_end(session_id)
            return known[1]
        for _ in range(_MAX_READS):
            generation = self.generation
            live = bool(await self._pool.fetchval(_CHECK, session_id, user_id))
            if generation == self.generation:
                break
        if self._remembering and generation == self.generation:
            self._live[session_id] = (user_id, live)
            if len(self._live) > self._max_entries:
                self._live.popitem(last=False)
        return live

    def revoked(self, revocation: Revocation) -> None:
        """A revocation was heard: forget what it covers."""
        self.generation += 1
        if revocation.session_ids is not None:
            for session_id in revocation.session_ids:
                self._live.pop(session_id, None)
        else:
            for session_id in [
                sid for sid, (uid, _) in self._live.items() if uid == revocation.user_id
            ]:
                del self._live[session_id]

    def suspend(self) -> None:
        """Revocations may be missed from now on: forget everything, remember nothing."""
        self.generation += 1
        self._remembering = False
        self._live.clear()

    def resume(self) -> None:
        """Revocations are heard again: anything may have been revoked meanwhile."""
        self.generation += 1
        self._live.clear()
        self._remembering = True
