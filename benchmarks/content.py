"""``anchors="content"`` against ``anchors="uniform"`` on photos with flat areas, side by side in one run.

The data: a folder (``--data``), or by default ``--count`` synthetic photos of about ``--size`` with
about ``--flat`` of each image flat (``dali-patches synth --format mixed --flat``: studio backdrops,
skies, letterbox bars, slides), written once into the user's cache folder and kept. The two methods
alternate ``--repeats`` times, each with the same seed and settings; the table gives medians. The
reuse runs' cache must hold ``--batch`` distinct images (1 GiB holds about 37 of these 9 MP photos,
64 of the largest need 1.6 GiB), hence 2 GiB; the data set (2.6 GB decoded) is larger, so it refills.

  * ``flat fraction``  of the first ``--patches`` patches delivered (``next(sampler)``, from the first
                       batch on), the share whose luminance ``Y = 0.299 R + 0.587 G + 0.114 B``
                       (float64, computed here) has a standard deviation below ``--min-std``
  * ``patches/s``      ``next(sampler)`` as plain arrays at ``--reuse`` for ``--seconds``, after the
                       warm-up and the patches above; the ratio is content / uniform
  * ``warm patches/s`` the same from a cache that holds the whole data set (``cache_images`` = the
                       number of images) at ``reuse=1e12``: no refill after the warm-up, as the warm
                       cache of ``engine.py``; what is left is the draw, the exact check and the gather
  * ``map cost``       ``stats()["content"]``: ``map_s / maps`` (host seconds per image mapped, in the
                       reuse runs) against the time one DALI thread takes to decode an image,
                       ``num_threads / bare decode rate`` (``common.bare_decode_rate``, the sampler's
                       decode batch and threads, measured before and after the runs, averaged): the
                       map's cost as a share of the decode work it follows. ``map ÷ decode wall`` is
                       ``map_s / maps × bare rate``: the share of the decode stage's wall time per
                       image that the (single) producer thread spends mapping.

It also draws ``content_grid.png``: the first batch of each method (8 × 8 patches of repeat 1, same
seed), uniform left, content right.

    python benchmarks/content.py --seconds 15 --repeats 3
    python benchmarks/content.py --data /data/photos --json benchmarks/results/cpu_content_photos.json
    python benchmarks/content.py --quick          # smoke check, under 2 minutes: *_quick.json and .png
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bare_decode_rate, rate, timed, versions, write_json

from dali_patches import Catalog, PatchSampler
from dali_patches.sources.base import cache_folder

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("uniform", "content")
LUMA = np.array([0.299, 0.587, 0.114])


def data_folder(args: argparse.Namespace) -> str:
    """``--data``, or the synthetic set for these settings in the cache folder (written once)."""
    if args.data:
        return args.data
    from dali_patches.cli.synth import write_synthetic_images

    folder = cache_folder("bench", f"content_{args.count}_{args.size}_flat{args.flat:g}_mixed")
    if not os.path.isdir(folder):
        h, w = (int(v) for v in args.size.split("x"))
        partial = folder + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        write_synthetic_images(partial, args.count, (h, w), seed=0, fmt="mixed", progress=True, flat=args.flat)
        os.rename(partial, folder)
    return folder


def sampler(files: list[str], args: argparse.Namespace, method: str, reuse: float, **cache: Any) -> PatchSampler:
    content = {"min_std": args.min_std, "min_opaque": args.min_opaque} if method == "content" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warm cache holds all images, which the sampler rightly warns about
        return PatchSampler(files, patch_size=args.patch, batch_size=args.batch, reuse=reuse, device=args.device,
                            seed=args.seed, progress=False, index=False, anchors=method, **content, **cache)


def luma_std(patches: np.ndarray) -> np.ndarray:
    """``(B,)`` standard deviation of each patch's luminance, in float64."""
    return (patches[..., :3].astype(np.float64) @ LUMA).std(axis=(1, 2))


