"""Files in the browser client: attached by button, drop and paste, uploaded with a
progress bar, shown to the other user as a thumbnail that opens full size, or as a chip
that downloads."""

from __future__ import annotations

import io
import os
import time
import uuid
from base64 import b64encode
from pathlib import Path

from PIL import Image
from playwright import sync_api

from tests.browser.test_browser_chat import (
    ARTIFACTS,
    browser,
    log_in,
    logged_in_client,
    page_user_uuid,
    register,
)
from tests.conftest import Server, start_server, stop_server

__all__ = ["browser"]  # the fixture, shared with test_browser_chat

expect = sync_api.expect

WIDTH, HEIGHT = 1200, 900
RED, BLUE = (230, 20, 20), (20, 40, 220)
# Reads one pixel of an <img> as the page shows it: [r, g, b].
PIXEL = """([img, x, y]) => {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0);
  return Array.from(ctx.getImageData(x, y, 1, 1).data.slice(0, 3));
}"""
# Hands files to an element as a drop or a paste would: a DataTransfer holding them.
FILES_EVENT = """([selector, type, files]) => {
  const data = new DataTransfer();
  for (const f of files) {
    const bytes = Uint8Array.from(atob(f.base64), (c) => c.charCodeAt(0));
    data.items.add(new File([bytes], f.name, {type: f.type}));
  }
  const target = document.querySelector(selector);
  if (type === "paste") {
    const init = {clipboardData: data, bubbles: true, cancelable: true};
    target.dispatchEvent(new ClipboardEvent("paste", init));
    return;
  }
  for (const t of ["dragenter", "dragover", "drop"]) {
    target.dispatchEvent(new DragEvent(t, {dataTransfer: data, bubbles: true, cancelable: true}));
  }
}"""


