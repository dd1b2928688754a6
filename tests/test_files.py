"""Files from outside the process: uploads (sniffed, bounded, stored once), attachments,
downloads (who may, Range, ETag, the headers that keep content inert), thumbnails, EXIF,
the decompression-bomb guard, signed links, quotas, and the collector.

Every test runs twice: against a chatd keeping its files on its disk, and against one
keeping them in a real S3-API server (moto's, started by tests/conftest.py)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from PIL import Image

from chatd.client import Api, ChatdError
from tests.conftest import (
    S3Service,
    Server,
    UserFactory,
    assert_no_tracebacks,
    new_user,
    start_server,
    stop_server,
)
from tests.memory import RssSampler

MiB = 1024 * 1024


@dataclass
class Backend:
    """Where the chatd under test keeps its files: its disk, or a bucket (`s3`)."""

    s3: S3Service | None

    def env(self) -> dict[str, str]:
        """The settings that put a new chatd on this backend (a fresh bucket prefix)."""
        return self.s3.server_env() if self.s3 else {}

    def stored(self, server: Server, sha256: str) -> list[bytes]:
        """Every copy of the blob `sha256` that `server` has stored, read from the backend
        itself (not through chatd)."""
        if self.s3 is None or server.files_url is None:
            return [path.read_bytes() for path in (data_dir(server) / "files").rglob(sha256)]
        bucket, _, prefix = server.files_url.removeprefix("s3://").partition("/")
        client = self.s3.client()
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
        copies = []
        for key in keys:
            if not key.endswith("/" + sha256):
                continue
            try:
                copies.append(client.get_object(Bucket=bucket, Key=key)["Body"].read())
            except client.exceptions.NoSuchKey:
                pass  # deleted (by the collector) between the listing and the read
        return copies


@pytest.fixture(scope="module", params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return Backend(request.getfixturevalue("s3") if request.param == "s3" else None)


@pytest.fixture(scope="module")
def server(
    backend: Backend, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """This module's chatd, on the backend of the round (it replaces conftest's)."""
    server = start_server(database_url, tmp_path_factory.mktemp("files"), **backend.env())
    yield server
    stop_server(server)
    assert_no_tracebacks(server)


def png(width: int = 64, height: int = 48, color: tuple[int, int, int] = (10, 120, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, "PNG")
    return out.getvalue()


def auth(api: Api) -> dict[str, str]:
    return {"Authorization": f"Bearer {api.access_token}"}


async def upload(
    http: httpx.AsyncClient, api: Api, data: bytes, name: str = "f", ctype: str = "text/plain"
) -> httpx.Response:
    headers = {**auth(api), "Content-Type": ctype}
    return await http.post("/uploads", params={"name": name}, content=data, headers=headers)


async def group(owner: Api, *members: Api) -> int:
    body = {"type": "group", "name": "Files", "user_ids": [m.user_uuid for m in members]}
    return (await owner.call("POST", "/chats", json=body))["id"]


async def send(api: Api, chat_id: int, upload_ids: list[str], text: str = "") -> dict:
    body = {"text": text, "attachments": upload_ids}
    return await api.call("POST", f"/chats/{chat_id}/messages", json=body)


# --- upload ----------------------------------------------------------------------------------


async def test_an_upload_is_what_its_bytes_say(http: httpx.AsyncClient, alice: Api) -> None:
    data = png(64, 48)
    response = await upload(http, alice, data, name="../../etc/holiday.txt", ctype="text/plain")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["mime"] == "image/png"  # not the declared text/plain
    assert (body["width"], body["height"], body["size"]) == (64, 48, len(data))
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["name"] == "holiday.txt"  # no path
    uuid.UUID(body["upload_id"])


async def test_multipart_upload(http: httpx.AsyncClient, alice: Api) -> None:
    files = {"file": ("notes.txt", b"hello, files\n", "application/x-anything")}
    response = await http.post("/uploads", files=files, headers=auth(alice))
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["mime"], body["size"]) == ("notes.txt", "text/plain", 13)
    assert body["width"] is None
    empty = await http.post("/uploads", files={"other": ("x", b"x")}, headers=auth(alice))
    assert empty.status_code == 422, empty.text


@pytest.mark.parametrize(
    ("content", "sniffed"),
    [
        (b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>", "text/html"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', None),
        (b"GIF89a<html><script>alert(document.domain)</script></html>", "image/gif"),  # polyglot
    ],
)
async def test_active_content_is_never_served_as_itself(
    http: httpx.AsyncClient, alice: Api, content: bytes, sniffed: str | None
) -> None:
    response = await upload(http, alice, content, name="cat.png", ctype="image/png")
    body = response.json()
    if sniffed:
        assert body["mime"] == sniffed
    assert body["width"] is None  # not an image chatd decoded
    got = await http.get(f"/files/{body['upload_id']}", headers=auth(alice))
    assert got.status_code == 200
    assert got.content == content
    assert got.headers["content-type"] == "application/octet-stream"
    assert got.headers["content-disposition"].startswith("attachment;")
    assert got.headers["x-content-type-options"] == "nosniff"
    assert got.headers["content-security-policy"] == "sandbox"


async def test_an_image_is_inline_and_safe(http: httpx.AsyncClient, alice: Api) -> None:
    body = (await upload(http, alice, png(), name='é "x".png')).json()
    got = await http.get(f"/files/{body['upload_id']}", headers=auth(alice))
    assert got.headers["content-type"] == "image/png"
    assert got.headers["content-disposition"] == (
        "inline; filename=\"_ _x_.png\"; filename*=UTF-8''%C3%A9%20%22x%22.png"
    )
    assert got.headers["x-content-type-options"] == "nosniff"
    assert got.headers["content-security-policy"] == "sandbox"


async def test_concurrent_uploads_of_the_same_bytes_are_stored_once(
    http: httpx.AsyncClient,
    alice: Api,
    bob: Api,
    server: Server,
    database_url: str,
    backend: Backend,
) -> None:
    data = os.urandom(300_000)
    responses = await asyncio.gather(
        *(upload(http, who, data) for who in (alice, bob, alice, bob, alice, bob))
    )
    bodies = [r.json() for r in responses]
    assert len({b["upload_id"] for b in bodies}) == 6
    sha256 = hashlib.sha256(data).hexdigest()
    assert {b["sha256"] for b in bodies} == {sha256}
    assert backend.stored(server, sha256) == [data]
    if backend.s3:  # in the bucket, and nowhere on the disk
        assert not list((data_dir(server) / "files").rglob(sha256))
    conn = await asyncpg.connect(database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM blobs WHERE sha256 = $1", sha256) == 1
    finally:
        await conn.close()


def data_dir(server: Server) -> Path:
    return server.log_path.parent / "data"


# --- attachments and who may download --------------------------------------------------------


async def test_attachments_and_the_download_matrix(
    http: httpx.AsyncClient, alice: Api, bob: Api, carol: Api, make_user: UserFactory
) -> None:
    removed = await make_user("Removed")
    up = (await upload(http, alice, b"the report\n", name="report.txt")).json()
    file_id = up["upload_id"]
    # Before it is attached, only the uploader may read it.
    assert (await http.get(f"/files/{file_id}", headers=auth(alice))).status_code == 200
    assert (await http.get(f"/files/{file_id}", headers=auth(bob))).status_code == 404

    chat_id = await group(alice, bob, removed)
    message = await send(alice, chat_id, [file_id])  # no text: attachments suffice
    assert message["text"] == ""
    assert message["attachments"] == [
        {
            "id": file_id,
            "name": "report.txt",
            "mime": "text/plain",
            "size": 11,
            "width": None,
            "height": None,
        }
    ]
    fetched = await bob.call("GET", f"/messages/{message['id']}")
    assert fetched["attachments"] == message["attachments"]
    await alice.call("DELETE", f"/chats/{chat_id}/members/{removed.user_uuid}")

    nonexistent = await http.get(f"/files/{uuid.uuid4()}", headers=auth(carol))
    for api, status in ((alice, 200), (bob, 200), (carol, 404), (removed, 404)):
        got = await http.get(f"/files/{file_id}", headers=auth(api))
        assert got.status_code == status, (api, got.text)
        if status == 404:
            assert got.json() == nonexistent.json()  # learns nothing
            link = await http.post(f"/files/{file_id}/link", headers=auth(api))
            assert link.status_code == 404
    assert (await http.get(f"/files/{file_id}")).status_code == 401


async def test_attachments_on_the_socket_and_their_limits(
    http: httpx.AsyncClient, alice: Api, bob: Api
) -> None:
    chat_id = await group(alice, bob)
    mine = [(await upload(http, alice, f"{n}".encode())).json()["upload_id"] for n in range(11)]
    bobs = (await upload(http, bob, b"bob's")).json()["upload_id"]
    socket = await alice.connect()
    try:
        sent = await socket.request("send_message", chat_id=chat_id, text=" ", attachments=mine[:2])
        assert [a["id"] for a in sent["attachments"]] == mine[:2]
        refusals = [
            {"attachments": mine},  # 11
            {"attachments": [bobs]},  # only the uploader may attach
            {"attachments": [mine[0], mine[0]]},
            {"attachments": ["not-a-uuid"]},
            {"attachments": [str(uuid.uuid4())]},
            {"attachments": []},  # and no text
        ]
        for fields in refusals:
            with pytest.raises(ChatdError) as error:
                await socket.request("send_message", chat_id=chat_id, text="", **fields)
            assert error.value.code == "invalid", fields
    finally:
        await socket.close()
    history = await alice.history(chat_id)
    assert len(history["messages"]) == 1


async def test_forward_carries_attachments(
    http: httpx.AsyncClient, alice: Api, bob: Api, carol: Api
) -> None:
    up = (await upload(http, alice, png())).json()
    first = await group(alice, bob)
    message = await send(alice, first, [up["upload_id"]], "look")
    second = await group(bob, carol)
    forwarded = await bob.call(
        "POST", f"/messages/{message['id']}/forward", json={"chat_id": second}
    )
    assert forwarded["attachments"] == message["attachments"]
    got = await http.get(f"/files/{up['upload_id']}", headers=auth(carol))
    assert got.status_code == 200


async def test_delete_for_everyone_releases_the_files(
    http: httpx.AsyncClient, alice: Api, bob: Api
) -> None:
    up = (await upload(http, alice, b"secret plan")).json()
    chat_id = await group(alice, bob)
    message = await send(alice, chat_id, [up["upload_id"]])
    await alice.call("DELETE", f"/messages/{message['id']}")
    tombstone = await bob.call("GET", f"/messages/{message['id']}")
    assert tombstone["deleted"] and tombstone["attachments"] == []
    assert (await http.get(f"/files/{up['upload_id']}", headers=auth(bob))).status_code == 404


# --- HTTP behaviour --------------------------------------------------------------------------


async def test_ranges_and_etags(http: httpx.AsyncClient, alice: Api, backend: Backend) -> None:
    data = bytes(range(256)) * 40
    file_id = (await upload(http, alice, data)).json()["upload_id"]
    url = f"/files/{file_id}"
    whole = await http.get(url, headers=auth(alice))
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-length"] == str(len(data))
    etag = whole.headers["etag"]
    assert etag == f'"{hashlib.sha256(data).hexdigest()}"'

    part = await http.get(url, headers={**auth(alice), "Range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    tail = await http.get(url, headers={**auth(alice), "Range": "bytes=-10"})
    assert (tail.status_code, tail.content) == (206, data[-10:])
    open_ended = await http.get(url, headers={**auth(alice), "Range": "bytes=10000-"})
    assert (open_ended.status_code, open_ended.content) == (206, data[10000:])
    beyond = await http.get(url, headers={**auth(alice), "Range": "bytes=99999-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{len(data)}"
    stale = await http.get(url, headers={**auth(alice), "Range": "bytes=0-1", "If-Range": '"x"'})
    assert (stale.status_code, stale.content) == (200, data)

    cached = await http.get(url, headers={**auth(alice), "If-None-Match": etag})
    assert cached.status_code == 304 and cached.content == b""
    changed = await http.get(url, headers={**auth(alice), "If-None-Match": '"other"'})
    assert changed.status_code == 200

    if backend.s3:  # a range is read from the bucket as a range, not the whole object
        wanted = {"bytes=100-199": 100, "bytes=-10": 10, "bytes=10000-": len(data) - 10000}
        ranges = await _s3_ranges_read(backend.s3, _ranged_reads(http, alice, url, wanted))
        assert ranges == ["bytes=100-199", "bytes=10230-10239", "bytes=10000-10239"]


async def test_a_large_file_reads_back_whole_and_in_ranges(
    http: httpx.AsyncClient, alice: Api, backend: Backend
) -> None:
    data = os.urandom(2_621_440)  # 2.5 MiB: more than one window of an S3 read
    file_id = (await upload(http, alice, data)).json()["upload_id"]
    url = f"/files/{file_id}"
    assert (await http.get(url, headers=auth(alice))).content == data
    wanted = "bytes=1000-2600000"
    part = await http.get(url, headers={**auth(alice), "Range": wanted})
    assert (part.status_code, part.content) == (206, data[1000:2600001])
    if backend.s3:  # a window (1 MiB) per GET: a slow reader never holds a GET open
        reads = _ranged_reads(http, alice, url, {wanted: 2_599_001})
        ranges = await _s3_ranges_read(backend.s3, reads)
        assert ranges == ["bytes=1000-1049575", "bytes=1049576-2098151", "bytes=2098152-2600000"]


async def _ranged_reads(http: httpx.AsyncClient, api: Api, url: str, wanted: dict) -> None:
    for header, length in wanted.items():
        part = await http.get(url, headers={**auth(api), "Range": header})
        assert (part.status_code, len(part.content)) == (206, length)


async def _s3_ranges_read(s3: S3Service, action: Awaitable[None]) -> list[str | None]:
    """The Range header of each GET the S3 server received while `action` ran (from
    moto's recorder)."""
    async with httpx.AsyncClient(base_url=s3.endpoint + "/moto-api/recorder") as recorder:
        await recorder.post("/reset-recording")
        await recorder.post("/start-recording")
        try:
            await action
        finally:
            await recorder.post("/stop-recording")
        recording = (await recorder.get("/download-recording")).text
    requests = [json.loads(line) for line in recording.splitlines() if line.strip()]
    return [
        {name.lower(): value for name, value in request["headers"].items()}.get("range")
        for request in requests
        if request["method"] == "GET"
    ]


async def test_signed_links(http: httpx.AsyncClient, alice: Api, bob: Api) -> None:
    up = (await upload(http, alice, png())).json()
    chat_id = await group(alice, bob)
    await send(alice, chat_id, [up["upload_id"]])
    link = await bob.call("POST", f"/files/{up['upload_id']}/link")
    assert link["url"].startswith(f"/files/{up['upload_id']}?expires=")
    assert time.time() < _epoch(link["expires_at"]) <= time.time() + 301
    full = await http.get(link["url"])  # no Authorization header
    assert full.status_code == 200 and full.headers["content-type"] == "image/png"
    thumb = await http.get(link["thumbnail_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"

    tampered = link["url"][:-1] + ("0" if link["url"][-1] != "0" else "1")
    assert (await http.get(tampered)).status_code == 403
    other = (await upload(http, alice, b"other")).json()["upload_id"]
    moved = link["url"].replace(up["upload_id"], other)
    assert (await http.get(moved)).status_code == 403
    past = int(time.time()) - 1
    expired = f"/files/{up['upload_id']}?expires={past}&signature=" + "0" * 64
    assert (await http.get(expired)).status_code == 403


def _epoch(timestamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(timestamp).timestamp()


# --- images ----------------------------------------------------------------------------------


async def test_thumbnails(http: httpx.AsyncClient, alice: Api) -> None:
    body = (await upload(http, alice, png(1600, 900))).json()
    thumb = await http.get(f"/files/{body['upload_id']}/thumbnail", headers=auth(alice))
    assert thumb.status_code == 200
    image = Image.open(io.BytesIO(thumb.content))
    assert image.size == (320, 180)
    assert thumb.headers["content-disposition"].startswith("inline;")
    text = (await upload(http, alice, b"just text")).json()
    missing = await http.get(f"/files/{text['upload_id']}/thumbnail", headers=auth(alice))
    assert missing.status_code == 404


async def test_an_animated_gif_gets_a_still_thumbnail(http: httpx.AsyncClient, alice: Api) -> None:
    frames = [Image.new("RGB", (400, 400), (n * 80, 0, 0)) for n in range(3)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    body = (await upload(http, alice, out.getvalue())).json()
    assert (body["mime"], body["width"], body["height"]) == ("image/gif", 400, 400)
    full = await http.get(f"/files/{body['upload_id']}", headers=auth(alice))
    assert Image.open(io.BytesIO(full.content)).n_frames == 3  # the original, animated
    thumb = await http.get(f"/files/{body['upload_id']}/thumbnail", headers=auth(alice))
    still = Image.open(io.BytesIO(thumb.content))
    assert getattr(still, "n_frames", 1) == 1 and still.size == (320, 320)


async def test_exif_is_stripped_but_the_orientation_kept(
    http: httpx.AsyncClient, alice: Api
) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # taken sideways
    exif[0x010F] = "PhoneMaker"
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 29.0), 3: "E", 4: (2.0, 17.0, 40.0)}  # GPS
    out = io.BytesIO()
    Image.new("RGB", (400, 200), (0, 200, 0)).save(out, "JPEG", exif=exif.tobytes())
    original = out.getvalue()
    body = (await upload(http, alice, original, name="photo.jpg")).json()
    assert (body["mime"], body["width"], body["height"]) == ("image/jpeg", 200, 400)
    served = (await http.get(f"/files/{body['upload_id']}", headers=auth(alice))).content
    assert body["sha256"] == hashlib.sha256(served).hexdigest() != hashlib.sha256(original)
    kept = Image.open(io.BytesIO(served)).getexif()
    assert dict(kept) == {0x0112: 6}  # no GPS, no maker: the orientation alone
    assert b"PhoneMaker" not in served


async def test_a_decompression_bomb_is_kept_as_a_file(
    http: httpx.AsyncClient, alice: Api, server: Server
) -> None:
    out = io.BytesIO()
    Image.new("1", (30_000, 30_000)).save(out, "PNG")  # 900 megapixels in ~100 KB
    bomb = out.getvalue()
    assert len(bomb) < 200_000
    with RssSampler(server.process.pid) as rss:
        response = await upload(http, alice, bomb, name="bomb.png")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["width"] is None  # never decoded
    assert rss.growth < 50 * MiB, rss.growth
    thumb = await http.get(f"/files/{body['upload_id']}/thumbnail", headers=auth(alice))
    assert thumb.status_code == 404
    got = await http.get(f"/files/{body['upload_id']}", headers=auth(alice))
    assert got.headers["content-disposition"].startswith("attachment;")


# --- limits ----------------------------------------------------------------------------------


async def chunked_upload(server: Server, api: Api, total: int) -> tuple[int, int, bytes]:
    """Send `total` random bytes chunked, reading the answer as soon as it comes: (status,
    bytes sent before it came, the answer)."""
    host, port = server.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        (
            "POST /uploads?name=big HTTP/1.1\r\n"
            f"Host: {host}\r\nAuthorization: Bearer {api.access_token}\r\n"
            "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        ).encode()
    )
    chunk = os.urandom(MiB)
    sent = 0
    answer = asyncio.ensure_future(reader.read(65536))
    try:
        while sent < total and not answer.done():
            writer.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            await writer.drain()
            sent += len(chunk)
        if sent >= total and not answer.done():
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        head = await asyncio.wait_for(answer, 60)
    except (ConnectionResetError, BrokenPipeError):
        head = await asyncio.wait_for(answer, 60)
    try:
        if b"\r\n\r\n" in head and head.endswith(b"\r\n\r\n"):  # the body comes apart
            head += await asyncio.wait_for(reader.read(65536), 5)
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        writer.close()
    return int(head.split(b" ", 2)[1]), sent, head


async def test_memory_stays_bounded_200_mb_refused_20_mb_accepted(
    server: Server, alice: Api, http: httpx.AsyncClient
) -> None:
    with RssSampler(server.process.pid) as rss:
        status, sent, head = await chunked_upload(server, alice, 200 * MiB)
    assert status == 413, head
    assert b"too_large" in head
    assert sent < 60 * MiB  # refused as the limit (25 MiB) was crossed, not at the end
    assert rss.growth < 30 * MiB, rss.growth
    with RssSampler(server.process.pid) as rss:
        status, sent, head = await chunked_upload(server, alice, 20 * MiB)
    assert status == 201, head
    assert rss.growth < 30 * MiB, rss.growth
    # Announced too big: refused before a byte of the body is sent.
    host, port = server.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        (
            f"POST /uploads HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {alice.access_token}\r\nContent-Length: {26 * MiB}\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413 "), head


@pytest.fixture(scope="module")
def small_server(
    backend: Backend, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    server = start_server(
        database_url,
        tmp_path_factory.mktemp("small"),
        CHATD_MAX_UPLOAD_BYTES=str(MiB),
        CHATD_USER_QUOTA_BYTES=str(3 * MiB),
        **backend.env(),
    )
    yield server
    stop_server(server)


async def test_upload_limit_and_quota_edges(small_server: Server) -> None:
    api = await new_user(small_server, "Quota")
    async with httpx.AsyncClient(base_url=small_server.base_url, timeout=30) as http:
        over = await upload(http, api, os.urandom(MiB + 1))
        assert (over.status_code, over.json()["error"]["code"]) == (413, "too_large")
        for _ in range(3):
            assert (await upload(http, api, os.urandom(MiB))).status_code == 201  # 3 MiB: full
        one_more = await upload(http, api, b"x")
        assert (one_more.status_code, one_more.json()["error"]["code"]) == (413, "quota_exceeded")
        multipart = await http.post(
            "/uploads", files={"file": ("a", os.urandom(MiB + 1))}, headers=auth(api)
        )
        assert multipart.status_code == 413
    await api.aclose()


# --- the collector ---------------------------------------------------------------------------


@pytest.fixture
async def gc_server(
    backend: Backend, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Server, Path, dict[str, str]]]:
    workdir = tmp_path_factory.mktemp("gc")
    env = {"CHATD_UPLOAD_TTL": "3", "CHATD_FILE_GRACE": "1", **backend.env()}
    # One round at start, then only after a restart.
    server = start_server(database_url, workdir, CHATD_FILE_GC_INTERVAL="3600", **env)
    yield server, workdir, env
    stop_server(server)


async def test_the_collector_deletes_what_nothing_refers_to_and_survives_restarts(
    gc_server: tuple[Server, Path, dict[str, str]], database_url: str, backend: Backend
) -> None:
    server, workdir, env = gc_server
    alice, bob = await new_user(server, "Alice"), await new_user(server, "Bob")
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        kept, released, forwarded, unattached = [
            (await upload(http, alice, f"{name} {uuid.uuid4()}".encode())).json()
            for name in ("kept", "released", "forwarded", "unattached")
        ]
        chat_id = await group(alice, bob)
        await send(alice, chat_id, [kept["upload_id"]])
        gone = await send(alice, chat_id, [released["upload_id"], forwarded["upload_id"]])
        other = await send(alice, chat_id, [forwarded["upload_id"]], "again")
        await alice.call("DELETE", f"/messages/{gone['id']}")
        assert other["attachments"][0]["id"] == forwarded["upload_id"]
    await asyncio.sleep(3.5)  # past the grace and the upload TTL
    for each in (kept, released, forwarded, unattached):
        assert backend.stored(server, each["sha256"]), "no round since start: all still there"

    stop_server(server)  # the state is in the database: a new process picks it up
    restarted = start_server(database_url, workdir, **env)
    try:
        # Both go in the first round, one after the other: wait for the two of them.
        collected = (released["sha256"], unattached["sha256"])
        deadline = time.monotonic() + 20
        while any(backend.stored(restarted, sha) for sha in collected):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)  # another process: nothing to wait on but the store
        assert not backend.stored(restarted, released["sha256"])
        assert not backend.stored(restarted, unattached["sha256"])
        assert backend.stored(restarted, kept["sha256"])
        assert backend.stored(restarted, forwarded["sha256"])  # still carried by another
        conn = await asyncpg.connect(database_url)
        try:
            ids = [uuid.UUID(u["upload_id"]) for u in (released, unattached, kept)]
            rows = await conn.fetch("SELECT id FROM files WHERE id = ANY($1)", ids)
            assert {r["id"] for r in rows} == {ids[2]}
        finally:
            await conn.close()
    finally:
        stop_server(restarted)
    await alice.aclose()
    await bob.aclose()