def run_reuse(files: list[str], args: argparse.Namespace, method: str) -> dict[str, Any]:
    """Flat fraction of the first ``--patches`` patches, then patches/s at ``--reuse``."""
    with sampler(files, args, method, args.reuse, cache_bytes=args.cache) as s:
        host, stds, first = s.backend.to_host, [], None
        t0 = time.perf_counter()
        while sum(map(len, stds)) < args.patches:
            batch = next(s)
            patches = host(batch.patches)
            if first is None:  # the first batch (the warm-up's) for the grid
                first = (patches.copy(), np.asarray(batch.source).copy(), np.asarray(batch.anchor).copy())
            stds.append(luma_std(patches))
        warm_up_s = time.perf_counter() - t0
        before = s.stats()
        timing = timed(lambda: next(s), args.seconds)
        stats = s.stats()
        std = np.concatenate(stds)
        return {"flat_fraction": float(np.mean(std < args.min_std)), "flat_fraction_below_2": float(np.mean(std < 2)),
                "patches_measured": len(std), "warm_up_s": warm_up_s, "patches_per_s": rate(timing, args.batch),
                "decodes_per_s": (stats["images_decoded"] - before["images_decoded"]) / timing.total_s,
                "content": stats.get("content", {}), "first": first, "files": s.files}


def run_warm(files: list[str], args: argparse.Namespace, method: str) -> dict[str, Any]:
    """Patches/s from a cache holding every image, with no refill after the warm-up."""
    with sampler(files, args, method, 1e12, cache_images=len(files)) as s:
        t0 = time.perf_counter()
        next(s)
        warm_up_s = time.perf_counter() - t0
        timing = timed(lambda: next(s), args.seconds, warmup_steps=20)
        stats = s.stats()
        return {"patches_per_s": rate(timing, args.batch), "warm_up_s": warm_up_s,
                "resident_images": stats["resident_images"], "content": stats.get("content", {})}


