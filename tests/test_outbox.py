"""The socket's Outbox on its own: no socket, no event loop, every rule by hand.

chatd/outbox.py is the sans-I/O part of a socket; tests/test_socket.py, test_slow_consumer.py
and test_shutdown.py check the same rules end to end through real sockets.
"""

from __future__ import annotations

import uuid

from chatd.hub import Outbound, outbound
from chatd.outbox import OVERFLOW_REASON, Close, Outbox, State, text_frame
from chatd.protocol import (
    CLOSE_SERVICE_RESTART,
    CLOSE_TRY_AGAIN_LATER,
    ChatDeleted,
    ChatDeletedData,
)


class Calls:
    def __init__(self) -> None:
        self.wakeups = 0
        self.overflows = 0

    def wakeup(self) -> None:
        self.wakeups += 1

    def overflow(self) -> None:
        self.overflows += 1


def outbox(capacity: int = 4) -> tuple[Outbox, Calls]:
    calls = Calls()
    return Outbox(capacity, wakeup=calls.wakeup, on_overflow=calls.overflow), calls


def frame(text: str) -> bytes:
    return text_frame(text.encode())


def text_of(step: bytes | Close) -> str | Close:
    """A frame's text (the tests' frames are short: a two-byte header)."""
    if isinstance(step, Close):
        return step
    assert step[0] == 0x81 and step[1] == len(step) - 2  # FIN, text, unmasked, its length
    return step[2:].decode()


def drain(box: Outbox) -> list[str | Close]:
    """Everything the writer would write now, in order, as text."""
    steps = []
    while (step := box.next()) is not None:
        steps.append(text_of(step))
    return steps


def message(message_id: int) -> Outbound:
    return Outbound(f"m{message_id}", message_id)


def test_events_wait_for_the_snapshot_then_follow_it_in_order() -> None:
    box, calls = outbox()
    assert box.state is State.HOLDING
    box.enqueue(message(1))
    box.enqueue(Outbound("typing"))
    assert drain(box) == [] and calls.wakeups == 0
    box.release(frame("snapshot"))
    assert box.state is State.OPEN
    assert drain(box) == ["snapshot", "m1", "typing"]
    assert calls.wakeups > 0


def test_release_skips_the_messages_the_snapshot_holds() -> None:
    box, _ = outbox()
    for n in (1, 2, 3):
        box.enqueue(message(n))
    box.enqueue(Outbound("receipt"))
    box.release(frame("snapshot"), skip={1, 3})
    assert drain(box) == ["snapshot", "m2", "receipt"]


def test_replies_go_out_while_events_are_held() -> None:
    box, _ = outbox()
    box.enqueue(message(1))
    box.push(frame("ack"))
    assert drain(box) == ["ack"]
    box.release(frame("snapshot"))
    assert drain(box) == ["snapshot", "m1"]


def test_once_open_frames_go_out_in_the_order_they_came() -> None:
    box, _ = outbox()
    box.release(frame("snapshot"))
    box.enqueue(message(7))
    box.push(frame("ack"))
    box.enqueue(Outbound("event"))
    assert drain(box) == ["snapshot", "m7", "ack", "event"]
    assert box.next() is None
    assert box.close_reason is None


def test_a_full_outbox_drops_everything_and_closes_1013() -> None:
    box, calls = outbox(capacity=2)
    box.release(frame("snapshot"))
    box.push(frame("a"))
    box.push(frame("b"))  # one over: snapshot and a are waiting
    assert calls.overflows == 1
    assert box.close_reason == (CLOSE_TRY_AGAIN_LATER, OVERFLOW_REASON)
    assert drain(box) == [Close(CLOSE_TRY_AGAIN_LATER, OVERFLOW_REASON)]
    box.push(frame("c"))
    box.enqueue(message(1))
    assert drain(box) == [] and box.state is State.CLOSED
    assert calls.overflows == 1  # counted once


def test_too_many_held_events_overflow_too() -> None:
    box, calls = outbox(capacity=2)
    for n in range(3):
        box.enqueue(message(n))
    assert calls.overflows == 1 and box.state is State.CLOSING
    box.release(frame("snapshot"))  # too late: nothing is sent but the close
    assert drain(box) == [Close(CLOSE_TRY_AGAIN_LATER, OVERFLOW_REASON)]


