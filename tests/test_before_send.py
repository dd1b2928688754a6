"""The before-send hook (CHATD_BEFORE_SEND_URL) against a real local HTTP receiver.

Two chatd servers for the module, both pointing at a fixed port where each test runs its
own Receiver (tests/receiver.py): one fail-closed (the default), one fail-open.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator

import httpx
import pytest
from starlette.responses import JSONResponse, Response

from chatd import signing
from chatd.client import Api, ChatdError
from tests.conftest import (
    Server,
    assert_no_tracebacks,
    free_port,
    new_user,
    start_server,
    stop_server,
)
from tests.receiver import Received, Receiver

TIMEOUT_MS = 400
HOOK_SECRET = "hook-secret-" + "h" * 30


@pytest.fixture(scope="module")
def hook_port() -> int:
    return free_port()


def _server(database_url: str, workdir, port: int, fail_open: bool) -> Server:  # type: ignore[no-untyped-def]
    return start_server(
        database_url,
        workdir,
        CHATD_BEFORE_SEND_URL=f"http://127.0.0.1:{port}/before-send",
        CHATD_BEFORE_SEND_TIMEOUT_MS=str(TIMEOUT_MS),
        CHATD_BEFORE_SEND_FAIL_OPEN="true" if fail_open else "false",
        CHATD_BEFORE_SEND_SECRET=HOOK_SECRET,
    )


@pytest.fixture(scope="module")
def hooked(
    database_url: str, tmp_path_factory: pytest.TempPathFactory, hook_port: int
) -> Iterator[Server]:
    server = _server(database_url, tmp_path_factory.mktemp("hooked"), hook_port, False)
    yield server
    stop_server(server)
    assert_no_tracebacks(server)


@pytest.fixture(scope="module")
def hooked_open(
    database_url: str, tmp_path_factory: pytest.TempPathFactory, hook_port: int
) -> Iterator[Server]:
    server = _server(database_url, tmp_path_factory.mktemp("hooked-open"), hook_port, True)
    yield server
    stop_server(server)
    assert_no_tracebacks(server)


async def pair(server: Server) -> tuple[Api, Api, int]:
    ada, bob = await new_user(server, "Ada"), await new_user(server, "Bob")
    chat = await ada.call("POST", "/chats", json={"type": "private", "user_ids": [bob.user_uuid]})
    return ada, bob, chat["id"]


async def send(api: Api, chat_id: int, text: str, client_msg_id: str | None = None) -> dict:
    body = {"text": text, "client_msg_id": client_msg_id or uuid.uuid4().hex}
    return await api.call("POST", f"/chats/{chat_id}/messages", json=body)


async def texts(api: Api, chat_id: int) -> list[str]:
    return [m["text"] for m in (await api.history(chat_id))["messages"]]


def moderator(received: Received) -> Response:
    """Rejects "spam", rewrites "darn" to "d**n", sleeps on "slow", answers 500 on
    "broken", rewrites "empty" to nothing and "nul" to a NUL, answers too much for "huge",
    an unknown action for "odd" and HTML for "not json"; allows the rest (with an empty
    body for "quiet")."""
    text = json.loads(received.body)["text"]
    if "spam" in text:
        return JSONResponse({"action": "reject", "reason": "no spam here, please"})
    if "darn" in text:
        return JSONResponse({"action": "rewrite", "text": text.replace("darn", "d**n")})
    if text == "empty":
        return JSONResponse({"action": "rewrite", "text": "   "})
    if text == "broken":
        return JSONResponse({"error": "oops"}, 500)
    if text == "quiet":
        return Response(status_code=204)
    if text == "nul":
        return JSONResponse({"action": "rewrite", "text": "a\x00b"})
    if text == "huge":
        return JSONResponse({"action": "allow", "pad": "x" * 100_000})
    if text == "odd":
        return JSONResponse({"action": "shrug"})
    if text == "not json":
        return Response(b"<html>oops</html>", media_type="text/html")
    return JSONResponse({"action": "allow"})


async def slow_moderator(received: Received) -> Response:
    if json.loads(received.body)["text"] == "slow":
        await asyncio.sleep(TIMEOUT_MS / 1000 * 3)
    return moderator(received)


async def test_allow_reject_rewrite(hooked: Server, hook_port: int) -> None:
    ada, bob, chat_id = await pair(hooked)
    async with Receiver(slow_moderator, port=hook_port) as hook:
        await send(ada, chat_id, "hello", "c1")
        (call,) = await hook.wait_for(1)
        assert call.path == "/before-send"
        assert signing.verify(HOOK_SECRET.encode(), call.body, call.headers)
        payload = json.loads(call.body)
        assert payload["type"] == "before_send"
        assert {k: payload[k] for k in ("chat_id", "chat_type", "sender_uuid", "text")} == {
            "chat_id": chat_id,
            "chat_type": "private",
            "sender_uuid": ada.user_uuid,
            "text": "hello",
        }
        assert payload["client_msg_id"] == "c1" and payload["forwarded"] is False

        with pytest.raises(ChatdError) as refused:
            await send(ada, chat_id, "buy spam now")
        assert (refused.value.status, refused.value.code) == (403, "rejected")
        assert refused.value.message == "no spam here, please"

        stored = await send(ada, chat_id, "oh darn it")
        assert stored["text"] == "oh d**n it"
        await send(ada, chat_id, "quiet")

        # On the socket: the same error code, and the rewritten text in the event.
        async with await bob.connect() as bob_socket, await ada.connect() as ada_socket:
            with pytest.raises(ChatdError) as refused:
                await ada_socket.request(
                    "send_message", chat_id=chat_id, text="spam again", client_msg_id="s1"
                )
            assert refused.value.code == "rejected"
            await ada_socket.request(
                "send_message", chat_id=chat_id, text="darn socket", client_msg_id="s2"
            )
            event = await bob_socket.next_event("new_message")
            assert event["data"]["text"] == "d**n socket"
    assert await texts(bob, chat_id) == ["hello", "oh d**n it", "quiet", "d**n socket"]
    await ada.aclose()
    await bob.aclose()


async def test_fail_closed(hooked: Server, hook_port: int) -> None:
    """A hook that times out, errs or answers nonsense: the send is refused with
    `unavailable`, nothing is stored, and a retry with the same client_msg_id stores it
    once when the hook answers again."""
    ada, bob, chat_id = await pair(hooked)
    async with Receiver(slow_moderator, port=hook_port):
        for text in ("slow", "broken", "empty", "nul", "huge", "odd", "not json"):
            started = asyncio.get_running_loop().time()
            with pytest.raises(ChatdError) as refused:
                await send(ada, chat_id, text, f"retry-{text}")
            assert (refused.value.status, refused.value.code) == (503, "unavailable"), text
            assert asyncio.get_running_loop().time() - started < TIMEOUT_MS / 1000 + 1
        assert await texts(ada, chat_id) == []
    # Nothing listens at all now: refused the same way.
    with pytest.raises(ChatdError) as refused:
        await send(ada, chat_id, "hello", "retry-down")
    assert refused.value.code == "unavailable"
    async with Receiver(moderator, port=hook_port) as hook:
        await send(ada, chat_id, "hello", "retry-down")
        again = await send(ada, chat_id, "hello", "retry-down")  # a retry: not asked again
        assert again["text"] == "hello"
        assert len(hook.requests) == 1
    assert await texts(ada, chat_id) == ["hello"]
    await ada.aclose()
    await bob.aclose()


async def test_fail_open(hooked_open: Server, hook_port: int) -> None:
    ada, bob, chat_id = await pair(hooked_open)
    async with Receiver(slow_moderator, port=hook_port):
        await send(ada, chat_id, "slow")
        await send(ada, chat_id, "broken")
        with pytest.raises(ChatdError) as refused:  # an answer still counts when there is one
            await send(ada, chat_id, "spam")
        assert refused.value.code == "rejected"
    await send(ada, chat_id, "nobody listens")
    assert await texts(ada, chat_id) == ["slow", "broken", "nobody listens"]
    await ada.aclose()
    await bob.aclose()


async def test_the_hook_never_hears_of_a_chat_the_sender_is_not_in(
    hooked: Server, hook_port: int
) -> None:
    ada, bob, chat_id = await pair(hooked)
    eve = await new_user(hooked, "Eve")
    async with Receiver(moderator, port=hook_port) as hook:
        for target in (chat_id, 10**12):
            with pytest.raises(ChatdError) as refused:
                await send(eve, target, "spam")
            assert refused.value.code == "not_found"
        assert hook.requests == []
    for api in (ada, bob, eve):
        await api.aclose()


async def test_latency_is_in_the_metrics(hooked: Server, hook_port: int) -> None:
    ada, bob, chat_id = await pair(hooked)
    async with Receiver(slow_moderator, port=hook_port):
        await send(ada, chat_id, "measured")
        with pytest.raises(ChatdError):
            await send(ada, chat_id, "slow")
    async with httpx.AsyncClient() as http:
        text = (await http.get(hooked.base_url + "/metrics")).text
    assert 'chatd_before_send_seconds_count{outcome="allow"}' in text
    assert 'chatd_before_send_seconds_count{outcome="timeout"}' in text
    await ada.aclose()
    await bob.aclose()


async def test_edits_go_through_the_hook_too(hooked: Server, hook_port: int) -> None:
    """Else "hello" could be edited into what the hook would have refused."""
    ada, bob, chat_id = await pair(hooked)
    async with Receiver(moderator, port=hook_port) as hook:
        message = await send(ada, chat_id, "hello")
        path = f"/messages/{message['id']}"
        with pytest.raises(ChatdError) as refused:
            await ada.call("PATCH", path, json={"text": "spam now"})
        assert (refused.value.code, refused.value.message) == ("rejected", "no spam here, please")
        edited = await ada.call("PATCH", path, json={"text": "darn"})
        assert edited["text"] == "d**n"
        payload = json.loads(hook.requests[-1].body)
        assert (payload["edit_of"], payload["text"]) == (message["id"], "darn")
        # Bob's edit of Ada's message is refused as always, without asking the hook.
        asked = len(hook.requests)
        with pytest.raises(ChatdError) as refused:
            await bob.call("PATCH", path, json={"text": "spam"})
        assert refused.value.code == "forbidden"
        assert len(hook.requests) == asked
    assert await texts(bob, chat_id) == ["d**n"]
    await ada.aclose()
    await bob.aclose()
