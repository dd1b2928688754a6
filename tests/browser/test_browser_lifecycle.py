"""Messages that live, in two real browsers: edit, delete, reply, react, mention, pin, forward.

Alice and Bob each have their own page (the system Chromium, headless) and a private chat
open; every test checks what the *other* user sees, since that travels through the server.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from playwright import sync_api

from tests.browser.test_browser_chat import (
    ARGS,
    ARTIFACTS,
    CHROMIUM,
    SOCKET_SPY,
    log_in,
    logged_in_client,
    register,
)
from tests.conftest import Server

expect = sync_api.expect

# Keeps every frame the page sends in window.__sent (after SOCKET_SPY).
SEND_SPY = """
window.__sent = [];
const realSend = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
  window.__sent.push(data);
  return realSend.call(this, data);
};
"""


@pytest.fixture(scope="module")
def chromium() -> Iterator[sync_api.Browser]:
    # One browser for the module (each test has its own contexts): launching is the slow part.
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM} (make browser-deps)"
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@dataclass
class User:
    name: str
    email: str
    uuid: str
    page: sync_api.Page
    api: httpx.Client
    # Answers for the page's confirm() and prompt() dialogs, in order; confirm is
    # accepted when none is queued, and any other dialog is an error.
    answers: list[bool | str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def on_dialog(self, dialog: sync_api.Dialog) -> None:
        answer = self.answers.pop(0) if self.answers else dialog.type == "confirm"
        if dialog.type not in ("confirm", "prompt"):
            self.errors.append(f"{dialog.type}: {dialog.message}")
        if answer is False:
            dialog.dismiss()
        elif isinstance(answer, str):
            dialog.accept(answer)
        else:
            dialog.accept()

    def composer(self) -> sync_api.Locator:
        return self.page.get_by_label("Message", exact=True)

    def send(self, text: str) -> None:
        self.composer().fill(text)
        self.composer().press("Enter")

    def message(self, text: str) -> sync_api.Locator:
        """The one bubble whose own text is exactly `text`."""
        return self.page.locator("#messages .message").filter(
            has=self.page.locator(".text", has_text=re.compile(f"^{re.escape(text)}$"))
        )

    def chat_item(self, title: str) -> sync_api.Locator:
        return self.page.locator(".chat-item").filter(
            has=self.page.locator(".chat-name", has_text=re.compile(f"^{re.escape(title)}$"))
        )

    def menu(self, bubble: sync_api.Locator, item: str) -> None:
        """Open a message's menu and choose `item`."""
        bubble.hover()
        bubble.locator(".menu-button").click()
        self.page.locator("#message-menu").get_by_role("menuitem", name=item, exact=True).click()


def new_user(browser: sync_api.Browser, server: Server, name: str, spy: bool = False) -> User:
    email = register(server, name)
    api = logged_in_client(server, email)
    context = browser.new_context(viewport={"width": 900, "height": 600})
    if spy:
        context.add_init_script(SOCKET_SPY)
        context.add_init_script(SEND_SPY)
    page = context.new_page()
    user = User(name, email, api.get("/me").json()["user_uuid"], page, api)
    page.on("pageerror", lambda e: user.errors.append(str(e)))
    page.on("dialog", user.on_dialog)
    log_in(page, server, email)
    return user


@pytest.fixture
def pair(chromium, server: Server) -> Iterator[tuple[User, User, dict]]:
    """Alice and Bob, logged in on their own pages, with their private chat open on both."""
    tag = uuid.uuid4().hex[:6]
    alice = new_user(chromium, server, f"Alice{tag}", spy=True)
    bob = new_user(chromium, server, f"Bob{tag}")
    chat = alice.api.post("/chats", json={"type": "private", "user_ids": [bob.uuid]}).json()
    alice.chat_item(bob.name).click()
    bob.chat_item(alice.name).click()
    expect(alice.page.locator("#chat-title")).to_have_text(bob.name)
    expect(bob.page.locator("#chat-title")).to_have_text(alice.name)
    yield alice, bob, chat
    for user in (alice, bob):
        user.page.context.close()
        user.api.close()
        assert not user.errors, user.errors


def history(user: User, chat_id: int) -> list[dict]:
    res = user.api.get(f"/history/{chat_id}", params={"page_size": 200})
    assert res.status_code == 200, res.text
    return res.json()["messages"]


