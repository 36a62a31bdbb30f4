"""measure: how much a patch holds — the spread of its luminance and its opaque share — exactly per
patch, coarsely per cell of an image, and exhaustively where it must be.

The measure of ``anchors="content"`` (:mod:`dali_patches.engine.content`). A pixel's luminance is
``Y = 0.299 R + 0.587 G + 0.114 B`` (the ITU-R 601-2 weights of Pillow's ``L`` mode, unrounded; a
grey image's value itself), worked in integers as ``Y' = 299 R + 587 G + 114 B`` (``1000 ×`` a grey
value). A patch of ``n`` pixels passes when the standard deviation of its ``Y`` is at least
``min_std`` on the 0–255 scale (16-bit values: ``257 ×`` it) and at least ``min_opaque`` of its
pixels are opaque (alpha at least half its range; without alpha every pixel is). With integer sums
``s1 = ΣY'`` and ``s2 = ΣY'²``, the test is ``n·s2 − s1² ≥ n²·(1000·min_std)²`` (its ``spread``
form), decided in ``float64`` from exact ``int64`` partial sums (``s2`` is summed as three parts so
that no sum overflows, whatever the patch and dtype) in one fixed order, so that every body gives
the same answer.

Three computations share it, each with a GPU kernel and its NumPy twin (the twin is the host body
and the kernel's stand-in on the simulated device of the tests; they agree bit for bit):

* :data:`CHECK_SOURCE` / :func:`check_twin` — the exact test of listed patches of a gathered round;
* :data:`MAP_SOURCE` / :func:`map_twin` — an image's coarse map, when it enters the cache: the
  luminance of a sample every ``stride`` pixels (the 8-bit high byte of 16-bit values), the
  estimated spread of the patch at every sample anchor from its ``win_h × win_w`` samples, and per
  cell of ``cell × cell`` sample anchors one flag: whether any of its anchors looks informative
  (at least :data:`MAP_STD_SHARE` of ``min_std``, :data:`MAP_OPAQUE_SLACK` below ``min_opaque``).
  It reads ``1/stride²`` of the pixels;
* :func:`passing_anchors` — every anchor of one image tested exactly from ``int64`` summed-area
  tables of the same integer parts (a band of rows at a time, on the host): for the rare image
  whose map proposes nothing or promised what its patches do not hold.

On the host, :func:`check_host` first accepts patches by certificates that read an eighth, then
half of their rows: for any subset ``K`` of a patch ``S``, ``|S|·Var(S) ≥ |K|·Var(K)`` (the
squared deviations over ``K`` from ``S``'s mean are at least those from ``K``'s own), so a subset
spread enough proves the whole patch is; the rest get the exact test. For 8-bit patches it sums in
``float64``, exactly (every partial sum is an integer below 2⁵³), through one small matrix product
per chunk of patches.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .backend import DeviceArray, HostArray

__all__ = ["CHECK_NAME", "CHECK_SOURCE", "MAP_NAME", "MAP_OPAQUE_SLACK", "MAP_SOURCE", "MAP_STD_SHARE",
           "Threshold", "check_device", "check_host", "check_twin", "map_args", "map_device", "map_twin",
           "passing_anchors"]

CHECK_NAME = "dali_patches_content_check"
MAP_NAME = "dali_patches_content_map"
MAP_STD_SHARE = 0.5  # a map cell is a candidate where its sampled std reaches this share of min_std ...
MAP_OPAQUE_SLACK = 0.25  # ... and its sampled opaque share min_opaque less this
_CHECK_THREADS = 256
_CERTIFICATE_ROWS = (8, 2)  # the host's certificates read every 8th, then every 2nd row of a patch
_SCAN_BAND_ROWS = 128  # passing_anchors: anchor rows per band (int64 sums of (band + P_h) × W values stay exact)

# Every double operation in the kernels is rounded as written (no fused multiply-add), as NumPy computes.
_SPREAD = r"""
__device__ __forceinline__ double spread(long long n, long long s1, long long hi, long long mid, long long lo) {
  const double s2 = __dadd_rn(__dadd_rn(__dmul_rn((double)hi, 4294967296.0), __dmul_rn((double)mid, 131072.0)),
                              (double)lo);
  return __dsub_rn(__dmul_rn((double)n, s2), __dmul_rn((double)s1, (double)s1));
}
__device__ __forceinline__ void add_luma(long long luma, long long& s1, long long& hi, long long& mid,
                                         long long& lo) {
  const long long h = luma >> 16, l = luma & 0xFFFF;  // luma² = h²·2³² + 2hl·2¹⁶ + l²
  s1 += luma; hi += h * h; mid += h * l; lo += l * l;
}
"""

CHECK_SOURCE = _SPREAD + r"""
extern "C" __global__ void dali_patches_content_check(
    const unsigned char* __restrict__ patches, const unsigned char* __restrict__ alpha, const int has_alpha,
    const int* __restrict__ index, const int count, const int pixels, const int channels, const int value_bytes,
    const double min_spread, const long long min_opaque, unsigned char* __restrict__ out) {
  // One block per listed patch; threads stride over its pixels, then a tree reduction.
  __shared__ long long sums[5][256];
  for (int k = blockIdx.x; k < count; k += gridDim.x) {
    const long long p = index[k];
    const unsigned char* base = patches + p * pixels * channels * value_bytes;
    long long s1 = 0, hi = 0, mid = 0, lo = 0, opaque = 0;
    for (int i = threadIdx.x; i < pixels; i += blockDim.x) {
      const unsigned char* q = base + (long long)i * channels * value_bytes;
      long long v[3] = {0, 0, 0};
      for (int c = 0; c < channels; ++c) {
        v[c] = value_bytes == 2 ? (long long)(q[2 * c] | (q[2 * c + 1] << 8)) : (long long)q[c];
      }
      add_luma(channels == 3 ? 299 * v[0] + 587 * v[1] + 114 * v[2] : 1000 * v[0], s1, hi, mid, lo);
      if (!has_alpha) {
        opaque += 1;
      } else {
        const unsigned char* a = alpha + ((long long)k * pixels + i) * value_bytes;  // listed order
        opaque += (value_bytes == 2 ? a[1] : a[0]) >= 128;
      }
    }
    sums[0][threadIdx.x] = s1; sums[1][threadIdx.x] = hi; sums[2][threadIdx.x] = mid;
    sums[3][threadIdx.x] = lo; sums[4][threadIdx.x] = opaque;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
      if (threadIdx.x < half) {
        for (int s = 0; s < 5; ++s) sums[s][threadIdx.x] += sums[s][threadIdx.x + half];
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      out[k] = spread(pixels, sums[0][0], sums[1][0], sums[2][0], sums[3][0]) >= min_spread && sums[4][0] >= min_opaque;
    }
    __syncthreads();
  }
}
"""

MAP_SOURCE = _SPREAD + r"""
extern "C" __global__ void dali_patches_content_map(
    const unsigned char* __restrict__ arena, const long long offset, const long long alpha, const int width,
    const int channels, const int value_bytes, const int stride, const int win_h, const int win_w,
    const int anchors_h, const int anchors_w, const int cell, const int cells_w, const int cells,
    const double min_spread, const long long min_opaque, unsigned char* __restrict__ out) {
  // One thread per cell; a cell is a candidate when any of its sample anchors looks informative.
  for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cells; c += gridDim.x * blockDim.x) {
    const int row = c / cells_w, col = c - row * cells_w;
    unsigned char keep = 0;
    for (int a = 0; a < cell * cell; ++a) {
      const int ar = row * cell + a / cell, ac = col * cell + a % cell;
      if (ar >= anchors_h || ac >= anchors_w) continue;
      long long s1 = 0, hi = 0, mid = 0, lo = 0, opaque = 0;
      for (int i = 0; i < win_h; ++i) {
        for (int j = 0; j < win_w; ++j) {
          const long long px = (long long)(ar + i) * stride * width + (long long)(ac + j) * stride;
          const unsigned char* q = arena + offset + px * channels * value_bytes + value_bytes - 1;  // high bytes
          add_luma(channels == 3 ? 299LL * q[0] + 587LL * q[value_bytes] + 114LL * q[2 * value_bytes] : 1000LL * q[0],
                   s1, hi, mid, lo);
          opaque += alpha < 0 ? 1 : arena[alpha + px * value_bytes + value_bytes - 1] >= 128;
        }
      }
      if (spread((long long)win_h * win_w, s1, hi, mid, lo) >= min_spread && opaque >= min_opaque) {
        keep = 1;
      }
    }
    out[c] = keep;
  }
}
"""

_kernels: dict[tuple[int, int, str], Any] = {}  # (array module, CUDA device, name) → compiled kernel


def _kernel(xp: Any, name: str) -> Any:
    key = (id(xp), int(xp.cuda.Device().id), name)
    if key not in _kernels:
        _kernels[key] = xp.RawKernel(CHECK_SOURCE if name == CHECK_NAME else MAP_SOURCE, name)
    return _kernels[key]


class Threshold:
    """``min_std`` and ``min_opaque`` in the integer units of the test.

    Args:
        min_std: least standard deviation of a patch's luminance, 0–255 scale.
        min_opaque: least share of opaque pixels (0–1).
        value_bytes: 1 (``uint8``) or 2 (``uint16``: values 257 × the 0–255 scale).
    """

    def __init__(self, min_std: float, min_opaque: float, value_bytes: int) -> None:
        self.min_std, self.min_opaque, self.value_bytes = float(min_std), float(min_opaque), int(value_bytes)
        self.unit = 1000.0 * (257 if value_bytes == 2 else 1)  # Y' per 0–255 step

    def min_spread(self, n: int, share: float = 1.0) -> float:
        """``n²·(unit·share·min_std)²``: the least ``n·s2 − s1²`` of ``n`` values (``-inf`` without a
        bound, so that rounding never fails a patch when ``min_std`` is 0)."""
        if self.min_std <= 0:
            return -math.inf
        return float(n) * float(n) * (self.unit * share * self.min_std) ** 2

    def min_opaque_count(self, n: int, slack: float = 0.0) -> int:
        """Least opaque pixels among ``n``."""
        return max(0, math.ceil((self.min_opaque - slack) * n - 1e-9))

    def sampled(self) -> Threshold:
        """The map's threshold: it samples 8-bit values (a 16-bit value's high byte)."""
        return Threshold(self.min_std, self.min_opaque, 1)

    def describe(self, opaque: bool = True) -> str:
        """What a passing patch has, in words (the opaque share with ``opaque``, when it is bounded)."""
        return (f"a luminance std of at least {self.min_std:g}"
                + (f" with at least {self.min_opaque:.0%} of its pixels opaque" if opaque and self.min_opaque > 0 else ""))


def map_args(offset: int, alpha: int, width: int, channels: int, value_bytes: int, geometry: dict[str, int],
             threshold: Threshold) -> tuple[Any, ...]:
    """The arguments of :data:`MAP_SOURCE` and :func:`map_twin` between the arena and ``out``, typed
    as the kernel takes them: an image whose main part starts at byte ``offset`` (its alpha at
    ``alpha``, or -1), a map of ``geometry`` (:func:`~dali_patches.engine.content.map_geometry`),
    and ``threshold`` on the sampled 8-bit values with the map's :data:`MAP_STD_SHARE` and
    :data:`MAP_OPAQUE_SLACK`."""
    g, sampled = geometry, threshold.sampled()
    n = g["win_h"] * g["win_w"]
    return (np.int64(offset), np.int64(alpha), np.int32(width), np.int32(channels), np.int32(value_bytes),
            *(np.int32(g[k]) for k in ("stride", "win_h", "win_w", "anchors_h", "anchors_w", "cell", "cells_w")),
            np.int32(g["cells_h"] * g["cells_w"]), np.float64(sampled.min_spread(n, MAP_STD_SHARE)),
            np.int64(sampled.min_opaque_count(n, MAP_OPAQUE_SLACK)))


def _spread(n: Any, s1: Any, hi: Any, mid: Any, lo: Any) -> Any:
    """The kernels' ``spread`` in NumPy: the same ``float64`` operations in the same order."""
    s2 = (hi.astype(np.float64) * 4294967296.0 + mid.astype(np.float64) * 131072.0) + lo.astype(np.float64)
    return np.float64(n) * s2 - s1.astype(np.float64) * s1.astype(np.float64)


