"""Accounts, sessions and tokens: register, login, refresh, logout; the caller's account,
sessions and password; the user list.

Every login is a session (a row of `sessions`): its refresh tokens are one family (the
family id is the session id) and its access tokens carry its id. Access tokens are
checked against the process's SessionCache, not the database (handlers/base.py:
authenticate). A refresh token is recorded as a hash when issued and spent once; a
second use revokes its session. Revoking a session is committed first, then published
on the bus (Node.revoke): every process forgets it and closes its sockets with 1008.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from asyncpg import Record
from msgspec import UNSET

from chatd import auth
from chatd.handlers import blocks, changes, files, groups
from chatd.handlers.base import Context, file_id_text, member_from_row
from chatd.node import Node
from chatd.protocol import (
    EMAIL_TAKEN,
    FORBIDDEN,
    INVALID,
    INVALID_CREDENTIALS,
    MAX_DEVICE_CHARS,
    MAX_PASSWORD_CHARS,
    MAX_USER_NAME_CHARS,
    MIN_PASSWORD_CHARS,
    NOT_FOUND,
    RATE_LIMITED,
    UNAUTHORIZED,
    ChangePassword,
    Chat,
    ChatError,
    ChatUpdated,
    DeleteMe,
    Export,
    ExportedChat,
    ExportMe,
    GetMe,
    ListBlocks,
    ListSessions,
    ListUsers,
    Login,
    Logout,
    Me,
    Message,
    MessageUpdated,
    Refresh,
    Register,
    RegisterResponse,
    RevokeSession,
    SessionInfo,
    SessionList,
    TokenPair,
    UpdateMe,
    UserList,
    UserUpdated,
    clean_text,
)
from chatd.ratelimit import take_all
from chatd.revocations import Revocation
from chatd.store import MESSAGE_COLUMNS, contacts_of, message_from_row
from chatd.text import InvalidEmail, email_key, normalize_email


def valid_email(raw: str, normalize: Callable[[str], str]) -> str:
    """`raw` through `normalize` (chatd.text), its refusal as `invalid`."""
    try:
        return normalize(raw)
    except InvalidEmail as exc:
        raise ChatError(INVALID, str(exc)) from None


LOCAL_ACCOUNTS_OFF = "local accounts are switched off here: sign in through the app"


async def register(ctx: Context, action: Register) -> RegisterResponse:
    if not ctx.node.settings.local_accounts:
        raise ChatError(FORBIDDEN, LOCAL_ACCOUNTS_OFF)
    name = clean_text(action.name, "name", min_len=1, max_len=MAX_USER_NAME_CHARS)
    email = valid_email(action.email, normalize_email)
    check_password(action.password)
    wait = await ctx.node.limits.register.take(ctx.peer)
    if wait:
        raise ChatError(
            RATE_LIMITED, "too many registrations from this address; retry later", retry_after=wait
        )
    password_hash = await auth.hash_password(action.password)
    user_id = await ctx.node.pool.fetchval(
        "INSERT INTO users (name, email, password_hash) VALUES ($1, $2, $3)"
        " ON CONFLICT (email) DO NOTHING RETURNING id",
        name,
        email,
        password_hash,
    )
    if user_id is None:
        raise ChatError(EMAIL_TAKEN, "a user with this email exists")
    return RegisterResponse(user_uuid=str(user_id), name=name, email=email)


def check_password(password: str) -> None:
    if not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise ChatError(
            INVALID, f"password must be {MIN_PASSWORD_CHARS}..{MAX_PASSWORD_CHARS} characters"
        )


async def login(ctx: Context, action: Login) -> TokenPair:
    if not ctx.node.settings.local_accounts:
        raise ChatError(FORBIDDEN, LOCAL_ACCOUNTS_OFF)
    email = valid_email(action.email, email_key)
    limits = ctx.node.limits
    # Failed attempts count, per email and per address. Each attempt takes its token
    # before the password is checked (so parallel guesses cannot all slip through) and a
    # success gives it back. The email's bucket does not depend on the account existing,
    # and a limited attempt looks at nothing: it tells nobody whether the email is known.
    attempt = [
        (limits.login_email, email),  # email_key bounds its length
        (limits.login_ip, ctx.peer),
    ]
    wait = await take_all(attempt)
    if wait:
        raise ChatError(RATE_LIMITED, "too many failed logins; retry later", retry_after=wait)
    try:
        row = await ctx.node.pool.fetchrow(
            # A bot has no password; one an admin set does not let it log in either.
            "SELECT id, password_hash, disabled_at FROM users WHERE email = $1 AND NOT is_bot",
            email,
        )
        # verify_password runs even for unknown emails, so timing does not tell them apart.
        verified = await auth.verify_password(row and row["password_hash"], action.password)
    except BaseException:
        # The database (or the server) failed, not the password: that attempt is not a guess.
        for limiter, key in attempt:
            await limiter.give_back(key)
        raise
    if not verified or not row:
        raise ChatError(INVALID_CREDENTIALS, "wrong email or password")
    for limiter, key in attempt:
        await limiter.give_back(key)
    if row["disabled_at"] is not None:  # told only to whoever knows the password
        raise ChatError(FORBIDDEN, "this account is disabled")
    device = device_name(action.device, ctx.user_agent)
    session_id = uuid.uuid4()
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO sessions (id, user_id, device, ip) VALUES ($1, $2, $3, $4)",
            session_id,
            row["id"],
            device,
            ctx.peer[:64],
        )
        crowded = await conn.fetch(_REVOKE_CROWDED, row["id"], MAX_SESSIONS_PER_USER)
    if crowded:
        await ctx.node.revoke(Revocation(row["id"], tuple(r["id"] for r in crowded)))
    return await _issue_pair(ctx, row["id"], session_id)


# A user has at most this many live sessions: a new login signs out the least recently
# seen one past it (a script logging in in a loop cannot grow the table without bound).
MAX_SESSIONS_PER_USER = 100

_REVOKE_CROWDED = """
UPDATE sessions SET revoked_at = now()
WHERE id IN (
    SELECT id FROM sessions WHERE user_id = $1 AND revoked_at IS NULL AND kind = 'login'
    ORDER BY last_seen_at DESC, created_at DESC OFFSET $2
)
RETURNING id
"""

# Browsers and OSes a User-Agent names, first match wins (Edge and Opera also say Chrome,
# Chrome also says Safari; iOS says "like Mac OS X").
_BROWSERS = (
    ("Edg/", "Edge"),
    ("OPR/", "Opera"),
    ("Firefox/", "Firefox"),
    ("Chrome/", "Chrome"),
    ("Safari/", "Safari"),
)
_SYSTEMS = (
    ("Android", "Android"),
    ("iPhone", "iPhone"),
    ("iPad", "iPad"),
    ("Windows", "Windows"),
    ("Mac OS X", "macOS"),
    ("CrOS", "ChromeOS"),
    ("Linux", "Linux"),
)


def device_name(given: str | None, user_agent: str) -> str:
    """The session's name: the one given, else "Browser on OS" from the User-Agent, else
    the User-Agent's product (`python-httpx/0.28.1`), else "unknown device"."""
    if given is not None and given.strip():
        return clean_text(given, "device", min_len=1, max_len=MAX_DEVICE_CHARS)
    browser = next((name for mark, name in _BROWSERS if mark in user_agent), None)
    system = next((name for mark, name in _SYSTEMS if mark in user_agent), None)
    if browser and system:
        return f"{browser} on {system}"
    product = user_agent.split(" ", 1)[0].replace("\x00", "")[:MAX_DEVICE_CHARS]
    return product or "unknown device"


