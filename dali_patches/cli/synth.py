"""Synthetic photo-like images for demos, benchmarks and tests: no network data needed.

Smooth random colour fields plus fine noise compress like natural photos (JPEG q90 ≈ 1–2 bits/pixel),
so decode costs are realistic. Deterministic for a given seed.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

__all__ = ["synthetic_image", "write_synthetic_images"]

# fmt="mixed": (format, progressive) of images i % 10 = 0..9
_MIX = [("jpg", False)] * 2 + [("jpg", True)] + [("jpg", False)] * 3 + [("jpg", True)] + [("jpg", False)] * 2 \
    + [("png", False)]


def synthetic_image(height: int, width: int, rng: np.random.Generator, channels: int = 3) -> np.ndarray:
    """``(height, width, channels) uint8`` smooth random field with texture."""
    coarse = rng.integers(0, 256, size=(max(2, height // 64), max(2, width // 64), channels), dtype=np.uint8)
    mode = "RGB" if channels == 3 else "L"
    smooth = Image.fromarray(coarse.squeeze(-1) if channels == 1 else coarse, mode).resize(
        (width, height), Image.Resampling.BICUBIC)
    field = np.asarray(smooth, dtype=np.int16).reshape(height, width, channels)
    noise = rng.normal(0, 6, size=(height, width, 1)).astype(np.int16)
    return np.clip(field + noise, 0, 255).astype(np.uint8)


def _write_one(task: tuple[Path, int, tuple[int, int], int, str, int, bool]) -> Path:
    path, index, size, seed, fmt, quality, progressive = task
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    h = max(8, int(size[0] * rng.uniform(0.75, 1.25)))
    w = max(8, int(size[1] * rng.uniform(0.75, 1.25)))
    image = Image.fromarray(synthetic_image(h, w, rng))
    if fmt == "jpg":
        image.save(path, quality=quality, progressive=progressive)
    else:
        image.save(path)
    return path


def write_synthetic_images(folder: str | os.PathLike, count: int, size: tuple[int, int] = (1536, 2048),
                           seed: int = 0, fmt: str = "jpg", quality: int = 90, progressive: bool = False,
                           progress: bool = False, workers: int | None = None) -> list[Path]:
    """Write ``count`` images of about ``size=(height, width)`` into ``folder``; return their paths.

    ``fmt`` is ``"jpg"``, ``"png"`` or ``"mixed"`` — a photo collection's mix: of every ten images,
    seven baseline JPEGs, two progressive JPEGs (about 3× slower to decode) and one PNG. Sizes vary
    by up to ±25 % per image so that the cache sees mixed shapes, as with real data (``size=(2600,
    3500)`` gives a mean of about 9 MP, up to about 14 MP). Image ``i`` depends only on ``(seed, i)``;
    ``workers`` processes (default: every core) write them.
    """
    if count <= 0 or min(size) <= 0:
        msg = f"{count=} and {size=} must be positive"
        raise ValueError(msg)
    if fmt not in ("jpg", "png", "mixed"):
        msg = f"{fmt=} must be 'jpg', 'png' or 'mixed'"
        raise ValueError(msg)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tasks = []
    for i in range(count):
        kind, prog = (fmt, progressive) if fmt != "mixed" else _MIX[i % len(_MIX)]
        tasks.append((out / f"synthetic_{i:06d}.{kind}", i, size, seed, kind, quality, prog))
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=count, desc="writing images", unit="img", disable=not progress)
    if workers == 1 or count < 8:
        paths = [bar.update() or _write_one(t) for t in tasks]
    else:
        with ProcessPoolExecutor(workers) as pool:
            paths = [bar.update() or p for p in pool.map(_write_one, tasks, chunksize=4)]
    bar.close()
    return paths
