"""One frozen, validated configuration for a :class:`~dali_patches.PatchSampler`.

Every knob is checked here, at construction, so that a nonsense value fails before any file is read
or any memory is allocated, with a message that names the parameter, its value and the fix.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from typing import Any

import numpy as np

from .options import DTYPES as _DTYPES
from .options import AnchorMode, Augment, Companion, CompanionKind, Device, ImageChoice, Part, Reuse, enum_value, scaled
from .ranks import distributed_defaults
from .state import plain

__all__ = ["Device", "SamplerConfig", "default_decode_batch", "format_bytes",
           "parse_bytes", "parse_reuse"]

_DECODE_BATCH = {Device.GPU: 64, Device.CPU: 8}  # decode_batch=None resolves to at most this (see SamplerConfig) ...
# ... and to at most this many bytes of the largest decoded image per decode batch (CPU: measured, see
# default_decode_batch; GPU: a guess that keeps nvJPEG's batches at 28+ for 25 MP photos, not measured)
_DECODE_BATCH_BYTES = {Device.GPU: 2 * 2**30, Device.CPU: 96 * 2**20}
# Fields that do not change the stream of (source, anchor) and patches: a state saved under other
# values of them resumes exactly. Every other field is part of the resume fingerprint.
_NOT_IN_STREAM = frozenset({"num_threads", "queue_depth", "device_id", "augment", "hw_decoder_load"})

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_UNITS.update({"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12})
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: int | str, name: str = "cache_bytes") -> int:
    """``2147483648``, ``"2GiB"``, ``"512MiB"``, ``"1.5G"`` or ``"800MB"`` → a byte count (int)."""
    if isinstance(value, bool):
        msg = f"{name}={value!r} is not a size; pass bytes as an int or a string such as '2GiB'"
        raise TypeError(msg)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _BYTES_RE.match(value)
        unit = match.group(2).upper() if match else None
        if match and unit in _UNITS:
            return int(float(match.group(1)) * _UNITS[unit])
    msg = (
        f"{name}={value!r} is not a size; use an int of bytes or a number with a unit "
        "such as '512MiB', '2GiB' or '800MB'"
    )
    raise ValueError(msg)


def format_bytes(n: float) -> str:
    """A byte count for humans: ``2147483648`` → ``'2.00 GiB'``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


_MAX_DECODE_BATCH = 1024  # DALI holds about 3 decode batches of decoded images: beyond this, memory is the limit
_MAX_SEED = 2**63 - 1  # DALI's seeds are 64-bit signed
_THREADS_PER_CORE = 4  # num_threads beyond this many per core only adds threads


def parse_reuse(value: object, name: str = "reuse") -> float | Reuse:
    """A patches-per-decode figure: a finite number >= 1 (an int stays an int; a string of one is
    read as one), or ``"auto"`` (:attr:`Reuse.AUTO`) for ``reuse``."""
    if name == "reuse" and (value is Reuse.AUTO or (isinstance(value, str) and value.lower() == Reuse.AUTO.value)):
        return Reuse.AUTO
    if isinstance(value, str):
        try:
            value = int(value) if value.strip().isdigit() else float(value)
        except ValueError:
            pass
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
            or not math.isfinite(float(value)) or not float(value) >= 1:
        also = " or 'auto'" if name == "reuse" else ""
        msg = (f"{name}={value!r} must be a finite number >= 1{also} (patches served per decoded image; "
               "1 = decode per patch)")
        raise ValueError(msg)
    number = float(value)
    return int(number) if _is_int(value) else number


