"""GPU hand-over: a consumer whose CUDA stream runs late must still read every patch exactly as it was
cut. Without an ordered hand-over (events, the consumer-stream wait, ``cuda_stream=``) and an output
ring that never rewrites a buffer still referenced, a slow consumer reads patches of a later round.

On the CPU these run on the simulated GPU of ``tests/cuda_sim.py`` (streams that run late and out of
step, every access checked against the happens-before order): the sampler's producer, cache, gather,
output ring and the direct path's consumer, on CUDA device 1 while the caller has device 0 current.
Each known mistake is injected once and must be caught. On a real GPU the same race runs through
torch (marked ``gpu``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dali_patches.engine.maker as maker_module
from dali_patches import PatchSampler
from dali_patches.engine.backend import Backend, cuda_available
from dali_patches.engine.outputs import OutputRing
from dali_patches.engine.rounds import RoundCutter

from .conftest import GPU_TEST_HW_DECODER_LOAD, reference_decode, simulated_gpu
from .cuda_sim import Simulator

SETTINGS = {"patch_size": 16, "batch_size": 8, "reuse": 2, "cache_images": 12, "device": "gpu", "seed": 0}
DEVICE = 1  # the sampler's device; the consumer's thread keeps device 0 current


def _consume(sim: Simulator, sampler: PatchSampler, batches: int, lag_s: float = 0.004, keep: int = 0,
             take: Callable[[Any], Any] | None = None) -> list[tuple[Any, np.ndarray, np.ndarray]]:
    """A trainer on its own stream of device 1: each step it takes a batch, spends ``lag_s`` of
    device time, then reads the patches (a copy queued on its stream). It also keeps the last
    ``keep`` batches and reads each once more when it lets go of it (a batch kept for later must
    not change). Returns (patches read, source, anchor) of every read."""
    xp = sim.xp
    with xp.cuda.Device(DEVICE):
        stream = xp.cuda.Stream(non_blocking=True)
    reads: list[tuple[Any, np.ndarray, np.ndarray]] = []
    kept: list[tuple[Any, np.ndarray, np.ndarray]] = []

    def read(patches: Any, source: Any, anchor: Any) -> None:
        with xp.cuda.Device(DEVICE), stream:
            reads.append((patches.copy(), np.asarray(source).copy(), np.asarray(anchor).copy()))

    for _ in range(batches):
        batch = take(stream) if take is not None else sampler.take(stream)
        fields = (batch["patches"], batch["source"], batch["anchor"]) if isinstance(batch, dict) \
            else (batch.patches, batch.source, batch.anchor)
        sim.delay(stream, lag_s)  # the training step before this batch's patches are read
        read(*fields)
        if keep:
            kept.append(fields)
            if len(kept) > keep:
                read(*kept.pop(0))
        del batch, fields
    stream.synchronize()
    with xp.cuda.Device(DEVICE), stream:
        return [(xp.asnumpy(c), s, a) for c, s, a in reads]


def _check_exact_padded(sampler: PatchSampler, got: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    reference = reference_decode(list(sampler.files), "cpu")
    p = sampler.config.patch_size
    for patches, source, anchor in got:
        for patch, s, (y, x) in zip(patches, source.tolist(), anchor.tolist()):
            image = reference[sampler.files[s]]
            padded = np.zeros((max(p[0], image.shape[0]), max(p[1], image.shape[1]), 3), np.uint8)
            padded[: image.shape[0], : image.shape[1]] = image
            assert np.array_equal(patch, padded[y: y + p[0], x: x + p[1]]), (s, y, x)


def _check_exact(sampler: PatchSampler, got: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> None:
    reference = reference_decode(list(sampler.files), "cpu")
    p = sampler.config.patch_size
    for patches, source, anchor in got:
        for patch, s, (y, x) in zip(patches, source.tolist(), anchor.tolist()):
            assert np.array_equal(patch, reference[sampler.files[s]][y: y + p[0], x: x + p[1]]), (s, y, x)


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch):
    with simulated_gpu(monkeypatch, max_lag_s=0.004, seed=1) as simulator:
        yield simulator


def test_a_late_consumer_stream_reads_every_patch_as_cut(sim: Simulator, image_dir: Path) -> None:
    with PatchSampler(image_dir, device_id=DEVICE, **SETTINGS) as sampler:
        got = _consume(sim, sampler, 60, keep=8)
        stats = sampler.stats()
    _check_exact(sampler, got)
    assert stats["batches_made"] >= 60 and sim.ops_run > 500
    sim.check()


@pytest.mark.parametrize("keep", [0, 8])
def test_padded_images_keep_their_decoded_views_until_padded(sim: Simulator, image_dir: Path, keep: int) -> None:
    """``pad=True``: the pad reads DALI's view on the producer's stream; the view must outlive it.
    With a consumer that keeps batches, the ring's replacements it drops later go back to CuPy's pool,
    where the pad's temporaries must not find them before the consumer is waited for."""
    with PatchSampler(image_dir, device_id=DEVICE,
                      **{**SETTINGS, "patch_size": 200, "pad": True, "cache_images": 10, "reuse": 1}) as sampler:
        got = _consume(sim, sampler, 30, lag_s=0.004, keep=keep)
    _check_exact_padded(sampler, got)
    sim.check()


