from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from dali_patches import PatchSampler
from dali_patches.torch import DirectIterator, PatchIterator

from .conftest import assert_same_steps

ITERATORS = [pytest.param(PatchIterator, id="pipeline"), pytest.param(DirectIterator, id="direct")]


def test_iterator_yields_torch_tensors_on_the_sampler_device(dali_device: str, image_dir: Path) -> None:
    with PatchSampler(image_dir, patch_size=(16, 32), batch_size=8, reuse=4, cache_images=12, device=dali_device) as s:
        iterator = PatchIterator(s, batches_per_epoch=3)
        assert len(iterator) == 3
        for _ in range(2):  # two epochs of 3 batches
            steps = list(iterator)
            assert len(steps) == 3
        data = steps[-1]
        expected = "cuda" if dali_device == "gpu" else "cpu"
        assert data["patches"].shape == (8, 16, 32, 3) and data["patches"].dtype == torch.uint8
        assert data["source"].shape == (8,) and data["source"].dtype == torch.int64
        assert data["anchor"].shape == (8, 2) and data["anchor"].dtype == torch.int32
        # every output comes from the pipeline's one external_source, on the sampler's device
        assert data["patches"].device.type == data["source"].device.type == data["anchor"].device.type == expected
        assert len(set(data["source"].tolist())) == 8


def test_direct_iterator_is_zero_copy_and_the_same_stream(dali_device: str, image_dir: Path) -> None:
    device = dali_device
    settings = {"patch_size": (16, 24), "batch_size": 8, "reuse": 4, "cache_images": 12, "device": device, "seed": 1}
    with PatchSampler(image_dir, **settings) as reference:
        expected = [next(reference) for _ in range(6)]
        expected = [(reference.backend.to_host(b.patches), b.source.copy(), b.anchor.copy()) for b in expected]
    with PatchSampler(image_dir, **settings) as s:
        iterator = DirectIterator(s, batches_per_epoch=3)
        steps = [*iterator, *iterator]  # two epochs of 3
        assert len(iterator) == 3 and len(steps) == 6
        for data, (patches, source, anchor) in zip(steps, expected, strict=True):
            assert data["patches"].dtype == torch.uint8 and data["patches"].shape == (8, 16, 24, 3)
            assert data["patches"].device.type == ("cuda" if device == "gpu" else "cpu")
            assert torch.equal(data["patches"].cpu(), torch.from_numpy(patches))
            assert data["source"].tolist() == source.tolist() and data["anchor"].tolist() == anchor.tolist()
        # zero copy: the tensor is the sampler's own batch memory
        batch_memory = s.backend.xp.asarray(steps[-1]["patches"])
        assert batch_memory.__array_interface__["data"][0] == steps[-1]["patches"].data_ptr() if device == "cpu" \
            else batch_memory.data.ptr == steps[-1]["patches"].data_ptr()
        state = iterator.state_dict()
    with PatchSampler(image_dir, **settings) as resumed:
        resumed.load_state_dict(state)
        assert next(resumed).index == 6


def test_endless_iterator_has_no_length(image_dir: Path) -> None:
    with PatchSampler(image_dir, patch_size=16, batch_size=4, reuse=4, cache_images=8, device="cpu") as s:
        iterator = PatchIterator(s)
        with pytest.raises(TypeError, match="batches_per_epoch"):
            len(iterator)
        with pytest.raises(ValueError, match="batches_per_epoch=0"):
            PatchIterator(s, batches_per_epoch=0)


def test_super_resolution_pairs_as_float_chw_tensors(dali_device: str, sr_pairs: Path) -> None:
    from dali_patches import Augment

    source = {"image": str(sr_pairs / "lr_x2/**/*x2.png"), "target": str(sr_pairs / "hr/**/*.png")}
    with PatchSampler(source, patch_size=12, batch_size=8, reuse=4, cache_images=12, device=dali_device,
                      companions={"target": {"scale": 2}},
                      augment=Augment(mean=0, std=255, layout="CHW")) as s:
        data = next(iter(PatchIterator(s)))
        lr, hr = data["patches"], data["target"]
        assert lr.shape == (8, 3, 12, 12) and hr.shape == (8, 3, 24, 24) and lr.dtype == torch.float32
        assert torch.equal(hr[:, :, ::2, ::2], lr)


# -- resuming through the iterator ---------------------------------------------------------------
RESUME = {"patch_size": (16, 24), "batch_size": 8, "reuse": 4, "cache_images": 12, "seed": 3}


def _host(data: dict) -> tuple[np.ndarray, ...]:
    return tuple(data[name].cpu().numpy().copy() for name in ("patches", "source", "anchor"))


