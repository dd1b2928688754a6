"""The Starlette application: routes, error handlers, and the Node that lives as long as it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route, WebSocketRoute

from chatd import asyncapi, metrics, openapi, rest, webapp
from chatd.config import Settings
from chatd.db import MAYBE_UNAVAILABLE
from chatd.handlers import webhooks
from chatd.logs import RequestIdMiddleware, setup_logging
from chatd.node import Node
from chatd.protocol import ChatError
from chatd.session import connect_endpoint


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

    return Starlette(
        routes=[
            *openapi.routes(rest.OPERATIONS),
            *openapi.docs_routes(rest.OPERATIONS, rest.TAGS),
            *asyncapi.asyncapi_routes(),
            *webapp.web_routes(),
            Route("/metrics", metrics.metrics, methods=["GET"]),
            WebSocketRoute("/connect", connect_endpoint),
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
