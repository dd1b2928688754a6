"""The REST surface: one table of routes, each naming the request it carries.

A row names a request Struct of chatd/protocol.py (a socket action, or a REST-only
request), where it lives, and which headers fill a field of it. The request is built from
the URL's path fields, then from the JSON body (POST, PATCH) or the query string (GET,
DELETE) for the rest of its fields, then from those headers; and it runs the same handler
the socket does (chatd/handlers). The Starlette routes and /openapi.json both come from
this table, so neither can drift from the other.
"""

from __future__ import annotations

import logging
import math
import types
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from chatd import rest_files
from chatd.auth import bearer_token
from chatd.db import is_unavailable
from chatd.handlers import HANDLERS, REST_HANDLERS, SOCKET_ONLY, authorize, handler_for
from chatd.handlers.base import anonymous, authenticate
from chatd.metrics import ERRORS
from chatd.node import Node
from chatd.openapi import Operation, Param, path_params
from chatd.protocol import (
    BAD_REQUEST,
    DATABASE_UNAVAILABLE_MESSAGE,
    INVALID,
    NOT_FOUND,
    TOO_DEEP,
    UNAVAILABLE,
    AddMembers,
    AddPushSubscription,
    AdminCreateUser,
    AdminDeleteMessage,
    AdminDeleteUser,
    AdminListAudit,
    AdminListReports,
    AdminListUsers,
    AdminStats,
    AdminUpdateUser,
    AdminUser,
    AdminUserList,
    ApiKeyCreated,
    ApiKeyList,
    AppAddMembers,
    AppChat,
    AppCreateChat,
    AppGetChat,
    AppGetMessages,
    AppPostMessage,
    AppRemoveMembers,
    AuditLog,
    BlockList,
    BlockUser,
    Bot,
    BotCreated,
    BotList,
    ChangePassword,
    Chat,
    ChatCommandList,
    ChatCommands,
    ChatError,
    ChatOverview,
    ChatPage,
    CommandList,
    CreateApiKey,
    CreateBot,
    CreateBotToken,
    CreateChat,
    Created,
    CreateToken,
    CreateWebhook,
    DeactivateUsers,
    DeleteBot,
    DeleteChat,
    DeletedMessage,
    DeleteMe,
    DeleteMessage,
    DeleteWebhook,
    DeliveryList,
    EditList,
    EditMessage,
    ErrorBody,
    ErrorResponse,
    Export,
    ExportMe,
    FileLink,
    ForwardMessage,
    GetBot,
    GetChat,
    GetCommands,
    GetEdits,
    GetFileLink,
    GetHistory,
    GetMe,
    GetMessage,
    GetUser,
    GetVapidKey,
    Health,
    History,
    ListApiKeys,
    ListBlocks,
    ListBots,
    ListBotTokens,
    ListChats,
    ListDeliveries,
    ListSessions,
    ListTokens,
    ListUsers,
    ListWebhooks,
    Login,
    Logout,
    Me,
    Message,
    NewToken,
    NotificationSettings,
    PinMessage,
    PostHook,
    PushSubscriptionInfo,
    React,
    Read,
    Readiness,
    ReadUpto,
    Refresh,
    Register,
    RegisterResponse,
    RemoveMember,
    RemovePushSubscription,
    Report,
    ReportList,
    ReportMessage,
    RevokeApiKey,
    RevokeBotToken,
    RevokeSession,
    RevokeToken,
    SearchMessages,
    SearchResults,
    SendMessage,
    SessionList,
    SetCommands,
    SetNotifications,
    SetRole,
    Stats,
    TokenList,
    TokenPair,
    UnblockUser,
    UnpinMessage,
    Unreact,
    UpdateBot,
    UpdateChat,
    UpdateMe,
    UpsertedUsers,
    UpsertUsers,
    UserList,
    UserProfile,
    VapidKey,
    Webhook,
    WebhookList,
    encode,
    refuse_nul,
    retry_after_ms,
)

log = logging.getLogger("chatd")

MAX_BODY_BYTES = 64 * 1024
MAX_BIGINT = 2**63 - 1

T = TypeVar("T")


