"""PatchSampler: the user-facing sampler.

Construction resolves the config, scans the catalog, plans and checks the cache (before allocating
anything), and builds the decode pipeline. The producer thread starts on first use. Batches come out
as plain arrays (iterate the sampler), as torch tensors (:mod:`dali_patches.torch`), or through
:meth:`PatchSampler.pipeline`, a DALI pipeline whose ``external_source`` hands over finished batches,
for DALI's framework plugins.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .catalog.catalog import Catalog
from .config import Device, SamplerConfig, default_decode_batch, format_bytes
from .engine.backend import resolve_backend
from .engine.outputs import PatchBatch
from .engine.plan import cached_parts
from .engine.producer import Producer
from .engine.provenance import ProvenanceWriter
from .engine.verify import without_corrupt
from .export import pipeline as sample_pipeline
from .options import AnchorMode, Companion, Reuse
from .sources import open_source
from .sources.base import user_stacklevel
from .state import state_value

__all__ = ["OUTPUT_NAMES", "PatchSampler"]

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("patches", "source", "anchor")  # without companions; see PatchSampler.output_names
_STATE_FORMAT = 2


def _close(producer: Producer, provenance: ProvenanceWriter | None) -> None:
    producer.close()
    if provenance is not None:
        provenance.close()


class PatchSampler:
    """Random patches from a bounded cache of decoded images, ``batch_size`` distinct images a batch.

    Args:
        source: a folder (searched recursively), a glob, or a list of image paths.
        patch_size: int or ``(height, width)`` in pixels.
        batch_size: patches per batch; each from a different image unless ``allow_repeats``.
        reuse: mean patches served per decoded image (throughput ≈ ``reuse × decode rate``), or
            ``"auto"``: the decoder runs flat out, every image it finishes enters the cache, and the
            effective reuse is whatever your training speed over the decode speed gives, within
            ``min_reuse`` (below it the decoder pauses, default 1) and ``max_reuse`` (past it the
            trainer waits, default none). A fixed reuse gives a reproducible stream; ``"auto"``
            depends on timing (``state_dict()`` still resumes a valid stream, and the provenance
            log stays complete).
        cache_bytes: arena size (int bytes or ``"2GiB"``); or give ``cache_images`` instead.
        cache_images: size the arena to hold this many of the largest images.
        device: ``"auto"``, ``"gpu"`` or ``"cpu"``.
        seed: seeds everything random; same seed + files + device + shard → same stream.
        progress: show progress bars for the header scan and the cache warm-up (the first
            ``next()``); ``None`` shows them only for long work (≥ 2000 files to scan, a warm-up
            that lasts more than 2 s).
        companions: options of the companions a dict ``source`` names (name → :class:`Companion`,
            or a dict such as ``{"scale": 2}`` / ``{"kind": "mask"}``); for tuple rows, their names
            in order. Each is cut at the same anchor and is its own output.
        points: ``(file, y, x)`` patch centres; patches are centred on them (uniformly among an
            image's points), and only images with points are sampled.
        provenance: a file to record every delivered patch's ``(batch, source, y, x)`` in (16
            bytes per patch, appended per batch); read it with :func:`dali_patches.review.load`.
        verify: decode every JPEG once before sampling and leave out those whose data is corrupt
            (libjpeg decodes them to partly grey pixels, with a warning on stderr at every decode and
            no error). Costs one full decode of the data set; off by default.
        index: the catalog's persistent header index (see :mod:`dali_patches.catalog.index`): ``None``
            keeps one under the user's cache folder for 1000 files or more, a path keeps it there,
            ``False`` keeps none. A second start then only stats the files.
        trust_index: take a folder's file list and headers from its index without listing or
            stat-ing it (read-only data sets: files added or changed since are not seen).

    The producer works in rounds: it refills the cache, draws and cuts ``round_batches`` batches
    at once (``stats()["round_batches"]``, chosen from the batch size and the cache), which keeps the
    host's cost per batch small; every promise (distinct images, reuse, provenance, resumable state
    at any batch) holds per batch.
        **options: the rest of :class:`SamplerConfig` (``augment``, ``anchors``, ``anchor_mask``,
            ``pos_fraction``, ``min_std``, ``min_opaque``, ``image_choice``, ``min_reuse``, ``max_reuse``, ``allow_repeats``,
            ``decode_batch``, ``num_threads``,
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
        reuse: float | str,
        cache_bytes: int | str | None = None,
        *,
        cache_images: int | None = None,
        device: Device | str = Device.AUTO,
        seed: int = 0,
        progress: bool | None = None,
        companions: Mapping[str, Any] | Sequence[Companion] | None = None,
        points: Iterable[tuple[Any, int, int]] | None = None,
        provenance: str | os.PathLike | None = None,
        verify: bool = False,
        index: str | os.PathLike | bool | None = None,
        trust_index: bool = False,
        **options: Any,
    ) -> None:
        unknown = set(options) - {f for f in SamplerConfig.__dataclass_fields__ if f != "parts"} \
            | ({"companions"} & set(options))
        if unknown:
            valid = sorted(set(SamplerConfig.__dataclass_fields__) - {"parts"})
            msg = f"unknown option(s) {sorted(unknown)}; valid: {valid}"
            raise TypeError(msg)
        if points is not None:
            options["anchors"] = AnchorMode.POINTS
        self.source = open_source(source, companions)
        config = SamplerConfig(patch_size=patch_size, batch_size=batch_size, reuse=reuse,  # type: ignore[arg-type]
                               cache_bytes=cache_bytes, cache_images=cache_images, device=device,  # type: ignore[arg-type]
                               seed=seed, companions=self.source.companions, **options)
        if config.anchors is AnchorMode.POINTS and points is None:
            msg = "anchors='points' needs points=[(file, y, x), ...]"
            raise ValueError(msg)
        self.backend = resolve_backend(config.device, config.device_id or 0, from_local_rank="device_id" not in options)
        self.config = cfg = config.resolved(self.backend.device)  # every default worked out once, here
        catalog = Catalog.scan(self.source, min_size=cfg.patch_size, progress=progress, exif=cfg.exif_orientation,
                               pad=cfg.pad, index=index, trust_index=trust_index)
        if verify:
            catalog = without_corrupt(catalog, cfg.num_threads or 1, progress is not False)
        anchors = None
        if points is not None:
            catalog, anchors = catalog.with_points(points)
        parts = cached_parts(cfg, catalog.modes)[0]  # with the alpha that anchors="content" caches
        self.catalog = catalog.fitting(parts, cfg.cache_bytes)
        # Resolved again with the largest image known: the default decode_batch is bounded by memory too.
        largest = int(self.catalog.sample_bytes(parts).max()) if len(self.catalog.files) else None
        self.config = cfg = config.resolved(self.backend.device, largest)
        if config.decode_batch is None and largest and (cfg.decode_batch or 1) < min(cfg.num_threads or 1, default_decode_batch(cfg.device)):
            log.info("decode_batch=%d: a decode batch of the largest image (%s) is bounded by memory; with %d "
                     "threads a larger decode_batch decodes faster, at about 3.4 x %s more memory per step",
                     cfg.decode_batch, format_bytes(largest), cfg.num_threads, format_bytes(largest))
        free = self.backend.free_bytes()  # before the engine takes any of what max_memory counts
        self._producer = Producer(self.catalog, cfg, self.backend, progress, anchors)
        self.plan = self._producer.maker.plan
        self.cache_bytes = self.plan.capacity_bytes
        self._pipelines: list[tuple[Any, sample_pipeline.Feed]] = []
        self._handover_s = 0.0  # consumer time in next(): taking a batch (waits included) and logging it
        self._provenance = None if provenance is None else ProvenanceWriter(provenance, self._producer.maker.header())
        # A sampler dropped without close() still stops its thread (the producer does not refer back).
        self._finalizer = weakref.finalize(self, _close, self._producer, self._provenance)
        log.info("sampler on %s: cache %s, at most %s of %s memory (max_memory), decode batches of %d",
                 cfg.device.value, format_bytes(self.cache_bytes), format_bytes(self.max_memory), cfg.device.value,
                 cfg.decode_batch)
        self._warn_if_decodes_are_wasted()
        if self.max_memory > free:  # said before it happens
            msg = (f"this sampler will hold up to {format_bytes(self.max_memory)} of {cfg.device.value} memory "
                   f"(max_memory: the cache, decoding, output batches), more than the {format_bytes(free)} available; "
                   "lower cache_bytes or decode_batch")
            warnings.warn(msg, UserWarning, stacklevel=user_stacklevel())

    def _warn_if_decodes_are_wasted(self) -> None:
        """A fixed ``reuse`` with a cache that holds this shard's whole data set: after the warm-up
        every decode brings an image that is resident already, so it is discarded, yet the trainer
        still waits for it at the ``reuse`` rate."""
        shard = self._producer.maker.decoder.shard_size
        if isinstance(self.config.reuse, Reuse) or self.plan.warmup_images < shard:
            return
        data = int(self.catalog.sample_bytes(cached_parts(self.config, self.catalog.modes)[0]).sum()) // max(1, self.config.num_shards or 1)
        msg = (f"the cache holds all {shard} images of this shard, so with reuse={self.config.reuse:g} every decode "
               "after the warm-up is of a resident image and is discarded while the trainer waits for it; pass "
               "reuse='auto' (the decoder then pauses while the cache serves), or, where batch_size leaves room "
               f"for it, a cache_bytes below the shard's {format_bytes(data)} of decoded images so that images "
               "keep being replaced")
        warnings.warn(msg, UserWarning, stacklevel=user_stacklevel())

    # -- data --------------------------------------------------------------------------------
    @property
    def files(self) -> tuple[str, ...]:
        """The catalog's paths; ``batch.source`` indexes this tuple."""
        return self.catalog.files

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the batch outputs, in the pipeline's order: ``patches``, each companion,
        ``source``, ``anchor``."""
        return sample_pipeline.output_names(self.config)

    @property
    def max_memory(self) -> int:
        """Bytes this sampler will hold on its device (see :meth:`~dali_patches.engine.maker.BatchMaker.max_memory`):
        the arena, DALI's decode queue and the images decoded ahead of it, and the output batches."""
        return self._producer.maker.max_memory()

    def __iter__(self) -> PatchSampler:
        return self

    def __len__(self) -> int:
        """Refused: the sampler is an endless stream of finished batches, not a map-style Dataset
        (this message is what ``torch.utils.data.DataLoader(sampler)`` shows instead of "has no len()")."""
        msg = ("PatchSampler is an endless stream of finished batches, not a Dataset, so it has no len() and needs "
               "no DataLoader: it already batches, shuffles and prepares batches ahead in its own thread. Iterate "
               "it directly (next(sampler) / for batch in sampler), or wrap it in dali_patches.torch.DirectIterator "
               "or dali_patches.torch.PatchIterator for torch tensors; count steps with itertools.islice")
        raise TypeError(msg)

    def __bool__(self) -> bool:
        return True

    def __next__(self) -> PatchBatch:
        """The next batch. On a GPU its arrays are read on the calling thread's current stream (of
        the sampler's device), which is made to wait on the device for the gather that wrote them;
        that stream becomes one the sampler orders its rewrites after (see :meth:`take`)."""
        return self.take(self.backend.current_stream())

    def take(self, stream: Any = None) -> PatchBatch:
        """The next batch, read on ``stream`` (GPU): ``stream`` waits (on the device) for the gather
        that wrote it, and the sampler rewrites the batch's memory only once nothing refers to it
        and the work queued on ``stream`` by then has run. ``None`` (GPU): the caller orders its reads
        itself after ``batch.ready`` and on the producer's stream (as the DALI pipeline does, whose
        copy is queued there). On the CPU the stream is ignored."""
        t0 = time.perf_counter()
        batch = self._producer.get()
        if batch.ready is not None and stream is not None:
            self.backend.wait(stream, batch.ready)
            self._producer.maker.cutter.add_consumer(stream)
        if self._provenance is not None:
            self._provenance.write(batch.index, batch.source, batch.anchor)
        self._handover_s += time.perf_counter() - t0
        return batch

    def stats(self) -> dict[str, Any]:
        """Counters: ``images_decoded``; ``batches_made`` and ``patches_made`` (cut by the producer,
        possibly still queued) and ``patches_delivered`` (handed to a consumer); ``reuse`` (as set:
        a number or ``"auto"``); ``resident_images``, ``cache_bytes``, ``cache_bytes_used``,
        ``mean_reuse`` (patches made per decoded image, warm-up included), ``patches_per_residence`` (patches per cached copy over completed residences),
        ``duplicate_decodes`` (fresh decodes of still-resident images, not inserted twice),
        ``distinct_fraction`` (batches whose sources are all distinct), ``reader_epochs``,
        ``skipped_files``, decode failures, ``anchor_fallbacks`` (weighted draws that fell back: see
        :mod:`dali_patches.engine.anchors`), with ``anchors="content"`` ``content`` (patches
        ``checked`` and ``redrawn``, images mapped, ``map_s``, images drawn from an exact scan, and
        ``set_aside_files``: ``(file, why)`` of the images without an informative patch; see
        :meth:`~dali_patches.engine.content.ContentAnchors.stats`), ``round_batches`` and host time per batch in µs:
        ``producer_us_per_batch`` (draw + gather + snapshot), ``refill_us_per_batch`` (moving decoded
        images into the cache, waits for the decoder included) and ``handover_us_per_batch`` (the
        consumer's time in ``next()``, waits for the producer included)."""
        stats = self._producer.stats()
        taken = self._producer.last_delivered + 1
        return {**stats, "handover_us_per_batch": 1e6 * self._handover_s / taken if taken > 0 else 0.0,
                "files": len(self.files), "skipped_files": len(self.catalog.skipped),
                "device": self.backend.device.value}

    # -- resumable state ---------------------------------------------------------------------
    def state_dict(self, in_flight: int = 0) -> dict[str, Any]:
        """Where the stream stands, as plain Python values (``torch.save``/JSON-able, a few KiB):
        the reader's position (a DALI checkpoint), the draws' RNG, the refill credit, which images
        the cache holds where, and the batch within the producer's round. A new sampler with the
        same files and settings continues the same ``(source, anchor)`` stream after
        :meth:`load_state_dict`, from the very next batch.

        The state is taken after the last batch handed out by ``next(sampler)`` or a pipeline's
        ``external_source``; ``in_flight`` batches handed out but not yet consumed (DALI's
        prefetch queue) are excluded. :class:`~dali_patches.torch.PatchIterator` counts them for you.
        """
        index = self._producer.last_delivered - in_flight
        return {"format": _STATE_FORMAT, "fingerprint": self._producer.maker.fingerprint(),
                "stream": self._producer.state_after(index)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a sampler over the same files with the same settings.
        Call before the first batch; re-decodes the images the cache held (a warm-up's worth)."""
        if self._producer.closed:
            msg = "this sampler is closed; load the state into a new PatchSampler"
            raise RuntimeError(msg)
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            msg = (f"state format {found!r} is not {_STATE_FORMAT}; "
                   "was it made by PatchSampler.state_dict() of this version?")
            raise ValueError(msg)
        saved, mine = state_value(state, "fingerprint", "", dict), self._producer.maker.fingerprint()
        missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine))
        if missing or extra:  # every field is compared: a fingerprint with fields left out proves nothing
            msg = (f"this state's fingerprint lacks {missing} and has {extra} beyond this sampler's; load a state "
                   "made by state_dict() of the same version, unchanged")
            raise ValueError(msg)
        diff = {k: (v, mine[k]) for k, v in saved.items() if mine[k] != v}
        if diff:
            listed = ", ".join(f"{k}: saved {saved!r}, now {now!r}" for k, (saved, now) in diff.items())
            hint = "".join(f"; pass {k}={saved!r}" for k, (saved, _) in diff.items() if k == "decode_batch")
            msg = (f"this state belongs to a different sampler ({listed}); create the sampler with the saved "
                   f"settings{hint}")
            raise ValueError(msg)
        if "stream" not in state:
            msg = "state has no 'stream'; load a state made by state_dict() of the same version, unchanged"
            raise ValueError(msg)
        if state["stream"] is not None:
            self._producer.load_state_dict(state_value(state, "stream", "", dict))

    # -- DALI: the pieces of the sample pipeline, for pipeline(), dali_patches.tf and your own ---------
    def next_outputs(self) -> tuple[Any, ...]:
        """The next batch as a tuple ordered as :attr:`output_names`: patches and companions on the
        sampler's device, ``source`` ``(B,) int64`` and ``anchor`` ``(B, 2) int32`` on the host; a
        ``source=`` for ``fn.external_source(..., batch=True, **external_source_args())``."""
        return sample_pipeline.batch_outputs(self.config, next(self))

    def augment_nodes(self, inputs: Sequence[Any]) -> tuple[Any, ...]:
        """Inside a DALI graph: the sampler's ``augment`` ops applied to DALI nodes ordered as
        :attr:`output_names` (one random draw per patch, shared by its companions); ``source`` and
        ``anchor`` pass through. Without ``augment`` it returns the nodes as they are."""
        return sample_pipeline.augment_nodes(self.config, inputs)

    def output_dtypes(self) -> tuple[str, ...]:
        """NumPy dtype names of the pipeline outputs, ordered as :attr:`output_names`."""
        return sample_pipeline.output_dtypes(self.config)

    def output_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-sample shapes of the pipeline outputs, ordered as :attr:`output_names`."""
        return sample_pipeline.output_shapes(self.config)

    def external_source_args(self) -> dict[str, list[Any]]:
        """``dtype``, ``layout`` and ``ndim`` lists (one entry per :attr:`output_names`) for
        ``fn.external_source`` fed by :meth:`next_outputs`."""
        return sample_pipeline.external_source_args(self.config)

    def pipeline(self, prefetch_queue_depth: int = 2, num_threads: int = 1, no_copy: bool = False,
                 **kwargs: Any) -> Any:
        """A built DALI pipeline with one output per :attr:`output_names` entry: ``patches``
        (``HWC`` of the sampler's ``dtype``, or as ``augment`` makes them), each companion's patches,
        ``source`` (int64 scalar) and ``anchor`` (``(2,)`` int32) per sample, all on the sampler's
        device, for ``DALIGenericIterator(pipe, list(sampler.output_names), size=-1)`` and friends.

        Its one ``external_source`` only takes finished batches from the producer thread; on a GPU
        DALI's copy of them is queued on the producer's stream, after the gather. ``augment`` runs
        as DALI ops after it. Every pipeline and ``next(sampler)`` draw from the same stream.
        ``num_threads`` are DALI's CPU worker threads for this pipeline: 1 suffices on the GPU; on
        the CPU, raise it when augmenting. ``no_copy=True``: DALI reads the batches in place (no
        copy; benchmarks/RESULTS.md compares both).
        """
        if self._producer.closed:
            msg = "this sampler is closed; create a new PatchSampler"
            raise RuntimeError(msg)
        # Copying, DALI queues its copy on the producer's stream (cuda_stream=), after the gather. Reading
        # in place it orders its reads after the stream the arrays name (CuPy's current stream of the
        # calling thread, not cuda_stream=): that stream waits for the gather, and the ring's rewrites
        # wait for it.
        take = (lambda: self.take(self.backend.current_stream())) if no_copy else (lambda: self.take(None))
        pipe, feed = sample_pipeline.build_pipeline(take, self.config, self.backend, self._producer.stream,
                                                    prefetch_queue_depth, num_threads, no_copy, **kwargs)
        self._pipelines.append((pipe, feed))
        return pipe

    def batches_fed(self, pipe: Any) -> int:
        """How many batches the ``external_source`` of ``pipe`` (from :meth:`pipeline`) has taken."""
        for known, feed in self._pipelines:
            if known is pipe:
                return feed.fed
        msg = "this pipeline was not made by this sampler's pipeline()"
        raise ValueError(msg)

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
