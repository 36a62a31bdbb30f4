"""Decode on the CPU, train on a GPU: a ``device="cpu"`` sampler's batches copied to CUDA tensors
(``DirectIterator(sampler, to_device=...)``, :mod:`dali_patches.export.transfer`).

On the CPU these run on the simulated GPU of ``tests/cuda_sim.py``: the CPU sampler is real, its
batches go up through the iterator's pinned staging buffers and copy stream to device 1 of the
simulator (while the caller's thread keeps device 0 current), and a trainer reads them on a stream
of its own that runs late (torch's CUDA side is stood in for by that stream). Every patch read must
equal the plain CPU iterator's bit for bit, every access is checked against the happens-before order,
and each known mistake of the copy stage, injected once, must be caught. On a real GPU the same race
runs through torch (marked ``gpu``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import dali_patches.engine.backend as backend_module
from dali_patches import PatchSampler
from dali_patches.engine.backend import Backend, DeviceUnavailableError, cuda_available
from dali_patches.export.transfer import DeviceCopies
from dali_patches.torch import DirectIterator

from . import cuda_sim
from .conftest import assert_same_steps, simulated_gpu
from .cuda_sim import Simulator

SETTINGS = {"patch_size": 16, "batch_size": 8, "reuse": 2, "cache_images": 12, "device": "cpu", "seed": 0}
DEVICE = 1  # the device copied to; the caller's thread keeps device 0 current
BATCHES = 40

Step = tuple[np.ndarray, np.ndarray, np.ndarray]  # patches, source, anchor (host copies)


def _plain(image_dir: Path, batches: int, **settings: Any) -> list[Step]:
    """The plain CPU direct iterator's first ``batches`` batches (host copies)."""
    with PatchSampler(image_dir, **{**SETTINGS, **settings}) as s:
        return [tuple(np.asarray(data[name]).copy() for name in ("patches", "source", "anchor"))  # type: ignore[misc]
                for _, data in zip(range(batches), DirectIterator(s))]


@pytest.fixture(scope="module")
def expected(image_dir: Path) -> list[Step]:
    return _plain(image_dir, BATCHES)


def _uploads_hold_no_array(monkeypatch: pytest.MonkeyPatch) -> None:
    """A queued host-to-device copy refers to its destination's memory, not to the Python array (CUDA's
    holds no reference at all); the simulator's keeps the array for its hazard message, which would
    make a ring buffer look referenced while a copy into it is queued. Hand it a stand-in over the
    same memory instead."""
    real = Simulator._upload

    def upload(self: Simulator, host: np.ndarray, target: Any, stream: Any) -> None:
        real(self, host, cuda_sim.ndarray(target.shape, _sim=self, _view=target._view, _handle=target._handle),
             stream)

    monkeypatch.setattr(Simulator, "_upload", upload)


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[Simulator]:
    _uploads_hold_no_array(monkeypatch)
    with simulated_gpu(monkeypatch, max_lag_s=0.004, seed=1) as simulator:
        yield simulator


class _Torch:
    """torch's CUDA side on the simulator: ``current_stream(device)`` is the trainer's simulated stream
    (the devices asked for are noted), ``from_dlpack`` hands the simulated arrays over as they are."""

    def __init__(self, sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> None:
        xp = sim.xp
        with xp.cuda.Device(DEVICE):
            self.stream = xp.cuda.Stream(non_blocking=True)
        self.asked: list[Any] = []
        outer = self

        class _TorchStream:
            @property
            def cuda_stream(self) -> int:
                return outer.stream.ptr

        def current_stream(device: Any = None) -> _TorchStream:
            outer.asked.append(device)
            return _TorchStream()

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: DEVICE)
        monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
        monkeypatch.setattr(torch, "from_dlpack", lambda array: array)


@pytest.fixture
def fake_torch(sim: Simulator, monkeypatch: pytest.MonkeyPatch) -> _Torch:
    return _Torch(sim, monkeypatch)


