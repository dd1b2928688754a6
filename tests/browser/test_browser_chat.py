"""Two users in two real browsers (the system Chromium, headless) chatting through /chat."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright import sync_api

from tests.conftest import PASSWORD, ROOT, Server, start_server, stop_server

expect = sync_api.expect

CHROMIUM = os.environ.get("CHATD_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
]
XSS = "<img src=x onerror=alert(1)> & <b>bold</b>"
ARTIFACTS = ROOT / "test-artifacts"
# Keeps the page's sockets in window.__sockets, and while window.__blockSockets is set
# points new ones at a closed port, as a network drop would.
SOCKET_SPY = """
window.__sockets = [];
const RealWebSocket = window.WebSocket;
window.WebSocket = class extends RealWebSocket {
  constructor(url, protocols) {
    super(window.__blockSockets ? "ws://127.0.0.1:9/" : url, protocols);
    window.__sockets.push(this);
  }
};
"""


@contextlib.contextmanager
def launch_chromium() -> Iterator[sync_api.Browser]:
    """The system Chromium, headless, with a fresh temporary profile (user-data dir)."""
    # `make test` runs these only where Chromium is; run by hand without it, fail clearly.
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM} (make browser-deps)"
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    with launch_chromium() as b:
        yield b


def register(server: Server, name: str) -> str:
    email = f"{name.lower()}-{uuid.uuid4().hex[:10]}@example.com"
    res = httpx.post(
        server.base_url + "/register", json={"name": name, "email": email, "password": PASSWORD}
    )
    assert res.status_code == 201, res.text
    return email


def log_in(page, server: Server, email: str) -> None:
    page.goto(server.base_url + "/chat")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.locator("#auth-submit").click()
    expect(page.locator("#app-view")).to_be_visible()


def logged_in_client(server: Server, email: str) -> httpx.Client:
    """A REST client for another user, outside the browser."""
    client = httpx.Client(base_url=server.base_url)
    tokens = client.post("/login", json={"email": email, "password": PASSWORD}).json()
    client.headers["authorization"] = f"Bearer {tokens['access_token']}"
    return client


def page_user_uuid(page) -> str:
    """Who the page is logged in as, asked with the page's own token."""
    return page.evaluate(
        "async () => (await (await fetch('me', {headers: {authorization: 'Bearer ' +"
        " JSON.parse(sessionStorage.getItem('chatd.auth')).access_token}})).json()).user_uuid"
    )


def open_chat_from_bob(page, bob_api: httpx.Client, text: str) -> tuple[dict, object]:
    """Bob starts a private chat with the page's user and says `text`; the page opens it."""
    alice_uuid = page_user_uuid(page)
    chat = bob_api.post("/chats", json={"type": "private", "user_ids": [alice_uuid]}).json()
    bob_api.post(f"/chats/{chat['id']}/messages", json={"text": text})
    page.locator(".chat-item", has_text="Bob").click()
    texts = page.locator("#messages .message .text")
    expect(texts).to_have_text([text])
    return chat, texts


def test_two_users_chat_live(browser, server: Server, tmp_path: Path) -> None:
    alice_email = register(server, "Alice")
    bob_name = f"Bob{uuid.uuid4().hex[:6]}"
    bob_email = register(server, bob_name)

    errors: list[str] = []
    pages = []
    for _ in range(2):
        context = browser.new_context(viewport={"width": 900, "height": 700})
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: (errors.append("dialog: " + d.message), d.dismiss()))
        pages.append(page)
    alice, bob = pages
    log_in(alice, server, alice_email)
    log_in(bob, server, bob_email)

    # Alice starts a private chat with Bob by picking him.
    alice.get_by_role("button", name="New chat").click()
    alice.get_by_label("Find people").fill(bob_name)
    alice.get_by_label(bob_name).check()
    alice.locator("#new-chat-create").click()
    expect(alice.locator("#chat-title")).to_have_text(bob_name)

    # She sends while Bob has not opened the chat: one tick.
    alice.get_by_label("Message", exact=True).fill("Hi Bob!")
    alice.get_by_label("Message", exact=True).press("Enter")
    mine = alice.locator("#messages .message.mine").last
    expect(mine.locator(".text")).to_have_text("Hi Bob!")
    expect(mine.locator(".status")).to_have_text("✓")

    # Bob sees the chat appear live with an unread badge and the last message.
    item = bob.locator(".chat-item", has_text="Alice")
    expect(item.locator(".badge")).to_have_text("1")
    expect(item.locator(".chat-preview")).to_have_text("Hi Bob!")
    item.click()
    expect(bob.locator("#messages .message .text")).to_have_text(["Hi Bob!"])
    expect(item.locator(".badge")).to_have_count(0)

    # Bob has read it: Alice's tick flips to two.
    expect(mine.locator(".status")).to_have_text("✓✓")

    # Typing indicator, then the XSS string comes out as text.
    bob.get_by_label("Message", exact=True).press_sequentially("hel")
    expect(alice.locator("#typing")).to_have_text(f"{bob_name} is typing…")
    bob.get_by_label("Message", exact=True).fill(XSS)
    bob.get_by_label("Message", exact=True).press("Enter")
    theirs = alice.locator("#messages .message:not(.mine)").last
    expect(theirs.locator(".text")).to_have_text(XSS)
    assert theirs.locator(".text").text_content() == XSS
    assert alice.locator("#messages img").count() == 0
    assert alice.locator("#messages b").count() == 0
    assert bob.locator("#messages img").count() == 0

    # Shift+Enter makes a new line, Enter sends both lines as one message.
    alice.get_by_label("Message", exact=True).fill("line one")
    alice.get_by_label("Message", exact=True).press("Shift+Enter")
    alice.get_by_label("Message", exact=True).press_sequentially("line two")
    alice.get_by_label("Message", exact=True).press("Enter")
    expect(bob.locator("#messages .message .text").last).to_have_text("line one\nline two")
    expect(alice.locator("#messages .message.mine .status").last).to_have_text("✓✓")

    ARTIFACTS.mkdir(exist_ok=True)
    alice.screenshot(path=str(ARTIFACTS / "chat.png"))
    assert not errors, errors


