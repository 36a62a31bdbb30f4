"""Producer: the thread that turns decoded images into finished batches.

DALI calls an ``external_source`` callback on the *training* thread (DALI-NOTES), so nothing slow may
happen there. This thread runs decode → refill → sample → gather ahead of the trainer and hands over
finished :class:`PatchBatch` objects through a small bounded queue: in steady state neither side
waits for the other. On GPU all of its CUDA work runs on one stream of its own, in order, so a slot
is only overwritten after every gather that read it was issued before it, and the stream is
synchronised before a batch leaves the thread (DALI copies it on a stream of its own).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .anchors import MaskAnchors, PointAnchors, UniformAnchors
from .backend import Backend
from .cache import RingCache
from .config import SamplerConfig, default_decode_batch
from .decode import DecodeStage, decode_files
from .gather import gather_patches, row_starts
from .options import AnchorMode, scaled
from .sampler import RefillSchedule, Sampler

__all__ = ["PatchBatch", "Producer"]

log = logging.getLogger(__name__)

_POLL_S = 0.1  # how often a blocked thread checks for close()
_MAX_HELD_IMAGES = 32  # GPU: sync after this many pending copies, so DALI's buffers are not pinned
_SNAPSHOTS_KEPT = 64  # states of the latest batches, for state_dict() behind a prefetching consumer
_PROGRESS_MIN_IMAGES = 500  # with progress=None, a warm-up this long gets a progress bar


def _plain(value: Any) -> Any:
    """``value`` with NumPy arrays turned into lists, recursively (JSON- and ``torch.save``-able)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value.tolist() if isinstance(value, np.ndarray) else value


@dataclass(frozen=True)
class PatchBatch:
    """One batch of patches with its provenance.

    Attributes:
        patches: ``(B, P_h, P_w, C)`` (default RGB ``uint8``); CuPy on GPU, NumPy on CPU.
        source: ``(B,) int64`` host array, index of each patch's image in ``sampler.files``.
        anchor: ``(B, 2) int32`` host array, ``(y, x)`` of each patch's top-left pixel in its image.
        index: position of this batch in the stream (0, 1, 2, ...).
        companions: name → ``(B, P_h·s, P_w·s, C_c)`` patches of each companion, cut at the anchors
            scaled by its ``s``.
    """

    patches: Any
    source: np.ndarray
    anchor: np.ndarray
    index: int
    companions: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Failure:
    error: BaseException