def _train(sim: Simulator, trainer: _Torch, iterator: DirectIterator, batches: int, lag_s: float = 0.004,
           keep: int = 0, names: tuple[str, ...] = ("patches",), placed: bool = True,
           ) -> list[tuple[int, list[np.ndarray]]]:
    """A trainer on its own stream of device 1: each step it takes a batch, spends ``lag_s`` of device
    time, then reads the device outputs ``names`` (a copy queued on its stream); it keeps the last
    ``keep`` batches and reads each once more when it lets go of it (a kept batch must not change).
    Returns (batch number, outputs read) of every read; the host outputs are checked at once."""
    xp, stream = sim.xp, trainer.stream
    reads: list[tuple[int, list[Any]]] = []
    kept: list[tuple[int, list[Any]]] = []

    def read(i: int, arrays: list[Any]) -> None:
        with xp.cuda.Device(DEVICE), stream:
            reads.append((i, [a.copy() for a in arrays]))

    steps = iter(iterator)
    for i in range(batches):
        data = next(steps)
        arrays = [data[name] for name in names]
        assert not placed or all(a.device.id == DEVICE for a in arrays)  # on the device asked for ...
        assert isinstance(data["source"], np.ndarray) and isinstance(data["anchor"], np.ndarray)  # ... these on the host
        sim.delay(stream, lag_s)  # the training step before this batch's patches are read
        read(i, arrays)
        if keep:
            kept.append((i, arrays))
            if len(kept) > keep:
                read(*kept.pop(0))
        del data, arrays
    stream.synchronize()
    with xp.cuda.Device(DEVICE), stream:
        return [(i, [xp.asnumpy(a) for a in arrays]) for i, arrays in reads]


def _same(got: list[tuple[int, list[np.ndarray]]], expected: list[Step]) -> bool:
    return all(np.array_equal(arrays[0], expected[i][0]) for i, arrays in got)


# -- CPU sampler → CUDA tensors ----------------------------------------------------------------------

@pytest.mark.parametrize("late", ["consumer", "copy"])
def test_cpu_batches_arrive_on_the_device_bit_for_bit(sim: Simulator, fake_torch: _Torch, image_dir: Path,
                                                      expected: list[Step], monkeypatch: pytest.MonkeyPatch,
                                                      late: str) -> None:
    """The trainer's stream runs late (and keeps batches), or the copies do: every patch read, kept
    ones read again much later included, is the CPU sampler's, never a stale or torn one."""
    if late == "copy":
        real = DeviceCopies._wait_for_readers

        def late_copy(self: DeviceCopies, events: list[Any]) -> None:
            real(self, events)
            sim.delay(self._stream, 0.006)  # the copy stream is busy before each copy

        monkeypatch.setattr(DeviceCopies, "_wait_for_readers", late_copy)
    with PatchSampler(image_dir, **SETTINGS) as s:
        iterator = DirectIterator(s, to_device=f"cuda:{DEVICE}")
        got = _train(sim, fake_torch, iterator, BATCHES, lag_s=0.004 if late == "consumer" else 0.0, keep=6)
    assert len(got) == 2 * BATCHES - 6
    assert _same(got, expected)
    assert set(fake_torch.asked) == {DEVICE}  # torch's stream of the device copied to, not the current one
    sim.check()


def test_every_part_is_copied(sim: Simulator, fake_torch: _Torch, sr_pairs: Path) -> None:
    """Patches and a companion of another size share one ring buffer (the companion at the next
    256-byte boundary after the patches' 3456 bytes) and arrive exactly as the CPU iterator gives them."""
    source = {"image": str(sr_pairs / "lr_x2/**/*x2.png"), "target": str(sr_pairs / "hr/**/*.png")}
    settings = {"patch_size": 12, "batch_size": 8, "reuse": 4, "cache_images": 12, "device": "cpu", "seed": 2,
                "companions": {"target": {"scale": 2}}}
    with PatchSampler(source, **settings) as s:
        plain = [(np.asarray(d["patches"]).copy(), np.asarray(d["target"]).copy(), np.asarray(d["source"]).copy())
                 for _, d in zip(range(12), DirectIterator(s))]
    with PatchSampler(source, **settings) as s:
        got = _train(sim, fake_torch, DirectIterator(s, to_device=DEVICE), 12, names=("patches", "target"))
    assert [i for i, _ in got] == list(range(12))
    for i, (patches, target) in got:
        assert patches.dtype == np.uint8 and patches.shape == (8, 12, 12, 3) and target.shape == (8, 24, 24, 3)
        assert np.array_equal(patches, plain[i][0]) and np.array_equal(target, plain[i][1])
    sim.check()


