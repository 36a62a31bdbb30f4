"""Verify: decode every JPEG once, before sampling, to find those whose data libjpeg only warns about;
decode every image once to find those without a single informative patch (``anchors="content"``).

A JPEG whose entropy-coded data is damaged (a truncated body with an end marker appended, a few bad
bytes) decodes without an error: libjpeg fills the rest with grey and prints a warning to the
process's stderr, naming no file. ``PatchSampler(verify=True)`` and ``inspect --verify`` decode each
file alone with file descriptor 2 captured, so each warning is tied to its file.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections.abc import Sequence

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from tqdm.auto import tqdm

from ..catalog.catalog import Catalog, CatalogWarning
from ..catalog.screen import ALPHA_MODES
from ..sources.base import Problem, Source, user_stacklevel
from .backend import HostArray, resolve_backend
from .content import map_geometry
from .decode import error_cause
from .decoders import decode_files
from .measure import Threshold, map_args, map_twin, passing_anchors

__all__ = ["content_share", "find_corrupt", "find_flat", "without_corrupt"]


_LIBJPEG_WARNING = "Corrupt JPEG data"


def find_corrupt(source: Source, paths: Sequence[str], num_threads: int = 1, progress: bool = False) -> dict[str, Problem]:
    """Decode every JPEG of ``paths`` once with DALI's CPU decoder and return those whose data is
    corrupt: libjpeg decodes them without an error (grey or garbled rows, e.g. a truncated body with
    an end marker appended) and only prints a warning to the process's stderr, naming no file. Each
    file's decode runs with file descriptor 2 captured, so the warning is tied to its file and not
    shown. A full decode of the data set: opt-in (``PatchSampler(verify=True)``, ``inspect --verify``).
    Other threads' stderr output during the pass is captured too (and dropped). ``source``: where
    the locations live."""
    jpegs = [p for p in paths if p.lower().endswith((".jpg", ".jpeg"))]
    found: dict[str, Problem] = {}
    if not jpegs:
        return found

    reader = source.reader(range(len(jpegs)), [jpegs], shuffle=False)

    @pipeline_def(batch_size=1, num_threads=num_threads, device_id=None, prefetch_queue_depth=1,
                  enable_checkpointing=reader.checkpointing)
    def one_by_one():  # a DALI graph
        (encoded,), _ = reader.nodes()
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    with reader.building():
        pipe = one_by_one()
        pipe.build()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as captured, tqdm(jpegs, desc="verifying JPEG data", unit="file",
                                                        disable=not progress, leave=False) as bar:
            for path in bar:
                sys.stderr.flush()
                captured.seek(0)
                captured.truncate()
                os.dup2(captured.fileno(), 2)
                try:
                    pipe.run()
                    error = ""
                except RuntimeError as e:
                    error = error_cause(e)
                finally:
                    os.dup2(saved, 2)
                captured.seek(0)
                warned = [ln for ln in captured.read().decode(errors="replace").splitlines() if _LIBJPEG_WARNING in ln]
                if error:  # the next run() goes on with the next file
                    found[path] = Problem(f"the decoder rejects it ({error})", "corrupt data")
                elif warned:
                    found[path] = Problem(f"libjpeg: {warned[0].strip()}; part of its pixels would be grey", "corrupt data")
    finally:
        os.close(saved)
    return found


def without_corrupt(catalog: Catalog, num_threads: int = 1, progress: bool = False) -> Catalog:
    """``verify=True``: ``catalog`` without the JPEGs whose data is corrupt (:func:`find_corrupt`),
    each reported with a :class:`~dali_patches.catalog.catalog.CatalogWarning`.

    Raises:
        ValueError: every image is corrupt.
    """
    if catalog.source is None:
        msg = "this catalog was built without its source; scan it with Catalog.scan"
        raise ValueError(msg)
    corrupt = find_corrupt(catalog.source, catalog.files, num_threads, progress)
    if not corrupt:
        return catalog
    example = next(iter(corrupt.items()))
    if len(corrupt) == len(catalog.files):
        msg = f"every image of the source has corrupt data, e.g. {example[0]}: {example[1]}"
        raise ValueError(msg)
    warnings.warn(f"skipped {len(corrupt)} JPEG(s) with corrupt data, e.g. {example[0]}: {example[1]}",
                  CatalogWarning, stacklevel=user_stacklevel())
    return catalog.without(corrupt)


def content_share(image: HostArray, alpha: HostArray | None, patch_size: tuple[int, int], step: int,
                  threshold: Threshold) -> float:
    """The share of an image's map cells that look informative (the map as the cache computes it,
    on the host), or, where the map finds none, ``1e-9`` if the exhaustive scan finds one patch that
    passes and 0 if none does (such an image would be set aside). ``image``: ``(H, W, C)``;
    ``alpha``: its ``(H, W, 1)`` alpha or ``None``."""
    h, w = image.shape[:2]
    g = map_geometry(patch_size, h, w)
    arena = np.concatenate([image.reshape(-1).view(np.uint8), *([] if alpha is None else [alpha.reshape(-1).view(np.uint8)])])
    flags = np.zeros(g["cells_h"] * g["cells_w"], np.uint8)
    map_twin(arena, *map_args(0, -1 if alpha is None else image.nbytes, w, image.shape[2], image.dtype.itemsize, g,
                              threshold), flags)  # type: ignore[call-arg]
    if flags.any():
        return float(flags.mean())
    return 1e-9 if len(passing_anchors(image, alpha, patch_size, step, threshold, 1)) else 0.0


def find_flat(catalog: Catalog, patch_size: tuple[int, int], min_std: float, min_opaque: float = 0.9,
              channels: int = 3, dtype: str = "uint8", num_threads: int = 1, progress: bool = False,
              step: int = 1) -> tuple[dict[str, str], list[float]]:
    """Decode every image of ``catalog`` once (on the CPU, as the sampler decodes it, with its alpha
    where it has one) and judge it as ``anchors="content"`` would when it enters the cache.

    Returns:
        ``(flat, shares)``: the images with no ``patch_size`` patch of a luminance std of at least
        ``min_std`` (and ``min_opaque`` of it opaque), each with why — the sampler would set them
        aside — and each image's share of map cells that look informative
        (:func:`content_share`). Images smaller than the patch (in a
        catalog scanned with ``pad=True``) are padded as the cache pads them; anchors are multiples
        of ``step`` (the sampler's ``anchor_step``).
    """
    if catalog.source is None:
        msg = "this catalog was built without its source; scan it with Catalog.scan"
        raise ValueError(msg)
    threshold = Threshold(min_std, min_opaque, 2 if dtype == "uint16" else 1)
    alpha = np.isin(np.asarray(catalog.modes), ALPHA_MODES) if len(catalog.modes) else np.zeros(len(catalog.files), bool)
    flat: dict[str, str] = {}
    shares: list[float] = []
    decoded = decode_files(catalog.source, [list(catalog.files)], resolve_backend("cpu"), num_threads, batch_size=2,
                           parts=[(channels, dtype)], alpha=bool(alpha.any()))
    for path, parts in tqdm(zip(catalog.files, decoded), total=len(catalog.files), desc="judging content", unit="img",
                            disable=not progress, leave=False):
        image = np.asarray(parts[0])
        transparency = np.asarray(parts[1]) if len(parts) > 1 and parts[1].shape[:2] == image.shape[:2] else None
        grow = ((0, max(0, patch_size[0] - image.shape[0])), (0, max(0, patch_size[1] - image.shape[1])), (0, 0))
        image = np.pad(image, grow)
        if transparency is not None:  # padding is opaque, as the cache pads alpha
            transparency = np.pad(transparency, grow, constant_values=np.iinfo(transparency.dtype).max)
        share = content_share(image, transparency, patch_size, step, threshold)
        shares.append(share)
        if share == 0:
            flat[path] = f"no {patch_size[0]}x{patch_size[1]} patch has {threshold.describe(transparency is not None)}"
    return flat, shares
