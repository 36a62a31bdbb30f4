import itertools

import numpy as np
import pytest

from dali_patches.engine.cache import RingCache


def _image(xp, h: int, w: int, value: int):
    return xp.asarray(np.full((h, w, 3), value, dtype=np.uint8))


def test_insert_copies_pixels_and_fills_slot_table(backend) -> None:
    cache = RingCache(backend, 10_000, max_slots=16)
    xp = backend.xp
    image = xp.asarray(np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3))
    slot = cache.insert(image, source=7)
    off = int(cache.offset[slot])
    assert (int(cache.height[slot]), int(cache.width[slot]), int(cache.source[slot])) == (20, 30, 7)
    stored = backend.to_host(cache.arena[off: off + image.size]).reshape(20, 30, 3)
    assert np.array_equal(stored, backend.to_host(image))
    assert cache.bytes_used == image.size and cache.resident == 1


def test_fifo_eviction_and_fixed_arena(backend) -> None:
    cache = RingCache(backend, capacity_bytes=1000, max_slots=64)
    arena, nbytes = cache.arena, cache.arena.nbytes
    xp = backend.xp
    evicted_order, seen = [], set()
    for i in range(40):
        size = (7 + (i * 5) % 9, 10)  # 210..480 bytes: wraps with slack at the end
        before = set(cache.source[cache.resident_slots()].tolist())
        cache.insert(_image(xp, *size, i % 256), source=i)
        after = set(cache.source[cache.resident_slots()].tolist())
        gone = sorted(before - after)
        evicted_order += gone
        seen.add(i)
        assert cache.bytes_used <= cache.capacity_bytes
        # residents never overlap, and their pixels are intact
        slots = cache.resident_slots()
        spans = sorted((int(cache.offset[s]), int(cache.offset[s] + cache.height[s] * cache.width[s] * 3)) for s in slots)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
        for s in slots:
            off, n = int(cache.offset[s]), int(cache.height[s] * cache.width[s] * 3)
            assert int(backend.to_host(cache.arena[off: off + n]).min()) == int(cache.source[s]) % 256
    assert evicted_order == sorted(evicted_order), "eviction must be first-in first-out"
    assert evicted_order == list(range(len(evicted_order)))
    assert cache.arena is arena and cache.arena.nbytes == nbytes


def test_would_evict_predicts_insert(backend) -> None:
    cache = RingCache(backend, capacity_bytes=900, max_slots=16)
    rng = np.random.default_rng(0)
    for i in range(60):
        h = int(rng.integers(2, 12))
        predicted = cache.would_evict(h * 10 * 3)
        before = cache.evicted
        cache.insert(_image(backend.xp, h, 10, 1), source=i)
        assert predicted == (cache.evicted > before)


def test_a_source_is_resident_at_most_once(backend) -> None:
    cache = RingCache(backend, capacity_bytes=100, max_slots=16)
    first = cache.insert(_image(backend.xp, 4, 4, 1), source=3)
    assert cache.holds(3) and not cache.holds(5)
    with pytest.raises(ValueError, match="source=3 is already resident"):
        cache.insert(_image(backend.xp, 4, 4, 2), source=3)
    cache.record_served(np.array([first, first]))
    cache.insert(_image(backend.xp, 4, 4, 2), source=5)
    cache.insert(_image(backend.xp, 4, 4, 4), source=6)  # 3 × 48 bytes > 100: evicts source 3
    assert not cache.holds(3) and cache.holds(5) and cache.holds(6)
    assert (cache.evicted, cache.evicted_served) == (1, 2)
    cache.insert(_image(backend.xp, 4, 4, 3), source=3)  # a later decode of it enters again


def test_image_larger_than_cache_is_a_clear_error(backend) -> None:
    cache = RingCache(backend, capacity_bytes=100, max_slots=4)
    with pytest.raises(ValueError, match="does not fit in the cache.*raise cache_bytes"):
        cache.insert(_image(backend.xp, 10, 10, 0), source=0)
