"""Who is online, and getting events to them.

The hub keeps every open socket of this process per user. Handlers never talk to
sockets: they hand an event and its recipients to `publish`, which encodes it once and
gives the same text to the `Bus`. `LocalBus` delivers in-process (one chatd process);
`RedisBus` (chatd/redis_bus.py) also reaches the users connected to other processes and
nodes.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from chatd.metrics import EVENTS_DELIVERED, OPEN_SOCKETS, SOCKET_CAP_CLOSES
from chatd.protocol import CLOSE_POLICY_VIOLATION, Event, NewMessage, encode_text
from chatd.revocations import Revocation, SessionCache

# CHATD_MAX_SOCKETS_PER_USER: a new socket wins; the user's oldest one is closed with this.
SOCKET_CAP_REASON = "too many sockets for this user: closed the oldest"
# The socket's session was revoked (logout, DELETE /me/sessions/{id}, a password change,
# an account disabled or deleted): closed with 1008.
SESSION_REVOKED_REASON = "session revoked"

log = logging.getLogger("chatd")


@dataclass(slots=True)
class Outbound:
    """One event, encoded once; the same bytes go to every recipient."""

    text: str
    # Set for new_message events, so a socket still taking its unread snapshot can tell
    # which held events the snapshot already contains.
    message_id: int | None = None
    # The WebSocket frame every socket writes: made by the first one (chatd/outbox.py).
    frame: bytes | None = field(default=None, compare=False)


def outbound(event: Event) -> Outbound:
    """`event` encoded once, for every recipient."""
    message_id = event.data.id if isinstance(event, NewMessage) else None
    return Outbound(encode_text(event), message_id)


class Subscriber(Protocol):
    """What the hub needs of a socket (chatd.session.Session is the one)."""

    @property
    def user_id(self) -> uuid.UUID: ...

    @property
    def id(self) -> str:
        """Names the socket to other processes (the per-user socket cap)."""

    @property
    def session_id(self) -> uuid.UUID | None:
        """The login session its access token belongs to."""

    @property
    def reading(self) -> bool:
        """Whether it may still start an action (shutdown waits until none does)."""

    @property
    def close_reason(self) -> tuple[int, str] | None:
        """The close code and reason chatd chose, once it chose one."""

    def enqueue(self, event: Outbound) -> None:
        """Queue an event for the socket; never waits."""

    def close_soon(self, code: int, reason: str) -> None:
        """Close the socket once its writer gets to it; it sends nothing more."""

    def check_writer(self, now: float) -> None:
        """The watchdog's tick (loop time): drop the client if its writer is stuck."""


class WriteStep:
    """Sockets with frames to write, written once the event-loop step that queued them
    has run. A socket that gets several frames in one step (a batch's messages, their
    read receipt, the sender's ack) then costs one write system call, not one a frame.
    It adds no wait: the writes run before the loop next waits for I/O."""

    __slots__ = ("_due",)

    def __init__(self) -> None:
        self._due: list[Callable[[], None]] = []

    def add(self, write: Callable[[], None]) -> None:
        """Call `write` at the end of this step (the caller adds each socket once a step)."""
        if not self._due:
            asyncio.get_running_loop().call_soon(self._write)
        self._due.append(write)

    def _write(self) -> None:
        due, self._due = self._due, []
        for write in due:
            try:
                write()
            except Exception:  # one socket's failure must not leave the others unwritten
                log.exception("writing to a socket failed")


