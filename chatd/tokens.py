"""API tokens: bots' tokens and personal access tokens, without a query per request.

An API token is a long random string with a prefix secret scanners know (`chatd_bot_`,
`chatd_pat_`). Only its SHA-256 is stored (row of `api_tokens`): 256 random bits need no
slow hash, an attacker with the table cannot reverse one. Each token is a session of its
user (a `sessions` row of kind 'bot' or 'pat'), so revoking it is revoking that session:
the SessionCache (chatd/revocations.py) forgets it on every process and the Hub closes
its sockets with 1008, exactly as for a login.

A token's grant (whose session it is, its scopes, its expiry) never changes once it is
issued, so each process keeps the grants it has seen (bounded, least recently used out)
and asks only the SessionCache, which answers from memory, whether the session is live.
`last_used_at` is the session's `last_seen_at`: the first check per process stamps it
(chatd/revocations.py); after that, uses are remembered here and written in one
statement every CHATD_TOKEN_USAGE_INTERVAL seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

import asyncpg

log = logging.getLogger("chatd")

PREFIX = "chatd_"
BOT_PREFIX = "chatd_bot_"
PAT_PREFIX = "chatd_pat_"
MAX_TOKEN_CHARS = 128
MAX_GRANTS = 100_000
MAX_PENDING_USES = 100_000  # sessions whose use is not written yet; more are dropped

READ, WRITE = "read", "write"


def new_token(kind: str) -> str:
    """A fresh token of `kind` ("bot" or "pat"): the prefix and 256 random bits."""
    return f"{PREFIX}{kind}_{secrets.token_urlsafe(32)}"


def is_api_token(token: str) -> bool:
    return token.startswith(PREFIX)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class Grant:
    """What a token lets its bearer do, fixed when it was issued."""

    session_id: uuid.UUID
    user_id: uuid.UUID
    kind: str  # "bot" or "pat"
    scopes: frozenset[str]
    expires_at: datetime | None


_GRANT = """
SELECT t.id, t.user_id, s.kind, t.scopes, t.expires_at
FROM api_tokens t JOIN sessions s ON s.id = t.id
WHERE t.token_hash = $1
"""

_USED = "UPDATE sessions SET last_seen_at = now() WHERE id = ANY($1::uuid[]) AND revoked_at IS NULL"


class ApiTokens:
    """The grants this process has seen, and the uses not yet written."""

    def __init__(self, pool: asyncpg.Pool, usage_interval: float) -> None:
        self._pool = pool
        self._grants: OrderedDict[bytes, Grant] = OrderedDict()
        self._used: set[uuid.UUID] = set()
        self._interval = usage_interval
        self._task: asyncio.Task[None] | None = None

    async def grant(self, token: str) -> Grant | None:
        """The grant of a token (None: no such token). Its session may be revoked: ask the
        SessionCache."""
        if len(token) > MAX_TOKEN_CHARS:
            return None
        key = digest(token)
        known = self._grants.get(key)
        if known is not None:
            self._grants.move_to_end(key)
            return known
        row = await self._pool.fetchrow(_GRANT, key)
        if row is None:
            return None
        grant = Grant(
            row["id"], row["user_id"], row["kind"], frozenset(row["scopes"]), row["expires_at"]
        )
        self._grants[key] = grant
        if len(self._grants) > MAX_GRANTS:
            self._grants.popitem(last=False)
        return grant

    def used(self, session_id: uuid.UUID) -> None:
        """Remember a use; written with the next flush."""
        if len(self._used) < MAX_PENDING_USES:
            self._used.add(session_id)

    async def flush(self) -> None:
        if not self._used:
            return
        used, self._used = self._used, set()
        try:
            await self._pool.execute(_USED, list(used))
        except Exception as exc:  # last_used_at is a hint: a lost write is not worth more
            log.warning("could not record API token uses: %r", exc)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 2)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()
