"""The engine against its own bounds, in one process, as ratios.

  * ``floor``        the sampler's own DALI pipeline (``pipeline.build_pipeline``, the same
                     ``external_source``, device and stream) fed one constant batch: DALI's hand-over
                     floor for exactly our outputs; with and without ``no_copy``
  * ``warm_dali``    the warm cache (no refill) through ``sampler.pipeline()``        → ÷ floor
  * ``warm_arrays``  the warm cache as plain arrays (``next(sampler)``)                → ÷ copy bound
  * ``warm_direct``  the warm cache as torch tensors (``DirectIterator``, if torch is installed)
  * ``copy bound``   copy bandwidth ÷ bytes of one patch: ``np.copyto`` of 64 MiB on the CPU, a
                     device-to-device copy of 1 GiB on a GPU (each byte read once and written once,
                     as a gather does)
  * ``gather``       the gather alone (GPU: the kernel; CPU: the host pass) over one large table from
                     the warm cache, bytes out per second                                → ÷ copy bandwidth
  * ``bare_decode``  DALI ``readers.file → decoders.image`` alone, the sampler's decode batch
  * ``reuse R``      end to end through ``sampler.pipeline()``: patches/s ÷ (R × bare decode rate), and the
                     decode stage's rate while sampling ÷ bare decode rate
  * ``multi-crop K`` (``--multicrop``) the usual recipe on the same device: DALI decodes a batch once,
                     K crops are cut from each image (one gather), shuffled within what was decoded and
                     carried over to the next decode batch when they do not fill a batch, handed over
                     through the same DALI pipeline as ours; reported with its distinct images per batch

Every rate is timed with one device synchronisation at each end (``common.timed``).

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bare_decode_rate, device_sync, rate, timed, versions, write_json

from dali_patches import Catalog, PatchSampler
from dali_patches.config import SamplerConfig
from dali_patches.engine.backend import Backend, resolve_backend
from dali_patches.engine.gather import OVERREAD_BYTES, gather, patch_table
from dali_patches.engine.outputs import PatchBatch
from dali_patches.export.pipeline import build_pipeline


def _sampler(files: list[str], args: argparse.Namespace, reuse: float) -> PatchSampler:
    return PatchSampler(files, patch_size=args.patch, batch_size=args.batch, reuse=reuse, cache_bytes=args.cache,
                        device=args.device, num_threads=args.threads, progress=False)


def _constant(sampler: PatchSampler) -> PatchBatch:
    """A copy of the sampler's next batch that nothing else refers to (the floor's feed), taken
    without making the benchmark's thread a consumer the producer must wait for."""
    backend = sampler.backend
    batch = sampler.take(None)
    if not backend.is_gpu:
        return PatchBatch(batch.patches.copy(), batch.source.copy(), batch.anchor.copy(), 0)
    with backend.use(sampler._producer.stream):  # ordered after the gather that wrote it
        out = PatchBatch(batch.patches.copy(), batch.source.copy(), batch.anchor.copy(), 0,
                         device_source=batch.device_source.copy(), device_anchor=batch.device_anchor.copy())
    backend.synchronize(sampler._producer.stream)
    return out


def _floor(sampler: PatchSampler, constant: PatchBatch, args: argparse.Namespace, no_copy: bool) -> float:
    backend = sampler.backend
    pipe, _ = build_pipeline(lambda: constant, sampler.config, backend, backend.new_stream(), no_copy=no_copy)
    return rate(timed(pipe.run, args.seconds, warmup_steps=20, sync=device_sync(backend)), args.batch)


