"""gather: cut a whole batch of patches out of the flat arena in one call, on NumPy or CuPy.

The arena is viewed as overlapping windows of one patch row (``patch_w × C`` bytes) starting at every
byte; a batch is then one fancy index of ``B × patch_h`` row starts. On a 2-core CPU this runs at the
speed of a Python loop of slice copies (≈ 180k patches/s of 64×64×3, see DALI-NOTES) while being a
single call; on a GPU it is a single kernel launch instead of B.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["gather_patches", "row_starts"]


def row_starts(offsets: np.ndarray, widths: np.ndarray, ys: np.ndarray, xs: np.ndarray,
               patch_h: int, pixel_bytes: int = 3) -> np.ndarray:
    """``(B, patch_h) int64`` byte offsets in the arena of every patch row.

    Patch ``b`` is ``image[ys[b]:ys[b]+patch_h, xs[b]:xs[b]+patch_w]`` of the image stored at
    ``offsets[b]`` with row length ``widths[b]`` pixels of ``pixel_bytes`` bytes.
    """
    rows = ys[:, None] + np.arange(patch_h, dtype=np.int64)[None, :]
    return offsets[:, None] + (rows * widths[:, None] + xs[:, None]) * pixel_bytes


def _window_view(xp: Any, arena: Any, row_bytes: int) -> Any:
    if xp is np:
        return np.lib.stride_tricks.as_strided(arena, (arena.size - row_bytes + 1, row_bytes), (1, 1), writeable=False)
    return xp.lib.stride_tricks.as_strided(arena, (arena.size - row_bytes + 1, row_bytes), (1, 1))


def gather_patches(xp: Any, arena: Any, starts: np.ndarray, patch_size: tuple[int, int], channels: int = 3,
                   dtype: Any = np.uint8) -> Any:
    """Cut ``B`` patches in one call.

    Args:
        xp: ``numpy`` or ``cupy``, the module of ``arena``.
        arena: flat ``uint8`` array holding the images.
        starts: ``(B, patch_h)`` row starts from :func:`row_starts` (host array).
        patch_size: ``(patch_h, patch_w)``.
        channels, dtype: the pixels' layout in the arena's bytes (default RGB ``uint8``).

    Returns:
        A fresh C-contiguous ``(B, patch_h, patch_w, channels)`` array of ``dtype`` on ``arena``'s device.
    """
    patch_h, patch_w = patch_size
    windows = _window_view(xp, arena, patch_w * channels * np.dtype(dtype).itemsize)
    index = xp.asarray(starts) if xp is not np else starts
    out = windows[index]  # (B, patch_h, row bytes): one gather
    return out.view(dtype).reshape(len(starts), patch_h, patch_w, channels)
