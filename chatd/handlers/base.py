"""What every handler uses: the Context, the chat lock, and rows turned into wire objects."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import asyncpg

from chatd.auth import ACCESS, InvalidToken, read_token
from chatd.node import Node
from chatd.protocol import (
    FORBIDDEN,
    INVALID,
    UNAUTHORIZED,
    Chat,
    ChatError,
    ChatMember,
    Member,
    encode,
    no_such_chat,
)
from chatd.tokens import is_api_token

T = TypeVar("T")

# Who the Context of a public route (register, login, refresh) names: no user has it.
NOBODY = uuid.UUID(int=0)


@dataclass(frozen=True, slots=True)
class Context:
    """What a handler may use: the node, and who is asking from where."""

    node: Node
    user_id: uuid.UUID  # NOBODY on public routes
    peer: str = "unknown"  # the client's address (per-address limits)
    session_id: uuid.UUID | None = None  # the login the access token belongs to
    user_agent: str = ""  # the User-Agent header (a login's device name when it gives none)
    # What authenticated: "login" (an access token of a login), "bot" (a bot's token),
    # "pat" (a personal access token), "app" (an API key, handlers/app.py) or "external"
    # (the app's own token, chatd/identity.py). handlers/__init__.py `authorize` decides with it.
    kind: str = "login"
    scopes: frozenset[str] = frozenset({"read", "write"})

    @property
    def is_bot(self) -> bool:
        return self.kind == "bot"


async def authenticate(node: Node, token: str | None, peer: str, user_agent: str = "") -> Context:
    """The Context of the user and live session an access token names; `unauthorized`
    when it names none, or a session that was revoked.

    The one place a socket (chatd/session.py) or a request (chatd/rest.py) becomes a user.
    The session is looked up in the process's SessionCache: no query once it is known.
    """
    if not token:
        raise ChatError(UNAUTHORIZED, "missing bearer access token")
    if is_api_token(token):
        return await _authenticate_api_token(node, token, peer, user_agent)
    if node.identity is not None and node.identity.claims(token):
        return await _authenticate_external(node, token, peer, user_agent)
    try:
        user_id, session_id = read_token(node.settings.secret, token, ACCESS)
    except InvalidToken:
        raise ChatError(UNAUTHORIZED, "invalid or expired access token") from None
    # A token without a session predates sessions: it cannot be revoked, so it is refused
    # (the client refreshes; its refresh token's family became a session).
    if session_id is None or not await node.sessions.is_live(session_id, user_id):
        raise ChatError(UNAUTHORIZED, "session revoked or unknown; log in again")
    return Context(node, user_id, peer, session_id, user_agent)


async def _authenticate_api_token(node: Node, token: str, peer: str, user_agent: str) -> Context:
    """A bot's token or a personal access token (chatd/tokens.py): its grant from memory,
    its session's liveness from the SessionCache."""
    grant = await node.tokens.grant(token)
    if grant is None or (grant.expires_at is not None and grant.expires_at <= datetime.now(UTC)):
        raise ChatError(UNAUTHORIZED, "invalid, expired or revoked API token")
    if not await node.sessions.is_live(grant.session_id, grant.user_id):
        raise ChatError(UNAUTHORIZED, "invalid, expired or revoked API token")
    node.tokens.used(grant.session_id)
    return Context(
        node, grant.user_id, peer, grant.session_id, user_agent, grant.kind, grant.scopes
    )


async def _authenticate_external(node: Node, token: str, peer: str, user_agent: str) -> Context:
    """A JWT of the app's identity provider (chatd/identity.py): its user, created on
    first sight. It has no session (session_id None): it ends at its `exp`, or when the
    account is disabled or deleted."""
    assert node.identity is not None
    user_id = await node.identity.authenticate(token)
    return Context(node, user_id, peer, None, user_agent, kind="external")


def anonymous(node: Node, peer: str, user_agent: str = "") -> Context:
    """The Context of a public route: nobody is signed in."""
    return Context(node, NOBODY, peer, user_agent=user_agent)


# --- the chat lock ------------------------------------------------------------------------

# Every write to a chat (messages, read watermark, membership) first locks its chats row,
# so they happen one at a time per chat, and seq order is commit order. The join keeps
# non-members from queueing on the lock, but its membership row was read *before* any wait
# for the lock: what a handler decides on must be read again by a later statement.
_LOCK_CHAT = """
SELECT c.type, c.last_seq, c.read_seq, c.version, c.pinned_message_id
FROM chats c
WHERE c.id = $1 AND EXISTS (SELECT 1 FROM chat_members WHERE chat_id = $1 AND user_id = $2)
FOR UPDATE OF c
"""

_ROLE_OF = "SELECT role FROM chat_members WHERE chat_id = $1 AND user_id = $2"