def _gather_bytes_per_s(sampler: PatchSampler, args: argparse.Namespace) -> float:
    """The gather alone: 64 rounds' worth of patches from the warm cache (anchors drawn here, with an
    RNG of its own), output bytes per second."""
    maker, backend = sampler._producer.maker, sampler.backend  # a benchmark may look inside
    cache, xp = maker.cache, backend.xp
    rng = np.random.default_rng(0)
    slots = rng.choice(cache.resident_slots(), 64 * args.batch * maker.round_batches)
    heights, widths = cache.sizes(slots)
    ys, xs = rng.integers(0, heights - args.patch + 1), rng.integers(0, widths - args.patch + 1)
    table = cache.table(0, slots, ys, xs)
    part = cache.parts[0]
    nbytes = len(table) * part.patch_bytes
    if backend.is_gpu:
        with backend.on_device():
            device_table, out = xp.asarray(table), xp.empty(nbytes, xp.uint8)

        def step() -> None:
            with backend.on_device():
                gather(xp, cache.arena, table, part.patch_hw, part.pixel_bytes, out, device_table)
    else:
        def step() -> None:
            gather(np, cache.arena, table, part.patch_hw, part.pixel_bytes)

    timing = timed(step, min(args.seconds, 3.0), warmup_steps=2, sync=device_sync(backend))
    return len(timing.steps) * nbytes / timing.total_s


def _copy_bandwidth(backend: Backend) -> float:
    """Bytes copied per second: each byte read once and written once."""
    if backend.is_gpu:
        xp = backend.xp
        with backend.on_device():
            src, dst = xp.ones(1 << 30, xp.uint8), xp.empty(1 << 30, xp.uint8)

        def step() -> None:
            with backend.on_device():
                dst[...] = src
    else:
        src, dst = np.ones(64 << 20, np.uint8), np.empty(64 << 20, np.uint8)

        def step() -> None:
            np.copyto(dst, src)

    timing = timed(step, 2.0, warmup_steps=2, sync=device_sync(backend))
    return len(timing.steps) * src.nbytes / timing.total_s


