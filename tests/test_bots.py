"""Bots, their tokens and commands, and personal access tokens, against a real server."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
import websockets

from chatd.client import Api, ChatdError
from chatd.tokens import BOT_PREFIX
from tests.conftest import PASSWORD, Server, UserFactory


async def make_bot(owner: Api, name: str = "Dice") -> tuple[dict[str, Any], Api]:
    """A bot of `owner`'s, and an Api that speaks as it (with its first token)."""
    username = f"{name.lower()}_{uuid.uuid4().hex[:8]}"
    made = await owner.call("POST", "/bots", json={"name": name, "username": username})
    bot = Api(owner.base_url, made["token"]["token"])
    bot.user_uuid = made["bot"]["user_uuid"]
    return made, bot


async def group_with(owner: Api, *members: str) -> dict[str, Any]:
    return await owner.call(
        "POST", "/chats", json={"type": "group", "name": "Bots", "user_ids": list(members)}
    )


async def test_a_bot_is_made_with_a_token_that_works_on_rest_and_the_socket(alice: Api) -> None:
    # A name of its own: the user list below shows one page of those with the name.
    name = f"Dice{uuid.uuid4().hex[:8]}"
    made, bot = await make_bot(alice, name)
    token = made["token"]["token"]
    assert token.startswith("chatd_bot_") and len(token) > 40
    assert made["bot"]["owner_uuid"] == alice.user_uuid
    me = await bot.me()
    assert me["is_bot"] is True and me["bot_id"] == made["bot"]["id"]
    assert me["user_uuid"] == made["bot"]["user_uuid"]
    assert (await alice.me())["is_bot"] is False

    chat = await group_with(alice, bot.user_uuid)
    # is_bot is sent only when true.
    assert {m["user_uuid"]: m.get("is_bot") for m in chat["members"]} == {
        alice.user_uuid: None,
        bot.user_uuid: True,
    }
    async with await bot.connect() as sock:
        await alice.call("POST", f"/chats/{chat['id']}/messages", json={"text": "hi bot"})
        event = await sock.next_event("new_message")
        assert event["data"]["text"] == "hi bot"
        reply = await sock.request("send_message", chat_id=chat["id"], text="hi human")
        assert reply["sender_uuid"] == bot.user_uuid
    users = await alice.call("GET", "/users_list", params={"q": name})
    assert any(u["user_uuid"] == bot.user_uuid and u["is_bot"] for u in users["users"])


async def test_only_the_hash_of_a_token_is_stored(alice: Api, database_url: str) -> None:
    made, _ = await make_bot(alice)
    token = made["token"]["token"]
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT * FROM api_tokens")
        dumped = repr([dict(r) for r in rows])
        # The secret is all after the prefix: it may hold "_" itself (urlsafe base64).
        assert token not in dumped and token.removeprefix(BOT_PREFIX) not in dumped
    finally:
        await conn.close()
    listed = await alice.call("GET", f"/bots/{made['bot']['id']}/tokens")
    assert [t["id"] for t in listed["tokens"]] == [made["token"]["id"]]
    assert "token" not in listed["tokens"][0]


async def test_a_bot_cannot_log_in_with_a_password(alice: Api, server: Server) -> None:
    _, bot = await make_bot(alice)
    me = await bot.me()
    with pytest.raises(ChatdError) as refused:
        await Api(server.base_url).login(me["email"], "!")
    assert refused.value.code == "invalid_credentials"


async def test_revoking_a_bot_token_closes_its_sockets_and_refuses_it(alice: Api) -> None:
    made, bot = await make_bot(alice)
    bot_id = made["bot"]["id"]
    second = await alice.call("POST", f"/bots/{bot_id}/tokens", json={"name": "ci"})
    other = Api(alice.base_url, second["token"])
    async with await bot.connect() as sock, await other.connect() as kept:
        await alice.call("DELETE", f"/bots/{bot_id}/tokens/{made['token']['id']}")
        assert await sock.wait_closed() == 1008
        assert not kept.closed  # the bot's other token is another session
    with pytest.raises(ChatdError) as refused:
        await bot.me()
    assert refused.value.status == 401
    assert (await other.me())["is_bot"]
    # Revoked twice, or someone else's: not found.
    with pytest.raises(ChatdError) as again:
        await alice.call("DELETE", f"/bots/{bot_id}/tokens/{made['token']['id']}")
    assert again.value.status == 404


