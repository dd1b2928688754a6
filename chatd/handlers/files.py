"""Files: an upload recorded, who may download it, signed links, and attaching uploads to
messages.

The bytes come and go through chatd/rest_files.py (streamed, never held in memory) and
live in the node's file store (chatd/files.py). Who may read a file:

- its uploader;
- a current member of a chat with a message that carries it (a removed member loses it);
- anyone signed in, for an avatar; a member of the chat, for a group photo.

Everyone else gets not_found, the same answer as for a file that does not exist.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import asyncpg

from chatd import media
from chatd.auth import FILE_LINK_TTL, sign_file_link
from chatd.files import new_file_id
from chatd.handlers.base import Context
from chatd.protocol import (
    INVALID,
    NOT_FOUND,
    QUOTA_EXCEEDED,
    Attachment,
    ChatError,
    FileLink,
    GetFileLink,
    Upload,
)


def no_such_file() -> ChatError:
    return ChatError(NOT_FOUND, "no such file")


def quota_exceeded(quota: int) -> ChatError:
    return ChatError(QUOTA_EXCEEDED, f"your uploads would exceed your quota of {quota} bytes")


# --- upload --------------------------------------------------------------------------------

_USED = "SELECT coalesce(sum(size), 0) FROM files WHERE owner_id = $1"
# Uploads of one user are recorded one at a time, so two cannot both fit the last bytes.
_LOCK_USER = "SELECT 1 FROM users WHERE id = $1 FOR UPDATE"
_INSERT_FILE = """
INSERT INTO files (id, owner_id, sha256, thumb_sha256, name, mime, size, width, height)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
"""


@dataclass(frozen=True, slots=True)
class Received:
    """An upload's body, received whole into a temporary file."""

    path: Path
    sha256: str
    size: int
    name: str


async def quota_left(ctx: Context) -> int:
    """Bytes the caller may still upload."""
    used = await ctx.node.pool.fetchval(_USED, ctx.user_id)
    return max(0, ctx.node.settings.user_quota_bytes - used)


async def record_upload(ctx: Context, received: Received) -> Upload:
    """Store a received body as the caller's upload: what it is, read from its bytes; an
    image's metadata taken out and its thumbnail made."""
    files, pool, quota = ctx.node.files, ctx.node.pool, ctx.node.settings.user_quota_bytes
    found = await asyncio.to_thread(media.inspect, received.path)
    sha256, size = received.sha256, received.size
    if found.stripped:
        sha256, size = await asyncio.to_thread(_hash_file, received.path)
    if size > await quota_left(ctx):
        raise quota_exceeded(quota)
    await files.save(pool, sha256, size, received.path)
    thumb = await files.save_bytes(pool, found.thumbnail) if found.thumbnail else None
    file_id = new_file_id()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(_LOCK_USER, ctx.user_id)
        if await conn.fetchval(_USED, ctx.user_id) + size > quota:
            raise quota_exceeded(quota)  # its blob stays unused: the collector takes it
        await conn.execute(
            _INSERT_FILE,
            file_id,
            ctx.user_id,
            sha256,
            thumb,
            received.name,
            found.mime,
            size,
            found.width,
            found.height,
        )
    return Upload(
        upload_id=str(file_id),
        name=received.name,
        mime=found.mime,
        size=size,
        sha256=sha256,
        width=found.width,
        height=found.height,
    )