class Producer:
    """Owns the decode stage, the cache and the sampler; runs them in one daemon thread."""

    def __init__(self, columns: list[list[str]], config: SamplerConfig, backend: Backend, cache_bytes: int,
                 max_slots: int, warmup_estimate: int, progress: bool | None = None,
                 points: dict[int, np.ndarray] | None = None) -> None:
        self.config = config
        self.backend = backend
        self.columns = columns  # the main images' paths, then each companion's
        self.files = columns[0]
        self._threads = config.num_threads or os.cpu_count() or 1
        self._output = {"exif": config.exif_orientation, "parts": [(c.channels, c.dtype) for c in config.parts]}
        self.decoder = self._new_decoder()
        self.cache = RingCache(backend, cache_bytes, max_slots, parts=[(c.scale, c.pixel_bytes) for c in config.parts])
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, config.shard_id]))
        self.sampler = Sampler(config.batch_size, config.patch_size, config.allow_repeats, rng, config.image_choice,
                               self._anchor_policy(rng, points))
        self.schedule = RefillSchedule(config.batch_size, config.reuse)
        # What each part's gather needs, worked out once: name, scale, patch size, layout.
        self._cuts = [(p.name, p.scale, tuple(scaled(v, p.scale) for v in config.patch_size), p.pixel_bytes,
                       p.channels, p.dtype) for p in config.parts]
        self.queue: queue.Queue = queue.Queue(maxsize=config.queue_depth)
        self.batches_made = 0
        self.distinct_batches = 0
        self.warmup_images = 0
        self.duplicate_decodes = 0  # decoded while still resident (cache ≳ shard), not inserted
        self.last_delivered = -1  # index of the last batch handed to a consumer
        self._snapshots: dict[int, dict[str, Any]] = {}  # batch index → state after it (the latest few)
        self._restored = False
        self._warmup_estimate = warmup_estimate
        self._progress = warmup_estimate >= _PROGRESS_MIN_IMAGES if progress is None else progress
        self._stream = backend.new_stream()
        self._hold: list[Any] = []  # decoded views whose async copy may still be pending
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="dali-patches-producer", daemon=True)

    def _anchor_policy(self, rng: np.random.Generator, points: dict[int, np.ndarray] | None) -> UniformAnchors:
        cfg = self.config
        if cfg.anchors is AnchorMode.POINTS:
            return PointAnchors(cfg.patch_size, cfg.anchor_step, rng, points or {})
        if cfg.anchors in (AnchorMode.WEIGHTS, AnchorMode.POS_NEG):
            part = next(i for i, c in enumerate(cfg.parts) if c.name == cfg.anchor_mask)
            mask = cfg.parts[part]
            return MaskAnchors(cfg.patch_size, cfg.anchor_step, rng, self.backend, part, mask.channels,
                               mask.dtype, cfg.pos_fraction if cfg.anchors is AnchorMode.POS_NEG else None)
        return UniformAnchors(cfg.patch_size, cfg.anchor_step, rng)

    # -- consumer side -----------------------------------------------------------------------
    def start(self) -> None:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def get(self) -> PatchBatch:
        """The next finished batch; re-raises whatever stopped the producer."""
        if self._closed:
            msg = "this sampler is closed; create a new PatchSampler"
            raise RuntimeError(msg)
        self.start()
        while True:
            try:
                item = self.queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive():
                    msg = "the producer thread stopped without a reason; create a new PatchSampler"
                    raise RuntimeError(msg) from None
                continue
            if isinstance(item, _Failure):
                self.queue.put(item)  # every later call fails the same way
                raise RuntimeError(f"dali_patches producer failed: {item.error}") from item.error  # noqa: TRY004
            self.last_delivered = item.index
            return item

    def close(self) -> None:
        """Stop the thread, drop the queue, the decode pipeline and the arena."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self.queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=_POLL_S)
        self.queue = queue.Queue()
        self.decoder.close()
        self._hold.clear()
        self.cache.arena = None

    # -- producer side -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with self.backend.use(self._stream):
                if not self._restored:
                    self._warm_up()
                while not self._stop.is_set():
                    self._put(self._make_batch())
        except BaseException as e:  # handed to the consumer, which re-raises it
            if not self._stop.is_set():
                log.exception("producer failed")
                self._put(_Failure(e))

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def _insert_next(self) -> None:
        """Move the next decoded image into the cache. A source still resident is not inserted twice
        (same decoder, same pixels): the ring then holds only distinct images, and the decode still
        counts towards the refill, so patches per decoded image stay ≈ ``reuse``."""
        source, images = self.decoder.next()
        if self.cache.holds(source):
            self.duplicate_decodes += 1
            return
        slot = self.cache.insert(self._padded(images), source)
        self.sampler.anchors.on_insert(self.cache, slot)
        if self.backend.asynchronous:  # keep DALI's buffers alive until the async copies are done
            self._hold += images
            if len(self._hold) >= _MAX_HELD_IMAGES:
                self._release_holds()

    def _cached_bytes(self, images: list[Any]) -> int:
        (h, w, _), (ph, pw) = images[0].shape, self.config.patch_size
        return sum(self.cache.part_bytes(max(h, ph), max(w, pw)))

    def _padded(self, images: list[Any]) -> list[Any]:
        """``images`` (an image and its companions) zero-padded at the bottom and right to at least
        the patch size, scaled per part (``pad=True``)."""
        (h, w, _), (ph, pw) = images[0].shape, self.config.patch_size
        if h >= ph and w >= pw:
            return images
        out = []
        for image, part in zip(images, self.config.parts):
            th, tw = scaled(max(h, ph), part.scale), scaled(max(w, pw), part.scale)
            pad = ((0, th - image.shape[0]), (0, tw - image.shape[1]), (0, 0))
            out.append(self.backend.xp.pad(image, pad))
        return out

    def _release_holds(self) -> None:
        self.backend.synchronize(self._stream)
        self._hold.clear()

    def _warm_up(self) -> None:
        """Fill the arena until the next image would evict one, or the shard has been decoded once."""
        shard = self.decoder.shard_size
        with tqdm(total=min(self._warmup_estimate, shard), desc="filling cache", unit="img",
                  disable=not self._progress, leave=False) as bar:
            while not self._stop.is_set() and self.decoder.images_decoded < shard:
                _, image = self.decoder.peek()
                if self.cache.would_evict(self._cached_bytes(image)):
                    break
                self._insert_next()
                bar.update()
        self._release_holds()
        self.warmup_images = self.decoder.images_decoded
        log.info("cache warm: %d images resident, %d bytes", self.cache.resident, self.cache.bytes_used)

    def _make_batch(self) -> PatchBatch:
        for _ in range(self.schedule.next()):
            self._insert_next()
        draw = self.sampler.draw(self.cache)
        self.cache.record_served(draw.slots)
        cut = {}
        layouts = self.cache.part_layout(draw.slots) if len(self._cuts) > 1 else [
            (self.cache.offset[draw.slots], self.cache.width[draw.slots])]
        for (name, scale, size, pixel_bytes, channels, dtype), (offsets, widths) in zip(self._cuts, layouts):
            y, x = scaled(draw.y, scale), scaled(draw.x, scale)
            starts = row_starts(offsets, widths, y, x, size[0], pixel_bytes)
            cut[name] = gather_patches(self.backend.xp, self.cache.arena, starts, size, channels, dtype)
        self._release_holds()  # the gather (and the inserts before it) are done: safe to hand over
        anchor = np.stack([draw.y, draw.x], axis=1).astype(np.int32)
        self.distinct_batches += int(len(np.unique(draw.source)) == len(draw.source))
        patches = cut.pop("patches")
        batch = PatchBatch(patches, draw.source, anchor, self.batches_made, cut)
        self.batches_made += 1
        self._snapshot(batch.index)
        return batch

    # -- resumable state ---------------------------------------------------------------------
    def _new_decoder(self, position: dict[str, Any] | None = None) -> DecodeStage:
        cfg = self.config
        return DecodeStage(self.columns, self.backend, batch_size=cfg.decode_batch or default_decode_batch(self.backend),
                           num_threads=self._threads, seed=cfg.seed, shard_id=cfg.shard_id,
                           num_shards=cfg.num_shards, position=position, **self._output)

    def _snapshot(self, index: int) -> None:
        """Record the state after batch ``index`` (a few KiB); keep the latest ``_SNAPSHOTS_KEPT``."""
        self._snapshots[index] = {
            "batches_made": self.batches_made, "distinct_batches": self.distinct_batches,
            "duplicate_decodes": self.duplicate_decodes, "warmup_images": self.warmup_images,
            "rng": self.sampler.rng.bit_generator.state, "refill_credit": self.schedule.credit,
            "decoder": self.decoder.position(), "cache": self.cache.state(),
        }
        self._snapshots.pop(index - _SNAPSHOTS_KEPT, None)

    def state_after(self, index: int) -> dict[str, Any] | None:
        """The state after batch ``index`` as plain Python values; ``None`` before the first batch."""
        if index < 0:
            return None
        try:
            return _plain(self._snapshots[index])
        except KeyError:
            msg = (f"the state after batch {index} is no longer kept (the latest {_SNAPSHOTS_KEPT} are); "
                   "take state_dict() closer to the batches you consumed")
            raise RuntimeError(msg) from None

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_after` of an earlier producer over the same files and config.
        Re-decodes the images that were resident (their number × decode time) before the first batch."""
        if self._thread.is_alive() or self.batches_made:
            msg = "load_state_dict() must come before the first batch is drawn"
            raise RuntimeError(msg)
        self.decoder.close()
        self.decoder = self._new_decoder(position=state["decoder"])
        resident = [[column[s] for s in state["cache"]["source"]] for column in self.columns]

        def images() -> Any:
            for parts in decode_files(resident, self.backend, self._threads, **self._output):
                yield self._padded(parts)
                self.backend.synchronize(self._stream)  # copied before DALI may reuse the buffer

        with self.backend.use(self._stream):
            self.cache.restore(state["cache"], images())
            for slot in self.cache.resident_slots():
                self.sampler.anchors.on_insert(self.cache, slot)
        self.sampler.rng.bit_generator.state = state["rng"]
        self.schedule.credit = state["refill_credit"]
        for name in ("batches_made", "distinct_batches", "duplicate_decodes", "warmup_images"):
            setattr(self, name, state[name])
        self.last_delivered = self.batches_made - 1
        self._restored = True

    def stats(self) -> dict[str, Any]:
        """Counters of the stream so far (batches made by the producer, possibly not yet consumed)."""
        cache, made = self.cache, self.batches_made
        served = made * self.config.batch_size
        decoded = self.decoder.images_decoded
        return {
            "batches_served": made,
            "patches_served": served,
            "images_decoded": decoded,
            "warmup_images": self.warmup_images,
            "reader_epochs": decoded / self.decoder.shard_size if self.decoder.shard_size else 0.0,
            "resident_images": cache.resident,
            "duplicate_decodes": self.duplicate_decodes,
            "cache_bytes": cache.capacity_bytes,
            "cache_bytes_used": cache.bytes_used,
            "mean_reuse": served / decoded if decoded else 0.0,
            "patches_per_residence": cache.evicted_served / cache.evicted if cache.evicted else 0.0,
            "distinct_fraction": self.distinct_batches / made if made else 1.0,
            "decode_failed_batches": self.decoder.failed_runs,
            "anchor_fallbacks": self.sampler.anchors.fallbacks,
            "broken_files": [(self.files[i], why) for i, why in sorted(self.decoder.broken.items())],
            "decode_errors": list(self.decoder.errors),
        }
