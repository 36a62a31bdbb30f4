"""Headers: an image file's decoded size, channels, mode and format from a few of its bytes.

The catalog needs every file's size (for the cache plan and the "smaller than the patch" check) and
wants bad files found before training. Pillow's ``Image.open`` does that at ≈ 0.4 ms a file in
Python, which at millions of files is minutes on every start; this module reads the first bytes and
the last few with positioned reads (``os.pread`` on a local file, ranged GETs on object storage) and
parses the headers itself: JPEG SOFn (+ the EXIF orientation), PNG IHDR, WebP VP8/VP8L/VP8X, BMP
(24-bit) and TIFF's first IFD. Whatever it does not parse with certainty (CMYK-ish TIFFs, palette
BMPs, 12-bit JPEGs, WebP with EXIF, …) goes to Pillow, whose answer it must equal (a test holds
the two together on every format and mode).

A ``Reader`` is ``read(offset, length) -> bytes`` (fewer at the end of the file).
"""

from __future__ import annotations

import io
import os
import stat as stat_module
import struct
import threading
from collections.abc import Callable
from typing import BinaryIO, NamedTuple

from PIL import Image

from .base import Problem

__all__ = ["Header", "Reader", "not_regular", "parse", "pillow_header", "read_local"]

Reader = Callable[[int, int], bytes]

_HEAD_BYTES = 4096  # the first read; a JPEG whose EXIF block holds a thumbnail needs a second one
_TAIL_BYTES = 64  # where the JPEG end-of-image marker / PNG IEND chunk must be
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap height and width (the decoder applies them)
_EXIF_FORMATS = ("JPEG", "TIFF", "WEBP")  # formats whose EXIF orientation the decoder applies
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}
_PNG_MODES = {(1, 0): "1", (2, 0): "L", (4, 0): "L", (8, 0): "L", (16, 0): "I;16", (8, 2): "RGB", (16, 2): "RGB",
              (1, 3): "P", (2, 3): "P", (4, 3): "P", (8, 3): "P", (8, 4): "LA", (16, 4): "RGBA", (8, 6): "RGBA",
              (16, 6): "RGBA"}
_BANDS = {"1": 1, "L": 1, "P": 1, "I;16": 1, "LA": 2, "RGB": 3, "RGBA": 4, "CMYK": 4}
_TIFF_MODES = {(2, 3, 8): "RGB", (2, 4, 8): "RGBA", (1, 1, 8): "L", (0, 1, 8): "L", (1, 1, 16): "I;16"}


class Header(NamedTuple):
    """What the catalog keeps of a file's header: ``height`` × ``width`` in pixels as stored (before
    EXIF orientation), ``channels`` stored, Pillow's ``mode``, ``format`` (``"JPEG"``, ``"JPEG
    progressive"``, ``"PNG"``, ``"WEBP"``, ``"BMP"``, ``"TIFF"``, …) and ``transposed``: the EXIF
    orientation swaps height and width."""

    height: int
    width: int
    channels: int
    mode: str
    format: str
    transposed: bool = False


class _Unparsed(Exception):
    """This parser is not certain; ask Pillow."""


def _need(data: bytes, n: int) -> bytes:
    if len(data) < n:
        raise _Unparsed
    return data


