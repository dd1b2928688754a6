"""The authorization matrix: every socket action and every REST route, against every actor.

The rows are keyed by the dispatcher table (chatd.handlers.HANDLERS) and by
chatd.rest.OPERATIONS: adding an action or a route without a row here fails
test_every_action_and_route_has_a_row. docs/security.md shows the same matrix.

Actors, on a group with an owner, a plain member, a member to act on (`target`) and a
message, from which `removed` was removed:

- outsider: never a member. removed: was one. Both get `not_found` for anything of the
  chat, and learn nothing: the reply is identical (but for request_id) to the reply for a
  chat or message id that does not exist.
- member: a plain member. Admin and owner actions are `forbidden` (membership is known to
  them); the rest works.
- expired access token, refresh token used as an access token, a token signed with another
  key, no token: REST answers 401 `unauthorized`; /connect closes the socket with 1008
  before any action runs.

Every refused attempt must leave the chat as it was.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets
from PIL import Image

from chatd import rest
from chatd.client import Api
from chatd.handlers import HANDLERS
from tests.conftest import ACCOUNT_ENDING, PASSWORD, PUSH_KEYS, SESSION_ENDING, Server
from tests.idp import IdentityProvider, hand_signed, new_key

NF = "not_found"  # and the reply is the same as for an id that does not exist
FORBIDDEN = "forbidden"
OK = "ok"
NF_ENTRY = "not_found entry"  # sync: an ack whose entry for the chat says not_found
TOKEN_ACTORS = (
    "expired",
    "refresh",
    "wrong_key",
    "none",
    # The app's tokens (external identity, tests/idp.py): the session's server accepts
    # the provider's, but not these.
    "app_expired",
    "app_foreign_issuer",
    "app_alg_none",
    "app_key_confusion",
    "app_unknown_key",
)


@dataclass(frozen=True)
class Ids:
    """What a request points at."""

    chat_id: int
    message_id: int  # the member's
    owners_message_id: int  # the owner's: the member may not delete it for everyone
    target_uuid: str  # a plain member of the chat, for the member-management rows
    other_uuid: str  # a user who is not in the chat, for add_members and create_chat
    file_id: str  # an image the member uploaded and attached to their message
    bot_id: int = 0  # the owner's bot, a member of the chat
    webhook_id: int = 0  # an incoming webhook the owner made for the chat


# A public https endpoint (an address literal: nothing to resolve) and a real P-256 key.
PUSH_SUBSCRIPTION = {
    "endpoint": "https://93.184.215.14/push/authorization-matrix",
    "keys": PUSH_KEYS,
}


@dataclass(frozen=True)
class Row:
    request: Callable[[Ids], Any]  # socket: the frame's fields; REST: (path, json body)
    outsider: str
    removed: str
    member: str


# --- the matrix ------------------------------------------------------------------------------

SOCKET_MATRIX: dict[str, Row] = {
    "create_chat": Row(
        lambda i: {"type": "group", "name": "Mine", "user_ids": [i.other_uuid]}, OK, OK, OK
    ),
    "list_chats": Row(lambda i: {}, OK, OK, OK),
    "get_chat": Row(lambda i: {"chat_id": i.chat_id}, NF, NF, OK),
    "send_message": Row(lambda i: {"chat_id": i.chat_id, "text": "hi"}, NF, NF, OK),
    "get_message": Row(lambda i: {"message_id": i.message_id}, NF, NF, OK),
    "sync": Row(lambda i: {"chats": {str(i.chat_id): 0}}, NF_ENTRY, NF_ENTRY, OK),
    "mark_read": Row(lambda i: {"message_ids": [i.message_id]}, NF, NF, OK),
    "typing": Row(lambda i: {"chat_id": i.chat_id}, NF, NF, OK),
    "add_members": Row(
        lambda i: {"chat_id": i.chat_id, "user_ids": [i.other_uuid]}, NF, NF, FORBIDDEN
    ),
    "remove_member": Row(
        lambda i: {"chat_id": i.chat_id, "user_uuid": i.target_uuid}, NF, NF, FORBIDDEN
    ),
    "leave_chat": Row(lambda i: {"chat_id": i.chat_id}, NF, NF, OK),
    "rename_chat": Row(lambda i: {"chat_id": i.chat_id, "name": "Taken"}, NF, NF, FORBIDDEN),
    "update_chat": Row(lambda i: {"chat_id": i.chat_id, "name": "Taken"}, NF, NF, FORBIDDEN),
    "set_role": Row(
        lambda i: {"chat_id": i.chat_id, "user_uuid": i.target_uuid, "role": "admin"},
        NF,
        NF,
        FORBIDDEN,
    ),
    "delete_chat": Row(lambda i: {"chat_id": i.chat_id}, NF, NF, FORBIDDEN),
    "edit_message": Row(lambda i: {"message_id": i.message_id, "text": "y"}, NF, NF, OK),
    "delete_message": Row(lambda i: {"message_id": i.owners_message_id}, NF, NF, FORBIDDEN),
    "react": Row(lambda i: {"message_id": i.message_id, "emoji": "👍"}, NF, NF, OK),
    "unreact": Row(lambda i: {"message_id": i.message_id, "emoji": "👍"}, NF, NF, OK),
    "forward_message": Row(
        lambda i: {"message_id": i.owners_message_id, "chat_id": i.chat_id}, NF, NF, OK
    ),
    "pin_message": Row(lambda i: {"message_id": i.message_id}, NF, NF, FORBIDDEN),
    "unpin_message": Row(lambda i: {"chat_id": i.chat_id}, NF, NF, FORBIDDEN),
    # Your own block list: nobody else's chat or list is touched.
    "block_user": Row(lambda i: {"user_uuid": i.target_uuid}, OK, OK, OK),
    "unblock_user": Row(lambda i: {"user_uuid": i.target_uuid}, OK, OK, OK),
    "report_message": Row(lambda i: {"message_id": i.message_id, "reason": "spam"}, NF, NF, OK),
    "search_messages": Row(lambda i: {"q": "hi", "chat_id": i.chat_id}, NF, NF, OK),
    # Users the caller shares no chat with are left out of the answer.
    "get_presence": Row(lambda i: {"user_ids": [i.target_uuid]}, OK, OK, OK),
    "set_notifications": Row(lambda i: {"chat_id": i.chat_id, "notify": "none"}, NF, NF, OK),
}

# Routes anyone may call: no token is needed, and a bad one is not looked at.
PUBLIC_ROUTES = {
    "POST /register",
    "POST /login",
    "POST /token/refresh",
    "GET /healthz",
    "GET /readyz",
    "POST /hooks/{webhook_id:int}/{secret}",  # the URL's secret is the credential
    "GET /push/vapid_public_key",  # a public key: browsers subscribe with it
}

# Bots and tokens (chatd/handlers/bots.py). A bot is its owner's alone: anyone else (the
# member too) gets not_found, as for a bot that does not exist. Everyone may make bots and
# tokens of their own; someone else's token id is as unknown as none.
# The app API (issue 19): API keys are the server admins' to make (forbidden to anyone
# else, ADMIN_ROWS for an admin), and /app answers API keys only (tests/test_app_api.py):
# every login is refused with 403 before anything is looked at.
APP_ROWS: dict[str, Row] = {
    "POST /admin/api_keys": Row(
        lambda i: ("/admin/api_keys", {"name": "K", "scopes": ["users"]}),
        FORBIDDEN,
        FORBIDDEN,
        FORBIDDEN,
    ),
    "GET /admin/api_keys": Row(
        lambda i: ("/admin/api_keys", None), FORBIDDEN, FORBIDDEN, FORBIDDEN
    ),
    "DELETE /admin/api_keys/{key_id}": Row(
        lambda i: (f"/admin/api_keys/{uuid.UUID(int=i.chat_id)}", None),
        FORBIDDEN,
        FORBIDDEN,
        FORBIDDEN,
    ),
    "POST /app/users": Row(
        lambda i: ("/app/users", {"users": [{"sub": "u1"}]}), FORBIDDEN, FORBIDDEN, FORBIDDEN
    ),
    "POST /app/users/deactivate": Row(
        lambda i: ("/app/users/deactivate", {"subs": ["u1"]}), FORBIDDEN, FORBIDDEN, FORBIDDEN
    ),
    "POST /app/chats": Row(
        lambda i: ("/app/chats", {"ext_id": "e1", "name": "E", "members": ["u1"]}),
        FORBIDDEN,
        FORBIDDEN,
        FORBIDDEN,
    ),
    "GET /app/chats/{ext_id}": Row(
        lambda i: (f"/app/chats/e{i.chat_id}", None), FORBIDDEN, FORBIDDEN, FORBIDDEN
    ),
    "POST /app/chats/{ext_id}/members": Row(
        lambda i: (f"/app/chats/e{i.chat_id}/members", {"subs": ["u1"]}),
        FORBIDDEN,
        FORBIDDEN,
        FORBIDDEN,
    ),
    "DELETE /app/chats/{ext_id}/members": Row(
        lambda i: (f"/app/chats/e{i.chat_id}/members", {"subs": ["u1"]}),
        FORBIDDEN,
        FORBIDDEN,
        FORBIDDEN,
    ),
    "POST /app/chats/{ext_id}/messages": Row(
        lambda i: (f"/app/chats/e{i.chat_id}/messages", {"text": "x", "client_msg_id": "c"}),
        FORBIDDEN,
        FORBIDDEN,
        FORBIDDEN,
    ),
    "GET /app/chats/{ext_id}/messages": Row(
        lambda i: (f"/app/chats/e{i.chat_id}/messages", None), FORBIDDEN, FORBIDDEN, FORBIDDEN
    ),
}

BOT_ROWS: dict[str, Row] = {
    "POST /bots": Row(
        lambda i: ("/bots", {"name": "B", "username": f"b_{uuid.uuid4().hex[:12]}"}), OK, OK, OK
    ),
    "GET /bots": Row(lambda i: ("/bots", None), OK, OK, OK),
    "GET /bots/{bot_id:int}": Row(lambda i: (f"/bots/{i.bot_id}", None), NF, NF, NF),
    "PATCH /bots/{bot_id:int}": Row(lambda i: (f"/bots/{i.bot_id}", {"name": "Taken"}), NF, NF, NF),
    "DELETE /bots/{bot_id:int}": Row(lambda i: (f"/bots/{i.bot_id}", None), NF, NF, NF),
    "POST /bots/{bot_id:int}/tokens": Row(
        lambda i: (f"/bots/{i.bot_id}/tokens", {"name": "stolen"}), NF, NF, NF
    ),
    "GET /bots/{bot_id:int}/tokens": Row(lambda i: (f"/bots/{i.bot_id}/tokens", None), NF, NF, NF),
    "DELETE /bots/{bot_id:int}/tokens/{token_id}": Row(
        lambda i: (f"/bots/{i.bot_id}/tokens/{uuid.UUID(int=i.chat_id)}", None), NF, NF, NF
    ),
    "PUT /bots/{bot_id:int}/commands": Row(
        lambda i: (f"/bots/{i.bot_id}/commands", {"commands": [{"name": "x"}]}), NF, NF, NF
    ),
    "GET /bots/{bot_id:int}/commands": Row(
        lambda i: (f"/bots/{i.bot_id}/commands", None), NF, NF, NF
    ),
    "GET /chats/{chat_id:int}/commands": Row(
        lambda i: (f"/chats/{i.chat_id}/commands", None), NF, NF, OK
    ),
    "GET /bots/{bot_id:int}/deliveries": Row(
        lambda i: (f"/bots/{i.bot_id}/deliveries", None), NF, NF, NF
    ),
    # Incoming webhooks: any member makes one; its creator and admins delete it.
    "POST /chats/{chat_id:int}/webhooks": Row(
        lambda i: (f"/chats/{i.chat_id}/webhooks", {"name": "CI"}), NF, NF, OK
    ),
    "GET /chats/{chat_id:int}/webhooks": Row(
        lambda i: (f"/chats/{i.chat_id}/webhooks", None), NF, NF, OK
    ),
    "DELETE /chats/{chat_id:int}/webhooks/{webhook_id:int}": Row(
        lambda i: (f"/chats/{i.chat_id}/webhooks/{i.webhook_id}", None), NF, NF, FORBIDDEN
    ),
    "POST /me/tokens": Row(lambda i: ("/me/tokens", {"name": "script"}), OK, OK, OK),
    "GET /me/tokens": Row(lambda i: ("/me/tokens", None), OK, OK, OK),
    "DELETE /me/tokens/{token_id}": Row(
        lambda i: (f"/me/tokens/{uuid.UUID(int=i.chat_id)}", None), NF, NF, NF
    ),
}

REST_MATRIX: dict[str, Row] = {
    "GET /me": Row(lambda i: ("/me", None), OK, OK, OK),
    "PATCH /me": Row(lambda i: ("/me", {"name": "Renamed"}), OK, OK, OK),
    "POST /me/password": Row(
        lambda i: ("/me/password", {"current": PASSWORD, "new": PASSWORD}), OK, OK, OK
    ),
    "GET /me/sessions": Row(lambda i: ("/me/sessions", None), OK, OK, OK),
    # Only your own sessions can be signed out: anyone else's is as unknown as none.
    "DELETE /me/sessions/{session_id}": Row(
        lambda i: (f"/me/sessions/{uuid.UUID(int=i.chat_id)}", None), NF, NF, NF
    ),
    "POST /logout": Row(lambda i: ("/logout", None), OK, OK, OK),
    "DELETE /me": Row(lambda i: ("/me", {"password": PASSWORD}), OK, OK, OK),
    "GET /me/export": Row(lambda i: ("/me/export", None), OK, OK, OK),
    "POST /messages/{message_id:int}/report": Row(
        lambda i: (f"/messages/{i.message_id}/report", {"reason": "spam"}), NF, NF, OK
    ),
    # The server's admin API: forbidden to everyone without the admin role (ADMIN_ROWS:
    # what an admin gets).
    "GET /admin/users": Row(lambda i: ("/admin/users", None), FORBIDDEN, FORBIDDEN, FORBIDDEN),
    "POST /admin/users": Row(
        lambda i: (
            "/admin/users",
            {"name": "N", "email": f"n-{uuid.uuid4().hex}@example.com", "password": PASSWORD},
        ),
        FORBIDDEN,
        FORBIDDEN,
        FORBIDDEN,
    ),
    "PATCH /admin/users/{user_uuid}": Row(
        lambda i: (f"/admin/users/{i.other_uuid}", {"role": "user"}),
        FORBIDDEN,
        FORBIDDEN,
        FORBIDDEN,
    ),
    "DELETE /admin/users/{user_uuid}": Row(
        lambda i: (f"/admin/users/{uuid.UUID(int=i.chat_id)}", None),
        FORBIDDEN,
        FORBIDDEN,
        FORBIDDEN,
    ),
    "GET /admin/stats": Row(lambda i: ("/admin/stats", None), FORBIDDEN, FORBIDDEN, FORBIDDEN),
    "DELETE /admin/messages/{message_id:int}": Row(
        lambda i: (f"/admin/messages/{i.owners_message_id}", None),
        FORBIDDEN,
        FORBIDDEN,
        FORBIDDEN,
    ),
    "GET /admin/reports": Row(lambda i: ("/admin/reports", None), FORBIDDEN, FORBIDDEN, FORBIDDEN),
    "GET /admin/audit": Row(lambda i: ("/admin/audit", None), FORBIDDEN, FORBIDDEN, FORBIDDEN),
    "GET /me/blocks": Row(lambda i: ("/me/blocks", None), OK, OK, OK),
    "PUT /me/blocks/{user_uuid}": Row(lambda i: (f"/me/blocks/{i.target_uuid}", None), OK, OK, OK),
    "DELETE /me/blocks/{user_uuid}": Row(
        lambda i: (f"/me/blocks/{i.target_uuid}", None), OK, OK, OK
    ),
    "GET /users_list": Row(lambda i: ("/users_list", None), OK, OK, OK),
    # Anyone's name (as /users_list); presence only for those sharing a chat.
    "GET /users/{user_uuid}": Row(lambda i: (f"/users/{i.target_uuid}", None), OK, OK, OK),
    "GET /search": Row(lambda i: (f"/search?q=hi&chat_id={i.chat_id}", None), NF, NF, OK),
    "PATCH /chats/{chat_id:int}/notifications": Row(
        lambda i: (f"/chats/{i.chat_id}/notifications", {"notify": "none"}), NF, NF, OK
    ),
    # Not of a chat: a subscription is the caller's own.
    "POST /push/subscriptions": Row(
        lambda i: ("/push/subscriptions", PUSH_SUBSCRIPTION), OK, OK, OK
    ),
    "DELETE /push/subscriptions": Row(
        lambda i: ("/push/subscriptions", {"endpoint": PUSH_SUBSCRIPTION["endpoint"]}), OK, OK, OK
    ),
    "GET /chats": Row(lambda i: ("/chats", None), OK, OK, OK),
    "POST /chats": Row(
        lambda i: ("/chats", {"type": "group", "name": "Mine", "user_ids": [i.other_uuid]}),
        OK,
        OK,
        OK,
    ),
    "GET /history/{chat_id:int}": Row(lambda i: (f"/history/{i.chat_id}", None), NF, NF, OK),
    "GET /chats/{chat_id:int}": Row(lambda i: (f"/chats/{i.chat_id}", None), NF, NF, OK),
    "PATCH /chats/{chat_id:int}": Row(
        lambda i: (f"/chats/{i.chat_id}", {"name": "Taken"}), NF, NF, FORBIDDEN
    ),
    "DELETE /chats/{chat_id:int}": Row(lambda i: (f"/chats/{i.chat_id}", None), NF, NF, FORBIDDEN),
    "POST /chats/{chat_id:int}/members": Row(
        lambda i: (f"/chats/{i.chat_id}/members", {"user_ids": [i.other_uuid]}), NF, NF, FORBIDDEN
    ),
    "DELETE /chats/{chat_id:int}/members/{user_uuid}": Row(
        lambda i: (f"/chats/{i.chat_id}/members/{i.target_uuid}", None), NF, NF, FORBIDDEN
    ),
    "PATCH /chats/{chat_id:int}/members/{user_uuid}": Row(
        lambda i: (f"/chats/{i.chat_id}/members/{i.target_uuid}", {"role": "admin"}),
        NF,
        NF,
        FORBIDDEN,
    ),
    "POST /chats/{chat_id:int}/messages": Row(
        lambda i: (f"/chats/{i.chat_id}/messages", {"text": "hi"}), NF, NF, OK
    ),
    "GET /messages/{message_id:int}": Row(
        lambda i: (f"/messages/{i.message_id}", None), NF, NF, OK
    ),
    "POST /chats/{chat_id:int}/read": Row(
        lambda i: (f"/chats/{i.chat_id}/read", {"up_to": i.message_id}), NF, NF, OK
    ),
    "PATCH /messages/{message_id:int}": Row(
        lambda i: (f"/messages/{i.message_id}", {"text": "y"}), NF, NF, OK
    ),
    "DELETE /messages/{message_id:int}": Row(
        lambda i: (f"/messages/{i.owners_message_id}?for_everyone=true", None), NF, NF, FORBIDDEN
    ),
    "GET /messages/{message_id:int}/edits": Row(
        lambda i: (f"/messages/{i.message_id}/edits", None), NF, NF, OK
    ),
    "PUT /messages/{message_id:int}/reactions/{emoji}": Row(
        lambda i: (f"/messages/{i.message_id}/reactions/%F0%9F%91%8D", None), NF, NF, OK
    ),
    "DELETE /messages/{message_id:int}/reactions/{emoji}": Row(
        lambda i: (f"/messages/{i.message_id}/reactions/%F0%9F%91%8D", None), NF, NF, OK
    ),
    "POST /messages/{message_id:int}/forward": Row(
        lambda i: (f"/messages/{i.owners_message_id}/forward", {"chat_id": i.chat_id}), NF, NF, OK
    ),
    "PUT /chats/{chat_id:int}/pin": Row(
        lambda i: (f"/chats/{i.chat_id}/pin", {"message_id": i.message_id}), NF, NF, FORBIDDEN
    ),
    "DELETE /chats/{chat_id:int}/pin": Row(
        lambda i: (f"/chats/{i.chat_id}/pin", None), NF, NF, FORBIDDEN
    ),
    # Not of a chat: anyone signed in may upload (the body here is JSON, stored as a file).
    "POST /uploads": Row(lambda i: ("/uploads", {"a": "file"}), OK, OK, OK),
    "GET /files/{file_id:uuid}": Row(lambda i: (f"/files/{i.file_id}", None), NF, NF, OK),
    "GET /files/{file_id:uuid}/thumbnail": Row(
        lambda i: (f"/files/{i.file_id}/thumbnail", None), NF, NF, OK
    ),
    "POST /files/{file_id:uuid}/link": Row(
        lambda i: (f"/files/{i.file_id}/link", None), NF, NF, OK
    ),
    **BOT_ROWS,
    **APP_ROWS,
}

OPERATIONS = {f"{op.method} {op.path}": op for op in rest.OPERATIONS}


def test_every_action_and_route_has_a_row() -> None:
    assert set(SOCKET_MATRIX) == {cls.__struct_config__.tag for cls in HANDLERS}
    assert set(REST_MATRIX) | PUBLIC_ROUTES == set(OPERATIONS)
    assert not set(REST_MATRIX) & PUBLIC_ROUTES
    assert {key for key, op in OPERATIONS.items() if not op.auth} == PUBLIC_ROUTES


def documented_matrix(first_column: str) -> dict[str, list[str]]:
    """The rows of the docs/security.md table whose header starts with `first_column`."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    rows: dict[str, list[str]] = {}
    in_table = False
    for line in text.splitlines():
        if line.startswith(f"| {first_column} |"):
            in_table = True
        elif in_table and line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
        elif in_table and not line.startswith("|"):
            break
    return rows


