"""The routes that carry bytes: POST /uploads, GET /files/{id} and its thumbnail.

They are rows of the same route table (chatd/rest.py adds them), but their endpoints are
written by hand: a body that is a file, not JSON, is streamed to disk in chunks and
refused (413) the moment it crosses a limit; a download streams from the file store,
with Range, ETag and the headers that keep user content from running in chatd's origin.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from chatd.auth import bearer_token, check_file_link
from chatd.files import TempFile
from chatd.handlers import require_write
from chatd.handlers.base import Context, authenticate
from chatd.handlers.files import (
    Received,
    StoredFile,
    clean_file_name,
    linked_file,
    no_such_file,
    quota_exceeded,
    quota_left,
    readable_file,
    record_upload,
)
from chatd.node import Node
from chatd.openapi import Operation, Param
from chatd.protocol import (
    BAD_REQUEST,
    FORBIDDEN,
    INVALID,
    TOO_LARGE,
    ChatError,
    Upload,
    encode,
)

# Room for a multipart body's boundaries and part headers around the file itself.
MULTIPART_ENVELOPE_BYTES = 64 * 1024
RECEIVE_BUFFER_BYTES = 1024 * 1024  # written to disk in pieces of up to this


def _node(http: Request) -> Node:
    return http.app.state.node


def _client(http: Request) -> str:
    return http.client.host if http.client else "unknown"


def too_large(limit: int) -> ChatError:
    return ChatError(TOO_LARGE, f"the file exceeds the upload limit of {limit} bytes")


# --- upload --------------------------------------------------------------------------------


async def upload_file(http: Request) -> Response:
    """POST /uploads: the body is the file (`?name=` names it), or a multipart/form-data
    body with a `file` part. 201 with the Upload."""
    node = _node(http)
    ctx = await authenticate(node, bearer_token(http.headers.get("authorization")), _client(http))
    require_write(ctx)
    limit, left = node.settings.max_upload_bytes, await quota_left(ctx)
    multipart = http.headers.get("content-type", "").lower().startswith("multipart/form-data")
    length = http.headers.get("content-length", "")
    if length.isascii() and length.isdigit():  # refused before a byte is read
        envelope = MULTIPART_ENVELOPE_BYTES if multipart else 0
        if int(length) > limit + envelope:
            raise too_large(limit)
        if int(length) > left + envelope:
            raise quota_exceeded(node.settings.user_quota_bytes)
    temp = node.files.temp_file()
    try:
        if multipart:
            name = await _receive_multipart(http, temp, ctx, limit, left)
        else:
            name = http.query_params.get("name")
            await _receive(http.stream(), temp, ctx, limit, left)
        sha256 = await temp.finish()
        received = Received(temp.path, sha256, temp.size, clean_file_name(name))
        upload = await record_upload(ctx, received)
    finally:
        temp.discard()
    return Response(encode(upload) + b"\n", 201, media_type="application/json")


async def _receive(
    chunks: AsyncIterator[bytes], temp: TempFile, ctx: Context, limit: int, left: int
) -> None:
    """Write the chunks to `temp`; refuse as soon as they cross the limit or the quota."""
    pending: list[bytes] = []
    buffered = 0
    async for chunk in chunks:
        if temp.size + buffered + len(chunk) > limit:
            raise too_large(limit)
        if temp.size + buffered + len(chunk) > left:
            raise quota_exceeded(ctx.node.settings.user_quota_bytes)
        pending.append(chunk)
        buffered += len(chunk)
        if buffered >= RECEIVE_BUFFER_BYTES:
            await temp.write(b"".join(pending))
            pending, buffered = [], 0
    if pending:
        await temp.write(b"".join(pending))


async def _receive_multipart(
    http: Request, temp: TempFile, ctx: Context, limit: int, left: int
) -> str | None:
    async def bounded() -> AsyncIterator[bytes]:
        total = 0
        async for chunk in http.stream():
            total += len(chunk)
            if total > limit + MULTIPART_ENVELOPE_BYTES:
                raise too_large(limit)
            if total > left + MULTIPART_ENVELOPE_BYTES:
                raise quota_exceeded(ctx.node.settings.user_quota_bytes)
            yield chunk

    # Parts over 1 MiB are spooled to disk by Starlette, never held in memory.
    parser = MultiPartParser(http.headers, bounded(), max_files=1, max_fields=10)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ChatError(BAD_REQUEST, f"multipart body: {exc.message}") from None
    part = form.get("file")
    try:
        if not isinstance(part, UploadFile):
            raise ChatError(INVALID, "a multipart upload needs a file part named 'file'")

        async def chunks() -> AsyncIterator[bytes]:
            while chunk := await part.read(RECEIVE_BUFFER_BYTES):
                yield chunk

        await _receive(chunks(), temp, ctx, limit, left)
        return part.filename
    finally:
        await form.close()


# --- download ------------------------------------------------------------------------------

# Served as themselves and inline: raster images chatd decoded. Anything else is
# application/octet-stream and an attachment, so no browser renders HTML or SVG from here.
SAFE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "sandbox",
    "Cross-Origin-Resource-Policy": "same-origin",
}
THUMBNAIL_TYPE = "image/webp"  # chatd makes every thumbnail so (chatd/media.py)
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


async def download_file(http: Request) -> Response:
    """GET /files/{file_id}: the file's bytes (Range, ETag)."""
    found = await _file_for(http)
    content_type = found.mime if found.is_image else "application/octet-stream"
    disposition = "inline" if found.is_image else "attachment"
    return _bytes_response(http, found, found.sha256, found.size, content_type, disposition)


