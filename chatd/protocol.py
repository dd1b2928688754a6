"""The wire contract: every frame and REST body chatd reads or writes, as msgspec Structs.

Read this file to know the protocol; docs/protocol.md tells the same story in prose.

Client frames are JSON objects tagged by "action". Decoding happens in two steps so a
client always learns what was wrong: `decode_action` first tries the fast typed decode,
and only when that fails looks closer to choose between `bad_request`, `unknown_action`
and `invalid`.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, NamedTuple, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from chatd.text import looks_empty

T = TypeVar("T")

# --- error codes --------------------------------------------------------------------------

BAD_REQUEST = "bad_request"  # not JSON, not an object, wrong types, missing fields
UNKNOWN_ACTION = "unknown_action"
INVALID = "invalid"  # right types, values out of range
NOT_FOUND = "not_found"  # also for chats that exist but the caller is not in
FORBIDDEN = "forbidden"
RATE_LIMITED = "rate_limited"
UNAUTHORIZED = "unauthorized"
EMAIL_TAKEN = "email_taken"
TOO_LARGE = "too_large"  # an upload over CHATD_MAX_UPLOAD_BYTES
QUOTA_EXCEEDED = "quota_exceeded"  # an upload past the user's CHATD_USER_QUOTA_BYTES
INVALID_CREDENTIALS = "invalid_credentials"
INTERNAL = "internal"  # a server-side failure; the request may be retried
REJECTED = "rejected"  # the before-send hook refused the message; its reason is the message
UNAVAILABLE = "unavailable"  # the database is unavailable; retry (sends: same client_msg_id)
USERNAME_TAKEN = "username_taken"  # POST /bots: another bot has this username
INSUFFICIENT_SCOPE = "insufficient_scope"  # a read-only API token asked for a change
LOGIN_REQUIRED = "login_required"  # credentials and bots are managed from a login, not a token
DATABASE_UNAVAILABLE_MESSAGE = "the database is unavailable; retry with the same client_msg_id"

# The HTTP status REST answers each code with (the socket sends the code alone).
HTTP_STATUS = {
    BAD_REQUEST: 400,
    UNKNOWN_ACTION: 400,
    INVALID: 422,
    NOT_FOUND: 404,
    FORBIDDEN: 403,
    RATE_LIMITED: 429,
    UNAUTHORIZED: 401,
    EMAIL_TAKEN: 409,
    TOO_LARGE: 413,
    QUOTA_EXCEEDED: 413,
    INVALID_CREDENTIALS: 401,
    INTERNAL: 500,
    UNAVAILABLE: 503,
    USERNAME_TAKEN: 409,
    INSUFFICIENT_SCOPE: 403,
    LOGIN_REQUIRED: 403,
    REJECTED: 403,
}

# --- close codes of /connect (RFC 6455 section 7.4; docs/protocol.md says when each is sent) --

CLOSE_POLICY_VIOLATION = 1008  # bad token, Origin not allowed, socket cap
CLOSE_TOO_BIG = 1009  # a frame over the size limit
CLOSE_SERVICE_RESTART = 1012  # shutdown, or a lost Redis subscription: reconnect and sync
CLOSE_TRY_AGAIN_LATER = 1013  # a client too slow to read, or the database unavailable


class ChatError(Exception):
    """A failure to report to the client as {"code", "message"}; nothing was changed.

    `status` is the code's HTTP status unless given (a 413 `invalid`, say); `retry_after`
    is for `rate_limited`: seconds until the same request would be allowed.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or HTTP_STATUS.get(code, 400)
        self.retry_after = retry_after
        self.request_id: str | None = None  # echoed in the socket's error frame


def no_such_chat() -> ChatError:
    # The same answer whether the chat does not exist or the caller is not in it.
    return ChatError(NOT_FOUND, "no such chat")


class Created(NamedTuple, Generic[T]):
    """A handler's result that may be new or found: REST answers 201 when `created`, else
    200 (the pair's private chat existed, a send was a retry). The socket acks `value`."""

    value: T
    created: bool = True


# Always timezone-aware (UTC); also makes the OpenAPI schema say "format": "date-time".
Timestamp = Annotated[datetime, Meta(tz=True)]
# A user's id as the wire carries it. Kept a str (a handler turns it into a UUID, so a
# malformed one is `invalid`, not a decoding error); the schema says what it must be.
UserUuid = Annotated[str, Meta(extra_json_schema={"format": "uuid"})]

# --- limits ------------------------------------------------------------------------------

MAX_TEXT_CHARS = 4096
MAX_GROUP_NAME_CHARS = 100
MAX_USER_NAME_CHARS = 64
MIN_PASSWORD_CHARS, MAX_PASSWORD_CHARS = 8, 128
MAX_USERS_PER_CALL = 1000
# A Chat carries every member (about 100 bytes each), so a full group's is about 1 MB:
# one frame, in every event that carries it. Filled MAX_USERS_PER_CALL at a time.
MAX_GROUP_MEMBERS = 10_000
MAX_PAGE_SIZE = 200
MAX_BLOCKS = 1000  # users one user may block (the first frame carries them all)


def stripped_text(min_length: int, max_length: int) -> Any:
    """Text whose length is checked once stripped (clean_text): surrounding whitespace does
    not count, so the limits are the schema's, not the decoder's."""
    return Annotated[
        str,
        Meta(
            description=f"{min_length}..{max_length} characters, surrounding whitespace aside",
            extra_json_schema={"minLength": min_length, "maxLength": max_length},
        ),
    ]


