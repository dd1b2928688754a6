"""Presence dots, message search, per-chat muting and browser notifications in /chat,
in real Chromium with the notification permission granted."""

from __future__ import annotations

import uuid

from playwright import sync_api

from tests.browser.test_browser_chat import ARTIFACTS, browser, log_in, logged_in_client, register
from tests.conftest import Server

expect = sync_api.expect
__all__ = ["browser"]  # the fixture, shared with test_browser_chat

# Records the notifications the page creates (the real ones are created too), and lets the
# test hide the tab: headless pages are always visible otherwise.
NOTIFICATION_SPY = """
window.__notifications = [];
window.__hidden = false;
const RealNotification = window.Notification;
class SpiedNotification extends RealNotification {
  constructor(title, options) {
    super(title, options);
    window.__notifications.push({ title, body: options && options.body });
  }
}
Object.defineProperty(SpiedNotification, "permission", { get: () => RealNotification.permission });
SpiedNotification.requestPermission = (...args) => RealNotification.requestPermission(...args);
window.Notification = SpiedNotification;
Object.defineProperty(document, "hidden", { get: () => window.__hidden });
Object.defineProperty(document, "visibilityState", {
  get: () => (window.__hidden ? "hidden" : "visible"),
});
"""


def hide(page, hidden: bool) -> None:
    page.evaluate(
        "(hidden) => { window.__hidden = hidden;"
        " document.dispatchEvent(new Event('visibilitychange')); }",
        hidden,
    )


def test_presence_search_mute_and_notifications(browser, server: Server) -> None:
    bob_name = f"Bob{uuid.uuid4().hex[:6]}"
    alice_email, bob_email = register(server, "Alice"), register(server, bob_name)
    errors: list[str] = []

    def new_page(**options):  # type: ignore[no-untyped-def]
        context = browser.new_context(viewport={"width": 900, "height": 700}, **options)
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        return page

    alice = new_page(permissions=["notifications"])
    alice.add_init_script(NOTIFICATION_SPY)
    bob_api = logged_in_client(server, bob_email)
    alice_uuid = logged_in_client(server, alice_email).get("/me").json()["user_uuid"]
    chat = bob_api.post("/chats", json={"type": "private", "user_ids": [alice_uuid]}).json()
    first = bob_api.post(f"/chats/{chat['id']}/messages", json={"text": "Привет, Алиса!"}).json()
    for i in range(60):  # enough that the first message is not on the newest page
        bob_api.post(f"/chats/{chat['id']}/messages", json={"text": f"filler {i}"})

    log_in(alice, server, alice_email)
    item = alice.locator(".chat-item", has_text=bob_name)
    expect(item).to_be_visible()
    expect(alice.locator("#enable-notifications")).to_be_hidden()  # already granted
    expect(item.locator(".presence-dot")).to_have_count(0)  # Bob is not online

    # Bob opens the page: a dot on his chat, and "online" in its header.
    bob = new_page()
    log_in(bob, server, bob_email)
    expect(item.locator(".presence-dot")).to_have_count(1)
    item.click()
    expect(alice.locator("#chat-status")).to_have_text("online")
    # Bob's page has no permission yet: it offers to turn notifications on.
    expect(bob.locator("#enable-notifications")).to_be_visible()

    # The tab is hidden: Bob's message makes a notification; the title counts it (a hidden
    # tab reads nothing).
    hide(alice, True)
    bob_api.post(f"/chats/{chat['id']}/messages", json={"text": "are you there?"})
    alice.wait_for_function("() => window.__notifications.length === 1")
    assert alice.evaluate("() => window.__notifications") == [
        {"title": bob_name, "body": "are you there?"}
    ]
    expect(alice).to_have_title("(1) chatd")

    # Muted: no notification, and the title leaves the chat out.
    hide(alice, False)
    expect(alice).to_have_title("chatd")  # seen now
    alice.locator("#chat-settings").click()
    alice.locator("#mute-for").select_option("forever")
    alice.locator("#notify-save").click()
    expect(alice.locator("#chat-settings")).to_have_text("🔕")
    expect(item.locator(".muted-mark")).to_have_count(1)
    hide(alice, True)
    bob_api.post(f"/chats/{chat['id']}/messages", json={"text": "muted now"})
    expect(item.locator(".chat-preview")).to_have_text("muted now")
    assert alice.evaluate("() => window.__notifications.length") == 1
    expect(alice).to_have_title("chatd")
    hide(alice, False)

    # Search: the word finds its forms; the match is marked; a click opens the message.
    alice.get_by_label("Search messages").fill("привет")
    result = alice.locator(".search-result")
    expect(result).to_have_count(1)
    expect(result.locator("mark")).to_have_text(["Привет"])
    result.click()
    expect(alice.locator("#chat-title")).to_have_text(bob_name)
    target = alice.locator(f'#messages [data-message-id="{first["id"]}"]')
    expect(target).to_be_visible()
    expect(target).to_have_class("message highlight")

    ARTIFACTS.mkdir(exist_ok=True)
    alice.screenshot(path=str(ARTIFACTS / "notify.png"))
    assert not errors, errors
