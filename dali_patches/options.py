"""The vocabulary of a :class:`~dali_patches.config.SamplerConfig`: every mode as an Enum (the one
place for them), aligned companions, augmentation, and :class:`Part`, the resolved form of the main
image and of each companion that the cache, the gather and the outputs share.

Each is a frozen dataclass validated at construction, so a bad value fails before any file is read.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, cast

__all__ = ["AnchorMode", "Augment", "Companion", "CompanionKind", "DTYPES", "Device", "ImageChoice", "Layout", "Part",
           "RESERVED_NAMES", "Reuse", "enum_value", "scaled"]

DTYPES = {"uint8": 1, "uint16": 2}  # cached dtypes → bytes per channel
_OUT_DTYPES = ("float32", "float16", "uint8", "uint16", "int32")  # what Augment.dtype may cast to
RESERVED_NAMES = ("image", "patches", "source", "anchor")  # not usable as companion names


class Device(str, enum.Enum):
    """Where images are decoded, cached and cut.

    ``GPU``: nvJPEG (DALI ``mixed`` decoder) and a CuPy arena. ``CPU``: DALI's libjpeg-turbo decoder
    and a NumPy arena. ``AUTO``: GPU when CuPy sees a CUDA device, CPU otherwise.
    """

    AUTO = "auto"
    CPU = "cpu"
    GPU = "gpu"


class CompanionKind(str, enum.Enum):
    """What a companion holds. ``IMAGE``: pixels, decoded like the main image (its ``channels`` and
    ``dtype`` by default) and normalised with it. ``MASK``: labels or weights, decoded as stored
    grey values (1 channel, ``uint8`` by default), only flipped/rotated, never normalised."""

    IMAGE = "image"
    MASK = "mask"


class Layout(str, enum.Enum):
    """Axis order of the patch outputs: ``HWC`` (as cached) or ``CHW`` (PyTorch convention)."""

    HWC = "HWC"
    CHW = "CHW"


class AnchorMode(str, enum.Enum):
    """Where in a chosen image a patch is cut.

    ``UNIFORM``: every position equally likely. ``WEIGHTS``: patch centres drawn in proportion to the
    pixel values of a mask companion (``anchor_mask``). ``POS_NEG``: a ``pos_fraction`` of the
    patches is centred on a pixel where the mask is > 0, the rest where it is 0 (as MONAI's
    ``RandCropByPosNegLabel``). ``POINTS``: centred on user-given ``(file, y, x)`` points.
    ``CONTENT``: only informative patches — a luminance standard deviation of at least ``min_std``
    and at least ``min_opaque`` of it opaque: anchors uniform over the cells an image's coarse map
    (made as it enters the cache) proposes, then within the cell, and every patch tested exactly and
    drawn again until it passes.
    """

    UNIFORM = "uniform"
    WEIGHTS = "weights"
    POS_NEG = "pos_neg"
    POINTS = "points"
    CONTENT = "content"


class Reuse(str, enum.Enum):
    """``AUTO``: no fixed ``reuse``. The decoder runs flat out and every image it finishes enters the
    cache at once; the effective reuse is whatever the trainer's speed over the decoder's gives,
    within ``min_reuse`` (below it the decoder pauses) and ``max_reuse`` (past it the trainer
    waits). The stream then depends on timing."""

    AUTO = "auto"


class ImageChoice(str, enum.Enum):
    """How each batch picks its ``batch_size`` distinct resident images. ``UNIFORM``: every resident
    image equally likely (each decoded image serves ≈ ``reuse`` patches). ``AREA``: in proportion to
    the image's area, so every pixel of the data set is about equally likely to be in a patch (large
    images serve more patches per decode, small ones fewer; the mean stays ``reuse``)."""

    UNIFORM = "uniform"
    AREA = "area"


def _scale(value: object, name: str) -> Fraction:
    try:
        scale = Fraction(cast(Any, value)).limit_denominator(1000) if not isinstance(value, bool) else None
    except (TypeError, ValueError, ZeroDivisionError):
        scale = None
    if scale is None or scale <= 0 or (scale.numerator != 1 and scale.denominator != 1):
        msg = (f"companion {name!r}: scale={value!r} must be a whole number n or 1/n (its size over the main "
               "image's, e.g. 2 for a high-resolution twin of a low-resolution image, '1/2' for the reverse)")
        raise ValueError(msg)
    return scale


def enum_value(kind: type[enum.Enum], value: object, name: str) -> enum.Enum:
    try:
        return kind(value)
    except ValueError:
        msg = f"{name}={value!r} is not one of {[k.value for k in kind]}"
        raise ValueError(msg) from None


def scaled(value: Any, scale: Fraction) -> Any:
    """``value × scale`` rounded down, for an int or an integer array (sizes, anchors, offsets);
    ``value`` itself at scale 1. One place for the geometry of a companion at ``n`` or ``1/n``."""
    return value if scale == 1 else value * scale.numerator // scale.denominator


@dataclass(frozen=True)
class Companion:
    """An aligned partner of every image: a target, a mask or a twin at another resolution.

    It is decoded, cached (evicted with its image) and cut at the same anchor, scaled:
    the companion patch of a main patch ``(y, x, P_h, P_w)`` is ``(y·s, x·s, P_h·s, P_w·s)``.

    Args:
        name: its output name (``"target"``, ``"mask"``, …) and its key in a dict ``source``.
        scale: the companion's size over the main image's, ``n`` or ``1/n`` (``"1/2"``, ``0.5``).
            Each companion file must be exactly that size; with ``1/n`` anchors fall on multiples of
            ``n`` and ``patch_size`` must be divisible by ``n``.
        kind: :class:`CompanionKind` (``"image"`` or ``"mask"``).
        channels: decoded channels, 3 or 1; ``None``: the sampler's for images, 1 for masks.
        dtype: cached dtype, ``"uint8"`` or ``"uint16"``; ``None``: the sampler's for images,
            ``"uint8"`` for masks (label values kept as stored).
    """

    name: str
    scale: Fraction = Fraction(1)
    kind: CompanionKind = CompanionKind.IMAGE
    channels: int | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name in RESERVED_NAMES:
            msg = f"companion name {self.name!r} must be a Python identifier other than {RESERVED_NAMES}, e.g. 'target'"
            raise ValueError(msg)
        object.__setattr__(self, "scale", _scale(self.scale, self.name))
        object.__setattr__(self, "kind", enum_value(CompanionKind, self.kind, f"companion {self.name!r} kind"))
        if self.channels not in (None, 1, 3) or isinstance(self.channels, bool):
            msg = f"companion {self.name!r}: channels={self.channels!r} must be 3, 1 or None"
            raise ValueError(msg)
        if self.dtype is not None and self.dtype not in DTYPES:
            msg = f"companion {self.name!r}: dtype={self.dtype!r} must be one of {sorted(DTYPES)} or None"
            raise ValueError(msg)

    def resolved(self, channels: int, dtype: str) -> Companion:
        """This companion with ``channels``/``dtype`` filled in from the main image's."""
        mask = self.kind is CompanionKind.MASK
        return Companion(self.name, self.scale, self.kind, self.channels or (1 if mask else channels),
                         self.dtype or ("uint8" if mask else dtype))

    @property
    def pixel_bytes(self) -> int:
        return (self.channels or 3) * DTYPES[self.dtype or "uint8"]


