"""The producer's rounds: several batches drawn and cut at once, the stream resumable at any batch
inside a round, and failures crossing the thread with their own type."""

import json
from pathlib import Path

import numpy as np
import pytest

import dali_patches.engine.maker as maker_module
from dali_patches import PatchSampler
from dali_patches.engine.draw import Draws

SETTINGS = {"patch_size": 24, "batch_size": 8, "reuse": 2, "cache_bytes": "900KiB", "seed": 3}


@pytest.fixture
def rounds_of_5(monkeypatch: pytest.MonkeyPatch) -> int:
    """Force rounds of 5 batches (the engine picks 1 for this small cache)."""
    monkeypatch.setattr(maker_module, "round_batches", lambda config, typical, most_taken: 5)
    return 5


def _record(sampler: PatchSampler, n: int) -> list:
    return [(b.index, b.source.tolist(), b.anchor.tolist(), sampler.backend.to_host(b.patches).copy())
            for b in (next(sampler) for _ in range(n))]


@pytest.mark.parametrize("stop_after", [3, 5, 7, 13])
def test_resuming_inside_a_round_continues_bit_for_bit(device: str, many_images: Path, rounds_of_5: int,
                                                       stop_after: int) -> None:
    with PatchSampler(many_images, device=device, **SETTINGS) as original:
        assert original.stats()["round_batches"] == rounds_of_5
        _record(original, stop_after)
        state = json.loads(json.dumps(original.state_dict()))
        assert state["stream"]["skip"] == stop_after % rounds_of_5
        reference = _record(original, 12)
    with PatchSampler(many_images, device=device, **SETTINGS) as resumed:
        resumed.load_state_dict(state)
        got = _record(resumed, 12)
    assert [g[0] for g in got] == list(range(stop_after, stop_after + 12))
    for (i, src, anc, patches), (j, ref_src, ref_anc, ref_patches) in zip(got, reference, strict=True):
        assert (i, src, anc) == (j, ref_src, ref_anc)
        assert np.array_equal(patches, ref_patches)


def test_rounds_keep_batches_distinct_and_reuse(device: str, many_images: Path, rounds_of_5: int) -> None:
    with PatchSampler(many_images, device=device, **{**SETTINGS, "reuse": 4}) as s:
        batches = [next(s) for _ in range(200)]
        assert all(len(set(b.source.tolist())) == 8 for b in batches)
        assert [b.index for b in batches] == list(range(200))
        stats = s.stats()
    decoded_after_warmup = stats["images_decoded"] - stats["warmup_images"]
    assert abs(200 * 8 / decoded_after_warmup - 4) < 0.4  # patches per decode ≈ reuse with rounds too


def test_a_state_no_longer_kept_is_an_error(many_images: Path) -> None:
    with PatchSampler(many_images, device="cpu", **SETTINGS) as s:
        for _ in range(100):
            next(s)
        with pytest.raises(RuntimeError, match="state after batch 9 is not kept"):
            s.state_dict(in_flight=90)


def test_a_failure_in_the_producer_keeps_its_type(many_images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    draw_round = Draws.draw_round

    def failing(self: Draws, cache, n: int):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyError("no such slot (injected)")
        return draw_round(self, cache, n)

    monkeypatch.setattr(Draws, "draw_round", failing)
    with PatchSampler(many_images, device="cpu", **SETTINGS) as s:
        with pytest.raises(KeyError, match="injected"):
            for _ in range(50):
                next(s)
        with pytest.raises(KeyError, match="injected"):  # and again, the same way
            next(s)