Text = stripped_text(1, MAX_TEXT_CHARS)
# A message's text may be empty when it carries attachments.
MessageText = stripped_text(0, MAX_TEXT_CHARS)
GroupName = stripped_text(1, MAX_GROUP_NAME_CHARS)
UserName = stripped_text(1, MAX_USER_NAME_CHARS)
# Checked by the register handler, after the name and the email.
Password = Annotated[
    str,
    Meta(extra_json_schema={"minLength": MIN_PASSWORD_CHARS, "maxLength": MAX_PASSWORD_CHARS}),
]
MAX_DEVICE_CHARS = 100
Device = Annotated[str, Meta(max_length=MAX_DEVICE_CHARS)]
# A session's id (a handler turns it into a UUID, so a malformed one is `not_found`).
SessionUuid = Annotated[str, Meta(max_length=64, extra_json_schema={"format": "uuid"})]
RequestId = Annotated[str, Meta(max_length=64)]
Id = Annotated[int, Meta(ge=1, le=2**63 - 1)]  # PostgreSQL bigint; larger ids cannot exist
UserIds = Annotated[list[UserUuid], Meta(max_length=MAX_USERS_PER_CALL)]
ClientMsgId = Annotated[str, Meta(min_length=1, max_length=64)]
Seq = Annotated[int, Meta(ge=0, le=2**63 - 1)]
PageSize = Annotated[int, Meta(ge=1, le=MAX_PAGE_SIZE, description="page size")]
Version = Annotated[int, Meta(ge=0, le=2**63 - 1)]
MAX_MENTIONS = 100
Mentions = Annotated[list[UserUuid], Meta(max_length=MAX_MENTIONS)]
MAX_ATTACHMENTS = 10
# An upload's id (a UUID), kept a str like UserUuid: a malformed one is `invalid`.
FileUuid = Annotated[str, Meta(extra_json_schema={"format": "uuid"})]
Attachments = Annotated[
    list[FileUuid],
    Meta(max_length=MAX_ATTACHMENTS, description="upload_ids of your uploads, in order"),
]
# One emoji grapheme cluster (handlers check it is one); the schema bounds its length.
Emoji = Annotated[str, Meta(min_length=1, max_length=32)]
MAX_REPORT_REASON_CHARS = 500
MAX_SEARCH_CHARS = 256
MAX_SEARCH_RESULTS = 100
MAX_PRESENCE_USERS = 1000
MAX_PUSH_ENDPOINT_CHARS = 2048
NotifyLevel = Literal["all", "mentions", "none"]
ReportReason = stripped_text(1, MAX_REPORT_REASON_CHARS)

# --- shared objects -----------------------------------------------------------------------


class Reaction(Struct):
    emoji: str
    count: int
    users: list[UserUuid]  # the newest 20 who reacted with it, newest first


class Attachment(Struct):
    """A file a message carries. Its bytes: GET /files/{id} (and /files/{id}/thumbnail
    when width is set), or the URLs of POST /files/{id}/link."""

    id: FileUuid
    name: str
    mime: str  # sniffed from the content, never the uploader's word
    size: int  # bytes
    width: int | None  # set for an image chatd decoded (it has a thumbnail); else null
    height: int | None


class ForwardedFrom(Struct):
    """Who wrote a forwarded message, and when; never which chat it came from."""

    sender_uuid: UserUuid
    sender_name: str
    timestamp: Timestamp


class Message(Struct):
    id: int
    chat_id: int
    seq: int
    sender_uuid: UserUuid
    text: str  # "" once deleted for everyone
    timestamp: Timestamp
    read_status: Literal["unread", "read"]
    client_msg_id: str | None
    edited_at: Timestamp | None  # the last edit's time
    deleted: bool  # deleted for everyone: a tombstone that keeps its id and seq
    reply_to: int | None  # a message id of the same chat
    mentions: list[UserUuid]
    forwarded_from: ForwardedFrom | None
    reactions: list[Reaction]  # in the order each emoji was first used
    version: int  # the chat's version at this message's last change
    attachments: list[Attachment] = []  # in the order sent; none once deleted for everyone


class Member(Struct, omit_defaults=True):
    user_uuid: UserUuid
    name: str
    avatar: str | None  # a file id (GET /files/{id}, any signed-in user); null: none set
    is_bot: bool = False  # sent only when true


Role = Literal["owner", "admin", "member"]


class ChatMember(Struct, omit_defaults=True):
    user_uuid: UserUuid
    name: str
    role: Role  # private chats: both are "member"
    avatar: str | None  # a file id; null: none set
    is_bot: bool = False  # sent only when true


class Chat(Struct):
    id: int
    type: Literal["private", "group"]
    name: str | None
    created_at: Timestamp
    members: list[ChatMember]  # in join order
    # The chat's change counter: +1 for every new, edited, deleted or reacted message, and
    # every pin or unpin.
    version: int
    pinned_message_id: int | None
    photo: str | None  # groups: a file id (GET /files/{id}, members); null: none set


class Presence(Struct):
    """Whether a user is online. A user who does not share presence is always "offline"
    with last_seen null."""

    user_uuid: UserUuid
    status: Literal["online", "offline"]
    # When they were last online, while offline; null while online, and when unknown or
    # not shared.
    last_seen: Timestamp | None


class ChatOverview(Chat):
    """A chat as the caller's chat list shows it."""

    last_message: Message | None
    last_seq: int  # seq of the newest message; 0 when there is none
    read_upto: int | None  # message id of the caller's read pointer; null before any read
    read_seq: int  # seq of the caller's read pointer
    # Messages from others above the read pointer, those deleted or hidden from you aside.
    unread_count: int
    unread_mentions: int  # of those, the ones that mention you
    role: Role  # the caller's role
    # Your notification settings for this chat (set_notifications).
    mute_until: Timestamp | None = None  # muted until then; null: not muted
    notify: NotifyLevel = "all"
    # Private chats: the other member's presence (null in groups).
    presence: Presence | None = None


class ErrorBody(Struct, omit_defaults=True):
    code: str
    message: str
    # rate_limited only: milliseconds to wait before the same request is allowed.
    retry_after_ms: int | None = None


def retry_after_ms(seconds: float) -> int:
    """A wait as the error body's retry_after_ms: rounded up, at least 1."""
    return max(1, math.ceil(seconds * 1000))


# --- client → server frames ---------------------------------------------------------------
#
# Each action has one handler (chatd/handlers/__init__.py), and most have a REST route too
# (chatd/rest.py): its path fields come from the URL, the rest from the JSON body (or from
# the query string, for GET and DELETE).


