"""Finding and waiting for processes through /proc: chatd servers and their PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx


def cmdline(pid: int) -> list[str]:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    return []


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent PID) of `pid`, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting to be reaped does not)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def children(pid: int) -> list[int]:
    return [p for p in _pids() if (s := _stat(p)) is not None and s[1] == pid and s[0] != "Z"]


def descendants(pid: int) -> list[int]:
    """`pid`'s live children, their children, and so on."""
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def postgres_processes(pgdata: Path) -> list[int]:
    """The live postmaster started on `pgdata` (its command line names it) and its children."""
    masters = [p for p in _pids() if str(pgdata) in cmdline(p) and alive(p)]
    return masters + [child for master in masters for child in children(master)]


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def wait_healthy(base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll /healthz until it answers 200; fail with the log if `process` exits first."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base_url + "/healthz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"{base_url} did not become healthy:\n{log.read_text()}")


def stop_all(pids: list[int], process: subprocess.Popen[bytes] | None = None) -> None:
    """Test cleanup: SIGKILL whatever of `pids` (and `process`) is still running."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()
