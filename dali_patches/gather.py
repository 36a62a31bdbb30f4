"""gather: cut many patches out of the flat byte arena in one call, from a per-patch table.

A patch is described by one row of a ``(n, 4) int64`` table, :data:`TABLE_COLUMNS`: the byte
``offset`` of its image in the arena, the image's ``width`` in pixels, and the patch's top-left
``(y, x)``. Byte ``c`` of row ``r`` of patch ``p`` is then

    arena[offset[p] + ((y[p] + r) * width[p] + x[p]) * pixel_bytes + c]

which is all the index arithmetic there is. Three bodies share it behind :func:`gather`:

* on the host, one NumPy fancy index over a view of the arena as overlapping rows of one patch
  row's bytes (a ``void`` element per row start): one pass, each patch row copied once;
* on a GPU, one CuPy kernel launch for the whole table (:data:`KERNEL_SOURCE`), one thread per output
  byte, reading the table uploaded once per round;
* :func:`gather_twin`, the kernel's arithmetic written out in NumPy, element by element: slow, the
  reference the tests hold the other two to, bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import DeviceArray, HostArray

__all__ = ["KERNEL_SOURCE", "TABLE_COLUMNS", "gather", "gather_twin", "patch_table", "twin_index"]

TABLE_COLUMNS = ("offset", "width", "y", "x")

KERNEL_SOURCE = r"""
extern "C" __global__ void dali_patches_gather(
    const unsigned char* __restrict__ arena, const long long* __restrict__ table,
    unsigned char* __restrict__ out, const long long patch_h, const long long row_bytes,
    const long long pixel_bytes, const long long total) {
  const long long patch_bytes = patch_h * row_bytes;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (long long)gridDim.x * blockDim.x) {
    const long long p = i / patch_bytes;
    const long long r = (i - p * patch_bytes) / row_bytes;
    const long long c = i - p * patch_bytes - r * row_bytes;
    const long long* t = table + 4 * p;  // offset, width, y, x
    out[i] = arena[t[0] + ((t[2] + r) * t[1] + t[3]) * pixel_bytes + c];
  }
}
"""
_THREADS = 256
_kernels: dict[int, Any] = {}  # CUDA device → compiled kernel


def patch_table(offsets: HostArray, widths: HostArray, ys: HostArray, xs: HostArray,
                out: HostArray | None = None) -> HostArray:
    """The ``(n, 4) int64`` table of :data:`TABLE_COLUMNS` from four ``(n,)`` integer arrays
    (written into ``out``, e.g. pinned memory, when given)."""
    table = np.empty((len(offsets), 4), np.int64) if out is None else out[: len(offsets)]
    table[:, 0], table[:, 1], table[:, 2], table[:, 3] = offsets, widths, ys, xs
    return table


def twin_index(table: HostArray, patch_hw: tuple[int, int], pixel_bytes: int) -> HostArray:
    """``(n, P_h, P_w · pixel_bytes) int64``: the arena index of every output byte, computed exactly
    as the kernel does (flat output index ``i`` → patch ``p``, row ``r``, byte ``c``)."""
    n, (patch_h, patch_w) = len(table), patch_hw
    row_bytes = patch_w * pixel_bytes
    i = np.arange(n * patch_h * row_bytes, dtype=np.int64)
    patch_bytes = patch_h * row_bytes
    p = i // patch_bytes
    r = (i - p * patch_bytes) // row_bytes
    c = i - p * patch_bytes - r * row_bytes
    t = table[p]
    return (t[:, 0] + ((t[:, 2] + r) * t[:, 1] + t[:, 3]) * pixel_bytes + c).reshape(n, patch_h, row_bytes)


def gather_twin(arena: HostArray, table: HostArray, patch_hw: tuple[int, int], pixel_bytes: int) -> HostArray:
    """The GPU kernel's result computed on the host, byte by byte: ``(n, P_h, P_w · pixel_bytes)
    uint8``. For tests; use :func:`gather` to cut patches."""
    return np.asarray(arena)[twin_index(table, patch_hw, pixel_bytes)]


def _host_rows(arena: HostArray, row_bytes: int) -> HostArray:
    """The arena as ``arena.size - row_bytes + 1`` overlapping ``void`` rows, one starting at every byte."""
    return np.ndarray((arena.size - row_bytes + 1,), dtype=np.dtype((np.void, row_bytes)), buffer=arena,
                      strides=(1,))


def _kernel(xp: Any) -> Any:
    device = xp.cuda.Device().id
    if device not in _kernels:
        _kernels[device] = xp.RawKernel(KERNEL_SOURCE, "dali_patches_gather")
    return _kernels[device]


def gather(xp: Any, arena: DeviceArray, table: HostArray, patch_hw: tuple[int, int], pixel_bytes: int,
           out: DeviceArray | None = None, device_table: DeviceArray | None = None) -> DeviceArray:
    """Cut the ``n`` patches of ``table`` out of ``arena``, one call.

    Args:
        xp: ``numpy`` or ``cupy``, the module of ``arena``.
        arena: flat ``uint8`` array holding the images.
        table: ``(n, 4) int64`` host table (:func:`patch_table`).
        patch_hw: ``(P_h, P_w)`` in pixels of the part being cut.
        pixel_bytes: bytes per pixel of that part.
        out: GPU: a preallocated C-contiguous ``uint8`` buffer of at least ``n · P_h · P_w ·
            pixel_bytes`` bytes to write into (the output ring's). Host: must be ``None``: the one
            pass allocates its result, so nothing a consumer still holds is ever rewritten.
        device_table: GPU: the table already uploaded (e.g. once per round for every part).

    Returns:
        ``(n, P_h, P_w · pixel_bytes) uint8`` on ``arena``'s device: reinterpret with
        ``.view(dtype).reshape(n, P_h, P_w, C)``.
    """
    n, (patch_h, patch_w) = len(table), patch_hw
    row_bytes = patch_w * pixel_bytes
    if xp is np:
        if out is not None:
            msg = "the host gather allocates its result; pass out=None"
            raise ValueError(msg)
        starts = (table[:, 0, None] + ((table[:, 2, None] + np.arange(patch_h)) * table[:, 1, None]
                                       + table[:, 3, None]) * pixel_bytes)
        return _host_rows(arena, row_bytes)[starts.reshape(-1)].view(np.uint8).reshape(n, patch_h, row_bytes)
    total = n * patch_h * row_bytes
    if out is None:
        out = xp.empty(total, xp.uint8)
    if device_table is None:
        device_table = xp.asarray(table)
    result = out.reshape(-1)[:total]
    if total:
        blocks = min(-(-total // _THREADS), 65535 * 8)
        _kernel(xp)((blocks,), (_THREADS,), (arena, device_table, result, np.int64(patch_h), np.int64(row_bytes),
                                              np.int64(pixel_bytes), np.int64(total)))
    return result.reshape(n, patch_h, row_bytes)
