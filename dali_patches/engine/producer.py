"""Producer: the thread that turns decoded images into finished batches, a round at a time.

DALI calls an ``external_source`` callback on the *training* thread, so nothing slow may happen
there. This thread runs decode → refill → draw → gather ahead of the trainer and hands over finished
:class:`~dali_patches.engine.outputs.PatchBatch` objects through a small bounded queue: in steady state
neither side waits for the other.

It works in **rounds** of ``round_batches`` batches: the round's new images enter the cache, one
vectorised draw picks every batch's distinct images and anchors, one gather per part cuts all of
their patches, and one state snapshot records where the stream stands. The fixed host cost per batch
is then a fraction of a round's. On a GPU all of its CUDA work runs in order on one stream of its
own; batches carry an event that the consumer's stream waits on, and gathers write into an
:class:`~dali_patches.engine.outputs.OutputRing` whose buffers are rewritten only once released.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..config import SamplerConfig
from ..options import AnchorMode, Reuse
from ..sources.base import Source
from ..state import state_value
from .anchors import MaskAnchors, PointAnchors, UniformAnchors
from .backend import Backend, HostArray
from .cache import CachePlan, RingCache
from .decode import DecodeStage, decode_files
from .draw import Draws, RefillSchedule
from .feeder import DecodeFeeder
from .outputs import PatchBatch
from .pace import Pace
from .rounds import RoundCutter, RoundStates, round_batches

__all__ = ["Producer"]

log = logging.getLogger(__name__)

_POLL_S = 0.1  # how often a blocked thread checks for close()
_AHEAD_POLL_S = 0.01  # reuse="auto": how often a producer waiting for queue room looks for decoded images
HELD_GROUPS = 2  # GPU: decode batches of views awaiting their copies before the oldest is waited for
_PROGRESS_MIN_IMAGES = 500  # with progress=None, a warm-up this long gets a progress bar


@dataclass(frozen=True)
class _Failure:
    error: BaseException


class Producer:
    """Owns the decode stage, the cache, the draws and the output ring; runs them in one daemon thread.

    Args:
        columns: the main images' paths, then each companion's, aligned.
        config: the resolved :class:`~dali_patches.config.SamplerConfig`.
        backend: the device.
        plan: the cache's :class:`~dali_patches.engine.cache.CachePlan`.
        sizes: ``(heights, widths)`` of every main image as the catalog measured them (padded):
            a decode of another size means the file changed during the run, and it is set aside.
        progress: progress bar for the warm-up (``None``: only for long ones).
        points: ``POINTS`` anchors: source → ``(K, 2)`` centres.
        on_changed: called with the path of each file that decodes to another size than measured
            (the catalog then distrusts its index entry).
    """

    def __init__(self, columns: list[list[str]], config: SamplerConfig, backend: Backend, plan: CachePlan,
                 sizes: tuple[HostArray, HostArray], progress: bool | None = None,
                 points: dict[int, HostArray] | None = None, on_changed: Callable[[str], None] | None = None,
                 source: Source | None = None) -> None:
        self.config = config
        self.backend = backend
        self.columns = columns
        self.files = columns[0]
        self.source = source
        self._heights, self._widths = (np.asarray(v, np.int64) for v in sizes)
        self._pid = os.getpid()
        self.changed_files = 0  # set aside because they decoded to another size than measured
        self._on_changed = on_changed
        self._output: dict[str, Any] = {"exif": config.exif_orientation, "parts": [(p.channels, p.dtype) for p in config.parts],
                                        "hw_decoder_load": config.hw_decoder_load}
        self._stream = backend.new_stream()
        self.decoder = self._new_decoder()
        self.feeder = DecodeFeeder(self.decoder, backend, self._stream, self.feeder_capacity(config))
        self.cache = RingCache(backend, plan.capacity_bytes, plan.max_slots, parts=config.parts)
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, config.shard_id or 0]))
        self.draws = Draws(config.batch_size, config.allow_repeats, rng, self._anchor_policy(rng, points),
                           config.image_choice)
        auto = config.reuse is Reuse.AUTO
        self.schedule = RefillSchedule(config.batch_size, None if auto else float(config.reuse), config.min_reuse,
                                       config.max_reuse, slack=self.feeder.capacity)
        self.round_batches = round_batches(config, plan.warmup_images, self.feeder.capacity)
        self.pace = Pace()
        self.consumer_wait_s = 0.0  # time next() waited for the producer, after the first batch
        self._round_counts = (0, 0, 0)  # (batches made, of them distinct, images taken) after the last round
        self._since: dict[str, float] | None = None  # counters when the first batch was taken

        # Whole rounds cross the queue (one hand-off per round, not per batch: each blocking put or get
        # costs both threads a wake-up and a turn of the GIL); the consumer pops their batches locally.
        self.queue_rounds = -(-config.queue_depth // self.round_batches)
        self.queue: queue.Queue = queue.Queue(maxsize=self.queue_rounds)
        self._ready: deque[PatchBatch] = deque()  # consumer side: batches of the round being taken
        with backend.use(self._stream):  # device buffers come from the pool of the stream that writes them
            self.cutter = RoundCutter(backend, config, self.round_batches, self.queue_rounds)
        self.batches_made = 0
        self.distinct_batches = 0
        self.warmup_images = 0
        self.duplicate_decodes = 0  # decoded while still resident (cache ≳ shard), not inserted
        self.last_delivered = -1  # index of the last batch handed to a consumer
        self._states = RoundStates(self.round_batches)  # the state before each recent round
        self._skip = 0  # batches of the first round not to deliver (resumed mid-round)
        self._restored = False
        self._warmup_estimate = plan.warmup_images
        self._progress = plan.warmup_images >= _PROGRESS_MIN_IMAGES if progress is None else progress
        self._held: deque[tuple[Any, list[Any]]] = deque()  # GPU: (event, decoded views copied before it)
        self._holding: list[Any] = []
        self._release_every = config.decode_batch or 1  # GPU: views tied to an event per decode batch
        self._taken_ahead = 0  # reuse="auto": images inserted while waiting for queue room, for the next round
        self.host_s = {"refill": 0.0, "round": 0.0}  # producer time: inserting, and draw + gather + snapshot
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="dali-patches-producer", daemon=True)

    @staticmethod
    def feeder_capacity(config: SamplerConfig) -> int:
        """Images decoded ahead of the cache at most (two decode batches): their memory is on top of
        DALI's own queue (``max_memory`` counts it)."""
        return 2 * (config.decode_batch or 1)

    def _anchor_policy(self, rng: np.random.Generator, points: dict[int, HostArray] | None) -> UniformAnchors:
        cfg = self.config
        if cfg.anchors is AnchorMode.POINTS:
            return PointAnchors(cfg.patch_size, cfg.anchor_step, rng, points or {})
        if cfg.anchors in (AnchorMode.WEIGHTS, AnchorMode.POS_NEG):
            part = next(i for i, p in enumerate(cfg.parts) if p.name == cfg.anchor_mask)
            return MaskAnchors(cfg.patch_size, cfg.anchor_step, rng, self.backend, part,
                               cfg.pos_fraction if cfg.anchors is AnchorMode.POS_NEG else None)
        return UniformAnchors(cfg.patch_size, cfg.anchor_step, rng)

    # -- consumer side -----------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stream(self) -> Any:
        """The producer's CUDA stream (GPU; ``None`` on CPU): every copy and gather runs on it."""
        return self._stream

    @property
    def ring_bytes(self) -> int:
        """Bytes of the output ring (and the GPU staging) on the sampler's device."""
        return self.cutter.ring_bytes

    def start(self) -> None:
        if self._thread.ident is None and not self._stop.is_set():  # never started: a thread runs once
            self._thread.start()

    def get(self) -> PatchBatch:
        """The next finished batch; re-raises whatever stopped the producer, with its own type."""
        if os.getpid() != self._pid:
            msg = (f"this PatchSampler was created in process {self._pid} and is used in a forked child "
                   f"({os.getpid()}, e.g. a DataLoader worker): its producer thread and DALI pipelines do not "
                   "survive a fork. Iterate it in the main process (DataLoader num_workers=0, or "
                   "dali_patches.torch.DirectIterator), or create the sampler inside the worker")
            raise RuntimeError(msg)
        if self._closed:
            msg = "this sampler is closed; create a new PatchSampler"
            raise RuntimeError(msg)
        self.start()
        t0, fresh_round = time.perf_counter(), False
        while not self._ready:
            try:
                item = self.queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._closed:
                    msg = "this sampler was closed (close() from another thread) while waiting for a batch"
                    raise RuntimeError(msg) from None
                if not self._thread.is_alive():
                    msg = "the producer thread stopped without a reason; create a new PatchSampler"
                    raise RuntimeError(msg) from None
                continue
            if isinstance(item, _Failure):
                self.queue.put(item)  # every later call fails the same way
                raise item.error
            self._ready.extend(item)
            fresh_round = True
        batch = self._ready.popleft()
        self.last_delivered = batch.index
        if self._since is None:  # the first batch waited for the warm-up: not counted as a wait
            self._since = {**self._counters(), "time": time.perf_counter()}
        else:
            self.consumer_wait_s += time.perf_counter() - t0
        if fresh_round:
            self.pace.sample(self._counters())  # once a round, not once a batch
        return batch

    def close(self) -> None:
        """Stop the thread, drop the queue, the decode pipeline, the output ring and the arena."""
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
        self._ready.clear()
        self.feeder.close()
        self.backend.synchronize(self._stream)  # queued copies and gathers finish before their memory goes
        self.cutter.close()
        self.decoder.close()
        self._held.clear()
        self._holding.clear()
        self.cache.release()
        self.backend.free_pool_blocks(self._stream)

    # -- producer side -----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with self.backend.use(self._stream):
                if not self._restored:
                    self._warm_up()
                    self._snapshot(0)
                while not self._stop.is_set():
                    batches = self._make_round()
                    skip, self._skip = self._skip, 0
                    self._put(batches[skip:])
        except BaseException as e:  # handed to the consumer, which re-raises it
            if not self._stop.is_set():
                log.exception("producer failed")
                self._put(_Failure(e))

    def _put(self, item: object) -> None:
        ahead = self.schedule.auto and not isinstance(item, _Failure)
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=_AHEAD_POLL_S if ahead else _POLL_S)
                return
            except queue.Full:
                if ahead:
                    self._refill_ahead()

    def _refill_ahead(self) -> None:
        """``reuse="auto"``, while the trainer is slower than the producer: move every image the
        feeder has ready into the cache now rather than at the next round, so the decoder never waits
        for a round that the queue holds back. They count towards the next round's window (at most
        its ``most``), and the state before that round is taken again with them in it."""
        _, most = self.schedule.window(self.round_batches)
        room = min(most - self._taken_ahead, self.feeder.ready)
        if room <= 0:
            return
        t0 = time.perf_counter()
        taken = self.feeder.take(0, room)
        for source, images in taken:
            self._insert(source, images)
        self._taken_ahead += len(taken)
        self._release_decoded(self.backend.record(self._stream))
        self._snapshot(self.batches_made)
        self.host_s["refill"] += time.perf_counter() - t0

    def _insert(self, source: int, images: list[Any]) -> None:
        """Move a decoded image into the cache. A source still resident is not inserted twice (same
        decoder, same pixels): the ring then holds only distinct images, and the decode still counts
        towards the refill, so patches per decoded image stay ≈ ``reuse``."""
        if self.cache.holds(source):
            self.duplicate_decodes += 1
            return
        if source in self.decoder.broken:  # set aside (changed) after the feeder had decoded it again
            return
        decoded, images = images, self.cache.padded(images, self.config.patch_size)
        h, w = images[0].shape[:2]
        expected = self.cache.part_bytes(self._heights[source], self._widths[source])
        if (h, w) != (self._heights[source], self._widths[source]) or [p.nbytes for p in images] != expected:
            shapes = "x".join(map(str, images[0].shape[:2])) if len(images) == 1 else [tuple(p.shape) for p in images]
            self.feeder.mark_broken(source, f"changed during the run: it decodes to {shapes}, not the "
                                            f"{self._heights[source]}x{self._widths[source]} measured at the start "
                                            "(restart the sampler to sample its new contents)")
            self.changed_files += 1
            if self._on_changed is not None:
                self._on_changed(self.files[source])
            return
        slot = self.cache.insert(images, source)
        self.draws.anchors.on_insert(self.cache, slot)
        if self.backend.asynchronous:  # DALI's buffers (not the padded copies) must outlive the pending reads
            self._holding += decoded
            if len(self._holding) >= self._release_every:
                self._release_decoded(self.backend.record(self._stream))

    def _release_decoded(self, event: Any, wait: bool = False) -> None:
        """GPU: tie the decoded views read so far to ``event``; drop those whose reads are done (no
        host blocking unless more than ``HELD_GROUPS`` decode batches are pending, or ``wait``), so
        DALI gets its buffers back a decode batch at a time."""
        if self._holding:
            self._held.append((event, self._holding))
            self._holding = []
        while self._held and (wait or len(self._held) > HELD_GROUPS or self._held[0][0].done):
            event, views = self._held[0]  # the views stay referenced until their reads are known done
            event.synchronize()
            self._held.popleft()
            del views

    def _warm_up(self) -> None:
        """Fill the arena until the next image would evict one, or the shard has been decoded once."""
        shard = self.decoder.shard_size
        with tqdm(total=min(self._warmup_estimate, shard), desc="filling cache", unit="img",
                  disable=not self._progress, leave=False) as bar:
            while not self._stop.is_set() and self.feeder.taken < shard:
                _, image = self.feeder.peek()
                if self.cache.would_evict(self.cache.padded_bytes(image[0].shape, self.config.patch_size)):
                    break
                for source, images in self.feeder.take(1, 1):
                    self._insert(source, images)
                bar.update()
        self._release_decoded(self.backend.record(self._stream), wait=True)
        self.warmup_images = self.feeder.taken
        self._count_round()
        log.info("cache warm: %d images resident, %d bytes", self.cache.resident, self.cache.bytes_used)

    def _make_round(self) -> list[PatchBatch]:
        t0 = time.perf_counter()
        n, start = self.round_batches, self.batches_made
        least, most = self.schedule.window(n)  # fixed reuse: least == most
        ahead, self._taken_ahead = self._taken_ahead, 0
        least = max(0, least - ahead)
        taken = self.feeder.take(least, max(least, min(most - ahead, self.feeder.capacity)))
        for source, images in taken:
            self._insert(source, images)
        self.schedule.record(n, ahead + len(taken))
        t1 = time.perf_counter()
        draw = self.draws.draw_round(self.cache, n)
        self.cache.record_served(draw.slots)
        cuts, device_source, device_anchor = self.cutter.cut(self.cache, draw, self._stream)
        ready = self.backend.record(self._stream)
        self._release_decoded(ready)
        anchor = np.stack([draw.y, draw.x], axis=-1).astype(np.int32)
        names = [p.name for p in self.config.parts[1:]]
        batches = [PatchBatch(cuts[0][j], draw.source[j], anchor[j], start + j,
                              {name: cut[j] for name, cut in zip(names, cuts[1:])}, ready,
                              None if device_source is None else device_source[j],
                              None if device_anchor is None else device_anchor[j]) for j in range(n)]
        self.batches_made += n
        self.distinct_batches += int(draw.distinct.sum())
        self._count_round()
        self._snapshot(self.batches_made)
        self.host_s["refill"] += t1 - t0
        self.host_s["round"] += time.perf_counter() - t1
        self.pace.sample(self._counters())
        return batches

    # -- resumable state ---------------------------------------------------------------------
    def _new_decoder(self) -> DecodeStage:
        cfg = self.config
        return DecodeStage(self.columns, self.backend, batch_size=cfg.decode_batch or 1,
                           min_good=1 if cfg.allow_repeats else cfg.batch_size,
                           num_threads=cfg.num_threads or 1, seed=cfg.seed, shard_id=cfg.shard_id or 0,
                           num_shards=cfg.num_shards or 1, source=self.source, **self._output)

    def _snapshot(self, start: int) -> None:
        """Record the state before the round that starts at batch ``start`` (a few KiB)."""
        self._states.record(start, {
            "batches_made": self.batches_made, "distinct_batches": self.distinct_batches,
            "duplicate_decodes": self.duplicate_decodes, "warmup_images": self.warmup_images,
            "draws": self.draws.state_dict(), "refill": self.schedule.state_dict(),
            "decoder": self.feeder.state_dict(), "cache": self.cache.state_dict(), "taken_ahead": self._taken_ahead,
        })

    def state_after(self, index: int) -> dict[str, Any] | None:
        """The state after batch ``index`` as plain Python values (see :class:`RoundStates`);
        ``None`` before the first batch."""
        return self._states.after(index, self.batches_made)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_after` of an earlier producer over the same files and config.
        Every field is checked first (a damaged or edited state fails naming it, before anything
        changes). Re-decodes the images that were resident (their number × decode time) before the
        first batch."""
        if self._thread.is_alive() or self.batches_made:
            msg = "load_state_dict() must come before the first batch is drawn"
            raise RuntimeError(msg)
        where = "['stream']['round']"
        skip = state_value(state, "skip", "['stream']", int, 0, self.round_batches - 1)
        snapshot = state_value(state, "round", "['stream']", dict)
        counts = {name: state_value(snapshot, name, where, int, 0) for name in
                  ("batches_made", "distinct_batches", "duplicate_decodes", "warmup_images")}
        if counts["distinct_batches"] > counts["batches_made"]:
            msg = f"state {where}['distinct_batches'] exceeds ['batches_made']; load a state made by state_dict(), unchanged"
            raise ValueError(msg)
        taken_ahead = state_value(snapshot, "taken_ahead", where, int, 0) if "taken_ahead" in snapshot else 0
        for name in ("draws", "refill", "decoder", "cache"):
            state_value(snapshot, name, where, dict)
        # Everything is checked before anything changes: a refused state leaves this producer as it was.
        cache = self.cache.checked_state(snapshot["cache"], sources=len(self.files), where=f"{where}['cache']")
        rng = self.draws.checked_state(snapshot["draws"], where=f"{where}['draws']")
        refill = self.schedule.checked_state(snapshot["refill"], where=f"{where}['refill']")
        self.feeder.check_state(snapshot["decoder"], where=f"{where}['decoder']")
        self.cache.apply_state(cache)
        self.draws.rng.bit_generator.state = rng
        self.schedule.credit, self.schedule.owed, self.schedule.allowed = refill
        self.feeder.load_state_dict(snapshot["decoder"])
        resident = [[column[s] for s in snapshot["cache"]["source"]] for column in self.columns]

        def images() -> Any:
            for parts in decode_files(resident, self.backend, self.config.num_threads or 1, source=self.source,
                                      **self._output):
                yield self.cache.padded(parts, self.config.patch_size)
                self.backend.synchronize(self._stream)  # copied before DALI may reuse the buffer

        with self.backend.use(self._stream):
            self.cache.rewrite(images())
            for slot in self.cache.resident_slots():
                self.draws.anchors.on_insert(self.cache, slot)
        for name, value in counts.items():
            setattr(self, name, value)
        self._taken_ahead = taken_ahead
        self._skip = skip
        self.last_delivered = self.batches_made + self._skip - 1
        self._count_round()
        self._snapshot(self.batches_made)
        self._restored = True

    def _count_round(self) -> None:
        """Publish the counts after a round as one tuple, so that a ``stats()`` from another thread
        never pairs one round's counts with the last's."""
        self._round_counts = (self.batches_made, self.distinct_batches, self.feeder.taken)

    def _counters(self) -> dict[str, float]:
        made, _, taken = self._round_counts  # as of the last finished round: its takes and its patches together
        return {"served": made * self.config.batch_size, "taken": taken, "paused": self.feeder.paused_s, "wait": self.consumer_wait_s}

    def stats(self) -> dict[str, Any]:
        """Counters of the stream so far (batches made by the producer, possibly not yet consumed)."""
        cache, (made, distinct, decoded) = self.cache, self._round_counts
        served = made * self.config.batch_size
        return {
            **self.pace_stats(),
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
            "distinct_fraction": distinct / made if made else 1.0,
            "round_batches": self.round_batches,
            "producer_us_per_batch": 1e6 * self.host_s["round"] / made if made else 0.0,
            "refill_us_per_batch": 1e6 * self.host_s["refill"] / made if made else 0.0,
            "decode_failed_batches": self.decoder.failed_runs,
            "decode_lost_batches": self.decoder.lost_batches,
            "changed_files": self.changed_files,
            "anchor_fallbacks": self.draws.anchors.fallbacks,
            "broken_files": [(self.files[i], why) for i, why in self.decoder.broken_items()],
            "decode_errors": self.decoder.error_list(),
        }

    def pace_stats(self) -> dict[str, Any]:
        """How the two speeds met since the first batch and over the last 5 s (see
        :meth:`~dali_patches.engine.pace.Pace.figures`)."""
        return {"reuse_mode": "auto" if self.schedule.auto else "fixed",
                **self.pace.figures(self._counters(), self._since),
                "consumer_wait_s": self.consumer_wait_s, "decoder_paused_s": self.feeder.paused_s}
