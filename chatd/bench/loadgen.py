"""The load generator: a worker process holding client sockets and sending on a schedule.

The coordinator (chatd.bench.workloads) starts one or more workers with `worker_main`,
gives each a share of the sockets, and drives them step by step over a Pipe. A step is
open-loop: messages go out at their scheduled times whether or not earlier ones were
answered, so a slow server shows up as latency instead of slowing the offered load.

Every message carries its scheduled send time (time.time_ns(), comparable across the
worker processes) in its client_msg_id, so every recipient computes the send→receive
latency of every delivery, and records which message it got (the server's message id for
chatd, the client_msg_id for the baseline server, which stores nothing) so the coordinator
can count lost and duplicated deliveries exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from chatd.bench.wsclient import WsClient, connect

CHATD, BASELINE = "chatd", "baseline"


@dataclass
class SocketSpec:
    url: str  # ws://host:port/path?query
    token: str | None  # sent as Authorization: Bearer
    room: int
    chat_id: int
    sender: int  # global sender number: sockets send in this order, interleaving rooms
    local_addr: str | None = None
    sends: bool = True  # False: only receives (biggroup: most members only listen)


@dataclass
class WorkerSpec:
    mode: str  # CHATD or BASELINE
    run_id: str
    sockets: list[SocketSpec]
    total_senders: int
    connect_concurrency: int = 64
    text: str = "bench message"


@dataclass
class StepStats:
    """What one worker saw during one step (merged by the coordinator)."""

    sent: int = 0
    skipped: int = 0  # scheduled on a socket the server had closed
    acked: list[int] = field(default_factory=list)  # message ids acked (baseline: keys sent)
    received: dict[int, int] = field(default_factory=dict)  # id -> distinct recipients here
    duplicates: int = 0
    foreign: int = 0  # new_message frames not sent by this run
    latency_ns: array = field(default_factory=lambda: array("q"))
    ack_latency_ns: array = field(default_factory=lambda: array("q"))
    send_lag_ns: array = field(default_factory=lambda: array("q"))
    errors: dict[str, int] = field(default_factory=dict)
    unacked: int = 0
    closes: dict[int, int] = field(default_factory=dict)  # close code -> sockets


class _Frame(msgspec.Struct):
    action: str
    data: msgspec.Raw = msgspec.Raw()
    request_id: str | None = None
    client_msg_id: str | None = None  # baseline: the forwarded send_message frame
    error: dict[str, Any] | None = None


class _Message(msgspec.Struct):
    id: int = 0
    client_msg_id: str | None = None


_decode_frame = msgspec.json.Decoder(_Frame).decode
_decode_message = msgspec.json.Decoder(_Message).decode


class BenchSocket(WsClient):
    def __init__(self, worker: Worker, spec: SocketSpec) -> None:
        super().__init__()
        self.worker = worker
        self.spec = spec
        self.seen: set[int] = set()
        self.pending: dict[str, int] = {}  # request_id -> send time (ns)
        self.count = 0
        self.ready = asyncio.get_running_loop().create_future()
        self.leaving = False
        prefix = f"{worker.spec.run_id}.{spec.sender}."
        self.prefix = prefix
        self.head = (
            f'{{"action":"send_message","chat_id":{spec.chat_id},'
            f'"text":"{worker.spec.text}","client_msg_id":"{prefix}'
        )

    def send_one(self, sent_ns: int) -> None:
        self.count += 1
        n = self.count
        frame = f'{self.head}{n}.{sent_ns}","request_id":"{n}"}}'
        self.send_text(frame.encode())
        stats = self.worker.stats
        if self.worker.chatd:
            self.pending[str(n)] = sent_ns
        else:
            stats.acked.append((self.spec.sender << 32) | n)
        stats.sent += 1

    def on_text(self, payload: memoryview) -> None:
        now = time.time_ns()
        worker = self.worker
        stats = worker.stats
        try:
            frame = _decode_frame(payload)
        except msgspec.DecodeError:
            stats.errors["undecodable"] = stats.errors.get("undecodable", 0) + 1
            return
        action = frame.action
        if action == "new_message":
            message = _decode_message(frame.data)
            self._delivered(message.id, message.client_msg_id, now)
        elif action == "send_message":  # the baseline server forwards what was sent
            cmid = frame.client_msg_id or ""
            _, sender, n, _ = cmid.split(".")
            self._delivered((int(sender) << 32) | int(n), cmid, now)
        elif action == "ack":
            sent_at = self.pending.pop(frame.request_id or "", None)
            if sent_at is not None:
                stats.acked.append(_decode_message(frame.data).id)
                stats.ack_latency_ns.append(now - sent_at)
        elif action == "error":
            self.pending.pop(frame.request_id or "", None)
            code = str((frame.error or {}).get("code", "?"))
            stats.errors[code] = stats.errors.get(code, 0) + 1
        elif action == "unread_messages":
            if not self.ready.done():
                self.ready.set_result(None)

    def _delivered(self, key: int, cmid: str | None, now: int) -> None:
        stats = self.worker.stats
        if not cmid or not cmid.startswith(self.worker.spec.run_id):
            stats.foreign += 1
            return
        if key in self.seen:
            stats.duplicates += 1
            return
        self.seen.add(key)
        received = stats.received
        received[key] = received.get(key, 0) + 1
        stats.latency_ns.append(now - int(cmid[cmid.rindex(".") + 1 :]))

    def on_close(self) -> None:
        if not self.leaving:
            code = self.close_code or 1006
            closes = self.worker.stats.closes
            closes[code] = closes.get(code, 0) + 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed with {self.close_code}"))
            self.ready.exception()  # retrieved: baseline sockets never wait on it


class Worker:
    def __init__(self, spec: WorkerSpec, counters: Any) -> None:
        self.spec = spec
        self.chatd = spec.mode == CHATD
        self.counters = counters  # shared array: sent, delivered, open sockets
        self.stats = StepStats()
        self.sockets: list[BenchSocket] = []

    async def connect_all(self) -> dict[str, Any]:
        """Open every socket (a bounded number at a time); report connect latencies."""
        gate = asyncio.Semaphore(self.spec.connect_concurrency)
        latencies = array("q")
        failures: dict[str, int] = {}

        async def one(spec: SocketSpec) -> None:
            headers = {"Authorization": f"Bearer {spec.token}"} if spec.token else None
            local = (spec.local_addr, 0) if spec.local_addr else None
            async with gate:
                started = time.perf_counter_ns()
                try:
                    sock = await connect(lambda: BenchSocket(self, spec), spec.url, headers, local)
                    if self.chatd:
                        await asyncio.wait_for(sock.ready, 30)
                except Exception as exc:  # any failure to connect is counted, by kind
                    name = type(exc).__name__
                    failures[name] = failures.get(name, 0) + 1
                    return
                latencies.append(time.perf_counter_ns() - started)
                self.sockets.append(sock)

        started = time.perf_counter()
        await asyncio.gather(*(one(s) for s in self.spec.sockets))
        elapsed = time.perf_counter() - started
        self.sockets.sort(key=lambda s: s.spec.sender)
        self.counters[2] = len(self.sockets)
        return {
            "connected": len(self.sockets),
            "failures": failures,
            "elapsed": elapsed,
            "latency_ns": latencies,
        }

    async def run_step(
        self, rate: float, start_ns: int, duration: float, grace: float
    ) -> StepStats:
        """Send at `rate` (all workers together) for `duration` s from `start_ns`, then drain."""
        self.stats = stats = StepStats()
        for sock in self.sockets:
            sock.seen.clear()
        senders = [sock for sock in self.sockets if sock.spec.sends]
        if senders and rate > 0:
            my_rate = rate * len(senders) / self.spec.total_senders
            interval = 1e9 / my_rate
            end_ns = start_ns + int(duration * 1e9)
            n = len(senders)
            k = 0
            lag = stats.send_lag_ns
            await asyncio.sleep(max(0.0, (start_ns - time.time_ns()) / 1e9))
            while True:
                now = time.time_ns()
                due = start_ns + int(k * interval)
                while due <= now and due < end_ns:
                    sock = senders[k % n]
                    if sock.close_code is None:
                        # Stamped with the real send time; how late the client was (it
                        # batches per wakeup, and an overloaded client falls behind) is
                        # kept apart as send lag.
                        sock.send_one(now)
                        lag.append(now - due)
                    else:
                        stats.skipped += 1
                    k += 1
                    due = start_ns + int(k * interval)
                self.counters[0] = stats.sent
                self.counters[1] = len(stats.latency_ns)
                if due >= end_ns:
                    break
                # At least a millisecond: shorter sleeps return at once on uvloop and the loop
                # would spin, taking a core from the server. Sends due meanwhile go together,
                # stamped with their scheduled times, so latency stays honest.
                await asyncio.sleep(max(0.001, (due - time.time_ns()) / 1e9))
        drain_until = time.time_ns() + int(grace * 1e9)
        while time.time_ns() < drain_until:
            self.counters[1] = len(stats.latency_ns)
            await asyncio.sleep(0.1)
        for sock in self.sockets:
            stats.unacked += len(sock.pending)
            sock.pending.clear()
        self.counters[2] = sum(1 for s in self.sockets if s.close_code is None)
        return stats

    def open_count(self) -> int:
        return sum(1 for s in self.sockets if s.close_code is None)

    async def close_all(self) -> None:
        for sock in self.sockets:
            sock.leaving = True
            sock.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                for sock in self.sockets:
                    await sock.closed
        self.counters[2] = 0


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE to its hard limit (thousands of sockets need it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def worker_main(conn: Connection, spec: WorkerSpec, counters: Any) -> None:
    """Entry point of a worker process: connect, then obey commands until 'exit'."""
    raise_fd_limit()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - no uvloop on this platform
        pass
    asyncio.run(_serve(conn, spec, counters))


async def _serve(conn: Connection, spec: WorkerSpec, counters: Any) -> None:
    worker = Worker(spec, counters)
    loop = asyncio.get_running_loop()
    conn.send(("connected", await worker.connect_all()))
    while True:
        command, args = await loop.run_in_executor(None, conn.recv)
        if command == "step":
            conn.send(("step", await worker.run_step(*args)))
        elif command == "status":
            conn.send(("status", {"open": worker.open_count(), "closes": worker.stats.closes}))
        elif command == "exit":
            await worker.close_all()
            conn.send(("exit", None))
            return
