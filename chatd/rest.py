"""The REST routes: accounts, tokens, users, history and health, each with its SQL, and
the chat and message routes, which run the same handlers as the socket's actions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from chatd import auth
from chatd.db import is_unavailable
from chatd.handlers import chats, groups, messages, reads
from chatd.handlers.base import MESSAGE_COLUMNS, Context, message_from_row, rate_limited
from chatd.metrics import ERRORS
from chatd.openapi import Operation, Param
from chatd.protocol import (
    BAD_REQUEST,
    DATABASE_UNAVAILABLE_MESSAGE,
    INVALID,
    NOT_FOUND,
    TOO_DEEP,
    UNAUTHORIZED,
    UNAVAILABLE,
    AddMembers,
    AddMembersRequest,
    Chat,
    ChatError,
    ChatOverview,
    ChatPage,
    CreateChat,
    CreateChatRequest,
    DeleteChat,
    ErrorBody,
    ErrorResponse,
    GetChat,
    GetMessage,
    Health,
    History,
    ListChats,
    LoginRequest,
    Me,
    Member,
    Message,
    Readiness,
    ReadRequest,
    ReadUpto,
    RefreshRequest,
    RegisterRequest,
    RegisterResponse,
    RemoveMember,
    RenameChat,
    RenameChatRequest,
    SendMessage,
    SendMessageRequest,
    SetRole,
    SetRoleRequest,
    TokenPair,
    UserList,
    clean_text,
    encode,
    refuse_nul,
    retry_after_ms,
)
from chatd.ratelimit import Limits, take_all
from chatd.text import InvalidEmail, email_key, normalize_email

log = logging.getLogger("chatd")

MAX_BODY_BYTES = 64 * 1024
MAX_PAGE_SIZE = 200
MAX_BIGINT = 2**63 - 1

T = TypeVar("T")


# --- plumbing ----------------------------------------------------------------------------


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """`value` as a JSON body, ending with a newline (so curl's output ends its line)."""
    return Response(encode(value) + b"\n", status, headers, media_type="application/json")


def error_response(
    code: str, message: str, status: int, retry_after: float | None = None
) -> Response:
    ERRORS.labels(code).inc()
    if retry_after is None:
        return json_response(ErrorResponse(ErrorBody(code, message)), status)
    body = ErrorBody(code, message, retry_after_ms=retry_after_ms(retry_after))
    # Retry-After is in whole seconds: round up, so a client that obeys it is let in.
    return json_response(ErrorResponse(body), status, {"Retry-After": str(math.ceil(retry_after))})


async def chat_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ChatError)
    response = error_response(exc.code, exc.message, exc.status, exc.retry_after)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def unavailable_handler(request: Request, exc: Exception) -> Response:
    """The database is down or unreachable: a client should come back shortly."""
    if request.scope["type"] != "http" or not is_unavailable(exc):
        # A socket handles its own (uvicorn ignores a client gone at accept); anything
        # else is a real bug: a 500 and its traceback.
        raise exc
    log.warning("database unavailable (%s %s): %r", request.method, request.url.path, exc)
    response = error_response(UNAVAILABLE, DATABASE_UNAVAILABLE_MESSAGE, 503)
    response.headers["Retry-After"] = "1"
    return response


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: NOT_FOUND, 405: "method_not_allowed"}
    return error_response(codes.get(exc.status_code, BAD_REQUEST), exc.detail, exc.status_code)


async def read_body(request: Request, kind: type[T]) -> T:
    # Refuse a big body as soon as it is announced or read, never after buffering all of it.
    too_big = ChatError(INVALID, "request body exceeds 64 KiB", 413)
    length = request.headers.get("content-length", "")
    if length.isascii() and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        value = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise ChatError(INVALID, str(exc), 422) from None
    except msgspec.DecodeError:
        raise ChatError(BAD_REQUEST, "request body is not valid JSON", 400) from None
    except RecursionError:
        raise ChatError(BAD_REQUEST, TOO_DEEP, 400) from None
    refuse_nul(value)
    return value


def current_user(request: Request) -> uuid.UUID:
    token = auth.bearer_token(request.headers.get("authorization"))
    if token is None:
        raise ChatError(UNAUTHORIZED, "missing bearer access token", 401)
    try:
        return auth.read_token(request.app.state.settings.secret, token, auth.ACCESS)
    except auth.InvalidToken:
        raise ChatError(UNAUTHORIZED, "invalid or expired access token", 401) from None


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ChatError(INVALID, f"{name} must be an integer", 422) from None
    if not low <= value <= high:
        raise ChatError(INVALID, f"{name} must be {low}..{high}", 422)
    return value