async def refresh(ctx: Context, action: Refresh) -> TokenPair:
    try:
        auth.read_token(ctx.node.settings.secret, action.refresh_token, auth.REFRESH)
    except auth.InvalidToken:
        raise ChatError(UNAUTHORIZED, "invalid or expired refresh token") from None
    digest = auth.token_digest(action.refresh_token)
    async with ctx.node.pool.acquire() as conn:
        spent = await conn.fetchrow(_SPEND_REFRESH, digest)
        if spent is None:
            # A second use means the token leaked: revoke the login it came from.
            leaked = await conn.fetchrow(_REVOKE_FAMILY, digest)
            if leaked is not None:
                await ctx.node.revoke(Revocation(leaked["user_id"], (leaked["id"],)))
            raise ChatError(UNAUTHORIZED, "refresh token already used or revoked")
    return await _issue_pair(ctx, spent["user_id"], spent["family_id"])


# Spends a refresh token of a live session, and marks the session seen.
_SPEND_REFRESH = """
WITH spent AS (
    UPDATE refresh_tokens t SET used_at = now()
    FROM sessions s
    WHERE t.token_hash = $1 AND t.used_at IS NULL AND t.expires_at > now()
      AND s.id = t.family_id AND s.revoked_at IS NULL
    RETURNING t.user_id, t.family_id
), seen AS (
    UPDATE sessions SET last_seen_at = now() WHERE id = (SELECT family_id FROM spent)
)
SELECT user_id, family_id FROM spent
"""

