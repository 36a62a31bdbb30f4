"""Catalog: a folder, glob or file list → the indexed, screened list of images to sample from.

Only headers are read (Pillow opens lazily), so a catalog of 100k files costs seconds, not a decode
pass. Files that would break DALI's reader for good (zero-byte, truncated, not an image) or that are
smaller than the patch are screened out here and reported, before any training starts.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .options import Companion, CompanionKind, Part, scaled
from .sources import IMAGE_SUFFIXES, Problem, distinct_files, pair_sources

__all__ = ["Catalog", "CatalogWarning", "IMAGE_SUFFIXES", "screen_file"]

log = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap height and width (DALI applies them)
_PROGRESS_MIN_FILES = 2000  # below this a header scan takes well under a second: no bar


class CatalogWarning(UserWarning):
    """Some files were skipped; ``Catalog.skipped`` lists each with its reason."""


def screen_file(path: str) -> Problem | None:
    """Cheap structural check (a few reads per file) that catches files which would break DALI's reader.

    Returns ``None`` for a plausible image, else the reason. Zero-byte files make DALI's file reader
    fail for good; truncated JPEG/PNG files lose the whole decode batch.
    """
    try:
        size = os.path.getsize(path)
        if size == 0:
            return Problem("empty file (0 bytes)", "empty")
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(0, size - 64))
            tail = f.read()
    except OSError as e:
        return Problem(f"unreadable: {e.strerror or e}", "unreadable")
    if head[:3] == b"\xff\xd8\xff":
        return None if b"\xff\xd9" in tail else Problem("truncated JPEG (no end-of-image marker)", "truncated")
    if head == b"\x89PNG\r\n\x1a\n":
        return None if b"IEND" in tail else Problem("truncated PNG (no IEND chunk)", "truncated")
    if Path(path).suffix.lower() in (".jpg", ".jpeg", ".png"):
        return Problem(f"not a {Path(path).suffix.lower()[1:].upper()} file (bad signature {head[:4]!r})", "not an image")
    return None


def _decoded_shape(path: str, exif: bool = True) -> tuple[int, int, int, str, str] | Problem:
    """``(height, width, source channels, Pillow mode, format)`` as DALI will decode it (EXIF
    orientation applied when ``exif``; format e.g. ``"JPEG"``, ``"JPEG progressive"``, ``"PNG"``), or
    the reason it is unusable."""
    reason = screen_file(path)
    if reason is not None:
        return reason
    try:
        with Image.open(path) as im:
            w, h = im.size
            channels, mode = len(im.getbands()), im.mode
            fmt = f"{im.format} progressive" if im.info.get("progressive") else str(im.format)
            if exif and im.format in ("JPEG", "TIFF", "WEBP") and im.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSED:
                h, w = w, h
    except PermissionError as e:
        return Problem(f"not readable ({e.strerror}); fix its permissions", "unreadable")
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad headers
        return Problem(f"cannot read image header: {e}", "not an image")
    return h, w, channels, mode, fmt


def _companion_problem(part: Companion, shape: tuple[int, int, int, str, str] | Problem,
                       main: tuple[int, int]) -> Problem | None:
    """Why a companion file cannot go with an image of decoded size ``main``, or ``None``."""
    if isinstance(shape, str):
        return shape
    h, w, _, mode, _ = shape
    want = (main[0] * part.scale, main[1] * part.scale)
    if (h, w) != want:
        exact = "" if all(v.denominator == 1 for v in want) else f" (the image's size is not divisible by {part.scale.denominator})"
        return Problem(f"{part.name!r} is {h}x{w} but must be {part.scale}× its image's {main[0]}x{main[1]}"
                       f" = {float(want[0]):g}x{float(want[1]):g}{exact}", "size mismatch")
    if part.kind is CompanionKind.MASK and mode == "P":
        return Problem(f"{part.name!r} is a palette PNG: the decoder would turn its colour indices into grey "
                       "levels; save the label values as a single-channel ('L') PNG", "palette mask")
    return None


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
        skipped: ``(path, reason)`` of every file left out, companions and unpaired files included.
        padded: how many images are smaller than ``min_size`` and will be zero-padded.
        companions: companion name → ``(N,)`` paths aligned with ``files``.
        formats, modes: ``(N,)`` file format (``"JPEG"``, ``"JPEG progressive"``, ``"PNG"``, …) and
            Pillow mode (``"RGB"``, ``"L"``, ``"RGBA"``, ``"I;16"``, …) of each image.
    """

    files: tuple[str, ...]
    heights: np.ndarray
    widths: np.ndarray
    channels: np.ndarray
    skipped: tuple[tuple[str, str], ...]
    padded: int = 0
    companions: dict[str, tuple[str, ...]] = field(default_factory=dict)
    formats: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.files)

    def image_bytes(self, pixel_bytes: int = 3) -> np.ndarray:
        """``(N,) int64`` bytes of each image decoded at ``pixel_bytes`` per pixel (3: RGB uint8)."""
        return self.heights * self.widths * pixel_bytes

    def subset(self, indices: Sequence[int]) -> Catalog:
        """A catalog of the images at ``indices`` (in that order), with their companions."""
        idx = np.asarray(indices, dtype=np.int64)

        def take(values: tuple[str, ...]) -> tuple[str, ...]:  # () stays () (a catalog built without them)
            return tuple(values[i] for i in idx.tolist()) if values else ()

        named = {name: take(paths) for name, paths in self.companions.items()}
        return Catalog(take(self.files), self.heights[idx], self.widths[idx], self.channels[idx], self.skipped,
                       self.padded, named, take(self.formats), take(self.modes))

    def without(self, problems: dict[str, Problem]) -> Catalog:
        """This catalog without the images named in ``problems`` (path → why), which join
        :attr:`skipped`."""
        keep = [i for i, f in enumerate(self.files) if f not in problems]
        subset = self.subset(keep)
        return replace(subset, skipped=(*subset.skipped, *problems.items()))

    def sample_bytes(self, parts: Sequence[Part]) -> np.ndarray:
        """``(N,) int64`` cache bytes of each image with its companions (``SamplerConfig.parts``)."""
        return sum(scaled(self.heights, p.scale) * scaled(self.widths, p.scale) * p.pixel_bytes for p in parts)

    def summary(self) -> dict[str, Any]:
        """What the catalog holds, for people and machines (``dali-patches inspect``).

        Returns:
            ``images`` (usable) and ``skipped`` counts; ``formats``, ``modes`` and ``channels``:
            images per value; ``megapixels``: ``min``/``median``/``max``/``total``; ``sizes``:
            smallest and largest ``"HxW"``; ``problems``: skipped files per kind
            (:class:`~dali_patches.sources.Problem`); ``companions``: name → images paired with one;
            ``padded``.
        """
        mp = self.heights * self.widths / 1e6
        order = np.argsort(mp, kind="stable")

        def hw(i: int) -> str:
            return f"{self.heights[i]}x{self.widths[i]}"

        return {
            "images": len(self), "skipped": len(self.skipped),
            "formats": dict(Counter(self.formats).most_common()), "modes": dict(Counter(self.modes).most_common()),
            "channels": {int(c): int(n) for c, n in zip(*np.unique(self.channels, return_counts=True))},
            "megapixels": ({"min": float(mp.min()), "median": float(np.median(mp)), "max": float(mp.max()),
                            "total": float(mp.sum())} if len(self) else {}),
            "sizes": {"smallest": hw(order[0]), "largest": hw(order[-1])} if len(self) else {},
            "problems": dict(Counter(getattr(r, "kind", "other") for _, r in self.skipped).most_common()),
            "companions": {name: len(paths) for name, paths in self.companions.items()},
            "padded": self.padded,
        }

    @classmethod
    def scan(
        cls,
        source: Any,
        min_size: tuple[int, int] = (1, 1),
        progress: bool | None = None,
        workers: int = 8,
        exif: bool = True,
        pad: bool = False,
        companions: Sequence[Companion] = (),
        check: bool = True,
    ) -> Catalog:
        """Build a catalog, skipping (and reporting) bad files, unpaired or misfit companions, and
        images smaller than ``min_size``.

        Args:
            source: a folder (searched recursively for JPEG, PNG, TIFF, WebP, BMP), a glob, one file,
                a list of files, or, with ``companions``, a dict or list naming them
                (see :mod:`dali_patches.sources`).
            min_size: ``(height, width)`` an image must reach, usually the patch size.
            progress: show a progress bar; ``None`` shows one for large data sets only.
            workers: threads reading headers (I/O bound).
            exif: report sizes with EXIF orientation applied (as the decoder will, by default).
            pad: keep images smaller than ``min_size`` (they will be zero-padded at the bottom and
                right up to it) instead of skipping them.
            companions: resolved :class:`Companion` of each partner (``SamplerConfig.companions``);
                each partner must be exactly ``scale`` × its image's size.
            check: raise when nothing is usable and warn about skipped files; ``False`` returns
                whatever is usable, possibly nothing (for reports such as ``dali-patches inspect``).

        Raises:
            FileNotFoundError: a path does not exist.
            ValueError: nothing usable is left; the message says why and what to change.
        """
        if isinstance(source, Iterator):  # a generator of paths: read it once
            source = list(source)
        rows, skipped = pair_sources(source, [c.name for c in companions])
        distinct, merged = distinct_files(rows)
        rows = [tuple(row) for row in distinct]
        skipped += merged
        paths = [p for row in rows for p in row]
        show = len(paths) >= _PROGRESS_MIN_FILES if progress is None else progress
        bomb_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # sizes only: a 20k × 20k scan is legitimate data, not a bomb
        try:
            with ThreadPoolExecutor(max(1, workers)) as pool:
                shapes = dict(zip(paths, tqdm(pool.map(lambda p: _decoded_shape(p, exif), paths, chunksize=64),
                                              total=len(paths), desc="scanning headers", unit="file",
                                              disable=not show)))
        finally:
            Image.MAX_IMAGE_PIXELS = bomb_limit
        keep, sizes, formats, modes = [], [], [], []
        too_small = padded = 0
        largest = (0, 0)
        for row in rows:
            path, result = row[0], shapes[row[0]]
            if isinstance(result, str):
                skipped.append((path, result))
                continue
            h, w, c, mode, fmt = result
            problems = [(p, Problem(f"{why} (image {path!r})", why.kind)) for part, p in zip(companions, row[1:])
                        if (why := _companion_problem(part, shapes[p], (h, w)))]
            if problems:
                skipped += problems
                continue
            largest = max(largest, (h, w), key=lambda s: s[0] * s[1])
            if (h < min_size[0] or w < min_size[1]) and pad:
                h, w, padded = max(h, min_size[0]), max(w, min_size[1]), padded + 1
            elif h < min_size[0] or w < min_size[1]:
                skipped.append((path, Problem(f"{h}x{w} is smaller than the patch {min_size[0]}x{min_size[1]}",
                                              "too small")))
                too_small += 1
                continue
            keep.append(row)
            sizes.append((h, w, c))
            formats.append(fmt)
            modes.append(mode)
        if not keep and check:
            if too_small:
                msg = (
                    f"patch_size={min_size} exceeds every image (largest is {largest[0]}x{largest[1]}); "
                    "lower patch_size or pass pad=True"
                )
            else:
                with_them = " with its companions" if companions else ""
                msg = f"none of the {len(rows)} file(s) is a usable image{with_them}, e.g. {skipped[0][0]!r}: {skipped[0][1]}"
            raise ValueError(msg)
        if skipped and check:
            examples = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
            warnings.warn(
                f"skipped {len(skipped)} of {len(paths) + len(merged)} files ({too_small} smaller than the patch"
                f"{'; pad=True keeps those' if too_small else ''}"
                f"{f'; {len(merged)} duplicates of other files merged' if merged else ''}), "
                f"e.g. {examples}. Catalog.skipped lists them all.",
                CatalogWarning,
                stacklevel=2,
            )
        arr = np.asarray(sizes, dtype=np.int64).reshape(-1, 3)
        log.info("catalog: %d images, %d skipped", len(keep), len(skipped))
        named = {c.name: tuple(row[i + 1] for row in keep) for i, c in enumerate(companions)}
        return cls(tuple(row[0] for row in keep), arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy(),
                   tuple(skipped), padded, named, tuple(formats), tuple(modes))
