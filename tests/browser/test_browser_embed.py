"""examples/embed_app.py end to end: two users who exist only in the app sign in there and
talk through chatd's web client in an iframe, on the app's tokens (real Chromium)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from playwright import sync_api

from tests.browser.test_browser_chat import launch_chromium
from tests.conftest import (
    ROOT,
    Server,
    assert_no_tracebacks,
    free_port,
    start_server,
    stop_server,
    wait_for_port,
)

expect = sync_api.expect
SECRET = "an-example-secret-of-at-least-32-chars"


@pytest.fixture
def browser() -> Iterator[object]:
    with launch_chromium() as b:
        yield b


@pytest.fixture
def shop(database_url: str, tmp_path: Path) -> Iterator[tuple[str, Server]]:
    """The example app on a free port, and a chatd that trusts its tokens."""
    port = free_port()
    app_url = f"http://127.0.0.1:{port}"
    server = start_server(
        database_url,
        tmp_path,
        CHATD_AUTH_JWT_SECRET=SECRET,
        CHATD_AUTH_ISSUER=app_url,
        CHATD_AUTH_AUDIENCE="chatd",
        CHATD_EMBED_ORIGINS=app_url,
        CHATD_LOCAL_ACCOUNTS="false",
    )
    log = (tmp_path / "embed_app.log").open("wb")
    app = subprocess.Popen(
        [sys.executable, "examples/embed_app.py", "--port", str(port), "--chatd", server.base_url],
        cwd=ROOT,
        env={"CHATD_AUTH_JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(app, port, 20, "examples/embed_app.py")
        yield app_url, server
    finally:
        app.terminate()
        app.wait(10)
        log.close()
        stop_server(server)
    assert_no_tracebacks(server)


def sign_in(browser, app_url: str, username: str, errors: list[str]):  # type: ignore[no-untyped-def]
    page = browser.new_context(viewport={"width": 1000, "height": 750}).new_page()
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(app_url)
    page.get_by_label("Name").fill(username)
    page.get_by_label("Password").fill("demo")
    page.get_by_role("button", name="Sign in").click()
    chat = page.frame_locator("#chat")
    expect(chat.locator("#app-view")).to_be_visible()
    return page, chat


def test_app_users_talk_in_the_embedded_client(browser, shop) -> None:  # type: ignore[no-untyped-def]
    app_url, _ = shop
    errors: list[str] = []
    ada_page, ada = sign_in(browser, app_url, "ada", errors)
    bob_page, bob = sign_in(browser, app_url, "bob", errors)
    # No login form and no log-out button inside: the app signs its users in and out.
    expect(ada.locator("#auth-form")).to_be_hidden()
    expect(ada.locator("#logout")).to_be_hidden()
    expect(ada.locator("#me-name")).to_have_text("Ada Lovelace")

    # Bob exists in chatd since his page opened: Ada finds him by his app name.
    ada.get_by_role("button", name="New chat").click()
    ada.get_by_label("Find people").fill("Bob Bab")
    ada.get_by_label("Bob Babbage").check()
    ada.locator("#new-chat-create").click()
    ada.locator("#message-input").fill("Hello from the shop")
    ada.locator("#message-input").press("Enter")

    bob.locator(".chat-item", has_text="Ada Lovelace").click()
    expect(bob.locator("#messages .message .text")).to_have_text(["Hello from the shop"])
    bob.locator("#message-input").fill("Hi Ada")
    bob.locator("#message-input").press("Enter")
    expect(ada.locator("#messages .message .text")).to_have_text(["Hello from the shop", "Hi Ada"])
    assert errors == []
    ada_page.context.close()
    bob_page.context.close()


def test_the_page_alone_sends_users_to_the_app(browser, shop) -> None:  # type: ignore[no-untyped-def]
    """Without local accounts, /chat opened by itself offers no login form that cannot work."""
    _, server = shop
    page = browser.new_context().new_page()
    page.goto(f"{server.base_url}/chat")
    expect(page.locator("#embed-status")).to_contain_text("no accounts of its own")
    expect(page.locator("#auth-form")).to_be_hidden()
    expect(page.locator("#app-view")).to_be_hidden()
    page.context.close()


def test_other_sites_cannot_frame_the_client(browser, shop, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A page of an origin chatd does not name gets no chat in its frame."""
    _, server = shop
    evil_port = free_port()
    evil = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(evil_port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    (tmp_path / "index.html").write_text(
        f'<iframe id="chat" src="{server.base_url}/chat?embed"></iframe>'
    )
    try:
        wait_for_port(evil, evil_port, 10, "http.server")
        page = browser.new_context().new_page()
        page.goto(f"http://127.0.0.1:{evil_port}/index.html")
        frame = page.frame_locator("#chat")
        page.wait_for_timeout(1000)
        assert frame.locator("#app-view").count() == 0
        assert frame.locator("#auth-view").count() == 0
    finally:
        evil.terminate()
        evil.wait(5)


@contextlib.contextmanager
def own_database(database_url: str) -> Iterator[str]:
    """A database of the test's own, as tests/test_webhooks.py's fresh_database (every
    chatd on a database sends its deliveries; the suite's refuse loopback receivers), made
    without asyncio: Playwright's sync API holds this thread's event loop."""
    import psycopg

    name = f"chatd_test_embed_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(database_url)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_shops_backend_makes_the_chat_and_hears_its_first_message(
    browser, database_url: str, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The issue's "done when": users who exist only in the app open the chat its backend
    made through an API key, talk, and the backend receives the webhook of the first
    message."""
    import time

    import httpx
    import jwt
    import psycopg

    port = free_port()
    app_url = f"http://127.0.0.1:{port}"
    with own_database(database_url) as own:  # its deliveries are its own server's
        server = start_server(
            own,
            tmp_path,
            CHATD_AUTH_JWT_SECRET=SECRET,
            CHATD_AUTH_ISSUER=app_url,
            CHATD_AUTH_AUDIENCE="chatd",
            CHATD_EMBED_ORIGINS=app_url,
            CHATD_LOCAL_ACCOUNTS="false",
            CHATD_OUTBOUND_ALLOW_PRIVATE="true",  # the shop's webhook is on this machine
        )
        app = None
        try:
            # The operator: an admin (a user of the shop made admin in chatd) makes the key.
            now = int(time.time())
            claims = {"iss": app_url, "aud": "chatd", "sub": "operator", "exp": now + 300}
            admin = {"Authorization": f"Bearer {jwt.encode(claims, SECRET, 'HS256')}"}
            operator = httpx.get(server.base_url + "/me", headers=admin).json()["user_uuid"]

            with psycopg.connect(own, autocommit=True) as conn:
                conn.execute("UPDATE users SET role = 'admin' WHERE id = %s::uuid", (operator,))
            key = httpx.post(
                server.base_url + "/admin/api_keys",
                headers=admin,
                json={
                    "name": "Shop",
                    "scopes": ["users", "chats"],
                    "webhook_url": f"{app_url}/chatd-events",
                    "events": ["message.new"],
                },
            ).json()
            log = (tmp_path / "embed_app.log").open("wb")
            app = subprocess.Popen(
                [sys.executable, "examples/embed_app.py", "--port", str(port), "--chatd",
                 server.base_url],
                cwd=ROOT,
                env={
                    "CHATD_AUTH_JWT_SECRET": SECRET,
                    "CHATD_API_KEY": key["key"],
                    "CHATD_WEBHOOK_SECRET": key["webhook_secret"],
                    "PATH": "/usr/bin:/bin",
                },
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            wait_for_port(app, port, 20, "examples/embed_app.py")

            errors: list[str] = []
            _, ada = sign_in(browser, app_url, "ada", errors)
            _, bob = sign_in(browser, app_url, "bob", errors)
            ada.locator(".chat-item", has_text="Shop support").click()
            ada.locator("#message-input").fill("Is my order on its way?")
            ada.locator("#message-input").press("Enter")
            bob.locator(".chat-item", has_text="Shop support").click()
            expect(bob.locator("#messages .message .text")).to_have_text(
                ["Is my order on its way?"]
            )
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                events = httpx.get(f"{app_url}/chatd-events").json()
                if events:
                    break
                time.sleep(0.2)
            assert [(e["type"], e["data"]["text"]) for e in events] == [
                ("message.new", "Is my order on its way?")
            ]
            assert errors == []
        finally:
            if app is not None:
                app.terminate()
                app.wait(10)
            stop_server(server)
    assert_no_tracebacks(server)
