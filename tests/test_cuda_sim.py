"""The simulated GPU itself (tests/cuda_sim.py): it must run work late and out of step, order it
exactly as events and waits say, and flag every unordered access — or the GPU tests prove nothing."""

from __future__ import annotations

import time

import numpy as np
import pytest

from .cuda_sim import HazardError, Simulator


@pytest.fixture
def sim():
    simulator = Simulator(max_lag_s=0.002, seed=3)
    yield simulator
    simulator.close()


def _streams(sim: Simulator, n: int = 2) -> list:
    return [sim.xp.cuda.Stream(non_blocking=True) for _ in range(n)]


def test_work_runs_later_than_it_is_queued_and_in_stream_order(sim: Simulator) -> None:
    xp = sim.xp
    (s,) = _streams(sim, 1)
    with s:
        a = xp.asarray(np.arange(8, dtype=np.uint8))
        sim.delay(s, 0.05)
        b = a.copy()
    assert not s.done  # queued, not run
    t0 = time.monotonic()
    assert np.array_equal(xp.asnumpy(b, s), np.arange(8))
    assert time.monotonic() - t0 >= 0.04
    sim.check()


def test_an_event_orders_two_streams_and_no_event_is_a_hazard(sim: Simulator) -> None:
    xp = sim.xp
    producer, consumer = _streams(sim)
    with producer:
        data = xp.asarray(np.ones(16, np.uint8))
        ready = producer.record()
    consumer.wait_event(ready)
    with consumer:
        data.copy()
    sim.device_synchronize()
    sim.check()  # ordered: no hazard
    with consumer:
        sim.delay(consumer, 0.01)
        data.copy()  # a read on the consumer's stream ...
    with producer:
        data[...] = xp.asarray(np.zeros(16, np.uint8))  # ... and a write on the producer's, nothing between
    sim.device_synchronize()
    with pytest.raises(HazardError, match="write after read .* not ordered after 'copy'"):
        sim.check()


def test_released_memory_and_late_host_writes_are_caught(sim: Simulator) -> None:
    xp = sim.xp
    (s,) = _streams(sim, 1)
    pinned = np.frombuffer(xp.cuda.alloc_pinned_memory(64), np.uint8)
    pinned[:] = 1
    with s:
        target = xp.empty(64, np.uint8)
        sim.delay(s, 0.02)
        target.set(pinned, s)
    pinned[:] = 2  # rewritten before the asynchronous copy has run
    s.synchronize()
    with pytest.raises(HazardError, match="pinned host memory was rewritten"):
        sim.check()
    sim.hazards.clear()
    with s:
        arena = xp.ndarray((32,), np.uint8, xp.cuda.MemoryPointer(xp.cuda.Memory(32), 0))
        sim.release_now(arena)
        arena.copy()
    sim.device_synchronize()
    with pytest.raises(HazardError, match="after it was released"):
        sim.check()


def test_pool_memory_reused_by_another_stream_without_an_event_is_a_hazard(sim: Simulator) -> None:
    xp = sim.xp
    producer, consumer = _streams(sim)
    with producer:
        buffer = xp.empty(256, np.uint8)
    consumer.wait_event(producer.record())
    with consumer:
        sim.delay(consumer, 0.02)
        buffer.copy()  # the consumer reads it, then lets go of it
    del buffer
    with producer:
        again = xp.empty(256, np.uint8)  # the pool hands the same memory out on the producer's stream
        again[...] = xp.asarray(np.zeros(256, np.uint8))
    sim.device_synchronize()
    with pytest.raises(HazardError, match="not ordered after 'copy'"):
        sim.check()


def test_work_on_another_device_than_the_memory_is_a_hazard(sim: Simulator) -> None:
    xp = sim.xp
    with xp.cuda.Device(1):
        (s1,) = _streams(sim, 1)
    on_zero = xp.asarray(np.zeros(8, np.uint8))  # device 0 is current
    with xp.cuda.Device(1), s1:
        on_zero.copy()
    sim.device_synchronize()
    with pytest.raises(HazardError, match="lives on device 0"):
        sim.check()


def test_device_arrays_do_not_turn_into_host_arrays_silently(sim: Simulator) -> None:
    array = sim.xp.asarray(np.arange(4, dtype=np.uint8))
    with pytest.raises(TypeError, match="asnumpy"):
        np.asarray(array)
