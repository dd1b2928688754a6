"""Webhooks: what a bot's webhook is sent (the sender of its deliveries, and their list),
and chats' incoming webhooks.

Outgoing: every event for a bot with a webhook is a row of the delivery queue
(chatd/deliveries.py, kind `bot_webhook`), queued in the transaction that commits what it
tells (chatd/writer.py for messages and commands, chatd/integrations.py for membership).
`deliver` POSTs it, signed with the bot's secret (chatd/signing.py). A 2xx answer whose
JSON body has a "text" is posted as the bot's reply in the event's chat, once: its
client_msg_id is derived from the delivery id, so a retried delivery posts nothing more.

Incoming: a member makes one for a chat; it is a bot user of its own (a member of the
chat) and a secret, stored hashed. POST /hooks/{id}/{secret} {"text"} (Slack's body)
posts as that bot, rate-limited per webhook (CHATD_HOOK_RATE).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

import msgspec

from chatd import signing
from chatd.db import is_unavailable
from chatd.deliveries import Attempt, Delivery, Outcome
from chatd.handlers.base import Context, fetch_chat, lock_chat, member_ids, role_of
from chatd.handlers.bots import insert_bot_user, no_such_bot
from chatd.handlers.chats import insert_members
from chatd.handlers.groups import Departure, announce_departure, depart
from chatd.handlers.messages import send_message
from chatd.integrations import WEBHOOK_KIND, enqueue_chat_event
from chatd.node import Node
from chatd.protocol import (
    FORBIDDEN,
    MAX_USER_NAME_CHARS,
    NOT_FOUND,
    RATE_LIMITED,
    ChatError,
    Created,
    CreateWebhook,
    DeleteWebhook,
    DeliveryInfo,
    DeliveryList,
    ListDeliveries,
    ListWebhooks,
    MemberAdded,
    MemberAddedData,
    Message,
    PostHook,
    SendMessage,
    Webhook,
    WebhookList,
    clean_text,
)

log = logging.getLogger("chatd")

MAX_WEBHOOKS_PER_CHAT = 20

# --- outgoing: the sender ----------------------------------------------------------------------


class _Answer(msgspec.Struct):
    text: str | None = None


class _Event(msgspec.Struct):
    action: str
    data: dict[str, object]


def _chat_of(event: _Event) -> int | None:
    data = event.data
    for value in (data.get("chat_id"), (data.get("chat") or {}).get("id"), data.get("id")):  # type: ignore[union-attr]
        if isinstance(value, int):
            return value
    return None


def register(node: Node) -> None:
    """Make this process send bots' webhook deliveries."""

    async def sender(delivery: Delivery) -> Attempt:
        return await deliver(node, delivery)

    node.deliveries.register(WEBHOOK_KIND, sender)


async def deliver(node: Node, delivery: Delivery) -> Attempt:
    """POST one delivery to its bot's webhook; post the answer's text as the bot's reply.
    The database away: tried again later (one log line, not a traceback)."""
    try:
        return await _deliver(node, delivery)
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        return Attempt(Outcome.RETRY, error=f"database unavailable: {exc!r}"[:500])


async def _deliver(node: Node, delivery: Delivery) -> Attempt:
    bot = await node.pool.fetchrow(
        "SELECT user_id, webhook_url, webhook_secret FROM bots WHERE id = $1", delivery.target
    )
    if bot is None or bot["webhook_url"] is None:
        return Attempt(Outcome.DROP, error="the bot or its webhook is gone")
    secret = bot["webhook_secret"].encode()
    headers = signing.signature_headers(secret, delivery.body, delivery.id)
    attempt, answer = await node.deliveries.post(bot["webhook_url"], delivery.body, headers)
    if attempt.outcome is not Outcome.DELIVERED or not answer.strip():
        return attempt
    try:
        text = msgspec.json.decode(answer, type=_Answer).text
        event = msgspec.json.decode(delivery.body, type=_Event)
    except msgspec.DecodeError:
        return attempt  # an answer that is no JSON object with a "text": nothing to post
    chat_id = _chat_of(event)
    if not text or not text.strip() or chat_id is None:
        return attempt
    ctx = Context(node, bot["user_id"], "webhook", kind="bot")
    reply = SendMessage(chat_id=chat_id, text=text, client_msg_id=f"delivery-{delivery.id}")
    try:
        await send_message(ctx, reply)
    except ChatError as exc:
        if exc.code == RATE_LIMITED:  # posted later: the retry's answer is the same reply
            return Attempt(Outcome.RETRY, attempt.status, f"reply rate-limited: {exc.message}")
        # Not postable (the bot left the chat, the text is too long): delivered all the same.
        log.info("delivery %d: the bot's reply was refused: %s", delivery.id, exc.code)
    return attempt


