"""Rounds: how many batches the producer makes at once, how a round's patches are cut, and the
resumable state of each round.

The producer draws and cuts ``round_batches`` batches at a time (see :mod:`dali_patches.engine.producer`).
Its state is taken once per round, before the round is made; the state *after* any batch is then the
snapshot of the round that holds the next batch plus how many of that round's batches were already
delivered — a restored producer replays the round and skips them, so resuming is exact at every
batch.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..config import SamplerConfig
from ..options import Reuse
from ..state import plain
from .backend import Backend
from .cache import RingCache
from .draw import RoundDraw
from .outputs import OutputRing

__all__ = ["RoundCutter", "RoundStates", "round_batches"]

log = logging.getLogger(__name__)

_ROUND_PATCHES = 8192  # a round cuts about this many patches ...
_MAX_ROUND = 16  # ... in at most this many batches ...
_ROUND_REFILL_SHARE = 8  # ... and inserts at most 1/8 of the images the cache typically holds
_STATES_KEPT = 64  # batches behind the newest whose state state_dict() can still give


def round_batches(config: SamplerConfig, typical_resident: int, most_taken: int) -> int:
    """Batches per round, from the config and the cache's typical occupancy (deterministic, so a
    resumed sampler cuts the same rounds): enough to amortise the host's fixed cost, few enough
    that a round's refill (``n × B / reuse`` images; with ``reuse="auto"`` at most ``most_taken``)
    stays a small share of the cache — images inserted and evicted within one refill would never be
    drawn."""
    if config.reuse is Reuse.AUTO:
        by_refill = _MAX_ROUND if most_taken * _ROUND_REFILL_SHARE <= typical_resident else 1
    else:
        by_refill = int(typical_resident * config.reuse // (_ROUND_REFILL_SHARE * config.batch_size))
    return max(1, min(_MAX_ROUND, _ROUND_PATCHES // config.batch_size, by_refill))


class RoundStates:
    """The producer's state before each recent round, keyed by the round's first batch; written by
    the producer thread, read by the consumer's ``state_dict()`` (hence the lock)."""

    def __init__(self, round_batches: int) -> None:
        self.round_batches = round_batches
        self._states: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def record(self, start: int, state: dict[str, Any]) -> None:
        """Keep ``state``, taken before the round starting at batch ``start``; forget those older
        than the latest ``_STATES_KEPT`` batches."""
        with self._lock:
            self._states[start] = state
            for old in [s for s in self._states if s < start - _STATES_KEPT - self.round_batches]:
                del self._states[old]

    def after(self, index: int, batches_made: int) -> dict[str, Any] | None:
        """``{"round": state, "skip": k}``: resuming from it continues right after batch ``index``.
        ``None`` before the first batch; an error for a batch whose round is no longer kept."""
        if index < 0:
            return None
        with self._lock:
            starts = [s for s in self._states if s <= index + 1]
            states = dict(self._states)
        if not starts or index + 1 - max(starts) >= self.round_batches or index >= batches_made:
            newest = batches_made - 1
            msg = (f"the state after batch {index} is not kept (batches {max(0, newest - _STATES_KEPT)}..{newest} "
                   "are); take state_dict() closer to the batches you consumed")
            raise RuntimeError(msg)
        start = max(starts)
        return {"round": plain(states[start]), "skip": index + 1 - start}


class _Staging:
    """One of the GPU cutter's two staging slots: a round's tables, ``source`` and ``anchor`` in pinned
    host memory, uploaded at once into a device copy of the same layout. The producer writes slot
    ``k`` again two rounds later, after ``uploaded`` (an event after its last upload) has completed —
    by then long since, so the host rarely waits."""

    def __init__(self, backend: Backend, parts: int, patches: int) -> None:
        table_bytes = parts * patches * 4 * 8
        nbytes = table_bytes + patches * (8 + 2 * 4)
        self.pinned = backend.pinned((nbytes,), np.uint8)
        self.device = backend.empty_device(nbytes, np.uint8)
        self.tables, self.source, self.anchor = self._split(self.pinned, parts, patches)
        self.device_tables, self.device_source, self.device_anchor = self._split(self.device, parts, patches)
        self.uploaded: Any = None

    @staticmethod
    def _split(raw: Any, parts: int, patches: int) -> tuple[Any, Any, Any]:
        t = parts * patches * 32
        return (raw[:t].view(np.int64).reshape(parts, patches, 4), raw[t: t + 8 * patches].view(np.int64),
                raw[t + 8 * patches:].view(np.int32).reshape(patches, 2))


