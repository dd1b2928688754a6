"""chatd.client and messages that live (issue #13): edit, delete, react, reply, forward and pin
from the Client, and a view built only from `Client.events()` that stays equal to the
server's across reconnects (a fresh /history load and the chat's pin), whatever the
interleaving of changes and drops. Real server, real PostgreSQL; one test drives the
Client's cursor with hand-made frames in every order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd.client import Api, ChatCursor, ChatdError, Client, Frame, Socket
from tests.conftest import PASSWORD, Server, new_user, start_server, stop_server

EMOJI = ["👍", "🎉", "😂"]
# What a change may legitimately be refused with in a random interleaving: a deleted
# message cannot be edited, reacted to or pinned (invalid), a hidden one is not_found.
REFUSALS = {"invalid", "not_found", "forbidden"}


# --- a view built only from events ----------------------------------------------------------


class View:
    """What an app holds, built only from a Client's events, and checked as it goes: every
    event must be news (no message twice, no update that is not newer, no hide twice),
    and new messages come in seq order per chat."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.messages: dict[int, dict[int, dict[str, Any]]] = {}  # chat → id → Message
        self.pinned: dict[int, int | None] = {}
        self.hidden: set[tuple[int, int]] = set()
        self.problems: list[str] = []
        self.too_long: list[dict[str, Any]] = []
        self.changes: list[str] = []  # the action of every change event, in order
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for event in self.client.events():
            await self.apply(event)

    async def apply(self, event: dict[str, Any]) -> None:
        action, data = event["action"], event.get("data")
        if action in CHANGES:
            self.changes.append(action)
        if action == "new_message":
            chat = self.messages.setdefault(data["chat_id"], {})
            if data["id"] in chat:
                self.problems.append(f"new_message twice: {data['id']}")
            if any(m["seq"] >= data["seq"] for m in chat.values()):
                self.problems.append(f"new_message out of seq order: {data['seq']}")
            chat[data["id"]] = data
        elif action == "message_updated":
            held = self.messages.get(data["chat_id"], {}).get(data["id"])
            if held is None:
                self.problems.append(f"message_updated of a message not held: {data['id']}")
            elif data["version"] <= held["version"]:
                self.problems.append(f"message_updated that is no news: {data}")
            else:
                self.messages[data["chat_id"]][data["id"]] = data
        elif action == "message_hidden":
            key = (data["chat_id"], data["message_id"])
            if key in self.hidden:
                self.problems.append(f"message_hidden twice: {key}")
            self.hidden.add(key)
            self.messages.get(data["chat_id"], {}).pop(data["message_id"], None)
        elif action in ("chat_created", "chat_updated"):
            self.pinned[data["id"]] = data["pinned_message_id"]
        elif action == "sync_too_long":  # as an app must: reload the chat
            self.too_long.append(data)
            chat_id = data["chat_id"]
            self.messages[chat_id] = {m["id"]: m for m in await history(self.client, chat_id)}
            self.pinned[chat_id] = (await self.client.rest("GET", f"/chats/{chat_id}"))[
                "pinned_message_id"
            ]

    def state(self, chat_ids: list[int]) -> dict[int, Any]:
        return {
            chat_id: (
                {i: comparable(m) for i, m in self.messages.get(chat_id, {}).items()},
                self.pinned.get(chat_id),
            )
            for chat_id in chat_ids
        }

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


CHANGES = ("new_message", "message_updated", "message_hidden", "chat_updated")


