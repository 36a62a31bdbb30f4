"""The README's Python examples run as written (on generated images in ``data/``)."""

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_patches.cli import main
from dali_patches.cli.synth import synthetic_image

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
CLI = [line.split("  #")[0].strip() for line in
       re.search(r"<!-- cli:examples -->\n```bash\n(.*?)```", README.read_text(), flags=re.DOTALL).group(1).splitlines()]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    train = root / "data" / "train"
    train.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(300):
        Image.fromarray(synthetic_image(96, 128, rng)).save(train / f"{i:03d}.jpg", quality=90)
    for folder in ("sr/hr", "sr/lr_x2", "seg/images", "seg/masks"):
        (root / "data" / folder).mkdir(parents=True)
    for i in range(40):  # super-resolution pairs (exact 2× decimation, lossless) and segmentation masks
        hr = synthetic_image(96, 128, rng)
        Image.fromarray(hr).save(root / "data" / "sr" / "hr" / f"{i:04d}.png")
        Image.fromarray(np.ascontiguousarray(hr[::2, ::2])).save(root / "data" / "sr" / "lr_x2" / f"{i:04d}x2.png")
        Image.fromarray(synthetic_image(100, 120, rng)).save(root / "data" / "seg" / "images" / f"{i:03d}.jpg")
        mask = np.zeros((100, 120), np.uint8)
        mask[20 + i % 30: 50 + i % 30, 30:70] = 1 + i % 3
        Image.fromarray(mask, "L").save(root / "data" / "seg" / "masks" / f"{i:03d}.png")
    return root


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "import torch" in BLOCKS[index]:
        pytest.importorskip("torch")
    if "import tensorflow" in BLOCKS[index]:
        pytest.importorskip("tensorflow")
        pytest.importorskip("nvidia.dali.plugin.tf")
    if "import jax" in BLOCKS[index]:
        pytest.importorskip("jax")
    monkeypatch.chdir(data_dir)
    namespace: dict = {}
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), namespace)  # noqa: S102


def test_readme_command_lines_run(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command-line examples run in order (coverage reads the log the one before it kept)."""
    monkeypatch.chdir(data_dir)
    assert len(CLI) >= 6
    for line in CLI:
        words = shlex.split(line)
        assert words[0] == "dali-patches", line
        assert main([*words[1:], "--no-progress"]) == 0, line
    assert Path("grid.png").is_file() and Path("coverage.png").is_file() and Path("report.json").is_file()
