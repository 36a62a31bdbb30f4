"""Aligned companions: declaring them, checking them, and cutting them at the same anchors."""

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_patches import Catalog, CatalogWarning, Companion, PatchSampler

from .conftest import _save, coordinate_image, label_mask


def _host(sampler: PatchSampler, batch) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    to_host = sampler.backend.to_host
    return to_host(batch.patches), {k: to_host(v) for k, v in batch.companions.items()}


def test_lr_patch_is_the_decimated_hr_patch_bit_for_bit(device: str, sr_pairs: Path) -> None:
    source = {"image": str(sr_pairs / "lr_x2/**/*x2.png"), "target": str(sr_pairs / "hr/**/*.png")}
    with PatchSampler(source, patch_size=24, batch_size=8, reuse=4, cache_images=12, device=device,
                      companions={"target": {"scale": 2}}) as sampler:
        assert sampler.output_names == ("patches", "target", "source", "anchor")
        for batch in (next(sampler) for _ in range(20)):
            lr, parts = _host(sampler, batch)
            hr = parts["target"]
            assert lr.shape == (8, 24, 24, 3) and hr.shape == (8, 48, 48, 3)
            assert np.array_equal(hr[:, ::2, ::2], lr)
            for patch, (y, x) in zip(hr, batch.anchor.tolist()):  # the HR patch sits at (2y, 2x)
                assert np.array_equal(patch, coordinate_image(2 * y + 48, 2 * x + 48)[2 * y:, 2 * x:])


def test_half_scale_companion_puts_anchors_on_even_pixels(device: str, sr_pairs: Path) -> None:
    # A folder (keys: relative path without extension, 's0/0001') pairs with a glob whose wildcards
    # capture the same text ('s0' + '0001').
    source = {"image": sr_pairs / "hr", "lr": str(sr_pairs / "lr_x2/**/*x2.png")}
    with PatchSampler(source, patch_size=24, batch_size=8, reuse=4, cache_images=12, device=device,
                      companions=[Companion("lr", scale=0.5)]) as sampler:
        for batch in (next(sampler) for _ in range(10)):
            hr, parts = _host(sampler, batch)
            assert (batch.anchor % 2 == 0).all()
            assert np.array_equal(parts["lr"], hr[:, ::2, ::2])


def test_mask_keeps_its_own_channel_count_and_values(device: str, sr_pairs: Path) -> None:
    source = {"image": sr_pairs / "hr", "mask": sr_pairs / "mask"}  # parallel folders, matched by path
    with PatchSampler(source, patch_size=(20, 28), batch_size=6, reuse=2, cache_images=10, device=device,
                      companions={"mask": {"kind": "mask"}}) as sampler:
        assert len(sampler.files) == 16
        batch = next(sampler)
        _, parts = _host(sampler, batch)
        assert parts["mask"].shape == (6, 20, 28, 1) and parts["mask"].dtype == np.uint8
        for patch, (y, x) in zip(parts["mask"], batch.anchor.tolist()):
            assert np.array_equal(patch, label_mask(y + 20, x + 28)[y:, x:])


def test_pattern_rule_explicit_dicts_tuples_and_lists_pair_the_same_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(5):
        a = _save(tmp_path / f"s{i}_albedo.png", rng.integers(0, 256, (40, 50, 3), np.uint8))
        n = _save(tmp_path / f"s{i}_normal.png", rng.integers(0, 256, (40, 50, 3), np.uint8))
        rows.append((str(a), str(n)))
    by_rule = Catalog.scan({"image": str(tmp_path / "*_albedo.png"), "normal": str(tmp_path / "*_normal.png")},
                           companions=[Companion("normal")])
    by_dicts = Catalog.scan([{"image": a, "normal": n} for a, n in rows], companions=[Companion("normal")])
    by_tuples = Catalog.scan(rows, companions=[Companion("normal")])
    by_lists = Catalog.scan({"image": [a for a, _ in rows], "normal": [n for _, n in rows]},
                            companions=[Companion("normal")])
    for catalog in (by_rule, by_dicts, by_tuples, by_lists):
        assert list(zip(catalog.files, catalog.companions["normal"])) == rows


