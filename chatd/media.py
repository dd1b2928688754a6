"""What an uploaded file is, read from its bytes: its MIME type, an image's size, its
thumbnail, and its bytes with the metadata a photo carries (GPS position) taken out.

The client's Content-Type and file name are never believed. Images are recognised by
Pillow itself, for the four raster formats browsers show safely (PNG, JPEG, GIF, WebP);
anything else by puremagic's signatures, else as text or raw bytes. Only an image Pillow
has fully decoded (its thumbnail made) counts as one: `width` is set only then, and only
then is a file served inline (chatd/handlers/files.py).

Everything here is blocking and runs in a thread (asyncio.to_thread).
"""

from __future__ import annotations

import io
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import puremagic
from PIL import Image, ImageOps

# Formats a browser may show inline from chatd's origin: raster only, never SVG.
SAFE_RASTER = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}
# The decompression-bomb guard: an image over this many pixels is never decoded (its header
# may promise 100,000 x 100,000 pixels in a few hundred bytes). It is kept as a plain file.
MAX_IMAGE_PIXELS = 40_000_000
THUMBNAIL_PX = 320
SNIFF_BYTES = 64 * 1024
OCTET_STREAM = "application/octet-stream"

# Pillow refuses (DecompressionBombError) at twice its own limit; ours is checked first.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


@dataclass(frozen=True, slots=True)
class Inspected:
    mime: str
    width: int | None  # set only for an image decoded whole (its thumbnail made)
    height: int | None
    thumbnail: bytes | None  # WebP, at most THUMBNAIL_PX on its longer side
    stripped: bool  # metadata was taken out: `path` now holds other bytes


def inspect(path: Path) -> Inspected:
    """What the file at `path` is. An image's metadata (EXIF, XMP, text chunks) is taken
    out of the file in place, keeping only a JPEG's orientation."""
    kind = _raster_format(path)
    if kind is None:
        with path.open("rb") as file:
            return Inspected(sniff(file.read(SNIFF_BYTES)), None, None, None, False)
    mime = SAFE_RASTER[kind]
    stripped = _strip_metadata(path, kind)
    try:
        thumbnail, width, height = _thumbnail(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError):
        # A header that promised an image the bytes do not hold, or a bomb: a plain file.
        return Inspected(mime, None, None, None, stripped)
    return Inspected(mime, width, height, thumbnail, stripped)


def sniff(head: bytes) -> str:
    """The MIME type of content that starts with `head` (not an image Pillow decoded)."""
    if not head:
        return OCTET_STREAM
    try:
        matches = puremagic.magic_string(head)
    except puremagic.PureError:
        matches = []
    if matches and matches[0].mime_type:
        return matches[0].mime_type
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # The head may end inside a character: only an error before its last 3 bytes counts.
        if exc.start < len(head) - 3:
            return OCTET_STREAM
    return "text/plain"


def _raster_format(path: Path) -> str | None:
    try:
        with Image.open(path, formats=list(SAFE_RASTER)) as image:
            return image.format if image.format in SAFE_RASTER else None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError):
        return None


def _thumbnail(path: Path) -> tuple[bytes, int, int]:
    with Image.open(path) as image:
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"{width}x{height} pixels")
        if image.format == "JPEG":
            image.draft("RGB", (THUMBNAIL_PX * 2, THUMBNAIL_PX * 2))  # decode at 1/2..1/8
        image.seek(0)  # an animated GIF or WebP: its first frame
        image.load()
        if image.getexif().get(0x0112) in (5, 6, 7, 8):  # turned a quarter: shown upright
            width, height = height, width
        still = ImageOps.exif_transpose(image)
        has_alpha = still.mode in ("RGBA", "LA", "PA") or "transparency" in still.info
        still = still.convert("RGBA" if has_alpha else "RGB")
        still.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        out = io.BytesIO()
        still.save(out, "WEBP", quality=80)  # small, and keeps transparency
        return out.getvalue(), width, height


# --- taking metadata out, without decoding the image (the pixels stay as they were) ------


