"""Every code block of README.md and docs/ runs as written, on generated images (see ``data_dir``).

* ```python blocks run one by one, each in a fresh namespace, in a folder that holds the generated
  data (``data/train``, ``data/sr``, ``data/seg``, ``data/shards``, ``demo_images``). Blocks that
  import torch, TensorFlow (with DALI's TF plugin) or JAX are skipped where that is missing.
* ```bash blocks: every command line must call ``dali-patches``; a page's lines run in order, in
  process (``dali_patches.cli.main``), in the same folder. To keep the test short, ``--seconds`` is
  capped at 1 and ``synth`` writes small images with one worker unless the line sets ``--size`` or
  ``--workers``.
* A block that cannot run here (it installs packages, needs Docker, a GPU, an S3 server or several
  processes) carries ``<!-- not run: REASON -->`` on a line before its fence (other HTML comments
  may stand between them); the reason is required.
* ```text blocks (output, diagrams) are not run. Any other fence language fails the test.

The site itself must build with ``mkdocs build --strict`` (when mkdocs is installed).
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_patches.cli import main
from dali_patches.cli.synth import synthetic_image, write_synthetic_images

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGUAGES = {"python", "bash", "text"}
# The examples are written for real data sets; the test's images are tiny, so every cache holds all of
# them, which the sampler rightly warns about.
pytestmark = pytest.mark.filterwarnings("ignore:the cache holds all:UserWarning")
NOT_RUN = re.compile(r"<!--\s*not run\b:?(.*?)-->")
COMMENT = re.compile(r"<!--.*?-->")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    not_run: str | None  # the reason, when marked; "" when marked without one

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, with the ``not run`` marker written before each."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = re.match(r"^(\s*)```(\S*)", lines[i])
        if not opening:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
        reason = None
        k = i - 1
        while k >= 0 and (not lines[k].strip() or COMMENT.fullmatch(lines[k].strip())):
            marker = NOT_RUN.fullmatch(lines[k].strip())
            if marker:
                reason = marker.group(1).strip()
            k -= 1
        indent = len(opening.group(1))
        code = "\n".join(line[indent:] for line in lines[i + 1:end]) + "\n"
        found.append(Block(page, i + 1, opening.group(2), code, reason))
        i = end + 1
    return found


BLOCKS = [block for page in PAGES for block in blocks_of(page)]
PYTHON = [b for b in BLOCKS if b.language == "python" and b.not_run is None]
CLI_PAGES = sorted({b.page for b in BLOCKS if b.language == "bash" and b.not_run is None})


def command_lines(page: Path) -> list[str]:
    """The ``dali-patches`` command lines of a page's runnable bash blocks, in order, without comments."""
    lines = []
    for block in blocks_of(page):
        if block.language == "bash" and block.not_run is None:
            for line in block.code.splitlines():
                command = line.split("  #")[0].strip()
                if command and not command.startswith("#"):
                    lines.append(command)
    return lines


def shortened(words: list[str]) -> list[str]:
    """The command as the test runs it: at most 1 s of streaming; ``synth``: small images, one worker."""
    words = list(words)
    if "--seconds" in words:
        at = words.index("--seconds") + 1
        words[at] = str(min(float(words[at]), 1.0))
    if words[1:2] == ["synth"]:
        words += [] if "--size" in words else ["--size", "96x128"]
        words += [] if "--workers" in words else ["--workers", "1"]
    return words


def _write_shards(folder: Path, rng: np.random.Generator) -> None:
    """Two tar shards in the WebDataset layout: ``key.jpg`` with its mask ``key.mask.png``."""
    folder.mkdir(parents=True)
    for shard in range(2):
        with tarfile.open(folder / f"shard-{shard:06d}.tar", "w") as tar:
            for i in range(shard * 12, shard * 12 + 12):
                mask = np.zeros((80, 96), np.uint8)
                mask[10:40, 20 + i:50 + i] = 1
                for name, image, fmt in ((f"{i:06d}.jpg", Image.fromarray(synthetic_image(80, 96, rng)), "JPEG"),
                                         (f"{i:06d}.mask.png", Image.fromarray(mask, "L"), "PNG")):
                    data = io.BytesIO()
                    image.save(data, fmt)
                    member = tarfile.TarInfo(name)
                    member.size = data.tell()
                    data.seek(0)
                    tar.addfile(member, data)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs")
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
    slides = root / "data" / "slides"  # tissue-like blobs on a white background; one blank slide
    slides.mkdir()
    yy, xx = np.mgrid[:160, :200]
    for i in range(12):
        slide = np.full((160, 200, 3), 242, np.uint8)
        if i != 11:
            blob = (yy - 50 - 5 * i) ** 2 / 35**2 + (xx - 70 - 6 * i) ** 2 / 50**2 < 1
            slide[blob] = synthetic_image(160, 200, rng)[blob] // 2 + 90
        Image.fromarray(slide).save(slides / f"slide_{i:02d}.png")
    _write_shards(root / "data" / "shards", rng)
    # what `dali-patches synth demo_images --count 64` writes, small (as the shortened command does)
    write_synthetic_images(str(root / "demo_images"), 64, (96, 128), seed=0, fmt="jpg", progress=False, workers=1)
    return root


