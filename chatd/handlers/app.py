"""The app API: what an embedding app's backend does with an API key (docs/embedding.md).

An API key (`chatd_app_...`) is made by an admin (POST /admin/api_keys) with scopes:

    users     POST /app/users (bulk upsert by `sub`), POST /app/users/deactivate
    chats     POST /app/chats (once per ext_id), GET /app/chats/{ext_id}, members
    messages  POST /app/chats/{ext_id}/messages (as a user, or as the key's identity)
    history   GET /app/chats/{ext_id}/messages

It is one of #16's API tokens (chatd/tokens.py): a session of kind 'app' of its own bot
user (the key's identity: it owns the app's groups and posts its system messages), its
hash in `api_tokens` with its scopes. Revoking it revokes that session: every process
refuses it at once. Each key has its own rate limit (CHATD_APP_KEY_RATE).

The app names its users by `sub`, as its tokens do: a user upserted here and the user of
a token with the same `sub` (and CHATD_AUTH_ISSUER) are one chatd user. Its chats are
the ones it created, by `ext_id`: a key never reaches a chat users made themselves.
"""

from __future__ import annotations

import re
import secrets
import uuid

import asyncpg

from chatd import app_hooks, tokens
from chatd.deliveries import url_problem
from chatd.handlers import admin, groups
from chatd.handlers.base import Context, fetch_chat, member_from_row, member_ids
from chatd.handlers.chats import insert_members
from chatd.integrations import enqueue_chat_event
from chatd.node import Node
from chatd.protocol import (
    FORBIDDEN,
    INVALID,
    MAX_GROUP_MEMBERS,
    NOT_FOUND,
    RATE_LIMITED,
    ApiKeyCreated,
    ApiKeyInfo,
    ApiKeyList,
    AppAddMembers,
    AppChat,
    AppCreateChat,
    AppGetChat,
    AppGetMessages,
    AppPostMessage,
    AppRemoveMembers,
    AppUser,
    Chat,
    ChatCreated,
    ChatError,
    CreateApiKey,
    Created,
    DeactivateUsers,
    History,
    ListApiKeys,
    Member,
    MemberAdded,
    MemberAddedData,
    MemberRemoved,
    MemberRemovedData,
    Message,
    RevokeApiKey,
    UpsertedUser,
    UpsertedUsers,
    UpsertUsers,
    UserUpdated,
)
from chatd.revocations import Revocation
from chatd.store import (
    MESSAGE_COLUMNS,
    advance_read_watermarks,
    message_from_row,
    publish_read_receipts,
)

# The issuer of the app's users when chatd takes no tokens of the app (CHATD_AUTH_ISSUER
# unset): they exist for the API alone.
API_ISSUER = "chatd:app"


def issuer(node: Node) -> str:
    return node.settings.auth_issuer or API_ISSUER


async def require_app(ctx: Context, scope: str) -> None:
    """An API key's request with `scope`, within the key's rate: else forbidden or
    rate_limited."""
    if ctx.kind != "app":
        raise ChatError(FORBIDDEN, "this needs an API key (POST /admin/api_keys)")
    if scope not in ctx.scopes:
        raise ChatError(FORBIDDEN, f"this API key lacks the {scope} scope")
    wait = await ctx.node.limits.app_key.take(str(ctx.session_id))
    if wait:
        raise ChatError(RATE_LIMITED, "too many requests with this API key", retry_after=wait)


# --- the keys (admins) ---------------------------------------------------------------------

_CREATE_IDENTITY = """
INSERT INTO users (id, name, email, password_hash, is_bot)
VALUES ($1::uuid, $2, 'app-' || $1::uuid::text || '@app.invalid', '!', true)
"""

_CREATE_SESSION = """
INSERT INTO sessions (id, user_id, device, ip, kind) VALUES ($1, $2, $3, $4, 'app')
"""

_CREATE_TOKEN = """
INSERT INTO api_tokens (id, user_id, name, scopes, token_hash) VALUES ($1, $2, $3, $4, $5)
"""

_CREATE_HOOK = """
INSERT INTO app_webhooks (key_id, url, secret, events) VALUES ($1, $2, $3, $4)
"""

