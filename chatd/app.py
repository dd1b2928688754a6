"""The Starlette application: routes, error handlers, and what lives for the app's lifetime."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import WebSocketRoute

from chatd import openapi, rest
from chatd.config import Settings
from chatd.db import create_pool
from chatd.handlers.presence import TypingGate
from chatd.hub import Hub, LocalBus
from chatd.protocol import ChatError
from chatd.session import connect_endpoint


def create_app(settings: Settings, database_url: str) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.pool = await create_pool(database_url, settings.db_pool_size)
        app.state.hub = Hub()
        app.state.bus = LocalBus(app.state.hub)
        app.state.typing_gate = TypingGate()
        try:
            yield
        finally:
            await app.state.pool.close()

    return Starlette(
        routes=[
            *openapi.routes(rest.OPERATIONS),
            *openapi.docs_routes(rest.OPERATIONS),
            WebSocketRoute("/connect", connect_endpoint),
        ],
        exception_handlers={
            ChatError: rest.chat_error_handler,
            HTTPException: rest.http_error_handler,
        },
        lifespan=lifespan,
    )
