from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from dali_patches import PatchSampler
from dali_patches.torch import PatchIterator


def test_iterator_yields_torch_tensors_on_the_sampler_device(device: str, image_dir: Path) -> None:
    with PatchSampler(image_dir, patch_size=(16, 32), batch_size=8, reuse=4, cache_images=12, device=device) as s:
        iterator = PatchIterator(s, batches_per_epoch=3)
        assert len(iterator) == 3
        for _ in range(2):  # two epochs of 3 batches
            steps = list(iterator)
            assert len(steps) == 3
        data = steps[-1]
        expected = "cuda" if device == "gpu" else "cpu"
        assert data["patches"].shape == (8, 16, 32, 3) and data["patches"].dtype == torch.uint8
        assert data["source"].shape == (8,) and data["source"].dtype == torch.int64
        assert data["anchor"].shape == (8, 2) and data["anchor"].dtype == torch.int32
        assert {t.device.type for t in data.values()} == {expected}
        assert len(set(data["source"].tolist())) == 8


def test_endless_iterator_has_no_length(image_dir: Path) -> None:
    with PatchSampler(image_dir, patch_size=16, batch_size=4, reuse=4, cache_images=8, device="cpu") as s:
        iterator = PatchIterator(s)
        with pytest.raises(TypeError, match="batches_per_epoch"):
            len(iterator)
        with pytest.raises(ValueError, match="batches_per_epoch=0"):
            PatchIterator(s, batches_per_epoch=0)


def test_super_resolution_pairs_as_float_chw_tensors(device: str, sr_pairs: Path) -> None:
    from dali_patches import Augment

    source = {"image": str(sr_pairs / "lr_x2/**/*x2.png"), "target": str(sr_pairs / "hr/**/*.png")}
    with PatchSampler(source, patch_size=12, batch_size=8, reuse=4, cache_images=12, device=device,
                      companions={"target": {"scale": 2}},
                      augment=Augment(mean=0, std=255, layout="CHW")) as s:
        data = next(iter(PatchIterator(s)))
        lr, hr = data["patches"], data["target"]
        assert lr.shape == (8, 3, 12, 12) and hr.shape == (8, 3, 24, 24) and lr.dtype == torch.float32
        assert torch.equal(hr[:, :, ::2, ::2], lr)
