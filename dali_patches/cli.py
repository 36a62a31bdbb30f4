"""``dali-patches``: command-line entry point.

``dali-patches bench DIR`` measures the sampler on your data; ``dali-patches synth DIR`` writes
synthetic images to try it on. Exit codes: 0 success, 2 bad arguments or data (message on stderr),
1 an unexpected failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import sys
import time
from typing import Any

from tqdm.auto import tqdm

from .config import Device, parse_bytes

__all__ = ["main", "run_bench"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _versions() -> dict[str, str]:
    import numpy
    from nvidia import dali

    from . import __version__

    return {"dali_patches": __version__, "dali": dali.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


def _consumer(sampler: Any, via: str) -> Any:
    """A zero-argument callable that takes one batch through the chosen export path."""
    if via == "arrays":
        return lambda: next(sampler)
    if via == "dali":
        pipe = sampler.pipeline()
        return pipe.run
    from .torch import PatchIterator  # needs torch: imported only for --via torch

    iterator = iter(PatchIterator(sampler))
    return lambda: next(iterator)


def run_bench(source: Any, patch: int, batch: int, reuse: float, cache: str | int, device: str = "auto",
              seconds: float = 30.0, via: str = "dali", seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Stream patches for ``seconds`` after the cache is warm; return throughput and quality metrics."""
    from .pipeline import PatchSampler  # imported here: keeps `--help` fast

    t0 = time.perf_counter()
    with PatchSampler(source, patch_size=patch, batch_size=batch, reuse=reuse, cache_bytes=cache,
                      device=device, seed=seed, progress=progress) as sampler:
        take = _consumer(sampler, via)
        take()  # the first batch waits for the warm-up
        warmup_s = time.perf_counter() - t0
        start = sampler.stats()
        batches = 0
        t_start = time.perf_counter()
        with tqdm(total=round(seconds, 1), desc="sampling", unit="s", disable=not progress,
                  bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s {postfix}") as bar:
            elapsed = 0.0
            while elapsed < seconds:
                take()
                batches += 1
                now = time.perf_counter() - t_start
                bar.update(round(min(now, seconds) - elapsed, 3))
                elapsed = now
                if batches % 16 == 0:
                    bar.set_postfix_str(f"{batches * batch / elapsed:,.0f} patches/s")
        if sampler.backend.is_gpu:
            sampler.backend.xp.cuda.runtime.deviceSynchronize()
        elapsed = time.perf_counter() - t_start
        end = sampler.stats()
    return {
        "patches_per_s": batches * batch / elapsed,
        "decodes_per_s": (end["images_decoded"] - start["images_decoded"]) / elapsed,
        "distinct_fraction": end["distinct_fraction"],
        "mean_reuse": _window_reuse(start, end),
        "peak_rss_mb": _peak_rss_mb(),
        "batches": batches,
        "seconds": elapsed,
        "warmup_s": warmup_s,
        "resident_images": end["resident_images"],
        "files": end["files"],
        "skipped_files": end["skipped_files"],
        "decode_failed_batches": end["decode_failed_batches"],
        "config": {"patch": patch, "batch": batch, "reuse": reuse, "cache_bytes": parse_bytes(cache),
                   "device": end["device"], "via": via, "seed": seed},
        "versions": _versions(),
    }


def _window_reuse(start: dict[str, Any], end: dict[str, Any]) -> float:
    """Patches served per image decoded between two ``stats()`` snapshots (no warm-up bias)."""
    decoded = end["images_decoded"] - start["images_decoded"]
    return (end["patches_served"] - start["patches_served"]) / decoded if decoded else float("inf")


def _print_summary(r: dict[str, Any]) -> None:
    c = r["config"]
    lines = [
        (f"device {c['device']}, {r['files']} images ({r['skipped_files']} skipped), "
         f"{r['resident_images']} resident, warm-up {r['warmup_s']:.1f} s"),
        f"patches/s          {r['patches_per_s']:>12,.0f}   ({c['patch']}x{c['patch']}, batch {c['batch']}, via {c['via']})",
        f"decodes/s          {r['decodes_per_s']:>12,.1f}",
        f"distinct fraction  {r['distinct_fraction']:>12.3f}   (batches whose patches all come from different images)",
        f"mean reuse         {r['mean_reuse']:>12.2f}   (patches per decoded image; asked {c['reuse']})",
        f"peak RSS           {r['peak_rss_mb']:>12,.0f} MB",
    ]
    sys.stdout.write("\n".join(lines) + "\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dali-patches", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="measure patches/s, decodes/s, diversity and memory on a folder")
    b.add_argument("source", help="folder (searched recursively), glob, or single image")
    b.add_argument("--patch", type=int, default=64, help="patch size in pixels (square) [64]")
    b.add_argument("--batch", type=int, default=256, help="patches per batch [256]")
    b.add_argument("--reuse", type=float, default=32, help="mean patches per decoded image [32]")
    b.add_argument("--cache", default="2GiB", help="cache size, e.g. 512MiB, 2GiB [2GiB]")
    b.add_argument("--device", default="auto", choices=[d.value for d in Device], help="[auto]")
    b.add_argument("--seconds", type=float, default=30.0, help="timed streaming after warm-up [30]")
    b.add_argument("--via", default="dali", choices=["dali", "arrays", "torch"],
                   help="export path: DALI pipeline, plain arrays, or the PyTorch iterator [dali]")
    b.add_argument("--seed", type=int, default=0, help="[0]")
    b.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    b.add_argument("--no-progress", action="store_true", help="hide progress bars")

    s = sub.add_parser("synth", help="write synthetic photo-like images to try the sampler on")
    s.add_argument("folder")
    s.add_argument("--count", type=int, default=64, help="number of images [64]")
    s.add_argument("--size", default="1536x2048", help="HEIGHTxWIDTH (±25%% per image) [1536x2048]")
    s.add_argument("--format", default="jpg", choices=["jpg", "png"], help="[jpg]")
    s.add_argument("--seed", type=int, default=0, help="[0]")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "synth":
            from .synth import write_synthetic_images

            try:
                h, w = (int(v) for v in args.size.lower().split("x"))
            except ValueError:
                raise ValueError(f"--size {args.size!r} must look like 1536x2048 (HEIGHTxWIDTH)") from None
            paths = write_synthetic_images(args.folder, args.count, (h, w), seed=args.seed, fmt=args.format,
                                           progress=True)
            sys.stdout.write(f"wrote {len(paths)} images to {args.folder}\n")
            return 0
        result = run_bench(args.source, args.patch, args.batch, args.reuse, args.cache, args.device,
                           args.seconds, args.via, args.seed, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, TypeError) as e:
        sys.stderr.write(f"dali-patches: error: {e}\n")
        return 2
    _print_summary(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        sys.stdout.write(f"wrote {args.json}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