async def test_bots_are_their_owners_only(alice: Api, bob: Api) -> None:
    made, _ = await make_bot(alice)
    bot_id = made["bot"]["id"]
    for method, path, body in [
        ("GET", f"/bots/{bot_id}", None),
        ("PATCH", f"/bots/{bot_id}", {"name": "Mine"}),
        ("DELETE", f"/bots/{bot_id}", None),
        ("POST", f"/bots/{bot_id}/tokens", {"name": "x"}),
        ("GET", f"/bots/{bot_id}/tokens", None),
        ("PUT", f"/bots/{bot_id}/commands", {"commands": []}),
    ]:
        with pytest.raises(ChatdError) as refused:
            await bob.call(method, path, json=body)
        assert refused.value.status == 404, (method, path)
    assert (await bob.call("GET", "/bots"))["bots"] == []
    assert [b["id"] for b in (await alice.call("GET", "/bots"))["bots"]] == [bot_id]
    # A username is unique among bots, whatever its case.
    with pytest.raises(ChatdError) as taken:
        await alice.call(
            "POST", "/bots", json={"name": "Copy", "username": made["bot"]["username"].upper()}
        )
    assert (taken.value.status, taken.value.code) == (409, "username_taken")


async def test_a_bot_token_manages_no_bot_and_opens_no_chat(alice: Api, bob: Api) -> None:
    _, bot = await make_bot(alice)
    for method, path, body in [
        ("POST", "/bots", {"name": "Spawn", "username": f"spawn_{uuid.uuid4().hex[:6]}"}),
        ("GET", "/bots", None),
        ("POST", "/me/tokens", {"name": "x"}),
        ("GET", "/me/sessions", None),
        ("POST", "/logout", None),
    ]:
        with pytest.raises(ChatdError) as refused:
            await bot.call(method, path, json=body)
        assert (refused.value.status, refused.value.code) == (403, "login_required"), path
    with pytest.raises(ChatdError) as refused:
        await bot.call("POST", "/chats", json={"type": "private", "user_ids": [bob.user_uuid]})
    assert refused.value.code == "forbidden"


async def test_deleting_a_bot_ends_it(alice: Api) -> None:
    made, bot = await make_bot(alice)
    chat = await group_with(alice, bot.user_uuid)
    async with await bot.connect() as sock:
        await alice.call("DELETE", f"/bots/{made['bot']['id']}")
        assert await sock.wait_closed() == 1008
    with pytest.raises(ChatdError):
        await bot.me()
    members = (await alice.call("GET", f"/chats/{chat['id']}"))["members"]
    assert [m["user_uuid"] for m in members] == [alice.user_uuid]
    assert (await alice.call("GET", "/bots"))["bots"] == []
    # Its username is free again.
    again = await alice.call(
        "POST", "/bots", json={"name": "Dice", "username": made["bot"]["username"]}
    )
    assert again["bot"]["id"] != made["bot"]["id"]


async def test_deleting_the_owner_deletes_their_bots(make_user: UserFactory) -> None:
    owner = await make_user("Owner")
    _, bot = await make_bot(owner)
    await owner.call("DELETE", "/me", json={"password": PASSWORD})
    with pytest.raises(ChatdError) as refused:
        await bot.me()
    assert refused.value.status == 401


