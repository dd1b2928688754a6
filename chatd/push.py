"""Notifications for members who are away: Web Push (RFC 8030/8291/8292) and the push
gateway, both sent through the durable delivery queue (chatd/deliveries.py).

Who is notified: a member of a chat with messages from others above both their read
pointer and their `notified_seq` (migrations/0010), who has no socket open anywhere, whose
chat is not muted (`mute_until` in the future) and whose `notify` allows it (`all`, or
`mentions` and one of the new messages mentions them); and who has a Web Push
subscription, or any member when CHATD_PUSH_GATEWAY_URL is set.

The send path pays nothing for this. The MessageWriter only hands this process's
`PushNotifier` the ids of the chats it committed to (in memory, after the commit); the
notifier looks at those chats a moment later, off the writer's path, in one query for
all of them, and most chats have nobody to notify. Nothing is lost on a crash between
the commit and that look: `notified_seq` is durable, and every process sweeps, every
SWEEP_SECONDS, the chats written to in the last two sweeps (at start: in the last
STALE_AFTER), so what a process that died never looked at is found by another, or by the
next to start. For each member to notify, one transaction
locks their membership row, enqueues the deliveries and moves `notified_seq` to the
chat's last seq: a member is considered once per message, however many processes look.

The trade-off: a notification leaves up to a moment after the commit (NOTIFY_DELAY; up to
SWEEP_SECONDS after a crash), and several messages arriving together make one
notification, with the counts of all of them. The counts are the chat list's own
(`unread_count`, from the read pointers; `unread_total` over every chat), so a badge
cannot drift from what the client shows.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import http_ece
import jwt
import msgspec
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from chatd import signing
from chatd.config import stored_once
from chatd.db import QUERY_FAILED
from chatd.deliveries import Attempt, Delivery, DeliveryQueue, Outcome, enqueue_many
from chatd.presence import PresenceTracker
from chatd.store import UNREAD_COUNT

log = logging.getLogger("chatd")

WEB_PUSH = "web_push"
GATEWAY = "push_gateway"
NOTIFY_DELAY = 0.5  # seconds the notifier gathers committed chats before it looks
SWEEP_SECONDS = 60.0  # the sweep looks at the chats written to in twice this
MAX_PUSH_TEXT = 200  # characters of a message in a Web Push payload (4 KiB at most)
VAPID_TTL = 12 * 3600  # a VAPID JWT's lifetime (RFC 8292: at most 24 h)
PUSH_TTL = 24 * 3600  # how long a push service keeps an undelivered message


# --- VAPID keys: generated once into the data folder, like the secret --------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Vapid:
    """The server's VAPID key pair (P-256)."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey, subject: str) -> None:
        self.private_key = private_key
        self.subject = subject
        point = private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self.public_key = b64url(point)  # the browser's applicationServerKey
        self._pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._tokens: dict[str, tuple[float, str]] = {}  # audience → (expiry, header)

    @classmethod
    def from_text(cls, text: str, subject: str) -> Vapid:
        """A key as CHATD_VAPID_PRIVATE_KEY holds it: PEM, or the raw 32-byte scalar in
        base64url (what web-push tools print)."""
        text = text.strip()
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise SystemExit("CHATD_VAPID_PRIVATE_KEY must be a P-256 key")
            return cls(key, subject)
        scalar = int.from_bytes(b64url_decode(text), "big")
        return cls(ec.derive_private_key(scalar, ec.SECP256R1()), subject)

    def authorization(self, endpoint: str) -> str:
        """The Authorization header for a push service (RFC 8292), reused until near expiry."""
        parts = urlsplit(endpoint)
        audience = f"{parts.scheme}://{parts.netloc}"
        now = time.time()
        cached = self._tokens.get(audience)
        if cached is not None and cached[0] - now > 600:
            return cached[1]
        expiry = int(now + VAPID_TTL)
        claims = {"aud": audience, "exp": expiry, "sub": self.subject}
        token = jwt.encode(claims, self._pem, algorithm="ES256")
        header = f"vapid t={token}, k={self.public_key}"
        if len(self._tokens) > 1000:
            self._tokens.clear()
        self._tokens[audience] = (expiry, header)
        return header