def grid_figure(firsts: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], files: tuple[str, ...],
                flat: dict[str, float], args: argparse.Namespace, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dali_patches.review.figures import patch_grid

    grids = {m: patch_grid(*(a[:64] for a in firsts[m]), files, min_cell_px=args.patch, columns=8).image
             for m in METHODS}
    width, height = grids["uniform"].size
    fig, axes = plt.subplots(1, 2, figsize=(2 * width / 100 + 0.5, height / 100 + 1.0), dpi=100)
    for ax, method in zip(axes, METHODS):
        ax.imshow(np.asarray(grids[method]))
        ax.set_title(f'anchors="{method}": {100 * flat[method]:.1f} % of patches with luminance std < '
                     f"{args.min_std:g}")
        ax.axis("off")
    fig.suptitle(f"first batch, seed {args.seed}, {args.patch}×{args.patch} patches")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def median(runs: list[dict[str, Any]], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a folder of images [synthetic photos with flat areas, cached]")
    p.add_argument("--count", type=int, default=96, help="synthetic images, at least --batch [96]")
    p.add_argument("--size", default="2600x3500", help="synthetic HEIGHTxWIDTH, ±25 %% (9 MP mean) [2600x3500]")
    p.add_argument("--flat", type=float, default=0.4, help="synthetic images' flat share of the area [0.4]")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reuse", type=float, default=32.0)
    p.add_argument("--cache", default="2GiB", help="cache of the reuse runs, at least --batch of the largest images "
                                                  "(1.6 GiB here) [2GiB]; warm runs hold every image")
    p.add_argument("--min-std", type=float, default=4.0)
    p.add_argument("--min-opaque", type=float, default=0.9)
    p.add_argument("--patches", type=int, default=2000, help="patches whose std is measured [2000]")
    p.add_argument("--seconds", type=float, default=15.0, help="timed seconds per method and run [15]")
    p.add_argument("--repeats", type=int, default=3, help="uniform/content alternations [3]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke check: 24 images of 1200x1600, batch 16, 256MiB, 2 s, 1 repeat, 512 patches")
    p.add_argument("--json", help="[benchmarks/results/DEVICE_content.json; --quick: DEVICE_content_quick.json]")
    p.add_argument("--figure", help="[benchmarks/results/content_grid.png; --quick: content_grid_quick.png]")
    args = p.parse_args(argv)
    if args.quick:
        args.count, args.size, args.batch, args.cache = 24, "1200x1600", 16, "256MiB"
        args.seconds, args.repeats, args.patches = 2.0, 1, 512
    tag = "_quick" if args.quick else ""
    args.json = args.json or str(RESULTS / f"{args.device}_content{tag}.json")
    args.figure = args.figure or str(RESULTS / f"content_grid{tag}.png")

    catalog = Catalog.scan(data_folder(args), min_size=(args.patch, args.patch))
    files = list(catalog.files)
    mp = catalog.heights * catalog.widths / 1e6
    print(f"{len(files)} images, {mp.mean():.1f} MP mean (max {mp.max():.1f}), P {args.patch}, B {args.batch}, "
          f"{args.device}, min_std {args.min_std:g}")
    with sampler(files, args, "uniform", args.reuse, cache_bytes=args.cache) as s:
        decode_batch, threads = s.config.decode_batch, s.config.num_threads
    bare = [bare_decode_rate(files, args.device, decode_batch, threads, args.seconds)]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"reuse": {m: [] for m in METHODS},
                                                         "warm": {m: [] for m in METHODS}}
    firsts, names = {}, ()
    for _ in range(args.repeats):
        for method in METHODS:
            r = run_reuse(files, args, method)
            first, names = r.pop("first"), r.pop("files")
            firsts.setdefault(method, first)
            runs["reuse"][method].append(r)
            runs["warm"][method].append(run_warm(files, args, method))
    bare.append(bare_decode_rate(files, args.device, decode_batch, threads, args.seconds))
    bare_rate = float(np.mean(bare))

    med = {kind: {m: {k: median(v, k) for k, val in v[0].items() if isinstance(val, (int, float))}
                  for m, v in by.items()} for kind, by in runs.items()}
    content = [r["content"] for r in runs["reuse"]["content"] if r["content"].get("maps")]
    map_s = float(np.median([c["map_s"] / c["maps"] for c in content])) if content else float("nan")
    decode_s = threads / bare_rate  # one DALI thread's time per image
    summary = {
        "flat_fraction": {m: med["reuse"][m]["flat_fraction"] for m in METHODS},
        "patches_per_s": {m: med["reuse"][m]["patches_per_s"] for m in METHODS},
        "ratio": med["reuse"]["content"]["patches_per_s"] / med["reuse"]["uniform"]["patches_per_s"],
        "warm_patches_per_s": {m: med["warm"][m]["patches_per_s"] for m in METHODS},
        "warm_ratio": med["warm"]["content"]["patches_per_s"] / med["warm"]["uniform"]["patches_per_s"],
        "map_ms_per_image": 1e3 * map_s, "decode_ms_per_image_per_thread": 1e3 * decode_s,
        "map_vs_decode_pct": 100 * map_s / decode_s, "map_vs_decode_wall_pct": 100 * map_s * bare_rate,
        "redrawn_per_checked": float(np.median([c["redrawn"] / max(1, c["checked"]) for c in content]))
        if content else float("nan"),
        "bare_decode_per_s": bare_rate, "bare_decode_runs": bare, "decode_batch": decode_batch, "threads": threads}

    f, t, w = summary["flat_fraction"], summary["patches_per_s"], summary["warm_patches_per_s"]
    print(f"{'':<34}{'uniform':>12}{'content':>12}{'ratio':>8}")
    print(f"{f'flat fraction (std < {args.min_std:g})':<34}{f['uniform']:>12.4f}{f['content']:>12.4f}")
    print(f"{f'patches/s, reuse {args.reuse:g}':<34}{t['uniform']:>12,.0f}{t['content']:>12,.0f}{summary['ratio']:>8.3f}")
    print(f"{'patches/s, warm cache':<34}{w['uniform']:>12,.0f}{w['content']:>12,.0f}{summary['warm_ratio']:>8.3f}")
    print(f"map {summary['map_ms_per_image']:.1f} ms/image; decode {summary['decode_ms_per_image_per_thread']:.0f} "
          f"ms/image/thread (bare {bare_rate:.1f} img/s, {threads} threads): map = "
          f"{summary['map_vs_decode_pct']:.1f} % of decode, {summary['map_vs_decode_wall_pct']:.1f} % of its wall "
          f"time; redrawn/checked {summary['redrawn_per_checked']:.3f}")

    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    grid_figure(firsts, names, summary["flat_fraction"], args, Path(args.figure))
    write_json(args.json, {"args": vars(args), "versions": versions(), "images": len(files),
                           "mean_mp": float(mp.mean()), "max_mp": float(mp.max()), "summary": summary,
                           "median": med, "runs": runs})
    print(f"wrote {args.json} and {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
