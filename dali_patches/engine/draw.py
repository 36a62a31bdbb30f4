"""draw: which resident images the batches of a round use, where their patches sit, and how fast to refill.

A round is ``n`` consecutive batches drawn at once, after the round's new images entered the cache:
``batch_size`` distinct resident images per batch (uniformly, or with inclusion probability in
proportion to their area), one anchor in each (see :mod:`dali_patches.engine.anchors`), and provenance
``(source, y, x)`` for every patch. Every step is one array operation over the whole round. The
refill schedule adds ``batch_size / reuse`` new images per batch on average (fractions carried over),
so each decoded image serves ``reuse`` patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..options import ImageChoice
from ..state import state_value
from .anchors import AnchorPolicy
from .backend import HostArray
from .cache import RingCache

__all__ = ["Draws", "RefillSchedule", "RoundDraw", "inclusion_probabilities"]


def inclusion_probabilities(weights: HostArray, k: int) -> HostArray:
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
    """How many freshly decoded images enter the cache before each round.

    A fixed ``reuse``: ``batch_size / reuse`` per batch on average, as a deterministic running credit
    (e.g. reuse 32, B 256 → 8 per batch; B 100 → 3, 3, 3, 4, ...), the same count however fast the
    decoder is. ``reuse=None`` (auto): any count within the bounds, kept as two running balances —
    images still ``owed`` to stay at or under ``max_reuse`` patches per image, and images ``allowed``
    before dropping under ``min_reuse``. Each banks at most ``slack`` images (two decode batches:
    DALI hands images over a decode batch at a time, and a burst taken ahead must pay for the
    rounds after it), so over any run of rounds ``patches ≤ max_reuse × (images + slack)`` and
    ``patches ≥ min_reuse × (images − slack)``: a fast phase cannot pay for a later burst past
    ``max_reuse``, nor a pause for one under ``min_reuse``.
    """

    def __init__(self, batch_size: int, reuse: float | None, min_reuse: float = 1.0,
                 max_reuse: float | None = None, slack: int = 16) -> None:
        self.batch_size, self.auto = batch_size, reuse is None
        self.rate = batch_size / reuse if reuse is not None else 0.0
        self.min_reuse, self.max_reuse, self.slack = min_reuse, max_reuse, slack
        self.credit = 0.0
        self.owed = 0.0  # auto: images to take before max_reuse is exceeded (negative: taken ahead)
        self.allowed = 0.0  # auto: images that may be taken before min_reuse is undercut

    def next(self, batches: int = 1) -> int:
        """Images to insert before the next ``batches`` batches (fixed reuse)."""
        total = 0
        for _ in range(batches):
            self.credit += self.rate
            n = int(self.credit + 1e-9)
            self.credit -= n
            total += n
        return total

    def window(self, batches: int) -> tuple[int, int]:
        """``(at least, at most)`` images to take before the next ``batches`` batches; equal with a
        fixed reuse."""
        if not self.auto:
            n = self.next(batches)
            return n, n
        patches = batches * self.batch_size
        least = math.ceil(self.owed + patches / self.max_reuse - 1e-9) if self.max_reuse else 0
        most = math.floor(self.allowed + patches / self.min_reuse + 1e-9)
        return max(0, least), max(0, least, most)

    def record(self, batches: int, taken: int) -> None:
        """A round of ``batches`` batches was drawn after taking ``taken`` images."""
        if not self.auto:
            return
        patches = batches * self.batch_size
        if self.max_reuse:
            self.owed = max(self.owed + patches / self.max_reuse - taken, -self.slack)
        self.allowed = min(self.allowed + patches / self.min_reuse - taken, self.slack)

    def state_dict(self) -> dict[str, Any]:
        return {"credit": self.credit, "owed": self.owed, "allowed": self.allowed}

    def load_state_dict(self, state: dict[str, Any], where: str = "['refill']") -> None:
        self.apply_state(self.check_state(state, where))

    def apply_state(self, checked: tuple[float, float, float]) -> None:
        """Take a :meth:`check_state`'s values."""
        self.credit, self.owed, self.allowed = checked

    def check_state(self, state: dict[str, Any], where: str = "['refill']") -> tuple[float, float, float]:
        """``(credit, owed, allowed)`` of a saved state, checked; nothing changes."""
        credit = state_value(state, "credit", where, float, 0.0, self.rate + 1)
        owed = state_value(state, "owed", where, float) if "owed" in state else 0.0
        return credit, owed, state_value(state, "allowed", where, float) if "allowed" in state else 0.0


@dataclass(frozen=True)
class RoundDraw:
    """One round's choice: ``(n, B)`` host arrays; ``slots`` index the cache's slot table."""

    slots: HostArray
    source: HostArray  # int64, index into the catalog's files
    y: HostArray  # int64, top row of each patch
    x: HostArray  # int64, left column of each patch

    @property
    def distinct(self) -> HostArray:
        """``(n,) bool``: whether each batch's sources are all different."""
        ordered = np.sort(self.source, axis=1)
        return (ordered[:, 1:] != ordered[:, :-1]).all(axis=1)