_KEYS = """
SELECT t.id, t.name, t.scopes, t.user_id, s.created_at, s.last_seen_at, h.url, h.events
FROM api_tokens t JOIN sessions s ON s.id = t.id
LEFT JOIN app_webhooks h ON h.key_id = t.id
WHERE s.kind = 'app' AND s.revoked_at IS NULL AND ($1::uuid IS NULL OR t.id = $1)
ORDER BY s.created_at DESC, t.id
"""


def _key_info(row: asyncpg.Record) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=str(row["id"]),
        name=row["name"],
        scopes=list(row["scopes"]),
        user_uuid=str(row["user_id"]),
        webhook_url=row["url"],
        events=list(row["events"] or []),
        created_at=row["created_at"],
        last_used_at=row["last_seen_at"],
    )


async def create_api_key(ctx: Context, request: CreateApiKey) -> Created[ApiKeyCreated]:
    actor = await admin.require_admin(ctx)
    scopes = sorted(set(request.scopes))
    events = sorted(set(request.events))
    if request.webhook_url is not None:
        problem = await url_problem(request.webhook_url, ctx.node.settings.outbound_allow_private)
        if problem is not None:
            raise ChatError(INVALID, f"webhook_url: {problem}")
        if not events:
            raise ChatError(INVALID, "a webhook needs the events it is sent")
    elif events:
        raise ChatError(INVALID, "events need a webhook_url")
    key, key_id, user_id = tokens.new_token("app"), uuid.uuid4(), uuid.uuid4()
    secret = secrets.token_urlsafe(32) if request.webhook_url else None
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        await conn.execute(_CREATE_IDENTITY, user_id, request.name)
        await conn.execute(_CREATE_SESSION, key_id, user_id, request.name, ctx.peer[:64])
        await conn.execute(_CREATE_TOKEN, key_id, user_id, request.name, scopes, tokens.digest(key))
        if secret is not None:
            await conn.execute(_CREATE_HOOK, key_id, request.webhook_url, secret, events)
        await admin._audit(conn, actor, "create_api_key", str(key_id), scopes=scopes)
        row = await conn.fetchrow(_KEYS, key_id)
    if secret is not None:
        await ctx.node.app_hooks.refresh()  # this process hears its events at once
    info = _key_info(row)
    created = ApiKeyCreated(
        **{f: getattr(info, f) for f in info.__struct_fields__}, key=key, webhook_secret=secret
    )
    return Created(created, True)


async def list_api_keys(ctx: Context, request: ListApiKeys) -> ApiKeyList:
    await admin.require_admin(ctx)
    return ApiKeyList([_key_info(r) for r in await ctx.node.pool.fetch(_KEYS, None)])


async def revoke_api_key(ctx: Context, request: RevokeApiKey) -> None:
    actor = await admin.require_admin(ctx)
    try:
        key_id = uuid.UUID(request.key_id)
    except ValueError:
        raise ChatError(NOT_FOUND, "no such API key") from None
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        user_id = await conn.fetchval(
            "UPDATE sessions SET revoked_at = now()"
            " WHERE id = $1 AND kind = 'app' AND revoked_at IS NULL RETURNING user_id",
            key_id,
        )
        if user_id is None:
            raise ChatError(NOT_FOUND, "no such API key")
        # Its webhook goes: pending deliveries find no receiver and are dropped.
        await conn.execute("DELETE FROM app_webhooks WHERE key_id = $1", key_id)
        await admin._audit(conn, actor, "revoke_api_key", str(key_id))
    await ctx.node.revoke(Revocation(user_id, (key_id,)))
    await ctx.node.app_hooks.refresh()


# --- users -----------------------------------------------------------------------------------

_KNOWN = """
SELECT i.subject, i.user_id, u.name, i.picture
FROM external_identities i JOIN users u ON u.id = i.user_id
WHERE i.issuer = $1 AND i.subject = ANY($2::text[])
"""

_NEW_USERS = """
INSERT INTO users (id, name, email, password_hash)
SELECT id, name, 'ext-' || id::text || '@external.invalid', '!'
FROM unnest($1::uuid[], $2::text[]) AS n(id, name)
"""

_NEW_IDENTITIES = """
INSERT INTO external_identities (issuer, subject, user_id, name, picture)
SELECT $1, subject, id, name, picture
FROM unnest($2::text[], $3::uuid[], $4::text[], $5::text[]) AS n(subject, id, name, picture)
ON CONFLICT (issuer, subject) DO NOTHING
RETURNING subject
"""

