"""Bots' outgoing webhooks (through the delivery queue, to a real local HTTP receiver) and
chats' incoming webhooks, against real servers."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from starlette.responses import JSONResponse, Response

from chatd import signing
from chatd.client import Api, ChatdError
from tests.conftest import (
    PASSWORD,
    Server,
    free_port,
    fresh_database,
    new_user,
    start_server,
    stop_server,
)
from tests.receiver import Received, Receiver
from tests.test_bots import group_with, make_bot

# Webhook receivers here listen on 127.0.0.1: this server lets chatd reach it.
HOOK_ENV = {
    "CHATD_OUTBOUND_ALLOW_PRIVATE": "true",
    "CHATD_DELIVERY_RETRY_MS": "100",
    "CHATD_DELIVERY_TIMEOUT": "2",
}


@pytest.fixture(scope="module")
def hook_server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with fresh_database(database_url) as own:
        server = start_server(own, tmp_path_factory.mktemp("hooks"), **HOOK_ENV)
        yield server
        stop_server(server)


def event_of(received: Received) -> dict[str, Any]:
    return json.loads(received.body)


async def webhook_bot(owner: Api, url: str) -> tuple[dict[str, Any], Api, bytes]:
    made, bot = await make_bot(owner, "Dice")
    patched = await owner.call("PATCH", f"/bots/{made['bot']['id']}", json={"webhook_url": url})
    assert patched["webhook_url"] == url and patched["webhook_secret"]
    await owner.call(
        "PUT", f"/bots/{made['bot']['id']}/commands", json={"commands": [{"name": "roll"}]}
    )
    return made, bot, patched["webhook_secret"].encode()


async def test_a_webhook_bot_answers_a_command_in_its_chat(hook_server: Server) -> None:
    alice, bob = await new_user(hook_server, "Alice"), await new_user(hook_server, "Bob")

    def answer(received: Received) -> Response:
        event = event_of(received)
        if event["action"] == "command":
            return JSONResponse({"text": f"rolled {event['data']['args']}: 4"})
        return JSONResponse({})

    async with Receiver(answer) as receiver:
        made, bot, secret = await webhook_bot(alice, receiver.url("/dice"))
        chat = await group_with(alice, bob.user_uuid, bot.user_uuid)
        async with await bob.connect() as sock:
            sent = await bob.call(
                "POST", f"/chats/{chat['id']}/messages", json={"text": "/roll 1d6"}
            )
            while True:
                event = await sock.next_event("new_message")
                if event["data"]["sender_uuid"] == bot.user_uuid:
                    break
        assert event["data"]["text"] == "rolled 1d6: 4"
        received = await receiver.wait_for(2)  # chat_created, then the command
        assert [event_of(r)["action"] for r in received] == ["chat_created", "command"]
        for r in received:
            assert signing.verify(secret, r.body, r.headers)
            assert not signing.verify(b"another secret", r.body, r.headers)
            assert r.headers["content-type"] == "application/json"
        command = event_of(received[1])["data"]
        assert command["command"] == "roll" and command["message"]["id"] == sent["id"]
        # The same Struct as on the socket: a new message is a new_message event.
        await alice.call("POST", f"/chats/{chat['id']}/messages", json={"text": "plain"})
        (plain,) = [r for r in await receiver.wait_for(3) if r not in received]
        assert event_of(plain) == {"action": "new_message", "data": event_of(plain)["data"]}
        assert event_of(plain)["data"]["text"] == "plain"

        listed = await alice.call("GET", f"/bots/{made['bot']['id']}/deliveries")
        assert [d["event"] for d in listed["deliveries"]][-2:] == ["command", "chat_created"]
        assert all(d["chat_id"] == chat["id"] for d in listed["deliveries"])
        assert listed["deliveries"][-1]["state"] == "delivered"
        with pytest.raises(ChatdError) as refused:
            await bob.call("GET", f"/bots/{made['bot']['id']}/deliveries")
        assert refused.value.status == 404


async def test_a_retried_delivery_posts_its_reply_once(hook_server: Server) -> None:
    """The receiver answers the text but the first answer is lost (a 500 after the reply
    was computed): the retry carries the same delivery id and the reply is posted once."""
    alice = await new_user(hook_server, "Alice")
    answered: list[str] = []

    def answer(received: Received) -> Response:
        event = event_of(received)
        if event["action"] != "command":
            return JSONResponse({})
        answered.append(received.headers[signing.DELIVERY.lower()])
        return JSONResponse({"text": "pong"}, status_code=500 if len(answered) == 1 else 200)

    async with Receiver(answer) as receiver:
        _, bot, _ = await webhook_bot(alice, receiver.url("/"))
        await alice.call(
            "PUT",
            f"/bots/{(await bot.me())['bot_id']}/commands",
            json={"commands": [{"name": "ping"}]},
        )
        chat = await group_with(alice, bot.user_uuid)
        await alice.call("POST", f"/chats/{chat['id']}/messages", json={"text": "/ping"})
        for _ in range(300):  # a busy machine (CI) may take seconds for the retry
            if len(answered) >= 2:
                break
            await asyncio.sleep(0.05)
        assert len(answered) == 2 and answered[0] == answered[1]
        await asyncio.sleep(0.3)
        history = await alice.call("GET", f"/history/{chat['id']}")
        replies = [m for m in history["messages"] if m["sender_uuid"] == bot.user_uuid]
        assert [m["text"] for m in replies] == ["pong"]
        assert replies[0]["client_msg_id"] == f"delivery-{answered[0]}"


async def test_membership_changes_reach_the_webhook(hook_server: Server) -> None:
    alice, bob = await new_user(hook_server, "Alice"), await new_user(hook_server, "Bob")
    async with Receiver() as receiver:
        _, bot, _ = await webhook_bot(alice, receiver.url("/"))
        chat = await group_with(alice, bot.user_uuid)
        await alice.call("POST", f"/chats/{chat['id']}/members", json={"user_ids": [bob.user_uuid]})
        await alice.call("DELETE", f"/chats/{chat['id']}/members/{bob.user_uuid}")
        await alice.call("DELETE", f"/chats/{chat['id']}/members/{bot.user_uuid}")
        received = await receiver.wait_for(4)
        assert [event_of(r)["action"] for r in received] == [
            "chat_created",
            "member_added",
            "member_removed",
            "member_removed",
        ]
        assert event_of(received[-1])["data"]["user_uuid"] == bot.user_uuid
        # Out of the chat: its messages are not the bot's any more.
        await alice.call("POST", f"/chats/{chat['id']}/messages", json={"text": "gone?"})
        await asyncio.sleep(0.5)
        assert len(receiver.requests) == 4


async def test_a_webhook_set_later_hears_the_chats_the_bot_is_in(hook_server: Server) -> None:
    """Setting (and removing) the webhook of a bot already in chats recounts them."""
    alice = await new_user(hook_server, "Alice")
    made, bot = await make_bot(alice)
    chat = await group_with(alice, bot.user_uuid)
    path = f"/bots/{made['bot']['id']}"
    async with Receiver() as receiver:
        await alice.call("PATCH", path, json={"webhook_url": receiver.url("/")})
        await alice.call("POST", f"/chats/{chat['id']}/messages", json={"text": "heard"})
        (received,) = await receiver.wait_for(1)
        assert event_of(received)["data"]["text"] == "heard"
        removed = await alice.call("PATCH", path, json={"webhook_url": ""})
        assert (removed["webhook_url"], removed["webhook_secret"]) == (None, None)
        await alice.call("POST", f"/chats/{chat['id']}/messages", json={"text": "unheard"})
        await asyncio.sleep(0.5)
        assert len(receiver.requests) == 1


async def test_webhook_urls_must_be_public_by_default(alice: Api) -> None:
    made, _ = await make_bot(alice)
    for url in (
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://10.0.0.1/",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/",
        "ftp://example.com/",
        "http://user:pass@example.com/",
    ):
        with pytest.raises(ChatdError) as refused:
            await alice.call("PATCH", f"/bots/{made['bot']['id']}", json={"webhook_url": url})
        assert refused.value.code == "invalid", url
    assert (await alice.call("GET", f"/bots/{made['bot']['id']}"))["webhook_url"] is None


async def test_a_chat_without_webhook_bots_counts_none(alice: Api, database_url: str) -> None:
    _, bot = await make_bot(alice)  # a socket bot: no webhook
    chat = await group_with(alice, bot.user_uuid)
    for text in ("a", "/roll"):
        await alice.call("POST", f"/chats/{chat['id']}/messages", json={"text": text})
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT bots, hooks FROM chats WHERE id = $1", chat["id"])
        assert (row["bots"], row["hooks"]) == (1, 0)
    finally:
        await conn.close()


# --- kill -9 with deliveries pending ------------------------------------------------------


@pytest.fixture
def own_database(database_url: str) -> Iterator[str]:
    with fresh_database(database_url) as own:
        yield own


async def test_kill_9_with_pending_deliveries_loses_none(own_database: str, tmp_path: Path) -> None:
    """The receiver refuses (503) while messages pile up; chatd is killed with -9 mid-way
    through its retries; once restarted and the receiver answers, every message reaches the
    webhook, in order, and the bot's replies are posted once each."""
    accepting = asyncio.Event()
    delivered: dict[str, dict[str, Any]] = {}  # delivery id -> event, first 200 answer
    order: list[str] = []

    def answer(received: Received) -> Response:
        if not accepting.is_set():
            return Response(status_code=503)
        delivery = received.headers[signing.DELIVERY.lower()]
        event = event_of(received)
        if delivery not in delivered:
            delivered[delivery] = event
            order.append(delivery)
        if event["action"] == "new_message":
            return JSONResponse({"text": f"seen {event['data']['text']}"})
        return JSONResponse({})

    port = free_port()
    env = {**HOOK_ENV, "CHATD_DELIVERY_TIMEOUT": "1"}
    server = start_server(own_database, tmp_path, port, **env)
    count = 30
    async with Receiver(answer) as receiver:
        try:
            alice = await new_user(server, "Alice")
            _, bot, _ = await webhook_bot(alice, receiver.url("/"))
            chat = await group_with(alice, bot.user_uuid)
            for n in range(count):
                await alice.call("POST", f"/chats/{chat['id']}/messages", json={"text": f"m{n}"})
            await receiver.wait_for(3)  # attempts are being made (and refused)
            server.process.send_signal(signal.SIGKILL)
            server.process.wait(10)
        finally:
            stop_server(server)
        accepting.set()
        server = start_server(own_database, tmp_path, port, **env)
        try:
            for _ in range(600):
                if len(delivered) >= count + 1:
                    break
                await asyncio.sleep(0.1)
            texts = [
                delivered[d]["data"]["text"]
                for d in order
                if delivered[d]["action"] == "new_message"
            ]
            assert texts == [f"m{n}" for n in range(count)]
            await asyncio.sleep(0.5)
            history = await bot.call("GET", f"/history/{chat['id']}", params={"page_size": 200})
            replies = sorted(
                m["text"] for m in history["messages"] if m["sender_uuid"] == bot.user_uuid
            )
            assert replies == sorted(f"seen m{n}" for n in range(count))
        finally:
            stop_server(server)


