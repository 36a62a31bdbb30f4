"""Shared fixtures: the ``device`` to test on (the CPU, the simulated GPU, a real GPU), generated
image sets, and a reference decoder."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dali_patches.engine.backend as backend_module
import dali_patches.sampler as sampler_module
from dali_patches.cli.synth import synthetic_image
from dali_patches.engine.backend import Backend, cuda_available
from dali_patches.engine.gather import KERNEL_NAME, kernel_twin
from dali_patches.engine.measure import CHECK_NAME, MAP_NAME, check_twin, map_twin
from dali_patches.options import Device

from .cuda_sim import Simulator

_DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("sim", id="sim"),
            pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)]
_REAL_DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)]
# The kernels run as their NumPy twins there: (twin, array arguments read, written).
KERNELS = {KERNEL_NAME: (kernel_twin, (0, 1), (2,)), CHECK_NAME: (check_twin, (0, 1, 3), (10,)),
           MAP_NAME: (map_twin, (0,), (16,))}
GPU_TEST_HW_DECODER_LOAD = 0.0  # nvJPEG's share for its hardware engine in GPU tests (see reference_decode)


@contextlib.contextmanager
def simulated_gpu(monkeypatch: pytest.MonkeyPatch, **options: object) -> Iterator[Simulator]:
    """``device="gpu"`` becomes the simulated GPU (tests/cuda_sim.py) for the sampler: its producer,
    cache, gather, output ring and streams run there, with DALI decoding on the CPU (the decoded
    images are handed over as device memory DALI owns). Checks for hazards at the end."""
    sim = Simulator(kernels=KERNELS, **options)  # type: ignore[arg-type]
    real = backend_module.resolve_backend

    def resolve(device: Device | str, device_id: int = 0, from_local_rank: bool = False) -> Backend:
        if Device(device) is Device.CPU:
            return real(device)
        return Backend(Device.GPU, sim.xp, "cpu", "cpu", None, device_id % sim.devices)

    monkeypatch.setattr(backend_module, "resolve_backend", resolve)
    monkeypatch.setattr(sampler_module, "resolve_backend", resolve)
    try:
        yield sim
    finally:
        sim.close()
    sim.check()


@pytest.fixture(autouse=True, scope="session")
def _private_cache_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Catalog indexes go to a folder of this test session, not the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


def _pin_hw_decoder_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a real GPU, every decode of the sampler uses :data:`GPU_TEST_HW_DECODER_LOAD`, as
    :func:`reference_decode` does (see there), unless a test sets ``hw_decoder_load`` itself."""
    import dali_patches.engine.decoders as decoders_module

    for name in ("_decode_pipeline", "_decode_alpha_pipeline"):
        real = getattr(decoders_module, name)

        def pinned(*args: object, hw_decoder_load: float | None = None, real: Callable[..., object] = real, **kwargs: object) -> object:
            load = GPU_TEST_HW_DECODER_LOAD if hw_decoder_load is None else hw_decoder_load
            return real(*args, hw_decoder_load=load, **kwargs)

        monkeypatch.setattr(decoders_module, name, pinned)


@pytest.fixture(params=_DEVICES)
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each test runs on the CPU, on the simulated GPU (``sim``: the GPU code path with every stream
    hazard checked), and on a real GPU when one is present (skipped otherwise). Yields the
    ``device`` to give the sampler."""
    if request.param == "gpu" and not cuda_available():
        pytest.skip("no CUDA GPU with CuPy on this machine")
    if request.param == "sim":
        with simulated_gpu(monkeypatch):
            yield "gpu"
        return
    if request.param == "gpu":
        _pin_hw_decoder_load(monkeypatch)
    yield request.param


@pytest.fixture(params=_REAL_DEVICES)
def dali_device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """For tests of DALI's own GPU operators and plugins (the sample pipeline, torch and TF
    iterators): the CPU, and a real GPU when present; the simulated GPU cannot run DALI's GPU side."""
    if request.param == "gpu" and not cuda_available():
        pytest.skip("no CUDA GPU with CuPy on this machine")
    if request.param == "gpu":
        _pin_hw_decoder_load(monkeypatch)
    return request.param


@pytest.fixture
def backend(device: str):
    return backend_module.resolve_backend(device)


def _save(path: Path, array: np.ndarray, **kwargs: object) -> Path:
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[array.shape[-1]]
    Image.fromarray(array.squeeze(-1) if mode == "L" else array, mode).save(path, **kwargs)
    return path


