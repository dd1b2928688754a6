"""Hostile input: property-based tests (hypothesis) against a real server and database.

Every socket action (from the dispatcher table) and every REST operation (from
chatd.rest.OPERATIONS) gets arbitrary JSON, wrong types, numbers beyond int64, 1e400, -0,
NaN, thousands of levels of nesting, NUL, lone surrogates, RTL marks, combining
characters and strings at and past their limits. A new action, route or field is covered
without editing this file. What must hold, whatever the input:

- the reply is a success or an error whose code is in docs/protocol.md's table, never
  `internal` or a 5xx;
- the socket survives: the next valid action on it is answered (or the server closed it
  with a documented code: 1009 for a frame over 64 KiB);
- a rejected request changed nothing (row counts and contents are the same after it);
- the server logs no traceback.

Each bug these tests found is pinned as an explicit @example.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import msgspec
import pytest
import websockets
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chatd import rest
from chatd.client import Api
from chatd.handlers import HANDLERS
from chatd.openapi import Operation
from tests.conftest import ACCOUNT_ENDING, PASSWORD, PUSH_KEYS, SESSION_ENDING, Server

ROOT = Path(__file__).resolve().parent.parent
# Examples near the 64 KiB frame limit make hypothesis warn that their repr is large.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
MAX_FRAME_BYTES = 64 * 1024


def documented_error_codes() -> set[str]:
    """The codes in the table under "## Error codes" in docs/protocol.md."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text.split("## Error codes", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE))


DOCUMENTED_CODES = documented_error_codes() - {"internal"}


# --- hostile JSON ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """A JSON fragment written as is: lets a frame hold what json.dumps cannot write."""

    text: str


def dump(value: Any) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def deep_array(levels: int) -> Raw:
    return Raw("[" * levels + "]" * levels)


def deep_object(levels: int) -> Raw:
    return Raw('{"a":' * levels + "1" + "}" * levels)


