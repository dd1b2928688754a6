"""Connecting to PostgreSQL and bringing its schema up to date."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import asyncpg

log = logging.getLogger("chatd")


def migrations_dir() -> Path:
    """The migrations: $CHATD_MIGRATIONS_DIR, else those shipped in the package.

    A wheel carries them as chatd/migrations/ (pyproject.toml maps the top-level folder
    there); a checkout (editable install) has the top-level migrations/ beside chatd/.
    Never the current directory's: chatd run from another project's folder must not
    apply that project's migrations.
    """
    configured = os.environ.get("CHATD_MIGRATIONS_DIR")
    if configured:
        if not Path(configured).is_dir():
            raise SystemExit(f"CHATD_MIGRATIONS_DIR is not a folder: {configured}")
        return Path(configured)
    package = Path(__file__).resolve().parent
    shipped, checkout = package / "migrations", package.parent / "migrations"
    if shipped.is_dir():
        return shipped
    if checkout.is_dir() and (package.parent / "pyproject.toml").is_file():
        return checkout
    raise SystemExit(f"no migrations in {shipped} (a broken install?); set CHATD_MIGRATIONS_DIR")


def migrate(database_url: str, up_to: str | None = None) -> int:
    """Apply every pending yoyo migration (or those up to id `up_to`); return how many."""
    from yoyo import get_backend, read_migrations

    logging.getLogger("yoyo").setLevel(logging.WARNING)
    backend = get_backend(_yoyo_url(database_url))
    migrations = read_migrations(str(migrations_dir()))
    if up_to is not None:
        migrations = migrations.filter(lambda m: m.id <= up_to)
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    if pending:
        log.info("applied %d migration(s)", len(pending))
    return len(pending)


def _yoyo_url(database_url: str) -> str:
    # yoyo picks its driver from the scheme; psycopg 3 is the one installed with it here.
    scheme, _, rest = database_url.partition("://")
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg://{rest}"
    return database_url


# What a lost or unreachable database looks like from asyncpg: refused or dropped
# connections (OSError, timeouts included), a server shutting down or starting up
# (57P01 from pg_terminate_backend, 57P03), 08xxx connection errors, and a connection
# that died in the middle of a statement. Clients get `unavailable` for these, not `internal`.
DATABASE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.ConnectionDoesNotExistError,
)
# What else a connection the server dropped can raise: asyncpg's "the underlying connection
# is closed" on a transaction's exit, or a protocol state error when an idle pooled
# connection got the server's farewell (57P01) before it was used.
MAYBE_UNAVAILABLE: tuple[type[BaseException], ...] = (
    *DATABASE_UNAVAILABLE,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
# What a background loop's query may fail with and the loop live on (it tries again
# later): an error PostgreSQL reports, or the database going away.
QUERY_FAILED: tuple[type[BaseException], ...] = (asyncpg.PostgresError, *MAYBE_UNAVAILABLE)


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc`, or the failure it happened while handling, is the database going away."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DATABASE_UNAVAILABLE):
            return True
        if isinstance(seen, asyncpg.InternalClientError) or (
            isinstance(seen, asyncpg.InterfaceError) and "connection is closed" in str(seen)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def create_pool(database_url: str, size: int, timeout: float = 10) -> asyncpg.Pool:
    """A pool whose connects and statements give up after `timeout` seconds.

    It connects when first awaited (`pool = await create_pool(...)`, or `await pool`).
    Without the bounds, a database that stops answering (rather than refusing) would keep
    a send waiting on its socket for as long as TCP takes to notice.
    """
    return asyncpg.create_pool(
        database_url,
        min_size=min(2, size),
        max_size=size,
        reset=_keep_session,
        timeout=timeout,
        command_timeout=timeout,
    )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset query on every release (a round trip each time).

    chatd never changes session state on a pooled connection: no SET, LISTEN, advisory
    locks or open cursors, and transactions always end before release.
    """