class Hub:
    def __init__(
        self, max_sockets_per_user: int | None = None, sessions: SessionCache | None = None
    ) -> None:
        # Per user, oldest socket first (a dict keeps insertion order; values unused).
        self._sockets: dict[uuid.UUID, dict[Subscriber, None]] = {}
        self.max_sockets_per_user = max_sockets_per_user
        self.sessions = sessions  # the process's cache of live sessions, told of revocations
        self.writes = WriteStep()  # the sockets' writes, one per socket and loop step

    def revoke(self, revocation: Revocation) -> None:
        """Sessions were revoked (here or on another process): close their sockets here
        with 1008 and forget them as live."""
        if self.sessions is not None:
            self.sessions.revoked(revocation)
        for socket in list(self._sockets.get(revocation.user_id, ())):
            if revocation.covers(socket.user_id, socket.session_id):
                self.remove(socket)
                socket.close_soon(CLOSE_POLICY_VIOLATION, SESSION_REVOKED_REASON)

    def revocations_lost(self, channel: str) -> None:
        """Revocations on `channel` may be missed until revocations_heard: ask the database
        meanwhile."""
        if self.sessions is not None:
            self.sessions.suspend(channel)

    def revocations_heard(self, channel: str) -> None:
        if self.sessions is not None:
            self.sessions.resume(channel)

    def add(self, socket: Subscriber) -> None:
        self._sockets.setdefault(socket.user_id, {})[socket] = None
        OPEN_SOCKETS.inc()

    def enforce_cap(self, user_id: uuid.UUID) -> None:
        """Close the user's oldest sockets in this process past the cap.

        Called once a new socket works (its snapshot is sent), so a socket that fails to
        start never evicts a good one. With Redis, RedisBus.admit holds the cap across
        processes and calls this too (alone, when Redis does not answer).
        """
        sockets = self._sockets.get(user_id, {})
        cap = self.max_sockets_per_user
        while cap is not None and len(sockets) > cap:
            self.evict(next(iter(sockets)))

    def evict(self, socket: Subscriber) -> None:
        """Close a socket beyond its user's cap; it gets no more events from here on."""
        self.remove(socket)
        if socket.close_reason is None:
            SOCKET_CAP_CLOSES.inc()
        socket.close_soon(CLOSE_POLICY_VIOLATION, SOCKET_CAP_REASON)

    def evict_by_id(self, user_id: uuid.UUID, socket_id: str) -> None:
        """Another process counted this socket past the user's cap (see RedisBus.admit)."""
        for socket in list(self._sockets.get(user_id, ())):
            if socket.id == socket_id:
                self.evict(socket)

    def remove(self, socket: Subscriber) -> None:
        sockets = self._sockets.get(socket.user_id)
        if sockets is not None and socket in sockets:
            del sockets[socket]
            OPEN_SOCKETS.dec()
            if not sockets:
                del self._sockets[socket.user_id]

    def deliver(self, user_ids: Iterable[uuid.UUID], event: Outbound) -> None:
        """Queue `event` on every socket of every user; never waits on a socket."""
        delivered = 0
        for user_id in user_ids:
            for socket in self._sockets.get(user_id, ()):
                socket.enqueue(event)
                delivered += 1
        if delivered:
            EVENTS_DELIVERED.inc(delivered)

    def sockets(self) -> Iterator[Subscriber]:
        for sockets in list(self._sockets.values()):
            yield from list(sockets)

    def close_all(self, code: int, reason: str) -> None:
        """Ask every socket to close (they reconnect and resume with sync)."""
        for socket in self.sockets():
            socket.close_soon(code, reason)

    def reading(self) -> bool:
        """Whether any socket here may still start an action."""
        return any(socket.reading for socket in self.sockets())

    async def watch_writers(self, every: float = 1.0) -> None:
        """Drop clients whose socket has taken no frame for their write timeout.

        One walk over the sockets a second, instead of a timer around every frame sent.
        """
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            for socket in self.sockets():
                socket.check_writer(now)


class Bus(Protocol):
    async def publish(self, user_ids: Iterable[uuid.UUID], event: Outbound) -> None:
        """Deliver `event` to every socket of these users, wherever they are connected."""

    async def watch(self, user_id: uuid.UUID) -> None:
        """A socket of this user opened here: from return on, its events reach this process."""

    async def unwatch(self, user_id: uuid.UUID) -> None:
        """A socket of this user closed here."""

    async def revoke(self, revocation: Revocation) -> None:
        """Sessions were revoked (committed): every process forgets them and closes their
        sockets."""

    async def admit(self, socket: Subscriber) -> None:
        """A new socket works: close its user's oldest sockets past the cap, wherever."""

    async def release(self, socket: Subscriber) -> None:
        """A socket closed: it no longer counts against its user's cap."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def problem(self) -> str | None:
        """Why events cannot cross processes right now, or None when they can."""


async def publish(bus: Bus, user_ids: Iterable[uuid.UUID], event: Event) -> None:
    """Send `event` to every socket of these users: encoded once, the same text to all."""
    await bus.publish(user_ids, outbound(event))


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

    async def revoke(self, revocation: Revocation) -> None:
        self.hub.revoke(revocation)

    async def admit(self, socket: Subscriber) -> None:
        self.hub.enforce_cap(socket.user_id)

    async def release(self, socket: Subscriber) -> None:
        pass  # the hub forgets it in remove()

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def problem(self) -> str | None:
        return None