class Action(Struct, tag_field="action", kw_only=True, forbid_unknown_fields=False):
    request_id: RequestId | None = None


class CreateChat(Action, tag="create_chat"):
    type: Literal["group", "private"]
    user_ids: UserIds
    name: GroupName | None = None


class ListChats(Action, tag="list_chats"):
    limit: PageSize = 50
    before: Annotated[Id | None, Meta(description="next_before of the previous page")] = None


class GetChat(Action, tag="get_chat"):
    chat_id: Id


class SendMessage(Action, tag="send_message"):
    chat_id: Id
    text: MessageText = ""  # may be empty when attachments are given
    client_msg_id: ClientMsgId | None = None
    reply_to: Annotated[Id | None, Meta(description="a message of the same chat")] = None
    mentions: Annotated[Mentions, Meta(description="members of the chat")] = []
    attachments: Attachments = []


class EditMessage(Action, tag="edit_message"):
    """Change the text of a message you sent; the old text is kept (GET .../edits)."""

    message_id: Id
    text: Text


class DeleteMessage(Action, tag="delete_message"):
    """For everyone: the sender, or a group's owner or admins. For me: any member."""

    message_id: Id
    for_everyone: bool = True


class React(Action, tag="react"):
    message_id: Id
    emoji: Emoji


class Unreact(Action, tag="unreact"):
    message_id: Id
    emoji: Emoji


class ForwardMessage(Action, tag="forward_message"):
    """Copy a message you can see into a chat of yours, as your own new message."""

    message_id: Id
    chat_id: Id  # where to
    client_msg_id: ClientMsgId | None = None


class PinMessage(Action, tag="pin_message"):
    """Pin a message of its chat (groups: owner and admins; private chats: either member)."""

    message_id: Id
    # REST fills it from the path; when given, the message must be of this chat.
    chat_id: Id | None = None


class UnpinMessage(Action, tag="unpin_message"):
    chat_id: Id


class GetMessage(Action, tag="get_message"):
    message_id: Id


class MarkRead(Action, tag="mark_read"):
    message_ids: Annotated[list[Id], Meta(min_length=1, max_length=1000)]


class SyncPoint(Struct, forbid_unknown_fields=False):
    seq: Seq  # the last seq you hold
    version: Version  # the chat version you hold


class Sync(Action, tag="sync"):
    # chat id → the last seq seen (the old form: new messages only), or a SyncPoint (new
    # messages, and the changes to those you hold).
    chats: Annotated[dict[Id, Seq | SyncPoint], Meta(min_length=1, max_length=1000)]
    limit: Annotated[int, Meta(ge=1, le=500)] = 100  # new messages per chat


class Typing(Action, tag="typing"):
    chat_id: Id


class AddMembers(Action, tag="add_members"):
    chat_id: Id
    user_ids: Annotated[list[UserUuid], Meta(min_length=1, max_length=MAX_USERS_PER_CALL)]


class RemoveMember(Action, tag="remove_member"):
    chat_id: Id
    user_uuid: UserUuid


class LeaveChat(Action, tag="leave_chat"):
    chat_id: Id


class RenameChat(Action, tag="rename_chat"):
    """update_chat with a name alone (kept for the clients that use it)."""

    chat_id: Id
    name: GroupName


class UpdateChat(Action, tag="update_chat"):
    """Change what is given of a group (admins and the owner)."""

    chat_id: Id
    name: GroupName | UnsetType = UNSET
    photo: Annotated[
        FileUuid | UnsetType | None,
        Meta(description="an image you uploaded (upload_id); null removes the photo"),
    ] = UNSET


class SetRole(Action, tag="set_role"):
    chat_id: Id
    user_uuid: UserUuid
    role: Role  # "owner" hands your ownership over; you become an admin


class DeleteChat(Action, tag="delete_chat"):
    chat_id: Id


class ReportMessage(Action, tag="report_message"):
    """Report a message of a chat you are in to the server's admins (once per message)."""

    message_id: Id
    reason: ReportReason


class BlockUser(Action, tag="block_user"):
    """Block a user: they cannot open a private chat with you, write in it, or add you to
    groups; your client collapses their group messages (the first frame's `blocked`)."""

    user_uuid: UserUuid


class UnblockUser(Action, tag="unblock_user"):
    user_uuid: UserUuid


class SearchMessages(Action, tag="search_messages"):
    """Full-text search in the text of the messages of your chats, newest first."""

    q: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=MAX_SEARCH_CHARS,
            description='websearch syntax: words, "a phrase", -excluded, or',
        ),
    ]
    chat_id: Annotated[Id | None, Meta(description="search this chat only")] = None
    before: Annotated[Id | None, Meta(description="next_before of the previous page")] = None
    limit: Annotated[int, Meta(ge=1, le=MAX_SEARCH_RESULTS, description="page size")] = 20


class GetPresence(Action, tag="get_presence"):
    """Presence of users you share a chat with (the others are left out of the answer)."""

    user_ids: Annotated[list[UserUuid], Meta(min_length=1, max_length=MAX_PRESENCE_USERS)]


class SetNotifications(Action, tag="set_notifications"):
    """Your notification settings for one chat: what is given changes."""

    chat_id: Id
    mute_until: Annotated[
        Timestamp | UnsetType | None,
        Meta(description="muted until then; null: not muted"),
    ] = UNSET
    notify: Annotated[
        NotifyLevel | UnsetType, Meta(description="all, mentions (of you) or none")
    ] = UNSET