def _hash_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def clean_file_name(raw: str | None) -> str:
    """A file name to keep and show: its last path part, no control characters, at most
    255 characters; "file" when nothing is left."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c.isprintable()).strip()
    return name[:255].strip() or "file"


# --- download ------------------------------------------------------------------------------

_FILE_COLUMNS = """
f.id, f.sha256, f.thumb_sha256, f.name, f.mime, f.size, f.width, f.height,
(SELECT size FROM blobs WHERE sha256 = f.thumb_sha256) AS thumb_size
"""

# A file the caller may read ($2), or none: the same answer as for no file at all.
_READABLE = f"""
SELECT {_FILE_COLUMNS}
FROM files f
WHERE f.id = $1 AND (
    f.owner_id = $2
    OR EXISTS (
        SELECT 1 FROM message_files mf
        JOIN messages m ON m.id = mf.message_id
        JOIN chat_members cm ON cm.chat_id = m.chat_id AND cm.user_id = $2
        WHERE mf.file_id = f.id
    )
    OR EXISTS (SELECT 1 FROM users u WHERE u.avatar = f.id)
    OR EXISTS (
        SELECT 1 FROM chats c JOIN chat_members cm ON cm.chat_id = c.id AND cm.user_id = $2
        WHERE c.photo = f.id
    )
)
"""
_BY_ID = f"SELECT {_FILE_COLUMNS} FROM files f WHERE f.id = $1"


@dataclass(frozen=True, slots=True)
class StoredFile:
    id: uuid.UUID
    sha256: str
    size: int
    name: str
    mime: str
    is_image: bool  # decoded by chatd: safe to show inline
    thumb_sha256: str | None
    thumb_size: int | None


def _stored(row: asyncpg.Record) -> StoredFile:
    return StoredFile(
        id=row["id"],
        sha256=row["sha256"],
        size=row["size"],
        name=row["name"],
        mime=row["mime"],
        is_image=row["width"] is not None and row["mime"] in media.SAFE_RASTER.values(),
        thumb_sha256=row["thumb_sha256"],
        thumb_size=row["thumb_size"],
    )


async def readable_file(ctx: Context, file_id: uuid.UUID) -> StoredFile:
    """The file, if the caller may read it; else not_found."""
    row = await ctx.node.pool.fetchrow(_READABLE, file_id, ctx.user_id)
    if row is None:
        raise no_such_file()
    return _stored(row)


async def linked_file(ctx: Context, file_id: uuid.UUID) -> StoredFile:
    """The file a valid signed link names (the link was checked by the caller)."""
    row = await ctx.node.pool.fetchrow(_BY_ID, file_id)
    if row is None:
        raise no_such_file()
    return _stored(row)


async def file_link(ctx: Context, request: GetFileLink) -> FileLink:
    """Signed URLs of a file the caller may read, valid for FILE_LINK_TTL seconds."""
    found = await readable_file(ctx, request.file_id)
    expires = int(time.time()) + FILE_LINK_TTL
    signature = sign_file_link(ctx.node.settings.secret, found.id, expires)
    query = f"?expires={expires}&signature={signature}"
    return FileLink(
        url=f"/files/{found.id}{query}",
        thumbnail_url=f"/files/{found.id}/thumbnail{query}" if found.thumb_sha256 else None,
        expires_at=datetime.fromtimestamp(expires, UTC),
    )


# --- attaching -----------------------------------------------------------------------------

# Claimed: the collector spares a file for a while after this (chatd/files.py).
_CLAIM_OWN = """
UPDATE files SET claimed_at = now()
WHERE id = ANY($1::uuid[]) AND owner_id = $2
RETURNING id, name, mime, size, width, height
"""
_CLAIM = "UPDATE files SET claimed_at = now() WHERE id = ANY($1::uuid[])"


async def claim_uploads(ctx: Context, upload_ids: list[str]) -> tuple[Attachment, ...]:
    """The caller's uploads as a message's attachments, in order; `invalid` for an id that
    is not an upload of theirs (another user's upload looks like no upload at all)."""
    if not upload_ids:
        return ()
    ids: list[uuid.UUID] = []
    for raw in upload_ids:
        try:
            ids.append(uuid.UUID(raw))
        except ValueError:
            raise ChatError(INVALID, f"attachments: {raw[:64]!r} is not an upload_id") from None
    if len(set(ids)) != len(ids):
        raise ChatError(INVALID, "attachments: an upload is given twice")
    rows = {row["id"]: row for row in await ctx.node.pool.fetch(_CLAIM_OWN, ids, ctx.user_id)}
    missing = [file_id for file_id in ids if file_id not in rows]
    if missing:
        raise ChatError(INVALID, f"attachments: {missing[0]} is not an upload of yours")
    return tuple(attachment_from_row(rows[file_id]) for file_id in ids)


def attachment_from_row(row: asyncpg.Record) -> Attachment:
    """A files row (id, name, mime, size, width, height) as the wire shows it."""
    return Attachment(
        id=str(row["id"]),
        name=row["name"],
        mime=row["mime"],
        size=row["size"],
        width=row["width"],
        height=row["height"],
    )


_IMAGE_OF = """
SELECT mime, width FROM files WHERE id = $1 AND owner_id = $2
FOR UPDATE  -- the collector, deleting it meanwhile, waits and then finds it claimed
"""


async def claim_image(
    conn: asyncpg.Connection, user_id: uuid.UUID, raw: str, field: str
) -> uuid.UUID:
    """The caller's uploaded image `raw` as an avatar or group photo, claimed in the
    caller's transaction; `invalid` when it is not an image upload of theirs."""
    try:
        file_id = uuid.UUID(raw)
    except ValueError:
        raise ChatError(INVALID, f"{field}: {raw[:64]!r} is not an upload_id") from None
    row = await conn.fetchrow(_IMAGE_OF, file_id, user_id)
    if row is None:
        raise ChatError(INVALID, f"{field}: {file_id} is not an upload of yours")
    if row["width"] is None or row["mime"] not in media.SAFE_RASTER.values():
        raise ChatError(INVALID, f"{field}: must be a PNG, JPEG, GIF or WebP image")
    await conn.execute(_CLAIM, [file_id])
    return file_id


async def claim_attachments(ctx: Context, attachments: list[Attachment]) -> None:
    """Renew the claim on a message's attachments being copied (a forward)."""
    if attachments:
        await ctx.node.pool.execute(_CLAIM, [uuid.UUID(a.id) for a in attachments])