def test_edit_the_last_message_with_the_up_key(pair) -> None:
    alice, bob, chat = pair
    alice.send("helo world")
    expect(bob.message("helo world")).to_have_count(1)
    expect(bob.message("helo world").locator(".edited")).to_have_count(0)

    # Bob has sent nothing: ↑ has nothing of his to edit, and never offers Alice's.
    bob.composer().press("ArrowUp")
    expect(bob.page.locator("#compose-bar")).to_be_hidden()
    expect(bob.composer()).to_have_value("")

    # Alice's ↑ in an empty composer brings her last message back to fix it.
    alice.send("second thought")
    expect(alice.message("second thought").locator(".status")).to_have_text(re.compile("✓"))
    alice.composer().press("ArrowUp")
    expect(alice.page.locator("#compose-bar")).to_be_visible()
    expect(alice.page.locator("#compose-bar-label")).to_have_text("Edit message")
    expect(alice.composer()).to_have_value("second thought")
    # Escape gives up, and the composer is empty again.
    alice.composer().press("Escape")
    expect(alice.page.locator("#compose-bar")).to_be_hidden()
    expect(alice.composer()).to_have_value("")

    # Edit the older one from its menu.
    alice.menu(alice.message("helo world"), "Edit")
    expect(alice.composer()).to_have_value("helo world")
    alice.composer().fill("hello world")
    alice.composer().press("Enter")
    for user in (alice, bob):
        edited = user.message("hello world")
        expect(edited).to_have_count(1)
        expect(edited.locator(".edited")).to_have_text("edited")
        expect(user.message("helo world")).to_have_count(0)
        expect(user.message("second thought").locator(".edited")).to_have_count(0)
    expect(alice.composer()).to_have_value("")
    # The server holds the edit, with the old text kept.
    (stored,) = [m for m in history(bob, chat["id"]) if m["text"] == "hello world"]
    assert stored["edited_at"] is not None
    edits = bob.api.get(f"/messages/{stored['id']}/edits").json()["edits"]
    assert [e["text"] for e in edits] == ["helo world"]

    # Now ↑ edits the newest one.
    alice.composer().press("ArrowUp")
    expect(alice.composer()).to_have_value("second thought")
    alice.composer().fill("second thought, revised")
    alice.composer().press("Enter")
    expect(bob.message("second thought, revised").locator(".edited")).to_be_visible()


def test_delete_for_everyone_and_for_me(pair) -> None:
    alice, bob, chat = pair
    for text in ("keep me", "oops", "not for bob"):
        alice.send(text)
    expect(bob.page.locator("#messages .message .text")).to_have_text(
        ["keep me", "oops", "not for bob"]
    )

    # Bob cannot delete Alice's message for everyone in a private chat: not offered.
    bob.message("oops").hover()
    bob.message("oops").locator(".menu-button").click()
    menu = bob.page.locator("#message-menu")
    expect(menu.get_by_role("menuitem", name="Delete for me")).to_be_visible()
    expect(menu.get_by_role("menuitem", name="Delete for everyone")).to_have_count(0)
    bob.page.keyboard.press("Escape")
    expect(menu).to_be_hidden()

    # Alice says no to the confirmation first: nothing happens.
    alice.answers.append(False)
    alice.menu(alice.message("oops"), "Delete for everyone")
    alice.page.wait_for_timeout(300)
    expect(bob.message("oops")).to_have_count(1)

    # Then yes: both see a tombstone where it was, and Bob's chat list says so.
    alice.menu(alice.message("oops"), "Delete for everyone")
    for user in (alice, bob):
        expect(user.page.locator("#messages .message .text")).to_have_text(
            ["keep me", "message deleted", "not for bob"]
        )
        expect(user.page.locator("#messages .message.deleted .tombstone")).to_have_count(1)
    tombstone = bob.page.locator("#messages .message.deleted")
    expect(tombstone.locator(".reactions, .quote")).to_have_count(0)

    # Bob deletes "not for bob" for himself only: gone for him, still there for Alice.
    bob.menu(bob.message("not for bob"), "Delete for me")
    expect(bob.message("not for bob")).to_have_count(0)
    expect(bob.page.locator("#messages .message .text")).to_have_text(
        ["keep me", "message deleted"]
    )
    alice.page.wait_for_timeout(300)
    expect(alice.message("not for bob")).to_have_count(1)
    # It stays gone after a reload (the server hides it from his history).
    bob.page.reload()
    bob.chat_item(alice.name).click()
    expect(bob.page.locator("#messages .message .text")).to_have_text(
        ["keep me", "message deleted"]
    )
    assert [m["text"] for m in history(bob, chat["id"])] == ["keep me", ""]


