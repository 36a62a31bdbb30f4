"""dali_patches: random patches from a bounded on-device cache of decoded images, fed by NVIDIA DALI.

Every batch holds patches of ``batch_size`` different images; each decoded image serves ``reuse``
patches on average, so throughput is ``reuse × decode rate`` while batches stay diverse.

The names below are imported on first use, so ``import dali_patches`` (and the header-scan worker
processes, which import only :mod:`dali_patches.catalog.columns`) does not load DALI; it only checks
that exactly one DALI wheel is installed (:mod:`dali_patches.flavour`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .flavour import require_dali

if TYPE_CHECKING:
    from .catalog.catalog import Catalog, CatalogWarning
    from .config import Device, SamplerConfig, format_bytes, parse_bytes
    from .engine.outputs import PatchBatch
    from .options import AnchorMode, Augment, Companion, CompanionKind, ImageChoice, Layout
    from .sampler import OUTPUT_NAMES, PatchSampler
    from .sources.base import Problem

_HOME = {
    "Catalog": "catalog.catalog", "CatalogWarning": "catalog.catalog",
    "Device": "config", "SamplerConfig": "config", "format_bytes": "config", "parse_bytes": "config",
    "AnchorMode": "options", "Augment": "options", "Companion": "options", "CompanionKind": "options",
    "ImageChoice": "options", "Layout": "options",
    "PatchBatch": "engine.outputs", "OUTPUT_NAMES": "sampler", "PatchSampler": "sampler", "Problem": "sources.base",
}

__all__ = [
    "AnchorMode", "Augment", "Catalog", "CatalogWarning", "Companion", "CompanionKind", "Device",
    "ImageChoice", "Layout", "OUTPUT_NAMES", "PatchBatch", "PatchSampler", "Problem", "SamplerConfig", "format_bytes", "parse_bytes",
]
__version__ = "0.1.0"
DALI = require_dali()  # which DALI wheel serves this package ("nvidia-dali-cuda130 2.4.0"); fails clearly if none


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
        globals()[name] = value
        return value
    msg = f"module 'dali_patches' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
