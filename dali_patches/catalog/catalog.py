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
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..options import Companion, CompanionKind, Part, scaled
from ..sources import open_source
from ..sources.base import IMAGE_SUFFIXES, Problem, Source, user_stacklevel
from ..sources.columns import Columns
from .index import default_index_path, distrust, load_index
from .lookup import lookup

__all__ = ["Catalog", "CatalogWarning", "IMAGE_SUFFIXES"]

log = logging.getLogger(__name__)

_PROGRESS_MIN_FILES = 2000  # below this a header scan takes well under a second: no bar
_INDEX_MIN_FILES = 1000  # index=None keeps an index from this many files on (smaller scans are instant)
_OBJECT_THREADS = 32  # concurrent ranged GETs for object headers (network-bound)
_ALPHA_MODES = (b"RGBA", b"LA", b"PA", b"La", b"RGBa")  # Pillow modes with an alpha channel


class CatalogWarning(UserWarning):
    """Some files were skipped; ``Catalog.skipped`` lists each with its reason."""


def _companion_problem(part: Companion, found: Problem | tuple[int, int, str], main: tuple[int, int]) -> Problem | None:
    """Why a companion file (its problem, or decoded ``(height, width, mode)``) cannot go with an
    image of decoded size ``main``, or ``None``."""
    if isinstance(found, str):
        return found
    h, w, mode = found
    want = (main[0] * part.scale, main[1] * part.scale)
    if (h, w) != want:
        exact = "" if all(v.denominator == 1 for v in want) else f" (the image's size is not divisible by {part.scale.denominator})"
        return Problem(f"{part.name!r} is {h}x{w} but must be {part.scale}× its image's {main[0]}x{main[1]}"
                       f" = {float(want[0]):g}x{float(want[1]):g}{exact}", "size mismatch")
    if part.kind is CompanionKind.MASK and mode == "P":
        return Problem(f"{part.name!r} is a palette PNG: the decoder would turn its colour indices into grey "
                       "levels; save the label values as a single-channel ('L') PNG", "palette mask")
    return None


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


