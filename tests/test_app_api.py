"""The app API with API keys (chatd/handlers/app.py), and app webhooks (chatd/app_hooks.py).

The suite's server accepts the app's tokens (tests/idp.py), so a user the app upserts and
the user of its token with the same `sub` are the same user. The webhook tests run a chatd
of their own on a database of their own: every chatd of the suite shares the suite's
database, and one without CHATD_OUTBOUND_ALLOW_PRIVATE would claim loopback deliveries.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from starlette.responses import Response

from chatd import app_hooks, signing
from chatd.client import Api, ChatdError
from tests.conftest import (
    Server,
    assert_no_tracebacks,
    fresh_database,
    new_user,
    start_server,
    stop_server,
)
from tests.idp import IdentityProvider
from tests.receiver import Receiver

ALL_SCOPES = ["users", "chats", "messages", "history"]
EVENTS = list(app_hooks.EVENTS)


async def make_admin(server: Server, database_url: str) -> Api:
    admin = await new_user(server, "Admin")
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE users SET role = 'admin' WHERE id = $1", uuid.UUID(admin.user_uuid)
        )
    finally:
        await conn.close()
    return admin


async def create_key(admin: Api, scopes: list[str] = ALL_SCOPES, **fields: Any) -> dict:
    body = {"name": f"Shop {uuid.uuid4().hex[:6]}", "scopes": scopes, **fields}
    return await admin.call("POST", "/admin/api_keys", json=body)


@pytest.fixture
async def admin(server: Server, database_url: str) -> AsyncIterator[Api]:
    api = await make_admin(server, database_url)
    yield api
    await api.aclose()


@pytest.fixture
async def app(server: Server, admin: Api) -> AsyncIterator[Api]:
    """The app's backend: an Api holding an API key with every scope."""
    key = await create_key(admin)
    api = Api(server.base_url, key["key"])
    yield api
    await api.aclose()


def sub() -> str:
    return f"shop-user-{uuid.uuid4().hex[:10]}"


async def test_keys_are_shown_once_and_listed_without_their_secret(
    server: Server, admin: Api
) -> None:
    key = await create_key(admin, ["history"])
    assert key["key"].startswith("chatd_app_")
    listed = {k["id"]: k for k in (await admin.call("GET", "/admin/api_keys"))["keys"]}
    assert listed[key["id"]]["scopes"] == ["history"]
    assert "key" not in listed[key["id"]]
    # Revoked: refused at once, and no longer listed.
    async with Api(server.base_url, key["key"]) as app:
        await admin.call("DELETE", f"/admin/api_keys/{key['id']}")
        with pytest.raises(ChatdError) as refused:
            await app.call("GET", "/app/chats/x/messages")
        assert refused.value.status == 401
    assert key["id"] not in {k["id"] for k in (await admin.call("GET", "/admin/api_keys"))["keys"]}


async def test_upsert_users_and_their_tokens_are_one_user(
    server: Server, app: Api, idp: IdentityProvider
) -> None:
    ada, bob = sub(), sub()
    body = {"users": [{"sub": ada, "name": "Ada"}, {"sub": bob, "name": "Bob"}]}
    first = (await app.call("POST", "/app/users", json=body))["users"]
    assert [u["created"] for u in first] == [True, True]
    again = (await app.call("POST", "/app/users", json=body))["users"]
    assert [u["created"] for u in again] == [False, False]
    assert [u["user_uuid"] for u in again] == [u["user_uuid"] for u in first]
    # The user of the app's token with the same sub is that user.
    async with Api(server.base_url, idp.token(ada)) as ada_api:
        me = await ada_api.me()
        assert me["user_uuid"] == first[0]["user_uuid"]
        assert me["name"] == "Ada"
        # A rename through the API reaches the user.
        await app.call("POST", "/app/users", json={"users": [{"sub": ada, "name": "Ada L."}]})
        assert (await ada_api.me())["name"] == "Ada L."