def _parts(luma: HostArray, axis: Any) -> tuple[HostArray, HostArray, HostArray, HostArray]:
    """``(s1, hi, mid, lo)`` of int64 ``luma`` summed over ``axis``."""
    h, low = luma >> 16, luma & 0xFFFF
    return luma.sum(axis), (h * h).sum(axis), (h * low).sum(axis), (low * low).sum(axis)


def _luma(values: HostArray, channels: int) -> HostArray:
    """int64 ``Y'`` of ``(..., C)`` integer values."""
    v = values.astype(np.int64)
    if channels == 3:
        return 299 * v[..., 0] + 587 * v[..., 1] + 114 * v[..., 2]
    return 1000 * v[..., 0]


def _opaque(alpha: HostArray, value_bytes: int) -> HostArray:
    """int64 1 where ``(..., 1)`` ``alpha`` is at least half its range."""
    return (alpha[..., 0] >= (32768 if value_bytes == 2 else 128)).astype(np.int64)


def check_twin(patches: HostArray, alpha: HostArray, has_alpha: int, index: HostArray, count: int, pixels: int,
               channels: int, value_bytes: int, min_spread: float, min_opaque: int, out: HostArray) -> None:
    """:data:`CHECK_SOURCE`, argument for argument: ``out[k]`` (``uint8``) = whether patch
    ``index[k]`` of ``patches`` (flat bytes of ``(m, pixels, channels)`` values, little-endian) passes;
    ``alpha``: flat bytes of the listed patches' ``(count, pixels)`` alpha values, read when ``has_alpha``."""
    count, pixels, channels, value_bytes = int(count), int(pixels), int(channels), int(value_bytes)
    if count <= 0:
        return
    dtype = np.uint16 if value_bytes == 2 else np.uint8
    picked = np.asarray(index[:count], np.int64)
    values = np.asarray(patches).reshape(-1).view(dtype).reshape(-1, pixels, channels)[picked]
    s1, hi, mid, lo = _parts(_luma(values, channels), 1)
    ok = _spread(pixels, s1, hi, mid, lo) >= min_spread
    if has_alpha:
        a = np.asarray(alpha).reshape(-1).view(dtype).reshape(-1, pixels, 1)[:count]
        ok &= _opaque(a, value_bytes).sum(1) >= min_opaque
    else:
        ok &= pixels >= min_opaque
    np.asarray(out).reshape(-1)[:count] = ok


