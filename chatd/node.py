"""The Node: one chatd process, and everything its handlers and sockets share.

A Node owns the settings, the database pool, the hub of this process's sockets, the bus
that carries events between processes, the MessageWriter, the rate limits and the typing
gate. The app builds one at start-up and keeps it as `app.state.node`; handlers reach it
through their Context, sockets through the app.

    node = Node(settings, database_url)   # in a running loop; nothing connected yet
    await node.start()                    # the pool, the bus, the writers' watchdog
    ...
    await node.drain(deadline)            # shutdown: no action in flight any more
    await node.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterable

import asyncpg

from chatd import metrics
from chatd.app_hooks import AppHooks
from chatd.config import Settings
from chatd.db import create_pool
from chatd.deliveries import DeliveryQueue
from chatd.files import FileCollector, Files, open_blob_store
from chatd.hooks import BeforeSend
from chatd.hub import Bus, Hub, LocalBus, publish
from chatd.identity import Identities
from chatd.presence import PresenceTracker
from chatd.protocol import Event, Readiness
from chatd.push import PushNotifier, stored_vapid
from chatd.ratelimit import Limits, TypingGate
from chatd.redis_bus import RedisBus
from chatd.revocations import Revocation, RevocationListener, SessionCache
from chatd.tokens import ApiTokens
from chatd.writer import MessageWriter

# How often shutdown looks for sockets still in an action (one poll for all of them).
DRAIN_POLL_SECONDS = 0.02


class Node:
    def __init__(self, settings: Settings, database_url: str) -> None:
        self.settings = settings
        self.pool: asyncpg.Pool = create_pool(
            database_url, settings.db_pool_size, settings.db_timeout
        )
        self.sessions = SessionCache(self.pool)
        self.tokens = ApiTokens(self.pool, settings.token_usage_interval)
        self.hub = Hub(settings.max_sockets_per_user, self.sessions)
        self.origin = uuid.uuid4().hex  # names this process's revocations on PostgreSQL
        self.revocations = RevocationListener(
            database_url, self.origin, self.hub.revoke, self.sessions
        )
        self._listener: asyncio.Task[None] | None = None
        self._pool_watch: asyncio.Task[None] | None = None
        self.bus: Bus = (
            RedisBus(self.hub, settings.redis_url) if settings.redis_url else LocalBus(self.hub)
        )
        self.writer = MessageWriter(self.pool, self.bus, settings.send_linger_ms / 1000)
        store = open_blob_store(settings.data_dir, settings.files_url, settings.s3_endpoint_url)
        self.files = Files(store, settings.data_dir / "files" / "tmp")
        self.collector = FileCollector(
            self.pool,
            store,
            upload_ttl=settings.upload_ttl,
            grace=settings.file_grace,
            interval=settings.file_gc_interval,
        )
        self.presence = PresenceTracker(
            self.pool, self.bus, settings.redis_url, settings.presence_group_limit
        )
        self.deliveries = DeliveryQueue(
            self.pool,
            database_url,
            concurrency=settings.delivery_concurrency,
            timeout=settings.delivery_timeout,
            retry_base=settings.delivery_retry_ms / 1000,
            max_attempts=settings.delivery_max_attempts,
            max_pending=settings.delivery_max_pending,
            retention=settings.delivery_retention,
            allow_private=settings.outbound_allow_private,
        )
        self.push = PushNotifier(
            self.pool,
            self.presence,
            self.deliveries,
            stored_vapid(settings.data_dir, settings.vapid_private_key, settings.vapid_subject),
            settings.push_gateway_url,
            (settings.push_gateway_secret or "").encode(),
            settings.push_gateway_text,
        )
        self.writer.committed = self.push.committed  # in memory: no I/O on the send path
        # The app's own JWTs as access tokens (chatd/identity.py), when configured.
        self.identity = (
            Identities(settings, self.pool, self.sessions, self.publish)
            if Identities.configured(settings)
            else None
        )
        # App webhooks (chatd/app_hooks.py): whether any exists, and their sender.
        self.app_hooks = AppHooks(self.pool, self.deliveries)
        self.writer.app_hooks = self.app_hooks
        # The before-send hook (chatd/hooks.py); None: sends pay nothing for it.
        self.before_send = BeforeSend(settings) if settings.before_send_url else None
        self.limits = Limits(settings)
        self.typing_gate = TypingGate(remote=self.limits.remote)
        self._watchdog: asyncio.Task[None] | None = None
        self._drained: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Check the file store; connect to the database and the bus; start the
        stalled-writer watchdog.

        When one cannot be reached, what was opened is closed again and the error raised.
        """
        try:
            await self.files.store.check()  # a wrong bucket or key fails the start, not uploads
            await self.pool
        except BaseException:
            await self.limits.close()
            raise
        self._pool_watch = asyncio.create_task(metrics.watch_pool(self.pool))
        try:
            await self.bus.start()  # closes itself when it fails
        except BaseException:
            await self.limits.close()
            await self.pool.close()
            raise
        self._watchdog = asyncio.create_task(self.hub.watch_writers())
        self._listener = asyncio.create_task(self.revocations.run())
        self.collector.start()
        self.tokens.start()
        self.app_hooks.start()
        self.presence.start()
        self.deliveries.start()
        self.push.start()
        if self.identity is not None:
            self.identity.start()
        # Serve once revocations are heard (a session is trusted from memory only then).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.revocations.listening.wait(), 10)

    async def stop(self) -> None:
        """Let the send batches in flight commit and fan out, then close everything."""
        for task in (self._watchdog, self._listener, self._pool_watch):
            if task is not None:
                task.cancel()
        await self.collector.stop()
        await self.presence.stop()
        await self.push.stop()
        await self.app_hooks.stop()
        await self.deliveries.stop()
        if self.identity is not None:
            await self.identity.close()
        if self.before_send is not None:
            await self.before_send.close()
        await self.writer.wait_idle(timeout=5)
        await self.writer.close()
        await self.tokens.stop()
        await self.bus.close()
        await self.limits.close()
        await self.pool.close()
        await self.files.store.close()

    async def publish(self, user_ids: Iterable[uuid.UUID], event: Event) -> None:
        """Send `event` to every socket of these users, on every node (encoded once)."""
        await publish(self.bus, user_ids, event)

    async def revoke(self, revocation: Revocation) -> None:
        """Sessions were revoked (committed): refuse their tokens and close their sockets,
        on every node."""
        await self.bus.revoke(revocation)
        # Also through PostgreSQL, which every node and the `chatd admin` command reach,
        # with or without Redis.
        await self.pool.execute(
            "SELECT pg_notify($1, $2)",
            RevocationListener.CHANNEL,
            RevocationListener.payload(self.origin, revocation),
        )

    async def drain(self, deadline: float) -> None:
        """Shutdown's barrier: return once no socket here can start an action and no send
        batch is in flight (so every ack and event they cause is queued), or at
        `deadline` (loop time). Every socket waits on the same poll, never on one each.
        """
        loop = asyncio.get_running_loop()
        if self._drained is None:
            self.writer.stop_lingering()  # a held send would only delay the shutdown
            self._drained = asyncio.ensure_future(self._poll_drained(deadline))
        await asyncio.wait((self._drained,), timeout=max(0.0, deadline - loop.time()))

    async def _poll_drained(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while self.writer.busy or self.hub.reading():
            if loop.time() >= deadline:
                return
            await asyncio.sleep(DRAIN_POLL_SECONDS)

    async def readiness(self) -> Readiness:
        """Whether this node can serve: the database answers, and Redis when configured."""
        try:
            await asyncio.wait_for(self.pool.fetchval("SELECT 1"), 2)
            database = "ok"
        except Exception as exc:
            database = f"unavailable: {exc!r}"
        redis = "not configured"
        if self.settings.redis_url:
            redis = await self.bus.problem() or "ok"
        ready = database == "ok" and redis in ("ok", "not configured")
        return Readiness("ready" if ready else "not ready", database=database, redis=redis)
