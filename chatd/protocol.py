"""The wire contract: every frame and REST body chatd reads or writes, as msgspec Structs.

Read this file to know the protocol; docs/protocol.md tells the same story in prose.

Client frames are JSON objects tagged by "action". Decoding happens in two steps so a
client always learns what was wrong: `decode_action` first tries the fast typed decode,
and only when that fails looks closer to choose between `bad_request`, `unknown_action`
and `invalid`.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from chatd.text import looks_empty

# --- error codes --------------------------------------------------------------------------

BAD_REQUEST = "bad_request"  # not JSON, not an object, wrong types, missing fields
UNKNOWN_ACTION = "unknown_action"
INVALID = "invalid"  # right types, values out of range
NOT_FOUND = "not_found"  # also for chats that exist but the caller is not in
FORBIDDEN = "forbidden"
RATE_LIMITED = "rate_limited"
UNAUTHORIZED = "unauthorized"
INTERNAL = "internal"  # a server-side failure; the request may be retried
UNAVAILABLE = "unavailable"  # the database is unavailable; retry (sends: same client_msg_id)
DATABASE_UNAVAILABLE_MESSAGE = "the database is unavailable; retry with the same client_msg_id"

# --- close codes of /connect (RFC 6455 section 7.4; docs/protocol.md says when each is sent) --

CLOSE_POLICY_VIOLATION = 1008  # bad token, Origin not allowed, socket cap
CLOSE_TOO_BIG = 1009  # a frame over the size limit
CLOSE_SERVICE_RESTART = 1012  # shutdown, or a lost Redis subscription: reconnect and sync
CLOSE_TRY_AGAIN_LATER = 1013  # a client too slow to read, or the database unavailable


class ChatError(Exception):
    """A failure to report to the client as {"code", "message"}; nothing was changed."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.request_id: str | None = None  # echoed in the socket's error frame
        self.retry_after: float | None = None  # rate_limited: seconds until allowed


# Always timezone-aware (UTC); also makes the OpenAPI schema say "format": "date-time".
Timestamp = Annotated[datetime, Meta(tz=True)]

# --- shared objects -----------------------------------------------------------------------


class Message(Struct):
    id: int
    chat_id: int
    seq: int
    sender_uuid: str
    text: str
    timestamp: Timestamp
    read_status: Literal["unread", "read"]
    client_msg_id: str | None


class Member(Struct):
    user_uuid: str
    name: str


Role = Literal["owner", "admin", "member"]


class ChatMember(Struct):
    user_uuid: str
    name: str
    role: Role  # private chats: both are "member"


class Chat(Struct):
    id: int
    type: Literal["private", "group"]
    name: str | None
    created_at: Timestamp
    members: list[ChatMember]  # in join order


class ChatOverview(Chat):
    """A chat as the caller's chat list shows it."""

    last_message: Message | None
    last_seq: int  # seq of the newest message; 0 when there is none
    read_upto: int | None  # message id of the caller's read pointer; null before any read
    read_seq: int  # seq of the caller's read pointer
    unread_count: int  # messages from others above the read pointer (= last_seq - read_seq)
    role: Role  # the caller's role


class ErrorBody(Struct, omit_defaults=True):
    code: str
    message: str
    # rate_limited only: milliseconds to wait before the same request is allowed.
    retry_after_ms: int | None = None


def retry_after_ms(seconds: float) -> int:
    """A wait as the error body's retry_after_ms: rounded up, at least 1."""
    return max(1, math.ceil(seconds * 1000))


# --- client → server frames ---------------------------------------------------------------

RequestId = Annotated[str, Meta(max_length=64)]
Id = Annotated[int, Meta(ge=1, le=2**63 - 1)]  # PostgreSQL bigint; larger ids cannot exist
MAX_TEXT_CHARS = 4096
MAX_GROUP_NAME_CHARS = 100
MAX_USERS_PER_CALL = 1000
# Keeps a Chat (members included) small enough for one frame in every event that carries it.
MAX_GROUP_MEMBERS = 1000
UserIds = Annotated[list[str], Meta(max_length=MAX_USERS_PER_CALL)]
ClientMsgId = Annotated[str, Meta(min_length=1, max_length=64)]
Seq = Annotated[int, Meta(ge=0, le=2**63 - 1)]


class Action(Struct, tag_field="action", kw_only=True, forbid_unknown_fields=False):
    request_id: RequestId | None = None


class CreateChat(Action, tag="create_chat"):
    type: Literal["group", "private"]
    user_ids: UserIds
    name: str | None = None


