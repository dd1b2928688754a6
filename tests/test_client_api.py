"""chatd.client's building blocks against a real server: Api's one HTTP client, Socket's
public API, and typed events (with the fallback for frames this client does not know)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as redis

from chatd.client import (
    Api,
    Client,
    ConnectionLost,
    Frame,
    Socket,
    TokenRefused,
)
from chatd.protocol import (
    Chat,
    ChatCreated,
    ChatUpdated,
    Message,
    MessageHidden,
    MessageRead,
    MessageUpdated,
    NewMessage,
    TypingEvent,
    UnreadMessages,
)
from chatd.redis_bus import EVENTS, Envelope
from tests.conftest import PASSWORD, Server, start_server, stop_server

# --- Api: one HTTP client --------------------------------------------------------------


def record_connections(api: Api) -> list[tuple[str, int]]:
    """The local address of the TCP connection each later response of `api` came on."""
    seen: list[tuple[str, int]] = []

    async def on_response(response: httpx.Response) -> None:
        seen.append(response.extensions["network_stream"].get_extra_info("client_addr"))

    api.http.event_hooks["response"].append(on_response)
    return seen


async def test_an_api_makes_every_call_through_one_client_and_connection(alice: Api) -> None:
    assert alice.http is alice.http
    connections = record_connections(alice)
    await alice.me()
    await alice.chats()
    await alice.users(limit=5)
    assert len(connections) == 3 and len(set(connections)) == 1

    # Closed, the Api stays usable: the next call opens a new client.
    closed = alice.http
    await alice.aclose()
    assert closed.is_closed
    assert (await alice.me())["user_uuid"] == alice.user_uuid
    assert alice.http is not closed


async def test_an_api_as_a_context_manager_closes_its_client(server: Server, alice: Api) -> None:
    async with Api(server.base_url, alice.access_token) as api:
        assert (await api.me())["user_uuid"] == alice.user_uuid
        http = api.http
    assert http.is_closed


async def test_an_api_made_in_another_event_loop_works_in_this_one(
    server: Server, alice: Api
) -> None:
    """As tests/test_authorization.py does: users made in one asyncio.run, used in the test's
    event loop. The client of the finished loop is left to the garbage collector."""

    async def elsewhere() -> tuple[Api, httpx.AsyncClient]:
        api = Api(server.base_url)
        await api.login(alice.email, PASSWORD)  # type: ignore[attr-defined]
        return api, api.http

    api, there = await asyncio.to_thread(asyncio.run, elsewhere())
    async with api:
        assert (await api.me())["user_uuid"] == alice.user_uuid
        assert api.http is not there


async def test_closing_a_client_closes_its_api(server: Server, alice: Api) -> None:
    async with Client(server.base_url, email=alice.email, password=PASSWORD) as c:  # type: ignore[attr-defined]
        http = c.api.http
        assert not http.is_closed
    assert http.is_closed


# --- Socket ----------------------------------------------------------------------------


async def test_a_refused_token_is_told_apart_from_a_lost_connection(server: Server) -> None:
    with pytest.raises(TokenRefused) as refused:
        await Socket.open(server.ws_url, "not-a-token", timeout=5)
    assert refused.value.code == "unauthorized"
    assert not isinstance(refused.value, ConnectionLost)


async def test_a_dropped_socket_hands_over_what_it_read_then_raises_connection_lost(
    alice: Api, bob: Api
) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        assert not b.closed and b.close_code is None
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        sent = [await a.request("send_message", chat_id=chat["id"], text=text) for text in "xy"]
        # Bob's reply comes after the events queued for him before it: they are read.
        await b.request("list_chats")

        b.ws.transport.abort()  # the network drops
        assert await b.wait_closed() == 1006
        assert b.closed

        assert (await b.next_event("chat_created"))["data"] == chat
        got = [event["data"] async for event in b.events()]
        assert got == sent
        with pytest.raises(ConnectionLost):
            await b.next_event(timeout=5)  # at once, not after the timeout
        with pytest.raises(ConnectionLost):
            await b.request("list_chats")
        assert b.pending_events() == []


async def test_a_request_in_flight_when_the_socket_drops_raises_connection_lost(
    alice: Api,
) -> None:
    sock = await alice.connect()
    sock.ws.transport.pause_reading()  # the reply stays in the kernel until the drop
    asking = asyncio.create_task(sock.request("list_chats"))
    for _ in range(3):
        await asyncio.sleep(0)  # the request goes out
    assert not asking.done()
    sock.ws.transport.abort()
    with pytest.raises(ConnectionLost):
        await asking
    await sock.abort()  # closing a closed socket is fine
    assert sock.closed


async def test_abort_closes_a_live_socket(alice: Api) -> None:
    sock = await alice.connect()
    await sock.abort()
    assert sock.closed and sock.close_code == 1000


# --- typed events ----------------------------------------------------------------------


async def test_events_are_dicts_with_a_typed_view(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        assert isinstance(b.unread, Frame) and isinstance(b.unread.typed, UnreadMessages)
        assert b.unread.typed.data == [] and b.unread == {
            "action": "unread_messages",
            "data": [],
            "has_more": False,
        }

        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        created = await b.next_event("chat_created")
        assert created == {"action": "chat_created", "data": chat}  # the raw frame
        assert isinstance(created.typed, ChatCreated) and isinstance(created.typed.data, Chat)
        assert created.typed.data.id == chat["id"] and created.typed is created.typed

        sent = await a.request("send_message", chat_id=chat["id"], text="typed")
        event = await b.next_event("new_message")
        assert event["data"] == sent
        match event.typed:
            case NewMessage(data=Message(id=message_id, text="typed", timestamp=at)):
                assert message_id == sent["id"] and isinstance(at, datetime)
            case other:
                pytest.fail(f"not a NewMessage: {other!r}")

        await b.request("mark_read", message_ids=[sent["id"]])
        receipt = await a.next_event("message_read")
        assert isinstance(receipt.typed, MessageRead)
        assert receipt.typed.data.message_id == sent["id"]

        await a.request("typing", chat_id=chat["id"])
        typing = await b.next_event("typing")
        assert isinstance(typing.typed, TypingEvent)
        assert typing.typed.data.user_uuid == alice.user_uuid


async def test_changes_to_messages_are_typed(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await a.request("create_chat", type="group", name="t", user_ids=[bob.user_uuid])
        sent = await a.request("send_message", chat_id=chat["id"], text="x")
        await a.request("edit_message", message_id=sent["id"], text="y")
        updated = await b.next_event("message_updated")
        assert isinstance(updated.typed, MessageUpdated) and updated.typed.data.text == "y"
        await a.request("pin_message", message_id=sent["id"])
        pin = await b.next_event("chat_updated")
        assert isinstance(pin.typed, ChatUpdated)
        assert pin.typed.data.pinned_message_id == sent["id"]
        await b.request("delete_message", message_id=sent["id"], for_everyone=False)
        hidden = await b.next_event("message_hidden")
        assert isinstance(hidden.typed, MessageHidden)
        assert hidden.typed.data.message_id == sent["id"]
        assert Frame(action="sync_too_long", data={"chat_id": 1}).typed is None  # the client's


def test_a_frame_this_client_cannot_read_has_no_typed_view() -> None:
    newer = Frame(action="reaction_added", data={"message_id": 1, "emoji": "+1"})
    assert newer.typed is None and newer["data"]["emoji"] == "+1"
    reshaped = Frame(action="new_message", data={"id": "not a message"})
    assert reshaped.typed is None
    typing = Frame(action="typing", data={"chat_id": 1, "user_uuid": "u"}).typed
    assert isinstance(typing, TypingEvent) and typing.data.chat_id == 1


# A node of a newer chatd in the same cluster sends events this client has never heard
# of: Redis carries each event's text as is, so publishing one plays that node.


@pytest.fixture(scope="module")
def redis_node(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    node = start_server(database_url, tmp_path_factory.mktemp("newer"), CHATD_REDIS_URL=redis_url)
    yield node
    stop_server(node)
    assert "Traceback" not in node.log(), node.log()


async def publish_frame(redis_url: str, user_uuid: str, frame: Any) -> None:
    """Deliver `frame` (encoded as JSON unless it is a str) to every socket of a user."""
    text = frame if isinstance(frame, str) else msgspec.json.encode(frame).decode()
    recipients = uuid.UUID(user_uuid).bytes
    envelope = Envelope(origin="a-newer-node", recipients=recipients, text=text)
    client = redis.Redis.from_url(redis_url)
    try:
        await client.publish(EVENTS, msgspec.msgpack.encode(envelope))
    finally:
        await client.aclose()


NEWER_EVENT = {"action": "reaction_added", "data": {"message_id": 1, "emoji": "+1"}}


async def test_a_socket_passes_unknown_frames_on_untyped(
    redis_node: Server, redis_url: str, alice: Api, bob: Api
) -> None:
    api = Api(redis_node.base_url)
    await api.login(alice.email, PASSWORD)  # type: ignore[attr-defined]
    async with api, await api.connect() as sock:
        await publish_frame(redis_url, str(alice.user_uuid), "[1, 2]")  # not an object: skipped
        await publish_frame(redis_url, str(alice.user_uuid), NEWER_EVENT)
        event = await sock.next_event()
        assert event == NEWER_EVENT and event.typed is None
        # And the socket goes on as before.
        chat = await sock.request("create_chat", type="private", user_ids=[bob.user_uuid])
        assert (await sock.next_event("chat_created")).typed == ChatCreated(
            msgspec.convert(chat, Chat)
        )


async def test_a_client_passes_unknown_frames_on_and_keeps_working(
    redis_node: Server, redis_url: str, alice: Api, bob: Api
) -> None:
    email = alice.email  # type: ignore[attr-defined]
    bob_there = Api(redis_node.base_url, bob.access_token)  # live events reach the node
    async with Client(redis_node.base_url, email=email, password=PASSWORD) as c, bob_there:
        events = c.events()
        await publish_frame(redis_url, str(alice.user_uuid), NEWER_EVENT)
        event = await asyncio.wait_for(anext(events), 10)
        assert event == NEWER_EVENT and event.typed is None

        chat = await bob_there.call(
            "POST", "/chats", json={"type": "private", "user_ids": [alice.user_uuid]}
        )
        sent = await bob_there.call(
            "POST", f"/chats/{chat['id']}/messages", json={"text": "still?"}
        )
        kinds = []
        while not kinds or kinds[-1] is not NewMessage:
            event = await asyncio.wait_for(anext(events), 10)
            kinds.append(type(event.typed))
        assert kinds == [ChatCreated, NewMessage]
        assert event.typed == NewMessage(msgspec.convert(sent, Message))
        assert event["data"] == sent
        assert c.socket is not None and c.reconnects == 0
        await events.aclose()
