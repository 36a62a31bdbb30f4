"""Odd but valid input end to end: CMYK JPEG, 16-bit / palette / RGBA / grayscale PNG, EXIF-rotated
photos and images smaller than the patch all come out as exact patches of the requested channels
(RGB or gray) and dtype (uint8 or uint16)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_patches import PatchSampler
from dali_patches.cli.synth import synthetic_image

from .conftest import reference_decode

P = 16


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(7)
    rgb = synthetic_image(60, 70, rng)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(synthetic_image(50, 64, rng, channels=1)[..., 0].astype(np.uint16) * 257).save(
        folder / "deep16.png")  # mode I;16
    Image.fromarray(synthetic_image(45, 52, rng)).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray(np.dstack([synthetic_image(40, 41, rng), np.full((40, 41), 128, np.uint8)]), "RGBA").save(
        folder / "rgba.png")
    Image.fromarray(synthetic_image(44, 33, rng, channels=1)[..., 0], "L").save(folder / "gray.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 30 × 80, shown 80 × 30
    Image.fromarray(synthetic_image(30, 80, rng)).save(folder / "rotated.jpg", exif=exif, quality=90)
    Image.fromarray(synthetic_image(10, 12, rng)).save(folder / "tiny.png")  # smaller than the patch
    return folder


@pytest.mark.parametrize(("exif", "channels", "dtype"), [(True, 3, "uint8"), (False, 3, "uint8"),
                                                         (True, 1, "uint8"), (True, 3, "uint16")])
def test_odd_formats_give_exact_patches(device: str, odd_images: Path, exif: bool, channels: int, dtype: str) -> None:
    with PatchSampler(odd_images, patch_size=P, batch_size=4, reuse=3, cache_images=7, device=device, pad=True,
                      exif_orientation=exif, channels=channels, dtype=dtype) as sampler:
        assert len(sampler.files) == 7 and sampler.catalog.padded == 1
        reference = reference_decode(list(sampler.files), device, exif=exif, channels=channels, dtype=dtype)
        seen = set()
        for _ in range(40):
            batch = next(sampler)
            patches = sampler.backend.to_host(batch.patches)
            assert patches.shape == (4, P, P, channels) and patches.dtype == np.dtype(dtype)
            for patch, src, (y, x) in zip(patches, batch.source, batch.anchor, strict=True):
                full = reference[sampler.files[src]]
                padded = np.zeros((max(P, full.shape[0]), max(P, full.shape[1]), channels), full.dtype)
                padded[: full.shape[0], : full.shape[1]] = full
                assert np.array_equal(patch, padded[y: y + P, x: x + P]), (sampler.files[src], y, x)
                seen.add(Path(sampler.files[src]).name)
        rotated = sampler.files.index(str(odd_images / "rotated.jpg"))
        size = (sampler.catalog.heights[rotated], sampler.catalog.widths[rotated])
        assert size == ((80, 30) if exif else (30, 80))
    assert seen == {p.name for p in odd_images.iterdir()}


def test_small_images_are_skipped_unless_padded(odd_images: Path) -> None:
    with pytest.warns(UserWarning, match=r"tiny.png: 10x12 is smaller than the patch 16x16"), \
            PatchSampler(odd_images, patch_size=P, batch_size=4, reuse=3, cache_images=7, device="cpu") as s:
        assert len(s.files) == 6 and s.stats()["skipped_files"] == 1