@pytest.mark.parametrize("kind", ITERATORS)
def test_iterator_resumes_mid_epoch_bit_for_bit(kind: type, dali_device: str, image_dir: Path) -> None:
    """Saved after batch 2 of epoch 2 (of 4): a new sampler and iterator, the state loaded, yield the
    rest of that epoch and then whole epochs, the very batches the saving iterator went on with."""
    settings = {**RESUME, "device": dali_device}
    with PatchSampler(image_dir, **settings) as s:
        iterator = kind(s, batches_per_epoch=4)
        first_epoch = [_host(d) for d in iterator]
        for i, data in enumerate(iterator):
            if i == 1:
                state = iterator.state_dict()
                break
        assert state["iterator"] == {"batches_per_epoch": 4, "epoch_batches": 2}
        rest = [_host(d) for d in iterator]  # a loop left early leaves its epoch open
        after = [_host(d) for d in iterator]
    assert len(first_epoch) == 4 and len(rest) == 2 and len(after) == 4
    with PatchSampler(image_dir, **settings) as s:
        resumed = kind(s, batches_per_epoch=4)
        resumed.load_state_dict(state)  # in time: a new iterator takes no batch before its first next()
        assert_same_steps([_host(d) for d in resumed], rest)
        assert_same_steps([_host(d) for d in resumed], after)
        assert len(resumed) == 4


@pytest.mark.parametrize("kind", ITERATORS)
def test_iterator_state_loads_into_a_sampler_and_takes_a_sampler_state(kind: type, image_dir: Path) -> None:
    settings = {**RESUME, "device": "cpu"}
    with PatchSampler(image_dir, **settings) as s:
        iterator = kind(s)
        taken = [_host(d) for _, d in zip(range(5), iterator)]
        state = iterator.state_dict()
        expected = [_host(d) for _, d in zip(range(3), iterator)]
    assert len(taken) == 5
    with PatchSampler(image_dir, **settings) as s:  # today's way: the sampler alone
        s.load_state_dict(state)
        batch = next(s)
        assert batch.index == 5 and np.array_equal(batch.source, expected[0][1])
    sampler_state = {key: value for key, value in state.items() if key != "iterator"}
    with PatchSampler(image_dir, **settings) as s:  # a sampler's state into an iterator: a fresh epoch
        resumed = kind(s, batches_per_epoch=3)
        resumed.load_state_dict(sampler_state)
        assert_same_steps([_host(d) for d in resumed], expected)


def test_iterator_refuses_late_and_bad_states(image_dir: Path) -> None:
    settings = {**RESUME, "device": "cpu"}
    with PatchSampler(image_dir, **settings) as s:
        iterator = PatchIterator(s, batches_per_epoch=4)
        next(iter(iterator))
        state = iterator.state_dict()
        with pytest.raises(RuntimeError, match="already taken batches.*new PatchSampler.*new PatchIterator"):
            iterator.load_state_dict(state)
    with PatchSampler(image_dir, **settings) as s:
        next(s)
        with pytest.raises(RuntimeError, match="sampler has already produced batches.*new PatchSampler"):
            DirectIterator(s, batches_per_epoch=4).load_state_dict(state)
    with PatchSampler(image_dir, **settings) as s:
        fresh = DirectIterator(s, batches_per_epoch=4)
        with pytest.raises(ValueError, match=r"\['batches_per_epoch'\] is 4.*batches_per_epoch=4"):
            DirectIterator(s, batches_per_epoch=5).load_state_dict(state)
        with pytest.raises(ValueError, match=r"\['iterator'\]\['epoch_batches'\]"):
            fresh.load_state_dict({**state, "iterator": {"batches_per_epoch": 4, "epoch_batches": 4}})
        with pytest.raises(ValueError, match=r"\['iterator'\]\['batches_per_epoch'\] is missing"):
            fresh.load_state_dict({**state, "iterator": {"epoch_batches": 1}})
        with pytest.raises(ValueError, match="not a dict"):
            fresh.load_state_dict([state])
        with pytest.raises(ValueError, match="seed"):  # another sampler's state
            fresh.load_state_dict({**state, "fingerprint": {**state["fingerprint"], "seed": 99}})
        fresh.load_state_dict(state)  # every refusal left the iterator and the sampler as they were
        assert len(list(fresh)) == 3  # the rest of the saved epoch
    with PatchSampler(image_dir, **settings) as s:
        with pytest.raises(ValueError, match="prefetch_queue_depth=0"):
            PatchIterator(s, prefetch_queue_depth=0)
        with pytest.raises(ValueError, match="batches_per_epoch=True"):
            DirectIterator(s, batches_per_epoch=True)
