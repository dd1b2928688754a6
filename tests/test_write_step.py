"""The hub's WriteStep: the sockets' writes, once per socket at the end of a loop step."""

from __future__ import annotations

import asyncio
import logging

import pytest

from chatd.hub import WriteStep


async def test_writes_run_after_the_step_that_queued_them_in_order() -> None:
    step, written = WriteStep(), []
    step.add(lambda: written.append("alice"))
    step.add(lambda: written.append("bob"))
    assert written == []  # not while the step that queued them runs
    await asyncio.sleep(0)
    assert written == ["alice", "bob"]
    step.add(lambda: written.append("carol"))  # a later step gets a write of its own
    await asyncio.sleep(0)
    assert written == ["alice", "bob", "carol"]


async def test_a_failing_write_does_not_keep_the_others_from_theirs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    step, written = WriteStep(), []

    def broken() -> None:
        raise OSError("connection reset")

    step.add(broken)
    step.add(lambda: written.append("bob"))
    with caplog.at_level(logging.ERROR, logger="chatd"):
        await asyncio.sleep(0)
    assert written == ["bob"]
    assert "writing to a socket failed" in caplog.text
