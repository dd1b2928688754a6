"""Blocking: block_user, unblock_user, and the block list (REST: /me/blocks).

What a block does is enforced where it bites, not here: `chats.require_users` refuses to
open a private chat with, or add to a chat, someone who blocked the caller, and the
MessageWriter stores no message in a private chat whose other member blocked the sender
(or was blocked by them). In groups nothing is refused: the blocker's client collapses
the blocked user's messages, knowing whom it blocked from the first frame of each socket
(`unread_messages.blocked`) and from `blocks_changed`. Flagging each message instead
would mean encoding every group message once per recipient rather than once.
"""

from __future__ import annotations

import uuid

import asyncpg

from chatd.handlers.base import Context, member_from_row, parse_user_id
from chatd.protocol import (
    INVALID,
    MAX_BLOCKS,
    NOT_FOUND,
    BlockList,
    BlocksChanged,
    BlockUser,
    ChatError,
    ListBlocks,
    UnblockUser,
    UserList,
)

# The blocker's row is the lock: one change of their list at a time, so the cap holds.
_LOCK_BLOCKER = "SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE"
_BLOCKED_IDS = "SELECT blocked_id FROM blocks WHERE blocker_id = $1 ORDER BY created_at DESC"


async def blocked_ids(conn: asyncpg.Connection | asyncpg.Pool, user_id: uuid.UUID) -> list[str]:
    """Whom the user blocks, most recently blocked first."""
    return [str(r["blocked_id"]) for r in await conn.fetch(_BLOCKED_IDS, user_id)]


async def block_user(ctx: Context, action: BlockUser) -> BlockList:
    other = parse_user_id(action.user_uuid, "user_uuid")
    if other == ctx.user_id:
        raise ChatError(INVALID, "you cannot block yourself")
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        if await conn.fetchval(_LOCK_BLOCKER, ctx.user_id) is None:
            raise ChatError(NOT_FOUND, "no such user")
        if not await conn.fetchval("SELECT true FROM users WHERE id = $1", other):
            raise ChatError(NOT_FOUND, "no such user")
        added = await conn.fetchval(
            "INSERT INTO blocks (blocker_id, blocked_id)"
            " SELECT $1, $2 WHERE (SELECT count(*) FROM blocks WHERE blocker_id = $1) < $3"
            " ON CONFLICT DO NOTHING RETURNING true",
            ctx.user_id,
            other,
            MAX_BLOCKS,
        )
        already = added or await conn.fetchval(
            "SELECT true FROM blocks WHERE blocker_id = $1 AND blocked_id = $2", ctx.user_id, other
        )
        if not already:
            raise ChatError(INVALID, f"you can block at most {MAX_BLOCKS} users")
        blocked = BlockList(await blocked_ids(conn, ctx.user_id))
    if added:
        await ctx.node.publish([ctx.user_id], BlocksChanged(blocked))
    return blocked


async def unblock_user(ctx: Context, action: UnblockUser) -> BlockList:
    other = parse_user_id(action.user_uuid, "user_uuid")
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        await conn.execute(_LOCK_BLOCKER, ctx.user_id)
        removed = await conn.fetchval(
            "DELETE FROM blocks WHERE blocker_id = $1 AND blocked_id = $2 RETURNING true",
            ctx.user_id,
            other,
        )
        blocked = BlockList(await blocked_ids(conn, ctx.user_id))
    if removed:
        await ctx.node.publish([ctx.user_id], BlocksChanged(blocked))
    return blocked  # not blocked to begin with: nothing to do, the same answer


async def list_blocks(ctx: Context, action: ListBlocks) -> UserList:
    rows = await ctx.node.pool.fetch(
        "SELECT u.id, u.name, u.avatar FROM blocks b JOIN users u ON u.id = b.blocked_id"
        " WHERE b.blocker_id = $1 ORDER BY b.created_at DESC, u.id",
        ctx.user_id,
    )
    return UserList([member_from_row(r) for r in rows])
