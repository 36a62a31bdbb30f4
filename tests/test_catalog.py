import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_patches.catalog.catalog import Catalog, CatalogWarning
from dali_patches.cli.synth import synthetic_image
from dali_patches.config import SamplerConfig

from .conftest import make_image_set


def test_folder_is_searched_recursively_and_sizes_are_read(image_dir: Path) -> None:
    cat = Catalog.scan(image_dir)
    assert len(cat) == 24
    assert list(cat.files) == sorted(cat.files)
    for path, h, w in zip(cat.files, cat.heights, cat.widths):
        with Image.open(path) as im:
            assert (w, h) == im.size
    assert set(cat.channels.tolist()) == {1, 3, 4}
    assert np.array_equal(cat.sample_bytes(SamplerConfig(16, 4, 4, cache_images=8).parts), cat.heights * cat.widths * 3)
    assert np.array_equal(cat.sample_bytes(SamplerConfig(16, 4, 4, cache_images=8, dtype="uint16", channels=1).parts),
                          cat.heights * cat.widths * 2)
    assert cat.skipped == ()


def test_glob_list_and_single_file(image_dir: Path) -> None:
    assert len(Catalog.scan(str(image_dir / "**" / "*.png"))) == 8
    listed = sorted(str(p) for p in image_dir.rglob("*.jpg"))
    cat = Catalog.scan(listed)
    assert list(cat.files) == listed  # a list keeps the caller's order
    assert len(Catalog.scan(listed[0])) == 1


def test_missing_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        Catalog.scan(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="1 listed file"):
        Catalog.scan([tmp_path / "gone.jpg"])


