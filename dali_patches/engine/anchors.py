"""Anchors: where in each chosen image a patch is cut (the second half of a round's draw).

Every policy draws the anchors of a whole round (``n`` patches over many batches) with array
operations, no Python loop over patches:

* :class:`UniformAnchors` — every position equally likely (what :class:`AnchorPolicy`, the base of
  every policy, does where a policy cannot apply).
* :class:`MaskAnchors` — patch centres drawn in proportion to a mask companion's values
  (``weights``) or, for a ``pos_fraction`` of the patches, on mask > 0 and otherwise on mask = 0
  (``pos_neg``). Exact without a per-pixel table: when an image enters the cache, its mask is summed
  over cells of ``C × C`` pixels (host ``float64`` cumulative sums, ``1/C²`` of the image's pixel
  count); a draw picks a cell in proportion to its sum (one ``searchsorted`` over the cumulative sums
  of every resident image laid end to end, rebuilt when the resident set changes), then cuts that
  cell's ``C × C`` mask values out of the cache (one batched cut) and picks a pixel in proportion to them.
* :class:`PointAnchors` — centred on user-given points, uniformly among an image's points.

A patch's centre is ``(y + P_h // 2, x + P_w // 2)``; anchors ``(y, x)`` are its top-left corner, and
are rounded down to multiples of ``step`` when a companion is smaller than the image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import Backend, HostArray
from .cache import RingCache

__all__ = ["AnchorPolicy", "MaskAnchors", "PointAnchors", "UniformAnchors"]

_CELL = 16  # mask cell size in pixels (memory: 8 bytes per cell and class, i.e. 1/32 of a byte per pixel)


class AnchorPolicy:
    """Where patches sit in the images a round drew; the base of every policy: it draws uniformly
    over every position where the patch fits, which a policy falls back to where it cannot apply
    (counted in ``fallbacks``).

    Args:
        patch_size: ``(P_h, P_w)``.
        step: anchors are multiples of this.
        rng: the draw's generator.
    """

    def __init__(self, patch_size: tuple[int, int], step: int, rng: np.random.Generator) -> None:
        self.patch_size = patch_size
        self.step = step
        self.rng = rng
        self.fallbacks = 0  # draws that could not follow the policy and fell back to uniform

    def on_insert(self, cache: RingCache, slot: int) -> None:
        """Called when an image enters the cache (or is restored into it)."""

    def drawable(self, cache: RingCache, resident: HostArray) -> HostArray:
        """The resident slots a batch may use (all of them here)."""
        return resident

    def refuses(self, source: int) -> bool:
        """Whether a decoded image of ``source`` should stay out of the cache (never, here)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """The policy's own state beyond the shared generator (none here)."""
        return {}

    def check_state(self, state: dict[str, Any], where: str = "['anchors']") -> Any:
        """A saved :meth:`state_dict`, checked; nothing changes."""
        return state

    def apply_state(self, checked: Any) -> None:
        """Take a :meth:`check_state`'s values."""

    def draw(self, cache: RingCache, slots: HostArray) -> tuple[HostArray, HostArray]:
        """``(y, x)``, each ``(n,) int64``, of the patches cut from ``slots`` (``(n,)``)."""
        return self._uniform(*cache.sizes(slots))

    def _uniform(self, h: HostArray, w: HostArray) -> tuple[HostArray, HostArray]:
        s = self.step
        y = self.rng.integers(0, (h - self.patch_size[0]) // s + 1) * s
        x = self.rng.integers(0, (w - self.patch_size[1]) // s + 1) * s
        return y, x

    def _from_centres(self, cy: HostArray, cx: HostArray, h: HostArray, w: HostArray) -> tuple[HostArray, HostArray]:
        (ph, pw), s = self.patch_size, self.step
        y = np.clip(cy - ph // 2, 0, h - ph) // s * s
        x = np.clip(cx - pw // 2, 0, w - pw) // s * s
        return y.astype(np.int64), x.astype(np.int64)


class UniformAnchors(AnchorPolicy):
    """Anchors uniform over every position where the patch fits."""


class MaskAnchors(AnchorPolicy):
    """Patch centres drawn from a mask companion (see the module docstring).

    Args:
        part: index of the mask in the cache's parts (scale 1).
        pos_fraction: ``None`` for ``weights`` (centre ∝ mask value); else the share of patches
            centred on mask > 0 (``pos_neg``; the rest on mask = 0). An image without pixels of the
            drawn class gives a patch of the other class (counted in ``fallbacks``); an all-zero
            weight map gives a uniform anchor (counted too).
    """

    def __init__(self, patch_size: tuple[int, int], step: int, rng: np.random.Generator, backend: Backend,
                 part: int, pos_fraction: float | None) -> None:
        super().__init__(patch_size, step, rng)
        self.backend, self.xp = backend, backend.xp
        self.part = part
        self.pos_fraction = pos_fraction
        self.classes = 1 if pos_fraction is None else 2
        self.cell = min(_CELL, *patch_size)
        self._cdfs: dict[int, tuple[int, list[HostArray]]] = {}  # slot → (cells per row, cumsum per class)
        self._pending: dict[int, tuple[Any, tuple[int, int]]] = {}  # slot → (cell sums on the device, region shape)
        self._flat_of: int | None = None  # the cache's resident-set version the flat arrays were built for
        self._flat: list[HostArray] = []  # per class: every resident slot's cumsum + its base, end to end
        self._index: dict[str, HostArray] = {}  # per-slot start, length, base, total (per class), cols

    def on_insert(self, cache: RingCache, slot: int) -> None:
        """Sum the mask of a new image per cell, on its device; the sums come to the host with those of
        every other image inserted before the next draw, in one copy (one wait for the device per
        round, not per image)."""
        (ph, pw), c, xp = self.patch_size, self.cell, self.xp
        mask = cache.image(self.part, slot)[..., 0]
        region = mask[ph // 2: mask.shape[0] - ph + ph // 2 + 1, pw // 2: mask.shape[1] - pw + pw // 2 + 1]
        rows, cols = -(-region.shape[0] // c), -(-region.shape[1] // c)
        # Cell sums: rows of c first (contiguous adds), then columns; uint32 holds 256 × 65535.
        padded = xp.zeros((rows * c, cols * c), xp.uint32)
        if self.pos_fraction is None:
            padded[: region.shape[0], : region.shape[1]] = region
        else:
            xp.greater(region, 0, out=padded[: region.shape[0], : region.shape[1]])
        sums = padded.reshape(rows, c, cols * c).sum(axis=1).reshape(rows, cols, c).sum(axis=2)
        self._pending[int(slot)] = (sums, region.shape)
        self._flat_of = None

    def _flush(self) -> None:
        """Bring the cell sums of the images inserted since the last draw to the host, at once."""
        if not self._pending:
            return
        slots, pending = list(self._pending), list(self._pending.values())
        self._pending = {}
        flat = self.backend.to_host(self.xp.concatenate([sums.reshape(-1) for sums, _ in pending]))
        ends = np.cumsum([sums.size for sums, _ in pending])
        c = self.cell
        for slot, (sums_device, region), host in zip(slots, pending, np.split(flat, ends[:-1])):
            rows, cols = sums_device.shape
            sums = host.reshape(rows, cols)
            cdfs = [np.cumsum(sums, dtype=np.float64)]
            if self.pos_fraction is not None:  # negatives: valid positions of the cell minus positives
                valid = np.outer(np.minimum(c, region[0] - c * np.arange(rows)),
                                 np.minimum(c, region[1] - c * np.arange(cols)))
                cdfs.append(np.cumsum(valid - sums, dtype=np.float64))
            self._cdfs[slot] = (cols, [cdf.reshape(-1) for cdf in cdfs])

    def _build_flat(self, cache: RingCache) -> None:
        """Lay the resident slots' cumulative sums end to end, each shifted by the totals before it,
        so that one ``searchsorted`` finds the cell of every patch of a round."""
        self._flush()
        resident = cache.resident_slots()
        for stale in set(self._cdfs) - set(resident.tolist()):
            del self._cdfs[stale]
        n = cache.max_slots
        index = {"cols": np.ones(n, np.int64)}
        self._flat = []
        for k in range(self.classes):
            cdfs = [self._cdfs[int(s)][1][k] for s in resident]
            lengths = np.array([len(cdf) for cdf in cdfs], np.int64)
            totals = np.array([cdf[-1] for cdf in cdfs], np.float64)
            bases = np.concatenate([[0.0], np.cumsum(totals)[:-1]])
            self._flat.append(np.concatenate([cdf + base for cdf, base in zip(cdfs, bases)]))
            for name, values in (("start", np.concatenate([[0], np.cumsum(lengths)[:-1]])), ("length", lengths),
                                 ("base", bases), ("total", totals)):
                column = index.setdefault(name, np.zeros((self.classes, n), values.dtype))
                column[k, resident] = values
        index["cols"][resident] = [self._cdfs[int(s)][0] for s in resident]
        self._index = index
        self._flat_of = cache.version

    def draw(self, cache: RingCache, slots: HostArray) -> tuple[HostArray, HostArray]:
        if self._flat_of != cache.version:
            self._build_flat(cache)
        h, w = cache.sizes(slots)
        n, c, index = len(slots), self.cell, self._index
        if self.pos_fraction is None:
            want = np.zeros(n, np.int64)
        else:
            want = (self.rng.random(n) >= self.pos_fraction).astype(np.int64)  # 0: positive, 1: negative
            empty = index["total"][want, slots] <= 0
            want[empty] = 1 - want[empty]  # no pixel of the drawn class: the other class
            self.fallbacks += int(empty.sum())
        total = index["total"][want, slots]
        usable = total > 0
        u = self.rng.random(n)
        cell = np.zeros(n, np.int64)
        for k in range(self.classes):  # one searchsorted per class over every resident image
            pick = usable & (want == k)
            target = index["base"][k, slots[pick]] + u[pick] * total[pick]
            found = np.searchsorted(self._flat[k], target, side="right") - index["start"][k, slots[pick]]
            cell[pick] = np.minimum(found, index["length"][k, slots[pick]] - 1)
        cell_row, cell_col = np.divmod(cell, index["cols"][slots])
        (ph, pw) = self.patch_size
        # Cell (r, q) covers centres [ph//2 + r·c, ...) of the valid region; read a c × c window of
        # the mask that lies inside the image and keep only the positions of the cell itself.
        top, left = ph // 2 + cell_row * c, pw // 2 + cell_col * c
        oy, ox = np.minimum(top, h - c), np.minimum(left, w - c)
        window = self.backend.to_host(cache.cut(self.part, cache.table(self.part, slots, oy, ox), (c, c)))
        values = window[..., 0].astype(np.float64)
        if self.pos_fraction is not None:
            values = np.where(want[:, None, None] == 0, values > 0, values == 0).astype(np.float64)
        ys = oy[:, None] + np.arange(c)[None, :]
        xs = ox[:, None] + np.arange(c)[None, :]
        row_ok = (ys >= top[:, None]) & (ys < np.minimum(top + c, h - ph + ph // 2 + 1)[:, None])
        col_ok = (xs >= left[:, None]) & (xs < np.minimum(left + c, w - pw + pw // 2 + 1)[:, None])
        values *= row_ok[:, :, None] & col_ok[:, None, :]
        cdf = np.cumsum(values.reshape(n, -1), axis=1)
        pick = (cdf <= (self.rng.random(n) * cdf[:, -1])[:, None]).sum(axis=1)
        pick = np.minimum(pick, c * c - 1)
        cy, cx = oy + pick // c, ox + pick % c
        y, x = self._from_centres(cy, cx, h, w)
        if not usable.all():  # all-zero weight maps: uniform
            self.fallbacks += int((~usable).sum())
            uy, ux = self._uniform(h[~usable], w[~usable])
            y[~usable], x[~usable] = uy, ux
        return y, x


class PointAnchors(AnchorPolicy):
    """Patches centred on given points, uniformly among the points of each image.

    Args:
        points: source index → ``(K, 2) int64`` ``(y, x)`` centres in the image's pixels.
    """

    def __init__(self, patch_size: tuple[int, int], step: int, rng: np.random.Generator,
                 points: dict[int, HostArray]) -> None:
        super().__init__(patch_size, step, rng)
        sources = sorted(points)
        size = (max(sources) + 1) if sources else 0
        self._count = np.zeros(size, np.int64)
        self._start = np.zeros(size, np.int64)
        self._count[sources] = [len(points[s]) for s in sources]
        self._start[sources] = np.concatenate([[0], np.cumsum(self._count[sources])[:-1]]) if sources else []
        self._points: Any = (np.concatenate([np.asarray(points[s], np.int64).reshape(-1, 2) for s in sources])
                             if sources else np.zeros((0, 2), np.int64))

    def draw(self, cache: RingCache, slots: HostArray) -> tuple[HostArray, HostArray]:
        sources = cache.sources(slots)
        centres = self._points[self._start[sources] + self.rng.integers(0, self._count[sources])]
        return self._from_centres(centres[:, 0], centres[:, 1], *cache.sizes(slots))
