"""RingCache: decoded images in one preallocated flat ``uint8`` arena, evicted first-in first-out.

A new image is written at the head; the oldest images in its way are evicted. FIFO gives every image
the same residence time, hence ≈ ``reuse`` patches each (random eviction would not). The arena is
allocated once and never grows (ARCHITECTURE.md, invariant 1), and only this class touches its bytes:
it writes images in, cuts patches and windows out (:meth:`RingCache.cut`) and maps their content
(:meth:`RingCache.content_map`); its size is planned by :mod:`dali_patches.engine.plan`. The slot table lives on the host: slot
ids are consecutive, and FIFO keeps the resident ones a contiguous range ``[first, next)``. A source is
resident at most once (the producer does not insert a fresh decode of a resident source), so every
resident image is a distinct image: ``resident ≥ batch_size`` is all that distinct batches need.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from ..config import format_bytes
from ..options import CompanionKind, Part, scaled
from ..state import state_value
from .backend import Backend, DeviceArray, HostArray
from .gather import OVERREAD_BYTES, gather, patch_table
from .measure import Threshold, map_args, map_device, map_twin

__all__ = ["RingCache"]

_SLOT_FIELDS = ("offset", "height", "width", "source", "served")


def _main_part(pixel_bytes: int) -> Part:
    return Part("patches", Fraction(1), CompanionKind.IMAGE, pixel_bytes, "uint8", (1, 1))


class RingCache:
    """A byte ring of decoded images (each with its companions) plus their slot table.

    Args:
        backend: where the arena lives (CuPy on GPU, NumPy on CPU).
        capacity_bytes: arena size; allocated here, once.
        max_slots: upper bound on resident images (``capacity_bytes // smallest image bytes + 1``).
        pixel_bytes: bytes per pixel when ``parts`` is not given (a lone RGB ``uint8`` image: 3).
        parts: the :class:`~dali_patches.options.Part` of the main image and of each companion,
            stored back to back in one slot (so a companion is evicted with its image).

    Each resident slot records its byte ``offset``, the main image's ``height`` and ``width``, the
    ``source`` index of its file and how many patches it has ``served``.
    """

    def __init__(self, backend: Backend, capacity_bytes: int, max_slots: int, pixel_bytes: int = 3,
                 parts: Sequence[Part] | None = None) -> None:
        self.backend = backend
        self.capacity_bytes = int(capacity_bytes)
        self.parts = tuple(parts or (_main_part(pixel_bytes),))
        self.arena: DeviceArray = backend.empty(self.arena_bytes(self.capacity_bytes))
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
        self.version = 0  # changes whenever the resident set does (an insert, an eviction, a restore)
        self.evicted_served = 0  # patches served by images whose residence has ended

    @staticmethod
    def arena_bytes(capacity_bytes: int) -> int:
        """Bytes allocated for a ring of ``capacity_bytes``: the GPU gather may read a few bytes past
        an image's last row (:data:`~dali_patches.engine.gather.OVERREAD_BYTES`), so they stay readable."""
        return -(-(int(capacity_bytes) + OVERREAD_BYTES) // 16) * 16

    # -- queries -----------------------------------------------------------------------------
    @property
    def resident(self) -> int:
        return self._next - self._first

    @property
    def bytes_used(self) -> int:
        return self._used

    def resident_slots(self) -> HostArray:
        """Ring indices of resident slots, oldest first."""
        return np.arange(self._first, self._next) % self.max_slots

    def sizes(self, slots: HostArray) -> tuple[HostArray, HostArray]:
        """``(heights, widths)`` of the main images in ``slots`` (any shape), in pixels."""
        return self.height[slots], self.width[slots]

    def sources(self, slots: HostArray) -> HostArray:
        """Source indices (into the catalog's files) of the images in ``slots``, a copy."""
        return self.source[slots]

    def part_bytes(self, h: Any, w: Any) -> list[Any]:
        """Bytes of each part of an image whose main part is ``h × w`` (ints or arrays)."""
        return [part.image_bytes(h, w) for part in self.parts]

    def image_bytes(self, h: int, w: int) -> int:
        """Bytes a ``h × w`` image takes in the ring with all its companions."""
        return int(sum(self.part_bytes(h, w)))

    def padded_bytes(self, shape: tuple[int, ...], patch_size: tuple[int, int]) -> int:
        """Bytes in the ring of a decoded main image of ``shape``, once padded to ``patch_size``."""
        return self.image_bytes(max(shape[0], patch_size[0]), max(shape[1], patch_size[1]))

    def padded(self, images: list[Any], patch_size: tuple[int, int]) -> list[Any]:
        """``images`` (an image and its companions) padded at the bottom and right to at least
        ``patch_size`` with each part's ``pad_value`` (zeros; an alpha part: opaque), scaled per part
        (``pad=True``); as they are when large enough."""
        (h, w, _), (ph, pw) = images[0].shape, patch_size
        if h >= ph and w >= pw:
            return images
        out = []
        for image, part in zip(images, self.parts):
            th, tw = scaled(max(h, ph), part.scale), scaled(max(w, pw), part.scale)
            out.append(None if image is None else self.backend.xp.pad(
                image, ((0, th - image.shape[0]), (0, tw - image.shape[1]), (0, 0)), constant_values=part.pad_value))
        return out

    @staticmethod
    def nbytes(images: Sequence[Any], expected: Sequence[Any]) -> list[int]:
        """Bytes of each decoded part (``None``, an all-opaque alpha the cache fills: as ``expected``)."""
        return [int(e) if p is None else int(p.nbytes) for p, e in zip(images, expected)]

    def holds(self, source: int) -> bool:
        """Whether an image of ``source`` is resident."""
        return source in self._slot_of_source

    def would_evict(self, nbytes: int) -> bool:
        """Whether inserting an image of ``nbytes`` would evict a resident one."""
        if self.resident == 0:
            return False
        oldest = self.offset[self._first % self.max_slots]
        if self._head + nbytes > self.capacity_bytes:  # wrap: the lap ahead of the head goes first
            return bool(oldest >= self._head or oldest < nbytes)
        return bool(self._head <= oldest < self._head + nbytes)

    # -- cutting -----------------------------------------------------------------------------
    def table(self, part: int, slots: HostArray, ys: HostArray, xs: HostArray, out: HostArray | None = None) -> HostArray:
        """The gather table (:mod:`dali_patches.engine.gather`) of patches of ``parts[part]`` whose main
        image anchors are ``(ys, xs)`` in ``slots``: the companion's offset inside the slot, its
        width and the anchor, all scaled by its ``scale``."""
        offset, h, w = self.offset[slots], self.height[slots], self.width[slots]
        for before in self.parts[:part]:
            offset = offset + before.image_bytes(h, w)
        scale = self.parts[part].scale
        return patch_table(offset, scaled(w, scale), scaled(ys, scale), scaled(xs, scale), out)

    def cut(self, part: int, table: HostArray, patch_hw: tuple[int, int] | None = None,
            out: DeviceArray | None = None, device_table: DeviceArray | None = None) -> DeviceArray:
        """Cut the windows of ``table`` (from :meth:`table`) out of ``parts[part]``: ``(n, h, w, C)``
        of the part's dtype on the cache's device; ``patch_hw`` defaults to the part's patch size
        (the anchors cut smaller mask windows). ``out``/``device_table``: see :func:`gather`."""
        p = self.parts[part]
        hw = patch_hw or p.patch_hw
        raw = gather(self.backend.xp, self.arena, table, hw, p.pixel_bytes, out, device_table)
        return raw.view(np.dtype(p.dtype)).reshape(len(table), hw[0], hw[1], p.channels)

    def part_offset(self, part: int, slot: int) -> int:
        """Byte offset in the arena of ``parts[part]`` of the image in ``slot``."""
        h, w = int(self.height[slot]), int(self.width[slot])
        return int(self.offset[slot]) + sum(int(q.image_bytes(h, w)) for q in self.parts[:part])

    def image(self, part: int, slot: int) -> DeviceArray:
        """``(h, w, C)`` view of ``parts[part]`` of the image in ``slot`` (read-only use)."""
        p = self.parts[part]
        h, w = int(self.height[slot]), int(self.width[slot])
        offset = self.part_offset(part, slot)
        nbytes = int(p.image_bytes(h, w))
        raw = self.arena[offset: offset + nbytes]
        dtype = np.dtype(p.dtype)
        if dtype.itemsize > 1 and offset % dtype.itemsize:
            raw = raw.copy()  # parts are packed byte to byte: a 16-bit part may start at an odd offset
        return raw.view(dtype).reshape(scaled(h, p.scale), scaled(w, p.scale), p.channels)

    def content_map(self, slot: int, alpha_part: int | None, geometry: dict[str, int], threshold: Threshold) -> DeviceArray:
        """The coarse content map of the main image in ``slot`` (:mod:`dali_patches.engine.measure`,
        ``geometry`` from :func:`~dali_patches.engine.content.map_geometry`): ``(cells,) uint8`` flags
        on the cache's device (GPU: queued on the current stream)."""
        main = self.parts[0]
        alpha = self.part_offset(alpha_part, slot) if alpha_part is not None else -1
        args = map_args(int(self.offset[slot]), alpha, int(self.width[slot]), main.channels,
                        np.dtype(main.dtype).itemsize, geometry, threshold)
        cells = geometry["cells_h"] * geometry["cells_w"]
        if self.backend.xp is np:
            out = np.empty(cells, np.uint8)
            map_twin(self.arena, *args, out)  # type: ignore[call-arg]
            return out
        return map_device(self.backend.xp, self.arena, args, cells)

    # -- updates -----------------------------------------------------------------------------
    def insert(self, images: Any, source: int) -> int:
        """Copy an ``(H, W, C)`` image, or a list of it and its companions (in ``parts`` order), into
        the arena, evicting the oldest in its way. A part given as ``None`` is filled with ``0xFF``
        bytes (an opaque alpha).

        Returns the ring index of its slot. ``source`` must not be resident (see :meth:`holds`).
        """
        if source in self._slot_of_source:
            msg = f"{source=} is already resident; check cache.holds(source) before inserting"
            raise ValueError(msg)
        images = images if isinstance(images, (list, tuple)) else [images]
        h, w = int(images[0].shape[0]), int(images[0].shape[1])
        sizes = self.part_bytes(h, w)
        bad = [i for i, (n, expected) in enumerate(zip(self.nbytes(images, sizes), sizes)) if n != expected]
        if bad or len(images) != len(sizes):
            shapes = [None if image is None else tuple(image.shape) for image in images]
            msg = (f"file {source}: decoded parts {shapes} do not fit the layout {[p.name for p in self.parts]} for a "
                   f"{h}x{w} image; a companion decodes to another size than its header says (EXIF orientation?)")
            raise ValueError(msg)
        nbytes = int(sum(sizes))
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
        self.version += 1
        return slot

    def record_served(self, slots: HostArray) -> None:
        """Count one served patch per entry of ``slots`` (repeats allowed)."""
        np.add.at(self.served, slots.reshape(-1), 1)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The ring's bookkeeping and the identity of every resident image, oldest first (ints and
        ``(resident,) int64`` copies of the slot table): enough, with the images re-decoded, to
        rebuild it (:meth:`load_state_dict`, then :meth:`rewrite`). Cheap enough to take every round."""
        slots = self.resident_slots()
        return {"first": self._first, "next": self._next, "head": self._head, "used": self._used,
                "evicted": self.evicted, "evicted_served": self.evicted_served,
                **{name: getattr(self, name)[slots] for name in _SLOT_FIELDS}}

    def load_state_dict(self, state: dict[str, Any], sources: int | None = None, where: str = "['cache']") -> None:
        """Restore the bookkeeping of :meth:`state_dict` (checked first: see :meth:`check_state`);
        the resident images' bytes follow with :meth:`rewrite` (they must be decoded again)."""
        self.apply_state(self.check_state(state, sources, where))

    def check_state(self, state: dict[str, Any], sources: int | None = None,
                      where: str = "['cache']") -> dict[str, Any]:
        """A saved :meth:`state_dict`, every field checked (counts in range, one slot entry per resident
        image, each inside the arena, ``source`` below ``sources`` and each once), without changing
        anything; raises ``ValueError`` naming the field."""
        cap = self.capacity_bytes
        first = state_value(state, "first", where, int, 0)
        last = state_value(state, "next", where, int, first, first + self.max_slots)
        out: dict[str, Any] = {"first": first, "next": last, "head": state_value(state, "head", where, int, 0, cap),
                               "used": state_value(state, "used", where, int, 0, cap),
                               "evicted": state_value(state, "evicted", where, int, 0),
                               "evicted_served": state_value(state, "evicted_served", where, int, 0)}
        for name in _SLOT_FIELDS:
            values = state_value(state, name, where, list)
            if len(values) != last - first or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                msg = (f"state {where}[{name!r}] must hold one int per resident image ({last - first}); load a state "
                       "made by state_dict() of the same version, unchanged")
                raise ValueError(msg)
            out[name] = np.asarray(values, np.int64).reshape(-1)
        bad = ((out["offset"] < 0) | (out["height"] <= 0) | (out["width"] <= 0) | (out["source"] < 0)
               | (out["served"] < 0) | ((out["source"] >= sources) if sources is not None else False))
        if last > first:
            bad |= out["offset"] + sum(self.part_bytes(out["height"], out["width"])) > cap
        if np.any(bad) or len(set(out["source"].tolist())) != last - first:
            msg = (f"state {where} holds slots outside the cache of this sampler, or a source twice (slot "
                   f"{int(np.flatnonzero(bad)[0]) if np.any(bad) else '?'}); load a state made by state_dict() of "
                   "the same version, with the same files and settings")
            raise ValueError(msg)
        return out

    def apply_state(self, checked: dict[str, Any]) -> None:
        """Take the bookkeeping of a :meth:`check_state`."""
        self._first, self._next, self._head, self._used = checked["first"], checked["next"], checked["head"], checked["used"]
        self.evicted, self.evicted_served = checked["evicted"], checked["evicted_served"]
        slots = self.resident_slots()
        for name in _SLOT_FIELDS:
            getattr(self, name)[slots] = checked[name]
        self._slot_of_source = {int(self.source[s]): int(s) for s in slots}
        self.version += 1

    def rewrite(self, images: Iterable[Any]) -> None:
        """Write the resident images back after :meth:`load_state_dict`, oldest first."""
        for slot, parts in zip(self.resident_slots(), images, strict=True):
            parts = parts if isinstance(parts, (list, tuple)) else [parts]
            expected = self.part_bytes(int(self.height[slot]), int(self.width[slot]))
            if self.nbytes(parts, expected) != [int(e) for e in expected]:
                msg = (f"file {int(self.source[slot])} decodes to {[p if p is None else tuple(p.shape) for p in parts]}, not the "
                       f"{int(self.height[slot])}x{int(self.width[slot])} it had when the state was saved; "
                       "the data set changed since")
                raise ValueError(msg)
            self._write(int(self.offset[slot]), parts)

    def release(self) -> None:
        """Drop the arena (the sampler is closing); the cache holds nothing afterwards."""
        self.arena = None
        self._first = self._next
        self._slot_of_source.clear()

    # -- internals ---------------------------------------------------------------------------
    def _write(self, offset: int, parts: Sequence[Any]) -> None:
        h, w = parts[0].shape[:2]
        for part, layout in zip(parts, self.parts):
            if part is None:  # an opaque alpha: every byte 0xFF, in uint8 and uint16 alike
                nbytes = int(layout.image_bytes(h, w))
                self.arena[offset: offset + nbytes] = 0xFF
            else:
                nbytes = part.nbytes
                self.arena[offset: offset + nbytes] = part.reshape(-1).view(self.arena.dtype)
            offset += nbytes

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
        self._used -= self.image_bytes(int(self.height[slot]), int(self.width[slot]))
        self._first += 1
        self.version += 1
