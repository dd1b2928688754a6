"""The Starlette application: routes, error handlers, and what lives for the app's lifetime."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route, WebSocketRoute

from chatd import metrics, openapi, rest, webapp
from chatd.config import Settings
from chatd.db import MAYBE_UNAVAILABLE, create_pool
from chatd.handlers.messages import MessageWriter
from chatd.handlers.presence import TypingGate
from chatd.hub import Hub, LocalBus
from chatd.logs import RequestIdMiddleware, setup_logging
from chatd.protocol import ChatError
from chatd.ratelimit import Limits
from chatd.redis_bus import RedisBus
from chatd.session import connect_endpoint


def create_app(settings: Settings, database_url: str) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.pool = await create_pool(database_url, settings.db_pool_size, settings.db_timeout)
        metrics.watch_pool(app.state.pool)
        app.state.hub = hub = Hub(settings.max_sockets_per_user)
        app.state.bus = bus = (
            RedisBus(hub, settings.redis_url) if settings.redis_url else LocalBus(hub)
        )
        app.state.limits = Limits(
            login_email=settings.login_email_rate,
            login_ip=settings.login_ip_rate,
            register=settings.register_rate,
            message=settings.message_rate,
            typing=settings.typing_rate,
            create_chat=settings.create_chat_rate,
            add_members=settings.add_members_rate,
            groups_per_day=settings.groups_per_day,
            redis_url=settings.redis_url,
        )
        app.state.typing_gate = TypingGate(remote=app.state.limits.remote)
        app.state.writer = MessageWriter(app.state.pool, bus)
        try:
            await bus.start()
        except BaseException:
            await app.state.pool.close()
            raise
        watchdog = asyncio.create_task(hub.watch_writers())
        try:
            yield
        finally:
            watchdog.cancel()
            # Batches in flight commit and fan out before the bus goes (their acks too).
            await app.state.writer.wait_idle(timeout=5)
            await bus.close()
            await app.state.limits.close()
            await app.state.pool.close()

    return Starlette(
        routes=[
            *openapi.routes(rest.OPERATIONS),
            *openapi.docs_routes(rest.OPERATIONS),
            *webapp.web_routes(),
            Route("/metrics", metrics.metrics, methods=["GET"]),
            WebSocketRoute("/connect", connect_endpoint),
        ],
        exception_handlers={
            ChatError: rest.chat_error_handler,
            HTTPException: rest.http_error_handler,
            **{kind: rest.unavailable_handler for kind in MAYBE_UNAVAILABLE},
        },
        middleware=[Middleware(RequestIdMiddleware)],
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