async def eventually(predicate: Any, timeout: float = 10) -> None:
    """Wait until `predicate()` holds (polling: what it reads has no event to wait on)."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("the condition never held")


def comparable(message: dict[str, Any]) -> dict[str, Any]:
    """A message without read_status, which changes with no version (and no event)."""
    return {k: v for k, v in message.items() if k != "read_status"}


async def history(client: Client | Api, chat_id: int) -> list[dict[str, Any]]:
    """Every message of the chat the caller can see, by keyset pages (a fresh load)."""
    messages: list[dict[str, Any]] = []
    before = 2**63 - 1
    while True:
        params = {"before": before, "limit": 200}
        if isinstance(client, Client):
            page = await client.rest("GET", f"/history/{chat_id}", params=params)
        else:
            page = await client.call("GET", f"/history/{chat_id}", params=params)
        messages = page["messages"] + messages
        if not page["has_more"] or not page["messages"]:
            return messages
        before = page["messages"][0]["id"]


async def server_state(api: Api, chat_ids: list[int]) -> dict[int, Any]:
    """The chats as `api`'s user sees them now: history by id, and the pin."""
    state = {}
    for chat_id in chat_ids:
        messages = {m["id"]: comparable(m) for m in await history(api, chat_id)}
        pinned = (await api.call("GET", f"/chats/{chat_id}"))["pinned_message_id"]
        state[chat_id] = (messages, pinned)
    return state


async def assert_view_matches(
    view: View, api: Api, chat_ids: list[int], timeout: float = 15
) -> None:
    """Wait until the view equals what `api` loads fresh; then no event may have been
    anything but news."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        expected = await server_state(api, chat_ids)
        if view.state(chat_ids) == expected or loop.time() > deadline:
            break
        await asyncio.sleep(0.1)
    assert view.state(chat_ids) == expected
    assert view.problems == []


@contextlib.asynccontextmanager
async def observed(api: Api, base_url: str, **options: Any) -> AsyncIterator[tuple[Client, View]]:
    """A Client logged in as `api`'s user, and the View of its events."""
    options = {"backoff_base": 0.02, "gap_grace": 0.1, **options}
    async with Client(base_url, email=api.email, password=PASSWORD, **options) as client:  # type: ignore[attr-defined]
        view = View(client)
        try:
            yield client, view
        finally:
            await view.stop()


def drop(client: Client) -> bool:
    """Cut the client's connection as a network failure would; False while it has none."""
    if client.socket is None:
        return False
    client.socket.ws.transport.abort()
    return True


# --- each method, end to end ----------------------------------------------------------------


async def test_each_lifecycle_method_works_and_is_told_once(
    server: Server, alice: Api, bob: Api
) -> None:
    async with observed(alice, server.base_url) as (a, view), await bob.connect() as b:
        chat = await a.create_chat([bob.user_uuid], name="life")
        other = await a.create_chat([bob.user_uuid], name="elsewhere")
        first = await a.send(chat["id"], "hello", mentions=[bob.user_uuid])
        assert first["mentions"] == [bob.user_uuid] and first["version"] == 1

        answer = await a.reply(chat["id"], first["id"], "replying")
        assert answer["reply_to"] == first["id"]

        edited = await a.edit(first["id"], "hello, edited")
        assert edited["text"] == "hello, edited" and edited["edited_at"] is not None
        assert await a.edit(first["id"], "hello, edited") == edited  # the same text: no-op
        assert [e["text"] for e in await a.edits(first["id"])] == ["hello"]

        reacted = await a.react(first["id"], "👍")
        assert reacted["reactions"] == [{"emoji": "👍", "count": 1, "users": [alice.user_uuid]}]
        assert (await a.react(first["id"], "👍"))["version"] == reacted["version"]  # a set
        unreacted = await a.unreact(first["id"], "👍")
        assert unreacted["reactions"] == []
        assert (await a.unreact(first["id"], "👍"))["version"] == unreacted["version"]

        forwarded = await a.forward(answer["id"], other["id"], client_msg_id="fw-1")
        assert forwarded["chat_id"] == other["id"] and forwarded["text"] == "replying"
        assert forwarded["forwarded_from"]["sender_uuid"] == alice.user_uuid
        again = await a.forward(answer["id"], other["id"], client_msg_id="fw-1")
        assert again["id"] == forwarded["id"]  # idempotent, like send

        pinned = await a.pin(first["id"])
        assert pinned["pinned_message_id"] == first["id"]
        assert (await a.unpin(chat["id"]))["pinned_message_id"] is None
        await a.pin(answer["id"], chat_id=chat["id"])

        gone = await a.delete(answer["id"])  # the pinned one: unpinned with it
        assert gone == {"chat_id": chat["id"], "message_id": answer["id"], "for_everyone": True}
        assert await a.delete(answer["id"]) == gone  # again: nothing more happens
        hid = await a.delete(first["id"], for_everyone=False)
        assert hid == {"chat_id": chat["id"], "message_id": first["id"], "for_everyone": False}
        assert await a.delete(first["id"], for_everyone=False) == hid

        with pytest.raises(ChatdError) as refused:
            await a.edit(answer["id"], "too late")
        assert refused.value.code == "invalid"
        with pytest.raises(ChatdError) as refused:
            await a.react(first["id"], "👍")  # hidden for alice
        assert refused.value.code == "not_found"

        await assert_view_matches(view, alice, [chat["id"], other["id"]])
        assert view.pinned[chat["id"]] is None
        assert view.hidden == {(chat["id"], first["id"])}
        assert view.messages[chat["id"]][answer["id"]]["deleted"] is True

        # Bob sees each change once, no-ops none: the edit, one react, one unreact and
        # the delete; the two pins and the two unpins (the second by the delete).
        await b.request("send_message", chat_id=chat["id"], text="marker")
        changes = []
        while True:
            event = await b.next_event()
            if event["action"] == "new_message" and event["data"]["text"] == "marker":
                break
            if event["action"] in ("message_updated", "chat_updated", "message_hidden"):
                changes.append((event["action"], event["data"]["version"]))
        versions = [version for _, version in changes]
        assert versions == sorted(versions)
        assert [action for action, _ in changes] == [
            "message_updated",  # edit
            "message_updated",  # react
            "message_updated",  # unreact
            "chat_updated",  # pin
            "chat_updated",  # unpin
            "chat_updated",  # pin
            "message_updated",  # delete for everyone
            "chat_updated",  # which unpinned it, in the same change
        ]
        assert changes[-1][1] == changes[-2][1]


