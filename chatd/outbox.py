"""One socket's outbox, without I/O: what to send next, and when to close.

The hub's events and the socket's own replies go in; the socket's writer asks `next()`
for what to write: a whole WebSocket frame, a `Close`, or None (wait for `wakeup`). An
event's frame is made once, by the first outbox that takes it, and the same bytes go to
every recipient (`frame_of`). Nothing here
awaits or touches a socket, so every rule is plain to test (tests/test_outbox.py);
chatd/session.py is the asyncio shell around it, as websockets' connection is around
its sans-I/O protocol.

The rules:

- Bounded: more than `capacity` frames waiting means the client does not read fast
  enough. The outbox then drops what it holds and closes with 1013 (`on_overflow` is
  called, so the shell can stop a write stuck on that client).
- Held around the snapshot: a new socket starts HOLDING. Events wait, in order, while
  its unread snapshot is read; `release` puts the snapshot first, then the held events it
  does not already contain.
- Closing: once a close is chosen nothing more is sent but the close frame, which comes
  at once (`close`), or after every queued frame (`close_when_flushed`, for shutdown).
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass

from chatd.hub import Outbound
from chatd.protocol import CLOSE_TRY_AGAIN_LATER

OVERFLOW_REASON = "send queue overflow: client too slow"


class State(enum.Enum):
    HOLDING = "holding"  # the unread snapshot is being read: events wait
    OPEN = "open"  # frames go out in order
    CLOSING = "closing"  # a close was chosen: the close frame is next
    CLOSED = "closed"  # the close frame was handed out: nothing more


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


def _nothing() -> None:
    pass


def text_frame(payload: bytes) -> bytes:
    """A whole text frame as a server sends it (unmasked, unfragmented, no extension).

    RFC 6455 section 5.2's header by hand: websockets' Frame.serialize, which checks and
    handles what a server's text frame never has, cost every reply and event ~1 µs more.
    """
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


def frame_of(event: Outbound) -> bytes:
    """The event's frame: made for the first socket that takes it, shared by the rest."""
    frame = event.frame
    if frame is None:
        frame = event.frame = text_frame(event.text.encode())
    return frame


class Outbox:
    __slots__ = (
        "_close",
        "_close_when_flushed",
        "_frames",
        "_held",
        "_on_overflow",
        "_wakeup",
        "capacity",
        "state",
    )

    def __init__(
        self,
        capacity: int,
        wakeup: Callable[[], None] = _nothing,
        on_overflow: Callable[[], None] = _nothing,
    ) -> None:
        """`wakeup` is called when `next()` may have something new; `on_overflow` once,
        when the outbox overflows."""
        self.capacity = capacity
        self._wakeup = wakeup
        self._on_overflow = on_overflow
        self.state = State.HOLDING
        # None while empty: an empty deque is ~700 bytes, and most sockets are idle.
        self._frames: deque[bytes] | None = None
        self._held: list[Outbound] = []
        self._close: Close | None = None
        self._close_when_flushed: Close | None = None

    @property
    def close_reason(self) -> tuple[int, str] | None:
        """The close chosen (code, reason), once one is."""
        return None if self._close is None else (self._close.code, self._close.reason)

    def enqueue(self, event: Outbound) -> None:
        """An event for this socket: held while HOLDING, else queued."""
        if self.state is State.HOLDING:
            self._held.append(event)
            if len(self._held) > self.capacity:
                self._overflow()
        else:
            self.push(frame_of(event))

    def push(self, frame: bytes) -> None:
        """A frame to write after those queued; dropped once closing."""
        if self.state not in (State.HOLDING, State.OPEN):
            return
        frames = self._frames
        if frames is None:
            frames = self._frames = deque()
        if len(frames) >= self.capacity:
            self._overflow()
            return
        frames.append(frame)
        self._wakeup()

    def release(self, first: bytes, skip: Collection[int] = ()) -> None:
        """End the hold: `first` (the snapshot) goes out, then the held events, but for
        new_message events of the messages in `skip` (the snapshot has them)."""
        if self.state is not State.HOLDING:
            return
        held, self._held = self._held, []
        self.state = State.OPEN
        self.push(first)
        for event in held:
            if event.message_id is None or event.message_id not in skip:
                self.push(frame_of(event))

    def close(self, code: int, reason: str) -> None:
        """Close next: what is queued is dropped. The first close chosen wins."""
        if self.state in (State.HOLDING, State.OPEN):
            self._close = Close(code, reason)
            self.state = State.CLOSING
            self._frames = None
            self._held = []
            self._wakeup()

    def close_when_flushed(self, code: int, reason: str) -> None:
        """Close once every frame queued has been written (shutdown)."""
        if self._close_when_flushed is None:
            self._close_when_flushed = Close(code, reason)
            self._wakeup()

    def next(self) -> bytes | Close | None:
        """What the writer writes next: a frame, the close, or None (nothing yet)."""
        if self.state is State.CLOSING:
            self.state = State.CLOSED
            return self._close
        if self.state is State.CLOSED:
            return None
        frame = self.next_frame()
        if frame is not None:
            return frame
        if self._close_when_flushed is not None and self.state is State.OPEN:
            self._close = self._close_when_flushed
            self.state = State.CLOSED
            return self._close
        return None

    def next_frame(self) -> bytes | None:
        """The next frame, when a frame is what comes next (not a close, not nothing)."""
        frames = self.take_frames(0)
        return frames[0] if frames else None

    def take_frames(self, max_bytes: int) -> list[bytes]:
        """The frames that come next, as many as fit in `max_bytes` but at least one; none
        when a frame is not what comes next (a close, or nothing)."""
        frames = self._frames
        if not frames or self.state not in (State.HOLDING, State.OPEN):
            return []
        frame = frames.popleft()
        taken, size = [frame], len(frame)
        while frames and size + len(frames[0]) <= max_bytes:
            frame = frames.popleft()
            taken.append(frame)
            size += len(frame)
        if not frames:
            self._frames = None
        return taken

    @property
    def empty(self) -> bool:
        """Nothing to write now: no frame, and no close due."""
        if self.state is State.CLOSING:
            return False
        if self.state is State.CLOSED:
            return True
        due = self._close_when_flushed is not None and self.state is State.OPEN
        return not self._frames and not due

    def _overflow(self) -> None:
        self.close(CLOSE_TRY_AGAIN_LATER, OVERFLOW_REASON)
        self._on_overflow()
