"""Weighted sampling: anchors from weight maps, positive/negative ratios, user points, area weighting."""

from pathlib import Path

import numpy as np
import pytest

from dali_patches import PatchSampler
from dali_patches.engine.draw import inclusion_probabilities

from .conftest import _save, coordinate_image

P = 16


@pytest.fixture(scope="module")
def weighted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 coordinate images (odd sizes) with masks: weight 1 in one block, 3 in another, 0 elsewhere."""
    root = tmp_path_factory.mktemp("weighted")
    rng = np.random.default_rng(2)
    for i in range(12):
        h, w = int(rng.integers(70, 130)), int(rng.integers(70, 130))
        mask = np.zeros((h, w, 1), np.uint8)
        mask[10:30, 12:40] = 1
        mask[h - 35:h - 15, w - 45:w - 17] = 3  # same area as the weight-1 block
        (root / "img").mkdir(exist_ok=True)
        (root / "mask").mkdir(exist_ok=True)
        _save(root / "img" / f"{i:02d}.png", coordinate_image(h, w))
        _save(root / "mask" / f"{i:02d}.png", mask)
    return root


def _centres(sampler: PatchSampler, batches: int) -> tuple[list[np.ndarray], np.ndarray]:
    masks, centres = [], []
    for _ in range(batches):
        batch = next(sampler)
        masks.append(sampler.backend.to_host(batch.companions["mask"]))
        centres.append(batch.anchor + P // 2)
    return masks, np.concatenate(centres)


def test_centres_land_only_where_weight_is_positive_and_in_proportion(device: str, weighted: Path) -> None:
    source = {"image": weighted / "img", "mask": weighted / "mask"}
    with PatchSampler(source, patch_size=P, batch_size=8, reuse=4, cache_images=12, device=device,
                      companions={"mask": {"kind": "mask"}}, anchors="weights", anchor_mask="mask") as sampler:
        masks, _ = _centres(sampler, 250)
        assert sampler.stats()["anchor_fallbacks"] == 0
    centre_values = np.concatenate([m[:, P // 2, P // 2, 0] for m in masks])  # the mask under each centre
    assert (centre_values > 0).all()
    share_of_3 = (centre_values == 3).mean()
    assert share_of_3 == pytest.approx(0.75, abs=0.04)  # weights 1 : 3 over equal areas


@pytest.mark.parametrize("pos_fraction", [0.3, 0.8])
def test_positive_negative_ratio(device: str, weighted: Path, pos_fraction: float) -> None:
    source = {"image": weighted / "img", "mask": weighted / "mask"}
    with PatchSampler(source, patch_size=P, batch_size=8, reuse=4, cache_images=12, device=device, seed=1,
                      companions={"mask": {"kind": "mask"}}, anchors="pos_neg", anchor_mask="mask",
                      pos_fraction=pos_fraction) as sampler:
        masks, _ = _centres(sampler, 250)
    centre_values = np.concatenate([m[:, P // 2, P // 2, 0] for m in masks])
    assert (centre_values > 0).mean() == pytest.approx(pos_fraction, abs=0.04)
    # positives are uniform over positive pixels: the two blocks are equally often hit
    positives = centre_values[centre_values > 0]
    assert (positives == 3).mean() == pytest.approx(0.5, abs=0.06)


def test_points_centre_the_patches(device: str, weighted: Path) -> None:
    files = sorted((weighted / "img").glob("*.png"))[:6]
    points = [(f, 40 + i, 50 - i) for i, f in enumerate(files)] + [(files[0], 60, 60), (files[1], 2, 3)]
    with PatchSampler(weighted / "img", patch_size=P, batch_size=6, reuse=2, cache_images=6, device=device,
                      points=points) as sampler:
        assert len(sampler.files) == 6  # images without points are not sampled
        wanted = {(str(f), y, x) for f, y, x in points}
        for _ in range(30):
            batch = next(sampler)
            for source, (y, x) in zip(batch.source.tolist(), batch.anchor.tolist()):
                path = sampler.files[source]
                if (path, 2, 3) in wanted and (y, x) == (0, 0):
                    continue  # a point near the corner: the patch is moved inside the image
                assert (path, y + P // 2, x + P // 2) in wanted
    with pytest.raises(ValueError, match=r"points\[0\]: \(500, 1\) lies outside"):
        PatchSampler(weighted / "img", patch_size=P, batch_size=2, reuse=2, cache_images=6, device="cpu",
                     points=[(files[0], 500, 1)])
    with pytest.raises(ValueError, match="is not among the sampler's images"):
        PatchSampler(weighted / "img", patch_size=P, batch_size=2, reuse=2, cache_images=6, device="cpu",
                     points=[(weighted / "nope.png", 5, 5)])


def test_area_weighting_matches_image_areas(device: str, tmp_path: Path) -> None:
    sides = [(40, 40), (40, 80), (80, 80), (80, 120)] * 4  # areas 1 : 2 : 4 : 6
    for i, (h, w) in enumerate(sides):
        _save(tmp_path / f"{i:02d}.png", coordinate_image(h, w))
    with PatchSampler(tmp_path, patch_size=P, batch_size=4, reuse=8, cache_images=16, device=device,
                      image_choice="area") as sampler:
        counts = np.zeros(len(sampler.files))
        for _ in range(1500):
            batch = next(sampler)
            assert len(set(batch.source.tolist())) == 4
            np.add.at(counts, batch.source, 1)
        area = (sampler.catalog.heights * sampler.catalog.widths).astype(float)
    for a in np.unique(area):  # patches per size class ∝ its area
        assert counts[area == a].sum() / counts.sum() == pytest.approx(area[area == a].sum() / area.sum(), rel=0.08)


def test_inclusion_probabilities_cap_at_one() -> None:
    pi = inclusion_probabilities(np.array([100.0, 1, 1, 1, 1]), 2)
    assert pi[0] == 1 and pi.sum() == pytest.approx(2) and np.allclose(pi[1:], 0.25)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"anchors": "weights"}, "set anchor_mask to one of"),
    ({"anchor_mask": "mask"}, "only read with anchors='weights' or 'pos_neg'"),
    ({"anchors": "pos_neg", "anchor_mask": "mask", "pos_fraction": 1.5}, r"pos_fraction=1.5 must be a number in \[0, 1\]"),
    ({"anchors": "points"}, r"anchors='points' needs points="),
    ({"image_choice": "pixels"}, "image_choice='pixels' is not one of"),
])
def test_bad_sampling_options_name_the_parameter(weighted: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PatchSampler({"image": weighted / "img", "mask": weighted / "mask"}, patch_size=P, batch_size=2, reuse=2,
                     cache_images=4, device="cpu", companions={"mask": {"kind": "mask"}}, **kwargs)
