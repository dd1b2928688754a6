"""Who is online, and getting events to them.

The hub keeps every open socket of this process per user. Handlers never talk to
sockets: they hand an already-encoded event and its recipients to the `Bus`. `LocalBus`
delivers in-process (one chatd process); `RedisBus` (chatd/redis_bus.py) also reaches
the users connected to other processes and nodes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from chatd.metrics import EVENTS_DELIVERED, OPEN_SOCKETS, SOCKET_CAP_CLOSES
from chatd.protocol import CLOSE_POLICY_VIOLATION

if TYPE_CHECKING:
    from chatd.handlers.messages import MessageWriter
    from chatd.session import Session


# CHATD_MAX_SOCKETS_PER_USER: a new socket wins; the user's oldest one is closed with this.
SOCKET_CAP_REASON = "too many sockets for this user: closed the oldest"


@dataclass(frozen=True, slots=True)
class Outbound:
    """One event, encoded once; the same text goes to every recipient."""

    text: str
    # Set for new_message events, so a socket still taking its unread snapshot can tell
    # which held events the snapshot already contains.
    message_id: int | None = None


class Hub:
    def __init__(self, max_sockets_per_user: int | None = None) -> None:
        # Per user, oldest socket first (a dict keeps insertion order; values unused).
        self._sessions: dict[uuid.UUID, dict[Session, None]] = {}
        self.max_sockets_per_user = max_sockets_per_user
        self._quiet: asyncio.Future[None] | None = None  # shutdown: see wait_quiet

    def add(self, session: Session) -> None:
        self._sessions.setdefault(session.user_id, {})[session] = None
        OPEN_SOCKETS.inc()

    def enforce_cap(self, user_id: uuid.UUID) -> None:
        """Close the user's oldest sockets in this process past the cap.

        Called once a new socket works (its snapshot is sent), so a socket that fails to
        start never evicts a good one. With Redis, RedisBus.admit holds the cap across
        processes and calls this too (alone, when Redis does not answer).
        """
        sessions = self._sessions.get(user_id, {})
        cap = self.max_sockets_per_user
        while cap is not None and len(sessions) > cap:
            self.evict(next(iter(sessions)))

    def evict(self, session: Session) -> None:
        """Close a socket beyond its user's cap; it gets no more events from here on."""
        self.remove(session)
        if session.close_reason is None:
            SOCKET_CAP_CLOSES.inc()
        session.close_soon(CLOSE_POLICY_VIOLATION, SOCKET_CAP_REASON)

    def evict_by_id(self, user_id: uuid.UUID, session_id: str) -> None:
        """Another process counted this socket past the user's cap (see RedisBus.admit)."""
        for session in list(self._sessions.get(user_id, ())):
            if session.id == session_id:
                self.evict(session)

    def remove(self, session: Session) -> None:
        sessions = self._sessions.get(session.user_id)
        if sessions is not None and session in sessions:
            del sessions[session]
            OPEN_SOCKETS.dec()
            if not sessions:
                del self._sessions[session.user_id]

    def deliver(self, user_ids: Iterable[uuid.UUID], event: Outbound) -> None:
        """Queue `event` on every socket of every user; never waits on a socket."""
        delivered = 0
        for user_id in user_ids:
            for session in self._sessions.get(user_id, ()):
                session.enqueue(event)
                delivered += 1
        if delivered:
            EVENTS_DELIVERED.inc(delivered)

    def close_all(self, code: int, reason: str) -> None:
        """Ask every socket to close (they reconnect and resume with sync)."""
        for sessions in list(self._sessions.values()):
            for session in list(sessions):
                session.close_soon(code, reason)

    async def watch_writers(self, every: float = 1.0) -> None:
        """Drop clients whose socket has taken no frame for their write timeout.

        One walk over the sockets a second, instead of a timer around every frame sent.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            stalled = [
                session
                for sessions in self._sessions.values()
                for session in sessions
                if session.sending_since is not None
                and now - session.sending_since > session.write_timeout
            ]
            for session in stalled:
                session.stalled()

    async def wait_quiet(self, writer: MessageWriter, deadline: float) -> None:
        """Shutdown: wait until no socket here reads actions and no send batch is in flight.

        Every session of the process waits on one shared poll (a walk over the sessions
        every 20 ms), never on one each; `deadline` is on the event loop's clock.
        """
        loop = asyncio.get_running_loop()
        if self._quiet is None:
            self._quiet = asyncio.ensure_future(self._poll_quiet(writer, deadline))
        await asyncio.wait((self._quiet,), timeout=max(0.0, deadline - loop.time()))

    async def _poll_quiet(self, writer: MessageWriter, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while writer.busy or any(
            session.reading for sessions in self._sessions.values() for session in sessions
        ):
            if loop.time() >= deadline:
                return
            await asyncio.sleep(0.02)


class Bus(Protocol):
    async def publish(self, user_ids: Iterable[uuid.UUID], event: Outbound) -> None:
        """Deliver `event` to every socket of these users, wherever they are connected."""

    async def watch(self, user_id: uuid.UUID) -> None:
        """A socket of this user opened here: from return on, its events reach this process."""

    async def unwatch(self, user_id: uuid.UUID) -> None:
        """A socket of this user closed here."""

    async def admit(self, session: Session) -> None:
        """A new socket works: close its user's oldest sockets past the cap, wherever."""

    async def release(self, session: Session) -> None:
        """A socket closed: it no longer counts against its user's cap."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def problem(self) -> str | None:
        """Why events cannot cross processes right now, or None when they can."""


class LocalBus:
    """Delivers to the sockets of this process: everything is local, nothing to watch."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def publish(self, user_ids: Iterable[uuid.UUID], event: Outbound) -> None:
        self.hub.deliver(user_ids, event)

    async def watch(self, user_id: uuid.UUID) -> None:
        pass

    async def unwatch(self, user_id: uuid.UUID) -> None:
        pass

    async def admit(self, session: Session) -> None:
        self.hub.enforce_cap(session.user_id)

    async def release(self, session: Session) -> None:
        pass  # the hub forgets it in remove()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def problem(self) -> str | None:
        return None