def test_the_ring_stays_bounded(sim: Simulator, fake_torch: _Torch, image_dir: Path, expected: list[Step]) -> None:
    """``copy_depth`` device and pinned buffers, whatever the trainer does: one that keeps nothing never
    makes the ring allocate; one that keeps batches gets replacements that are its own, while the
    ring's memory stays the same."""
    batch_bytes = 8 * 16 * 16 * 3  # one batch's patches, a multiple of the 256-byte alignment
    with PatchSampler(image_dir, **SETTINGS) as s:
        iterator = DirectIterator(s, to_device="cuda", copy_depth=4)  # "cuda": torch's current device
        got = _train(sim, fake_torch, iterator, BATCHES)
        copies = iterator.copies
        assert copies is not None and copies.backend.device_id == DEVICE
        assert copies.replaced == 0
        assert copies.device_bytes == copies.host_bytes == 4 * batch_bytes
    assert _same(got, expected)
    with PatchSampler(image_dir, **SETTINGS) as s:
        iterator = DirectIterator(s, to_device="cuda", copy_depth=4)
        got = _train(sim, fake_torch, iterator, BATCHES, keep=8)
        copies = iterator.copies
        assert copies is not None and copies.replaced > 0
        assert copies.device_bytes == copies.host_bytes == 4 * batch_bytes
        iterator.close()
        assert copies.device_bytes == copies.host_bytes == 0
    assert _same(got, expected)
    sim.check()


def test_the_host_does_not_wait_for_the_trainers_stream(sim: Simulator, fake_torch: _Torch, image_dir: Path,
                                                          expected: list[Step]) -> None:
    """Batches keep coming while the trainer's stream is seconds behind: the host waits for no copy
    (only a staging buffer whose copy ``copy_depth`` batches back has not run would make it wait)."""
    xp, stream = sim.xp, fake_torch.stream
    with PatchSampler(image_dir, **SETTINGS) as s:
        steps = iter(DirectIterator(s, to_device=DEVICE, copy_depth=3))
        with xp.cuda.Device(DEVICE), stream:
            first = [next(steps)["patches"].copy()]
        stream.synchronize()
        sim.delay(stream, 3.0)  # the trainer's GPU is busy for a long while
        t0 = time.monotonic()
        with xp.cuda.Device(DEVICE), stream:
            for _ in range(5):  # copies from batch 4 on wait for the trainer's stream; batch 7 would wait for one
                first.append(next(steps)["patches"].copy())
        took = time.monotonic() - t0
        assert not stream.done, "the host waited for the trainer's stream"
        assert took < 2.0
        stream.synchronize()
        with xp.cuda.Device(DEVICE), stream:
            got = [(i, [xp.asnumpy(a)]) for i, a in enumerate(first)]
    assert _same(got, expected)
    sim.check()


# -- the state is the plain iterator's -----------------------------------------------------------------

def _host(data: dict[str, Any], xp: Any = None) -> tuple[np.ndarray, ...]:
    """Host copies of a step's outputs (``xp``: the simulator's module, for device patches)."""
    return tuple(xp.asnumpy(data[name]) if xp is not None and name == "patches" else np.asarray(data[name]).copy()
                 for name in ("patches", "source", "anchor"))


def test_state_is_the_plain_direct_iterators(sim: Simulator, fake_torch: _Torch, image_dir: Path) -> None:
    xp = sim.xp
    with PatchSampler(image_dir, **SETTINGS) as s:
        plain = DirectIterator(s, batches_per_epoch=4)
        assert len([*plain, *zip(range(2), plain)]) == 6  # an epoch and two batches of the next
        plain_state = plain.state_dict()
        rest = [_host(d) for d in plain]
    with PatchSampler(image_dir, **SETTINGS) as s, xp.cuda.Device(DEVICE), fake_torch.stream:
        copying = DirectIterator(s, batches_per_epoch=4, to_device=DEVICE)
        assert len([*copying, *zip(range(2), copying)]) == 6
        state = copying.state_dict()
    assert state == plain_state and state["iterator"] == {"batches_per_epoch": 4, "epoch_batches": 2}
    with PatchSampler(image_dir, **SETTINGS) as s, xp.cuda.Device(DEVICE), fake_torch.stream:
        resumed = DirectIterator(s, batches_per_epoch=4, to_device=DEVICE)
        resumed.load_state_dict(state)  # in time: the copy ring takes no batch before the first next()
        assert_same_steps([_host(d, xp) for d in resumed], rest)
    sim.check()


