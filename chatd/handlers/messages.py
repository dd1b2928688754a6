"""Messages: send_message, get_message, and sync (catching up after a reconnect)."""

from __future__ import annotations

import asyncio
import contextvars
import time
import uuid
from dataclasses import dataclass

import asyncpg

from chatd.handlers.base import (
    FRAME_BUDGET_BYTES,
    MESSAGE_COLUMNS,
    Context,
    fit_in_frame,
    message_from_row,
    no_such_chat,
    rate_limited,
)
from chatd.handlers.reads import advance_read_watermarks, publish_read_receipts
from chatd.hub import Bus, Outbound
from chatd.metrics import MESSAGES_PERSISTED, SEND_BATCH_SIZE, SEND_SECONDS
from chatd.protocol import (
    INVALID,
    MAX_TEXT_CHARS,
    NOT_FOUND,
    ChatError,
    GetMessage,
    Message,
    NewMessage,
    SendMessage,
    Sync,
    SyncedChat,
    SyncResult,
    clean_text,
    encode_text,
)

# --- send_message: group commit ---------------------------------------------------------
#
# Sends are not stored one transaction each. A process's MessageWriter collects the sends
# that arrive while it is busy and stores them together: one transaction, a constant
# number of statements and one commit (one WAL flush) for the whole batch. Each sender
# still gets their ack, and every member their new_message, only after that commit.
# Chats are locked in id order, so per-chat seq stays gapless and in commit order, and
# concurrent batches (other processes) cannot deadlock.

_LOCK_CHATS = "SELECT id, read_seq FROM chats WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE"

# A retry's original, and whether its sender is still a member of the original's chat
# (read in the same statement: the duplicate path costs no extra query). In a batch this
# runs with the chats locked, so a removal committed before the lock is seen.
_FIND_BY_CLIENT_IDS = f"""
SELECT {MESSAGE_COLUMNS},
       EXISTS (SELECT 1 FROM chat_members cm
               WHERE cm.chat_id = m.chat_id AND cm.user_id = k.sender_id) AS sender_is_member
FROM unnest($1::uuid[], $2::text[]) AS k(sender_id, client_msg_id)
JOIN messages m ON m.sender_id = k.sender_id AND m.client_msg_id = k.client_msg_id
JOIN chats c ON c.id = m.chat_id
"""

# Runs with the chats locked, so it sees membership as it is now: a sender removed while
# waiting for the lock matches no member row and stores nothing. Messages of one chat get
# the next seqs in the order they came; each sender's pointer moves to their newest.
_INSERT_MESSAGES = """
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[]) WITH ORDINALITY
        AS t(chat_id, sender_id, text, client_msg_id, n)
), accepted AS (
    SELECT input.*, cm.read_seq AS sender_read_seq,
           c.last_seq + row_number() OVER (PARTITION BY input.chat_id ORDER BY input.n) AS seq
    FROM input
    JOIN chat_members cm ON cm.chat_id = input.chat_id AND cm.user_id = input.sender_id
    JOIN chats c ON c.id = input.chat_id
), bumped AS (
    UPDATE chats c SET last_seq = top.seq, activity = nextval('chat_activity_seq')
    FROM (SELECT chat_id, max(seq) AS seq FROM accepted GROUP BY chat_id) top
    WHERE c.id = top.chat_id
), stored AS (
    INSERT INTO messages (chat_id, seq, sender_id, text, client_msg_id)
    SELECT chat_id, seq, sender_id, text, client_msg_id FROM accepted ORDER BY chat_id, seq
    RETURNING id, chat_id, seq, created_at
), read_own AS (
    UPDATE chat_members cm SET read_seq = mine.seq
    FROM (SELECT chat_id, sender_id, max(seq) AS seq FROM accepted GROUP BY 1, 2) mine
    WHERE cm.chat_id = mine.chat_id AND cm.user_id = mine.sender_id
), members AS (
    SELECT chat_id, array_agg(user_id) AS ids FROM chat_members
    WHERE chat_id IN (SELECT chat_id FROM accepted)
    GROUP BY chat_id
)
SELECT accepted.n, accepted.sender_read_seq, stored.id, stored.seq, stored.created_at,
       members.ids AS member_ids
FROM accepted
JOIN stored ON stored.chat_id = accepted.chat_id AND stored.seq = accepted.seq
JOIN members ON members.chat_id = accepted.chat_id
"""