async def download_thumbnail(http: Request) -> Response:
    """GET /files/{file_id}/thumbnail: an image's thumbnail (at most 320 px; JPEG or PNG)."""
    found = await _file_for(http)
    if found.thumb_sha256 is None or found.thumb_size is None:
        raise no_such_file()
    return _bytes_response(
        http, found, found.thumb_sha256, found.thumb_size, THUMBNAIL_TYPE, "inline"
    )


async def _file_for(http: Request) -> StoredFile:
    """The file the URL names, if the caller may read it: by a signed link, or a token."""
    node = _node(http)
    file_id: uuid.UUID = http.path_params["file_id"]
    signature = http.query_params.get("signature")
    if signature is not None:
        ctx = Context(node, uuid.UUID(int=0), _client(http))
        if not check_file_link(
            node.settings.secret, file_id, http.query_params.get("expires", ""), signature
        ):
            raise ChatError(FORBIDDEN, "the link is invalid or has expired")
        return await linked_file(ctx, file_id)
    ctx = await authenticate(node, bearer_token(http.headers.get("authorization")), _client(http))
    return await readable_file(ctx, file_id)


def _bytes_response(
    http: Request, found: StoredFile, sha256: str, size: int, content_type: str, disposition: str
) -> Response:
    etag = f'"{sha256}"'
    headers = {
        **SAFE_HEADERS,
        "ETag": etag,
        "Cache-Control": "private, max-age=86400",
        "Accept-Ranges": "bytes",
        "Content-Disposition": _disposition(disposition, found.name),
    }
    if_none_match = http.headers.get("if-none-match")
    if if_none_match is not None and _matches(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    start, end, status = 0, size - 1, 200
    wanted = http.headers.get("range")
    if_range = http.headers.get("if-range")
    if wanted is not None and (if_range is None or if_range.strip() == etag):
        match = _RANGE.fullmatch(wanted.strip())
        if match and (match[1] or match[2]):
            if match[1]:
                start = int(match[1])
                end = min(int(match[2]), size - 1) if match[2] else size - 1
            else:  # the last N bytes
                start = max(0, size - int(match[2]))
            if start >= size or start > end:
                headers["Content-Range"] = f"bytes */{size}"
                return Response(status_code=416, headers=headers)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        # Several ranges, or a unit other than bytes: the whole file (RFC 9110 allows it).
    length = end - start + 1 if size else 0
    headers["Content-Length"] = str(length)
    store = _node(http).files.store
    body = store.read(sha256, start, length) if length else _nothing()
    return StreamingResponse(body, status, headers, media_type=content_type)


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""


def _matches(if_none_match: str, etag: str) -> bool:
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def _disposition(kind: str, name: str) -> str:
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name
    )
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


# --- the route rows ------------------------------------------------------------------------

BINARY = {"type": "string", "format": "binary"}
_LINK_PARAMS = (
    Param("expires", str, "a signed link's expiry (POST /files/{file_id}/link)"),
    Param("signature", str, "a signed link's signature"),
)

OPERATIONS = [
    Operation(
        "POST",
        "/uploads",
        upload_file,
        "Upload a file (the raw body, or multipart/form-data with a `file` part); attach it"
        " to a message by its upload_id",
        Upload,
        201,
        query=(Param("name", str, "the file's name (a multipart part's filename wins)"),),
        raw_body={
            "application/octet-stream": BINARY,
            "multipart/form-data": {
                "type": "object",
                "properties": {"file": BINARY},
                "required": ["file"],
            },
        },
        errors=(400, 413, 422, 503),
        tag="files",
    ),
    Operation(
        "GET",
        "/files/{file_id:uuid}",
        download_file,
        "A file's bytes (yours, or carried by a message of a chat you are in); Range and"
        " If-None-Match work. Authorization header, or a signed link's expires and signature",
        None,
        also_ok=(206, 304),
        query=_LINK_PARAMS,
        raw_response="*/*",
        errors=(403, 404, 416, 503),
        tag="files",
    ),
    Operation(
        "GET",
        "/files/{file_id:uuid}/thumbnail",
        download_thumbnail,
        "An image's thumbnail, at most 320 px (404 for a file that has none)",
        None,
        also_ok=(206, 304),
        query=_LINK_PARAMS,
        raw_response="*/*",
        errors=(403, 404, 416, 503),
        tag="files",
    ),
]