def test_docs_show_this_matrix() -> None:
    expected = {
        action: [row.outsider, row.removed, row.member, "close 1008"]
        for action, row in SOCKET_MATRIX.items()
    }
    assert documented_matrix("action") == expected

    def openapi_key(key: str) -> str:
        return re.sub(r"\{(\w+):\w+\}", r"{\1}", key)

    expected = {
        openapi_key(key): [row.outsider, row.removed, row.member, "401"]
        for key, row in REST_MATRIX.items()
    }
    expected.update({openapi_key(key): ["public"] * 4 for key in PUBLIC_ROUTES})
    assert documented_matrix("route") == expected


# --- the cast and the scene ------------------------------------------------------------------


@dataclass
class Cast:
    owner: Api
    member: Api
    target: Api
    removed: Api
    outsider: Api
    other: Api
    bot: dict[str, Any]  # the owner's bot (POST /bots's answer)


def _register(server: Server, name: str) -> Api:
    async def make() -> Api:
        api = Api(server.base_url)
        email = f"{name.lower()}-{uuid.uuid4().hex[:10]}@example.com"
        await api.register(name, email, PASSWORD)
        await api.login(email, PASSWORD)
        api.email = email  # type: ignore[attr-defined]
        return api

    return asyncio.run(make())


@pytest.fixture(scope="module")
def cast(server: Server) -> Cast:
    apis = [
        _register(server, name)
        for name in ("Owner", "Member", "Target", "Removed", "Outsider", "Other")
    ]
    bot = asyncio.run(
        apis[0].call("POST", "/bots", json={"name": "Matrix", "username": "matrix_bot"})
    )
    return Cast(*apis, bot=bot)