def _ifd(read: Reader, base: int, little: bool, offset: int, wanted: set[int]) -> dict[int, tuple[int, ...]]:
    """Tags ``wanted`` of the TIFF IFD at ``base + offset`` → their (integer) values."""
    order = "<" if little else ">"
    count_bytes = _need(read(base + offset, 2), 2)
    (count,) = struct.unpack(order + "H", count_bytes)
    table = read(base + offset + 2, 12 * count)
    sizes = {1: 1, 3: 2, 4: 4, 6: 1, 8: 2, 9: 4}
    codes = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i"}
    out: dict[int, tuple[int, ...]] = {}
    for i in range(min(count, len(table) // 12)):
        tag, kind, n, value = struct.unpack(order + "HHI4s", table[12 * i:12 * i + 12])
        if tag not in wanted or kind not in sizes or n == 0 or n > 64:
            continue
        raw = value if n * sizes[kind] <= 4 else read(base + struct.unpack(order + "I", value)[0], n * sizes[kind])
        if len(raw) < n * sizes[kind]:
            continue
        out[tag] = struct.unpack(f"{order}{n}{codes[kind]}", raw[:n * sizes[kind]])
    return out


def _tiff_orientation(read: Reader, base: int) -> int:
    head = read(base, 8)
    if len(head) < 8 or head[:4] not in (b"II*\0", b"MM\0*"):
        return 1
    little = head[:2] == b"II"
    offset = struct.unpack("<I" if little else ">I", head[4:8])[0]
    return _ifd(read, base, little, offset, {0x0112}).get(0x0112, (1,))[0]


def _jpeg(read: Reader, head: bytes, size: int) -> Header:
    pos, orientation = 2, 1
    while True:
        marker = head[pos:pos + 4] if pos + 4 <= len(head) else read(pos, 4)
        if len(marker) < 2 or marker[0] != 0xFF:
            raise _Unparsed  # not at a marker: let Pillow judge the file
        kind = marker[1]
        if kind == 0xFF:  # fill byte
            pos += 1
            continue
        if kind in (0x01, 0xD8) or 0xD0 <= kind <= 0xD7:
            pos += 2
            continue
        if kind in (0xD9, 0xDA) or len(marker) < 4:
            raise _Unparsed  # image data before any frame header
        length = (marker[2] << 8) | marker[3]
        if kind in _SOF:
            frame = head[pos + 4:pos + 10] if pos + 10 <= len(head) else read(pos + 4, 6)
            precision, height, width, components = struct.unpack(">BHHB", _need(frame, 6))
            mode = _JPEG_MODES.get(components)
            if precision != 8 or height == 0 or mode is None:
                raise _Unparsed
            fmt = "JPEG progressive" if kind in _PROGRESSIVE else "JPEG"
            return Header(height, width, components, mode, fmt, orientation in _TRANSPOSED)
        if kind == 0xE1 and orientation == 1:
            start = pos + 4
            tag = head[start:start + 6] if start + 6 <= len(head) else read(start, 6)
            if tag == b"Exif\0\0":
                orientation = _tiff_orientation(read, start + 6)
        pos += 2 + length
        if pos >= size:
            raise _Unparsed


def _png(head: bytes) -> Header:
    if head[12:16] != b"IHDR":
        raise _Unparsed
    width, height, depth, color = struct.unpack(">IIBB", _need(head, 26)[16:26])
    mode = _PNG_MODES.get((depth, color))
    if mode is None:
        raise _Unparsed
    return Header(height, width, _BANDS[mode], mode, "PNG")


def _webp(head: bytes) -> Header:
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", _need(head, 30)[26:30])
        return Header(height & 0x3FFF, width & 0x3FFF, 3, "RGB", "WEBP")
    if chunk == b"VP8L" and head[20:21] == b"\x2f":
        (bits,) = struct.unpack("<I", _need(head, 25)[21:25])
        alpha = bool(bits >> 28 & 1)
        mode = "RGBA" if alpha else "RGB"
        return Header((bits >> 14 & 0x3FFF) + 1, (bits & 0x3FFF) + 1, _BANDS[mode], mode, "WEBP")
    if chunk == b"VP8X":
        flags = _need(head, 30)[20]
        if flags & 0x0A:  # EXIF (its orientation) or animation: Pillow decides
            raise _Unparsed
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        mode = "RGBA" if flags & 0x10 else "RGB"
        return Header(height, width, _BANDS[mode], mode, "WEBP")
    raise _Unparsed


def _bmp(head: bytes, size: int) -> Header | Problem:
    header_bytes, width, height, planes, bits, compression = struct.unpack("<IiiHHI", _need(head, 34)[14:34])
    if header_bytes < 40 or bits != 24 or compression != 0 or planes != 1 or width <= 0 or height == 0:
        raise _Unparsed
    (data_offset,) = struct.unpack("<I", head[10:14])
    if size < data_offset + (width * 3 + 3) // 4 * 4 * abs(height):
        return Problem(f"truncated BMP ({size} bytes, its pixels need {data_offset + (width * 3 + 3) // 4 * 4 * abs(height)})",
                       "truncated")
    return Header(abs(height), width, 3, "RGB", "BMP")


def _tiff(read: Reader, head: bytes) -> Header:
    little = head[:2] == b"II"
    offset = struct.unpack("<I" if little else ">I", head[4:8])[0]
    tags = _ifd(read, 0, little, offset, {256, 257, 258, 262, 274, 277, 338})
    if 256 not in tags or 257 not in tags or 262 not in tags:
        raise _Unparsed
    samples = tags.get(277, (1,))[0]
    bits = tags.get(258, (1,))
    extra = tags.get(338, ())
    if len(set(bits)) != 1 or (samples == 4 and extra != (2,)):
        raise _Unparsed
    mode = _TIFF_MODES.get((tags[262][0], samples, bits[0]))
    if mode is None:
        raise _Unparsed
    transposed = tags.get(274, (1,))[0] in _TRANSPOSED
    return Header(tags[257][0], tags[256][0], samples, mode, "TIFF", transposed)


def parse(read: Reader, size: int, suffix: str = "") -> Header | Problem | None:
    """The header of a file of ``size`` bytes read through ``read``; a :class:`Problem` for a file
    that would break the decoder (empty, truncated, not an image); ``None`` when this parser is not
    certain (ask :func:`pillow_header`). ``suffix`` (``".jpg"``, …) names what the file should be."""
    if size == 0:
        return Problem("empty file (0 bytes)", "empty")
    head = read(0, _HEAD_BYTES)
    try:
        if head[:3] == b"\xff\xd8\xff":
            if b"\xff\xd9" not in read(max(0, size - _TAIL_BYTES), _TAIL_BYTES):
                return Problem("truncated JPEG (no end-of-image marker)", "truncated")
            return _jpeg(read, head, size)
        if head[:8] == b"\x89PNG\r\n\x1a\n":
            if b"IEND" not in read(max(0, size - _TAIL_BYTES), _TAIL_BYTES):
                return Problem("truncated PNG (no IEND chunk)", "truncated")
            return _png(head)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp(head)
        if head[:2] == b"BM":
            return _bmp(head, size)
        if head[:4] in (b"II*\0", b"MM\0*"):
            return _tiff(read, head)
    except (_Unparsed, struct.error):
        return None
    if suffix.lower() in (".jpg", ".jpeg", ".png"):
        return Problem(f"not a {suffix.lower()[1:].upper()} file (bad signature {head[:4]!r})", "not an image")
    return None


_BOMB_LIMIT = threading.Lock()  # Pillow's limit is one global: lifted and restored by one thread at a time


def pillow_header(data: bytes | str | BinaryIO) -> Header | Problem:
    """The same :class:`Header` from Pillow (a path, an open file, or the whole file's bytes): the fallback, and
    the reference the parser is tested against. Thread-safe: Pillow's image-size limit is lifted
    for the header read only, under a lock (object headers are read from many threads)."""
    with _BOMB_LIMIT:
        return _pillow_header(data)


def _pillow_header(data: bytes | str | BinaryIO) -> Header | Problem:
    bomb_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # sizes only: a 20k × 20k scan is legitimate data, not a bomb
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            w, h = im.size
            fmt = f"{im.format} progressive" if im.info.get("progressive") else str(im.format)
            fmt = "JPEG" if fmt == "MPO" else fmt  # a camera's multi-picture JPEG decodes as its first picture
            transposed = im.format in (*_EXIF_FORMATS, "MPO") and im.getexif().get(0x0112) in _TRANSPOSED
            if transposed and im.format == "TIFF":  # Pillow reports a TIFF's size already turned
                h, w = w, h
            return Header(h, w, len(im.getbands()), im.mode, fmt, bool(transposed))
    except PermissionError as e:
        return Problem(f"not readable ({e.strerror}); fix its permissions", "unreadable")
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad headers
        return Problem(f"cannot read image header: {e}", "not an image")
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit


def not_regular(mode: int) -> Problem | None:
    """Why a file of ``st_mode`` ``mode`` must never be handed to a reader (a FIFO would block it
    forever, a device never ends), or ``None`` for a regular file."""
    if stat_module.S_ISREG(mode):
        return None
    kinds = {stat_module.S_ISFIFO: "a FIFO (named pipe)", stat_module.S_ISCHR: "a character device",
             stat_module.S_ISBLK: "a block device", stat_module.S_ISSOCK: "a socket", stat_module.S_ISDIR: "a folder"}
    kind = next((name for test, name in kinds.items() if test(mode)), "not a regular file")
    return Problem(f"{kind}, not a regular file: reading it could block forever; remove it or replace it by the image",
                   "not a regular file")


def read_local(path: str) -> tuple[Header | Problem, os.stat_result | None]:
    """``(header or problem, the file's stat)`` of a local file, in a few positioned reads
    (``None`` for the stat of a file that cannot be opened). Opened without blocking, and read only
    when it is a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once instead of waiting for a writer
    except OSError as e:
        return Problem(f"unreadable: {e.strerror or e}; fix its permissions or remove it", "unreadable"), None
    try:
        stat = os.fstat(fd)
        odd = not_regular(stat.st_mode)
        if odd is not None:
            return odd, None
        found = parse(lambda offset, length: os.pread(fd, length, offset), stat.st_size, os.path.splitext(path)[1])
        if found is None:  # Pillow reads the same open file (the name may lead elsewhere by now)
            with os.fdopen(os.dup(fd), "rb") as f:
                found = pillow_header(f)
    except OSError as e:
        return Problem(f"unreadable: {e.strerror or e}", "unreadable"), None
    finally:
        os.close(fd)
    return found, stat