async def test_bots_have_their_own_message_rate(database_url: str, tmp_path: Any) -> None:
    from tests.conftest import new_user, start_server, stop_server

    server = start_server(
        database_url,
        tmp_path,
        CHATD_MESSAGE_RATE="1000/s",
        CHATD_BOT_MESSAGE_RATE="2/min",
    )
    try:
        alice = await new_user(server, "Alice")
        _, bot = await make_bot(alice)
        chat = await group_with(alice, bot.user_uuid)
        for _ in range(2):
            await bot.call("POST", f"/chats/{chat['id']}/messages", json={"text": "x"})
        with pytest.raises(ChatdError) as limited:
            await bot.call("POST", f"/chats/{chat['id']}/messages", json={"text": "x"})
        assert limited.value.code == "rate_limited"
        for _ in range(5):  # people are not limited by the bots' rate
            await alice.call("POST", f"/chats/{chat['id']}/messages", json={"text": "y"})
    finally:
        stop_server(server)


# --- personal access tokens ----------------------------------------------------------------


async def make_pat(api: Api, *scopes: str, **fields: Any) -> Api:
    made = await api.call(
        "POST", "/me/tokens", json={"name": "script", "scopes": list(scopes), **fields}
    )
    assert made["token"].startswith("chatd_pat_")
    assert sorted(made["scopes"]) == sorted(set(scopes))
    pat = Api(api.base_url, made["token"])
    pat.user_uuid = api.user_uuid
    pat.token_id = made["id"]  # type: ignore[attr-defined]
    return pat


async def test_a_read_token_reads_and_changes_nothing(alice: Api, bob: Api) -> None:
    chat = await group_with(alice, bob.user_uuid)
    reader = await make_pat(alice, "read")
    assert (await reader.me())["user_uuid"] == alice.user_uuid
    assert (await reader.call("GET", f"/chats/{chat['id']}"))["id"] == chat["id"]
    with pytest.raises(ChatdError) as refused:
        await reader.call("POST", f"/chats/{chat['id']}/messages", json={"text": "no"})
    assert (refused.value.status, refused.value.code) == (403, "insufficient_scope")
    with pytest.raises(ChatdError) as refused:
        await reader.call("POST", "/uploads", content=b"bytes")
    assert refused.value.code == "insufficient_scope"
    async with await reader.connect() as sock:
        assert (await sock.request("get_chat", chat_id=chat["id"]))["id"] == chat["id"]
        with pytest.raises(ChatdError) as refused:
            await sock.request("send_message", chat_id=chat["id"], text="no")
        assert refused.value.code == "insufficient_scope"
        with pytest.raises(ChatdError) as refused:
            await sock.request("typing", chat_id=chat["id"])
        assert refused.value.code == "insufficient_scope"
    assert (await alice.call("GET", f"/history/{chat['id']}"))["messages"] == []

    writer = await make_pat(alice, "read", "write")
    sent = await writer.call("POST", f"/chats/{chat['id']}/messages", json={"text": "yes"})
    assert sent["sender_uuid"] == alice.user_uuid


async def test_tokens_manage_no_credentials(alice: Api) -> None:
    pat = await make_pat(alice, "read", "write")
    for method, path, body in [
        ("POST", "/me/tokens", {"name": "more"}),
        ("GET", "/me/tokens", None),
        ("DELETE", f"/me/tokens/{pat.token_id}", None),  # type: ignore[attr-defined]
        ("POST", "/me/password", {"current": PASSWORD, "new": PASSWORD + "!"}),
        ("GET", "/me/sessions", None),
        ("DELETE", "/me", {"password": PASSWORD}),
        ("POST", "/bots", {"name": "B", "username": f"b_{uuid.uuid4().hex[:6]}"}),
    ]:
        with pytest.raises(ChatdError) as refused:
            await pat.call(method, path, json=body)
        assert (refused.value.status, refused.value.code) == (403, "login_required"), path
    assert (await alice.me())["user_uuid"] == alice.user_uuid  # still there


