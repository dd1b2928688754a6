"""REST parity: create chats, send, fetch and read messages over plain HTTP."""

from __future__ import annotations

import asyncio

import httpx

from chatd.client import Api


def auth(api: Api) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.access_token}"}


async def test_post_chats_creates_like_create_chat(
    alice: Api, bob: Api, http: httpx.AsyncClient
) -> None:
    async with await bob.connect() as b:
        body = {"type": "private", "user_ids": [bob.user_uuid]}
        created = await http.post("/chats", json=body, headers=auth(alice))
        assert created.status_code == 201
        chat = created.json()
        assert chat["type"] == "private"
        assert {m["user_uuid"] for m in chat["members"]} == {alice.user_uuid, bob.user_uuid}
        assert (await b.next_event("chat_created"))["data"] == chat

        again = await http.post("/chats", json=body, headers=auth(alice))
        assert (again.status_code, again.json()) == (200, chat)

        group = await http.post(
            "/chats", json={"type": "group", "user_ids": [], "name": " "}, headers=auth(alice)
        )
        assert group.status_code == 422
        assert group.json()["error"]["code"] == "invalid"


async def test_post_message_is_stored_and_fanned_out_like_a_socket_send(
    alice: Api, bob: Api, http: httpx.AsyncClient
) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        response = await http.post(
            f"/chats/{chat['id']}/messages", json={"text": " hello "}, headers=auth(alice)
        )
        assert response.status_code == 201
        message = response.json()
        assert message["text"] == "hello" and message["seq"] == 1
        assert message["sender_uuid"] == alice.user_uuid and message["client_msg_id"] is None
        for sock in (a, b):
            assert (await sock.next_event("new_message"))["data"] == message

        fetched = await http.get(f"/messages/{message['id']}", headers=auth(bob))
        assert (fetched.status_code, fetched.json()) == (200, message)


async def test_idempotency_key_makes_retries_safe(
    alice: Api, bob: Api, http: httpx.AsyncClient
) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        url = f"/chats/{chat['id']}/messages"
        headers = auth(alice) | {"Idempotency-Key": "k-1"}
        responses = await asyncio.gather(
            *(http.post(url, json={"text": "once"}, headers=headers) for _ in range(5))
        )
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200, 200, 200, 201]
        assert len({r.json()["id"] for r in responses}) == 1
        assert responses[0].json()["client_msg_id"] == "k-1"
        await asyncio.sleep(0.3)
        delivered = [e for e in b.pending_events() if e["action"] == "new_message"]
        assert len(delivered) == 1
        assert len((await bob.history(chat["id"]))["messages"]) == 1

        # The same key through the socket is the same message too.
        again = await a.request(
            "send_message", chat_id=chat["id"], text="once", client_msg_id="k-1"
        )
        assert again["id"] == responses[0].json()["id"]

        mismatch = await http.post(
            url,
            json={"text": "x", "client_msg_id": "k-2"},
            headers=auth(alice) | {"Idempotency-Key": "k-3"},
        )
        assert mismatch.status_code == 422
        too_long = await http.post(
            url, json={"text": "x"}, headers=auth(alice) | {"Idempotency-Key": "k" * 65}
        )
        assert too_long.status_code == 422
        assert len((await bob.history(chat["id"]))["messages"]) == 1


async def test_a_removed_sender_retrying_an_idempotency_key_learns_nothing(
    alice: Api, bob: Api, http: httpx.AsyncClient
) -> None:
    async with await alice.connect() as a:
        chat = await a.request("create_chat", type="group", name="g", user_ids=[bob.user_uuid])
        headers = auth(bob) | {"Idempotency-Key": "k-1"}
        url = f"/chats/{chat['id']}/messages"
        first = await http.post(url, json={"text": "mine"}, headers=headers)
        assert first.status_code == 201
        await a.request("remove_member", chat_id=chat["id"], user_uuid=bob.user_uuid)
    retry = await http.post(url, json={"text": "mine"}, headers=headers)
    nowhere = await http.post(
        f"/chats/{2**62}/messages",
        json={"text": "mine"},
        headers=auth(bob) | {"Idempotency-Key": "k-2"},
    )
    assert (retry.status_code, retry.json()) == (404, nowhere.json())
    assert len((await alice.history(chat["id"]))["messages"]) == 1


async def test_post_read_moves_the_pointer_like_mark_read(
    alice: Api, bob: Api, http: httpx.AsyncClient
) -> None:
    async with await alice.connect() as a, await bob.connect():
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        other = await a.request("create_chat", type="group", name="o", user_ids=[bob.user_uuid])
        sent = [await a.request("send_message", chat_id=chat["id"], text=f"{n}") for n in range(3)]
        elsewhere = await a.request("send_message", chat_id=other["id"], text="x")

        response = await http.post(
            f"/chats/{chat['id']}/read", json={"up_to": sent[1]["id"]}, headers=auth(bob)
        )
        assert response.status_code == 200
        assert response.json() == {"read_upto": {str(chat["id"]): sent[1]["id"]}}
        assert (await a.next_event("message_read"))["data"]["message_id"] == sent[0]["id"]
        assert (await a.next_event("message_read"))["data"]["message_id"] == sent[1]["id"]
        assert (await bob.chat(chat["id"]))["unread_count"] == 1

        # A message of another chat is not a message of this one; nothing moves.
        wrong = await http.post(
            f"/chats/{chat['id']}/read", json={"up_to": elsewhere["id"]}, headers=auth(bob)
        )
        assert wrong.status_code == 404
        assert (await bob.chat(other["id"]))["unread_count"] == 1


async def test_message_routes_hide_chats_you_are_not_in(
    alice: Api, bob: Api, carol: Api, http: httpx.AsyncClient
) -> None:
    async with await alice.connect() as a:
        chat = await a.request("create_chat", type="private", user_ids=[bob.user_uuid])
        message = await a.request("send_message", chat_id=chat["id"], text="secret")
    for method, url, body in (
        ("GET", f"/messages/{message['id']}", None),
        ("GET", "/messages/999999999999", None),
        ("GET", f"/messages/{2**64}", None),
        ("POST", f"/chats/{chat['id']}/messages", {"text": "intrude"}),
        ("POST", f"/chats/{chat['id']}/read", {"up_to": message["id"]}),
        ("POST", f"/chats/{2**64}/messages", {"text": "x"}),
    ):
        response = await http.request(method, url, json=body, headers=auth(carol))
        assert response.status_code == 404, (method, url)
        assert response.json()["error"]["code"] == "not_found"
    assert len((await alice.history(chat["id"]))["messages"]) == 1
    unauthenticated = await http.post(f"/chats/{chat['id']}/messages", json={"text": "x"})
    assert unauthenticated.status_code == 401
