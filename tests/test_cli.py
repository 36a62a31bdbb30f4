import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_patches import review
from dali_patches.cli.main import _parser, main

from .conftest import make_image_set


def test_bench_runs_on_generated_images_and_writes_json(tmp_path: Path, capsys) -> None:
    assert main(["synth", str(tmp_path / "data"), "--count", "12", "--size", "120x160"]) == 0
    out = tmp_path / "bench.json"
    code = main(["bench", str(tmp_path / "data"), "--patch", "32", "--batch", "8", "--reuse", "4",
                 "--cache", "4MiB", "--device", "cpu", "--seconds", "1", "--json", str(out), "--no-progress"])
    assert code == 0
    result = json.loads(out.read_text())
    for key in ("patches_per_s", "decodes_per_s", "distinct_fraction", "mean_reuse", "peak_rss_mb"):
        assert key in result and result[key] > 0
    assert result["distinct_fraction"] == 1.0
    assert result["round_batches"] >= 1
    assert set(result["host_us_per_batch"]) == {"producer", "refill", "handover"}
    assert all(v > 0 for v in result["host_us_per_batch"].values())
    text = capsys.readouterr().out
    assert "patches/s" in text and "mean reuse" in text and "peak RSS" in text and "host µs per batch" in text


def test_bench_with_auto_reuse_reports_the_pace(many_images: Path, capsys) -> None:
    code = main(["bench", str(many_images), "--patch", "16", "--batch", "8", "--reuse", "auto", "--max-reuse", "16",
                 "--cache", "8MiB", "--device", "cpu", "--seconds", "1", "--json", "--no-progress"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    pace = result["pace"]
    assert pace["reuse"] == "auto" and pace["effective_reuse"] <= 16 * 1.1
    for key in ("decoder_busy_fraction", "consumer_wait_fraction", "effective_reuse_recent"):
        assert 0 <= pace[key] < float("inf"), key
    assert result["config"]["reuse"] == "auto"


def test_reuse_flags_are_checked(many_images: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["bench", str(many_images), "--reuse", "fast"])
    assert "neither a number nor 'auto'" in capsys.readouterr().err
    assert main(["bench", str(many_images), "--reuse", "8", "--min-reuse", "2", "--device", "cpu", "--no-progress"]) == 2
    assert "--min-reuse and --max-reuse bound --reuse auto; with a fixed --reuse 8 leave them out" in capsys.readouterr().err


def test_inspect_reports_how_headers_were_found(image_dir: Path, tmp_path: Path, capsys) -> None:
    index = tmp_path / "idx.npz"
    for expected in ("0 from the index, 24 read", "24 from the index, 0 read"):
        main(["inspect", str(image_dir), "--patch", "16", "--cache", "64MiB", "--index", str(index)])
        assert expected in capsys.readouterr().out
    main(["inspect", str(image_dir), "--patch", "16", "--cache", "64MiB", "--index", "off"])
    assert "(no index)" in capsys.readouterr().out


def test_bad_input_exits_2_with_a_message(tmp_path: Path, capsys) -> None:
    assert main(["bench", str(tmp_path / "missing"), "--device", "cpu", "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), "--cache", "lots", "--no-progress"]) == 2
    assert "--cache lots is not a size" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), "--seconds", "nan", "--no-progress"]) == 2
    assert "--seconds nan must be at least 0" in capsys.readouterr().err


def test_gpu_without_a_gpu_exits_2_with_the_fix(image_dir: Path, capsys) -> None:
    from dali_patches.engine.backend import cuda_available

    if cuda_available():
        pytest.skip("this machine has a GPU")
    assert main(["bench", str(image_dir), "--device", "gpu", "--seconds", "1", "--no-progress"]) == 2
    assert "--device gpu" in capsys.readouterr().err


def test_coverage_on_a_full_disk_exits_1_naming_the_log(many_images: Path, tmp_path: Path) -> None:
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))\n"
            "from dali_patches.cli import main\n"
            f"sys.exit(main(['coverage', {str(many_images)!r}, '--patches', '20000', '--batch', '16', '--reuse', '4',"
            f" '--cache', '8MiB', '--device', 'cpu', '--out', {str(tmp_path / 'c.png')!r}, '--log',"
            f" {str(tmp_path / 'run.prov')!r}, '--no-progress']))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300)
    assert run.returncode == 1, run.stderr[-2000:]
    assert "run.prov" in run.stderr and "free space" in run.stderr and "Traceback" not in run.stderr