def stored_vapid(data_dir: Path, configured: str | None, subject: str) -> Vapid:
    """CHATD_VAPID_PRIVATE_KEY when set, else the key kept in the data folder (generated
    on first use, mode 0600). Every node of a cluster must use the same key: browsers
    subscribed with its public key."""
    if configured:
        return Vapid.from_text(configured, subject)
    path = data_dir / "vapid_private_key.pem"

    def new_key() -> bytes:
        return ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    pem, created = stored_once(path, new_key)
    if created:
        log.warning("CHATD_VAPID_PRIVATE_KEY is not set: generated one and stored it in %s", path)
    return Vapid.from_text(pem.decode(), subject)


def encrypt(payload: bytes, p256dh: str, auth: str) -> bytes:
    """The body of a Web Push message (RFC 8291, aes128gcm), for one subscription."""
    return http_ece.encrypt(
        payload,
        salt=os.urandom(16),
        private_key=ec.generate_private_key(ec.SECP256R1()),
        dh=b64url_decode(p256dh),
        auth_secret=b64url_decode(auth),
        version="aes128gcm",
    )


# --- what is sent ---------------------------------------------------------------------


class Notification(msgspec.Struct, omit_defaults=True):
    """The JSON both channels carry (the gateway's without `text` unless configured)."""

    user_uuid: str  # whom it is for
    chat_id: int
    chat_type: str
    chat_name: str | None
    message_id: int  # the newest message
    sender_uuid: str
    sender_name: str
    unread_count: int  # in this chat: the chat list's own count
    unread_total: int  # over every chat of the user
    mentioned: bool  # one of the new messages mentions the user
    text: str | None = None


# --- the notifier -----------------------------------------------------------------------

# Messages older than this are never notified (the notifier was down, or the gateway was
# just configured): news, not history.
STALE_AFTER = 3600

_SUBSCRIBED = "EXISTS (SELECT 1 FROM push_subscriptions p WHERE p.user_id = cm.user_id)"

# The chats with messages sent in the last $1 seconds: the sweep's. Two walks down the
# primary key over those recent messages only (created_at grows with id).
_RECENT_CHATS = """
SELECT DISTINCT chat_id FROM messages
WHERE id > coalesce(
    (SELECT id FROM messages WHERE created_at < now() - make_interval(secs => $1)
     ORDER BY id DESC LIMIT 1),
    0)
"""

# Members behind in these chats: messages above both pointers.
_BEHIND = f"""
SELECT cm.chat_id, cm.user_id, c.last_seq,
       cm.notify = 'none' OR coalesce(cm.mute_until > now(), false)
         OR coalesce(newest.created_at < now() - interval '{STALE_AFTER} seconds', false)
         AS silent
FROM chat_members cm JOIN chats c ON c.id = cm.chat_id
LEFT JOIN messages newest ON newest.chat_id = c.id AND newest.seq = c.last_seq
WHERE cm.chat_id = ANY($1::bigint[])
  AND c.last_seq > greatest(cm.notified_seq, cm.read_seq)
  AND ({{everyone}} OR {{subscribed}})
LIMIT 5000
"""

# One member, locked: what decides and what the notification says.
_MEMBER = """
SELECT cm.read_seq, cm.notified_seq, cm.mute_until, cm.notify, c.last_seq, c.type, c.name,
       EXISTS (SELECT 1 FROM mentions mn WHERE mn.user_id = cm.user_id
               AND mn.chat_id = cm.chat_id
               AND mn.seq > greatest(cm.notified_seq, cm.read_seq)) AS mentioned
FROM chat_members cm JOIN chats c ON c.id = cm.chat_id
WHERE cm.chat_id = $1 AND cm.user_id = $2
FOR UPDATE OF cm
"""

