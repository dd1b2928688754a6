"""/healthz says the process lives; /readyz says it can serve (database, and Redis if any)."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import httpx

from tests.conftest import Server, _with_database, start_server, stop_server


async def test_ready_when_the_database_answers(http: httpx.AsyncClient) -> None:
    response = await http.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "database": "ok", "redis": "not configured"}
    assert (await http.get("/healthz")).status_code == 200


async def test_not_ready_without_its_database_but_still_alive(
    database_url: str, tmp_path: Path
) -> None:
    name = f"chatd_readyz_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    server: Server | None = None
    try:
        server = start_server(_with_database(database_url, name), tmp_path)
        # The database goes away (its connections are killed with it).
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 503
            body = ready.json()
            assert body["status"] == "not ready" and body["database"] != "ok"
            assert (await http.get("/healthz")).status_code == 200  # alive, not ready
    finally:
        if server is not None:
            stop_server(server)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
