"""Synthetic photo-like images for demos, benchmarks and tests: no network data needed.

Smooth random colour fields plus fine noise compress like natural photos (JPEG q90 ≈ 1–2 bits/pixel),
so decode costs are realistic. With ``flat``, part of each image is a noiseless flat region (a studio
backdrop, a clear sky, letterbox bars or a slide's background), as in real photo collections.
Deterministic for a given seed.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

__all__ = ["FLAT_KINDS", "synthetic_image", "with_flat_areas", "write_synthetic_images"]

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


FLAT_KINDS = ("backdrop", "sky", "letterbox", "slide")
_FIELD_STEP = 16  # pixels per sample of the low-resolution field that shapes the blobs


def _ramp(h: int, w: int, rng: np.random.Generator, base: np.ndarray, levels: float) -> np.ndarray:
    """A noiseless fill: ``base`` (RGB) plus a linear ramp of at most ``levels`` (per channel, over
    the whole image) along y or x, broadcastable to ``(h, w, 3)`` uint8. At most 0.03 levels per pixel,
    so a 64 × 64 patch of it spans about 2 levels."""
    axis = int(rng.integers(2))
    n = h if axis == 0 else w
    slope = rng.uniform(-1, 1, size=3) * min(levels, 0.03 * n)
    ramp = np.clip(np.rint(base + np.linspace(0, 1, n)[:, None] * slope), 0, 255).astype(np.uint8)
    return ramp[:, None, :] if axis == 0 else ramp[None, :, :]


def _smooth_noise(gh: int, gw: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """``(gh, gw)`` float32 noise in about [-1, 1], smooth over ``1 / cells`` of the longer side."""
    ch, cw = (max(2, min(n, round(cells * n / max(gh, gw)))) for n in (gh, gw))
    coarse = rng.uniform(-1, 1, size=(ch, cw)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, "F").resize((gw, gh), Image.Resampling.BICUBIC))


def _outside_blobs(h: int, w: int, rng: np.random.Generator, blobs: int, flat: float,
                   wobble: float) -> np.ndarray:
    """``(h, w)`` bool: True outside ``blobs`` irregular blobs that cover ``1 - flat`` of the image.

    The blobs are Gaussian bumps whose logarithm is perturbed by ``wobble`` × smooth noise at two
    scales (so their outlines wander, without islands far from them), on a field of one sample per
    16 pixels, thresholded at its ``flat`` quantile and upsampled bicubically."""
    if flat >= 1:
        return np.ones((h, w), dtype=bool)
    gh, gw = max(4, -(-h // _FIELD_STEP)), max(4, -(-w // _FIELD_STEP))
    scale = max(h, w)
    y = (np.arange(gh)[:, None] + 0.5) * (h / gh) / scale
    x = (np.arange(gw)[None, :] + 0.5) * (w / gw) / scale
    bumps = np.zeros((gh, gw))
    for _ in range(blobs):
        cy, cx = rng.uniform(0.25, 0.75) * h / scale, rng.uniform(0.25, 0.75) * w / scale
        radius = rng.uniform(0.1, 0.2)
        bumps += rng.uniform(0.5, 1.0) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * radius**2))
    field = np.log(bumps + 1e-30) + wobble * (_smooth_noise(gh, gw, 6, rng) + 0.5 * _smooth_noise(gh, gw, 24, rng))
    field = field.astype(np.float32)
    threshold = np.quantile(field, flat)
    return np.asarray(Image.fromarray(field, "F").resize((w, h), Image.Resampling.BICUBIC)) < threshold


def with_flat_areas(pixels: np.ndarray, flat: float, rng: np.random.Generator) -> np.ndarray:
    """``pixels`` (``(h, w, 3)`` uint8) with noiseless flat regions covering about ``flat`` of the
    area, of one of :data:`FLAT_KINDS` drawn from ``rng`` (see :func:`write_synthetic_images`)."""
    h, w = pixels.shape[:2]
    kind = FLAT_KINDS[int(rng.integers(len(FLAT_KINDS)))]
    if kind == "letterbox":
        mask = np.zeros((h, w), dtype=bool)
        if rng.random() < 0.5:  # bars top and bottom
            bar = round(h * flat / 2)
            mask[:bar] = mask[h - bar:] = True
        else:
            bar = round(w * flat / 2)
            mask[:, :bar] = mask[:, w - bar:] = True
        return np.where(mask[..., None], np.uint8(0), pixels)
    if kind == "sky":
        # a wavy horizon at about flat × h: a few random sines of up to 5 % of the height
        x = np.linspace(0, 2 * np.pi, w)
        waves = sum(rng.uniform(-0.025, 0.025) * np.sin(rng.uniform(0.5, 4) * x + rng.uniform(0, 2 * np.pi))
                    for _ in range(3))
        horizon = np.clip((flat + waves) * h, 0, h)
        mask = np.arange(h)[:, None] < horizon[None, :]
        base = np.array([rng.uniform(80, 170), rng.uniform(140, 210), rng.uniform(200, 250)])
        fill = _ramp(h, w, rng, base, 40)
    elif kind == "backdrop":
        mask = _outside_blobs(h, w, rng, 1, flat, 0.6)
        fill = _ramp(h, w, rng, rng.uniform(0, 255, size=3), 40)
    else:  # slide: a white or light-grey background with a few tissue blobs
        mask = _outside_blobs(h, w, rng, int(rng.integers(1, 5)), flat, 1.5)
        fill = _ramp(h, w, rng, np.full(3, rng.uniform(215, 250)) + rng.uniform(-4, 4, size=3), 12)
    return np.where(mask[..., None], fill, pixels)


def _write_one(task: tuple[Path, int, tuple[int, int], int, str, int, bool, float]) -> Path:
    path, index, size, seed, fmt, quality, progressive, flat = task
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    h = max(8, int(size[0] * rng.uniform(0.75, 1.25)))
    w = max(8, int(size[1] * rng.uniform(0.75, 1.25)))
    pixels = synthetic_image(h, w, rng)
    if flat > 0:  # its own stream: the textured field is the same as without flat areas
        pixels = with_flat_areas(pixels, flat, np.random.default_rng(np.random.SeedSequence([seed, index, 1])))
    image = Image.fromarray(pixels)
    if fmt == "jpg":
        image.save(path, quality=quality, progressive=progressive)
    else:
        image.save(path)
    return path


def write_synthetic_images(folder: str | os.PathLike, count: int, size: tuple[int, int] = (1536, 2048),
                           seed: int = 0, fmt: str = "jpg", quality: int = 90, progressive: bool = False,
                           progress: bool = False, workers: int | None = None, flat: float = 0.0) -> list[Path]:
    """Write ``count`` images of about ``size=(height, width)`` into ``folder``; return their paths.

    ``fmt`` is ``"jpg"``, ``"png"`` or ``"mixed"`` — a photo collection's mix: of every ten images,
    seven baseline JPEGs, two progressive JPEGs (about 3× slower to decode) and one PNG. Sizes vary
    by up to ±25 % per image so that the cache sees mixed shapes, as with real data (``size=(2600,
    3500)`` gives a mean of about 9 MP, up to about 14 MP). Image ``i`` depends only on ``(seed, i)``;
    ``workers`` processes (default: every core) write them.

    ``flat`` (a fraction of each image's area, 0 to 1; default 0: no flat areas, the same files as
    before the option existed) gives each image noiseless flat regions covering about that fraction
    of it, as in real photo collections; the rest stays the textured field. Each image is, drawn from
    ``(seed, i)``, one of :data:`FLAT_KINDS`:

    * ``"backdrop"``: a studio backdrop — one colour with a very gentle gradient (at most 40 levels
      over the image, 0.03 levels per pixel) around one irregular textured subject;
    * ``"sky"``: a clear sky — a blue gentle vertical or horizontal gradient above a wavy horizon;
    * ``"letterbox"``: black bars (0, 0, 0) top and bottom or left and right, ``flat / 2`` each;
    * ``"slide"``: a white or light-grey background (215–250, near-neutral, a gradient of at most 12
      levels) with one to four irregular textured "tissue" blobs.

    Flat regions hold no noise: 64 × 64 patches inside them have a luminance standard deviation
    below 2 after JPEG q90 (patches straddling their edges do not). The textured part is the same
    field as with ``flat=0``.
    """
    if count <= 0 or min(size) <= 0:
        msg = f"{count=} and {size=} must be positive"
        raise ValueError(msg)
    if not 0 <= flat <= 1:
        msg = f"{flat=} must be a fraction of the image area, from 0 to 1"
        raise ValueError(msg)
    if fmt not in ("jpg", "png", "mixed"):
        msg = f"{fmt=} must be 'jpg', 'png' or 'mixed'"
        raise ValueError(msg)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    tasks = []
    for i in range(count):
        kind, prog = (fmt, progressive) if fmt != "mixed" else _MIX[i % len(_MIX)]
        tasks.append((out / f"synthetic_{i:06d}.{kind}", i, size, seed, kind, quality, prog, flat))
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=count, desc="writing images", unit="img", disable=not progress)
    if workers == 1 or count < 8:
        paths = [bar.update() or _write_one(t) for t in tasks]
    else:
        with ProcessPoolExecutor(workers) as pool:
            paths = [bar.update() or p for p in pool.map(_write_one, tasks, chunksize=4)]
    bar.close()
    return paths