def test_unpaired_and_misfit_companions_are_reported_per_file_before_training(tmp_path: Path) -> None:
    (tmp_path / "hr").mkdir()
    (tmp_path / "lr").mkdir()
    hr = coordinate_image(64, 80)
    for name in ("a", "b", "c", "d"):
        _save(tmp_path / "hr" / f"{name}.png", hr)
    _save(tmp_path / "lr" / "a.png", np.ascontiguousarray(hr[::2, ::2]))
    _save(tmp_path / "lr" / "b.png", np.ascontiguousarray(hr[:30, ::2]))  # wrong size
    Image.fromarray(np.zeros((32, 40), np.uint8), "P").save(tmp_path / "lr" / "c.png")  # palette, as a mask
    _save(tmp_path / "lr" / "orphan.png", np.ascontiguousarray(hr[::2, ::2]))  # no image; d has no partner
    _save(tmp_path / "hr" / "e.png", hr)
    (tmp_path / "lr" / "e.png").write_bytes(_save(tmp_path / "e.png", hr[::2, ::2]).read_bytes()[:-20])  # truncated
    with pytest.warns(CatalogWarning, match="skipped 5"):
        catalog = Catalog.scan({"image": tmp_path / "hr", "lr": tmp_path / "lr"},
                               companions=[Companion("lr", scale="1/2", kind="mask", channels=3)])
    reasons = {Path(p).relative_to(tmp_path).as_posix(): r for p, r in catalog.skipped}
    assert catalog.files == (str(tmp_path / "hr" / "a.png"),)
    assert "30x40 but must be 1/2× its image's 64x80 = 32x40" in reasons["lr/b.png"]
    assert "palette PNG" in reasons["lr/c.png"]
    assert "no 'lr' partner with key 'd'" in reasons["hr/d.png"]
    assert "has no image with key 'orphan'" in reasons["lr/orphan.png"]
    assert reasons["lr/e.png"].startswith("truncated PNG (no IEND chunk) (image ")


def test_source_and_companions_must_agree(sr_pairs: Path) -> None:
    with pytest.raises(ValueError, match=r"companions \['target'\] need a source that names them"):
        PatchSampler(sr_pairs / "hr", patch_size=16, batch_size=2, reuse=2, cache_images=4, device="cpu",
                     companions={"target": {"scale": 2}})
    with pytest.raises(ValueError, match=r"companions \['targt'\] are not in the source \(it names \['target'\]\)"):
        PatchSampler({"image": sr_pairs / "hr", "target": sr_pairs / "hr"}, patch_size=16, batch_size=2, reuse=2,
                     cache_images=4, device="cpu", companions={"targt": {"scale": 2}})
    with pytest.raises(ValueError, match="equally long"):
        Catalog.scan({"image": ["a.png", "b.png"], "t": ["a.png"]}, companions=[Companion("t")])
    with pytest.raises(ValueError, match="scale=3.5 must be a whole number n or 1/n"):
        Companion("t", scale=3.5)
    with pytest.raises(ValueError, match=r"patch_size=\(25, 25\) must be divisible by 2"):
        PatchSampler({"image": sr_pairs / "hr", "mask": sr_pairs / "mask"}, patch_size=25, batch_size=2, reuse=2,
                     cache_images=4, device="cpu", companions={"mask": {"scale": 0.5}})


def test_companions_count_in_the_cache_plan_and_are_evicted_with_their_image(device: str, sr_pairs: Path) -> None:
    source = {"image": str(sr_pairs / "lr_x2/**/*x2.png"), "target": str(sr_pairs / "hr/**/*.png")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler = PatchSampler(source, patch_size=16, batch_size=4, reuse=2, cache_images=6, device=device,
                               companions={"target": {"scale": 2}})
    with sampler:
        sizes = sampler.catalog.sample_bytes(sampler.config.parts)
        assert np.array_equal(sizes, sampler.catalog.heights * sampler.catalog.widths * 3 * 5)  # LR + 4× HR bytes
        for _ in range(200):
            next(sampler)
        stats = sampler.stats()
        cache = sampler._producer.maker.cache
        resident = cache.source[cache.resident_slots()]
        assert stats["resident_images"] >= 6  # cache_images counts an image with its companions
        assert stats["cache_bytes_used"] == sizes[resident].sum() <= sampler.cache_bytes  # evicted together
        assert stats["mean_reuse"] == pytest.approx(2, rel=0.1)