@pytest.fixture
def in_data_dir(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in ``data_dir``, with the user's cache folder (header index, shard tables) out of the way."""
    monkeypatch.chdir(data_dir)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return data_dir


def test_every_block_is_run_or_says_why_not() -> None:
    assert len(PYTHON) >= 15 and len(CLI_PAGES) >= 4
    for block in BLOCKS:
        assert block.language in LANGUAGES, f"{block.name}: fence language {block.language!r} is none of {LANGUAGES}"
        assert block.not_run != "", f"{block.name}: a 'not run' marker needs a reason: <!-- not run: why -->"
        if block.language == "bash" and block.not_run is None:
            for line in block.code.splitlines():
                command = line.split("  #")[0].strip()
                if command and not command.startswith("#"):
                    assert command.startswith("dali-patches "), f"{block.name}: {command!r} is not a dali-patches " \
                                                                "command; mark the block <!-- not run: why -->"
                    assert not command.endswith("\\"), f"{block.name}: continued lines are not run; write one line"


def test_every_marker_belongs_to_a_block() -> None:
    for page in PAGES:
        markers = sum(bool(NOT_RUN.fullmatch(line.strip())) for line in page.read_text().splitlines())
        marked = sum(b.not_run is not None for b in blocks_of(page))
        assert markers == marked, f"{page.relative_to(ROOT)}: a 'not run' marker stands before no code block"


def test_readme_keeps_two_ci_commands() -> None:
    """.ci/run runs exactly the two commands between the README's ci:commands markers."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- ci:commands -->\n```bash\n(.*?)```\n<!-- /ci:commands -->", text, flags=re.DOTALL)
    assert block, "README.md lost its <!-- ci:commands --> block"
    commands = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert "dali-patches synth demo_images" in commands[0] and commands[1].endswith("python -m pytest -q")


def test_readme_links_exist() -> None:
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


@pytest.mark.parametrize("block", PYTHON, ids=[b.name for b in PYTHON])
def test_python_block_runs(block: Block, in_data_dir: Path) -> None:
    code = block.code
    if re.search(r"^\s*(import|from) torch\b|dali_patches\.torch\b", code, re.MULTILINE):
        pytest.importorskip("torch")
    if re.search(r"^\s*(import|from) tensorflow\b|dali_patches\.tf\b", code, re.MULTILINE):
        pytest.importorskip("tensorflow")
        pytest.importorskip("nvidia.dali.plugin.tf")
    if re.search(r"^\s*(import|from) jax\b|dali_patches\.jax\b", code, re.MULTILINE):
        pytest.importorskip("jax")
    if "coverage_figure" in code:
        pytest.importorskip("matplotlib")
    exec(compile(code, block.name, "exec"), {"__name__": "__docs__"})  # noqa: S102


@pytest.mark.parametrize("page", CLI_PAGES, ids=[str(p.relative_to(ROOT)) for p in CLI_PAGES])
def test_command_lines_run(page: Path, in_data_dir: Path) -> None:
    if any(" coverage " in f" {line} " for line in command_lines(page)):
        pytest.importorskip("matplotlib")
    for line in command_lines(page):
        words = shortened(shlex.split(line))
        args = words[1:] if words[1].startswith("-") else [*words[1:], "--no-progress"]
        try:
            code = main(args)
        except SystemExit as done:  # --version and --help exit through argparse
            code = done.code
        assert code in (0, None), f"{page.relative_to(ROOT)}: {line!r} exited with {code}"


def test_site_builds_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict``: no broken link or anchor, every page in the navigation, clean docstrings."""
    if shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]', part of the dev extra)")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, check=False,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
