"""Notifications for members who are away: Web Push to a local push service that checks
the VAPID JWT and decrypts the payload (http_ece), and the signed push gateway."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
import http_ece
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from chatd import signing
from chatd.client import Api, ChatdError
from chatd.presence import GRACE
from tests.conftest import (
    Server,
    free_port,
    fresh_database,
    new_user,
    start_server,
    stop_server,
)

GATEWAY_SECRET = "gateway-secret-" + "g" * 32


class Receiver:
    """A push service and a push gateway on one local port: records what arrives."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        self.status = 201
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((self.path, dict(self.headers), body))
                self.send_response(receiver.status if self.path != "/gateway" else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def take(self, path_prefix: str) -> list[tuple[str, dict[str, str], bytes]]:
        taken = [r for r in self.received if r[0].startswith(path_prefix)]
        self.received = [r for r in self.received if not r[0].startswith(path_prefix)]
        return taken


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def push_database(database_url: str) -> Iterator[str]:
    """A database of its own: with the gateway configured, every member of every chat who
    should hear of a message is notified, and the other tests' users would be too."""
    with fresh_database(database_url, "chatd_push") as own:
        yield own


@pytest.fixture(scope="module")
def push_server(
    push_database: str, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    srv = start_server(
        push_database,
        Path(tmp_path_factory.mktemp("push")),
        CHATD_OUTBOUND_ALLOW_PRIVATE="true",  # the receiver is on the loopback
        CHATD_PUSH_GATEWAY_URL=receiver.url + "/gateway",
        CHATD_PUSH_GATEWAY_SECRET=GATEWAY_SECRET,
        CHATD_DELIVERY_RETRY_MS="200",
    )
    yield srv
    stop_server(srv)
    assert "Traceback" not in srv.log(), srv.log()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Browser:
    """What a browser keeps of its subscription: the ECDH key pair and the auth secret."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.auth = os.urandom(16)
        point = self.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self.subscription = {
            "endpoint": endpoint,
            "keys": {"p256dh": b64(point), "auth": b64(self.auth)},
        }

    def open(self, headers: dict[str, str], body: bytes, vapid_public_key: str) -> dict:
        """Check the VAPID JWT like a push service, decrypt like the browser."""
        scheme, _, params = headers["Authorization"].partition(" ")
        assert scheme == "vapid"
        fields = dict(p.strip().split("=", 1) for p in params.split(","))
        assert fields["k"] == vapid_public_key
        point = base64.urlsafe_b64decode(fields["k"] + "==")
        public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        claims = jwt.decode(
            fields["t"], public, algorithms=["ES256"], audience=self.endpoint.rsplit("/", 2)[0]
        )
        assert claims["sub"].startswith("mailto:")
        assert headers["Content-Encoding"] == "aes128gcm" and int(headers["TTL"]) > 0
        plain = http_ece.decrypt(
            body, private_key=self.key, auth_secret=self.auth, version="aes128gcm"
        )
        return json.loads(plain)


async def arrivals(receiver: Receiver, prefix: str, n: int = 1, timeout: float = 15) -> list:
    for _ in range(int(timeout * 10)):
        got = [r for r in receiver.received if r[0].startswith(prefix)]
        if len(got) >= n:
            return receiver.take(prefix)
        await asyncio.sleep(0.1)
    raise AssertionError(f"nothing arrived at {prefix}: {receiver.received}")


async def test_web_push_and_the_gateway_for_members_away(
    push_server: Server, receiver: Receiver, push_database: str
) -> None:
    alice, bob = await new_user(push_server, "Alice"), await new_user(push_server, "Bob")
    key = (await alice.call("GET", "/push/vapid_public_key"))["public_key"]
    browser = Browser(f"{receiver.url}/push/{alice.user_uuid}")
    created = await alice.call("POST", "/push/subscriptions", json=browser.subscription)
    again = await alice.call("POST", "/push/subscriptions", json=browser.subscription)
    assert again["id"] == created["id"]
    prefix = f"/push/{alice.user_uuid}"
    try:
        async with await bob.connect() as b:
            chat = await b.request("create_chat", type="private", user_ids=[alice.user_uuid])
            sent = await b.request("send_message", chat_id=chat["id"], text="Привет, Алиса")
            ((_, headers, body),) = await arrivals(receiver, prefix)
            note = browser.open(headers, body, key)
            assert note["chat_id"] == chat["id"] and note["message_id"] == sent["id"]
            assert note["text"] == "Привет, Алиса" and note["sender_name"] == "Bob"
            assert note["unread_count"] == 1 and note["unread_total"] == 1
            # The gateway: signed, counts, no text.
            ((_, g_headers, g_body),) = await arrivals(receiver, "/gateway")
            assert signing.verify(GATEWAY_SECRET.encode(), g_body, g_headers)
            g_note = json.loads(g_body)
            assert "text" not in g_note and g_note["user_uuid"] == alice.user_uuid
            assert g_note["unread_count"] == 1

            # Online: nothing is sent.
            async with await alice.connect():
                await b.request("send_message", chat_id=chat["id"], text="you are here")
                await asyncio.sleep(2)
                assert receiver.take("") == []
            await asyncio.sleep(GRACE + 1)

            # Muted: nothing; notify=mentions: only a mention.
            await alice.call(
                "PATCH",
                f"/chats/{chat['id']}/notifications",
                json={"mute_until": "2100-01-01T00:00:00Z"},
            )
            await b.request("send_message", chat_id=chat["id"], text="muted")
            await asyncio.sleep(2)
            assert receiver.take("") == []
            settings = await alice.call(
                "PATCH",
                f"/chats/{chat['id']}/notifications",
                json={"mute_until": None, "notify": "mentions"},
            )
            assert settings == {"chat_id": chat["id"], "mute_until": None, "notify": "mentions"}
            listed = await alice.chat(chat["id"])
            assert listed["notify"] == "mentions" and listed["mute_until"] is None
            await b.request("send_message", chat_id=chat["id"], text="no mention")
            await asyncio.sleep(2)
            assert receiver.take("") == []
            await b.request(
                "send_message", chat_id=chat["id"], text="@alice", mentions=[alice.user_uuid]
            )
            ((_, headers, body),) = await arrivals(receiver, prefix)
            note = browser.open(headers, body, key)
            # Exact counts: every unread message, from the read pointer.
            assert note["mentioned"] is True and note["unread_count"] == 5
            await arrivals(receiver, "/gateway")

            # The sender is never notified of their own messages.
            assert all(not r[0].startswith(f"/push/{bob.user_uuid}") for r in receiver.received)

            # The push service answers 410: the subscription is dropped.
            receiver.status = 410
            await alice.call("PATCH", f"/chats/{chat['id']}/notifications", json={"notify": "all"})
            await b.request("send_message", chat_id=chat["id"], text="gone?")
            await arrivals(receiver, prefix)
            await arrivals(receiver, "/gateway")
            conn = await asyncpg.connect(push_database)
            try:
                for _ in range(50):
                    left = await conn.fetchval(
                        "SELECT count(*) FROM push_subscriptions WHERE user_id = $1",
                        alice.user_uuid,
                    )
                    if left == 0:
                        break
                    await asyncio.sleep(0.1)
                assert left == 0
            finally:
                await conn.close()
    finally:
        receiver.status = 201
        await alice.aclose()
        await bob.aclose()


async def test_messages_a_dead_process_never_looked_at_are_notified_at_start(
    push_server: Server, receiver: Receiver, push_database: str, tmp_path: Path
) -> None:
    """Nothing lost: a message committed by a process that died before its notifier looked
    (written here with SQL, as its writer would have) is found by the sweep of the next
    process to start."""
    alice, bob = await new_user(push_server, "Alice"), await new_user(push_server, "Bob")
    browser = Browser(f"{receiver.url}/push/{alice.user_uuid}")
    await alice.call("POST", "/push/subscriptions", json=browser.subscription)
    chat = await bob.call("POST", "/chats", json={"type": "private", "user_ids": [alice.user_uuid]})
    conn = await asyncpg.connect(push_database)
    try:
        async with conn.transaction():
            seq = await conn.fetchval(
                "UPDATE chats SET last_seq = last_seq + 1, version = version + 1 WHERE id = $1"
                " RETURNING last_seq",
                chat["id"],
            )
            await conn.execute(
                "INSERT INTO messages (chat_id, seq, sender_id, text, version)"
                " VALUES ($1, $2, $3, 'written before a crash', $2)",
                chat["id"],
                seq,
                bob.user_uuid,
            )
    finally:
        await conn.close()
    await asyncio.sleep(1)
    assert receiver.take(f"/push/{alice.user_uuid}") == []  # nobody looked yet
    key = (await alice.call("GET", "/push/vapid_public_key"))["public_key"]
    second = start_server(
        push_database,
        tmp_path,
        CHATD_OUTBOUND_ALLOW_PRIVATE="true",
        CHATD_VAPID_PRIVATE_KEY=(
            push_server_data(push_server) / "vapid_private_key.pem"
        ).read_text(),
    )
    try:
        ((_, headers, body),) = await arrivals(receiver, f"/push/{alice.user_uuid}")
        assert browser.open(headers, body, key)["text"] == "written before a crash"
    finally:
        stop_server(second)
        assert "Traceback" not in second.log(), second.log()
        receiver.take("")
        await alice.aclose()
        await bob.aclose()


def push_server_data(server: Server) -> Path:
    """The data folder conftest.start_server gave the server (its generated VAPID key)."""
    return server.log_path.parent / "data"


async def test_subscriptions_are_checked_and_removed(
    push_server: Server, receiver: Receiver
) -> None:
    alice = await new_user(push_server, "Alice")
    try:
        browser = Browser(f"{receiver.url}/push/x")
        bad = {**browser.subscription, "keys": {"p256dh": "AAAA", "auth": "AAAA"}}
        for body in (bad, {**browser.subscription, "endpoint": "ftp://x/y"}):
            with pytest.raises(ChatdError) as exc:
                await alice.call("POST", "/push/subscriptions", json=body)
            assert exc.value.status == 422
        await alice.call("POST", "/push/subscriptions", json=browser.subscription)
        await alice.call("DELETE", "/push/subscriptions", json={"endpoint": browser.endpoint})
        await alice.call("DELETE", "/push/subscriptions", json={"endpoint": browser.endpoint})
    finally:
        await alice.aclose()


async def test_https_endpoints_only_by_default(alice: Api) -> None:
    browser = Browser("http://push.example.com/x")
    with pytest.raises(ChatdError) as exc:
        await alice.call("POST", "/push/subscriptions", json=browser.subscription)
    assert exc.value.status == 422
