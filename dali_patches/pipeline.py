"""PatchSampler: the user-facing sampler, and the DALI sample pipeline fed from it.

Construction scans the catalog, plans and checks the cache (before allocating anything), and builds
the decode pipeline. The producer thread starts on first use. Batches come out either as plain arrays
(iterate the sampler) or through :meth:`PatchSampler.pipeline`, a DALI pipeline whose
``external_source`` hands over finished batches, for DALI's framework plugins.
"""

from __future__ import annotations

import hashlib
import logging
import os
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from .augment import augment_outputs, output_dtype
from .backend import resolve_backend
from .cache import images_held
from .catalog import Catalog
from .config import Device, SamplerConfig, default_decode_batch, format_bytes
from .decode import DALI_DTYPES
from .options import AnchorMode, Companion, Layout, scaled
from .producer import PatchBatch, Producer
from .provenance import ProvenanceWriter
from .sources import declared_companions

__all__ = ["OUTPUT_NAMES", "PatchSampler"]

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("patches", "source", "anchor")  # without companions; see PatchSampler.output_names
_STATE_FORMAT = 1


def _close(producer: Producer, provenance: ProvenanceWriter | None) -> None:
    producer.close()
    if provenance is not None:
        provenance.close()


def _points_by_source(points: Iterable[tuple[Any, int, int]], files: Sequence[str], heights: Any,
                      widths: Any) -> dict[int, np.ndarray]:
    """``(file, y, x)`` centres → source index → ``(K, 2)`` array; every point checked."""
    index = {os.path.abspath(f): i for i, f in enumerate(files)}
    found: dict[int, list[tuple[int, int]]] = {}
    for n, (file, y, x) in enumerate(points):
        source = index.get(os.path.abspath(os.fspath(file)))
        if source is None:
            msg = f"points[{n}]: {os.fspath(file)!r} is not among the sampler's images (skipped, or not in the source)"
            raise ValueError(msg)
        if not (0 <= y < heights[source] and 0 <= x < widths[source]):
            msg = (f"points[{n}]: ({y}, {x}) lies outside {os.fspath(file)!r} "
                   f"({heights[source]}x{widths[source]}); points are (row, column) patch centres")
            raise ValueError(msg)
        found.setdefault(source, []).append((int(y), int(x)))
    if not found:
        msg = "points is empty; give (file, y, x) patch centres, or leave points=None for uniform anchors"
        raise ValueError(msg)
    return {s: np.asarray(v, dtype=np.int64) for s, v in found.items()}