# --- incoming webhooks ---------------------------------------------------------------------


async def test_an_incoming_webhook_posts_as_its_bot(server: Server, alice: Api, bob: Api) -> None:
    chat = await group_with(alice, bob.user_uuid)
    hook = await alice.call("POST", f"/chats/{chat['id']}/webhooks", json={"name": "CI"})
    assert hook["url"].startswith(f"/hooks/{hook['id']}/")
    async with httpx.AsyncClient(base_url=server.base_url) as http, await alice.connect() as sock:
        posted = await http.post(hook["url"], json={"text": "build #7 passed", "username": "x"})
        assert posted.status_code == 200, posted.text
        event = await sock.next_event("new_message")
        assert event["data"]["text"] == "build #7 passed"
        assert event["data"]["sender_uuid"] == hook["bot_uuid"]
        members = (await alice.call("GET", f"/chats/{chat['id']}"))["members"]
        assert {m["user_uuid"]: m.get("is_bot") for m in members}[hook["bot_uuid"]] is True
        # Idempotency-Key: a retried post is the same message.
        key = {"Idempotency-Key": str(uuid.uuid4())}
        first = await http.post(hook["url"], json={"text": "once"}, headers=key)
        again = await http.post(hook["url"], json={"text": "once"}, headers=key)
        assert first.json()["id"] == again.json()["id"]
        # A wrong secret is a webhook that does not exist.
        wrong = await http.post(f"/hooks/{hook['id']}/not-the-secret", json={"text": "x"})
        unknown = await http.post(f"/hooks/{2**62}/not-the-secret", json={"text": "x"})
        assert wrong.status_code == unknown.status_code == 404
        assert wrong.json() == unknown.json()

        listed = (await alice.call("GET", f"/chats/{chat['id']}/webhooks"))["webhooks"]
        assert [(h["id"], h["url"]) for h in listed] == [(hook["id"], None)]
        with pytest.raises(ChatdError) as refused:  # a plain member, not its creator
            await bob.call("DELETE", f"/chats/{chat['id']}/webhooks/{hook['id']}")
        assert refused.value.code == "forbidden"
        await alice.call("DELETE", f"/chats/{chat['id']}/webhooks/{hook['id']}")
        gone = await http.post(hook["url"], json={"text": "after"})
        assert gone.status_code == 404
    assert "[redacted]" in server.log() and hook["url"].split("/")[-1] not in server.log()