def picture() -> bytes:
    """A real PNG: red on the left, blue on the right."""
    image = Image.new("RGB", (WIDTH, HEIGHT), RED)
    image.paste(BLUE, (WIDTH // 2, 0, WIDTH, HEIGHT))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def close_to(pixel: list[int], color: tuple[int, int, int], tolerance: int) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, color, strict=True))


def two_pages_in_a_chat(browser, server: Server, errors: list[str]):
    alice_email = register(server, "Alice")
    bob_name = f"Bob{uuid.uuid4().hex[:6]}"
    bob_email = register(server, bob_name)
    bob_api = logged_in_client(server, bob_email)
    alice_uuid = logged_in_client(server, alice_email).get("/me").json()["user_uuid"]
    chat = bob_api.post("/chats", json={"type": "private", "user_ids": [alice_uuid]}).json()
    pages = []
    for email, other in ((alice_email, bob_name), (bob_email, "Alice")):
        context = browser.new_context(viewport={"width": 1000, "height": 800})
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("dialog", lambda d: (errors.append("dialog: " + d.message), d.dismiss()))
        log_in(page, server, email)
        page.locator(".chat-item", has_text=other).click()
        expect(page.locator("#chat-title")).to_have_text(other)
        pages.append(page)
    return chat, bob_api, *pages


def test_a_picture_goes_across_as_a_thumbnail_then_full_size(browser, server: Server) -> None:
    errors: list[str] = []
    _chat, _bob_api, alice, bob = two_pages_in_a_chat(browser, server, errors)
    png = picture()

    # Alice picks the picture with the attach button and sends it without any text.
    with alice.expect_file_chooser() as chooser:
        alice.get_by_role("button", name="Attach files").click()
    chooser.value.set_files(files=[{"name": "colours.png", "mimeType": "image/png", "buffer": png}])
    item = alice.locator("#attach-tray .attach-item")
    expect(item.locator(".attach-name")).to_have_text("colours.png")
    expect(item).to_have_attribute("data-status", "done")
    alice.get_by_label("Message", exact=True).press("Enter")
    expect(alice.locator("#attach-tray")).to_be_hidden()

    # Bob sees a message that is only the picture: a thumbnail, fetched with his token.
    message = bob.locator("#messages .message").last
    thumb = message.locator(".thumb img")
    expect(thumb).to_have_count(1)
    expect(message.locator(".text")).to_have_count(0)
    bob.wait_for_function(
        "(img) => img.complete && img.naturalWidth > 0", arg=thumb.element_handle()
    )
    natural = thumb.evaluate("(img) => [img.naturalWidth, img.naturalHeight, img.src]")
    assert natural[:2] == [320, 240]  # the server's thumbnail, not the 1200x900 original
    assert natural[2].startswith("blob:")
    handle = thumb.element_handle()
    assert close_to(bob.evaluate(PIXEL, [handle, 40, 120]), RED, 30)  # WebP: near enough
    assert close_to(bob.evaluate(PIXEL, [handle, 280, 120]), BLUE, 30)
    expect(bob.locator(".chat-item .chat-preview").first).to_have_text("🖼 colours.png")

    # A click opens it full size: the original's pixels, exactly.
    thumb.click()
    viewer = bob.locator("#image-viewer")
    expect(viewer).to_be_visible()
    expect(viewer.locator("#image-viewer-name")).to_have_text("colours.png")
    full = bob.locator("#image-viewer-img")
    expect(full).to_be_visible()
    bob.wait_for_function(
        "(img) => img.complete && img.naturalWidth > 0", arg=full.element_handle()
    )
    assert full.evaluate("(img) => [img.naturalWidth, img.naturalHeight]") == [WIDTH, HEIGHT]
    assert bob.evaluate(PIXEL, [full.element_handle(), 10, 10]) == list(RED)
    assert bob.evaluate(PIXEL, [full.element_handle(), WIDTH - 10, HEIGHT - 10]) == list(BLUE)
    ARTIFACTS.mkdir(exist_ok=True)
    bob.screenshot(path=str(ARTIFACTS / "picture-viewer.png"))
    bob.keyboard.press("Escape")
    expect(viewer).to_be_hidden()

    # Pasting an image into the composer attaches it too; this one goes with a caption.
    alice.evaluate(
        FILES_EVENT,
        [
            "#message-input",
            "paste",
            [{"name": "pasted.png", "type": "image/png", "base64": b64encode(png).decode()}],
        ],
    )
    expect(item.locator(".attach-name")).to_have_text("pasted.png")
    expect(item).to_have_attribute("data-status", "done")
    alice.get_by_label("Message", exact=True).fill("and again")
    alice.get_by_label("Message", exact=True).press("Enter")
    last = bob.locator("#messages .message").last
    expect(last.locator(".text")).to_have_text("and again")
    expect(last.locator(".thumb img")).to_have_count(1)
    bob.wait_for_function(
        "(img) => img.complete && img.naturalWidth === 320",
        arg=last.locator(".thumb img").element_handle(),
    )
    bob.screenshot(path=str(ARTIFACTS / "pictures.png"))
    assert not errors, errors


def test_a_file_is_a_chip_that_downloads(browser, server: Server, tmp_path: Path) -> None:
    errors: list[str] = []
    _chat, _bob_api, alice, bob = two_pages_in_a_chat(browser, server, errors)
    data = os.urandom(3 * 1024 * 1024)
    name = "<img src=x onerror=alert(1)> report.bin"

    # A slow uplink, so the upload takes a few seconds and its progress can be seen.
    cdp = alice.context.new_cdp_session(alice)
    cdp.send("Network.enable")
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": 1024 * 1024},
    )
    alice.evaluate(
        FILES_EVENT,
        [
            "#chat-view",
            "drop",
            [
                {
                    "name": name,
                    "type": "application/octet-stream",
                    "base64": b64encode(data).decode(),
                }
            ],
        ],
    )
    item = alice.locator("#attach-tray .attach-item")
    expect(item.locator(".attach-name")).to_have_text(name)
    expect(item.locator(".attach-size")).to_have_text("3.0 MB")
    progress = item.locator("progress")
    expect(progress).to_be_visible()
    # Part of the way, then done.
    alice.wait_for_function(
        "() => { const bar = document.querySelector('#attach-tray progress');"
        " return bar && bar.value > 0 && bar.value < bar.max; }",
        timeout=15000,
    )
    ARTIFACTS.mkdir(exist_ok=True)
    alice.screenshot(path=str(ARTIFACTS / "upload-progress.png"))
    # Sending before the upload is over is refused, with a reason, and loses nothing.
    alice.get_by_label("Message", exact=True).press("Enter")
    expect(alice.locator("#notice")).to_have_text("Wait until the files are uploaded.")
    expect(item).to_have_attribute("data-status", "done", timeout=30000)
    expect(progress).to_have_count(0)
    cdp.send(
        "Network.emulateNetworkConditions",
        {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    alice.get_by_label("Message", exact=True).press("Enter")

    # Bob gets a chip with the name (as text) and the size; a click downloads the bytes.
    chip = bob.locator("#messages .message").last.locator(".file-chip")
    expect(chip.locator(".file-name")).to_have_text(name)
    expect(chip.locator(".file-size")).to_have_text("3.0 MB")
    assert bob.locator("#messages img").count() == 0
    with bob.expect_download() as download:
        chip.click()
    assert download.value.suggested_filename.endswith("report.bin")
    saved = tmp_path / "downloaded"
    download.value.save_as(saved)
    assert saved.read_bytes() == data
    expect(bob.locator(".chat-item .chat-preview").first).to_have_text(f"📎 {name}")
    assert not errors, errors


def test_a_refused_upload_says_why_and_is_never_sent(
    browser, database_url: str, tmp_path: Path
) -> None:
    server = start_server(database_url, tmp_path, CHATD_MAX_UPLOAD_BYTES="100000")
    try:
        errors: list[str] = []
        _chat, _bob_api, alice, bob = two_pages_in_a_chat(browser, server, errors)
        too_big = {"name": "big.bin", "type": "application/octet-stream"}
        small = {"name": "notes.txt", "type": "text/plain"}
        alice.evaluate(
            FILES_EVENT,
            [
                "#chat-view",
                "drop",
                [
                    {**too_big, "base64": b64encode(os.urandom(200_000)).decode()},
                    {**small, "base64": b64encode(b"just a few words\n").decode()},
                ],
            ],
        )
        expect(alice.locator("#drop-zone")).to_be_hidden()
        items = alice.locator("#attach-tray .attach-item")
        expect(items.locator(".attach-name")).to_have_text(["big.bin", "notes.txt"])
        expect(items.first).to_have_attribute("data-status", "failed")
        expect(items.first.locator(".attach-error")).to_contain_text("upload limit of 100000")
        expect(items.last).to_have_attribute("data-status", "done")

        # Not sent while a file in the tray failed; sent once it is taken out.
        alice.get_by_label("Message", exact=True).fill("the notes")
        alice.get_by_label("Message", exact=True).press("Enter")
        expect(alice.locator("#notice")).to_have_text(
            "Remove the files that could not be uploaded first."
        )
        expect(alice.locator("#messages .message")).to_have_count(0)
        alice.get_by_role("button", name="Remove big.bin").click()
        expect(items).to_have_count(1)
        alice.get_by_label("Message", exact=True).press("Enter")

        message = bob.locator("#messages .message").last
        expect(message.locator(".text")).to_have_text("the notes")
        expect(message.locator(".file-chip .file-name")).to_have_text(["notes.txt"])
        expect(message.locator(".file-chip .file-size")).to_have_text(["17 B"])
        assert not errors, errors
    finally:
        stop_server(server)


def square(color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(out, "PNG")
    return out.getvalue()


def shown_colour(page, img) -> list[int]:
    """A pixel of the picture `img` (a locator) once it shows. The element is looked up
    again each time: the client may render it anew while its thumbnail loads (the event
    and the answer of a change both render), and only the element in the page gets the
    picture, so a handle taken early can wait for ever."""
    deadline = time.monotonic() + 30
    while True:
        handle = img.element_handle()
        if handle.evaluate("(i) => i.isConnected && i.complete && i.naturalWidth > 0"):
            return page.evaluate(PIXEL, [handle, 20, 20])
        assert time.monotonic() < deadline, "the picture never showed"
        page.wait_for_timeout(50)


def test_avatars_and_group_photos(browser, server: Server) -> None:
    errors: list[str] = []
    _chat, bob_api, alice, bob = two_pages_in_a_chat(browser, server, errors)
    entry = bob.locator(".chat-item", has_text="Alice")
    # No avatar yet: Alice's initial, on a colour of her own, and no picture.
    expect(entry.locator(".avatar")).to_have_attribute("data-initials", "A")
    expect(entry.locator(".avatar img")).to_have_count(0)

    # Alice picks a red picture for herself.
    with alice.expect_file_chooser() as chooser:
        alice.get_by_role("button", name="Change your picture").click()
    chooser.value.set_files(
        files=[{"name": "me.png", "mimeType": "image/png", "buffer": square(RED)}]
    )
    assert close_to(shown_colour(alice, alice.locator("#me-avatar img")), RED, 30)

    # Bob sees it arrive (user_updated) in his chat list and the chat's header.
    assert close_to(shown_colour(bob, entry.locator(".avatar img")), RED, 30)
    assert close_to(shown_colour(bob, bob.locator("#chat-avatar img")), RED, 30)
    expect(bob.locator("#chat-avatar")).to_be_disabled()  # a private chat has no photo

    # Bob makes a group with Alice and gives it a blue photo from its header.
    alice_uuid = page_user_uuid(alice)
    group = bob_api.post(
        "/chats", json={"type": "group", "name": "Blue team", "user_ids": [alice_uuid]}
    ).json()
    bob.locator(".chat-item", has_text="Blue team").click()
    expect(bob.locator("#chat-avatar")).to_be_enabled()
    with bob.expect_file_chooser() as chooser:
        bob.get_by_role("button", name="Change the group's photo").click()
    chooser.value.set_files(
        files=[{"name": "g.png", "mimeType": "image/png", "buffer": square(BLUE)}]
    )
    group_entry = alice.locator(".chat-item", has_text="Blue team")
    assert close_to(shown_colour(alice, group_entry.locator(".avatar img")), BLUE, 30)
    assert bob_api.get(f"/chats/{group['id']}").json()["photo"]

    # In the group, Alice's messages carry her avatar beside her name; she may not change
    # the group's photo (a plain member).
    group_entry.click()
    expect(alice.locator("#chat-avatar")).to_be_disabled()
    alice.get_by_label("Message", exact=True).fill("hello blue team")
    alice.get_by_label("Message", exact=True).press("Enter")
    bob_message = bob.locator("#messages .message", has_text="hello blue team")
    expect(bob_message.locator(".sender")).to_have_text("Alice")  # initials are not text
    assert close_to(shown_colour(bob, bob_message.locator(".sender .avatar img")), RED, 30)
    assert not errors, errors
