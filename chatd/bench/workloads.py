"""The coordinator: sets a workload up, drives the worker processes, measures each step.

fanout, direct, biggroup and baseline share one stepped runner: open-loop steps of rising
offered rate, each followed by a drain, until a step loses or duplicates anything, or its
p99 passes --stop-p99-ms. idle opens many quiet sockets and weighs them in server RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import multiprocessing.connection
import secrets
import socket
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil

from chatd.bench import accounts, procs
from chatd.bench.loadgen import (
    BASELINE,
    CHATD,
    SocketSpec,
    StepStats,
    WorkerSpec,
    raise_fd_limit,
    worker_main,
)
from chatd.bench.report import FANOUT_P99_MS
from chatd.bench.stats import Progress, percentiles

# A step whose sends left this late (p99) was not offered at its rate: it is flagged.
GENERATOR_LAG_MS = 10.0


@dataclass
class Context:
    """What every workload of one `chatd bench` run shares."""

    args: Any
    base_url: str
    state: accounts.State
    progress: Progress
    run_id: str
    server_pid: int | None

    @property
    def ws_base(self) -> str:
        return "ws" + self.base_url.removeprefix("http")

    def server_group(self) -> procs.ProcGroup | None:
        if self.server_pid is None:
            return None
        with contextlib.suppress(psutil.Error):
            return procs.server_group(self.server_pid)
        return None

    def postgres_group(self) -> procs.ProcGroup:
        """The server's PostgreSQL (every PostgreSQL process when it cannot be told)."""
        return procs.postgres_group(self.server_pid)