_REVOKE_FAMILY = """
UPDATE sessions SET revoked_at = now()
WHERE id = (SELECT family_id FROM refresh_tokens WHERE token_hash = $1) AND revoked_at IS NULL
RETURNING id, user_id
"""


async def _issue_pair(ctx: Context, user_id: uuid.UUID, session_id: uuid.UUID) -> TokenPair:
    settings = ctx.node.settings
    refresh_token = auth.issue_token(
        settings.secret, user_id, auth.REFRESH, settings.refresh_token_ttl, session_id
    )
    await ctx.node.pool.execute(
        "INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at)"
        " VALUES ($1, $2, $3, $4)",
        auth.token_digest(refresh_token),
        user_id,
        session_id,
        datetime.now(UTC) + timedelta(seconds=settings.refresh_token_ttl),
    )
    return TokenPair(
        access_token=auth.issue_token(
            settings.secret, user_id, auth.ACCESS, settings.access_token_ttl, session_id
        ),
        refresh_token=refresh_token,
        expires_in=settings.access_token_ttl,
    )


async def me(ctx: Context, action: GetMe) -> Me:
    row = await ctx.node.pool.fetchrow(
        "SELECT u.id, u.name, u.email, u.created_at, u.avatar, u.share_presence, u.is_bot,"
        f" b.id AS bot_id, b.username AS bot_username, {_PICTURE}"
        " FROM users u LEFT JOIN bots b ON b.user_id = u.id WHERE u.id = $1",
        ctx.user_id,
    )
    if row is None:
        raise ChatError(UNAUTHORIZED, "the token's user no longer exists")
    return _me(row)


# The picture claim of a user who comes from the app's tokens (chatd/identity.py).
_PICTURE = "(SELECT picture FROM external_identities i WHERE i.user_id = $1) AS picture"


def _me(row: Record) -> Me:
    return Me(
        user_uuid=str(row["id"]),
        name=row["name"],
        email=row["email"],
        created_at=row["created_at"],
        avatar=file_id_text(row["avatar"]),
        share_presence=row["share_presence"],
        is_bot=row["is_bot"],
        bot_id=row["bot_id"],
        bot_username=row["bot_username"],
        picture=row["picture"],
    )


_UPDATE_ME = f"""
UPDATE users SET name = coalesce($2, name), avatar = CASE WHEN $3 THEN $4 ELSE avatar END,
                 share_presence = coalesce($5, share_presence)
WHERE id = $1
RETURNING id, name, email, created_at, avatar, share_presence, is_bot, {_PICTURE},
          (SELECT id FROM bots WHERE user_id = users.id) AS bot_id,
          (SELECT username FROM bots WHERE user_id = users.id) AS bot_username,
          (SELECT (name, avatar) FROM users WHERE id = $1) IS DISTINCT FROM (name, avatar)
          AS changed,
          (SELECT share_presence FROM users WHERE id = $1) IS DISTINCT FROM share_presence
          AS presence_changed
"""


