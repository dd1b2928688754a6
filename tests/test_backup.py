"""`chatd backup` and `chatd restore`: a backup restored elsewhere serves the same chats
and the same files."""

from __future__ import annotations

import asyncio
import io
import subprocess
import tarfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from chatd.backup import pg_tool
from chatd.client import Api
from tests.conftest import PASSWORD, Server, scratch_database, start_server, stop_server
from tests.test_config import chatd

COUNTS = "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM chats), " \
    "(SELECT count(*) FROM messages), (SELECT count(*) FROM chat_members)"  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("backed-up")


@pytest.fixture(scope="module")
def server(database_url: str, workdir: Path) -> Iterator[Server]:
    """This module's chatd, whose data folder (workdir/data) the backup reads."""
    server = start_server(database_url, workdir)
    yield server
    stop_server(server)


@pytest.fixture
async def new_database(database_url: str) -> AsyncIterator[str]:
    async with scratch_database(database_url, "chatd_restore") as url:
        yield url


async def test_a_backup_restores_into_an_empty_database_and_serves(
    server: Server,
    alice: Api,
    bob: Api,
    database_url: str,
    workdir: Path,
    tmp_path: Path,
) -> None:
    chat = await alice.call("POST", "/chats", json={"type": "private", "user_ids": [bob.user_uuid]})
    for text in ("before the backup", "second"):
        await alice.call("POST", f"/chats/{chat['id']}/messages", json={"text": text})
    picture = f"the bytes of a file {uuid.uuid4()}".encode()
    upload = await alice.upload(picture, "notes.txt")
    await alice.call(
        "POST", f"/chats/{chat['id']}/messages", json={"attachments": [upload["upload_id"]]}
    )

    dump = tmp_path / "chatd.backup"
    result = chatd(["backup", str(dump)], workdir / "data", CHATD_DATABASE_URL=database_url)
    assert result.returncode == 0, result.stderr
    with tarfile.open(dump) as tar:
        names = tar.getnames()
    sha = upload["sha256"]
    assert {"chatd-backup.json", "database.dump", f"files/{sha[:2]}/{sha[2:4]}/{sha}"} <= set(names)

    async with scratch_database(database_url, "chatd_restore") as copy_url:
        # Into another data folder: the one the copy's server below uses.
        result = chatd(["restore", str(dump)], tmp_path / "data", CHATD_DATABASE_URL=copy_url)
        assert result.returncode == 0, result.stderr

        original = await asyncpg.connect(database_url)
        restored = await asyncpg.connect(copy_url)
        try:
            # Other tests write to the original meanwhile: compare what the backup holds.
            counts = tuple(await restored.fetchrow(COUNTS))
            now = tuple(await original.fetchrow(COUNTS))
            assert all(counts) and all(a <= b for a, b in zip(counts, now, strict=True))
        finally:
            await original.close()
            await restored.close()

        again = chatd(["restore", str(dump)], tmp_path, CHATD_DATABASE_URL=copy_url)
        assert again.returncode != 0
        assert "refusing to restore into a database that already has tables" in again.stderr

        copy_server = start_server(copy_url, tmp_path)
        try:
            bob_again = Api(copy_server.base_url)
            await bob_again.login(bob.email, PASSWORD)  # type: ignore[attr-defined]
            history = await bob_again.history(chat["id"])
            texts = [m["text"] for m in history["messages"]]
            assert texts == ["before the backup", "second", ""]
            attached = history["messages"][-1]["attachments"][0]["id"]
            assert await bob_again.download(attached) == picture  # the file came along
            await bob_again.aclose()
        finally:
            stop_server(copy_server)


def test_restore_needs_a_backup_file(database_url: str, tmp_path: Path) -> None:
    result = chatd(["restore", str(tmp_path / "missing.dump")], tmp_path,
                   CHATD_DATABASE_URL=database_url)  # fmt: skip
    assert result.returncode != 0
    assert "no backup at" in result.stderr


async def test_a_damaged_backup_is_refused_before_the_database_is_touched(
    server: Server, alice: Api, database_url: str, workdir: Path, tmp_path: Path, new_database: str
) -> None:
    await alice.upload(f"kept safe {uuid.uuid4()}".encode(), "a.txt")
    good = tmp_path / "good.backup"
    result = chatd(["backup", str(good)], workdir / "data", CHATD_DATABASE_URL=database_url)
    assert result.returncode == 0, result.stderr
    damaged = tmp_path / "damaged.backup"
    with tarfile.open(good) as source, tarfile.open(damaged, "w") as target:
        for member in source:
            data = source.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.startswith("files/"):
                data = b"not what was stored"
                member.size = len(data)
            target.addfile(member, io.BytesIO(data))
        # A hostile name is ignored, never extracted by its own path.
        evil = tarfile.TarInfo("../../escaped.txt")
        evil.size = 4
        target.addfile(evil, io.BytesIO(b"evil"))

    result = chatd(["restore", str(damaged)], tmp_path / "data", CHATD_DATABASE_URL=new_database)
    assert result.returncode != 0
    assert "does not hash to its name" in result.stderr
    assert not (tmp_path.parent / "escaped.txt").exists()
    conn = await asyncpg.connect(new_database)
    try:
        assert (
            await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        )
    finally:
        await conn.close()


async def test_a_plain_pg_dump_archive_from_an_earlier_chatd_restores(
    server: Server, alice: Api, database_url: str, tmp_path: Path, new_database: str
) -> None:
    async with asyncpg.create_pool(database_url, min_size=1, max_size=1) as pool:
        major = int(await pool.fetchval("SHOW server_version_num")) // 10000
    archive = tmp_path / "old.dump"
    await asyncio.to_thread(
        subprocess.run,
        [pg_tool("pg_dump", major), "--format=custom", "--no-owner", f"--file={archive}",
         f"--dbname={database_url}"],
        check=True,
    )  # fmt: skip
    result = chatd(["restore", str(archive)], tmp_path / "data", CHATD_DATABASE_URL=new_database)
    assert result.returncode == 0, result.stderr
    conn = await asyncpg.connect(new_database)
    try:
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM users WHERE id = $1", uuid.UUID(alice.user_uuid)
            )
            == 1
        )
    finally:
        await conn.close()
