"""The command line's defaults on real-sized photos, its flags, and its messages in its own words.

Two folders of large photos: 20 JPEGs of which one is 4096×4096 (48 MiB decoded, the rest 12 MP), and
16 4K frames (3840×2160) as JPEG, PNG and WebP. Every sampling command and ``inspect`` must exit 0
on them with no option at all: the batch and cache adapt to the images and the free memory.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_patches import PatchSampler
from dali_patches.cli import main
from dali_patches.cli.defaults import BATCH, CACHE_BOUND, DATA_SHARE, fit
from dali_patches.cli.errors import translate

MB = 10**6


def _smooth(height: int, width: int, seed: int) -> np.ndarray:
    """A mostly smooth RGB picture (gradients and slow waves): large, yet quick to encode and decode."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    out = np.empty((height, width, 3), np.uint8)
    for c in range(3):
        base, slope, freq = rng.uniform(0, 128), rng.uniform(-120, 120), rng.uniform(2, 9)
        out[..., c] = np.clip(base + slope * y + 60 * np.sin(freq * x + c), 0, 255).astype(np.uint8)
    return out


def _write(folder: Path, specs: list[tuple[int, int, str]]) -> Path:
    folder.mkdir(parents=True)
    options = {"jpg": {"quality": 90}, "png": {"compress_level": 1}, "webp": {"quality": 80, "method": 0}}
    for i, (h, w, fmt) in enumerate(specs):
        Image.fromarray(_smooth(h, w, i)).save(folder / f"photo_{i:02d}.{fmt}", **options[fmt])
    return folder


@pytest.fixture(scope="session")
def big_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 photos: one 4096×4096 (48 MiB decoded: the 512 MiB cache of a batch of 16 used to refuse
    it) and 19 of 12 MP."""
    return _write(tmp_path_factory.mktemp("big") / "photos", [(4096, 4096, "jpg")] + [(3024, 4032, "jpg")] * 19)


@pytest.fixture(scope="session")
def uhd_frames(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 4K frames, 3840×2160, as JPEG, PNG and WebP in turn."""
    return _write(tmp_path_factory.mktemp("uhd") / "frames", [(2160, 3840, ("jpg", "png", "webp")[i % 3]) for i in range(16)])


def _timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    assert main(argv) == 0, argv
    return time.perf_counter() - t0