def make_image_set(folder: Path, seed: int = 0) -> list[Path]:
    """24 small images: odd sizes, JPEG baseline and progressive, PNG RGB, grayscale, RGBA, in
    two sub-folders (the catalog searches recursively)."""
    rng = np.random.default_rng(seed)
    (folder / "a").mkdir(parents=True, exist_ok=True)
    (folder / "b" / "deep").mkdir(parents=True, exist_ok=True)
    paths = []
    sizes = [(97, 131), (128, 128), (200, 161), (257, 301), (64, 333), (150, 99), (181, 223), (120, 240)]
    for i in range(10):
        h, w = sizes[i % len(sizes)]
        paths.append(_save(folder / "a" / f"base_{i}.jpg", synthetic_image(h, w, rng), quality=90))
    for i in range(4):
        h, w = sizes[(i + 3) % len(sizes)]
        paths.append(_save(folder / "a" / f"prog_{i}.jpeg", synthetic_image(h, w, rng), quality=85, progressive=True))
    for i in range(4):
        h, w = sizes[(i + 5) % len(sizes)]
        paths.append(_save(folder / "b" / f"rgb_{i}.png", synthetic_image(h, w, rng)))
    for i in range(2):
        paths.append(_save(folder / "b" / "deep" / f"gray_{i}.png", synthetic_image(111 + i, 97, rng, channels=1)))
    paths.append(_save(folder / "b" / "deep" / "gray.jpg", synthetic_image(140, 90, rng, channels=1), quality=90))
    for i in range(2):
        rgba = np.concatenate([synthetic_image(133, 150 + i, rng), rng.integers(0, 256, (133, 150 + i, 1), np.uint8)], -1)
        paths.append(_save(folder / "b" / f"rgba_{i}.png", rgba))
    paths.append(_save(folder / "b" / "big.jpg", synthetic_image(480, 640, rng), quality=92))
    return sorted(paths)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 24 varied images (see :func:`make_image_set`), shared read-only by all tests."""
    folder = tmp_path_factory.mktemp("images")
    make_image_set(folder)
    return folder


@pytest.fixture(scope="session")
def many_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 small JPEGs for statistical tests (reuse, coverage, distinctness)."""
    folder = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(1)
    for i in range(64):
        h, w = int(rng.integers(64, 160)), int(rng.integers(64, 160))
        _save(folder / f"img_{i:03d}.jpg", synthetic_image(h, w, rng), quality=90)
    return folder


def reference_decode(paths: list[str], device: str, exif: bool = True, channels: int = 3,
                     dtype: str = "uint8") -> dict[str, np.ndarray]:
    """Full decode of each file by the same DALI decoder the sampler uses (host arrays).

    On a real GPU nvJPEG splits each batch between its hardware engine and CUDA by
    ``hw_decoder_load``, and the two may differ pixel for pixel; this reference decodes one file a
    batch, so GPU tests pin the share to :data:`GPU_TEST_HW_DECODER_LOAD` here and in the sampler
    (``hw_decoder_load=``) to compare like with like."""
    from nvidia.dali import fn, pipeline_def, types

    from dali_patches.engine.decoders import DALI_DTYPES

    backend = backend_module.resolve_backend(device)
    split = {"hw_decoder_load": GPU_TEST_HW_DECODER_LOAD} if backend.decoder_device == "mixed" else {}

    @pipeline_def(batch_size=1, num_threads=1, device_id=backend.dali_device_id, prefetch_queue_depth=1)
    def full():
        jpegs, _ = fn.readers.file(files=list(paths))
        return fn.decoders.image(jpegs, device=backend.decoder_device, adjust_orientation=exif,
                                 output_type=types.RGB if channels == 3 else types.GRAY,
                                 dtype=DALI_DTYPES[dtype], **split)

    pipe = full()
    pipe.build()
    out = {}
    for path in paths:
        (images,) = pipe.run()
        if hasattr(images, "as_cpu"):
            images = images.as_cpu()
        out[path] = np.array(images[0])
    return out


def coordinate_image(h: int, w: int) -> np.ndarray:
    """``(h, w, 3) uint8`` whose pixel ``(y, x)`` is ``(y % 256, x % 256, 16·(y // 256) + x // 256)``:
    every pixel names its own position (images up to 4096 px), so a patch shows where it came from."""
    yy, xx = np.mgrid[:h, :w]
    return np.stack([yy % 256, xx % 256, (yy // 256) * 16 + xx // 256], -1).astype(np.uint8)


def label_mask(h: int, w: int) -> np.ndarray:
    """``(h, w, 1) uint8`` mask that differs under every flip/rotation: ``(7y + 3x) % 251``."""
    yy, xx = np.mgrid[:h, :w]
    return ((7 * yy + 3 * xx) % 251).astype(np.uint8)[..., None]


@pytest.fixture(scope="session")
def sr_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Super-resolution pairs: ``hr/<sub>/NNNN.png`` coordinate images (even sizes) and
    ``lr_x2/<sub>/NNNNx2.png``, their exact 2× decimation, lossless; plus ``mask/<sub>/NNNN.png``
    single-channel masks of the HR size."""
    root = tmp_path_factory.mktemp("sr")
    rng = np.random.default_rng(5)
    for i in range(16):
        sub = f"s{i % 2}"
        for folder in ("hr", "lr_x2", "mask"):
            (root / folder / sub).mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(40, 90)) * 2, int(rng.integers(40, 90)) * 2
        hr = coordinate_image(h, w)
        _save(root / "hr" / sub / f"{i:04d}.png", hr)
        _save(root / "lr_x2" / sub / f"{i:04d}x2.png", np.ascontiguousarray(hr[::2, ::2]))
        _save(root / "mask" / sub / f"{i:04d}.png", label_mask(h, w))
    return root


def assert_same_steps(steps: list[tuple[np.ndarray, ...]], expected: list[tuple[np.ndarray, ...]]) -> None:
    """Two runs of batches, each a tuple of host arrays, equal bit for bit."""
    assert len(steps) == len(expected)
    for got, want in zip(steps, expected, strict=True):
        for a, b in zip(got, want, strict=True):
            assert np.array_equal(a, b)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """An S3-compatible server (moto) on 127.0.0.1, for one test module; skipped without moto."""
    pytest.importorskip("moto.server", reason="the S3 test server needs moto[server] (pip install 'moto[server]')")
    from .s3_server import moto_server

    try:
        server = moto_server()
        url = server.__enter__()
    except RuntimeError as e:
        pytest.skip(str(e))
    try:
        yield url
    finally:
        server.__exit__(None, None, None)