def test_reconnect_resumes_without_duplicates(browser, server: Server) -> None:
    alice_email = register(server, "Alice")
    bob_email = register(server, "Bob")
    bob_api = logged_in_client(server, bob_email)

    context = browser.new_context(viewport={"width": 360, "height": 640})
    context.add_init_script(SOCKET_SPY)
    page = context.new_page()
    log_in(page, server, alice_email)
    chat, texts = open_chat_from_bob(page, bob_api, "first")

    # Drop the socket and keep new ones from connecting for a while.
    page.evaluate("() => { window.__blockSockets = true; __sockets.forEach((s) => s.close()); }")
    expect(page.locator("#conn-status")).to_have_text("reconnecting…")
    for text in ("second", "third"):
        bob_api.post(f"/chats/{chat['id']}/messages", json={"text": text})
    page.evaluate("() => { window.__blockSockets = false; }")
    expect(page.locator("#conn-status")).to_be_hidden(timeout=20000)
    expect(texts).to_have_text(["first", "second", "third"])
    # Live again after the resume, and still one copy of each.
    bob_api.post(f"/chats/{chat['id']}/messages", json={"text": "fourth"})
    expect(texts).to_have_text(["first", "second", "third", "fourth"])
    page.wait_for_timeout(500)
    expect(texts).to_have_text(["first", "second", "third", "fourth"])


def test_the_page_recovers_when_the_server_restarts(
    browser, database_url: str, tmp_path: Path
) -> None:
    server = start_server(database_url, tmp_path)
    port = int(server.base_url.rsplit(":", 1)[1])
    try:
        alice_email = register(server, "Alice")
        bob_email = register(server, "Bob")
        bob_api = logged_in_client(server, bob_email)

        page = browser.new_context().new_page()
        log_in(page, server, alice_email)
        chat, texts = open_chat_from_bob(page, bob_api, "before the restart")

        stop_server(server)  # SIGTERM: the page loses its socket
        expect(page.locator("#conn-status")).to_have_text("reconnecting…")
        server = start_server(database_url, tmp_path, port=port)
        bob_api.post(f"/chats/{chat['id']}/messages", json={"text": "after the restart"})

        expect(page.locator("#conn-status")).to_be_hidden(timeout=30000)
        expect(texts).to_have_text(["before the restart", "after the restart"])
        page.wait_for_timeout(500)
        expect(texts).to_have_text(["before the restart", "after the restart"])
    finally:
        stop_server(server)


def test_tokens_are_refreshed_before_they_expire(
    browser, database_url: str, tmp_path: Path
) -> None:
    # Access tokens that live 3 s: the page must keep renewing them to keep working.
    server = start_server(database_url, tmp_path, CHATD_ACCESS_TOKEN_TTL="3")
    try:
        alice_email = register(server, "Alice")
        register(server, "Bob")
        context = browser.new_context()
        context.add_init_script(SOCKET_SPY)
        page = context.new_page()
        log_in(page, server, alice_email)
        first_token = page.evaluate(
            "() => JSON.parse(sessionStorage.getItem('chatd.auth')).access_token"
        )
        page.wait_for_timeout(5000)  # well past the first token's expiry
        token = page.evaluate("() => JSON.parse(sessionStorage.getItem('chatd.auth')).access_token")
        assert token != first_token
        me = httpx.get(server.base_url + "/me", headers={"authorization": f"Bearer {token}"})
        assert me.status_code == 200  # the page holds a live token

        # A reconnect after the expiry works too (the page is still logged in, and live).
        page.evaluate("() => __sockets.forEach((s) => s.close())")
        expect(page.locator("#conn-status")).to_be_hidden(timeout=20000)
        expect(page.locator("#app-view")).to_be_visible()
    finally:
        stop_server(server)


