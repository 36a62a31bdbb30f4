"""The cache's size and contents, worked out from the data set before anything is allocated: the
parts each image takes, and the ring's slack rule, shared by the sampler's plan and the command
line's defaults."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ..catalog.screen import ALPHA_MODES
from ..config import SamplerConfig, format_bytes
from ..options import AnchorMode, CompanionKind, Part
from .backend import HostArray

__all__ = ["CachePlan", "cached_parts", "images_held", "plan_cache", "ring_bytes_for"]

# A ring holds n images for sure when it fits the n largest plus this many largest images of slack:
# one for the unusable tail at the wrap, one for the image being written.
_SLACK_IMAGES = 2


def ring_bytes_for(sizes: HostArray, images: int) -> int:
    """Bytes a ring needs to hold ``images`` of a data set whichever are drawn: the ``images``
    largest of ``sizes`` (each image's bytes with companions, sorted largest first) plus the slack."""
    return int(sizes[:images].sum()) + _SLACK_IMAGES * int(sizes[0])


def images_held(sample_bytes: HostArray, capacity_bytes: int) -> tuple[int, int]:
    """How many images a ring of ``capacity_bytes`` holds, from each image's bytes with companions.

    Returns:
        ``(at_least, typical)``: ``at_least`` fit whichever images are drawn (the largest ones, with
        the ring's slack); ``typical`` is ``capacity_bytes // mean image bytes``; both at most the
        number of images.
    """
    sizes = np.sort(np.asarray(sample_bytes, dtype=np.int64))[::-1]
    if not len(sizes):
        return 0, 0
    room = capacity_bytes - _SLACK_IMAGES * int(sizes[0])
    at_least = int(np.searchsorted(np.cumsum(sizes), room, side="right")) if room > 0 else 0
    typical = min(len(sizes), int(capacity_bytes // max(1, sizes.mean())))
    return min(at_least, len(sizes)), typical


@dataclass(frozen=True)
class CachePlan:
    """The ring's size, worked out from the data set before anything is allocated.

    Attributes:
        capacity_bytes: arena bytes.
        max_slots: slot-table size (``capacity_bytes // smallest image + 1``).
        warmup_images: images a full ring typically holds (the warm-up's length).
    """

    capacity_bytes: int
    max_slots: int
    warmup_images: int


# -- planning ----------------------------------------------------------------------------
def plan_cache(sample_bytes: HostArray, batch_size: int, shard_images: int, allow_repeats: bool,
         free_bytes: int, cache_bytes: int | None = None, cache_images: int | None = None,
         device: str = "cpu", largest: str = "") -> CachePlan:
    """Size the ring for a data set whose images take ``sample_bytes`` each (companions
    included); fail now, with the size needed, if it cannot serve ``batch_size`` distinct
    images or does not fit in ``free_bytes`` of device memory."""
    sizes = np.sort(np.asarray(sample_bytes, dtype=np.int64))[::-1]
    biggest = int(sizes[0])
    named = f" ({largest})" if largest else ""
    capacity = ring_bytes_for(sizes, cache_images) if cache_images is not None else int(cache_bytes or 0)
    if not allow_repeats:
        if shard_images < batch_size:
            msg = (f"batch_size={batch_size} distinct images are needed per batch but this shard has "
                   f"only {shard_images} images; lower batch_size or pass allow_repeats=True")
            raise ValueError(msg)
        needed = ring_bytes_for(sizes, batch_size)
        if capacity < needed:
            msg = (f"cache_bytes={format_bytes(capacity)} cannot hold batch_size={batch_size} distinct "
                   f"images of this data set (the largest takes {format_bytes(biggest)}{named}); it needs at least "
                   f"{format_bytes(needed)} ({needed} bytes). Raise cache_bytes, lower batch_size, "
                   "leave the largest images out, or pass allow_repeats=True")
            raise ValueError(msg)
    elif capacity < biggest:
        msg = (f"cache_bytes={format_bytes(capacity)} cannot hold even the largest image "
               f"({format_bytes(biggest)}{named}); raise cache_bytes to at least {biggest}")
        raise ValueError(msg)
    if capacity > free_bytes:
        why = f" (cache_images={cache_images} of the largest images{named})" if cache_images is not None else ""
        msg = (f"cache_bytes={format_bytes(capacity)}{why} exceeds the free {device} memory "
               f"({format_bytes(free_bytes)}); lower it, or leave the largest images out")
        raise ValueError(msg)
    return CachePlan(capacity, int(capacity // int(sizes[-1]) + 1), images_held(sizes, capacity)[1])


def cached_parts(config: SamplerConfig, modes: Sequence[str]) -> tuple[tuple[Part, ...], HostArray | None]:
    """What the cache holds per image: ``config.parts``, plus the main image's alpha (one channel of
    its dtype, named ``"alpha"``, never delivered) with ``anchors="content"`` when an image has
    transparency the decoder reads (``modes``: each image's Pillow mode); and ``(N,) bool``: which
    images have it (``None`` without the part)."""
    alpha = np.isin(np.asarray(modes), ALPHA_MODES) if config.anchors is AnchorMode.CONTENT and len(modes) else None
    if alpha is None or not alpha.any():
        return config.parts, None
    main = config.parts[0]
    opaque = 65535 if main.dtype == "uint16" else 255  # padding counts as opaque, as in images without alpha
    return (*config.parts, Part("alpha", Fraction(1), CompanionKind.MASK, 1, main.dtype, main.patch_hw, opaque)), alpha
