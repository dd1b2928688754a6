"""sync's new form, {chat_id: {"seq", "version"}}: new messages, the changes to those held,
the ids hidden, and the version reached, so that a client applying them is exactly in sync."""

from __future__ import annotations

import asyncio
import random
from typing import Any

from chatd.client import Api, Socket
from tests.conftest import Server, start_server, stop_server


async def group(sock: Socket, *members: Api) -> dict[str, Any]:
    return await sock.request(
        "create_chat", type="group", name="g", user_ids=[m.user_uuid for m in members]
    )


class View:
    """A client's copy of one chat, built only from sync answers."""

    def __init__(self, chat_id: int) -> None:
        self.chat_id = chat_id
        self.seq = 0
        self.version = 0
        self.pinned: int | None = None
        self.messages: dict[int, dict[str, Any]] = {}

    def apply(self, entry: dict[str, Any]) -> None:
        assert entry["error"] is None and not entry["too_long"]
        for message in entry["messages"]:
            assert message["id"] not in self.messages, "a new message came twice"
            assert message["seq"] > self.seq
            self.messages[message["id"]] = message
        for message in entry["updated"]:
            assert message["id"] in self.messages, "an update of a message never had"
            assert message["version"] > self.version, "a change came twice"
            self.messages[message["id"]] = message
        for message_id in entry["hidden"]:
            self.messages.pop(message_id, None)
        self.pinned = entry["pinned_message_id"]
        self.seq, self.version = entry["seq"], entry["version"]

    async def sync(self, sock: Socket, limit: int = 100) -> int:
        """Sync until nothing more; return the number of round trips."""
        trips = 0
        while True:
            point = {"seq": self.seq, "version": self.version}
            reply = await sock.request("sync", chats={str(self.chat_id): point}, limit=limit)
            trips += 1
            entry = reply["chats"][str(self.chat_id)]
            self.apply(entry)
            if not entry["has_more"]:
                return trips


async def server_view(api: Api, chat_id: int) -> tuple[dict[int, dict[str, Any]], dict]:
    history = await api.history(chat_id, limit=200, before=2**62)
    assert not history["has_more"]
    return {m["id"]: m for m in history["messages"]}, await api.chat(chat_id)


