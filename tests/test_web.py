"""The web client at GET /chat: served by chatd, self-contained, and text-safe."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx

from chatd.webapp import WEB_DIR

JS_TYPES = ("text/javascript", "application/javascript")


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str] = []
        self.styles: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script" and a.get("src"):
            self.scripts.append(a["src"] or "")
        if tag == "link" and a.get("rel") == "stylesheet" and a.get("href"):
            self.styles.append(a["href"] or "")


async def _page(http: httpx.AsyncClient) -> tuple[httpx.Response, _Assets]:
    res = await http.get("/chat")
    parser = _Assets()
    parser.feed(res.text)
    return res, parser


async def test_chat_page_is_html(http: httpx.AsyncClient) -> None:
    res, assets = await _page(http)
    assert res.status_code == 200
    assert res.headers["content-type"].startswith("text/html")
    assert "<title>chatd</title>" in res.text
    assert assets.scripts and assets.styles


async def test_assets_are_local_and_served(http: httpx.AsyncClient, server) -> None:
    res, assets = await _page(http)
    page_url = str(res.url)
    for refs, types in ((assets.scripts, JS_TYPES), (assets.styles, ("text/css",))):
        for ref in refs:
            url = urljoin(page_url, ref)
            assert urlsplit(url).netloc == urlsplit(server.base_url).netloc, ref
            asset = await http.get(url)
            assert asset.status_code == 200, ref
            assert asset.headers["content-type"].split(";")[0].strip() in types, ref


async def test_page_says_local_accounts_are_on(http: httpx.AsyncClient) -> None:
    """The script offers log-in and sign-up only then (off: tests/test_identity.py)."""
    res, _ = await _page(http)
    assert '<html data-local-accounts="true" lang="en">' in res.text


async def test_trailing_slash_redirects_to_page(http: httpx.AsyncClient) -> None:
    res = await http.get("/chat/", follow_redirects=True)
    assert res.status_code == 200
    assert str(res.url).endswith("/chat")


async def test_no_url_to_another_host(http: httpx.AsyncClient) -> None:
    for name in ("", "/app.js", "/style.css"):
        res = await http.get("/chat" + name)
        assert res.status_code == 200
        found = re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}", res.text, re.IGNORECASE)
        assert not found, f"/chat{name} refers to {found}"


def test_every_shipped_file_is_served_offline() -> None:
    # Nothing in the folder may point at a CDN or an external font.
    for path in WEB_DIR.iterdir():
        text = path.read_text()
        assert not re.search(r"https?://", text), path.name
        assert "@import" not in text and "@font-face" not in text, path.name


def test_user_text_never_becomes_html() -> None:
    js = (WEB_DIR / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js, sink


async def test_only_chatd_itself_may_frame_the_client(http: httpx.AsyncClient) -> None:
    """frame-ancestors: no other site can show /chat in a frame (clickjacking), unless
    CHATD_EMBED_ORIGINS names it (tests/browser/test_browser_embed.py)."""
    page = await http.get("/chat")
    assert page.headers["content-security-policy"] == "frame-ancestors 'self'"
