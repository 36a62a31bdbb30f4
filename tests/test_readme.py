"""The README's Python examples run as written (on generated images in ``data/``)."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_patches.synth import synthetic_image

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


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
    monkeypatch.chdir(data_dir)
    namespace: dict = {}
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), namespace)  # noqa: S102
