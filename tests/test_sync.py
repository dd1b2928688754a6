"""sync: resuming after a reconnect without losing or duplicating a message."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from chatd.client import Api, ChatdError, Socket
from tests.conftest import Server


async def test_sync_returns_what_came_after_each_given_seq(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a:
        one = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        two = await a.request("create_chat", type="group", name="g", user_ids=[bob.user_uuid])
        sent_one = [
            await a.request("send_message", chat_id=one["id"], text=f"{n}") for n in range(5)
        ]
        sent_two = [
            await a.request("send_message", chat_id=two["id"], text=f"{n}") for n in range(2)
        ]

        async with await bob.connect() as b:
            result = await b.request("sync", chats={str(one["id"]): 2, str(two["id"]): 2})
    assert result == {
        "chats": {
            str(one["id"]): {"messages": sent_one[2:], "has_more": False, "error": None},
            str(two["id"]): {"messages": [], "has_more": False, "error": None},
        }
    }
    assert sent_two[-1]["seq"] == 2


async def test_sync_pages_with_has_more(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        for n in range(7):
            await a.request("send_message", chat_id=chat["id"], text=f"{n}")
        got: list[int] = []
        last = 0
        while True:
            entry = (await b.request("sync", chats={str(chat["id"]): last}, limit=3))["chats"]
            entry = entry[str(chat["id"])]
            assert len(entry["messages"]) <= 3
            got += [m["seq"] for m in entry["messages"]]
            if not entry["has_more"]:
                break
            last = entry["messages"][-1]["seq"]
        assert got == list(range(1, 8))


async def test_chats_you_are_not_in_come_back_as_not_found_entries(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with await alice.connect() as a, await carol.connect() as c:
        theirs = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        mine = await a.request("create_chat", type="private", user_ids=[carol.user_uuid])
        left = await a.request("create_chat", type="group", name="l", user_ids=[carol.user_uuid])
        await a.request("send_message", chat_id=mine["id"], text="for carol")
        await a.request("send_message", chat_id=left["id"], text="before she left")
        await c.request("leave_chat", chat_id=left["id"])
        await a.request("send_message", chat_id=left["id"], text="after she left")
        asked = [theirs["id"], mine["id"], left["id"], 999999999]
        result = await c.request("sync", chats={str(chat_id): 0 for chat_id in asked})
    chats = result["chats"]
    assert list(chats) == [str(chat_id) for chat_id in asked]
    for chat_id in (theirs["id"], left["id"], 999999999):
        assert chats[str(chat_id)] == {"messages": [], "has_more": False, "error": "not_found"}
    assert [m["text"] for m in chats[str(mine["id"])]["messages"]] == ["for carol"]


async def test_sync_arguments_are_checked(alice: Api) -> None:
    async with await alice.connect() as a:
        for fields, code in (
            ({"chats": {}}, "invalid"),
            ({"chats": {"1": -1}}, "invalid"),
            ({"chats": {"1": 0}, "limit": 0}, "invalid"),
            ({"chats": {"1": 0}, "limit": 501}, "invalid"),
            ({"chats": {"x": 0}}, "bad_request"),
            ({"chats": [1]}, "bad_request"),
        ):
            with pytest.raises(ChatdError) as caught:
                await a.request("sync", **fields)
            assert caught.value.code == code, fields
        # The socket survived all of that.
        assert await a.request("list_chats") == {
            "chats": [],
            "has_more": False,
            "next_before": None,
        }


async def test_a_big_sync_reply_still_fits_a_1_mib_frame(
    alice: Api, bob: Api, server: Server
) -> None:
    async with await alice.connect() as a:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        await asyncio.gather(
            *(a.request("send_message", chat_id=chat["id"], text="x" * 4000) for _ in range(300))
        )
    # A stock websockets client: 1 MiB frame limit.
    headers = {"Authorization": f"Bearer {bob.access_token}"}
    async with websockets.connect(server.ws_url, additional_headers=headers) as ws:
        await ws.recv()  # unread_messages
        request = {"action": "sync", "request_id": "s", "chats": {str(chat["id"]): 0}, "limit": 500}
        await ws.send(json.dumps(request))
        reply = json.loads(await ws.recv())
    entry = reply["data"]["chats"][str(chat["id"])]
    assert entry["has_more"] is True
    assert 100 < len(entry["messages"]) < 300
    assert [m["seq"] for m in entry["messages"]] == list(range(1, len(entry["messages"]) + 1))


async def test_get_chats_tells_about_chats_created_while_away(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a:
        chat = await a.request(
            "create_chat", type="group", name="while away", user_ids=[bob.user_uuid]
        )
        await a.request("send_message", chat_id=chat["id"], text="you missed this")
    page = await bob.chats()
    assert [(c["id"], c["unread_count"]) for c in page["chats"]] == [(chat["id"], 1)]
    assert page["chats"][0]["last_message"]["text"] == "you missed this"


async def test_reconnect_and_sync_ends_with_every_message_exactly_once(
    alice: Api, bob: Api, carol: Api
) -> None:
    """Bob's connection drops mid-conversation while Alice and Carol keep sending.

    Bob's client does what docs/protocol.md tells clients to do: keep messages by seq
    (a second copy of a seq is the same message, not a new one); after reconnecting, sync
    from the last seq it holds until has_more is false; live events fill in the rest.
    """
    a, c = await alice.connect(), await carol.connect()
    chat = await a.request(
        "create_chat", type="group", name="story", user_ids=[bob.user_uuid, carol.user_uuid]
    )
    chat_id = chat["id"]
    shown: dict[int, dict] = {}  # Bob's view of the chat, by seq

    def show(message: dict) -> None:
        assert message["chat_id"] == chat_id
        if message["seq"] in shown:
            assert shown[message["seq"]]["id"] == message["id"], "two messages with one seq"
        shown[message["seq"]] = message

    def contiguous_upto() -> int:
        seq = 0
        while seq + 1 in shown:
            seq += 1
        return seq

    stop = asyncio.Event()

    async def keep_sending(sock: Socket, who: str) -> None:
        n = 0
        while not stop.is_set():
            await sock.request("send_message", chat_id=chat_id, text=f"{who}{n}")
            n += 1
            await asyncio.sleep(0.005)

    senders = [asyncio.create_task(keep_sending(a, "a")), asyncio.create_task(keep_sending(c, "c"))]
    try:
        b = await bob.connect()
        for message in b.unread["data"]:
            show(message)
        while len(shown) < 20:
            show((await b.next_event("new_message"))["data"])
        await b.ws.close()  # the drop; the others keep sending
        await asyncio.sleep(0.3)

        b = await bob.connect()
        try:
            while True:  # catch up from the last seq held without a gap
                last = contiguous_upto()
                entry = (await b.request("sync", chats={str(chat_id): last}, limit=50))["chats"]
                entry = entry[str(chat_id)]
                assert [m["seq"] for m in entry["messages"]] == list(
                    range(last + 1, last + 1 + len(entry["messages"]))
                )
                for message in entry["messages"]:
                    show(message)
                if not entry["has_more"]:
                    break
            await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*senders)
            total = (await alice.chat(chat_id))["last_seq"]
            while contiguous_upto() < total:  # the rest arrives live
                show((await b.next_event("new_message"))["data"])
        finally:
            await b.close()
    finally:
        stop.set()
        await asyncio.gather(*senders, return_exceptions=True)
        await a.close()
        await c.close()

    assert total > 40
    assert sorted(shown) == list(range(1, total + 1))
    history = await whole_history(alice, chat_id)
    assert [shown[seq]["id"] for seq in sorted(shown)] == [m["id"] for m in history]


async def whole_history(api: Api, chat_id: int) -> list[dict]:
    page = await api.history(chat_id, page_size=200)
    messages = page["messages"]
    while page["has_more"]:
        page = await api.history(chat_id, before=messages[0]["id"], limit=200)
        messages = page["messages"] + messages
    return messages
