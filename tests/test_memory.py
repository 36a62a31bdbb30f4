"""Memory: the default decode batch from a memory budget, the feeder handing images over one at a
time, and ``max_memory`` covering what the engine holds."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import numpy as np
import pytest

from dali_patches.config import Device, SamplerConfig, default_decode_batch
from dali_patches.engine.feeder import DecodeFeeder

MIB = 2**20


@pytest.mark.parametrize(("device", "largest", "expected"), [
    (Device.CPU, None, 8), (Device.GPU, None, 64),
    (Device.CPU, 72 * MIB, 1),  # 25 MP RGB
    (Device.CPU, 36 * MIB, 2),  # 12 MP
    (Device.CPU, 6 * MIB, 8),  # 2 MP: the device's batch
    (Device.CPU, 300 * MIB, 1),  # never below 1
    (Device.GPU, 72 * MIB, 28), (Device.GPU, 24 * MIB, 64),
])
def test_default_decode_batch_is_bounded_by_memory(device: Device, largest: int | None, expected: int) -> None:
    assert default_decode_batch(device, largest) == expected
    assert SamplerConfig(patch_size=8, batch_size=4, reuse=4, cache_bytes="1MiB").resolved(device, largest).decode_batch == expected
    assert SamplerConfig(patch_size=8, batch_size=4, reuse=4, cache_bytes="1MiB", decode_batch=5).resolved(device, largest).decode_batch == 5  # the user's wins


class _Stage:
    """A decode stage double: numbered images, a position per image."""

    def __init__(self) -> None:
        self.images_decoded = 0
        self.alive: set[int] = set()

    def state_dict(self) -> dict[str, Any]:
        return {"images_decoded": self.images_decoded}

    def next(self) -> tuple[int, list[Any]]:
        n = self.images_decoded
        self.images_decoded += 1
        return n, [np.full((2, 2, 3), n % 256, np.uint8)]


class _Backend:
    def use(self, stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def test_each_hands_images_over_one_at_a_time_in_order() -> None:
    feeder = DecodeFeeder(_Stage(), _Backend(), None, capacity=2)  # type: ignore[arg-type]
    try:
        seen = []
        for source, images in feeder.each(10, 10):  # more than the feeder banks: the rest as they come
            seen.append(source)
            assert feeder.taken == len(seen)  # counted as handed over, not at the end
            assert images[0][0, 0, 0] == source
        assert seen == list(range(10))
        assert [s for s, _ in feeder.take(3, 3)] == [10, 11, 12]
        assert len(feeder.take(0, 100)) <= 2  # at_least 0: only what is ready
    finally:
        feeder.close()


def test_each_stops_early_without_losing_images() -> None:
    feeder = DecodeFeeder(_Stage(), _Backend(), None, capacity=3)  # type: ignore[arg-type]
    try:
        it = feeder.each(4, 4)
        assert next(it)[0] == 0
        assert next(it)[0] == 1
        it.close()  # a caller that stops: the images not yet handed over stay in the feeder
        assert feeder.taken == 2
        assert feeder.take(1, 1)[0][0] == 2
    finally:
        feeder.close()
    assert not any(t.name.startswith("dali-patches-decode") and t.is_alive() for t in threading.enumerate())


class _StallingStage(_Stage):
    """Stalls in the first ``state_dict`` call that follows the first decode, until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def state_dict(self) -> dict[str, Any]:
        if self.images_decoded == 1 and not self.release.is_set():
            self.release.wait(5)
        return super().state_dict()


def test_the_state_after_the_buffer_empties_is_after_the_last_image_taken() -> None:
    """The state of an empty buffer is the position after the image taken last, even while the
    decode thread is between handing an image over and starting the next decode (a window in which
    it used to be the position *before* that image: a timing-dependent off-by-one on resume)."""
    stage = _StallingStage()
    feeder = DecodeFeeder(stage, _Backend(), None, capacity=1)  # type: ignore[arg-type]
    threading.Timer(0.2, stage.release.set).start()
    try:
        assert [s for s, _ in feeder.take(1, 1)] == [0]
        assert feeder.state_dict() == {"images_decoded": 1}
    finally:
        stage.release.set()
        feeder.close()