def comparable(messages: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    # read_status follows the read watermark, which moves without a version (receipts).
    return {i: {k: v for k, v in m.items() if k != "read_status"} for i, m in messages.items()}


async def test_sync_brings_new_messages_changes_and_hides(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        sent = [await a.request("send_message", chat_id=chat["id"], text=f"{n}") for n in range(4)]
        view = View(chat["id"])
        await view.sync(b)
        assert [m["id"] for m in view.messages.values()] == [m["id"] for m in sent]
        assert (view.seq, view.version) == (4, 4)

        # Nothing new: the same point comes back, nothing in it.
        reply = await b.request("sync", chats={str(chat["id"]): {"seq": 4, "version": 4}})
        assert reply["chats"][str(chat["id"])] == {
            "messages": [],
            "updated": [],
            "hidden": [],
            "pinned_message_id": None,
            "seq": 4,
            "version": 4,
            "has_more": False,
            "too_long": False,
            "error": None,
        }

        await a.request("edit_message", message_id=sent[0]["id"], text="zero")
        await a.request("delete_message", message_id=sent[1]["id"])
        await b.request("react", message_id=sent[2]["id"], emoji="👍")
        await b.request("delete_message", message_id=sent[3]["id"], for_everyone=False)
        await a.request("pin_message", message_id=sent[2]["id"])
        new = await a.request("send_message", chat_id=chat["id"], text="new")
        await a.request("react", message_id=new["id"], emoji="🎉")  # a change to a new one

        reply = await b.request(
            "sync", chats={str(chat["id"]): {"seq": view.seq, "version": view.version}}
        )
        entry = reply["chats"][str(chat["id"])]
        assert [m["id"] for m in entry["updated"]] == [sent[0]["id"], sent[1]["id"], sent[2]["id"]]
        assert entry["hidden"] == [sent[3]["id"]]
        assert [m["text"] for m in entry["messages"]] == ["new"]
        assert entry["messages"][0]["reactions"][0]["emoji"] == "🎉"
        assert entry["pinned_message_id"] == sent[2]["id"]
        view.apply(entry)
        assert view.version == (await bob.chat(chat["id"]))["version"] == 10
        messages, overview = await server_view(bob, chat["id"])
        assert comparable(view.messages) == comparable(messages)
        assert view.pinned == overview["pinned_message_id"]


async def test_the_old_form_still_answers_as_before(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        sent = await a.request("send_message", chat_id=chat["id"], text="x")
        await a.request("edit_message", message_id=sent["id"], text="y")
        reply = await b.request("sync", chats={str(chat["id"]): 0})
    entry = reply["chats"][str(chat["id"])]
    assert set(entry) == {"messages", "has_more", "error"}
    assert [m["text"] for m in entry["messages"]] == ["y"]


async def test_hidden_messages_never_stall_paging(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        sent = [await a.request("send_message", chat_id=chat["id"], text=f"{n}") for n in range(9)]
        for message in sent[2:5] + sent[7:]:
            await b.request("delete_message", message_id=message["id"], for_everyone=False)
        view = View(chat["id"])
        trips = await view.sync(b, limit=2)
        assert sorted(view.messages) == [m["id"] for m in sent[:2] + sent[5:7]]
        assert view.seq == 9 and trips == 2  # hidden ones take no room in a page
        # The old form too: has_more ends even when the last messages are hidden.
        seq, got = 0, []
        for _ in range(10):
            entry = (await b.request("sync", chats={str(chat["id"]): seq}, limit=2))["chats"]
            entry = entry[str(chat["id"])]
            got += [m["id"] for m in entry["messages"]]
            if not entry["has_more"]:
                break
            seq = entry["messages"][-1]["seq"]
        assert got == [m["id"] for m in sent[:2] + sent[5:7]]


async def test_a_hide_at_the_current_version_is_repeated_not_lost(alice: Api, bob: Api) -> None:
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        sent = await a.request("send_message", chat_id=chat["id"], text="x")
        point = {"seq": sent["seq"], "version": sent["version"]}
        await b.request("delete_message", message_id=sent["id"], for_everyone=False)
        for _ in range(2):  # the chat's version has not moved: the hide is news still
            reply = await b.request("sync", chats={str(chat["id"]): point})
            assert reply["chats"][str(chat["id"])]["hidden"] == [sent["id"]]
        # One change later it still comes (its event may have been overtaken by that
        # change's); two changes later, no more.
        later = await a.request("send_message", chat_id=chat["id"], text="y")
        point = {"seq": later["seq"], "version": later["version"]}
        reply = await b.request("sync", chats={str(chat["id"]): point})
        assert reply["chats"][str(chat["id"])]["hidden"] == [sent["id"]]
        later = await a.request("send_message", chat_id=chat["id"], text="z")
        point = {"seq": later["seq"], "version": later["version"]}
        reply = await b.request("sync", chats={str(chat["id"]): point})
        assert reply["chats"][str(chat["id"])]["hidden"] == []


async def test_reconnect_in_a_burst_of_changes_ends_exactly_in_sync(
    alice: Api, bob: Api, carol: Api
) -> None:
    rng = random.Random(13)
    async with await alice.connect() as a, await carol.connect() as c:
        chat = await group(a, bob, carol)
        base = [await a.request("send_message", chat_id=chat["id"], text=f"{n}") for n in range(30)]
        view = View(chat["id"])
        b = await bob.connect()
        await view.sync(b)

        async def burst(sock: Socket, me: Api, n: int) -> None:
            for i in range(n):
                target = rng.choice(base)["id"]
                action = rng.choice(["send", "edit", "react", "unreact", "delete", "pin"])
                try:
                    if action == "send":
                        await sock.request("send_message", chat_id=chat["id"], text=f"s{i}")
                    elif action == "edit":
                        await sock.request("edit_message", message_id=target, text=f"e{i}")
                    elif action in ("react", "unreact"):
                        await sock.request(action, message_id=target, emoji=rng.choice("👍🔥"))
                    elif action == "delete":
                        await sock.request("delete_message", message_id=target)
                    else:
                        await sock.request("pin_message", message_id=target)
                except Exception as exc:  # forbidden (not the sender), invalid (deleted)
                    assert getattr(exc, "code", None) in ("forbidden", "invalid"), exc

        async def bob_drops_and_comes_back() -> Socket:
            await asyncio.sleep(0.05)
            await b.abort()
            fresh = await bob.connect()
            await view.sync(fresh, limit=7)
            return fresh

        results = await asyncio.gather(
            burst(a, alice, 60), burst(c, carol, 60), bob_drops_and_comes_back()
        )
        fresh = results[-1]
        for message in base[::7]:
            await fresh.request("delete_message", message_id=message["id"], for_everyone=False)
        await view.sync(fresh, limit=7)
        await fresh.close()
    messages, overview = await server_view(bob, chat["id"])
    assert comparable(view.messages) == comparable(messages)
    assert (view.seq, view.version) == (overview["last_seq"], overview["version"])
    assert view.pinned == overview["pinned_message_id"]


async def test_too_many_changes_say_too_long(database_url: str, tmp_path: Any) -> None:
    server: Server = start_server(
        database_url,
        tmp_path,
        CHATD_SYNC_MAX_CHANGES="5",
        CHATD_CHANGE_RATE="off",
        CHATD_REGISTER_RATE="off",
    )
    try:
        from tests.conftest import new_user

        alice, bob = await new_user(server, "Alice"), await new_user(server, "Bob")
        async with await alice.connect() as a, await bob.connect() as b:
            chat = await group(a, bob)
            sent = [
                await a.request("send_message", chat_id=chat["id"], text=f"{n}") for n in range(8)
            ]
            point = {"seq": 8, "version": 8}
            for message in sent[:5]:
                await a.request("edit_message", message_id=message["id"], text="e")
            entry = (await b.request("sync", chats={str(chat["id"]): point}))["chats"]
            assert len(entry[str(chat["id"])]["updated"]) == 5
            # A user's own hides are not changes: many of them never make it too_long.
            for message in sent[:7]:
                await b.request("delete_message", message_id=message["id"], for_everyone=False)
            entry = (await b.request("sync", chats={str(chat["id"]): point}))["chats"]
            assert not entry[str(chat["id"])]["too_long"]
            assert len(entry[str(chat["id"])]["hidden"]) == 7
            await a.request("edit_message", message_id=sent[7]["id"], text="e")
            entry = (await b.request("sync", chats={str(chat["id"]): point}))["chats"]
            assert entry[str(chat["id"])] == {
                "messages": [],
                "updated": [],
                "hidden": [],
                "pinned_message_id": None,
                "seq": 8,
                "version": 14,
                "too_long": True,
                "has_more": False,
                "error": None,
            }
        await alice.aclose()
        await bob.aclose()
    finally:
        stop_server(server)


async def test_changes_too_big_for_this_frame_wait_for_the_next_sync(alice: Api, bob: Api) -> None:
    # Chats whose changes do not fit what is left of the frame come back deferred (their
    # own point, has_more), never half-applied.
    async with await alice.connect() as a, await bob.connect() as b:
        chats = [await group(a, bob) for _ in range(3)]
        points = {}
        for chat in chats:
            sent = [
                await a.request("send_message", chat_id=chat["id"], text="x" * 4000)
                for _ in range(80)
            ]
            points[chat["id"]] = {"seq": 80, "version": 80}
            for message in sent:
                await a.request("edit_message", message_id=message["id"], text="y" * 4000)
        views = {chat["id"]: View(chat["id"]) for chat in chats}
        for chat_id, view in views.items():
            view.seq, view.version = 80, 80
            view.messages = {
                m["id"]: m for m in (await bob.history(chat_id, page_size=100))["messages"]
            }
        reply = await b.request("sync", chats={str(c): p for c, p in points.items()})
        entries = [reply["chats"][str(chat["id"])] for chat in chats]
        applied = [e for e in entries if e["updated"]]
        deferred = [e for e in entries if not e["updated"]]
        assert applied and deferred
        for entry in deferred:
            assert entry["has_more"] and (entry["seq"], entry["version"]) == (80, 80)
        for chat_id, view in views.items():
            await view.sync(b)
            messages, _ = await server_view(bob, chat_id)
            assert comparable(view.messages) == comparable(messages)


async def test_an_old_form_client_moves_to_versions_from_zero(alice: Api, bob: Api) -> None:
    # A client that held messages by seq alone asks {seq, version: 0}: it gets only the
    # messages it holds that changed since they were sent, not all of them again.
    async with await alice.connect() as a, await bob.connect() as b:
        chat = await group(a, bob)
        sent = [await a.request("send_message", chat_id=chat["id"], text=f"{n}") for n in range(5)]
        await a.request("edit_message", message_id=sent[3]["id"], text="three")
        reply = await b.request("sync", chats={str(chat["id"]): {"seq": 5, "version": 0}})
    entry = reply["chats"][str(chat["id"])]
    assert [m["text"] for m in entry["updated"]] == ["three"]
    assert (entry["messages"], entry["seq"], entry["version"]) == ([], 5, 6)