async def test_chats_by_ext_id_members_messages_and_history(
    server: Server, app: Api, idp: IdentityProvider
) -> None:
    ada, bob, cyd = sub(), sub(), sub()
    ext_id = f"order-{uuid.uuid4().hex[:8]}"
    body = {"ext_id": ext_id, "type": "group", "name": "Order 123", "members": [ada, bob]}
    response = await app.http.post(
        "/app/chats", json=body, headers={"Authorization": f"Bearer {app.access_token}"}
    )
    assert response.status_code == 201, response.text
    chat = response.json()
    again = await app.http.post(
        "/app/chats", json=body, headers={"Authorization": f"Bearer {app.access_token}"}
    )
    assert (again.status_code, again.json()["id"]) == (200, chat["id"])
    assert chat["ext_id"] == ext_id and len(chat["members"]) == 3  # the key's identity owns it

    # Ada, signed in with the app's token, is in it and hears the app's posts.
    async with Api(server.base_url, idp.token(ada)) as ada_api, await ada_api.connect() as sock:
        posted = await app.call(
            "POST",
            f"/app/chats/{ext_id}/messages",
            json={"text": "Your order shipped", "client_msg_id": "ship-1"},
        )
        event = await sock.next_event("new_message")
        assert event["data"]["id"] == posted["id"]
        assert event["data"]["sender_uuid"] == chat["members"][0]["user_uuid"]
    # As a user, idempotent by client_msg_id.
    as_bob = {"text": "thanks!", "client_msg_id": "bob-1", "as_user": bob}
    first = await app.call("POST", f"/app/chats/{ext_id}/messages", json=as_bob)
    retry = await app.call("POST", f"/app/chats/{ext_id}/messages", json=as_bob)
    assert retry["id"] == first["id"]
    history = await app.call("GET", f"/app/chats/{ext_id}/messages")
    assert [m["text"] for m in history["messages"]] == ["Your order shipped", "thanks!"]

    # Members: Cyd in, Bob out; Bob can no longer post.
    after = await app.call("POST", f"/app/chats/{ext_id}/members", json={"subs": [cyd]})
    assert len(after["members"]) == 4
    await app.call("DELETE", f"/app/chats/{ext_id}/members", json={"subs": [bob]})
    with pytest.raises(ChatdError) as refused:
        await app.call(
            "POST", f"/app/chats/{ext_id}/messages", json={**as_bob, "client_msg_id": "b2"}
        )
    assert refused.value.code == "invalid"
    # A chat the app did not make is none of its business.
    with pytest.raises(ChatdError) as refused:
        await app.call("GET", "/app/chats/no-such-chat")
    assert refused.value.code == "not_found"


async def test_scopes_and_who_may_use_the_app_api(
    server: Server, admin: Api, make_user: Any
) -> None:
    reader = await create_key(admin, ["history"])
    async with Api(server.base_url, reader["key"]) as app:
        with pytest.raises(ChatdError) as refused:
            await app.call("POST", "/app/users", json={"users": [{"sub": sub()}]})
        assert refused.value.code == "forbidden"
        # An API key reaches the app API only.
        with pytest.raises(ChatdError) as refused:
            await app.call("GET", "/chats")
        assert refused.value.status == 403
    # A user's login, even an admin's, does not reach the app API.
    for api in (admin, await make_user("Eve")):
        with pytest.raises(ChatdError) as refused:
            await api.call("POST", "/app/users", json={"users": [{"sub": sub()}]})
        assert refused.value.code == "forbidden"


async def test_deactivated_users_are_cut_off(
    server: Server, app: Api, idp: IdentityProvider
) -> None:
    mallory = sub()
    await app.call("POST", "/app/users", json={"users": [{"sub": mallory, "name": "M"}]})
    async with Api(server.base_url, idp.token(mallory)) as api, await api.connect() as sock:
        await app.call("POST", "/app/users/deactivate", json={"subs": [mallory]})
        assert await sock.wait_closed() == 1008
        with pytest.raises(ChatdError) as refused:
            await api.me()
        assert refused.value.status == 401


