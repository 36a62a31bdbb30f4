"""Sampler: which resident images each batch uses, where its patches sit, and how fast to refill.

Per batch: ``batch_size`` distinct resident images (uniformly), one uniform anchor in each, and
provenance ``(source, y, x)`` for every patch. The refill schedule adds ``batch_size / reuse`` new
images per batch on average (fractions carried over), so each decoded image serves ``reuse`` patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cache import RingCache

__all__ = ["Draw", "RefillSchedule", "Sampler"]


class RefillSchedule:
    """How many freshly decoded images enter the cache before each batch: ``batch_size / reuse``
    on average, as a deterministic running credit (e.g. reuse 32, B 256 → 8 per batch; B 100 →
    3, 3, 3, 4, ...)."""

    def __init__(self, batch_size: int, reuse: float) -> None:
        self.rate = batch_size / reuse
        self.credit = 0.0

    def next(self) -> int:
        self.credit += self.rate
        n = int(self.credit + 1e-9)
        self.credit -= n
        return n


@dataclass(frozen=True)
class Draw:
    """One batch's choice. All ``(B,)`` host arrays; ``slots`` index the cache's slot table."""

    slots: np.ndarray
    source: np.ndarray  # int64, index into the catalog's files
    y: np.ndarray  # int64, top row of each patch
    x: np.ndarray  # int64, left column of each patch


class Sampler:
    """Draws batches from a :class:`RingCache`.

    Args:
        batch_size: patches per batch.
        patch_size: ``(patch_h, patch_w)``.
        allow_repeats: when fewer than ``batch_size`` images are resident, repeat images as evenly as
            possible instead of failing.
        rng: the only source of randomness (seeded by the caller).
    """

    def __init__(self, batch_size: int, patch_size: tuple[int, int], allow_repeats: bool,
                 rng: np.random.Generator) -> None:
        self.batch_size = batch_size
        self.patch_size = patch_size
        self.allow_repeats = allow_repeats
        self.rng = rng

    def draw(self, cache: RingCache) -> Draw:
        resident = cache.resident_slots()
        b = self.batch_size
        if len(resident) >= b:
            slots = resident[self.rng.choice(len(resident), size=b, replace=False)]
        elif self.allow_repeats and len(resident):
            slots = np.resize(self.rng.permutation(resident), b)  # each image ⌊B/n⌋ or ⌈B/n⌉ times
            self.rng.shuffle(slots)
        else:
            msg = (f"only {len(resident)} images are resident but batch_size={b} distinct images are needed; "
                   "raise cache_bytes or pass allow_repeats=True")
            raise RuntimeError(msg)
        h, w = cache.height[slots], cache.width[slots]
        y = self.rng.integers(0, h - self.patch_size[0] + 1)
        x = self.rng.integers(0, w - self.patch_size[1] + 1)
        return Draw(slots, cache.source[slots].copy(), y, x)