@pytest.fixture
async def scene(cast: Cast) -> Ids:
    """A fresh group for each test that may change it."""
    return await make_scene(cast)


@pytest.fixture(scope="module")
def shared_scene(cast: Cast) -> Ids:
    """One group for the tests whose every request must be refused."""
    return asyncio.run(make_scene(cast))


async def make_scene(cast: Cast) -> Ids:
    """A group of owner, member and target with a message in it; `removed` was removed."""
    chat = await cast.owner.call(
        "POST",
        "/chats",
        json={
            "type": "group",
            "name": "Matrix",
            "user_ids": [
                cast.member.user_uuid,
                cast.target.user_uuid,
                cast.removed.user_uuid,
                cast.bot["bot"]["user_uuid"],
            ],
        },
    )
    image = io.BytesIO()
    Image.new("RGB", (8, 8)).save(image, "PNG")
    upload = await cast.member.call("POST", "/uploads", content=image.getvalue())
    message = await cast.member.call(
        "POST",
        f"/chats/{chat['id']}/messages",
        json={"text": "x", "attachments": [upload["upload_id"]]},
    )
    owners = await cast.owner.call("POST", f"/chats/{chat['id']}/messages", json={"text": "o"})
    hook = await cast.owner.call("POST", f"/chats/{chat['id']}/webhooks", json={"name": "CI"})
    await cast.owner.call("DELETE", f"/chats/{chat['id']}/members/{cast.removed.user_uuid}")
    return Ids(
        chat["id"],
        message["id"],
        owners["id"],
        cast.target.user_uuid,
        cast.other.user_uuid,
        upload["upload_id"],
        cast.bot["bot"]["id"],
        hook["id"],
    )