_LUMA_WEIGHTS = np.array([299, 587, 114], np.float32)
_EXACT_FLOAT_PIXELS = 1 << 17  # 8-bit: sums of Y'² over at most this many pixels stay below 2⁵³
_CHUNK = 32  # patches per step of the host's sums (their temporaries stay in the CPU's cache)
_FLOAT_EXACT = 2.0**53  # float64 holds every integer below this


def _sums(values: HostArray) -> tuple[HostArray, HostArray]:
    """``(s1, s2)`` of ``(m, h, w, C)`` 8-bit values as ``float64``, exact: ``Y'`` is an integer below
    2²⁴ (exact in ``float32``) and, for at most :data:`_EXACT_FLOAT_PIXELS` pixels, every partial sum
    of ``Y'²`` is an integer below 2⁵³ — the same numbers the integer parts give, whatever the order."""
    m = len(values)
    s1, s2 = np.empty(m), np.empty(m)
    for i in range(0, m, _CHUNK):
        part = values[i: i + _CHUNK]
        rows = part.reshape(len(part), -1, part.shape[-1])
        luma = (rows @ _LUMA_WEIGHTS if part.shape[-1] == 3 else rows[..., 0] * np.float32(1000)).astype(np.float64)
        s1[i: i + _CHUNK] = luma.sum(1)
        s2[i: i + _CHUNK] = np.einsum("ij,ij->i", luma, luma)
    return s1, s2


