"""What companions, weighted anchors and augmentation cost, side by side in one run.

Super-resolution-like data: LR JPEGs, their 2× HR twins (JPEG) and single-channel PNG masks
(synthetic, written to a temporary folder). Each configuration streams through the DALI sample
pipeline for ``--seconds``; the table gives patches/s, image rows decoded/s and the ratio to the
plain configuration:

  * ``plain``            LR images only, uniform anchors;
  * ``+hr_x2``           with the 2× twin (4× the LR bytes decoded, cached and cut per patch);
  * ``+mask``            with a single-channel PNG mask companion (uniform anchors);
  * ``+mask pos_neg``    the mask driving positive/negative anchors;
  * ``+hr_x2 augment``   twin plus flips, rot90, normalise to float CHW (DALI ops on both outputs).

    python benchmarks/companions.py --count 32 --size 768x1024 --batch 64 --reuse 32 --seconds 10 --json out.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import timed, versions, write_json

from dali_patches import Augment, PatchSampler
from dali_patches.cli.synth import synthetic_image


def _write_data(root: Path, count: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    for folder in ("lr", "hr", "mask"):
        (root / folder).mkdir()
    for i in range(count):
        hr = synthetic_image(2 * size[0], 2 * size[1], rng)
        Image.fromarray(hr).save(root / "hr" / f"{i:04d}.jpg", quality=90)
        Image.fromarray(hr).resize((size[1], size[0]), Image.Resampling.BICUBIC).save(root / "lr" / f"{i:04d}.jpg",
                                                                                      quality=90)
        mask = (synthetic_image(size[0], size[1], rng, channels=1)[..., 0] > 170).astype(np.uint8)
        Image.fromarray(mask, "L").save(root / "mask" / f"{i:04d}.png")


def _configs(root: Path) -> dict[str, dict]:
    pair = {"image": root / "lr", "hr": root / "hr"}
    return {
        "plain": {"source": root / "lr"},
        "+hr_x2": {"source": pair, "companions": {"hr": {"scale": 2}}},
        "+mask": {"source": {"image": root / "lr", "mask": root / "mask"}, "companions": {"mask": {"kind": "mask"}}},
        "+mask pos_neg": {"source": {"image": root / "lr", "mask": root / "mask"},
                          "companions": {"mask": {"kind": "mask"}}, "anchors": "pos_neg", "anchor_mask": "mask"},
        "+hr_x2 augment": {"source": pair, "companions": {"hr": {"scale": 2}},
                           "augment": Augment(hflip=True, vflip=True, rot90=True, mean=0, std=255, layout="CHW")},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--size", default="768x1024", help="LR size HxW (HR is twice that)")
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reuse", type=float, default=32)
    parser.add_argument("--cache", default="1GiB")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        _write_data(Path(tmp), args.count, size)
        for name, config in _configs(Path(tmp)).items():
            source = config.pop("source")
            with PatchSampler(source, patch_size=args.patch, batch_size=args.batch, reuse=args.reuse,
                              cache_bytes=args.cache, device=args.device, **config) as sampler:
                pipe = sampler.pipeline(num_threads=2)
                before = sampler.stats()
                timing = timed(pipe.run, args.seconds, warmup_steps=3)
                after = sampler.stats()
            steps = len(timing.steps)
            results[name] = {"patches_per_s": steps * args.batch / timing.total_s,
                             "rows_decoded_per_s": (after["images_decoded"] - before["images_decoded"]) / timing.total_s,
                             "median_batch_ms": timing.median_s * 1e3, "iqr_batch_ms": timing.iqr_s * 1e3,
                             "device": after["device"]}
    plain = results["plain"]["patches_per_s"]
    print(f"{'configuration':<18}{'patches/s':>12}{'× plain':>9}{'rows/s':>9}{'batch ms (IQR)':>18}")
    for name, r in results.items():
        print(f"{name:<18}{r['patches_per_s']:>12,.0f}{r['patches_per_s'] / plain:>9.2f}"
              f"{r['rows_decoded_per_s']:>9.1f}{r['median_batch_ms']:>10.2f} ({r['iqr_batch_ms']:.2f})")
    if args.json:
        write_json(args.json, {"args": vars(args), "results": results, "versions": versions()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
