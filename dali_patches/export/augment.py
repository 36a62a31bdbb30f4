"""Augmentation: DALI ops on the sample pipeline's patch outputs, on the cache's device.

One random draw per patch (flip left-right, flip top-bottom, rotation by a multiple of 90°) is made
once and passed as an argument input to the op of *every* output, so an image, its target and its mask
stay aligned. Flips and rotations by multiples of 90° are exact pixel permutations (nearest-neighbour
rotation of a square patch by 90° is a transpose-and-flip; the tests check it against ``np.rot90``).
Normalisation and casts apply to image outputs only; masks keep their label values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nvidia.dali import fn, types

from ..options import Augment, CompanionKind, Layout, Part

__all__ = ["DALI_OUT_DTYPES", "augment_outputs", "output_dtype"]

DALI_OUT_DTYPES = {"float32": types.FLOAT, "float16": types.FLOAT16, "uint8": types.UINT8, "uint16": types.UINT16,
                   "int32": types.INT32}


def output_dtype(part: Part, augment: Augment) -> str:
    """The dtype name a patch output of ``part`` has after ``augment``."""
    if part.kind is CompanionKind.MASK:
        return part.dtype
    return augment.dtype or ("float32" if augment.normalize else part.dtype)


def _per_channel(values: tuple[float, ...], channels: int) -> list[float]:
    return list(values) * channels if len(values) == 1 else list(values)


def augment_outputs(patches: Sequence[Any], parts: Sequence[Part], augment: Augment) -> list[Any]:
    """Apply ``augment`` to the ``HWC`` patch outputs ``patches`` (one DALI node per part); returns
    the new nodes in the same order."""
    if not augment.active:
        return list(patches)
    hflip = fn.random.coin_flip(probability=0.5) if augment.hflip else 0
    vflip = fn.random.coin_flip(probability=0.5) if augment.vflip else 0
    angle = fn.random.uniform(values=[0.0, 90.0, 180.0, 270.0]) if augment.rot90 else None
    out = []
    for node, part in zip(patches, parts):
        if augment.hflip or augment.vflip:
            node = fn.flip(node, horizontal=hflip, vertical=vflip)
        if angle is not None:
            node = fn.rotate(node, angle=angle, interp_type=types.INTERP_NN, keep_size=True)
        image = part.kind is CompanionKind.IMAGE
        dtype = DALI_OUT_DTYPES[output_dtype(part, augment)]
        if image and augment.normalize:
            node = fn.crop_mirror_normalize(node, dtype=dtype, output_layout=augment.layout.value,
                                            mean=_per_channel(augment.mean or (0.0,), part.channels),
                                            std=_per_channel(augment.std or (1.0,), part.channels))
            out.append(node)
            continue
        if image and augment.dtype is not None:
            node = fn.cast(node, dtype=dtype)
        if augment.layout is Layout.CHW:
            node = fn.transpose(node, perm=[2, 0, 1], output_layout="CHW")
        out.append(node)
    return out
