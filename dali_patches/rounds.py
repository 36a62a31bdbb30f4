"""Rounds: how many batches the producer makes at once, how a round's patches are cut, and the
resumable state of each round.

The producer draws and cuts ``round_batches`` batches at a time (see :mod:`dali_patches.producer`).
Its state is taken once per round, before the round is made; the state *after* any batch is then the
snapshot of the round that holds the next batch plus how many of that round's batches were already
delivered — a restored producer replays the round and skips them, so resuming is exact at every
batch.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .backend import Backend
from .cache import RingCache
from .config import SamplerConfig
from .draw import RoundDraw
from .options import Reuse
from .outputs import OutputRing

__all__ = ["RoundCutter", "RoundStates", "round_batches"]

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


def _plain(value: Any) -> Any:
    """``value`` with NumPy arrays turned into lists, recursively (JSON- and ``torch.save``-able)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value.tolist() if isinstance(value, np.ndarray) else value


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
        return {"round": _plain(states[start]), "skip": index + 1 - start}


class RoundCutter:
    """Cuts every patch of a round, per part: ``n`` batches of ``(B, h, w, C)``. On a GPU one kernel
    launch per part into an :class:`~dali_patches.outputs.OutputRing` buffer, its tables uploaded
    at once from pinned memory. On the host NumPy passes, which release the GIL: half the round on
    a helper thread, half on the calling one (random row reads are bound by memory latency, so two
    threads copy faster than one), and few, long calls mean few waits for the GIL while the
    consumer runs Python."""

    def __init__(self, backend: Backend, config: SamplerConfig, round_batches: int, queue_rounds: int) -> None:
        self.backend, self.parts = backend, config.parts
        patches = round_batches * config.batch_size
        self._pinned_table = backend.pinned((len(config.parts), patches, 4), np.int64)
        self._table_uploaded: Any = None  # GPU: event after the last table upload from pinned memory
        # GPU: rounds alive at once are those queued, the one being taken, the one being cut, and one
        # DALI may still be copying from; more only if a consumer keeps batches (then the ring grows).
        self._ring = (OutputRing(backend, [patches * p.patch_bytes for p in config.parts], depth=queue_rounds + 3)
                      if backend.is_gpu else None)
        self._helper = (ThreadPoolExecutor(1, thread_name_prefix="dali-patches-gather")
                        if not backend.is_gpu and (config.num_threads or 1) > 1 else None)
        self.consumer_stream: Any = None  # GPU: the stream the consumer reads batches on

    @property
    def ring_bytes(self) -> int:
        """Device bytes of the output ring (GPU; 0 on CPU, where each round is allocated afresh)."""
        return self._ring.nbytes if self._ring is not None else 0

    def cut(self, cache: RingCache, draw: RoundDraw, stream: Any) -> list[Any]:
        """The round's patches, per part (GPU work queued on ``stream``)."""
        n, b = draw.slots.shape
        slots, ys, xs = draw.slots.reshape(-1), draw.y.reshape(-1), draw.x.reshape(-1)
        if self._table_uploaded is not None:
            self._table_uploaded.synchronize()  # the previous upload has left the pinned buffer
        tables = [cache.table(k, slots, ys, xs, out=self._pinned_table[k]) for k in range(len(self.parts))]
        group: list[Any] = [None] * len(tables)
        device_tables: list[Any] = [None] * len(tables)
        if self._ring is not None:  # GPU: upload every table at once, reuse released buffers only
            uploaded = self.backend.xp.asarray(self._pinned_table[:, : len(slots)])
            self._table_uploaded = self.backend.record(stream)
            device_tables = list(uploaded)
            group = self._ring.acquire()
            if self.consumer_stream is not None:  # work the consumer queued on a released buffer comes first
                self.backend.wait(stream, self.backend.record(self.consumer_stream))
        out = []
        for k, part in enumerate(self.parts):  # one gather per part: a kernel launch, or host passes
            if self._helper is not None and n > 1:  # host: the round's first half on the helper thread
                half = n // 2
                try:
                    first = self._helper.submit(cache.cut, k, tables[k][: half * b])
                except RuntimeError:  # the interpreter is exiting (executors refuse work): cut it here
                    self._helper = None
                    out.append(cache.cut(k, tables[k]).reshape(n, b, *part.patch_shape))
                    continue
                second = cache.cut(k, tables[k][half * b:]).reshape(n - half, b, *part.patch_shape)
                out.append([*first.result().reshape(half, b, *part.patch_shape), *second])
                continue
            cut = cache.cut(k, tables[k], out=group[k], device_table=device_tables[k])
            out.append(cut.reshape(n, b, *part.patch_shape))
        return out

    def close(self) -> None:
        if self._helper is not None:
            self._helper.shutdown()
        self._ring = None
