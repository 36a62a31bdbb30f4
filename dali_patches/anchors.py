"""Anchors: where in each chosen image a patch is cut (the second half of the sampler's draw).

* :class:`UniformAnchors` — every position equally likely.
* :class:`MaskAnchors` — patch centres drawn in proportion to a mask companion's values
  (``weights``) or, for a ``pos_fraction`` of the patches, on mask > 0 and otherwise on mask = 0
  (``pos_neg``). Exact without a per-pixel table: when an image enters the cache, its mask is summed
  over cells of ``C × C`` pixels (host ``float64`` cumulative sums, ``1/C²`` of the image's pixel
  count); a draw picks a cell in proportion to its sum, then gathers that cell's ``C × C`` mask values
  from the arena (one batched gather) and picks a pixel in proportion to them.
* :class:`PointAnchors` — centred on user-given points, uniformly among an image's points.

A patch's centre is ``(y + P_h // 2, x + P_w // 2)``; anchors ``(y, x)`` are its top-left corner, and
are rounded down to multiples of ``step`` when a companion is smaller than the image.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import Backend
from .cache import RingCache
from .gather import gather_patches, row_starts

__all__ = ["MaskAnchors", "PointAnchors", "UniformAnchors"]

_CELL = 16  # mask cell size in pixels (memory: 8 bytes per cell and class, i.e. 1/32 of a byte per pixel)


class UniformAnchors:
    """Anchors uniform over every position where the patch fits.

    Args:
        patch_size: ``(P_h, P_w)``.
        step: anchors are multiples of this.
        rng: the sampler's generator.
    """

    def __init__(self, patch_size: tuple[int, int], step: int, rng: np.random.Generator) -> None:
        self.patch_size = patch_size
        self.step = step
        self.rng = rng
        self.fallbacks = 0  # draws that could not follow the policy and fell back to uniform

    def on_insert(self, cache: RingCache, slot: int) -> None:
        """Called when an image enters the cache (or is restored into it)."""

    def draw(self, cache: RingCache, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(y, x)``, each ``(B,) int64``, of the patches cut from ``slots``."""
        return self._uniform(cache.height[slots], cache.width[slots])

    def _uniform(self, h: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.step
        y = self.rng.integers(0, (h - self.patch_size[0]) // s + 1) * s
        x = self.rng.integers(0, (w - self.patch_size[1]) // s + 1) * s
        return y, x

    def _from_centres(self, cy: np.ndarray, cx: np.ndarray, h: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
        (ph, pw), s = self.patch_size, self.step
        y = np.clip(cy - ph // 2, 0, h - ph) // s * s
        x = np.clip(cx - pw // 2, 0, w - pw) // s * s
        return y.astype(np.int64), x.astype(np.int64)


class MaskAnchors(UniformAnchors):
    """Patch centres drawn from a mask companion (see the module docstring).

    Args:
        part: index of the mask in the cache's parts (scale 1).
        channels, dtype: the mask's decoded layout; channel 0 is read.
        pos_fraction: ``None`` for ``weights`` (centre ∝ mask value); else the share of patches
            centred on mask > 0 (``pos_neg``; the rest on mask = 0). An image without pixels of the
            drawn class gives a patch of the other class (counted in ``fallbacks``); an all-zero
            weight map gives a uniform anchor (counted too).
    """

    def __init__(self, patch_size: tuple[int, int], step: int, rng: np.random.Generator, backend: Backend,
                 part: int, channels: int, dtype: Any, pos_fraction: float | None) -> None:
        super().__init__(patch_size, step, rng)
        self.backend, self.xp = backend, backend.xp
        self.part, self.channels, self.dtype = part, channels, np.dtype(dtype)
        self.pos_fraction = pos_fraction
        self.cell = min(_CELL, *patch_size)
        self._cdfs: dict[int, tuple[int, list[np.ndarray]]] = {}  # slot → (cells per row, cumsum per class)

    def _mask(self, cache: RingCache, slot: int) -> Any:
        h, w = int(cache.height[slot]), int(cache.width[slot])
        offset = int(cache.part_layout(np.array([slot]))[self.part][0][0])
        nbytes = h * w * self.channels * self.dtype.itemsize
        raw = cache.arena[offset: offset + nbytes]
        if self.dtype.itemsize > 1 and offset % self.dtype.itemsize:
            raw = raw.copy()  # parts are packed byte to byte: a 16-bit mask may start at an odd offset
        return raw.view(self.dtype).reshape(h, w, self.channels)[..., 0]

    def on_insert(self, cache: RingCache, slot: int) -> None:
        (ph, pw), c, xp = self.patch_size, self.cell, self.xp
        mask = self._mask(cache, slot)
        region = mask[ph // 2: mask.shape[0] - ph + ph // 2 + 1, pw // 2: mask.shape[1] - pw + pw // 2 + 1]
        rows, cols = -(-region.shape[0] // c), -(-region.shape[1] // c)
        # Cell sums: rows of c first (contiguous adds), then columns; uint32 holds 256 × 65535.
        padded = xp.zeros((rows * c, cols * c), xp.uint32)
        if self.pos_fraction is None:
            padded[: region.shape[0], : region.shape[1]] = region
        else:
            xp.greater(region, 0, out=padded[: region.shape[0], : region.shape[1]])
        sums = self.backend.to_host(padded.reshape(rows, c, cols * c).sum(axis=1).reshape(rows, cols, c).sum(axis=2))
        cdfs = [np.cumsum(sums, dtype=np.float64)]
        if self.pos_fraction is not None:  # negatives: valid positions of the cell minus positives
            valid = np.outer(np.minimum(c, region.shape[0] - c * np.arange(rows)),
                             np.minimum(c, region.shape[1] - c * np.arange(cols)))
            cdfs.append(np.cumsum(valid - sums, dtype=np.float64))
        self._cdfs[int(slot)] = (cols, [cdf.reshape(-1) for cdf in cdfs])

    def draw(self, cache: RingCache, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = cache.height[slots], cache.width[slots]
        b, c = len(slots), self.cell
        if self.pos_fraction is None:
            want = np.zeros(b, np.int64)
        else:
            want = (self.rng.random(b) >= self.pos_fraction).astype(np.int64)  # 0: positive, 1: negative
        cell_row, cell_col = np.zeros(b, np.int64), np.zeros(b, np.int64)
        usable = np.ones(b, bool)
        u = self.rng.random(b)
        for i, slot in enumerate(slots.tolist()):
            cols, cdfs = self._cdfs[slot]
            k = int(want[i])
            if cdfs[k][-1] <= 0 and len(cdfs) > 1:
                k = want[i] = 1 - k
                self.fallbacks += 1
            if cdfs[k][-1] <= 0:
                usable[i] = False
                continue
            cell = int(np.searchsorted(cdfs[k], u[i] * cdfs[k][-1], side="right"))
            cell_row[i], cell_col[i] = divmod(min(cell, len(cdfs[k]) - 1), cols)
        (ph, pw) = self.patch_size
        # Cell (r, q) covers centres [ph//2 + r·c, ...) of the valid region; read a c × c window of
        # the mask that lies inside the image and keep only the positions of the cell itself.
        top, left = ph // 2 + cell_row * c, pw // 2 + cell_col * c
        oy, ox = np.minimum(top, h - c), np.minimum(left, w - c)
        offsets, widths = cache.part_layout(slots)[self.part]
        starts = row_starts(offsets, widths, oy, ox, c, self.channels * self.dtype.itemsize)
        window = self.backend.to_host(gather_patches(self.xp, cache.arena, starts, (c, c), self.channels, self.dtype))
        values = window[..., 0].astype(np.float64)
        if self.pos_fraction is not None:
            values = np.where(want[:, None, None] == 0, values > 0, values == 0).astype(np.float64)
        ys = oy[:, None] + np.arange(c)[None, :]
        xs = ox[:, None] + np.arange(c)[None, :]
        row_ok = (ys >= top[:, None]) & (ys < np.minimum(top + c, h - ph + ph // 2 + 1)[:, None])
        col_ok = (xs >= left[:, None]) & (xs < np.minimum(left + c, w - pw + pw // 2 + 1)[:, None])
        values *= row_ok[:, :, None] & col_ok[:, None, :]
        cdf = np.cumsum(values.reshape(b, -1), axis=1)
        pick = (cdf <= (self.rng.random(b) * cdf[:, -1])[:, None]).sum(axis=1)
        pick = np.minimum(pick, c * c - 1)
        cy, cx = oy + pick // c, ox + pick % c
        y, x = self._from_centres(cy, cx, h, w)
        if not usable.all():  # all-zero weight maps: uniform
            self.fallbacks += int((~usable).sum())
            uy, ux = self._uniform(h[~usable], w[~usable])
            y[~usable], x[~usable] = uy, ux
        return y, x


class PointAnchors(UniformAnchors):
    """Patches centred on given points, uniformly among the points of each image.

    Args:
        points: source index → ``(K, 2) int64`` ``(y, x)`` centres in the image's pixels.
    """

    def __init__(self, patch_size: tuple[int, int], step: int, rng: np.random.Generator,
                 points: dict[int, np.ndarray]) -> None:
        super().__init__(patch_size, step, rng)
        self.points = points

    def draw(self, cache: RingCache, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sources = cache.source[slots].tolist()
        counts = np.array([len(self.points[s]) for s in sources])
        pick = self.rng.integers(0, counts)
        centres = np.array([self.points[s][k] for s, k in zip(sources, pick.tolist())]).reshape(-1, 2)
        return self._from_centres(centres[:, 0], centres[:, 1], cache.height[slots], cache.width[slots])
