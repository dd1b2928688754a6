"""Group administration: add, remove, leave, rename, roles, delete.

Roles rank owner > admin > member. Admins add and remove members and rename the group;
only the owner changes roles, removes admins, and deletes the group. Private chats refuse
all of it with `forbidden`. Each change locks the chat row (like a send does), so a
message is fanned out to exactly the members the chat had when it was stored.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg
from msgspec import UNSET

from chatd.handlers import files
from chatd.handlers.base import (
    Context,
    fetch_chat,
    lock_group,
    member_ids,
    parse_user_id,
    parse_user_ids,
    role_of,
)
from chatd.handlers.chats import insert_members, require_users
from chatd.node import Node
from chatd.protocol import (
    FORBIDDEN,
    INVALID,
    MAX_GROUP_MEMBERS,
    MAX_GROUP_NAME_CHARS,
    NOT_FOUND,
    RATE_LIMITED,
    AddMembers,
    Chat,
    ChatDeleted,
    ChatDeletedData,
    ChatError,
    ChatUpdated,
    DeleteChat,
    LeaveChat,
    MemberAdded,
    MemberAddedData,
    MemberRemoved,
    MemberRemovedData,
    RemoveMember,
    RenameChat,
    SetRole,
    UpdateChat,
    clean_text,
)
from chatd.store import advance_read_watermarks, publish_read_receipts

_BUMP_ACTIVITY = "UPDATE chats SET activity = nextval('chat_activity_seq') WHERE id = $1"
_DELETE_MEMBER = "DELETE FROM chat_members WHERE chat_id = $1 AND user_id = $2"


async def add_members(ctx: Context, action: AddMembers) -> Chat:
    """Admins+. Counts every user asked for against CHATD_ADD_MEMBERS_RATE before adding,
    and gives back those not added (members already, or nothing stored)."""
    users = parse_user_ids(action.user_ids)
    limit, me = ctx.node.limits.add_members, str(ctx.user_id)
    wait = await limit.take(me, len(users))
    if wait:
        raise ChatError(
            RATE_LIMITED, "too many members added to chats; slow down", retry_after=wait
        )
    added: list[uuid.UUID] = []
    try:
        async with ctx.node.pool.acquire() as conn, conn.transaction():
            await lock_group(conn, action.chat_id, ctx.user_id, at_least="admin")
            await require_users(conn, users, by=ctx.user_id)
            added = await insert_members(conn, action.chat_id, users)
            if added:
                size = await conn.fetchval(
                    "SELECT count(*) FROM chat_members WHERE chat_id = $1", action.chat_id
                )
                if size > MAX_GROUP_MEMBERS:  # raising rolls the insert back
                    raise ChatError(INVALID, f"a group has at most {MAX_GROUP_MEMBERS} members")
                await conn.execute(_BUMP_ACTIVITY, action.chat_id)
            chat = await fetch_chat(conn, action.chat_id)
    except BaseException:
        added = []
        raise
    finally:
        charged = limit.charged(len(users))
        if len(added) < charged:
            await limit.give_back(me, charged - len(added))

    if added:
        data = MemberAddedData(chat, [str(u) for u in added], by=str(ctx.user_id))
        await ctx.node.publish(member_ids(chat), MemberAdded(data))
    return chat


async def remove_member(ctx: Context, action: RemoveMember) -> Chat | None:
    """Remove someone (admins+); removing yourself is leaving. Returns the chat after."""
    target = parse_user_id(action.user_uuid, "user_uuid")
    if target == ctx.user_id:
        return await leave_chat(ctx, LeaveChat(chat_id=action.chat_id))

    async with ctx.node.pool.acquire() as conn, conn.transaction():
        my_role = await lock_group(conn, action.chat_id, ctx.user_id, at_least="admin")
        role = await role_of(conn, action.chat_id, target)
        if role is None:
            raise ChatError(NOT_FOUND, "no such member in this chat")
        if role == "owner":
            raise ChatError(FORBIDDEN, "the owner cannot be removed")
        if role == "admin" and my_role != "owner":
            raise ChatError(FORBIDDEN, "only the owner can remove an admin")
        await conn.execute(_DELETE_MEMBER, action.chat_id, target)
        # The removed member may have been the last one holding messages unread.
        newly_read = await advance_read_watermarks(conn, [action.chat_id])
        chat = await fetch_chat(conn, action.chat_id)

    event = MemberRemoved(MemberRemovedData(action.chat_id, str(target), by=str(ctx.user_id)))
    await ctx.node.publish([*member_ids(chat), target], event)
    await publish_read_receipts(ctx.node.bus, newly_read)
    return chat


# The heir when an owner leaves: the oldest admin, else the oldest member.
_PROMOTE_HEIR = """
UPDATE chat_members SET role = 'owner'
WHERE chat_id = $1 AND user_id = (
    SELECT user_id FROM chat_members WHERE chat_id = $1
    ORDER BY role = 'admin' DESC, join_order
    LIMIT 1
)
"""


async def leave_chat(ctx: Context, action: LeaveChat) -> None:
    """Leave a group; the last member leaving deletes it."""
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        my_role = await lock_group(conn, action.chat_id, ctx.user_id, at_least="member")
        departure = await depart(conn, action.chat_id, ctx.user_id, my_role)
    await announce_departure(ctx.node, departure)
    return None


@dataclass(frozen=True)
class Departure:
    """A member gone from a group (left, or deleted their account), to announce."""

    chat_id: int
    user_id: uuid.UUID
    role: str
    chat: Chat | None  # after; None: they were the last, and the group is deleted
    newly_read: list[asyncpg.Record]


async def depart(
    conn: asyncpg.Connection, chat_id: int, user_id: uuid.UUID, role: str
) -> Departure:
    """Take a member out of a group whose lock the transaction holds: ownership goes to the
    heir (the oldest admin, else the oldest member); the last member out deletes it."""
    await conn.execute(_DELETE_MEMBER, chat_id, user_id)
    if not await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM chat_members WHERE chat_id = $1)", chat_id
    ):
        await conn.execute("DELETE FROM chats WHERE id = $1", chat_id)
        return Departure(chat_id, user_id, role, None, [])
    if role == "owner":
        await conn.execute(_PROMOTE_HEIR, chat_id)
    newly_read = await advance_read_watermarks(conn, [chat_id])
    return Departure(chat_id, user_id, role, await fetch_chat(conn, chat_id), newly_read)


async def announce_departure(node: Node, departure: Departure) -> None:
    """Committed: tell the member gone and those left."""
    chat_id, gone = departure.chat_id, str(departure.user_id)
    if departure.chat is None:
        deleted = ChatDeleted(ChatDeletedData(chat_id, by=gone))
        await node.publish([departure.user_id], deleted)
        return
    left = MemberRemoved(MemberRemovedData(chat_id, gone, by=gone))
    await node.publish([*member_ids(departure.chat), departure.user_id], left)
    if departure.role == "owner":
        await node.publish(member_ids(departure.chat), ChatUpdated(departure.chat))
    await publish_read_receipts(node.bus, departure.newly_read)


async def rename_chat(ctx: Context, action: RenameChat) -> Chat:
    return await update_chat(ctx, UpdateChat(chat_id=action.chat_id, name=action.name))


# Moves the chat up everyone's list, as a new message does, when something changed.
_UPDATE_CHAT = """
UPDATE chats
SET name = coalesce($2, name), photo = CASE WHEN $3 THEN $4 ELSE photo END,
    activity = nextval('chat_activity_seq')
