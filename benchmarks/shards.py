"""Tar shards against the same images as files, side by side in one run.

The images of a folder (or ``--count`` synthetic ones) are packed into WebDataset-style shards
(``shard-000000.tar`` …, ``--per-shard`` images each, written to a temporary folder); then a sampler
over the files and one over the shards stream patches with the same settings, alternating
``--repeats`` times, after each one's warm-up. Per reuse the table gives patches/s and decodes/s of
each, their ratio (shards / files), and the item bytes the shard reader read per patch against the
mean item size over ``reuse`` (reading whole members once per decode makes it 1 / reuse of an item).

    python benchmarks/shards.py /data/photos --reuse 2 16 --seconds 20 --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import image_source, versions, write_json

from dali_patches import PatchSampler
from dali_patches.sources import TarShards
from dali_patches.sources.listing import expand


def pack(files: list[str], folder: str, per_shard: int) -> list[str]:
    """Write ``files`` into shards of ``per_shard`` members (``KEY.<suffix>``), in order."""
    shards = []
    for start in range(0, len(files), per_shard):
        path = os.path.join(folder, f"shard-{start // per_shard:06d}.tar")
        with tarfile.open(path, "w") as tar:
            for i, file in enumerate(files[start:start + per_shard], start=start):
                data = Path(file).read_bytes()
                info = tarfile.TarInfo(f"{i:08d}{Path(file).suffix.lower()}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    return shards


def stream(source: Any, args: argparse.Namespace, reuse: float) -> dict[str, float]:
    """Patches and decodes per second over ``args.seconds`` after the warm-up, and the bytes a
    shard source read per patch in that time."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = PatchSampler(source, patch_size=args.patch, batch_size=args.batch, reuse=reuse,
                               cache_bytes=args.cache, device=args.device, seed=0, progress=False, index=False)
    with sampler:
        next(sampler)  # the warm-up
        shards = sampler.catalog.source if isinstance(sampler.catalog.source, TarShards) else None
        read0 = shards.bytes_read if shards else 0
        start, t0, batches = sampler.stats(), time.perf_counter(), 0
        while time.perf_counter() - t0 < args.seconds:
            next(sampler)
            batches += 1
        wall, end = time.perf_counter() - t0, sampler.stats()
        made = end["patches_made"] - start["patches_made"]
        out = {"patches_per_s": batches * args.batch / wall,
               "decodes_per_s": (end["images_decoded"] - start["images_decoded"]) / wall,
               "mean_item_bytes": float(np.mean(sampler.catalog.file_bytes))}
        if shards is not None:
            out["bytes_read_per_patch"] = (shards.bytes_read - read0) / made if made else float("nan")
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="a folder of images (default: --count synthetic ones)")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--size", default="2448x3264", help="synthetic image size HxW")
    p.add_argument("--per-shard", type=int, default=16)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reuse", type=float, nargs="+", default=[2.0, 16.0])
    p.add_argument("--cache", default="1GiB")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--repeats", type=int, default=2, help="files/shards alternations per reuse")
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    with image_source(args) as folder, tempfile.TemporaryDirectory() as tmp:
        files = sorted(expand(folder))
        shards = pack(files, tmp, args.per_shard)
        print(f"{len(files)} images ({sum(os.path.getsize(f) for f in files) / 2**20:,.0f} MiB) in {len(shards)} shards")
        for reuse in args.reuse:
            runs: dict[str, list[dict[str, float]]] = {"files": [], "shards": []}
            for _ in range(args.repeats):
                runs["files"].append(stream(folder, args, reuse))
                runs["shards"].append(stream(tmp, args, reuse))
            med = {k: {m: float(np.median([r[m] for r in v])) for m in v[0]} for k, v in runs.items()}
            rows.append({"reuse": reuse, "runs": runs, "median": med,
                         "ratio": med["shards"]["patches_per_s"] / med["files"]["patches_per_s"],
                         "expected_bytes_per_patch": med["shards"]["mean_item_bytes"] / reuse})
    print(f"{'reuse':>6} {'files p/s':>11} {'shards p/s':>11} {'ratio':>6} {'files dec/s':>11} {'shards dec/s':>12} "
          f"{'bytes/patch':>12} {'item/reuse':>11}")
    for r in rows:
        f, s = r["median"]["files"], r["median"]["shards"]
        print(f"{r['reuse']:>6g} {f['patches_per_s']:>11,.0f} {s['patches_per_s']:>11,.0f} {r['ratio']:>6.3f} "
              f"{f['decodes_per_s']:>11.1f} {s['decodes_per_s']:>12.1f} {s['bytes_read_per_patch']:>12,.0f} "
              f"{r['expected_bytes_per_patch']:>11,.0f}")
    if args.json:
        write_json(args.json, {"args": vars(args), "versions": versions(), "rows": rows})


if __name__ == "__main__":
    main()
