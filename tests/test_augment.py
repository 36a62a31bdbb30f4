"""Device-side augmentation: one random draw per patch shared by every companion, exact pixels."""

from pathlib import Path

import numpy as np
import pytest

from dali_patches import Augment, PatchSampler

from .conftest import coordinate_image, label_mask

_SYMMETRIES = [(k, flip) for k in range(4) for flip in (False, True)]


def _apply(array: np.ndarray, k: int, flip: bool) -> np.ndarray:
    return np.rot90(np.fliplr(array) if flip else array, k)


def _sampler(sr_pairs: Path, device: str, augment: Augment, patch=(24, 24)) -> PatchSampler:
    return PatchSampler({"image": sr_pairs / "hr", "mask": sr_pairs / "mask"}, patch_size=patch, batch_size=16,
                        reuse=4, cache_images=16, device=device, companions={"mask": {"kind": "mask"}},
                        augment=augment, seed=3)


def _run(sampler: PatchSampler, pipe) -> dict[str, np.ndarray]:
    outputs = pipe.run()
    if sampler.backend.is_gpu:
        outputs = [o.as_cpu() for o in outputs]
    return {name: np.asarray(o.as_tensor()) for name, o in zip(sampler.output_names, outputs)}


def test_flips_and_rotations_keep_image_and_mask_aligned(dali_device: str, sr_pairs: Path) -> None:
    seen = set()
    with _sampler(sr_pairs, dali_device, Augment(hflip=True, vflip=True, rot90=True)) as sampler:
        pipe = sampler.pipeline(num_threads=2)
        for _ in range(8):
            out = _run(sampler, pipe)
            for patch, mask, (y, x) in zip(out["patches"], out["mask"], out["anchor"].tolist()):
                crop = coordinate_image(y + 24, x + 24)[y:, x:]
                found = [s for s in _SYMMETRIES if np.array_equal(_apply(crop, *s), patch)]
                assert len(found) == 1  # an exact symmetry of the crop, pixel for pixel
                assert np.array_equal(mask, _apply(label_mask(y + 24, x + 24)[y:, x:], *found[0]))
                seen.add(found[0])
    assert len(seen) == 8  # all eight symmetries of the square occur


def test_flips_only_on_rectangular_patches(dali_device: str, sr_pairs: Path) -> None:
    with pytest.raises(ValueError, match="rot90=True. needs square patches"):
        _sampler(sr_pairs, dali_device, Augment(rot90=True), patch=(16, 24))
    with _sampler(sr_pairs, dali_device, Augment(vflip=True), patch=(16, 24)) as sampler:
        out = _run(sampler, sampler.pipeline())
        flipped = 0
        for patch, mask, (y, x) in zip(out["patches"], out["mask"], out["anchor"].tolist()):
            crop, mcrop = coordinate_image(y + 16, x + 24)[y:, x:], label_mask(y + 16, x + 24)[y:, x:]
            flip = not np.array_equal(patch, crop)
            assert np.array_equal(patch, crop[::-1] if flip else crop)
            assert np.array_equal(mask, mcrop[::-1] if flip else mcrop)
            flipped += flip
        assert 0 < flipped < 16


def test_normalize_cast_and_chw_layout(dali_device: str, sr_pairs: Path) -> None:
    mean, std = (10.0, 20.0, 30.0), (2.0, 4.0, 8.0)
    with _sampler(sr_pairs, dali_device, Augment(mean=mean, std=std, layout="CHW")) as sampler:
        assert sampler.output_dtypes()[:2] == ("float32", "uint8")
        assert sampler.output_shapes()[:2] == ((3, 24, 24), (1, 24, 24))
        out = _run(sampler, sampler.pipeline())
        assert out["patches"].shape == (16, 3, 24, 24) and out["patches"].dtype == np.float32
        assert out["mask"].shape == (16, 1, 24, 24) and out["mask"].dtype == np.uint8  # masks: layout only
        for patch, mask, (y, x) in zip(out["patches"], out["mask"], out["anchor"].tolist()):
            crop = coordinate_image(y + 24, x + 24)[y:, x:].astype(np.float32)
            expected = ((crop - np.array(mean)) / np.array(std)).transpose(2, 0, 1)
            np.testing.assert_allclose(patch, expected, rtol=1e-6, atol=1e-5)
            assert np.array_equal(mask, label_mask(y + 24, x + 24)[y:, x:].transpose(2, 0, 1))
    with _sampler(sr_pairs, dali_device, Augment(dtype="float16")) as sampler:
        out = _run(sampler, sampler.pipeline())
        assert out["patches"].dtype == np.float16 and out["patches"].shape == (16, 24, 24, 3)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mean": 1.0}, "give both mean and std"),
    ({"mean": (1, 2), "std": (1, 2)}, "needs 1 or 3 values for 'patches'"),
    ({"mean": 0, "std": 0}, "must be positive"),
    ({"dtype": "int8"}, "Augment dtype='int8' must be one of"),
    ({"layout": "NHWC"}, "layout='NHWC' is not one of"),
    ({"hflip": 1}, "hflip=1 must be True or False"),
])
def test_bad_augment_options_name_the_parameter(sr_pairs: Path, kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        PatchSampler(sr_pairs / "hr", patch_size=16, batch_size=2, reuse=2, cache_images=4, device="cpu",
                     augment=kwargs)


def test_lr_and_hr_twins_get_the_same_symmetry(dali_device: str, sr_pairs: Path) -> None:
    source = {"image": str(sr_pairs / "lr_x2/**/*x2.png"), "target": str(sr_pairs / "hr/**/*.png")}
    with PatchSampler(source, patch_size=10, batch_size=8, reuse=4, cache_images=12, device=dali_device,
                      companions={"target": {"scale": 2}}, augment=Augment(hflip=True, vflip=True, rot90=True),
                      seed=4) as sampler:
        pipe = sampler.pipeline(num_threads=2)
        for _ in range(4):
            out = _run(sampler, pipe)
            for lr, hr, (y, x) in zip(out["patches"], out["target"], out["anchor"].tolist()):
                hr_crop = coordinate_image(2 * y + 20, 2 * x + 20)[2 * y:, 2 * x:]
                found = [s for s in _SYMMETRIES if np.array_equal(_apply(hr_crop, *s), hr)]
                assert len(found) == 1
                assert np.array_equal(lr, _apply(np.ascontiguousarray(hr_crop[::2, ::2]), *found[0]))
