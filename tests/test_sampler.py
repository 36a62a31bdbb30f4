"""End-to-end behaviour of PatchSampler: the invariants of ARCHITECTURE.md on real DALI decodes."""

import gc
import os
import weakref
from pathlib import Path

import numpy as np
import pytest

from dali_patches import OUTPUT_NAMES, CatalogWarning, PatchSampler
from dali_patches.engine.cache import RingCache

from .conftest import reference_decode


def _stream(sampler: PatchSampler, n: int) -> list:
    return [next(sampler) for _ in range(n)]


def test_patches_are_bit_exact_crops_of_the_full_decode(device: str, image_dir: Path) -> None:
    with PatchSampler(image_dir, patch_size=(24, 40), batch_size=16, reuse=3, cache_images=20, device=device,
                      seed=1) as sampler:
        batches = _stream(sampler, 30)
        reference = reference_decode(list(sampler.files), device)
        for batch in batches:
            patches = sampler.backend.to_host(batch.patches)
            assert patches.shape == (16, 24, 40, 3) and patches.dtype == np.uint8
            assert batch.source.dtype == np.int64 and batch.anchor.dtype == np.int32
            for patch, src, (y, x) in zip(patches, batch.source, batch.anchor):
                full = reference[sampler.files[src]]
                assert np.array_equal(patch, full[y: y + 24, x: x + 40]), (sampler.files[src], y, x)
        assert len({int(s) for b in batches for s in b.source}) == len(sampler.files)


def test_every_batch_has_distinct_sources(device: str, many_images: Path) -> None:
    with PatchSampler(many_images, patch_size=32, batch_size=24, reuse=2, cache_images=30, device=device) as s:
        for batch in _stream(s, 200):
            assert len(set(batch.source.tolist())) == 24
        assert s.stats()["distinct_fraction"] == 1.0


def test_batches_stay_distinct_when_the_cache_holds_the_whole_shard(device: str, many_images: Path) -> None:
    # Reader epochs reshuffle, so a cache this large sees fresh decodes of still-resident images; they
    # must not crowd distinct images out (the ring would hold ~50 distinct of 64 otherwise).
    with PatchSampler(many_images, patch_size=32, batch_size=60, reuse=2, cache_images=64, device=device) as s:
        for batch in _stream(s, 60):  # ≈ 28 reader epochs
            assert len(set(batch.source.tolist())) == 60
        stats = s.stats()
    assert stats["duplicate_decodes"] > 0 and stats["resident_images"] == 64
    served_per_decode = stats["patches_made"] / (stats["images_decoded"] - stats["warmup_images"])
    assert served_per_decode == pytest.approx(2, rel=0.10)


@pytest.mark.parametrize("reuse", [4, 10.5])
def test_mean_patches_per_decoded_image_matches_reuse(device: str, many_images: Path, reuse: float) -> None:
    with PatchSampler(many_images, patch_size=32, batch_size=16, reuse=reuse, cache_images=24, device=device) as s:
        _stream(s, 1500)
        stats = s.stats()
    assert stats["mean_reuse"] == pytest.approx(reuse, rel=0.10)
    served_per_decode = stats["patches_made"] / (stats["images_decoded"] - stats["warmup_images"])
    assert served_per_decode == pytest.approx(reuse, rel=0.10)


def test_every_file_is_decoded_once_per_reader_epoch(many_images: Path) -> None:
    with PatchSampler(many_images, patch_size=32, batch_size=8, reuse=1, cache_images=10, device="cpu") as s:
        n = len(s.files)
        decoder = s._producer.maker.decoder
        decoded: list[int] = []
        original = decoder.next

        def recording_next():
            item = original()
            decoded.append(item[0])
            return item

        decoder.next = recording_next
        while len(decoded) < 3 * n:
            next(s)
    for epoch in range(3):
        assert sorted(decoded[epoch * n: (epoch + 1) * n]) == list(range(n))