_ADVANCE = "UPDATE chat_members SET notified_seq = $3 WHERE chat_id = $1 AND user_id = $2"

# Members who will not be notified of these messages (online, muted, notify none): their
# pointers move in one statement, never above the chat's seq they were read at.
_SKIP = """
UPDATE chat_members cm SET notified_seq = greatest(cm.notified_seq, v.seq)
FROM unnest($1::bigint[], $2::uuid[], $3::bigint[]) AS v(chat_id, user_id, seq)
WHERE cm.chat_id = v.chat_id AND cm.user_id = v.user_id
"""

_NEWEST = """
SELECT m.id, m.sender_id, m.text, u.name AS sender_name
FROM messages m JOIN users u ON u.id = m.sender_id
WHERE m.chat_id = $1 AND m.seq > $2 AND m.sender_id <> $3 AND NOT m.deleted
ORDER BY m.seq DESC LIMIT 1
"""

# The chat list's unread_count (store.UNREAD_COUNT), per chat and summed.
_UNREAD = f"""
SELECT cm.chat_id, {UNREAD_COUNT} AS unread
FROM chat_members cm JOIN chats c ON c.id = cm.chat_id
WHERE cm.user_id = $1 AND c.last_seq > cm.read_seq
"""

_SUBSCRIPTIONS = "SELECT id FROM push_subscriptions WHERE user_id = $1 ORDER BY id"
_SUBSCRIPTION = "SELECT endpoint, p256dh, auth FROM push_subscriptions WHERE id = $1"
_DROP_SUBSCRIPTION = "DELETE FROM push_subscriptions WHERE id = $1"

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Notification).decode