class PatchSampler:
    """Random patches from a bounded cache of decoded images, ``batch_size`` distinct images a batch.

    Args:
        source: a folder (searched recursively), a glob, or a list of image paths.
        patch_size: int or ``(height, width)`` in pixels.
        batch_size: patches per batch; each from a different image unless ``allow_repeats``.
        reuse: mean patches served per decoded image (throughput ≈ ``reuse × decode rate``).
        cache_bytes: arena size (int bytes or ``"2GiB"``); or give ``cache_images`` instead.
        cache_images: size the arena to hold this many of the largest images.
        device: ``"auto"``, ``"gpu"`` or ``"cpu"``.
        seed: seeds everything random; same seed + files + device + shard → same stream.
        progress: show progress bars for the header scan and the cache warm-up; ``None`` shows them
            only for long work (≥ 2000 files to scan, ≥ 500 images to warm up).
        companions: options of the companions a dict ``source`` names (name → :class:`Companion`,
            or a dict such as ``{"scale": 2}`` / ``{"kind": "mask"}``); for tuple rows, their names
            in order. Each is cut at the same anchor and is its own output.
        points: ``(file, y, x)`` patch centres; patches are centred on them (uniformly among an
            image's points), and only images with points are sampled.
        provenance: a file to record every delivered patch's ``(batch, source, y, x)`` in (16
            bytes per patch, appended per batch); read it with :func:`dali_patches.review.load`.
        **options: the rest of :class:`SamplerConfig` (``augment``, ``anchors``, ``anchor_mask``,
            ``pos_fraction``, ``image_choice``, ``allow_repeats``, ``decode_batch``, ``num_threads``,
            ``queue_depth``, ``channels``, ``dtype``, ``pad``, ``device_id``, ``shard_id``, ``num_shards``).

    Raises:
        ValueError: bad parameters, no usable images, or a cache too small for ``batch_size``
            distinct images (the message gives the size needed).
        FileNotFoundError: ``source`` does not exist.

    Example:
        >>> sampler = PatchSampler("data/train", patch_size=64, batch_size=256, reuse=32, cache_bytes="2GiB")
        >>> batch = next(iter(sampler))
        >>> batch.patches.shape
        (256, 64, 64, 3)
    """

    def __init__(
        self,
        source: str | os.PathLike | Iterable[str | os.PathLike],
        patch_size: int | tuple[int, int],
        batch_size: int,
        reuse: float,
        cache_bytes: int | str | None = None,
        *,
        cache_images: int | None = None,
        device: Device | str = Device.AUTO,
        seed: int = 0,
        progress: bool | None = None,
        companions: Mapping[str, Any] | Sequence[Companion] | None = None,
        points: Iterable[tuple[Any, int, int]] | None = None,
        provenance: str | os.PathLike | None = None,
        **options: Any,
    ) -> None:
        unknown = set(options) - set(SamplerConfig.__dataclass_fields__) | ({"companions"} & set(options))
        if unknown:
            msg = f"unknown option(s) {sorted(unknown)}; valid: {sorted(SamplerConfig.__dataclass_fields__)}"
            raise TypeError(msg)
        if points is not None:
            options["anchors"] = AnchorMode.POINTS
        self.config = SamplerConfig(patch_size=patch_size, batch_size=batch_size, reuse=reuse,
                                    cache_bytes=cache_bytes, cache_images=cache_images, device=device,
                                    seed=seed, companions=declared_companions(source, companions), **options)
        if self.config.anchors is AnchorMode.POINTS and points is None:
            msg = "anchors='points' needs points=[(file, y, x), ...]"
            raise ValueError(msg)
        self.backend = resolve_backend(self.config.device, self.config.device_id)
        self.catalog = Catalog.scan(source, min_size=self.config.patch_size, progress=progress,
                                    exif=self.config.exif_orientation, pad=self.config.pad,
                                    companions=self.config.companions)
        self._points, self._points_sha = None, None
        if points is not None:
            points = list(points)
            self._points = _points_by_source(points, self.catalog.files, self.catalog.heights, self.catalog.widths)
            self.catalog = self.catalog.subset(sorted(self._points))
            self._points = dict(enumerate(self._points[s] for s in sorted(self._points)))
            self._points_sha = hashlib.sha256(repr(sorted(map(repr, points))).encode()).hexdigest()
        self.cache_bytes, max_slots, warmup_estimate = self._plan_cache()
        columns = [list(self.catalog.files), *(list(self.catalog.companions[c.name]) for c in self.config.companions)]
        self._producer = Producer(columns, self.config, self.backend, self.cache_bytes, max_slots, warmup_estimate,
                                  progress=progress, points=self._points)
        self._pipelines: list[Any] = []
        # A sampler dropped without close() still stops its thread (the producer does not refer back).
        self._provenance = None
        if provenance is not None:
            cat = self.catalog
            self._provenance = ProvenanceWriter(provenance, {
                "files": list(cat.files), "heights": cat.heights.tolist(), "widths": cat.widths.tolist(),
                "patch_size": list(self.config.patch_size), "settings": self._fingerprint()})
        self._finalizer = weakref.finalize(self, _close, self._producer, self._provenance)

    # -- planning ----------------------------------------------------------------------------
    def _plan_cache(self) -> tuple[int, int, int]:
        """Arena bytes, slot-table size and expected warm-up images; fails early if too small."""
        cfg = self.config
        sizes = np.sort(self.catalog.sample_bytes(cfg.parts))[::-1]  # largest first, companions included
        largest = int(sizes[0])
        shard_images = len(sizes) // cfg.num_shards
        # A ring holds n images for sure when it fits the n largest, plus one largest image of slack
        # at the wrap and one for the image being written.
        slack = 2 * largest
        if cfg.cache_images is not None:
            cache_bytes = int(sizes[: cfg.cache_images].sum()) + slack
        else:
            cache_bytes = int(cfg.cache_bytes)
        if not cfg.allow_repeats:
            if shard_images < cfg.batch_size:
                msg = (f"batch_size={cfg.batch_size} distinct images are needed per batch but this shard has "
                       f"only {shard_images} images; lower batch_size or pass allow_repeats=True")
                raise ValueError(msg)
            needed = int(sizes[: cfg.batch_size].sum()) + slack
            if cache_bytes < needed:
                msg = (f"cache_bytes={format_bytes(cache_bytes)} cannot hold batch_size={cfg.batch_size} distinct "
                       f"images of this data set (largest {format_bytes(largest)} each); it needs at least "
                       f"{format_bytes(needed)} ({needed} bytes). Raise cache_bytes, lower batch_size, "
                       "or pass allow_repeats=True")
                raise ValueError(msg)
        elif cache_bytes < largest:
            msg = (f"cache_bytes={format_bytes(cache_bytes)} cannot hold even the largest image "
                   f"({format_bytes(largest)}); raise cache_bytes to at least {largest}")
            raise ValueError(msg)
        free = self.backend.free_bytes()
        if cache_bytes > free:
            msg = (f"cache_bytes={format_bytes(cache_bytes)} exceeds the free {self.backend.device.value} "
                   f"memory ({format_bytes(free)}); lower cache_bytes")
            raise ValueError(msg)
        max_slots = cache_bytes // int(sizes[-1]) + 1
        return cache_bytes, int(max_slots), images_held(sizes, cache_bytes)[1]

    # -- data --------------------------------------------------------------------------------
    @property
    def files(self) -> tuple[str, ...]:
        """The catalog's paths; ``batch.source`` indexes this tuple."""
        return self.catalog.files

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the batch outputs, in the pipeline's order: ``patches``, each companion,
        ``source``, ``anchor``."""
        return ("patches", *(c.name for c in self.config.companions), "source", "anchor")

    @property
    def max_memory(self) -> int:
        """Bytes this sampler will hold on its device: the arena plus DALI's decode queue
        (``decode_batch × 3`` of the largest images with companions), plus ``queue_depth + 2``
        output batches."""
        decode_batch = self.config.decode_batch or default_decode_batch(self.backend)
        largest = int(self.catalog.sample_bytes(self.config.parts).max())
        batches = (self.config.queue_depth + 2) * self.config.batch_size * self.config.patch_bytes
        return self.cache_bytes + 3 * decode_batch * largest + batches

    def __iter__(self) -> PatchSampler:
        return self

    def __next__(self) -> PatchBatch:
        batch = self._producer.get()
        if self._provenance is not None:
            self._provenance.write(batch.index, batch.source, batch.anchor)
        return batch

    def stats(self) -> dict[str, Any]:
        """Counters: ``images_decoded``, ``patches_served``, ``batches_served``, ``resident_images``,
        ``cache_bytes``, ``cache_bytes_used``, ``mean_reuse`` (patches served per decoded image, warm-up
        included), ``patches_per_residence`` (patches per cached copy over completed residences),
        ``duplicate_decodes`` (fresh decodes of still-resident images, not inserted twice),
        ``distinct_fraction`` (batches whose sources are all distinct), ``reader_epochs``,
        ``skipped_files``, decode failures, ``anchor_fallbacks`` (weighted draws that fell back: see
        :mod:`dali_patches.anchors`)."""
        return {**self._producer.stats(), "files": len(self.files), "skipped_files": len(self.catalog.skipped),
                "device": self.backend.device.value}

    # -- resumable state ---------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        cfg = self.config
        paths = hashlib.sha256("\n".join(self.files).encode()).hexdigest()
        return {"files": len(self.files), "files_sha256": paths, "patch_size": list(cfg.patch_size),
                "batch_size": cfg.batch_size, "reuse": cfg.reuse, "seed": cfg.seed, "cache_bytes": self.cache_bytes,
                "device": self.backend.device.value, "shard_id": cfg.shard_id, "num_shards": cfg.num_shards,
                "decode_batch": cfg.decode_batch or default_decode_batch(self.backend),
                "allow_repeats": cfg.allow_repeats, "channels": cfg.channels, "dtype": cfg.dtype,
                "exif_orientation": cfg.exif_orientation, "pad": cfg.pad,
                "companions": [[c.name, str(c.scale), c.kind.value, c.channels, c.dtype] for c in cfg.companions],
                "companion_files_sha256": hashlib.sha256(repr(self.catalog.companions).encode()).hexdigest(),
                "anchors": cfg.anchors.value, "anchor_mask": cfg.anchor_mask, "pos_fraction": cfg.pos_fraction,
                "image_choice": cfg.image_choice.value, "points_sha256": self._points_sha}

    def state_dict(self, in_flight: int = 0) -> dict[str, Any]:
        """Where the stream stands, as plain Python values (``torch.save``/JSON-able, a few KiB):
        the reader's position (a DALI checkpoint), the sampler's RNG, the refill credit, and which
        images the cache holds where. A new sampler with the same files and settings continues the
        same ``(source, anchor)`` stream after :meth:`load_state_dict`.

        The state is taken after the last batch handed out by ``next(sampler)`` or a pipeline's
        ``external_source``; ``in_flight`` batches handed out but not yet consumed (DALI's
        prefetch queue) are excluded. :class:`~dali_patches.torch.PatchIterator` counts them for you.
        """
        index = self._producer.last_delivered - in_flight
        return {"format": _STATE_FORMAT, "fingerprint": self._fingerprint(),
                "stream": self._producer.state_after(index)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a sampler over the same files with the same settings.
        Call before the first batch; re-decodes the images the cache held (a warm-up's worth)."""
        if state.get("format") != _STATE_FORMAT:
            msg = (f"state format {state.get('format')!r} is not {_STATE_FORMAT}; "
                   "was it made by PatchSampler.state_dict()?")
            raise ValueError(msg)
        mine = self._fingerprint()
        diff = {k: (v, mine.get(k)) for k, v in state["fingerprint"].items() if mine.get(k) != v}
        if diff:
            listed = ", ".join(f"{k}: saved {saved!r}, now {now!r}" for k, (saved, now) in diff.items())
            msg = f"this state belongs to a different sampler ({listed}); create the sampler with the saved settings"
            raise ValueError(msg)
        if state["stream"] is not None:
            self._producer.restore(state["stream"])

    # -- DALI: the pieces of the sample pipeline, for pipeline(), dali_patches.tf and your own ---------
    def next_outputs(self) -> tuple[Any, ...]:
        """The next batch as a tuple ordered as :attr:`output_names`: patches and companions on the
        sampler's device, ``source`` ``(B,) int64`` and ``anchor`` ``(B, 2) int32`` on the host; a
        ``source=`` for ``fn.external_source(..., batch=True, **external_source_args())``."""
        batch = next(self)
        return (batch.patches, *(batch.companions[c.name] for c in self.config.companions), batch.source,
                batch.anchor)

    def augment_nodes(self, inputs: Sequence[Any]) -> tuple[Any, ...]:
        """Inside a DALI graph: the sampler's ``augment`` ops applied to DALI nodes ordered as
        :attr:`output_names` (one random draw per patch, shared by its companions); ``source`` and
        ``anchor`` pass through. Without ``augment`` it returns the nodes as they are."""
        parts = self.config.parts
        return (*augment_outputs(inputs[:len(parts)], parts, self.config.augment), *inputs[len(parts):])

    def output_dtypes(self) -> tuple[str, ...]:
        """NumPy dtype names of the pipeline outputs, ordered as :attr:`output_names`."""
        return (*(output_dtype(p, self.config.augment) for p in self.config.parts), "int64", "int32")

    def output_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-sample shapes of the pipeline outputs, ordered as :attr:`output_names`."""
        shapes = []
        for part in self.config.parts:
            h, w = (scaled(p, part.scale) for p in self.config.patch_size)
            chw = self.config.augment.layout is Layout.CHW
            shapes.append((part.channels, h, w) if chw else (h, w, part.channels))
        return (*shapes, (), (2,))

    def external_source_args(self) -> dict[str, list[Any]]:
        """``dtype``, ``layout`` and ``ndim`` lists (one entry per :attr:`output_names`) for
        ``fn.external_source`` fed by :meth:`next_outputs`."""
        parts = self.config.parts
        return {"dtype": [*(DALI_DTYPES[p.dtype] for p in parts), types.INT64, types.INT32],
                "layout": [*("HWC" for _ in parts), "", ""], "ndim": [*(3 for _ in parts), 0, 1]}

    def pipeline(self, prefetch_queue_depth: int = 2, num_threads: int = 1, **kwargs: Any) -> Any:
        """A built DALI pipeline with one output per :attr:`output_names` entry: ``patches``
        (``HWC`` of the sampler's ``dtype``, or as ``augment`` makes them), each companion's patches,
        ``source`` (int64 scalar) and ``anchor`` (``(2,)`` int32) per sample, on this sampler's
        device, for ``DALIGenericIterator(pipe, list(sampler.output_names), size=-1)`` and friends.

        Its ``external_source`` only takes finished batches from the producer thread; ``augment``
        runs as DALI ops after it. Every pipeline and ``next(sampler)`` draw from the same stream.
        ``num_threads`` are DALI's CPU worker threads for this pipeline: 1 suffices on the GPU; on
        the CPU, raise it when augmenting.
        """

        fed = [0]  # batches this pipeline's external_source has taken (see PatchIterator.state_dict)

        def feed() -> tuple[Any, ...]:
            fed[0] += 1
            return self.next_outputs()

        @pipeline_def(batch_size=self.config.batch_size, num_threads=num_threads,
                      device_id=self.backend.dali_device_id, prefetch_queue_depth=prefetch_queue_depth,
                      seed=self.config.seed, **kwargs)
        def sample_pipeline():  # a DALI graph
            inputs = fn.external_source(source=feed, num_outputs=len(self.output_names), batch=True,
                                        device=self.backend.op_device, **self.external_source_args())
            return self.augment_nodes(inputs)

        pipe = sample_pipeline()
        pipe.batches_fed = fed
        pipe.build()
        self._pipelines.append(pipe)
        return pipe

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the producer thread and release the DALI pipelines and the arena. Idempotent."""
        self._finalizer()
        self._pipelines.clear()

    def __enter__(self) -> PatchSampler:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.config
        return (f"PatchSampler({len(self.files)} images, patch_size={c.patch_size}, batch_size={c.batch_size}, "
                f"reuse={c.reuse}, cache={format_bytes(self.cache_bytes)}, device={self.backend.device.value!r})")
