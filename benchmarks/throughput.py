"""Patches/s of dali_patches against DALI's own ways to get random patches, in one process and run.

Methods (same files, patch and batch size):
  * ``dali_decode_crop``  readers.file → decoders.image → crop: one full decode per patch (baseline);
  * ``dali_roi_decode``   readers.file → decoders.image_crop: decode only the patch's region;
  * ``dali_patches@R``    this library at reuse R, through its DALI sample pipeline.

Prints a table (patches/s, ratio to the baseline, distinct-source fraction, peak RSS) and the
``reuse × decode rate`` bound, where decode rate is the baseline's full decodes per second. Each
method runs in its own child process of this run (same files, one after the other), so that its peak
RSS is its own and not what earlier methods left in the allocator.

    python benchmarks/throughput.py [DIR] --device cpu --reuse 8 32 128 --seconds 10 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss, timed, versions, write_json  # noqa: E402

from dali_patches import Catalog, PatchSampler  # noqa: E402
from dali_patches.backend import resolve_backend  # noqa: E402
from dali_patches.synth import write_synthetic_images  # noqa: E402


def _distinct(labels: np.ndarray) -> bool:
    return len(np.unique(labels)) == len(labels)


def _dali_baseline(files: list[str], args: argparse.Namespace, roi: bool) -> dict[str, Any]:
    from nvidia.dali import fn, pipeline_def, types

    backend = resolve_backend(args.device)

    @pipeline_def(batch_size=args.batch, num_threads=args.threads, device_id=backend.dali_device_id,
                  prefetch_queue_depth=2, seed=0)
    def pipe_def():  # noqa: ANN202
        jpegs, labels = fn.readers.file(files=files, labels=list(range(len(files))), random_shuffle=True,
                                        initial_fill=len(files))
        pos_x, pos_y = fn.random.uniform(range=(0.0, 1.0)), fn.random.uniform(range=(0.0, 1.0))
        if roi:
            patches = fn.decoders.image_crop(jpegs, device=backend.decoder_device, output_type=types.RGB,
                                             crop=(args.patch, args.patch), crop_pos_x=pos_x, crop_pos_y=pos_y)
        else:
            images = fn.decoders.image(jpegs, device=backend.decoder_device, output_type=types.RGB)
            patches = fn.crop(images, crop=(args.patch, args.patch), crop_pos_x=pos_x, crop_pos_y=pos_y)
        return patches, labels

    pipe = pipe_def()
    pipe.build()
    distinct = []

    def step() -> None:
        patches, labels = pipe.run()
        distinct.append(_distinct(np.asarray(labels.as_tensor()).ravel()))
        if backend.is_gpu:
            patches.as_tensor()  # waits for the batch

    with peak_rss() as rss:
        timing = timed(step, args.seconds, warmup_steps=2)
    del pipe
    gc.collect()
    n = len(timing.steps)
    return {"patches_per_s": n * args.batch / timing.total_s, "decodes_per_s": n * args.batch / timing.total_s,
            "distinct_fraction": float(np.mean(distinct[-n:])), "peak_rss_mb": rss["peak_mb"],
            "step_median_ms": timing.median_s * 1e3, "step_iqr_ms": timing.iqr_s * 1e3}


def _ours(files: list[str], args: argparse.Namespace, reuse: float) -> dict[str, Any]:
    with peak_rss() as rss, PatchSampler(files, patch_size=args.patch, batch_size=args.batch, reuse=reuse,
                                          cache_bytes=args.cache, device=args.device, seed=0,
                                          num_threads=args.threads, decode_batch=args.decode_batch) as sampler:
        pipe = sampler.pipeline()
        sync = sampler.backend.xp.cuda.runtime.deviceSynchronize if sampler.backend.is_gpu else (lambda: None)
        pipe.run()  # waits for the cache warm-up
        before = sampler.stats()
        timing = timed(pipe.run, args.seconds, warmup_steps=2, sync=sync)
        after = sampler.stats()
    gc.collect()
    n = len(timing.steps)
    return {"patches_per_s": n * args.batch / timing.total_s,
            "decodes_per_s": (after["images_decoded"] - before["images_decoded"]) / timing.total_s,
            "distinct_fraction": after["distinct_fraction"], "mean_reuse": after["mean_reuse"],
            "peak_rss_mb": rss["peak_mb"], "step_median_ms": timing.median_s * 1e3,
            "step_iqr_ms": timing.iqr_s * 1e3, "resident_images": after["resident_images"]}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", help="image folder; omitted: generate synthetic JPEGs")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--reuse", type=float, nargs="+", default=[8, 32, 128])
    p.add_argument("--cache", default="1GiB")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per method")
    p.add_argument("--threads", type=int, default=2, help="DALI worker threads")
    p.add_argument("--count", type=int, default=300, help="synthetic images to generate")
    p.add_argument("--size", default="1536x2048", help="synthetic image HEIGHTxWIDTH")
    p.add_argument("--decode-batch", type=int, default=None, help="dali_patches decode batch [library default]")
    p.add_argument("--json", help="write results here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method, print its JSON
    return p


def _run_one(args: argparse.Namespace) -> int:
    files = list(Catalog.scan(args.source, min_size=(args.patch, args.patch), progress=False).files)
    if args.one in ("dali_decode_crop", "dali_roi_decode"):
        result = _dali_baseline(files, args, roi=args.one == "dali_roi_decode")
    else:
        result = _ours(files, args, float(args.one.split("@")[1]))
    print("RESULT " + json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.one:
        return _run_one(args)
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source
        if source is None:
            h, w = (int(v) for v in args.size.split("x"))
            source = tmp
            write_synthetic_images(tmp, args.count, (h, w), seed=0, progress=True)
        catalog = Catalog.scan(source, min_size=(args.patch, args.patch))
        files = list(catalog.files)
        mp = float(np.mean(catalog.heights * catalog.widths)) / 1e6
        print(f"{len(files)} images, mean {mp:.2f} MP, device {args.device}, patch {args.patch}, batch {args.batch}")
        results: dict[str, dict[str, Any]] = {}
        methods = ["dali_decode_crop", "dali_roi_decode"] + [f"dali_patches@{r:g}" for r in args.reuse]
        for method in methods:
            cmd = [sys.executable, __file__, source, "--one", method, "--device", args.device,
                   "--patch", str(args.patch), "--batch", str(args.batch), "--cache", str(args.cache),
                   "--seconds", str(args.seconds), "--threads", str(args.threads)]
            if args.decode_batch:
                cmd += ["--decode-batch", str(args.decode_batch)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode or not lines:
                print(f"{method} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                return 1
            results[method] = json.loads(lines[-1][len("RESULT "):])

    base = results["dali_decode_crop"]["patches_per_s"]
    decode_rate = results["dali_decode_crop"]["decodes_per_s"]
    header = f"{'method':<20}{'patches/s':>12}{'× baseline':>12}{'bound':>10}{'distinct':>10}{'reuse':>8}{'RSS MB':>9}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        r["ratio_to_baseline"] = r["patches_per_s"] / base
        reuse = float(name.split("@")[1]) if "@" in name else None
        if reuse is not None:
            r["bound_patches_per_s"] = reuse * decode_rate
            r["fraction_of_bound"] = r["patches_per_s"] / r["bound_patches_per_s"]
        bound = f"{r['fraction_of_bound']:.2f}" if reuse is not None else "-"
        mean_reuse = f"{r['mean_reuse']:.1f}" if "mean_reuse" in r else "-"
        print(f"{name:<20}{r['patches_per_s']:>12,.0f}{r['ratio_to_baseline']:>12.1f}{bound:>10}"
              f"{r['distinct_fraction']:>10.3f}{mean_reuse:>8}{r['peak_rss_mb']:>9,.0f}")
    print(f"bound = reuse × baseline decode rate ({decode_rate:.1f} img/s)")
    if args.json:
        write_json(args.json, {"args": vars(args), "images": len(files), "mean_megapixels": mp,
                               "versions": versions(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