# -- each known mistake, injected, is caught -------------------------------------------------------------

def _skip_the_consumer_wait(monkeypatch: pytest.MonkeyPatch, sim: Simulator) -> None:
    monkeypatch.setattr(DeviceCopies, "_hand_over", lambda self, consumer, copied: None)


def _overwrite_before_the_readers(monkeypatch: pytest.MonkeyPatch, sim: Simulator) -> None:
    monkeypatch.setattr(DeviceCopies, "_wait_for_readers", lambda self, events: None)


def _record_at_the_next_request(monkeypatch: pytest.MonkeyPatch, sim: Simulator) -> None:
    """An event recorded on the consumer's stream at the first ``next()`` after a batch was handed out,
    trusted once the buffer is unreferenced — but a consumer that kept the batch read it after."""
    real_free = DeviceCopies._free

    def observe(self: DeviceCopies) -> None:
        events = self._record_consumers()
        for slot in self._slots:
            if slot.events is None:
                slot.early = getattr(slot, "early", None) or events  # type: ignore[attr-defined]
                if real_free(self, slot):
                    slot.events, slot.early = slot.early, None  # type: ignore[attr-defined]

    monkeypatch.setattr(DeviceCopies, "_observe", observe)


def _recycle_a_held_buffer(monkeypatch: pytest.MonkeyPatch, sim: Simulator) -> None:
    monkeypatch.setattr(DeviceCopies, "_free", lambda self, slot: True)


def _refill_pinned_staging_at_once(monkeypatch: pytest.MonkeyPatch, sim: Simulator) -> None:
    def next_staging(self: DeviceCopies) -> Any:  # in turn, never waiting for the copy from it
        sim.delay(self._stream, 0.05)  # a busy copy engine: the copies from it are still queued then
        staging = self._staging[self._turn]
        self._turn = (self._turn + 1) % len(self._staging)
        return staging

    monkeypatch.setattr(DeviceCopies, "_next_staging", next_staging)


def _forget_the_device(monkeypatch: pytest.MonkeyPatch, sim: Simulator) -> None:
    import contextlib

    monkeypatch.setattr(Backend, "on_device", lambda self: contextlib.nullcontext())  # whatever is current


MISTAKES = {  # name → (injection, what the hazard check says; None: the patches read come out wrong, keep)
    "read before the copy (no consumer wait)": (_skip_the_consumer_wait, "read after write", 0),
    "copy over a buffer the consumer still reads": (_overwrite_before_the_readers, "write after read", 0),
    "trust an event recorded before the consumer let go": (_record_at_the_next_request, "write after read", 2),
    "recycle a buffer still referenced": (_recycle_a_held_buffer, None, 6),
    "refill pinned staging before its copy ran": (_refill_pinned_staging_at_once, "pinned host memory", 0),
    "copy on the caller's device": (_forget_the_device, "lives on device 0", 0),
}


@pytest.mark.parametrize("keep", sorted({keep for _, _, keep in MISTAKES.values()}))
def test_without_a_mistake_nothing_is_caught(sim: Simulator, fake_torch: _Torch, image_dir: Path,
                                             expected: list[Step], keep: int) -> None:
    """The runs the mistakes are injected into, as they are: exact, and no hazard."""
    with PatchSampler(image_dir, **SETTINGS) as s:
        got = _train(sim, fake_torch, DirectIterator(s, to_device=DEVICE), 30, lag_s=0.01, keep=keep)
    assert _same(got, expected)
    sim.check()


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_known_mistake_is_caught(sim: Simulator, fake_torch: _Torch, image_dir: Path, expected: list[Step],
                                      monkeypatch: pytest.MonkeyPatch, mistake: str) -> None:
    inject, hazard, keep = MISTAKES[mistake]
    inject(monkeypatch, sim)
    with PatchSampler(image_dir, **SETTINGS) as s:
        got = _train(sim, fake_torch, DirectIterator(s, to_device=DEVICE), 30, lag_s=0.01, keep=keep, placed=False)
    if hazard is None:  # ordered, but a batch the consumer still held was rewritten under it
        assert not _same(got, expected), mistake
    else:
        assert any(hazard in h for h in sim.hazards), (mistake, sim.hazards[:3])
    sim.hazards.clear()


