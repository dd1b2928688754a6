"""chatd.client.Client against a real server: delivery, resume after drops, tokens, retries."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest

from chatd import auth
from chatd.client import Api, ChatdError, Client, token_lifetime
from tests.conftest import PASSWORD, Server, start_server, stop_server


class Events:
    """Collects a Client's events in the background so a test can wait for some."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.seen: list[dict[str, Any]] = []
        self._taken: set[int] = set()  # indexes in `seen` that next() returned
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for event in self.client.events():
            self.seen.append(event)
            self._arrived.set()

    def messages(self, chat_id: int | None = None) -> list[dict[str, Any]]:
        return [
            e["data"]
            for e in self.seen
            if e["action"] == "new_message" and chat_id in (None, e["data"]["chat_id"])
        ]

    async def wait(self, predicate: Any, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._arrived.clear()
                await self._arrived.wait()

    async def next(self, action: str, timeout: float = 10) -> dict[str, Any]:
        """The oldest event of `action` not taken yet, waiting for one if need be. It may
        have come before the call: the ack of the action that caused it can come later."""

        def untaken() -> list[int]:
            return [
                i for i, e in enumerate(self.seen) if e["action"] == action and i not in self._taken
            ]

        await self.wait(untaken, timeout)
        index = untaken()[0]
        self._taken.add(index)
        return self.seen[index]

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def client_for(api: Api, base_url: str) -> AsyncIterator[tuple[Client, Events]]:
    async with Client(base_url, email=api.email, password=PASSWORD, backoff_base=0.05) as c:  # type: ignore[attr-defined]
        events = Events(c)
        try:
            yield c, events
        finally:
            await events.stop()


def drop(client: Client) -> None:
    """Kill the client's connection abruptly, as a network failure would."""
    assert client.socket is not None
    client.socket.ws.transport.abort()


async def wait_reconnected(client: Client, count: int, timeout: float = 10) -> None:
    await socket_state(client, lambda: client.reconnects >= count and client.socket is not None)


async def socket_state(client: Client, predicate: Any, timeout: float = 10) -> None:
    """Wait until `predicate` holds, checked whenever the client's socket changes."""
    async with asyncio.timeout(timeout), client._socket_changed:
        await client._socket_changed.wait_for(predicate)


async def test_send_receive_create_chat_and_read_receipts(
    server: Server, alice: Api, bob: Api
) -> None:
    async with client_for(alice, server.base_url) as (a, a_events):
        async with client_for(bob, server.base_url) as (b, b_events):
            chat = await a.create_chat([bob.user_uuid], name="team")
            assert chat["type"] == "group"
            created = await b_events.next("chat_created")
            assert created["data"]["id"] == chat["id"]

            sent = await a.send(chat["id"], "hello bob")
            await b_events.wait(lambda: b_events.messages(chat["id"]))
            [got] = b_events.messages(chat["id"])
            assert got["id"] == sent["id"] and got["text"] == "hello bob"

            reply = await b.send(chat["id"], "hi alice")
            await a_events.wait(lambda: len(a_events.messages(chat["id"])) == 2)
            assert [m["id"] for m in a_events.messages(chat["id"])] == [sent["id"], reply["id"]]

            ack = await a.mark_read(reply["id"])
            assert ack == {"read_upto": {str(chat["id"]): reply["id"]}}
            receipt = await b_events.next("message_read")
            assert receipt["data"] == {"message_id": reply["id"], "chat_id": chat["id"]}

            history = await a.history(chat["id"])
            assert [m["id"] for m in history["messages"]] == [sent["id"], reply["id"]]


async def test_files_through_the_client(server: Server, alice: Api, bob: Api) -> None:
    async with (
        client_for(alice, server.base_url) as (a, _),
        client_for(bob, server.base_url) as (b, b_events),
    ):
        chat = await a.create_chat([bob.user_uuid], name="files")
        upload = await a.upload(b"a report, in bytes", "report.txt")
        sent = await a.send(chat["id"], "", attachments=[upload["upload_id"]])
        [attachment] = sent["attachments"]
        assert (attachment["id"], attachment["name"]) == (upload["upload_id"], "report.txt")
        await b_events.wait(lambda: b_events.messages(chat["id"]))
        [got] = b_events.messages(chat["id"])
        assert got["attachments"] == sent["attachments"]
        assert await b.download(attachment["id"]) == b"a report, in bytes"
        with pytest.raises(ChatdError) as caught:
            await b.download(str(uuid.uuid4()))
        assert caught.value.code == "not_found"


async def test_unread_snapshot_surfaces_once(server: Server, alice: Api, bob: Api) -> None:
    async with await alice.connect() as sock:
        chat = await sock.request("create_chat", type="private", user_ids=[bob.user_uuid])
        sent = [
            await sock.request("send_message", chat_id=chat["id"], text=f"m{n}") for n in range(3)
        ]
    async with client_for(bob, server.base_url) as (_, events):
        await events.wait(lambda: len(events.messages()) >= 3)
        assert [m["id"] for m in events.messages()] == [m["id"] for m in sent]
        # Nothing more arrives for those: the next message is the only new one.
        live = await alice_send(alice, chat["id"], "live")
        await events.wait(lambda: len(events.messages()) >= 4)
        assert [m["id"] for m in events.messages()][3:] == [live["id"]]


async def alice_send(api: Api, chat_id: int, text: str) -> dict[str, Any]:
    return await api.call("POST", f"/chats/{chat_id}/messages", json={"text": text})


async def test_reconnect_and_resume_lose_and_duplicate_nothing(
    server: Server, alice: Api, bob: Api
) -> None:
    async with client_for(alice, server.base_url) as (a, events):
        async with await bob.connect() as b:
            chat = await b.request("create_chat", type="private", user_ids=[alice.user_uuid])
            total = 60

            async def keep_sending() -> None:
                for n in range(total):
                    await b.request("send_message", chat_id=chat["id"], text=f"n{n}")

            sender = asyncio.create_task(keep_sending())
            for drops in range(1, 4):
                await events.wait(lambda d=drops: len(events.messages()) >= d * 10)
                drop(a)
                await wait_reconnected(a, drops)
            await sender

            # Away for a while: the reconnect is held back while Bob sends more and
            # creates a chat the client has never heard of.
            gate = asyncio.Event()
            original_open = a._open

            async def gated_open() -> Any:
                await gate.wait()
                return await original_open()

            a._open = gated_open  # type: ignore[method-assign]
            drop(a)
            await socket_state(a, lambda: a.socket is None)
            for n in range(5):
                await b.request("send_message", chat_id=chat["id"], text=f"away{n}")
            carol = await Api(server.base_url).register(
                "Carol", f"c-{uuid.uuid4().hex}@x.io", PASSWORD
            )
            other = await b.request(
                "create_chat",
                type="group",
                name="new",
                user_ids=[alice.user_uuid, carol["user_uuid"]],
            )
            await b.request("send_message", chat_id=other["id"], text="while you were away")
            gate.set()
            await wait_reconnected(a, 4)

            marker = await b.request("send_message", chat_id=chat["id"], text="marker")
            await events.wait(lambda: marker["id"] in [m["id"] for m in events.messages()])
            await events.wait(lambda: events.messages(other["id"]))

    seqs = [m["seq"] for m in events.messages(chat["id"])]
    assert seqs == list(range(1, total + 5 + 2))
    assert [m["text"] for m in events.messages(other["id"])] == ["while you were away"]


async def test_send_retried_after_a_lost_ack_creates_one_message(
    server: Server, alice: Api, bob: Api
) -> None:
    async with client_for(alice, server.base_url) as (a, events), await bob.connect() as b:
        chat = await a.create_chat([bob.user_uuid])

        # The same client_msg_id twice: one message.
        first = await a.send(chat["id"], "once", client_msg_id="fixed-1")
        again = await a.send(chat["id"], "once", client_msg_id="fixed-1")
        assert again["id"] == first["id"]

        # A send whose ack never arrives: the frame reaches the server, then the
        # connection dies. The client re-sends it on the next socket, same client_msg_id.
        sock = a.socket
        assert sock is not None
        original = sock.send

        async def send_then_lose_ack(frame: dict[str, Any]) -> None:
            if frame.get("action") == "send_message":
                frame = {**frame, "request_id": "lost-" + frame["request_id"]}
                await original(frame)
                while (await b.next_event("new_message"))["data"]["text"] != "lost ack":
                    pass
                sock.ws.transport.abort()
            else:
                await original(frame)

        sock.send = send_then_lose_ack  # type: ignore[method-assign]
        message = await asyncio.wait_for(a.send(chat["id"], "lost ack"), 10)
        assert a.reconnects >= 1
        history = await a.history(chat["id"])
        assert [m["text"] for m in history["messages"]] == ["once", "lost ack"]
        assert message["id"] == history["messages"][-1]["id"]
        await events.wait(lambda: len(events.messages()) == 2)
        assert [m["id"] for m in events.messages()] == [first["id"], message["id"]]
        assert b.pending_events() == []  # delivered to Bob once


def test_a_token_lives_at_least_its_ttl() -> None:
    # exp is whole seconds; rounded down, a 2-second token could live barely one.
    for ttl in (1, 2, 900):
        before = time.time()
        token = auth.issue_token("s" * 32, uuid.uuid4(), auth.ACCESS, ttl)
        exp = jwt.decode(token, options={"verify_signature": False})["exp"]
        assert before + ttl <= exp <= time.time() + ttl + 1


def test_renewal_is_scheduled_from_the_tokens_own_exp() -> None:
    def token(**claims: Any) -> str:
        return jwt.encode({"sub": "x", "typ": "access", **claims}, "s" * 32, "HS256")

    now = time.time()
    # The claim wins over expires_in, which counts from issue and ignores rounding.
    assert 50 < token_lifetime(token(exp=now + 60), 61) <= 60
    assert 830 < token_lifetime(token(exp=int(now) + 840), 900) <= 840
    # Unreadable or missing claim: expires_in; nothing at all: 15 minutes.
    assert token_lifetime("not-a-token", 2) == 2
    assert token_lifetime("a.!!!.c", 2) == 2
    assert token_lifetime(token(), 2) == 2
    assert token_lifetime(token(exp="soon"), 2) == 2
    assert token_lifetime(token(), None) == 900
    # A claim out of (0, expires_in] means the clocks disagree: trust expires_in.
    assert token_lifetime(token(exp=now - 30), 2) == 2
    assert token_lifetime(token(exp=now + 3600), 900) == 900


@pytest.fixture
async def short_ttl_server(database_url: str, tmp_path: Path) -> AsyncIterator[Server]:
    # 4 s: the client renews half-way, which leaves a loaded machine 2 s to do it.
    srv = await asyncio.to_thread(start_server, database_url, tmp_path, CHATD_ACCESS_TOKEN_TTL="4")
    yield srv
    await asyncio.to_thread(stop_server, srv)


async def test_tokens_are_refreshed_past_expiry(short_ttl_server: Server) -> None:
    base = short_ttl_server.base_url
    email = f"bot-{uuid.uuid4().hex[:8]}@example.com"
    await Api(base).register("Bot", email, PASSWORD)
    peer = await Api(base).register("Peer", f"peer-{uuid.uuid4().hex[:8]}@x.io", PASSWORD)
    async with Client(base, email=email, password=PASSWORD, backoff_base=0.05) as c:
        events = Events(c)
        first_token = c.api.access_token
        chat = await c.create_chat([peer["user_uuid"]])

        # Wait until the first access token has really expired.
        stale = Api(base, access_token=first_token)

        async def expired() -> None:
            while True:
                try:
                    await stale.me()
                except ChatdError as exc:
                    assert exc.status == 401
                    return
                await asyncio.sleep(0.2)

        await asyncio.wait_for(expired(), 30)
        assert c.renewals >= 1 and c.api.access_token != first_token
        assert (await c.history(chat["id"]))["messages"] == []  # REST with a fresh token

        # A reconnect after expiry connects with a fresh token.
        drop(c)
        await wait_reconnected(c, 1)
        sent = await c.send(chat["id"], "still here")
        await events.wait(lambda: [m["id"] for m in events.messages()] == [sent["id"]])

        # A token refused by /connect (1008) makes the client renew and carry on.
        c.api.access_token = "not-a-token"
        drop(c)
        await wait_reconnected(c, 2)
        again = await c.send(chat["id"], "and here")
        await events.wait(lambda: len(events.messages()) == 2)
        assert events.messages()[-1]["id"] == again["id"]
        await events.stop()


async def test_changes_retried_after_a_lost_ack_apply_once(
    server: Server, alice: Api, bob: Api
) -> None:
    """A react, an edit, a forward and a delete for me whose acks are lost with the socket:
    each is sent again on the next socket and applied once."""
    async with client_for(alice, server.base_url) as (a, _), await bob.connect() as b:
        chat = await a.create_chat([bob.user_uuid], name="retries")
        other = await a.create_chat([bob.user_uuid], name="elsewhere")
        message = await a.send(chat["id"], "original")
        await b.next_event("new_message")

        def lose_the_ack_of(action: str, applied: Callable[[], Awaitable[object]]) -> None:
            """The next `action` frame reaches the server and is applied (`applied` returns
            once it has seen that), then the connection dies."""
            sock = a.socket
            assert sock is not None
            original = sock.send

            async def send_then_drop(frame: dict[str, Any]) -> None:
                if frame.get("action") != action:
                    return await original(frame)
                await original({**frame, "request_id": "lost-" + frame["request_id"]})
                await applied()
                sock.ws.transport.abort()

            sock.send = send_then_drop  # type: ignore[method-assign]

        lose_the_ack_of("react", lambda: b.next_event("message_updated"))
        reacted = await a.react(message["id"], "👍")
        assert reacted["reactions"] == [{"emoji": "👍", "count": 1, "users": [alice.user_uuid]}]

        lose_the_ack_of("edit_message", lambda: b.next_event("message_updated"))
        assert (await a.edit(message["id"], "edited"))["text"] == "edited"
        assert [e["text"] for e in await a.edits(message["id"])] == ["original"]

        lose_the_ack_of("forward_message", lambda: b.next_event("new_message"))
        forwarded = await a.forward(message["id"], other["id"])
        history = await a.history(other["id"])
        assert [m["id"] for m in history["messages"]] == [forwarded["id"]]

        async def hidden_for_alice() -> None:
            while True:
                try:
                    await alice.call("GET", f"/messages/{message['id']}")
                except ChatdError as exc:
                    assert exc.code == "not_found"
                    return
                await asyncio.sleep(0.02)

        lose_the_ack_of("delete_message", hidden_for_alice)
        hidden = await a.delete(message["id"], for_everyone=False)
        assert hidden == {"chat_id": chat["id"], "message_id": message["id"], "for_everyone": False}
        assert a.reconnects == 4
        assert (await a.history(chat["id"]))["messages"] == []


async def test_presence_search_and_mute(server: Server, alice: Api, bob: Api) -> None:
    async with client_for(alice, server.base_url) as (a, _):
        async with client_for(bob, server.base_url) as (b, b_events):
            chat = await a.create_chat([bob.user_uuid], type="private")
            seen = await b.presence([alice.user_uuid, bob.user_uuid])
            assert seen[alice.user_uuid]["status"] == "online" and bob.user_uuid in seen
            sent = await a.send(chat["id"], "Приветы из клиента")
            found = await b.search("привет")
            assert [r["message"]["id"] for r in found["results"]] == [sent["id"]]
            assert (await bob.search("привет", chat_id=chat["id"]))["results"] == found["results"]
            until = datetime(2100, 1, 1, tzinfo=UTC)
            muted = await b.mute(chat["id"], until, notify="mentions")
            assert muted["notify"] == "mentions" and muted["mute_until"].startswith("2100-01-01")
            changed = await b_events.next("notifications_changed")
            assert changed["data"] == muted
            assert (await bob.mute(chat["id"]))["mute_until"] is None
            assert (await bob.user(alice.user_uuid))["presence"]["status"] == "online"
