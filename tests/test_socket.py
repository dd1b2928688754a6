"""/connect: authentication, the first frame, and how protocol mistakes are answered."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import jwt
import pytest
import websockets

from chatd.client import Api, ChatdError, Socket, TokenRefused
from tests.conftest import Server


async def closed_with(url: str, headers: dict[str, str] | None = None) -> int | None:
    async with websockets.connect(url, additional_headers=headers) as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        return ws.close_code


@pytest.mark.parametrize("token_kind", ["none", "garbage", "expired", "refresh", "wrong_type"])
async def test_bad_tokens_are_closed_with_1008(server: Server, alice: Api, token_kind: str) -> None:
    now = int(time.time())
    tokens = {
        "none": None,
        "garbage": "garbage",
        "expired": jwt.encode(
            {"sub": alice.user_uuid, "typ": "access", "exp": now - 5}, server.secret, "HS256"
        ),
        "refresh": alice.refresh_token,
        "wrong_type": jwt.encode(
            {"sub": alice.user_uuid, "typ": "id", "exp": now + 60}, server.secret, "HS256"
        ),
    }
    token = tokens[token_kind]
    headers = {"Authorization": f"Bearer {token}"} if token else None
    assert await closed_with(server.ws_url, headers) == 1008
    if token:
        assert await closed_with(f"{server.ws_url}?token={token}") == 1008


async def test_token_in_query_string_authenticates(server: Server, alice: Api) -> None:
    async with websockets.connect(f"{server.ws_url}?token={alice.access_token}") as ws:
        first = json.loads(await ws.recv())
    assert first == {"action": "unread_messages", "data": [], "has_more": False}


async def test_first_frame_is_the_unread_snapshot(alice: Api) -> None:
    async with await alice.connect() as sock:
        assert sock.unread == {"action": "unread_messages", "data": [], "has_more": False}


async def raw_reply(sock: Socket, frame: str | bytes) -> dict:
    await sock.ws.send(frame)
    return await sock.next_event("error")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", "bad_request"),
        ("[1, 2]", "bad_request"),
        ('"a string"', "bad_request"),
        ("{}", "bad_request"),
        ('{"action": 5}', "bad_request"),
        ('{"action": "fly_to_moon"}', "unknown_action"),
        ('{"action": "send_message", "chat_id": "1", "text": "hi"}', "bad_request"),
        ('{"action": "send_message", "text": "hi"}', "bad_request"),
        ('{"action": "send_message", "chat_id": 1.5, "text": "hi"}', "bad_request"),
        ('{"action": "send_message", "chat_id": 1e300, "text": "hi"}', "bad_request"),
        ('{"action": "send_message", "chat_id": 99999999999999999999999, "text": "hi"}', "invalid"),
        ('{"action": "send_message", "chat_id": 0, "text": "hi"}', "invalid"),
        ('{"action": "mark_read", "message_ids": []}', "invalid"),
        ('{"action": "mark_read", "message_ids": ["a"]}', "bad_request"),
        ('{"action": "create_chat", "type": "channel", "user_ids": []}', "invalid"),
        ('{"action": "create_chat", "type": "group", "user_ids": "x"}', "bad_request"),
        ('{"action": "send_message", "chat_id": 1, "text": "hi", "request_id": 7}', "bad_request"),
        ('{"action": "send_message", "chat_id": 1, "text": "\\ud800"}', "bad_request"),
    ],
)
async def test_protocol_mistakes_get_an_error_and_the_socket_stays(
    alice: Api, frame: str, code: str
) -> None:
    async with await alice.connect() as sock:
        reply = await raw_reply(sock, frame)
        assert reply["error"]["code"] == code, reply
        assert reply["error"]["message"]
        # The socket still answers requests.
        with pytest.raises(ChatdError) as after:
            await sock.request("mark_read", message_ids=[2**62])
        assert after.value.code == "not_found"


async def test_errors_echo_the_request_id_when_one_was_readable(alice: Api) -> None:
    async with await alice.connect() as sock:
        reply = await raw_reply(sock, '{"action": "nope", "request_id": "abc"}')
        assert reply == {
            "action": "error",
            "request_id": "abc",
            "error": {"code": "unknown_action", "message": reply["error"]["message"]},
        }
        reply = await raw_reply(sock, '{"action": "send_message", "request_id": "r9"}')
        assert (reply["request_id"], reply["error"]["code"]) == ("r9", "bad_request")
        reply = await raw_reply(sock, "garbage")
        assert reply["request_id"] is None


async def test_request_id_longer_than_64_is_invalid(alice: Api) -> None:
    async with await alice.connect() as sock:
        frame = {"action": "mark_read", "message_ids": [1], "request_id": "x" * 65}
        reply = await raw_reply(sock, json.dumps(frame))
        assert reply["error"]["code"] == "invalid"


async def test_socket_survives_a_burst_of_mistakes(alice: Api, bob: Api) -> None:
    async with await alice.connect() as sock:
        for _ in range(50):
            await sock.ws.send("{")
        for _ in range(50):
            assert (await sock.next_event("error"))["error"]["code"] == "bad_request"
        chat = await sock.request("create_chat", type="private", user_ids=[bob.user_uuid])
        assert chat["type"] == "private"


async def test_binary_frames_are_read_as_json(alice: Api, bob: Api) -> None:
    async with await alice.connect() as sock:
        frame = {
            "action": "create_chat",
            "type": "private",
            "user_ids": [bob.user_uuid],
            "request_id": "bin",
        }
        await sock.ws.send(json.dumps(frame).encode())
        # The reply is matched by request_id only for request(); read it as an event here.
        event = await sock.next_event("ack")
        assert event["data"]["type"] == "private"


async def test_frame_over_64_kib_closes_with_1009(alice: Api) -> None:
    async with await alice.connect() as sock:
        await sock.ws.send(
            json.dumps({"action": "send_message", "chat_id": 1, "text": "x" * 70_000})
        )
        assert await sock.wait_closed() == 1009


async def test_frame_just_under_the_limit_is_handled(alice: Api) -> None:
    async with await alice.connect() as sock:
        text = "x" * 60_000  # over the 4096-character text limit, under the frame limit
        with pytest.raises(ChatdError) as error:
            await sock.request("send_message", chat_id=1, text=text)
        assert error.value.code == "invalid"


async def test_unknown_user_in_a_valid_token_cannot_do_anything(server: Server) -> None:
    # Signed with the server's key, but naming no user and no session: refused at once.
    for claims in ({}, {"sid": str(uuid.uuid4())}):
        ghost = jwt.encode(
            {"sub": str(uuid.uuid4()), "typ": "access", "exp": int(time.time()) + 60, **claims},
            server.secret,
            "HS256",
        )
        with pytest.raises(TokenRefused):
            await Socket.open(server.ws_url, ghost)


async def test_query_tokens_are_redacted_from_the_server_log(server: Server, alice: Api) -> None:
    async with websockets.connect(f"{server.ws_url}?token={alice.access_token}") as ws:
        await ws.recv()
    await asyncio.sleep(0.2)
    log = server.log()
    assert "token=[redacted]" in log
    assert alice.access_token not in log


async def test_compression_is_off_unless_configured(
    server: Server, alice: Api, database_url: str, tmp_path
) -> None:
    from tests.conftest import start_server, stop_server

    headers = {"Authorization": f"Bearer {alice.access_token}"}
    # The websockets client offers permessage-deflate; chatd declines it by default.
    async with websockets.connect(server.ws_url, additional_headers=headers) as ws:
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
    deflating = start_server(database_url, tmp_path, CHATD_WS_DEFLATE="true")
    try:
        async with websockets.connect(deflating.ws_url, additional_headers=headers) as ws:
            assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
            assert json.loads(await ws.recv())["action"] == "unread_messages"
    finally:
        stop_server(deflating)


async def test_other_sites_cannot_open_a_socket(
    server: Server, alice: Api, database_url: str, tmp_path
) -> None:
    """Cross-site WebSocket hijacking: browsers send Origin, and only known ones get in."""
    from tests.conftest import start_server, stop_server

    auth = {"Authorization": f"Bearer {alice.access_token}"}
    evil = {**auth, "Origin": "https://evil.example"}
    assert await closed_with(server.ws_url, evil) == 1008
    # The page chatd serves itself (/chat) is same-origin; bots send no Origin at all.
    async with websockets.connect(
        server.ws_url, additional_headers={**auth, "Origin": server.base_url}
    ) as ws:
        assert json.loads(await ws.recv())["action"] == "unread_messages"

    listed = start_server(database_url, tmp_path, CHATD_ALLOWED_ORIGINS="https://app.example")
    try:
        app = {**auth, "Origin": "https://app.example"}
        async with websockets.connect(listed.ws_url, additional_headers=app) as ws:
            assert json.loads(await ws.recv())["action"] == "unread_messages"
        assert await closed_with(listed.ws_url, evil) == 1008
    finally:
        stop_server(listed)