# --- reconnects in a burst ------------------------------------------------------------------


async def bob_changes(
    sock: Socket, rng: random.Random, chat_id: int, ids: list[int], count: int
) -> None:
    """A burst of edits, deletes (for everyone and for Bob), reactions, pins and sends."""
    for n in range(count):
        target = rng.choice(ids)
        kind = rng.choice(["edit", "react", "react", "unreact", "delete", "hide", "pin", "send"])
        try:
            if kind == "edit":
                await sock.request("edit_message", message_id=target, text=f"edit {n}")
            elif kind == "react":
                await sock.request("react", message_id=target, emoji=rng.choice(EMOJI))
            elif kind == "unreact":
                await sock.request("unreact", message_id=target, emoji=rng.choice(EMOJI))
            elif kind == "delete":
                await sock.request("delete_message", message_id=target)
            elif kind == "hide":
                await sock.request("delete_message", message_id=target, for_everyone=False)
            elif kind == "pin":
                await sock.request("pin_message", message_id=target)
            else:
                sent = await sock.request("send_message", chat_id=chat_id, text=f"burst {n}")
                ids.append(sent["id"])
        except ChatdError as exc:
            assert exc.code in REFUSALS, exc
        await asyncio.sleep(0.01)  # a burst that lasts a few seconds


async def test_a_view_built_from_events_equals_history_after_drops_in_a_burst(
    server: Server, alice: Api, bob: Api
) -> None:
    rng = random.Random(13)
    # sync_limit=2: resumes come in several has_more rounds.
    async with observed(alice, server.base_url, sync_limit=2) as (a, view):
        async with await bob.connect() as b:
            chat = await a.create_chat([bob.user_uuid], name="burst")
            await a.request("set_role", chat_id=chat["id"], user_uuid=bob.user_uuid, role="admin")
            ids = [(await a.send(chat["id"], f"a{n}"))["id"] for n in range(4)]
            ids += [
                (await b.request("send_message", chat_id=chat["id"], text=f"b{n}"))["id"]
                for n in range(4)
            ]
            # Each reconnect waits a little, so changes pile up while Alice is away.
            original_open = a._open

            async def slow_open() -> Socket:
                await asyncio.sleep(rng.uniform(0.05, 0.3))
                return await original_open()

            a._open = slow_open  # type: ignore[method-assign]
            burst = asyncio.create_task(bob_changes(b, rng, chat["id"], ids, 150))

            async def alice_changes() -> None:
                """Alice's own changes go through the Client, across the drops."""
                while not burst.done():
                    with contextlib.suppress(ChatdError):
                        await a.react(rng.choice(ids), rng.choice(EMOJI))
                    with contextlib.suppress(ChatdError):
                        await a.delete(rng.choice(ids), for_everyone=False)
                    await asyncio.sleep(0.05)

            mine = asyncio.create_task(alice_changes())
            drops = 0
            while not burst.done():
                await asyncio.sleep(rng.uniform(0.1, 0.4))
                drops += drop(a)
            await burst
            await mine
            assert drops >= 3 and a.reconnects >= 3
            await assert_view_matches(view, alice, [chat["id"]])