_RENAME = """
WITH changes AS (
    SELECT * FROM unnest($2::uuid[], $3::text[], $4::text[]) AS c(id, name, picture)
), identities AS (
    UPDATE external_identities i SET name = coalesce(c.name, i.name), picture = c.picture
    FROM changes c WHERE i.issuer = $1 AND i.user_id = c.id
)
UPDATE users u SET name = c.name
FROM changes c
WHERE u.id = c.id AND c.name IS NOT NULL AND u.name IS DISTINCT FROM c.name
RETURNING u.id, u.name, u.avatar, u.is_bot
"""

_CONTACTS = """
SELECT DISTINCT mine.user_id AS of, other.user_id FROM chat_members mine
JOIN chat_members other ON other.chat_id = mine.chat_id
WHERE mine.user_id = ANY($1::uuid[])
"""

DEFAULT_NAME = "User"


async def upsert_users(ctx: Context, request: UpsertUsers) -> UpsertedUsers:
    await require_app(ctx, "users")
    users = list({u.sub: u for u in request.users}.values())  # the last of each sub wins
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        ids, created = await ensure_users(conn, issuer(ctx.node), users)
        renamed = await conn.fetch(
            _RENAME,
            issuer(ctx.node),
            [ids[u.sub] for u in users if u.sub not in created],
            [u.name for u in users if u.sub not in created],
            [u.picture for u in users if u.sub not in created],
        )
        contacts = await conn.fetch(_CONTACTS, [r["id"] for r in renamed]) if renamed else []
    for row in renamed:
        told = {row["id"], *(c["user_id"] for c in contacts if c["of"] == row["id"])}
        await ctx.node.publish(told, UserUpdated(member_from_row(row)))
    return UpsertedUsers([UpsertedUser(u.sub, str(ids[u.sub]), u.sub in created) for u in users])


async def ensure_users(
    conn: asyncpg.Connection, iss: str, users: list[AppUser]
) -> tuple[dict[str, uuid.UUID], set[str]]:
    """The chatd user of each sub, created when new (in the caller's transaction): the
    ids by sub, and the subs created. A sub created by a concurrent request meanwhile is
    that one's user."""
    subs = [u.sub for u in users]
    ids = {r["subject"]: r["user_id"] for r in await conn.fetch(_KNOWN, iss, subs)}
    new = [u for u in users if u.sub not in ids]
    if not new:
        return ids, set()
    fresh = {u.sub: uuid.uuid4() for u in new}
    await conn.execute(
        _NEW_USERS, [fresh[u.sub] for u in new], [u.name or DEFAULT_NAME for u in new]
    )
    inserted = {
        r["subject"]
        for r in await conn.fetch(
            _NEW_IDENTITIES,
            iss,
            [u.sub for u in new],
            [fresh[u.sub] for u in new],
            [u.name for u in new],
            [u.picture for u in new],
        )
    }
    for u in new:
        if u.sub in inserted:
            member = Member(user_uuid=str(fresh[u.sub]), name=u.name or DEFAULT_NAME, avatar=None)
            await app_hooks.enqueue_user_created(conn, member)
    raced = [fresh[s] for s in fresh if s not in inserted]
    if raced:  # their users rows were made for nothing
        await conn.execute("DELETE FROM users WHERE id = ANY($1::uuid[])", raced)
        for row in await conn.fetch(_KNOWN, iss, [s for s in fresh if s not in inserted]):
            ids[row["subject"]] = row["user_id"]
    ids.update({s: fresh[s] for s in inserted})
    return ids, inserted


async def deactivate_users(ctx: Context, request: DeactivateUsers) -> None:
    await require_app(ctx, "users")
    rows = await ctx.node.pool.fetch(
        "UPDATE users u SET disabled_at = now() FROM external_identities i"
        " WHERE i.issuer = $1 AND i.subject = ANY($2::text[]) AND u.id = i.user_id"
        "   AND u.disabled_at IS NULL"
        " RETURNING u.id",
        issuer(ctx.node),
        list(set(request.subs)),
    )
    for row in rows:
        await ctx.node.pool.execute(
            "UPDATE sessions SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
            row["id"],
        )
        await ctx.node.revoke(Revocation(row["id"]))


