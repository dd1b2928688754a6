"""Message search: full text in the caller's chats, newest first, highlight offsets."""

from __future__ import annotations

import pytest

from chatd.client import Api, ChatdError


async def _search(api: Api, q: str, **params: object) -> dict:
    return await api.call("GET", "/search", params={"q": q, **params})


def _marked(hit: dict) -> list[str]:
    text = hit["message"]["text"]
    return [text[h["start"] : h["end"]] for h in hit["highlights"]]


async def test_russian_words_find_their_forms_and_highlights_are_offsets(
    alice: Api, bob: Api
) -> None:
    async with await alice.connect() as a:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        texts = ["Привет, мир!", "Нет привета от них", "Running late 🎉 приветы", "ничего"]
        for text in texts:
            await a.request("send_message", chat_id=chat["id"], text=text)
        found = await _search(bob, "привет")
        assert [h["message"]["text"] for h in found["results"]] == texts[2::-1]
        assert [_marked(h) for h in found["results"]] == [["приветы"], ["привета"], ["Привет"]]
        assert found["has_more"] is False and found["next_before"] is None
        # English stems too; offsets are code points (the emoji counts one).
        (hit,) = (await _search(bob, "run"))["results"]
        assert hit["highlights"] == [{"start": 0, "end": 7}]
        # websearch syntax: exclusions and phrases.
        assert [h["message"]["text"] for h in (await _search(bob, "привет -мир"))["results"]] == [
            texts[2],
            texts[1],
        ]
        assert (await _search(bob, '"мир привет"'))["results"] == []
        # Over the socket, the same.
        reply = await a.request("search_messages", q="ПРИВЕТ", limit=1)
        assert [h["message"]["text"] for h in reply["results"]] == [texts[2]]
        assert reply["has_more"] is True
        nxt = await a.request("search_messages", q="привет", before=reply["next_before"])
        assert [h["message"]["text"] for h in nxt["results"]] == [texts[1], texts[0]]


async def test_pages_are_newest_first_across_chats(alice: Api, bob: Api, carol: Api) -> None:
    async with await alice.connect() as a:
        one = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        two = await a.request("create_chat", type="group", name="g", user_ids=[carol.user_uuid])
        sent = []
        for i in range(30):
            chat = one if i % 3 else two
            m = await a.request("send_message", chat_id=chat["id"], text=f"deploy number {i}")
            sent.append(m["id"])
        seen, before = [], None
        while True:
            params = {"limit": 7} | ({"before": before} if before else {})
            page = await _search(alice, "deploy", **params)
            seen += [h["message"]["id"] for h in page["results"]]
            if not page["has_more"]:
                break
            before = page["next_before"]
        assert seen == sorted(sent, reverse=True)
        # One chat only; bob sees only what is in his chats.
        in_two = await _search(alice, "deploy", chat_id=two["id"], limit=100)
        assert [h["message"]["id"] for h in in_two["results"]] == sorted(sent[0::3], reverse=True)
        bobs = await _search(bob, "deploy", limit=100)
        assert len(bobs["results"]) == 20


async def test_edits_deletes_hides_and_leaving(alice: Api, bob: Api, carol: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await a.request(
            "create_chat", type="group", name="g", user_ids=[bob.user_uuid, carol.user_uuid]
        )
        edited = await a.request("send_message", chat_id=chat["id"], text="old walrus")
        deleted = await a.request("send_message", chat_id=chat["id"], text="walrus gone")
        hidden = await a.request("send_message", chat_id=chat["id"], text="walrus hidden")
        await a.request("edit_message", message_id=edited["id"], text="new narwhal")
        await a.request("delete_message", message_id=deleted["id"])
        await b.request("delete_message", message_id=hidden["id"], for_everyone=False)
        assert [h["message"]["id"] for h in (await _search(alice, "narwhal"))["results"]] == [
            edited["id"]
        ]
        assert (await _search(alice, "old"))["results"] == []
        assert [h["message"]["id"] for h in (await _search(alice, "walrus"))["results"]] == [
            hidden["id"]
        ]
        assert (await _search(bob, "walrus"))["results"] == []  # hidden for bob
        await b.request("leave_chat", chat_id=chat["id"])
        assert (await _search(bob, "narwhal"))["results"] == []
        with pytest.raises(ChatdError) as exc:
            await _search(bob, "narwhal", chat_id=chat["id"])
        assert exc.value.status == 404
        # carol never saw the chat on a socket, but is a member: she finds it.
        assert len((await _search(carol, "narwhal"))["results"]) == 1


async def test_stop_words_and_bad_queries(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        await a.request("send_message", chat_id=chat["id"], text="и the a")
        assert (await _search(alice, "и the"))["results"] == []
        assert (await _search(alice, '"unbalanced -'))["results"] == []
        for bad in ({"q": ""}, {"q": "x" * 257}, {"q": "x", "limit": 0}):
            with pytest.raises(ChatdError) as exc:
                await alice.call("GET", "/search", params=bad)
            assert exc.value.status == 422
