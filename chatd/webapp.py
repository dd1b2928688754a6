"""The browser client at GET /chat: static files shipped in chatd/web/, no build step.

index.html, app.js and style.css reference each other by relative URLs and load nothing
from another host, so the page works offline and under a path prefix.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent / "web"


def web_routes() -> list[BaseRoute]:
    """GET /chat (the page), its assets under /chat/ (app.js, style.css), and GET / to it.

    The page is read once, here, and tells the script whether this server has local
    accounts (`<html data-local-accounts>`): without them there is no password form to
    offer, and the page says where users sign in instead."""
    html = (WEB_DIR / "index.html").read_text(encoding="utf-8")
    pages = {
        local: html.replace("<html ", f'<html data-local-accounts="{str(local).lower()}" ', 1)
        for local in (True, False)
    }

    async def index(request: Request) -> Response:
        settings = request.app.state.node.settings
        # Which pages may frame it: chatd's own, and the apps of CHATD_EMBED_ORIGINS (which
        # show it with ?embed and hand it their users' tokens). Any other framing page is
        # refused by the browser, so no site can overlay it to steal clicks.
        ancestors = " ".join(("'self'", *settings.embed_origins))
        return HTMLResponse(
            pages[settings.local_accounts],
            headers={
                "Cache-Control": "no-cache",
                "Content-Security-Policy": f"frame-ancestors {ancestors}",
            },
        )

    async def slash(request: Request) -> Response:
        # The page's relative asset URLs assume it lives at /chat, not /chat/.
        return RedirectResponse("../chat", status_code=308)

    async def root(request: Request) -> Response:
        # Relative, like the page's own URLs, so it also works under a path prefix.
        return RedirectResponse("chat", status_code=307)

    return [
        Route("/", root, methods=["GET"]),
        Route("/chat", index, methods=["GET"]),
        Route("/chat/", slash, methods=["GET"]),
        Mount("/chat", StaticFiles(directory=WEB_DIR), name="web"),
    ]
