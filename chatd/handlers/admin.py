"""Administration: the server role `admin`, its REST API under /admin, reports, the audit log.

Each operation is a plain function of the Node and the acting admin (`actor`; None for the
`chatd admin` command, chatd/cli.py), so the command and the REST API do the same thing.
Every change is written to `audit_log` in the transaction that makes it (an account
deletion and a moderation delete, which run their own, right after it commits). The handlers
check the caller's role in the database on each call (`require_admin`): a demoted or
disabled admin loses the API at once. An admin cannot demote, disable or delete
themselves over REST (so the last admin cannot lock everyone out); the command can.

`report_message` is every user's: a report on a message of a chat they are in.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from chatd import auth
from chatd.handlers import accounts, changes
from chatd.handlers.base import Context, parse_user_id
from chatd.node import Node
from chatd.protocol import (
    EMAIL_TAKEN,
    FORBIDDEN,
    MAX_REPORT_REASON_CHARS,
    MAX_USER_NAME_CHARS,
    NOT_FOUND,
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
    AuditEntry,
    AuditLog,
    ChatError,
    Created,
    DeletedMessage,
    Report,
    ReportedMessage,
    ReportList,
    ReportMessage,
    Stats,
    clean_text,
)
from chatd.revocations import Revocation
from chatd.store import MESSAGE_COLUMNS, message_from_row
from chatd.text import normalize_email

_AUDIT = """
INSERT INTO audit_log (actor_id, action, target, details) VALUES ($1, $2, $3, $4::jsonb)
"""

_IS_ADMIN = """
SELECT true FROM users
WHERE id = $1 AND role = 'admin' AND disabled_at IS NULL AND deleted_at IS NULL
"""

_USER_COLUMNS = "id, name, email, role, created_at, disabled_at, deleted_at"


async def require_admin(ctx: Context) -> uuid.UUID:
    """The caller, when they hold the admin role now; else `forbidden`."""
    if not await ctx.node.pool.fetchval(_IS_ADMIN, ctx.user_id):
        raise ChatError(FORBIDDEN, "this needs the server's admin role")
    return ctx.user_id


def _admin_user(row: Any) -> AdminUser:
    return AdminUser(
        user_uuid=str(row["id"]),
        name=row["name"],
        email=row["email"],
        role=row["role"],
        created_at=row["created_at"],
        disabled=row["disabled_at"] is not None,
        deleted=row["deleted_at"] is not None,
    )


async def _audit(
    conn: Any, actor: uuid.UUID | None, action: str, target: str, **details: Any
) -> None:
    await conn.execute(_AUDIT, actor, action, target, msgspec.json.encode(details).decode())


# --- the operations (the REST API and the `chatd admin` command) ----------------------------


async def create_user(
    node: Node, actor: uuid.UUID | None, name: str, email: str, password: str, role: str
) -> AdminUser:
    name = clean_text(name, "name", min_len=1, max_len=MAX_USER_NAME_CHARS)
    email = accounts.valid_email(email, normalize_email)
    accounts.check_password(password)
    password_hash = await auth.hash_password(password)
    async with node.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "INSERT INTO users (name, email, password_hash, role) VALUES ($1, $2, $3, $4)"
            f" ON CONFLICT (email) DO NOTHING RETURNING {_USER_COLUMNS}",
            name,
            email,
            password_hash,
            role,
        )
        if row is None:
            raise ChatError(EMAIL_TAKEN, "a user with this email exists")
        await _audit(conn, actor, "create_user", str(row["id"]), email=email, role=role)
    return _admin_user(row)


async def find_user(node: Node, email_or_uuid: str) -> uuid.UUID:
    """The account an email or a uuid names (the command takes either); `not_found`."""
    try:
        user_id = await node.pool.fetchval(
            "SELECT id FROM users WHERE id = $1 AND deleted_at IS NULL", uuid.UUID(email_or_uuid)
        )
    except ValueError:
        email = accounts.valid_email(email_or_uuid, accounts.email_key)
        user_id = await node.pool.fetchval(
            "SELECT id FROM users WHERE email = $1 AND deleted_at IS NULL", email
        )
    if user_id is None:
        raise ChatError(NOT_FOUND, "no such user")
    return user_id


async def update_user(
    node: Node,
    actor: uuid.UUID | None,
    user_id: uuid.UUID,
    *,
    role: str | None = None,
    disabled: bool | None = None,
    password: str | None = None,
) -> AdminUser:
    """Change an account's role, disabled state or password; each change is audited. A
    disable or a new password revokes every session of the account."""
    if password is not None:
        accounts.check_password(password)
        password_hash = await auth.hash_password(password)
    revoke = False
    async with node.pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {_USER_COLUMNS} FROM users WHERE id = $1 AND deleted_at IS NULL FOR UPDATE",
            user_id,
        )
        if row is None:
            raise ChatError(NOT_FOUND, "no such user")
        target = str(user_id)
        if role is not None and role != row["role"]:
            await conn.execute("UPDATE users SET role = $2 WHERE id = $1", user_id, role)
            await _audit(conn, actor, "promote" if role == "admin" else "demote", target)
        if disabled is not None and disabled != (row["disabled_at"] is not None):
            await conn.execute(
                "UPDATE users SET disabled_at = CASE WHEN $2 THEN now() END WHERE id = $1",
                user_id,
                disabled,
            )
            await _audit(conn, actor, "disable" if disabled else "enable", target)
            revoke = disabled
        if password is not None:
            await conn.execute(
                "UPDATE users SET password_hash = $2 WHERE id = $1", user_id, password_hash
            )
            await _audit(conn, actor, "set_password", target)
            revoke = True
        if revoke:
            await conn.execute(
                "UPDATE sessions SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
                user_id,
            )
        row = await conn.fetchrow(f"SELECT {_USER_COLUMNS} FROM users WHERE id = $1", user_id)
    if revoke:
        await node.revoke(Revocation(user_id))
    return _admin_user(row)


async def delete_user(node: Node, actor: uuid.UUID | None, user_id: uuid.UUID) -> None:
    async with node.pool.acquire() as conn:
        if not await conn.fetchval(
            "SELECT true FROM users WHERE id = $1 AND deleted_at IS NULL", user_id
        ):
            raise ChatError(NOT_FOUND, "no such user")
    await accounts.delete_account(node, user_id)
    await _audit(node.pool, actor, "delete_user", str(user_id))


_USERS_PAGE = f"""
SELECT {_USER_COLUMNS} FROM users
WHERE ($1::text IS NULL OR lower(name) LIKE $1 || '%' OR email LIKE $1 || '%')
  AND ($2::uuid IS NULL OR (created_at, id) > (SELECT created_at, id FROM users WHERE id = $2))
