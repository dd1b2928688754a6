"""The wheel, installed into a fresh venv outside the checkout, serves from any folder.

It proves what a `pip install chatd` user gets: the migrations travel inside the wheel,
the declared dependencies (and none of the extras) are enough to serve, and the embedded
PostgreSQL starts in ./.chatd of whatever folder chatd runs in, with no CHATD_* variable.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yoyo

from tests.conftest import ROOT, Server, free_port, new_user
from tests.processes import postgres_processes, stop_all, wait_healthy, wait_until

# What the wheel is built from: the files the Dockerfile copies, nothing else.
SOURCES = ("pyproject.toml", "README.md", "chatd", "migrations")


def run(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, env=clean_env()
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


def clean_env() -> dict[str, str]:
    """The environment without any CHATD_* variable, nor the checkout on the import path."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CHATD_") and k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (outside the checkout) with the built wheel and its dependencies only."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(ROOT / name, source / name)
    pip = (sys.executable, "-m", "pip", "--quiet")
    # --no-deps builds chatd's wheel alone; the install below resolves its dependencies.
    run(*pip, "wheel", "--no-deps", "--wheel-dir", work / "dist", source)
    (wheel,) = (work / "dist").glob("chatd-*.whl")
    # No pip inside the venv (bootstrapping one takes seconds): this pip installs into it.
    run(sys.executable, "-m", "venv", "--without-pip", work / "venv")
    run(*pip, "--python", work / "venv" / "bin" / "python", "install", wheel)
    return work / "venv"


def serve(venv: Path, cwd: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [venv / "bin" / "chatd", "serve", "--port", str(port)],
            cwd=cwd,
            env=clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_the_installed_wheel_migrates_and_serves_from_an_unrelated_folder(
    venv: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    port, log = free_port(), tmp_path / "chatd.log"
    process = serve(venv, elsewhere, port, log)
    pgdata = elsewhere / ".chatd" / "pgdata"
    try:
        server = Server(f"http://127.0.0.1:{port}", "", process, log)
        wait_healthy(server.base_url, process, log)
        shipped = yoyo.read_migrations(str(ROOT / "migrations"))
        assert f"applied {len(shipped)} migration(s)" in log.read_text()

        alice, bob = await new_user(server, "Alice"), await new_user(server, "Bob")
        chat = await alice.call(
            "POST", "/chats", json={"type": "private", "user_ids": [bob.user_uuid]}
        )
        async with await bob.connect() as sock:
            await alice.call("POST", f"/chats/{chat['id']}/messages", json={"text": "hi"})
            event = await sock.next_event("new_message")
        assert event["data"]["text"] == "hi"
        # Everything chatd keeps lives in ./.chatd of the folder it runs in.
        assert (elsewhere / ".chatd" / "secret").is_file() and (pgdata / "PG_VERSION").is_file()

        postgres = postgres_processes(pgdata)
        assert postgres, "the embedded PostgreSQL should run in ./.chatd/pgdata"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
        # Its shutdown checkpoint took over 30 s once on this 2-core machine under other
        # suites' load; stopping at all is what counts.
        wait_until(lambda: not postgres_processes(pgdata), 90, "the embedded PostgreSQL to stop")
    finally:
        stop_all(postgres_processes(pgdata), process)


def test_the_installed_wheel_has_no_extras_and_says_which_to_install(venv: Path) -> None:
    python = venv / "bin" / "python"
    probe = "import importlib.util as u; print([m for m in %r if u.find_spec(m)])"
    extras = ("matplotlib", "pytest")
    assert run(python, "-c", probe % (extras,)).stdout.strip() == "[]"

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert run(venv / "bin" / "chatd", "--version").stdout.strip() == f"chatd {version}"

    bench = subprocess.run(
        [venv / "bin" / "chatd", "bench", "fanout", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    assert bench.returncode == 2
    assert "pip install 'chatd[bench]'" in bench.stderr
    assert "Traceback" not in bench.stderr

    # The server needs httpx itself (the delivery queue POSTs with it), so its client
    # comes with it.
    client = subprocess.run(
        [python, "-c", "import chatd.client"], capture_output=True, text=True, env=clean_env()
    )
    assert client.returncode == 0, client.stderr


def test_every_folder_of_the_package_is_listed_for_the_wheel() -> None:
    """pyproject.toml lists the packages (for the migrations mapping): a new one must be
    listed there too, or the wheel would ship without it."""
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    folders = {"chatd"} | {
        "chatd." + ".".join(p.relative_to(ROOT / "chatd").parts)
        for p in (ROOT / "chatd").rglob("*")
        if p.is_dir() and p.name != "__pycache__" and any(p.iterdir())
    }
    assert listed == folders | {"chatd.migrations"}