# --- answers -------------------------------------------------------------------------------


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


# --- reading a request ---------------------------------------------------------------------


def node_of(request: Request) -> Node:
    return request.app.state.node


def client_address(conn: HTTPConnection) -> str:
    """The client's IP (a request's or a socket's): uvicorn takes it from X-Forwarded-For
    for the proxies in CHATD_FORWARDED_ALLOW_IPS."""
    return conn.client.host if conn.client else "unknown"


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
    try:
        value = msgspec.json.decode(b"".join(chunks), type=kind)
    except msgspec.ValidationError as exc:
        raise ChatError(INVALID, str(exc)) from None
    except msgspec.DecodeError:
        raise ChatError(BAD_REQUEST, "request body is not valid JSON") from None
    except RecursionError:
        raise ChatError(BAD_REQUEST, TOO_DEEP) from None
    refuse_nul(value)
    return value


# How a query string value becomes its field's type: as Python reads an int (so " 5",
# "+5" and "05" are 5) or a UUID; a bool from true/false/1/0; a string as it is. Never
# "null" as None.
def _bool(raw: str) -> bool:
    value = {"true": True, "1": True, "false": False, "0": False}.get(raw.strip().lower())
    if value is None:
        raise ValueError(raw)
    return value


_QUERY_TYPES: dict[Any, tuple[Callable[[str], Any], str]] = {
    bool: (_bool, "true or false"),
    int: (int, "an integer"),
    uuid.UUID: (uuid.UUID, "a UUID"),
    str: (str, "text"),
}


def read_query(request: Request, kind: type[T]) -> T:
    """The query string as a `kind` (a Struct of int, UUID and str fields), or `invalid`."""
    given = {}
    for field in msgspec.structs.fields(kind):
        raw = request.query_params.get(field.name)
        if raw is None:
            continue
        parse, what = _QUERY_TYPES[_base_type(field.type)]
        try:
            given[field.name] = parse(raw)
        except ValueError:
            raise ChatError(INVALID, f"{field.name} must be {what}") from None
    try:
        value = msgspec.convert(given, kind)  # the bounds and lengths
    except msgspec.ValidationError as exc:
        raise ChatError(INVALID, str(exc)) from None
    refuse_nul(value)
    return value


def path_fields(request: Request, names: tuple[str, ...]) -> dict[str, Any]:
    """The path's fields; an id beyond PostgreSQL's bigint cannot exist (404)."""
    fields = {name: request.path_params[name] for name in names}
    for name, value in fields.items():
        if isinstance(value, int) and value > MAX_BIGINT:
            raise ChatError(NOT_FOUND, f"no such {name.removesuffix('_id')}")
    return fields


def header_fields(
    request: Request, headers: dict[str, tuple[str, Any]], fields: dict[str, Any]
) -> dict[str, Any]:
    """The fields these headers fill (header → (field, type)); one that the body gives too
    must agree with it."""
    filled = {}
    for header, (name, kind) in headers.items():
        raw = request.headers.get(header)
        if raw is None:
            continue
        try:
            value = msgspec.convert(raw, kind)
        except msgspec.ValidationError as exc:
            raise ChatError(INVALID, f"{header}: {exc}") from None
        if fields.get(name) not in (None, value):
            raise ChatError(INVALID, f"{header} and {name} differ")
        filled[name] = value
    return filled


# --- routes --------------------------------------------------------------------------------

NOT_IN_REQUESTS = {"request_id"}  # the socket's own; REST has no use for it


