"""The MessageWriter: every send_message of the process goes through it (group commit).

Sends are not stored one transaction each. The writer collects the sends that arrive
while it is busy and stores them together: one transaction, a constant number of
statements and one commit (one WAL flush) for the whole batch. Each sender still gets
their ack, and every member their new_message, only after that commit. Chats are locked
in id order, so per-chat seq stays gapless and in commit order, and concurrent batches
(other processes) cannot deadlock.

By default a batch starts as soon as the writer can take one: an idle writer stores a
send at once, and a busy one batches what queued meanwhile. With a linger
(CHATD_SEND_LINGER_MS), once a batch holds several sends (the writer is under load),
batches also start at most once per linger: each holds more sends, for less CPU per
message and up to the linger's more latency. A light load is stored at once.

A batch goes through four steps: partition (one send per retry key), persist (the
transaction), announce (new_message and read receipts, in commit order) and settle (each
sender's answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import asyncpg
import msgspec

from chatd import app_hooks
from chatd.app_hooks import AppHooks
from chatd.hub import Bus, publish
from chatd.integrations import (
    BOTS_OF_CHATS,
    BotEvent,
    ChatBot,
    bot_events,
    enqueue_webhooks,
    may_concern_bots,
)
from chatd.metrics import MESSAGES_PERSISTED, SEND_BATCH_SIZE, SEND_SECONDS
from chatd.protocol import (
    FORBIDDEN,
    INVALID,
    Attachment,
    ChatError,
    Created,
    ForwardedFrom,
    Message,
    NewMessage,
    no_such_chat,
)
from chatd.store import (
    ADVANCE_WATERMARKS,
    MESSAGE_COLUMNS,
    RECEIPTS_ONE_BY_ONE,
    advance_read_watermarks,
    message_from_row,
    publish_read_receipts,
)

log = logging.getLogger("chatd.writer")


# Also reads how many bots (and bots with a webhook) each chat has: a chat without any
# costs the batch nothing more (chatd/integrations.py).
# One parameter per chat, their number rounded up to a power of two (the last id
# repeated): a handful of prepared statements, each planned once. With an array of ids
# PostgreSQL replanned nearly every call, as a generic plan must assume ~10 ids and so
# always looked dearer than a custom one (planning cost as much as running it).
@functools.lru_cache
def _lock_chats(params: int) -> str:
    ids = ", ".join(f"${n}::bigint" for n in range(1, params + 1))
    return f"SELECT id, bots, hooks FROM chats WHERE id IN ({ids}) ORDER BY id FOR UPDATE"


async def _lock(conn: asyncpg.Connection, chat_ids: list[int]) -> list[asyncpg.Record]:
    """Lock the chats in id order (so concurrent batches cannot deadlock)."""
    if not chat_ids:
        return []
    params = 1 << (len(chat_ids) - 1).bit_length()
    padded = chat_ids + chat_ids[-1:] * (params - len(chat_ids))
    return await conn.fetch(_lock_chats(params), *padded)


# A retry's original, and whether its sender is still a member of the original's chat
# (read in the same statement: the duplicate path costs no extra query). In a batch this
# runs with the chats locked, so a removal committed before the lock is seen.
# One unique-index probe per key, whatever the planner believes about the table: LIMIT 1
# keeps the lookup a parameterized subquery. As a plain join, the generic plan asyncpg's
# prepared statement caches while `messages` is new (and small) is a hash join over a
# sequential scan, which then costs every batch a scan of the whole table.
_FIND_BY_CLIENT_IDS = f"""
SELECT {MESSAGE_COLUMNS},
       EXISTS (SELECT 1 FROM chat_members cm
               WHERE cm.chat_id = m.chat_id AND cm.user_id = k.sender_id) AS sender_is_member
