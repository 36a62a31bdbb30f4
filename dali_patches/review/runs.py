"""Review a run from its provenance log: which images and which regions the model actually saw.

    >>> from dali_patches import review
    >>> run = review.load("run.prov")
    >>> review.coverage(run)["patches_per_image_cv"]
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..engine.provenance import _BIG, MAGIC, RECORD

__all__ = ["Provenance", "coverage", "heat_map", "load"]


@dataclass(frozen=True)
class Provenance:
    """A provenance log in memory.

    Attributes:
        files: paths; ``source`` indexes them.
        heights, widths: ``(N,) int64`` image sizes as cached; ``patch_size``: ``(P_h, P_w)``.
        batch, source: ``(M,) int64`` per recorded patch; ``anchor``: ``(M, 2) int64`` ``(y, x)``.
        header: everything else the sampler wrote (settings, and ``root``: the folder its images
            lie under).
    """

    files: tuple[str, ...]
    heights: np.ndarray
    widths: np.ndarray
    patch_size: tuple[int, int]
    batch: np.ndarray
    source: np.ndarray
    anchor: np.ndarray
    header: dict[str, Any]

    @property
    def root(self) -> str:
        """The folder (or ``s3://`` prefix) the run's images lie under: as the sampler recorded it,
        else the common folder of the files."""
        recorded = self.header.get("root")
        if isinstance(recorded, str) and recorded:
            return recorded
        try:
            return os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in self.files]) if self.files else ""
        except ValueError:
            return ""

    def patches_per_image(self) -> np.ndarray:
        """``(N,) int64`` patches taken from each image."""
        return np.bincount(self.source, minlength=len(self.files))


def _bad(path: str, what: str) -> ValueError:
    return ValueError(f"{path!r} is not a usable provenance log: {what}; was it written by "
                      "PatchSampler(provenance=...) and left whole?")


def _header(path: str, raw: bytes) -> dict[str, Any]:
    """The log's JSON header, every field the review reads checked by name."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "its header is not a JSON object")
    files, heights, widths = header.get("files"), header.get("heights"), header.get("widths")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise _bad(path, "'files' is not a list of paths")
    for name, values in (("heights", heights), ("widths", widths)):
        if not isinstance(values, list) or len(values) != len(files) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**31 for v in values):
            raise _bad(path, f"{name!r} is not one positive size per file")
    size = header.get("patch_size")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and 0 < v < 2**31 for v in size)):
        raise _bad(path, f"'patch_size' is {size!r}, not [height, width]")
    if header.get("record", "int16") not in ("int16", "int32"):
        raise _bad(path, f"'record' is {header.get('record')!r}")
    for name in ("root", "settings"):
        if name in header and not isinstance(header[name], (str, dict)):
            raise _bad(path, f"{name!r} is {type(header[name]).__name__}")
    return header


