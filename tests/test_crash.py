"""kill -9 in the middle of a load, restart on the same database, resume: nothing acked is
lost, nothing is stored twice, per-chat seq stays gapless, and every client's view
(acks, events, sync) ends up equal to the database."""

from __future__ import annotations

import asyncio
import signal
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from chatd.client import Api, Client, Socket
from tests.conftest import PASSWORD, SOAK, Server, free_port, start_server, stop_server


@dataclass
class Send:
    chat_id: int
    text: str


@dataclass
class RawClient:
    """A user's socket driven by hand: sends with client_msg_ids, keeps all it learns."""

    api: Api
    chat_ids: list[int]
    sock: Socket | None = None
    sent: dict[str, Send] = field(default_factory=dict)
    acked: dict[str, dict[str, Any]] = field(default_factory=dict)
    retried: dict[str, dict[str, Any]] = field(default_factory=dict)
    view: dict[int, dict[str, Any]] = field(default_factory=dict)  # message id -> message

    async def keep_sending(self) -> None:
        assert self.sock is not None
        n = 0
        while True:
            n += 1
            client_msg_id = str(uuid.uuid4())
            send = Send(self.chat_ids[n % len(self.chat_ids)], f"{self.api.user_uuid} {n}")
            self.sent[client_msg_id] = send
            try:
                message = await self.sock.request(
                    "send_message",
                    chat_id=send.chat_id,
                    text=send.text,
                    client_msg_id=client_msg_id,
                )
            except BaseException:  # the server died: the reply never came
                return
            self.acked[client_msg_id] = message
            self.see(message)

    def see(self, message: dict[str, Any]) -> None:
        self.view[message["id"]] = message

    def take_events(self, sock: Socket) -> None:
        for event in sock.pending_events():
            if event["action"] == "new_message":
                self.see(event["data"])
        for message in (sock.unread or {}).get("data", []):
            self.see(message)

    async def retry_unacked(self) -> None:
        assert self.sock is not None
        for client_msg_id, send in self.sent.items():
            if client_msg_id not in self.acked:
                message = await self.sock.request(
                    "send_message",
                    chat_id=send.chat_id,
                    text=send.text,
                    client_msg_id=client_msg_id,
                )
                self.retried[client_msg_id] = message
                self.see(message)

    async def catch_up(self) -> None:
        """sync every chat from the highest seq held with nothing missing below it."""
        assert self.sock is not None
        for chat_id in self.chat_ids:
            seqs = {m["seq"] for m in self.view.values() if m["chat_id"] == chat_id}
            after = 0
            while after + 1 in seqs:
                after += 1
            while True:
                reply = await self.sock.request("sync", chats={str(chat_id): after}, limit=100)
                entry = reply["chats"][str(chat_id)]
                for message in entry["messages"]:
                    self.see(message)
                if not entry["has_more"]:
                    break
                after = entry["messages"][-1]["seq"]


async def new_user(server: Server, name: str) -> tuple[Api, str]:
    api = Api(server.base_url)
    email = f"{name.lower()}-{uuid.uuid4().hex[:10]}@example.com"
    await api.register(name, email, PASSWORD)
    await api.login(email, PASSWORD)
    return api, email


