"""Patches/s of dali_patches against DALI's own ways to get random patches, in one run.

The DALI-only subset of ``peers.py`` (same code, same table) with the core engine's defaults:
batch 256, reuse 8/32/128, a 4 GiB cache. Methods:
  * ``dali_decode``       readers.file → decoders.image at the sampler's decode batch (decode rate);
  * ``dali_decode_crop``  readers.file → decoders.image → crop: one full decode per patch (baseline);
  * ``dali_roi_decode``   readers.file → decoders.image_crop: decode only the patch's region;
  * ``dali_patches@R``    this library at reuse R, through its DALI sample pipeline.

The table gives patches/s, the ratio to ``dali_decode_crop``, decodes/s, the fraction of the
``reuse × decode rate`` bound reached, distinct-source fraction and peak RSS. Each method runs in a
child process of its own.

    python benchmarks/throughput.py [DIR] --device cpu --reuse 8 32 128 --seconds 10 --json out.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers

if __name__ == "__main__":
    sys.exit(peers.main(batch=256, reuse=[8, 32, 128], cache="4GiB", peers=False, warm=False))
