"""The Starlette application: routes, error handlers, and the Node that lives as long as it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from chatd import asyncapi, metrics, openapi, rest, webapp
from chatd.config import Settings
from chatd.db import MAYBE_UNAVAILABLE
from chatd.handlers import webhooks
from chatd.logs import RequestIdMiddleware, setup_logging
from chatd.node import Node
from chatd.protocol import ChatError
from chatd.session import connect_endpoint

CONNECT_PATH = "/connect"


class App(Starlette):
    """Starlette, but a socket on /connect goes straight to its endpoint.

    The middleware (starlette's, and chatd's, which is for HTTP) passes a socket through,
    and the router finds the one route: all they add is the frames and closures of every
    layer the endpoint runs under, kept for as long as the socket is open (about 5 KiB per
    socket). The app's exception handlers answer HTTP requests (rest.py); the socket
    handles its own errors (session.py)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("root_path", "") + CONNECT_PATH
        if scope["type"] == "websocket" and scope["path"] == path:
            scope["app"] = self
            await connect_endpoint(WebSocket(scope, receive, send))
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, database_url: str) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        node = Node(settings, database_url)
        webhooks.register(node)  # this process sends bots' webhook deliveries
        await node.start()
        app.state.node = node
        try:
            yield
        finally:
            await node.stop()
            metrics.process_exited()

    return App(
        routes=[
            *openapi.routes(rest.OPERATIONS),
            *openapi.docs_routes(rest.OPERATIONS, rest.TAGS),
            *asyncapi.asyncapi_routes(),
            *webapp.web_routes(),
            Route("/metrics", metrics.metrics, methods=["GET"]),
            WebSocketRoute(CONNECT_PATH, connect_endpoint),  # App.__call__ takes it first
        ],
        exception_handlers={
            ChatError: rest.chat_error_handler,
            HTTPException: rest.http_error_handler,
            **{kind: rest.unavailable_handler for kind in MAYBE_UNAVAILABLE},
        },
        middleware=[Middleware(metrics.HttpMetrics), Middleware(RequestIdMiddleware)],
        lifespan=lifespan,
    )


def create_app_from_env() -> Starlette:
    """The app of a `chatd serve --workers N` worker process, configured by the parent.

    The parent has migrated the database and put its URL in CHATD_DATABASE_URL (the
    embedded one included), so every worker serves the same database.
    """
    settings = Settings.from_env()
    setup_logging(settings.log_level, settings.log_format)
    assert settings.database_url, "the parent process sets CHATD_DATABASE_URL"
    return create_app(settings, settings.database_url)