def test_close_drops_what_is_queued_and_the_first_close_wins() -> None:
    box, calls = outbox()
    box.release(frame("snapshot"))
    box.push(frame("never sent"))
    box.close(1008, "too many sockets")
    box.close(1013, "too slow")
    box.push(frame("after the close"))
    assert box.close_reason == (1008, "too many sockets")
    assert drain(box) == [Close(1008, "too many sockets")]
    assert box.next() is None
    assert calls.overflows == 0


def test_close_when_flushed_sends_everything_first() -> None:
    box, _ = outbox()
    box.release(frame("snapshot"))
    box.push(frame("last ack"))
    box.close_when_flushed(CLOSE_SERVICE_RESTART, "server shutting down")
    assert box.close_reason is None  # not chosen until the queue is empty
    box.enqueue(message(9))  # still accepted: a batch in flight fans out to this socket
    assert drain(box) == [
        "snapshot",
        "last ack",
        "m9",
        Close(CLOSE_SERVICE_RESTART, "server shutting down"),
    ]
    assert box.close_reason == (CLOSE_SERVICE_RESTART, "server shutting down")
    assert box.state is State.CLOSED


def test_a_close_beats_a_pending_flush() -> None:
    box, _ = outbox()
    box.release(frame("snapshot"))
    box.push(frame("queued"))
    box.close_when_flushed(CLOSE_SERVICE_RESTART, "server shutting down")
    box.close(CLOSE_TRY_AGAIN_LATER, "client too slow: not reading")
    assert drain(box) == [Close(CLOSE_TRY_AGAIN_LATER, "client too slow: not reading")]


def test_a_close_while_holding_drops_the_held_events() -> None:
    box, _ = outbox()
    box.enqueue(message(1))
    box.close(1008, "too many sockets")
    box.release(frame("snapshot"))
    assert drain(box) == [Close(1008, "too many sockets")]


def test_wakeup_is_called_for_each_frame_and_for_a_close() -> None:
    box, calls = outbox()
    box.release(frame("snapshot"))
    before = calls.wakeups
    box.push(frame("a"))
    box.enqueue(Outbound("b"))
    assert calls.wakeups == before + 2
    box.close(1000, "bye")
    assert calls.wakeups == before + 3


def test_an_event_is_encoded_once_and_every_outbox_writes_that_frame() -> None:
    """The hub encodes an event once (`outbound`); the sockets of a big group all write
    the one frame the first outbox made of it, not a copy each."""
    event = outbound(ChatDeleted(ChatDeletedData(chat_id=7, by=str(uuid.uuid4()))))
    boxes = [outbox()[0] for _ in range(3)]
    for box in boxes:
        box.release(frame("snapshot"))
        box.enqueue(event)
        assert text_of(box.next()) == "snapshot"  # type: ignore[arg-type]
    frames = [box.next() for box in boxes]
    assert frames[0] is event.frame and all(f is frames[0] for f in frames)
    assert text_of(event.frame) == event.text  # type: ignore[arg-type]


def test_next_frame_and_empty_tell_the_socket_what_it_may_write_at_once() -> None:
    box, _ = outbox()
    assert box.next_frame() is None and box.empty
    box.push(frame("ack"))  # replies go out while events are held
    assert not box.empty
    assert text_of(box.next_frame()) == "ack"  # type: ignore[arg-type]
    assert box.empty
    box.release(frame("snapshot"))
    box.close_when_flushed(CLOSE_SERVICE_RESTART, "server shutting down")
    assert text_of(box.next_frame()) == "snapshot"  # type: ignore[arg-type]
    # The close is due, but it is not a frame: the writer task sends it.
    assert box.next_frame() is None and not box.empty
    assert box.next() == Close(CLOSE_SERVICE_RESTART, "server shutting down")
    assert box.empty

    box, _ = outbox()
    box.release(frame("snapshot"))
    box.close(1008, "too many sockets")
    assert box.next_frame() is None and not box.empty


def test_take_frames_hands_over_whole_frames_up_to_a_byte_budget() -> None:
    box, _ = outbox(capacity=8)
    assert box.take_frames(1000) == []
    frames = [frame("a" * 10), frame("b" * 10), frame("c" * 10)]
    for f in frames:
        box.push(f)
    size = len(frames[0])
    assert box.take_frames(2 * size) == frames[:2]  # what fits, in order
    assert box.take_frames(0) == frames[2:]  # at least one, whatever the budget
    assert box.empty and box.take_frames(1000) == []
    box.push(frame("late"))
    box.close(CLOSE_TRY_AGAIN_LATER, "too slow")
    assert box.take_frames(1000) == []  # a close comes next: the writer task's
