"""Prometheus metrics, served at GET /metrics in the text format.

Counted where the work happens, cheaply: a fan-out adds its number of deliveries once,
not once per socket. With `chatd serve --workers N` the workers count in
prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by chatd/cli.py):
each writes its figures to a file there, and a scrape, whichever worker answers it, sums
them all. Gauges sum the live workers' values (`livesum`).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.requests import Request
from starlette.responses import Response

# Read when this module is first imported: a worker's environment is set by then.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

OPEN_SOCKETS = Gauge(
    "chatd_open_sockets", "WebSocket connections open on /connect", multiprocess_mode="livesum"
)
MESSAGES_PERSISTED = Counter("chatd_messages_persisted_total", "Messages committed")
EVENTS_DELIVERED = Counter(
    "chatd_events_delivered_total", "Events queued to sockets of this process"
)
SEND_SECONDS = Histogram(
    "chatd_send_seconds",
    "From a send entering the writer to its commit",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
SEND_BATCH_SIZE = Histogram(
    "chatd_send_batch_size",
    "Messages stored per group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
QUEUE_OVERFLOWS = Counter(
    "chatd_queue_overflows_total", "Sockets closed with 1013 because they did not read"
)
PRESENCE_EVENTS = Counter(
    "chatd_presence_events_total", "Presence events published (each to all of a user's contacts)"
)
ERRORS = Counter("chatd_errors_total", "Errors answered to clients, by code", ["code"])
RATE_LIMITED = Counter(
    "chatd_rate_limited_total",
    "Requests and frames refused with rate_limited, by limit",
    ["limit"],
)
SOCKET_CAP_CLOSES = Counter(
    "chatd_socket_cap_closes_total",
    "Sockets closed with 1008 because their user opened more than the per-user cap",
)
DB_POOL = Gauge(
    "chatd_db_pool_connections",
    "PostgreSQL pool connections",
    ["state"],
    multiprocess_mode="livesum",
)
REDIS_SUBSCRIPTION_LOST = Counter(
    "chatd_redis_subscription_lost_total",
    "Times the Redis subscription broke (this process's sockets were closed with 1012)",
)
HTTP_REQUESTS = Counter(
    "chatd_http_requests_total",
    "HTTP requests answered, by method, route (its template) and status",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "chatd_http_request_seconds",
    "From a request's arrival to the end of its answer, by method and route",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

DELIVERIES = Counter(
    "chatd_deliveries_total",
    "Attempts of the delivery queue (webhooks, pushes), by kind and outcome "
    "(delivered, retry, dead)",
    ["kind", "outcome"],
)
DELIVERY_SECONDS = Histogram(
    "chatd_delivery_seconds",
    "One delivery attempt: the request to the receiver and its answer, by kind",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
JWKS_FETCHES = Counter(
    "chatd_jwks_fetches_total",
    "Fetches of CHATD_AUTH_JWKS_URL (external identity keys), by outcome",
    ["outcome"],
)
BEFORE_SEND_SECONDS = Histogram(
    "chatd_before_send_seconds",
    "Calls of the before-send hook (CHATD_BEFORE_SEND_URL), by outcome",
    ["outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


async def watch_pool(pool: Any, every: float = 1.0) -> None:
    """Report the pool's open and idle connections once a second (a gauge read at scrape
    time cannot be summed across workers)."""
    while True:
        DB_POOL.labels("open").set(pool.get_size())
        DB_POOL.labels("idle").set(pool.get_idle_size())
        await asyncio.sleep(every)


def process_exited() -> None:
    """This worker stops: its live gauges no longer count."""
    if MULTIPROCESS:
        multiprocess.mark_process_dead(os.getpid())


async def metrics(request: Request) -> Response:
    if MULTIPROCESS:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


class HttpMetrics:
    """ASGI middleware: counts each HTTP request and times it, by the route that matched
    (`/chats/{chat_id:int}`, never the path itself, so the labels stay few); a request no
    route matched counts as `unmatched`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets when the app fails before answering

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            HTTP_REQUESTS.labels(method, template, str(status)).inc()
            HTTP_SECONDS.labels(method, template).observe(time.perf_counter() - started)