def load(path: str | os.PathLike) -> Provenance:
    """Read a log written by ``PatchSampler(..., provenance=path)``; a run cut short (a partial last
    record) loads up to its last whole record.

    Raises:
        ValueError: the file is not such a log, or is damaged or crafted: a header that does not fit
            the file, fields of the wrong type, records naming images or positions the log does not
            have (the message says which).
    """
    name = os.fspath(path)
    if not stat.S_ISREG(os.stat(name).st_mode):  # a FIFO would block the open below forever
        raise _bad(name, "it is not a regular file")
    with open(name, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(len(MAGIC)) != MAGIC:
            msg = f"{name!r} is not a dali_patches provenance log (bad magic)"
            raise ValueError(msg)
        length = int.from_bytes(f.read(8), "little")
        if length > size - len(MAGIC) - 8:
            raise _bad(name, f"its header claims {length:,} bytes but the file holds {size:,}")
        header = _header(name, f.read(length))
        record = _BIG if header.get("record") == "int32" else RECORD
        data = f.read()
    rows = np.frombuffer(data[: len(data) // record.itemsize * record.itemsize], record)
    heights, widths = np.asarray(header.pop("heights"), np.int64), np.asarray(header.pop("widths"), np.int64)
    patch_size = tuple(header.pop("patch_size"))
    source, batch = rows["source"].astype(np.int64), rows["batch"].astype(np.int64)
    anchor = np.stack([rows["y"], rows["x"]], axis=1).astype(np.int64)
    if len(rows):
        wrong = (source < 0) | (source >= len(heights)) | (batch < 0)
        inside = np.clip(source, 0, max(0, len(heights) - 1))
        if len(heights):
            wrong |= (anchor[:, 0] < 0) | (anchor[:, 1] < 0) | (anchor[:, 0] > heights[inside] - patch_size[0]) \
                | (anchor[:, 1] > widths[inside] - patch_size[1])
        if wrong.any():
            first = int(np.flatnonzero(wrong)[0])
            raise _bad(name, f"{int(wrong.sum()):,} record(s) name an image or a position the log does not have "
                             f"(record {first}: batch {batch[first]}, source {source[first]}, anchor "
                             f"{tuple(anchor[first])})")
    return Provenance(tuple(header.pop("files")), heights, widths, patch_size, batch, source, anchor, header)


def coverage(run: Provenance, bins: int = 4) -> dict[str, Any]:
    """Summary statistics of where patches came from.

    Returns:
        ``patches``, ``batches``, ``images``; ``patches_per_image_mean`` and ``_cv`` (std / mean:
        0 = every image equally often); ``never_sampled`` (images with no patch); and the anchors'
        uniformity inside their images: each anchor's position within its valid range, binned
        ``bins × bins``, tested against uniform — ``anchor_chi2``, its ``anchor_chi2_dof``
        (``bins² − 1``) and ``anchor_chi2_per_dof`` (≈ 1 for uniform anchors, ≫ 1 when weighted).
    """
    counts = run.patches_per_image()
    mean = float(counts.mean()) if len(counts) else 0.0
    span_y = run.heights[run.source] - run.patch_size[0] + 1
    span_x = run.widths[run.source] - run.patch_size[1] + 1
    cell_y = np.minimum(run.anchor[:, 0] * bins // np.maximum(span_y, 1), bins - 1)
    cell_x = np.minimum(run.anchor[:, 1] * bins // np.maximum(span_x, 1), bins - 1)
    observed = np.bincount(cell_y * bins + cell_x, minlength=bins * bins).astype(np.float64)
    expected = len(run.source) / bins**2
    chi2 = float(((observed - expected) ** 2 / expected).sum()) if len(run.source) else 0.0
    return {"patches": len(run.source), "batches": len(np.unique(run.batch)), "images": len(run.files),
            "patches_per_image_mean": mean,
            "patches_per_image_cv": float(counts.std() / mean) if mean else 0.0,
            "never_sampled": int((counts == 0).sum()),
            "anchor_chi2": chi2, "anchor_chi2_dof": bins * bins - 1,
            "anchor_chi2_per_dof": chi2 / (bins * bins - 1)}


def heat_map(run: Provenance, image: int, cell: int = 1) -> np.ndarray:
    """How many recorded patches covered each pixel of image ``image`` (an index into ``run.files``).

    Args:
        cell: pixels per side of a heat-map cell; ``cell > 1`` shrinks the map for large images
            (a 20k × 20k tile at ``cell=32`` is 625 × 625), counting a patch in every cell it touches.

    Returns:
        ``(ceil(H / cell), ceil(W / cell)) int32``; at ``cell=1`` it sums to patches × patch area.
    """
    if cell < 1:
        msg = f"{cell=} must be >= 1 (pixels per heat-map cell)"
        raise ValueError(msg)
    if not 0 <= image < len(run.files):
        msg = f"{image=} is not an image index of this log (0..{len(run.files) - 1})"
        raise ValueError(msg)
    rows, cols = -(-int(run.heights[image]) // cell), -(-int(run.widths[image]) // cell)
    y, x = run.anchor[run.source == image].T
    top, left = y // cell, x // cell
    bottom, right = (y + run.patch_size[0] - 1) // cell + 1, (x + run.patch_size[1] - 1) // cell + 1
    corners = np.zeros((rows + 1, cols + 1), np.int32)  # 2-D difference array: ±1 at each footprint's corners
    for ys, xs, sign in ((top, left, 1), (top, right, -1), (bottom, left, -1), (bottom, right, 1)):
        np.add.at(corners, (np.minimum(ys, rows), np.minimum(xs, cols)), sign)
    return corners.cumsum(0).cumsum(1)[:rows, :cols].astype(np.int32)
