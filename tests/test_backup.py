"""`chatd backup` and `chatd restore`: a backup restored elsewhere serves the same chats."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg

from chatd.client import Api
from tests.conftest import PASSWORD, Server, _with_database, start_server, stop_server
from tests.test_config import chatd

COUNTS = "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM chats), " \
    "(SELECT count(*) FROM messages), (SELECT count(*) FROM chat_members)"  # fmt: skip


async def test_a_backup_restores_into_an_empty_database_and_serves(
    server: Server, alice: Api, bob: Api, database_url: str, tmp_path: Path
) -> None:
    chat = await alice.call("POST", "/chats", json={"type": "private", "user_ids": [bob.user_uuid]})
    for text in ("before the backup", "second"):
        await alice.call("POST", f"/chats/{chat['id']}/messages", json={"text": text})

    dump = tmp_path / "chatd.dump"
    result = chatd(["backup", str(dump)], tmp_path, CHATD_DATABASE_URL=database_url)
    assert result.returncode == 0, result.stderr
    assert dump.stat().st_size > 0

    copy_name = f"chatd_restore_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(_with_database(database_url, "postgres"))
    await admin.execute(f'CREATE DATABASE "{copy_name}"')
    copy_url = _with_database(database_url, copy_name)
    try:
        result = chatd(["restore", str(dump)], tmp_path, CHATD_DATABASE_URL=copy_url)
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
            assert [m["text"] for m in history["messages"]] == ["before the backup", "second"]
        finally:
            stop_server(copy_server)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{copy_name}" WITH (FORCE)')
        await admin.close()


def test_restore_needs_a_backup_file(database_url: str, tmp_path: Path) -> None:
    result = chatd(["restore", str(tmp_path / "missing.dump")], tmp_path,
                   CHATD_DATABASE_URL=database_url)  # fmt: skip
    assert result.returncode != 0
    assert "no backup at" in result.stderr
