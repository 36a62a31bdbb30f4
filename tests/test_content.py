"""anchors="content": no delivered patch is flat or mostly transparent, exactly; the map's kernel
and its twin agree; flat images are set aside and reported; the stream resumes bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_patches import Augment, Companion, PatchSampler
from dali_patches.engine.backend import cuda_available
from dali_patches.engine.content import map_geometry
from dali_patches.engine.measure import (
    Threshold,
    check_device,
    check_host,
    check_twin,
    map_twin,
    passing_anchors,
)

from .conftest import reference_decode

P = 32
MIN_STD = 6.0


def _luma(patches: np.ndarray) -> np.ndarray:
    p = patches.astype(np.float64)
    return p[..., 0] * 0.299 + p[..., 1] * 0.587 + p[..., 2] * 0.114 if p.shape[-1] == 3 else p[..., 0]


def _std(patches: np.ndarray) -> np.ndarray:
    return _luma(patches).reshape(len(patches), -1).std(axis=1)


@pytest.fixture(scope="module")
def flat_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 lossless images, mostly a flat backdrop with a textured window (known place); 5 RGBA ones
    whose left half is noisy but transparent; 2 entirely flat (one of them grey)."""
    folder = tmp_path_factory.mktemp("flat")
    rng = np.random.default_rng(7)
    for i in range(20):
        h, w = 120 + 9 * i, 150 + 5 * (i % 4)
        image = np.empty((h, w, 3), np.uint8)
        image[...] = rng.integers(30, 220, 3)
        if i in (6, 13):  # all flat; 13 with a faint gradient below the threshold
            if i == 13:
                image[...] = (np.linspace(100, 110, w)[None, :, None]).astype(np.uint8)
            Image.fromarray(image).save(folder / f"flat_{i:02d}.png")
            continue
        y0, x0 = int(rng.integers(0, h - 48)), int(rng.integers(0, w - 48))
        image[y0: y0 + 48, x0: x0 + 48] = rng.integers(0, 256, (48, 48, 3))
        if i % 4 == 1:
            alpha = np.full((h, w, 1), 255, np.uint8)
            alpha[:, : w // 2] = 0
            image[:, : w // 2] = rng.integers(0, 256, (h, w // 2, 3))  # texture nobody can see
            Image.fromarray(np.concatenate([image, alpha], -1), "RGBA").save(folder / f"rgba_{i:02d}.png")
        else:
            Image.fromarray(image).save(folder / f"photo_{i:02d}.png")
    return folder


def _alpha_of(path: str) -> np.ndarray | None:
    with Image.open(path) as im:
        return np.asarray(im)[..., 3] if im.mode == "RGBA" else None


def test_no_delivered_patch_is_flat_or_transparent_and_all_are_exact_crops(device: str, flat_photos: Path) -> None:
    with PatchSampler(flat_photos, patch_size=P, batch_size=8, reuse=4, cache_images=12, device=device, seed=3,
                      anchors="content", min_std=MIN_STD, min_opaque=0.9) as sampler:
        batches = [next(sampler) for _ in range(60)]
        reference = reference_decode(list(sampler.files), device)
        stats = sampler.stats()
        alphas = {f: _alpha_of(f) for f in sampler.files}
        for batch in batches:
            patches = sampler.backend.to_host(batch.patches)
            assert len(set(batch.source.tolist())) == 8  # B distinct images, always
            assert (_std(patches) >= MIN_STD).all()
            for patch, src, (y, x) in zip(patches, batch.source, batch.anchor):
                name = sampler.files[src]
                assert np.array_equal(patch, reference[name][y: y + P, x: x + P]), (name, y, x)
                if alphas[name] is not None:
                    assert (alphas[name][y: y + P, x: x + P] >= 128).mean() >= 0.9, (name, y, x)
        content = stats["content"]
        assert {Path(f).name for f, _ in content["set_aside_files"]} == {"flat_06.png", "flat_13.png"}
        assert all("std of at least 6" in why for _, why in content["set_aside_files"])
        assert content["checked"] >= 60 * 8 and content["redrawn"] >= 0 and content["maps"] > 0
        used = {sampler.files[s] for b in batches for s in b.source.tolist()}
        assert not any("flat_" in f for f in used)


def test_uniform_anchors_do_serve_flat_patches_there(flat_photos: Path) -> None:
    """The data set of these tests does hold flat patches: the test above proves something."""
    with PatchSampler(flat_photos, patch_size=P, batch_size=8, reuse=4, cache_images=12, device="cpu", seed=3) as s:
        stds = np.concatenate([_std(next(s).patches) for _ in range(20)])
    assert (stds < MIN_STD).mean() > 0.3


def test_resume_is_bit_exact(device: str, flat_photos: Path) -> None:
    options = {"patch_size": P, "batch_size": 8, "reuse": 3, "cache_images": 10, "device": device, "seed": 5,
               "anchors": "content", "min_std": MIN_STD}
    with PatchSampler(flat_photos, **options) as first:
        for _ in range(7):
            next(first)
        state = first.state_dict()
        expected = [next(first) for _ in range(12)]
        want = [(first.backend.to_host(b.patches), b.source.copy(), b.anchor.copy()) for b in expected]
    with PatchSampler(flat_photos, **options) as second:
        second.load_state_dict(state)
        got = [next(second) for _ in range(12)]
        for (patches, source, anchor), batch in zip(want, got):
            assert np.array_equal(batch.source, source) and np.array_equal(batch.anchor, anchor)
            assert np.array_equal(second.backend.to_host(batch.patches), patches)


def test_companions_follow_the_anchor_and_the_check_reads_the_main_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    for i in range(10):
        image = np.full((100, 140, 3), 90, np.uint8)
        image[20:70, 30:90] = rng.integers(0, 256, (50, 60, 3))
        Image.fromarray(image).save(tmp_path / "img" / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (100, 140), np.uint8)).save(tmp_path / "mask" / f"{i}.png")
    source = {"image": tmp_path / "img", "mask": tmp_path / "mask"}  # parallel folders, matched by path
    with PatchSampler(source, patch_size=24, batch_size=4, reuse=2, cache_images=8, device="cpu",
                      companions=[Companion("mask", kind="mask")], anchors="content", min_std=MIN_STD) as s:
        for _ in range(15):
            batch = next(s)
            assert (_std(batch.patches) >= MIN_STD).all()
            for mask, src, (y, x) in zip(batch.companions["mask"], batch.source, batch.anchor):
                name = Path(s.files[src]).name
                full = np.asarray(Image.open(tmp_path / "mask" / name))
                assert np.array_equal(mask[..., 0], full[y: y + 24, x: x + 24])


def test_auto_reuse_and_the_augmented_pipeline(flat_photos: Path) -> None:
    with PatchSampler(flat_photos, patch_size=P, batch_size=8, reuse="auto", cache_images=12, device="cpu",
                      anchors="content", min_std=MIN_STD, augment=Augment(hflip=True)) as s:
        stds = np.concatenate([_std(next(s).patches) for _ in range(20)])
        assert (stds >= MIN_STD).all()
        pipe = s.pipeline()
        pipe.build()
        (patches, *_) = pipe.run()
        assert (_std(np.stack([np.asarray(p) for p in patches])) >= MIN_STD).all()  # a flip keeps the std


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"min_std": 3.0}, "anchors='content'"),
    ({"anchors": "content", "min_std": -1}, "min_std=-1"),
    ({"anchors": "content", "min_opaque": 1.5}, "min_opaque=1.5"),
    ({"anchors": "content", "min_std": "4"}, "min_std='4'"),
])
def test_bad_content_options_name_the_parameter(flat_photos: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PatchSampler(flat_photos, patch_size=P, batch_size=4, reuse=2, cache_images=8, device="cpu", **kwargs)


# -- the measure: twins, the host's certificate, the exhaustive scan ---------------------------
def _patches(rng: np.random.Generator, m: int, p: int, channels: int, dtype: type) -> np.ndarray:
    top = 65535 if dtype is np.uint16 else 255
    base = rng.integers(0, top, (m, 1, 1, channels))
    noise = rng.normal(0, 1, (m, p, p, channels)) * rng.choice([0.0, 1.5, 3, 6, 30], (m, 1, 1, 1))
    noise *= 257 if dtype is np.uint16 else 1
    return np.clip(base + noise, 0, top).astype(dtype)


@pytest.mark.parametrize(("channels", "dtype"), [(3, np.uint8), (1, np.uint8), (3, np.uint16)])
def test_check_host_equals_the_twin_and_the_definition(channels: int, dtype: type) -> None:
    rng = np.random.default_rng(0)
    patches = _patches(rng, 300, 20, channels, dtype)
    alpha = (rng.random((300, 20, 20, 1)) < 0.6 + 0.4 * rng.random((300, 1, 1, 1))).astype(dtype) * (65535 if dtype is np.uint16 else 255)
    threshold = Threshold(4.0, 0.8, np.dtype(dtype).itemsize)
    host = check_host(patches, alpha, threshold)
    twin = np.zeros(300, np.uint8)
    limit = threshold.min_spread(400)
    check_twin(patches.reshape(-1).view(np.uint8), alpha.reshape(-1).view(np.uint8), 1, np.arange(300, dtype=np.int32),
               300, 400, channels, np.dtype(dtype).itemsize, limit, threshold.min_opaque_count(400), twin)
    scale = 257 if dtype is np.uint16 else 1
    definition = (_std(patches) / scale >= 4.0) & ((alpha[..., 0] > 0).mean(axis=(1, 2)) >= 0.8)
    assert np.array_equal(host, twin.astype(bool))
    assert np.array_equal(host, definition)
    assert 0.1 < host.mean() < 0.9  # both kinds are there


def _map_by_loops(image: np.ndarray, alpha: np.ndarray | None, g: dict, threshold: Threshold) -> np.ndarray:
    """The map kernel's loops, written out plainly (one cell at a time), in exact integers."""
    n = g["win_h"] * g["win_w"]
    flags = np.zeros(g["cells_h"] * g["cells_w"], np.uint8)
    for c in range(len(flags)):
        row, col = divmod(c, g["cells_w"])
        for a in range(g["cell"] ** 2):
            ar, ac = row * g["cell"] + a // g["cell"], col * g["cell"] + a % g["cell"]
            if ar >= g["anchors_h"] or ac >= g["anchors_w"]:
                continue
            ys = (ar + np.arange(g["win_h"])) * g["stride"]
            xs = (ac + np.arange(g["win_w"])) * g["stride"]
            v = image[np.ix_(ys, xs)].astype(object)
            luma = (299 * v[..., 0] + 587 * v[..., 1] + 114 * v[..., 2]).reshape(-1)
            spread = n * sum(int(y) ** 2 for y in luma) - int(luma.sum()) ** 2
            opaque = n if alpha is None else int((alpha[np.ix_(ys, xs)] >= 128).sum())
            if spread >= threshold.min_spread(n, 0.5) and opaque >= threshold.min_opaque_count(n, 0.25):
                flags[c] = 1
    return flags


def test_map_twin_is_the_kernel_written_out() -> None:
    rng = np.random.default_rng(1)
    image = np.full((90, 110, 3), 128, np.uint8)
    image[10:50, 60:100] = rng.integers(0, 256, (40, 40, 3))
    alpha = np.full((90, 110), 255, np.uint8)
    alpha[60:] = 0
    arena = np.concatenate([image.reshape(-1), alpha.reshape(-1), np.zeros(16, np.uint8)])
    threshold = Threshold(4.0, 0.9, 1)
    g = map_geometry((24, 24), 90, 110)
    n = g["win_h"] * g["win_w"]
    out = np.zeros(g["cells_h"] * g["cells_w"], np.uint8)
    map_twin(arena, 0, image.size, 110, 3, 1, g["stride"], g["win_h"], g["win_w"], g["anchors_h"], g["anchors_w"],
             g["cell"], g["cells_w"], len(out), threshold.min_spread(n, 0.5), threshold.min_opaque_count(n, 0.25), out)
    assert np.array_equal(out, _map_by_loops(image, alpha, g, threshold))
    assert 0 < out.sum() < len(out)


def test_passing_anchors_is_exhaustive() -> None:
    rng = np.random.default_rng(3)
    image = np.full((60, 70, 3), 50, np.uint8)
    image[5:25, 40:62] = rng.integers(0, 256, (20, 22, 3))
    threshold = Threshold(5.0, 0.9, 1)
    found = passing_anchors(image, None, (16, 16), 1, threshold, most=10**6)
    every = {(y, x) for y in range(60 - 15) for x in range(70 - 15)
             if _std(image[None, y: y + 16, x: x + 16])[0] >= 5.0}
    assert {tuple(a) for a in found.tolist()} == every and every
    assert len(passing_anchors(np.full((40, 40, 3), 9, np.uint8), None, (16, 16), 1, threshold, 100)) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU with CuPy on this machine")
def test_kernels_equal_their_twins_on_a_gpu() -> None:
    import cupy

    from dali_patches.engine.measure import map_device

    rng = np.random.default_rng(4)
    patches = _patches(rng, 500, 24, 3, np.uint8)
    alpha = (rng.random((500, 24, 24, 1)) < 0.9).astype(np.uint8) * 255
    threshold = Threshold(4.0, 0.85, 1)
    index = np.arange(0, 500, 2, dtype=np.int32)
    twin = np.zeros(len(index), np.uint8)
    check_twin(patches.reshape(-1), alpha[index].reshape(-1), 1, index, len(index), 576, 3, 1,
               threshold.min_spread(576), threshold.min_opaque_count(576), twin)
    kernel = check_device(cupy, cupy.asarray(patches), cupy.asarray(alpha[index]), index, threshold)
    assert np.array_equal(cupy.asnumpy(kernel), twin)
    image = np.full((300, 333, 3), 77, np.uint8)
    image[50:200, 100:300] = rng.integers(0, 256, (150, 200, 3))
    arena = np.concatenate([image.reshape(-1), np.zeros(16, np.uint8)])
    g = map_geometry((40, 40), 300, 333)
    n = g["win_h"] * g["win_w"]
    args = (np.int64(0), np.int64(-1), np.int32(333), np.int32(3), np.int32(1),
            *(np.int32(g[k]) for k in ("stride", "win_h", "win_w", "anchors_h", "anchors_w", "cell", "cells_w")),
            np.int32(g["cells_h"] * g["cells_w"]), np.float64(threshold.min_spread(n, 0.5)),
            np.int64(threshold.min_opaque_count(n, 0.25)))
    out = np.zeros(g["cells_h"] * g["cells_w"], np.uint8)
    map_twin(arena, *args, out)
    assert np.array_equal(cupy.asnumpy(map_device(cupy, cupy.asarray(arena), args, len(out))), out)


def test_the_provenance_log_records_the_delivered_patches(flat_photos: Path, tmp_path: Path) -> None:
    from dali_patches.review import runs

    log = tmp_path / "content.prov"
    with PatchSampler(flat_photos, patch_size=P, batch_size=8, reuse=4, cache_images=12, device="cpu", seed=2,
                      anchors="content", min_std=MIN_STD, provenance=log) as sampler:
        batches = [next(sampler) for _ in range(15)]
    run = runs.load(log)
    for batch in batches:
        taken = run.batch == batch.index
        assert np.array_equal(run.source[taken], batch.source)
        assert np.array_equal(run.anchor[taken], batch.anchor)


def test_map_twin_sums_alike_in_floats_and_in_integer_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    from dali_patches.engine import measure

    rng = np.random.default_rng(8)
    image = np.full((200, 240, 3), 60, np.uint8)
    image[40:160, 20:120] = rng.integers(0, 256, (120, 100, 3))
    arena = np.concatenate([image.reshape(-1), np.zeros(16, np.uint8)])
    threshold = Threshold(5.0, 0.9, 1)
    g = map_geometry((32, 32), 200, 240)
    n = g["win_h"] * g["win_w"]
    args = (0, -1, 240, 3, 1, g["stride"], g["win_h"], g["win_w"], g["anchors_h"], g["anchors_w"], g["cell"],
            g["cells_w"], g["cells_h"] * g["cells_w"], threshold.min_spread(n, 0.5), threshold.min_opaque_count(n, 0.25))
    floats, parts = np.zeros(args[-3], np.uint8), np.zeros(args[-3], np.uint8)
    map_twin(arena, *args, floats)
    monkeypatch.setattr(measure, "_FLOAT_EXACT", 0.0)
    map_twin(arena, *args, parts)
    assert np.array_equal(floats, parts) and 0 < floats.sum() < len(floats)


def test_sixteen_bit_grey_images_are_judged_on_the_0_255_scale(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    for i in range(8):
        image = np.full((90, 100), 30000, np.uint16)
        image[10:60, 20:80] = rng.integers(20000, 40000, (50, 60))  # std ≈ 5800 = 22.5 × 257
        image[70:, :] += (np.arange(100) * 3).astype(np.uint16)  # a gradient: std ≈ 87 = 0.34 × 257
        Image.fromarray(image).save(tmp_path / f"{i}.png")
    with PatchSampler(tmp_path, patch_size=16, batch_size=4, reuse=4, cache_images=8, device="cpu", channels=1,
                      dtype="uint16", anchors="content", min_std=2) as s:
        for _ in range(20):
            patches = next(s).patches
            assert patches.dtype == np.uint16
            assert (_std(patches) / 257 >= 2).all()


def _write(folder: Path, name: str, image: np.ndarray) -> None:
    folder.mkdir(exist_ok=True)
    mode = {3: "RGB", 4: "RGBA"}[image.shape[-1]]
    Image.fromarray(image, mode).save(folder / name)


def test_flat_images_give_way_to_informative_ones(tmp_path: Path) -> None:
    """Images set aside still fill the cache until evicted: the sampler takes more rather than fail."""
    rng = np.random.default_rng(10)
    for i in range(10):
        _write(tmp_path, f"flat_{i}.png", np.full((64, 80, 3), 20 * i, np.uint8))
        _write(tmp_path, f"rich_{i}.png", rng.integers(0, 256, (64, 80, 3), np.uint8))
    for seed in range(3):
        with PatchSampler(tmp_path, patch_size=16, batch_size=4, reuse=2, cache_images=6, device="cpu", seed=seed,
                          anchors="content") as s:
            for _ in range(30):
                batch = next(s)
                assert len(set(batch.source.tolist())) == 4 and (_std(batch.patches) >= 4).all()
            assert s.stats()["content"]["set_aside"] == 10


def test_too_few_informative_images_name_the_fix(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    for i in range(8):
        _write(tmp_path / "few", f"flat_{i}.png", np.full((64, 80, 3), 20 * i, np.uint8))
        _write(tmp_path / "none", f"flat_{i}.png", np.full((64, 80, 3), 20 * i, np.uint8))
    for i in range(2):
        _write(tmp_path / "few", f"rich_{i}.png", rng.integers(0, 256, (64, 80, 3), np.uint8))
    options = {"patch_size": 16, "reuse": 2, "cache_images": 6, "device": "cpu", "anchors": "content"}
    with PatchSampler(tmp_path / "few", batch_size=3, **options) as s, pytest.raises(
            ValueError, match=r"only 2 images hold .* std of at least 4 .* lower min_std, lower batch_size, or pass "
                              r"allow_repeats=True"):
        next(s)
    with PatchSampler(tmp_path / "none", batch_size=3, allow_repeats=True, **options) as s, pytest.raises(
            ValueError, match=r"no image of this shard holds a patch with a luminance std of at least 4 \(8 set aside\); "
                              r"lower min_std$"):
        next(s)


def test_set_aside_reasons_say_what_failed(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    for i in range(6):
        rgba = np.concatenate([rng.integers(0, 256, (64, 64, 3), np.uint8), np.full((64, 64, 1), 255, np.uint8)], -1)
        rgba[:, :13, 3] = 0  # 80 % opaque everywhere a 64 px patch can sit
        _write(tmp_path, f"glass_{i}.png", rgba)
        _write(tmp_path, f"rich_{i}.png", rng.integers(0, 256, (70, 70, 3), np.uint8))
    _write(tmp_path, "flat.png", np.full((70, 70, 3), 9, np.uint8))
    with PatchSampler(tmp_path, patch_size=64, batch_size=3, reuse=2, cache_images=13, device="cpu",
                      anchors="content", min_opaque=0.9) as s:
        for _ in range(10):
            next(s)
        why = {Path(f).name: w for f, w in s.stats()["content"]["set_aside_files"]}
    assert why["glass_0.png"].endswith("with at least 90% of its pixels opaque")
    assert why["flat.png"] == "no 64x64 patch has a luminance std of at least 4"


def test_images_the_map_cannot_see_are_drawn_anywhere_not_from_a_short_list(tmp_path: Path) -> None:
    """A one-pixel checkerboard looks flat to samples every 4 px; its patches all pass: the draws
    must stay spread over the image, not come from the few anchors a probe found."""
    checker = ((np.indices((128, 128)).sum(0) % 2) * 200 + 20).astype(np.uint8)
    _write(tmp_path, "checker.png", np.repeat(checker[..., None], 3, -1))
    rng = np.random.default_rng(13)
    _write(tmp_path, "noise.png", rng.integers(0, 256, (128, 128, 3), np.uint8))
    with PatchSampler(tmp_path, patch_size=16, batch_size=2, reuse=1e9, cache_images=2, device="cpu",
                      anchors="content") as s:
        anchors = []
        for _ in range(600):
            batch = next(s)
            anchors += [tuple(a) for src, a in zip(batch.source, batch.anchor) if s.files[src].endswith("checker.png")]
        assert s.stats()["content"]["exact_images"] == 1
    assert len(set(anchors)) > 500  # of 600 draws (the probe tests 512 anchors)


def test_sixteen_bit_maps_propose_like_eight_bit_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(14)
    for i in range(4):
        Image.fromarray(rng.integers(0, 65536, (120, 120), np.uint16)).save(tmp_path / f"{i}.png")
    for dtype in ("uint8", "uint16"):
        with PatchSampler(tmp_path, patch_size=16, batch_size=2, reuse=4, cache_images=4, device="cpu", channels=1,
                          dtype=dtype, anchors="content") as s:
            for _ in range(10):
                next(s)
            assert s.stats()["content"]["exact_images"] == 0, dtype  # the map proposed; nothing was scanned


def _engine(parts_alpha: bool = False, slots: int = 8, patch: int = 16) -> tuple:
    from fractions import Fraction

    from dali_patches.engine.backend import resolve_backend
    from dali_patches.engine.cache import RingCache
    from dali_patches.engine.content import ContentAnchors
    from dali_patches.options import CompanionKind, Part

    backend = resolve_backend("cpu")
    parts = [Part("patches", Fraction(1), CompanionKind.IMAGE, 3, "uint8", (patch, patch))]
    if parts_alpha:
        parts.append(Part("alpha", Fraction(1), CompanionKind.MASK, 1, "uint8", (patch, patch), 255))
    cache = RingCache(backend, slots * 64 * 64 * 4, slots + 1, parts=parts)
    policy = ContentAnchors((patch, patch), 1, np.random.default_rng(0), backend, Threshold(4, 0.9, 1),
                            1 if parts_alpha else None)
    return cache, policy


def _checker(h: int = 64, w: int = 64) -> np.ndarray:
    """Texture finer than the map's samples: the map proposes nothing, every patch passes."""
    return np.repeat((((np.indices((h, w)).sum(0) % 2) * 200 + 20).astype(np.uint8))[..., None], 3, -1)


def test_a_full_candidate_pool_and_an_image_without_candidates_draw_fine() -> None:
    cache, policy = _engine()
    slot = cache.insert([_checker()], 0)
    policy.on_insert(cache, slot)
    policy._used = len(policy._pool)  # the pool is exactly full when the image's (empty) list goes in
    ys, xs = policy.draw(cache, np.full(50, slot))
    assert ((ys >= 0) & (ys <= 48) & (xs >= 0) & (xs <= 48)).all()


def test_an_image_evicted_before_its_map_is_read_is_not_judged() -> None:
    cache, policy = _engine(slots=1)
    first = cache.insert([_checker()], 0)
    policy.on_insert(cache, first)
    policy.on_insert(cache, cache.insert([np.full((64, 64, 3), 9, np.uint8)], 1))  # evicts image 0
    policy.drawable(cache, cache.resident_slots())
    assert set(policy.set_aside) == {1} and not policy.refuses(0)


def test_an_image_set_aside_before_a_resume_stays_aside_when_it_comes_back() -> None:
    cache, policy = _engine()
    policy.apply_state(policy.check_state({"checked": 0, "redrawn": 0, "replaced": 0, "exact_sources": [0],
                                           "set_aside": {"0": "its exact anchors failed"}}))
    slot = cache.insert([np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)], 0)
    policy.on_insert(cache, slot)
    assert len(policy.drawable(cache, cache.resident_slots())) == 0


def test_padding_counts_as_opaque_for_images_with_and_without_alpha(tmp_path: Path) -> None:
    rng = np.random.default_rng(15)
    for i in range(3):
        texture = rng.integers(0, 256, (30, 30, 3), np.uint8)
        _write(tmp_path, f"rgba_{i}.png", np.concatenate([texture, np.full((30, 30, 1), 255, np.uint8)], -1))
        _write(tmp_path, f"rgb_{i}.png", texture)
    with PatchSampler(tmp_path, patch_size=32, batch_size=6, reuse=2, cache_images=6, device="cpu", pad=True,
                      anchors="content", min_opaque=0.9) as s:
        for _ in range(5):
            assert len(set(next(s).source.tolist())) == 6
        assert s.stats()["content"]["set_aside"] == 0


def test_a_corrupt_file_among_rgba_images_costs_only_itself(tmp_path: Path) -> None:
    rng = np.random.default_rng(16)
    for i in range(6):
        rgba = np.concatenate([rng.integers(0, 256, (60, 70, 3), np.uint8), np.full((60, 70, 1), 255, np.uint8)], -1)
        _write(tmp_path, f"rgba_{i}.png", rgba)
        Image.fromarray(rng.integers(0, 256, (60, 70, 3), np.uint8)).save(tmp_path / f"rgb_{i}.jpg", quality=90)
    data = bytearray((tmp_path / "rgba_3.png").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # damaged pixel data: fails at decode, not at the scan
    (tmp_path / "rgba_3.png").write_bytes(bytes(data))
    with PatchSampler(tmp_path, patch_size=16, batch_size=4, reuse=2, cache_images=8, device="cpu", seed=1,
                      anchors="content", decode_batch=4) as s:
        used = {Path(s.files[i]).name for _ in range(30) for i in next(s).source.tolist()}
        broken = [Path(f).name for f, _ in s.stats()["broken_files"]]
    assert broken == ["rgba_3.png"] and "rgba_3.png" not in used  # set aside by the decoder's recovery, alone
    assert len(used) == 11  # every good image served
