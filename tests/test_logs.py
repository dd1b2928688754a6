"""Logs: JSON lines by default, each carrying the id of its request or connection."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import websockets

from chatd.client import Api
from tests.conftest import PASSWORD, Server, start_server, stop_server
from tests.test_config import chatd


def json_lines(server: Server) -> list[dict[str, Any]]:
    lines = [line for line in server.log().splitlines() if line.strip()]
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in parsed:
        assert {"ts", "level", "logger", "msg"} <= record.keys(), record
    return parsed


async def wait_for_line(server: Server, match: Any, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = [record for record in json_lines(server) if match(record)]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no matching log line in:\n{server.log()}"
        await asyncio.sleep(0.05)


async def test_http_requests_log_their_request_id(server: Server, http: httpx.AsyncClient) -> None:
    given = await http.get("/healthz", headers={"X-Request-ID": "trace-me.42"})
    assert given.headers["x-request-id"] == "trace-me.42"
    made_up = await http.get("/readyz", headers={"X-Request-ID": "not sane" + "x" * 80})
    generated = made_up.headers["x-request-id"]
    assert not generated.startswith("not") and len(generated) == 12

    line = await wait_for_line(server, lambda r: r.get("request_id") == "trace-me.42")
    assert line["logger"] == "uvicorn.access"
    assert (line["method"], line["status"]) == ("GET", 200)
    await wait_for_line(server, lambda r: r.get("request_id") == generated)


async def test_socket_lines_carry_connection_and_user_and_never_the_token(
    server: Server, alice: Api
) -> None:
    token = alice.access_token
    async with websockets.connect(f"{server.ws_url}?token={token}") as ws:
        json.loads(await ws.recv())  # the unread snapshot
        await ws.send("{not json")
        assert json.loads(await ws.recv())["action"] == "error"

    started = await wait_for_line(
        server, lambda r: r["msg"] == "session started" and r.get("user_id") == alice.user_uuid
    )
    conn = started["conn_id"]
    ended = await wait_for_line(
        server, lambda r: r.get("conn_id") == conn and r["msg"].startswith("session ended")
    )
    assert ended["user_id"] == alice.user_uuid
    assert ended["seconds"] >= 0
    accepted = await wait_for_line(
        server, lambda r: r.get("conn_id") == conn and "[accepted]" in r["msg"]
    )
    assert "token=[redacted]" in accepted["msg"]
    assert token not in server.log()


async def test_console_format_for_development(database_url: str, tmp_path: Path) -> None:
    server = start_server(database_url, tmp_path, CHATD_LOG_FORMAT="console")
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            await http.get("/healthz", headers={"X-Request-ID": "console-1"})
    finally:
        stop_server(server)
    lines = server.log().splitlines()
    assert not any(line.startswith("{") for line in lines), lines
    assert any("INFO chatd: chatd listening on" in line for line in lines), lines
    assert any("/healthz" in line and "[request_id=console-1]" in line for line in lines), lines


def test_a_bad_log_format_is_refused(tmp_path: Path) -> None:
    result = chatd(["migrate"], tmp_path, CHATD_LOG_FORMAT="xml")
    assert result.returncode != 0
    assert "CHATD_LOG_FORMAT must be json or console" in result.stderr


async def test_debug_logs_keep_credentials_out(database_url: str, tmp_path: Path) -> None:
    # At debug level the websockets library logs every handshake header.
    server = start_server(database_url, tmp_path, CHATD_LOG_LEVEL="debug")
    try:
        api = Api(server.base_url)
        email = f"dbg-{time.monotonic_ns()}@example.com"
        await api.register("Dbg", email, PASSWORD)
        await api.login(email, PASSWORD)
        headers = {"Authorization": f"Bearer {api.access_token}", "Cookie": "session=s3cret"}
        async with websockets.connect(server.ws_url, additional_headers=headers) as ws:
            await ws.recv()
        async with websockets.connect(f"{server.ws_url}?%74oken={api.access_token}") as ws:
            await ws.recv()  # a token under a percent-encoded key still authenticates
    finally:
        stop_server(server)
    log = server.log()
    assert api.access_token not in log
    assert api.refresh_token not in log
    assert "s3cret" not in log
    assert "[redacted]" in log