# --- chats -----------------------------------------------------------------------------------

_BY_EXT_ID = "SELECT id FROM chats WHERE ext_id = $1"
# protocol.ExtId's pattern: a path's ext_id is not checked by the request Struct (path
# fields are taken as they come), and no chat has one that does not match it.
_EXT_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


def no_such_chat_unless_valid(ext_id: str) -> None:
    if not _EXT_ID.fullmatch(ext_id):
        raise ChatError(NOT_FOUND, "no such chat")


async def chat_by_ext_id(conn: asyncpg.Connection, ext_id: str) -> int:
    no_such_chat_unless_valid(ext_id)
    chat_id = await conn.fetchval(_BY_EXT_ID, ext_id)
    if chat_id is None:
        raise ChatError(NOT_FOUND, "no such chat")
    return chat_id


def _app_chat(chat: Chat, ext_id: str) -> AppChat:
    return AppChat(**{f: getattr(chat, f) for f in chat.__struct_fields__}, ext_id=ext_id)


async def app_create_chat(ctx: Context, request: AppCreateChat) -> Created[AppChat]:
    await require_app(ctx, "chats")
    subs = list(dict.fromkeys(request.members))
    if request.type == "private" and len(subs) != 2:
        raise ChatError(INVALID, "a private chat has exactly two members")
    if request.type == "group":
        if request.name is None:
            raise ChatError(INVALID, "a group needs a name")
        if len(subs) + 1 > MAX_GROUP_MEMBERS:
            raise ChatError(INVALID, f"a group has at most {MAX_GROUP_MEMBERS} members")
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        chat_id = await conn.fetchval(_BY_EXT_ID, request.ext_id)
        if chat_id is not None:
            return Created(_app_chat(await fetch_chat(conn, chat_id), request.ext_id), False)
        ids, _ = await ensure_users(conn, issuer(ctx.node), [AppUser(sub=s) for s in subs])
        members = [ids[s] for s in subs]
        if request.type == "private":
            key = ":".join(sorted(str(m) for m in members))
            chat_id = await conn.fetchval(
                "INSERT INTO chats (type, private_key, ext_id) VALUES ('private', $1, $2)"
                " ON CONFLICT DO NOTHING RETURNING id",
                key,
                request.ext_id,
            )
            if chat_id is None:  # the pair's chat exists, or the ext_id was just taken
                raise ChatError(
                    INVALID, "these two users have a private chat already, or ext_id is taken"
                )
            await insert_members(conn, chat_id, members)
        else:
            chat_id = await conn.fetchval(
                "INSERT INTO chats (type, name, ext_id) VALUES ('group', $1, $2)"
                " ON CONFLICT (ext_id) DO NOTHING RETURNING id",
                request.name,
                request.ext_id,
            )
            if chat_id is None:
                raise ChatError(INVALID, "ext_id was just taken; retry to get its chat")
            await insert_members(conn, chat_id, [ctx.user_id], role="owner")
            await insert_members(conn, chat_id, members)
        chat = await fetch_chat(conn, chat_id)
        await enqueue_chat_event(conn, chat_id, ChatCreated(chat))
    await ctx.node.publish(member_ids(chat), ChatCreated(chat))
    return Created(_app_chat(chat, request.ext_id), True)


async def app_get_chat(ctx: Context, request: AppGetChat) -> AppChat:
    await require_app(ctx, "chats")
    async with ctx.node.pool.acquire() as conn:
        chat_id = await chat_by_ext_id(conn, request.ext_id)
        return _app_chat(await fetch_chat(conn, chat_id), request.ext_id)


async def _lock_app_group(conn: asyncpg.Connection, ext_id: str) -> int:
    no_such_chat_unless_valid(ext_id)
    chat = await conn.fetchrow("SELECT id, type FROM chats WHERE ext_id = $1 FOR UPDATE", ext_id)
    if chat is None:
        raise ChatError(NOT_FOUND, "no such chat")
    if chat["type"] != "group":
        raise ChatError(INVALID, "a private chat's members do not change")
    return chat["id"]