async def update_me(ctx: Context, action: UpdateMe) -> Me:
    """Change what is given; tell everyone who shares a chat with you when your name or
    avatar changed (counted as a change: it fans out)."""
    name = None
    if action.name is not None:
        name = clean_text(action.name, "name", min_len=1, max_len=MAX_USER_NAME_CHARS)
    set_avatar = action.avatar is not UNSET
    async with changes.counted_change(ctx), ctx.node.pool.acquire() as conn, conn.transaction():
        avatar = None
        if isinstance(action.avatar, str):
            avatar = await files.claim_image(conn, ctx.user_id, action.avatar, "avatar")
        row = await conn.fetchrow(
            _UPDATE_ME, ctx.user_id, name, set_avatar, avatar, action.share_presence
        )
        if row is None:
            raise ChatError(UNAUTHORIZED, "the token's user no longer exists")
        contacts = []
        if row["changed"]:
            contacts = await contacts_of(conn, ctx.user_id)
    if row["changed"]:
        await ctx.node.publish({ctx.user_id, *contacts}, UserUpdated(member_from_row(row)))
    if row["presence_changed"]:  # committed: tell the contacts what they may see now
        await ctx.node.presence.share_changed(ctx.user_id)
    return _me(row)


async def change_password(ctx: Context, action: ChangePassword) -> None:
    check_password(action.new)
    await check_current_password(ctx, action.current)
    password_hash = await auth.hash_password(action.new)
    async with ctx.node.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE users SET password_hash = $2 WHERE id = $1", ctx.user_id, password_hash
        )
        others = await conn.fetch(
            "UPDATE sessions SET revoked_at = now()"
            " WHERE user_id = $1 AND id <> $2 AND revoked_at IS NULL RETURNING id",
            ctx.user_id,
            ctx.session_id,
        )
    if others:
        await ctx.node.revoke(Revocation(ctx.user_id, tuple(r["id"] for r in others)))


async def check_current_password(ctx: Context, password: str) -> None:
    """`invalid_credentials` (403) unless `password` is the caller's. Wrong guesses (with a
    stolen access token, say) count as failed logins for the account's email."""
    row = await ctx.node.pool.fetchrow(
        "SELECT email, password_hash FROM users WHERE id = $1", ctx.user_id
    )
    if row is None:
        raise ChatError(UNAUTHORIZED, "the token's user no longer exists")
    limiter = ctx.node.limits.login_email
    wait = await limiter.take(row["email"])
    if wait:
        raise ChatError(RATE_LIMITED, "too many wrong passwords; retry later", retry_after=wait)
    if not await auth.verify_password(row["password_hash"], password):
        raise ChatError(INVALID_CREDENTIALS, "wrong password", 403)
    await limiter.give_back(row["email"])


_SESSIONS = """
SELECT id, device, ip, created_at, last_seen_at FROM sessions
WHERE user_id = $1 AND revoked_at IS NULL AND kind = 'login'
  AND last_seen_at > now() - make_interval(secs => $2)
ORDER BY last_seen_at DESC, created_at DESC
LIMIT $3
"""


async def list_sessions(ctx: Context, action: ListSessions) -> SessionList:
    # A session not seen for the refresh token's lifetime has no token left that works.
    rows = await ctx.node.pool.fetch(
        _SESSIONS, ctx.user_id, float(ctx.node.settings.refresh_token_ttl), MAX_SESSIONS_PER_USER
    )
    return SessionList(
        [
            SessionInfo(
                id=str(r["id"]),
                device=r["device"],
                ip=r["ip"],
                created_at=r["created_at"],
                last_seen_at=r["last_seen_at"],
                current=r["id"] == ctx.session_id,
            )
            for r in rows
        ]
    )