NUMBERS = [
    "99999999999999999999999",
    str(2**63),
    str(2**63 - 1),
    str(-(2**63) - 1),
    "-" + "9" * 400,
    "1e400",
    "-1e400",
    "1e-400",
    "-0",
    "-0.0",
    "0",
    "-1",
    "1.5",
    "1E2",
    "NaN",
    "Infinity",
    "-Infinity",
    "0x10",
    "01",
]
STRINGS = [
    r'"\u0000"',
    r'"a\u0000b"',
    r'"\ud800"',
    r'"x\udc00"',
    r'"\udfff\ud800"',
    r'"\ud83d\ude00"',  # a valid pair: 😀
    '"\u202eevil\u202c"',  # RTL override
    '"\u200f\u200e"',
    '"e' + "\u0301" * 200 + '"',  # one letter, many combining marks
    '"\ufeff"',
    '"\u3000 "',
    '""',
    '" "',
    '"\\\\u0000"',  # a backslash and "u0000": text, not a NUL
    '"00000000-0000-0000-0000-000000000000"',
    '"urn:uuid:12345678-1234-5678-1234-567812345678"',
    '"' + "x" * 64 + '"',
    '"' + "x" * 65 + '"',
    '"' + "x" * 100 + '"',
    '"' + "x" * 101 + '"',
    '"' + "x" * 4096 + '"',
    '"' + "x" * 4097 + '"',
    '"' + "\U0001f600" * 4096 + '"',
    '"' + "\u0301" * 4097 + '"',
]
STRUCTURES = [
    deep_array(100),
    deep_array(1_000),
    deep_array(5_000),
    deep_array(20_000),
    deep_object(1_000),
    deep_object(10_000),
    Raw("[]"),
    Raw("{}"),
    Raw("null"),
    Raw("true"),
    Raw("[1, 2, 3]"),
    Raw('{"1": 1}'),
    Raw("[" + ",".join(["1"] * 2000) + "]"),
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
hostile_values = st.one_of(
    st.sampled_from([Raw(n) for n in NUMBERS]),
    st.sampled_from([Raw(s) for s in STRINGS]),
    st.sampled_from(STRUCTURES),
    json_values,
    st.integers(min_value=-(2**80), max_value=2**80),
    st.text(max_size=80),
)

VALID = "valid"  # the field gets a well-formed value that points at real rows
OMIT = "omit"


def plans(names: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """For some of `names`: a hostile value, VALID or OMIT; names left out are VALID."""
    choice = st.one_of(st.just(OMIT), hostile_values)
    return st.fixed_dictionaries({}, optional={name: choice for name in names})


# --- the world the valid values point at -----------------------------------------------------


@dataclass
class World:
    owner: Api
    other: Api
    chat_id: int = 0
    message_id: int = 0
    app_key: str = ""  # an API key with every scope: the /app routes are called with it


_FINGERPRINT = """
SELECT (SELECT count(*) FROM users) AS users,
       (SELECT count(*) FROM refresh_tokens) AS refresh_tokens,
       (SELECT count(*) FROM chats) AS chats,
       (SELECT count(*) FROM messages) AS messages,
       (SELECT md5(coalesce(string_agg(id || ':' || coalesce(name, '') || ':' || last_seq
                                       || ':' || read_seq || ':' || activity, ',' ORDER BY id), ''))
        FROM chats) AS chat_rows,
       (SELECT md5(coalesce(string_agg(chat_id || ':' || user_id || ':' || role || ':' || read_seq,
                                       ',' ORDER BY chat_id, user_id), ''))
        FROM chat_members) AS member_rows
"""

_WORLD_INTACT = """
SELECT count(*) = 2 AND bool_or(user_id = $2 AND role = 'owner')
FROM chat_members WHERE chat_id = $1
"""


class Harness:
    """One event loop for the module: the world's users, a database connection, HTTP."""

    def __init__(self, server: Server, database_url: str) -> None:
        self.server = server
        self.runner = asyncio.Runner()
        self.db: asyncpg.Connection = self.run(asyncpg.connect(database_url))
        self.http = httpx.AsyncClient(base_url=server.base_url, timeout=30)
        self.world = World(self.run(self._user("Owner")), self.run(self._user("Other")))
        self.world.app_key = self.run(self._app_key())
        self.run(self.ensure_world())

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    def close(self) -> None:
        self.run(self.http.aclose())
        self.run(self.db.close())
        self.runner.close()

    async def _user(self, name: str) -> Api:
        api = Api(self.server.base_url)
        email = f"{name.lower()}-{uuid.uuid4().hex[:10]}@example.com"
        await api.register(name, email, PASSWORD)
        await api.login(email, PASSWORD)
        api.email = email  # type: ignore[attr-defined]
        return api

    async def _app_key(self) -> str:
        """An API key with every scope (made by an admin of its own: the world's owner is
        no admin), and the app's chat APP_CHAT with its user APP_USER."""
        admin = await self._user("Admin")
        await self.db.execute(
            "UPDATE users SET role = 'admin' WHERE id = $1", uuid.UUID(admin.user_uuid)
        )
        scopes = ["users", "chats", "messages", "history"]
        key = await admin.call("POST", "/admin/api_keys", json={"name": "H", "scopes": scopes})
        app = Api(self.server.base_url, key["key"])
        body = {"ext_id": APP_CHAT, "name": "App", "members": [APP_USER]}
        await app.call("POST", "/app/chats", json=body)
        await app.aclose()
        await admin.aclose()
        return key["key"]

    async def ensure_world(self) -> None:
        """A group the owner owns with the other user and one message (again, if changed)."""
        w = self.world
        if w.chat_id and await self.db.fetchval(
            _WORLD_INTACT, w.chat_id, uuid.UUID(w.owner.user_uuid)
        ):
            return
        chat = await w.owner.call(
            "POST",
            "/chats",
            json={"type": "group", "name": "World", "user_ids": [w.other.user_uuid]},
        )
        w.chat_id = chat["id"]
        message = await w.owner.call("POST", f"/chats/{w.chat_id}/messages", json={"text": "hi"})
        w.message_id = message["id"]

    async def fingerprint(self) -> dict[str, Any]:
        return dict(await self.db.fetchrow(_FINGERPRINT))


@pytest.fixture(scope="module")
def harness(server: Server, database_url: str) -> Iterator[Harness]:
    h = Harness(server, database_url)
    yield h
    h.close()


@pytest.fixture(autouse=True)
def no_tracebacks(server: Server) -> Iterator[None]:
    start = len(server.log())
    yield
    new = server.log()[start:]
    assert "Traceback" not in new, f"the server logged a traceback:\n{new}"


HYPOTHESIS = settings(
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


# --- the socket ------------------------------------------------------------------------------

ACTIONS = {cls.__struct_config__.tag: cls for cls in HANDLERS}
SOCKET_FIELDS = sorted(
    {f.name for cls in HANDLERS for f in msgspec.structs.fields(cls)}
    | {"request_id", "extra_field"}
)


def valid_socket_value(world: World, name: str) -> Any:
    values = {
        "chat_id": world.chat_id,
        "text": "hello",
        "client_msg_id": str(uuid.uuid4()),
        "message_id": world.message_id,
        "message_ids": [world.message_id],
        "user_ids": [world.other.user_uuid],
        "user_uuid": world.other.user_uuid,
        "type": "group",
        "name": "Team",
        "role": "member",
        "chats": {str(world.chat_id): 0},
        "limit": 10,
        "request_id": "h",
        "emoji": "👍",
        "reason": "spam",
        "for_everyone": False,
        "mentions": [],
        "q": "hello",
    }
    return values.get(name, OMIT)


def socket_frame(world: World, action: str, plan: dict[str, Any]) -> str:
    names = [f.name for f in msgspec.structs.fields(ACTIONS[action])] + [
        "request_id",
        "extra_field",
    ]
    frame: dict[str, Any] = {"action": action}
    for name in names:
        value = plan.get(name, VALID)
        if value == VALID:
            value = valid_socket_value(world, name)
        if value != OMIT:
            frame[name] = value
    return dump(frame)


PROBE = json.dumps({"action": "list_chats", "limit": 1, "request_id": "probe"})


async def exchange(h: Harness, frame: str | bytes, text: bool | None = None) -> None:
    """Send one hostile frame, then a valid one; check the properties on what comes back.

    `text=True` sends bytes as a text frame (so they may be invalid UTF-8), False sends a
    binary frame.
    """
    await h.ensure_world()
    headers = {"Authorization": f"Bearer {h.world.owner.access_token}"}
    async with websockets.connect(h.server.ws_url, additional_headers=headers, max_size=None) as ws:
        first = json.loads(await ws.recv())
        assert first["action"] == "unread_messages"
        before = await h.fingerprint()
        replies = []
        try:
            await ws.send(frame, text=text)
            await ws.send(PROBE)
            async with asyncio.timeout(20):
                while True:
                    reply = json.loads(await ws.recv())
                    if reply.get("request_id") == "probe":
                        assert reply["action"] == "ack", reply
                        break
                    if reply["action"] in ("ack", "error"):
                        replies.append(reply)
        except websockets.ConnectionClosed:
            raw = frame if isinstance(frame, bytes) else frame.encode("utf-8", "surrogatepass")
            if len(raw) > MAX_FRAME_BYTES:
                assert ws.close_code == 1009, (ws.close_code, frame[:300])
                return
            # A text frame must be UTF-8 (RFC 6455): 1007, invalid frame payload data.
            assert text and _not_utf8(raw), (ws.close_code, frame[:300])
            assert ws.close_code == 1007, (ws.close_code, frame[:300])
            return
    assert len(replies) <= 1, replies
    for reply in replies:
        if reply["action"] == "error":
            assert reply["error"]["code"] in DOCUMENTED_CODES, (reply, frame[:300])
            assert reply["error"]["message"]
            assert await h.fingerprint() == before, ("a rejected frame changed rows", frame[:300])


@pytest.mark.parametrize("action", sorted(ACTIONS))
@HYPOTHESIS
@given(plan=plans(SOCKET_FIELDS))
@example(plan={"extra_field": deep_array(5_000)})  # was: RecursionError -> internal
@example(plan={"extra_field": deep_object(10_000)})
@example(plan={"text": Raw(r'"a\u0000b"'), "name": Raw(r'"a\u0000b"')})
@example(plan={"client_msg_id": Raw(r'"\u0000"'), "user_uuid": Raw(r'"\u0000"')})
@example(plan={"user_ids": [Raw(r'"\u0000"')], "request_id": Raw(r'"\u0000"')})
@example(plan={"text": Raw(r'"\ud800"'), "name": Raw(r'"\udc00"')})
@example(plan={"chat_id": Raw("99999999999999999999999"), "message_ids": [Raw(str(2**63))]})
@example(plan={"chats": {str(2**63): 1}, "limit": Raw("1e400")})
@example(plan={"chats": {"1": Raw(str(2**64))}, "message_id": Raw("-0")})
def test_socket_actions_survive_hostile_fields(
    harness: Harness, action: str, plan: dict[str, Any]
) -> None:
    harness.run(exchange(harness, socket_frame(harness.world, action, plan)))


@HYPOTHESIS
@given(frame=st.one_of(hostile_values.map(dump), st.text(max_size=200)))
@example(frame=deep_array(20_000).text)  # was: RecursionError -> internal
@example(frame=deep_object(10_000).text)
@example(frame='{"action": "\\u0000"}')
@example(frame='{"action": "\\ud800", "request_id": "\\ud800"}')
def test_whole_hostile_frames(harness: Harness, frame: str) -> None:
    harness.run(exchange(harness, frame))


def _not_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return True
    return False


@HYPOTHESIS
@given(payload=st.binary(max_size=300), as_text=st.booleans())
@example(payload=b"\xff\xfe", as_text=True)
@example(payload=b'{"action": "typing", "chat_id": 1, "x": "\xed\xa0\x80"}', as_text=False)
def test_arbitrary_bytes(harness: Harness, payload: bytes, as_text: bool) -> None:
    """Binary frames are read as JSON too; a text frame that is not UTF-8 closes with 1007."""
    harness.run(exchange(harness, payload, text=as_text))


@HYPOTHESIS
@given(action=hostile_values)
def test_hostile_action_names(harness: Harness, action: Any) -> None:
    harness.run(exchange(harness, dump({"action": action, "chat_id": 1, "request_id": "h"})))


# --- REST ------------------------------------------------------------------------------------

_PATH_PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")
OPS = {f"{op.method} {op.path}": op for op in rest.OPERATIONS}

PATH_VALUES = [
    "0",
    "-1",
    "1.5",
    "99999999999999999999999",
    str(2**63),
    "9" * 5000,
    "0" * 5000 + "1",
    "abc",
    "%00",
    "%ED%A0%80",  # the UTF-8 bytes of a lone surrogate
    "%FF",
    "%E2%80%AE",
    "%D9%A3",  # ٣, an Arabic-Indic digit
    "00000000-0000-0000-0000-000000000000",
    "%7B12345678-1234-5678-1234-567812345678%7D",
    "x" * 300,
]
QUERY_VALUES = [*PATH_VALUES, "", "%20", "1e3", "%205%20", "1_0", "-0", "50"]
# Only what HTTP allows in a field value: uvicorn itself answers a plain-text 400 to the rest
# (a DEL byte, say) before chatd sees the request.
HEADER_VALUES = [b"", b"x" * 65, b"\xe9\xff", b"\xed\xa0\x80", b"a b", b"k" * 64, b"a\tb"]


def rest_fields(op: Operation) -> list[str]:
    names = [f"path:{n}" for n in _PATH_PARAM.findall(op.path)]
    names += [f"query:{p.name}" for p in op.query]
    names += [f"header:{p.name}" for p in op.headers]
    if op.body is not None:
        names += ["body"] + [f"body.{f.name}" for f in msgspec.structs.fields(op.body)]
    return names


REST_FIELDS = sorted({name for op in rest.OPERATIONS for name in rest_fields(op)})


def rest_plans() -> st.SearchStrategy[dict[str, Any]]:
    path = st.one_of(st.just(OMIT), st.sampled_from(PATH_VALUES))
    query = st.one_of(st.just(OMIT), st.sampled_from(QUERY_VALUES))
    header = st.one_of(st.just(OMIT), st.sampled_from(HEADER_VALUES))
    body = st.one_of(
        st.just(OMIT),
        hostile_values,
        st.sampled_from([Raw(""), Raw("not json"), Raw("{"), Raw("\xff")]),
    )
    field = st.one_of(st.just(OMIT), hostile_values)
    kinds = {"path": path, "query": query, "header": header, "body": body}
    optional = {
        name: kinds.get(name.split(":")[0], field) if "." not in name else field
        for name in REST_FIELDS
    }
    return st.fixed_dictionaries({}, optional=optional)


APP_CHAT = f"hostile-{uuid.uuid4().hex[:8]}"  # the app's chat, by its ext_id
APP_USER = f"hostile-user-{uuid.uuid4().hex[:8]}"


def valid_rest_value(world: World, name: str) -> Any:
    values = {
        # The app API: the app's chat and user, a new chat or user, no such key.
        "path:ext_id": APP_CHAT,
        "path:key_id": str(uuid.uuid4()),
        "body.users": [{"sub": f"hostile-{uuid.uuid4().hex[:10]}", "name": "H"}],
        "body.subs": [f"hostile-{uuid.uuid4().hex[:10]}"],
        "body.ext_id": f"hostile-{uuid.uuid4().hex[:10]}",
        "body.members": [APP_USER],
        "body.client_msg_id": str(uuid.uuid4()),
        "body.as_user": APP_USER,
        "body.scopes": ["history"],
        "body.events": [],
        "path:chat_id": str(world.chat_id),
        "path:message_id": str(world.message_id),
        "path:user_uuid": world.other.user_uuid,
        "path:emoji": quote("👍"),
        "path:file_id": str(uuid.uuid4()),  # no such file: 404, and nothing changes
        "query:for_everyone": "false",
        "header:Idempotency-Key": str(uuid.uuid4()).encode(),
        "body.name": "Hostile",
        "body.email": f"hostile-{uuid.uuid4().hex[:10]}@example.com",
        "body.password": PASSWORD,
        "body.type": "group",
        "body.user_ids": [world.other.user_uuid],
        "body.role": "member",
        "body.text": "hello",
        "body.up_to": world.message_id,
        "body.chat_id": world.chat_id,
        "body.message_id": world.message_id,
        "body.refresh_token": "not.a.token",
        # Never the password: a fuzzed `new` must not lock the world's owner out.
        "body.current": "not the password",
        "body.new": PASSWORD,
        "path:session_id": str(uuid.uuid4()),
        "body.reason": "spam",
        # Bots and tokens: no such bot or token (404, nothing changes), or a fresh one.
        "path:bot_id": str(2**62),
        "path:token_id": str(uuid.uuid4()),
        "body.username": f"hostile_{uuid.uuid4().hex[:12]}",
        "body.commands": [{"name": "hostile", "description": "x"}],
        "path:webhook_id": str(2**62),
        "path:secret": "not-the-secret",
        "query:q": "hello",
        "body.endpoint": "https://93.184.215.14/push/hostile",
        "body.keys": PUSH_KEYS,
    }
    return values.get(name, OMIT)


def rest_request(
    world: World, op: Operation, plan: dict[str, Any], token: str | None = None
) -> tuple[str, dict, bytes]:
    def value(name: str) -> Any:
        chosen = plan.get(name, VALID)
        return valid_rest_value(world, name) if chosen == VALID else chosen

    def path_value(match: re.Match[str]) -> str:
        chosen = value(f"path:{match[1]}")
        return "" if chosen == OMIT else chosen

    url = _PATH_PARAM.sub(path_value, op.path)
    query = []
    for p in op.query:
        chosen = value(f"query:{p.name}")
        if chosen != OMIT:
            query.append(f"{quote(p.name)}={chosen}")
    if query:
        url += "?" + "&".join(query)
    headers = {"content-type": "application/json"}
    if op.auth:
        headers["authorization"] = f"Bearer {token or world.owner.access_token}"
    for p in op.headers:
        chosen = value(f"header:{p.name}")
        if chosen != OMIT:
            headers[p.name] = chosen
    body = b""
    if op.body is not None:
        whole = value("body")
        if whole != OMIT:
            body = dump(whole).encode("utf-8", "surrogatepass")
        else:
            fields = {}
            for f in msgspec.structs.fields(op.body):
                chosen = value(f"body.{f.name}")
                if chosen != OMIT:
                    fields[f.name] = chosen
            body = dump(fields).encode("utf-8", "surrogatepass")
    return url, headers, body


async def call_rest(h: Harness, op: Operation, plan: dict[str, Any]) -> None:
    await h.ensure_world()
    token = None
    key = f"{op.method} {op.path}"
    if key in SESSION_ENDING:  # a session of its own to end
        fresh = Api(h.server.base_url)
        await fresh.login(h.world.owner.email, PASSWORD)  # type: ignore[attr-defined]
        await fresh.aclose()
        token = fresh.access_token
    elif key in ACCOUNT_ENDING:  # an account of its own to end
        token = (await h._user("Gone")).access_token
    elif op.path.startswith("/app/"):  # the app API answers an API key only
        token = h.world.app_key
    url, headers, body = rest_request(h.world, op, plan, token)
    before = await h.fingerprint()
    response = await h.http.request(op.method, url, headers=headers, content=body or None)
    context = (op.method, url[:200], body[:200], response.status_code, response.text[:300])
    assert response.status_code < 500 or op.path == "/readyz", context
    if response.status_code >= 400:
        assert response.json()["error"]["code"] in DOCUMENTED_CODES, context
        assert await h.fingerprint() == before, ("a rejected request changed rows", *context)


@pytest.mark.parametrize("op_key", sorted(OPS))
@HYPOTHESIS
@given(plan=rest_plans())
@example(plan={"body": deep_array(5_000)})  # was: RecursionError -> 500
@example(plan={"body.email": Raw(r'"a\u0000@example.com"')})  # was: asyncpg error -> 500
@example(plan={"body.name": Raw(r'"\u0000"'), "body.user_ids": [Raw(r'"\u0000"')]})
@example(plan={"body.password": Raw(r'"\u0000\u0000\u0000\u0000\u0000\u0000\u0000\u0000"')})
@example(plan={"body.refresh_token": Raw(r'"\u0000"'), "body.text": Raw(r'"\ud800"')})
@example(plan={"path:chat_id": "9" * 5000, "path:message_id": "9" * 5000})  # was: 500
@example(plan={"path:chat_id": "0" * 5000 + "1", "path:message_id": "0" * 5000 + "1"})
@example(plan={"path:user_uuid": "%00", "query:after": "%00", "query:q": "%00"})
@example(plan={"query:limit": "9" * 5000, "query:before": str(2**63), "query:page": "%D9%A3"})
def test_rest_operations_survive_hostile_input(
    harness: Harness, op_key: str, plan: dict[str, Any]
) -> None:
    harness.run(call_rest(harness, OPS[op_key], plan))


def test_every_required_field_has_a_valid_value(harness: Harness) -> None:
    """Without one, every frame of that action fails decoding and its handler is never fuzzed:
    give a new action's or route's required fields a value in valid_socket_value/valid_rest_value.
    """
    world = harness.world
    for cls in HANDLERS:
        for f in msgspec.structs.fields(cls):
            if f.required:
                assert valid_socket_value(world, f.name) != OMIT, (cls.__name__, f.name)
    for op in rest.OPERATIONS:
        for name in rest_fields(op):
            if name.startswith("path:"):
                assert valid_rest_value(world, name) != OMIT, (op.path, name)
        if op.body is not None:
            for f in msgspec.structs.fields(op.body):
                if f.required:
                    assert valid_rest_value(world, f"body.{f.name}") != OMIT, (op.path, f.name)
    assert "internal" not in DOCUMENTED_CODES and {"bad_request", "invalid"} <= DOCUMENTED_CODES


@pytest.mark.parametrize("chunked", [False, True])
async def test_rest_bodies_over_64_kib_are_refused_with_413(
    server: Server, make_user: Any, chunked: bool
) -> None:
    """Announced (Content-Length) or not (chunked), a big body is refused, not buffered."""
    api = await make_user("Big")
    body = json.dumps({"text": "x" * 200_000}).encode()

    async def chunks() -> Any:
        for start in range(0, len(body), 16_384):
            yield body[start : start + 16_384]

    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        response = await http.post(
            "/chats/1/messages",
            headers={"authorization": f"Bearer {api.access_token}"},
            content=chunks() if chunked else body,
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "invalid"


# --- tokens ----------------------------------------------------------------------------------


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


claim_values = st.one_of(
    json_values,
    st.sampled_from(["access", "refresh", str(uuid.uuid4()), 2**70, -1, "1e400", 10**20]),
)
signed_tokens = st.fixed_dictionaries(
    {},
    optional={"sub": claim_values, "typ": claim_values, "exp": claim_values, "iat": claim_values},
)
header_safe_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=300
)


@HYPOTHESIS
@given(claims=signed_tokens, garbage=header_safe_text, signed=st.booleans())
@example(claims={"sub": {"a": 1}, "typ": "access", "exp": 2**40}, garbage="", signed=True)
@example(claims={"sub": str(uuid.uuid4()), "typ": "access", "exp": "soon"}, garbage="", signed=True)
@example(claims={"sub": "\u0000", "typ": "access", "exp": 2**70}, garbage="", signed=True)
@example(claims={}, garbage="Bearer \xff\xfe", signed=False)
@example(
    claims={"sub": str(uuid.uuid4()), "typ": "access", "exp": float("inf")}, garbage="", signed=True
)
def test_hostile_tokens_are_401_and_1008(
    harness: Harness, claims: dict[str, Any], garbage: str, signed: bool
) -> None:
    """Correctly signed tokens with odd claims, and garbage: refused, never a crash."""
    import jwt

    token = jwt.encode(claims, harness.server.secret, "HS256") if signed else garbage
    exp, sub = claims.get("exp"), claims.get("sub")
    # A well-formed access token of a user that does not exist: the socket opens (and can do
    # nothing, see test_socket.py), /me says 401.
    well_formed = (
        signed
        and claims.get("typ") == "access"
        and isinstance(exp, int | float)
        and not isinstance(exp, bool)
        and time.time() < exp < float("inf")
        and isinstance(sub, str)
        and _is_uuid(sub)
    )

    async def check() -> None:
        header = f"Bearer {token}".strip().encode("latin-1")
        response = await harness.http.get("/me", headers={"authorization": header})
        assert response.status_code == 401, (claims, garbage, response.text)
        assert response.json()["error"]["code"] == "unauthorized"
        url = f"{harness.server.ws_url}?token={quote(token, safe='')}"
        async with websockets.connect(url) as ws:
            if well_formed:
                assert json.loads(await ws.recv())["action"] == "unread_messages"
                return
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
        assert ws.close_code == 1008, (claims, garbage)

    harness.run(check())


# --- the app's tokens (external identity, tests/idp.py) ------------------------------------

app_claim_values = st.one_of(
    json_values,
    st.sampled_from(["", "x" * 300, "\u0000", "\ud800", 2**70, -1, 10**20, float("inf")]),
)
app_headers = st.fixed_dictionaries(
    {"alg": st.sampled_from(["RS256", "ES256", "HS256", "none", "PS256", "HS512", "", "RS2560"])},
    optional={"kid": app_claim_values, "typ": app_claim_values, "jku": app_claim_values},
)
app_claims = st.fixed_dictionaries(
    {},
    optional={
        k: app_claim_values for k in ("iss", "aud", "sub", "exp", "nbf", "iat", "name", "picture")
    },
)


@HYPOTHESIS
@given(header=app_headers, claims=app_claims, key=st.sampled_from(["rsa", "ec", "secret"]))
@example(header={"alg": "HS256", "kid": "x"}, claims={"sub": {"a": 1}}, key="secret")
@example(header={"alg": "RS256", "kid": ["k"]}, claims={}, key="rsa")
@example(header={"alg": "none"}, claims={"sub": "x", "aud": "chatd", "exp": 2**40}, key="rsa")
@example(
    header={"alg": "HS256"}, claims={"sub": "\u0000", "aud": "chatd", "exp": 2**40}, key="secret"
)
@example(
    header={"alg": "HS256"}, claims={"sub": "\ud800", "aud": "chatd", "exp": 2**40}, key="secret"
)
def test_hostile_app_tokens(
    harness: Harness, idp: Any, header: dict[str, Any], claims: dict[str, Any], key: str
) -> None:
    """Tokens that say they are the app's (its issuer, mostly) with odd headers and
    claims, signed by the provider's keys or the shared secret or by hand: 200 only for a
    good one, 401 (1008) for the rest, never a crash; a refused one creates nobody."""
    from tests.idp import AUDIENCE, ISSUER, SHARED_SECRET, hand_signed

    body = {"iss": ISSUER, **claims}
    signing_key = {"rsa": idp.key("RS256"), "ec": idp.key("ES256"), "secret": None}[key]
    if (
        header["alg"] in ("RS256", "ES256")
        and signing_key is not None
        and (signing_key.algorithm == header["alg"])
    ):
        token = jwt_encode(body, signing_key.private, header)
    elif header["alg"] == "HS256" and key == "secret":
        token = jwt_encode(body, SHARED_SECRET, header)
    else:
        token = hand_signed(header, body, None if header["alg"] == "none" else b"k" * 32)
    good = (
        header["alg"] in ("RS256", "ES256", "HS256")
        and (header["alg"] == "HS256" or header.get("kid") == getattr(signing_key, "kid", None))
        and body.get("iss") == ISSUER
        and (
            body.get("aud") == AUDIENCE
            or (isinstance(body.get("aud"), list) and AUDIENCE in body["aud"])
        )
        and isinstance(body.get("sub"), str)
        and 0 < len(body["sub"]) <= 255
        and body["sub"].isprintable()
        and isinstance(body.get("exp"), int)
        and time.time() < body["exp"]
    )

    async def check() -> None:
        before = await harness.fingerprint()
        header_value = f"Bearer {token}".encode("latin-1", "replace")
        response = await harness.http.get("/me", headers={"authorization": header_value})
        assert response.status_code in (200, 401), response.text
        if response.status_code == 401:
            assert response.json()["error"]["code"] == "unauthorized"
            assert await harness.fingerprint() == before
        elif not good:
            pytest.fail(f"accepted: {header} {body}")

    harness.run(check())


def jwt_encode(claims: dict[str, Any], key: Any, header: dict[str, Any]) -> str:
    import jwt

    extra = {k: v for k, v in header.items() if k != "alg"}
    try:
        return jwt.encode(claims, key, header["alg"], headers=extra)
    except (TypeError, ValueError, jwt.PyJWTError):  # one PyJWT will not write: by hand
        from tests.idp import hand_signed

        return hand_signed(header, claims, None)
