"""Bench users and chats, made through the REST API exactly as a client would.

Registering and logging in cost an argon2 hash each (tens of ms, with the server bounding
how many run at once), so users are made once per run and, with --reuse-users, kept in a
state file beside the results and only logged in on later runs.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from chatd.protocol import MAX_USERS_PER_CALL

PASSWORD_BYTES = 12
CONCURRENCY = 8  # the server hashes 4 at a time; a few more in flight keep it busy
TOKEN_MAX_AGE = 10 * 60  # access tokens live 15 minutes by default: refresh well before

Progress = Callable[..., None]  # (message, force=False)


class SetupError(Exception):
    """The server refused a setup request (registration, login, chat creation)."""


@dataclass
class User:
    name: str
    email: str
    password: str
    uuid: str
    token: str = field(default="", repr=False)
    token_at: float = 0.0


class State:
    """The users (and seeded history chat) the bench made on one server, kept across runs."""

    def __init__(self, path: Path, base_url: str) -> None:
        self.path = path
        self.base_url = base_url
        self._all: dict[str, Any] = {}
        if path.exists():
            try:
                self._all = json.loads(path.read_text())
            except ValueError:
                self._all = {}
        self.data: dict[str, Any] = self._all.setdefault(base_url, {})

    def users(self, pool: str) -> list[User]:
        return [User(**u) for u in self.data.get("users", {}).get(pool, [])]

    def set_users(self, pool: str, users: list[User]) -> None:
        keep = [
            {k: v for k, v in asdict(u).items() if k not in ("token", "token_at")} for u in users
        ]
        self.data.setdefault("users", {})[pool] = keep
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self._all, indent=1))


async def _post(http: httpx.AsyncClient, path: str, body: dict[str, Any], token: str = "") -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for attempt in range(5):
        response = await http.post(path, json=body, headers=headers)
        if response.status_code < 500:
            break
        await asyncio.sleep(0.2 * (attempt + 1))  # a transient server error: retry a little
    if response.status_code == 429:
        raise SetupError(
            f"POST {path} -> 429 rate_limited: start the chatd to bench with its rate "
            "limits off (CHATD_REGISTER_RATE=off, CHATD_ADD_MEMBERS_RATE=off: see "
            "docs/performance.md), or use --reuse-users"
        )
    if response.is_error:
        raise SetupError(f"POST {path} -> {response.status_code} {response.text[:300]}")
    return response.json()


async def make_users(
    base_url: str,
    count: int,
    state: State,
    pool: str,
    reuse: bool,
    progress: Progress,
) -> list[User]:
    """Return `count` logged-in users: reused from the state file if asked, else registered."""
    known = state.users(pool) if reuse else []
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        if known:
            try:
                await login(http, known[:count], progress, f"logging in {pool} users")
            except SetupError:  # not on this server (any more): make new ones
                progress(f"the kept {pool} users cannot log in: registering new ones", force=True)
                known = []
        if len(known) < count:
            run = secrets.token_hex(4)
            fresh = await _gather(
                [_register(http, f"{pool}-{run}-{i}") for i in range(count - len(known))],
                progress,
                f"registering {pool} users",
            )
            known = known + fresh
            state.set_users(pool, known)
        users = known[:count]
        await login(http, users, progress, f"logging in {pool} users")
    return users


async def login(http: httpx.AsyncClient, users: list[User], progress: Progress, label: str) -> None:
    async def one(user: User) -> User:
        tokens = await _post(http, "/login", {"email": user.email, "password": user.password})
        user.token = tokens["access_token"]
        user.token_at = time.monotonic()
        return user

    stale = [u for u in users if time.monotonic() - u.token_at > TOKEN_MAX_AGE or not u.token]
    await _gather([one(u) for u in stale], progress, label)


async def refresh_tokens(base_url: str, users: list[User], progress: Progress) -> None:
    """Log in again the users whose access token may expire during the next workload."""
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        await login(http, users, progress, "refreshing tokens")


async def _register(http: httpx.AsyncClient, handle: str) -> User:
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    email = f"{handle}@bench.example.com"
    body = await _post(http, "/register", {"name": handle, "email": email, "password": password})
    return User(name=handle, email=email, password=password, uuid=body["user_uuid"])


async def _gather(coros: list[Any], progress: Progress, label: str) -> list[Any]:
    """Run coroutines CONCURRENCY at a time, in order, reporting progress."""
    results: list[Any] = [None] * len(coros)
    gate = asyncio.Semaphore(CONCURRENCY)
    done = 0

    async def run(i: int, coro: Any) -> None:
        nonlocal done
        try:
            async with gate:
                results[i] = await coro
        finally:
            coro.close()  # one cancelled before its turn was never started
        done += 1
        progress(f"{label}: {done}/{len(coros)}")

    tasks = [asyncio.ensure_future(run(i, c)) for i, c in enumerate(coros)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # One failed (a 429, say): stop the rest rather than leave them running.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return results


async def create_chats(
    base_url: str, rooms: list[list[User]], kind: str, name: str, progress: Progress
) -> list[int]:
    """Create one chat per room, owned by its first user; return the chat ids."""
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:

        async def one(i: int, room: list[User]) -> int:
            body: dict[str, Any] = {"type": kind, "user_ids": [u.uuid for u in room[1:]]}
            if kind == "group":
                body["name"] = f"{name} {i}"
            chat = await _post(http, "/chats", body, room[0].token)
            return int(chat["id"])

        return await _gather(
            [one(i, room) for i, room in enumerate(rooms)], progress, f"creating {kind} chats"
        )


async def create_group(
    base_url: str,
    members: list[User],
    name: str,
    progress: Progress,
    per_call: int = MAX_USERS_PER_CALL,
) -> int:
    """One group of every member, owned by the first: created with the first `per_call`
    others, then filled `per_call` at a time (chatd takes no more than a thousand a call)."""
    others = [u.uuid for u in members[1:]]
    chunks = [others[i : i + per_call] for i in range(0, len(others), per_call)]
    token = members[0].token
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        body = {"type": "group", "name": name, "user_ids": chunks[0] if chunks else []}
        chat_id = int((await _post(http, "/chats", body, token))["id"])
        for n, chunk in enumerate(chunks[1:], 2):
            progress(f"filling the group: call {n}/{len(chunks)}")
            await _post(http, f"/chats/{chat_id}/members", {"user_ids": chunk}, token)
    return chat_id
