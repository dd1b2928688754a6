"""Flag and Inbox (chatd/websocket_protocol.py): asyncio's Event and Queue as uvicorn's
WebSocket protocol uses them, lighter for the many idle sockets."""

from __future__ import annotations

import asyncio

from chatd.websocket_protocol import Flag, Inbox


async def test_a_flag_wakes_every_waiter_and_stays_set_until_cleared() -> None:
    flag = Flag()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    flag.set()
    await asyncio.wait_for(asyncio.gather(*waiters), 1)
    assert flag.is_set()
    await asyncio.wait_for(flag.wait(), 1)  # set: no wait
    flag.clear()
    assert not flag.is_set()
    late = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    assert not late.done()
    flag.set()
    await asyncio.wait_for(late, 1)


async def test_a_cancelled_wait_leaves_the_others_waiting() -> None:
    flag = Flag()
    gone, staying = asyncio.create_task(flag.wait()), asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert not staying.done()
    flag.set()
    await asyncio.wait_for(staying, 1)


async def test_an_inbox_hands_out_in_order_and_waits_when_empty() -> None:
    inbox = Inbox()
    assert inbox.empty()
    inbox.put_nowait(1)
    inbox.put_nowait(2)
    assert not inbox.empty()
    assert await inbox.get() == 1
    assert await inbox.get() == 2
    assert inbox.empty()
    getter = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    assert not getter.done()
    inbox.put_nowait(3)
    assert await asyncio.wait_for(getter, 1) == 3


async def test_an_inbox_loses_nothing_to_a_cancelled_get() -> None:
    inbox = Inbox()
    cancelled = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait("kept")
    cancelled.cancel()  # woken, but cancelled before it took the item
    await asyncio.gather(cancelled, return_exceptions=True)
    assert cancelled.cancelled()
    assert await asyncio.wait_for(inbox.get(), 1) == "kept"
