"""What a newcomer hits first: GET /, curl-friendly JSON, the README's example commands
on another port, and which secret a restored database needs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from chatd.client import Api, ChatdError
from tests.conftest import PASSWORD, ROOT, Server, start_server, stop_server

README = (ROOT / "README.md").read_text()
README_PORT = "http://127.0.0.1:9000"  # the README's example of "another port"


async def test_the_root_redirects_to_the_web_client(http: httpx.AsyncClient) -> None:
    res = await http.get("/")
    assert res.status_code in (302, 303, 307, 308)
    assert httpx.URL(str(http.base_url)).join(res.headers["location"]).path == "/chat"
    page = await http.get("/", follow_redirects=True)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


async def test_every_json_body_ends_with_a_newline(http: httpx.AsyncClient, alice: Api) -> None:
    auth = {"Authorization": f"Bearer {alice.access_token}"}
    responses = [
        await http.get("/healthz"),
        await http.get("/readyz"),
        await http.get("/openapi.json"),
        await http.get("/me", headers=auth),
        await http.get("/users_list", headers=auth),
        await http.get("/chats", headers=auth),
        await http.post(
            "/register",
            json={"name": "x", "email": f"{uuid.uuid4().hex}@e.com", "password": PASSWORD},
        ),
        await http.get("/me"),  # 401
        await http.get("/no/such/route"),  # 404 from the router
        await http.delete("/healthz"),  # 405
        await http.post("/login", content=b"{not json"),  # 400
        await http.post("/login", json={"email": "x"}),  # 422
    ]
    statuses = {res.status_code for res in responses}
    assert {200, 201, 400, 401, 404, 405, 422} <= statuses
    for res in responses:
        assert res.headers["content-type"].startswith("application/json"), res.request.url
        assert res.content.endswith(b"}\n"), (res.request.url, res.content[-40:])
        res.json()  # and it is still one JSON document


def readme_command(script: str) -> list[str]:
    """The README's shell command that runs `script` against another port, as argv.

    Its `VAR=value` prefix becomes part of the environment given back first, as `env` does.
    """
    joined = README.replace("\\\n", " ")
    lines = [ln for ln in joined.splitlines() if script in ln and README_PORT in ln]
    assert lines, f"README.md shows no command running {script} against another port"
    return ["env", *shlex.split(lines[0])]


def adapt(argv: list[str], replacements: dict[str, str]) -> list[str]:
    def one(arg: str) -> str:
        for old, new in replacements.items():
            arg = arg.replace(old, new)
        return arg

    return [one(a) for a in argv]


async def wait_for_line(process: subprocess.Popen[str], pattern: str, timeout: float) -> str:
    """The first line of `process`'s stdout matching `pattern` (read in a thread)."""
    assert process.stdout is not None

    def read() -> str:
        for line in process.stdout:  # type: ignore[union-attr]
            if re.search(pattern, line):
                return line
        return ""

    line = await asyncio.wait_for(asyncio.to_thread(read), timeout)
    assert line, f"{process.args} exited without printing {pattern!r}"
    return line


@contextlib.contextmanager
def running(argv: list[str]) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def test_the_readme_example_commands_reach_a_chatd_on_another_port(
    server: Server, alice: Api
) -> None:
    assert not server.base_url.endswith(":8000")
    bot_email = f"bot-{uuid.uuid4().hex[:10]}@example.com"
    bot = Api(server.base_url)
    await bot.register("Echo", bot_email, "botpassword")
    await bot.login(bot_email, "botpassword")
    chat = await alice.call("POST", "/chats", json={"type": "private", "user_ids": [bot.user_uuid]})
    replace = {
        README_PORT: server.base_url,
        "bot@example.com": bot_email,
        "alice@example.com": alice.email,  # type: ignore[attr-defined]
        "wonderland": PASSWORD,
        ".venv/bin/python": sys.executable,
    }
    echo = adapt(readme_command("examples/echo_bot.py"), replace)
    tail = adapt(readme_command("examples/tail.py"), replace)
    tail[tail.index("--chat") + 1] = str(chat["id"])

    with running(echo) as bot_process, running(tail) as tail_process:
        await wait_for_line(bot_process, "echo bot running", 60)
        await wait_for_line(tail_process, r"^-- ", 60)  # it has the chat and follows it
        await alice.call("POST", f"/chats/{chat['id']}/messages", json={"text": "ping"})
        assert "Echo: echo: ping" in await wait_for_line(tail_process, "echo: ping", 60)


async def test_existing_tokens_stay_valid_only_under_the_same_secret(
    database_url: str, tmp_path: Path, server: Server, alice: Api
) -> None:
    """What docs/operations.md says of a restore: another CHATD_SECRET logs everyone out."""
    assert "same `CHATD_SECRET`" in (ROOT / "docs" / "operations.md").read_text()
    other = start_server(database_url, tmp_path, CHATD_SECRET="another-secret-" + "y" * 40)
    try:
        stranger = Api(other.base_url, alice.access_token)
        stranger.refresh_token = alice.refresh_token
        for call in (stranger.me, stranger.refresh):
            with pytest.raises(ChatdError) as refused:
                await call()
            assert refused.value.status == 401
        # The password is in the database, so logging in again works.
        await stranger.login(alice.email, PASSWORD)  # type: ignore[attr-defined]
        assert (await stranger.me())["user_uuid"] == alice.user_uuid
    finally:
        stop_server(other)
    same = Api(server.base_url, alice.access_token)  # the session's server: the same secret
    assert (await same.me())["user_uuid"] == alice.user_uuid


def test_chatd_version_names_the_installed_version() -> None:
    from importlib.metadata import version

    result = subprocess.run(
        [sys.executable, "-m", "chatd", "--version"],
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert result.returncode == 0
    assert result.stdout.strip() == f"chatd {version('chatd')}"
