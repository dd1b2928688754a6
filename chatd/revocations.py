"""Which sessions are live: a per-process cache, kept right by revocations on the bus.

An access token names its session (`sid`). Checking that session in the database on
every request would cost a query per request; instead each process remembers, per
session, whether it was live when it last looked (one query per session per process),
and forgets it when a revocation comes over the bus (chatd/hub.py `Bus.revoke`, which
every process hears; and PostgreSQL's LISTEN/NOTIFY, which the `chatd admin` command
reaches too). Revocations are final (a revoked session never comes back, a
disabled account's sessions are all revoked), so a "revoked" answer is kept too.

The order that makes this safe: a revocation is committed first and published after.
A read that started before the commit and still says "live" ends before the revocation
arrives here, or a revocation arrived during the read: then the read is repeated (the
`generation` moved). While the bus cannot deliver revocations (its subscription is
down), nothing is remembered: every check asks the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import msgspec

log = logging.getLogger("chatd")

# One entry is a few hundred bytes: 100k sessions are tens of MiB at most.
MAX_ENTRIES = 100_000
_MAX_READS = 5  # a session being revoked over and over while we look: ask once more at most

# The first check of a session in a process also stamps its last_seen_at.
_CHECK = """
UPDATE sessions SET last_seen_at = now()
WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL
RETURNING true
"""

_ACTIVE = "SELECT disabled_at IS NULL AND deleted_at IS NULL FROM users WHERE id = $1"


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
        self._deaf: set[str] = set()  # the channels of revocations that are down now
        # Users of external tokens (chatd/identity.py) known to be active: they have no
        # session, so disabling or deleting the account (a revocation of all its
        # sessions) is what ends them. Only "active" is remembered: an account can be
        # enabled again without any revocation being published.
        self._active: OrderedDict[uuid.UUID, None] = OrderedDict()

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
        if not self._deaf and generation == self.generation:
            self._live[session_id] = (user_id, live)
            if len(self._live) > self._max_entries:
                self._live.popitem(last=False)
        return live

    async def is_active(self, user_id: uuid.UUID) -> bool:
        """Whether the account exists and is neither disabled nor deleted; from memory
        when this process saw it active and heard no revocation of all its sessions."""
        if user_id in self._active:
            self._active.move_to_end(user_id)
            return True
        for _ in range(_MAX_READS):
            generation = self.generation
            active = bool(await self._pool.fetchval(_ACTIVE, user_id))
            if generation == self.generation:
                break
        if active and not self._deaf and generation == self.generation:
            self._active[user_id] = None
            if len(self._active) > self._max_entries:
                self._active.popitem(last=False)
        return active

    def revoked(self, revocation: Revocation) -> None:
        """A revocation was heard: forget what it covers."""
        self.generation += 1
        if revocation.session_ids is None:
            self._active.pop(revocation.user_id, None)
        if revocation.session_ids is not None:
            for session_id in revocation.session_ids:
                self._live.pop(session_id, None)
        else:
            for session_id in [
                sid for sid, (uid, _) in self._live.items() if uid == revocation.user_id
            ]:
                del self._live[session_id]

    def suspend(self, channel: str) -> None:
        """Revocations on `channel` may be missed from now on: forget everything, and
        remember nothing until every channel is back."""
        self.generation += 1
        self._deaf.add(channel)
        self._live.clear()
        self._active.clear()

    def resume(self, channel: str) -> None:
        """Revocations on `channel` are heard again: anything may have been revoked
        meanwhile."""
        self.generation += 1
        self._deaf.discard(channel)
        self._live.clear()
        self._active.clear()


class RevocationListener:
    """Hears revocations through PostgreSQL (LISTEN chatd_revocations) and applies them.

    Every node and the `chatd admin` command publish each revocation there too (Node.revoke,
    NOTIFY after the commit), so a node hears it with or without Redis. While the listening
    connection is down, the cache is suspended (every check asks the database).
    """

    CHANNEL = "chatd_revocations"

    def __init__(
        self,
        database_url: str,
        origin: str,
        apply: Callable[[Revocation], None],
        cache: SessionCache,
    ) -> None:
        self._database_url = database_url
        self._origin = origin
        self._apply = apply
        self._cache = cache
        self.listening = asyncio.Event()

    @staticmethod
    def payload(origin: str, revocation: Revocation) -> str:
        sessions = revocation.session_ids
        return msgspec.json.encode(
            {
                "origin": origin,
                "user": str(revocation.user_id),
                "sessions": None if sessions is None else [str(s) for s in sessions],
            }
        ).decode()

    def _heard(self, conn: object, pid: int, channel: str, payload: str) -> None:
        try:
            note = msgspec.json.decode(payload)
            sessions = note["sessions"]
            revocation = Revocation(
                uuid.UUID(note["user"]),
                None if sessions is None else tuple(uuid.UUID(s) for s in sessions),
            )
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            log.warning("ignoring a malformed revocation from PostgreSQL")
            return
        if note.get("origin") != self._origin:
            self._apply(revocation)

    async def run(self) -> None:
        backoff = 0.1
        while True:
            self._cache.suspend("postgres")
            conn = None
            try:
                conn = await asyncpg.connect(self._database_url)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _, lost=lost: lost.set())
                await conn.add_listener(self.CHANNEL, self._heard)
                self._cache.resume("postgres")
                self.listening.set()
                backoff = 0.1
                while not lost.is_set():
                    # A connection that died silently is noticed by a query failing.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(lost.wait(), 10)
                    if not lost.is_set():
                        await asyncio.wait_for(conn.fetchval("SELECT 1"), 5)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("revocation listener lost PostgreSQL (%r); retrying", exc)
            finally:
                self.listening.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=2)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5)
