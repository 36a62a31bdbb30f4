"""The output ring rewrites a buffer only when nothing outside it refers to it (checked with NumPy
buffers here; on a GPU the same ring holds CuPy buffers)."""

import gc

from dali_patches.engine.backend import resolve_backend
from dali_patches.engine.outputs import OutputRing


def test_a_held_buffer_is_never_handed_out_again() -> None:
    ring = OutputRing(resolve_backend("cpu"), [100, 40], depth=2)
    first = ring.acquire()
    view = first[0][10:20]  # a consumer still holds a view of the first group
    second = ring.acquire()
    assert second[0] is not first[0]
    third = ring.acquire()  # the first group is held: the free second group comes again
    assert third[0] is second[0]
    del view
    gc.collect()
    assert ring.acquire()[0] is first[0]  # released: reused, nothing allocated
    assert ring.replaced == 0


def test_when_every_group_is_held_a_fresh_one_replaces_it() -> None:
    ring = OutputRing(resolve_backend("cpu"), [64], depth=2)
    held = [ring.acquire()[0][:1], ring.acquire()[0][:1]]
    fresh = ring.acquire()
    assert all(fresh[0] is not h.base for h in held)
    assert ring.replaced == 1 and ring.nbytes == 2 * 64
    held[0][0] = 7
    assert held[0][0] == 7  # the consumer's memory is its own now