@pytest.mark.slow
def test_every_command_runs_with_no_options_on_4k_frames(uhd_frames: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # preview.png and coverage.png, the default outputs, land here
    source = str(uhd_frames)
    _timed(["inspect", source])
    assert "memory      at most" in capsys.readouterr().out
    _timed(["preview", source])
    assert Path("preview.png").is_file()
    captured = capsys.readouterr()
    assert "--batch 8 (half the 16 usable images" in captured.err and "patches of batch 0 from 8 images" in captured.out
    _timed(["bench", source])
    assert "distinct fraction         1.000" in capsys.readouterr().out
    # the default ends after 20 s of sampling at most: about a minute in all, at 4K, on two cores
    assert _timed(["coverage", source]) < 120
    assert Path("coverage.png").is_file() and "never sampled      0 images" in capsys.readouterr().out


@pytest.mark.slow
def test_every_command_runs_with_no_options_on_large_photos(big_photos: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """inspect and preview with no option; bench and coverage with a shorter --seconds only, to keep
    the suite short: their defaults run with no option on the 4K frames above."""
    monkeypatch.chdir(tmp_path)
    source = str(big_photos)
    assert main(["inspect", source, "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "--batch 10 (half the 20 usable images" in captured.err
    assert report["batch"] == 10 and report["memory"]["error"] is None
    cache = report["cache"]["cache_bytes"]
    assert report["memory"]["max_memory"] > cache
    # the memory inspect reports is that of the sampler the other commands build
    with PatchSampler(source, patch_size=64, batch_size=10, reuse=32, cache_bytes=cache, device="cpu",
                      progress=False) as sampler:
        assert sampler.max_memory == report["memory"]["max_memory"]
    assert main(["preview", source]) == 0 and Path("preview.png").is_file()
    assert "10 patches of batch 0 from 10 images" in capsys.readouterr().out
    assert main(["bench", source, "--seconds", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["config"]["batch"] == 10 and result["config"]["cache_bytes"] == cache
    assert result["versions"]["dali_wheel"].startswith("nvidia-dali")
    assert main(["coverage", source, "--seconds", "2"]) == 0 and Path("coverage.png").is_file()
    assert "stopped after --seconds 2 of sampling" in capsys.readouterr().out


# -- the defaults, worked out ---------------------------------------------------------------------
def _needed(sizes: list[int], batch: int) -> int:
    ordered = sorted(sizes, reverse=True)
    return sum(ordered[:batch]) + 2 * ordered[0]


def test_the_default_batch_is_at_most_half_the_images_and_the_cache_replaces_images() -> None:
    sizes = [25 * MB] * 46  # the folder of 46 photos bench's batch of 256 refused
    chosen = fit(np.array(sizes), free_bytes=64 * 2**30, decode_batch=8)
    assert chosen.batch == 23
    assert _needed(sizes, 23) <= chosen.cache_bytes == int(DATA_SHARE * sum(sizes)) < sum(sizes)
    assert chosen.notes == ("--batch 23 (half the 46 usable images: a batch takes distinct ones)",
                            "--cache 822.54 MiB (75% of the data set decoded)")
    sizes = [int(50.3 * MB)] + [int(36.6 * MB)] * 19  # the 4096×4096 photo 512 MiB refused
    chosen = fit(np.array(sizes), 64 * 2**30, 8)
    assert chosen.batch == 10 and _needed(sizes, 10) <= chosen.cache_bytes < sum(sizes)


def test_the_default_cache_is_bounded_yet_holds_a_batch_of_the_largest() -> None:
    many = np.full(10_000, 10 * MB)
    assert fit(many, 64 * 2**30, 8).cache_bytes == CACHE_BOUND
    huge = np.full(1000, 150 * MB)  # 50 MP photos: a batch of 64 needs more than the bound
    chosen = fit(huge, 64 * 2**30, 8)
    assert chosen.batch == BATCH and chosen.cache_bytes == _needed(list(huge), BATCH) > CACHE_BOUND
    assert "--cache 9.22 GiB (--batch 64 of the largest images with slack)" in chosen.notes


def test_free_memory_bounds_the_default_batch_and_cache() -> None:
    sizes = np.full(400, 50 * MB)
    chosen = fit(sizes, free_bytes=8 * 10**9, decode_batch=8)  # half of 8 GB less 40 images: 3 GB
    assert chosen.batch == 58 and _needed(list(sizes), 58) <= chosen.cache_bytes <= 3 * 10**9
    assert chosen.notes[0] == "--batch 58 (as many of the largest images as half the free cpu memory holds, with slack)"


def test_flags_given_are_kept() -> None:
    sizes = np.full(46, 25 * MB)
    assert fit(sizes, 64 * 2**30, 8, batch=40, cache_bytes=2**30) == (fit(sizes, 1, 1, 40, 2**30))
    kept = fit(sizes, 64 * 2**30, 8, batch=40, cache_bytes=2**30)
    assert (kept.batch, kept.cache_bytes, kept.notes) == (40, 2**30, ())
    cache_only = fit(sizes, 64 * 2**30, 8, cache_bytes=300 * MB)  # the batch fits the cache given
    assert cache_only.batch == 10 and _needed(list(sizes), 10) <= 300 * MB < _needed(list(sizes), 11)
    batch_only = fit(sizes, 64 * 2**30, 8, batch=40)
    assert batch_only.batch == 40 and batch_only.cache_bytes == _needed(list(sizes), 40)
    assert fit(sizes, 64 * 2**30, 8, allow_repeats=True).batch == BATCH  # repeats: the batch need not be distinct
    assert fit(sizes, 64 * 2**30, 8, auto_reuse=True).cache_bytes == 48 * 25 * MB  # auto: all of it, with slack


# -- flags and messages ---------------------------------------------------------------------------
def test_version_names_the_package_the_dali_wheel_and_python(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert re.fullmatch(r"dali-patches \d+\.\d+\.\d+\S* \(nvidia-dali\S* \S+, Python \d+\.\d+\.\d+\S*\)\n",
                        capsys.readouterr().out)


@pytest.mark.parametrize("command", ["inspect", "bench", "preview", "coverage", "synth"])
def test_every_commands_help_shows_its_defaults(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    if command != "synth":
        assert f"[{BATCH}, or fewer: at most half the usable images" in text and "[75% of the data set decoded" in text
        for flag in ("--allow-repeats", "--decode-batch", "--num-threads"):
            assert flag in text


def test_the_new_flags_reach_the_sampler(image_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "b.json"
    # 32 patches a batch from 24 images: only with --allow-repeats
    assert main(["bench", str(image_dir), "--patch", "16", "--batch", "32", "--allow-repeats", "--decode-batch", "4",
                 "--num-threads", "1", "--device", "cpu", "--seconds", "0.5", "--via", "arrays", "--json", str(out),
                 "--no-progress"]) == 0
    assert json.loads(out.read_text())["config"]["batch"] == 32
    assert main(["bench", str(image_dir), "--patch", "16", "--batch", "32", "--device", "cpu", "--no-progress"]) == 2
    assert "pass --allow-repeats" in capsys.readouterr().err
    extra = {"preview": ["--out", str(tmp_path / "p.png")], "coverage": ["--out", str(tmp_path / "c.png"), "--patches", "64"],
             "inspect": []}
    for command, more in extra.items():  # the default batch of 64 from 24 images: repeats allowed
        assert main([command, str(image_dir), "--patch", "16", "--allow-repeats", "--decode-batch", "4",
                     "--num-threads", "1", "--device", "cpu", "--no-progress", *more]) == 0, command


_PYTHON_NAMES = re.compile(r"\b(batch_size|cache_bytes|cache_images|allow_repeats|decode_batch|num_threads|min_reuse|"
                           r"max_reuse|patch_size|num_shards|shard_id|device_id|trust_index)\b|"
                           r"\b(reuse|device|seed|pad|verify)=|=True\b|=None\b")
_FLAG = re.compile(r"(^|\s|\()--[a-z]|WORLD_SIZE|RANK")

# Each way the library refuses a command line, from flags (and the launcher's variables).
_ERRORS = {
    "batch larger than the data": (["--batch", "999"], {}),
    "cache too small for the batch": (["--batch", "8", "--cache", "1MiB"], {}),
    "cache too small for any image": (["--cache", "10KB"], {}),
    "cache larger than the memory": (["--cache", "1TiB"], {}),
    "cache not a size": (["--cache", "lots"], {}),
    "bounds of a fixed reuse": (["--reuse", "8", "--min-reuse", "2"], {}),
    "bounds swapped": (["--reuse", "auto", "--min-reuse", "4", "--max-reuse", "2"], {}),
    "decode batch out of range": (["--decode-batch", "5000"], {}),
    "threads out of range": (["--num-threads", "1000"], {}),
    "patch larger than every image": (["--patch", "5000"], {}),
    "patch not positive": (["--patch", "0"], {}),
    "seed negative": (["--seed", "-1"], {}),
    "more shards than images": ([], {"RANK": "0", "WORLD_SIZE": "100"}),
    "rank outside the world": ([], {"RANK": "5", "WORLD_SIZE": "2"}),
}


@pytest.mark.parametrize("command", ["bench", "preview", "coverage", "inspect"])
def test_every_error_names_flags_not_python_parameters(command: str, image_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from dali_patches.engine.backend import cuda_available

    errors = dict(_ERRORS)
    if not cuda_available():
        errors["no gpu"] = (["--device", "gpu"], {})
    more = {"preview": ["--out", str(tmp_path / "p.png")], "coverage": ["--out", str(tmp_path / "c.png"), "--seconds", "0.1"],
            "bench": ["--seconds", "0.1"], "inspect": []}[command]
    for why, (flags, environment) in errors.items():
        with monkeypatch.context() as m:
            for name, value in environment.items():
                m.setenv(name, value)
            code = main([command, str(image_dir), "--no-progress", *flags, *more])
        captured = capsys.readouterr()
        said = captured.err + (captured.out if command == "inspect" else "")
        assert not _PYTHON_NAMES.search(said), f"{command}, {why}: {said}"
        if command != "inspect":
            assert code == 2 and "Traceback" not in said, f"{command}, {why}: {said}"
            assert _FLAG.search(captured.err), f"{command}, {why} names no flag: {captured.err}"


def test_inspect_reports_why_a_sampler_would_not_start(image_dir: Path, capsys) -> None:
    # the data is fine, the flags are not: the report is printed, and the exit code says the flags fail
    assert main(["inspect", str(image_dir), "--batch", "999", "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert "would not start: --batch 999 distinct images are needed per batch but this shard has only 24 images; " \
           "lower --batch or pass --allow-repeats" in out
    assert "dali-patches: error: --batch 999 distinct images" in err


def test_the_decode_queue_message_names_its_flag(big_photos: Path, capsys) -> None:
    # 3 decode batches of 1024 images up to 48 MiB: more than any machine's free memory
    assert main(["bench", str(big_photos), "--decode-batch", "1024", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--decode-batch 1024: DALI's decode queue would hold" in err and "lower --decode-batch" in err
    assert not _PYTHON_NAMES.search(err)


def test_warnings_are_one_line_in_the_command_lines_words(image_dir: Path, tmp_path: Path, capsys) -> None:
    # a 200 px patch leaves the smaller images out, with a warning that recommends padding
    assert main(["preview", str(image_dir), "--patch", "200", "--batch", "2", "--device", "cpu", "--no-progress",
                 "--out", str(tmp_path / "p.png")]) == 0
    err = capsys.readouterr().err
    assert "dali-patches: warning: skipped" in err and "--pad keeps those" in err
    assert "dali-patches inspect lists them all" in err and not _PYTHON_NAMES.search(err)


@pytest.mark.parametrize(("message", "said"), [
    ("cache_bytes=512.00 MiB cannot hold batch_size=16 images; Raise cache_bytes, or pass allow_repeats=True",
     "--cache 512.00 MiB cannot hold --batch 16 images; Raise --cache, or pass --allow-repeats"),
    ("device='gpu' but CuPy sees no CUDA device; use device='cpu'", "--device gpu but CuPy sees no CUDA device; use --device cpu"),
    ("patch_size=(5000, 5000) exceeds every image; lower patch_size or pass pad=True",
     "--patch 5000 exceeds every image; lower --patch or pass --pad"),
    ("num_threads=100 must be between 1 and 8; None uses every core",
     "--num-threads 100 must be between 1 and 8; leave --num-threads out to use every core"),
    ("self.shard_id=5 must be in [0, self.num_shards=2)", "RANK=5 must be in [0, WORLD_SIZE=2)"),
    ("companion 'mask': channels=2 must be 3, 1 or None", "companion 'mask': channels=2 must be 3, 1 or None"),
    ("the reuse of device memory", "the reuse of device memory"),
])
def test_translate(message: str, said: str) -> None:
    assert translate(message) == said