MAX_BATCH = 256
MAX_BATCHES_IN_FLIGHT = 2
# Failures that concern one send of a batch, not all of them: the batch is redone one by one.
_RETRY_ONE_BY_ONE = (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError)


@dataclass(slots=True)
class PendingSend:
    user_id: uuid.UUID
    chat_id: int
    text: str
    client_msg_id: str | None
    done: asyncio.Future[tuple[Message, bool]]


class MessageWriter:
    """Stores messages in batches (group commit) and fans each one out after its commit."""

    def __init__(self, pool: asyncpg.Pool, bus: Bus) -> None:
        self.pool = pool
        self.bus = bus
        self._queue: list[PendingSend] = []
        self._running: set[asyncio.Task[None]] = set()

    async def store(
        self, user_id: uuid.UUID, chat_id: int, text: str, client_msg_id: str | None
    ) -> tuple[Message, bool]:
        """Store a message; return it and whether it is new (False: a retry's original)."""
        done = asyncio.get_running_loop().create_future()
        self._queue.append(PendingSend(user_id, chat_id, text, client_msg_id, done))
        if len(self._running) < MAX_BATCHES_IN_FLIGHT:
            # A fresh context: the batch serves many sockets, not the one that started it.
            task = asyncio.create_task(self._drain(), context=contextvars.Context())
            self._running.add(task)
        return await done

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                try:
                    await self._store_batch(batch)
                except _RETRY_ONE_BY_ONE:
                    # A client_msg_id committed meanwhile by another process (or a deadlock
                    # with one): redo one by one, so only the send concerned is affected.
                    for send in batch:
                        await self._store_alone(send)
                except Exception as exc:
                    for send in batch:
                        _settle(send, exception=exc)
                finally:
                    requeued = {id(send) for send in self._queue}
                    for send in batch:  # never leave a sender waiting
                        if id(send) not in requeued:
                            _settle(send, exception=RuntimeError("send was not settled"))
        finally:
            # No await between the empty-queue check and this: a store() that comes after
            # sees the right count and starts a new drain.
            self._running.discard(asyncio.current_task())  # type: ignore[arg-type]

    @property
    def busy(self) -> bool:
        return bool(self._running)

    async def wait_idle(self, timeout: float) -> None:
        """Let the batches in flight finish (shutdown): their acks and events go out."""
        if self._running:
            await asyncio.wait(list(self._running), timeout=timeout)

    async def original(
        self, user_id: uuid.UUID, chat_id: int, client_msg_id: str | None
    ) -> Message | None:
        """The message already stored for this retry, answered (or refused) as `store`
        would; None when there is none."""
        if client_msg_id is None:
            return None
        rows = await self.pool.fetch(_FIND_BY_CLIENT_IDS, [user_id], [client_msg_id])
        return answer_for_original(rows[0], chat_id) if rows else None

    async def _store_alone(self, send: PendingSend) -> None:
        try:
            await self._store_batch([send])
        except _RETRY_ONE_BY_ONE as exc:
            async with self.pool.acquire() as conn:
                rows = await conn.fetch(_FIND_BY_CLIENT_IDS, [send.user_id], [send.client_msg_id])
            _settle_original(send, rows[0]) if rows else _settle(send, exception=exc)
        except Exception as exc:
            _settle(send, exception=exc)

    async def _store_batch(self, batch: list[PendingSend]) -> None:
        started = time.perf_counter()
        # One send per (sender, client_msg_id) is stored; a retry queued next to its
        # original is answered from what the batch stored for that key.
        first: dict[tuple[uuid.UUID, str], PendingSend] = {}
        copies: list[PendingSend] = []
        unique: list[PendingSend] = []
        for send in batch:
            if send.client_msg_id is None:
                unique.append(send)
                continue
            key = (send.user_id, send.client_msg_id)
            if key in first:
                copies.append(send)
            else:
                first[key] = send
                unique.append(send)

        chat_ids = sorted({send.chat_id for send in unique})
        async with self.pool.acquire() as conn, conn.transaction():
            watermarks = {r["id"]: r["read_seq"] for r in await conn.fetch(_LOCK_CHATS, chat_ids)}
            originals = {}
            if first:
                found = await conn.fetch(
                    _FIND_BY_CLIENT_IDS, [k[0] for k in first], [k[1] for k in first]
                )
                originals = {(row["sender_id"], row["client_msg_id"]): row for row in found}
            new = [s for s in unique if (s.user_id, s.client_msg_id) not in originals]
            stored = await conn.fetch(
                _INSERT_MESSAGES,
                [s.chat_id for s in new],
                [s.user_id for s in new],
                [s.text for s in new],
                [s.client_msg_id for s in new],
            )
            # Only senders who were holding a chat's watermark back can move it.
            holders = set()
            for row in stored:
                chat_id = new[row["n"] - 1].chat_id
                if row["sender_read_seq"] <= watermarks[chat_id]:
                    holders.add(chat_id)
            newly_read = await advance_read_watermarks(conn, sorted(holders)) if holders else []

        # Committed: now tell everyone, in the order the messages were stored.
        MESSAGES_PERSISTED.inc(len(stored))
        SEND_BATCH_SIZE.observe(len(batch))
        SEND_SECONDS.observe(time.perf_counter() - started)
        for row in newly_read:
            watermarks[row["chat_id"]] = row["watermark"]
        results: dict[int, tuple[Message, bool]] = {}
        for row in sorted(stored, key=lambda r: r["id"]):
            send = new[row["n"] - 1]
            message = Message(
                id=row["id"],
                chat_id=send.chat_id,
                seq=row["seq"],
                sender_uuid=str(send.user_id),
                text=send.text,
                timestamp=row["created_at"],
                read_status="read" if row["seq"] <= watermarks[send.chat_id] else "unread",
                client_msg_id=send.client_msg_id,
            )
            event = Outbound(encode_text(NewMessage(message)), message.id)
            await self.bus.publish(row["member_ids"], event)
            results[id(send)] = (message, True)
        await publish_read_receipts(self.bus, newly_read)

        for send in unique:
            original = originals.get((send.user_id, send.client_msg_id))
            if original is not None:
                _settle_original(send, original)
            elif id(send) in results:
                _settle(send, result=results[id(send)])
            else:
                _settle(send, exception=no_such_chat())
        stored_by_key = {
            (send.user_id, send.client_msg_id): results[id(send)]
            for send in unique
            if send.client_msg_id is not None and id(send) in results
        }
        for copy in copies:
            key = (copy.user_id, copy.client_msg_id)
            if key in originals:
                _settle_original(copy, originals[key])
            elif key in stored_by_key:
                message, _ = stored_by_key[key]
                if message.chat_id == copy.chat_id:
                    _settle(copy, result=(message, False))
                else:
                    _settle(copy, exception=_reused_elsewhere())
            else:  # its twin stored nothing (not a member there): judge it on its own
                self._queue.append(copy)