# --- outgoing: the owner's view ----------------------------------------------------------------

_DELIVERIES = """
SELECT d.id, d.body, d.state, d.attempts, d.last_status, d.last_error, d.created_at,
       d.finished_at
FROM deliveries d
WHERE d.kind = $1 AND d.target = $2 AND ($3::bigint IS NULL OR d.id < $3)
ORDER BY d.id DESC
LIMIT $4
"""


async def list_deliveries(ctx: Context, action: ListDeliveries) -> DeliveryList:
    owned = await ctx.node.pool.fetchval(
        "SELECT true FROM bots WHERE id = $1 AND owner_id = $2", action.bot_id, ctx.user_id
    )
    if not owned:
        raise no_such_bot()
    rows = await ctx.node.pool.fetch(
        _DELIVERIES, WEBHOOK_KIND, action.bot_id, action.before, action.limit + 1
    )
    found = []
    for r in rows[: action.limit]:
        try:
            event = msgspec.json.decode(r["body"], type=_Event)
            name, chat_id = event.action, _chat_of(event)
        except msgspec.DecodeError:
            name, chat_id = "unknown", None
        found.append(
            DeliveryInfo(
                id=r["id"],
                event=name,
                chat_id=chat_id,
                state=r["state"],
                attempts=r["attempts"],
                last_status=r["last_status"],
                last_error=r["last_error"],
                created_at=r["created_at"],
                finished_at=r["finished_at"],
            )
        )
    return DeliveryList(found, has_more=len(rows) > action.limit)


# --- incoming ----------------------------------------------------------------------------------

_HOOK_COLUMNS = "id, chat_id, name, bot_user_id, creator_id, created_at"


def _webhook(row: object, url: str | None = None) -> Webhook:
    return Webhook(
        id=row["id"],  # type: ignore[index]
        chat_id=row["chat_id"],  # type: ignore[index]
        name=row["name"],  # type: ignore[index]
        bot_uuid=str(row["bot_user_id"]),  # type: ignore[index]
        creator_uuid=str(row["creator_id"]),  # type: ignore[index]
        created_at=row["created_at"],  # type: ignore[index]
        url=url,
    )


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


async def create_webhook(ctx: Context, action: CreateWebhook) -> Webhook:
    """Any member; the webhook's bot joins the chat (members are told: member_added)."""
    name = clean_text(action.name, "name", min_len=1, max_len=MAX_USER_NAME_CHARS)
    secret = secrets.token_urlsafe(32)
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        await lock_chat(conn, action.chat_id, ctx.user_id)
        count = await conn.fetchval(
            "SELECT count(*) FROM chat_webhooks WHERE chat_id = $1", action.chat_id
        )
        if count >= MAX_WEBHOOKS_PER_CHAT:
            raise ChatError(FORBIDDEN, f"a chat has at most {MAX_WEBHOOKS_PER_CHAT} webhooks")
        bot_user = await insert_bot_user(conn, name, "hook")
        await insert_members(conn, action.chat_id, [bot_user])
        row = await conn.fetchrow(
            "INSERT INTO chat_webhooks (chat_id, bot_user_id, creator_id, name, secret_hash)"
            f" VALUES ($1, $2, $3, $4, $5) RETURNING {_HOOK_COLUMNS}",
            action.chat_id,
            bot_user,
            ctx.user_id,
            name,
            _digest(secret),
        )
        chat = await fetch_chat(conn, action.chat_id)
        added = MemberAdded(MemberAddedData(chat, [str(bot_user)], by=str(ctx.user_id)))
        await enqueue_chat_event(conn, action.chat_id, added)
    await ctx.node.publish(member_ids(chat), added)
    return _webhook(row, f"/hooks/{row['id']}/{secret}")