async def test_an_incoming_webhook_stops_when_its_creator_leaves(
    server: Server, alice: Api, bob: Api
) -> None:
    chat = await group_with(alice, bob.user_uuid)
    hook = await bob.call("POST", f"/chats/{chat['id']}/webhooks", json={"name": "Bob's CI"})
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        assert (await http.post(hook["url"], json={"text": "before"})).status_code == 200
        await alice.call("DELETE", f"/chats/{chat['id']}/members/{bob.user_uuid}")
        after = await http.post(hook["url"], json={"text": "after"})
    assert after.status_code == 404
    history = await alice.call("GET", f"/history/{chat['id']}")
    assert [m["text"] for m in history["messages"]] == ["before"]


async def test_an_incoming_webhook_stops_with_its_creators_account(
    server: Server, alice: Api, make_user: Any
) -> None:
    carol = await make_user("Carol")
    chat = await alice.call(
        "POST", "/chats", json={"type": "private", "user_ids": [carol.user_uuid]}
    )
    hook = await carol.call("POST", f"/chats/{chat['id']}/webhooks", json={"name": "Cron"})
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        assert (await http.post(hook["url"], json={"text": "before"})).status_code == 200
        await carol.call("DELETE", "/me", json={"password": PASSWORD})
        after = await http.post(hook["url"], json={"text": "after"})
    assert after.status_code == 404


async def test_incoming_webhooks_are_rate_limited(database_url: str, tmp_path: Path) -> None:
    server = start_server(database_url, tmp_path, CHATD_HOOK_RATE="3/min")
    try:
        alice = await new_user(server, "Alice")
        chat = await alice.call(
            "POST", "/chats", json={"type": "group", "name": "CI", "user_ids": []}
        )
        hook = await alice.call("POST", f"/chats/{chat['id']}/webhooks", json={})
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            codes = [
                (await http.post(hook["url"], json={"text": f"{n}"})).status_code for n in range(5)
            ]
        assert codes == [200, 200, 200, 429, 429]
    finally:
        stop_server(server)
