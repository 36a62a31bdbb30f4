"""Producer: the thread that runs the batch maker ahead of the trainer, and the queue between them.

DALI calls an ``external_source`` callback on the *training* thread, so nothing slow may happen
there. This thread runs the :class:`~dali_patches.engine.maker.BatchMaker` — decode → refill →
draw → gather, a round at a time — and hands over finished
:class:`~dali_patches.engine.outputs.PatchBatch` objects through a small bounded queue of whole
rounds: in steady state neither side waits for the other. On a GPU all of the maker's CUDA work runs
in order on one stream of its own; batches carry an event that the consumer's stream waits on.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..catalog.catalog import Catalog
from ..config import SamplerConfig
from .backend import Backend, HostArray
from .content import ContentAnchors
from .feeder import POLL_S
from .maker import BatchMaker
from .outputs import PatchBatch
from .pace import Pace

__all__ = ["Producer"]

log = logging.getLogger(__name__)

_AHEAD_POLL_S = 0.01  # reuse="auto": how often a producer waiting for queue room looks for decoded images


@dataclass(frozen=True)
class _Failure:
    error: BaseException


class Producer:
    """Runs a :class:`~dali_patches.engine.maker.BatchMaker` in one daemon thread and hands its
    batches to the consumer.

    Args:
        catalog, config, backend, progress, points: what the maker is built from (see there).
    """

    def __init__(self, catalog: Catalog, config: SamplerConfig, backend: Backend, progress: bool | None = None,
                 points: dict[int, HostArray] | None = None) -> None:
        self.config, self.backend = config, backend
        self.maker = BatchMaker(catalog, config, backend, progress, points)
        self._pid = os.getpid()
        self.pace = Pace()
        self.consumer_wait_s = 0.0  # time get() waited for the producer, after the first batch
        self._since: dict[str, float] | None = None  # counters when the first batch was taken
        self.queue: queue.Queue = queue.Queue(maxsize=self.maker.queue_rounds)
        self._ready: deque[PatchBatch] = deque()  # consumer side: batches of the round being taken
        self.last_delivered = -1  # index of the last batch handed to a consumer
        self._skip = 0  # batches of the first round not to deliver (resumed mid-round)
        self._restored = False
        self._stop = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="dali-patches-producer", daemon=True)

    # -- consumer side -----------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stream(self) -> Any:
        """The maker's CUDA stream (GPU; ``None`` on CPU): every copy and gather runs on it."""
        return self.maker.stream

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
                item = self.queue.get(timeout=POLL_S)
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
        """Stop the thread, drop the queue and the maker (its decode pipeline, output ring and arena)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self.queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=POLL_S)
        self.queue = queue.Queue()
        self._ready.clear()
        self.maker.close()

    # -- producer side -----------------------------------------------------------------------
    def _run(self) -> None:
        maker = self.maker
        try:
            with self.backend.use(maker.stream):
                if not self._restored:
                    maker.warm_up(self._stop)
                while not self._stop.is_set():
                    batches = maker.make_round()
                    self.pace.sample(self._counters())
                    skip, self._skip = self._skip, 0
                    self._put(batches[skip:])
        except BaseException as e:  # handed to the consumer, which re-raises it
            if not self._stop.is_set():
                log.debug("producer failed", exc_info=True)  # the consumer raises it with its type and message
                self._put(_Failure(e))

    def _put(self, item: object) -> None:
        ahead = self.maker.schedule.auto and not isinstance(item, _Failure)
        while not self._stop.is_set():
            try:
                self.queue.put(item, timeout=_AHEAD_POLL_S if ahead else POLL_S)
                return
            except queue.Full:
                if ahead:
                    self.maker.refill_ahead()

    # -- resumable state ---------------------------------------------------------------------
    def state_after(self, index: int) -> dict[str, Any] | None:
        """The state after batch ``index`` (see :meth:`BatchMaker.state_after`)."""
        return self.maker.state_after(index)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_after` of an earlier producer over the same items and config
        (see :meth:`BatchMaker.load_state_dict`), before the first batch."""
        if self._thread.is_alive() or self.maker.counts.batches_made:
            msg = "load_state_dict() must come before the first batch is drawn"
            raise RuntimeError(msg)
        self._skip = self.maker.load_state_dict(state)
        self.last_delivered = self.maker.counts.batches_made + self._skip - 1
        self._restored = True

    # -- figures -----------------------------------------------------------------------------
    def _counters(self) -> dict[str, float]:
        made, _, taken = self.maker.round_counts  # as of the last finished round: its takes and its patches together
        return {"made": made * self.config.batch_size, "taken": taken, "paused": self.maker.feeder.paused_s,
                "wait": self.consumer_wait_s}

    def stats(self) -> dict[str, Any]:
        """Counters of the stream so far (batches made by the producer, possibly not yet consumed)."""
        maker = self.maker
        cache, (made, distinct, decoded) = maker.cache, maker.round_counts
        patches = made * self.config.batch_size
        delivered = (self.last_delivered + 1) * self.config.batch_size
        return {
            **self.pace_stats(),
            "batches_made": made,
            "patches_made": patches,
            "patches_delivered": delivered,
            "images_decoded": decoded,
            "warmup_images": maker.counts.warmup_images,
            "reader_epochs": decoded / maker.decoder.shard_size if maker.decoder.shard_size else 0.0,
            "resident_images": cache.resident,
            "duplicate_decodes": maker.counts.duplicate_decodes,
            "cache_bytes": cache.capacity_bytes,
            "cache_bytes_used": cache.bytes_used,
            "mean_reuse": patches / decoded if decoded else 0.0,
            "patches_per_residence": cache.evicted_served / cache.evicted if cache.evicted else 0.0,
            "distinct_fraction": distinct / made if made else 1.0,
            "round_batches": maker.round_batches,
            "producer_us_per_batch": 1e6 * maker.host_s["round"] / made if made else 0.0,
            "refill_us_per_batch": 1e6 * maker.host_s["refill"] / made if made else 0.0,
            "decode_failed_batches": maker.decoder.failed_runs,
            "decode_lost_batches": maker.decoder.lost_batches,
            "changed_files": maker.changed_files,
            "anchor_fallbacks": maker.draws.anchors.fallbacks,
            **self._content_stats(),
            "broken_files": [(maker.catalog.files[i], why) for i, why in maker.decoder.broken_items()],
            "decode_errors": maker.decoder.error_list(),
        }

    def _content_stats(self) -> dict[str, Any]:
        """``anchors="content"``: ``{"content": ...}`` (see :meth:`ContentAnchors.stats`) with the
        ``set_aside_files`` as ``(file, why)``; nothing otherwise."""
        anchors, files = self.maker.draws.anchors, self.maker.catalog.files
        if not isinstance(anchors, ContentAnchors):
            return {}
        aside = dict(anchors.set_aside)  # a copy: the producer thread may add to it
        return {"content": {**anchors.stats(), "set_aside_files": [(files[i], why) for i, why in sorted(aside.items())]}}

    def pace_stats(self) -> dict[str, Any]:
        """How the two speeds met since the first batch and over the last 5 s (see
        :meth:`~dali_patches.engine.pace.Pace.figures`)."""
        return {"reuse": self.config.reuse.value if hasattr(self.config.reuse, "value") else self.config.reuse,
                **self.pace.figures(self._counters(), self._since),
                "consumer_wait_s": self.consumer_wait_s, "decoder_paused_s": self.maker.feeder.paused_s}