async def revoke_session(ctx: Context, action: RevokeSession) -> None:
    try:
        session_id = uuid.UUID(action.session_id)
    except ValueError:
        raise ChatError(NOT_FOUND, "no such session") from None
    revoked = await ctx.node.pool.fetchval(
        "UPDATE sessions SET revoked_at = now()"
        " WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL RETURNING id",
        session_id,
        ctx.user_id,
    )
    if revoked is None:  # another user's session is as unknown as none
        raise ChatError(NOT_FOUND, "no such session")
    await ctx.node.revoke(Revocation(ctx.user_id, (session_id,)))


async def logout(ctx: Context, action: Logout) -> None:
    if ctx.session_id is None:  # an external token (chatd/identity.py): the app signs out
        raise ChatError(FORBIDDEN, "this token is the app's: sign out through the app")
    await ctx.node.pool.execute(
        "UPDATE sessions SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
        ctx.session_id,
    )
    await ctx.node.revoke(Revocation(ctx.user_id, (ctx.session_id,)))


# q matches a name by prefix, an email only whole: a prefix search on emails would let
# any user read every address out, a character at a time.
_USERS_PAGE = """
SELECT id, name, avatar, is_bot FROM users
WHERE deleted_at IS NULL AND ($1::text IS NULL OR lower(name) LIKE $1 || '%' OR email = $4)
  AND ($2::uuid IS NULL OR (name, id) > (SELECT name, id FROM users WHERE id = $2))
ORDER BY name, id
LIMIT $3
"""


async def users_list(ctx: Context, action: ListUsers) -> UserList:
    q = action.q or None
    email = None
    if q is not None:
        if "@" in q:
            with contextlib.suppress(InvalidEmail):  # no account has such an address
                email = email_key(q)
        q = q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    rows = await ctx.node.pool.fetch(_USERS_PAGE, q, action.after, action.limit, email)
    return UserList([member_from_row(r) for r in rows])


# --- deleting and exporting the account ----------------------------------------------------

DELETED_NAME = "Deleted account"

_ERASE_PROFILE = """
UPDATE users SET name = $2, email = 'deleted-' || id || '@deleted.invalid', password_hash = '!',
                 deleted_at = now()
WHERE id = $1
"""

# The chats to lock: every chat of the user's, and with erase every chat holding a message
# of theirs (they may have left it since).
_CHATS_TOUCHED = """
SELECT cm.chat_id AS id, cm.role, c.type FROM chat_members cm JOIN chats c ON c.id = cm.chat_id
WHERE cm.user_id = $1
UNION
SELECT DISTINCT m.chat_id, NULL, NULL FROM messages m
WHERE $2::boolean AND m.sender_id = $1 AND NOT m.deleted
"""


async def delete_me(ctx: Context, action: DeleteMe) -> None:
    """Delete the caller's account (delete_account), once the password is right."""
    await check_current_password(ctx, action.password)
    await delete_account(ctx.node, ctx.user_id)


