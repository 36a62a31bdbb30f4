import numpy as np
import pytest

from dali_patches.cache import RingCache
from dali_patches.sampler import RefillSchedule, Sampler


@pytest.mark.parametrize(("batch", "reuse"), [(256, 32), (100, 32), (8, 3), (5, 100)])
def test_refill_schedule_rate_is_batch_over_reuse(batch: int, reuse: float) -> None:
    schedule = RefillSchedule(batch, reuse)
    counts = [schedule.next() for _ in range(10_000)]
    assert abs(sum(counts) - 10_000 * batch / reuse) <= 1
    assert max(counts) - min(counts) <= 1  # smoothed: never a burst


def _filled_cache(backend, n: int) -> RingCache:
    cache = RingCache(backend, 1_000_000, max_slots=n + 1)
    for i in range(n):
        cache.insert(backend.xp.zeros((20 + i % 7, 30 + i % 5, 3), backend.xp.uint8), source=100 + i)
    return cache


def test_draw_is_distinct_and_anchors_fit(backend) -> None:
    cache = _filled_cache(backend, 40)
    sampler = Sampler(32, (16, 24), allow_repeats=False, rng=np.random.default_rng(0))
    for _ in range(50):
        d = sampler.draw(cache)
        assert len(set(d.source.tolist())) == 32
        assert np.array_equal(d.source, cache.source[d.slots])
        assert (d.y >= 0).all() and (d.y + 16 <= cache.height[d.slots]).all()
        assert (d.x >= 0).all() and (d.x + 24 <= cache.width[d.slots]).all()


def test_anchors_cover_every_valid_position(backend) -> None:
    cache = RingCache(backend, 10_000, 4)
    cache.insert(backend.xp.zeros((10, 12, 3), backend.xp.uint8), source=0)
    sampler = Sampler(1, (8, 8), allow_repeats=False, rng=np.random.default_rng(1))
    seen = {(int(d.y[0]), int(d.x[0])) for d in (sampler.draw(cache) for _ in range(2000))}
    assert seen == {(y, x) for y in range(3) for x in range(5)}


def test_too_few_images_fails_unless_repeats_allowed(backend) -> None:
    cache = _filled_cache(backend, 5)
    with pytest.raises(RuntimeError, match="only 5 images are resident but batch_size=12.*allow_repeats=True"):
        Sampler(12, (8, 8), allow_repeats=False, rng=np.random.default_rng(0)).draw(cache)
    d = Sampler(12, (8, 8), allow_repeats=True, rng=np.random.default_rng(0)).draw(cache)
    counts = np.bincount(d.source - 100)
    assert counts.min() == 2 and counts.max() == 3  # repeats spread as evenly as possible
