"""Sampler: which resident images each batch uses, where its patches sit, and how fast to refill.

Per batch: ``batch_size`` distinct resident images (uniformly, or with inclusion probability in
proportion to their area), one anchor in each (see :mod:`dali_patches.anchors`), and provenance
``(source, y, x)`` for every patch. The refill schedule adds ``batch_size / reuse`` new
images per batch on average (fractions carried over), so each decoded image serves ``reuse`` patches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anchors import UniformAnchors
from .cache import RingCache
from .options import ImageChoice

__all__ = ["Draw", "RefillSchedule", "Sampler", "inclusion_probabilities"]


def inclusion_probabilities(weights: np.ndarray, k: int) -> np.ndarray:
    """``(n,)`` probabilities ``π`` with ``Σπ = k``, ``π ≤ 1``, and ``π ∝ weights`` except where
    capped at 1 (an image bigger than ``1/k`` of the resident area is in every batch)."""
    pi = np.zeros(len(weights))
    free = np.ones(len(weights), bool)
    while True:
        pi[free] = (k - (~free).sum()) * weights[free] / weights[free].sum()
        over = free & (pi >= 1)
        if not over.any():
            return pi
        pi[over], free[over] = 1.0, False


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
        image_choice: :class:`ImageChoice`; ``AREA`` includes each resident image with probability
            ∝ its area (systematic sampling over a random order: exactly ``batch_size`` distinct).
        anchors: where to cut in each image; default uniform.
    """

    def __init__(self, batch_size: int, patch_size: tuple[int, int], allow_repeats: bool,
                 rng: np.random.Generator, image_choice: ImageChoice = ImageChoice.UNIFORM,
                 anchors: UniformAnchors | None = None) -> None:
        self.batch_size = batch_size
        self.patch_size = patch_size
        self.allow_repeats = allow_repeats
        self.rng = rng
        self.image_choice = ImageChoice(image_choice)
        self.anchors = anchors or UniformAnchors(patch_size, 1, rng)

    def _by_area(self, cache: RingCache, resident: np.ndarray) -> np.ndarray:
        area = (cache.height[resident] * cache.width[resident]).astype(np.float64)
        order = self.rng.permutation(len(resident))
        cumulative = np.cumsum(inclusion_probabilities(area, self.batch_size)[order])
        points = self.rng.random() + np.arange(self.batch_size)
        picks = np.searchsorted(cumulative, np.minimum(points, cumulative[-1] - 1e-9), side="right")
        return resident[order[picks]]

    def draw(self, cache: RingCache) -> Draw:
        resident = cache.resident_slots()
        b = self.batch_size
        if len(resident) >= b and self.image_choice is ImageChoice.AREA:
            slots = self._by_area(cache, resident)
        elif len(resident) >= b:
            slots = resident[self.rng.choice(len(resident), size=b, replace=False)]
        elif self.allow_repeats and len(resident):
            slots = np.resize(self.rng.permutation(resident), b)  # each image ⌊B/n⌋ or ⌈B/n⌉ times
            self.rng.shuffle(slots)
        else:
            msg = (f"only {len(resident)} images are resident but batch_size={b} distinct images are needed; "
                   "raise cache_bytes or pass allow_repeats=True")
            raise RuntimeError(msg)
        y, x = self.anchors.draw(cache, slots)
        return Draw(slots, cache.source[slots].copy(), y, x)