def missing(ids: Ids) -> Ids:
    """The same request, about a chat and a message that do not exist."""
    return replace(
        ids,
        chat_id=2**62 + ids.chat_id,
        message_id=2**62 + ids.message_id,
        owners_message_id=2**62 + ids.owners_message_id,
        file_id=str(uuid.uuid4()),
        bot_id=2**62 + ids.bot_id,
        webhook_id=2**62 + ids.webhook_id,
    )


async def chat_state(cast: Cast, ids: Ids) -> Any:
    return await cast.owner.call("GET", f"/chats/{ids.chat_id}")


def bad_token(server: Server, cast: Cast, kind: str, idp: IdentityProvider) -> str | None:
    now = int(time.time())
    claims = {"sub": cast.member.user_uuid, "typ": "access", "exp": now + 60}
    if kind.startswith("app_"):
        return bad_app_token(idp, kind)
    return {
        "expired": jwt.encode({**claims, "exp": now - 5}, server.secret, "HS256"),
        "refresh": cast.member.refresh_token,
        "wrong_key": jwt.encode(claims, "another-key-" + "y" * 40, "HS256"),
        "none": None,
    }[kind]


def bad_app_token(idp: IdentityProvider, kind: str) -> str:
    """A token of the app's user "member-of-the-app" that chatd must refuse."""
    sub = "member-of-the-app"
    rsa = idp.key("RS256")
    claims = idp.claims(sub)
    if kind == "app_expired":
        return idp.token(sub, exp=int(time.time()) - 5)
    if kind == "app_foreign_issuer":  # the provider's own key, another issuer
        return idp.token(sub, iss="https://evil.example.test")
    if kind == "app_alg_none":
        return hand_signed({"alg": "none", "kid": rsa.kid}, claims, None)
    if kind == "app_key_confusion":  # HS256 with the provider's public key as the secret
        return hand_signed({"alg": "HS256", "kid": rsa.kid}, claims, rsa.public_pem())
    assert kind == "app_unknown_key"  # signed by a key the provider never published
    return jwt.encode(claims, new_key("RS256").private, "RS256", headers={"kid": rsa.kid})


