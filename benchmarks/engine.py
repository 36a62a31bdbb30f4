"""The engine against its own bounds, in one process, as ratios (issue: engine v2).

  * ``floor``        a trivial DALI pipeline that only hands over constant arrays of the same three
                     outputs (``external_source``, batch=True): DALI's own hand-over floor
  * ``warm_dali``    the warm cache (no refill) through ``sampler.pipeline()``        → ÷ floor
  * ``warm_arrays``  the warm cache as plain arrays (``next(sampler)``)                → ÷ copy bound
  * ``warm_direct``  the warm cache as torch tensors (``DirectIterator``, if torch is installed)
  * ``copy bound``   ``np.copyto`` bandwidth of a 64 MiB buffer ÷ bytes of one patch
  * ``bare_decode``  DALI ``readers.file → decoders.image`` alone, the sampler's decode batch
  * ``reuse R``      end to end through ``sampler.pipeline()``: patches/s ÷ (R × bare decode rate), and the
                     decode stage's rate while sampling ÷ bare decode rate
  * ``multi-crop K`` (``--multicrop``) the usual recipe on the same device: DALI decodes a batch once,
                     K = R crops are cut from each image (one gather) and shuffled within the decoded
                     set; reported with its distinct images per batch beside ours

    python benchmarks/engine.py [DIR] --patch 64 --batch 64 --reuse 32 128 --seconds 15 --json engine.json

Without DIR it writes a photo-like set: 9 MP mean (up to ≈ 14 MP), 70 % baseline JPEG, 20 %
progressive, 10 % PNG (``dali-patches synth --format mixed``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bare_decode_rate, rate, timed, versions, write_json

from dali_patches import Catalog, PatchSampler
from dali_patches.backend import resolve_backend


def _floor(batch: int, patch: int, device: str, seconds: float) -> float:
    """DALI's hand-over floor: the same three outputs, constant arrays, nothing else."""
    from nvidia.dali import fn, pipeline_def, types

    backend = resolve_backend(device)
    xp = backend.xp
    outputs = (xp.zeros((batch, patch, patch, 3), xp.uint8), np.zeros(batch, np.int64), np.zeros((batch, 2), np.int32))

    @pipeline_def(batch_size=batch, num_threads=1, device_id=backend.dali_device_id, prefetch_queue_depth=2)
    def floor():
        return tuple(fn.external_source(source=lambda: outputs, num_outputs=3, batch=True, device=backend.op_device,
                                        dtype=[types.UINT8, types.INT64, types.INT32], layout=["HWC", "", ""],
                                        ndim=[3, 0, 1]))

    pipe = floor()
    pipe.build()
    return rate(timed(pipe.run, seconds, warmup_steps=5), batch)


def _copy_bound(patch_bytes: int) -> tuple[float, float]:
    src = np.ones(64 << 20, np.uint8)
    dst = np.empty_like(src)
    timing = timed(lambda: np.copyto(dst, src), 2.0, warmup_steps=2)
    bandwidth = len(timing.steps) * src.nbytes / timing.total_s
    return bandwidth, bandwidth / patch_bytes