def _index_path(index: str | os.PathLike | bool | None, identity: str, count: int) -> str | None:
    if index is False or (index is None and count < _INDEX_MIN_FILES):
        return None
    if index is None or index is True:
        return default_index_path(identity)
    return os.fspath(index)


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

    def distrust(self, paths: Sequence[str]) -> None:
        """Decoding found ``paths`` to differ from their index entries (another size than the header
        said): the next scan reads them again and corrects the index (see :func:`~dali_patches.catalog.index.distrust`)."""
        distrust(self.scan_report.get("index"), relative_keys(list(paths), self.root))

    def sample_bytes(self, parts: Sequence[Part]) -> np.ndarray:
        """``(N,) int64`` cache bytes of each image with its companions (``SamplerConfig.parts``)."""
        return sum(scaled(self.heights, p.scale) * scaled(self.widths, p.scale) * p.pixel_bytes for p in parts)

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
            index_file = _index_path(index if index is not None else True, source.identity, 0)
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
            index_file = _index_path(index, source.identity, len(paths))
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
        catalog = cls._build(columns, cols, skipped, source.root, min_size, exif, pad, source.companions, check)
        return replace(catalog, scan_report=report, source=source)

    @classmethod
    def _build(cls, columns: Sequence[Sequence[str]], cols: Columns, skipped: list[tuple[str, str]], root: str,
               min_size: tuple[int, int], exif: bool, pad: bool, companions: Sequence[Companion],
               check: bool) -> Catalog:
        """The catalog of ``columns`` (images, then each companion's files) from their scanned
        header columns (the images' rows first, then each companion's, in the same order)."""
        images = columns[0]
        n = len(images)
        h_all, w_all = cols.height.astype(np.int64), cols.width.astype(np.int64)
        if exif:
            turn = cols.transposed
            h_all, w_all = np.where(turn, w_all, h_all), np.where(turn, h_all, w_all)
        usable = cols.problem[:n] == b""
        for i in np.flatnonzero(~usable).tolist():
            skipped.append((images[i], cols.problem_at(i) or Problem("unreadable", "unreadable")))
        # the same file listed twice (or a link to it): keep the first, report the rest
        linked = np.flatnonzero(usable & (cols.ino[:n] > 0))
        if len(linked):
            dev, ino = cols.dev[linked], cols.ino[linked]
            same_device = bool((dev == dev[0]).all())  # the usual case: one sort of inodes, not of pairs
            _, first, inverse = np.unique(ino if same_device else np.stack([dev, ino], 1), axis=None if same_device else 0,
                                          return_index=True, return_inverse=True)
            repeat = np.flatnonzero(first[inverse.ravel()] != np.arange(len(linked)))
            for j in repeat.tolist():
                earlier = images[int(linked[first[inverse.ravel()[j]]])]
                skipped.append((images[int(linked[j])], Problem(
                    f"the same file as {earlier!r} (listed twice, or a link to it); merged into one", "duplicate")))
            usable[linked[repeat]] = False
        merged = sum(1 for _, r in skipped if getattr(r, "kind", "") == "duplicate")
        for c, part in enumerate(companions):  # each partner must fit its image
            base = n * (c + 1)
            for i in np.flatnonzero(usable).tolist():
                j = base + i
                found = cols.problem_at(j) or (int(h_all[j]), int(w_all[j]), cols.mode[j].decode())
                why = _companion_problem(part, found, (int(h_all[i]), int(w_all[i])))
                if why is not None:
                    skipped.append((columns[c + 1][i], Problem(f"{why} (image {images[i]!r})", why.kind)))
                    usable[i] = False
        h, w = h_all[:n], w_all[:n]
        small = usable & ((h < min_size[0]) | (w < min_size[1]))
        largest = int(np.argmax(np.where(usable, h * w, -1))) if n else 0
        padded = int(small.sum()) if pad else 0
        too_small = 0 if pad else int(small.sum())
        if not pad:
            for i in np.flatnonzero(small).tolist():
                skipped.append((images[i], Problem(f"{h[i]}x{w[i]} is smaller than the patch {min_size[0]}x{min_size[1]}",
                                                    "too small")))
            usable &= ~small
        keep = np.flatnonzero(usable)
        if not len(keep) and check:
            if too_small:
                msg = (f"patch_size={min_size} exceeds every image (largest is {h[largest]}x{w[largest]}); "
                       "lower patch_size or pass pad=True")
            else:
                with_them = " with its companions" if companions else ""
                msg = f"none of the {n} file(s) is a usable image{with_them}, e.g. {skipped[0][0]!r}: {skipped[0][1]}"
            raise ValueError(msg)
        if skipped and check:
            examples = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
            warnings.warn(
                f"skipped {len(skipped)} of {len(cols.size)} files ({too_small} smaller than the patch"
                f"{'; pad=True keeps those' if too_small else ''}"
                f"{f'; {merged} duplicates of other files merged' if merged else ''}), "
                f"e.g. {examples}. Catalog.skipped lists them all.",
                CatalogWarning,
                stacklevel=user_stacklevel(),
            )
        alpha = [i for i in np.flatnonzero(usable).tolist() if cols.mode[i] in _ALPHA_MODES]
        if alpha and check:
            warnings.warn(f"{len(alpha)} image(s) have an alpha channel (e.g. {images[alpha[0]]!r}, "
                          f"{cols.mode[alpha[0]].decode()}): it is dropped when decoding, so their transparent "
                          "areas appear as the colour stored under them (often flat black or white)",
                          CatalogWarning, stacklevel=user_stacklevel())
        log.info("catalog: %d images, %d skipped", len(keep), len(skipped))

        def labels(column: np.ndarray) -> tuple[str, ...]:
            values = column[keep].tolist()
            text = {v: v.decode() for v in set(values)}  # a handful of distinct labels
            return tuple(map(text.__getitem__, values))

        listed = keep.tolist()

        def kept(paths: Sequence[str]) -> tuple[str, ...]:
            return tuple(paths) if len(listed) == n else tuple(map(paths.__getitem__, listed))

        named = {c.name: kept(columns[k + 1]) for k, c in enumerate(companions)}
        return cls(kept(images), np.maximum(h[keep], min_size[0]) if pad else h[keep],
                   np.maximum(w[keep], min_size[1]) if pad else w[keep], cols.channels[keep].astype(np.int64),
                   tuple(skipped), padded, named, labels(cols.format), labels(cols.mode), cols.size[keep].copy(),
                   cols.stamp[keep].copy(), root)
