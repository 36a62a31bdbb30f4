"""gather: cut many patches out of the flat byte arena in one call, from a per-patch table.

A patch is described by one row of a ``(n, 4) int64`` table, ``(offset, width, y, x)``: the byte
``offset`` of its image in the arena, the image's ``width`` in pixels, and the patch's top-left
``(y, x)``. Byte ``c`` of row ``r`` of patch ``p`` is then

    arena[offset[p] + ((y[p] + r) * width[p] + x[p]) * pixel_bytes + c]

which is all the index arithmetic there is. Three bodies share it behind :func:`gather`:

* on the host, a NumPy fancy index over a view of the arena as overlapping rows of one patch row's
  bytes (a ``void`` element per row start), into a buffer of the output ring a cache-sized chunk
  at a time;
* on a GPU, one CuPy kernel launch for the whole table (:data:`KERNEL_SOURCE`): a warp per output
  row, no division per byte. Where a row is a whole number of 32-bit words (any patch of an even
  width in RGB, of a width divisible by 4 in grey), each thread stores aligned 32-bit words, each
  made from the two aligned words around its unaligned source by a funnel shift; other rows are
  copied byte by byte. The aligned loads may read up to :data:`OVERREAD_BYTES` past a row's last
  byte, so the arena keeps that many bytes after its end (the cache allocates them);
* :func:`kernel_twin`, the kernel's arithmetic written out in NumPy (words, shifts and all): slow,
  the reference the tests hold the other two to, bit for bit, and the kernel's stand-in on the
  simulated device of the tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import DeviceArray, HostArray

__all__ = ["KERNEL_NAME", "KERNEL_SOURCE", "OVERREAD_BYTES", "gather", "gather_twin",
           "kernel_launch", "kernel_twin", "patch_table"]

OVERREAD_BYTES = 8  # readable bytes the kernel may touch past the last byte of a source row
KERNEL_NAME = "dali_patches_gather"
_ROWS_PER_BLOCK = 8  # warps per block: one output row each
_HOST_CHUNK_BYTES = 96 << 10  # host gather into a buffer: rows gathered per step (a temporary that stays cached)
_MAX_BLOCKS = 1 << 20  # the grid strides over more rows than this many blocks cover

KERNEL_SOURCE = r"""
extern "C" __global__ void dali_patches_gather(
    const unsigned char* __restrict__ arena, const long long* __restrict__ table,
    unsigned char* __restrict__ out, const int patch_h, const int row_bytes, const int pixel_bytes,
    const int rows) {
  // One warp (threadIdx.x = lane) per output row: patch p, row r of it.
  for (int row = blockIdx.x * blockDim.y + threadIdx.y; row < rows; row += gridDim.x * blockDim.y) {
    const int p = row / patch_h;
    const int r = row - p * patch_h;
    const long long* t = table + 4LL * p;  // offset, width, y, x
    const unsigned char* src = arena + t[0] + ((t[2] + r) * t[1] + t[3]) * pixel_bytes;
    unsigned char* dst = out + (long long)row * row_bytes;
    if ((row_bytes & 3) == 0) {  // aligned 32-bit stores; loads from the two aligned words around src
      const unsigned int* words = (const unsigned int*)((unsigned long long)src & ~3ULL);
      const unsigned int shift = ((unsigned int)(unsigned long long)src & 3u) * 8u;
      unsigned int* out_words = (unsigned int*)dst;
      for (int w = threadIdx.x; w < (row_bytes >> 2); w += 32) {
        out_words[w] = __funnelshift_r(words[w], words[w + 1], shift);
      }
    } else {
      for (int c = threadIdx.x; c < row_bytes; c += 32) {
        dst[c] = src[c];
      }
    }
  }
}
"""
_kernels: dict[tuple[int, int], Any] = {}  # (array module, CUDA device) → compiled kernel


def patch_table(offsets: HostArray, widths: HostArray, ys: HostArray, xs: HostArray,
                out: HostArray | None = None) -> HostArray:
    """The ``(n, 4) int64`` table of ``(offset, width, y, x)`` from four ``(n,)`` integer arrays
    (written into ``out``, e.g. pinned memory, when given)."""
    table = np.empty((len(offsets), 4), np.int64) if out is None else out[: len(offsets)]
    table[:, 0], table[:, 1], table[:, 2], table[:, 3] = offsets, widths, ys, xs
    return table


def kernel_twin(arena: HostArray, table: HostArray, out: HostArray, patch_h: int, row_bytes: int,
                pixel_bytes: int, rows: int) -> None:
    """The GPU kernel, argument for argument, in NumPy: writes ``rows`` output rows of ``row_bytes``
    into ``out`` (flat ``uint8``) exactly as :data:`KERNEL_SOURCE` computes them — row → patch and
    row, source byte offset, and for word-sized rows the aligned 32-bit loads and funnel shift
    (``arena`` is taken to start 4-byte aligned, as device allocations do; it needs
    :data:`OVERREAD_BYTES` readable bytes past its last image)."""
    patch_h, row_bytes, pixel_bytes, rows = int(patch_h), int(row_bytes), int(pixel_bytes), int(rows)
    if rows <= 0:
        return
    row = np.arange(rows, dtype=np.int64)
    p = row // patch_h
    r = row - p * patch_h
    t = table.reshape(-1, 4)[p]
    src = t[:, 0] + ((t[:, 2] + r) * t[:, 1] + t[:, 3]) * pixel_bytes  # byte offsets of the row starts
    flat = out.reshape(-1)
    if row_bytes % 4 == 0:
        words = arena[: arena.size // 4 * 4].view(np.uint32)
        index = (src >> 2)[:, None] + np.arange(row_bytes // 4 + 1)[None, :]
        loaded = words[index].astype(np.uint64)
        shift = ((src & 3) * 8).astype(np.uint64)[:, None]
        joined = loaded[:, :-1] | (loaded[:, 1:] << np.uint64(32))  # hi:lo, as __funnelshift_r sees them
        flat[: rows * row_bytes].view(np.uint32)[:] = ((joined >> shift) & np.uint64(0xFFFFFFFF)).reshape(-1)
    else:
        flat[: rows * row_bytes] = arena[(src[:, None] + np.arange(row_bytes)[None, :]).reshape(-1)]


def gather_twin(arena: HostArray, table: HostArray, patch_hw: tuple[int, int], pixel_bytes: int) -> HostArray:
    """The GPU kernel's result computed on the host by :func:`kernel_twin`: ``(n, P_h, P_w ·
    pixel_bytes) uint8``. For tests; use :func:`gather` to cut patches. ``arena`` is copied with
    :data:`OVERREAD_BYTES` of slack, so any arena will do."""
    n, (patch_h, patch_w) = len(table), patch_hw
    row_bytes = patch_w * pixel_bytes
    padded = np.zeros(-(-(np.asarray(arena).size + OVERREAD_BYTES) // 4) * 4, np.uint8)
    padded[: np.asarray(arena).size] = np.asarray(arena).reshape(-1)
    out = np.empty(n * patch_h * row_bytes, np.uint8)
    kernel_twin(padded, np.asarray(table, np.int64), out, patch_h, row_bytes, pixel_bytes, n * patch_h)
    return out.reshape(n, patch_h, row_bytes)


def _host_rows(arena: HostArray, row_bytes: int) -> HostArray:
    """The arena as ``arena.size - row_bytes + 1`` overlapping ``void`` rows, one starting at every byte."""
    return np.ndarray((arena.size - row_bytes + 1,), dtype=np.dtype((np.void, row_bytes)), buffer=arena,
                      strides=(1,))


def _kernel(xp: Any) -> Any:
    key = (id(xp), int(xp.cuda.Device().id))
    if key not in _kernels:
        _kernels[key] = xp.RawKernel(KERNEL_SOURCE, KERNEL_NAME)
    return _kernels[key]


def kernel_launch(rows: int) -> tuple[tuple[int], tuple[int, int]]:
    """``(grid, block)`` of a launch over ``rows`` output rows."""
    return (max(1, min(-(-rows // _ROWS_PER_BLOCK), _MAX_BLOCKS)),), (32, _ROWS_PER_BLOCK)


def gather(xp: Any, arena: DeviceArray, table: HostArray, patch_hw: tuple[int, int], pixel_bytes: int,
           out: DeviceArray | None = None, device_table: DeviceArray | None = None) -> DeviceArray:
    """Cut the ``n`` patches of ``table`` out of ``arena``, one call.

    Args:
        xp: ``numpy`` or ``cupy``, the module of ``arena``.
        arena: flat ``uint8`` array holding the images (GPU: with :data:`OVERREAD_BYTES` readable
            bytes after the last one).
        table: ``(n, 4) int64`` host table (:func:`patch_table`).
        patch_hw: ``(P_h, P_w)`` in pixels of the part being cut.
        pixel_bytes: bytes per pixel of that part.
        out: a preallocated C-contiguous ``uint8`` buffer of at least ``n · P_h · P_w · pixel_bytes``
            bytes to write into (the output ring's; 4-byte aligned on a GPU); ``None``: a new one.
        device_table: GPU: the table already uploaded (e.g. once per round for every part).

    Returns:
        ``(n, P_h, P_w · pixel_bytes) uint8`` on ``arena``'s device: reinterpret with
        ``.view(dtype).reshape(n, P_h, P_w, C)``.
    """
    n, (patch_h, patch_w) = len(table), patch_hw
    row_bytes = patch_w * pixel_bytes
    total = n * patch_h * row_bytes
    if xp is np:
        starts = (table[:, 0, None] + ((table[:, 2, None] + np.arange(patch_h)) * table[:, 1, None]
                                       + table[:, 3, None]) * pixel_bytes).reshape(-1)
        rows = _host_rows(arena, row_bytes)
        if out is None:
            return rows[starts].view(np.uint8).reshape(n, patch_h, row_bytes)
        # NumPy's fancy index has no out= (and np.take would copy the overlapping view whole): gather a
        # cache-sized chunk at a time and copy it into the buffer, so the temporary stays in the CPU's
        # cache and the allocator reuses one small block instead of a fresh round-sized one each time.
        result = out.reshape(-1)[:total]
        target = result.view(rows.dtype)
        step = max(1, _HOST_CHUNK_BYTES // row_bytes)
        for k in range(0, len(starts), step):
            target[k: k + step] = rows[starts[k: k + step]]
        return result.reshape(n, patch_h, row_bytes)
    if out is None:
        out = xp.empty(total, xp.uint8)
    if device_table is None:
        device_table = xp.asarray(table)
    result = out.reshape(-1)[:total]
    if total:
        out_rows = n * patch_h
        grid, block = kernel_launch(out_rows)
        _kernel(xp)(grid, block, (arena, device_table, result, np.int32(patch_h), np.int32(row_bytes),
                                  np.int32(pixel_bytes), np.int32(out_rows)))
    return result.reshape(n, patch_h, row_bytes)