async def test_a_gap_too_long_to_replay_says_so_and_the_view_recovers(
    database_url: str, tmp_path: Path
) -> None:
    srv = await asyncio.to_thread(
        start_server, database_url, tmp_path, CHATD_SYNC_MAX_CHANGES="3", CHATD_CHANGE_RATE="off"
    )
    try:
        alice, bob = await new_user(srv, "Alice"), await new_user(srv, "Bob")
        async with observed(alice, srv.base_url) as (a, view), await bob.connect() as b:
            chat = await a.create_chat([bob.user_uuid])
            ids = [(await a.send(chat["id"], f"m{n}"))["id"] for n in range(6)]

            # Away while Bob makes more changes than a sync may replay.
            gate = asyncio.Event()
            original_open = a._open

            async def gated_open() -> Socket:
                await gate.wait()
                return await original_open()

            a._open = gated_open  # type: ignore[method-assign]
            drop(a)
            for n in range(5):  # five messages changed: more than three
                await b.request("react", message_id=ids[n], emoji=EMOJI[n % 3])
            await b.request("pin_message", message_id=ids[1])
            later = await b.request("send_message", chat_id=chat["id"], text="later")
            gate.set()

            await assert_view_matches(view, alice, [chat["id"]])
            [told] = view.too_long
            assert told["chat_id"] == chat["id"] and told["pinned_message_id"] == ids[1]
            # It goes on from there, live and through syncs.
            await b.request("edit_message", message_id=later["id"], text="later, edited")
            drop(a)
            await b.request("unpin_message", chat_id=chat["id"])
            await assert_view_matches(view, alice, [chat["id"]])
            assert len(view.too_long) == 1
        await alice.aclose()
        await bob.aclose()
    finally:
        await asyncio.to_thread(stop_server, srv)


async def test_changes_told_live_and_by_a_sync_in_flight_are_told_once(
    server: Server, alice: Api, bob: Api
) -> None:
    """Changes committed after a resuming sync was asked but before the server read it come
    twice: live, and in the answer. Here the live events are applied first, then the answer
    (read at a later version than the one asked from): each change is told once."""
    async with observed(alice, server.base_url) as (a, view), await bob.connect() as b:
        chat = await a.create_chat([bob.user_uuid], name="race")
        chat_id = chat["id"]
        await a.request("set_role", chat_id=chat_id, user_uuid=bob.user_uuid, role="admin")
        ids = [(await a.send(chat_id, f"m{n}"))["id"] for n in range(4)]
        await assert_view_matches(view, alice, [chat_id])

        async def changes() -> int:
            """A send, a reaction, a delete, a pin, and a hide by Alice on another device:
            the version they bring the chat to."""
            await b.request("send_message", chat_id=chat_id, text="in the window")
            await b.request("react", message_id=ids[0], emoji="🎉")
            await b.request("delete_message", message_id=ids[1])
            await alice.call("DELETE", f"/messages/{ids[2]}", params={"for_everyone": "false"})
            return (await b.request("pin_message", message_id=ids[3]))["version"]

        original_open = a._open
        raced = asyncio.Event()

        async def racing_open() -> Socket:
            sock = await original_open()
            original_request = sock.request

            async def request(action: str, timeout: float = 10, **fields: Any) -> Any:
                if action != "sync" or raced.is_set():
                    return await original_request(action, timeout, **fields)
                raced.set()
                version = await changes()  # the sync point was taken before these
                answer = await original_request(action, timeout, **fields)
                # Their live events are applied first.
                await eventually(lambda: a.cursors[chat_id].version >= version)
                entry = answer["chats"][str(chat_id)]
                assert entry["version"] == version and entry["messages"]  # it carries them
                return answer

            sock.request = request  # type: ignore[method-assign]
            return sock

        a._open = racing_open  # type: ignore[method-assign]
        before = len(view.changes)
        drop(a)
        await raced.wait()
        await assert_view_matches(view, alice, [chat_id])
        await asyncio.sleep(0.2)  # time for any repeat to show
        assert sorted(view.changes[before:]) == [
            "chat_updated",
            "message_hidden",
            "message_updated",
            "message_updated",
            "new_message",
        ]