def check_host(patches: HostArray, alpha: HostArray | None, threshold: Threshold) -> HostArray:
    """``(m,) bool``: which of ``patches`` (``(m, P_h, P_w, C)``, host) pass; ``alpha``: their
    ``(m, P_h, P_w, 1)`` alpha, or ``None``. The same answers as :func:`check_twin`, sooner: 8-bit
    sums are taken in ``float64`` where they are exact, and patches whose every 8th (then every 2nd)
    row already proves the spread are not read whole (see the module)."""
    m, ph, pw, channels = patches.shape
    n = ph * pw
    ok = np.ones(m, bool)
    if alpha is not None:
        ok &= _opaque(alpha, threshold.value_bytes).reshape(m, -1).sum(1) >= threshold.min_opaque_count(n)
    if threshold.min_std <= 0:
        return ok
    if threshold.value_bytes != 1 or n > _EXACT_FLOAT_PIXELS:  # 16-bit or huge patches: the integer parts
        todo = np.flatnonzero(ok)
        s1, hi, mid, lo = _parts(_luma(patches[todo], channels).reshape(len(todo), -1), 1)
        ok[todo] = _spread(n, s1, hi, mid, lo) >= threshold.min_spread(n)
        return ok
    todo = np.flatnonzero(ok)
    for step in _CERTIFICATE_ROWS:  # whole rows: contiguous reads
        # |S|·Var(S) ≥ |K|·Var(K): spread_K = k²·Var(K) ≥ k·n·T² proves Var(S) ≥ T².
        sub = (patches if len(todo) == m else patches[todo])[:, ::step]
        k = sub.shape[1] * sub.shape[2]
        s1, s2 = _sums(sub)
        proven = float(k) * s2 - s1 * s1 >= threshold.min_spread(n) * k / n
        todo = todo[~proven]
        if not len(todo):
            return ok
    s1, s2 = _sums(patches[todo])
    ok[todo] = np.float64(n) * s2 - s1 * s1 >= threshold.min_spread(n)
    return ok


