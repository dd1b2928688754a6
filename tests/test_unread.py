"""unread_messages: what a socket is told first, and that nothing falls between it and live."""

from __future__ import annotations

import asyncio
import json

import websockets

from chatd.client import Api
from tests.conftest import Server


async def test_unread_messages_on_reconnect(alice: Api, bob: Api, carol: Api) -> None:
    async with await alice.connect() as a:
        one = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        two = await a.request(
            "create_chat", type="group", name="g", user_ids=[bob.user_uuid, carol.user_uuid]
        )
        m1 = await a.request("send_message", chat_id=one["id"], text="1")
        m2 = await a.request("send_message", chat_id=two["id"], text="2")
        m3 = await a.request("send_message", chat_id=one["id"], text="3")

    async with await bob.connect() as b:
        snapshot = b.unread
        assert snapshot["action"] == "unread_messages"
        assert snapshot["has_more"] is False
        assert [m["id"] for m in snapshot["data"]] == [m1["id"], m2["id"], m3["id"]]
        assert all(m["read_status"] == "unread" for m in snapshot["data"])
        await b.request("mark_read", message_ids=[m1["id"]])
        await b.request("send_message", chat_id=two["id"], text="bob's own")

    async with await bob.connect() as b:
        # m1 is read; m2 is covered by Bob's own send in that chat; his own message is excluded.
        assert [m["id"] for m in b.unread["data"]] == [m3["id"]]


async def test_unread_snapshot_holds_at_most_500(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        await asyncio.gather(
            *[a.request("send_message", chat_id=chat["id"], text=str(n)) for n in range(505)]
        )
    async with await bob.connect() as b:
        assert len(b.unread["data"]) == 500
        assert b.unread["has_more"] is True
        seqs = [m["seq"] for m in b.unread["data"]]
        assert seqs == list(range(1, 501))  # the oldest first


async def test_nothing_falls_between_snapshot_and_live_stream(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        total = 300
        sending = asyncio.gather(
            *[a.request("send_message", chat_id=chat["id"], text=str(n)) for n in range(total)]
        )
        # Bob connects (several times) while Alice is sending.
        seen_per_socket = []
        sockets = []
        for _ in range(4):
            await asyncio.sleep(0.02)
            sockets.append(await bob.connect())
        await sending
        for sock in sockets:
            seqs = [m["seq"] for m in sock.unread["data"]]
            while len(seqs) < total:
                seqs.append((await sock.next_event("new_message"))["data"]["seq"])
            await asyncio.sleep(0.2)
            extra = [e for e in sock.pending_events() if e["action"] == "new_message"]
            seen_per_socket.append((seqs, extra))
            await sock.close()
        for seqs, extra in seen_per_socket:
            assert extra == []  # nothing twice
            assert sorted(seqs) == list(range(1, total + 1))  # nothing lost
            assert len(seqs) == total


async def test_unread_snapshot_fits_a_default_websockets_client(
    server: Server, alice: Api, bob: Api
) -> None:
    async with await alice.connect() as a:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        for n in range(200):  # ~850 KB of text
            await a.send(
                {"action": "send_message", "chat_id": chat["id"], "text": f"{n:04}" * 1024}
            )
        for _ in range(200):
            await a.next_event("new_message")
    headers = {"Authorization": f"Bearer {bob.access_token}"}
    async with websockets.connect(server.ws_url, additional_headers=headers) as ws:  # max 1 MiB
        snapshot = json.loads(await ws.recv())
    assert snapshot["has_more"] is True
    assert 150 < len(snapshot["data"]) < 200
    assert [m["seq"] for m in snapshot["data"]] == list(range(1, len(snapshot["data"]) + 1))
