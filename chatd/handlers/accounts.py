"""Accounts and tokens: register, login, refresh; the caller's account; the user list.

Access tokens are checked without the database (handlers/base.py: authenticate). A
refresh token is recorded as a hash when issued and spent once; a second use revokes
every token refreshed from the same login (its family).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from chatd import auth
from chatd.handlers.base import Context
from chatd.protocol import (
    EMAIL_TAKEN,
    INVALID,
    INVALID_CREDENTIALS,
    MAX_PASSWORD_CHARS,
    MAX_USER_NAME_CHARS,
    MIN_PASSWORD_CHARS,
    RATE_LIMITED,
    UNAUTHORIZED,
    ChatError,
    GetMe,
    ListUsers,
    Login,
    Me,
    Member,
    Refresh,
    Register,
    RegisterResponse,
    TokenPair,
    UserList,
    clean_text,
)
from chatd.ratelimit import take_all
from chatd.text import InvalidEmail, email_key, normalize_email


def valid_email(raw: str, normalize: Callable[[str], str]) -> str:
    """`raw` through `normalize` (chatd.text), its refusal as `invalid`."""
    try:
        return normalize(raw)
    except InvalidEmail as exc:
        raise ChatError(INVALID, str(exc)) from None


async def register(ctx: Context, action: Register) -> RegisterResponse:
    name = clean_text(action.name, "name", min_len=1, max_len=MAX_USER_NAME_CHARS)
    email = valid_email(action.email, normalize_email)
    if not MIN_PASSWORD_CHARS <= len(action.password) <= MAX_PASSWORD_CHARS:
        raise ChatError(
            INVALID, f"password must be {MIN_PASSWORD_CHARS}..{MAX_PASSWORD_CHARS} characters"
        )
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


async def login(ctx: Context, action: Login) -> TokenPair:
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
            "SELECT id, password_hash FROM users WHERE email = $1", email
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
    return await _issue_pair(ctx, row["id"], family_id=uuid.uuid4())


async def refresh(ctx: Context, action: Refresh) -> TokenPair:
    try:
        auth.read_token(ctx.node.settings.secret, action.refresh_token, auth.REFRESH)
    except auth.InvalidToken:
        raise ChatError(UNAUTHORIZED, "invalid or expired refresh token") from None
    digest = auth.token_digest(action.refresh_token)
    async with ctx.node.pool.acquire() as conn:
        spent = await conn.fetchrow(
            "UPDATE refresh_tokens SET used_at = now()"
            " WHERE token_hash = $1 AND used_at IS NULL AND expires_at > now()"
            " RETURNING user_id, family_id",
            digest,
        )
        if spent is None:
            # A second use means the token leaked: revoke every token refreshed from its login.
            await conn.execute(
                "UPDATE refresh_tokens SET used_at = now() WHERE used_at IS NULL AND family_id ="
                " (SELECT family_id FROM refresh_tokens WHERE token_hash = $1)",
                digest,
            )
            raise ChatError(UNAUTHORIZED, "refresh token already used or revoked")
    return await _issue_pair(ctx, spent["user_id"], spent["family_id"])


async def _issue_pair(ctx: Context, user_id: uuid.UUID, family_id: uuid.UUID) -> TokenPair:
    settings = ctx.node.settings
    refresh_token = auth.issue_token(
        settings.secret, user_id, auth.REFRESH, settings.refresh_token_ttl
    )
    await ctx.node.pool.execute(
        "INSERT INTO refresh_tokens (token_hash, user_id, family_id, expires_at)"
        " VALUES ($1, $2, $3, $4)",
        auth.token_digest(refresh_token),
        user_id,
        family_id,
        datetime.now(UTC) + timedelta(seconds=settings.refresh_token_ttl),
    )
    return TokenPair(
        access_token=auth.issue_token(
            settings.secret, user_id, auth.ACCESS, settings.access_token_ttl
        ),
        refresh_token=refresh_token,
        expires_in=settings.access_token_ttl,
    )


async def me(ctx: Context, action: GetMe) -> Me:
    row = await ctx.node.pool.fetchrow(
        "SELECT id, name, email, created_at FROM users WHERE id = $1", ctx.user_id
    )
    if row is None:
        raise ChatError(UNAUTHORIZED, "the token's user no longer exists")
    return Me(
        user_uuid=str(row["id"]), name=row["name"], email=row["email"], created_at=row["created_at"]
    )


# q matches a name by prefix, an email only whole: a prefix search on emails would let
# any user read every address out, a character at a time.
_USERS_PAGE = """
SELECT id, name FROM users
WHERE ($1::text IS NULL OR lower(name) LIKE $1 || '%' OR email = $4)
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
    return UserList([Member(user_uuid=str(r["id"]), name=r["name"]) for r in rows])