ClientAction = (
    CreateChat
    | ListChats
    | GetChat
    | SendMessage
    | GetMessage
    | EditMessage
    | DeleteMessage
    | React
    | Unreact
    | ForwardMessage
    | PinMessage
    | UnpinMessage
    | MarkRead
    | Sync
    | Typing
    | AddMembers
    | RemoveMember
    | LeaveChat
    | RenameChat
    | UpdateChat
    | SetRole
    | DeleteChat
    | BlockUser
    | UnblockUser
    | ReportMessage
    | SearchMessages
    | GetPresence
    | SetNotifications
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
    # JSON strings hold NUL only as the escape \u0000 (a raw one is malformed): without
    # the escape in the frame, no string can have one, and the walk is skipped.
    if (b"\\u0000" if isinstance(raw, bytes) else "\\u0000") not in raw:
        return action
    try:
        refuse_nul(action)
    except ChatError as exc:
        raise _tagged(exc, action.request_id) from None
    return action


def refuse_nul(value: Any) -> None:
    """PostgreSQL text cannot hold NUL: refuse it in any string of a decoded frame or body."""
    if _has_nul(value):
        raise ChatError(INVALID, "strings must not contain NUL (\\u0000) characters")


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


# --- REST-only requests ------------------------------------------------------------------
#
# Routes with no socket action: accounts and tokens, the user list, history. Like the
# actions above, each is one Struct with one handler, and its route is a row of rest.py.


class Register(Struct, kw_only=True):
    name: UserName
    email: str
    password: Password


class Login(Struct, kw_only=True):
    email: str
    password: str
    # The session's name in GET /me/sessions; without it, one made from the User-Agent.
    device: Device | None = None


class Refresh(Struct, kw_only=True):
    refresh_token: str


class GetMe(Struct, kw_only=True):
    pass


class UpdateMe(Struct, kw_only=True):
    """PATCH /me: change what is given of your profile."""

    name: UserName | None = None
    avatar: Annotated[
        FileUuid | UnsetType | None,
        Meta(description="an image you uploaded (upload_id); null removes the avatar"),
    ] = UNSET
    # false: others see you "offline" with last_seen null, and get no presence events.
    share_presence: bool | None = None


class ChangePassword(Struct, kw_only=True):
    """POST /me/password: needs the current password; signs out every other session."""

    current: Annotated[str, Meta(max_length=MAX_PASSWORD_CHARS)]
    new: Password


class ListSessions(Struct, kw_only=True):
    """GET /me/sessions: your live sessions (logins), most recently seen first."""


class RevokeSession(Struct, kw_only=True):
    """DELETE /me/sessions/{session_id}: sign one of your sessions out, on every device."""

    session_id: SessionUuid


class DeleteMe(Struct, kw_only=True):
    """DELETE /me: delete your account (needs your password); see docs/protocol.md."""

    password: Annotated[str, Meta(max_length=MAX_PASSWORD_CHARS)]


class ExportMe(Struct, kw_only=True):
    """GET /me/export: your data as JSON, your messages a page at a time."""

    after: Annotated[
        Id | None, Meta(description="next_after of the previous page: messages after it")
    ] = None


# --- administration (server role admin; chatd/handlers/admin.py) ---


class AdminListUsers(Struct, kw_only=True):
    """GET /admin/users: every account, oldest first, keyset-paginated."""

    q: Annotated[
        Annotated[str, Meta(max_length=254)] | None,
        Meta(description="keep users whose name or email starts with this"),
    ] = None
    limit: PageSize = 50
    after: Annotated[
        uuid.UUID | None, Meta(description="the last user_uuid of the previous page")
    ] = None


class AdminCreateUser(Struct, kw_only=True):
    """POST /admin/users: an account made by an admin (as register, without its limit)."""

    name: UserName
    email: str
    password: Password
    role: Literal["user", "admin"] = "user"


class AdminUpdateUser(Struct, kw_only=True):
    """PATCH /admin/users/{user_uuid}: what is given changes. `disabled: true` revokes every
    session (sockets close with 1008) and refuses logins; a new `password` revokes them too."""

    user_uuid: UserUuid
    role: Literal["user", "admin"] | None = None
    disabled: bool | None = None
    password: Password | None = None


class AdminDeleteUser(Struct, kw_only=True):
    """DELETE /admin/users/{user_uuid}: delete an account as DELETE /me does."""

    user_uuid: UserUuid


class AdminStats(Struct, kw_only=True):
    """GET /admin/stats."""


class AdminDeleteMessage(Struct, kw_only=True):
    """DELETE /admin/messages/{message_id}: moderation, a delete for everyone of any message."""

    message_id: Id


class AdminListReports(Struct, kw_only=True):
    """GET /admin/reports: newest first."""

    limit: PageSize = 50
    before: Annotated[Id | None, Meta(description="the last id of the previous page")] = None


class AdminListAudit(Struct, kw_only=True):
    """GET /admin/audit: newest first."""

    limit: PageSize = 50
    before: Annotated[Id | None, Meta(description="the last id of the previous page")] = None


class ListBlocks(Struct, kw_only=True):
    """GET /me/blocks: the users you block, with their names, most recently blocked first."""


class Logout(Struct, kw_only=True):
    """POST /logout: sign out the session of the access token used."""


class ListUsers(Struct, kw_only=True):
    q: Annotated[
        Annotated[str, Meta(max_length=254)] | None,
        Meta(description="keep users whose name starts with this, or whose email is this"),
    ] = None
    limit: PageSize = 50
    after: Annotated[
        uuid.UUID | None, Meta(description="the last user_uuid of the previous page")
    ] = None


class GetHistory(Struct, kw_only=True):
    chat_id: Id
    page: Annotated[int, Meta(ge=1, le=1_000_000, description="1 = the newest page")] = 1
    page_size: PageSize = 50
    before: Annotated[
        Id | None,
        Meta(
            description="keyset cursor: messages with an id below this one; any id works"
            " (9223372036854775807: the newest page)"
        ),
    ] = None
    limit: Annotated[int, Meta(ge=1, le=MAX_PAGE_SIZE, description="keyset page size")] = 50


class GetUser(Struct, kw_only=True):
    """GET /users/{user_uuid}: a user's name, and their presence when you share a chat."""

    user_uuid: UserUuid


class PushKeys(Struct, forbid_unknown_fields=False):
    p256dh: Annotated[str, Meta(min_length=1, max_length=256)]  # base64url, as the browser gives
    auth: Annotated[str, Meta(min_length=1, max_length=64)]


class AddPushSubscription(Struct, kw_only=True, forbid_unknown_fields=False):
    """POST /push/subscriptions: a browser's PushSubscription (its toJSON())."""

    endpoint: Annotated[str, Meta(min_length=1, max_length=MAX_PUSH_ENDPOINT_CHARS)]
    keys: PushKeys


class RemovePushSubscription(Struct, kw_only=True):
    """DELETE /push/subscriptions: forget a subscription of yours (none: no change)."""

    endpoint: Annotated[str, Meta(min_length=1, max_length=MAX_PUSH_ENDPOINT_CHARS)]


class GetVapidKey(Struct, kw_only=True):
    """GET /push/vapid_public_key: the key browsers subscribe with (applicationServerKey)."""


class GetEdits(Struct, kw_only=True):
    """GET /messages/{message_id}/edits: a message's earlier texts."""

    message_id: Id


class GetFileLink(Struct, kw_only=True):
    """POST /files/{file_id}/link: short-lived URLs of a file you may download."""

    file_id: uuid.UUID


class Read(Struct, kw_only=True):
    """POST /chats/{chat_id}/read: mark_read in one chat, up to one of its messages."""

    chat_id: Id
    up_to: Id  # a message id in this chat


# --- bots and integrations (chatd/handlers/bots.py) ---

MAX_COMMANDS = 100
MAX_WEBHOOK_URL_CHARS = 2000
MAX_TOKEN_TTL = 366 * 24 * 3600
BotUsername = Annotated[
    str,
    Meta(
        min_length=3,
        max_length=32,
        pattern="^[A-Za-z][A-Za-z0-9_]*$",
        description="a letter, then letters, digits or _; unique among bots (case-insensitive)",
    ),
]
CommandName = Annotated[
    str, Meta(min_length=1, max_length=32, pattern="^[a-z0-9_]+$", description="without the /")
]
TokenName = stripped_text(1, MAX_DEVICE_CHARS)
Scope = Literal["read", "write"]
# A token's id (a handler turns it into a UUID, so a malformed one is `not_found`).
TokenUuid = SessionUuid


class BotCommand(Struct):
    name: CommandName
    description: Annotated[str, Meta(max_length=256)] = ""


class CreateBot(Struct, kw_only=True):
    """POST /bots: a bot account of yours, and its first token (shown once)."""

    name: UserName
    username: BotUsername


class ListBots(Struct, kw_only=True):
    """GET /bots: your bots."""


class GetBot(Struct, kw_only=True):
    bot_id: Id


class UpdateBot(Struct, kw_only=True):
    """PATCH /bots/{bot_id}: what is given changes. `webhook_url` "" removes the webhook;
    a first URL (or `rotate_secret`) makes a new signing secret."""

    bot_id: Id
    name: UserName | None = None
    webhook_url: Annotated[str, Meta(max_length=MAX_WEBHOOK_URL_CHARS)] | None = None
    rotate_secret: bool = False


class DeleteBot(Struct, kw_only=True):
    """DELETE /bots/{bot_id}: its tokens stop, its sockets close, it leaves its chats."""

    bot_id: Id


class CreateBotToken(Struct, kw_only=True):
    bot_id: Id
    name: TokenName = "token"


class ListBotTokens(Struct, kw_only=True):
    bot_id: Id


class RevokeBotToken(Struct, kw_only=True):
    bot_id: Id
    token_id: TokenUuid


class SetCommands(Struct, kw_only=True):
    """PUT /bots/{bot_id}/commands: the bot's whole command list (by its owner, or the bot)."""

    bot_id: Id
    commands: Annotated[list[BotCommand], Meta(max_length=MAX_COMMANDS)]


class GetCommands(Struct, kw_only=True):
    bot_id: Id


class ChatCommands(Struct, kw_only=True):
    """GET /chats/{chat_id}/commands: the commands of the chat's bots (for `/` completion)."""

    chat_id: Id


class ListDeliveries(Struct, kw_only=True):
    """GET /bots/{bot_id}/deliveries: the bot's webhook deliveries, newest first."""

    bot_id: Id
    limit: PageSize = 50
    before: Annotated[Id | None, Meta(description="the last id of the previous page")] = None


class CreateToken(Struct, kw_only=True):
    """POST /me/tokens: a personal access token (shown once)."""

    name: TokenName
    scopes: Annotated[list[Scope], Meta(min_length=1, max_length=2)] = msgspec.field(
        default_factory=lambda: ["read", "write"]
    )
    expires_in: Annotated[
        Annotated[int, Meta(ge=60, le=MAX_TOKEN_TTL)] | None,
        Meta(description="seconds; null: until revoked"),
    ] = None


class ListTokens(Struct, kw_only=True):
    """GET /me/tokens: your personal access tokens."""


class RevokeToken(Struct, kw_only=True):
    token_id: TokenUuid


class CreateWebhook(Struct, kw_only=True):
    """POST /chats/{chat_id}/webhooks: an incoming webhook (its URL is shown once)."""

    chat_id: Id
    name: UserName = "Webhook"


class ListWebhooks(Struct, kw_only=True):
    chat_id: Id


class DeleteWebhook(Struct, kw_only=True):
    chat_id: Id
    webhook_id: Id


class PostHook(Struct, kw_only=True):
    """POST /hooks/{webhook_id}/{secret}: Slack's incoming-webhook body (other fields are
    ignored)."""

    webhook_id: Id
    secret: Annotated[str, Meta(max_length=128)]
    text: Text
    client_msg_id: ClientMsgId | None = None  # or the Idempotency-Key header: sent once


class Bot(Struct):
    id: int
    user_uuid: UserUuid
    username: str
    name: str
    owner_uuid: UserUuid
    created_at: Timestamp
    commands: list[BotCommand]
    webhook_url: str | None
    webhook_secret: str | None  # the HMAC-SHA256 key of its deliveries (chatd.signing)


class TokenInfo(Struct):
    id: TokenUuid
    name: str
    scopes: list[Scope]
    created_at: Timestamp
    expires_at: Timestamp | None
    last_used_at: Timestamp  # recorded at most once a minute per server process


class NewToken(TokenInfo):
    token: str  # shown this once: only its hash is kept


class BotCreated(Struct):
    bot: Bot
    token: NewToken


class BotList(Struct):
    bots: list[Bot]


class TokenList(Struct):
    tokens: list[TokenInfo]


class CommandList(Struct):
    commands: list[BotCommand]


class ChatCommand(Struct):
    name: str
    description: str
    bot_uuid: UserUuid
    bot_username: str


class ChatCommandList(Struct):
    commands: list[ChatCommand]  # by name, then bot


class DeliveryInfo(Struct):
    id: int
    event: str  # the action of the event delivered ("new_message", "command", ...)
    chat_id: int | None
    state: Literal["pending", "delivered", "dead"]
    attempts: int
    last_status: int | None
    last_error: str | None
    created_at: Timestamp
    finished_at: Timestamp | None


class DeliveryList(Struct):
    deliveries: list[DeliveryInfo]
    has_more: bool


class Webhook(Struct):
    id: int
    chat_id: int
    name: str
    bot_uuid: UserUuid  # the user it posts as
    creator_uuid: UserUuid
    created_at: Timestamp
    url: str | None = None  # on creation only: the path with its secret


class WebhookList(Struct):
    webhooks: list[Webhook]


# --- server → client frames ---------------------------------------------------------------


class Event(Struct, tag_field="action"):
    pass


class UnreadMessages(Event, tag="unread_messages"):
    data: list[Message]
    has_more: bool
    # The users you blocked (left out when none): collapse their messages in groups.
    blocked: list[UserUuid] | UnsetType = UNSET


class BlockList(Struct):
    blocked: list[UserUuid]  # everyone you block, most recently blocked first


class BlocksChanged(Event, tag="blocks_changed"):
    """You blocked or unblocked someone (sent to all your sockets): the whole list now."""

    data: BlockList


class Ack(Event, tag="ack"):
    request_id: str | None
    data: Any


class Error(Event, tag="error"):
    request_id: str | None
    error: ErrorBody


class NewMessage(Event, tag="new_message"):
    data: Message


class MessageUpdated(Event, tag="message_updated"):
    """An edit, a delete for everyone or a reaction change: the whole message as it is now."""

    data: Message


class MessageHiddenData(Struct):
    chat_id: int
    message_id: int


class MessageHidden(Event, tag="message_hidden"):
    """You deleted a message for yourself (sent to your own sockets only)."""

    data: MessageHiddenData


class ChatCreated(Event, tag="chat_created"):
    data: Chat


class MessageReadData(Struct):
    message_id: int
    chat_id: int


class MessageRead(Event, tag="message_read"):
    data: MessageReadData


class MessagesReadData(Struct):
    chat_id: int
    up_to_message_id: int  # every message you sent in the chat with an id up to this one


class MessagesRead(Event, tag="messages_read"):
    """Instead of many message_read events when over 100 of yours become read at once."""

    data: MessagesReadData


class MemberAddedData(Struct):
    chat: Chat  # after the change: new members learn the chat from this
    user_uuids: list[UserUuid]  # who was added
    by: UserUuid


class MemberAdded(Event, tag="member_added"):
    data: MemberAddedData


class MemberRemovedData(Struct):
    chat_id: int
    user_uuid: UserUuid
    by: UserUuid  # equal to user_uuid when the member left by themselves


class MemberRemoved(Event, tag="member_removed"):
    data: MemberRemovedData


class ChatUpdated(Event, tag="chat_updated"):
    data: Chat


class UserUpdated(Event, tag="user_updated"):
    """A user you share a chat with (or you) changed their name or avatar."""

    data: Member


class ChatDeletedData(Struct):
    chat_id: int
    by: UserUuid


class ChatDeleted(Event, tag="chat_deleted"):
    data: ChatDeletedData


class TypingData(Struct):
    chat_id: int
    user_uuid: UserUuid


class TypingEvent(Event, tag="typing"):
    data: TypingData


class CommandData(Struct):
    chat_id: int
    command: str  # without the / (and without an @username)
    args: str  # the rest of the text, stripped
    message: Message


class Command(Event, tag="command"):
    """To a bot: a message of a chat it is in started with one of its commands."""

    data: CommandData


def parse_command(text: str) -> tuple[str, str | None, str] | None:
    """A message's command, as bots hear it: ("roll", "dicebot", "2d6") for
    "/roll@dicebot 2d6", ("roll", None, "") for "/roll"; None when the text is no command.
    The name is lower-cased; "@username" names the one bot meant."""
    if not text.startswith("/"):
        return None
    parts = text[1:].split(maxsplit=1)
    if not parts:
        return None
    name, _, username = parts[0].partition("@")
    if not 1 <= len(name) <= 32 or not all(c.isascii() and (c.isalnum() or c == "_") for c in name):
        return None
    return name.lower(), username.lower() or None, parts[1].strip() if len(parts) > 1 else ""


class PresenceEvent(Event, tag="presence"):
    """A user you share a private chat or a small group with came online or went offline."""

    data: Presence


class NotificationSettings(Struct):
    chat_id: int
    mute_until: Timestamp | None
    notify: NotifyLevel


class NotificationsChanged(Event, tag="notifications_changed"):
    """You changed a chat's notification settings (sent to your own sockets)."""

    data: NotificationSettings


# Every frame the server sends on /connect, for clients that decode them (chatd.client).
ServerFrame = (
    UnreadMessages
    | BlocksChanged
    | Ack
    | Error
    | NewMessage
    | MessageUpdated
    | MessageHidden
    | ChatCreated
    | MessageRead
    | MessagesRead
    | MemberAdded
    | MemberRemoved
    | ChatUpdated
    | UserUpdated
    | ChatDeleted
    | TypingEvent
    | Command
    | PresenceEvent
    | NotificationsChanged
)

# --- replies -----------------------------------------------------------------------------


class ReadUpto(Struct):
    read_upto: dict[int, int]


class ChatPage(Struct):
    chats: list[ChatOverview]  # most recent activity first
    has_more: bool
    next_before: int | None  # pass as `before` for the next page


class SyncedChat(Struct):
    """A chat's answer to sync.

    The old form (you gave a seq) answers `messages`, `has_more` and `error` alone. The
    new form (a SyncPoint) also answers the rest: apply `messages`, `updated` and
    `hidden`, take `pinned_message_id`, store `seq` and `version`, and you are exactly
    in sync with the chat at `version`.
    """

    messages: list[Message]  # seq above the one you gave, ascending (none you hid)
    has_more: bool  # more remain: sync again (from `seq` and `version` in the new form)
    error: str | None = None  # "not_found": you are not (or no longer) in this chat
    # at or below your seq, changed since your version: replace yours
    updated: list[Message] | UnsetType = UNSET
    hidden: list[int] | UnsetType = UNSET  # ids you hid at or since your version: drop them
    pinned_message_id: int | UnsetType | None = UNSET
    seq: int | UnsetType = UNSET  # the seq this answer brings you to
    version: int | UnsetType = UNSET  # the version this answer brings you to
    # Too many changes to replay: refetch the history you keep, then sync from `seq` and
    # `version` (messages, updated and hidden are empty).
    too_long: bool | UnsetType = UNSET


class SyncResult(Struct):
    chats: dict[int, SyncedChat]


class RegisterResponse(Struct):
    user_uuid: UserUuid
    name: str
    email: str


class TokenPair(Struct):
    access_token: str
    refresh_token: str
    expires_in: int
    token_type: str = "bearer"


class Me(Struct):
    user_uuid: UserUuid
    name: str
    email: str
    created_at: Timestamp
    avatar: str | None  # a file id; null: none set
    share_presence: bool = True  # PATCH /me {share_presence}
    is_bot: bool = False
    bot_id: int | None = None  # a bot's id in /bots/{bot_id} (set for bots made by POST /bots)
    bot_username: str | None = None  # and its username (commands may say /name@username)
    # The `picture` claim's URL, for a user of the app's tokens (docs/embedding.md);
    # chatd never fetches it. null: none (and always for chatd's own accounts).
    picture: str | None = None


class SessionInfo(Struct):
    id: SessionUuid
    device: str
    ip: str  # the client's address at login
    created_at: Timestamp
    last_seen_at: Timestamp  # the last login, refresh or first use on a server process
    current: bool  # the session of the access token that asked


class ExportedChat(Struct):
    id: int
    type: str
    name: str | None
    role: str  # yours
    joined_at: Timestamp


class Export(Struct):
    """Your data (GDPR articles 15 and 20). `messages` are yours, oldest first, at most
    5000 a page: while `has_more`, ask again with `after=next_after` for the rest."""

    exported_at: Timestamp
    profile: Me
    sessions: list[SessionInfo]
    blocked: list[Member]
    chats: list[ExportedChat]
    # The files you uploaded, oldest first (their bytes: GET /files/{id}); on the first
    # page only (without `after`), empty on the later ones.
    files: list[Attachment]
    messages: list[Message]
    has_more: bool
    next_after: int | None


class AdminUser(Struct):
    user_uuid: UserUuid
    name: str
    email: str
    role: str  # "user" or "admin"
    created_at: Timestamp
    disabled: bool
    deleted: bool


class AdminUserList(Struct):
    users: list[AdminUser]


class Stats(Struct):
    users: int  # accounts not deleted
    admins: int
    disabled: int
    deleted: int
    chats: int
    groups: int
    messages: int
    live_sessions: int
    reports: int


class Report(Struct):
    id: int
    message_id: int
    reporter_uuid: UserUuid
    reason: str
    created_at: Timestamp


class ReportedMessage(Struct):
    report: Report
    message: Message  # as it is now (a tombstone once deleted)


class ReportList(Struct):
    reports: list[ReportedMessage]  # newest first
    has_more: bool


class AuditEntry(Struct):
    id: int
    at: Timestamp
    actor_uuid: UserUuid | None  # None: the `chatd admin` command
    action: str
    target: str
    details: dict[str, Any]


class AuditLog(Struct):
    entries: list[AuditEntry]  # newest first
    has_more: bool


class SessionList(Struct):
    sessions: list[SessionInfo]  # most recently seen first


class UserList(Struct):
    users: list[Member]


class Highlight(Struct):
    """Where a search matched, in characters (Unicode code points) of the message's text:
    text[start:end]. Offsets, never markup: the client highlights, so no HTML is made."""

    start: int
    end: int


class SearchHit(Struct):
    message: Message
    highlights: list[Highlight]  # in text order, not overlapping


class SearchResults(Struct):
    results: list[SearchHit]  # newest first
    has_more: bool
    next_before: int | None  # pass as `before` for the next page


class PresenceList(Struct):
    presence: list[Presence]  # the users asked for that you share a chat with


class UserProfile(Struct):
    user_uuid: UserUuid
    name: str
    presence: Presence | None  # null unless you share a chat


class PushSubscriptionInfo(Struct):
    id: int
    endpoint: str
    created_at: Timestamp


class VapidKey(Struct):
    public_key: str  # the VAPID public key, base64url (uncompressed P-256 point)


class History(Struct):
    messages: list[Message]
    has_more: bool


class Edit(Struct):
    text: str  # the text as it was
    timestamp: Timestamp  # when it was written (sent, or the edit that wrote it)


class EditList(Struct):
    edits: list[Edit]  # oldest first; the message itself holds the current text


class DeletedMessage(Struct):
    chat_id: int
    message_id: int
    for_everyone: bool


class Upload(Struct):
    """An upload, stored: attach it by its upload_id."""

    upload_id: FileUuid
    name: str
    mime: str  # sniffed from the content
    size: int
    sha256: str  # of the bytes stored (an image's metadata taken out)
    width: int | None  # images chatd decoded (a thumbnail exists); else null
    height: int | None


class FileLink(Struct):
    """Signed URLs that need no Authorization header (for <img src>), until expires_at."""

    url: str
    thumbnail_url: str | None  # null when the file has no thumbnail
    expires_at: Timestamp


class Health(Struct):
    status: str


class Readiness(Struct):
    status: Literal["ready", "not ready"]
    database: str  # "ok", or what is wrong
    redis: str  # "ok", "not configured", or what is wrong


# --- the app API (API keys, docs/embedding.md) ------------------------------------------------

# The app's own id of a user (the `sub` of its tokens) and of a chat.
Subject = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$")]
ExtId = Annotated[
    str,
    Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$", description="the app's id"),
]
ApiScope = Literal["users", "chats", "messages", "history"]
AppEvent = Literal[
    "message.new",
    "message.updated",
    "member.added",
    "member.removed",
    "chat.created",
    "user.created",
]
MAX_UPSERT_USERS = 1000
MAX_APP_MEMBERS = 1000


class CreateApiKey(Struct, kw_only=True):
    """POST /admin/api_keys: a key for the app's backend, with the scopes it may use; its
    own identity (a bot user named `name`) posts the app's system messages. With a
    `webhook_url`, the `events` are POSTed there, signed with a secret shown once."""

    name: UserName
    scopes: Annotated[list[ApiScope], Meta(min_length=1, max_length=4)]
    webhook_url: Annotated[str, Meta(max_length=2048)] | None = None
    events: Annotated[list[AppEvent], Meta(max_length=6)] = []


class ListApiKeys(Struct, kw_only=True):
    """GET /admin/api_keys: every key that is not revoked, newest first."""


class RevokeApiKey(Struct, kw_only=True):
    """DELETE /admin/api_keys/{key_id}: the key stops working on every process at once,
    and its webhook's pending deliveries are dropped."""

    key_id: Annotated[str, Meta(extra_json_schema={"format": "uuid"})]


class ApiKeyInfo(Struct, kw_only=True):
    id: str
    name: str
    scopes: list[str]
    user_uuid: UserUuid  # the key's own identity (system messages)
    webhook_url: str | None
    events: list[str]
    created_at: Timestamp
    last_used_at: Timestamp


class ApiKeyCreated(ApiKeyInfo, kw_only=True):
    key: str  # shown this once: only its hash is kept
    webhook_secret: str | None  # likewise; signs every delivery (X-Chatd-Signature)


class ApiKeyList(Struct):
    keys: list[ApiKeyInfo]


class AppUser(Struct, kw_only=True):
    sub: Subject
    name: UserName | None = None
    picture: Annotated[str, Meta(max_length=2048)] | None = None


class UpsertUsers(Struct, kw_only=True):
    """POST /app/users: create or update the app's users by `sub` (the users its tokens
    name: the same chatd user either way)."""

    users: Annotated[list[AppUser], Meta(min_length=1, max_length=MAX_UPSERT_USERS)]


class UpsertedUser(Struct):
    sub: str
    user_uuid: UserUuid
    created: bool


class UpsertedUsers(Struct):
    users: list[UpsertedUser]


class DeactivateUsers(Struct, kw_only=True):
    """POST /app/users/deactivate: disable these users (their tokens and sockets stop at
    once, as an admin's disable does); unknown subs are skipped."""

    subs: Annotated[list[Subject], Meta(min_length=1, max_length=MAX_UPSERT_USERS)]


class AppCreateChat(Struct, kw_only=True):
    """POST /app/chats: a chat of the app's users, created once per `ext_id` (201), then
    found (200, as it is: the rest of the request is not applied again). A group is owned
    by the key's identity; a private chat has exactly two members."""

    ext_id: ExtId
    type: Literal["private", "group"] = "group"
    name: GroupName | None = None
    members: Annotated[list[Subject], Meta(max_length=MAX_APP_MEMBERS)] = []


class AppGetChat(Struct, kw_only=True):
    ext_id: ExtId


class AppAddMembers(Struct, kw_only=True):
    """POST /app/chats/{ext_id}/members: add the app's users (created if new) to a group."""

    ext_id: ExtId
    subs: Annotated[list[Subject], Meta(min_length=1, max_length=MAX_APP_MEMBERS)]


class AppRemoveMembers(Struct, kw_only=True):
    """DELETE /app/chats/{ext_id}/members: remove the app's users from a group."""

    ext_id: ExtId
    subs: Annotated[list[Subject], Meta(min_length=1, max_length=MAX_APP_MEMBERS)]


class AppPostMessage(Struct, kw_only=True):
    """POST /app/chats/{ext_id}/messages: a message as the app's user `as_user` (a member),
    or as the key's own identity; stored once per client_msg_id (a retry answers 200 with
    the message stored first)."""

    ext_id: ExtId
    text: Text
    client_msg_id: ClientMsgId
    as_user: Subject | None = None


class AppGetMessages(Struct, kw_only=True):
    """GET /app/chats/{ext_id}/messages: newest first, keyset-paginated."""

    ext_id: ExtId
    before: Annotated[Id | None, Meta(description="messages with an id below this one")] = None
    limit: PageSize = 50


class AppChat(Chat, kw_only=True):
    ext_id: str


class ErrorResponse(Struct):
    error: ErrorBody


_encoder = msgspec.json.Encoder()


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def encode_text(value: Any) -> str:
    """Encode a frame once as the str a WebSocket text frame carries."""
    return _encoder.encode(value).decode()


# --- text checks shared by every handler --------------------------------------------------


def clean_text(value: str, field: str, *, min_len: int, max_len: int) -> str:
    """Strip `value` and check it fits; PostgreSQL text cannot hold NUL, so refuse it here.

    Text made only of invisible characters (chatd.text.looks_empty: zero-width spaces,
    bidi marks, Hangul fillers, ...) counts as empty.
    """
    value = value.strip()
    length = 0 if looks_empty(value) else len(value)
    if not min_len <= length <= max_len:
        raise ChatError(INVALID, f"{field} must be {min_len}..{max_len} characters")
    if "\x00" in value:
        raise ChatError(INVALID, f"{field} must not contain NUL characters")
    return value
