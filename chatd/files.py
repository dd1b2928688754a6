"""Where the bytes of files live, and the collector that deletes what nothing refers to.

Bytes are blobs, named by their sha256: the same bytes are stored once, whoever uploads
them and however often. A `BlobStore` holds them; `LocalBlobStore` keeps them under
`$CHATD_DATA_DIR/files/ab/cd/<sha256>`, `S3BlobStore` as objects `<prefix>/ab/cd/<sha256>`
in an S3-compatible bucket (the same layout: either copies into the other). The database
says which blobs exist (`blobs`), which uploads use them (`files`), and what refers to an
upload: a message's attachments (`message_files`), an avatar (`users.avatar`), a group
photo (`chats.photo`).

Nothing is counted by hand. The collector (`FileCollector`) asks the database, each
round, which uploads nothing refers to, and then which blobs no upload uses; so a delete
for everyone, a replaced avatar, a deleted chat or account releases its files without
the handler that did it knowing about files. Its state is the database, so it resumes
after a restart; several processes may run it at once (rows are taken with SKIP LOCKED).

Races, and why none loses bytes:

- An upload first renews its blob's row (`touched_at`), then writes the bytes, then adds
  its `files` row. The collector only takes blobs untouched for `CHATD_FILE_GRACE`
  seconds, holds the row's lock while it deletes the bytes and the row, and an upload's
  renewal waits for that lock (then writes the bytes again).
- A send claims its attachments (`files.claimed_at`) before the message is stored; the
  collector spares a file for the grace period after its last claim, and the foreign key
  of `message_files` refuses the delete of a file a message refers to.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import asyncpg
import obstore
from obstore.store import S3Store

log = logging.getLogger("chatd.files")

CHUNK_BYTES = 256 * 1024


class BlobStore(Protocol):
    """Bytes by sha256. Every method is idempotent."""

    async def put(self, sha256: str, source: Path) -> None:
        """Store the file at `source` (whose content hashes to `sha256`); it is consumed."""

    def read(self, sha256: str, start: int, length: int) -> AsyncIterator[bytes]:
        """`length` bytes from offset `start`, in chunks."""

    async def delete(self, sha256: str) -> None:
        """Forget the bytes (nothing happens when they are not there)."""

    async def check(self) -> None:
        """Raise unless the store can be reached (called once at start)."""

    async def close(self) -> None: ...


def blob_key(sha256: str) -> str:
    """Where a blob lives inside a store: `ab/cd/abcd…`."""
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}"


class LocalBlobStore:
    """Blobs as files under `root`: `root/ab/cd/abcd…`; an upload's temporary files in
    `root/tmp` (the same filesystem, so storing one is a rename)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.root / blob_key(sha256)

    async def put(self, sha256: str, source: Path) -> None:
        def move() -> None:
            target = self.path(sha256)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)  # atomic: a reader sees the old bytes or the new

        await asyncio.to_thread(move)

    async def read(self, sha256: str, start: int, length: int) -> AsyncIterator[bytes]:
        file = await asyncio.to_thread(self.path(sha256).open, "rb")
        try:
            await asyncio.to_thread(file.seek, start)
            while length > 0:
                chunk = await asyncio.to_thread(file.read, min(length, CHUNK_BYTES))
                if not chunk:
                    raise OSError(f"blob {sha256} is shorter than expected")
                length -= len(chunk)
                yield chunk
        finally:
            await asyncio.to_thread(file.close)

    async def delete(self, sha256: str) -> None:
        await asyncio.to_thread(self.path(sha256).unlink, missing_ok=True)

    async def check(self) -> None:
        pass

    async def close(self) -> None:
        pass


# An upload is sent in parts of this size (S3's smallest), at most this many at once: the
# bytes held for one upload stay bounded whatever the file's size.
S3_PART_BYTES = 5 * 1024 * 1024
S3_PARTS_IN_FLIGHT = 2
# A download is read from the bucket this many bytes at a time.
S3_READ_WINDOW = 1024 * 1024


