"""The browser client at GET /chat: static files shipped in chatd/web/, no build step.

index.html, app.js and style.css reference each other by relative URLs and load nothing
from another host, so the page works offline and under a path prefix.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent / "web"


def web_routes() -> list[BaseRoute]:
    """GET /chat (the page), its assets under /chat/ (app.js, style.css), and GET / to it."""

    async def index(request: Request) -> Response:
        return FileResponse(
            WEB_DIR / "index.html",
            media_type="text/html; charset=utf-8",
            headers={"Cache-Control": "no-cache"},
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
