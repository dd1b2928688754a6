"""Server, PostgreSQL and load-generator processes: finding them, their CPU and memory.

CPU is measured as cpu_times deltas over a step (user + system seconds per wall second,
so 100% is one core); memory as RSS.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil


def listening_pid(port: int) -> int | None:
    """The pid of the process listening on TCP `port` (any local address), if visible.

    With `--workers N` the master and its workers all hold the listening socket, and the
    system names any one of them: this climbs to the topmost that listens, so the
    server's CPU and RSS (the process and its children) are every worker's.
    """
    with contextlib.suppress(psutil.AccessDenied):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid:
                    return _topmost_listener(conn.pid, port)
    return None


def _topmost_listener(pid: int, port: int) -> int:
    with contextlib.suppress(psutil.Error):
        parent = psutil.Process(pid).parent()
        while parent is not None and any(
            c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
            for c in parent.net_connections(kind="tcp")
        ):
            pid, parent = parent.pid, parent.parent()
    return pid


def _is_postgres(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return proc.name() in ("postgres", "postmaster") or proc.name().startswith("postgres")
    return False


class ProcGroup:
    """A set of processes measured together (CPU and RSS summed).

    With a `parent` (the postmaster, uvicorn's master), the CPU of its children that exit
    during a measurement counts too: the parent's reaped-children times hold it once the
    process is gone. asyncpg replaces a pooled connection after 50,000 queries, so under
    load a PostgreSQL backend ends every few minutes, and without this its whole step's
    work went uncounted."""

    def __init__(self, label: str, finder: Any, parent: psutil.Process | None = None) -> None:
        self.label = label
        self._finder = finder  # () -> list[psutil.Process]
        self._parent = parent
        self._start: dict[int, float] = {}
        self._start_reaped = 0.0

    def processes(self) -> list[psutil.Process]:
        return self._finder()

    def _cpu(self) -> dict[int, float]:
        times = {}
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                cpu = proc.cpu_times()
                times[proc.pid] = cpu.user + cpu.system
        return times

    def _reaped(self) -> float:
        """CPU seconds of the parent's children that have ended (and been waited for)."""
        if self._parent is None:
            return 0.0
        with contextlib.suppress(psutil.Error):
            cpu = self._parent.cpu_times()
            return cpu.children_user + cpu.children_system
        return self._start_reaped

    def start(self) -> None:
        self._start_reaped = self._reaped()
        self._start = self._cpu()

    def cpu_seconds(self) -> float:
        """CPU seconds used since start(); processes that appeared since count in full, and
        those of the parent's children that ended since count up to their end."""
        now = self._cpu()
        running = sum(max(0.0, t - self._start.get(pid, 0.0)) for pid, t in now.items())
        if self._parent is None:
            return running
        # An ended child's whole life is in the reaped total; its part before start() is not
        # this measurement's.
        before = sum(t for pid, t in self._start.items() if pid not in now)
        return running + max(0.0, self._reaped() - self._start_reaped - before)

    def rss(self) -> int:
        total = 0
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total


def server_group(pid: int) -> ProcGroup:
    """The server process and its children (uvicorn workers), without an embedded PostgreSQL."""
    root = psutil.Process(pid)

    def find() -> list[psutil.Process]:
        procs = [root]
        with contextlib.suppress(psutil.Error):
            procs += [p for p in root.children(recursive=True) if not _is_postgres(p)]
        return procs

    return ProcGroup("server", find, parent=root)


def postgres_group(server_pid: int | None = None) -> ProcGroup:
    """The PostgreSQL the server talks to: the postmaster listening on a port the server is
    connected to, with its children (backends come and go, so looked up each time). Every
    PostgreSQL process on the machine when that cannot be told (no server pid, a Unix
    socket): then another cluster's work, tests running beside the bench say, counts too.
    """
    postmaster = postmaster_of(server_pid) if server_pid else None

    def find() -> list[psutil.Process]:
        if postmaster is not None:
            with contextlib.suppress(psutil.Error):
                return [postmaster, *postmaster.children()]
        return [p for p in psutil.process_iter(["name"]) if _is_postgres(p)]

    return ProcGroup("postgres", find, parent=postmaster)


def postmaster_of(server_pid: int) -> psutil.Process | None:
    """The postmaster of the PostgreSQL `server_pid` (or a child of it) has a TCP connection
    to, if one can be seen."""
    with contextlib.suppress(psutil.Error):
        server = psutil.Process(server_pid)
        ports = set()
        for proc in [server, *server.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                for conn in proc.net_connections(kind="tcp"):
                    if conn.raddr and conn.status == psutil.CONN_ESTABLISHED:
                        ports.add(conn.raddr.port)
        for port in sorted(ports):
            pid = listening_pid(port)
            if pid is not None:
                proc = psutil.Process(pid)
                if _is_postgres(proc):
                    return proc
    return None


def pids_group(label: str, pids: list[int]) -> ProcGroup:
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    return ProcGroup(label, lambda: procs)


def process_info(pid: int) -> dict[str, Any]:
    info: dict[str, Any] = {"pid": pid}
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        info["cmdline"] = " ".join(proc.cmdline())
        info["rss_bytes"] = proc.memory_info().rss
        with contextlib.suppress(AttributeError, psutil.Error):
            info["rlimit_nofile"] = list(proc.rlimit(psutil.RLIMIT_NOFILE))
    return info


def machine_info(server_pid: int | None = None) -> dict[str, Any]:
    cpu_model = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": cpu_model,
        "cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_bytes": psutil.virtual_memory().total,
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "hostname": platform.node(),
        "postgresql": postgres_version(server_pid),
    }


def postgres_version(server_pid: int | None = None) -> str | None:
    """The version of the PostgreSQL the server uses (its postmaster's binary), else of
    any PostgreSQL running here: a machine may run several, of different versions."""
    for proc in postgres_group(server_pid).processes():
        with contextlib.suppress(psutil.Error, OSError, subprocess.SubprocessError):
            exe = proc.exe()
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=5)
            return out.stdout.strip() or None
    exe = shutil.which("postgres")
    if exe:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
    return None


def chatd_commit(server_pid: int | None = None) -> str | None:
    """The git commit of the chatd source the server runs (with -dirty if it is changed).

    That is the server's working directory when it holds a chatd source tree (`chatd
    serve` started in a checkout), else the tree the bench itself runs from. A source
    tree that is no git checkout (a `git archive` export, say) can name its commit in
    $CHATD_COMMIT.
    """
    root = Path(__file__).resolve().parents[2]
    if server_pid is not None:
        with contextlib.suppress(psutil.Error, OSError):
            cwd = Path(psutil.Process(server_pid).cwd())
            if (cwd / "chatd" / "__init__.py").exists():
                root = cwd
    if not (root / ".git").exists():
        return os.environ.get("CHATD_COMMIT")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or None
    return None
