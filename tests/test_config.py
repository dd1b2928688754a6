"""Settings that must not let chatd start unsafely."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, S3Service, free_port


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