def test_console_script_help_lists_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "dali_patches.cli", "--help"], capture_output=True, text=True, check=True)
    assert "bench" in out.stdout and "synth" in out.stdout


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The varied image set plus one bad file of every kind inspect must report: name → kind."""
    make_image_set(tmp_path / "data")
    good = (tmp_path / "data" / "b" / "big.jpg").read_bytes()
    png = (tmp_path / "data" / "b" / "rgb_0.png").read_bytes()
    bad = tmp_path / "data" / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (bad / "truncated.png").write_bytes(png[:200])
    (bad / "notes.jpg").write_text("this is not an image")
    (bad / "header.png").write_bytes(png[:8] + b"\0" * 64 + b"IEND")  # right signature, broken header
    Image.new("RGB", (20, 30)).save(bad / "tiny.png")
    kinds = {"empty.jpg": "empty", "truncated.jpg": "truncated", "truncated.png": "truncated",
             "notes.jpg": "not an image", "header.png": "not an image", "tiny.png": "too small"}
    return tmp_path / "data", kinds


def test_inspect_finds_every_planted_bad_file(planted: tuple[Path, dict[str, str]], tmp_path: Path, capsys) -> None:
    data, kinds = planted
    out = tmp_path / "report.json"
    assert main(["inspect", str(data), "--patch", "32", "--cache", "8MiB", "--json", str(out), "--no-progress"]) == 3
    report = json.loads(out.read_text())
    assert {Path(b["path"]).name: b["kind"] for b in report["bad_files"]} == kinds
    assert report["images"] == 24 and report["skipped"] == 6
    assert report["problems"] == {"truncated": 2, "not an image": 2, "empty": 1, "too small": 1}
    assert report["formats"] == {"JPEG": 12, "PNG": 8, "JPEG progressive": 4}
    assert report["modes"] == {"RGB": 19, "L": 3, "RGBA": 2}
    assert report["channels"] == {"1": 3, "3": 19, "4": 2}
    assert report["megapixels"]["max"] == pytest.approx(480 * 640 / 1e6)
    assert report["sizes"]["largest"] == "480x640"
    # 8 MiB: the two-largest slack (2 × 0.92 MB) and then the largest images first
    sizes = sorted((h * w * 3 for h, w in _sizes(data, kinds)), reverse=True)
    room = 8 * 2**20 - 2 * sizes[0]
    assert report["cache"]["images_at_least"] == sum(1 for total in np.cumsum(sizes) if total <= room)
    text = capsys.readouterr().out
    for name in kinds:
        assert name in text
    assert "JPEG progressive 4" in text and "cache       8MiB holds" in text


def _sizes(data: Path, bad: dict[str, str]) -> list[tuple[int, int]]:
    out = []
    for path in sorted(data.rglob("*")):
        if path.is_file() and path.name not in bad:
            with Image.open(path) as im:
                out.append((im.height, im.width))
    return out


def test_inspect_json_to_stdout_and_exit_codes(tmp_path: Path, image_dir: Path, capsys) -> None:
    assert main(["inspect", str(image_dir), "--patch", "32", "--json", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)  # nothing but JSON on stdout
    assert report["images"] == 24 and report["bad_files"] == []
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert main(["inspect", str(tmp_path), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "empty.jpg: empty file (0 bytes)" in captured.out and "no usable image" in captured.err


def test_inspect_reports_companions_found_and_missing(sr_pairs: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "sr"
    shutil.copytree(sr_pairs, data)
    orphan = min((data / "lr_x2").rglob("*.png"))
    min((data / "hr").rglob("*.png")).unlink()  # its LR twin is now an orphan
    lonely = max((data / "hr").rglob("*.png"))
    max((data / "mask").rglob("*.png")).unlink()  # this image lost its mask
    code = main(["inspect", str(data / "lr_x2" / "**" / "*x2.png"), "--patch", "16", "--json", "--no-progress",
                 "--companion", f"target={data / 'hr' / '**' / '*.png'},scale=2"])
    report = json.loads(capsys.readouterr().out)
    assert code == 3 and report["companions"] == {"target": 15}
    assert [(Path(b["path"]).name, b["kind"]) for b in report["bad_files"]] == [(orphan.name, "no partner")]
    code = main(["inspect", str(data / "hr"), "--patch", "16", "--no-progress",
                 "--companion", f"mask={data / 'mask'},kind=mask"])
    text = capsys.readouterr().out
    assert code == 3 and "mask: 14 images paired" in text and f"{lonely}: no 'mask' partner" in text



def _block_luma_std(paths: list[Path], block: int = 16) -> np.ndarray:
    """Luminance (0.299 R + 0.587 G + 0.114 B) standard deviation of every whole ``block``² block."""
    out = []
    for path in paths:
        y = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) @ np.array([0.299, 0.587, 0.114])
        h, w = y.shape[0] // block * block, y.shape[1] // block * block
        out.append(y[:h, :w].reshape(h // block, block, w // block, block).std(axis=(1, 3)).ravel())
    return np.concatenate(out)


def test_synth_flat_areas(tmp_path: Path, capsys) -> None:
    from dali_patches.cli.synth import write_synthetic_images

    kw = {"count": 10, "size": (96, 128), "seed": 0, "fmt": "mixed", "workers": 1}
    plain = write_synthetic_images(tmp_path / "plain", **kw)
    assert main(["synth", str(tmp_path / "flat0"), "--count", "10", "--size", "96x128", "--format", "mixed",
                 "--flat", "0", "--workers", "1", "--no-progress"]) == 0
    assert [p.read_bytes() for p in plain] == [(tmp_path / "flat0" / p.name).read_bytes() for p in plain]
    flat = write_synthetic_images(tmp_path / "flat", **kw, flat=0.4)
    assert [p.name for p in flat] == [p.name for p in plain]
    before, after = _block_luma_std(plain), _block_luma_std(flat)
    assert (before < 2).mean() == 0
    assert (after < 2).mean() > 0.15  # flat regions: no noise, after JPEG q90 too
    assert (after > 6).mean() > 0.4  # the rest keeps its texture
    # the PNG (image 9): the flat regions replace about 40 % of the pixels and leave the rest as they were
    changed = np.any(np.asarray(Image.open(flat[9])) != np.asarray(Image.open(plain[9])), axis=-1)
    assert 0.3 < changed.mean() < 0.5
    assert main(["synth", str(tmp_path / "bad"), "--flat", "1.5", "--no-progress"]) == 2
    assert "--flat 1.5 must be a fraction of the image area, from 0 to 1" in capsys.readouterr().err

def _slides(folder: Path) -> Path:
    """12 slide-like PNGs (a textured blob on white), the last one blank."""
    folder.mkdir()
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:96, :128]
    for i in range(12):
        slide = np.full((96, 128, 3), 240, np.uint8)
        if i != 11:
            blob = (yy - 30 - 3 * i) ** 2 / 20**2 + (xx - 40 - 4 * i) ** 2 / 30**2 < 1
            slide[blob] = rng.integers(40, 200, (int(blob.sum()), 3))
        Image.fromarray(slide).save(folder / f"slide_{i:02d}.png")
    return folder


def test_content_anchors_on_the_command_line(tmp_path: Path, capsys) -> None:
    data, common = _slides(tmp_path / "slides"), ["--patch", "24", "--min-std", "6", "--device", "cpu", "--no-progress"]
    out = tmp_path / "compare.png"
    assert main(["preview", str(data), "--anchors", "content", "--compare", "--out", str(out), *common]) == 0
    text = capsys.readouterr().out
    assert "anchors=uniform: " in text and "anchors=content: 0 of " in text and out.stat().st_size > 0
    assert main(["inspect", str(data), "--content", "--json", *common]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [Path(p).name for p in report["content"]["flat"]] == ["slide_11.png"]
    assert 0 < report["content"]["informative_share_median"] < 1
    assert main(["coverage", str(data), "--anchors", "content", "--patches", "300", "--out", str(tmp_path / "c.png"),
                 *common]) == 0
    text = capsys.readouterr().out
    assert "content anchors" in text and "redrawn" in text and "set aside: " in text and "slide_11.png" in text
    assert main(["bench", str(data), *common]) == 2
    assert "--min-std and --min-opaque bound --anchors content" in capsys.readouterr().err


def test_every_option_of_every_command_is_explained() -> None:
    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"inspect", "bench", "preview", "coverage", "synth"}
    for name, sub in commands.items():
        assert sub.description, name
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_bad_companion_flag_and_bad_counts_exit_2(image_dir: Path, capsys) -> None:
    assert main(["inspect", str(image_dir), "--companion", "mask", "--no-progress"]) == 2
    assert "must look like NAME=PATH" in capsys.readouterr().err
    assert main(["inspect", str(image_dir), "--companion", "mask=x,colour=red", "--no-progress"]) == 2
    assert "'colour=red' is not one of scale=..." in capsys.readouterr().err
    assert main(["coverage", str(image_dir), "--out", "x.png", "--patches", "0"]) == 2
    assert "--patches 0 must be at least 1" in capsys.readouterr().err


def test_preview_writes_a_captioned_grid(image_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "grid.png"
    assert main(["preview", str(image_dir), "--out", str(out), "--patch", "32", "--batch", "9", "--cache", "16MiB",
                 "--device", "cpu", "--no-progress"]) == 0
    with Image.open(out) as png:
        # 3 × 3 cells of 128 px (32 px × 4) with a two-line caption, 4 px gaps: see figures.patch_grid
        assert png.size == (3 * (128 + 12) + 4, 3 * (128 + 28 + 12) + 4)
    assert "9 patches of batch 0 from 9 images" in capsys.readouterr().out


def test_coverage_streams_draws_and_reads_back_its_log(many_images: Path, tmp_path: Path, capsys) -> None:
    out, log, stats = tmp_path / "coverage.png", tmp_path / "run.prov", tmp_path / "stats.json"
    assert main(["coverage", str(many_images), "--patches", "500", "--batch", "16", "--reuse", "4", "--cache", "8MiB",
                 "--out", str(out), "--log", str(log), "--json", str(stats), "--device", "cpu", "--no-progress"]) == 0
    with Image.open(out) as png:
        assert png.size == (1600, 800)  # 4 heat maps: 16 × 8 inches at 100 dpi
    result = json.loads(stats.read_text())
    run = review.load(log)
    assert result["patches"] == 512 == len(run.source)  # rounded up to whole batches
    assert {k: result[k] for k in review.coverage(run)} == pytest.approx(review.coverage(run))
    assert "never sampled" in capsys.readouterr().out
    again = tmp_path / "again.png"
    assert main(["coverage", str(log), "--out", str(again), "--json"]) == 0  # a log as SOURCE: no sampling
    assert json.loads(capsys.readouterr().out)["patches"] == 512


def test_coverage_of_a_damaged_log_exits_2_with_a_message(tmp_path: Path, capsys) -> None:
    from dali_patches.engine.provenance import MAGIC

    log = tmp_path / "bad.prov"
    log.write_bytes(MAGIC + (2**62).to_bytes(8, "little") + b"{}")
    assert main(["coverage", str(log), "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "bad.prov' is not a usable provenance log: its header claims" in err and "Traceback" not in err


@pytest.mark.parametrize(("argv", "said"), [
    (["preview", "{images}", "--out", "{tmp}/missing/x.png"], "--out {tmp}/missing/x.png: the folder {tmp}/missing does not exist"),
    (["coverage", "{images}", "--log", "{tmp}/missing/run.prov"], "--log {tmp}/missing/run.prov: the folder"),
    (["bench", "{images}", "--json", "{tmp}/missing/r.json"], "--json {tmp}/missing/r.json: the folder"),
    (["bench", "{images}", "--seconds", "0"], "--seconds 0 measures nothing"),
])
def test_bad_outputs_and_durations_are_refused_before_any_work(image_dir: Path, tmp_path: Path, capsys,
                                                               argv: list[str], said: str) -> None:
    fill = {"images": str(image_dir), "tmp": str(tmp_path)}
    assert main([a.format(**fill) for a in argv]) == 2
    assert said.format(**fill) in capsys.readouterr().err


def test_coverage_without_matplotlib_says_so_before_sampling(image_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    monkeypatch.setattr("dali_patches.cli.commands._sample_log", lambda *a: pytest.fail("sampled first"))
    assert main(["coverage", str(image_dir), "--no-progress"]) == 2
    assert "pip install 'dali-patches[viz]'" in capsys.readouterr().err