class Draws:
    """Draws rounds of batches from a :class:`RingCache`.

    Args:
        batch_size: patches per batch.
        allow_repeats: when fewer than ``batch_size`` images are resident, repeat images as evenly as
            possible instead of failing.
        rng: the only source of randomness (seeded by the caller); its state is this object's state.
        image_choice: :class:`ImageChoice`; ``AREA`` includes each resident image with probability
            ∝ its area (systematic sampling over a random order: exactly ``batch_size`` distinct).
        anchors: where to cut in each image (shares ``rng``).
    """

    def __init__(self, batch_size: int, allow_repeats: bool, rng: np.random.Generator,
                 anchors: AnchorPolicy, image_choice: ImageChoice = ImageChoice.UNIFORM) -> None:
        self.batch_size = batch_size
        self.allow_repeats = allow_repeats
        self.rng = rng
        self.image_choice = ImageChoice(image_choice)
        self.anchors = anchors

    def _uniform(self, n: int, r: int) -> HostArray:
        """``(n, B)`` distinct picks per row among ``r``: the ``B`` smallest of ``r`` random keys."""
        keys = self.rng.random((n, r))
        return np.argpartition(keys, self.batch_size - 1, axis=1)[:, : self.batch_size] if self.batch_size < r \
            else np.argsort(keys, axis=1)

    def _by_area(self, cache: RingCache, resident: HostArray, n: int) -> HostArray:
        """Systematic sampling with probabilities ∝ area, over a fresh random order per batch; the
        ``n`` rows are searched at once by stacking their cumulative sums (each ends at ``B``)."""
        b, r = self.batch_size, len(resident)
        h, w = cache.sizes(resident)
        pi = inclusion_probabilities((h * w).astype(np.float64), b)
        order = np.argsort(self.rng.random((n, r)), axis=1)
        cumulative = np.cumsum(pi[order], axis=1)
        cumulative[:, -1] = b  # exact, so that stacked rows stay apart
        shift = (np.arange(n) * (b + 1))[:, None]
        points = np.minimum(self.rng.random((n, 1)) + np.arange(b), b - 1e-9) + shift
        picks = np.searchsorted((cumulative + shift).reshape(-1), points.reshape(-1), side="right").reshape(n, b)
        return np.take_along_axis(order, picks - (np.arange(n) * r)[:, None], axis=1)

    def draw_round(self, cache: RingCache, n: int) -> RoundDraw:
        """``n`` batches from the images resident now."""
        resident = self.anchors.drawable(cache, cache.resident_slots())
        b, r = self.batch_size, len(resident)
        if r >= b and self.image_choice is ImageChoice.AREA:
            picks = self._by_area(cache, resident, n)
        elif r >= b:
            picks = self._uniform(n, r)
        elif self.allow_repeats and r:
            # each image ⌊B/r⌋ or ⌈B/r⌉ times, in random order
            cycle = np.argsort(self.rng.random((n, r)), axis=1)[:, np.arange(b) % r]
            picks = np.take_along_axis(cycle, np.argsort(self.rng.random((n, b)), axis=1), axis=1)
        else:
            msg = (f"only {r} images are resident but batch_size={b} distinct images are needed; "
                   "raise cache_bytes or pass allow_repeats=True")
            raise RuntimeError(msg)
        slots = resident[picks]
        y, x = self.anchors.draw(cache, slots.reshape(-1))
        return RoundDraw(slots, cache.sources(slots), y.reshape(n, b), x.reshape(n, b))

    def state_dict(self) -> dict[str, Any]:
        anchors = self.anchors.state_dict()
        return {"rng": self.rng.bit_generator.state, **({"anchors": anchors} if anchors else {})}

    def load_state_dict(self, state: dict[str, Any], where: str = "['draws']") -> None:
        self.apply_state(self.check_state(state, where))

    def apply_state(self, checked: dict[str, Any]) -> None:
        """Take a :meth:`check_state`'s generator state (and the anchor policy's)."""
        self.rng.bit_generator.state = checked["rng"]
        if "anchors" in checked:
            self.anchors.apply_state(checked["anchors"])

    def check_state(self, state: dict[str, Any], where: str = "['draws']") -> dict[str, Any]:
        """The generator state of a saved state, checked on a generator of its own, and the anchor
        policy's state when it keeps one; nothing changes."""
        keeps = bool(self.anchors.state_dict())
        anchors = self.anchors.check_state(state_value(state, "anchors", where, dict), f"{where}['anchors']") if keeps else None
        saved = state_value(state, "rng", where, dict)
        kind = type(self.rng.bit_generator)
        if saved.get("bit_generator") != kind.__name__:
            msg = (f"state {where}['rng'] is not a {kind.__name__} state; load a state made by state_dict() of the "
                   "same version, unchanged")
            raise ValueError(msg)
        try:
            kind().state = saved
        except (TypeError, ValueError, KeyError) as e:
            msg = f"state {where}['rng'] is damaged ({e}); load a state made by state_dict() of the same version"
            raise ValueError(msg) from None
        return {"rng": saved, **({"anchors": anchors} if keeps else {})}
