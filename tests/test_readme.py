"""The README's Python examples run as written (on generated images in ``data/train``)."""

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
    return root


def test_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "import torch" in BLOCKS[index]:
        pytest.importorskip("torch")
    monkeypatch.chdir(data_dir)
    namespace: dict = {}
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), namespace)  # noqa: S102
