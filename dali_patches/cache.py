"""RingCache: decoded images in one preallocated flat ``uint8`` arena, evicted first-in first-out.

A new image is written at the head; the oldest images in its way are evicted. FIFO gives every image
the same residence time, hence ≈ ``reuse`` patches each (random eviction would not). The arena is
allocated once and never grows (DESIGN invariant 1). The slot table lives on the host: slot ids are
consecutive, and FIFO keeps the resident ones a contiguous range ``[first, next)``. A source is
resident at most once (the producer does not insert a fresh decode of a resident source), so every
resident image is a distinct image: ``resident ≥ batch_size`` is all that distinct batches need.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from .backend import Backend
from .config import format_bytes
from .options import scaled

__all__ = ["RingCache", "images_held"]

_SLOT_FIELDS = ("offset", "height", "width", "source", "served")


def images_held(sample_bytes: np.ndarray, capacity_bytes: int) -> tuple[int, int]:
    """How many images a ring of ``capacity_bytes`` holds, from each image's bytes with companions.

    Returns:
        ``(at_least, typical)``: ``at_least`` fit whichever images are drawn (the largest ones, with
        two largest images of slack: one for the wrap, one for the image being written);
        ``typical`` is ``capacity_bytes // mean image bytes``; both at most the number of images.
    """
    sizes = np.sort(np.asarray(sample_bytes, dtype=np.int64))[::-1]
    if not len(sizes):
        return 0, 0
    room = capacity_bytes - 2 * int(sizes[0])
    at_least = int(np.searchsorted(np.cumsum(sizes), room, side="right")) if room > 0 else 0
    typical = min(len(sizes), int(capacity_bytes // max(1, sizes.mean())))
    return min(at_least, len(sizes)), typical


class RingCache:
    """A byte ring of decoded images (each with its companions) plus their slot table.

    Args:
        backend: where the arena lives (CuPy on GPU, NumPy on CPU).
        capacity_bytes: arena size; allocated here, once.
        max_slots: upper bound on resident images (``capacity_bytes // smallest image bytes + 1``).
        pixel_bytes: bytes per pixel of the images (3 for RGB ``uint8``); the arena holds raw bytes.
        parts: ``(scale, pixel_bytes)`` of the main image and of each companion, stored back to back
            in one slot (so a companion is evicted with its image); default: the main image only.

    Each resident slot records its byte ``offset``, the main image's ``height`` and ``width``, the
    ``source`` index of its file and how many patches it has ``served``.
    """

    def __init__(self, backend: Backend, capacity_bytes: int, max_slots: int, pixel_bytes: int = 3,
                 parts: Sequence[tuple[Fraction | int, int]] | None = None) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self.parts = [(Fraction(s), int(b)) for s, b in (parts or [(1, pixel_bytes)])]
        self.pixel_bytes = self.parts[0][1]
        self.arena = backend.empty(self.capacity_bytes)
        self.max_slots = int(max_slots)
        self.offset = np.zeros(self.max_slots, np.int64)
        self.height = np.zeros(self.max_slots, np.int64)
        self.width = np.zeros(self.max_slots, np.int64)
        self.source = np.full(self.max_slots, -1, np.int64)
        self.served = np.zeros(self.max_slots, np.int64)
        self._first = 0  # id of the oldest resident slot
        self._next = 0  # id the next insert gets
        self._head = 0  # byte offset of the next insert
        self._used = 0  # bytes held by resident images
        self._slot_of_source: dict[int, int] = {}
        self.evicted = 0
        self.evicted_served = 0  # patches served by images whose residence has ended

    # -- queries -----------------------------------------------------------------------------
    @property
    def resident(self) -> int:
        return self._next - self._first

    @property
    def bytes_used(self) -> int:
        return self._used

    def resident_slots(self) -> np.ndarray:
        """Ring indices of resident slots, oldest first."""
        return np.arange(self._first, self._next) % self.max_slots

    def part_bytes(self, h: Any, w: Any) -> list[Any]:
        """Bytes of each part of an image whose main part is ``h × w`` (ints or arrays)."""
        return [scaled(h, s) * scaled(w, s) * b for s, b in self.parts]

    def part_layout(self, slots: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(byte offsets, widths in pixels)`` of every part of the images in ``slots``."""
        offset, h, w = self.offset[slots], self.height[slots], self.width[slots]
        out = []
        for (scale, _), nbytes in zip(self.parts, self.part_bytes(h, w)):
            out.append((offset, scaled(w, scale)))
            offset = offset + nbytes
        return out

    def holds(self, source: int) -> bool:
        """Whether an image of ``source`` is resident."""
        return source in self._slot_of_source

    def would_evict(self, nbytes: int) -> bool:
        """Whether inserting an image of ``nbytes`` would evict a resident one."""
        if self.resident == 0:
            return False
        oldest = self.offset[self._first % self.max_slots]
        if self._head + nbytes > self.capacity_bytes:  # wrap: the lap ahead of the head goes first
            return oldest >= self._head or oldest < nbytes
        return self._head <= oldest < self._head + nbytes

    # -- updates -----------------------------------------------------------------------------
    def insert(self, images: Any, source: int) -> int:
        """Copy an ``(H, W, C)`` image, or a list of it and its companions (in ``parts`` order), into
        the arena, evicting the oldest in its way.

        Returns the ring index of its slot. ``source`` must not be resident (see :meth:`holds`).
        """
        if source in self._slot_of_source:
            msg = f"{source=} is already resident; check cache.holds(source) before inserting"
            raise ValueError(msg)
        images = images if isinstance(images, (list, tuple)) else [images]
        h, w = int(images[0].shape[0]), int(images[0].shape[1])
        sizes = self.part_bytes(h, w)
        bad = [i for i, (image, n) in enumerate(zip(images, sizes)) if image.nbytes != n]
        if bad or len(images) != len(sizes):
            shapes = [tuple(image.shape) for image in images]
            msg = (f"file {source}: decoded parts {shapes} do not fit the layout {self.parts} for a {h}x{w} image; "
                   "a companion decodes to another size than its header says (EXIF orientation?)")
            raise ValueError(msg)
        nbytes = sum(sizes)
        if nbytes > self.capacity_bytes:
            msg = (f"image {h}x{w} ({format_bytes(nbytes)} with companions) does not fit in the cache "
                   f"({format_bytes(self.capacity_bytes)}); raise cache_bytes")
            raise ValueError(msg)
        self._make_room(nbytes)
        slot = self._next % self.max_slots
        offset = self._head
        self._write(offset, images)
        self.offset[slot], self.height[slot], self.width[slot] = offset, h, w
        self.source[slot], self.served[slot] = source, 0
        self._slot_of_source[source] = slot
        self._next += 1
        self._head += nbytes
        self._used += nbytes
        return slot

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The ring's bookkeeping and the identity of every resident image, oldest first (ints and
        ``(resident,) int64`` copies of the slot table): enough, with the images re-decoded, to
        rebuild it. Cheap enough to take after every batch (a few µs for hundreds of slots)."""
        slots = self.resident_slots()
        return {"first": self._first, "next": self._next, "head": self._head, "used": self._used,
                "evicted": self.evicted, "evicted_served": self.evicted_served,
                **{name: getattr(self, name)[slots] for name in _SLOT_FIELDS}}

    def restore(self, state: dict[str, Any], images: Iterable[Any]) -> None:
        """Rebuild the ring from :meth:`state`; ``images`` are the resident images, oldest first."""
        self._first, self._next, self._head = state["first"], state["next"], state["head"]
        self._used, self.evicted, self.evicted_served = state["used"], state["evicted"], state["evicted_served"]
        slots = self.resident_slots()
        for name in _SLOT_FIELDS:
            getattr(self, name)[slots] = state[name]
        self._slot_of_source = {int(self.source[s]): int(s) for s in slots}
        for slot, parts in zip(slots, images, strict=True):
            parts = parts if isinstance(parts, (list, tuple)) else [parts]
            expected = self.part_bytes(int(self.height[slot]), int(self.width[slot]))
            if [p.nbytes for p in parts] != expected:
                msg = (f"file {int(self.source[slot])} decodes to {[tuple(p.shape) for p in parts]}, not the "
                       f"{int(self.height[slot])}x{int(self.width[slot])} it had when the state was saved; "
                       "the data set changed since")
                raise ValueError(msg)
            self._write(int(self.offset[slot]), parts)

    def _write(self, offset: int, parts: Sequence[Any]) -> None:
        for part in parts:
            self.arena[offset : offset + part.nbytes] = part.reshape(-1).view(self.arena.dtype)
            offset += part.nbytes

    def record_served(self, slots: np.ndarray) -> None:
        """Count one served patch per entry of ``slots`` (repeats allowed)."""
        np.add.at(self.served, slots, 1)

    def _make_room(self, nbytes: int) -> None:
        if self._head + nbytes > self.capacity_bytes:
            # Wrap. Images at or after the head belong to the previous lap: they are the oldest.
            while self.resident and self.offset[self._first % self.max_slots] >= self._head:
                self._evict_oldest()
            self._head = 0
        while self.resident and self._head <= self.offset[self._first % self.max_slots] < self._head + nbytes:
            self._evict_oldest()
        if self.resident >= self.max_slots:
            msg = f"slot table overflow ({self.max_slots=}); the catalog's smallest image size is wrong"
            raise RuntimeError(msg)

    def _evict_oldest(self) -> None:
        slot = self._first % self.max_slots
        self.evicted += 1
        self.evicted_served += int(self.served[slot])
        del self._slot_of_source[int(self.source[slot])]
        self._used -= sum(self.part_bytes(int(self.height[slot]), int(self.width[slot])))
        self._first += 1