# --- the socket ------------------------------------------------------------------------------


async def ask(server: Server, api: Api, action: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The reply (ack or error) to one action, as the socket sent it."""
    headers = {"Authorization": f"Bearer {api.access_token}"}
    async with websockets.connect(server.ws_url, additional_headers=headers) as ws:
        assert json.loads(await ws.recv())["action"] == "unread_messages"
        await ws.send(json.dumps({"action": action, "request_id": "m", **fields}))
        async with asyncio.timeout(10):
            while True:
                frame = json.loads(await ws.recv())
                if frame.get("request_id") == "m" and frame["action"] in ("ack", "error"):
                    return frame


def without_ids(reply: dict[str, Any], action: str) -> Any:
    reply = {k: v for k, v in reply.items() if k != "request_id"}
    if action == "sync" and reply["action"] == "ack":
        return list(reply["data"]["chats"].values())  # keyed by the chat id asked about
    return reply


def outcome(reply: dict[str, Any], action: str) -> str:
    if reply["action"] == "error":
        return reply["error"]["code"]
    if action == "sync" and any(c["error"] == NF for c in reply["data"]["chats"].values()):
        return NF_ENTRY
    return OK


@pytest.mark.parametrize("action", sorted(SOCKET_MATRIX))
async def test_socket_matrix(server: Server, cast: Cast, scene: Ids, action: str) -> None:
    row = SOCKET_MATRIX[action]
    for actor in ("outsider", "removed"):
        api = getattr(cast, actor)
        before = await chat_state(cast, scene)
        reply = await ask(server, api, action, row.request(scene))
        assert outcome(reply, action) == getattr(row, actor), (actor, reply)
        if getattr(row, actor) != OK:
            assert await chat_state(cast, scene) == before, f"{actor}'s {action} changed the chat"
            # Learns nothing: the same answer as for a chat or message that does not exist.
            unknown = await ask(server, api, action, row.request(missing(scene)))
            assert without_ids(reply, action) == without_ids(unknown, action), actor

    before = await chat_state(cast, scene)
    reply = await ask(server, cast.member, action, row.request(scene))
    assert outcome(reply, action) == row.member, ("member", reply)
    if row.member != OK:
        assert await chat_state(cast, scene) == before, f"the member's {action} changed the chat"


@pytest.mark.parametrize("kind", TOKEN_ACTORS)
@pytest.mark.parametrize("action", sorted(SOCKET_MATRIX))
async def test_socket_refuses_bad_tokens_before_any_action(
    server: Server, cast: Cast, shared_scene: Ids, action: str, kind: str, idp: IdentityProvider
) -> None:
    token = bad_token(server, cast, kind, idp)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    before = await chat_state(cast, shared_scene)
    async with websockets.connect(server.ws_url, additional_headers=headers) as ws:
        frame = {"action": action, "request_id": "m", **SOCKET_MATRIX[action].request(shared_scene)}
        with pytest.raises(websockets.ConnectionClosed):
            await ws.send(json.dumps(frame))
            reply = await asyncio.wait_for(ws.recv(), 10)
            pytest.fail(f"a socket with a {kind} token got a frame: {reply}")
    assert ws.close_code == 1008
    assert await chat_state(cast, shared_scene) == before


# --- REST ------------------------------------------------------------------------------------


async def call(server: Server, key: str, ids: Ids, token: str | None) -> httpx.Response:
    method = key.split(" ", 1)[0]
    path, body = REST_MATRIX[key].request(ids)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        return await http.request(method, path, headers=headers, json=body)


async def token_for(api: Api, key: str) -> str | None:
    """The actor's token; a fresh login's for a route that ends its session, and a fresh
    user's for one that ends its account (not chat-scoped: who it is does not matter)."""
    if key not in SESSION_ENDING | ACCOUNT_ENDING:
        return api.access_token
    fresh = Api(api.base_url)
    if key in ACCOUNT_ENDING:
        email = f"gone-{uuid.uuid4().hex[:10]}@example.com"
        await fresh.register("Gone", email, PASSWORD)
        await fresh.login(email, PASSWORD)
    else:
        await fresh.login(api.email, PASSWORD)  # type: ignore[attr-defined]
    await fresh.aclose()
    return fresh.access_token


def rest_outcome(response: httpx.Response) -> str:
    if response.is_success:
        return OK
    return response.json()["error"]["code"]


@pytest.mark.parametrize("key", sorted(REST_MATRIX))
async def test_rest_matrix(server: Server, cast: Cast, scene: Ids, key: str) -> None:
    row = REST_MATRIX[key]
    for actor in ("outsider", "removed"):
        api = getattr(cast, actor)
        before = await chat_state(cast, scene)
        response = await call(server, key, scene, await token_for(api, key))
        assert rest_outcome(response) == getattr(row, actor), (actor, response.text)
        if getattr(row, actor) == FORBIDDEN:  # the admin API: refused to any non-admin
            assert response.status_code == 403
            assert await chat_state(cast, scene) == before, f"{actor}'s {key} changed the chat"
        elif getattr(row, actor) != OK:
            assert response.status_code == 404
            assert await chat_state(cast, scene) == before, f"{actor}'s {key} changed the chat"
            unknown = await call(server, key, missing(scene), await token_for(api, key))
            assert (unknown.status_code, unknown.json()) == (404, response.json()), actor

    before = await chat_state(cast, scene)
    response = await call(server, key, scene, await token_for(cast.member, key))
    assert rest_outcome(response) == row.member, ("member", response.text)
    if row.member == FORBIDDEN:
        assert response.status_code == 403
        assert await chat_state(cast, scene) == before, f"the member's {key} changed the chat"


@pytest.mark.parametrize("kind", TOKEN_ACTORS)
@pytest.mark.parametrize("key", sorted(REST_MATRIX))
async def test_rest_refuses_bad_tokens(
    server: Server, cast: Cast, shared_scene: Ids, key: str, kind: str, idp: IdentityProvider
) -> None:
    before = await chat_state(cast, shared_scene)
    response = await call(server, key, shared_scene, bad_token(server, cast, kind, idp))
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"
    assert await chat_state(cast, shared_scene) == before


@pytest.mark.parametrize("key", sorted(PUBLIC_ROUTES))
async def test_public_routes_need_no_token(
    server: Server, cast: Cast, key: str, idp: IdentityProvider
) -> None:
    """Not 401 without a token, nor with a bad one: the body (or nothing) is all they read."""
    method, path = key.split(" ", 1)
    path = path.replace("{webhook_id:int}", "1").replace("{secret}", "x")
    for token in (None, bad_token(server, cast, "expired", idp)):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
            body = {} if method == "POST" else None
            response = await http.request(method, path, headers=headers, json=body)
        # An empty body is refused for what it is, not for a missing token.
        assert response.status_code == (422 if method == "POST" else 200), response.text


@pytest.fixture(autouse=True)
def no_tracebacks(server: Server) -> Iterator[None]:
    start = len(server.log())
    yield
    assert "Traceback" not in server.log()[start:]


# --- the server's admins -------------------------------------------------------------------

# What an admin gets on each admin route, on the same scene (the target is a plain member;
# the missing user of DELETE is not_found to an admin too).
ADMIN_ROWS = {
    "GET /admin/users": OK,
    "POST /admin/users": OK,
    "PATCH /admin/users/{user_uuid}": OK,
    "DELETE /admin/users/{user_uuid}": NF,
    "GET /admin/stats": OK,
    "DELETE /admin/messages/{message_id:int}": OK,
    "GET /admin/reports": OK,
    "GET /admin/audit": OK,
    "POST /admin/api_keys": OK,
    "GET /admin/api_keys": OK,
    "DELETE /admin/api_keys/{key_id}": NF,
}


def test_every_admin_route_has_an_admin_row() -> None:
    assert set(ADMIN_ROWS) == {key for key in OPERATIONS if key.split(" ")[1].startswith("/admin")}


async def test_admins_matrix(server: Server, cast: Cast, scene: Ids, database_url: str) -> None:
    import asyncpg

    admin = Api(server.base_url)
    email = f"admin-{uuid.uuid4().hex[:10]}@example.com"
    await admin.register("Admin", email, PASSWORD)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE users SET role = 'admin' WHERE email = $1", email)
    finally:
        await conn.close()
    await admin.login(email, PASSWORD)
    for key, expected in ADMIN_ROWS.items():
        response = await call(server, key, scene, admin.access_token)
        assert rest_outcome(response) == expected, (key, response.text)
    await admin.aclose()


# --- API tokens: what each scope may do -------------------------------------------------------
#
# Every action and route needs one of: `read` (a token with the read scope may make it),
# `write` (a change: the write scope), `login only` (never an API token: credentials,
# the account, bots). docs/security.md shows the same table; a login may make them all.

# The file routes have no request Struct (chatd/rest_files.py).
FILE_ROUTE_SCOPES = {
    "POST /uploads": "write",
    "GET /files/{file_id:uuid}": "read",
    "GET /files/{file_id:uuid}/thumbnail": "read",
}


def scope_of(request_type: type) -> str:
    from chatd.handlers import APP_REQUESTS, LOGIN_ONLY, READS

    if request_type in LOGIN_ONLY:
        return "login only"
    if request_type in APP_REQUESTS:
        return "API key"
    return "read" if request_type in READS else "write"


def route_scope(key: str) -> str:
    request = OPERATIONS[key].request
    return scope_of(request) if request is not None else FILE_ROUTE_SCOPES[key]


def test_docs_show_the_scopes() -> None:
    expected = {cls.__struct_config__.tag: [scope_of(cls)] for cls in HANDLERS}
    expected.update(
        {re.sub(r"\{(\w+):\w+\}", r"{\1}", key): [route_scope(key)] for key in REST_MATRIX}
    )
    assert documented_matrix("request") == expected


@pytest.fixture(scope="module")
def member_tokens(cast: Cast) -> dict[str, str]:
    """The member's personal access tokens: "read" (read scope only) and "write"."""

    async def make() -> dict[str, str]:
        made = {}
        for name, scopes in (("read", ["read"]), ("write", ["read", "write"])):
            body = {"name": name, "scopes": scopes}
            made[name] = (await cast.member.call("POST", "/me/tokens", json=body))["token"]
        return made

    return asyncio.run(make())


REFUSAL = {"write": "insufficient_scope", "login only": "login_required", "API key": "forbidden"}


@pytest.mark.parametrize("scope", ["read", "write"])
@pytest.mark.parametrize("key", sorted(REST_MATRIX))
async def test_rest_scopes(
    server: Server, cast: Cast, scene: Ids, member_tokens: dict[str, str], key: str, scope: str
) -> None:
    """A token is refused what its scope does not cover, and changes nothing; what it
    covers answers as the member's login does."""
    need = route_scope(key)
    before = await chat_state(cast, scene)
    response = await call(server, key, scene, member_tokens[scope])
    if need in ("login only", "API key") or (need == "write" and scope == "read"):
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == REFUSAL[need]
        assert await chat_state(cast, scene) == before
    else:
        assert rest_outcome(response) == REST_MATRIX[key].member, response.text


@pytest.mark.parametrize("scope", ["read", "write"])
@pytest.mark.parametrize("action", sorted(SOCKET_MATRIX))
async def test_socket_scopes(
    server: Server,
    cast: Cast,
    scene: Ids,
    member_tokens: dict[str, str],
    action: str,
    scope: str,
) -> None:
    (cls,) = [c for c in HANDLERS if c.__struct_config__.tag == action]
    need = scope_of(cls)
    api = Api(server.base_url, member_tokens[scope])
    before = await chat_state(cast, scene)
    reply = await ask(server, api, action, SOCKET_MATRIX[action].request(scene))
    if need == "write" and scope == "read":
        assert outcome(reply, action) == "insufficient_scope", reply
        assert await chat_state(cast, scene) == before
    else:
        assert outcome(reply, action) == SOCKET_MATRIX[action].member, reply