class ListChats(Action, tag="list_chats"):
    limit: Annotated[int, Meta(ge=1, le=200)] = 50
    before: Id | None = None  # next_before of the previous page


class GetChat(Action, tag="get_chat"):
    chat_id: Id


class SendMessage(Action, tag="send_message"):
    chat_id: Id
    text: str
    client_msg_id: ClientMsgId | None = None


class GetMessage(Action, tag="get_message"):
    message_id: Id


class MarkRead(Action, tag="mark_read"):
    message_ids: Annotated[list[Id], Meta(min_length=1, max_length=1000)]


class Sync(Action, tag="sync"):
    chats: Annotated[dict[Id, Seq], Meta(min_length=1, max_length=1000)]  # chat id → last seq seen
    limit: Annotated[int, Meta(ge=1, le=500)] = 100  # per chat


class Typing(Action, tag="typing"):
    chat_id: Id


class AddMembers(Action, tag="add_members"):
    chat_id: Id
    user_ids: Annotated[list[str], Meta(min_length=1, max_length=MAX_USERS_PER_CALL)]


class RemoveMember(Action, tag="remove_member"):
    chat_id: Id
    user_uuid: str


class LeaveChat(Action, tag="leave_chat"):
    chat_id: Id


class RenameChat(Action, tag="rename_chat"):
    chat_id: Id
    name: str


class SetRole(Action, tag="set_role"):
    chat_id: Id
    user_uuid: str
    role: Role  # "owner" hands your ownership over; you become an admin


class DeleteChat(Action, tag="delete_chat"):
    chat_id: Id


ClientAction = (
    CreateChat
    | ListChats
    | GetChat
    | SendMessage
    | GetMessage
    | MarkRead
    | Sync
    | Typing
    | AddMembers
    | RemoveMember
    | LeaveChat
    | RenameChat
    | SetRole
    | DeleteChat
)
ACTION_NAMES = frozenset(cls.__struct_config__.tag for cls in ClientAction.__args__)

TOO_DEEP = "JSON is nested too deeply"

_action_decoder = msgspec.json.Decoder(ClientAction)
_any_decoder = msgspec.json.Decoder()


def decode_action(raw: str | bytes) -> ClientAction:
    """Decode one client frame or raise ChatError (with .request_id set when one was readable)."""
    try:
        action = _action_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise _explain(raw, exc) from None
    except RecursionError:  # msgspec recurses per level, even through unknown fields
        raise _tagged(ChatError(BAD_REQUEST, TOO_DEEP), None) from None
    try:
        refuse_nul(action)
    except ChatError as exc:
        raise _tagged(exc, action.request_id) from None
    return action


def refuse_nul(value: Any) -> None:
    """PostgreSQL text cannot hold NUL: refuse it in any string of a decoded frame or body."""
    if _has_nul(value):
        raise ChatError(INVALID, "strings must not contain NUL (\\u0000) characters", 422)


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Struct):
        return any(_has_nul(getattr(value, name)) for name in value.__struct_fields__)
    if isinstance(value, list):
        return any(map(_has_nul, value))
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    return False


def _explain(raw: str | bytes, exc: msgspec.DecodeError) -> ChatError:
    try:
        obj = _any_decoder.decode(raw)
    except msgspec.DecodeError:
        return _tagged(ChatError(BAD_REQUEST, "frame is not valid JSON"), None)
    except RecursionError:
        return _tagged(ChatError(BAD_REQUEST, TOO_DEEP), None)
    if not isinstance(obj, dict):
        return _tagged(ChatError(BAD_REQUEST, "frame must be a JSON object"), None)
    request_id = obj.get("request_id")
    if not (isinstance(request_id, str) and len(request_id) <= 64):
        request_id = None
    action = obj.get("action")
    if not isinstance(action, str):
        error = ChatError(BAD_REQUEST, 'frame needs an "action" string')
    elif action not in ACTION_NAMES:
        error = ChatError(UNKNOWN_ACTION, f"unknown action {action[:64]!r}")
    else:
        error = ChatError(_code_for(exc), str(exc))
    return _tagged(error, request_id)


def _code_for(exc: msgspec.DecodeError) -> str:
    """A value that has the right type but breaks a constraint is `invalid`; the rest is shape."""
    text = str(exc)
    if text.startswith("Invalid enum value"):
        return INVALID
    if text.startswith("Expected `") and ", got `" not in text:
        return INVALID  # e.g. "Expected `str` of length <= 64"
    return BAD_REQUEST  # "Expected `int`, got `str`", "Object missing required field ..."


def _tagged(error: ChatError, request_id: str | None) -> ChatError:
    error.request_id = request_id
    return error


# --- server → client frames ---------------------------------------------------------------


