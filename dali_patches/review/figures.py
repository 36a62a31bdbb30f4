"""Pictures of what was sampled: a captioned grid of patches and a coverage figure (heat maps plus a
histogram of patches per image), for ``dali-patches preview`` and ``dali-patches coverage``.

The grid is drawn with Pillow alone; the coverage figure needs matplotlib (``pip install
dali_patches[viz]``), imported only when it is drawn.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..sources import item_bytes
from ..sources.headers import not_regular
from .runs import Provenance, coverage, heat_map

__all__ = ["Grid", "coverage_figure", "patch_grid", "pick_images"]

log = logging.getLogger(__name__)

_CAPTION_PX = 11  # caption font size
_GAP_PX = 4  # space between a patch and its companions, and around cells


@dataclass(frozen=True)
class Grid:
    """A drawn grid of patches.

    Attributes:
        image: the RGB picture.
        boxes: ``(left, top, right, bottom)`` of each main patch in ``image``, in batch order; each
            patch is enlarged ``zoom``× (nearest neighbour) so every pixel stays one solid block.
        captions: ``"<file name>\\ny=<y> x=<x>"`` under each patch.
        zoom: display pixels per patch pixel.
    """

    image: Image.Image
    boxes: tuple[tuple[int, int, int, int], ...]
    captions: tuple[str, ...]
    zoom: int


def _displayable(patch: np.ndarray, stretch: bool = False) -> Image.Image:
    """``(h, w, c)`` uint8/uint16 patch → RGB picture; ``stretch`` spreads label values over 0..255."""
    a = np.asarray(patch)
    if stretch and a.max() > 0:
        a = (a.astype(np.float64) * (255 / a.max())).astype(np.uint8)
    elif a.dtype == np.uint16:
        a = (a >> 8).astype(np.uint8)
    a = a.astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return Image.fromarray(a[..., :3])


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable built-in font
    except TypeError:
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text`` shortened with a leading ``…`` until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text


def patch_grid(patches: np.ndarray, source: Sequence[int], anchor: np.ndarray, files: Sequence[str],
               companions: Mapping[str, np.ndarray] | None = None, masks: Sequence[str] = (),
               min_cell_px: int = 128, columns: int | None = None) -> Grid:
    """Draw patches in a grid, each captioned with its file name and anchor.

    Args:
        patches: ``(B, P_h, P_w, C)`` host array (uint8 or uint16; C 1, 3 or 4).
        source, anchor: ``(B,)`` image indices into ``files`` and ``(B, 2)`` ``(y, x)`` top-left corners.
        companions: name → ``(B, h, w, c)`` host patches drawn right of each patch, at its display size.
        masks: companion names holding label values, stretched to 0..255 so they can be seen.
        min_cell_px: patches are enlarged by a whole factor to at least this many display pixels.
        columns: cells per row; default about square.
    """
    companions = dict(companions or {})
    count, ph, pw = patches.shape[:3]
    zoom = max(1, -(-min_cell_px // max(ph, pw)))
    cell_w = (pw * zoom + _GAP_PX) * (1 + len(companions)) - _GAP_PX
    font = _font(_CAPTION_PX)
    caption_h = 2 * (_CAPTION_PX + 3)
    cols = columns or max(1, int(np.ceil(np.sqrt(count))))
    rows = -(-count // cols)
    pitch_x, pitch_y = cell_w + 3 * _GAP_PX, ph * zoom + caption_h + 3 * _GAP_PX
    canvas = Image.new("RGB", (cols * pitch_x + _GAP_PX, rows * pitch_y + _GAP_PX), "white")
    draw = ImageDraw.Draw(canvas)
    boxes, captions = [], []
    for i in range(count):
        left, top = _GAP_PX * 2 + (i % cols) * pitch_x, _GAP_PX * 2 + (i // cols) * pitch_y
        size = (pw * zoom, ph * zoom)
        canvas.paste(_displayable(patches[i]).resize(size, Image.Resampling.NEAREST), (left, top))
        for k, (name, part) in enumerate(companions.items(), start=1):
            shown = _displayable(part[i], stretch=name in masks).resize(size, Image.Resampling.NEAREST)
            canvas.paste(shown, (left + k * (size[0] + _GAP_PX), top))
        boxes.append((left, top, left + size[0], top + size[1]))
        name = Path(files[int(source[i])]).name
        y, x = (int(v) for v in anchor[i])
        captions.append(f"{name}\ny={y} x={x}")
        text_top = top + size[1] + 2
        draw.text((left, text_top), _fit(draw, name, font, cell_w), fill="black", font=font)
        draw.text((left, text_top + _CAPTION_PX + 3), f"y={y} x={x}", fill="dimgray", font=font)
    return Grid(canvas, tuple(boxes), tuple(captions), zoom)


def pick_images(run: Provenance, count: int = 4) -> list[int]:
    """Indices of up to ``count`` images spread over the range of patches per image: the most
    sampled, the least sampled and evenly spaced ones between (so a never-sampled image shows)."""
    order = np.argsort(run.patches_per_image(), kind="stable")[::-1]
    picks = np.unique(np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(int))
    return [int(order[p]) for p in picks]


def _readable_under(path: str, root: str) -> str | None:
    """Why ``path`` is not drawn (outside ``root``, or not a regular file), or ``None``: a log names
    the images to draw, and a crafted one must not draw any file of the machine (nor block on a FIFO)."""
    if not root or root.startswith("s3://") or path.startswith("s3://"):
        return "it is not a local file under the log's data folder"
    path = _shard_of(path) or path  # a tar member: its shard must be a regular file under the root
    real, top = os.path.realpath(path), os.path.realpath(root)
    if real != top and not real.startswith(top.rstrip(os.sep) + os.sep):
        return f"it lies outside the log's data folder {root!r} (pass --images-from to review a moved data set)"
    try:
        mode = os.stat(real).st_mode
    except OSError as e:
        return str(e)
    why = not_regular(mode)
    return None if why is None else str(why)


def _shard_of(location: str) -> str | None:
    """The shard of a tar member's location (``shard.tar#member``), or ``None``."""
    shard, hash_, _ = location.partition("#")
    return shard if hash_ and shard.endswith(".tar") else None


