"""Resumable state: a restored sampler continues the uninterrupted ``(source, anchor)`` stream."""

import json
from pathlib import Path

import numpy as np
import pytest

from dali_patches import PatchSampler

SETTINGS = {"patch_size": 24, "batch_size": 8, "reuse": 2, "cache_bytes": "900KiB", "seed": 3}


def _record(batches: list, backend) -> list:
    return [(b.source.tolist(), b.anchor.tolist(), backend.to_host(b.patches)) for b in batches]


def _assert_same(resumed: list, reference: list) -> None:
    assert len(resumed) == len(reference)
    for (src, anc, patches), (ref_src, ref_anc, ref_patches) in zip(resumed, reference, strict=True):
        assert src == ref_src and anc == ref_anc
        assert np.array_equal(patches, ref_patches)


@pytest.mark.parametrize("stop_after", [0, 1, 40])
def test_restored_sampler_continues_the_same_stream(device: str, many_images: Path, stop_after: int) -> None:
    with PatchSampler(many_images, device=device, **SETTINGS) as original:
        for _ in range(stop_after):  # 40 batches ≈ 160 decodes: reader epochs and ring wraps behind us
            next(original)
        state = json.loads(json.dumps(original.state_dict()))  # plain values: JSON round-trips
        reference = _record([next(original) for _ in range(25)], original.backend)
    with PatchSampler(many_images, device=device, **SETTINGS) as resumed:
        resumed.load_state_dict(state)
        batches = [next(resumed) for _ in range(25)]
        assert [b.index for b in batches] == list(range(stop_after, stop_after + 25))
        _assert_same(_record(batches, resumed.backend), reference)


def test_patch_iterator_state_excludes_prefetched_batches(many_images: Path) -> None:
    pytest.importorskip("torch")
    from dali_patches.torch import PatchIterator

    def take(iterator: PatchIterator, n: int) -> list:
        return [(d["source"].tolist(), d["anchor"].tolist()) for _, d in zip(range(n), iterator)]

    with PatchSampler(many_images, device="cpu", **SETTINGS) as original:
        iterator = PatchIterator(original)
        take(iterator, 7)
        state = iterator.state_dict()
        reference = take(iterator, 6)
    with PatchSampler(many_images, device="cpu", **SETTINGS) as resumed:
        resumed.load_state_dict(state)
        assert take(PatchIterator(resumed), 6) == reference


def test_state_of_another_sampler_is_refused(many_images: Path) -> None:
    with PatchSampler(many_images, device="cpu", **SETTINGS) as original:
        next(original)
        state = original.state_dict()
    with (PatchSampler(many_images, device="cpu", **{**SETTINGS, "seed": 4}) as other,
          pytest.raises(ValueError, match=r"different sampler \(seed: saved 3, now 4\)")):
        other.load_state_dict(state)
    with PatchSampler(many_images, device="cpu", **SETTINGS) as started:
        next(started)
        with pytest.raises(RuntimeError, match="before the first batch"):
            started.load_state_dict(state)
        with pytest.raises(ValueError, match="state format"):
            started.load_state_dict({"stream": None})


def test_restore_with_companions_and_mask_anchors(device: str, sr_pairs: Path) -> None:
    settings = {"patch_size": 16, "batch_size": 6, "reuse": 2, "cache_images": 8, "seed": 5,
                "companions": {"mask": {"kind": "mask"}}, "anchors": "pos_neg", "anchor_mask": "mask"}
    source = {"image": sr_pairs / "hr", "mask": sr_pairs / "mask"}

    def record(batches: list, backend) -> list:
        return [(b.source.tolist(), b.anchor.tolist(), backend.to_host(b.companions["mask"])) for b in batches]

    with PatchSampler(source, device=device, **settings) as original:
        for _ in range(12):
            next(original)
        state = json.loads(json.dumps(original.state_dict()))
        reference = record([next(original) for _ in range(10)], original.backend)
    with PatchSampler(source, device=device, **settings) as resumed:
        resumed.load_state_dict(state)  # the cell sums of the mask anchors are rebuilt from the re-decoded masks
        _assert_same(record([next(resumed) for _ in range(10)], resumed.backend), reference)
    with PatchSampler(source, device=device, **{**settings, "pos_fraction": 0.9}) as other, \
            pytest.raises(ValueError, match="pos_fraction: saved 0.5, now 0.9"):
        other.load_state_dict(state)


def _tamper(state: dict, path: tuple, value: object) -> dict:
    """A deep copy of ``state`` with the field at ``path`` set to ``value`` (or removed: ``...``)."""
    out = json.loads(json.dumps(state))
    node = out
    for key in path[:-1]:
        node = node[key]
    if value is ...:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


ROUND = ("stream", "round")
TAMPERED = {
    "empty fingerprint": ((("fingerprint",), {}), "fingerprint lacks"),
    "fingerprint of a list": ((("fingerprint",), []), r"\['fingerprint'\] is \[\]"),
    "skip far beyond the round": ((("stream", "skip"), 10**9), r"\['stream'\]\['skip'\] is 1000000000, outside"),
    "negative batch count": (((*ROUND, "batches_made"), -100), r"\['batches_made'\] is -100, outside"),
    "a count as text": (((*ROUND, "warmup_images"), "ten"), r"\['warmup_images'\] is 'ten' \(str\), not int"),
    "no cache": (((*ROUND, "cache"), ...), r"\['round'\]\['cache'\] is missing"),
    "slots of another cache": (((*ROUND, "cache", "offset"), [10**12]), r"\['cache'\]\['offset'\] must hold one int"),
    "source beyond the files": (((*ROUND, "cache", "source"), None), r"\['cache'\]\['source'\] is None"),
    "credit of infinity": (((*ROUND, "refill", "credit"), float("inf")), r"\['credit'\] is inf, not a finite"),
    "rng of another generator": (((*ROUND, "draws", "rng"), {"bit_generator": "MT19937"}), "not a PCG64 state"),
    "reader skip beyond its batch": (((*ROUND, "decoder", "skip"), 999), r"\['decoder'\]\['skip'\] is 999"),
    "reader checkpoint garbage": (((*ROUND, "decoder", "checkpoint"), "!!!"), r"\['checkpoint'\] is not a reader"),
    "stream a string": ((("stream",), "later"), r"\['stream'\] is 'later' \(str\), not dict"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_state_is_refused_naming_the_field(many_images: Path, case: str) -> None:
    (path, value), message = TAMPERED[case]
    with PatchSampler(many_images, device="cpu", **SETTINGS) as original:
        for _ in range(3):
            next(original)
        state = original.state_dict()
    with PatchSampler(many_images, device="cpu", **SETTINGS) as fresh:
        with pytest.raises(ValueError, match=message):
            fresh.load_state_dict(_tamper(state, path, value))
        maker = fresh._producer.maker  # nothing was changed by the refused one ...
        assert maker.cache.resident == 0 and maker.counts.batches_made == 0 and maker.schedule.credit == 0
        fresh.load_state_dict(state)  # ... and the good state still loads
        assert next(fresh).index == 3


def test_a_state_from_another_decode_batch_names_the_one_to_pass(many_images: Path) -> None:
    """The default decode_batch depends on the largest image; a state names the one it was made with."""
    with PatchSampler(many_images, device="cpu", **{**SETTINGS, "decode_batch": 2}) as original:
        next(original)
        state = original.state_dict()
    with PatchSampler(many_images, device="cpu", **{**SETTINGS, "decode_batch": 3}) as other, \
            pytest.raises(ValueError, match=r"decode_batch: saved 2, now 3.*pass decode_batch=2"):
        other.load_state_dict(state)