FROM unnest($1::uuid[], $2::text[]) AS k(sender_id, client_msg_id)
CROSS JOIN LATERAL (
    SELECT * FROM messages
    WHERE messages.sender_id = k.sender_id AND messages.client_msg_id = k.client_msg_id
    LIMIT 1
) m
JOIN chats c ON c.id = m.chat_id
"""

# Runs with the chats locked, so it sees membership as it is now: a sender removed while
# waiting for the lock matches no member row and stores nothing. Nor does a send in a
# private chat where either member blocks the other, nor a retry (its key is stored
# already: the caller then reads its original, which only retries cost). Messages of one
# chat get the next seqs in the order they came; each sender's pointer moves to their
# newest. The retry check is a scalar subquery, so a unique-index probe per send whatever
# the cached generic plan believes about the table (see _FIND_BY_CLIENT_IDS).
_INSERT_MESSAGES = """
WITH input AS (
    SELECT * FROM unnest(
        $1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[],
        $8::text[]
    ) WITH ORDINALITY
        AS t(chat_id, sender_id, text, client_msg_id, reply_to, mentions, forwarded, attached, n)
), accepted AS (
    SELECT input.*, cm.read_seq AS sender_read_seq,
           c.last_seq + row_number() OVER (PARTITION BY input.chat_id ORDER BY input.n) AS seq,
           c.version + row_number() OVER (PARTITION BY input.chat_id ORDER BY input.n) AS version
    FROM input
    JOIN chat_members cm ON cm.chat_id = input.chat_id AND cm.user_id = input.sender_id
    JOIN chats c ON c.id = input.chat_id
    WHERE (input.client_msg_id IS NULL OR (
        SELECT true FROM messages retried
        WHERE retried.sender_id = input.sender_id AND retried.client_msg_id = input.client_msg_id
        LIMIT 1
    ) IS NULL)
    AND (c.type = 'group' OR NOT EXISTS (
        SELECT 1 FROM chat_members other
        JOIN blocks b ON (b.blocker_id = other.user_id AND b.blocked_id = input.sender_id)
                      OR (b.blocker_id = input.sender_id AND b.blocked_id = other.user_id)
        WHERE other.chat_id = input.chat_id AND other.user_id <> input.sender_id
    ))
), bumped AS (
    UPDATE chats c
    SET last_seq = top.seq, version = top.version, activity = nextval('chat_activity_seq')
    FROM (
        SELECT chat_id, max(seq) AS seq, max(version) AS version FROM accepted GROUP BY chat_id
    ) top
    WHERE c.id = top.chat_id
), stored AS (
    INSERT INTO messages (
        chat_id, seq, sender_id, text, client_msg_id, version, reply_to, mentions, forwarded_from,
        attachments
    )
    SELECT chat_id, seq, sender_id, text, client_msg_id, version, reply_to,
           mentions::uuid[], forwarded::jsonb, attached::jsonb
    FROM accepted ORDER BY chat_id, seq
    RETURNING id, chat_id, seq, created_at
), attached AS (
    -- What authorizes downloads of the files, and keeps them (chatd/files.py).
    INSERT INTO message_files (message_id, position, file_id)
    SELECT stored.id, a.position, (a.file ->> 'id')::uuid
    FROM accepted
    JOIN stored ON stored.chat_id = accepted.chat_id AND stored.seq = accepted.seq
    CROSS JOIN jsonb_array_elements(accepted.attached::jsonb) WITH ORDINALITY AS a(file, position)
    WHERE accepted.attached IS NOT NULL
), mentioned AS (
    -- Counted for members only: one removed since the handler checked is not.
    INSERT INTO mentions (user_id, chat_id, seq)
    SELECT DISTINCT mentioned.id, accepted.chat_id, accepted.seq
    FROM accepted CROSS JOIN unnest(accepted.mentions::uuid[]) AS mentioned(id)
    JOIN chat_members member
      ON member.chat_id = accepted.chat_id AND member.user_id = mentioned.id
    WHERE accepted.mentions IS NOT NULL
), senders AS (
    SELECT chat_id, sender_id, max(seq) AS seq, min(sender_read_seq) AS old_read_seq
    FROM accepted GROUP BY 1, 2
), read_own AS (
    UPDATE chat_members cm SET read_seq = senders.seq
    FROM senders
    WHERE cm.chat_id = senders.chat_id AND cm.user_id = senders.sender_id
), holding AS (
    -- Chats whose all-read watermark a sender of the batch was holding back.
    SELECT s.chat_id, c.read_seq AS watermark, min(s.seq) AS lowest_sender,
           array_agg(s.sender_id) AS sender_ids
    FROM senders s JOIN chats c ON c.id = s.chat_id
    GROUP BY s.chat_id, c.read_seq
    HAVING bool_or(s.old_read_seq <= c.read_seq)
), moving AS (
    -- Those whose watermark moves: every other member has read past it too (read_own's
    -- update is not visible here, hence the senders' new pointers apart). A batch that
    -- moves none does not run the watermark statement at all.
    SELECT h.chat_id FROM holding h
    WHERE least(h.lowest_sender, (
        SELECT min(other.read_seq) FROM chat_members other
        WHERE other.chat_id = h.chat_id AND other.user_id <> ALL(h.sender_ids)
    )) > h.watermark
), members AS (
    SELECT chat_id, array_agg(user_id) AS ids FROM chat_members
    WHERE chat_id IN (SELECT chat_id FROM accepted)
    GROUP BY chat_id
)
SELECT accepted.n, accepted.version, stored.id, stored.seq,
       stored.created_at,
       -- Once per chat, not per message: a batch of a 10,000-member group's messages
       -- would otherwise carry 10,000 ids in every row.
       CASE WHEN stored.seq = min(stored.seq) OVER (PARTITION BY stored.chat_id)
            THEN members.ids END AS member_ids,
       accepted.chat_id IN (SELECT chat_id FROM moving) AS watermark_moves
FROM accepted
JOIN stored ON stored.chat_id = accepted.chat_id AND stored.seq = accepted.seq
JOIN members ON members.chat_id = accepted.chat_id
"""

# --- a batch in one round trip -------------------------------------------------------------
#
# In a transaction of its own a batch costs five round trips (BEGIN, lock, insert,
# watermark, COMMIT) however few sends it holds, and below ~1,000 msg/s it holds one or
# two. chatd_store_batch makes it one: called outside any transaction, it is committed as
# its answer comes back. A plain statement could not: its snapshot is taken before it
# locks the chats, while the insert must see membership as it is once they are locked
# (a member removed while the batch waited must not be stored). A VOLATILE function's
# statements each take a new snapshot, so inside it the insert sees what it sees in the
# transaction. It runs the same statements verbatim: the insert inline, the watermark's
# in a wrapper and only for the chats where the insert found it moves, as the
# transaction does.
#
# Its statements are planned generic, once, whatever their parameters: so the chats
# are locked, and their watermarks moved, by one statement each for all of a batch's
# chats. A batch spans many chats under load (every chat of the fan-out's ten), and one
# statement a chat cost ~0.06 ms of PostgreSQL's CPU each (docs/performance.md). Left to
# choose, PostgreSQL would replan them on every call: for an array a generic plan
# assumes ~10 elements, so it always looks dearer than a custom one.
#
# A chat with bots or webhooks needs the writer's Python inside the transaction (which
# bot gets what commits with the message): there the function stores nothing and answers
# one 'bots' row, and the batch is stored the transactional way. Why sends were refused
# is read after the commit, only when some were (see _persist).
#
# The functions live in pg_temp, defined on each connection when first needed: the SQL
# stays beside the code that calls it, and processes of two versions sharing a database
# during an upgrade cannot call each other's. PL/pgSQL keeps each statement's plan for
# the connection's life, as asyncpg's prepared statements do.
_DEFINE_FUNCTIONS = f"""
CREATE OR REPLACE FUNCTION pg_temp.chatd_advance_watermarks(bigint[], integer) RETURNS TABLE (
    chat_id bigint, sender_id uuid, n bigint, last_id bigint, ids bigint[], watermark bigint,
    sender_is_member boolean
) LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY {ADVANCE_WATERMARKS};
END
$fn$;

CREATE OR REPLACE FUNCTION pg_temp.chatd_store_batch(
    bigint[], uuid[], text[], text[], bigint[], text[], text[], text[], integer
) RETURNS TABLE (
    kind text,  -- 'message', 'receipt', or 'bots' (nothing was stored)
    n bigint,  -- a message: its send's number in the batch; a receipt: how many became read
    version bigint, id bigint, seq bigint, created_at timestamptz, member_ids uuid[],
    chat_id bigint, sender_id uuid, last_id bigint, ids bigint[], watermark bigint,
    sender_is_member boolean
) LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $fn$
#variable_conflict use_column
DECLARE
    extras integer;
    r record;
    moving_chats bigint[] := ARRAY[]::bigint[];  -- chats whose all-read watermark moves
BEGIN
    -- First without locks, so that such a batch commits nothing (a row lock taken would
    -- make the commit wait for a WAL flush); then again once the chats are locked.
    IF EXISTS (SELECT FROM chats c WHERE c.id = ANY($1) AND c.bots + c.hooks > 0) THEN
        kind := 'bots';
        RETURN NEXT;
        RETURN;
    END IF;
    -- Locked in id order (the sort is below the locking): concurrent batches cannot deadlock.
    SELECT sum(l.bots + l.hooks) INTO extras FROM (
        SELECT c.bots, c.hooks FROM chats c WHERE c.id = ANY($1) ORDER BY c.id FOR UPDATE
    ) l;
    IF extras > 0 THEN  -- a bot joined meanwhile
        kind := 'bots';
        RETURN NEXT;
        RETURN;
    END IF;
    kind := 'message';
    -- $1..$8 are the insert's own parameters.
    FOR r IN {_INSERT_MESSAGES}
    LOOP
        n := r.n; version := r.version; id := r.id; seq := r.seq;
        created_at := r.created_at; member_ids := r.member_ids;
        RETURN NEXT;
        IF r.watermark_moves AND NOT $1[r.n] = ANY(moving_chats) THEN
            moving_chats := moving_chats || $1[r.n];
        END IF;
    END LOOP;
    IF cardinality(moving_chats) > 0 THEN
        RETURN QUERY SELECT 'receipt', w.n, NULL::bigint, NULL::bigint, NULL::bigint,
            NULL::timestamptz, NULL::uuid[], w.chat_id, w.sender_id, w.last_id, w.ids,
            w.watermark, w.sender_is_member
        FROM pg_temp.chatd_advance_watermarks(moving_chats, $9) w;
    END IF;
END
$fn$;
"""

# No pg_temp schema on the connection yet, or not the functions.
_UNDEFINED = (asyncpg.UndefinedFunctionError, asyncpg.InvalidSchemaNameError)
# No TEMPORARY privilege; no PL/pgSQL; a server that has no temporary functions.
_CANNOT_DEFINE = (
    asyncpg.InsufficientPrivilegeError,
    asyncpg.UndefinedObjectError,
    asyncpg.FeatureNotSupportedError,
)

_STORE_BATCH = (
    "SELECT * FROM pg_temp.chatd_store_batch($1, $2, $3, $4, $5, $6, $7, $8, $9::integer)"
)

_MEMBERS_OF = """
SELECT k.n FROM unnest($1::bigint[], $2::uuid[]) WITH ORDINALITY AS k(chat_id, user_id, n)
WHERE EXISTS (SELECT 1 FROM chat_members cm WHERE cm.chat_id = k.chat_id AND cm.user_id = k.user_id)
"""


def _nothing() -> None:
    pass


MAX_BATCH = 256
# The linger holds sends back only after a batch of at least this many: the writer is
# under load. A lingering writer's batches hold rate x linger sends, so at rates where
# that is fewer (below 800 msg/s with 5 ms) the linger switches itself off again, and a
# steady light load is stored at once: its latency is the unlingered writer's.
LINGER_FROM = 4
# Batches in flight: one in the database and one being announced (in a transaction: one
# being built and one committing). The next batch starts once the one before has its
# seqs (its answer is back, or it reaches its commit), not as soon as a send arrives: so
# no send overtakes one queued before it, and the next takes every send queued meanwhile.
MAX_BATCHES_IN_FLIGHT = 2
# Failures that concern one send of a batch, not all of them: the batch is redone one by one.
# (A foreign key: an attachment collected meanwhile, which the claim's grace makes unlikely.)
_RETRY_ONE_BY_ONE = (
    asyncpg.UniqueViolationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.ForeignKeyViolationError,
)

RetryKey = tuple[uuid.UUID, str]  # (sender, client_msg_id)


@dataclass(slots=True, frozen=True)
class Extras:
    """What a send may carry beside its text (the handler has checked it)."""

    reply_to: int | None = None
    mentions: tuple[uuid.UUID, ...] = ()
    forwarded_from: ForwardedFrom | None = None
    attachments: tuple[Attachment, ...] = ()  # claimed by the sender (handlers/files.py)

    def attachments_json(self) -> str | None:
        """The attachments as the message row keeps them (NULL: none)."""
        return msgspec.json.encode(self.attachments).decode() if self.attachments else None

    def mentions_literal(self) -> str | None:
        """The mentions as a PostgreSQL array literal (NULL: none), for the batch's unnest."""
        return "{" + ",".join(map(str, self.mentions)) + "}" if self.mentions else None


NO_EXTRAS = Extras()


@dataclass(slots=True)
class PendingSend:
    user_id: uuid.UUID
    chat_id: int
    text: str
    client_msg_id: str | None
    extras: Extras
    done: asyncio.Future[Created[Message]]

    @property
    def key(self) -> RetryKey | None:
        return None if self.client_msg_id is None else (self.user_id, self.client_msg_id)


@dataclass(slots=True)
class StoredSend:
    send: PendingSend
    message: Message
    # The chat's members when it was stored: one list, shared by its messages in a batch.
    member_ids: list[uuid.UUID]
    bot_events: list[BotEvent] = field(default_factory=list)  # commands to its bots


@dataclass(slots=True)
class Persisted:
    """What one batch's transaction found and stored."""

    originals: dict[RetryKey, asyncpg.Record] = field(default_factory=dict)  # retries
    stored: list[StoredSend] = field(default_factory=list)  # in commit (id) order
    newly_read: list[asyncpg.Record] = field(default_factory=list)  # read receipts to send
    blocked: set[int] = field(default_factory=set)  # id() of the sends a block refused
    # Why the sends not stored were refused could not be read (after a one-round-trip
    # batch's commit): they get this error, the stored ones their answers all the same.
    unexplained: BaseException | None = None


class MessageWriter:
    """Stores messages in batches (group commit) and fans each one out after its commit."""

    def __init__(self, pool: asyncpg.Pool, bus: Bus, linger: float = 0.0) -> None:
        """`linger`: seconds that must pass between the starts of two batches
        (CHATD_SEND_LINGER_MS). Sends that come sooner wait for the rest of it, and so
        share one commit: less CPU per message under load, up to `linger` more latency.
        Only after a batch of LINGER_FROM sends or more: a light load is stored at once,
        and so is a send after a quiet `linger`, and a full batch."""
        self.pool = pool
        self.bus = bus
        self.linger = linger
        self._last_start = float("-inf")  # loop time
        self._last_size = 0  # sends in the last batch started
        self._hold: asyncio.TimerHandle | None = None  # starts the held sends' batch
        self.app_hooks: AppHooks | None = None  # app webhooks' message.new (the Node sets it)
        self._queue: list[PendingSend] = []
        self._running: set[asyncio.Task[None]] = set()
        self._building: list[PendingSend] | None = None  # the batch not yet committing
        self._at_once = True  # batches in one round trip (False: no temporary functions)
        # The connection the last batch left for the next (see _connection); only where
        # the pool can spare one beyond the batches in flight.
        self._kept: asyncpg.Connection | None = None
        self._keeps = pool.get_max_size() > MAX_BATCHES_IN_FLIGHT
        # Told the chats of each committed batch, in memory (the push notifier): no query.
        self.committed: Callable[[set[int]], None] | None = None

    async def store(
        self,
        user_id: uuid.UUID,
        chat_id: int,
        text: str,
        client_msg_id: str | None,
        extras: Extras = NO_EXTRAS,
    ) -> Created[Message]:
        """Store a message; `created` is False for a retry answered with its original."""
        done = asyncio.get_running_loop().create_future()
        self._queue.append(PendingSend(user_id, chat_id, text, client_msg_id, extras, done))
        self._start_drain()
        return await done

    def _start_drain(self) -> None:
        """Start a batch now, unless one is being built (it, or the next, will take the
        queue) or enough are in flight, or the linger holds it. An idle writer stores a
        send at once."""
        if (
            self._queue
            and self._building is None
            and len(self._running) < MAX_BATCHES_IN_FLIGHT
            and not self._held()
        ):
            # A fresh context: the batch serves many sockets, not the one that started it.
            task = asyncio.create_task(self._drain(), context=contextvars.Context())
            self._running.add(task)

    def _held(self) -> bool:
        """Whether the queue waits out the linger (the last batch held LINGER_FROM sends
        or more and started less than `linger` ago, and this is not a full batch yet);
        if so, a timer starts it on time."""
        if self.linger <= 0 or len(self._queue) >= MAX_BATCH or self._last_size < LINGER_FROM:
            return False
        loop = asyncio.get_running_loop()
        left = self._last_start + self.linger - loop.time()
        if left <= 0:
            return False
        if self._hold is None:  # in a fresh context, as a drain task (not a socket's)
            self._hold = loop.call_later(left, self._release, context=contextvars.Context())
        return True

    def _release(self) -> None:
        self._hold = None
        self._start_drain()

    def _built(self, batch: list[PendingSend]) -> None:
        """`batch` reached its commit (or failed): the next may start building."""
        if self._building is batch:
            self._building = None
            self._start_drain()

    @property
    def busy(self) -> bool:
        return bool(self._running or self._queue)

    def stop_lingering(self) -> None:
        """Shutdown: from now on store every send at once, those held first."""
        self.linger = 0.0
        if self._hold is not None:
            self._hold.cancel()
            self._release()

    async def wait_idle(self, timeout: float) -> None:
        """Let the batches in flight, and those queued behind them, finish (shutdown):
        their acks and events go out."""
        self.stop_lingering()
        deadline = asyncio.get_running_loop().time() + timeout
        while self._running:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await asyncio.wait(list(self._running), timeout=left)

    async def original(
        self, user_id: uuid.UUID, chat_id: int, client_msg_id: str | None
    ) -> Message | None:
        """The message already stored for this retry, answered (or refused) as `store`
        would; None when there is none."""
        if client_msg_id is None:
            return None
        rows = await self.pool.fetch(_FIND_BY_CLIENT_IDS, [user_id], [client_msg_id])
        return answer_for_original(rows[0], chat_id) if rows else None

    async def close(self) -> None:
        """Give the connection kept between batches back to the pool, and keep none from
        now on: call it before closing the pool, which waits for every connection."""
        self._keeps = False
        conn, self._kept = self._kept, None
        if conn is not None:
            await self.pool.release(conn)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection for one batch: the one the last batch kept, else the pool's.

        Handing a connection back to asyncpg's pool costs a task and a timer, and the
        loop steps they take: ~0.1 ms of CPU a batch on a 2-core guest
        (docs/performance.md). So a batch that ends well keeps its connection for the
        next. One that fails hands it back, and a kept connection found closed (the
        database restarted) is handed back unused: the pool replaces either, as it
        would have anyway.
        """
        conn, self._kept = self._kept, None
        if conn is not None and _unusable(conn):
            await self.pool.release(conn)  # nothing to do when the pool took it back itself
            conn = None
        if conn is None:
            conn = await self.pool.acquire()
        try:
            yield conn
        except BaseException:
            await self.pool.release(conn)
            raise
        if self._keeps and self._kept is None and not _unusable(conn):
            self._kept = conn
        else:
            await self.pool.release(conn)

    async def _drain(self) -> None:
        try:
            while self._queue and self._building is None and not self._held():
                self._last_start = asyncio.get_running_loop().time()
                if self._hold is not None:  # a full batch goes before its linger is over
                    self._hold.cancel()
                    self._hold = None
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                self._building = batch
                self._last_size = len(batch)
                try:
                    await self._store_batch(batch, functools.partial(self._built, batch))
                except _RETRY_ONE_BY_ONE:
                    # A client_msg_id committed meanwhile by another process (or a deadlock
                    # with one): redo one by one, so only the send concerned is affected.
                    for send in batch:
                        await self._store_alone(send)
                except Exception as exc:
                    for send in batch:
                        _settle(send, exception=exc)
                finally:
                    self._built(batch)
                    requeued = {id(send) for send in self._queue}
                    for send in batch:  # never leave a sender waiting
                        if id(send) not in requeued:
                            _settle(send, exception=RuntimeError("send was not settled"))
        finally:
            # No await between the empty-queue check and this: a store() that comes after
            # sees the right count and starts a new drain.
            self._running.discard(asyncio.current_task())  # type: ignore[arg-type]

    async def _store_alone(self, send: PendingSend) -> None:
        try:
            await self._store_batch([send])
        except _RETRY_ONE_BY_ONE as exc:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(_FIND_BY_CLIENT_IDS, [send.user_id], [send.client_msg_id])
            _settle_original(send, rows[0]) if rows else _settle(send, exception=exc)
        except Exception as exc:
            _settle(send, exception=exc)

    async def _store_batch(
        self, batch: list[PendingSend], committing: Callable[[], None] = _nothing
    ) -> None:
        started = time.perf_counter()
        unique, copies = partition(batch)
        persisted = await self._persist(unique, committing)
        MESSAGES_PERSISTED.inc(len(persisted.stored))
        SEND_BATCH_SIZE.observe(len(batch))
        SEND_SECONDS.observe(time.perf_counter() - started)
        await self._announce(persisted)
        self._settle(unique, copies, persisted)

    async def _persist(
        self, sends: list[PendingSend], committing: Callable[[], None] = _nothing
    ) -> Persisted:
        """Store the sends: in one round trip where it can (chatd_store_batch), else in a
        transaction of its own. `committing` is called once the batch has its seqs (the
        next batch may start then)."""
        async with self._connection() as conn:
            rows = None
            if self._at_once and not (self.app_hooks is not None and self.app_hooks.active):
                rows = await self._store_at_once(conn, sends)
            if rows is None:
                return await self._persist_in_transaction(conn, sends, committing)
            messages = [row for row in rows if row["kind"] == "message"]
            done = Persisted(newly_read=[row for row in rows if row["kind"] == "receipt"])
            _add_stored(done, sends, messages)
            if len(messages) < len(sends):
                # After the commit, so without the locks: a membership change in between
                # can change which refusal a send gets (not_found or forbidden), never
                # whether it was stored. Retries' originals are committed, found as ever.
                try:
                    await self._not_stored(conn, sends, messages, done)
                except Exception as exc:  # the stored messages are still announced
                    done.unexplained = exc
            # Only now: the batch's messages are announced before the next batch's.
            committing()
            return done

    async def _store_at_once(
        self, conn: asyncpg.Connection, sends: list[PendingSend]
    ) -> list[asyncpg.Record] | None:
        """chatd_store_batch's rows, committed; None when nothing was stored because the
        batch needs a transaction (a chat with bots), or the function cannot be defined."""
        args = (*_batch_columns(sends), RECEIPTS_ONE_BY_ONE)
        try:
            rows = await conn.fetch(_STORE_BATCH, *args)
        except _UNDEFINED:  # this connection's first batch
            try:
                await conn.execute(_DEFINE_FUNCTIONS)
                rows = await conn.fetch(_STORE_BATCH, *args)
            except _CANNOT_DEFINE as exc:
                log.warning(
                    "the send batch's function cannot be defined (%s; chatd's role needs "
                    "TEMPORARY on the database): each send batch takes five round trips, "
                    "not one",
                    exc,
                )
                self._at_once = False
                return None
            except _UNDEFINED:
                # Defined on another server connection than the call reached: a proxy
                # pooling transactions. Each of its connections gets them on a first batch.
                return None
        return None if rows and rows[0]["kind"] == "bots" else rows

    async def _persist_in_transaction(
        self,
        conn: asyncpg.Connection,
        sends: list[PendingSend],
        committing: Callable[[], None],
    ) -> Persisted:
        """One transaction: lock the chats, store the sends, find retries' originals
        (only when something was not stored), move the all-read watermarks the new
        messages' senders were holding back, and queue what bots and app hooks get.
        `committing` is called just before the commit."""
        done = Persisted()
        async with conn.transaction():
            chat_ids = sorted({send.chat_id for send in sends})
            locked = await _lock(conn, chat_ids)
            with_bots = {r["id"]: (r["bots"], r["hooks"]) for r in locked if r["bots"]}
            rows = await conn.fetch(_INSERT_MESSAGES, *_batch_columns(sends))
            if len(rows) < len(sends):
                await self._not_stored(conn, sends, rows, done)
            moving = {sends[row["n"] - 1].chat_id for row in rows if row["watermark_moves"]}
            if moving:
                done.newly_read = await advance_read_watermarks(conn, sorted(moving))
            _add_stored(done, sends, rows)
            if with_bots:
                await self._to_bots(conn, done.stored, with_bots)
            if self.app_hooks is not None and self.app_hooks.active:  # else: no cost at all
                await app_hooks.enqueue_many(
                    conn,
                    self.app_hooks,
                    "message.new",
                    [(s.message.chat_id, s.message) for s in done.stored],
                )
            committing()
        return done

    @staticmethod
    async def _not_stored(
        conn: asyncpg.Connection,
        sends: list[PendingSend],
        rows: list[asyncpg.Record],
        done: Persisted,
    ) -> None:
        """Why some sends were not stored: a retry (its original is answered), not a
        member (not_found), or a member of a private chat with a block between the two
        (forbidden). Only these cost the queries."""
        stored_n = {row["n"] for row in rows}
        refused = [send for n, send in enumerate(sends, 1) if n not in stored_n]
        keys = [send.key for send in refused if send.key is not None]
        if keys:
            found = await conn.fetch(
                _FIND_BY_CLIENT_IDS, [k[0] for k in keys], [k[1] for k in keys]
            )
            done.originals = {(r["sender_id"], r["client_msg_id"]): r for r in found}
            refused = [send for send in refused if send.key not in done.originals]
        if refused:
            members = await conn.fetch(
                _MEMBERS_OF, [s.chat_id for s in refused], [s.user_id for s in refused]
            )
            done.blocked = {id(refused[r["n"] - 1]) for r in members}

    async def _to_bots(
        self,
        conn: asyncpg.Connection,
        stored: list[StoredSend],
        with_bots: dict[int, tuple[int, int]],
    ) -> None:
        """The batch's messages in chats with bots: which bot gets what (in the
        transaction, so a webhook's delivery commits with its message)."""
        concerned = [
            s
            for s in stored
            if s.message.chat_id in with_bots
            and may_concern_bots(s.message.text, *with_bots[s.message.chat_id])
        ]
        if not concerned:
            return
        bots: dict[int, list[ChatBot]] = {}
        chat_ids = sorted({s.message.chat_id for s in concerned})
        for row in await conn.fetch(BOTS_OF_CHATS, chat_ids):
            bots.setdefault(row["chat_id"], []).append(ChatBot.from_row(row))
        for s in concerned:
            s.bot_events = bot_events(s.message, bots.get(s.message.chat_id, []))
        # One statement for the batch, in message order (each bot's order per chat).
        await enqueue_webhooks(conn, [e for s in concerned for e in s.bot_events])

    async def _announce(self, persisted: Persisted) -> None:
        """Committed: tell everyone, in the order the messages were stored."""
        for stored in persisted.stored:
            await publish(self.bus, stored.member_ids, NewMessage(stored.message))
            for sent in stored.bot_events:
                if sent.socket:
                    await publish(self.bus, [sent.bot.user_id], sent.event)
        await publish_read_receipts(self.bus, persisted.newly_read)
        if self.committed is not None and persisted.stored:
            self.committed({stored.message.chat_id for stored in persisted.stored})

    def _settle(
        self, unique: list[PendingSend], copies: list[PendingSend], persisted: Persisted
    ) -> None:
        """Answer every sender; a copy whose twin stored nothing is queued again."""
        messages = {id(stored.send): stored.message for stored in persisted.stored}
        for send in unique:
            original = persisted.originals.get(send.key) if send.key else None
            if original is not None:
                _settle_original(send, original)
            elif id(send) in messages:
                _settle(send, result=Created(messages[id(send)]))
            elif id(send) in persisted.blocked:
                _settle(send, exception=_blocked())
            elif persisted.unexplained is not None:
                _settle(send, exception=persisted.unexplained)
            else:
                _settle(send, exception=no_such_chat())
        stored_by_key = {
            send.key: messages[id(send)]
            for send in unique
            if send.key is not None and id(send) in messages
        }
        for copy in copies:  # each has a key: partition copies only keyed sends
            original = persisted.originals.get(copy.key) if copy.key else None
            message = stored_by_key.get(copy.key)
            if original is not None:
                _settle_original(copy, original)
            elif message is None:  # its twin stored nothing (not a member there): on its own
                self._queue.append(copy)
            elif message.chat_id == copy.chat_id:
                _settle(copy, result=Created(message, created=False))
            else:
                _settle(copy, exception=_reused_elsewhere())


def _unusable(conn: asyncpg.Connection) -> bool:
    """Whether a pooled connection is no use to the next batch: closed (asyncpg's pool
    then takes it back by itself), or left in a transaction."""
    try:
        return conn.is_closed() or conn.is_in_transaction()
    except asyncpg.InterfaceError:  # taken back by the pool already
        return True


def partition(batch: list[PendingSend]) -> tuple[list[PendingSend], list[PendingSend]]:
    """Split a batch into the sends to store and the copies of a retry key among them.

    One send per (sender, client_msg_id) is stored; a retry queued next to its original
    is answered from what the batch stored for that key.
    """
    seen: set[RetryKey] = set()
    unique: list[PendingSend] = []
    copies: list[PendingSend] = []
    for send in batch:
        key = send.key
        if key is None or key not in seen:
            unique.append(send)
            if key is not None:
                seen.add(key)
        else:
            copies.append(send)
    return unique, copies


def _batch_columns(sends: list[PendingSend]) -> tuple[list[object], ...]:
    """The sends as the insert statement's eight arrays ($1..$8)."""
    return (
        [s.chat_id for s in sends],
        [s.user_id for s in sends],
        [s.text for s in sends],
        [s.client_msg_id for s in sends],
        [s.extras.reply_to for s in sends],
        [s.extras.mentions_literal() for s in sends],
        [_forwarded_json(s.extras.forwarded_from) for s in sends],
        [s.extras.attachments_json() for s in sends],
    )


def _add_stored(done: Persisted, sends: list[PendingSend], rows: list[asyncpg.Record]) -> None:
    """The stored messages (the insert's `rows`), in commit order, into `done.stored`.

    A new message is read when this batch's receipts moved its chat's watermark over it
    (its seq is above every watermark the chat had before).
    """
    watermarks = {row["chat_id"]: row["watermark"] for row in done.newly_read}
    members_of = {
        sends[row["n"] - 1].chat_id: row["member_ids"]
        for row in rows
        if row["member_ids"] is not None
    }
    for row in sorted(rows, key=lambda r: r["id"]):
        send = sends[row["n"] - 1]
        message = Message(
            id=row["id"],
            chat_id=send.chat_id,
            seq=row["seq"],
            sender_uuid=str(send.user_id),
            text=send.text,
            timestamp=row["created_at"],
            read_status="read" if row["seq"] <= watermarks.get(send.chat_id, 0) else "unread",
            client_msg_id=send.client_msg_id,
            edited_at=None,
            deleted=False,
            reply_to=send.extras.reply_to,
            mentions=[str(user_id) for user_id in send.extras.mentions],
            forwarded_from=send.extras.forwarded_from,
            reactions=[],
            version=row["version"],
            attachments=list(send.extras.attachments),
        )
        done.stored.append(StoredSend(send, message, members_of[send.chat_id]))


def _forwarded_json(forwarded: ForwardedFrom | None) -> str | None:
    return None if forwarded is None else msgspec.json.encode(forwarded).decode()


def _blocked() -> ChatError:
    return ChatError(FORBIDDEN, "this chat is blocked: one of you blocks the other")


def _reused_elsewhere() -> ChatError:
    return ChatError(INVALID, "client_msg_id was already used in another chat")


def _settle(
    send: PendingSend,
    result: Created[Message] | None = None,
    exception: BaseException | None = None,
) -> None:
    if send.done.done():  # the sender went away (its socket closed)
        return
    if exception is not None:
        send.done.set_exception(exception)
    else:
        send.done.set_result(result)


def _settle_original(send: PendingSend, row: asyncpg.Record) -> None:
    try:
        _settle(send, result=Created(answer_for_original(row, send.chat_id), created=False))
    except ChatError as exc:
        _settle(send, exception=exc)


def answer_for_original(row: asyncpg.Record, chat_id: int) -> Message:
    """What a retry gets: its original (a _FIND_BY_CLIENT_IDS row), or the refusal.

    A sender who is no longer a member of the chat gets `not_found`, as any outsider
    does: a retry must not show them the message's read status, or that the chat exists.
    """
    if row["chat_id"] != chat_id:
        raise _reused_elsewhere()
    if not row["sender_is_member"]:
        raise no_such_chat()
    return message_from_row(row)