def check_device(xp: Any, patches: DeviceArray, alpha: DeviceArray | None, index: HostArray,
                 threshold: Threshold) -> DeviceArray:
    """GPU: :data:`CHECK_SOURCE` over the patches ``index`` of ``patches`` (``(m, P_h, P_w, C)`` on the
    device; ``alpha``: ``(len(index), P_h, P_w, 1)``, those patches' alpha, or ``None``); returns ``(len(index),) uint8`` on the device (queued on the current stream)."""
    _, ph, pw, channels = patches.shape
    n = ph * pw
    count = len(index)
    out = xp.empty(count, xp.uint8)
    if count:
        grid = (max(1, min(count, 1 << 16)),)
        _kernel(xp, CHECK_NAME)(grid, (_CHECK_THREADS,), (
            patches.reshape(-1).view(xp.uint8), xp.zeros(1, xp.uint8) if alpha is None else alpha.reshape(-1).view(xp.uint8),
            np.int32(alpha is not None), xp.asarray(np.asarray(index, np.int32)), np.int32(count), np.int32(n), np.int32(channels),
            np.int32(threshold.value_bytes), np.float64(threshold.min_spread(n)),
            np.int64(threshold.min_opaque_count(n)), out))
    return out


def _box(values: HostArray, win_h: int, win_w: int) -> HostArray:
    """Sums of every ``win_h × win_w`` window of ``values`` (``float64``), rows first then columns
    (exact while every partial sum is an integer below 2⁵³)."""
    rows, cols = values.shape
    across = np.zeros((rows, cols + 1))
    np.cumsum(values, axis=1, out=across[:, 1:])
    down = np.zeros((rows + 1, cols - win_w + 1))
    np.cumsum(across[:, win_w:] - across[:, :-win_w], axis=0, out=down[1:])
    return down[win_h:] - down[:-win_h]