def pool(request: Request) -> asyncpg.Pool:
    return request.app.state.pool


def limits(request: Request) -> Limits:
    return request.app.state.limits


def client_address(request: Request) -> str:
    """The client's IP: uvicorn takes it from X-Forwarded-For for CHATD_FORWARDED_ALLOW_IPS."""
    return request.client.host if request.client else "unknown"


# --- accounts and tokens -----------------------------------------------------------------


def valid_email(raw: str, normalize: Callable[[str], str]) -> str:
    """`raw` through `normalize` (chatd.text), its refusal as 422 invalid."""
    try:
        return normalize(raw)
    except InvalidEmail as exc:
        raise ChatError(INVALID, str(exc), 422) from None


async def register(request: Request) -> Response:
    body = await read_body(request, RegisterRequest)
    name = clean_text(body.name, "name", min_len=1, max_len=64)
    email = valid_email(body.email, normalize_email)
    if not 8 <= len(body.password) <= 128:
        raise ChatError(INVALID, "password must be 8..128 characters", 422)
    wait = await limits(request).register.take(client_address(request))
    if wait:
        raise rate_limited("too many registrations from this address; retry later", wait)
    password_hash = await auth.hash_password(body.password)
    user_id = await pool(request).fetchval(
        "INSERT INTO users (name, email, password_hash) VALUES ($1, $2, $3)"
        " ON CONFLICT (email) DO NOTHING RETURNING id",
        name,
        email,
        password_hash,
    )
    if user_id is None:
        raise ChatError("email_taken", "a user with this email exists", 409)
    return json_response(RegisterResponse(user_uuid=str(user_id), name=name, email=email), 201)


async def login(request: Request) -> Response:
    body = await read_body(request, LoginRequest)
    email = valid_email(body.email, email_key)
    # Failed attempts count, per email and per address. Each attempt takes its token
    # before the password is checked (so parallel guesses cannot all slip through) and a
    # success gives it back. The email's bucket does not depend on the account existing,
    # and a limited attempt looks at nothing: it tells nobody whether the email is known.
    attempt = [
        (limits(request).login_email, email),  # email_key bounds its length
        (limits(request).login_ip, client_address(request)),
    ]
    wait = await take_all(attempt)
    if wait:
        raise rate_limited("too many failed logins; retry later", wait)
    try:
        row = await pool(request).fetchrow(
            "SELECT id, password_hash FROM users WHERE email = $1", email
        )
        # verify_password runs even for unknown emails, so timing does not tell them apart.
        verified = await auth.verify_password(row and row["password_hash"], body.password)
    except BaseException:
        # The database (or the server) failed, not the password: that attempt is not a guess.
        for limiter, key in attempt:
            await limiter.give_back(key)
        raise
    if not verified or not row:
        raise ChatError("invalid_credentials", "wrong email or password", 401)
    for limiter, key in attempt:
        await limiter.give_back(key)
    return json_response(await _issue_pair(request, row["id"], family_id=uuid.uuid4()))


async def refresh(request: Request) -> Response:
    body = await read_body(request, RefreshRequest)
    settings = request.app.state.settings
    try:
        auth.read_token(settings.secret, body.refresh_token, auth.REFRESH)
    except auth.InvalidToken:
        raise ChatError(UNAUTHORIZED, "invalid or expired refresh token", 401) from None
    digest = auth.token_digest(body.refresh_token)
    async with pool(request).acquire() as conn:
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
            raise ChatError(UNAUTHORIZED, "refresh token already used or revoked", 401)
    return json_response(await _issue_pair(request, spent["user_id"], spent["family_id"]))


