"""Pictures of what was sampled: captions and heat maps must tell where patches really came from."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_patches import PatchSampler, review
from dali_patches.review import Provenance, heat_map
from dali_patches.review.figures import coverage_figure, patch_grid, pick_images

from .conftest import coordinate_image, label_mask


@pytest.fixture(scope="module")
def coordinate_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 lossless images whose pixels encode their own (y, x), with a label mask each."""
    root = tmp_path_factory.mktemp("coords")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i in range(12):
        h, w = 90 + 17 * i, 300 - 13 * i
        Image.fromarray(coordinate_image(h, w)).save(root / "images" / f"c{i:02d}.png")
        Image.fromarray(label_mask(h, w)[..., 0]).save(root / "masks" / f"c{i:02d}.png")
    return root


def _where(pixel: np.ndarray) -> tuple[int, int]:
    """The (y, x) a coordinate image's pixel names."""
    r, g, b = (int(v) for v in pixel)
    return (b // 16) * 256 + r, (b % 16) * 256 + g


def test_grid_captions_name_the_file_and_anchor_each_patch_shows(device: str, coordinate_dir: Path) -> None:
    with PatchSampler({"image": coordinate_dir / "images", "mask": coordinate_dir / "masks"}, patch_size=24,
                      batch_size=9, reuse=4, cache_images=12, device=device,
                      companions={"mask": {"kind": "mask"}}) as sampler:
        batch = next(sampler)
        host = sampler.backend.to_host
        patches, masks = host(batch.patches), host(batch.companions["mask"])
        grid = patch_grid(patches, batch.source, batch.anchor, sampler.files, {"mask": masks}, masks=["mask"])
        files = sampler.files
    assert grid.zoom == 6 and len(grid.boxes) == len(grid.captions) == 9
    picture = np.asarray(grid.image)
    for i, ((left, top, right, bottom), caption) in enumerate(zip(grid.boxes, grid.captions)):
        assert (right - left, bottom - top) == (24 * 6, 24 * 6)
        shown = picture[top:bottom:6, left:right:6]  # one display pixel per patch pixel
        assert np.array_equal(shown, patches[i])
        name, y, x = re.fullmatch(r"(.+)\ny=(\d+) x=(\d+)", caption).groups()
        assert name == Path(files[batch.source[i]]).name
        assert (int(y), int(x)) == _where(shown[0, 0]) == tuple(batch.anchor[i])
        # the mask is drawn right of its patch, stretched to full range
        mask_left = right + 4
        drawn = picture[top:bottom:6, mask_left:mask_left + 24 * 6:6, 0]
        expected = masks[i, ..., 0].astype(np.float64) * (255 / masks[i].max())
        assert np.array_equal(drawn, expected.astype(np.uint8))


def test_grid_handles_grey_16bit_and_a_ragged_last_row() -> None:
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 65536, (5, 8, 10, 1), dtype=np.uint16)
    grid = patch_grid(patches, [0] * 5, np.zeros((5, 2), np.int64), ["a_very_long_file_name_" * 4 + ".png"],
                      columns=3)
    assert grid.zoom == 13 and grid.image.mode == "RGB"
    left, top, right, bottom = grid.boxes[4]
    assert np.array_equal(np.asarray(grid.image)[top:bottom:13, left:right:13, 1], (patches[4, ..., 0] >> 8))
    assert grid.boxes[3][1] == grid.boxes[4][1] > grid.boxes[0][1]  # 3 per row: the last row has 2


def _run(anchors: list[tuple[int, int, int]], sizes: list[tuple[int, int]], patch: int) -> Provenance:
    source, y, x = (np.array(v, np.int64) for v in zip(*anchors))
    return Provenance(tuple(f"img{i}.png" for i in range(len(sizes))), np.array([s[0] for s in sizes]),
                      np.array([s[1] for s in sizes]), (patch, patch), np.arange(len(source)) // 2, source,
                      np.stack([y, x], 1), {})


def test_heat_map_counts_the_patches_covering_each_pixel() -> None:
    run = _run([(0, 0, 0), (0, 2, 3), (1, 4, 4), (0, 6, 6)], [(10, 12), (8, 8)], patch=4)
    heat = heat_map(run, 0)
    expected = np.zeros((10, 12), np.int32)
    for s, (y, x) in zip(run.source, run.anchor):
        if s == 0:
            expected[y:y + 4, x:x + 4] += 1
    assert np.array_equal(heat, expected) and heat.sum() == 3 * 16
    coarse = heat_map(run, 0, cell=4)  # a patch counts once in every 4×4 cell it touches
    assert coarse.shape == (3, 3)
    assert coarse.tolist() == [[2, 1, 0], [1, 2, 1], [0, 1, 1]]
    assert heat_map(run, 1)[4:, 4:].min() == 1 and heat_map(run, 1).sum() == 16
    with pytest.raises(ValueError, match="image=2 is not an image index"):
        heat_map(run, 2)
    with pytest.raises(ValueError, match="cell=0 must be >= 1"):
        heat_map(run, 0, cell=0)


def test_pick_images_spans_most_to_never_sampled() -> None:
    run = _run([(0, 0, 0)] * 5 + [(1, 0, 0)] * 2 + [(2, 0, 0)], [(8, 8)] * 4, patch=4)
    assert pick_images(run, 4) == [0, 1, 2, 3]
    assert pick_images(run, 2) == [0, 3]  # the most and the never-sampled image


def test_coverage_figure_draws_the_logged_run(coordinate_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "run.prov"
    with PatchSampler(coordinate_dir / "images", patch_size=32, batch_size=4, reuse=8, cache_images=6,
                      device="cpu", provenance=log) as sampler:
        batches = [next(sampler) for _ in range(40)]
        host = sampler.backend.to_host
        for b in batches:  # the log names the pixels each patch really holds
            for patch, (y, x) in zip(host(b.patches), b.anchor):
                assert _where(patch[0, 0]) == (y, x)
    run = review.load(log)
    out = tmp_path / "coverage.png"
    stats = coverage_figure(run, out, images=3, dpi=50)
    with Image.open(out) as png:
        assert png.size == (4 * 3 * 50, 8 * 50)
    assert stats == {**review.coverage(run), "shown": pick_images(run, 3)}
    for index in stats["shown"]:
        heat = heat_map(run, index)
        mine = run.anchor[run.source == index]
        assert heat.sum() == len(mine) * 32 * 32
        for y, x in mine:
            assert heat[y:y + 32, x:x + 32].min() >= 1


def test_coverage_figure_of_a_log_whose_images_are_gone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = _run([(0, 0, 0), (0, 2, 3), (1, 4, 4)], [(10, 12), (8, 8)], patch=4)  # files img0.png… don't exist
    stats = coverage_figure(run, tmp_path / "c.png", images=2, dpi=20)
    assert stats["patches"] == 3 and stats["shown"] == [0, 1]
    assert "without its image" in caplog.text
    with Image.open(tmp_path / "c.png") as png:
        assert png.size == (160, 160)
