import numpy as np

from dali_patches.gather import gather_patches, row_starts


def test_gather_equals_slicing_every_image(backend) -> None:
    rng = np.random.default_rng(0)
    shapes = [(37, 51), (64, 64), (90, 33), (40, 120)]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    offsets = np.cumsum([0] + [im.size for im in images[:-1]]) + 5
    arena = np.zeros(int(offsets[-1] + images[-1].size + 11), np.uint8)
    for off, im in zip(offsets, images):
        arena[off: off + im.size] = im.ravel()
    ph, pw = 17, 29
    pick = rng.integers(0, len(images), 50)
    heights = np.array([shapes[i][0] for i in pick])
    widths = np.array([shapes[i][1] for i in pick])
    ys, xs = rng.integers(0, heights - ph + 1), rng.integers(0, widths - pw + 1)
    starts = row_starts(offsets[pick], widths, ys, xs, ph)
    out = gather_patches(backend.xp, backend.xp.asarray(arena), starts, (ph, pw))
    assert out.shape == (50, ph, pw, 3) and out.dtype == np.uint8
    assert out.flags.c_contiguous
    host = backend.to_host(out)
    for b, i in enumerate(pick):
        assert np.array_equal(host[b], images[i][ys[b]: ys[b] + ph, xs[b]: xs[b] + pw])