async def _issue_pair(request: Request, user_id: uuid.UUID, family_id: uuid.UUID) -> TokenPair:
    settings = request.app.state.settings
    refresh_token = auth.issue_token(
        settings.secret, user_id, auth.REFRESH, settings.refresh_token_ttl
    )
    await pool(request).execute(
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


# --- users -------------------------------------------------------------------------------


async def me(request: Request) -> Response:
    user_id = current_user(request)
    row = await pool(request).fetchrow(
        "SELECT id, name, email, created_at FROM users WHERE id = $1", user_id
    )
    if row is None:
        raise ChatError(UNAUTHORIZED, "the token's user no longer exists", 401)
    return json_response(
        Me(
            user_uuid=str(row["id"]),
            name=row["name"],
            email=row["email"],
            created_at=row["created_at"],
        )
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


async def users_list(request: Request) -> Response:
    current_user(request)
    limit = query_int(request, "limit", 50, 1, MAX_PAGE_SIZE)
    q = request.query_params.get("q") or None
    email = None
    if q is not None:
        if len(q) > 254 or "\x00" in q:
            raise ChatError(INVALID, "q must be at most 254 characters", 422)
        if "@" in q:
            with contextlib.suppress(InvalidEmail):  # no account has such an address
                email = email_key(q)
        q = q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    after = request.query_params.get("after")
    try:
        after_id = uuid.UUID(after) if after is not None else None
    except ValueError:
        raise ChatError(INVALID, "after must be a user_uuid", 422) from None
    rows = await pool(request).fetch(_USERS_PAGE, q, after_id, limit, email)
    return json_response(UserList([Member(user_uuid=str(r["id"]), name=r["name"]) for r in rows]))


# --- history -----------------------------------------------------------------------------

_NEWEST_FIRST = f"""
SELECT {MESSAGE_COLUMNS}
FROM messages m JOIN chats c ON c.id = m.chat_id
WHERE m.chat_id = $1 AND m.seq < $2
ORDER BY m.seq DESC
LIMIT $3 OFFSET $4
"""


# `before` is a keyset cursor on message ids: "older than this id", whether or not that id
# is a message of this chat. Within a chat ids grow with seq (a chat's messages are inserted
# in seq order under its row lock, and ids come from one sequence), so "id < before" is
# "seq < the seq bound below". The bound is found by primary key when `before` is a
# message of this chat (the cursor a client normally holds); otherwise by walking the
# chat's newest messages down to the first older one, no more than a deep page= OFFSET
# reads; a cursor at or below the chat's first id ("before=1") is answered by that first
# message alone. COALESCE evaluates each subquery only when those before it found nothing.
_BELOW_SEQ = """
SELECT coalesce(
    (SELECT seq FROM messages WHERE id = $2 AND chat_id = $1),
    (SELECT 1 WHERE $2 <= (SELECT id FROM messages WHERE chat_id = $1 ORDER BY seq LIMIT 1)),
    (SELECT seq + 1 FROM messages WHERE chat_id = $1 AND id < $2 ORDER BY seq DESC LIMIT 1),
    1
)
"""


async def history(request: Request) -> Response:
    user_id = current_user(request)
    chat_id = request.path_params["chat_id"]
    params = request.query_params
    if "before" in params:
        size = query_int(request, "limit", 50, 1, MAX_PAGE_SIZE)
        before = query_int(request, "before", 0, 1, MAX_BIGINT)
        offset = 0
    else:
        size = query_int(request, "page_size", 50, 1, MAX_PAGE_SIZE)
        page = query_int(request, "page", 1, 1, 1_000_000)
        offset = (page - 1) * size
        before = None

    async with pool(request).acquire() as conn:
        last_seq = None
        if chat_id <= MAX_BIGINT:
            last_seq = await conn.fetchval(
                "SELECT c.last_seq FROM chats c"
                " JOIN chat_members cm ON cm.chat_id = c.id AND cm.user_id = $2 WHERE c.id = $1",
                chat_id,
                user_id,
            )
        if last_seq is None:
            raise ChatError(NOT_FOUND, "no such chat", 404)
        below_seq = last_seq + 1
        if before is not None:
            below_seq = await conn.fetchval(_BELOW_SEQ, chat_id, before)
        rows = await conn.fetch(_NEWEST_FIRST, chat_id, below_seq, size + 1, offset)

    page_rows = rows[:size]
    page_rows.reverse()
    return json_response(
        History(messages=[message_from_row(r) for r in page_rows], has_more=len(rows) > size)
    )


# --- chats and messages: the socket's handlers, over HTTP --------------------------------


def context(request: Request) -> Context:
    state = request.app.state
    return Context(
        state.pool, state.bus, current_user(request), state.typing_gate, state.writer, state.limits
    )


def path_id(request: Request, name: str) -> int:
    """An integer path parameter; ids beyond bigint cannot exist."""
    value = request.path_params[name]
    if value > MAX_BIGINT:
        raise ChatError(NOT_FOUND, f"no such {name.removesuffix('_id')}", 404)
    return value


def no_content() -> Response:
    return Response(status_code=204)


async def list_chats(request: Request) -> Response:
    ctx = context(request)
    action = ListChats(
        limit=query_int(request, "limit", 50, 1, MAX_PAGE_SIZE),
        before=query_int(request, "before", 0, 1, MAX_BIGINT) or None,
    )
    return json_response(await chats.list_chats(ctx, action))


async def create_chat(request: Request) -> Response:
    ctx = context(request)
    body = await read_body(request, CreateChatRequest)
    action = CreateChat(type=body.type, user_ids=body.user_ids, name=body.name)
    chat, created = await chats.create_or_find_chat(ctx, action)
    return json_response(chat, 201 if created else 200)


async def get_chat(request: Request) -> Response:
    ctx = context(request)
    return json_response(await chats.get_chat(ctx, GetChat(chat_id=path_id(request, "chat_id"))))


async def rename_chat(request: Request) -> Response:
    ctx = context(request)
    body = await read_body(request, RenameChatRequest)
    action = RenameChat(chat_id=path_id(request, "chat_id"), name=body.name)
    return json_response(await groups.rename_chat(ctx, action))


async def delete_chat(request: Request) -> Response:
    ctx = context(request)
    await groups.delete_chat(ctx, DeleteChat(chat_id=path_id(request, "chat_id")))
    return no_content()


async def add_members(request: Request) -> Response:
    ctx = context(request)
    body = await read_body(request, AddMembersRequest)
    action = AddMembers(chat_id=path_id(request, "chat_id"), user_ids=body.user_ids)
    return json_response(await groups.add_members(ctx, action))


async def remove_member(request: Request) -> Response:
    ctx = context(request)
    action = RemoveMember(
        chat_id=path_id(request, "chat_id"), user_uuid=request.path_params["user_uuid"]
    )
    await groups.remove_member(ctx, action)
    return no_content()


async def set_role(request: Request) -> Response:
    ctx = context(request)
    body = await read_body(request, SetRoleRequest)
    action = SetRole(
        chat_id=path_id(request, "chat_id"),
        user_uuid=request.path_params["user_uuid"],
        role=body.role,
    )
    return json_response(await groups.set_role(ctx, action))


async def send_message(request: Request) -> Response:
    ctx = context(request)
    body = await read_body(request, SendMessageRequest)
    client_msg_id = body.client_msg_id
    key = request.headers.get("idempotency-key")
    if key is not None:
        if not 1 <= len(key) <= 64:
            raise ChatError(INVALID, "Idempotency-Key must be 1..64 characters", 422)
        if client_msg_id is not None and client_msg_id != key:
            raise ChatError(INVALID, "Idempotency-Key and client_msg_id differ", 422)
        client_msg_id = key
    action = SendMessage(
        chat_id=path_id(request, "chat_id"), text=body.text, client_msg_id=client_msg_id
    )
    message, created = await messages.store_message(ctx, action)
    return json_response(message, 201 if created else 200)


async def get_message(request: Request) -> Response:
    ctx = context(request)
    action = GetMessage(message_id=path_id(request, "message_id"))
    return json_response(await messages.get_message(ctx, action))


async def mark_read(request: Request) -> Response:
    ctx = context(request)
    body = await read_body(request, ReadRequest)
    chat_id = path_id(request, "chat_id")
    return json_response(await reads.read_up_to(ctx, [body.up_to], chat_id=chat_id))


async def readyz(request: Request) -> Response:
    """Readiness for load balancers: the database answers, and Redis when configured."""
    state = request.app.state
    try:
        await asyncio.wait_for(state.pool.fetchval("SELECT 1"), 2)
        database = "ok"
    except Exception as exc:
        database = f"unavailable: {exc!r}"
    if state.settings.redis_url:
        redis = await state.bus.problem() or "ok"
    else:
        redis = "not configured"
    ready = database == "ok" and redis in ("ok", "not configured")
    body = Readiness("ready" if ready else "not ready", database=database, redis=redis)
    return json_response(body, 200 if ready else 503)


async def healthz(request: Request) -> Response:
    return json_response(Health("ok"))


OPERATIONS = [
    Operation(
        "POST",
        "/register",
        register,
        "Create an account",
        RegisterResponse,
        201,
        body=RegisterRequest,
        auth=False,
        errors=(400, 409, 413, 422, 429, 503),
    ),
    Operation(
        "POST",
        "/login",
        login,
        "Log in: get an access and a refresh token",
        TokenPair,
        body=LoginRequest,
        auth=False,
        errors=(400, 401, 413, 422, 429, 503),
    ),
    Operation(
        "POST",
        "/token/refresh",
        refresh,
        "Trade a refresh token for a new pair (once)",
        TokenPair,
        body=RefreshRequest,
        auth=False,
        errors=(400, 401, 413, 422, 503),
    ),
    Operation("GET", "/me", me, "The caller's account", Me, errors=(503,)),
    Operation(
        "GET",
        "/users_list",
        users_list,
        "List users by name, keyset-paginated",
        UserList,
        query=(
            Param("q", str, "keep users whose name starts with this, or whose email is this"),
            Param("limit", int, "page size, 1..200 (default 50)"),
            Param("after", uuid.UUID, "the last user_uuid of the previous page"),
        ),
        errors=(422, 503),
    ),
    Operation(
        "GET",
        "/history/{chat_id:int}",
        history,
        "A page of a chat's messages",
        History,
        query=(
            Param("page", int, "1 = newest page (default 1)"),
            Param("page_size", int, "1..200 (default 50)"),
            Param(
                "before",
                int,
                "keyset cursor: messages with an id below this one; any id works"
                " (9223372036854775807: the newest page)",
            ),
            Param("limit", int, "keyset page size, 1..200 (default 50)"),
        ),
        errors=(404, 422, 503),
    ),
    Operation(
        "GET",
        "/chats",
        list_chats,
        "The caller's chats, most recent activity first, with unread counts",
        ChatPage,
        query=(
            Param("limit", int, "page size, 1..200 (default 50)"),
            Param("before", int, "next_before of the previous page"),
        ),
        errors=(422, 503),
    ),
    Operation(
        "POST",
        "/chats",
        create_chat,
        "Create a chat (201), or get the existing private chat of a pair (200)",
        Chat,
        201,
        also_ok=(200,),
        body=CreateChatRequest,
        errors=(400, 404, 413, 422, 429, 503),
    ),
    Operation(
        "GET",
        "/chats/{chat_id:int}",
        get_chat,
        "One chat, with its members and their roles",
        ChatOverview,
        errors=(404, 503),
    ),
    Operation(
        "PATCH",
        "/chats/{chat_id:int}",
        rename_chat,
        "Rename a group (admins and the owner)",
        Chat,
        body=RenameChatRequest,
        errors=(400, 403, 404, 413, 422, 503),
    ),
    Operation(
        "DELETE",
        "/chats/{chat_id:int}",
        delete_chat,
        "Delete a group and all its messages (owner)",
        None,
        204,
        errors=(403, 404, 503),
    ),
    Operation(
        "POST",
        "/chats/{chat_id:int}/members",
        add_members,
        "Add members to a group (admins and the owner)",
        Chat,
        body=AddMembersRequest,
        errors=(400, 403, 404, 413, 422, 429, 503),
    ),
    Operation(
        "DELETE",
        "/chats/{chat_id:int}/members/{user_uuid}",
        remove_member,
        "Remove a member (admins and the owner); your own uuid leaves the group",
        None,
        204,
        errors=(403, 404, 422, 503),
    ),
    Operation(
        "PATCH",
        "/chats/{chat_id:int}/members/{user_uuid}",
        set_role,
        "Change a member's role (owner); role owner hands ownership over",
        Chat,
        body=SetRoleRequest,
        errors=(400, 403, 404, 413, 422, 503),
    ),
    Operation(
        "POST",
        "/chats/{chat_id:int}/messages",
        send_message,
        "Send a message (201); a retry with the same client_msg_id returns the original (200)",
        Message,
        201,
        also_ok=(200,),
        body=SendMessageRequest,
        headers=(Param("Idempotency-Key", str, "same meaning as client_msg_id (1..64 chars)"),),
        errors=(400, 404, 413, 422, 429, 503),
    ),
    Operation(
        "GET",
        "/messages/{message_id:int}",
        get_message,
        "One message of a chat you are in",
        Message,
        errors=(404, 503),
    ),
    Operation(
        "POST",
        "/chats/{chat_id:int}/read",
        mark_read,
        "Move your read pointer up to a message of this chat",
        ReadUpto,
        body=ReadRequest,
        errors=(400, 404, 413, 422, 503),
    ),
    Operation("GET", "/healthz", healthz, "Liveness check", Health, auth=False),
    Operation(
        "GET",
        "/readyz",
        readyz,
        "Readiness: the database (and Redis, when configured) answer",
        Readiness,
        also_ok=(503,),
        auth=False,
    ),
]