@dataclass(frozen=True)
class RequestShape:
    """Where each field of a request Struct comes from in an HTTP request."""

    request: type
    in_path: tuple[str, ...]
    body: type | None  # the generated Struct of the JSON body's fields
    query: type | None  # the generated Struct of the query string's fields
    headers: dict[str, tuple[str, Any]]  # header → (field, type)

    @classmethod
    def of(
        cls,
        method: str,
        path: str,
        request: type,
        headers: dict[str, str],
        *,
        json_body: bool = False,
    ) -> RequestShape:
        in_path = tuple(name for name, _ in path_params(path)[1])
        fields = msgspec.structs.fields(request)
        unknown = set(in_path) - {f.name for f in fields}
        if unknown:
            raise RuntimeError(f"{path}: {request.__name__} has no field {sorted(unknown)}")
        rest = [f for f in fields if f.name not in in_path and f.name not in NOT_IN_REQUESTS]
        body = query = None
        if rest and (method in ("POST", "PATCH", "PUT") or json_body):
            body = _struct(f"{request.__name__}Request", rest)
        elif rest:
            query = _struct(f"{request.__name__}Query", rest)
            for f in rest:
                if _base_type(f.type) not in _QUERY_TYPES:
                    raise RuntimeError(f"{request.__name__}.{f.name}: no query string form")
        types_of = {f.name: f.type for f in fields}
        typed = {header: (name, types_of[name]) for header, name in headers.items()}
        return cls(request, in_path, body, query, typed)

    async def read(self, http: Request) -> Any:
        """The request Struct this HTTP request carries, or ChatError for what is wrong."""
        fields: dict[str, Any] = {}
        if self.body is not None:
            fields.update(msgspec.structs.asdict(await read_body(http, self.body)))
        if self.query is not None:
            fields.update(msgspec.structs.asdict(read_query(http, self.query)))
        fields.update(header_fields(http, self.headers, fields))
        fields.update(path_fields(http, self.in_path))
        return self.request(**fields)


def route(
    method: str,
    path: str,
    request: type,
    summary: str,
    response: Any,
    status: int = 200,
    *,
    tag: str,
    also_ok: tuple[int, ...] = (),
    headers: dict[str, str] | None = None,
    auth: bool = True,
    errors: tuple[int, ...] = (),
    operation_id: str | None = None,
    json_body: bool = False,
) -> Operation:
    """The route of `request`: its path fields from `path`, `headers` (header → field) on
    top of the body (POST, PATCH, or any with `json_body`: a secret has no place in a URL)
    or the query string (GET, DELETE) for the rest. Its operationId is its handler's name
    unless given."""
    shape = RequestShape.of(method, path, request, headers or {}, json_body=json_body)
    handler = handler_for(request)

    async def endpoint(http: Request) -> Response:
        node, peer = node_of(http), client_address(http)
        user_agent = http.headers.get("user-agent", "")
        if auth:
            token = bearer_token(http.headers.get("authorization"))
            ctx = await authenticate(node, token, peer, user_agent)
            authorize(ctx, request)
        else:
            ctx = anonymous(node, peer, user_agent)
        result = await handler(ctx, await shape.read(http))
        if status == 204:
            return Response(status_code=204)
        if isinstance(result, Created):
            return json_response(result.value, status if result.created else 200)
        return json_response(result, status)

    endpoint.__name__ = endpoint.__qualname__ = operation_id or handler.__name__
    return Operation(
        method,
        path,
        endpoint,
        summary,
        response,
        status,
        also_ok,
        body=shape.body,
        query=tuple(map(_param, msgspec.structs.fields(shape.query))) if shape.query else (),
        headers=tuple(
            Param(header, _not_null(kind), f"the same as {name}")
            for header, (name, kind) in shape.headers.items()
        ),
        auth=auth,
        errors=errors,
        tag=tag,
        request=request,
    )


def _struct(name: str, fields: list[msgspec.structs.FieldInfo]) -> type[msgspec.Struct]:
    """A Struct of some of a request's fields (its body, or its query string)."""
    return msgspec.defstruct(
        name,
        [
            (
                f.name,
                f.type,
                msgspec.field(
                    default=f.default, default_factory=f.default_factory, name=f.encode_name
                ),
            )
            for f in fields
        ],
        kw_only=True,
    )


def _param(field: msgspec.structs.FieldInfo) -> Param:
    """A query field as an OpenAPI parameter: absent is its null, and its default stands."""
    kind, description = _not_null(field.type), ""
    for meta in typing.get_args(field.type)[1:]:
        if isinstance(meta, msgspec.Meta) and meta.description:
            description = meta.description
    default = None if field.default is msgspec.NODEFAULT else field.default
    return Param(field.name, kind, description, field.required, default)


