"""Batch maker: what the producer thread does, a round at a time, and where the stream stands.

:class:`BatchMaker` owns the pieces that shape the stream of batches — the decode stage and its
feeder, the cache, the draws, the refill schedule and the round cutter — and composes their
states: one snapshot per round (:class:`~dali_patches.engine.rounds.RoundStates`), from which the
state after any batch follows. A round is: the round's new images enter the cache (FIFO evictions),
one vectorised draw picks every batch's distinct images and anchors, one gather per part cuts their
patches, one snapshot records the state. The maker never blocks on a consumer and never starts a
thread of its own (the feeder has one): the :class:`~dali_patches.engine.producer.Producer` runs it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
from tqdm.auto import tqdm

from ..catalog.catalog import Catalog
from ..config import SamplerConfig, format_bytes
from ..options import DTYPES, AnchorMode, Reuse
from ..sources.base import Source
from ..state import Field, read_fields, state_value
from .anchors import AnchorPolicy, MaskAnchors, PointAnchors, UniformAnchors
from .backend import Backend, HostArray
from .cache import RingCache
from .content import ContentAnchors
from .decode import DecodeStage
from .decoders import decode_files
from .draw import Draws, RefillSchedule
from .feeder import DecodeFeeder
from .measure import Threshold
from .outputs import PatchBatch
from .plan import cached_parts, plan_cache
from .rounds import RoundCutter, RoundStates, round_batches
from .views import HELD_GROUPS, HeldViews

__all__ = ["BatchMaker", "Counts", "HELD_GROUPS", "HOST_FIXED", "HOST_IMAGES_PER_BATCH"]

log = logging.getLogger(__name__)

_PROGRESS_DELAY_S = 2.0  # with progress=None, a warm-up that lasts longer than this shows its progress bar
_DECODE_QUEUE_BATCHES = 3  # decode batches of images DALI holds at most (prefetch 2 + the one being made)
HOST_FIXED = 480 * 2**20  # CPU max_memory: bytes beyond the arena whatever the images (see BatchMaker.max_memory) ...
HOST_IMAGES_PER_BATCH = 2.4  # ... and largest images per decode batch, besides the feeder's look-ahead


@dataclass
class Counts:
    """The stream's counters, part of its state (each a non-negative int)."""

    batches_made: int = 0
    distinct_batches: int = 0  # of them, batches whose sources are all distinct
    duplicate_decodes: int = 0  # decoded while still resident (cache ≳ shard), not inserted
    warmup_images: int = 0
    taken_ahead: int = 0  # reuse="auto": images inserted while waiting for queue room, for the next round

    STATE: ClassVar[dict[str, Field]] = {name: Field(int) for name in ("batches_made", "distinct_batches",
                                                                        "duplicate_decodes", "warmup_images", "taken_ahead")}


def _anchor_policy(config: SamplerConfig, backend: Backend, rng: np.random.Generator,
                   points: dict[int, HostArray] | None, alpha_part: int | None, names: list[str],
                   alpha: HostArray | None = None) -> AnchorPolicy:
    if config.anchors is AnchorMode.CONTENT:
        threshold = Threshold(config.min_std, config.min_opaque, DTYPES[config.dtype])
        return ContentAnchors(config.patch_size, config.anchor_step, rng, backend, threshold, alpha_part,
                              config.allow_repeats, names, config.seed, alpha)
    if config.anchors is AnchorMode.POINTS:
        return PointAnchors(config.patch_size, config.anchor_step, rng, points or {})
    if config.anchors in (AnchorMode.WEIGHTS, AnchorMode.POS_NEG):
        part = next(i for i, p in enumerate(config.parts) if p.name == config.anchor_mask)
        return MaskAnchors(config.patch_size, config.anchor_step, rng, backend, part,
                           config.pos_fraction if config.anchors is AnchorMode.POS_NEG else None)
    return UniformAnchors(config.patch_size, config.anchor_step, rng)