def _multicrop(files: list[str], args: argparse.Namespace, k: int, decode_batch: int) -> dict[str, float]:
    """Decode ``decode_batch`` images once, cut ``k`` random crops of each, shuffle the crops of the
    decoded set and serve them in batches: the multi-crop + shuffle recipe, with the same gather."""
    from nvidia.dali import fn, pipeline_def, types

    from dali_patches.gather import gather, patch_table

    backend = resolve_backend(args.device)
    xp, p, b = backend.xp, args.patch, args.batch
    rng = np.random.default_rng(0)

    @pipeline_def(batch_size=decode_batch, num_threads=args.threads, device_id=backend.dali_device_id,
                  prefetch_queue_depth=2)
    def decode():
        jpegs, _ = fn.readers.file(files=files, random_shuffle=True)
        return fn.decoders.image(jpegs, device=backend.decoder_device, output_type=types.RGB)

    pipe = decode()
    pipe.build()
    served, distinct, t0 = 0, [], time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        (images,) = pipe.run()
        arrays = [backend.as_array(images[i]) for i in range(decode_batch)]
        shapes = np.array([a.shape[:2] for a in arrays])
        offsets = np.concatenate([[0], np.cumsum([a.size for a in arrays])[:-1]])
        flat = xp.concatenate([a.reshape(-1) for a in arrays])  # the decoded set, back to back
        owner = np.repeat(np.arange(decode_batch), k)
        ys = rng.integers(0, shapes[owner, 0] - p + 1)
        xs = rng.integers(0, shapes[owner, 1] - p + 1)
        order = rng.permutation(len(owner))  # the shuffle buffer: the decoded set's crops in random order
        table = patch_table(offsets[owner][order], shapes[owner, 1][order], ys[order], xs[order])
        crops = gather(xp, flat, table, (p, p), 3)
        for j in range(len(order) // b):
            distinct.append(len(np.unique(owner[order][j * b: (j + 1) * b])))
            served += b
        del crops
    if backend.is_gpu:
        xp.cuda.runtime.deviceSynchronize()
    elapsed = time.perf_counter() - t0
    return {"patches_per_s": served / elapsed, "distinct_images_per_batch": float(np.mean(distinct)),
            "all_distinct_fraction": float(np.mean(np.array(distinct) == b))}


def _sampler(files: list[str], args: argparse.Namespace, reuse: float) -> PatchSampler:
    return PatchSampler(files, patch_size=args.patch, batch_size=args.batch, reuse=reuse, cache_bytes=args.cache,
                        device=args.device, num_threads=args.threads, progress=False)


def _warm(files: list[str], args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    with _sampler(files, args, 1e12) as sampler:
        sync = sampler.backend.xp.cuda.runtime.deviceSynchronize if sampler.backend.is_gpu else (lambda: None)
        next(sampler)  # warm: no refill at this reuse
        out["warm_arrays"] = rate(timed(lambda: next(sampler), args.seconds, warmup_steps=20, sync=sync), args.batch)
        pipe = sampler.pipeline()
        out["warm_dali"] = rate(timed(pipe.run, args.seconds, warmup_steps=20, sync=sync), args.batch)
        try:
            from dali_patches.torch import DirectIterator
        except ImportError:
            return out
        direct = iter(DirectIterator(sampler))
        out["warm_direct"] = rate(timed(lambda: next(direct), args.seconds, warmup_steps=20, sync=sync), args.batch)
        stats = sampler.stats()
        out["round_batches"] = stats["round_batches"]
        out["producer_us_per_batch"] = stats["producer_us_per_batch"]
    return out


def _end_to_end(files: list[str], args: argparse.Namespace, reuse: float) -> dict[str, float]:
    with _sampler(files, args, reuse) as sampler:
        pipe = sampler.pipeline()
        pipe.run()  # waits for the warm-up
        for _ in range(20):
            pipe.run()
        start, t0 = sampler.stats(), time.perf_counter()
        batches = 0
        while time.perf_counter() - t0 < args.seconds:
            pipe.run()
            batches += 1
        elapsed = time.perf_counter() - t0
        end = sampler.stats()
    decoded = end["images_decoded"] - start["images_decoded"]
    return {"patches_per_s": batches * args.batch / elapsed, "decodes_per_s": decoded / elapsed,
            "distinct_fraction": end["distinct_fraction"], "round_batches": end["round_batches"],
            "producer_us_per_batch": end["producer_us_per_batch"], "refill_us_per_batch": end["refill_us_per_batch"],
            "handover_us_per_batch": end["handover_us_per_batch"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", help="image folder; omitted: generate a photo-like set")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--reuse", type=float, nargs="+", default=[32, 128])
    p.add_argument("--cache", default="2GiB")
    p.add_argument("--decode-batch", type=int, default=None, help="bare decode batch [the sampler's default]")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--count", type=int, default=48)
    p.add_argument("--size", default="2600x3500", help="HEIGHTxWIDTH of generated images (±25 %%)")
    p.add_argument("--multicrop", action="store_true", help="also run the multi-crop recipe at K = each reuse")
    p.add_argument("--json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        source = args.source
        if source is None:
            from dali_patches.synth import write_synthetic_images

            h, w = (int(v) for v in args.size.split("x"))
            write_synthetic_images(tmp, args.count, (h, w), seed=0, fmt="mixed", progress=True)
            source = tmp
        catalog = Catalog.scan(source, min_size=(args.patch, args.patch))
        files = list(catalog.files)
        mp = catalog.heights * catalog.widths / 1e6
        decode_batch = args.decode_batch or (64 if args.device == "gpu" else 8)
        r: dict[str, Any] = {"images": len(files), "mean_mp": float(mp.mean()), "max_mp": float(mp.max())}
        r["floor"] = _floor(args.batch, args.patch, args.device, args.seconds)
        r.update(_warm(files, args))
        r["copy_bandwidth_bytes_s"], r["copy_bound"] = _copy_bound(args.patch * args.patch * 3)
        bare = [bare_decode_rate(files, args.device, decode_batch, args.threads, args.seconds)]
        for reuse in args.reuse:
            r[f"reuse_{reuse:g}"] = _end_to_end(files, args, reuse)
            if args.multicrop:
                r[f"multicrop_{reuse:g}"] = _multicrop(files, args, int(reuse), decode_batch)
        bare.append(bare_decode_rate(files, args.device, decode_batch, args.threads, args.seconds))
        r["bare_decode"], r["bare_decode_runs"] = float(np.mean(bare)), bare
    rows = [("DALI hand-over floor (constant arrays)", r["floor"], ""),
            ("warm cache, sampler.pipeline()", r["warm_dali"], f"{r['warm_dali'] / r['floor']:.2f} × floor"),
            ("warm cache, plain arrays", r["warm_arrays"], f"{r['warm_arrays'] / r['copy_bound']:.2f} × copy bound"),
            ("copy bound (np.copyto ÷ patch bytes)", r["copy_bound"], f"{r['copy_bandwidth_bytes_s'] / 1e9:.1f} GB/s")]
    if "warm_direct" in r:
        rows.insert(3, ("warm cache, torch DirectIterator", r["warm_direct"], f"{r['warm_direct'] / r['copy_bound']:.2f} × copy bound"))
    rows.append(("bare DALI decode (img/s)", r["bare_decode"], " / ".join(f"{v:.1f}" for v in r["bare_decode_runs"])))
    for reuse in args.reuse:
        e = r[f"reuse_{reuse:g}"]
        note = (f"{e['patches_per_s'] / (reuse * r['bare_decode']):.2f} × bound; decode "
                f"{e['decodes_per_s'] / r['bare_decode']:.2f} × bare; distinct {e['distinct_fraction']:.3f}; "
                f"host µs/batch: producer {e['producer_us_per_batch']:.0f}, refill {e['refill_us_per_batch']:.0f}, "
                f"hand-over {e['handover_us_per_batch']:.0f}")
        rows.append((f"reuse {reuse:g} end to end", e["patches_per_s"], note))
        if args.multicrop:
            m = r[f"multicrop_{reuse:g}"]
            rows.append((f"multi-crop K={reuse:g} + shuffle", m["patches_per_s"],
                         f"{m['distinct_images_per_batch']:.1f} distinct images per batch of {args.batch}"))
    print(f"{len(files)} images, {r['mean_mp']:.1f} MP mean (max {r['max_mp']:.1f}), P {args.patch}, B {args.batch}, "
          f"{args.device}, rounds of {r.get('round_batches', '?')} batches when warm")
    print(f"{'method':<42}{'patches/s':>12}  ratio")
    for name, value, note in rows:
        print(f"{name:<42}{value:>12,.0f}  {note}")
    if args.json:
        write_json(args.json, {"args": vars(args), "versions": versions(), "results": r})
    return 0


if __name__ == "__main__":
    sys.exit(main())
