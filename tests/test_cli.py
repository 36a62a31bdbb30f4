import json
import subprocess
import sys
from pathlib import Path

from dali_patches.cli import main


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
    text = capsys.readouterr().out
    assert "patches/s" in text and "mean reuse" in text and "peak RSS" in text


def test_bad_input_exits_2_with_a_message(tmp_path: Path, capsys) -> None:
    assert main(["bench", str(tmp_path / "missing"), "--device", "cpu", "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", str(tmp_path), "--cache", "lots", "--no-progress"]) == 2
    assert "cache_bytes='lots'" in capsys.readouterr().err


def test_console_script_help_lists_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "dali_patches.cli", "--help"], capture_output=True, text=True, check=True)
    assert "bench" in out.stdout and "synth" in out.stdout
