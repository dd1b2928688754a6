"""Prometheus metrics, served at GET /metrics in the text format.

Counted where the work happens, cheaply: a fan-out adds its number of deliveries once,
not once per socket. With `--workers N` each process counts its own (the scrape reaches
one of them); scrape each node, or run one worker per container, for whole figures.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.requests import Request
from starlette.responses import Response

OPEN_SOCKETS = Gauge("chatd_open_sockets", "WebSocket connections open on /connect")
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
DB_POOL = Gauge("chatd_db_pool_connections", "PostgreSQL pool connections", ["state"])


def watch_pool(pool: object) -> None:
    """Report the pool's size and idle connections at every scrape."""
    DB_POOL.labels("open").set_function(pool.get_size)  # type: ignore[attr-defined]
    DB_POOL.labels("idle").set_function(pool.get_idle_size)  # type: ignore[attr-defined]


async def metrics(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