async def app_add_members(ctx: Context, request: AppAddMembers) -> AppChat:
    await require_app(ctx, "chats")
    subs = list(dict.fromkeys(request.subs))
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        chat_id = await _lock_app_group(conn, request.ext_id)
        ids, _ = await ensure_users(conn, issuer(ctx.node), [AppUser(sub=s) for s in subs])
        added = await insert_members(conn, chat_id, [ids[s] for s in subs])
        if added:
            size = await conn.fetchval(
                "SELECT count(*) FROM chat_members WHERE chat_id = $1", chat_id
            )
            if size > MAX_GROUP_MEMBERS:  # raising rolls the insert back
                raise ChatError(INVALID, f"a group has at most {MAX_GROUP_MEMBERS} members")
            await conn.execute(groups._BUMP_ACTIVITY, chat_id)
        chat = await fetch_chat(conn, chat_id)
        data = MemberAddedData(chat, [str(u) for u in added], by=str(ctx.user_id))
        if added:
            await enqueue_chat_event(conn, chat_id, MemberAdded(data))
    if added:
        await ctx.node.publish(member_ids(chat), MemberAdded(data))
    return _app_chat(chat, request.ext_id)


_REMOVE_SUBJECTS = """
DELETE FROM chat_members cm USING external_identities i
WHERE cm.chat_id = $1 AND i.issuer = $2 AND i.subject = ANY($3::text[])
  AND cm.user_id = i.user_id AND cm.role <> 'owner'
RETURNING cm.user_id
"""


async def app_remove_members(ctx: Context, request: AppRemoveMembers) -> None:
    """Remove the app's users from a group (not its owner, the key's identity); those not
    in it are skipped."""
    await require_app(ctx, "chats")
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        chat_id = await _lock_app_group(conn, request.ext_id)
        removed = [
            r["user_id"]
            for r in await conn.fetch(
                _REMOVE_SUBJECTS, chat_id, issuer(ctx.node), list(set(request.subs))
            )
        ]
        # The removed members may have been the last ones holding messages unread.
        newly_read = await advance_read_watermarks(conn, [chat_id]) if removed else []
        chat = await fetch_chat(conn, chat_id)
        events = [
            MemberRemoved(MemberRemovedData(chat_id, str(user_id), by=str(ctx.user_id)))
            for user_id in removed
        ]
        for user_id, event in zip(removed, events, strict=True):
            await enqueue_chat_event(conn, chat_id, event, gone=[user_id])
    for user_id, event in zip(removed, events, strict=True):
        await ctx.node.publish([*member_ids(chat), user_id], event)
    await publish_read_receipts(ctx.node.bus, newly_read)


# --- messages --------------------------------------------------------------------------------


async def app_post_message(ctx: Context, request: AppPostMessage) -> Created[Message]:
    await require_app(ctx, "messages")
    async with ctx.node.pool.acquire() as conn:
        chat_id = await chat_by_ext_id(conn, request.ext_id)
        sender = ctx.user_id
        if request.as_user is not None:
            sender = await conn.fetchval(
                "SELECT user_id FROM external_identities WHERE issuer = $1 AND subject = $2",
                issuer(ctx.node),
                request.as_user,
            )
            if sender is None:
                raise ChatError(INVALID, "as_user is not a user of the app")
    try:
        return await ctx.node.writer.store(sender, chat_id, request.text, request.client_msg_id)
    except ChatError as exc:
        if exc.code == NOT_FOUND:  # the chat is the app's: the sender is not in it
            raise ChatError(INVALID, "the sender is not a member of this chat") from None
        raise


_PAGE = f"""
SELECT {MESSAGE_COLUMNS}
FROM messages m JOIN chats c ON c.id = m.chat_id
WHERE m.chat_id = $1 AND m.id < $2
ORDER BY m.id DESC
LIMIT $3
"""


async def app_get_messages(ctx: Context, request: AppGetMessages) -> History:
    await require_app(ctx, "history")
    async with ctx.node.pool.acquire() as conn:
        chat_id = await chat_by_ext_id(conn, request.ext_id)
        before = request.before or 2**63 - 1
        rows = await conn.fetch(_PAGE, chat_id, before, request.limit + 1)
    page = [message_from_row(r) for r in rows[: request.limit]]
    page.reverse()
    return History(messages=page, has_more=len(rows) > request.limit)
