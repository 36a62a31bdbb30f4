"""Catalog: a folder, glob or file list → the indexed, screened list of images to sample from.

Only headers are read (Pillow opens lazily), so a catalog of 100k files costs seconds, not a decode
pass. Files that would break DALI's reader for good (zero-byte, truncated, not an image) or that are
smaller than the patch are screened out here and reported, before any training starts.
"""

from __future__ import annotations

import glob
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

__all__ = ["IMAGE_SUFFIXES", "Catalog", "CatalogWarning", "screen_file"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap height and width (DALI applies them)
_PROGRESS_MIN_FILES = 2000  # below this a header scan takes well under a second: no bar


class CatalogWarning(UserWarning):
    """Some files were skipped; ``Catalog.skipped`` lists each with its reason."""


def screen_file(path: str) -> str | None:
    """Cheap structural check (≈0.02 ms) that catches files which would break DALI's reader.

    Returns ``None`` for a plausible image, else the reason. Zero-byte files make DALI's file reader
    fail for good; truncated JPEG/PNG files lose the whole decode batch.
    """
    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file (0 bytes)"
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(0, size - 64))
            tail = f.read()
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if head[:3] == b"\xff\xd8\xff":
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head == b"\x89PNG\r\n\x1a\n":
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    if Path(path).suffix.lower() in (".jpg", ".jpeg", ".png"):
        return f"not a {Path(path).suffix.lower()[1:].upper()} file (bad signature {head[:4]!r})"
    return None


def _decoded_shape(path: str, exif: bool = True) -> tuple[int, int, int] | str:
    """``(height, width, source channels)`` as DALI will decode it (EXIF orientation applied when
    ``exif``), or the reason it is unusable."""
    reason = screen_file(path)
    if reason is not None:
        return reason
    try:
        with Image.open(path) as im:
            w, h = im.size
            channels = len(im.getbands())
            if exif and im.format in ("JPEG", "TIFF", "WEBP") and im.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED:
                h, w = w, h
    except PermissionError as e:
        return f"not readable ({e.strerror}); fix its permissions"
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad headers
        return f"cannot read image header: {e}"
    return h, w, channels