def _strip_metadata(path: Path, kind: str) -> bool:
    """Rewrite the file without its metadata; whether anything was taken out."""
    stripper = {"JPEG": _strip_jpeg, "PNG": _strip_png, "WEBP": _strip_webp}.get(kind)
    if stripper is None:
        return False
    temporary = path.with_suffix(".stripped")
    try:
        with path.open("rb") as source, temporary.open("wb") as target:
            dropped = stripper(source, target)
    except (struct.error, ValueError):
        temporary.unlink(missing_ok=True)
        return False  # not the structure its signature promised: Pillow will say
    if dropped:
        temporary.replace(path)
    else:
        temporary.unlink()
    return dropped


def _read_exactly(source: BinaryIO, n: int) -> bytes:
    data = source.read(n)
    if len(data) != n:
        raise ValueError("truncated")
    return data


def _strip_jpeg(source: BinaryIO, target: BinaryIO) -> bool:
    """Drop APP1 (EXIF, XMP) and COM segments; keep the orientation in a minimal EXIF."""
    if _read_exactly(source, 2) != b"\xff\xd8":
        raise ValueError("not a JPEG")
    target.write(b"\xff\xd8")
    dropped, orientation = False, None
    while True:
        marker = _read_exactly(source, 2)
        if marker[0] != 0xFF:
            raise ValueError("bad marker")
        if marker[1] in (0xD9, 0xDA):  # end of image, or start of scan: the rest is data
            if orientation is not None:
                target.write(_exif_segment(orientation))
            target.write(marker)
            shutil.copyfileobj(source, target)
            return dropped
        (length,) = struct.unpack(">H", _read_exactly(source, 2))
        payload = _read_exactly(source, length - 2)
        if marker[1] == 0xE1 or marker[1] == 0xFE:
            dropped = True
            if payload.startswith(b"Exif\x00\x00"):
                orientation = _orientation(payload) or orientation
            continue
        target.write(marker + struct.pack(">H", length) + payload)


def _orientation(exif_payload: bytes) -> int | None:
    exif = Image.Exif()
    try:
        exif.load(exif_payload)
    except (OSError, ValueError, SyntaxError, struct.error, KeyError):
        return None
    value = exif.get(0x0112)
    return value if isinstance(value, int) and 2 <= value <= 8 else None


def _exif_segment(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = exif.tobytes()  # starts with b"Exif\0\0"
    return b"\xff\xe1" + struct.pack(">H", len(data) + 2) + data


_PNG_METADATA = {b"eXIf", b"tEXt", b"zTXt", b"iTXt", b"tIME"}


def _strip_png(source: BinaryIO, target: BinaryIO) -> bool:
    signature = _read_exactly(source, 8)
    target.write(signature)
    dropped = False
    while True:
        header = source.read(8)
        if not header:
            return dropped
        length, kind = struct.unpack(">I4s", _pad(header, 8))
        if kind in _PNG_METADATA:
            source.seek(length + 4, io.SEEK_CUR)  # data and CRC
            dropped = True
            continue
        target.write(header)
        _copy(source, target, length + 4)
        if kind == b"IEND":
            return dropped


def _strip_webp(source: BinaryIO, target: BinaryIO) -> bool:
    riff = _read_exactly(source, 12)
    if riff[:4] != b"RIFF" or riff[8:] != b"WEBP":
        raise ValueError("not a WebP")
    target.write(riff)
    dropped = False
    while True:
        header = source.read(8)
        if not header:
            break
        kind, length = struct.unpack("<4sI", _pad(header, 8))
        padded = length + (length & 1)
        if kind in (b"EXIF", b"XMP "):
            source.seek(padded, io.SEEK_CUR)
            dropped = True
            continue
        target.write(header)
        if kind == b"VP8X":
            data = bytearray(_read_exactly(source, padded))
            data[0] &= ~0x0C & 0xFF  # no EXIF (0x08), no XMP (0x04) any more
            target.write(data)
        else:
            _copy(source, target, padded)
    size = target.tell() - 8
    target.seek(4)
    target.write(struct.pack("<I", size))
    return dropped


def _pad(header: bytes, n: int) -> bytes:
    if len(header) != n:
        raise ValueError("truncated")
    return header


def _copy(source: BinaryIO, target: BinaryIO, n: int) -> None:
    while n > 0:
        chunk = source.read(min(n, 1 << 20))
        if not chunk:
            raise ValueError("truncated")
        target.write(chunk)
        n -= len(chunk)
