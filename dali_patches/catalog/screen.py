"""Screening: which listed items a catalog keeps, and why each other one is left out.

Files that would break DALI's reader for good (zero-byte, truncated, not an image), the same file
listed twice or reached through links, companions that do not fit their image (size, palette
masks) and images smaller than the patch are left out here, before any training starts, each with
a :class:`~dali_patches.sources.base.Problem` that names the fix; a warning says how many.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..options import Companion, CompanionKind
from ..sources.base import Problem, user_stacklevel
from ..sources.columns import Columns

__all__ = ["ALPHA_MODES", "CatalogWarning", "screen"]

log = logging.getLogger(__name__)

_ALPHA_MODES = (b"RGBA", b"LA", b"PA", b"La", b"RGBa")  # Pillow modes with an alpha channel
ALPHA_MODES = ("RGBA",)  # those whose alpha the decoder reads (anchors="content"; DALI reads no LA or PA alpha)


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



def screen(columns: Sequence[Sequence[str]], cols: Columns, skipped: list[tuple[str, str]],
           min_size: tuple[int, int], exif: bool, pad: bool, companions: Sequence[Companion],
           check: bool) -> dict[str, Any]:
    """The usable items of ``columns`` (images, then each companion's locations) from their scanned
    header columns (the images' rows first, then each companion's, in the same order): the
    fields of a :class:`~dali_patches.catalog.catalog.Catalog` (all but ``root``, ``scan_report``
    and ``source``). What is left out joins ``skipped``, each with its reason.

    Raises:
        ValueError: with ``check``, nothing is usable (the message says why and what to change).
    """
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
                      f"{cols.mode[alpha[0]].decode()}): patches carry no alpha, so their transparent areas show "
                      "the colour stored under them (often flat black or white); anchors='content' keeps patches "
                      "out of the transparent areas of RGBA images (convert LA/PA images to RGBA)",
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
    return {"files": kept(images), "heights": np.maximum(h[keep], min_size[0]) if pad else h[keep],
            "widths": np.maximum(w[keep], min_size[1]) if pad else w[keep],
            "channels": cols.channels[keep].astype(np.int64), "skipped": tuple(skipped), "padded": padded,
            "companions": named, "formats": labels(cols.format), "modes": labels(cols.mode),
            "file_bytes": cols.size[keep].copy(), "stamps": cols.stamp[keep].copy()}