# -- clear errors -------------------------------------------------------------------------------------------

def test_a_gpu_sampler_refuses_to_device(sim: Simulator, fake_torch: _Torch, image_dir: Path) -> None:
    with PatchSampler(image_dir, **{**SETTINGS, "device": "gpu"}, device_id=DEVICE) as s:
        for to_device in ("cuda", f"cuda:{DEVICE}", "cpu"):
            with pytest.raises(ValueError, match=rf"to_device='{to_device}'.*already runs on CUDA device 1.*"
                                                 "drop to_device.*device='cpu'"):
                DirectIterator(s, to_device=to_device)


def test_bad_to_device_and_copy_depth(image_dir: Path) -> None:
    with PatchSampler(image_dir, **SETTINGS) as s:
        for bad in ("tpu", "cuda:x", True, -1, 1.5):
            with pytest.raises(ValueError, match=rf"to_device={bad!r} is no CUDA device.*'cuda:N'"):
                DirectIterator(s, to_device=bad)
        assert DirectIterator(s, to_device="cpu").copies is None  # a CPU sampler's tensors are there already
        assert DirectIterator(s, to_device=torch.device("cpu")).copies is None


@pytest.mark.parametrize("depth", [1, 0, True, "3"])
def test_copy_depth_is_checked(sim: Simulator, fake_torch: _Torch, image_dir: Path, depth: Any) -> None:
    with PatchSampler(image_dir, **SETTINGS) as s, pytest.raises(ValueError, match=rf"copy_depth={depth!r}"):
        DirectIterator(s, to_device=DEVICE, copy_depth=depth)


def test_no_cuda_in_torch_is_a_clear_error(image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with PatchSampler(image_dir, **SETTINGS) as s, pytest.raises(
            DeviceUnavailableError, match=r"to_device='cuda'.*torch.cuda.is_available\(\) is False.*to_device=None"):
        DirectIterator(s, to_device="cuda")


def test_no_cupy_is_a_clear_error(image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(backend_module, "_import_cupy", lambda: None)
    with PatchSampler(image_dir, **SETTINGS) as s, pytest.raises(
            DeviceUnavailableError, match=r"to_device='cuda:0'.*CuPy.*dali-patches\[cuda13\].*to_device=None"):
        DirectIterator(s, to_device="cuda:0")


# -- a real GPU --------------------------------------------------------------------------------------------

@pytest.fixture
def torch_cuda() -> Any:
    if not cuda_available() or not torch.cuda.is_available():
        pytest.skip("no CUDA GPU with CuPy and torch on this machine")
    return torch


@pytest.mark.gpu
def test_on_a_gpu_cpu_batches_arrive_as_cuda_tensors(torch_cuda: Any, image_dir: Path, expected: list[Step]) -> None:
    """torch's stream held back each step and tensors kept for a while: every patch read, on the GPU,
    is the CPU sampler's; the tensors are the ring's device memory (DLPack, no second copy)."""
    with PatchSampler(image_dir, **SETTINGS) as s:
        iterator = DirectIterator(s, to_device="cuda")
        held, kept = [], []  # (batch number, a clone read on the GPU), (batch number, the tensor kept)
        for i, data in zip(range(BATCHES), iterator):
            patches = data["patches"]
            assert patches.device == torch.device("cuda", torch.cuda.current_device())
            assert data["source"].device.type == "cpu"
            torch.cuda._sleep(5_000_000)  # the trainer's stream spins for milliseconds before it reads
            held.append((i, patches.clone()))
            kept.append((i, patches))
            if len(kept) > 6:
                j, old = kept.pop(0)
                held.append((j, old.clone()))  # read again, after later batches were copied
        torch.cuda.synchronize()
        copies = iterator.copies
        assert copies is not None and copies.replaced > 0
        ring = [slot.buffer.data.ptr for slot in copies._slots]
        assert kept[-1][1].data_ptr() in ring
    assert len(held) == 2 * BATCHES - 6
    for i, read in held:
        assert np.array_equal(read.cpu().numpy(), expected[i][0]), i
