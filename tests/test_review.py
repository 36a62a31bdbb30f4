"""Provenance log round trip and the coverage statistics of dali_patches.review."""

from pathlib import Path

import numpy as np
import pytest

from dali_patches import PatchSampler, review


def test_log_round_trips_every_delivered_patch(device: str, many_images: Path, tmp_path: Path) -> None:
    log = tmp_path / "run.prov"
    with PatchSampler(many_images, patch_size=32, batch_size=16, reuse=4, cache_images=24, device=device,
                      provenance=log) as sampler:
        batches = [next(sampler) for _ in range(30)]
        files = sampler.files
    run = review.load(log)
    assert run.files == files and run.patch_size == (32, 32)
    assert np.array_equal(run.batch, np.repeat(np.arange(30), 16))
    assert np.array_equal(run.source, np.concatenate([b.source for b in batches]))
    assert np.array_equal(run.anchor, np.concatenate([b.anchor for b in batches]))
    assert run.header["settings"]["reuse"] == 4
    stats = review.coverage(run)
    counts = np.bincount(run.source, minlength=len(files))
    assert stats["patches"] == 480 and stats["batches"] == 30 and stats["images"] == 64
    assert stats["never_sampled"] == int((counts == 0).sum())
    assert stats["patches_per_image_mean"] == pytest.approx(480 / 64)
    assert stats["patches_per_image_cv"] == pytest.approx(counts.std() / counts.mean())


def test_uniform_anchors_look_uniform_and_weighted_ones_do_not(tmp_path: Path, sr_pairs: Path) -> None:
    common = {"patch_size": 16, "batch_size": 8, "reuse": 8, "cache_images": 16, "device": "cpu"}
    with PatchSampler(sr_pairs / "hr", provenance=tmp_path / "uniform.prov", **common) as sampler:
        for _ in range(300):
            next(sampler)
    points = [(path, 20, 20) for path in sorted((sr_pairs / "hr").rglob("*.png"))]  # always the top-left
    with PatchSampler(sr_pairs / "hr", points=points, provenance=tmp_path / "weighted.prov", **common) as sampler:
        pipe = sampler.pipeline()  # batches taken by a DALI pipeline are recorded too
        for _ in range(300):
            pipe.run()
    uniform = review.coverage(review.load(tmp_path / "uniform.prov"))
    weighted = review.coverage(review.load(tmp_path / "weighted.prov"))
    assert weighted["patches"] >= 2400
    assert uniform["anchor_chi2_per_dof"] < 3 < weighted["anchor_chi2_per_dof"]


def test_a_cut_short_log_loads_up_to_its_last_whole_record(tmp_path: Path, many_images: Path) -> None:
    log = tmp_path / "run.prov"
    with PatchSampler(many_images, patch_size=32, batch_size=16, reuse=4, cache_images=24, device="cpu",
                      provenance=log) as sampler:
        for _ in range(3):
            next(sampler)
    log.write_bytes(log.read_bytes()[:-5])
    assert len(review.load(log).source) == 47
    (tmp_path / "other.prov").write_bytes(b"not a log")
    with pytest.raises(ValueError, match="other.prov' is not a dali_patches provenance log"):
        review.load(tmp_path / "other.prov")


def test_a_log_is_readable_before_the_first_batch(many_images: Path, tmp_path: Path) -> None:
    """The header is on disk from construction on: a run killed before its first batch leaves a log."""
    log = tmp_path / "early.prov"
    sampler = PatchSampler(many_images, patch_size=16, batch_size=4, reuse=2, cache_images=8, device="cpu",
                           provenance=log)
    run = review.load(log)  # read while the sampler is still open, as after a kill
    assert len(run.files) == len(sampler.files) and len(run.source) == 0
    sampler.close()