def _per_channel(value: object, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = (value,) if isinstance(value, (int, float)) else tuple(value)  # type: ignore[arg-type]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        msg = f"{name}={value!r} must be a number or one number per channel, e.g. (123.7, 116.3, 103.5)"
        raise ValueError(msg)
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class Augment:
    """Augmentation applied by DALI ops in the sample pipeline, on the cache's device. Every
    geometric draw is shared by all outputs of a patch (image, target, mask stay aligned). All off
    by default.

    Args:
        hflip, vflip: mirror left-right / top-bottom with probability 1/2 each.
        rot90: rotate by a random multiple of 90° (square patches only); with both flips on, the
            eight symmetries of the square are equally likely.
        mean, std: normalise image outputs to ``(x - mean) / std`` per channel, in stored pixel
            units (0–255 for ``uint8``); gives ``float32`` unless ``dtype`` says otherwise. Masks
            are never normalised.
        dtype: cast image outputs to ``"float32"``, ``"float16"``, ``"uint8"``, ``"uint16"`` or
            ``"int32"``; ``None`` keeps the cached dtype (``float32`` when normalising).
        layout: :class:`Layout` of every patch output (``"HWC"`` or ``"CHW"``).
    """

    hflip: bool = False
    vflip: bool = False
    rot90: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dtype: str | None = None
    layout: Layout = Layout.HWC

    def __post_init__(self) -> None:
        for name in ("hflip", "vflip", "rot90"):
            if not isinstance(getattr(self, name), bool):
                msg = f"Augment {name}={getattr(self, name)!r} must be True or False"
                raise TypeError(msg)
        object.__setattr__(self, "mean", _per_channel(self.mean, "mean"))
        object.__setattr__(self, "std", _per_channel(self.std, "std"))
        if (self.mean is None) != (self.std is None):
            msg = f"give both mean and std or neither (got mean={self.mean}, std={self.std})"
            raise ValueError(msg)
        if self.std is not None and min(self.std) <= 0:
            msg = f"std={self.std} must be positive"
            raise ValueError(msg)
        if self.dtype is not None and self.dtype not in _OUT_DTYPES:
            msg = f"Augment dtype={self.dtype!r} must be one of {list(_OUT_DTYPES)} or None"
            raise ValueError(msg)
        object.__setattr__(self, "layout", enum_value(Layout, self.layout, "layout"))

    @property
    def normalize(self) -> bool:
        return self.mean is not None

    @property
    def active(self) -> bool:
        """Whether any DALI op is needed at all."""
        return self != Augment()


@dataclass(frozen=True)
class Part:
    """The main image (named ``patches``) or one companion, resolved: what is cached per image and
    cut per patch. The cache stores an image's parts back to back in one slot, in config order.

    Attributes:
        name: output name (``"patches"`` for the main image).
        scale: size over the main image's (``n`` or ``1/n``; 1 for the main image).
        kind: :class:`CompanionKind`.
        channels, dtype: decoded layout, e.g. 3 and ``"uint8"``.
        patch_hw: this part's patch ``(height, width)`` in its own pixels (the main patch × ``scale``).
        pad_value: what ``pad=True`` fills around a small image (0; an alpha channel's: opaque).
    """

    name: str
    scale: Fraction
    kind: CompanionKind
    channels: int
    dtype: str
    patch_hw: tuple[int, int]
    pad_value: int = 0

    @property
    def pixel_bytes(self) -> int:
        """Bytes of one pixel: ``channels × dtype`` size."""
        return self.channels * DTYPES[self.dtype]

    @property
    def row_bytes(self) -> int:
        """Bytes of one patch row."""
        return self.patch_hw[1] * self.pixel_bytes

    @property
    def patch_bytes(self) -> int:
        """Bytes of one patch of this part."""
        return self.patch_hw[0] * self.row_bytes

    @property
    def patch_shape(self) -> tuple[int, int, int]:
        """``(P_h, P_w, C)`` of one patch (HWC, as cut)."""
        return (*self.patch_hw, self.channels)

    def image_bytes(self, height: Any, width: Any) -> Any:
        """Bytes this part takes for a main image of ``height × width`` (ints or integer arrays)."""
        return scaled(height, self.scale) * scaled(width, self.scale) * self.pixel_bytes
