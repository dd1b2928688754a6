"""Settings that must not let chatd start unsafely."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


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