def test_a_click_on_a_chat_survives_the_list_rendering_under_it(browser, server: Server) -> None:
    """The list renders on every message: a chat pressed while one arrives still opens."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    log_in(page, server, register(server, "Presser"))
    bob_api = logged_in_client(server, register(server, "Bob"))
    chat = bob_api.post(
        "/chats", json={"type": "private", "user_ids": [page_user_uuid(page)]}
    ).json()
    bob_api.post(f"/chats/{chat['id']}/messages", json={"text": "first"})
    item = page.locator(".chat-item", has_text="Bob")
    expect(item).to_contain_text("first")
    box = item.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + 20, box["y"] + box["height"] / 2)  # on the chat's name
    page.mouse.down()
    bob_api.post(f"/chats/{chat['id']}/messages", json={"text": "second"})
    expect(item).to_contain_text("second")  # rendered again while the button is down
    page.mouse.up()
    expect(page.locator("#chat-title")).to_have_text("Bob")
    expect(page.locator("#messages .message .text")).to_have_text(["first", "second"])
    assert errors == []
    bob_api.close()


def test_log_out_ends_the_session_on_the_server(browser, server: Server) -> None:
    email = register(server, "Leaver")
    page = browser.new_page()
    log_in(page, server, email)
    token = page.evaluate("JSON.parse(sessionStorage.getItem('chatd.auth')).access_token")
    assert httpx.get(
        server.base_url + "/me", headers={"authorization": f"Bearer {token}"}
    ).is_success
    page.locator("#logout").click()
    expect(page.locator("#auth-form")).to_be_visible()
    # Not only forgotten by the page: the server refuses the token from now on.
    response = httpx.get(server.base_url + "/me", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 401


def test_a_session_signed_out_elsewhere_returns_the_page_to_the_login(
    browser, server: Server
) -> None:
    email = register(server, "Lost")
    page = browser.new_page()
    log_in(page, server, email)
    expect(page.locator("#auth-form")).to_be_hidden()
    other = logged_in_client(server, email)
    [theirs] = [s for s in other.get("/me/sessions").json()["sessions"] if not s["current"]]
    assert other.delete(f"/me/sessions/{theirs['id']}").status_code == 204
    expect(page.locator("#auth-form")).to_be_visible()  # socket closed 1008, refresh refused
    other.close()


def test_messages_of_someone_you_block_are_collapsed_in_groups(browser, server: Server) -> None:
    email, other_email = register(server, "Blocker"), register(server, "Pest")
    page = browser.new_page()
    log_in(page, server, email)
    me = page_user_uuid(page)
    pest = logged_in_client(server, other_email)
    pest_uuid = pest.get("/me").json()["user_uuid"]
    group = pest.post("/chats", json={"type": "group", "name": "Shared", "user_ids": [me]}).json()
    pest.post(f"/chats/{group['id']}/messages", json={"text": "first, before the block"})
    page.locator(".chat-item", has_text="Shared").click()
    messages = page.locator("#messages .message")
    expect(messages.locator(".text")).to_have_text(["first, before the block"])

    blocker = logged_in_client(server, email)
    assert blocker.put(f"/me/blocks/{pest_uuid}").status_code == 200  # blocks_changed: folds
    pest.post(f"/chats/{group['id']}/messages", json={"text": "second, after"})
    expect(messages).to_have_count(2)
    expect(page.locator("#messages .message.collapsed")).to_have_count(2)
    expect(page.locator("#messages .message .text")).to_have_count(0)  # no text shown
    page.locator("#messages .message.collapsed .unfold").last.click()
    expect(page.locator("#messages .message .text")).to_have_text(["second, after"])

    # After a reload the first frame says whom she blocks; unblocking unfolds the rest.
    page.reload()
    expect(page.locator("#app-view")).to_be_visible()
    page.locator(".chat-item", has_text="Shared").click()
    expect(page.locator("#messages .message.collapsed")).to_have_count(2)
    assert blocker.delete(f"/me/blocks/{pest_uuid}").status_code == 200
    expect(page.locator("#messages .message .text")).to_have_text(
        ["first, before the block", "second, after"]
    )
    for client in (pest, blocker):
        client.close()