async def list_webhooks(ctx: Context, action: ListWebhooks) -> WebhookList:
    async with ctx.node.pool.acquire() as conn:
        if await role_of(conn, action.chat_id, ctx.user_id) is None:
            raise ChatError(NOT_FOUND, "no such chat")
        rows = await conn.fetch(
            f"SELECT {_HOOK_COLUMNS} FROM chat_webhooks WHERE chat_id = $1 ORDER BY id",
            action.chat_id,
        )
    return WebhookList([_webhook(r) for r in rows])


async def delete_webhook(ctx: Context, action: DeleteWebhook) -> None:
    """Its creator, or the chat's admins and owner. Its URL stops working and its bot leaves
    the chat (its messages stay)."""
    departure: Departure | None = None
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        await lock_chat(conn, action.chat_id, ctx.user_id)
        hook = await conn.fetchrow(
            f"SELECT {_HOOK_COLUMNS} FROM chat_webhooks WHERE id = $1 AND chat_id = $2",
            action.webhook_id,
            action.chat_id,
        )
        if hook is None:
            raise ChatError(NOT_FOUND, "no such webhook")
        role = await role_of(conn, action.chat_id, ctx.user_id)
        if hook["creator_id"] != ctx.user_id and role not in ("owner", "admin"):
            raise ChatError(FORBIDDEN, "only its creator, or an admin, may delete a webhook")
        await conn.execute("DELETE FROM chat_webhooks WHERE id = $1", action.webhook_id)
        bot_role = await role_of(conn, action.chat_id, hook["bot_user_id"])
        if bot_role is not None:
            departure = await depart(conn, action.chat_id, hook["bot_user_id"], bot_role)
        await conn.execute("UPDATE users SET deleted_at = now() WHERE id = $1", hook["bot_user_id"])
    if departure is not None:
        await announce_departure(ctx.node, departure)


# A webhook works while its creator is an active member of its chat: someone removed,
# disabled or deleted cannot go on posting into the chat through a URL they kept.
_HOOK_TO_POST = """
SELECT h.chat_id, h.bot_user_id, h.secret_hash FROM chat_webhooks h
JOIN users creator ON creator.id = h.creator_id
WHERE h.id = $1 AND creator.deleted_at IS NULL AND creator.disabled_at IS NULL
  AND EXISTS (
      SELECT 1 FROM chat_members cm WHERE cm.chat_id = h.chat_id AND cm.user_id = h.creator_id
  )
"""


async def post_hook(ctx: Context, action: PostHook) -> Created[Message]:
    """POST /hooks/{id}/{secret}: public, the secret is the credential. A wrong secret, or
    a webhook whose creator left the chat (or was disabled), is answered as a webhook
    that does not exist."""
    hook = await ctx.node.pool.fetchrow(_HOOK_TO_POST, action.webhook_id)
    if hook is None or not hmac.compare_digest(hook["secret_hash"], _digest(action.secret)):
        raise ChatError(NOT_FOUND, "no such webhook")
    wait = await ctx.node.limits.hook.take(str(action.webhook_id))
    if wait:
        raise ChatError(RATE_LIMITED, "too many posts to this webhook; slow down", retry_after=wait)
    as_bot = Context(ctx.node, hook["bot_user_id"], ctx.peer, kind="bot")
    send = SendMessage(
        chat_id=hook["chat_id"], text=action.text, client_msg_id=action.client_msg_id
    )
    return await send_message(as_bot, send)
