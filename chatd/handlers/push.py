"""Web Push subscriptions: a browser's PushSubscription stored for its user, and the VAPID
public key it subscribes with (the sending: chatd/push.py)."""

from __future__ import annotations

from urllib.parse import urlsplit

from chatd.deliveries import url_problem
from chatd.handlers.base import Context
from chatd.protocol import (
    INVALID,
    AddPushSubscription,
    ChatError,
    Created,
    GetVapidKey,
    PushSubscriptionInfo,
    RemovePushSubscription,
    VapidKey,
)
from chatd.push import b64url_decode

MAX_SUBSCRIPTIONS = 20  # per user: browsers and devices

# One row per endpoint: a browser subscribing again (or for another user after a new
# login) takes its row over. xmax = 0: the row was inserted, not updated.
_UPSERT = """
INSERT INTO push_subscriptions (user_id, endpoint, p256dh, auth) VALUES ($1, $2, $3, $4)
ON CONFLICT (endpoint) DO UPDATE
    SET user_id = excluded.user_id, p256dh = excluded.p256dh, auth = excluded.auth
RETURNING id, endpoint, created_at, (xmax = 0) AS inserted
"""
# The user's oldest beyond the cap go (a browser that never unsubscribed, say).
_TRIM = """
DELETE FROM push_subscriptions WHERE id IN (
    SELECT id FROM push_subscriptions WHERE user_id = $1 ORDER BY id DESC OFFSET $2
)
"""


async def add_push_subscription(
    ctx: Context, request: AddPushSubscription
) -> Created[PushSubscriptionInfo]:
    """Store a subscription (201), or update the one with this endpoint (200)."""
    endpoint = request.endpoint.strip()
    allow_private = ctx.node.settings.outbound_allow_private
    if urlsplit(endpoint).scheme != "https" and not allow_private:
        raise ChatError(INVALID, "endpoint must be an https URL")
    problem = await url_problem(endpoint, allow_private)
    if problem is not None:
        raise ChatError(INVALID, f"endpoint refused: {problem}")
    try:
        if len(b64url_decode(request.keys.p256dh)) != 65 or not b64url_decode(request.keys.auth):
            raise ValueError
    except ValueError:
        raise ChatError(INVALID, "keys must be the subscription's p256dh and auth") from None
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            _UPSERT, ctx.user_id, endpoint, request.keys.p256dh, request.keys.auth
        )
        await conn.execute(_TRIM, ctx.user_id, MAX_SUBSCRIPTIONS)
    info = PushSubscriptionInfo(row["id"], row["endpoint"], row["created_at"])
    return Created(info, row["inserted"])


async def remove_push_subscription(ctx: Context, request: RemovePushSubscription) -> None:
    """Forget the caller's subscription with this endpoint; none: no change."""
    await ctx.node.pool.execute(
        "DELETE FROM push_subscriptions WHERE user_id = $1 AND endpoint = $2",
        ctx.user_id,
        request.endpoint.strip(),
    )


async def vapid_key(ctx: Context, request: GetVapidKey) -> VapidKey:
    return VapidKey(ctx.node.push.vapid.public_key)