def map_twin(arena: HostArray, offset: int, alpha: int, width: int, channels: int, value_bytes: int, stride: int,
             win_h: int, win_w: int, anchors_h: int, anchors_w: int, cell: int, cells_w: int, cells: int,
             min_spread: float, min_opaque: int, out: HostArray) -> None:
    """:data:`MAP_SOURCE`, argument for argument, in NumPy: the samples as strided views of the
    arena's high bytes, the windows' sums as box sums in ``float64`` (every sum an integer below 2⁵³:
    the kernel's integers exactly; windows too large for that are summed in integer parts), the
    cells' flags into ``out`` (``uint8``, ``cells``)."""
    offset, alpha, width, channels, vb = int(offset), int(alpha), int(width), int(channels), int(value_bytes)
    stride, win_h, win_w, cell = int(stride), int(win_h), int(win_w), int(cell)
    anchors_h, anchors_w, cells_w, cells = int(anchors_h), int(anchors_w), int(cells_w), int(cells)
    rows, cols = anchors_h + win_h - 1, anchors_w + win_w - 1
    flat = np.asarray(arena).reshape(-1)
    pixel = channels * vb
    samples = np.ndarray((rows, cols, channels), np.uint8, flat, offset + vb - 1,
                         (stride * width * pixel, stride * pixel, vb))
    n = win_h * win_w
    if max(rows, cols) * max(win_h, win_w) * 255000.0**2 < _FLOAT_EXACT:
        luma = (samples @ _LUMA_WEIGHTS if channels == 3 else samples[..., 0] * np.float32(1000)).astype(np.float64)
        spread = np.float64(n) * _box(luma * luma, win_h, win_w) - _box(luma, win_h, win_w) ** 2
    else:  # integer parts, as the kernel sums them
        whole = _luma(samples, channels)
        h, low = whole >> 16, whole & 0xFFFF

        def windows(values: HostArray) -> HostArray:
            table = np.zeros((rows + 1, cols + 1), np.int64)
            np.cumsum(np.cumsum(values, 0), 1, out=table[1:, 1:])
            return table[win_h:, win_w:] - table[:-win_h, win_w:] - table[win_h:, :-win_w] + table[:-win_h, :-win_w]

        spread = _spread(n, windows(whole), windows(h * h), windows(h * low), windows(low * low))
    ok = spread >= min_spread
    if alpha >= 0:
        a = np.ndarray((rows, cols), np.uint8, flat, alpha + vb - 1, (stride * width * vb, stride * vb))
        ok &= _box((a >= 128).astype(np.float64), win_h, win_w) >= min_opaque
    elif n < min_opaque:
        ok[...] = False
    cells_h = cells // cells_w
    padded = np.zeros((cells_h * cell, cells_w * cell), bool)
    padded[:anchors_h, :anchors_w] = ok
    flags = padded.reshape(cells_h, cell, cells_w, cell).any(axis=(1, 3))
    np.asarray(out).reshape(-1)[:cells] = flags.reshape(-1)


def map_device(xp: Any, arena: DeviceArray, args: tuple[Any, ...], cells: int) -> DeviceArray:
    """GPU: :data:`MAP_SOURCE` with ``args`` (those of :func:`map_twin` after ``arena``, before
    ``out``); returns the ``(cells,) uint8`` flags on the device (queued on the current stream)."""
    out = xp.empty(cells, xp.uint8)
    threads = 128
    grid = (max(1, min(-(-cells // threads), 1 << 16)),)
    _kernel(xp, MAP_NAME)(grid, (threads,), (arena, *args, out))
    return out


def passing_anchors(image: HostArray, alpha: HostArray | None, patch_hw: tuple[int, int], step: int,
                    threshold: Threshold, most: int) -> HostArray:
    """Every anchor (a multiple of ``step``) of ``image`` (``(H, W, C)``, host) whose patch passes,
    tested exactly: summed-area tables of the integer parts of :func:`check_twin` in ``int64`` (a
    band of :data:`_SCAN_BAND_ROWS` anchor rows at a time, so that no sum overflows), the same
    decision as the test of a gathered patch; returns at most ``most`` of them, evenly spread, as
    ``(k, 2) int64`` ``(y, x)`` (``k = 0``: none)."""
    (ph, pw), height = patch_hw, image.shape[0]
    n = ph * pw
    found: list[HostArray] = []
    limit = threshold.min_spread(n)
    for top in range(0, height - ph + 1, _SCAN_BAND_ROWS):
        rows = min(_SCAN_BAND_ROWS, height - ph + 1 - top)
        luma = _luma(image[top: top + rows + ph - 1], image.shape[2])
        h, low = luma >> 16, luma & 0xFFFF

        def box(values: HostArray) -> HostArray:
            table = np.zeros((values.shape[0] + 1, values.shape[1] + 1), np.int64)
            np.cumsum(np.cumsum(values, 0), 1, out=table[1:, 1:])
            return table[ph:, pw:] - table[:-ph, pw:] - table[ph:, :-pw] + table[:-ph, :-pw]

        ok = _spread(n, box(luma), box(h * h), box(h * low), box(low * low)) >= limit
        if alpha is not None:
            ok &= box(_opaque(alpha[top: top + rows + ph - 1], threshold.value_bytes)) >= threshold.min_opaque_count(n)
        ys, xs = np.nonzero(ok)
        ys += top
        keep = (ys % step == 0) & (xs % step == 0)
        found.append(np.stack([ys[keep], xs[keep]], axis=1).astype(np.int64))
    every = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
    if len(every) > most:
        every = every[np.linspace(0, len(every) - 1, most).astype(np.int64)]
    return every
