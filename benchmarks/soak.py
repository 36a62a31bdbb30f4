"""Soak run: stream many patches and record host RSS (and GPU memory) over time; both must stay flat.

The warm-up is counted in reader epochs (``--warmup-epochs``, default 5): the cache fills in the
first, and on mixed sizes (JPEG, PNG, WebP up to 18 MP) the allocator's and DALI's pools keep
growing for a few epochs until every size has been seen, then stay on a plateau. After the
warm-up every sample must lie within ``--tolerance`` (default ±2 %) of the plateau (their median).
Prints the plateau and the verdict (``flat``, ``DRIFTED``, or ``too short`` when the run did not get
past the warm-up), writes JSON (every sample) and a PNG of memory over time; exits 1 if memory drifted.

    python benchmarks/soak.py [DIR] --patches 1000000 --device cpu --json soak.json --plot soak.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import current_rss_mb, image_source, versions, write_json

from dali_patches import PatchSampler


def _gpu_used_mb(sampler: PatchSampler) -> float | None:
    if not sampler.backend.is_gpu:
        return None
    free, total = sampler.backend.xp.cuda.runtime.memGetInfo()
    return (total - free) / 2**20


def soak(source: str, args: argparse.Namespace) -> dict[str, Any]:
    samples: list[tuple[float, int, float, float | None, float]] = []  # (s, patches, rss MiB, gpu MiB, epochs)
    with PatchSampler(source, patch_size=args.patch, batch_size=args.batch, reuse=args.reuse, cache_bytes=args.cache,
                      device=args.device, seed=0) as sampler:
        pipe = sampler.pipeline()
        batches = -(-args.patches // args.batch)
        start = time.perf_counter()
        next_sample = 0.0
        for i in tqdm(range(batches), desc="soak", unit="batch"):
            pipe.run()
            now = time.perf_counter() - start
            if now >= next_sample or i == batches - 1:
                samples.append((now, (i + 1) * args.batch, current_rss_mb(), _gpu_used_mb(sampler),
                                sampler.stats()["reader_epochs"]))
                next_sample = now + args.interval
        stats = sampler.stats()
    t = np.array([s[0] for s in samples])
    settled = np.array([s[4] for s in samples]) >= args.warmup_epochs
    verdict: dict[str, Any] = {}
    for key, column in (("rss", 2), ("gpu", 3)):
        values = np.array([s[column] for s in samples], dtype=float) if samples[0][column] is not None else None
        if values is None:
            continue
        if not settled.any():
            verdict[key] = {"flat": None, "warmup_mb": float(values[-1]), "start_mb": float(values[0]),
                            "end_mb": float(values[-1])}
            continue
        median = float(np.median(values[settled]))
        drift = float(np.max(np.abs(values[settled] - median)) / median * 100)
        verdict[key] = {"median_mb": median, "max_deviation_pct": drift, "flat": drift <= args.tolerance,
                        "warmup_mb": float(values[~settled][-1]) if (~settled).any() else float(values[0]),
                        "start_mb": float(values[0]), "end_mb": float(values[-1])}
    return {"samples": samples, "verdict": verdict, "seconds": float(t[-1]),
            "patches_per_s": samples[-1][1] / t[-1], "images_decoded": stats["images_decoded"],
            "reader_epochs": stats["reader_epochs"], "mean_reuse": stats["mean_reuse"],
            "distinct_fraction": stats["distinct_fraction"]}


def plot(result: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([s[1] / 1e6 for s in samples], [s[2] for s in samples], label="host RSS")
    if samples[0][3] is not None:
        ax.plot([s[1] / 1e6 for s in samples], [s[3] for s in samples], label="GPU memory used")
    ax.set(xlabel="patches served (millions)", ylabel="MiB", title=title)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", help="image folder; omitted: generate synthetic JPEGs")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--patches", type=int, default=1_000_000, help="patches to stream [1000000]")
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reuse", type=float, default=32)
    p.add_argument("--cache", default="512MiB")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples [0.5]")
    p.add_argument("--warmup-epochs", type=float, default=5.0,
                   help="reader epochs excluded as warm-up (cache fill, pools growing to every image size) [5]")
    p.add_argument("--tolerance", type=float, default=2.0, help="allowed deviation from the median, %% [2]")
    p.add_argument("--count", type=int, default=400, help="synthetic images to generate [400]")
    p.add_argument("--size", default="512x768", help="synthetic image HEIGHTxWIDTH [512x768]")
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args(argv)
    with image_source(args) as source:
        result = soak(source, args)
    title = f"soak: {args.patches:,} patches, reuse {args.reuse:g}, batch {args.batch}, {args.device}"
    print(f"{title}: {result['seconds']:.0f} s, {result['patches_per_s']:,.0f} patches/s, "
          f"{result['images_decoded']:,} decodes ({result['reader_epochs']:.1f} reader epochs)")
    for key, v in result["verdict"].items():
        if v["flat"] is None:
            print(f"{key}: too short to judge: the run ended within the {args.warmup_epochs:g}-epoch warm-up "
                  f"({v['start_mb']:,.0f} → {v['end_mb']:,.0f} MiB); stream more patches")
            continue
        print(f"{key}: plateau {v['median_mb']:,.0f} MiB after {args.warmup_epochs:g} reader epochs of warm-up "
              f"({v['start_mb']:,.0f} → {v['warmup_mb']:,.0f} MiB during it), max deviation from it "
              f"{v['max_deviation_pct']:.2f} % ({'flat' if v['flat'] else 'DRIFTED'}; ends at {v['end_mb']:,.0f} MiB)")
    if args.json:
        write_json(args.json, {"args": vars(args), "versions": versions(), **result})
    if args.plot:
        plot(result, args.plot, title)
    return 1 if any(v["flat"] is False for v in result["verdict"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