def _thumbnail(path: str, exif: bool, max_px: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The image as the sampler saw it (EXIF-rotated when ``exif``) as RGB, shrunk to about
    ``max_px`` a side, and its full ``(height, width)``; a tar member is read from its shard."""
    with Image.open(io.BytesIO(item_bytes(path)) if _shard_of(path) else path) as opened:
        im: Image.Image = opened
        full_w = im.width
        im.draft("RGB", (max_px, max_px))  # JPEG: decode at 1/2..1/8 scale, fast for huge files
        factor = full_w / im.width
        im = ImageOps.exif_transpose(im) if exif else im
        if im.mode.startswith("I"):  # 16/32-bit grey: keep the top 8 bits
            im = Image.fromarray((np.asarray(im).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8))
        im = im.convert("RGB")
        size = (round(im.height * factor), round(im.width * factor))
        im.thumbnail((max_px, max_px))
        return np.asarray(im), size


def coverage_figure(run: Provenance, out: str | os.PathLike, images: int = 4, max_px: int = 512,
                    dpi: int = 100, images_from: str | None = None) -> dict[str, Any]:
    """Write a PNG: ``images`` sampled images with a heat map of where their patches were taken
    (:func:`~dali_patches.review.heat_map`, computed on a grid of ≤ ``max_px`` cells a side), and a
    histogram of patches per image with the :func:`~dali_patches.review.coverage` statistics.

    Only regular image files under the log's data folder (:attr:`Provenance.root`) are drawn under
    their heat maps; ``images_from`` names another folder holding the same relative paths (a moved
    data set). Others get the heat map alone, with a warning.

    Returns:
        ``coverage(run)`` plus ``shown``: the image indices drawn.
    """
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot state, no display needed
    except ImportError:
        msg = "the coverage figure needs matplotlib: pip install 'dali_patches[viz]'"
        raise ImportError(msg) from None
    stats = coverage(run)
    shown = pick_images(run, images)
    counts = run.patches_per_image()
    exif = bool(run.header.get("settings", {}).get("exif_orientation", True))
    fig = Figure(figsize=(4 * max(len(shown), 2), 8), dpi=dpi, layout="constrained")
    grid = fig.add_gridspec(2, max(len(shown), 1), height_ratios=(3, 2))
    vmax = 1
    maps = []
    for index in shown:
        h, w = int(run.heights[index]), int(run.widths[index])
        cell = max(1, -(-max(h, w) // max_px))
        maps.append((index, h, w, cell, heat_map(run, index, cell)))
        vmax = max(vmax, int(maps[-1][-1].max()))
    for col, (index, h, w, cell, heat) in enumerate(maps):
        ax = fig.add_subplot(grid[0, col])
        path, root = run.files[index], run.root
        if images_from is not None and root and not root.startswith("s3://"):
            path, root = os.path.join(images_from, os.path.relpath(path, root)), images_from
        refused = _readable_under(path, root)
        try:
            if refused is not None:
                raise OSError(refused)
            picture, (real_h, real_w) = _thumbnail(path, exif, max_px)
        except (OSError, Image.DecompressionBombError, ValueError) as e:  # the heat map alone still tells
            log.warning("drawing the heat map of %s without its image: %s", run.files[index], e)
        else:
            grey = picture.mean(axis=-1) / 255  # a grey, faded image lets the heat map stand out
            ax.imshow(0.35 + 0.5 * grey, extent=(0, real_w, real_h, 0), cmap="gray", vmin=0, vmax=1)  # padding stays blank
        masked = np.ma.masked_equal(heat, 0)
        im = ax.imshow(masked, extent=(0, heat.shape[1] * cell, heat.shape[0] * cell, 0), cmap="inferno",
                       alpha=0.8, vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_title(f"{Path(run.files[index]).name}\n{counts[index]} patches, {h}x{w}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if maps:
        fig.colorbar(im, ax=fig.axes, location="right", shrink=0.8, label="patches covering the pixel")
    hist = fig.add_subplot(grid[1, :])
    hist.hist(counts, bins=min(50, max(1, int(counts.max()) + 1)) if len(counts) else 1, color="tab:blue")
    hist.axvline(stats["patches_per_image_mean"], color="tab:red", linestyle="--", label="mean")
    hist.set_xlabel("patches per image")
    hist.set_ylabel("images")
    hist.legend()
    hist.set_title(f"{stats['patches']:,} patches in {stats['batches']:,} batches over {stats['images']:,} images: "
                   f"mean {stats['patches_per_image_mean']:.1f}, CV {stats['patches_per_image_cv']:.2f}, "
                   f"never sampled {stats['never_sampled']}, anchor χ²/dof {stats['anchor_chi2_per_dof']:.2f}",
                   fontsize=9)
    fig.savefig(out)
    return {**stats, "shown": shown}