async def test_live_events_newer_than_a_sync_answer_wait_for_it(
    server: Server, alice: Api, bob: Api
) -> None:
    """A first connect with unread messages: the chat's baseline is Alice's read pointer,
    below them. A new message and a reaction to an unread one, committed after the server
    read the resuming sync, arrive live before its answer is applied: they concern messages
    the view does not reach yet, so they wait for the answer, then follow it."""
    async with await bob.connect() as b:
        chat = await b.request("create_chat", type="private", user_ids=[alice.user_uuid])
        chat_id = chat["id"]
        unread = [
            (await b.request("send_message", chat_id=chat_id, text=f"u{n}"))["id"] for n in range(3)
        ]
        client = Client(
            server.base_url,
            email=alice.email,  # type: ignore[attr-defined]
            password=PASSWORD,
            gap_grace=30,  # no sync for a gap here: the answer alone must close it
        )
        original_open = client._open
        raced = asyncio.Event()

        async def racing_open() -> Socket:
            sock = await original_open()
            original_request = sock.request

            async def request(action: str, timeout: float = 10, **fields: Any) -> Any:
                answer = await original_request(action, timeout, **fields)
                if action == "sync" and not raced.is_set():
                    raced.set()
                    await b.request("send_message", chat_id=chat_id, text="newer")
                    await b.request("react", message_id=unread[1], emoji="🎉")
                    # The reaction (sent second, so read second) waits for the answer.
                    await eventually(lambda: len(client._ahead.get(chat_id, {})) >= 1)
                return answer

            sock.request = request  # type: ignore[method-assign]
            return sock

        client._open = racing_open  # type: ignore[method-assign]
        async with client:
            view = View(client)
            await assert_view_matches(view, alice, [chat_id])
            assert raced.is_set()
            assert view.changes == ["new_message"] * 4 + ["message_updated"]
            await view.stop()


async def test_a_chat_joined_while_connected_is_followed_from_the_join(
    server: Server, alice: Api, bob: Api
) -> None:
    """Added to a group with history: its events wait for a baseline (get_chat: the read
    pointer, at the chat's last message when added), then the messages after it come, each
    once. A change to a message from before the join is told too (an app may show that
    history), though it never came as new_message."""
    async with observed(alice, server.base_url) as (a, view), await bob.connect() as b:
        group = await b.request("create_chat", type="group", name="later", user_ids=[])
        chat_id = group["id"]
        old = await b.request("send_message", chat_id=chat_id, text="before you came")
        await b.request("add_members", chat_id=chat_id, user_ids=[alice.user_uuid])
        await eventually(lambda: chat_id in a.cursors)
        assert a.cursors[chat_id].seq == old["seq"]
        after = await b.request("send_message", chat_id=chat_id, text="after")
        await b.request("edit_message", message_id=after["id"], text="after, edited")
        await b.request("react", message_id=old["id"], emoji="👍")
        await eventually(lambda: len(view.changes) >= 3)
        await asyncio.sleep(0.2)  # time for any repeat to show
        assert [m["text"] for m in view.messages[chat_id].values()] == ["after, edited"]
        assert view.changes == ["new_message", "message_updated", "message_updated"]
        assert view.problems == [f"message_updated of a message not held: {old['id']}"]


# --- the cursor, driven by hand -------------------------------------------------------------


def message(id: int, seq: int, version: int, **fields: Any) -> dict[str, Any]:
    return {"id": id, "chat_id": 7, "seq": seq, "version": version, "text": "", **fields}


