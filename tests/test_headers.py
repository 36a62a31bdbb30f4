"""The fast header parser gives Pillow's answer (size, channels, mode, format, EXIF orientation) on
every format and mode it parses, hands the rest to Pillow, and finds broken files."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_patches.cli.synth import synthetic_image
from dali_patches.sources.base import Problem
from dali_patches.sources.headers import Header, parse, pillow_header, read_local

RNG = np.random.default_rng(3)
RGB = synthetic_image(37, 53, RNG)
GRAY = RGB[..., 0]


def _exif(orientation: int, thumbnail_bytes: int = 0) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    if thumbnail_bytes:  # a big maker note pushes the frame header past the first read
        exif[0x927C] = bytes(RNG.integers(0, 256, thumbnail_bytes, np.uint8))
    return exif.tobytes()


def _encode(array: np.ndarray, fmt: str, mode: str | None = None, **kwargs: object) -> bytes:
    im = Image.fromarray(array)
    if mode is not None:
        im = im.convert(mode)
    out = io.BytesIO()
    im.save(out, fmt, **kwargs)
    return out.getvalue()


CASES: dict[str, Callable[[], bytes]] = {
    "jpeg": lambda: _encode(RGB, "JPEG", quality=90),
    "jpeg progressive": lambda: _encode(RGB, "JPEG", progressive=True),
    "jpeg gray": lambda: _encode(GRAY, "JPEG"),
    "jpeg cmyk": lambda: _encode(RGB, "JPEG", "CMYK"),
    "jpeg exif rotated": lambda: _encode(RGB, "JPEG", exif=_exif(6)),
    "jpeg exif upright": lambda: _encode(RGB, "JPEG", exif=_exif(3)),
    "jpeg exif past 4 KiB": lambda: _encode(RGB, "JPEG", exif=_exif(8, 20_000)),
    "png rgb": lambda: _encode(RGB, "PNG"),
    "png gray": lambda: _encode(GRAY, "PNG"),
    "png 16-bit": lambda: _encode(GRAY.astype(np.uint16) * 257, "PNG"),
    "png palette": lambda: _encode(RGB, "PNG", "P"),
    "png rgba": lambda: _encode(RGB, "PNG", "RGBA"),
    "png la": lambda: _encode(RGB, "PNG", "LA"),
    "png 1-bit": lambda: _encode(RGB, "PNG", "1"),
    "webp lossy": lambda: _encode(RGB, "WEBP"),
    "webp lossless": lambda: _encode(RGB, "WEBP", lossless=True),
    "webp rgba": lambda: _encode(RGB, "WEBP", "RGBA"),
    "webp exif": lambda: _encode(RGB, "WEBP", exif=_exif(6)),
    "bmp": lambda: _encode(RGB, "BMP"),
    "bmp palette": lambda: _encode(RGB, "BMP", "P"),
    "tiff rgb": lambda: _encode(RGB, "TIFF"),
    "tiff gray": lambda: _encode(GRAY, "TIFF"),
    "tiff rotated": lambda: _encode(RGB, "TIFF", exif=_exif(5)),
    "tiff rgba": lambda: _encode(RGB, "TIFF", "RGBA"),
    "tiff cmyk": lambda: _encode(RGB, "TIFF", "CMYK"),
}


def _reader(data: bytes) -> Callable[[int, int], bytes]:
    return lambda offset, length: data[offset:offset + length]


@pytest.mark.parametrize("case", list(CASES))
def test_parser_agrees_with_pillow(case: str) -> None:
    data = CASES[case]()
    found = parse(_reader(data), len(data))
    expected = pillow_header(data)
    assert isinstance(expected, Header)
    assert (found if found is not None else pillow_header(data)) == expected
    if case.split()[0] in ("jpeg", "png") or case in ("webp lossy", "webp lossless", "webp rgba", "bmp", "tiff rgb",
                                                     "tiff gray", "tiff rotated"):
        assert found is not None, "the common formats are parsed, not handed to Pillow"


def test_read_local_gives_size_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(CASES["jpeg exif rotated"]())
    header, stat = read_local(os.fspath(path))
    assert header == Header(37, 53, 3, "RGB", "JPEG", True)
    assert stat is not None and (stat.st_size, stat.st_mtime_ns) == (path.stat().st_size, path.stat().st_mtime_ns)


@pytest.mark.parametrize(("name", "data", "kind"), [
    ("empty.jpg", b"", "empty"),
    ("cut.jpg", CASES["jpeg"]()[:300], "truncated"),
    ("cut.png", CASES["png rgb"]()[:-20], "truncated"),
    ("cut.bmp", CASES["bmp"]()[:-100], "truncated"),
    ("text.jpg", b"hello, not an image", "not an image"),
    ("text.png", b"hello, not an image", "not an image"),
    ("text.webp", b"RIFF\0\0\0\0WEBPjunk", "not an image"),
])
def test_broken_files_are_named(tmp_path: Path, name: str, data: bytes, kind: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    header, _ = read_local(os.fspath(path))
    assert isinstance(header, Problem)
    assert header.kind == kind


def test_unreadable_file(tmp_path: Path) -> None:
    header, stat = read_local(os.fspath(tmp_path / "missing.jpg"))
    assert isinstance(header, Problem)
    assert header.kind == "unreadable"
    assert stat is None


def test_pillow_headers_from_many_threads_keep_the_size_limit() -> None:
    """Pillow's limit on image size is one global: lifting it for a header read in one thread must not
    lift it for good, nor refuse a large image in another (object headers are read from 32 threads)."""
    import io
    import struct
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from dali_patches.sources.headers import Header, pillow_header

    # a GIF header of 30000 x 30000 pixels (Pillow parses it; 10x its limit)
    gif = b"GIF89a" + struct.pack("<HH", 30000, 30000) + b"\x00\x00\x00" + b",\x00\x00\x00\x00" \
        + struct.pack("<HH", 30000, 30000) + b"\x00\x02\x02\x44\x01\x00;"
    before = Image.MAX_IMAGE_PIXELS
    with ThreadPoolExecutor(32) as pool:
        found = list(pool.map(lambda _: pillow_header(io.BytesIO(gif).getvalue()), range(400)))
    assert all(isinstance(h, Header) and (h.height, h.width) == (30000, 30000) for h in found), found[:3]
    assert Image.MAX_IMAGE_PIXELS == before