def test_same_seed_same_stream_different_seed_differs(device: str, image_dir: Path) -> None:
    def provenance(seed: int) -> list:
        with PatchSampler(image_dir, patch_size=32, batch_size=8, reuse=5, cache_images=12, device=device,
                          seed=seed) as s:
            return [(b.source.tolist(), b.anchor.tolist()) for b in _stream(s, 40)]

    first = provenance(7)
    assert provenance(7) == first
    assert provenance(8) != first


def test_arena_is_allocated_once_and_cache_stays_bounded(device: str, many_images: Path) -> None:
    with PatchSampler(many_images, patch_size=32, batch_size=8, reuse=2, cache_bytes=1_000_000, device=device) as s:
        next(s)
        arena = s._producer.maker.cache.arena
        pointer = arena.ctypes.data if s.backend.xp is np else arena.data.ptr
        for _ in range(300):
            next(s)
            stats = s.stats()
            assert stats["cache_bytes_used"] <= stats["cache_bytes"] == 1_000_000
        assert s._producer.maker.cache.arena is arena and arena.nbytes == RingCache.arena_bytes(1_000_000)
        assert (arena.ctypes.data if s.backend.xp is np else arena.data.ptr) == pointer
        assert stats["reader_epochs"] > 2


def test_pipeline_outputs_named_batches(dali_device: str, image_dir: Path) -> None:
    with PatchSampler(image_dir, patch_size=32, batch_size=8, reuse=4, cache_images=12, device=dali_device) as s:
        pipe = s.pipeline()
        for _ in range(3):
            patches, source, anchor = pipe.run()
        if s.backend.is_gpu:
            patches, source, anchor = patches.as_cpu(), source.as_cpu(), anchor.as_cpu()
        assert np.array(patches.as_tensor()).shape == (8, 32, 32, 3)
        assert np.array(source.as_tensor()).shape == (8,)
        assert np.array(anchor.as_tensor()).shape == (8, 2)
        assert patches.layout() == "HWC"
    assert OUTPUT_NAMES == ("patches", "source", "anchor")


