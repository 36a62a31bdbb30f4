import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from dali_patches.catalog.catalog import Catalog
from dali_patches.engine.decode import DecodeStage
from dali_patches.sources import open_source

from .conftest import reference_decode


def test_every_file_once_per_epoch_in_a_fresh_order(backend, many_images: Path) -> None:
    files = list(Catalog.scan(many_images).files)
    stage = DecodeStage(open_source(files), files, backend, batch_size=5, num_threads=2, seed=3)
    assert stage.epoch_size == len(files)
    epochs = [[stage.next()[0] for _ in files] for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(len(files)))  # each image exactly once per reader epoch
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    assert stage.images_decoded == 3 * len(files)
    stage.close()


def test_same_seed_same_order_and_pixels_match_reference(backend, image_dir: Path) -> None:
    files = list(Catalog.scan(image_dir).files)
    a = DecodeStage(open_source(files), files, backend, batch_size=4, num_threads=2, seed=11)
    b = DecodeStage(open_source(files), files, backend, batch_size=3, num_threads=1, seed=11)
    reference = reference_decode(files, backend.device.value)
    for _ in range(len(files)):
        (sa, (ia,)), (sb, _) = a.next(), b.next()
        assert sa == sb
        assert np.array_equal(backend.to_host(ia), reference[files[sa]])


def test_files_broken_during_the_run_are_skipped_reported_once_and_lose_nothing(backend, many_images: Path,
                                                                              tmp_path: Path) -> None:
    for path in many_images.iterdir():
        shutil.copy(path, tmp_path / path.name)
    files = list(Catalog.scan(tmp_path).files)
    stage = DecodeStage(open_source(files), files, backend, batch_size=8, num_threads=2, seed=1)  # 8 divides the 64 files
    first = [stage.next()[0] for _ in range(10)]
    deleted, corrupted = files[first[-1]], files[(first[-1] + 1) % len(files)]
    os.remove(deleted)  # gone while the run goes on: DALI's reader fails on it for good
    Path(corrupted).write_text("not an image any more " * 40)  # the decoder rejects it
    later = [stage.next()[0] for _ in range(4 * len(files))]
    broken = {files.index(deleted), files.index(corrupted)}
    assert set(stage.broken) == broken
    assert sorted(e.split(":")[0] for e in stage.errors) == sorted([deleted, corrupted])  # once each
    assert not broken & set(later[len(files):])  # skipped from the next epoch on at the latest
    # Nothing else lost: each later reader epoch holds every good file exactly once.
    while stage._pending or (stage.images_decoded + stage.skipped_decodes) % len(files):
        stage.next()  # up to an epoch boundary
    good = sorted(set(range(len(files))) - broken)
    for _ in range(2):
        assert sorted(stage.next()[0] for _ in good) == good
    stage.close()


def _corrupt_set(folder: Path) -> list[Path]:
    """Four good JPEGs, one with a truncated body and an end marker appended, one with bytes of its
    entropy-coded data overwritten: both pass the structural screen and decode without an error."""
    from PIL import Image

    from dali_patches.cli.synth import synthetic_image

    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(4):
        Image.fromarray(synthetic_image(120, 160, rng)).save(folder / f"good_{i}.jpg", quality=90)
    data = (folder / "good_0.jpg").read_bytes()
    (folder / "truncated_eoi.jpg").write_bytes(data[: len(data) // 2] + b"\xff\xd9")
    corrupt = bytearray(data)
    for k in range(1500, len(corrupt) - 10, 397):
        corrupt[k] = int(rng.integers(0, 256))
    (folder / "corrupt.jpg").write_bytes(bytes(corrupt))
    return sorted(folder.iterdir())


def test_verify_leaves_out_jpegs_with_corrupt_data(tmp_path: Path, capfd) -> None:
    from dali_patches import CatalogWarning, PatchSampler
    from dali_patches.cli import main
    from dali_patches.engine.verify import find_corrupt

    paths = [str(p) for p in _corrupt_set(tmp_path / "data")]
    found = find_corrupt(open_source(paths), paths)
    assert sorted(Path(p).name for p in found) == ["corrupt.jpg", "truncated_eoi.jpg"]
    assert all(r.kind == "corrupt data" and "Corrupt JPEG data" in r for r in found.values())
    assert "Corrupt JPEG data" not in capfd.readouterr().err  # captured per file, not shown
    with pytest.warns(CatalogWarning, match="skipped 2 JPEG"):
        sampler = PatchSampler(tmp_path / "data", patch_size=16, batch_size=2, reuse=2, cache_images=4,
                               device="cpu", verify=True)
    with sampler:
        assert sorted(Path(f).name for f in sampler.files) == [f"good_{i}.jpg" for i in range(4)]
        next(sampler)
    assert main(["inspect", str(tmp_path / "data"), "--patch", "16", "--verify", "--no-progress"]) == 3
    assert "corrupt data 2" in capfd.readouterr().out