def _is_int(value: object) -> bool:
    """A Python or NumPy integer (not a bool)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _int(name: str, value: object, least: int = 1, most: int | None = None, hint: str = "") -> int:
    """``value`` as a Python int in ``[least, most]``; NumPy integers are accepted."""
    if not _is_int(value):
        kind = type(value).__name__
        msg = f"{name}={value!r} must be an int (got {kind}){hint}"
        raise ValueError(msg)
    number = int(value)  # type: ignore[call-overload]
    if number < least or (most is not None and number > most):
        bound = f"between {least} and {most}" if most is not None else f"at least {least}"
        msg = f"{name}={number} must be {bound}{hint}"
        raise ValueError(msg)
    return number


def _patch_hw(value: object) -> tuple[int, int]:
    pair = (value, value) if not isinstance(value, (tuple, list, np.ndarray)) else tuple(value)
    if len(pair) != 2 or not all(_is_int(v) and int(v) > 0 for v in pair):
        msg = (f"patch_size={value!r} must be a positive int or a (height, width) pair of positive ints, e.g. 64 "
               "or (64, 96)")
        raise ValueError(msg)
    return int(pair[0]), int(pair[1])


@dataclass(frozen=True)
class SamplerConfig:
    """What to sample and how much memory to spend on it. Frozen; validated in ``__post_init__``.

    Args:
        patch_size: patch height and width in pixels; an int means square. Output patches are
            ``(batch_size, patch_h, patch_w, channels)`` of ``dtype`` (default RGB ``uint8``).
        batch_size: patches per batch. With ``allow_repeats=False`` every batch comes from
            ``batch_size`` *distinct* images, so the cache must hold at least that many.
        reuse: mean number of patches served per decoded image. Throughput is about
            ``reuse × decode rate``; diversity across the run falls as ``reuse`` grows (each image is
            seen ``reuse`` times), diversity inside a batch does not. ``"auto"``
            (:class:`Reuse`): whatever the trainer's pace over the decoder's gives, within
            ``min_reuse`` and ``max_reuse`` (the stream then depends on timing).
        min_reuse: ``reuse="auto"``: fewest patches per decoded image; a trainer slower than
            ``min_reuse ×`` the decode rate pauses the decoder (1: it pauses only when every cached
            image would otherwise serve less than one patch).
        max_reuse: ``reuse="auto"``: most patches per decoded image (a staleness bound); a trainer
            faster than ``max_reuse ×`` the decode rate waits for decodes. ``None``: no bound, the
            trainer never waits once the cache is warm.
        cache_bytes: size of the decoded-image ring arena, in bytes (``"2GiB"`` accepted). More cache
            = more distinct images to draw each batch from, at that much device (GPU) or host (CPU)
            memory, plus a warm-up that decodes enough images to fill it.
        cache_images: alternative to ``cache_bytes``: size the arena to hold this many of the data
            set's largest images. Give exactly one of the two.
        device: :class:`Device` or its name.
        seed: seeds the reader's shuffle and the sampler's draws. Same seed, files, device and shard
            give the same ``(source, anchor)`` stream.
        allow_repeats: let a batch hold several patches of one image when fewer than ``batch_size``
            images are resident (small data sets, small caches). Off by default: such a set-up fails
            at construction with the cache it would need.
        decode_batch: images per batch of the DALI decode pipeline; ``None`` picks 8 on CPU (speed is
            flat from there, and each decoded batch in DALI's queue costs host memory) and 64 on GPU
            (nvJPEG needs large batches; benchmarks/RESULTS.md has the figures), fewer when a
            batch of the largest image would pass 96 MiB (CPU) or 2 GiB (GPU): 1 on CPU for
            25 MP photos (:func:`default_decode_batch`). Memory beyond the arena grows with
            ``decode_batch ×`` the largest image (``max_memory`` counts it).
        num_threads: DALI worker threads of both pipelines; ``None`` uses every core.
        queue_depth: finished batches the producer thread keeps ready for the trainer.
        channels: 3 (RGB, default) or 1 (grayscale); every file is converted to it by the decoder
            (CMYK, palette and grayscale sources included; alpha is dropped).
        dtype: ``"uint8"`` (default; 16-bit files are scaled down) or ``"uint16"`` (16-bit PNG/TIFF
            keep their precision, 8-bit files are scaled up); the cache holds pixels in this type.
        exif_orientation: apply each JPEG's EXIF orientation when decoding (default, as photo viewers
            do); ``False`` samples the stored pixel grid.
        pad: keep images smaller than the patch, zero-padded at the bottom and right up to it;
            ``False`` (default) skips them and lists them in ``Catalog.skipped``.
        device_id: CUDA device index (GPU mode); ``None``: the local rank (``LOCAL_RANK``), else 0.
        shard_id, num_shards: this process's part of the files (DALI reader sharding); ``None``:
            rank and world size of ``torch.distributed`` or of ``RANK``/``WORLD_SIZE`` (see
            :func:`distributed_defaults`), else one shard. Use the same ``seed`` on every rank: the
            reader's per-epoch shuffle must agree for shards to stay disjoint; the anchor draws
            differ per rank anyway (they are seeded with ``(seed, shard_id)``).
        companions: :class:`Companion` of each aligned partner (target, mask, twin); each costs its
            own bytes in the cache (a 2× twin: 4× the main image's) and one output.
        augment: :class:`Augment`, DALI ops on the sample pipeline's outputs (default: none).
        anchors: :class:`AnchorMode`; ``WEIGHTS`` and ``POS_NEG`` read the companion named
            ``anchor_mask`` (scale 1), ``POINTS`` needs ``points`` given to the sampler.
        pos_fraction: ``POS_NEG``: share of patches centred on mask > 0 (0.5 = as many as on 0).
        min_std: ``CONTENT``: least standard deviation of a patch's luminance ``0.299 R + 0.587 G +
            0.114 B`` on the 0–255 scale (16-bit values scaled to it); below 2 a patch looks flat.
        min_opaque: ``CONTENT``: least share of a patch's pixels that are opaque (alpha at least half
            its range), for images with an alpha channel (held in the cache for them: one more
            channel per image of the data set).
        image_choice: :class:`ImageChoice`, uniform per image (default) or weighted by area.
        hw_decoder_load: GPU: the share (0–1) of each decode batch that nvJPEG gives the hardware
            JPEG engine of A100/H100-class GPUs, the rest going to its CUDA decoder; ``None`` keeps
            DALI's default (0.65). The two may decode a file to slightly different pixels, so pin it
            where patches must match another decode bit for bit (the tests pin 0).
    """

    patch_size: tuple[int, int]
    batch_size: int
    reuse: float | Reuse
    cache_bytes: int | None = None
    cache_images: int | None = None
    device: Device = Device.AUTO
    seed: int = 0
    allow_repeats: bool = False
    decode_batch: int | None = None
    num_threads: int | None = None
    queue_depth: int = 2
    channels: int = 3
    dtype: str = "uint8"
    exif_orientation: bool = True
    pad: bool = False
    device_id: int | None = None
    shard_id: int | None = None
    num_shards: int | None = None
    companions: tuple[Companion, ...] = ()
    augment: Augment = field(default_factory=Augment)
    anchors: AnchorMode = AnchorMode.UNIFORM
    anchor_mask: str | None = None
    pos_fraction: float = 0.5
    min_std: float = 4.0
    min_opaque: float = 0.9
    image_choice: ImageChoice = ImageChoice.UNIFORM
    min_reuse: float = 1.0
    max_reuse: float | None = None
    hw_decoder_load: float | None = None
    parts: tuple[Part, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalise fields of a frozen dataclass once, here
        if None in (self.shard_id, self.num_shards, self.device_id):
            rank, world, local_rank = distributed_defaults()
            if self.shard_id is None and self.num_shards is None:
                set_(self, "shard_id", rank)
                set_(self, "num_shards", world)
            elif self.shard_id is None or self.num_shards is None:
                msg = f"give both shard_id and num_shards or neither (got {self.shard_id=}, {self.num_shards=})"
                raise ValueError(msg)
            if self.device_id is None:
                set_(self, "device_id", local_rank)
        set_(self, "patch_size", _patch_hw(self.patch_size))
        set_(self, "batch_size", _int("batch_size", self.batch_size))
        set_(self, "reuse", parse_reuse(self.reuse))
        set_(self, "min_reuse", parse_reuse(self.min_reuse, "min_reuse"))
        if self.max_reuse is not None:
            set_(self, "max_reuse", parse_reuse(self.max_reuse, "max_reuse"))
        if self.reuse is not Reuse.AUTO and (self.min_reuse != 1 or self.max_reuse is not None):
            msg = (f"min_reuse={self.min_reuse!r} and max_reuse={self.max_reuse!r} bound reuse='auto'; with a fixed "
                   f"reuse={self.reuse!r} leave them out")
            raise ValueError(msg)
        if self.max_reuse is not None and self.max_reuse < self.min_reuse:
            msg = f"max_reuse={self.max_reuse!r} is below min_reuse={self.min_reuse!r}; swap them"
            raise ValueError(msg)
        if (self.cache_bytes is None) == (self.cache_images is None):
            msg = (
                f"give exactly one of cache_bytes and cache_images (got {self.cache_bytes=}, "
                f"{self.cache_images=}); e.g. cache_bytes='2GiB'"
            )
            raise ValueError(msg)
        if self.cache_bytes is not None:
            set_(self, "cache_bytes", parse_bytes(self.cache_bytes, "cache_bytes"))
            if self.cache_bytes <= 0:
                msg = f"cache_bytes={self.cache_bytes!r} must be positive, e.g. '2GiB'"
                raise ValueError(msg)
        else:
            set_(self, "cache_images", _int("cache_images", self.cache_images))
        try:
            set_(self, "device", Device(self.device))
        except ValueError:
            msg = f"device={self.device!r} is not one of {[d.value for d in Device]}"
            raise ValueError(msg) from None
        set_(self, "seed", _int("seed", self.seed, 0, _MAX_SEED))
        if self.decode_batch is not None:
            set_(self, "decode_batch", _int("decode_batch", self.decode_batch, 1, _MAX_DECODE_BATCH,
                                            "; DALI keeps about 3 decode batches of decoded images in memory"))
        if self.num_threads is not None:
            most = _THREADS_PER_CORE * max(2, os.cpu_count() or 1)
            set_(self, "num_threads", _int("num_threads", self.num_threads, 1, most,
                                           f" ({_THREADS_PER_CORE} per core of this machine); None uses every core"))
        set_(self, "queue_depth", _int("queue_depth", self.queue_depth, 1, 4096))
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            msg = f"channels={self.channels!r} must be 3 (RGB) or 1 (grayscale)"
            raise ValueError(msg)
        if self.dtype not in _DTYPES:
            msg = f"dtype={self.dtype!r} must be one of {sorted(_DTYPES)}"
            raise ValueError(msg)
        for name in ("allow_repeats", "exif_orientation", "pad"):
            if not isinstance(getattr(self, name), bool):
                msg = f"{name}={getattr(self, name)!r} must be True or False"
                raise TypeError(msg)
        set_(self, "num_shards", _int("num_shards", self.num_shards))
        set_(self, "device_id", _int("device_id", self.device_id, 0))
        shards = int(self.num_shards or 1)
        shard = self.shard_id
        if shard is None or not _is_int(shard) or not 0 <= int(shard) < shards:
            msg = f"{self.shard_id=} must be in [0, {self.num_shards=})"
            raise ValueError(msg)
        set_(self, "shard_id", int(shard))
        if self.hw_decoder_load is not None:
            load = self.hw_decoder_load
            if isinstance(load, bool) or not isinstance(load, (int, float, np.integer, np.floating)) \
                    or not 0 <= float(load) <= 1:
                msg = f"hw_decoder_load={load!r} must be a share between 0 and 1 (or None for DALI's default)"
                raise ValueError(msg)
            set_(self, "hw_decoder_load", float(load))
        self._check_companions()
        self._check_sampling()
        main = Part("patches", Fraction(1), CompanionKind.IMAGE, self.channels, self.dtype, self.patch_size)
        set_(self, "parts", (main, *(Part(c.name, c.scale, c.kind, c.channels or self.channels,
                                          c.dtype or self.dtype, (scaled(self.patch_size[0], c.scale),
                                                                  scaled(self.patch_size[1], c.scale)))
                                     for c in self.companions)))
        for name in ("mean", "std"):
            values = getattr(self.augment, name)
            for part in self.parts:
                if values is not None and part.kind is CompanionKind.IMAGE and len(values) not in (1, part.channels):
                    msg = (f"Augment {name}={values} needs 1 or {part.channels} values for {part.name!r} "
                           f"(channels={part.channels})")
                    raise ValueError(msg)

    def resolved(self, device: Device, largest_bytes: int | None = None) -> SamplerConfig:
        """This config with every default worked out, once: ``device`` (``CPU`` or ``GPU``, as the
        backend chose it), ``decode_batch`` and ``num_threads``. Everything downstream reads these.
        ``largest_bytes`` (the largest image's decoded bytes with its companions, once the catalog
        is known) bounds the default ``decode_batch`` by memory (:func:`default_decode_batch`)."""
        if device is Device.AUTO:
            msg = "resolved() needs the concrete device the backend chose (cpu or gpu), not 'auto'"
            raise ValueError(msg)
        decode_batch = self.decode_batch or default_decode_batch(device, largest_bytes)
        return replace(self, device=device, decode_batch=decode_batch, num_threads=self.num_threads or os.cpu_count() or 1)

    def stream_fields(self) -> dict[str, Any]:
        """Every field that shapes the stream of batches, as plain JSON values: the part of a resume
        fingerprint that comes from the config (derived from the fields, so a new field is in it)."""

        return {f.name: plain(getattr(self, f.name)) for f in fields(self) if f.init and f.name not in _NOT_IN_STREAM}

    def _check_companions(self) -> None:
        companions = tuple(c if isinstance(c, Companion) else Companion(**c) for c in self.companions)
        companions = tuple(c.resolved(self.channels, self.dtype) for c in companions)
        object.__setattr__(self, "companions", companions)
        names = [c.name for c in companions]
        if len(set(names)) != len(names):
            msg = f"companion names must be unique, got {names}"
            raise ValueError(msg)
        step = self.anchor_step
        if any(p % step for p in self.patch_size):
            msg = (f"patch_size={self.patch_size} must be divisible by {step}: a companion at scale 1/{step} "
                   f"needs whole pixels; use e.g. patch_size={tuple(p - p % step or step for p in self.patch_size)}")
            raise ValueError(msg)
        if isinstance(self.augment, dict):
            object.__setattr__(self, "augment", Augment(**self.augment))
        if not isinstance(self.augment, Augment):
            msg = f"augment={self.augment!r} must be an Augment(...)"
            raise TypeError(msg)
        if self.augment.rot90 and self.patch_size[0] != self.patch_size[1]:
            msg = f"Augment(rot90=True) needs square patches, got {self.patch_size=}; use hflip/vflip instead"
            raise ValueError(msg)

    def _check_sampling(self) -> None:
        set_ = object.__setattr__
        set_(self, "anchors", enum_value(AnchorMode, self.anchors, "anchors"))
        set_(self, "image_choice", enum_value(ImageChoice, self.image_choice, "image_choice"))
        if isinstance(self.pos_fraction, bool) or not isinstance(self.pos_fraction, (int, float)) \
                or not 0 <= self.pos_fraction <= 1:
            msg = f"pos_fraction={self.pos_fraction!r} must be a number in [0, 1]"
            raise ValueError(msg)
        for name, most in (("min_std", 127.5), ("min_opaque", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= most:
                msg = f"{name}={value!r} must be a number in [0, {most}] (anchors='content')"
                raise ValueError(msg)
        if self.anchors is not AnchorMode.CONTENT and (self.min_std, self.min_opaque) != (4.0, 0.9):
            msg = (f"min_std={self.min_std!r} and min_opaque={self.min_opaque!r} are read with anchors='content' only; "
                   "pass anchors='content' or leave them out")
            raise ValueError(msg)
        if self.anchors in (AnchorMode.WEIGHTS, AnchorMode.POS_NEG):
            named = {c.name: c for c in self.companions}
            if self.anchor_mask not in named:
                msg = (f"anchors={self.anchors.value!r} reads a mask companion: set anchor_mask to one of "
                       f"{sorted(named) or 'your companions (none declared)'}, got {self.anchor_mask=}")
                raise ValueError(msg)
            if named[self.anchor_mask].scale != 1:
                msg = f"anchor_mask={self.anchor_mask!r} must have scale 1 (it has {named[self.anchor_mask].scale})"
                raise ValueError(msg)
        elif self.anchor_mask is not None:
            msg = f"anchor_mask={self.anchor_mask!r} is only read with anchors='weights' or 'pos_neg'"
            raise ValueError(msg)

    @property
    def anchor_step(self) -> int:
        """Anchors are multiples of this (1 unless a companion is smaller than the main image)."""
        return math.lcm(1, *(c.scale.denominator for c in self.companions))

    @property
    def pixel_bytes(self) -> int:
        """Bytes of one decoded pixel of the main image: ``channels × dtype`` size."""
        return self.parts[0].pixel_bytes

    @property
    def patch_bytes(self) -> int:
        """Bytes of one patch with all its companions, as gathered."""
        return sum(p.patch_bytes for p in self.parts)


def default_decode_batch(device: Device, largest_bytes: int | None = None) -> int:
    """``decode_batch=None``: the device's batch (8 on CPU, 64 on GPU), lowered so that one decode
    batch of the largest image (``largest_bytes``, decoded, with its companions) stays within 96 MiB
    on CPU (2 GiB of device memory on GPU); never below 1; the device's batch while
    ``largest_bytes`` is unknown. Host memory beyond the arena is about 480 MiB + 3.4 ×
    ``decode_batch`` × the largest image (``BatchMaker.max_memory``), so 96 MiB keeps it under
    ~0.8 GiB whatever the images: 1 for 25 MP photos, 2 for 9–12 MP, 8 up to 4 MP. A smaller batch
    decodes fewer images at once (benchmarks/RESULTS.md has the cost); a machine with cores and
    memory to spare gains from passing a larger ``decode_batch``."""
    most = _DECODE_BATCH[device]
    if not largest_bytes:
        return most
    return max(1, min(most, _DECODE_BATCH_BYTES[device] // int(largest_bytes)))
