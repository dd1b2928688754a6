"""The chat list: GET /chats and GET /chats/{id} (and the list_chats/get_chat actions)."""

from __future__ import annotations

import asyncio
import random

import httpx

from chatd.client import Api, ChatdError
from tests.conftest import UserFactory


async def test_chats_are_listed_by_latest_activity_with_last_message(
    alice: Api, bob: Api, carol: Api
) -> None:
    async with await alice.connect() as a:
        first = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        second = await a.request("create_chat", type="group", name="g", user_ids=[carol.user_uuid])
        assert [c["id"] for c in (await alice.chats())["chats"]] == [second["id"], first["id"]]

        sent = await a.request("send_message", chat_id=first["id"], text="bump")
        page = await alice.chats()
        assert [c["id"] for c in page["chats"]] == [first["id"], second["id"]]
        assert page["has_more"] is False and page["next_before"] is None
        top = page["chats"][0]
        assert top["last_message"] == sent
        assert top["last_seq"] == 1
        assert top["type"] == "private" and top["role"] == "member"
        assert {m["user_uuid"] for m in top["members"]} == {alice.user_uuid, bob.user_uuid}
        group = page["chats"][1]
        assert group["last_message"] is None and group["last_seq"] == 0
        assert group["role"] == "owner" and group["name"] == "g"

        # Only the caller's chats: Carol sees the group, not the private chat.
        assert [c["id"] for c in (await carol.chats())["chats"]] == [second["id"]]


async def test_unread_count_and_read_pointer(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        sent = [await a.request("send_message", chat_id=chat["id"], text=f"{n}") for n in range(3)]

        view = await bob.chat(chat["id"])
        assert (view["unread_count"], view["read_seq"], view["read_upto"]) == (3, 0, None)
        # The sender has read their own messages.
        assert (await alice.chat(chat["id"]))["unread_count"] == 0

        await b.request("mark_read", message_ids=[sent[1]["id"]])
        view = await bob.chat(chat["id"])
        assert (view["unread_count"], view["read_seq"], view["read_upto"]) == (1, 2, sent[1]["id"])

        # Answering counts as reading everything before the answer.
        await b.request("send_message", chat_id=chat["id"], text="reply")
        assert (await bob.chat(chat["id"]))["unread_count"] == 0
        assert (await alice.chat(chat["id"]))["unread_count"] == 1


async def test_pages_walk_every_chat_once(alice: Api, make_user: UserFactory) -> None:
    others = [await make_user(f"P{n}") for n in range(7)]
    async with await alice.connect() as a:
        created = [
            await a.request("create_chat", type="private", user_ids=[o.user_uuid]) for o in others
        ]
    seen: list[int] = []
    before = None
    while True:
        params = {"limit": 3} | ({"before": before} if before else {})
        page = await alice.chats(**params)
        assert len(page["chats"]) <= 3
        seen += [c["id"] for c in page["chats"]]
        if not page["has_more"]:
            assert page["next_before"] is None
            break
        before = page["next_before"]
    assert seen == [c["id"] for c in reversed(created)]


async def test_socket_list_chats_and_get_chat_match_rest(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        await a.request("send_message", chat_id=chat["id"], text="hi")
        assert await a.request("list_chats", limit=10) == await alice.chats(limit=10)
        assert await a.request("get_chat", chat_id=chat["id"]) == await alice.chat(chat["id"])


async def test_a_chat_you_are_not_in_is_not_found(
    alice: Api, bob: Api, carol: Api, http: httpx.AsyncClient
) -> None:
    async with await alice.connect() as a, await carol.connect() as c:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        headers = {"Authorization": f"Bearer {carol.access_token}"}
        for chat_id in (chat["id"], 10**12, 2**63):
            response = await http.get(f"/chats/{chat_id}", headers=headers)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "not_found"
        try:
            await c.request("get_chat", chat_id=chat["id"])
        except ChatdError as exc:
            assert exc.code == "not_found"
        else:
            raise AssertionError("get_chat of a foreign chat succeeded")


async def test_list_parameters_are_checked(alice: Api, http: httpx.AsyncClient) -> None:
    headers = {"Authorization": f"Bearer {alice.access_token}"}
    for query in ("limit=0", "limit=201", "limit=x", "before=0", "before=-1"):
        response = await http.get(f"/chats?{query}", headers=headers)
        assert response.status_code == 422, query
        assert response.json()["error"]["code"] == "invalid"
    assert (await http.get("/chats")).status_code == 401


async def test_unread_counts_stay_exact_under_concurrent_sends_and_reads(
    alice: Api, bob: Api, carol: Api
) -> None:
    """Three members send and read at once; afterwards every count matches the messages."""
    users = (alice, bob, carol)
    socks = [await u.connect() for u in users]
    try:
        chat = await socks[0].request(
            "create_chat", type="group", name="busy", user_ids=[bob.user_uuid, carol.user_uuid]
        )
        chat_id = chat["id"]
        rng = random.Random(7)

        async def member(sock, n: int) -> None:
            for i in range(25):
                message = await sock.request("send_message", chat_id=chat_id, text=f"{n}-{i}")
                if rng.random() < 0.3:
                    # Read up to something recent that someone else may just be beating.
                    await sock.request("mark_read", message_ids=[message["id"]])

        async def watcher() -> None:
            for _ in range(20):
                view = await bob.chat(chat_id)
                assert 0 <= view["unread_count"] == view["last_seq"] - view["read_seq"]
                await asyncio.sleep(0.01)

        await asyncio.gather(*(member(s, n) for n, s in enumerate(socks)), watcher())

        history = (await alice.history(chat_id, page_size=200))["messages"]
        assert [m["seq"] for m in history] == list(range(1, 76))
        for user in users:
            view = await user.chat(chat_id)
            from_others_above = [
                m
                for m in history
                if m["seq"] > view["read_seq"] and m["sender_uuid"] != user.user_uuid
            ]
            assert view["unread_count"] == len(from_others_above)
            assert view["last_seq"] == 75
            # Each member's last send moved their pointer to at least that message.
            own_last = max(m["seq"] for m in history if m["sender_uuid"] == user.user_uuid)
            assert view["read_seq"] >= own_last
    finally:
        for s in socks:
            await s.close()
