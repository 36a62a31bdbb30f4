import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dali_patches.engine.gather import KERNEL_NAME, KERNEL_SOURCE, gather, gather_twin, patch_table


def _arena(rng: np.random.Generator, shapes: list[tuple[int, int]], pixel_bytes: int):
    images = [rng.integers(0, 256, (h, w, pixel_bytes), dtype=np.uint8) for h, w in shapes]
    offsets = np.cumsum([0] + [im.size for im in images[:-1]]) + 5  # odd offsets: nothing is aligned
    arena = np.zeros(int(offsets[-1] + images[-1].size + 11), np.uint8)
    for off, im in zip(offsets, images):
        arena[off: off + im.size] = im.ravel()
    return arena, images, offsets


def _draw(rng: np.random.Generator, shapes: list[tuple[int, int]], offsets: np.ndarray, n: int,
          ph: int, pw: int):
    pick = rng.integers(0, len(shapes), n)
    heights = np.array([shapes[i][0] for i in pick])
    widths = np.array([shapes[i][1] for i in pick])
    ys, xs = rng.integers(0, heights - ph + 1), rng.integers(0, widths - pw + 1)
    return pick, patch_table(offsets[pick], widths, ys, xs), ys, xs


@pytest.mark.parametrize("pixel_bytes", [1, 3, 6])
def test_gather_equals_slicing_every_image(backend, pixel_bytes: int) -> None:
    rng = np.random.default_rng(pixel_bytes)
    shapes = [(37, 51), (64, 64), (90, 33), (40, 120)]
    arena, images, offsets = _arena(rng, shapes, pixel_bytes)
    ph, pw = 17, 29
    pick, table, ys, xs = _draw(rng, shapes, offsets, 50, ph, pw)
    out = gather(backend.xp, backend.xp.asarray(arena), table, (ph, pw), pixel_bytes)
    assert out.shape == (50, ph, pw * pixel_bytes) and out.dtype == np.uint8
    assert out.flags.c_contiguous
    host = backend.to_host(out).reshape(50, ph, pw, pixel_bytes)
    for b, i in enumerate(pick):
        assert np.array_equal(host[b], images[i][ys[b]: ys[b] + ph, xs[b]: xs[b] + pw])


@pytest.mark.parametrize(("pixel_bytes", "patch"), [(3, (16, 16)), (1, (7, 13)), (2, (1, 1)), (6, (32, 5))])
def test_kernel_twin_matches_the_gather_bit_for_bit(backend, pixel_bytes: int, patch: tuple[int, int]) -> None:
    """The twin spells out the GPU kernel's index arithmetic in NumPy; on the CPU it is held to the
    host gather, on a GPU the kernel is held to it."""
    rng = np.random.default_rng(7)
    shapes = [(40, 50), (33, 71), (64, 32)]
    arena, _, offsets = _arena(rng, shapes, pixel_bytes)
    _, table, _, _ = _draw(rng, shapes, offsets, 300, *patch)
    twin = gather_twin(arena, table, patch, pixel_bytes)
    got = backend.to_host(gather(backend.xp, backend.xp.asarray(arena), table, patch, pixel_bytes))
    assert twin.shape == got.shape and np.array_equal(twin, got)


def test_gather_of_nothing_and_into_a_buffer(backend) -> None:
    xp = backend.xp
    arena = xp.asarray(np.arange(1000, dtype=np.uint8))
    empty = patch_table(*(np.zeros(0, np.int64) for _ in range(4)))
    assert gather(xp, arena, empty, (4, 4), 3).shape == (0, 4, 12)
    table = patch_table(np.array([0, 100]), np.array([10, 10]), np.array([1, 0]), np.array([2, 3]))
    buffer = xp.asarray(np.zeros(4096, np.uint8))  # both bodies write into a buffer they are given (the ring's)
    out = gather(xp, arena, table, (2, 2), 3, out=buffer)
    assert (out.data.ptr == buffer.data.ptr) if backend.is_gpu else np.shares_memory(out, buffer)
    assert np.array_equal(backend.to_host(out), gather_twin(backend.to_host(arena), table, (2, 2), 3))


@pytest.mark.parametrize("pixel_bytes", [1, 2, 3, 4, 6])
def test_the_kernel_twin_handles_every_source_alignment(pixel_bytes: int) -> None:
    """Word-sized rows take the funnel-shift path; each of the four byte alignments of a source row
    (and rows that are not word-sized) must give the slicing result."""
    rng = np.random.default_rng(pixel_bytes)
    shapes = [(20, 30), (25, 17)]
    arena, images, offsets = _arena(rng, shapes, pixel_bytes)
    for patch in [(4, 4), (3, 8), (5, 5), (2, 1)]:
        pick, table, ys, xs = _draw(rng, shapes, offsets, 64, *patch)
        twin = gather_twin(arena, table, patch, pixel_bytes).reshape(64, *patch, pixel_bytes)
        for b, i in enumerate(pick):
            assert np.array_equal(twin[b], images[i][ys[b]: ys[b] + patch[0], xs[b]: xs[b] + patch[1]])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA compiler on this machine")
def test_the_kernel_source_compiles_for_hopper(tmp_path: Path) -> None:
    """The kernel compiles where CI has NVIDIA's compiler (no GPU needed), so a typo in it shows before
    a GPU run."""
    source = tmp_path / "gather.cu"
    source.write_text(KERNEL_SOURCE)
    done = subprocess.run(["nvcc", "--ptx", "-arch=sm_90", str(source), "-o", str(tmp_path / "gather.ptx")],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert KERNEL_NAME in (tmp_path / "gather.ptx").read_text()
