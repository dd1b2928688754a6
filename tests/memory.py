"""What a server process holds: its resident memory and its TCP connections."""

from __future__ import annotations

import threading

import psutil


class RssSampler:
    """The server process's resident memory, sampled in a thread while a flood runs."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def growth(self) -> int:
        """Peak resident memory over the baseline, in bytes."""
        return self.peak - self.baseline

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def holds_connection_from(pid: int, client_port: int) -> bool:
    """Whether process `pid` still has a TCP connection from the client's local port."""
    return any(c.raddr and c.raddr[1] == client_port for c in psutil.Process(pid).net_connections())