def test_reply_shows_a_quote_that_jumps_to_the_original(pair) -> None:
    alice, bob, chat = pair
    alice.send("what time is the meeting?")
    # Enough chatter after it to scroll it out of sight.
    for i in range(40):
        alice.api.post(f"/chats/{chat['id']}/messages", json={"text": f"filler {i}"})
    expect(bob.message("filler 39")).to_have_count(1)
    original_id = int(bob.message("what time is the meeting?").get_attribute("data-message-id"))

    bob.menu(bob.message("what time is the meeting?"), "Reply")
    expect(bob.page.locator("#compose-bar-label")).to_have_text(f"Reply to {alice.name}")
    expect(bob.page.locator("#compose-bar-text")).to_have_text("what time is the meeting?")
    bob.send("at three")
    expect(bob.page.locator("#compose-bar")).to_be_hidden()

    for user in (alice, bob):
        quote = user.message("at three").locator(".quote")
        expect(quote.locator(".quote-text")).to_have_text("what time is the meeting?")
        expect(quote.locator(".quote-name")).to_have_text("You" if user is alice else alice.name)
    (answer,) = [m for m in history(alice, chat["id"]) if m["text"] == "at three"]
    assert answer["reply_to"] == original_id

    # Alice is at the bottom, far from the question; the quote brings it back.
    original = alice.message("what time is the meeting?")
    expect(alice.message("at three")).to_be_in_viewport()
    expect(original).not_to_be_in_viewport()
    expect(original).not_to_have_class(re.compile("highlight"))
    alice.message("at three").locator(".quote").click()
    expect(original).to_be_in_viewport()
    expect(original).to_have_class(re.compile("highlight"))


def test_reactions_count_and_toggle(pair) -> None:
    alice, bob, _chat = pair
    alice.send("lunch?")
    bubble_b = bob.message("lunch?")
    bubble_a = alice.message("lunch?")
    expect(bubble_b).to_have_count(1)
    expect(bubble_a.locator(".reaction")).to_have_count(0)

    bob.menu(bubble_b, "React 👍")
    expect(bubble_b.locator(".reaction")).to_have_text(["👍 1"])
    expect(bubble_b.locator(".reaction")).to_have_attribute("aria-pressed", "true")
    expect(bubble_a.locator(".reaction")).to_have_text(["👍 1"])
    expect(bubble_a.locator(".reaction")).to_have_attribute("aria-pressed", "false")

    # Alice joins in by clicking Bob's reaction.
    bubble_a.locator(".reaction", has_text="👍").click()
    expect(bubble_b.locator(".reaction")).to_have_text(["👍 2"])
    expect(bubble_a.locator(".reaction")).to_have_attribute("aria-pressed", "true")

    # Any emoji, typed in.
    bob.answers.append("🎉")
    bob.menu(bubble_b, "Other reaction…")
    expect(bubble_a.locator(".reaction")).to_have_text(["👍 2", "🎉 1"])

    # Bob clicks his own 👍: it goes, Alice's stays.
    bubble_b.locator(".reaction", has_text="👍").click()
    expect(bubble_a.locator(".reaction")).to_have_text(["👍 1", "🎉 1"])
    expect(bubble_b.locator(".reaction", has_text="👍")).to_have_attribute("aria-pressed", "false")
    # And his 🎉 too: no chip is left with a zero count.
    bubble_b.locator(".reaction", has_text="🎉").click()
    expect(bubble_a.locator(".reaction")).to_have_text(["👍 1"])

    # A picture of the features together: a reply, an edit, a tombstone, reactions, a pin.
    bob.menu(bubble_b, "Reply")
    bob.send("see you there")
    alice.menu(bubble_a, "Pin")
    alice.send("typo")
    expect(alice.message("typo").locator(".status")).to_have_text(re.compile("✓"))
    alice.composer().press("ArrowUp")
    alice.composer().fill("no typo")
    alice.composer().press("Enter")
    alice.send("never mind")
    alice.menu(alice.message("never mind"), "Delete for everyone")
    expect(alice.page.locator("#messages .message.deleted")).to_have_count(1)
    expect(alice.message("no typo").locator(".edited")).to_be_visible()
    expect(alice.page.locator("#pin-text")).to_have_text("lunch?")
    alice.message("see you there").hover()
    alice.message("see you there").locator(".menu-button").click()
    ARTIFACTS.mkdir(exist_ok=True)
    alice.page.screenshot(path=str(ARTIFACTS / "chat-lifecycle.png"))
    alice.page.keyboard.press("Escape")


