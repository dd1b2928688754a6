"""Stopping leaves nothing running: `make run` passes signals on to chatd, and chatd stops
its embedded PostgreSQL on every clean exit, also after an earlier kill -9.

These run the real Makefile recipe and an embedded PostgreSQL of their own (whatever
CHATD_TEST_DATABASE_URL says), and look for leftovers in /proc.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port
from tests.processes import (
    alive,
    cmdline,
    descendants,
    postgres_processes,
    stop_all,
    wait_healthy,
    wait_until,
)


def chatd_env(data_dir: Path, port: int) -> dict[str, str]:
    """No CHATD_* variable but these two: an embedded PostgreSQL in `data_dir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_")}
    return {**env, "CHATD_DATA_DIR": str(data_dir), "CHATD_PORT": str(port)}


class MakeRun:
    """`make run` in the checkout, in a process group of its own (as a shell job would be)."""

    def __init__(self, tmp_path: Path, data_dir: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"make-run-{self.port}.log"
        self.pgdata = data_dir / "pgdata"
        bin_dir = Path(sys.executable).parent
        with self.log.open("wb") as out:
            self.make = subprocess.Popen(
                # -o: never reinstall the venv from here (make test has just made it).
                ["make", "--no-print-directory", "-o", ".venv/.installed", f"BIN={bin_dir}", "run"],
                cwd=ROOT,
                env=chatd_env(data_dir, self.port),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_healthy(self.base_url, self.make, self.log)
        except BaseException:
            stop_all([*descendants(self.make.pid), *postgres_processes(self.pgdata)], self.make)
            raise
        # chatd's process: make's child when the recipe execs it, else the shell's child.
        (self.chatd,) = [p for p in descendants(self.make.pid) if "serve" in cmdline(p)[1:]]
        self.postgres = postgres_processes(self.pgdata)
        assert self.postgres, f"no embedded PostgreSQL on {self.pgdata}"

    def wait(self) -> int:
        try:
            return self.make.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"make run did not exit:\n{self.log.read_text()}") from None

    def assert_nothing_left(self) -> None:
        assert not alive(self.chatd), f"chatd {self.chatd} outlived make:\n{self.log.read_text()}"
        wait_until(lambda: not postgres_processes(self.pgdata), 15, "PostgreSQL to stop")
        assert not (self.pgdata / "postmaster.pid").exists()

    def cleanup(self) -> None:
        stop_all(
            [self.chatd, *descendants(self.make.pid), *postgres_processes(self.pgdata)], self.make
        )


@pytest.mark.parametrize("how", ["SIGTERM to make's PID", "Ctrl-C (SIGINT to the job)"])
def test_a_signal_to_make_run_stops_chatd_and_its_postgresql(tmp_path: Path, how: str) -> None:
    run = MakeRun(tmp_path, tmp_path / "data")
    try:
        if how.startswith("SIGTERM"):
            os.kill(run.make.pid, signal.SIGTERM)
        else:
            os.killpg(run.make.pid, signal.SIGINT)
        run.wait()
        run.assert_nothing_left()
        log = run.log.read_text()
        assert "Shutting down" in log and "Finished server process" in log  # it drained
        assert "Traceback" not in log
    finally:
        run.cleanup()


def test_after_a_kill_9_the_next_clean_exit_still_stops_postgresql(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = MakeRun(tmp_path, data_dir)
    try:
        os.kill(first.chatd, signal.SIGKILL)
        assert first.wait() != 0
        # What kill -9 leaves: the cluster runs on, its handle file naming the dead chatd.
        assert all(alive(pid) for pid in first.postgres[:1])
        assert str(first.chatd) in (first.pgdata / ".handle_pids.json").read_text()

        again = MakeRun(tmp_path, data_dir)
        try:
            assert again.postgres[0] == first.postgres[0]  # it attached to the running one
            assert httpx.get(again.base_url + "/readyz", timeout=10).status_code == 200
            os.kill(again.make.pid, signal.SIGTERM)
            again.wait()
            again.assert_nothing_left()
        finally:
            again.cleanup()
    finally:
        first.cleanup()


def run_chatd(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "chatd", *args]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_backup_attaches_to_the_servers_postgresql_and_leaves_it_running(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    env = {**chatd_env(data_dir, port), "CHATD_LOG_FORMAT": "console"}
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "chatd", "serve"], env=env, cwd=tmp_path, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    pgdata = data_dir / "pgdata"
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, log)
        postgres = postgres_processes(pgdata)
        backup = run_chatd("backup", str(tmp_path / "chatd.dump"), env=env, cwd=tmp_path)
        assert backup.returncode == 0, backup.stderr
        assert "attaching to the embedded PostgreSQL already running in" in backup.stderr
        assert "starting embedded PostgreSQL" not in backup.stderr
        # The backup's exit did not stop the server's database.
        assert all(alive(pid) for pid in postgres[:1])
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        wait_until(lambda: not postgres_processes(pgdata), 15, "PostgreSQL to stop")

        # With no server running, a backup starts the cluster itself, and stops it.
        alone = run_chatd("backup", str(tmp_path / "again.dump"), env=env, cwd=tmp_path)
        assert alone.returncode == 0, alone.stderr
        assert "starting embedded PostgreSQL in" in alone.stderr
        assert not postgres_processes(pgdata)
    finally:
        stop_all(postgres_processes(pgdata), server)


@pytest.mark.parametrize(("command", "exit_code"), [("serve", 0), ("backup", 128 + 15)])
def test_a_sigterm_while_postgresql_starts_still_stops_it(
    tmp_path: Path, command: str, exit_code: int
) -> None:
    """Cut short during pg_ctl start, chatd used to die before listing itself as the
    cluster's user, and PostgreSQL came up with nothing left to stop it. A server asked to
    stop exits 0; any other command reports the signal (no `backup f && upload f`)."""
    data_dir = tmp_path / "data"
    env = {**chatd_env(data_dir, free_port()), "CHATD_LOG_FORMAT": "console"}
    initialised = run_chatd("migrate", env=env, cwd=tmp_path)  # initdb now: starts are quick
    assert initialised.returncode == 0, initialised.stderr
    pgdata = data_dir / "pgdata"
    assert not postgres_processes(pgdata)

    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "chatd", command, *(["x.dump"] if command == "backup" else [])],
            env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until(lambda: "starting embedded PostgreSQL" in log.read_text(), 60, "the start")
        server.send_signal(signal.SIGTERM)  # pg_ctl start is running now
        assert server.wait(timeout=60) == exit_code, log.read_text()
        wait_until(lambda: not postgres_processes(pgdata), 15, "PostgreSQL to stop")
        assert "Traceback" not in log.read_text()
        assert not list(tmp_path.glob("x.dump*"))
    finally:
        stop_all(postgres_processes(pgdata), server)