def _base_type(kind: Any) -> Any:
    """int for Annotated[int, Meta(...)] | None, and so on."""
    kind = _not_null(kind)
    return typing.get_args(kind)[0] if typing.get_origin(kind) is Annotated else kind


def _not_null(kind: Any) -> Any:
    """`kind` without None: Annotated[X | None, m] → Annotated[X, m]; X | None → X."""
    if typing.get_origin(kind) is Annotated:
        base, *metas = typing.get_args(kind)
        return Annotated[(_not_null(base), *metas)]  # type: ignore[valid-type]
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kept = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return typing.Union[tuple(kept)] if len(kept) > 1 else kept[0]  # noqa: UP007
    return kind


async def readyz(request: Request) -> Response:
    """Readiness for load balancers: the database answers, and Redis when configured."""
    readiness = await node_of(request).readiness()
    return json_response(readiness, 200 if readiness.status == "ready" else 503)


async def healthz(request: Request) -> Response:
    return json_response(Health("ok"))


TAGS = {
    "accounts": "Registration, tokens, and who you are",
    "users": "Finding people",
    "chats": "Private chats and groups, their members and roles",
    "messages": "Sending, reading and paging through messages",
    "files": "Uploads, downloads and signed links",
    "push": "Web Push subscriptions for notifications when no tab is open",
    "health": "For load balancers and orchestrators",
    "admin": "For the server's admins (role admin): accounts, moderation, reports, audit",
    "bots": "Bots, their tokens, commands and webhooks; personal access tokens",
    "app": "The embedding app's backend, with an API key: users, chats, messages (admins"
    " make the keys)",
}