def test_the_direct_iterator_orders_on_torchs_stream_of_the_samplers_device(
        sim: Simulator, image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DirectIterator asks torch for the current stream *of the sampler's device* (not of the current
    one) and hands it to the sampler; torch's CUDA side is stood in for by a simulated stream."""
    torch = pytest.importorskip("torch")
    from dali_patches.torch import DirectIterator

    asked: list[Any] = []
    consumer: dict[str, Any] = {}

    class _TorchStream:
        @property
        def cuda_stream(self) -> int:
            return consumer["stream"].ptr

    def current_stream(device: Any = None) -> _TorchStream:
        asked.append(device)
        return _TorchStream()

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch, "from_dlpack", lambda array: array)  # the simulated arrays as they are
    with PatchSampler(image_dir, device_id=DEVICE, **SETTINGS) as sampler:
        iterator = iter(DirectIterator(sampler))

        def take(stream: Any) -> dict[str, Any]:
            consumer["stream"] = stream
            return next(iterator)

        got = _consume(sim, sampler, 30, take=take)
    assert asked and set(asked) == {DEVICE}
    _check_exact(sampler, got)
    sim.check()


# -- each known mistake, injected, is caught ------------------------------------------------------

def _skip_consumer_wait(monkeypatch: pytest.MonkeyPatch, sim: Simulator) -> None:
    monkeypatch.setattr(RoundCutter, "wait_for_consumers", lambda self, stream: None)


def _recycle_a_held_buffer(monkeypatch: pytest.MonkeyPatch, sim: Simulator) -> None:
    monkeypatch.setattr(OutputRing, "_free", lambda self, group: True)


def _release_decoded_views_early(monkeypatch: pytest.MonkeyPatch, sim: Simulator) -> None:
    def release(self: Any, event: Any, wait: bool = False) -> None:
        self._holding = []  # dropped at once, without waiting for the copies that read them

    monkeypatch.setattr(maker_module.HeldViews, "release", release)


def _read_before_the_event(monkeypatch: pytest.MonkeyPatch, sim: Simulator) -> None:
    real = Backend.wait
    monkeypatch.setattr(Backend, "wait", staticmethod(lambda stream, event: None))  # nothing waits on batch.ready ...
    monkeypatch.setattr(RoundCutter, "wait_for_consumers",  # ... while the producer still waits for the consumer
                        lambda self, stream: [real(stream, self.backend.record(c)) for c in self._consumers.values()])


def _wait_before_choosing_the_memory(monkeypatch: pytest.MonkeyPatch, sim: Simulator) -> None:
    real_wait, real_acquire = RoundCutter.wait_for_consumers, OutputRing.acquire
    pending: dict[str, Any] = {}

    def wait_first(self: RoundCutter, stream: Any) -> None:  # called after acquire: wait now, acquire next time
        pending["cutter"], pending["stream"] = self, stream

    def acquire_after_waiting(self: OutputRing) -> Any:
        if pending:
            real_wait(pending["cutter"], pending["stream"])  # the consumer event is recorded first ...
            free = [self._free(g) for g in self._groups]
            deadline = time.monotonic() + 0.1  # (the consumer's thread may let go of a group any time; wait
            while time.monotonic() < deadline and [self._free(g) for g in self._groups] == free:  # for it)
                time.sleep(0.001)
        return real_acquire(self)  # ... and memory it lets go of in between is rewritten unordered

    monkeypatch.setattr(RoundCutter, "wait_for_consumers", wait_first)
    monkeypatch.setattr(OutputRing, "acquire", acquire_after_waiting)


def _forget_the_device(monkeypatch: pytest.MonkeyPatch, sim: Simulator) -> None:
    monkeypatch.setattr(Backend, "on_device", lambda self: contextlib.nullcontext())  # whatever is current


def _rewrite_pinned_tables_at_once(monkeypatch: pytest.MonkeyPatch, sim: Simulator) -> None:
    monkeypatch.setattr(RoundCutter, "_next_stage", lambda self: self._stages[0])  # one slot, never waited for


MISTAKES = {  # name → (injection, what the hazard check says; None: the patches read come out wrong, options)
    "skip the consumer-stream wait": (_skip_consumer_wait, "is not ordered after", {}),
    "recycle a ring buffer still referenced": (_recycle_a_held_buffer, None, {"keep": 8}),
    "release decoded views early": (_release_decoded_views_early, "released while", {}),
    "read an output before its event": (_read_before_the_event, "is not ordered after", {}),
    "wait for the consumer before choosing the memory": (_wait_before_choosing_the_memory, "is not ordered after",
                                                         {"keep": 8}),
    "allocate on the caller's device": (_forget_the_device, "lives on device 0", {}),
    "rewrite pinned tables before their upload": (_rewrite_pinned_tables_at_once, "pinned host memory", {}),
}