def test_mention_autocomplete_and_the_unread_mention_badge(chromium, server: Server) -> None:
    tag = uuid.uuid4().hex[:6]
    alice = new_user(chromium, server, f"Alice{tag}")
    bob = new_user(chromium, server, f"Bob{tag}")
    carol_email = register(server, f"Carol{tag}")
    carol = logged_in_client(server, carol_email)
    carol_uuid = carol.get("/me").json()["user_uuid"]
    group = alice.api.post(
        "/chats", json={"type": "group", "name": f"Team{tag}", "user_ids": [bob.uuid, carol_uuid]}
    ).json()
    expect(bob.chat_item(f"Team{tag}")).to_have_count(1)
    alice.chat_item(f"Team{tag}").click()

    options = alice.page.locator("#mention-list [role=option]")
    alice.composer().press_sequentially("hey @")
    expect(options).to_have_text([bob.name, f"Carol{tag}"])  # members in join order
    alice.composer().press_sequentially("bo")
    expect(options).to_have_text([bob.name])
    alice.composer().press("Enter")  # picks Bob, does not send
    expect(alice.page.locator("#mention-list")).to_be_hidden()
    expect(alice.composer()).to_have_value(f"hey @{bob.name} ")
    alice.composer().press_sequentially("look at this")
    alice.composer().press("Enter")
    expect(alice.message(f"hey @{bob.name} look at this")).to_have_count(1)
    # A plain "@" that picked nobody mentions nobody.
    alice.send("mail me @ home")
    expect(alice.message("mail me @ home").locator(".status")).to_have_text(re.compile("✓"))

    messages = history(alice, group["id"])
    assert [m["mentions"] for m in messages] == [[bob.uuid], []]

    # Bob has not opened the group: its entry says he was mentioned, and unread.
    item = bob.chat_item(f"Team{tag}")
    expect(item.locator(".mention-badge")).to_have_text("@")
    expect(item.locator(".mention-badge")).to_have_attribute("aria-label", "1 unread mention")
    expect(item.locator(".badge:not(.mention-badge)")).to_have_text("2")
    # Carol was not mentioned; the server agrees with both.
    (carols,) = [c for c in carol.get("/chats").json()["chats"] if c["id"] == group["id"]]
    assert carols["unread_mentions"] == 0
    assert carols["unread_count"] == 2
    # A message deleted for everyone is no longer unread.
    alice.menu(alice.message("mail me @ home"), "Delete for everyone")
    expect(item.locator(".badge:not(.mention-badge)")).to_have_text("1")
    expect(item.locator(".mention-badge")).to_have_attribute("aria-label", "1 unread mention")
    # After a reload the counts come from the server's chat list, and agree.
    bob.page.reload()
    expect(item.locator(".mention-badge")).to_have_attribute("aria-label", "1 unread mention")
    expect(item.locator(".badge:not(.mention-badge)")).to_have_text("1")
    # Reading the chat clears the badge; the mention stands out in it.
    item.click()
    expect(bob.message(f"hey @{bob.name} look at this")).to_have_class(re.compile("mentions-me"))
    expect(item.locator(".badge")).to_have_count(0)
    for user in (alice, bob):
        user.page.context.close()
        assert not user.errors, user.errors


def test_pinned_banner_on_both_sides(pair) -> None:
    alice, bob, chat = pair
    alice.send("the plan: ship on friday")
    for i in range(30):
        bob.api.post(f"/chats/{chat['id']}/messages", json={"text": f"chatter {i}"})
    expect(alice.message("chatter 29")).to_have_count(1)
    for user in (alice, bob):
        expect(user.page.locator("#pin-banner")).to_be_hidden()

    alice.menu(alice.message("the plan: ship on friday"), "Pin")
    for user in (alice, bob):
        expect(user.page.locator("#pin-banner")).to_be_visible()
        expect(user.page.locator("#pin-text")).to_have_text("the plan: ship on friday")
    assert bob.api.get(f"/chats/{chat['id']}").json()["pinned_message_id"] is not None

    # The banner jumps to the pinned message.
    pinned = bob.message("the plan: ship on friday")
    expect(pinned).not_to_be_in_viewport()
    bob.page.locator("#pin-banner").click()
    expect(pinned).to_be_in_viewport()
    expect(pinned).to_have_class(re.compile("highlight"))

    # Either member of a private chat may unpin.
    bob.menu(pinned, "Unpin")
    for user in (alice, bob):
        expect(user.page.locator("#pin-banner")).to_be_hidden()