def _warm(files: list[str], args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    with _sampler(files, args, 1e12) as sampler:
        backend, sync = sampler.backend, device_sync(sampler.backend)
        constant = _constant(sampler)  # warm: no refill at this reuse
        out["floor"] = _floor(sampler, constant, args, no_copy=False)
        out["floor_no_copy"] = _floor(sampler, constant, args, no_copy=True)
        out["warm_arrays"] = rate(timed(lambda: next(sampler), args.seconds, warmup_steps=20, sync=sync), args.batch)
        for no_copy in (False, True):
            pipe = sampler.pipeline(no_copy=no_copy)
            key = "warm_dali_no_copy" if no_copy else "warm_dali"
            out[key] = rate(timed(pipe.run, args.seconds, warmup_steps=20, sync=sync), args.batch)
        out["gather_bytes_s"] = _gather_bytes_per_s(sampler, args)
        try:
            from dali_patches.torch import DirectIterator
        except ImportError:
            pass
        else:
            direct = iter(DirectIterator(sampler))
            out["warm_direct"] = rate(timed(lambda: next(direct), args.seconds, warmup_steps=20, sync=sync),
                                      args.batch)
        stats = sampler.stats()
        out["round_batches"] = stats["round_batches"]
        out["producer_us_per_batch"] = stats["producer_us_per_batch"]
        out["copy_bandwidth_bytes_s"] = _copy_bandwidth(backend)
    return out


def _multicrop_batches(files: list[str], args: argparse.Namespace, k: int, decode_batch: int, backend: Backend,
                       stream: Any, distinct: list[int]) -> Iterator[PatchBatch]:
    """The multi-crop recipe as batches: decode ``decode_batch`` images once, cut ``k`` random crops of
    each (one gather), shuffle the decoded set's crops, serve them ``B`` at a time; crops that do not
    fill a batch wait for the next decode batch's."""
    from nvidia.dali import fn, pipeline_def, types

    xp, p, b = backend.xp, args.patch, args.batch
    rng = np.random.default_rng(0)

    @pipeline_def(batch_size=decode_batch, num_threads=args.threads, device_id=backend.dali_device_id,
                  prefetch_queue_depth=2)
    def decode():
        jpegs, labels = fn.readers.file(files=files, labels=list(range(len(files))), random_shuffle=True)
        return fn.decoders.image(jpegs, device=backend.decoder_device, output_type=types.RGB), labels

    pipe = decode()
    pipe.build()
    carried: tuple[Any, np.ndarray] | None = None  # crops (n, P, P·3) and their sources, waiting for a batch
    index = 0
    while True:
        images, labels = pipe.run()
        labels = np.asarray(labels.as_cpu().as_tensor() if hasattr(labels, "as_cpu") else labels.as_tensor())
        with backend.use(stream):  # GPU work on the stream DALI copies on; never held across a yield
            arrays = [backend.as_array(images[i]) for i in range(decode_batch)]
            shapes = np.array([a.shape[:2] for a in arrays])
            offsets = np.concatenate([[0], np.cumsum([a.size for a in arrays])[:-1]])
            # the decoded set back to back, with the slack the gather may read past its last row
            flat = xp.concatenate([*(a.reshape(-1) for a in arrays), xp.asarray(np.zeros(OVERREAD_BYTES, np.uint8))])
            owner = rng.permutation(np.repeat(np.arange(decode_batch), k))  # the shuffle buffer's order
            ys, xs = rng.integers(0, shapes[owner, 0] - p + 1), rng.integers(0, shapes[owner, 1] - p + 1)
            crops = gather(xp, flat, patch_table(offsets[owner], shapes[owner, 1], ys, xs), (p, p), 3)
            sources = labels.reshape(-1)[owner]
            if carried is not None:
                crops, sources = xp.concatenate([carried[0], crops]), np.concatenate([carried[1], sources])
        backend.synchronize(stream)  # DALI's decoded views are read: they may go back to DALI now
        del arrays, images
        whole = len(sources) // b * b
        carried = (crops[whole:], sources[whole:])
        for j in range(0, whole, b):
            source = sources[j: j + b].astype(np.int64)
            distinct.append(len(np.unique(source)))
            anchor = np.zeros((b, 2), np.int32)
            if backend.is_gpu:
                with backend.use(stream):
                    device_source, device_anchor = xp.asarray(source), xp.asarray(anchor)
                batch = PatchBatch(crops[j: j + b].reshape(b, p, p, 3), source, anchor, index,
                                   device_source=device_source, device_anchor=device_anchor)
            else:
                batch = PatchBatch(crops[j: j + b].reshape(b, p, p, 3), source, anchor, index)
            index += 1
            yield batch


def _multicrop(files: list[str], args: argparse.Namespace, k: int, decode_batch: int) -> dict[str, float]:
    backend = resolve_backend(args.device)
    config = SamplerConfig(patch_size=args.patch, batch_size=args.batch, reuse=k, cache_bytes=1,
                           device=backend.device).resolved(backend.device)
    stream = backend.new_stream()
    distinct: list[int] = []
    batches = _multicrop_batches(files, args, k, decode_batch, backend, stream, distinct)
    pipe, _ = build_pipeline(lambda: next(batches), config, backend, stream)
    served = rate(timed(pipe.run, args.seconds, warmup_steps=3, sync=device_sync(backend)), args.batch)
    batches.close()
    return {"patches_per_s": served, "distinct_images_per_batch": float(np.mean(distinct)),
            "all_distinct_fraction": float(np.mean(np.array(distinct) == args.batch))}


def _end_to_end(files: list[str], args: argparse.Namespace, reuse: float) -> dict[str, float]:
    with _sampler(files, args, reuse) as sampler:
        pipe, sync = sampler.pipeline(), device_sync(sampler.backend)
        pipe.run()  # waits for the warm-up
        for _ in range(20):
            pipe.run()
        sync()
        start, t0 = sampler.stats(), time.perf_counter()
        batches = 0
        while time.perf_counter() - t0 < args.seconds:
            pipe.run()
            batches += 1
        sync()
        elapsed = time.perf_counter() - t0
        end = sampler.stats()
    decoded = end["images_decoded"] - start["images_decoded"]
    return {"patches_per_s": batches * args.batch / elapsed, "decodes_per_s": decoded / elapsed,
            "distinct_fraction": end["distinct_fraction"], "round_batches": end["round_batches"],
            "producer_us_per_batch": end["producer_us_per_batch"], "refill_us_per_batch": end["refill_us_per_batch"],
            "handover_us_per_batch": end["handover_us_per_batch"]}


def _rows(r: dict[str, Any], args: argparse.Namespace) -> list[tuple[str, float, str]]:
    patch_bytes = args.patch * args.patch * 3
    bound = r["copy_bandwidth_bytes_s"] / patch_bytes
    copy_name = "device-to-device copy" if args.device == "gpu" else "np.copyto"
    rows = [("DALI hand-over floor (our pipeline, constant)", r["floor"], "no_copy=False"),
            ("  floor, no_copy=True", r["floor_no_copy"], ""),
            ("warm cache, sampler.pipeline()", r["warm_dali"], f"{r['warm_dali'] / r['floor']:.2f} × floor"),
            ("warm cache, pipeline(no_copy=True)", r["warm_dali_no_copy"],
             f"{r['warm_dali_no_copy'] / r['floor_no_copy']:.2f} × its floor"),
            ("warm cache, plain arrays", r["warm_arrays"], f"{r['warm_arrays'] / bound:.2f} × copy bound")]
    if "warm_direct" in r:
        rows.append(("warm cache, torch DirectIterator", r["warm_direct"], f"{r['warm_direct'] / bound:.2f} × copy bound"))
    rows += [(f"copy bound ({copy_name} ÷ patch bytes)", bound, f"{r['copy_bandwidth_bytes_s'] / 1e9:.1f} GB/s"),
             ("gather alone (patches/s)", r["gather_bytes_s"] / patch_bytes,
              f"{r['gather_bytes_s'] / r['copy_bandwidth_bytes_s']:.2f} × copy bandwidth"),
             ("bare DALI decode (img/s)", r["bare_decode"], " / ".join(f"{v:.1f}" for v in r["bare_decode_runs"]))]
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
    return rows


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
            from dali_patches.cli.synth import write_synthetic_images

            h, w = (int(v) for v in args.size.split("x"))
            write_synthetic_images(tmp, args.count, (h, w), seed=0, fmt="mixed", progress=True)
            source = tmp
        catalog = Catalog.scan(source, min_size=(args.patch, args.patch))
        files = list(catalog.files)
        mp = catalog.heights * catalog.widths / 1e6
        decode_batch = args.decode_batch or (64 if args.device == "gpu" else 8)
        r: dict[str, Any] = {"images": len(files), "mean_mp": float(mp.mean()), "max_mp": float(mp.max())}
        r.update(_warm(files, args))
        bare = [bare_decode_rate(files, args.device, decode_batch, args.threads, args.seconds)]
        for reuse in args.reuse:
            r[f"reuse_{reuse:g}"] = _end_to_end(files, args, reuse)
            if args.multicrop:
                r[f"multicrop_{reuse:g}"] = _multicrop(files, args, int(reuse), decode_batch)
        bare.append(bare_decode_rate(files, args.device, decode_batch, args.threads, args.seconds))
        r["bare_decode"], r["bare_decode_runs"] = float(np.mean(bare)), bare
    print(f"{len(files)} images, {r['mean_mp']:.1f} MP mean (max {r['max_mp']:.1f}), P {args.patch}, B {args.batch}, "
          f"{args.device}, rounds of {r.get('round_batches', '?')} batches when warm")
    print(f"{'method':<46}{'patches/s':>12}  ratio")
    for name, value, note in _rows(r, args):
        print(f"{name:<46}{value:>12,.0f}  {note}")
    if args.json:
        write_json(args.json, {"args": vars(args), "versions": versions(), "results": r})
    return 0


if __name__ == "__main__":
    sys.exit(main())