def test_cache_too_small_says_how_much_is_needed(image_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot hold batch_size=16 distinct images.*needs at least .* bytes"):
        PatchSampler(image_dir, patch_size=32, batch_size=16, reuse=4, cache_bytes="1MiB", device="cpu")


def test_allow_repeats_serves_a_batch_larger_than_the_data_set(image_dir: Path) -> None:
    with pytest.raises(ValueError, match="batch_size=40 distinct images.*only 24 images.*allow_repeats=True"):
        PatchSampler(image_dir, patch_size=32, batch_size=40, reuse=4, cache_images=30, device="cpu")
    with PatchSampler(image_dir, patch_size=32, batch_size=40, reuse=4, cache_images=30, device="cpu",
                      allow_repeats=True) as s:
        batch = next(s)
        assert batch.patches.shape[0] == 40
        assert len(set(batch.source.tolist())) == 24  # every image used before any repeats


def test_bad_parameters_fail_before_any_work(image_dir: Path) -> None:
    with pytest.raises(ValueError, match="reuse=0"):
        PatchSampler(image_dir, patch_size=32, batch_size=8, reuse=0, cache_bytes="64MiB")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['cache_size'\]"):
        PatchSampler(image_dir, patch_size=32, batch_size=8, reuse=2, cache_size="64MiB")
    with pytest.raises(ValueError, match="exceeds every image"):
        PatchSampler(image_dir, patch_size=4096, batch_size=8, reuse=2, cache_bytes="64MiB", device="cpu")
    with pytest.raises(ValueError, match=r"cannot hold any image of this data set .*raise cache_bytes"):
        PatchSampler(image_dir, patch_size=32, batch_size=8, reuse=2, cache_bytes="10KiB", device="cpu",
                     allow_repeats=True)
    with pytest.raises(ValueError, match="exceeds the free cpu memory"):
        PatchSampler(image_dir, patch_size=32, batch_size=8, reuse=2, cache_bytes="64TiB", device="cpu")


def test_close_is_idempotent_and_stops_the_thread(image_dir: Path) -> None:
    s = PatchSampler(image_dir, patch_size=32, batch_size=8, reuse=2, cache_images=12, device="cpu")
    next(s)
    thread = s._producer._thread
    s.close()
    s.close()
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        next(s)


def test_max_memory_is_known_before_the_run(image_dir: Path) -> None:
    s = PatchSampler(image_dir, patch_size=32, batch_size=8, reuse=2, cache_bytes="4MiB", device="cpu")
    assert s.max_memory >= s.cache_bytes == 4 * 2**20
    assert "24 images" in repr(s)
    s.close()


def test_a_dropped_sampler_stops_its_thread(image_dir: Path) -> None:
    s = PatchSampler(image_dir, patch_size=32, batch_size=8, reuse=2, cache_images=12, device="cpu")
    next(s)
    thread = s._producer._thread
    del s
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_creating_and_closing_samplers_in_a_loop_does_not_leak(many_images: Path) -> None:
    arenas = []

    def cycle() -> None:
        with PatchSampler(many_images, patch_size=32, batch_size=8, reuse=2, cache_bytes="2MiB", device="cpu") as s:
            s.pipeline().run()
            for _ in range(20):  # the ring wraps: every page of the arena is touched
                next(s)
            arenas.append(weakref.ref(s._producer.maker.cache.arena))
        gc.collect()

    for _ in range(3):  # allocator pools and DALI's one-time state settle
        cycle()
    threads, rss = _os_threads(), _rss_mib()
    for _ in range(12):
        cycle()
    assert all(ref() is None for ref in arenas), "an arena outlived close()"
    assert _os_threads() <= threads, "DALI or producer threads outlive close()"
    assert _rss_mib() - rss < 64, f"RSS grew by {_rss_mib() - rss:.0f} MiB over 12 samplers"


def test_an_image_larger_than_the_cache_is_skipped_and_named(image_dir: Path) -> None:
    """A decompression bomb (or any image bigger than the whole cache) is left out and reported,
    instead of refusing the whole data set."""
    with pytest.warns(CatalogWarning, match=r"skipped 1 image\(s\) larger than the cache, e\.g\. .*big\.jpg: 480x640"):
        sampler = PatchSampler(image_dir, patch_size=32, batch_size=4, reuse=2, cache_bytes="700KiB", device="cpu",
                               allow_repeats=True)
    with sampler:
        assert not any(f.endswith("big.jpg") for f in sampler.files)
        assert [(Path(p).name, r.kind) for p, r in sampler.catalog.skipped if r.kind == "too large"] == \
            [("big.jpg", "too large")]
        next(sampler)


def test_numpy_numbers_are_accepted_and_nonsense_is_named(image_dir: Path) -> None:
    with PatchSampler(image_dir, patch_size=np.int64(16), batch_size=np.int32(4), reuse=np.float32(2.5),
                      cache_images=np.int64(8), seed=np.uint32(7), device="cpu") as s:
        assert s.config.patch_size == (16, 16) and type(s.config.batch_size) is int and s.config.reuse == 2.5
        assert next(s).patches.shape == (4, 16, 16, 3)
    for bad, match in [({"patch_size": 32.0}, r"patch_size=32\.0 must be a positive int"),
                       ({"seed": 2**64}, "seed=18446744073709551616 must be between 0 and"),
                       ({"decode_batch": 10**6}, "decode_batch=1000000 must be between 1 and 1024"),
                       ({"num_threads": 10000}, "num_threads=10000 must be between 1 and"),
                       ({"reuse": float("nan")}, "reuse=nan must be a finite number"),
                       ({"shard_id": 0, "num_shards": 100}, "num_shards=100 exceeds the 24 usable images")]:
        settings = {"patch_size": 16, "batch_size": 4, "reuse": 2, "cache_images": 8, "device": "cpu", **bad}
        with pytest.raises(ValueError, match=match):
            PatchSampler(image_dir, allow_repeats=True, **settings)


def test_a_literal_path_with_brackets_and_a_generator_of_paths(tmp_path: Path, image_dir: Path) -> None:
    folder = tmp_path / "shots [2024]"
    folder.mkdir()
    files = sorted(image_dir.glob("a/*.jpg"))[:6]
    for f in files:
        (folder / f.name).write_bytes(f.read_bytes())
    one = folder / files[0].name
    with PatchSampler(str(one), patch_size=16, batch_size=2, reuse=2, cache_images=2, device="cpu",
                      allow_repeats=True) as s:
        assert s.files == (str(one),)
    with PatchSampler((str(p) for p in folder.iterdir()), patch_size=16, batch_size=4, reuse=2, cache_images=6,
                      device="cpu") as s:
        assert len(s.files) == 6


def test_after_close_every_entry_point_refuses(image_dir: Path) -> None:
    s = PatchSampler(image_dir, patch_size=16, batch_size=4, reuse=2, cache_images=8, device="cpu")
    next(s)
    state = s.state_dict()
    s.close()
    for call in (lambda: next(s), s.pipeline, lambda: s.load_state_dict(state)):
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_len_and_dataloader_say_what_to_do_instead(image_dir: Path) -> None:
    with PatchSampler(image_dir, patch_size=16, batch_size=4, reuse=2, cache_images=6, device="cpu",
                      progress=False) as sampler:
        assert sampler  # truthy, though len() is refused
        with pytest.raises(TypeError, match=r"not a Dataset.*DirectIterator"):
            len(sampler)
        torch = pytest.importorskip("torch")
        with pytest.raises(TypeError, match="needs no DataLoader"):
            next(iter(torch.utils.data.DataLoader(sampler)))


def test_a_cache_holding_every_image_with_fixed_reuse_warns_once(many_images: Path) -> None:
    with pytest.warns(UserWarning, match=r"holds all \d+ images.*reuse='auto'") as caught:
        PatchSampler(many_images, patch_size=16, batch_size=4, reuse=2, cache_bytes="64MiB", device="cpu",
                     progress=False).close()
    assert [w.filename for w in caught if "holds all" in str(w.message)] == [__file__]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        PatchSampler(many_images, patch_size=16, batch_size=4, reuse="auto", cache_bytes="64MiB", device="cpu",
                     progress=False).close()
        PatchSampler(many_images, patch_size=16, batch_size=4, reuse=2, cache_images=8, device="cpu",
                     progress=False).close()


@pytest.mark.parametrize("progress", [True, False])
def test_the_first_fill_shows_progress_unless_told_not_to(image_dir: Path, progress: bool,
                                                          capfd: pytest.CaptureFixture[str]) -> None:
    with PatchSampler(image_dir, patch_size=16, batch_size=4, reuse=2, cache_images=6, device="cpu",
                      progress=progress) as sampler:
        next(sampler)
    err = capfd.readouterr().err
    assert ("filling cache" in err and "max_memory" in err) is progress


def test_more_memory_than_available_is_said_before_the_run(many_images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dali_patches.engine.backend import Backend

    with PatchSampler(many_images, patch_size=16, batch_size=4, reuse=2, cache_images=8, device="cpu",
                      progress=False) as sampler:
        cache, most = sampler.cache_bytes, sampler.max_memory
    monkeypatch.setattr(Backend, "free_bytes", lambda self: (cache + most) // 2)  # room for the cache, not the rest
    with pytest.warns(UserWarning, match=r"will hold up to .* more than the .* available; lower cache_bytes"):
        PatchSampler(many_images, patch_size=16, batch_size=4, reuse=2, cache_images=8, device="cpu",
                     progress=False).close()