def chat(version: int, pinned: int | None, name: str = "g") -> dict[str, Any]:
    return {"id": 7, "type": "group", "name": name, "created_at": "t", "members": []}, {
        "version": version,
        "pinned_message_id": pinned,
    }


def chat_updated(version: int, pinned: int | None) -> Frame:
    base, state = chat(version, pinned)
    return Frame(action="chat_updated", data={**base, **state})


async def test_versioned_events_in_any_order_are_told_once_in_version_order() -> None:
    """A chat at seq 2, version 5. Then, as the server numbered them: v6 message 103 (seq
    3), v7 an edit of 101, v8 a pin of 103, v9 the delete of 103 (message_updated, then
    chat_updated unpinning it: one change), v10 message 104; plus a repeat of v7. In every
    arrival order the client tells each change once, in version order."""
    frames = [
        Frame(action="new_message", data=message(103, 3, 6)),
        Frame(action="message_updated", data=message(101, 1, 7, text="edited")),
        chat_updated(8, 103),
        Frame(action="message_updated", data=message(103, 3, 9, deleted=True)),
        chat_updated(9, None),
        Frame(action="new_message", data=message(104, 4, 10)),
        Frame(action="message_updated", data=message(101, 1, 7, text="edited")),
    ]
    expected = [
        ("new_message", 103, 6),
        ("message_updated", 101, 7),
        ("chat_updated", 103, 8),
        ("message_updated", 103, 9),
        ("chat_updated", None, 9),
        ("new_message", 104, 10),
    ]
    orders = 0
    for order in itertools.permutations(range(len(frames))):
        if order.index(3) > order.index(4):
            continue  # the server sends a change's two events in this order, to every socket
        client = Client("http://127.0.0.1:9")
        base, _ = chat(5, None)
        client.cursors[7] = ChatCursor(seq=2, version=5, pinned_message_id=None, chat=base)
        for index in order:
            client._handle(Frame(frames[index]))
        told = []
        while not client._events.empty():
            event = client._events.get_nowait()
            assert event is not None
            data = event["data"]
            key = data["pinned_message_id"] if event["action"] == "chat_updated" else data["id"]
            told.append((event["action"], key, data["version"]))
        # Each once, in version order; the unpin half of the delete may come after the
        # next change when it arrived after it.
        assert sorted(told, key=lambda event: event[2]) == expected, order
        assert order.index(4) > order.index(5) or told == expected, order
        assert client._ahead == {} and client._gap_since == {}
        cursor = client.cursors[7]
        assert (cursor.seq, cursor.version, cursor.pinned_message_id) == (4, 10, None)
        orders += 1
    assert orders == 2520


async def test_an_unpin_applied_before_its_delete_still_gets_the_delete() -> None:
    """A socket that delivered only the chat_updated half of a delete of the pinned message
    (then, say, dropped): the message half is still applied when it comes after later
    changes, and a sync asks from below that version meanwhile, so it cannot be lost."""
    client = Client("http://127.0.0.1:9")
    base, _ = chat(8, 103)
    client.cursors[7] = ChatCursor(seq=3, version=8, pinned_message_id=103, chat=base)
    client._handle(chat_updated(9, None))
    assert client.cursors[7].sync_point() == {"seq": 3, "version": 8}
    client._handle(Frame(action="new_message", data=message(104, 4, 10)))
    client._handle(Frame(action="message_updated", data=message(103, 3, 9, deleted=True)))
    told = [client._events.get_nowait() for _ in range(client._events.qsize())]
    assert [(e["action"], e["data"]["version"]) for e in told] == [
        ("chat_updated", 9),
        ("new_message", 10),
        ("message_updated", 9),
    ]
    assert client.cursors[7].sync_point() == {"seq": 4, "version": 10}


# --- any interleaving -----------------------------------------------------------------------

