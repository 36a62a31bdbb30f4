"""JAX export: arrays through DLPack and through DALI's JAX plugin; skipped where JAX is absent."""

from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp

from dali_patches import PatchSampler
from dali_patches.jax import DirectIterator, PatchIterator
from dali_patches.state import Stateful

from .conftest import assert_same_steps

ITERATORS = [pytest.param(PatchIterator, id="pipeline"), pytest.param(DirectIterator, id="direct")]
SETTINGS = {"patch_size": (16, 24), "batch_size": 8, "reuse": 4, "cache_images": 12, "seed": 2}


@pytest.fixture
def jax_device(dali_device: str) -> str:
    """The sampler's device, where JAX can take arrays from it (a GPU only with a CUDA build of JAX)."""
    if dali_device == "gpu" and not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("this JAX has no GPU backend")
    return dali_device


def _host(data: dict) -> tuple[np.ndarray, ...]:
    return tuple(np.array(data[name]) for name in ("patches", "source", "anchor"))


@pytest.mark.parametrize("kind", ITERATORS)
def test_jax_patches_equal_the_torch_path(kind: type, jax_device: str, image_dir: Path) -> None:
    """Two samplers with one seed: the JAX iterator's patches, sources and anchors are the torch
    DirectIterator's, bit for bit, with shapes and dtypes as documented, on the sampler's device."""
    torch = pytest.importorskip("torch")
    from dali_patches.torch import DirectIterator as TorchIterator

    settings = {**SETTINGS, "device": jax_device}
    with PatchSampler(image_dir, **settings) as s:
        expected = [tuple(d[n].cpu().numpy().copy() for n in ("patches", "source", "anchor"))
                    for d in [*TorchIterator(s, batches_per_epoch=3), *TorchIterator(s, batches_per_epoch=3)]]
    assert expected[0][0].dtype == np.uint8 and torch.get_default_dtype() == torch.float32
    with PatchSampler(image_dir, **settings) as s:
        iterator = kind(s, batches_per_epoch=3)
        steps = [*iterator, *iterator]  # two epochs of 3
        assert len(iterator) == 3 and len(steps) == 6
        data = steps[-1]
        assert data["patches"].shape == (8, 16, 24, 3) and data["patches"].dtype == jnp.uint8
        assert data["source"].shape == (8,) and data["source"].dtype == jnp.int32  # no int64 without x64
        assert data["anchor"].shape == (8, 2) and data["anchor"].dtype == jnp.int32
        platform = "gpu" if jax_device == "gpu" else "cpu"
        assert {d.platform for d in data["patches"].devices()} == {platform}
        assert_same_steps([_host(d) for d in steps], expected)


@pytest.mark.parametrize("kind", ITERATORS)
def test_state_round_trip_continues_the_stream(kind: type, jax_device: str, image_dir: Path) -> None:
    """Saved after k batches, inside an epoch: a new sampler and iterator, the state loaded, go on
    with the very batches the saving iterator went on with, epoch boundaries included."""
    settings = {**SETTINGS, "device": jax_device}
    with PatchSampler(image_dir, **settings) as s:
        iterator = kind(s, batches_per_epoch=3)
        taken = [_host(d) for d in iterator]  # one epoch ...
        for data in iterator:  # ... and one batch of the next
            taken.append(_host(data))
            break
        state = iterator.state_dict()
        rest = [_host(d) for d in iterator]
        after = [_host(d) for d in iterator]
    assert len(taken) == 4 and state["iterator"] == {"batches_per_epoch": 3, "epoch_batches": 1}
    with PatchSampler(image_dir, **settings) as s:
        resumed = kind(s, batches_per_epoch=3)
        assert isinstance(resumed, Stateful)
        resumed.load_state_dict(state)
        assert_same_steps([_host(d) for d in resumed], rest)
        assert_same_steps([_host(d) for d in resumed], after)
    with PatchSampler(image_dir, **settings) as s:  # the sampler alone takes the same state
        s.load_state_dict(state)
        assert np.array_equal(next(s).source, rest[0][1])


