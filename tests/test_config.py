"""Settings that must not let chatd start unsafely."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatd.config import stored_once
from tests.conftest import ROOT, S3Service, free_port, start_server, stop_server


def chatd(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatd", *args],
        env={**os.environ, "CHATD_DATA_DIR": str(tmp_path), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_weak_secret_is_refused_outside_development(database_url: str, tmp_path: Path) -> None:
    for weak in ("changeme", "short-but-not-32-characters"):
        result = chatd(["migrate"], tmp_path, CHATD_DATABASE_URL=database_url, CHATD_SECRET=weak)
        assert result.returncode != 0
        assert "CHATD_SECRET is too weak" in result.stderr

    dev = chatd(
        ["migrate"],
        tmp_path,
        CHATD_DATABASE_URL=database_url,
        CHATD_SECRET="changeme",
        CHATD_DEV="true",
    )
    assert dev.returncode == 0, dev.stderr
    assert "CHATD_SECRET is weak" in dev.stderr


def test_a_files_url_must_name_a_bucket(tmp_path: Path) -> None:
    for wrong in ("ftp://host/files", "s3://", "/srv/files"):
        result = chatd(["serve"], tmp_path, CHATD_FILES_URL=wrong, CHATD_DEV="true")
        assert result.returncode != 0
        assert "CHATD_FILES_URL must be unset (local files) or s3://bucket" in result.stderr


def test_a_bucket_that_cannot_be_reached_stops_the_start(
    database_url: str, tmp_path: Path, s3: S3Service
) -> None:
    env = {**s3.server_env(), "CHATD_FILES_URL": "s3://no-such-bucket/chatd"}
    result = chatd(
        ["serve", "--port", str(free_port())],
        tmp_path,
        CHATD_DATABASE_URL=database_url,
        CHATD_DEV="true",
        **env,
    )
    assert result.returncode != 0
    assert "cannot list s3://no-such-bucket/chatd" in result.stderr + result.stdout


def _store_after(barrier: Any, path: Path, n: int, results: Any) -> None:
    barrier.wait()  # every process reaches stored_once at the same moment
    content, created = stored_once(path, lambda: f"key of process {n}".encode())
    results.put((content, created))


def test_processes_starting_together_share_the_key_one_of_them_made(tmp_path: Path) -> None:
    # `chatd serve --workers N` on a fresh data folder: every worker reads the secret and
    # the push key at start. They must all get the same one, and none may fail.
    context = multiprocessing.get_context("fork")
    processes, path = 8, tmp_path / "data" / "key"
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [
        context.Process(target=_store_after, args=(barrier, path, n, results))
        for n in range(processes)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
        assert worker.exitcode == 0
    outcomes = [results.get(timeout=5) for _ in workers]
    assert len({content for content, _ in outcomes}) == 1
    assert sum(created for _, created in outcomes) == 1
    assert path.read_bytes() == outcomes[0][0]
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["key"]  # no drafts left behind


def test_several_workers_start_on_a_fresh_data_folder(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    server = start_server(
        database_url, tmp_path, CHATD_WORKERS="2", CHATD_SECRET="", CHATD_REDIS_URL=redis_url
    )
    try:
        assert httpx.get(server.base_url + "/healthz", timeout=5).status_code == 200
        assert (tmp_path / "data" / "secret").is_file()
        assert (tmp_path / "data" / "vapid_private_key.pem").is_file()
    finally:
        stop_server(server)


def test_without_hard_links_the_key_is_created_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(source: object, target: object) -> None:
        raise PermissionError("hard links are not supported here")  # e.g. some FUSE mounts

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "key"
    assert stored_once(path, lambda: b"first") == (b"first", True)
    assert stored_once(path, lambda: b"second") == (b"first", False)
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key"]
