"""``reuse="auto"``: the effective reuse follows the two speeds within ``min_reuse``/``max_reuse``,
every batch keeps ``batch_size`` distinct images, the provenance log stays complete, a saved state
resumes a valid stream, and the pace figures are reported. Speeds are shaped with sleeps, so the
assertions are bounds with wide margins, not timings."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from dali_patches import PatchSampler, review
from dali_patches.config import SamplerConfig
from dali_patches.options import Reuse

from .conftest import reference_decode

B, P = 8, 16


def _sampler(many_images: Path, device: str, **options: object) -> PatchSampler:
    return PatchSampler(many_images, patch_size=P, batch_size=B, cache_images=24, device=device, seed=3,
                        **{"reuse": "auto", **options})


def test_a_slow_trainer_pauses_the_decoder_at_min_reuse(device: str, many_images: Path) -> None:
    with _sampler(many_images, device, min_reuse=4) as sampler:
        next(sampler)
        for _ in range(60):
            next(sampler)
            time.sleep(0.01)  # 800 patches/s: far slower than 4 × the decode rate of these small images
        stats = sampler.stats()
    assert stats["reuse"] == "auto"
    assert stats["effective_reuse"] >= 4 * 0.9  # never below the bound (rounding aside)
    assert stats["effective_reuse"] <= 4 * 1.5  # and the decoder gave all the bound allows
    assert stats["decoder_busy_fraction"] < 0.9  # it paused: the trainer was the slow side
    assert stats["distinct_fraction"] == 1.0


def test_a_fast_trainer_waits_at_max_reuse(device: str, many_images: Path) -> None:
    with _sampler(many_images, device, max_reuse=2, decode_batch=4) as sampler:
        for _ in range(80):
            next(sampler)
        stats = sampler.stats()
    assert stats["effective_reuse"] <= 2 * 1.05  # the staleness bound holds however fast the trainer is
    assert stats["distinct_fraction"] == 1.0


def test_patches_stay_exact_and_the_log_complete(device: str, many_images: Path, tmp_path: Path) -> None:
    log = tmp_path / "auto.prov"
    with _sampler(many_images, device, provenance=log) as sampler:
        reference = reference_decode(list(sampler.files), device)
        for i in range(40):
            batch = next(sampler)
            patches = batch.patches if device == "cpu" else batch.patches.get()
            assert len(set(batch.source.tolist())) == B
            for patch, source, (y, x) in zip(patches, batch.source, batch.anchor):
                np.testing.assert_array_equal(patch, reference[sampler.files[source]][y:y + P, x:x + P])
            if i % 10 == 0:
                time.sleep(0.05)  # a pause now and then
    run = review.load(log)
    assert len(run.batch) == 40 * B and set(np.unique(run.batch).tolist()) == set(range(40))


def test_state_resumes_a_valid_stream(device: str, many_images: Path) -> None:
    with _sampler(many_images, device) as first:
        for _ in range(25):
            next(first)
        state = first.state_dict()
        resident = sorted(state["stream"]["round"]["cache"]["source"])
    with _sampler(many_images, device) as second:
        second.load_state_dict(state)
        assert sorted(second._producer.maker.cache.state_dict()["source"]) == resident  # the same cache
        batch = next(second)
        assert batch.index == 25  # the same position
        for _ in range(20):
            assert len(set(next(second).source.tolist())) == B


def test_pace_figures_for_fixed_and_auto(many_images: Path) -> None:
    for reuse in (8, "auto"):
        with _sampler(many_images, "cpu", reuse=reuse) as sampler:
            for _ in range(30):
                next(sampler)
            stats = sampler.stats()
        for key in ("effective_reuse", "effective_reuse_recent", "decoder_busy_fraction",
                    "decoder_busy_fraction_recent", "consumer_wait_fraction", "consumer_wait_fraction_recent",
                    "consumer_wait_s"):
            assert key in stats, key
        assert 0.0 <= stats["decoder_busy_fraction"] <= 1.0 and 0.0 <= stats["consumer_wait_fraction"] <= 1.0
    assert stats["reuse"] == "auto"


@pytest.mark.parametrize(("options", "message"), [
    ({"reuse": 8, "min_reuse": 2}, "bound reuse='auto'"),
    ({"reuse": "auto", "min_reuse": 8, "max_reuse": 2}, "is below min_reuse"),
    ({"reuse": "fast"}, "or 'auto'"),
    ({"reuse": "auto", "max_reuse": 0.5}, "max_reuse=0.5 must be a finite number >= 1"),
])
def test_bad_bounds_are_refused_by_name(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplerConfig(patch_size=16, batch_size=4, cache_images=8, **options)


def test_auto_is_accepted_in_any_case() -> None:
    assert SamplerConfig(patch_size=16, batch_size=4, reuse="Auto", cache_images=8).reuse is Reuse.AUTO


def test_max_reuse_holds_after_a_slow_phase(many_images: Path) -> None:
    """A slow phase takes images at min_reuse; the fast phase after it may not spend that surplus
    on a burst past max_reuse (at most one feeder's worth of images is banked)."""
    with _sampler(many_images, "cpu", max_reuse=4, decode_batch=4) as sampler:
        for _ in range(20):
            next(sampler)
            time.sleep(0.01)
        start = sampler.stats()
        for _ in range(120):
            next(sampler)
        end = sampler.stats()
    taken = end["images_decoded"] - start["images_decoded"]
    served = end["patches_made"] - start["patches_made"]
    assert served / taken <= 4 * 1.15


@pytest.mark.parametrize("path", ["pipeline", "direct"])
def test_auto_through_dali_and_direct_paths_with_companions(dali_device: str, sr_pairs: Path, path: str) -> None:
    """Companions stay aligned (LR = HR decimated) and batches distinct through DALI's pipeline and
    the direct path under reuse='auto'."""
    source = {"image": sr_pairs / "hr", "lr": str(sr_pairs / "lr_x2/**/*x2.png")}
    with PatchSampler(source, patch_size=P, batch_size=B, reuse="auto", max_reuse=8, cache_images=12,
                      device=dali_device, companions={"lr": {"scale": 0.5}}) as sampler:
        if path == "pipeline":
            pipe = sampler.pipeline()
            for _ in range(10):
                patches, lr, src, _ = (o.as_cpu() if hasattr(o, "as_cpu") else o for o in pipe.run())
                hr = np.stack([np.asarray(patches[i]) for i in range(B)])
                low = np.stack([np.asarray(lr[i]) for i in range(B)])
                np.testing.assert_array_equal(hr[:, ::2, ::2], low)
                assert len({int(np.asarray(src[i])) for i in range(B)}) == B
        else:
            pytest.importorskip("torch")
            from dali_patches.torch import DirectIterator

            for i, batch in enumerate(DirectIterator(sampler)):
                hr, low = batch["patches"].cpu().numpy(), batch["lr"].cpu().numpy()
                np.testing.assert_array_equal(hr[:, ::2, ::2], low)
                assert len(set(batch["source"].tolist())) == B
                if i == 9:
                    break
        stats = sampler.stats()
        taken = stats["images_decoded"] - stats["warmup_images"]
        assert stats["patches_made"] <= 8 * (taken + sampler._producer.maker.feeder.capacity)  # max_reuse, with its slack