def test_refuses_a_state_after_the_first_batch(image_dir: Path) -> None:
    with PatchSampler(image_dir, **SETTINGS, device="cpu") as s:
        iterator = DirectIterator(s)
        next(iter(iterator))
        with pytest.raises(RuntimeError, match="already taken batches"):
            iterator.load_state_dict(iterator.state_dict())
        with pytest.raises(RuntimeError, match="already produced batches"):
            PatchIterator(s).load_state_dict(iterator.state_dict())


def test_kept_arrays_never_change(image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU JAX reads the sampler's batch memory in place (where it is 64-byte aligned): an
    array the trainer keeps, and one dropped while a computation still reads it, are not rewritten by
    the sampler's later rounds. Rounds of 16 batches of 5400 bytes: one batch in eight is 64-byte aligned
    whatever the alignment of the round's buffer, so JAX takes some in place and copies the others."""
    with PatchSampler(image_dir, patch_size=15, batch_size=8, reuse=64, cache_images=24, device="cpu", seed=2) as s:
        assert s.stats()["round_batches"] == 16
        pointers: list[int] = []  # where each batch handed to the iterator lives (not the batch: no reference)
        take = s.take

        def recorded(stream: object = None) -> object:
            batch = take(stream)
            pointers.append(batch.patches.ctypes.data)
            return batch

        monkeypatch.setattr(s, "take", recorded)

        @jax.jit
        def slow_sum(x: jax.Array) -> jax.Array:
            y = x.astype(jnp.float32).reshape(x.shape[0], -1)
            for _ in range(40):
                y = jnp.tanh(y @ y.T @ y / y.size)
            return y.sum()

        stream = iter(DirectIterator(s))
        steps = [next(stream) for _ in range(16)]
        aliased = [d for d, p in zip(steps, pointers, strict=True) if d["patches"].unsafe_buffer_pointer() == p]
        assert len(aliased) >= 2  # some batches are the sampler's own memory
        kept, dropped = aliased[0], aliased[1]
        kept_pointer, kept_copy = kept["patches"].unsafe_buffer_pointer(), np.array(kept["patches"])
        expected = slow_sum(jnp.array(np.array(dropped["patches"])))
        pending = slow_sum(dropped["patches"])
        del steps, aliased, dropped  # the computation may still be queued: JAX holds the batch until it has run
        for _ in range(64):  # enough rounds for the output ring to come round
            next(stream)
        assert kept_pointer not in pointers[16:]
        assert np.array_equal(np.array(kept["patches"]), kept_copy)
        assert np.array_equal(np.array(pending), np.array(expected))


def test_a_small_jax_model_trains_on_the_patches(jax_device: str, image_dir: Path) -> None:
    """A linear model (each patch's mean value from its pixels), plain JAX: ``jax.grad`` and SGD."""
    with PatchSampler(image_dir, patch_size=16, batch_size=8, reuse=4, cache_images=12, device=jax_device,
                      seed=0) as s:
        weights = jnp.zeros(16 * 16 * 3, jnp.float32)

        def loss(w: jax.Array, x: jax.Array) -> jax.Array:
            return jnp.mean((x @ w - x.mean(axis=1)) ** 2)

        @jax.jit
        def step(w: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
            value, grad = jax.value_and_grad(loss)(w, x)
            return w - 1e-3 * grad, value

        losses = []
        for data in DirectIterator(s, batches_per_epoch=20):
            x = data["patches"].reshape(8, -1).astype(jnp.float32) / 255  # (8, 768) in [0, 1]
            weights, value = step(weights, x)
            losses.append(float(value))
    assert len(losses) == 20 and np.isfinite(losses).all()
    assert losses[-1] != losses[0] and np.mean(losses[-5:]) < np.mean(losses[:5])