class Fleet:
    """The worker processes of one workload, each holding a share of the sockets."""

    def __init__(
        self,
        mode: str,
        run_id: str,
        sockets: list[SocketSpec],
        procs_count: int,
        connect_concurrency: int,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        count = max(1, min(procs_count, len(sockets)))
        self.conns = []
        self.counters = []
        self.processes = []
        for w in range(count):
            share = [s for i, s in enumerate(sockets) if i % count == w]
            spec = WorkerSpec(
                mode,
                run_id,
                share,
                total_senders=sum(1 for s in sockets if s.sends),
                connect_concurrency=max(1, connect_concurrency // count),
            )
            parent, child = ctx.Pipe()
            counters = ctx.Array("q", 3, lock=False)
            process = ctx.Process(target=worker_main, args=(child, spec, counters), daemon=True)
            process.start()
            child.close()
            self.conns.append(parent)
            self.counters.append(counters)
            self.processes.append(process)

    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def sent(self) -> int:
        return sum(c[0] for c in self.counters)

    def delivered(self) -> int:
        return sum(c[1] for c in self.counters)

    def open_sockets(self) -> int:
        return sum(c[2] for c in self.counters)

    def send(self, command: str, args: Any = None) -> None:
        for conn in self.conns:
            conn.send((command, args))

    def gather(self, expect: str, tick: Any = None, timeout: float = 600) -> list[Any]:
        """Wait for every worker's `expect` reply, calling tick() about twice a second."""
        replies: list[Any] = [None] * len(self.conns)
        waiting = set(range(len(self.conns)))
        deadline = time.monotonic() + timeout
        while waiting:
            for i in list(waiting):
                conn = self.conns[i]
                if conn.poll():
                    try:
                        kind, payload = conn.recv()
                    except EOFError:
                        raise RuntimeError("a load generator process died") from None
                    if kind == expect:
                        replies[i] = payload
                        waiting.discard(i)
                elif not self.processes[i].is_alive():
                    raise RuntimeError(
                        f"load generator process exited with {self.processes[i].exitcode}"
                    )
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"load generators did not answer {expect!r} in {timeout}s")
            if tick is not None:
                tick()
            with contextlib.suppress(Exception):
                multiprocessing.connection.wait([self.conns[i] for i in waiting], timeout=0.5)
        return replies

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("exit")
            self.gather("exit", timeout=30)
        for process in self.processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()


# --- stepped workloads: fanout, direct, baseline -------------------------------------------


def rate_schedule(rates: list[float], max_rate: float) -> list[float]:
    """The listed rates, then doubling while steps pass, up to max_rate (0: no doubling)."""
    schedule = list(rates)
    rate = schedule[-1]
    while max_rate and rate * 2 <= max_rate:
        rate *= 2
        schedule.append(rate)
    return schedule


def merge(stats: list[StepStats]) -> StepStats:
    total = StepStats()
    for s in stats:
        total.sent += s.sent
        total.skipped += s.skipped
        total.acked.extend(s.acked)
        for key, n in s.received.items():
            total.received[key] = total.received.get(key, 0) + n
        total.duplicates += s.duplicates
        total.foreign += s.foreign
        total.latency_ns.extend(s.latency_ns)
        total.ack_latency_ns.extend(s.ack_latency_ns)
        total.send_lag_ns.extend(s.send_lag_ns)
        for code, n in s.errors.items():
            total.errors[code] = total.errors.get(code, 0) + n
        for code, n in s.closes.items():
            total.closes[code] = total.closes.get(code, 0) + n
        total.unacked += s.unacked
    return total


class CpuMeter:
    """CPU seconds of several process groups and the whole machine over one window."""

    def __init__(self, groups: dict[str, procs.ProcGroup | None]) -> None:
        self.groups = {k: g for k, g in groups.items() if g is not None}
        self.missing = [k for k, g in groups.items() if g is None]
        self._machine = psutil.cpu_times()
        self._t0 = time.monotonic()

    def start(self) -> None:
        for group in self.groups.values():
            group.start()
        self._machine = psutil.cpu_times()
        self._t0 = time.monotonic()

    def read(self) -> dict[str, float | None]:
        """Percent of one core per group, and the machine's busy share of all its cores."""
        wall = max(1e-9, time.monotonic() - self._t0)
        out: dict[str, float | None] = {
            f"{k}_cpu_pct": round(100 * g.cpu_seconds() / wall, 1) for k, g in self.groups.items()
        }
        for k in self.missing:
            out[f"{k}_cpu_pct"] = None
        now = psutil.cpu_times()
        busy = lambda t: t.user + t.nice + t.system + t.irq + t.softirq + t.steal  # noqa: E731
        total = lambda t: busy(t) + t.idle + t.iowait  # noqa: E731
        spent = total(now) - total(self._machine)
        out["machine_busy_pct"] = (
            round(100 * (busy(now) - busy(self._machine)) / spent, 1) if spent else None
        )
        return out


def wait_quiet(
    group: procs.ProcGroup | None,
    postgres: procs.ProcGroup,
    progress: Progress,
    label: str,
    limit: float = 60,
) -> None:
    """Wait (up to `limit` s) until the server and PostgreSQL idle below 10% of a core.

    A step that overloaded the server leaves it working through a backlog for a while;
    the next measurement starts once that is done.
    """
    groups = [g for g in (group, postgres) if g is not None]
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for g in groups:
            g.start()
        time.sleep(0.5)
        busy = max(g.cpu_seconds() / 0.5 for g in groups) if groups else 0.0
        if busy < 0.10:
            return
        progress(f"{label}: waiting for the server to go quiet ({100 * busy:.0f}% cpu)")


def run_stepped(ctx: Context, kind: str) -> dict[str, Any]:
    """fanout, direct, biggroup or baseline: set up rooms, then step the offered rate up."""
    args = ctx.args
    baseline_proc = None
    server_pid = ctx.server_pid
    schedule = rate_schedule(args.rates, args.max_rate)
    if kind == "biggroup":
        schedule = list(args.big_rates)
        size = args.big_members
        mode, sockets = CHATD, big_group(ctx, size, args.big_senders)
        setup: dict[str, Any] = {"members": size, "senders": min(args.big_senders, size)}
    elif kind == "baseline":
        baseline_proc, base_ws, server_pid = start_baseline(ctx.progress)
        rooms_n, size = args.groups, args.members
        sockets = [
            SocketSpec(f"{base_ws}/ws?group={r}", None, r, 0, j * rooms_n + r)
            for r in range(rooms_n)
            for j in range(size)
        ]
        mode = BASELINE
        setup = {"groups": rooms_n, "members": size, "server": "bare broadcast"}
    else:
        mode = CHATD
        if kind == "fanout":
            rooms_n, size, chat_type = args.groups, args.members, "group"
            setup = {"groups": rooms_n, "members": size}
        else:
            rooms_n, size, chat_type = args.pairs, 2, "private"
            setup = {"pairs": rooms_n}
        users = asyncio.run(
            accounts.make_users(
                ctx.base_url,
                max(args.groups * args.members, 2 * args.pairs),
                ctx.state,
                "member",
                args.reuse_users,
                ctx.progress,
            )
        )
        rooms = [users[r * size : (r + 1) * size] for r in range(rooms_n)]
        chat_ids = asyncio.run(
            accounts.create_chats(
                ctx.base_url, rooms, chat_type, f"bench {ctx.run_id}", ctx.progress
            )
        )
        sockets = [
            SocketSpec(f"{ctx.ws_base}/connect", room[j].token, r, chat_ids[r], j * rooms_n + r)
            for r, room in enumerate(rooms)
            for j in range(size)
        ]
    try:
        fleet = Fleet(mode, ctx.run_id, sockets, args.client_procs, args.connect_concurrency)
        try:
            connected = fleet.gather(
                "connected",
                tick=lambda: ctx.progress(
                    f"{kind}: connecting {fleet.open_sockets()}/{len(sockets)} sockets"
                ),
            )
            opened = sum(c["connected"] for c in connected)
            if opened < len(sockets):
                failures = merge_counts(c["failures"] for c in connected)
                raise RuntimeError(
                    f"{kind}: only {opened}/{len(sockets)} sockets connected: {failures}"
                )
            server = procs.server_group(server_pid) if server_pid else None
            wait_quiet(server, ctx.postgres_group(), ctx.progress, kind)
            steps = []
            for index, rate in enumerate(schedule):
                step = run_step(ctx, fleet, kind, index, rate, size, server)
                steps.append(step)
                ctx.progress.done(step_line(kind, step))
                if not step["ok"]:
                    break
        finally:
            fleet.close()
    finally:
        if baseline_proc is not None:
            stop_process(baseline_proc)
    result = {
        "workload": kind,
        "setup": setup,
        "sockets": len(sockets),
        "room_size": size,
        "steps": steps,
    }
    result["best"] = best_step(steps, FANOUT_P99_MS)
    return result


def big_group(ctx: Context, size: int, senders: int) -> list[SocketSpec]:
    """biggroup: one group of `size` users, one socket each; the first `senders` send.

    Its own users, not fanout's: the messages they leave unread would weigh on fanout's
    connects on a later run."""
    users = asyncio.run(
        accounts.make_users(
            ctx.base_url, size, ctx.state, "big", ctx.args.reuse_users, ctx.progress
        )
    )
    chat_id = asyncio.run(
        accounts.create_group(ctx.base_url, users, f"bench big {ctx.run_id}", ctx.progress)
    )
    url = f"{ctx.ws_base}/connect"
    return [SocketSpec(url, u.token, 0, chat_id, j, sends=j < senders) for j, u in enumerate(users)]


def merge_counts(dicts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return total


def send_batches(base_url: str) -> tuple[float, float] | None:
    """The server's group commits so far and the sends they held, from its /metrics
    (`chatd_send_batch_size`); None when it has none (the baseline server)."""
    try:
        response = httpx.get(base_url + "/metrics", timeout=5)
    except httpx.HTTPError:
        return None
    totals: dict[str, float] = {}
    for line in response.text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("chatd_send_batch_size_count", "chatd_send_batch_size_sum"):
            totals[name] = float(value)
    if response.is_error or len(totals) < 2:
        return None
    return totals["chatd_send_batch_size_count"], totals["chatd_send_batch_size_sum"]


def sends_per_batch(
    before: tuple[float, float] | None, after: tuple[float, float] | None
) -> float | None:
    if before is None or after is None or after[0] <= before[0]:
        return None
    return round((after[1] - before[1]) / (after[0] - before[0]), 2)


def run_step(
    ctx: Context,
    fleet: Fleet,
    kind: str,
    index: int,
    rate: float,
    room_size: int,
    server: procs.ProcGroup | None,
) -> dict[str, Any]:
    args = ctx.args
    duration, grace = args.step_seconds, args.grace
    # Found before the start is set: finding the processes can take longer than the lead
    # on a busy machine, and the meter would then start after the sends it should count.
    meter = CpuMeter(
        {
            "server": server,
            "postgres": ctx.postgres_group(),
            "client": procs.pids_group("client", fleet.pids()),
        }
    )
    start_ns = time.time_ns() + 300_000_000
    fleet.send("step", (rate, start_ns, duration, grace))
    batches_before = send_batches(ctx.base_url)
    time.sleep(max(0.0, (start_ns - time.time_ns()) / 1e9))
    meter.start()
    started = time.monotonic()
    cpu: dict[str, float | None] = {}
    batches_after: tuple[float, float] | None = None
    rss_peak = 0

    def tick() -> None:
        nonlocal cpu, rss_peak, batches_after
        elapsed = time.monotonic() - started
        if not cpu and elapsed >= duration:
            cpu = meter.read()  # the sending window only, not the drain
            batches_after = send_batches(ctx.base_url)
        if server is not None:
            rss_peak = max(rss_peak, server.rss())
        phase = "sending" if elapsed < duration else "draining"
        ctx.progress(
            f"{kind} step {index + 1} @ {rate:g} msg/s: {phase} {min(elapsed, duration):4.1f}/"
            f"{duration:g}s  sent {fleet.sent()}  delivered {fleet.delivered()}  "
            f"sockets {fleet.open_sockets()}"
        )

    stats = merge(fleet.gather("step", tick=tick, timeout=duration + grace + 120))
    if not cpu:
        cpu = meter.read()
        batches_after = send_batches(ctx.base_url)
    result = step_result(stats, rate, duration, room_size, cpu, rss_peak, args.stop_p99_ms)
    result["sends_per_batch"] = sends_per_batch(batches_before, batches_after)
    return result


def step_result(
    stats: StepStats,
    rate: float,
    duration: float,
    room_size: int,
    cpu: dict[str, float | None],
    rss_peak: int,
    stop_p99_ms: float,
) -> dict[str, Any]:
    acked = set(stats.acked)
    delivered = sum(n for key, n in stats.received.items() if key in acked)
    stray = sum(n for key, n in stats.received.items() if key not in acked)
    expected = room_size * len(acked)
    lost = expected - delivered
    latency = percentiles(stats.latency_ns)
    errors = sum(stats.errors.values())
    closes = sum(stats.closes.values())
    reasons = []
    if lost:
        reasons.append(f"{lost} lost")
    if stats.duplicates:
        reasons.append(f"{stats.duplicates} duplicated")
    if stats.unacked:
        reasons.append(f"{stats.unacked} unacked")
    if errors:
        reasons.append(f"errors {stats.errors}")
    if closes:
        reasons.append(f"closes {stats.closes}")
    if stats.skipped:
        reasons.append(f"{stats.skipped} sends skipped (socket closed)")
    if latency["p99"] is None or latency["p99"] > stop_p99_ms:
        reasons.append(f"p99 {latency['p99']} ms > {stop_p99_ms:g} ms")
    lag = percentiles(stats.send_lag_ns)
    warnings = []
    if lag["p99"] is not None and lag["p99"] > GENERATOR_LAG_MS:
        # Not the server's fault, so no reason to stop; but the offered rate was not met.
        warnings.append(f"load generator fell behind (send lag p99 {lag['p99']:g} ms)")
    return {
        "offered_rate": rate,
        "duration_s": duration,
        "sent": stats.sent,
        "messages_per_s": round(len(acked) / duration, 1),
        "acked": len(acked),
        "expected_deliveries": expected,
        "delivered": delivered,
        "deliveries_per_s": round(delivered / duration, 1),
        "lost": lost,
        "duplicates": stats.duplicates,
        "unacked": stats.unacked,
        "stray": stray,
        "foreign": stats.foreign,
        "errors": stats.errors,
        "closes": {str(k): v for k, v in stats.closes.items()},
        "skipped": stats.skipped,
        "latency_ms": latency,
        "ack_latency_ms": percentiles(stats.ack_latency_ns),
        "send_lag_ms": {"p99": lag["p99"], "max": lag["max"]},
        **cpu,
        "cpu_ms_per_msg": cpu_ms_per_message(cpu, duration, len(acked)),
        "server_rss_mib": round(rss_peak / 2**20, 1) if rss_peak else None,
        "ok": not reasons,
        "fail_reasons": reasons,
        "warnings": warnings,
    }


def cpu_ms_per_message(
    cpu: dict[str, float | None], duration: float, messages: int
) -> float | None:
    """Server and PostgreSQL CPU milliseconds per message stored and fanned out."""
    server, postgres = cpu.get("server_cpu_pct"), cpu.get("postgres_cpu_pct")
    if server is None or postgres is None or not messages:
        return None
    return round((server + postgres) / 100 * duration * 1000 / messages, 3)


def best_step(steps: list[dict[str, Any]], p99_ms: float) -> dict[str, Any] | None:
    """The highest-rate step with nothing lost or duplicated and p99 within `p99_ms`."""
    good = [
        s
        for s in steps
        if not s["lost"]
        and not s["duplicates"]
        and not s["unacked"]
        and not s["errors"]
        and not s["closes"]
        and s["latency_ms"]["p99"] is not None
        and s["latency_ms"]["p99"] <= p99_ms
    ]
    return max(good, key=lambda s: s["deliveries_per_s"]) if good else None


def step_line(kind: str, s: dict[str, Any]) -> str:
    lat = s["latency_ms"]
    verdict = "ok" if s["ok"] else "STOP: " + "; ".join(s["fail_reasons"])
    return (
        f"{kind} @ {s['offered_rate']:g} msg/s: {s['messages_per_s']:g} msg/s, "
        f"{s['deliveries_per_s']:g} deliveries/s, p50/p99 {lat['p50']}/{lat['p99']} ms, "
        f"lost {s['lost']}, dup {s['duplicates']} — {verdict}"
    )


# --- baseline server -----------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_baseline(progress: Progress) -> tuple[subprocess.Popen[bytes], str, int]:
    """Start the bare broadcast server on a free port; return it, its ws:// base and pid."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "chatd.bench.baseline", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        progress("baseline: starting the bare broadcast server")
        if process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise RuntimeError(f"the baseline server exited with {process.returncode}: {err}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process, f"ws://127.0.0.1:{port}", process.pid
        time.sleep(0.1)
    stop_process(process)
    raise RuntimeError("the baseline server did not start")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- idle ----------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.")


def run_idle(ctx: Context) -> dict[str, Any]:
    """Open N authenticated sockets, weigh them in server RSS, and time the connects."""
    args = ctx.args
    n = args.sockets
    raise_fd_limit()
    users = asyncio.run(
        accounts.make_users(
            ctx.base_url, min(args.idle_users, n), ctx.state, "idle", args.reuse_users, ctx.progress
        )
    )
    host = urlsplit(ctx.base_url).hostname or "127.0.0.1"
    sources = args.source_addrs or max(1, math.ceil(n / 20000))
    addrs = (
        [f"127.0.0.{2 + i}" for i in range(sources)]
        if sources > 1 and is_loopback(host)
        else [None]
    )
    sockets = [
        SocketSpec(
            f"{ctx.ws_base}/connect", users[i % len(users)].token, i, 0, i, addrs[i % len(addrs)]
        )
        for i in range(n)
    ]
    server = ctx.server_group()
    server_info = procs.process_info(ctx.server_pid) if ctx.server_pid else {}
    warnings = []
    limit = server_info.get("rlimit_nofile")
    if limit and limit[0] < n + 100:
        warnings.append(
            f"the server's open-file limit ({limit[0]}) is below {n + 100}: "
            "raise it (ulimit -n) before starting chatd"
        )
    wait_quiet(server, ctx.postgres_group(), ctx.progress, "idle")
    rss_before = server.rss() if server else None
    meter = CpuMeter({"server": server, "postgres": ctx.postgres_group()})
    meter.start()
    fleet = Fleet(CHATD, ctx.run_id, sockets, args.client_procs, args.connect_concurrency)
    try:
        connected = fleet.gather(
            "connected",
            timeout=1800,
            tick=lambda: ctx.progress(f"idle: {fleet.open_sockets()}/{n} sockets connected"),
        )
        cpu = meter.read()
        opened = sum(c["connected"] for c in connected)
        elapsed = max(c["elapsed"] for c in connected)
        latency = array("q")
        for c in connected:
            latency.extend(c["latency_ns"])
        ctx.progress(f"idle: {opened} sockets open, settling {args.idle_hold:g}s", force=True)
        time.sleep(args.idle_hold)
        rss_after = server.rss() if server else None
        fleet.send("status")
        status = fleet.gather("status")
        still_open = sum(s["open"] for s in status)
        closes = merge_counts({str(k): v for k, v in s["closes"].items()} for s in status)
    finally:
        fleet.close()
    time.sleep(2)
    rss_closed = server.rss() if server else None
    per_socket = None
    if rss_before is not None and rss_after is not None and opened:
        per_socket = round((rss_after - rss_before) / opened / 1024, 2)
    result = {
        "workload": "idle",
        "sockets": n,
        "users": len(users),
        "source_addresses": [a or "default" for a in addrs],
        "connected": opened,
        "failures": merge_counts(c["failures"] for c in connected),
        "still_open_after_hold": still_open,
        "closes": closes,
        "connect_seconds": round(elapsed, 3),
        "connects_per_s": round(opened / elapsed, 1) if elapsed else None,
        "connect_latency_ms": percentiles(latency),
        **cpu,
        "server_rss_before_mib": mib(rss_before),
        "server_rss_after_mib": mib(rss_after),
        "server_rss_after_close_mib": mib(rss_closed),
        "rss_per_socket_kib": per_socket,
        "warnings": warnings,
    }
    ctx.progress.done(
        f"idle: {opened}/{n} sockets, {result['connects_per_s']} connects/s, "
        f"{per_socket} KiB server RSS per socket"
    )
    return result


def mib(value: int | None) -> float | None:
    return round(value / 2**20, 1) if value is not None else None


def new_run_id() -> str:
    return secrets.token_hex(4)