class S3BlobStore:
    """Blobs as objects `<prefix>/ab/cd/abcd…` in an S3-compatible bucket, through obstore
    (an async client over Rust's object_store). Credentials, region and the rest come from
    the standard AWS_* environment variables (or the instance's role); `endpoint_url`
    names a service other than AWS (plain http is then allowed)."""

    def __init__(self, url: str, endpoint_url: str | None = None) -> None:
        options = {"allow_http": True} if (endpoint_url or "").startswith("http://") else None
        config = {"endpoint": endpoint_url} if endpoint_url else {}
        self.url = url
        self.s3 = S3Store.from_url(url, config=config, client_options=options)

    async def put(self, sha256: str, source: Path) -> None:
        key = blob_key(sha256)
        try:
            # The same bytes are there already (content-addressed, and S3 writes are
            # whole or nothing): nothing to send. The caller has just renewed the blob's
            # row, so the collector leaves them for the grace period.
            await obstore.head_async(self.s3, key)
        except FileNotFoundError:
            await obstore.put_async(
                self.s3,
                key,
                source,
                chunk_size=S3_PART_BYTES,
                max_concurrency=S3_PARTS_IN_FLIGHT,
            )
        await asyncio.to_thread(source.unlink, missing_ok=True)

    async def read(self, sha256: str, start: int, length: int) -> AsyncIterator[bytes]:
        # Ranged GETs of one window each, read whole before the window is passed on: only
        # the bytes asked for cross the network, a download holds one window at most, and
        # a client slower than S3's request timeout does not cut its own download short.
        key = blob_key(sha256)
        while length > 0:
            size = min(length, S3_READ_WINDOW)
            window = await obstore.get_range_async(self.s3, key, start=start, length=size)
            if len(window) < size:
                raise OSError(f"blob {sha256} is shorter than expected")
            for offset in range(0, size, CHUNK_BYTES):
                yield bytes(window[offset : offset + CHUNK_BYTES])
            start += size
            length -= size

    async def delete(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await obstore.delete_async(self.s3, blob_key(sha256))

    async def check(self) -> None:
        try:
            await obstore.list_with_delimiter_async(self.s3)
        except Exception as exc:
            reason = str(exc).partition("\n\nDebug source")[0]  # not obstore's dump
            raise RuntimeError(f"cannot list {self.url}: {reason}") from None

    async def close(self) -> None:
        pass


def open_blob_store(data_dir: Path, files_url: str | None, endpoint_url: str | None) -> BlobStore:
    """The node's store: the bucket of `files_url` (s3://bucket/prefix) when set, else
    local files under `data_dir/files`."""
    if files_url:
        return S3BlobStore(files_url, endpoint_url)
    return LocalBlobStore(data_dir / "files")


# --- blobs: renewed before they are written --------------------------------------------------

_TOUCH_BLOB = """
INSERT INTO blobs (sha256, size) VALUES ($1, $2)
ON CONFLICT (sha256) DO UPDATE SET touched_at = now()
"""


class TempFile:
    """A file being received, hashed as it is written, in a folder of the store's disk."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=folder, prefix="upload-")
        self.path = Path(name)
        self._file = os.fdopen(handle, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    async def write(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)
        await asyncio.to_thread(self._file.write, data)

    async def finish(self) -> str:
        """Close it; its sha256."""
        await asyncio.to_thread(self._file.close)
        return self._hash.hexdigest()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self.path.unlink(missing_ok=True)


class Files:
    """The node's file store: blobs in a BlobStore, their rows in the database."""

    def __init__(self, store: BlobStore, scratch: Path) -> None:
        self.store = store
        self.scratch = scratch  # where uploads are received before they are stored

    def temp_file(self) -> TempFile:
        return TempFile(self.scratch)

    async def save(self, pool: asyncpg.Pool, sha256: str, size: int, source: Path) -> None:
        """Make the blob `sha256` exist with the bytes of `source` (consumed)."""
        await pool.execute(_TOUCH_BLOB, sha256, size)
        await self.store.put(sha256, source)

    async def save_bytes(self, pool: asyncpg.Pool, data: bytes) -> str:
        """Store small bytes (a thumbnail) as a blob; its sha256."""
        temp = self.temp_file()
        try:
            await temp.write(data)
            sha256 = await temp.finish()
            await self.save(pool, sha256, len(data), temp.path)
        finally:
            temp.discard()
        return sha256


# --- the collector ---------------------------------------------------------------------------

# Uploads nothing refers to: never attached and older than the upload TTL ($1 seconds), or
# released longer than the grace period ($2) ago.
_UNREFERENCED = """
    coalesce(f.claimed_at, f.created_at)
        < now() - CASE WHEN f.claimed_at IS NULL THEN $1::int ELSE $2::int END * interval '1 s'
    AND NOT EXISTS (SELECT 1 FROM message_files mf WHERE mf.file_id = f.id)
    AND NOT EXISTS (SELECT 1 FROM users u WHERE u.avatar = f.id)
    AND NOT EXISTS (SELECT 1 FROM chats c WHERE c.photo = f.id)
"""
_DOOMED_FILES = f"SELECT f.id FROM files f WHERE {_UNREFERENCED} ORDER BY f.created_at LIMIT $3"
# The DELETE takes the row's lock and checks again (a claim may have come meanwhile); the
# foreign keys refuse it when a reference was committed since.
_DELETE_FILE = f"DELETE FROM files f WHERE f.id = $3 AND {_UNREFERENCED}"

_UNUSED_BLOB = """
    b.touched_at < now() - $1::int * interval '1 s'
    AND NOT EXISTS (SELECT 1 FROM files f WHERE f.sha256 = b.sha256)
    AND NOT EXISTS (SELECT 1 FROM files f WHERE f.thumb_sha256 = b.sha256)
"""
_DOOMED_BLOBS = f"SELECT b.sha256 FROM blobs b WHERE {_UNUSED_BLOB} LIMIT $2"
_LOCK_BLOB = f"SELECT 1 FROM blobs b WHERE b.sha256 = $2 AND {_UNUSED_BLOB} FOR UPDATE SKIP LOCKED"

GC_BATCH = 500


class FileCollector:
    """Deletes uploads nothing refers to, then the bytes no upload uses; every
    `interval` seconds in the background, until stopped."""

    def __init__(
        self, pool: asyncpg.Pool, store: BlobStore, *, upload_ttl: int, grace: int, interval: int
    ) -> None:
        self.pool = pool
        self.store = store
        self.upload_ttl = upload_ttl
        self.grace = grace
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                files, blobs = await self.collect()
                if files or blobs:
                    log.info("file collector: %d files, %d blobs deleted", files, blobs)
            except asyncio.CancelledError:
                raise
            except Exception:  # the database is down, say: try again next round
                log.warning("file collector round failed", exc_info=True)
            await asyncio.sleep(self.interval)

    async def collect(self) -> tuple[int, int]:
        """One round: how many uploads and blobs it deleted."""
        files = 0
        for row in await self.pool.fetch(_DOOMED_FILES, self.upload_ttl, self.grace, GC_BATCH):
            try:
                status = await self.pool.execute(
                    _DELETE_FILE, self.upload_ttl, self.grace, row["id"]
                )
            except asyncpg.ForeignKeyViolationError:
                continue  # attached meanwhile
            files += status == "DELETE 1"
        blobs = 0
        for row in await self.pool.fetch(_DOOMED_BLOBS, self.grace, GC_BATCH):
            async with self.pool.acquire() as conn, conn.transaction():
                if await conn.fetchval(_LOCK_BLOB, self.grace, row["sha256"]) is None:
                    continue  # renewed, used or being collected elsewhere
                # The bytes first: were the process to die here, the row stays, and the
                # next round deletes (no) bytes and the row. Never a row without bytes.
                await self.store.delete(row["sha256"])
                await conn.execute("DELETE FROM blobs WHERE sha256 = $1", row["sha256"])
            blobs += 1
        return files, blobs


def new_file_id() -> uuid.UUID:
    return uuid.uuid4()