class PushNotifier:
    """Finds the members to notify after commits, and sends (node.push)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        presence: PresenceTracker,
        deliveries: DeliveryQueue,
        vapid: Vapid,
        gateway_url: str | None,
        gateway_secret: bytes,
        gateway_text: bool,
    ) -> None:
        self.pool = pool
        self.presence = presence
        self.deliveries = deliveries
        self.vapid = vapid
        self.gateway_url = gateway_url
        self.gateway_secret = gateway_secret
        self.gateway_text = gateway_text
        everyone = "true" if gateway_url else "false"
        self._behind = _BEHIND.format(everyone=everyone, subscribed=_SUBSCRIBED)
        self._chats: set[int] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        deliveries.register(WEB_PUSH, self.send_web_push)
        if gateway_url:
            deliveries.register(GATEWAY, self.send_to_gateway)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._sweep())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def committed(self, chat_ids: Iterable[int]) -> None:
        """The writer committed messages to these chats (no I/O: the writer's path)."""
        self._chats.update(chat_ids)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(NOTIFY_DELAY)
            self._wake.clear()
            chats, self._chats = self._chats, set()
            try:
                await self.look(list(chats))
            except QUERY_FAILED as exc:
                log.warning("push: cannot look for members to notify (%r); the sweep will", exc)

    async def _sweep(self) -> None:
        """The chats written to lately, looked at again: at start, those of the last
        STALE_AFTER seconds (what a process that died left unlooked at); then every
        SWEEP_SECONDS, those of the last two sweeps (what another process's notifier may
        have missed: a batch committed while it died)."""
        window = STALE_AFTER
        while True:
            try:
                await self.sweep(window)
                window = 2 * SWEEP_SECONDS
            except QUERY_FAILED as exc:
                log.warning("push: sweep failed (%r)", exc)
            await asyncio.sleep(SWEEP_SECONDS)

    async def sweep(self, seconds: float) -> None:
        chats = [r["chat_id"] for r in await self.pool.fetch(_RECENT_CHATS, seconds)]
        for start in range(0, len(chats), 1000):
            await self.look(chats[start : start + 1000])

    async def look(self, chat_ids: list[int]) -> None:
        """Notify the members behind in these chats."""
        if not chat_ids:
            return
        behind = await self.pool.fetch(self._behind, chat_ids)
        if not behind:
            return
        online = await self.presence.online({r["user_id"] for r in behind})
        skipped = [r for r in behind if r["silent"] or r["user_id"] in online]
        if skipped:
            await self.pool.execute(
                _SKIP,
                [r["chat_id"] for r in skipped],
                [r["user_id"] for r in skipped],
                [r["last_seq"] for r in skipped],
            )
        for row in behind:
            if not row["silent"] and row["user_id"] not in online:
                await self._consider(row["chat_id"], row["user_id"])

    async def _consider(self, chat_id: int, user_id: uuid.UUID) -> None:
        """Notify one member away from the chat, or not (settings read again, locked):
        either way their pointer moves to the chat's last seq, in the same transaction as
        the deliveries."""
        async with self.pool.acquire() as conn, conn.transaction():
            member = await conn.fetchrow(_MEMBER, chat_id, user_id)
            if member is None:
                return
            since = max(member["notified_seq"], member["read_seq"])
            if member["last_seq"] <= since:
                return  # another process got here first
            await conn.execute(_ADVANCE, chat_id, user_id, member["last_seq"])
            muted = member["mute_until"] is not None and member["mute_until"] > datetime.now(UTC)
            level = member["notify"]
            wanted = level == "all" or (level == "mentions" and member["mentioned"])
            if muted or not wanted:
                return  # considered: these messages will never notify
            newest = await conn.fetchrow(_NEWEST, chat_id, since, user_id)
            if newest is None:
                return  # deleted meanwhile
            unread = {r["chat_id"]: r["unread"] for r in await conn.fetch(_UNREAD, user_id)}
            note = Notification(
                user_uuid=str(user_id),
                chat_id=chat_id,
                chat_type=member["type"],
                chat_name=member["name"],
                message_id=newest["id"],
                sender_uuid=str(newest["sender_id"]),
                sender_name=newest["sender_name"],
                unread_count=unread.get(chat_id, 0),
                unread_total=sum(unread.values()),
                mentioned=member["mentioned"],
                text=newest["text"][:MAX_PUSH_TEXT],
            )
            rows = [
                (WEB_PUSH, s["id"], f"web_push:{s['id']}", _encode(note))
                for s in await conn.fetch(_SUBSCRIPTIONS, user_id)
            ]
            if self.gateway_url:
                gateway_note = (
                    note if self.gateway_text else msgspec.structs.replace(note, text=None)
                )
                # target: the chat, so the per-target bound is per chat, not one for all
                rows.append((GATEWAY, chat_id, f"push_gateway:{user_id}", _encode(gateway_note)))
            await enqueue_many(conn, rows)

    # --- senders (the delivery queue calls them) ------------------------------------------

    async def send_web_push(self, delivery: Delivery) -> Attempt:
        subscription = await self.pool.fetchrow(_SUBSCRIPTION, delivery.target)
        if subscription is None:
            return Attempt(Outcome.DROP, error="subscription removed")
        endpoint = subscription["endpoint"]
        body = encrypt(delivery.body, subscription["p256dh"], subscription["auth"])
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Encoding": "aes128gcm",
            "TTL": str(PUSH_TTL),
            "Urgency": "normal",
            "Authorization": self.vapid.authorization(endpoint),
        }
        attempt, _ = await self.deliveries.post(endpoint, body, headers)
        if attempt.status in (404, 410):
            # The browser unsubscribed, or the subscription expired: never again.
            await self.pool.execute(_DROP_SUBSCRIPTION, delivery.target)
            return Attempt(Outcome.DROP, status=attempt.status, error="subscription gone")
        return attempt

    async def send_to_gateway(self, delivery: Delivery) -> Attempt:
        assert self.gateway_url is not None
        headers = signing.signature_headers(self.gateway_secret, delivery.body, delivery.id)
        attempt, _ = await self.deliveries.post(self.gateway_url, delivery.body, headers)
        return attempt


def decode_notification(body: bytes) -> Notification:
    return _decode(body)