def _expand(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Folder (recursive), glob pattern or explicit list → sorted list of candidate paths."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if os.path.isdir(text):
            found = [
                os.path.join(root, name)
                for root, _, names in os.walk(text, followlinks=True)
                for name in names
                if name.lower().endswith(IMAGE_SUFFIXES)
            ]
            if not found:
                msg = f"no images in folder {text!r} (searched recursively for {', '.join(IMAGE_SUFFIXES)})"
                raise ValueError(msg)
            return sorted(found)
        if glob.has_magic(text):
            found = sorted(p for p in glob.glob(text, recursive=True) if os.path.isfile(p))
            if not found:
                msg = f"glob {text!r} matched no files; check the pattern (use '**' with recursive folders)"
                raise ValueError(msg)
            return found
        if os.path.isfile(text):
            return [text]
        msg = f"{text!r} does not exist; pass an existing folder, a glob such as 'data/**/*.jpg', or a list of files"
        raise FileNotFoundError(msg)
    paths = [os.fspath(p) for p in source]
    if not paths:
        msg = "the file list is empty; pass at least one image path"
        raise ValueError(msg)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        msg = f"{len(missing)} listed file(s) do not exist, e.g. {missing[:3]}; fix the list or remove them"
        raise FileNotFoundError(msg)
    return paths


@dataclass(frozen=True)
class Catalog:
    """The images to sample from, in index order, with their decoded sizes.

    Attributes:
        files: paths; ``batch.source`` indexes this list.
        heights, widths: ``(N,) int64`` size in pixels as decoded (EXIF orientation applied unless
            scanned with ``exif=False``) and, with ``pad=True``, raised to ``min_size``: the size an
            image takes in the cache.
        channels: ``(N,) int64`` channel count stored in the file (the decoder converts to the
            sampler's ``channels``).
        skipped: ``(path, reason)`` of every file left out.
        padded: how many images are smaller than ``min_size`` and will be zero-padded.
    """

    files: tuple[str, ...]
    heights: np.ndarray
    widths: np.ndarray
    channels: np.ndarray
    skipped: tuple[tuple[str, str], ...]
    padded: int = 0

    def __len__(self) -> int:
        return len(self.files)

    def image_bytes(self, pixel_bytes: int = 3) -> np.ndarray:
        """``(N,) int64`` bytes of each image decoded at ``pixel_bytes`` per pixel (3: RGB uint8)."""
        return self.heights * self.widths * pixel_bytes

    @classmethod
    def scan(
        cls,
        source: str | os.PathLike | Iterable[str | os.PathLike],
        min_size: tuple[int, int] = (1, 1),
        progress: bool | None = None,
        workers: int = 8,
        exif: bool = True,
        pad: bool = False,
    ) -> Catalog:
        """Build a catalog, skipping (and reporting) bad files and images smaller than ``min_size``.

        Args:
            source: a folder (searched recursively for JPEG, PNG, TIFF, WebP, BMP), a glob, one file,
                or a list of files.
            min_size: ``(height, width)`` an image must reach, usually the patch size.
            progress: show a progress bar; ``None`` shows one for large data sets only.
            workers: threads reading headers (I/O bound).
            exif: report sizes with EXIF orientation applied (as the decoder will, by default).
            pad: keep images smaller than ``min_size`` (they will be zero-padded at the bottom and
                right up to it) instead of skipping them.

        Raises:
            FileNotFoundError: a path does not exist.
            ValueError: nothing usable is left; the message says why and what to change.
        """
        paths = _expand(source if isinstance(source, (str, os.PathLike)) else list(source))
        show = len(paths) >= _PROGRESS_MIN_FILES if progress is None else progress
        bomb_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # sizes only: a 20k × 20k scan is legitimate data, not a bomb
        try:
            with ThreadPoolExecutor(max(1, workers)) as pool:
                results = list(
                    tqdm(pool.map(lambda p: _decoded_shape(p, exif), paths, chunksize=64), total=len(paths),
                         desc="scanning headers", unit="file", disable=not show)
                )
        finally:
            Image.MAX_IMAGE_PIXELS = bomb_limit
        keep, skipped, sizes = [], [], []
        too_small = padded = 0
        largest = (0, 0)
        for path, result in zip(paths, results):
            if isinstance(result, str):
                skipped.append((path, result))
                continue
            h, w, c = result
            largest = max(largest, (h, w), key=lambda s: s[0] * s[1])
            if (h < min_size[0] or w < min_size[1]) and pad:
                h, w, padded = max(h, min_size[0]), max(w, min_size[1]), padded + 1
            elif h < min_size[0] or w < min_size[1]:
                skipped.append((path, f"{h}x{w} is smaller than the patch {min_size[0]}x{min_size[1]}"))
                too_small += 1
                continue
            keep.append(path)
            sizes.append((h, w, c))
        if not keep:
            if too_small:
                msg = (
                    f"patch_size={min_size} exceeds every image (largest is {largest[0]}x{largest[1]}); "
                    "lower patch_size or pass pad=True"
                )
            else:
                msg = f"none of the {len(paths)} file(s) is a readable image, e.g. {skipped[0][0]!r}: {skipped[0][1]}"
            raise ValueError(msg)
        if skipped:
            examples = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
            warnings.warn(
                f"skipped {len(skipped)} of {len(paths)} files ({too_small} smaller than the patch"
                f"{'; pad=True keeps those' if too_small else ''}), e.g. {examples}. Catalog.skipped lists them all.",
                CatalogWarning,
                stacklevel=2,
            )
        arr = np.asarray(sizes, dtype=np.int64).reshape(-1, 3)
        log.info("catalog: %d images, %d skipped", len(keep), len(skipped))
        return cls(tuple(keep), arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy(), tuple(skipped), padded)
