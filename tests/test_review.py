"""Provenance log round trip and the coverage statistics of dali_patches.review."""

from pathlib import Path

import numpy as np
import pytest

from dali_patches import PatchSampler, review
from dali_patches.engine.provenance import RECORD


def test_log_round_trips_every_delivered_patch(device: str, many_images: Path, tmp_path: Path) -> None:
    log = tmp_path / "run.prov"
    with PatchSampler(many_images, patch_size=32, batch_size=16, reuse=4, cache_images=24, device=device,
                      provenance=log) as sampler:
        batches = [next(sampler) for _ in range(30)]
        files = sampler.files
    run = review.load(log)
    assert run.files == files and run.patch_size == (32, 32)
    assert np.array_equal(run.batch, np.repeat(np.arange(30), 16))
    assert np.array_equal(run.source, np.concatenate([b.source for b in batches]))
    assert np.array_equal(run.anchor, np.concatenate([b.anchor for b in batches]))
    assert run.header["settings"]["reuse"] == 4
    stats = review.coverage(run)
    counts = np.bincount(run.source, minlength=len(files))
    assert stats["patches"] == 480 and stats["batches"] == 30 and stats["images"] == 64
    assert stats["never_sampled"] == int((counts == 0).sum())
    assert stats["patches_per_image_mean"] == pytest.approx(480 / 64)
    assert stats["patches_per_image_cv"] == pytest.approx(counts.std() / counts.mean())


def test_uniform_anchors_look_uniform_and_weighted_ones_do_not(tmp_path: Path, sr_pairs: Path) -> None:
    common = {"patch_size": 16, "batch_size": 8, "reuse": 8, "cache_images": 16, "device": "cpu"}
    with PatchSampler(sr_pairs / "hr", provenance=tmp_path / "uniform.prov", **common) as sampler:
        for _ in range(300):
            next(sampler)
    points = [(path, 20, 20) for path in sorted((sr_pairs / "hr").rglob("*.png"))]  # always the top-left
    with PatchSampler(sr_pairs / "hr", points=points, provenance=tmp_path / "weighted.prov", **common) as sampler:
        pipe = sampler.pipeline()  # batches taken by a DALI pipeline are recorded too
        for _ in range(300):
            pipe.run()
    uniform = review.coverage(review.load(tmp_path / "uniform.prov"))
    weighted = review.coverage(review.load(tmp_path / "weighted.prov"))
    assert weighted["patches"] >= 2400
    assert uniform["anchor_chi2_per_dof"] < 3 < weighted["anchor_chi2_per_dof"]


def test_a_cut_short_log_loads_up_to_its_last_whole_record(tmp_path: Path, many_images: Path) -> None:
    log = _log(tmp_path, many_images)
    log.write_bytes(log.read_bytes()[:-5])
    assert len(review.load(log).source) == 47
    (tmp_path / "other.prov").write_bytes(b"not a log")
    with pytest.raises(ValueError, match="other.prov' is not a dali_patches provenance log"):
        review.load(tmp_path / "other.prov")


def test_a_log_is_readable_before_the_first_batch(many_images: Path, tmp_path: Path) -> None:
    """The header is on disk from construction on: a run killed before its first batch leaves a log."""
    log = tmp_path / "early.prov"
    sampler = PatchSampler(many_images, patch_size=16, batch_size=4, reuse=2, cache_images=8, device="cpu",
                           provenance=log)
    run = review.load(log)  # read while the sampler is still open, as after a kill
    assert len(run.files) == len(sampler.files) and len(run.source) == 0
    sampler.close()


def _log(tmp_path: Path, many_images: Path) -> Path:
    log = tmp_path / "run.prov"
    with PatchSampler(many_images, patch_size=32, batch_size=16, reuse=4, cache_images=24, device="cpu",
                      provenance=log) as sampler:
        for _ in range(3):
            next(sampler)
    return log


def _craft(log: Path, change=None, records: bytes | None = None, length: int | None = None) -> Path:
    """The log rewritten with its header changed (``change(header)``), its records replaced, or a false
    header length: damaged or crafted, as a log handed over by someone else may be."""
    import json

    from dali_patches.engine.provenance import MAGIC

    raw = log.read_bytes()
    n = int.from_bytes(raw[len(MAGIC): len(MAGIC) + 8], "little")
    header = json.loads(raw[len(MAGIC) + 8: len(MAGIC) + 8 + n])
    body = raw[len(MAGIC) + 8 + n:] if records is None else records
    if change is not None:
        change(header)
    text = json.dumps(header).encode()
    out = log.with_name("crafted.prov")
    out.write_bytes(MAGIC + (len(text) if length is None else length).to_bytes(8, "little") + text + body)
    return out


CRAFTED = {
    "header length of 2**62": ({"length": 2**62}, "its header claims"),
    "no files": ({"change": lambda h: h.pop("files")}, "'files' is not a list of paths"),
    "files not paths": ({"change": lambda h: h.update(files=[1, 2])}, "'files' is not a list of paths"),
    "sizes missing one": ({"change": lambda h: h["heights"].pop()}, "'heights' is not one positive size per file"),
    "negative width": ({"change": lambda h: h["widths"].__setitem__(0, -5)}, "'widths' is not one positive size"),
    "patch size a string": ({"change": lambda h: h.update(patch_size="big")}, "'patch_size' is 'big'"),
    "header a list": ({"change": lambda h: h.clear()}, "'files' is not a list of paths"),
    "record of another image": ({"records": np.array([(0, 10_000, 0, 0)], RECORD).tobytes()},
                                "name an image or a position the log does not have"),
    "anchor outside": ({"records": np.array([(0, 0, 30_000, 0)], RECORD).tobytes()},
                       "name an image or a position the log does not have"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_a_damaged_or_crafted_log_is_refused_by_name(tmp_path: Path, many_images: Path, case: str) -> None:
    options, message = CRAFTED[case]
    crafted = _craft(_log(tmp_path, many_images), **options)
    with pytest.raises(ValueError, match=message):
        review.load(crafted)


def test_a_fifo_given_as_a_log_is_refused_without_opening_it(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "pipe.prov")
    with pytest.raises(ValueError, match="not a regular file"):
        review.load(tmp_path / "pipe.prov")


def test_coverage_draws_only_images_under_the_logs_data_folder(tmp_path: Path, many_images: Path, caplog) -> None:
    pytest.importorskip("matplotlib")
    import os

    from dali_patches.review.figures import coverage_figure

    log = _log(tmp_path, many_images)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes((many_images / "img_000.jpg").read_bytes())
    os.mkfifo(many_images / "zz_pipe.jpg") if not (many_images / "zz_pipe.jpg").exists() else None
    try:
        def point_elsewhere(h):  # image 0 → a file outside the data folder, image 1 → a FIFO inside it
            h["files"][0], h["files"][1] = str(secret), str(many_images / "zz_pipe.jpg")

        crafted = review.load(_craft(log, point_elsewhere))
        assert crafted.root == str(many_images)
        with caplog.at_level("WARNING"):
            coverage_figure(crafted, tmp_path / "cov.png", images=len(crafted.files))
    finally:
        os.unlink(many_images / "zz_pipe.jpg")
    warned = caplog.text
    assert "secret.jpg without its image: it lies outside the log's data folder" in warned
    assert "zz_pipe.jpg without its image: a FIFO" in warned
    assert (tmp_path / "cov.png").stat().st_size > 0