def _exact(sampler: PatchSampler, got: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> bool:
    try:
        _check_exact(sampler, got)
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_known_mistake_is_caught(sim: Simulator, image_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                      mistake: str) -> None:
    inject, expected, options = MISTAKES[mistake]
    inject(monkeypatch, sim)
    # Some mistakes show only when the streams interleave one way (a consumer letting go of memory
    # between two of the producer's steps): a busy machine may not give that order in one run, so
    # the mistake is caught when any of three runs shows it.
    for _ in range(3):
        with PatchSampler(image_dir, device_id=DEVICE, **SETTINGS) as sampler:
            got = _consume(sim, sampler, 40, lag_s=0.01, **options)
        caught = not _exact(sampler, got) if expected is None else any(expected in h for h in sim.hazards)
        if caught:
            break
    # expected None: ordered, but a batch the consumer still held was rewritten under it
    assert caught, (mistake, sim.hazards[:3])
    sim.hazards.clear()


def test_a_replaced_ring_group_goes_to_no_other_allocation(sim: Simulator) -> None:
    """A group the consumer kept (so the ring replaced it) and dropped later must not come back as the
    producer's pad or mask temporaries before the consumer is waited for: the ring has a pool of its own."""
    from dali_patches.engine.backend import resolve_backend

    backend = resolve_backend("gpu", DEVICE)
    with backend.use(backend.new_stream()):
        ring = OutputRing(backend, [4096], depth=1)
        held = ring.acquire()[0][:1]  # the consumer keeps a view ...
        replacement = ring.acquire()  # ... so the ring allocates a new group
        address = held.data.ptr
        del held  # the consumer lets go of the first group
        others = [backend.empty_device(n, np.uint8) for n in (4096, 1024, 64)]  # the producer's temporaries
        assert all(not (address <= o.data.ptr < address + 4096) for o in others)
        assert replacement[0].data.ptr != address
    sim.check()


def test_freeing_the_arena_under_a_running_sampler_is_caught(sim: Simulator, image_dir: Path) -> None:
    with PatchSampler(image_dir, device_id=DEVICE, **SETTINGS) as sampler:
        _consume(sim, sampler, 5)
        sim.release_now(sampler._producer.maker.cache.arena)  # freed behind the producer's back ...
        _consume(sim, sampler, 10)  # ... which goes on inserting and cutting
    assert any("after it was released" in hazard for hazard in sim.hazards), sim.hazards[:3]
    sim.hazards.clear()


# -- a real GPU ---------------------------------------------------------------------------------------

@pytest.fixture
def torch_cuda():
    torch = pytest.importorskip("torch")
    if not cuda_available() or not torch.cuda.is_available():
        pytest.skip("no CUDA GPU with CuPy and torch on this machine")
    return torch


def _check(held: list, sampler: PatchSampler, reference: dict[str, np.ndarray]) -> None:
    p = sampler.config.patch_size
    for patches, source, anchor in held:
        for patch, s, (y, x) in zip(patches, source.tolist(), anchor.tolist()):
            assert np.array_equal(patch, reference[sampler.files[s]][y: y + p[0], x: x + p[1]])


_SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
  long long start = clock64();
  while (clock64() - start < cycles) {}
}
"""


@pytest.mark.gpu
@pytest.mark.parametrize("late", ["consumer", "producer"])
@pytest.mark.parametrize("path", ["direct", "dali", "dali_no_copy"])
def test_on_a_gpu_a_late_stream_never_changes_a_patch(torch_cuda, image_dir: Path, path: str, late: str) -> None:
    """The consumer's stream held back (reads must still see each batch as cut), or the producer's
    (reads must wait for the gathers: DALI in place orders itself on the arrays' stream, not on
    ``cuda_stream=``)."""
    torch = torch_cuda
    import cupy

    from dali_patches.torch import DirectIterator, PatchIterator

    spin = cupy.RawKernel(_SPIN, "spin")
    with PatchSampler(image_dir, patch_size=16, batch_size=8, reuse=2, cache_images=12, device="gpu", seed=0,
                      hw_decoder_load=GPU_TEST_HW_DECODER_LOAD) as s:
        reference = reference_decode(list(s.files), "gpu")
        iterator = (DirectIterator(s) if path == "direct"
                    else PatchIterator(s, no_copy=path == "dali_no_copy"))
        held = []
        for _, data in zip(range(80), iterator):
            if late == "consumer":
                torch.cuda._sleep(5_000_000)  # the consumer's stream spins for milliseconds before it reads
            else:
                with s.backend.on_device(), s._producer.stream:
                    spin((1,), (1,), (np.int64(5_000_000),))  # the gathers queued from now on run late
            held.append((data["patches"].clone(), data["source"].cpu().clone(), data["anchor"].cpu().clone()))
        torch.cuda.synchronize()
        _check([(p.cpu().numpy(), src, anc) for p, src, anc in held], s, reference)
