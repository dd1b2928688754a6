"""GET /history/{chat_id}: page and keyset pagination, limits, and privacy."""

from __future__ import annotations

import httpx
import pytest

from chatd.client import Api, ChatdError


async def chat_with(alice: Api, bob: Api, count: int) -> tuple[dict, list[dict]]:
    async with await alice.connect() as a:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        sent = [
            await a.request("send_message", chat_id=chat["id"], text=str(n)) for n in range(count)
        ]
    return chat, sent


async def test_pages_count_back_from_the_newest(alice: Api, bob: Api) -> None:
    chat, sent = await chat_with(alice, bob, 7)
    ids = [m["id"] for m in sent]
    page1 = await bob.history(chat["id"], page=1, page_size=3)
    page2 = await bob.history(chat["id"], page=2, page_size=3)
    page3 = await bob.history(chat["id"], page=3, page_size=3)
    page4 = await bob.history(chat["id"], page=4, page_size=3)
    assert [m["id"] for m in page1["messages"]] == ids[4:7]
    assert [m["id"] for m in page2["messages"]] == ids[1:4]
    assert [m["id"] for m in page3["messages"]] == ids[0:1]
    assert (page1["has_more"], page2["has_more"], page3["has_more"]) == (True, True, False)
    assert page4 == {"messages": [], "has_more": False}
    assert page1["messages"][0] == sent[4]  # the same Message object as the ack


async def test_defaults_are_page_1_of_50(alice: Api, bob: Api) -> None:
    chat, sent = await chat_with(alice, bob, 3)
    page = await bob.history(chat["id"])
    assert [m["id"] for m in page["messages"]] == [m["id"] for m in sent]
    assert page["has_more"] is False


async def test_keyset_walks_back_with_before(alice: Api, bob: Api) -> None:
    chat, sent = await chat_with(alice, bob, 7)
    newest = await bob.history(chat["id"], page_size=3)
    collected = newest["messages"]
    has_more = newest["has_more"]
    while has_more:
        older = await bob.history(chat["id"], before=collected[0]["id"], limit=3)
        collected = older["messages"] + collected
        has_more = older["has_more"]
    assert [m["id"] for m in collected] == [m["id"] for m in sent]


async def test_empty_chat_has_no_history(alice: Api, bob: Api) -> None:
    chat, _ = await chat_with(alice, bob, 0)
    assert await bob.history(chat["id"]) == {"messages": [], "has_more": False}


@pytest.mark.parametrize(
    "params",
    [
        {"page_size": 0},
        {"page_size": 201},
        {"page": 0},
        {"page": "one"},
        {"before": "x"},
        {"before": 1, "limit": 0},
        {"before": 1, "limit": 201},
    ],
)
async def test_bad_sizes_are_422(alice: Api, bob: Api, params: dict) -> None:
    chat, _ = await chat_with(alice, bob, 1)
    with pytest.raises(ChatdError) as error:
        await bob.history(chat["id"], **params)
    assert (error.value.status, error.value.code) == (422, "invalid")


async def test_before_is_a_cursor_any_id_works(alice: Api, bob: Api, carol: Api) -> None:
    """`before` means "older than this id", whether or not the id is a message here."""
    async with await alice.connect() as a, await carol.connect() as c:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        other = await c.request("create_chat", type="private", user_ids=[bob.user_uuid])
        ids, other_ids = [], []
        for n in range(3):  # the other chat's ids fall between this chat's
            ids.append((await a.request("send_message", chat_id=chat["id"], text=str(n)))["id"])
            reply = await c.request("send_message", chat_id=other["id"], text=str(n))
            other_ids.append(reply["id"])

    async def page(before: int, limit: int = 50) -> tuple[list[int], bool]:
        got = await bob.history(chat["id"], before=before, limit=limit)
        return [m["id"] for m in got["messages"]], got["has_more"]

    assert await page(2**63 - 1) == (ids, False)  # the newest page
    assert await page(2**63 - 1, limit=2) == (ids[1:], True)
    assert await page(ids[2] + 10_000) == (ids, False)  # past the newest id
    assert await page(other_ids[0]) == (ids[:1], False)  # another chat's id
    assert await page(other_ids[1], limit=1) == (ids[1:2], True)
    assert await page(ids[1]) == (ids[:1], False)  # a message of this chat, as before
    assert await page(1) == ([], False)  # nothing is older
    assert await page(ids[0]) == ([], False)


async def test_outsiders_get_404_whether_or_not_the_chat_exists(
    alice: Api, bob: Api, carol: Api, http: httpx.AsyncClient
) -> None:
    chat, _ = await chat_with(alice, bob, 2)
    for chat_id in (chat["id"], 2**62, 2**64):
        response = await http.get(
            f"/history/{chat_id}", headers={"Authorization": f"Bearer {carol.access_token}"}
        )
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
