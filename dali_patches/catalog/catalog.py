"""Catalog: a folder, glob, file list or ``s3://`` prefix → the indexed, screened list of images.

Only headers are read (:mod:`dali_patches.sources.headers`: a few positioned reads a file, Pillow only for
what it does not parse), in worker processes for large data sets, and kept in a persistent index
(:mod:`dali_patches.catalog.index`) so that the next start only re-stats. Files that would break DALI's
reader for good (zero-byte, truncated, not an image), duplicates of other files and images smaller
than the patch are screened out here and reported, before any training starts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..config import format_bytes
from ..options import Companion, Part
from ..sources import open_source
from ..sources.base import IMAGE_SUFFIXES, Problem, Source, user_stacklevel
from .index import distrust, index_path, load_index
from .lookup import lookup
from .screen import CatalogWarning, screen

__all__ = ["Catalog", "CatalogWarning", "IMAGE_SUFFIXES"]

log = logging.getLogger(__name__)

_PROGRESS_MIN_FILES = 2000  # below this a header scan takes well under a second: no bar
_OBJECT_THREADS = 32  # concurrent ranged GETs for object headers (network-bound)


def _nameable(columns: list[list[str]]) -> tuple[list[list[str]], list[tuple[str, Problem]], list[int] | None]:
    """The rows whose every location DALI's reader and a log can take (valid UTF-8: a name made of
    other bytes comes through Python as an undecodable string), the others (each named by its
    ``repr``), and the rows kept (``None``: all)."""
    try:
        for column in columns:
            "\0".join(column).encode("utf-8")
        return columns, [], None
    except UnicodeEncodeError:
        pass
    bad = set()
    for column in columns:
        for i, path in enumerate(column):
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:
                bad.add(i)
    keep = [i for i in range(len(columns[0])) if i not in bad]
    skipped = [(columns[0][i], Problem(f"its name is not valid UTF-8 ({columns[0][i]!r} has bytes of another encoding); "
                                       "DALI's reader cannot open it: rename it", "unusable name")) for i in sorted(bad)]
    return [[column[i] for i in keep] for column in columns], skipped, keep


def _joined_keys(paths: Sequence[str], root: str) -> str:
    """Every path relative to ``root``, NUL-separated (for millions of paths under it, a few string
    operations over one string)."""
    prefix = root if root.endswith("/") else root + "/"
    joined = "\0".join(paths)
    if paths and joined.startswith(prefix) and joined.count("\0" + prefix) == len(paths) - 1:
        return joined[len(prefix):].replace("\0" + prefix, "\0")
    n = len(prefix)
    return "\0".join(p[n:] if p.startswith(prefix) else os.path.relpath(os.path.abspath(p), os.path.abspath(root))
                     for p in paths)


def relative_keys(paths: Sequence[str], root: str) -> list[str]:
    """Each path relative to ``root``."""
    return _joined_keys(paths, root).split("\0") if paths else []


@dataclass(frozen=True)
class Catalog:
    """The images to sample from, in index order, with their decoded sizes.

    Attributes:
        files: locations (paths, ``s3://`` URIs, ``shard.tar#member``); ``batch.source`` indexes this list.
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
        file_bytes, stamps: ``(N,) int64`` size of each file and its modification time in ns (an
            object's ETag digest): what identifies this version of the data set.
        root: the folder (or ``s3://`` prefix) all files lie under.
        scan_report: how the headers were found: ``files``, ``from_index`` (unchanged since the
            index was written), ``read_here``, ``read_by_peers`` (other local ranks), ``index`` (its
            path, or ``None``) and ``seconds``.
        source: the :class:`~dali_patches.sources.base.Source` the files came from (it feeds the decoder).
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
    file_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    stamps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    root: str = ""
    scan_report: dict[str, Any] = field(default_factory=dict, compare=False)
    source: Source | None = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices: Sequence[int]) -> Catalog:
        """A catalog of the images at ``indices`` (in that order), with their companions."""
        idx = np.asarray(indices, dtype=np.int64)

        def take(values: tuple[str, ...]) -> tuple[str, ...]:  # () stays () (a catalog built without them)
            return tuple(values[i] for i in idx.tolist()) if values else ()

        named = {name: take(paths) for name, paths in self.companions.items()}
        return Catalog(take(self.files), self.heights[idx], self.widths[idx], self.channels[idx], self.skipped,
                       self.padded, named, take(self.formats), take(self.modes), self.file_bytes[idx],
                       self.stamps[idx], self.root, self.scan_report, self.source)

    def without(self, problems: dict[str, Problem]) -> Catalog:
        """This catalog without the images named in ``problems`` (path → why), which join
        :attr:`skipped`."""
        keep = [i for i, f in enumerate(self.files) if f not in problems]
        subset = self.subset(keep)
        return replace(subset, skipped=(*subset.skipped, *problems.items()))

    def with_points(self, points: Iterable[tuple[Any, int, int]]) -> tuple[Catalog, dict[int, np.ndarray]]:
        """The images that have points, and their points: ``(location, y, x)`` patch centres (a
        local path may be spelled another way: it is compared as an absolute path) → this catalog
        narrowed to those images and, per row of it, a ``(K, 2) int64`` array. Every point is checked.

        Raises:
            ValueError: a point names no image of the catalog or lies outside its image, or there
                are none (the message names the point).
        """
        index = {f: i for i, f in enumerate(self.files)}
        local = {os.path.abspath(f): i for i, f in enumerate(self.files) if "://" not in f and "#" not in f}
        found: dict[int, list[tuple[int, int]]] = {}
        for n, (file, y, x) in enumerate(points):
            name = os.fspath(file)
            row = index.get(name, local.get(os.path.abspath(name)))
            if row is None:
                msg = f"points[{n}]: {name!r} is not among the sampler's images (skipped, or not in the source)"
                raise ValueError(msg)
            if not (0 <= y < self.heights[row] and 0 <= x < self.widths[row]):
                msg = (f"points[{n}]: ({y}, {x}) lies outside {name!r} ({self.heights[row]}x{self.widths[row]}); "
                       "points are (row, column) patch centres")
                raise ValueError(msg)
            found.setdefault(row, []).append((int(y), int(x)))
        if not found:
            msg = "points is empty; give (file, y, x) patch centres, or leave points=None for uniform anchors"
            raise ValueError(msg)
        rows = sorted(found)
        return self.subset(rows), {k: np.asarray(found[row], np.int64) for k, row in enumerate(rows)}

    def fitting(self, parts: Sequence[Part], cache_bytes: int | None) -> Catalog:
        """This catalog without the images that could never enter a cache of ``cache_bytes`` (with
        their companions, ``parts``), each reported ``"too large"`` with a :class:`CatalogWarning`: a
        decompression bomb must not refuse a whole data set.

        Raises:
            ValueError: no image fits (the message gives the size needed).
        """
        sizes = self.sample_bytes(parts)
        if cache_bytes is None or not (sizes > cache_bytes).any():
            return self
        if (sizes > cache_bytes).all():
            msg = (f"cache_bytes={format_bytes(cache_bytes)} cannot hold any image of this data set (the smallest "
                   f"takes {format_bytes(int(sizes.min()))}); raise cache_bytes")
            raise ValueError(msg)
        large = {self.files[i]: Problem(f"{self.heights[i]}x{self.widths[i]} takes {format_bytes(int(sizes[i]))} decoded, "
                                        f"more than the whole cache ({format_bytes(cache_bytes)}); raise cache_bytes to "
                                        "sample it, or leave it out of the source", "too large")
                 for i in np.flatnonzero(sizes > cache_bytes)}
        example = next(iter(large.items()))
        warnings.warn(f"skipped {len(large)} image(s) larger than the cache, e.g. {example[0]}: {example[1]}",
                      CatalogWarning, stacklevel=user_stacklevel())
        return self.without(large)

    def distrust(self, paths: Sequence[str]) -> None:
        """Decoding found ``paths`` to differ from their index entries (another size than the header
        said): the next scan reads them again and corrects the index (see :func:`~dali_patches.catalog.index.distrust`)."""
        distrust(self.scan_report.get("index"), relative_keys(list(paths), self.root))

    def sample_bytes(self, parts: Sequence[Part]) -> np.ndarray:
        """``(N,) int64`` cache bytes of each image with its companions (``SamplerConfig.parts``)."""
        return sum(p.image_bytes(self.heights, self.widths) for p in parts)

    def summary(self) -> dict[str, Any]:
        """What the catalog holds, for people and machines (``dali-patches inspect``).

        Returns:
            ``images`` (usable) and ``skipped`` counts; ``formats``, ``modes`` and ``channels``:
            images per value; ``megapixels``: ``min``/``median``/``max``/``total``; ``sizes``:
            smallest and largest ``"HxW"``; ``problems``: skipped files per kind
            (:class:`~dali_patches.sources.files.Problem`); ``companions``: name → images paired with one;
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

    def digest(self) -> str:
        """A digest of this version of the data set that survives moving it: every file's path
        relative to :attr:`root`, its size and its stamp (whole seconds for files)."""
        stamps = self.stamps if self.root.startswith("s3://") else self.stamps // 1_000_000_000
        digest = hashlib.sha256(_joined_keys(self.files, self.root).encode())
        digest.update(self.file_bytes.astype("<i8").tobytes())
        digest.update(stamps.astype("<i8").tobytes())
        return digest.hexdigest()

    @classmethod
    def scan(
        cls,
        source: Any,
        min_size: tuple[int, int] = (1, 1),
        progress: bool | None = None,
        workers: int = 0,
        exif: bool = True,
        pad: bool = False,
        companions: Sequence[Companion] = (),
        check: bool = True,
        index: str | os.PathLike | bool | None = None,
        trust_index: bool = False,
    ) -> Catalog:
        """Build a catalog, skipping (and reporting) bad files, duplicates, unpaired or misfit
        companions, and images smaller than ``min_size``.

        Args:
            source: a folder (searched recursively for JPEG, PNG, TIFF, WebP, BMP), a glob, one file,
                a list of files, ``s3://bucket/prefix`` or a list of ``s3://`` URIs, or, with
                ``companions``, a dict or list naming them (see :mod:`dali_patches.sources.files`).
            min_size: ``(height, width)`` an image must reach, usually the patch size.
            progress: show a progress bar; ``None`` shows one for large data sets only.
            workers: processes reading headers of large local data sets (0: one per core).
            exif: report sizes with EXIF orientation applied (as the decoder will, by default).
            pad: keep images smaller than ``min_size`` (they will be zero-padded at the bottom and
                right up to it) instead of skipping them.
            companions: resolved :class:`Companion` of each partner (``SamplerConfig.companions``);
                each partner must be exactly ``scale`` × its image's size.
            check: raise when nothing is usable and warn about skipped files; ``False`` returns
                whatever is usable, possibly nothing (for reports such as ``dali-patches inspect``).
            index: the persistent header index: ``None`` keeps one under the user's cache folder
                for data sets of 1000 files or more, a path keeps it there, ``False`` keeps none.
            trust_index: take a folder's file list and headers from its index without listing or
                stat-ing (a read-only data set); files added since are not seen.

        Raises:
            FileNotFoundError: a path does not exist.
            ValueError: nothing usable is left; the message says why and what to change.
        """
        source = open_source(source, companions or None)
        loaded = None
        if trust_index and source.identity:  # a folder knows where it is before listing
            index_file = index_path(index if index is not None else True, source.identity, 0)
            loaded = load_index(index_file, source.identity) if index_file else None
            if loaded is None:
                log.info("trust_index: no index for %s yet; listing and scanning it", source.root)
        items = source.items(keys=loaded[0] if loaded is not None else None)
        columns, unnamed, kept = _nameable(items.columns)
        stamps = items.stamps
        if kept is not None and stamps is not None:  # the same rows of every part
            count = len(items.columns[0])
            stamps = stamps.take(np.concatenate([np.asarray(kept, np.int64) + k * count for k in range(len(columns))]))
        skipped: list[tuple[str, str]] = [*items.skipped, *unnamed]
        paths = [p for column in columns for p in column] if len(columns) > 1 else columns[0]
        if loaded is None:
            index_file = index_path(index, source.identity, len(paths))
        show = len(paths) >= _PROGRESS_MIN_FILES if progress is None else progress
        report: dict[str, Any] = {}
        cols = lookup(paths, relative_keys(paths, source.root), source.identity, index_file, trust_index,
                      read=lambda some, bar: source.read_headers(some, bar, workers),
                      stat=lambda some: source.stat(some, workers), stamps=stamps,
                      progress=bool(show), report=report, loaded=loaded)
        report["ignored"] = dict(items.ignored.most_common())
        report["ignored_examples"] = list(items.ignored_examples)
        if items.ignored and items.warn_ignored and check:
            warnings.warn(f"ignored {sum(items.ignored.values())} file(s) that are not images this sampler reads "
                          f"({', '.join(f'{k or chr(39) * 2} ×{v}' for k, v in items.ignored.most_common(6))}), e.g. "
                          f"{items.ignored_examples[0]!r}; it reads {', '.join(IMAGE_SUFFIXES)} (convert others, "
                          "e.g. SVG, to PNG to use them)", CatalogWarning, stacklevel=user_stacklevel())
        return cls(**screen(columns, cols, skipped, min_size, exif, pad, source.companions, check), root=source.root,
                   scan_report=report, source=source)