async def test_tokens_are_listed_revoked_and_expire(alice: Api) -> None:
    pat = await make_pat(alice, "read")
    listed = (await alice.call("GET", "/me/tokens"))["tokens"]
    assert [t["id"] for t in listed] == [pat.token_id]  # type: ignore[attr-defined]
    assert "token" not in listed[0] and listed[0]["expires_at"] is None
    # Not a session of the user's: the sessions list shows logins only.
    sessions = (await alice.call("GET", "/me/sessions"))["sessions"]
    assert pat.token_id not in [s["id"] for s in sessions]  # type: ignore[attr-defined]
    async with await pat.connect() as sock:
        await alice.call("DELETE", f"/me/tokens/{pat.token_id}")  # type: ignore[attr-defined]
        assert await sock.wait_closed() == 1008
    with pytest.raises(ChatdError) as refused:
        await pat.me()
    assert refused.value.status == 401
    assert (await alice.call("GET", "/me/tokens"))["tokens"] == []

    short = await make_pat(alice, "read", expires_in=60)
    assert (await short.me())["user_uuid"] == alice.user_uuid
    with pytest.raises(ChatdError) as invalid:
        await alice.call("POST", "/me/tokens", json={"name": "x", "expires_in": 5})
    assert invalid.value.code == "invalid"
    with pytest.raises(ChatdError) as invalid:
        await alice.call("POST", "/me/tokens", json={"name": "x", "scopes": ["admin"]})
    assert invalid.value.code == "invalid"


async def test_an_expired_token_is_refused(alice: Api, database_url: str) -> None:
    pat = await make_pat(alice, "read", expires_in=60)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE id = $1",
            uuid.UUID(pat.token_id),  # type: ignore[attr-defined]
        )
    finally:
        await conn.close()
    # The first use in this process reads the expiry from the database.
    with pytest.raises(ChatdError) as refused:
        await pat.me()
    assert refused.value.status == 401


async def test_last_used_at_is_recorded(alice: Api) -> None:
    pat = await make_pat(alice, "read")
    before = (await alice.call("GET", "/me/tokens"))["tokens"][0]["last_used_at"]
    await asyncio.sleep(0.05)
    await pat.me()
    after = (await alice.call("GET", "/me/tokens"))["tokens"][0]["last_used_at"]
    assert after > before


async def test_a_bad_token_closes_the_socket(server: Server) -> None:
    headers = {"Authorization": "Bearer chatd_bot_" + "x" * 43}
    async with websockets.connect(server.ws_url, additional_headers=headers) as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    assert ws.close_code == 1008


# --- slash commands ------------------------------------------------------------------------


async def test_a_command_goes_to_the_bot_that_has_it(alice: Api, bob: Api) -> None:
    dice, dice_bot = await make_bot(alice, "Dice")
    poll, poll_bot = await make_bot(alice, "Poll")
    await dice_bot.call(  # the bot sets its own commands
        "PUT",
        f"/bots/{dice['bot']['id']}/commands",
        json={"commands": [{"name": "roll", "description": "Roll dice: /roll 2d6"}]},
    )
    await alice.call(
        "PUT",
        f"/bots/{poll['bot']['id']}/commands",
        json={"commands": [{"name": "poll", "description": "Ask"}, {"name": "roll"}]},
    )
    chat = await group_with(alice, bob.user_uuid, dice_bot.user_uuid, poll_bot.user_uuid)
    listed = await bob.call("GET", f"/chats/{chat['id']}/commands")
    assert [(c["name"], c["bot_username"]) for c in listed["commands"]] == [
        ("poll", poll["bot"]["username"]),
        ("roll", dice["bot"]["username"]),
        ("roll", poll["bot"]["username"]),
    ]
    async with await dice_bot.connect() as dice_sock, await poll_bot.connect() as poll_sock:
        await bob.call("POST", f"/chats/{chat['id']}/messages", json={"text": "/roll  2d6 "})
        command = await dice_sock.next_event("command")
        assert command["data"]["command"] == "roll" and command["data"]["args"] == "2d6"
        assert command["data"]["chat_id"] == chat["id"]
        assert command["data"]["message"]["sender_uuid"] == bob.user_uuid
        assert (await poll_sock.next_event("command"))["data"]["command"] == "roll"
        # /name@username: that bot only.
        text = f"/roll@{dice['bot']['username']} 1d20"
        await bob.call("POST", f"/chats/{chat['id']}/messages", json={"text": text})
        assert (await dice_sock.next_event("command"))["data"]["args"] == "1d20"
        await bob.call("POST", f"/chats/{chat['id']}/messages", json={"text": "/poll Lunch?"})
        assert (await poll_sock.next_event("command"))["data"]["args"] == "Lunch?"
        await bob.call("POST", f"/chats/{chat['id']}/messages", json={"text": "/unknown"})
        await bob.call("POST", f"/chats/{chat['id']}/messages", json={"text": "roll"})
        await asyncio.sleep(0.3)
        leftover = [e for e in dice_sock.pending_events() if e["action"] == "command"]
        assert leftover == []
    # Someone else's chat learns nothing of its commands.
    with pytest.raises(ChatdError) as refused:
        await alice.call("GET", f"/chats/{2**62}/commands")
    assert refused.value.status == 404