# fmt: off
OPERATIONS = [
    # accounts
    route(
        "POST", "/register", Register, "Create an account", RegisterResponse, 201,
        # 403: CHATD_LOCAL_ACCOUNTS=false
        tag="accounts", auth=False, errors=(400, 403, 409, 413, 422, 429, 503),
    ),
    route(
        "POST", "/login", Login, "Log in: get an access and a refresh token", TokenPair,
        tag="accounts", auth=False, errors=(400, 401, 403, 413, 422, 429, 503),
    ),
    route(
        "POST", "/token/refresh", Refresh, "Trade a refresh token for a new pair (once)",
        TokenPair, tag="accounts", auth=False, errors=(400, 401, 413, 422, 503),
    ),
    route(
        "POST", "/logout", Logout, "Sign out this session: its tokens and sockets stop", None,
        204, tag="accounts", errors=(403, 503),  # 403: the app's token (no session)
    ),
    route("GET", "/me", GetMe, "The caller's account", Me, tag="accounts", errors=(503,)),
    route(
        "PATCH", "/me", UpdateMe, "Change your name or avatar", Me,
        tag="accounts", errors=(400, 413, 422, 429, 503),
    ),
    route(
        "POST", "/me/password", ChangePassword,
        "Change your password (needs the current one); signs out your other sessions", None,
        204, tag="accounts", errors=(400, 403, 413, 422, 429, 503),
    ),
    route(
        "DELETE", "/me", DeleteMe,
        "Delete your account (needs your password); its sessions end everywhere", None, 204,
        tag="accounts", errors=(400, 403, 413, 422, 429, 503), json_body=True,
    ),
    route(
        "GET", "/me/export", ExportMe,
        "Your data as JSON: profile, sessions, blocks, chats and your messages (paged)",
        Export, tag="accounts", errors=(422, 503),
    ),
    route(
        "GET", "/me/sessions", ListSessions, "Your live sessions, most recently seen first",
        SessionList, tag="accounts", errors=(503,),
    ),
    route(
        "DELETE", "/me/sessions/{session_id}", RevokeSession,
        "Sign a session out: its tokens are refused and its sockets closed (1008)", None, 204,
        tag="accounts", errors=(404, 422, 503),
    ),
    route(
        "GET", "/me/blocks", ListBlocks, "The users you block, most recently blocked first",
        UserList, tag="users", errors=(503,),
    ),
    route(
        "PUT", "/me/blocks/{user_uuid}", BlockUser,
        "Block a user (again: no change); answers whom you block", BlockList,
        tag="users", errors=(404, 422, 503),
    ),
    route(
        "DELETE", "/me/blocks/{user_uuid}", UnblockUser,
        "Unblock a user (not blocked: no change); answers whom you block", BlockList,
        tag="users", errors=(422, 503),
    ),
    # users
    route(
        "GET", "/users_list", ListUsers, "List users by name, keyset-paginated", UserList,
        tag="users", errors=(422, 503),
    ),
    route(
        "GET", "/users/{user_uuid}", GetUser,
        "A user's name, and their presence when you share a chat", UserProfile,
        tag="users", errors=(404, 422, 503),
    ),
    # chats
    route(
        "GET", "/chats", ListChats,
        "The caller's chats, most recent activity first, with unread counts", ChatPage,
        tag="chats", errors=(422, 503),
    ),
    route(
        "POST", "/chats", CreateChat,
        "Create a chat (201), or get the existing private chat of a pair (200)", Chat, 201,
        tag="chats", also_ok=(200,), errors=(400, 404, 413, 422, 429, 503),
    ),
    route(
        "GET", "/chats/{chat_id:int}", GetChat, "One chat, with its members and their roles",
        ChatOverview, tag="chats", errors=(404, 503),
    ),
    route(
        "PATCH", "/chats/{chat_id:int}", UpdateChat,
        "Change a group's name or photo (admins and the owner)", Chat,
        tag="chats", errors=(400, 403, 404, 413, 422, 503),
    ),
    route(
        "DELETE", "/chats/{chat_id:int}", DeleteChat,
        "Delete a group and all its messages (owner)", None, 204,
        tag="chats", errors=(403, 404, 503),
    ),
    route(
        "POST", "/chats/{chat_id:int}/members", AddMembers,
        "Add members to a group (admins and the owner)", Chat,
        tag="chats", errors=(400, 403, 404, 413, 422, 429, 503),
    ),
    route(
        "DELETE", "/chats/{chat_id:int}/members/{user_uuid}", RemoveMember,
        "Remove a member (admins and the owner); your own uuid leaves the group", None, 204,
        tag="chats", errors=(403, 404, 422, 503),
    ),
    route(
        "PATCH", "/chats/{chat_id:int}/members/{user_uuid}", SetRole,
        "Change a member's role (owner); role owner hands ownership over", Chat,
        tag="chats", errors=(400, 403, 404, 413, 422, 503),
    ),
    # messages
    route(
        "POST", "/chats/{chat_id:int}/messages", SendMessage,
        "Send a message (201); a retry with the same client_msg_id returns the original (200)",
        Message, 201, tag="messages", also_ok=(200,),
        # 403: `rejected` by the before-send hook (docs/embedding.md).
        headers={"Idempotency-Key": "client_msg_id"}, errors=(400, 403, 404, 413, 422, 429, 503),
    ),
    route(
        "GET", "/messages/{message_id:int}", GetMessage, "One message of a chat you are in",
        Message, tag="messages", errors=(404, 503),
    ),
    route(
        "PATCH", "/messages/{message_id:int}", EditMessage,
        "Edit your message's text (the old text is kept)", Message,
        tag="messages", errors=(400, 403, 404, 413, 422, 429, 503),
    ),
    route(
        "DELETE", "/messages/{message_id:int}", DeleteMessage,
        "Delete a message for everyone (sender, group owner or admins) or for you only",
        DeletedMessage, tag="messages", errors=(403, 404, 422, 429, 503),
    ),
    route(
        "GET", "/messages/{message_id:int}/edits", GetEdits,
        "A message's earlier texts, oldest first", EditList, tag="messages", errors=(404, 503),
    ),
    route(
        "PUT", "/messages/{message_id:int}/reactions/{emoji}", React,
        "React with an emoji (again: no change)", Message,
        tag="messages", errors=(404, 422, 429, 503),
    ),
    route(
        "DELETE", "/messages/{message_id:int}/reactions/{emoji}", Unreact,
        "Take your reaction back (none there: no change)", Message,
        tag="messages", errors=(404, 422, 429, 503),
    ),
    route(
        "POST", "/messages/{message_id:int}/forward", ForwardMessage,
        "Forward a message to a chat of yours (201); a retry with the same client_msg_id"
        " returns the copy (200)", Message, 201, tag="messages", also_ok=(200,),
        headers={"Idempotency-Key": "client_msg_id"}, errors=(400, 403, 404, 413, 422, 429, 503),
    ),
    route(
        "PUT", "/chats/{chat_id:int}/pin", PinMessage,
        "Pin a message (groups: owner and admins)", Chat,
        tag="chats", errors=(400, 403, 404, 413, 422, 429, 503),
    ),
    route(
        "DELETE", "/chats/{chat_id:int}/pin", UnpinMessage,
        "Unpin the pinned message (groups: owner and admins)", Chat,
        tag="chats", errors=(403, 404, 429, 503),
    ),
    route(
        "PATCH", "/chats/{chat_id:int}/notifications", SetNotifications,
        "Mute a chat until a time, or choose what notifies you (all, mentions, none)",
        NotificationSettings, tag="chats", errors=(400, 404, 413, 422, 503),
    ),
    route(
        "POST", "/chats/{chat_id:int}/read", Read,
        "Move your read pointer up to a message of this chat", ReadUpto,
        tag="messages", errors=(400, 404, 413, 422, 503), operation_id="mark_read",
    ),
    route(
        "GET", "/history/{chat_id:int}", GetHistory, "A page of a chat's messages", History,
        tag="messages", errors=(404, 422, 503),
    ),
    route(
        "GET", "/search", SearchMessages,
        "Search your chats' messages (full text), newest first, with highlight offsets",
        SearchResults, tag="messages", errors=(404, 422, 503),
    ),
    route(
        "POST", "/messages/{message_id:int}/report", ReportMessage,
        "Report a message to the server's admins (201); again: your first report (200)",
        Report, 201, tag="messages", also_ok=(200,), errors=(400, 404, 413, 422, 429, 503),
    ),
    # push
    route(
        "GET", "/push/vapid_public_key", GetVapidKey,
        "The VAPID public key browsers subscribe with (applicationServerKey)", VapidKey,
        tag="push", auth=False,
    ),
    route(
        "POST", "/push/subscriptions", AddPushSubscription,
        "Store a browser's Web Push subscription (201); again: updated (200)",
        PushSubscriptionInfo, 201, tag="push", also_ok=(200,), errors=(400, 413, 422, 503),
    ),
    route(
        "DELETE", "/push/subscriptions", RemovePushSubscription,
        "Remove a Web Push subscription of yours (none: no change)", None, 204,
        tag="push", errors=(400, 413, 422, 503), json_body=True,
    ),
    # admin
    route(
        "GET", "/admin/users", AdminListUsers, "Every account, oldest first", AdminUserList,
        tag="admin", errors=(403, 422, 503),
    ),
    route(
        "POST", "/admin/users", AdminCreateUser, "Create an account", AdminUser, 201,
        tag="admin", errors=(400, 403, 409, 413, 422, 503),
    ),
    route(
        "PATCH", "/admin/users/{user_uuid}", AdminUpdateUser,
        "Promote, demote, disable, enable, or set the password of an account", AdminUser,
        tag="admin", errors=(400, 403, 404, 413, 422, 503),
    ),
    route(
        "DELETE", "/admin/users/{user_uuid}", AdminDeleteUser,
        "Delete an account (as DELETE /me)", None, 204, tag="admin", errors=(403, 404, 422, 503),
    ),
    route("GET", "/admin/stats", AdminStats, "Counts", Stats, tag="admin", errors=(403, 503)),
    route(
        "DELETE", "/admin/messages/{message_id:int}", AdminDeleteMessage,
        "Delete any message for everyone (moderation)", DeletedMessage,
        tag="admin", errors=(403, 404, 503),
    ),
    route(
        "GET", "/admin/reports", AdminListReports, "Reported messages, newest first",
        ReportList, tag="admin", errors=(403, 422, 503),
    ),
    route(
        "GET", "/admin/audit", AdminListAudit, "The audit log of admin actions, newest first",
        AuditLog, tag="admin", errors=(403, 422, 503),
    ),
    # files
    *rest_files.OPERATIONS,
    route(
        "POST", "/files/{file_id:uuid}/link", GetFileLink,
        "Signed URLs of a file you may download, for <img src> (valid 5 minutes)", FileLink,
        tag="files", errors=(404, 503),
    ),
    # bots and tokens (chatd/handlers/bots.py)
    route(
        "POST", "/bots", CreateBot, "Create a bot, with its first token (shown once)",
        BotCreated, 201, tag="bots", errors=(400, 403, 409, 413, 422, 503),
    ),
    route("GET", "/bots", ListBots, "Your bots", BotList, tag="bots", errors=(403, 503)),
    route(
        "GET", "/bots/{bot_id:int}", GetBot, "One of your bots", Bot,
        tag="bots", errors=(403, 404, 503),
    ),
    route(
        "PATCH", "/bots/{bot_id:int}", UpdateBot,
        "Rename a bot, set or remove its webhook, rotate its signing secret", Bot,
        tag="bots", errors=(400, 403, 404, 413, 422, 503),
    ),
    route(
        "DELETE", "/bots/{bot_id:int}", DeleteBot,
        "Delete a bot: its tokens stop, its sockets close, it leaves its chats", None, 204,
        tag="bots", errors=(403, 404, 503),
    ),
    route(
        "POST", "/bots/{bot_id:int}/tokens", CreateBotToken,
        "Issue a token for a bot (shown once)", NewToken, 201,
        tag="bots", errors=(400, 403, 404, 413, 422, 503),
    ),
    route(
        "GET", "/bots/{bot_id:int}/tokens", ListBotTokens, "A bot's live tokens", TokenList,
        tag="bots", errors=(403, 404, 503),
    ),
    route(
        "DELETE", "/bots/{bot_id:int}/tokens/{token_id}", RevokeBotToken,
        "Revoke a bot's token: refused from now on, its sockets closed (1008)", None, 204,
        tag="bots", errors=(403, 404, 503),
    ),
    route(
        "PUT", "/bots/{bot_id:int}/commands", SetCommands,
        "Set a bot's slash commands (its owner, or the bot itself)", CommandList,
        tag="bots", errors=(400, 403, 404, 413, 422, 503), json_body=True,
    ),
    route(
        "GET", "/bots/{bot_id:int}/commands", GetCommands, "A bot's slash commands",
        CommandList, tag="bots", errors=(403, 404, 503),
    ),
    route(
        "GET", "/chats/{chat_id:int}/commands", ChatCommands,
        "The slash commands of the chat's bots", ChatCommandList,
        tag="chats", errors=(403, 404, 503),
    ),
    route(
        "GET", "/bots/{bot_id:int}/deliveries", ListDeliveries,
        "A bot's webhook deliveries, newest first (kept CHATD_DELIVERY_RETENTION once done)",
        DeliveryList, tag="bots", errors=(403, 404, 422, 503),
    ),
    route(
        "POST", "/chats/{chat_id:int}/webhooks", CreateWebhook,
        "Create an incoming webhook: its URL (shown once) posts into the chat as its own bot",
        Webhook, 201, tag="chats", errors=(400, 403, 404, 413, 422, 503),
    ),
    route(
        "GET", "/chats/{chat_id:int}/webhooks", ListWebhooks,
        "The chat's incoming webhooks (without their secrets)", WebhookList,
        tag="chats", errors=(403, 404, 503),
    ),
    route(
        "DELETE", "/chats/{chat_id:int}/webhooks/{webhook_id:int}", DeleteWebhook,
        "Delete an incoming webhook (its creator, admins, the owner): its URL stops working",
        None, 204, tag="chats", errors=(403, 404, 503),
    ),
    route(
        "POST", "/hooks/{webhook_id:int}/{secret}", PostHook,
        "Post into a chat through an incoming webhook (Slack's body: {\"text\"}); the URL's"
        " secret is the credential", Message, tag="messages", auth=False,
        headers={"Idempotency-Key": "client_msg_id"}, errors=(400, 404, 413, 422, 429, 503),
    ),
    route(
        "POST", "/me/tokens", CreateToken,
        "Create a personal access token (shown once)", NewToken, 201,
        tag="accounts", errors=(400, 403, 413, 422, 503),
    ),
    route(
        "GET", "/me/tokens", ListTokens, "Your personal access tokens", TokenList,
        tag="accounts", errors=(403, 503),
    ),
    route(
        "DELETE", "/me/tokens/{token_id}", RevokeToken,
        "Revoke a personal access token: refused from now on, its sockets closed", None, 204,
        tag="accounts", errors=(403, 404, 503),
    ),
    # the app API (chatd/handlers/app.py, docs/embedding.md): API keys and what they do
    route(
        "POST", "/admin/api_keys", CreateApiKey,
        "Create an API key for the app's backend (the key and webhook secret are shown once)",
        ApiKeyCreated, 201, tag="app", errors=(400, 403, 413, 422, 503),
    ),
    route(
        "GET", "/admin/api_keys", ListApiKeys, "The API keys that are not revoked", ApiKeyList,
        tag="app", errors=(403, 503),
    ),
    route(
        "DELETE", "/admin/api_keys/{key_id}", RevokeApiKey,
        "Revoke an API key: refused from now on, its webhook's deliveries dropped", None, 204,
        tag="app", errors=(403, 404, 503),
    ),
    route(
        "POST", "/app/users", UpsertUsers,
        "Create or update the app's users by sub (the users its tokens name)", UpsertedUsers,
        tag="app", errors=(400, 403, 413, 422, 429, 503),
    ),
    route(
        "POST", "/app/users/deactivate", DeactivateUsers,
        "Disable the app's users: their tokens and sockets stop", None, 204,
        tag="app", errors=(400, 403, 413, 422, 429, 503),
    ),
    route(
        "POST", "/app/chats", AppCreateChat,
        "Create a chat of the app's users once per ext_id (201); after that, get it (200)",
        AppChat, 201, tag="app", also_ok=(200,), errors=(400, 403, 413, 422, 429, 503),
    ),
    route(
        "GET", "/app/chats/{ext_id}", AppGetChat, "A chat the app created, by its ext_id",
        AppChat, tag="app", errors=(403, 404, 422, 429, 503),
    ),
    route(
        "POST", "/app/chats/{ext_id}/members", AppAddMembers,
        "Add the app's users to one of its groups", AppChat,
        tag="app", errors=(400, 403, 404, 413, 422, 429, 503),
    ),
    route(
        "DELETE", "/app/chats/{ext_id}/members", AppRemoveMembers,
        "Remove the app's users from one of its groups", None, 204,
        tag="app", errors=(400, 403, 404, 413, 422, 429, 503), json_body=True,
    ),
    route(
        "POST", "/app/chats/{ext_id}/messages", AppPostMessage,
        "Post as one of the app's users or as the key's identity (201); a retry with the"
        " same client_msg_id returns the original (200)",
        Message, 201, tag="app", also_ok=(200,), errors=(400, 403, 404, 413, 422, 429, 503),
    ),
    route(
        "GET", "/app/chats/{ext_id}/messages", AppGetMessages,
        "A chat's messages, newest page first", History,
        tag="app", errors=(403, 404, 422, 429, 503),
    ),
    # health
    Operation("GET", "/healthz", healthz, "Liveness check", Health, auth=False, tag="health"),
    Operation(
        "GET", "/readyz", readyz, "Readiness: the database (and Redis, when configured) answer",
        Readiness, also_ok=(503,), auth=False, tag="health",
    ),
]
# fmt: on


def _check_routes() -> None:
    """Every request has a route, or is a socket action marked socket-only
    (chatd/handlers/__init__.py); a socket-only one has none."""
    routed = {op.request for op in OPERATIONS}
    for request_type in [*HANDLERS, *REST_HANDLERS]:
        if request_type not in routed and request_type not in SOCKET_ONLY:
            raise RuntimeError(f"{request_type.__name__} has no REST route and is not SOCKET_ONLY")
    for request_type in SOCKET_ONLY:
        if request_type not in HANDLERS or request_type in routed:
            raise RuntimeError(f"{request_type.__name__} is SOCKET_ONLY: a socket action, no route")


_check_routes()