ORDER BY created_at, id
LIMIT $3
"""


async def list_users(
    node: Node, q: str | None, after: uuid.UUID | None, limit: int
) -> AdminUserList:
    if q:
        q = q.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    rows = await node.pool.fetch(_USERS_PAGE, q or None, after, limit)
    return AdminUserList([_admin_user(r) for r in rows])


_STATS = """
SELECT (SELECT count(*) FROM users WHERE deleted_at IS NULL) AS users,
       (SELECT count(*) FROM users WHERE role = 'admin' AND deleted_at IS NULL) AS admins,
       (SELECT count(*) FROM users WHERE disabled_at IS NOT NULL) AS disabled,
       (SELECT count(*) FROM users WHERE deleted_at IS NOT NULL) AS deleted,
       (SELECT count(*) FROM chats) AS chats,
       (SELECT count(*) FROM chats WHERE type = 'group') AS groups,
       (SELECT count(*) FROM messages) AS messages,
       (SELECT count(*) FROM sessions WHERE revoked_at IS NULL) AS live_sessions,
       (SELECT count(*) FROM reports) AS reports
"""


async def stats(node: Node) -> Stats:
    return Stats(**dict(await node.pool.fetchrow(_STATS)))


async def delete_message(node: Node, actor: uuid.UUID | None, message_id: int) -> DeletedMessage:
    answer = await changes.moderate_delete(node, message_id)
    await _audit(node.pool, actor, "delete_message", str(message_id), chat_id=answer.chat_id)
    return answer


_REPORTS_PAGE = f"""
SELECT r.id AS report_id, r.message_id AS report_message_id, r.reporter_id, r.reason,
       r.created_at AS reported_at, {MESSAGE_COLUMNS}