class BatchMaker:
    """Decode → cache → draw → cut, a round at a time, with the stream's state (see the module).

    Args:
        catalog: the images (and companions) to sample, with their source.
        config: the resolved :class:`~dali_patches.config.SamplerConfig`.
        backend: the device.
        progress: progress bar for the warm-up (``None``: only for long ones).
        points: ``POINTS`` anchors: source → ``(K, 2)`` centres.

    Raises:
        ValueError: more shards than images, a cache that cannot serve a batch or does not fit, or
            a decode queue larger than the free memory (each message gives the fix).
    """

    def __init__(self, catalog: Catalog, config: SamplerConfig, backend: Backend, progress: bool | None = None,
                 points: dict[int, HostArray] | None = None) -> None:
        self.config, self.backend, self.catalog = config, backend, catalog
        if catalog.source is None:
            msg = "this catalog has no source to decode from; build it with Catalog.scan"
            raise ValueError(msg)
        self.source: Source = catalog.source
        self.columns = [list(catalog.files), *(list(catalog.companions[c.name]) for c in config.companions)]
        shards = config.num_shards or 1
        if shards > len(catalog.files):
            msg = (f"num_shards={shards} exceeds the {len(catalog.files)} usable images: every shard needs images; "
                   "use fewer shards (ranks) or more data")
            raise ValueError(msg)
        # anchors="content" over images with transparency: their alpha is cached as one more part.
        self.parts, self._alpha = cached_parts(config, catalog.modes)
        sizes = catalog.sample_bytes(self.parts)
        self.largest_bytes = int(sizes.max())
        queue_bytes = self.decode_queue_images() * self.largest_bytes
        if queue_bytes > backend.free_bytes():
            msg = (f"decode_batch={config.decode_batch}: DALI's decode queue would hold about {format_bytes(queue_bytes)} "
                   f"({_DECODE_QUEUE_BATCHES} batches of images up to {format_bytes(self.largest_bytes)}), more than the "
                   f"free {backend.device.value} memory ({format_bytes(backend.free_bytes())}); lower decode_batch")
            raise ValueError(msg)
        big = int(np.argmax(sizes))
        self.plan = plan_cache(sizes, config.batch_size, len(catalog.files) // shards, config.allow_repeats,
                                   backend.free_bytes(), config.cache_bytes, config.cache_images, backend.device.value,
                                   largest=f"{catalog.files[big]!r} ({catalog.heights[big]}x{catalog.widths[big]})")
        self._points_sha = (hashlib.sha256(repr(sorted((k, v.tolist()) for k, v in points.items())).encode()).hexdigest()
                            if points is not None else None)
        self._files_sha: str | None = None  # the data set's digest, worked out when a state first needs it
        self._heights, self._widths = catalog.heights.astype(np.int64), catalog.widths.astype(np.int64)
        self.changed_files = 0  # set aside because they decoded to another size than measured
        self._output: dict[str, Any] = {"exif": config.exif_orientation, "parts": [(p.channels, p.dtype) for p in config.parts],
                                        "hw_decoder_load": config.hw_decoder_load}
        self.stream = backend.new_stream()  # every CUDA operation of the maker runs on it, in order
        self.decoder = DecodeStage(self.source, self.columns, backend, batch_size=config.decode_batch or 1,
                                   min_good=1 if config.allow_repeats else config.batch_size,
                                   num_threads=config.num_threads or 1, seed=config.seed, shard_id=config.shard_id or 0,
                                   num_shards=shards, alpha=self._alpha is not None, **self._output)
        # The most of the arena the shard's images can fill (on the CPU only written pages are resident).
        self._shard_bytes = int(np.sort(sizes)[::-1][: self.decoder.shard_size].sum())
        # "auto" takes what is ready: two decode batches banked; a fixed reuse takes exact counts and
        # DALI's prefetch decodes ahead already: one batch (a decode batch of images less in memory).
        look_ahead = 2 if config.reuse is Reuse.AUTO else 1
        self.feeder = DecodeFeeder(self.decoder, backend, self.stream, look_ahead * (config.decode_batch or 1))
        self.cache = RingCache(backend, self.plan.capacity_bytes, self.plan.max_slots, parts=self.parts)
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, config.shard_id or 0]))
        alpha_part = len(config.parts) if self._alpha is not None else None
        self.draws = Draws(config.batch_size, config.allow_repeats, rng,
                           _anchor_policy(config, backend, rng, points, alpha_part, self.columns[0], self._alpha), config.image_choice)
        self.schedule = RefillSchedule(config.batch_size, None if config.reuse is Reuse.AUTO else float(config.reuse),
                                       config.min_reuse, config.max_reuse, slack=self.feeder.capacity)
        self.round_batches = round_batches(config, self.plan.warmup_images, self.feeder.capacity)
        # Whole rounds cross the producer's queue (one hand-off per round, not per batch).
        self.queue_rounds = -(-config.queue_depth // self.round_batches)
        with backend.use(self.stream):  # device buffers come from the pool of the stream that writes them
            self.cutter = RoundCutter(backend, config, self.round_batches, self.queue_rounds)
        self.counts = Counts()
        self.round_counts = (0, 0, 0)  # (batches made, of them distinct, images taken) after the last round
        self._states = RoundStates(self.round_batches)  # the state before each recent round
        self._progress = progress
        self._views = HeldViews(config.decode_batch or 1)
        self.host_s = {"refill": 0.0, "round": 0.0}  # time inserting, and drawing + gathering + snapshotting

    # -- memory ------------------------------------------------------------------------------
    def decode_queue_images(self) -> int:
        """Decoded images DALI's decode queue holds at most (``3 × decode_batch``)."""
        return _DECODE_QUEUE_BATCHES * (self.config.decode_batch or 1)

    def arena_touched(self) -> int:
        """Arena bytes that can become resident: on CPU all of the shard's images when they fit (a
        page is resident once an image is written to it), else (and on a GPU) the whole arena."""
        if self.backend.asynchronous:
            return self.plan.capacity_bytes
        return min(self.plan.capacity_bytes, self._shard_bytes)

    def max_memory(self) -> int:
        """Bytes held on the device at most (CPU: the rise of the peak resident set, ``VmHWM``, over
        the resident set before the sampler was built). ``L``: the largest image's decoded bytes with
        companions; ``D``: ``decode_batch``. The arena (:meth:`arena_touched`), the output batches
        (the rounds queued, being cut and being taken; on a GPU the output ring if larger), and:

        * CPU: ``HOST_FIXED`` (480 MiB: DALI's pipelines, thread pools, decoder work buffers and
          the allocator's pools) ``+ HOST_IMAGES_PER_BATCH × D × L`` (2.4 images per decode batch:
          DALI's output queue and its contiguous copy) ``+`` the feeder's look-ahead ``× L`` (``D``
          with a fixed ``reuse``, ``2D`` with ``"auto"``). Calibrated (2 DALI threads; 9 and 11–25 MP
          photos; ``D`` 1–8; caches 1–4 GiB; ``reuse`` 1 and 32) to within 10 % of the measured peak:
          ``benchmarks/memory.py``, ``benchmarks/results/cpu_memory.json``.
        * GPU (device memory; not calibrated on a device): DALI's decode queue
          (:meth:`decode_queue_images`), the look-ahead and the views whose copies are pending (up to
          ``HELD_GROUPS + 1`` decode batches), each image ``L``.
        """
        cfg = self.config
        batch = cfg.decode_batch or 1
        if self.backend.asynchronous:
            engine = (self.decode_queue_images() + self.feeder.capacity + (HELD_GROUPS + 1) * batch) * self.largest_bytes
        else:
            engine = HOST_FIXED + int((HOST_IMAGES_PER_BATCH * batch + self.feeder.capacity) * self.largest_bytes)
        batches = (self.queue_rounds + 2) * self.round_batches * cfg.batch_size * cfg.patch_bytes
        return self.arena_touched() + engine + max(batches, self.cutter.ring_bytes)

    # -- making rounds -----------------------------------------------------------------------
    def warm_up(self, stop: threading.Event) -> None:
        """Fill the arena until the next image would evict one, or the shard has been decoded once."""
        shard = self.decoder.shard_size
        with tqdm(total=min(self.plan.warmup_images, shard), desc="filling cache", unit="img", leave=False,
                  disable=self._progress is False, delay=_PROGRESS_DELAY_S if self._progress is None else 0,
                  postfix={"max_memory": format_bytes(self.max_memory())}) as bar:
            while not stop.is_set() and self.feeder.taken < shard:
                _, image = self.feeder.peek()
                if self.cache.would_evict(self.cache.padded_bytes(image[0].shape, self.config.patch_size)):
                    break
                del image
                self._refill(1, 1)
                bar.update()
        self._views.release(self.backend.record(self.stream), wait=True)
        self.counts.warmup_images = self.feeder.taken
        self._count_round()
        self.snapshot(0)
        log.info("cache warm: %d images resident, %d bytes", self.cache.resident, self.cache.bytes_used)

    def refill_ahead(self) -> None:
        """``reuse="auto"``, while the trainer is slower than the maker: move every image the feeder
        has ready into the cache now rather than at the next round, so the decoder never waits for a
        round that the queue holds back. They count towards the next round's window (at most its
        ``most``), and the state before that round is taken again with them in it."""
        _, most = self.schedule.window(self.round_batches)
        room = min(most - self.counts.taken_ahead, self.feeder.ready)
        if room <= 0:
            return
        t0 = time.perf_counter()
        self.counts.taken_ahead += self._refill(0, room)
        self._views.release(self.backend.record(self.stream))
        self.snapshot(self.counts.batches_made)
        self.host_s["refill"] += time.perf_counter() - t0

    def _refill(self, least: int, most: int) -> int:
        """Insert between ``least`` and ``most`` images from the feeder (see
        :meth:`DecodeFeeder.each`), each as it comes, so that only one decoded image is held here
        at a time; returns how many were taken."""
        taken = 0
        for source, images in self.feeder.each(least, most):
            self._insert(source, images)
            taken += 1
            del images  # DALI's buffer goes back now, not after the next image has come
        return taken

    def _insert(self, source: int, images: list[Any]) -> None:
        """Move a decoded image into the cache. A source still resident is not inserted twice (same
        decoder, same pixels): the ring then holds only distinct images, and the decode still counts
        towards the refill, so patches per decoded image stay ≈ ``reuse``."""
        if self.cache.holds(source):
            self.counts.duplicate_decodes += 1
            return
        if source in self.decoder.broken or self.draws.anchors.refuses(source):  # set aside before
            return
        decoded, images = images, self.cache.padded(self._complete(images), self.config.patch_size)
        h, w = images[0].shape[:2]
        expected = self.cache.part_bytes(self._heights[source], self._widths[source])
        if (h, w) != (self._heights[source], self._widths[source]) or RingCache.nbytes(images, expected) != expected:
            shapes = "x".join(map(str, images[0].shape[:2])) if len(images) == 1 else [tuple(p.shape) for p in images]
            self.feeder.mark_broken(source, f"changed during the run: it decodes to {shapes}, not the "
                                            f"{self._heights[source]}x{self._widths[source]} measured at the start "
                                            "(restart the sampler to sample its new contents)")
            self.changed_files += 1
            self.catalog.distrust([self.catalog.files[source]])
            return
        slot = self.cache.insert(images, source)
        self.draws.anchors.on_insert(self.cache, slot)
        if self.backend.asynchronous:  # DALI's buffers (not the padded copies) must outlive the pending reads
            self._views.add(decoded, lambda: self.backend.record(self.stream))

    def _complete(self, images: list[Any]) -> list[Any]:
        """The decoded parts as the cache takes them: an image's 1 × 1 opaque alpha becomes ``None`` (filled there)."""
        if self._alpha is not None and images[-1].shape[:2] == (1, 1) and images[0].shape[:2] != (1, 1):
            return [*images[:-1], None]
        return images

    def make_round(self) -> list[PatchBatch]:
        """The next round's batches (see the module)."""
        t0 = time.perf_counter()
        n, start = self.round_batches, self.counts.batches_made
        least, most = self.schedule.window(n)  # fixed reuse: least == most
        ahead, self.counts.taken_ahead = self.counts.taken_ahead, 0
        least = max(0, least - ahead)
        taken = self._refill(least, max(least, min(most - ahead, self.feeder.capacity)))
        if isinstance(self.draws.anchors, ContentAnchors):  # images set aside hold no patch: take more
            self.draws.anchors.top_up(self.cache, lambda: self._refill(1, 1), self.config.batch_size,
                                      self.decoder.shard_size)
        self.schedule.record(n, ahead + taken)
        t1 = time.perf_counter()
        draw = self.draws.draw_round(self.cache, n)
        cuts, device_source, device_anchor = self.cutter.cut(self.cache, draw, self.stream)
        if isinstance(self.draws.anchors, ContentAnchors):  # every patch tested (on the maker's stream), failing ones redrawn
            self.draws.anchors.settle(self.cache, draw, cuts[0].reshape(-1, *self.config.parts[0].patch_shape),
                                      lambda todo: self.cutter.recut(self.cache, draw, cuts, device_source,
                                                                     device_anchor, todo), self.cutter.split)
        self.cache.record_served(draw.slots)
        ready = self.backend.record(self.stream)
        self._views.release(ready)
        anchor = np.stack([draw.y, draw.x], axis=-1).astype(np.int32)
        names = [p.name for p in self.config.parts[1:]]
        batches = [PatchBatch(cuts[0][j], draw.source[j], anchor[j], start + j,
                              {name: cut[j] for name, cut in zip(names, cuts[1:])}, ready,
                              None if device_source is None else device_source[j],
                              None if device_anchor is None else device_anchor[j]) for j in range(n)]
        self.counts.batches_made += n
        self.counts.distinct_batches += int(draw.distinct.sum())
        self._count_round()
        self.snapshot(self.counts.batches_made)
        self.host_s["refill"] += t1 - t0
        self.host_s["round"] += time.perf_counter() - t1
        return batches

    def _count_round(self) -> None:
        """Publish the counts after a round as one tuple, so that ``stats()`` from another thread
        never pairs one round's counts with the last's."""
        self.round_counts = (self.counts.batches_made, self.counts.distinct_batches, self.feeder.taken)

    # -- resumable state ---------------------------------------------------------------------
    def snapshot(self, start: int) -> None:
        """Record the state before the round that starts at batch ``start`` (a few KiB)."""
        self._states.record(start, {**asdict(self.counts), "draws": self.draws.state_dict(),
                                    "refill": self.schedule.state_dict(), "decoder": self.feeder.state_dict(),
                                    "cache": self.cache.state_dict()})

    def state_after(self, index: int) -> dict[str, Any] | None:
        """The state after batch ``index`` as plain values (see :class:`RoundStates`); ``None``
        before the first batch."""
        return self._states.after(index, self.counts.batches_made)

    def fingerprint(self) -> dict[str, Any]:
        """What a state must match to resume here: every stream-shaping config field, the resolved
        cache size, and digests of the items, the companions and the points."""
        if self._files_sha is None:
            self._files_sha = self.catalog.digest()
        return {**self.config.stream_fields(), "files": len(self.catalog.files), "files_sha256": self._files_sha,
                "cache_bytes": self.plan.capacity_bytes,
                "companion_files_sha256": hashlib.sha256(repr(self.catalog.companions).encode()).hexdigest(),
                "points_sha256": self._points_sha}

    def header(self) -> dict[str, Any]:
        """What a provenance log records about this stream: the items (``files``, their
        ``heights`` and ``widths``, the ``root`` they lie under), the ``patch_size`` and the
        ``settings`` (:meth:`fingerprint`)."""
        cat = self.catalog
        root = os.path.abspath(cat.root) if cat.root and "://" not in cat.root else cat.root
        return {"files": list(cat.files), "heights": cat.heights.tolist(), "widths": cat.widths.tolist(), "root": root,
                "patch_size": list(self.config.patch_size), "settings": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> int:
        """Continue from a :meth:`state_after` of an earlier maker over the same items and config;
        returns how many batches of the restored round were already delivered. Every field is
        checked first (a damaged or edited state fails naming it, before anything changes).
        Re-decodes the images that were resident (their number × decode time)."""
        where = "['stream']['round']"
        skip = state_value(state, "skip", "['stream']", int, 0, self.round_batches - 1)
        snapshot = state_value(state, "round", "['stream']", dict)
        counts = Counts(**read_fields({"taken_ahead": 0, **snapshot}, where, Counts.STATE))
        if counts.distinct_batches > counts.batches_made:
            msg = f"state {where}['distinct_batches'] exceeds ['batches_made']; load a state made by state_dict(), unchanged"
            raise ValueError(msg)
        for name in ("draws", "refill", "decoder", "cache"):
            state_value(snapshot, name, where, dict)
        # Everything is checked before anything changes: a refused state leaves this maker as it was.
        cache = self.cache.check_state(snapshot["cache"], sources=len(self.catalog.files), where=f"{where}['cache']")
        rng = self.draws.check_state(snapshot["draws"], where=f"{where}['draws']")
        refill = self.schedule.check_state(snapshot["refill"], where=f"{where}['refill']")
        self.feeder.check_state(snapshot["decoder"], where=f"{where}['decoder']")
        self.cache.apply_state(cache)
        self.draws.apply_state(rng)
        self.schedule.apply_state(refill)
        self.feeder.load_state_dict(snapshot["decoder"])
        resident = [[column[s] for s in snapshot["cache"]["source"]] for column in self.columns]
        with self.backend.use(self.stream):
            self.cache.rewrite(self._redecoded(resident))
            for slot in self.cache.resident_slots():
                self.draws.anchors.on_insert(self.cache, slot)
        self.counts = counts
        self._count_round()
        self.snapshot(self.counts.batches_made)
        return skip

    def _redecoded(self, resident: list[list[str]]) -> Iterator[list[Any]]:
        for parts in decode_files(self.source, resident, self.backend, self.config.num_threads or 1,
                                  batch_size=self.config.decode_batch or 1, alpha=self._alpha is not None,
                                  **self._output):
            yield self.cache.padded(self._complete(parts), self.config.patch_size)  # max_memory's batch above
            self.backend.synchronize(self.stream)  # copied before DALI may reuse the buffer

    # -- the end -----------------------------------------------------------------------------
    def close(self) -> None:
        """Drop the decode pipeline, the output ring, the views and the arena (after the stream's
        queued copies and gathers finished)."""
        self.feeder.close()
        self.backend.synchronize(self.stream)  # queued copies and gathers finish before their memory goes
        self.cutter.close()
        self.decoder.close()
        self._views.clear()
        self.cache.release()
        self.backend.free_pool_blocks(self.stream)
