"""The command line's one set of defaults, fitted to the data and the machine.

Every command that builds a sampler (``bench``, ``preview``, ``coverage``, and ``inspect`` for its
memory figure) starts from the same patch, batch, reuse and cache. Two of them cannot be fixed
numbers: a batch takes that many distinct resident images, so it must stay well below the data set
(at most half of it), and a cache must hold a batch of the largest images, keep replacing images
(with a fixed reuse, a cache that holds the whole data set discards every decode) and fit in the
free memory. :func:`fit` works both out from the scanned images (each one's decoded bytes) and the
free memory; flags the user gave are never changed, and what was adapted is said on stderr in one
line. The timed commands sample for :data:`SECONDS` after the warm-up (``coverage``: or until
:data:`COVERAGE_PATCHES`), so that they end in well under a minute on 4K photos with two cores.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import SamplerConfig, format_bytes, parse_bytes
from ..engine.plan import cached_parts, ring_bytes_for
from ..options import Reuse

if TYPE_CHECKING:
    from ..catalog.catalog import Catalog

__all__ = ["BATCH", "CACHE_BOUND", "COVERAGE_PATCHES", "DATA_SHARE", "Fit", "MEMORY_SHARE", "PATCH", "REUSE", "SECONDS",
           "fit", "fit_args", "scan", "stream_config"]

PATCH = 64  # pixels, square
BATCH = 64  # patches per batch, each from a distinct image: at most half the usable images
REUSE = 32  # patches per decoded image: a fixed figure, so a rate or a coverage map is measured at one reuse
SECONDS = 20.0  # timed sampling after the warm-up (bench; coverage unless --patches is given)
COVERAGE_PATCHES = 10_000  # coverage: at most this many patches within SECONDS
CACHE_BOUND = 2 * 2**30  # the default cache holds DATA_SHARE of the data set up to this, and a batch of the largest beyond
DATA_SHARE = 0.75  # of the data set's decoded bytes the default cache holds: images keep being replaced
MEMORY_SHARE = 0.5  # of the free memory (after DALI's decode queue) the default cache may take
_AHEAD_BATCHES = 5  # decode batches of images held outside the cache: DALI's queue (3) and the feeder's (2)


@dataclass(frozen=True)
class Fit:
    """A batch and a cache for one data set on one machine, and why, for the one-line note.

    Attributes:
        batch: patches per batch.
        cache_bytes: the decoded-image cache.
        notes: one phrase per default adapted (empty when both were given).
    """

    batch: int
    cache_bytes: int
    notes: tuple[str, ...]


def fit(sample_bytes: np.ndarray, free_bytes: int, decode_batch: int, batch: int | None = None,
        cache_bytes: int | None = None, allow_repeats: bool = False, auto_reuse: bool = False, shards: int = 1,
        device: str = "cpu") -> Fit:
    """The batch and cache for images of ``sample_bytes`` each (companions included) on a device
    with ``free_bytes``; ``batch`` or ``cache_bytes`` given are kept as they are.

    * batch: :data:`BATCH`, but no more than half the shard's images (a batch takes distinct
      resident images, and the cache must still replace images: see the cache) unless
      ``allow_repeats``, nor more of the largest images than the cache holds with its slack (the
      given cache, or the budget: half the free memory left after ``5 × decode_batch`` typical
      images, DALI's decode queue and the images decoded ahead of the cache).
    * cache: :data:`DATA_SHARE` of the data set decoded (all of it with ``auto_reuse``), up to
      :data:`CACHE_BOUND`; never less than a batch of the largest images with the ring's slack
      (``allow_repeats``: one largest image and the slack), and within the budget as long as that
      fits. Less than the whole data set, because a cache that holds all of it discards every
      decode after the warm-up while a fixed ``reuse`` still waits for them (the sampler warns).
    """
    sizes = np.sort(np.asarray(sample_bytes, dtype=np.int64))[::-1]
    images = max(1, len(sizes) // max(1, shards))
    budget = int(MEMORY_SHARE * (free_bytes - _AHEAD_BATCHES * decode_batch * float(sizes.mean())))

    def needed(b: int) -> int:  # the ring's own rule: b distinct images (one with repeats) and its slack
        return ring_bytes_for(sizes, 1 if allow_repeats else b)

    notes = []
    if batch is None:
        most = BATCH if allow_repeats else max(1, min(BATCH, images // 2))
        room, why = (cache_bytes, f"--cache {format_bytes(cache_bytes)}") if cache_bytes is not None else \
            (budget, f"half the free {device} memory")
        batch = most
        while batch > 1 and needed(batch) > room:
            batch -= 1
        if batch < most:
            notes.append(f"--batch {batch} (as many of the largest images as {why} holds, with slack)")
        elif batch < BATCH:
            of = " of this shard" if shards > 1 else ""
            which = f"half the {images} usable images{of}" if images > 1 else f"the one usable image{of}"
            notes.append(f"--batch {batch} ({which}: a batch takes distinct ones)")
    if cache_bytes is None:
        target = min(ring_bytes_for(sizes, len(sizes)) if auto_reuse else int(DATA_SHARE * sizes.sum()), CACHE_BOUND)
        cache_bytes = max(target, needed(batch))
        if cache_bytes > budget >= needed(batch):
            cache_bytes = budget
        least = "one of the largest images" if allow_repeats else f"--batch {batch} of the largest images"
        what = (f"{least} with slack" if cache_bytes == needed(batch) else
                f"half the free {device} memory" if cache_bytes == budget else
                f"{'all' if auto_reuse else f'{DATA_SHARE:.0%}'} of the data set decoded" if cache_bytes < CACHE_BOUND
                else "the default bound")
        notes.append(f"--cache {format_bytes(cache_bytes)} ({what})")
    return Fit(batch, cache_bytes, tuple(notes))


def content_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--anchors``, ``--min-std`` and ``--min-opaque`` as sampler options (the bounds only with
    ``--anchors content``)."""
    anchors = getattr(args, "anchors", "uniform")
    bounds = {name: getattr(args, name) for name in ("min_std", "min_opaque") if getattr(args, name, None) is not None}
    if bounds and anchors != "content":
        msg = f"--min-std and --min-opaque bound --anchors content; add --anchors content or leave them out (got {bounds})"
        raise ValueError(msg)
    return {"anchors": anchors, **bounds} if anchors == "content" else {}


def stream_config(args: argparse.Namespace, companions: Any = ()) -> SamplerConfig:
    """The flags as a :class:`SamplerConfig` (every value checked before a file is read); a batch
    and a cache left to the defaults stand in as :data:`BATCH` and one byte."""
    options = {"min_reuse": args.min_reuse} if args.min_reuse is not None else {}
    if args.max_reuse is not None:
        options["max_reuse"] = args.max_reuse
    if options and args.reuse != "auto":
        msg = f"--min-reuse and --max-reuse bound --reuse auto; with a fixed --reuse {args.reuse} leave them out"
        raise ValueError(msg)
    return SamplerConfig(patch_size=args.patch, batch_size=args.batch or BATCH, reuse=args.reuse,
                         cache_bytes=args.cache or 1, device=args.device, seed=args.seed, allow_repeats=args.allow_repeats,
                         decode_batch=args.decode_batch, num_threads=args.num_threads, channels=args.channels,
                         dtype=args.dtype, pad=args.pad, companions=companions, **options, **content_options(args))


def scan(source: Any, config: SamplerConfig, args: argparse.Namespace, check: bool = True,
         progress: bool | None = None) -> Catalog:
    """The usable images of ``source`` as the sampler will see them (same patch, padding, EXIF);
    with ``check`` it raises when none is usable, and leaves the warnings about skipped files to
    the sampler's own scan. ``progress``: ``None`` shows a bar for large data sets only."""
    from ..catalog.catalog import Catalog, CatalogWarning

    index = False if args.index == "off" else args.index
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CatalogWarning)
        return Catalog.scan(source, min_size=config.patch_size, progress=False if args.no_progress else progress,
                            exif=config.exif_orientation, pad=config.pad, check=check, index=index,
                            trust_index=args.trust_index)


def fit_args(args: argparse.Namespace, catalog: Catalog, config: SamplerConfig) -> None:
    """Set ``args.batch`` and ``args.cache`` that were left to the defaults (``None``) for
    ``catalog`` on the flags' device, and say on stderr what was chosen and why."""
    if args.batch is not None and args.cache is not None:
        return
    from ..engine.backend import resolve_backend

    backend = resolve_backend(config.device, config.device_id or 0, from_local_rank=True)
    sizes = catalog.sample_bytes(cached_parts(config, catalog.modes)[0])
    resolved = config.resolved(backend.device, int(sizes.max()))  # the decode batch the sampler will use
    given = parse_bytes(args.cache, "cache_bytes") if args.cache is not None else None
    chosen = fit(sizes, backend.free_bytes(), resolved.decode_batch or 1, args.batch,
                 given, config.allow_repeats, config.reuse is Reuse.AUTO, config.num_shards or 1, backend.device.value)
    args.batch, args.cache = chosen.batch, args.cache if given is not None else chosen.cache_bytes
    if chosen.notes:
        sys.stderr.write(f"dali-patches: defaults fitted to these {len(catalog):,} images: {', '.join(chosen.notes)}\n")