async def delete_account(node: Node, user_id: uuid.UUID) -> None:
    """Delete an account, in one transaction: its groups are left as leave_chat leaves
    them (ownership to the heir), its messages kept under "Deleted account" or erased for
    everyone (CHATD_DELETED_USER_MESSAGES), its profile erased, its blocks dropped and its
    sessions revoked. After the commit its sockets close (1008) on every node and the
    members of its chats are told. An account deleted already: nothing happens."""
    erase = node.settings.deleted_user_messages == "erase"
    departures: list[groups.Departure] = []
    erased: list[tuple[list[Message], Chat | None, list[uuid.UUID]]] = []
    async with node.pool.acquire() as conn, conn.transaction():
        # The users row first: two deletions of one account take their turns here.
        if not await conn.fetchval(
            "SELECT deleted_at IS NULL FROM users WHERE id = $1 FOR UPDATE", user_id
        ):
            return
        touched = await conn.fetch(_CHATS_TOUCHED, user_id, erase)
        roles = {r["id"]: r["role"] for r in touched if r["role"] is not None}
        types = {r["id"]: r["type"] for r in touched if r["type"] is not None}
        chat_ids = sorted({r["id"] for r in touched})
        # In id order, as the MessageWriter locks them: no deadlock with a batch of sends.
        await conn.execute(
            "SELECT 1 FROM chats WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE", chat_ids
        )
        for chat_id in chat_ids:
            if erase:
                erased.append(await changes.erase_messages_of(conn, chat_id, user_id))
            if types.get(chat_id) == "group":
                departures.append(await groups.depart(conn, chat_id, user_id, roles[chat_id]))
        # Private chats stay with the other member, who sees "Deleted account" in them.
        await conn.execute("DELETE FROM blocks WHERE blocker_id = $1 OR blocked_id = $1", user_id)
        await conn.execute(
            "UPDATE sessions SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
            user_id,
        )
        await conn.execute(_ERASE_PROFILE, user_id, DELETED_NAME)
    await node.revoke(Revocation(user_id))
    # Its bots go with it; a bot's username is free again once it is gone.
    for bot_user in await node.pool.fetch(
        "DELETE FROM bots WHERE owner_id = $1 OR user_id = $1 RETURNING user_id", user_id
    ):
        if bot_user["user_id"] != user_id:
            await delete_account(node, bot_user["user_id"])
    for tombstones, chat_after, members in erased:
        for tombstone in tombstones:
            await node.publish(members, MessageUpdated(tombstone))
        if chat_after is not None:
            await node.publish(members, ChatUpdated(chat_after))
    for departure in departures:
        await groups.announce_departure(node, departure)


EXPORT_PAGE = 5000

_EXPORT_CHATS = """
SELECT c.id, c.type, c.name, cm.role, cm.joined_at
FROM chat_members cm JOIN chats c ON c.id = cm.chat_id
WHERE cm.user_id = $1 ORDER BY c.id
"""

_EXPORT_FILES = """
SELECT id, name, mime, size, width, height FROM files WHERE owner_id = $1 ORDER BY created_at, id
"""

_EXPORT_MESSAGES = f"""
SELECT {MESSAGE_COLUMNS}
FROM messages m JOIN chats c ON c.id = m.chat_id
WHERE m.sender_id = $1 AND NOT m.deleted AND m.id > $2
ORDER BY m.id
LIMIT $3
"""


async def export_me(ctx: Context, action: ExportMe) -> Export:
    """The caller's data: profile, sessions, blocks, chats, the files they uploaded (on the
    first page), and a page of their messages."""
    profile = await me(ctx, GetMe())
    sessions = await list_sessions(ctx, ListSessions())
    blocked = await blocks.list_blocks(ctx, ListBlocks())
    async with ctx.node.pool.acquire() as conn:
        chats = await conn.fetch(_EXPORT_CHATS, ctx.user_id)
        rows = await conn.fetch(_EXPORT_MESSAGES, ctx.user_id, action.after or 0, EXPORT_PAGE + 1)
        uploaded = [] if action.after else await conn.fetch(_EXPORT_FILES, ctx.user_id)
    messages = [message_from_row(r) for r in rows[:EXPORT_PAGE]]
    has_more = len(rows) > EXPORT_PAGE
    return Export(
        exported_at=datetime.now(UTC),
        profile=profile,
        sessions=sessions.sessions,
        blocked=blocked.users,
        chats=[
            ExportedChat(
                id=r["id"], type=r["type"], name=r["name"], role=r["role"], joined_at=r["joined_at"]
            )
            for r in chats
        ],
        files=[files.attachment_from_row(f) for f in uploaded],
        messages=messages,
        has_more=has_more,
        next_after=messages[-1].id if has_more else None,
    )