def as_stored(message: dict[str, Any]) -> tuple[int, int, str, str | None]:
    return message["chat_id"], message["seq"], message["text"], message["client_msg_id"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("round_", range(SOAK))
async def test_kill_9_mid_load_then_resume_loses_and_duplicates_nothing(
    database_url: str, tmp_path: Path, round_: int
) -> None:
    port = free_port()
    server = start_server(database_url, tmp_path, port=port)
    sdk: Client | None = None
    carol_tasks: list[asyncio.Task[None]] = []
    try:
        (alice, _), (bob, _), (carol, carol_email) = [
            await new_user(server, name) for name in ("Alice", "Bob", "Carol")
        ]
        async with await alice.connect() as a:
            group = await a.request(
                "create_chat", type="group", name="g", user_ids=[bob.user_uuid, carol.user_uuid]
            )
            private = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        both = [group["id"], private["id"]]
        clients = [RawClient(alice, both), RawClient(alice, both), RawClient(bob, both)]
        for client in clients:
            client.sock = await client.api.connect()

        # Carol goes through the SDK: reconnects, retries her sends, resumes with sync.
        sdk = Client(server.base_url, carol_email, PASSWORD, backoff_base=0.1, backoff_cap=1)
        await sdk.start()
        carol_view: dict[int, dict[str, Any]] = {}
        carol_acked: dict[str, dict[str, Any]] = {}
        stop_carol = asyncio.Event()

        async def carol_reads() -> None:
            async for event in sdk.events():
                if event["action"] == "new_message":
                    carol_view[event["data"]["id"]] = event["data"]

        async def carol_sends() -> None:
            n = 0
            while not stop_carol.is_set():
                n += 1
                client_msg_id = str(uuid.uuid4())
                message = await sdk.send(group["id"], f"carol {n}", client_msg_id=client_msg_id)
                carol_acked[client_msg_id] = message

        carol_tasks = [asyncio.create_task(carol_reads()), asyncio.create_task(carol_sends())]
        senders = [asyncio.create_task(c.keep_sending()) for c in clients for _ in range(2)]
        await asyncio.sleep(1.5)
        assert sum(len(c.acked) for c in clients) > 20, "the senders are under way"

        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        await asyncio.wait_for(asyncio.gather(*senders), 15)
        assert all(len(c.sent) > len(c.acked) for c in clients), "each had a send in flight"
        for client in clients:
            client.take_events(client.sock)

        restarted = tmp_path / "restarted"
        restarted.mkdir()
        server = start_server(database_url, restarted, port=port)  # the same database
        async with asyncio.timeout(30):
            while sdk.socket is None:  # noqa: ASYNC110 (the SDK reconnects by itself)
                await asyncio.sleep(0.05)
        stop_carol.set()
        await asyncio.wait_for(carol_tasks[1], 30)

        for client in clients:  # resume: a new socket, retries, then sync
            client.sock = await client.api.connect()
            await client.retry_unacked()
        for client in clients:
            await client.catch_up()
            client.take_events(client.sock)
            await client.sock.close()

        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch(
                "SELECT id, chat_id, seq, text, client_msg_id FROM messages"
                " WHERE chat_id = ANY($1::bigint[]) ORDER BY chat_id, seq",
                both,
            )
        finally:
            await conn.close()
        stored = {
            row["id"]: (row["chat_id"], row["seq"], row["text"], row["client_msg_id"])
            for row in rows
        }
        for chat_id in both:
            seqs = [row["seq"] for row in rows if row["chat_id"] == chat_id]
            assert seqs == list(range(1, len(seqs) + 1)), "per-chat seq is gapless"
        client_msg_ids = [row["client_msg_id"] for row in rows]
        assert len(client_msg_ids) == len(set(client_msg_ids)), "no client_msg_id twice"

        by_client_msg_id = {row["client_msg_id"]: row["id"] for row in rows}
        for client in clients:
            assert set(client.acked) | set(client.retried) == set(client.sent)
            for client_msg_id, message in {**client.acked, **client.retried}.items():
                # Acked before the crash or answered on retry: stored once, as acked.
                assert by_client_msg_id[client_msg_id] == message["id"]
                assert stored[message["id"]] == as_stored(message)
            mine = {id_: s for id_, s in stored.items() if s[0] in client.chat_ids}
            assert {m["id"]: as_stored(m) for m in client.view.values()} == mine
        assert sum(len(c.retried) for c in clients) >= len(clients)

        for client_msg_id, message in carol_acked.items():
            assert by_client_msg_id[client_msg_id] == message["id"]
        in_group = {id_: s for id_, s in stored.items() if s[0] == group["id"]}
        for _ in range(200):  # the SDK resumes in the background
            if len(carol_view) >= len(in_group):
                break
            await asyncio.sleep(0.05)
        assert {m["id"]: as_stored(m) for m in carol_view.values()} == in_group
        assert sdk.reconnects >= 1
    finally:
        if sdk is not None:
            await sdk.close()
            await asyncio.gather(*carol_tasks, return_exceptions=True)
        if server.process.poll() is None:
            stop_server(server)
    assert "Traceback" not in server.log(), server.log()