def test_forward_to_another_chat(pair) -> None:
    alice, bob, chat = pair
    bob.send("a link worth sharing")
    expect(alice.message("a link worth sharing")).to_have_count(1)
    other = alice.api.post(
        "/chats", json={"type": "group", "name": "Elsewhere", "user_ids": [bob.uuid]}
    ).json()
    expect(alice.chat_item("Elsewhere")).to_have_count(1)

    alice.menu(alice.message("a link worth sharing"), "Forward…")
    dialog = alice.page.locator("#forward-dialog")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Elsewhere", exact=True).click()
    expect(dialog).to_be_hidden()
    # Alice lands in the other chat, where the copy is hers, forwarded from Bob.
    expect(alice.page.locator("#chat-title")).to_have_text("Elsewhere")
    copy = alice.message("a link worth sharing")
    expect(copy).to_have_class(re.compile("mine"))
    expect(copy.locator(".forwarded")).to_have_text(f"Forwarded from {bob.name}")

    bob.chat_item("Elsewhere").click()
    expect(bob.message("a link worth sharing").locator(".forwarded")).to_have_text(
        f"Forwarded from {bob.name}"
    )
    (stored,) = history(bob, other["id"])
    assert stored["sender_uuid"] == alice.uuid
    assert stored["forwarded_from"]["sender_uuid"] == bob.uuid
    # The original chat still has one copy.
    assert [m["text"] for m in history(bob, chat["id"])] == ["a link worth sharing"]


def test_changes_made_while_offline_arrive_with_the_resume(pair) -> None:
    alice, bob, chat = pair
    for text in ("one", "two", "three"):
        bob.send(text)
    expect(alice.page.locator("#messages .message .text")).to_have_text(["one", "two", "three"])
    ids = {m["text"]: m["id"] for m in history(bob, chat["id"])}
    held_version = bob.api.get(f"/chats/{chat['id']}").json()["version"]

    page = alice.page
    page.evaluate("() => { window.__blockSockets = true; __sockets.forEach((s) => s.close()); }")
    expect(page.locator("#conn-status")).to_have_text("reconnecting…")
    page.evaluate("() => { window.__sent = []; }")
    assert bob.api.patch(f"/messages/{ids['one']}", json={"text": "one (fixed)"}).status_code == 200
    deleted = bob.api.delete(f"/messages/{ids['two']}", params={"for_everyone": "true"})
    assert deleted.status_code == 200, deleted.text
    assert bob.api.put(f"/messages/{ids['three']}/reactions/🔥").status_code == 200
    bob.api.post(f"/chats/{chat['id']}/messages", json={"text": "four"})
    page.evaluate("() => { window.__blockSockets = false; }")
    expect(page.locator("#conn-status")).to_be_hidden(timeout=20000)

    expect(page.locator("#messages .message .text")).to_have_text(
        ["one (fixed)", "message deleted", "three", "four"]
    )
    expect(alice.message("one (fixed)").locator(".edited")).to_be_visible()
    expect(alice.message("three").locator(".reaction")).to_have_text(["🔥 1"])
    # It resumed with the new sync form: the seq and the version it held.
    frames = page.evaluate("() => window.__sent.map((s) => JSON.parse(s))")
    syncs = [f for f in frames if f["action"] == "sync"]
    assert syncs, frames
    # "four" came first, in the unread snapshot; the changes have versions it lacked.
    assert syncs[0]["chats"][str(chat["id"])] == {"seq": 4, "version": held_version}


def test_slash_offers_the_commands_of_the_chats_bots(chromium, server: Server) -> None:
    tag = uuid.uuid4().hex[:6]
    alice = new_user(chromium, server, f"Alice{tag}")
    made = alice.api.post("/bots", json={"name": "Dice", "username": f"dice_{tag}"}).json()
    commands = [{"name": "roll", "description": "Roll dice"}, {"name": "poll"}]
    alice.api.put(f"/bots/{made['bot']['id']}/commands", json={"commands": commands})
    alice.api.post(
        "/chats",
        json={"type": "group", "name": f"Dice{tag}", "user_ids": [made["bot"]["user_uuid"]]},
    )
    alice.chat_item(f"Dice{tag}").click()

    options = alice.page.locator("#mention-list [role=option]")
    alice.composer().press_sequentially("/")
    expect(options).to_have_text([f"/poll @dice_{tag}", f"/roll Roll dice · @dice_{tag}"])
    alice.composer().press_sequentially("r")
    expect(options).to_have_count(1)
    alice.composer().press("Enter")  # picks /roll, does not send
    expect(alice.composer()).to_have_value("/roll ")
    expect(alice.page.locator("#mention-list")).to_be_hidden()
    # Not at the start of the message: no command.
    alice.composer().fill("see /")
    expect(alice.page.locator("#mention-list")).to_be_hidden()
    assert not alice.errors, alice.errors
    alice.page.context.close()