def _reused_elsewhere() -> ChatError:
    return ChatError(INVALID, "client_msg_id was already used in another chat", 422)


def _settle(
    send: PendingSend,
    result: tuple[Message, bool] | None = None,
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
        _settle(send, result=(answer_for_original(row, send.chat_id), False))
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


async def send_message(ctx: Context, action: SendMessage) -> Message:
    message, _ = await store_message(ctx, action)
    return message


async def store_message(ctx: Context, action: SendMessage) -> tuple[Message, bool]:
    """Store and fan out a message; return it and whether it is new (not a retry)."""
    text = clean_text(action.text, "text", min_len=1, max_len=MAX_TEXT_CHARS)
    client_msg_id = action.client_msg_id
    if client_msg_id is not None and "\x00" in client_msg_id:
        raise ChatError(INVALID, "client_msg_id must not contain NUL characters", 422)
    limit, key = ctx.limits.message, str(ctx.user_id)  # socket and REST sends alike
    wait = await limit.take(key)
    if wait:
        # A retry of a stored message is answered even now: it stores nothing. Looked up
        # only when refused, so a normal send costs no extra query.
        original = await ctx.writer.original(ctx.user_id, action.chat_id, client_msg_id)
        if original is not None:
            return original, False
        raise rate_limited("too many messages; slow down", wait)
    try:
        message, new = await ctx.writer.store(ctx.user_id, action.chat_id, text, client_msg_id)
    except BaseException:
        await limit.give_back(key)  # refused or failed: the retry must not pay twice
        raise
    if not new:
        await limit.give_back(key)  # a retry, answered with the message stored before
    return message, new


# --- get_message --------------------------------------------------------------------------

_VISIBLE_MESSAGE = f"""
SELECT {MESSAGE_COLUMNS}
FROM messages m
JOIN chats c ON c.id = m.chat_id
JOIN chat_members cm ON cm.chat_id = m.chat_id AND cm.user_id = $2
WHERE m.id = $1
"""


async def get_message(ctx: Context, action: GetMessage) -> Message:
    row = await ctx.pool.fetchrow(_VISIBLE_MESSAGE, action.message_id, ctx.user_id)
    if row is None:
        raise ChatError(NOT_FOUND, "no such message", 404)
    return message_from_row(row)


# --- sync ---------------------------------------------------------------------------------

# The caller's chats among those asked, with how far each goes.
_SYNC_CHATS = """
SELECT c.id, c.last_seq
FROM chats c JOIN chat_members cm ON cm.chat_id = c.id AND cm.user_id = $1
WHERE c.id = ANY($2::bigint[])
"""

# The messages after each given seq, chat by chat in the order asked, at most $3 per chat
# and $4 in all: no more than a reply can carry is ever read.
_SYNC_MESSAGES = f"""
SELECT {MESSAGE_COLUMNS}
FROM unnest($1::bigint[], $2::bigint[]) WITH ORDINALITY AS want(chat_id, after_seq, n)
JOIN chats c ON c.id = want.chat_id
CROSS JOIN LATERAL (
    SELECT * FROM messages
    WHERE chat_id = want.chat_id AND seq > want.after_seq
    ORDER BY seq
    LIMIT $3
) m
ORDER BY want.n, m.seq
LIMIT $4
"""

# A message is at least ~200 bytes of JSON, so a full reply never holds more than this.
SYNC_MAX_MESSAGES = FRAME_BUDGET_BYTES // 200


async def sync(ctx: Context, action: Sync) -> SyncResult:
    """Messages after each given seq, so a reconnecting client misses nothing.

    Missed messages come per chat in seq order, at most `limit` per chat; `has_more` says
    to sync that chat again from the last seq received. The reply stays under a frame
    budget: chats that did not fit come back short or empty, with has_more.
    """
    async with ctx.pool.acquire() as conn:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            last_seqs = {
                row["id"]: row["last_seq"]
                for row in await conn.fetch(_SYNC_CHATS, ctx.user_id, list(action.chats))
            }
            wanted = [
                (c, after) for c, after in action.chats.items() if last_seqs.get(c, 0) > after
            ]
            rows = await conn.fetch(
                _SYNC_MESSAGES,
                [chat_id for chat_id, _ in wanted],
                [after for _, after in wanted],
                action.limit,
                SYNC_MAX_MESSAGES,
            )

    found: dict[int, list[Message]] = {}
    for row in rows:
        found.setdefault(row["chat_id"], []).append(message_from_row(row))
    result: dict[int, SyncedChat] = {}
    budget = FRAME_BUDGET_BYTES
    for chat_id, after in action.chats.items():
        if chat_id not in last_seqs:
            result[chat_id] = SyncedChat(messages=[], has_more=False, error=NOT_FOUND)
            continue
        taken, budget = fit_in_frame(found.get(chat_id, ()), budget)
        reached = taken[-1].seq if taken else after
        result[chat_id] = SyncedChat(messages=taken, has_more=reached < last_seqs[chat_id])
    return SyncResult(chats=result)