async def test_a_key_has_its_own_rate_limit(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    server = start_server(
        database_url, tmp_path_factory.mktemp("app-rate"), CHATD_APP_KEY_RATE="5/min"
    )
    try:
        admin = await make_admin(server, database_url)
        one, two = await create_key(admin), await create_key(admin)
        async with Api(server.base_url, one["key"]) as a, Api(server.base_url, two["key"]) as b:
            for _ in range(5):
                with pytest.raises(ChatdError) as missing:
                    await a.call("GET", "/app/chats/none")
                assert missing.value.code == "not_found"
            with pytest.raises(ChatdError) as limited:
                await a.call("GET", "/app/chats/none")
            assert limited.value.code == "rate_limited"
            with pytest.raises(ChatdError) as missing:  # the other key is not held back
                await b.call("GET", "/app/chats/none")
            assert missing.value.code == "not_found"
        await admin.aclose()
    finally:
        stop_server(server)
    assert_no_tracebacks(server)


# --- app webhooks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_database(database_url: str) -> Iterator[str]:
    """A database of this module's own (see the module docstring)."""
    with fresh_database(database_url) as own:
        yield own


def hook_server(own_database: str, workdir: Any, idp: IdentityProvider) -> Server:
    return start_server(
        own_database,
        workdir,
        **idp.server_env(),
        CHATD_OUTBOUND_ALLOW_PRIVATE="true",
        CHATD_DELIVERY_RETRY_MS="200",
        CHATD_DELIVERY_TIMEOUT="1",  # a killed process's lease ends in 32 s
    )


async def test_app_webhooks_in_order_per_chat_and_kill_9_safe(
    own_database: str, tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider
) -> None:
    workdir = tmp_path_factory.mktemp("app-hooks")
    server = hook_server(own_database, workdir, idp)
    try:
        async with Receiver() as receiver:
            admin = await make_admin(server, own_database)
            key = await create_key(admin, webhook_url=receiver.url("/hooks"), events=EVENTS)
            secret = key["webhook_secret"].encode()
            app = Api(server.base_url, key["key"])
            ada, bob = sub(), sub()
            await app.call("POST", "/app/users", json={"users": [{"sub": ada}, {"sub": bob}]})
            ext_id = "order-1"
            await app.call(
                "POST",
                "/app/chats",
                json={"ext_id": ext_id, "name": "Order 1", "members": [ada, bob]},
            )
            for n in range(5):
                await app.call(
                    "POST",
                    f"/app/chats/{ext_id}/messages",
                    json={"text": f"m{n}", "client_msg_id": f"c{n}", "as_user": ada},
                )
            received = await receiver.wait_for(2 + 1 + 5)
            bodies = [json.loads(r.body) for r in received]
            assert all(signing.verify(secret, r.body, r.headers) for r in received)
            types = [b["type"] for b in bodies]
            assert types.count("user.created") == 2
            chat_events = [b for b in bodies if b["type"] != "user.created"]
            assert [b["type"] for b in chat_events] == ["chat.created"] + ["message.new"] * 5
            assert [b["data"]["text"] for b in chat_events[1:]] == [f"m{n}" for n in range(5)]

            # Ada (signed in with the app's token) edits her last message: message.updated.
            last_id = chat_events[-1]["data"]["id"]
            async with Api(server.base_url, idp.token(ada)) as ada_api:
                await ada_api.call("PATCH", f"/messages/{last_id}", json={"text": "m4 edited"})
            received = await receiver.wait_for(len(received) + 1)
            updated = json.loads(received[-1].body)
            assert (updated["type"], updated["data"]["text"]) == ("message.updated", "m4 edited")
            assert updated["chat_id"] == chat_events[-1]["chat_id"]

            # kill -9 while a delivery is being retried (its receiver refuses it): it is
            # made after the restart, once the lease of the dead process ends.
            receiver.answer = lambda r: Response(status_code=503)
            await app.call(
                "POST",
                f"/app/chats/{ext_id}/messages",
                json={"text": "after the crash", "client_msg_id": "crash"},
            )
            await receiver.wait_for(len(received) + 1)
            os.kill(server.process.pid, signal.SIGKILL)
            server.process.wait()
            refused = len(receiver.requests)
            receiver.answer = None
            server = hook_server(own_database, workdir, idp)
            arrived = await receiver.wait_for(refused + 1, timeout=60)
            last = json.loads(arrived[-1].body)
            assert (last["type"], last["data"]["text"]) == ("message.new", "after the crash")
            crash_ids = {
                r.headers["x-chatd-delivery"]
                for r in receiver.requests
                if b"after the crash" in r.body
            }
            assert len(crash_ids) == 1  # one delivery, tried again: never a second one
            await app.aclose()
            await admin.aclose()
    finally:
        stop_server(server)