def test_empty_folder_and_empty_glob(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images in folder.*recursively"):
        Catalog.scan(tmp_path)
    with pytest.raises(ValueError, match="matched no files"):
        Catalog.scan(str(tmp_path / "*.jpg"))
    with pytest.raises(ValueError, match="file list is empty"):
        Catalog.scan([])


def test_too_small_images_are_skipped_and_reported(image_dir: Path) -> None:
    with pytest.warns(CatalogWarning, match=r"skipped \d+ of 24 files \(\d+ smaller than the patch; pad=True keeps those\)"):
        cat = Catalog.scan(image_dir, min_size=(128, 128))
    assert len(cat) + len(cat.skipped) == 24
    assert all(h >= 128 and w >= 128 for h, w in zip(cat.heights, cat.widths))
    assert all("smaller than the patch 128x128" in reason for _, reason in cat.skipped)


def test_patch_larger_than_every_image_says_largest(image_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"exceeds every image \(largest is 480x640\); lower patch_size"):
        Catalog.scan(image_dir, min_size=(1000, 1000))


def test_bad_files_are_screened_with_reasons(tmp_path: Path) -> None:
    make_image_set(tmp_path)
    good = (tmp_path / "b" / "big.jpg").read_bytes()
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.jpg").write_text("this is not an image")
    png = (tmp_path / "b" / "rgb_0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(png[:200])
    with pytest.warns(CatalogWarning, match="skipped 4 of 28"):
        cat = Catalog.scan(tmp_path)
    reasons = {Path(p).name: r for p, r in cat.skipped}
    assert reasons == {
        "empty.jpg": "empty file (0 bytes)",
        "truncated.jpg": "truncated JPEG (no end-of-image marker)",
        "text.jpg": "not a JPG file (bad signature b'this')",
        "truncated.png": "truncated PNG (no IEND chunk)",
    }
    assert len(cat) == 24


def test_only_bad_files_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 1 file.*empty.jpg.*0 bytes"):
        Catalog.scan(tmp_path)


def test_exif_rotation_swaps_reported_size(tmp_path: Path) -> None:
    image = Image.new("RGB", (200, 100), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: DALI decodes it as 200 high, 100 wide
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    cat = Catalog.scan(tmp_path)
    assert (int(cat.heights[0]), int(cat.widths[0])) == (200, 100)


def test_other_formats_are_measured(tmp_path: Path) -> None:
    Image.new("RGB", (9, 8)).save(tmp_path / "x.bmp")
    Image.new("RGB", (7, 6)).save(tmp_path / "y.webp")
    cat = Catalog.scan(tmp_path)
    assert cat.formats == ("BMP", "WEBP") and cat.heights.tolist() == [8, 6] and cat.widths.tolist() == [9, 7]


def test_pad_keeps_small_images_at_their_padded_size(image_dir: Path) -> None:
    cat = Catalog.scan(image_dir, min_size=(128, 128), pad=True)
    assert len(cat) == 24 and not cat.skipped and cat.padded == 13
    assert cat.heights.min() >= 128 and cat.widths.min() >= 128


def test_huge_images_are_measured_not_refused(image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow refuses to open images above 2 × MAX_IMAGE_PIXELS (a 20k × 20k scan by default);
    # the catalog only reads sizes, so such images are kept, and the user's limit is restored.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    cat = Catalog.scan(image_dir)
    assert len(cat) == 24 and not cat.skipped
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_exif_orientation_swaps_the_size_unless_ignored(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    Image.new("RGB", (200, 100)).save(path, exif=exif)  # stored 100 high, 200 wide
    assert (Catalog.scan(path).heights[0], Catalog.scan(path).widths[0]) == (200, 100)
    ignored = Catalog.scan(path, exif=False)
    assert (ignored.heights[0], ignored.widths[0]) == (100, 200)


def test_unreadable_files_are_listed_with_the_fix(image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root here, where chmod cannot deny reading: simulate what the OS raises.
    real_open = os.open

    def open_or_deny(path, *args, **kwargs):
        if str(path).endswith("base_1.jpg"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_or_deny)
    with pytest.warns(CatalogWarning, match="skipped 1 of 24"):
        cat = Catalog.scan(image_dir)
    (path, reason), = cat.skipped
    assert path.endswith("base_1.jpg") and reason == "unreadable: Permission denied; fix its permissions or remove it"


def test_problems_keep_their_kind_through_pickle_and_copy() -> None:
    import copy
    import pickle

    from dali_patches import Problem

    problem = Problem("truncated JPEG (no end-of-image marker)", "truncated")
    for clone in (pickle.loads(pickle.dumps(problem)), copy.deepcopy(problem)):
        assert clone == problem and clone.kind == "truncated" and isinstance(clone, str)


def test_other_suffixes_are_counted_and_named_and_alpha_is_reported(tmp_path: Path) -> None:
    data = tmp_path / "walls"
    data.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(synthetic_image(40, 50, rng)).save(data / "photo.jpg")
    rgba = np.concatenate([synthetic_image(40, 50, rng), np.zeros((40, 50, 1), np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(data / "cutout.png")
    for name in ("logo.svg", "icon.svg", "notes.txt"):
        (data / name).write_text("<svg/>")
    with pytest.warns(CatalogWarning) as caught:
        cat = Catalog.scan(data, min_size=(16, 16))
    text = " ".join(str(w.message) for w in caught)
    assert cat.scan_report["ignored"] == {".svg": 2, ".txt": 1} and len(cat) == 2
    assert "ignored 3 file(s) that are not images" in text and ".svg ×2" in text
    assert "1 image(s) have an alpha channel" in text and "cutout.png" in text
    assert all(w.filename == __file__ for w in caught)  # the warnings point at this line, not at the package


def test_a_name_that_is_not_utf8_is_skipped_by_its_repr(tmp_path: Path) -> None:
    data = tmp_path / "names"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(synthetic_image(40, 50, rng)).save(data / f"im_{i}.jpg")
    odd = os.path.join(os.fsencode(data), b"caf\xe9.jpg")  # Latin-1 bytes: not valid UTF-8
    with open(odd, "wb") as f:
        f.write((data / "im_0.jpg").read_bytes())
    with pytest.warns(CatalogWarning, match="not valid UTF-8"):
        cat = Catalog.scan(data, min_size=(16, 16))
    (path, problem), = [(p, r) for p, r in cat.skipped if r.kind == "unusable name"]
    assert "caf" in path and repr(path) in str(problem) and len(cat) == 3