class RoundCutter:
    """Cuts every patch of a round, per part: ``n`` batches of ``(B, h, w, C)``.

    On a GPU: one kernel launch per part, writing into an :class:`~dali_patches.engine.outputs.OutputRing`
    group; the round's tables, ``source`` and ``anchor`` go up in one asynchronous copy from pinned
    memory (double-buffered, so the host does not wait for the device), and ``source``/``anchor``
    are copied into the group beside the patches. Once a group is chosen (a released one, or a
    replacement from the pool) and before anything writes it, the producer's stream waits for every
    *consumer* stream (:meth:`add_consumer`: those that read batches directly, e.g. through DLPack):
    work a consumer queued on memory before letting go of it then runs first. In the other order a
    buffer released between the wait and the choice would be rewritten unordered. The DALI pipeline
    is no consumer in this sense: its copy is queued on the producer's own stream.

    On the host: NumPy passes into a ring group too (a buffer is rewritten only once nothing refers
    to it, so no round allocates fresh pages and the resident memory stays flat), which release the
    GIL: half the round on a helper thread, half on the calling one (random row reads are bound by
    memory latency, so two threads copy faster than one), and few, long calls mean few waits for the
    GIL while the consumer runs Python.
    """

    def __init__(self, backend: Backend, config: SamplerConfig, round_batches: int, queue_rounds: int) -> None:
        self.backend, self.parts = backend, config.parts
        self.patches = patches = round_batches * config.batch_size
        self._consumers: dict[int, Any] = {}  # GPU: stream handle → consumer stream
        self._lock = threading.Lock()
        # Rounds alive at once are those queued, the one being taken, the one being cut, and one DALI
        # may still be copying from; more only if a consumer keeps batches (then the ring grows).
        round_bytes = [patches * p.patch_bytes for p in config.parts]
        if backend.is_gpu:
            self._stages = [_Staging(backend, len(config.parts), patches) for _ in range(2)]
            self._turn = 0
            round_bytes.append(patches * 16)  # source and anchor on the device
        else:
            self._tables = np.empty((len(config.parts), patches, 4), np.int64)
        self._ring: OutputRing | None = OutputRing(backend, round_bytes, depth=queue_rounds + 3)
        self._helper = (ThreadPoolExecutor(1, thread_name_prefix="dali-patches-gather")
                        if not backend.is_gpu and (config.num_threads or 1) > 1 else None)

    @property
    def ring_bytes(self) -> int:
        """Bytes of the output ring (and, on a GPU, of the staging) on the sampler's device."""
        if self._ring is None:
            return 0
        return self._ring.nbytes + (sum(stage.device.nbytes for stage in self._stages) if self.backend.is_gpu else 0)

    def add_consumer(self, stream: Any) -> None:
        """Note a stream that reads batches directly (GPU): buffers are rewritten only after the work
        queued on it so far."""
        if stream is not None:
            with self._lock:
                self._consumers[int(getattr(stream, "ptr", id(stream)))] = stream

    def wait_for_consumers(self, stream: Any) -> None:
        """Make ``stream`` wait (on the device) for the work queued so far on every consumer stream. A
        consumer stream that no longer exists (its framework destroyed it) is dropped, with a warning."""
        with self._lock:
            consumers = list(self._consumers.items())
        for key, consumer in consumers:
            try:
                event = self.backend.record(consumer)
            except Exception as e:  # noqa: BLE001 - CUDA reports a destroyed stream in its own error types
                log.warning("stopped waiting for consumer stream %#x: recording on it failed (%s)", key, e)
                with self._lock:
                    self._consumers.pop(key, None)
                continue
            self.backend.wait(stream, event)

    def cut(self, cache: RingCache, draw: RoundDraw, stream: Any) -> tuple[list[Any], Any, Any]:
        """The round's patches per part, and on a GPU its ``source`` ``(n, B)`` and ``anchor``
        ``(n, B, 2)`` on the device (``None`` on the host); GPU work is queued on ``stream``."""
        n, b = draw.slots.shape
        slots, ys, xs = draw.slots.reshape(-1), draw.y.reshape(-1), draw.x.reshape(-1)
        if self._ring is None:
            msg = "this sampler is closed"
            raise RuntimeError(msg)
        if not self.backend.is_gpu:
            group = self._ring.acquire()
            return [self._cut_host(cache, k, cache.table(k, slots, ys, xs, out=self._tables[k]), n, b, group[k])
                    for k in range(len(self.parts))], None, None
        m = n * b
        stage = self._next_stage()
        for k in range(len(self.parts)):
            cache.table(k, slots, ys, xs, out=stage.tables[k])
        stage.source[:m] = draw.source.reshape(-1)
        stage.anchor[:m, 0], stage.anchor[:m, 1] = ys, xs
        stage.device.set(stage.pinned, stream)  # the cutter's own device memory: no consumer ever reads it
        stage.uploaded = self.backend.record(stream)
        # Choose the memory to write first (a released ring group, or a replacement from the pool, which
        # may hand out memory a consumer just dropped), then wait for the consumers: every read they
        # queued before letting go of that memory precedes the event, so it runs before the writes.
        group = self._ring.acquire()
        self.wait_for_consumers(stream)
        meta = group[-1]
        source = meta[: 8 * m].view(np.int64)
        anchor = meta[8 * self.patches: 8 * self.patches + 8 * m].view(np.int32)
        source[...] = stage.device_source[:m]
        anchor[...] = stage.device_anchor[:m].reshape(-1)
        out = []
        for k, part in enumerate(self.parts):  # one kernel launch per part
            cut = cache.cut(k, stage.tables[k][:m], out=group[k], device_table=stage.device_tables[k][:m])
            out.append(cut.reshape(n, b, *part.patch_shape))
        return out, source.reshape(n, b), anchor.reshape(n, b, 2)

    def recut(self, cache: RingCache, draw: RoundDraw, cuts: list[Any], source: Any, anchor: Any,
              positions: Any) -> None:
        """Cut the patches at ``positions`` (flat indices into the round) again, after their slots or
        anchors in ``draw`` changed, into the same memory: on the host those patches alone, on a GPU
        the whole round (one launch per part, queued on the current stream, as ordered as the first
        cut) with its ``source`` and ``anchor``."""
        slots, ys, xs = draw.slots.reshape(-1), draw.y.reshape(-1), draw.x.reshape(-1)
        if not self.backend.is_gpu:
            for k, part in enumerate(self.parts):
                cuts[k].reshape(-1, *part.patch_shape)[positions] = cache.cut(k, cache.table(k, slots[positions],
                                                                                          ys[positions], xs[positions]))
            return
        xp = self.backend.xp
        for k in range(len(self.parts)):
            cache.cut(k, cache.table(k, slots, ys, xs), out=cuts[k].reshape(-1).view(np.uint8))
        source[...] = xp.asarray(draw.source.reshape(source.shape))
        anchor[...] = xp.asarray(np.stack([draw.y, draw.x], axis=-1).astype(np.int32).reshape(anchor.shape))

    def split(self, work: Callable[[int, int], None], count: int) -> None:
        """Run ``work(start, stop)`` over ``range(count)``: on the host with a helper thread, its
        first half there and the rest here (NumPy releases the GIL); else all here."""
        half = count // 2 if self._helper is not None and count > 1 else 0
        first = None
        if half:
            try:
                first = self._helper.submit(work, 0, half)  # type: ignore[union-attr]
            except RuntimeError:  # the interpreter is exiting (executors refuse work): all of it here, from now on
                self._helper, half = None, 0
        work(half, count)
        if first is not None:
            first.result()

    def _next_stage(self) -> _Staging:
        """The staging slot to fill now, once its upload two rounds ago has left the pinned memory."""
        stage = self._stages[self._turn]
        self._turn = 1 - self._turn
        if stage.uploaded is not None:
            stage.uploaded.synchronize()
        return stage

    def _cut_host(self, cache: RingCache, k: int, table: Any, n: int, b: int, buffer: Any) -> Any:
        """One part of a round on the host, into ``buffer``, split by batches (:meth:`split`).
        Returns ``(n, B, h, w, C)``."""
        part = self.parts[k]

        def work(start: int, stop: int) -> None:  # batches [start, stop)
            cache.cut(k, table[start * b: stop * b], None, buffer[start * b * part.patch_bytes: stop * b * part.patch_bytes])

        self.split(work, n)
        return buffer[: len(table) * part.patch_bytes].view(np.dtype(part.dtype)).reshape(n, b, *part.patch_shape)

    def close(self) -> None:
        """Stop the helper; drop the ring and the staging (the producer's stream is synchronised)."""
        if self._helper is not None:
            self._helper.shutdown()
        if self._ring is not None:
            self._ring.release()
        self._ring = None
        self._stages = []