USERS = st.sampled_from(["alice", "bob"])
TARGET = st.integers(min_value=0, max_value=7)
TEXT = st.sampled_from(["x", "y", "zz"])
TARGET_AT = {"edit": 1, "delete": 2, "hide": 2, "react": 2, "unreact": 2, "pin": 2}
ACTION = st.one_of(
    st.tuples(st.just("send"), USERS, TEXT),
    st.tuples(st.just("edit"), TARGET, TEXT),
    st.tuples(st.just("delete"), USERS, TARGET),
    st.tuples(st.just("hide"), USERS, TARGET),
    st.tuples(st.just("react"), USERS, TARGET, st.sampled_from(EMOJI)),
    st.tuples(st.just("unreact"), USERS, TARGET, st.sampled_from(EMOJI)),
    st.tuples(st.just("pin"), USERS, TARGET),
    st.tuples(st.just("unpin"), USERS),
    st.tuples(st.just("drop")),
)


@pytest.fixture(scope="module")
def pair(server: Server) -> Iterator[dict[str, Api]]:
    """Alice and Bob for every example; each example gets its own group."""

    async def make() -> dict[str, Api]:
        return {"alice": await new_user(server, "Alice"), "bob": await new_user(server, "Bob")}

    yield asyncio.run(make())


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(actions=st.lists(ACTION, min_size=1, max_size=20))
def test_any_interleaving_of_changes_and_reconnects_ends_in_sync(
    server: Server, pair: dict[str, Api], actions: list[tuple[Any, ...]]
) -> None:
    asyncio.run(interleave(server, pair, actions))


async def interleave(server: Server, users: dict[str, Api], actions: list[tuple[Any, ...]]) -> None:
    """Alice acts through the Client under test (so her changes are retried across drops);
    Bob through his own socket. Both are in charge of the group, so either may delete or pin
    any message; edits are by the sender."""
    alice, bob = users["alice"], users["bob"]
    async with observed(alice, server.base_url, sync_limit=2) as (a, view):
        async with await bob.connect() as b:
            group = await a.create_chat([bob.user_uuid], name=f"p-{uuid.uuid4().hex[:6]}")
            chat_id = group["id"]
            await a.request("set_role", chat_id=chat_id, user_uuid=bob.user_uuid, role="admin")
            sent: list[tuple[int, str]] = []  # (message id, sender)

            async def by_alice(kind: str, step: tuple[Any, ...], target: int) -> Any:
                """Alice's change through the Client's own methods."""
                if kind == "send":
                    return await a.send(chat_id, step[2])
                if kind == "unpin":
                    return await a.unpin(chat_id)
                if kind == "edit":
                    return await a.edit(target, step[2])
                if kind in ("delete", "hide"):
                    return await a.delete(target, for_everyone=kind == "delete")
                if kind == "react":
                    return await a.react(target, step[3])
                if kind == "unreact":
                    return await a.unreact(target, step[3])
                return await a.pin(target)

            async def by_bob(kind: str, step: tuple[Any, ...], target: int) -> Any:
                if kind == "send":
                    return await b.request("send_message", chat_id=chat_id, text=step[2])
                if kind == "unpin":
                    return await b.request("unpin_message", chat_id=chat_id)
                if kind == "edit":
                    return await b.request("edit_message", message_id=target, text=step[2])
                if kind in ("delete", "hide"):
                    everyone = kind == "delete"
                    return await b.request(
                        "delete_message", message_id=target, for_everyone=everyone
                    )
                if kind in ("react", "unreact"):
                    return await b.request(kind, message_id=target, emoji=step[3])
                return await b.request("pin_message", message_id=target)

            for step in actions:
                kind = step[0]
                if kind == "drop":
                    drop(a)
                    continue
                if kind not in ("send", "unpin") and not sent:
                    continue
                at = TARGET_AT.get(kind)  # where the step names its message, if it does
                target_id, sender = sent[step[at] % len(sent)] if at is not None else (0, "")
                # Edits are the sender's; every other change is the step's user's.
                who = sender if kind == "edit" else step[1]
                try:
                    if who == "alice":
                        result = await by_alice(kind, step, target_id)
                    else:
                        result = await by_bob(kind, step, target_id)
                except ChatdError as exc:
                    assert exc.code in REFUSALS, exc
                    continue
                if kind == "send":
                    sent.append((result["id"], who))
            await assert_view_matches(view, alice, [chat_id])