class Event(Struct, tag_field="action"):
    pass


class UnreadMessages(Event, tag="unread_messages"):
    data: list[Message]
    has_more: bool


class Ack(Event, tag="ack"):
    request_id: str | None
    data: Any


class Error(Event, tag="error"):
    request_id: str | None
    error: ErrorBody


class NewMessage(Event, tag="new_message"):
    data: Message


class ChatCreated(Event, tag="chat_created"):
    data: Chat


class ReadReceipt(Struct):
    message_id: int
    chat_id: int


class MessageRead(Event, tag="message_read"):
    data: ReadReceipt


class ReadRange(Struct):
    chat_id: int
    up_to_message_id: int  # every message you sent in the chat with an id up to this one


class MessagesRead(Event, tag="messages_read"):
    """Instead of many message_read events when over 100 of yours become read at once."""

    data: ReadRange


class ReadUpto(Struct):
    read_upto: dict[int, int]


class MembersAdded(Struct):
    chat: Chat  # after the change: new members learn the chat from this
    user_uuids: list[str]  # who was added
    by: str


class MemberAdded(Event, tag="member_added"):
    data: MembersAdded


class MemberLeft(Struct):
    chat_id: int
    user_uuid: str
    by: str  # equal to user_uuid when the member left by themselves


class MemberRemoved(Event, tag="member_removed"):
    data: MemberLeft


class ChatUpdated(Event, tag="chat_updated"):
    data: Chat


class ChatGone(Struct):
    chat_id: int
    by: str


class ChatDeleted(Event, tag="chat_deleted"):
    data: ChatGone


class TypingNotice(Struct):
    chat_id: int
    user_uuid: str


class TypingEvent(Event, tag="typing"):
    data: TypingNotice


class ChatPage(Struct):
    chats: list[ChatOverview]  # most recent activity first
    has_more: bool
    next_before: int | None  # pass as `before` for the next page


class SyncedChat(Struct):
    messages: list[Message]  # seq above the one you gave, ascending
    has_more: bool  # more remain: sync again from the last seq you got
    error: str | None = None  # "not_found": you are not (or no longer) in this chat


class SyncResult(Struct):
    chats: dict[int, SyncedChat]


_encoder = msgspec.json.Encoder()


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def encode_text(value: Any) -> str:
    """Encode a frame once as the str a WebSocket text frame carries."""
    return _encoder.encode(value).decode()


# --- REST bodies --------------------------------------------------------------------------


class RegisterRequest(Struct):
    name: str
    email: str
    password: str


class RegisterResponse(Struct):
    user_uuid: str
    name: str
    email: str


class LoginRequest(Struct):
    email: str
    password: str


class RefreshRequest(Struct):
    refresh_token: str


class TokenPair(Struct):
    access_token: str
    refresh_token: str
    expires_in: int
    token_type: str = "bearer"


class Me(Struct):
    user_uuid: str
    name: str
    email: str
    created_at: Timestamp


class UserList(Struct):
    users: list[Member]


class History(Struct):
    messages: list[Message]
    has_more: bool


class Health(Struct):
    status: str


class Readiness(Struct):
    status: Literal["ready", "not ready"]
    database: str  # "ok", or what is wrong
    redis: str  # "ok", "not configured", or what is wrong


class CreateChatRequest(Struct):
    type: Literal["group", "private"]
    user_ids: UserIds
    name: str | None = None


class AddMembersRequest(Struct):
    user_ids: Annotated[list[str], Meta(min_length=1, max_length=MAX_USERS_PER_CALL)]


class RenameChatRequest(Struct):
    name: str


class SetRoleRequest(Struct):
    role: Role


class SendMessageRequest(Struct):
    text: str
    client_msg_id: ClientMsgId | None = None


class ReadRequest(Struct):
    up_to: Id  # a message id in this chat


class ErrorResponse(Struct):
    error: ErrorBody


# --- text checks shared by every handler --------------------------------------------------


def clean_text(value: str, field: str, *, min_len: int, max_len: int) -> str:
    """Strip `value` and check it fits; PostgreSQL text cannot hold NUL, so refuse it here.

    Text made only of invisible characters (chatd.text.looks_empty: zero-width spaces,
    bidi marks, Hangul fillers, ...) counts as empty.
    """
    value = value.strip()
    length = 0 if looks_empty(value) else len(value)
    if not min_len <= length <= max_len:
        raise ChatError(INVALID, f"{field} must be {min_len}..{max_len} characters", 422)
    if "\x00" in value:
        raise ChatError(INVALID, f"{field} must not contain NUL characters", 422)
    return value