async def test_commands_are_checked(alice: Api) -> None:
    made, _ = await make_bot(alice)
    path = f"/bots/{made['bot']['id']}/commands"
    for commands in (
        [{"name": "Roll"}],
        [{"name": "a b"}],
        [{"name": "roll"}, {"name": "roll"}],
        [{"name": "x" * 33}],
    ):
        with pytest.raises(ChatdError) as refused:
            await alice.call("PUT", path, json={"commands": commands})
        assert refused.value.code == "invalid", commands
    assert (await alice.call("GET", path))["commands"] == []


async def test_a_password_change_revokes_personal_tokens(alice: Api) -> None:
    pat = await make_pat(alice, "read")
    await alice.call("POST", "/me/password", json={"current": PASSWORD, "new": PASSWORD + "!"})
    with pytest.raises(ChatdError) as refused:
        await pat.me()
    assert refused.value.status == 401
    assert (await alice.me())["user_uuid"] == alice.user_uuid  # the login that changed it


# --- the send path's cost ------------------------------------------------------------------


async def test_the_send_path_asks_for_bots_only_where_they_may_hear(
    alice: Api, database_url: str
) -> None:
    """A chat without bots costs the MessageWriter's batch no statement more (the lock it
    takes anyway reads the chat's bot counts); a chat with socket bots only one for a "/"
    text; a chat with a webhook bot one per batch, and its delivery row."""
    from chatd.hub import Hub, LocalBus
    from chatd.integrations import BOTS_OF_CHATS
    from chatd.writer import MessageWriter

    statements: list[str] = []

    async def log_queries(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda logged: statements.append(logged.query))

    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1, init=log_queries)
    writer = MessageWriter(pool, LocalBus(Hub()))
    me = uuid.UUID(alice.user_uuid)

    async def looked_up(chat_id: int, text: str) -> int:
        statements.clear()
        await writer.store(me, chat_id, text, None)
        return sum(BOTS_OF_CHATS.strip() in q for q in statements)

    try:
        plain = await group_with(alice)
        assert await looked_up(plain["id"], "hi") == 0
        assert await looked_up(plain["id"], "/roll") == 0
        _, socket_bot = await make_bot(alice)
        with_bot = await group_with(alice, socket_bot.user_uuid)
        assert await looked_up(with_bot["id"], "hi") == 0
        assert await looked_up(with_bot["id"], "/roll") == 1
        hooked, hook_bot = await make_bot(alice, "Hooked")
        conn = await asyncpg.connect(database_url)
        try:  # .invalid never resolves: the server's queue drops the delivery, sends nothing
            await conn.execute(
                "UPDATE bots SET webhook_url = $2, webhook_secret = 's' WHERE id = $1",
                hooked["bot"]["id"],
                "https://hook.invalid/",
            )
            with_hook = await group_with(alice, hook_bot.user_uuid)
            assert await looked_up(with_hook["id"], "hi") == 1
            queued = await conn.fetchval(
                "SELECT count(*) FROM deliveries WHERE kind = 'bot_webhook' AND target = $1"
                " AND convert_from(body, 'UTF8')::jsonb ->> 'action' = 'new_message'",
                hooked["bot"]["id"],
            )
            assert queued == 1
            await conn.execute("DELETE FROM deliveries WHERE target = $1", hooked["bot"]["id"])
        finally:
            await conn.close()
    finally:
        await pool.close()
