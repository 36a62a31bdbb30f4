"""dali_patches: random patches from a bounded on-device cache of decoded images, fed by NVIDIA DALI.

Every batch holds patches of ``batch_size`` different images; each decoded image serves ``reuse``
patches on average, so throughput is ``reuse × decode rate`` while batches stay diverse.
"""

from .catalog import Catalog, CatalogWarning
from .config import Device, SamplerConfig, format_bytes, parse_bytes
from .options import AnchorMode, Augment, Companion, CompanionKind, ImageChoice, Layout
from .outputs import PatchBatch
from .sampler import OUTPUT_NAMES, PatchSampler
from .sources import Problem

__all__ = [
    "AnchorMode",
    "Augment",
    "Catalog",
    "CatalogWarning",
    "Companion",
    "CompanionKind",
    "Device",
    "ImageChoice",
    "Layout",
    "OUTPUT_NAMES",
    "PatchBatch",
    "PatchSampler",
    "Problem",
    "SamplerConfig",
    "format_bytes",
    "parse_bytes",
]
__version__ = "0.1.0"
