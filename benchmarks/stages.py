"""Time each stage of dali_patches on its own, to see where the time goes.

  * ``bare_dali``        DALI readers.file → decoders.image at each decode batch: img/s
  * ``decode_stage``     our DecodeStage (same DALI pipeline, consumed image by image): img/s
  * ``gather``           one batched gather from a warm cache (+ device sync): patches/s
  * ``warm_arrays``      whole producer path on a warm cache (no refill), plain arrays: patches/s
  * ``warm_dali``        the same through the DALI sample pipeline: patches/s
  * ``warm_torch``       the same through PatchIterator (if torch is installed): patches/s

    python benchmarks/stages.py [DIR] --device gpu --decode-batch 16 64 --batch 256 --json stages.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bare_decode_rate, device_sync, image_source, rate, timed, versions, write_json

from dali_patches import Catalog, PatchSampler
from dali_patches.engine.backend import resolve_backend
from dali_patches.engine.decode import DecodeStage
from dali_patches.sources import open_source


def _decode_stage(files: list[str], device: str, batch: int, threads: int, seconds: float) -> float:
    stage = DecodeStage(open_source(files), files, resolve_backend(device), batch_size=batch, num_threads=threads, seed=0)
    try:
        return rate(timed(stage.next, seconds, warmup_steps=2 * batch), 1)
    finally:
        stage.close()


def _warm(files: list[str], args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    with PatchSampler(files, patch_size=args.patch, batch_size=args.batch, reuse=1e12, cache_bytes=args.cache,
                      device=args.device, num_threads=args.threads) as sampler:
        backend = sampler.backend
        sync = device_sync(backend)
        next(sampler)  # warm: the producer now idles on a full queue (no refill at this reuse)
        maker = sampler._producer.maker  # a benchmark may look inside
        cache, draws, stream = maker.cache, maker.draws, backend.new_stream()

        def gather_once() -> None:  # one batch: draw, table, one gather
            d = draws.draw_round(cache, 1)
            cache.cut(0, cache.table(0, d.slots.reshape(-1), d.y.reshape(-1), d.x.reshape(-1)))

        with backend.use(stream):
            out["gather"] = rate(timed(gather_once, args.seconds, warmup_steps=5,
                                        sync=lambda: backend.synchronize(stream)), args.batch)
        out["warm_arrays"] = rate(timed(lambda: next(sampler), args.seconds, warmup_steps=5, sync=sync), args.batch)
        pipe = sampler.pipeline()
        out["warm_dali"] = rate(timed(pipe.run, args.seconds, warmup_steps=5, sync=sync), args.batch)
        try:
            from dali_patches.torch import PatchIterator

            iterator = iter(PatchIterator(sampler))
            out["warm_torch"] = rate(timed(lambda: next(iterator), args.seconds, warmup_steps=5, sync=sync),
                                      args.batch)
        except ImportError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", help="image folder; omitted: generate synthetic JPEGs")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--decode-batch", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--cache", default="1GiB")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--count", type=int, default=300)
    p.add_argument("--size", default="1536x2048")
    p.add_argument("--json")
    args = p.parse_args(argv)
    with image_source(args) as source:
        files = list(Catalog.scan(source, min_size=(args.patch, args.patch)).files)
        results: dict[str, Any] = {}
        for b in args.decode_batch:
            results[f"bare_dali_img_s@{b}"] = bare_decode_rate(files, args.device, b, args.threads, args.seconds)
            results[f"decode_stage_img_s@{b}"] = _decode_stage(files, args.device, b, args.threads, args.seconds)
        results.update({f"{k}_patches_s": v for k, v in _warm(files, args).items()})
    for key, value in results.items():
        print(f"{key:<32}{value:>14,.1f}")
    if args.json:
        write_json(args.json, {"args": vars(args), "versions": versions(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
