import numpy as np
import pytest

from dali_patches.engine.anchors import UniformAnchors
from dali_patches.engine.cache import RingCache
from dali_patches.engine.draw import Draws, RefillSchedule
from dali_patches.options import ImageChoice


@pytest.mark.parametrize(("batch", "reuse"), [(256, 32), (100, 32), (8, 3), (5, 100)])
def test_refill_schedule_rate_is_batch_over_reuse(batch: int, reuse: float) -> None:
    schedule = RefillSchedule(batch, reuse)
    counts = [schedule.next() for _ in range(10_000)]
    assert abs(sum(counts) - 10_000 * batch / reuse) <= 1
    assert max(counts) - min(counts) <= 1  # smoothed: never a burst
    rounds = RefillSchedule(batch, reuse)
    assert sum(rounds.next(8) for _ in range(1250)) == sum(counts)  # a round refills as its batches would


def _filled_cache(backend, n: int) -> RingCache:
    cache = RingCache(backend, 1_000_000, max_slots=n + 1)
    for i in range(n):
        cache.insert(backend.xp.zeros((20 + i % 7, 30 + i % 5, 3), backend.xp.uint8), source=100 + i)
    return cache


def _draws(batch: int, patch: tuple[int, int], seed: int, allow_repeats: bool = False,
           image_choice: ImageChoice = ImageChoice.UNIFORM) -> Draws:
    rng = np.random.default_rng(seed)
    return Draws(batch, allow_repeats, rng, UniformAnchors(patch, 1, rng), image_choice)


@pytest.mark.parametrize("choice", list(ImageChoice))
def test_every_batch_of_a_round_is_distinct_and_anchors_fit(backend, choice: ImageChoice) -> None:
    cache = _filled_cache(backend, 40)
    draws = _draws(32, (16, 24), 0, image_choice=choice)
    for _ in range(10):
        d = draws.draw_round(cache, 7)
        assert d.slots.shape == d.source.shape == d.y.shape == (7, 32)
        assert all(len(set(row.tolist())) == 32 for row in d.source) and d.distinct.all()
        assert np.array_equal(d.source, cache.source[d.slots])
        assert (d.y >= 0).all() and (d.y + 16 <= cache.height[d.slots]).all()
        assert (d.x >= 0).all() and (d.x + 24 <= cache.width[d.slots]).all()


def test_uniform_choice_is_uniform_over_resident_images(backend) -> None:
    cache = _filled_cache(backend, 40)
    d = _draws(10, (8, 8), 2).draw_round(cache, 4000)
    counts = np.bincount(d.source.reshape(-1) - 100, minlength=40)
    assert counts.sum() == 40_000
    assert abs(counts - 1000).max() < 5 * np.sqrt(1000)  # each image in 1/4 of the batches


def test_anchors_cover_every_valid_position(backend) -> None:
    cache = RingCache(backend, 10_000, 4)
    cache.insert(backend.xp.zeros((10, 12, 3), backend.xp.uint8), source=0)
    d = _draws(1, (8, 8), 1).draw_round(cache, 2000)
    assert set(zip(d.y.reshape(-1).tolist(), d.x.reshape(-1).tolist())) == {(y, x) for y in range(3) for x in range(5)}


def test_too_few_images_fails_unless_repeats_allowed(backend) -> None:
    cache = _filled_cache(backend, 5)
    with pytest.raises(RuntimeError, match="only 5 images are resident but batch_size=12.*allow_repeats=True"):
        _draws(12, (8, 8), 0).draw_round(cache, 1)
    d = _draws(12, (8, 8), 0, allow_repeats=True).draw_round(cache, 6)
    for row in d.source:
        counts = np.bincount(row - 100)
        assert counts.min() == 2 and counts.max() == 3  # repeats spread as evenly as possible


def test_round_draw_state_replays_the_same_round(backend) -> None:
    cache = _filled_cache(backend, 40)
    draws = _draws(16, (8, 8), 3)
    state = draws.state_dict()
    first = draws.draw_round(cache, 5)
    draws.load_state_dict(state)
    again = draws.draw_round(cache, 5)
    for name in ("slots", "source", "y", "x"):
        assert np.array_equal(getattr(first, name), getattr(again, name))