ROLE_RANK = {"member": 0, "admin": 1, "owner": 2}


async def lock_chat(conn: asyncpg.Connection, chat_id: int, user_id: uuid.UUID) -> asyncpg.Record:
    """Lock the chat for this transaction; return its type, last_seq, read_seq, version and
    pinned_message_id.

    Raises not_found when the chat does not exist or the caller is not a member. The
    membership may change while we wait for the lock: re-check it before relying on it.
    """
    row = await conn.fetchrow(_LOCK_CHAT, chat_id, user_id)
    if row is None:
        raise no_such_chat()
    return row


async def role_of(conn: asyncpg.Connection, chat_id: int, user_id: uuid.UUID) -> str | None:
    return await conn.fetchval(_ROLE_OF, chat_id, user_id)


async def lock_group(
    conn: asyncpg.Connection, chat_id: int, user_id: uuid.UUID, at_least: str
) -> str:
    """Lock a group chat the caller has role `at_least` (or higher) in; return that role."""
    chat = await lock_chat(conn, chat_id, user_id)
    if chat["type"] != "group":
        raise ChatError(FORBIDDEN, "private chats cannot be administered")
    role = await role_of(conn, chat_id, user_id)  # read now that the lock is held
    if role is None:
        raise no_such_chat()
    if ROLE_RANK[role] < ROLE_RANK[at_least]:
        raise ChatError(FORBIDDEN, f"this needs the {at_least} role or higher")
    return role


# --- replies that fit a frame ----------------------------------------------------------

# Keep replies readable by clients with a 1 MiB frame limit (the websockets default).
FRAME_BUDGET_BYTES = 768 * 1024


def fit_in_frame(items: Iterable[T], budget: int) -> tuple[list[T], int]:
    """Take items in order while their encoded size fits `budget`; return them and the rest.

    Stops at the first item that does not fit, so what is taken has no holes.
    """
    taken = []
    for item in items:
        size = len(encode(item)) + 1
        if size > budget:
            break
        budget -= size
        taken.append(item)
    return taken, budget


# --- chats as the wire shows them ---------------------------------------------------------

_MEMBERS = """
SELECT cm.chat_id, u.id, u.name, cm.role, u.avatar, u.is_bot
FROM chat_members cm JOIN users u ON u.id = cm.user_id
WHERE cm.chat_id = ANY($1::bigint[])
ORDER BY cm.chat_id, cm.join_order
"""


async def fetch_members(
    conn: asyncpg.Connection, chat_ids: list[int]
) -> dict[int, list[ChatMember]]:
    members: dict[int, list[ChatMember]] = {chat_id: [] for chat_id in chat_ids}
    for row in await conn.fetch(_MEMBERS, chat_ids):
        members[row["chat_id"]].append(
            ChatMember(
                user_uuid=str(row["id"]),
                name=row["name"],
                role=row["role"],
                avatar=file_id_text(row["avatar"]),
                is_bot=row["is_bot"],
            )
        )
    return members


async def fetch_chat(conn: asyncpg.Connection, chat_id: int) -> Chat:
    chat = await conn.fetchrow(
        "SELECT id, type, name, created_at, version, pinned_message_id, photo"
        " FROM chats WHERE id = $1",
        chat_id,
    )
    members = await fetch_members(conn, [chat_id])
    return Chat(
        id=chat["id"],
        type=chat["type"],
        name=chat["name"],
        created_at=chat["created_at"],
        members=members[chat_id],
        version=chat["version"],
        pinned_message_id=chat["pinned_message_id"],
        photo=file_id_text(chat["photo"]),
    )


def file_id_text(file_id: uuid.UUID | None) -> str | None:
    return None if file_id is None else str(file_id)


def member_from_row(row: asyncpg.Record) -> Member:
    """A users row (id, name, avatar, is_bot) as the wire shows it."""
    return Member(
        user_uuid=str(row["id"]),
        name=row["name"],
        avatar=file_id_text(row["avatar"]),
        is_bot=row["is_bot"],
    )


def member_ids(chat: Chat) -> list[uuid.UUID]:
    return [uuid.UUID(m.user_uuid) for m in chat.members]


def parse_user_ids(raw: Iterable[str], *, exclude: uuid.UUID | None = None) -> list[uuid.UUID]:
    """UUIDs in order, without duplicates and without `exclude`; `invalid` for a non-UUID."""
    ids: dict[uuid.UUID, None] = {}
    for value in raw:
        user_id = parse_user_id(value, "user_ids")
        if user_id != exclude:
            ids[user_id] = None
    return list(ids)


def parse_user_id(value: str, field: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ChatError(INVALID, f"{field}: {value[:64]!r} is not a UUID") from None