FROM reports r JOIN messages m ON m.id = r.message_id JOIN chats c ON c.id = m.chat_id
WHERE ($1::bigint IS NULL OR r.id < $1)
ORDER BY r.id DESC
LIMIT $2
"""


async def list_reports(node: Node, before: int | None, limit: int) -> ReportList:
    rows = await node.pool.fetch(_REPORTS_PAGE, before, limit + 1)
    reports = [
        ReportedMessage(report=_report(r), message=message_from_row(r)) for r in rows[:limit]
    ]
    return ReportList(reports, has_more=len(rows) > limit)


_AUDIT_PAGE = """
SELECT id, at, actor_id, action, target, details FROM audit_log
WHERE ($1::bigint IS NULL OR id < $1)
ORDER BY id DESC
LIMIT $2
"""


async def list_audit(node: Node, before: int | None, limit: int) -> AuditLog:
    rows = await node.pool.fetch(_AUDIT_PAGE, before, limit + 1)
    entries = [
        AuditEntry(
            id=r["id"],
            at=r["at"],
            actor_uuid=str(r["actor_id"]) if r["actor_id"] else None,
            action=r["action"],
            target=r["target"],
            details=msgspec.json.decode(r["details"]),
        )
        for r in rows[:limit]
    ]
    return AuditLog(entries, has_more=len(rows) > limit)


# --- the handlers ------------------------------------------------------------------------


def _not_yourself(ctx: Context, user_id: uuid.UUID) -> None:
    if user_id == ctx.user_id:
        raise ChatError(FORBIDDEN, "not on your own account: ask another admin")


async def admin_list_users(ctx: Context, request: AdminListUsers) -> AdminUserList:
    await require_admin(ctx)
    return await list_users(ctx.node, request.q, request.after, request.limit)


async def admin_create_user(ctx: Context, request: AdminCreateUser) -> Created[AdminUser]:
    actor = await require_admin(ctx)
    user = await create_user(
        ctx.node, actor, request.name, request.email, request.password, request.role
    )
    return Created(user)


async def admin_update_user(ctx: Context, request: AdminUpdateUser) -> AdminUser:
    actor = await require_admin(ctx)
    user_id = parse_user_id(request.user_uuid, "user_uuid")
    if request.role == "user" or request.disabled or request.password is not None:
        _not_yourself(ctx, user_id)
    return await update_user(
        ctx.node,
        actor,
        user_id,
        role=request.role,
        disabled=request.disabled,
        password=request.password,
    )


async def admin_delete_user(ctx: Context, request: AdminDeleteUser) -> None:
    actor = await require_admin(ctx)
    user_id = parse_user_id(request.user_uuid, "user_uuid")
    _not_yourself(ctx, user_id)
    await delete_user(ctx.node, actor, user_id)


async def admin_stats(ctx: Context, request: AdminStats) -> Stats:
    await require_admin(ctx)
    return await stats(ctx.node)


async def admin_delete_message(ctx: Context, request: AdminDeleteMessage) -> DeletedMessage:
    actor = await require_admin(ctx)
    return await delete_message(ctx.node, actor, request.message_id)


async def admin_list_reports(ctx: Context, request: AdminListReports) -> ReportList:
    await require_admin(ctx)
    return await list_reports(ctx.node, request.before, request.limit)


async def admin_list_audit(ctx: Context, request: AdminListAudit) -> AuditLog:
    await require_admin(ctx)
    return await list_audit(ctx.node, request.before, request.limit)


# A message of a chat the caller is in.
_VISIBLE = """
SELECT true FROM messages m
JOIN chat_members cm ON cm.chat_id = m.chat_id AND cm.user_id = $2
WHERE m.id = $1
"""

_REPORT = """
WITH made AS (
    INSERT INTO reports (message_id, reporter_id, reason) VALUES ($1, $2, $3)
    ON CONFLICT (message_id, reporter_id) DO NOTHING
    RETURNING id AS report_id, message_id AS report_message_id, reporter_id, reason,
              created_at AS reported_at, true AS created
)
SELECT * FROM made
UNION ALL
SELECT id, message_id, reporter_id, reason, created_at, false FROM reports
WHERE message_id = $1 AND reporter_id = $2 AND NOT EXISTS (SELECT 1 FROM made)
"""


def _report(row: Any) -> Report:
    """A report from a row of _REPORT or _REPORTS_PAGE."""
    return Report(
        id=row["report_id"],
        message_id=row["report_message_id"],
        reporter_uuid=str(row["reporter_id"]),
        reason=row["reason"],
        created_at=row["reported_at"],
    )


async def report_message(ctx: Context, action: ReportMessage) -> Created[Report]:
    """Report a message of a chat you are in (201); again: the first report (200)."""
    reason = clean_text(action.reason, "reason", min_len=1, max_len=MAX_REPORT_REASON_CHARS)
    async with changes.counted_change(ctx), ctx.node.pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval(_VISIBLE, action.message_id, ctx.user_id):
            raise ChatError(NOT_FOUND, "no such message")
        row = await conn.fetchrow(_REPORT, action.message_id, ctx.user_id, reason)
    return Created(_report(row), row["created"])