WHERE id = $1
  AND (name, photo) IS DISTINCT FROM (coalesce($2, name), CASE WHEN $3 THEN $4 ELSE photo END)
"""


async def update_chat(ctx: Context, action: UpdateChat) -> Chat:
    """Admins and the owner change a group's name and photo (an image they uploaded)."""
    name = None
    if isinstance(action.name, str):
        name = clean_text(action.name, "name", min_len=1, max_len=MAX_GROUP_NAME_CHARS)
    set_photo = action.photo is not UNSET
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        await lock_group(conn, action.chat_id, ctx.user_id, at_least="admin")
        photo = None
        if isinstance(action.photo, str):
            photo = await files.claim_image(conn, ctx.user_id, action.photo, "photo")
        updated = await conn.execute(_UPDATE_CHAT, action.chat_id, name, set_photo, photo)
        chat = await fetch_chat(conn, action.chat_id)
    if updated != "UPDATE 0":
        await ctx.node.publish(member_ids(chat), ChatUpdated(chat))
    return chat


_SET_ROLE = "UPDATE chat_members SET role = $3 WHERE chat_id = $1 AND user_id = $2"


async def set_role(ctx: Context, action: SetRole) -> Chat:
    """Owner only. Making someone "owner" hands the ownership over: you become an admin."""
    target = parse_user_id(action.user_uuid, "user_uuid")
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        await lock_group(conn, action.chat_id, ctx.user_id, at_least="owner")
        if target == ctx.user_id:
            raise ChatError(
                INVALID, "you cannot change your own role; make another member owner instead"
            )
        role = await role_of(conn, action.chat_id, target)
        if role is None:
            raise ChatError(NOT_FOUND, "no such member in this chat")
        if role != action.role:
            if action.role == "owner":  # demote first: a chat has one owner (unique index)
                await conn.execute(_SET_ROLE, action.chat_id, ctx.user_id, "admin")
            await conn.execute(_SET_ROLE, action.chat_id, target, action.role)
        chat = await fetch_chat(conn, action.chat_id)
    if role != action.role:
        await ctx.node.publish(member_ids(chat), ChatUpdated(chat))
    return chat


async def delete_chat(ctx: Context, action: DeleteChat) -> None:
    """Owner only; the messages go with the chat (ON DELETE CASCADE)."""
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        await lock_group(conn, action.chat_id, ctx.user_id, at_least="owner")
        members: list[uuid.UUID] = await conn.fetchval(
            "SELECT array_agg(user_id) FROM chat_members WHERE chat_id = $1", action.chat_id
        )
        await conn.execute("DELETE FROM chats WHERE id = $1", action.chat_id)
    event = ChatDeleted(ChatDeletedData(action.chat_id, by=str(ctx.user_id)))
    await ctx.node.publish(members, event)
    return None
