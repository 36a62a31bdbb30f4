"""Rounds: how many batches the producer makes at once, and the resumable state of each round.

The producer draws and cuts ``round_batches`` batches at a time (see :mod:`dali_patches.producer`).
Its state is taken once per round, before the round is made; the state *after* any batch is then the
snapshot of the round that holds the next batch plus how many of that round's batches were already
delivered — a restored producer replays the round and skips them, so resuming is exact at every
batch.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .config import SamplerConfig

__all__ = ["RoundStates", "round_batches"]

_ROUND_PATCHES = 8192  # a round cuts about this many patches ...
_MAX_ROUND = 16  # ... in at most this many batches ...
_ROUND_REFILL_SHARE = 8  # ... and inserts at most 1/8 of the images the cache typically holds
_STATES_KEPT = 64  # batches behind the newest whose state state_dict() can still give


def round_batches(config: SamplerConfig, typical_resident: int) -> int:
    """Batches per round, from the config and the cache's typical occupancy (deterministic, so a
    resumed sampler cuts the same rounds): enough to amortise the host's fixed cost, few enough
    that a round's refill (``n × B / reuse`` images) stays a small share of the cache — images
    inserted and evicted within one refill would never be drawn."""
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
