"""App webhooks: the product's chat events, POSTed to the webhook of each API key that
subscribed to them (docs/embedding.md), through the durable delivery queue.

    message.new  message.updated  member.added  member.removed  chat.created  user.created

An event is queued by `enqueue` inside the transaction that commits the change, one
delivery per subscribed webhook (kind "app_webhook", target the webhook's id), ordered per
webhook and chat: at least once, in order per chat, surviving a kill -9 (the queue's
guarantees, chatd/deliveries.py). The body:

    {"type": "message.new", "created_at": "...", "chat_id": 7, "data": {...}}

signed with the webhook's secret (chatd/signing.py; X-Chatd-Delivery is the id to
deduplicate by).

No webhook, no cost: each process remembers whether any app webhook exists (`active`),
looked up at start, every POLL_SECONDS, and at once in the process that creates or
removes one; while there is none, `enqueue` does nothing at all. So a webhook hears the
events of the other processes from at most POLL_SECONDS after it was created.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import typing
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec

from chatd import signing
from chatd.deliveries import CHANNEL as DELIVERIES_CHANNEL
from chatd.deliveries import Attempt, Delivery, DeliveryQueue, Outcome
from chatd.protocol import AppEvent

log = logging.getLogger("chatd.app_hooks")

KIND = "app_webhook"
POLL_SECONDS = 5.0
EVENTS = typing.get_args(AppEvent)  # message.new, ..., user.created

# One delivery per webhook subscribed to $1, ordered per webhook and $2 (a chat, or a
# user for user.created); woken at the commit like every enqueue.
_ENQUEUE = f"""
WITH d AS (
    INSERT INTO deliveries (kind, target, order_key, body)
    SELECT '{KIND}', h.id, 'app:' || h.id || ':' || $2, $3
    FROM app_webhooks h WHERE $1 = ANY(h.events)
    ORDER BY h.id
    RETURNING id
)
SELECT count(*), pg_notify('{DELIVERIES_CHANNEL}', '') FROM d
"""

# Several events of one type: per event (in the given order), one per subscribed webhook.
_ENQUEUE_MANY = f"""
WITH d AS (
    INSERT INTO deliveries (kind, target, order_key, body)
    SELECT '{KIND}', h.id, 'app:' || h.id || ':' || e.key, e.body
    FROM unnest($2::text[], $3::bytea[]) WITH ORDINALITY AS e(key, body, n)
    JOIN app_webhooks h ON $1 = ANY(h.events)
    ORDER BY e.n, h.id
    RETURNING id
)
SELECT count(*), pg_notify('{DELIVERIES_CHANNEL}', '') FROM d
"""

_TARGET = "SELECT url, secret FROM app_webhooks WHERE id = $1"


# This process's AppHooks (its Node's, set when it starts): what `enqueue_chat_event` and
# `enqueue_user_created` use, called from places that hold no Node (a membership change
# deep in a departure, the first sight of a user). A process has one Node.
_current: AppHooks | None = None

# The app event of each chatd event that has one.
_APP_EVENT_OF = {
    "chat_created": "chat.created",
    "member_added": "member.added",
    "member_removed": "member.removed",
}


class AppHooks:
    """node.app_hooks: whether any app webhook exists, and the sender of their deliveries."""

    def __init__(self, pool: asyncpg.Pool, queue: DeliveryQueue) -> None:
        self._pool = pool
        self._queue = queue
        self.active = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        global _current
        _current = self
        self._queue.register(KIND, self.send)
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def refresh(self) -> None:
        self.active = bool(await self._pool.fetchval("SELECT EXISTS (SELECT 1 FROM app_webhooks)"))

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the last answer; look again soon
                log.warning("could not look up app webhooks: %r", exc)
            await asyncio.sleep(POLL_SECONDS)

    async def send(self, delivery: Delivery) -> Attempt:
        row = await self._pool.fetchrow(_TARGET, delivery.target)
        if row is None:  # the key was revoked: nobody to tell
            return Attempt(Outcome.DROP, error="the webhook is gone")
        headers = signing.signature_headers(row["secret"].encode(), delivery.body, delivery.id)
        attempt, _ = await self._queue.post(row["url"], delivery.body, headers)
        return attempt


async def enqueue(
    conn: asyncpg.Connection,
    hooks: AppHooks,
    event: str,
    data: Any,
    *,
    chat_id: int | None = None,
    order: str | None = None,
) -> None:
    """Queue `event` for every webhook subscribed to it, in the caller's transaction:
    ordered per chat (`chat_id`), or by `order` for events of no chat. Nothing while no
    app webhook exists."""
    if not hooks.active:
        return
    key = f"chat:{chat_id}" if chat_id is not None else (order or "none")
    await conn.execute(_ENQUEUE, event, key, _body(event, chat_id, data))


async def enqueue_many(
    conn: asyncpg.Connection, hooks: AppHooks, event: str, events: list[tuple[int, Any]]
) -> None:
    """`enqueue` for several (chat_id, data) of one type, in one statement, in order."""
    if not hooks.active or not events:
        return
    keys = [f"chat:{chat_id}" for chat_id, _ in events]
    bodies = [_body(event, chat_id, data) for chat_id, data in events]
    await conn.execute(_ENQUEUE_MANY, event, keys, bodies)


def _body(event: str, chat_id: int | None, data: Any) -> bytes:
    return msgspec.json.encode(
        {"type": event, "created_at": datetime.now(UTC), "chat_id": chat_id, "data": data}
    )


async def enqueue_chat_event(conn: asyncpg.Connection, chat_id: int, event: Any) -> None:
    """The app event of a chatd membership event (chat_created, member_added,
    member_removed), queued in the caller's transaction (chatd/integrations.py
    `enqueue_chat_event` calls it beside bots' webhooks)."""
    hooks = _current
    name = _APP_EVENT_OF.get(type(event).__struct_config__.tag)
    if hooks is not None and hooks.active and name is not None:
        await enqueue(conn, hooks, name, event.data, chat_id=chat_id)


async def enqueue_user_created(conn: asyncpg.Connection, user: Any) -> None:
    """user.created for a new user (a Member), in the transaction that creates it."""
    hooks = _current
    if hooks is not None and hooks.active:
        await enqueue(conn, hooks, "user.created", user, order=f"user:{user.user_uuid}")


async def enqueue_message_updated(conn: asyncpg.Connection, message: Any) -> None:
    """message.updated (an edit, a delete for everyone, a reaction change: the whole
    Message as it is now), in the transaction that changes it."""
    hooks = _current
    if hooks is not None and hooks.active:
        await enqueue(conn, hooks, "message.updated", message, chat_id=message.chat_id)
