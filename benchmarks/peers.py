"""dali_patches against the ways people cut random patches today: one script, one run, same images.

Methods (same files, patch size P and batch size B; each carries a source index to measure diversity):
  * ``tf_decode_crop``      tf.data: shuffle files → decode → random_crop → batch → prefetch (reference);
  * ``tf_multicrop@K``      the popular tf.data recipe: decode, K random crops, unbatch, shuffle buffer
                            of 50·K patches, batch, prefetch (K = each reuse value);
  * ``torch_dataloader``    PyTorch DataLoader (2 workers): Pillow decode + random crop;
  * ``dali_decode``         bare DALI readers.file → decoders.image at the sampler's decode batch
                            (decode rate only: the bound's reference);
  * ``dali_decode_crop``    DALI readers.file → decoders.image → crop: one full decode per patch;
  * ``dali_roi_decode``     DALI decoders.image_crop: decode only each patch's region;
  * ``dali_patches@R``      this library at reuse R, through its DALI sample pipeline
                            (``@warm``: a full cache that is never refilled).

For each: patches/s, its ratio to ``tf_decode_crop`` (or to ``dali_decode_crop`` without TF), decodes/s,
the fraction of batches whose patches all come from distinct images, the mean number of distinct images
per batch, and peak memory (RSS of the process plus PSS of its worker processes). dali_patches rows also
give the fraction of the ``reuse × decode rate`` bound reached, with decode rate the best of
``dali_decode`` and ``dali_decode_crop``. Every method runs in a child process of its own, so memory
figures are its own; a method whose framework is missing is skipped with a note. Writes a table, JSON
and a PNG plot (patches/s and distinct fraction against reuse / K).

    python benchmarks/peers.py [DIR] --patch 64 --batch 64 --reuse 1 8 32 128 --seconds 10 \\
        --json peers.json --plot peers.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import image_source, peak_rss, timed, versions, write_json

from dali_patches import Catalog, PatchSampler
from dali_patches.config import default_decode_batch
from dali_patches.engine.backend import resolve_backend

WARM = "warm"  # dali_patches@warm: reuse so high that the cache is never refilled
_WARM_REUSE = 1e12


class Skip(Exception):
    """The method cannot run here (its framework is missing); the message says why."""


# -- measuring -------------------------------------------------------------------------------
def _measure(step: Callable[[], np.ndarray], args: argparse.Namespace, patches_per_decode: float,
             warmup_steps: int = 3, sync: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Time ``step`` (one batch; returns its ``(B,)`` source indices) and summarise throughput,
    diversity and memory."""
    sources: list[np.ndarray] = []

    def one() -> None:
        sources.append(np.asarray(step()).ravel())

    with peak_rss() as rss:
        timing = timed(one, args.seconds, warmup_steps=warmup_steps, sync=sync)
    n = len(timing.steps)
    distinct = np.array([len(np.unique(s)) for s in sources[-n:]])
    rate = n * args.batch / timing.total_s
    return {"patches_per_s": rate, "decodes_per_s": rate / patches_per_decode,
            "distinct_fraction": float(np.mean(distinct == args.batch)),
            "mean_distinct_images": float(distinct.mean()), "peak_rss_mb": rss["peak_mb"],
            "step_median_ms": timing.median_s * 1e3, "step_iqr_ms": timing.iqr_s * 1e3, "batches": n}


# -- TensorFlow ------------------------------------------------------------------------------
def _tf_dataset(files: list[str], args: argparse.Namespace, crops: int | None) -> Any:
    try:
        import tensorflow as tf
    except ImportError as e:
        raise Skip("tensorflow is not installed (pip install tensorflow-cpu)") from e
    tf.random.set_seed(0)
    p, autotune = args.patch, tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_tensor_slices((files, np.arange(len(files), dtype=np.int64)))
    ds = ds.shuffle(len(files), seed=0, reshuffle_each_iteration=True).repeat()

    def decode(path: Any, source: Any) -> Any:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        if crops is None:
            return tf.image.random_crop(image, (p, p, 3)), source
        patches = tf.stack([tf.image.random_crop(image, (p, p, 3)) for _ in range(crops)])
        return patches, tf.fill([crops], source)

    ds = ds.map(decode, num_parallel_calls=autotune, deterministic=False)
    if crops is not None:
        ds = ds.unbatch().shuffle(50 * crops, seed=0)
    ds = ds.batch(args.batch, drop_remainder=True).prefetch(autotune)
    if args.device == "gpu":  # the trainer wants the batch on the GPU
        ds = ds.apply(tf.data.experimental.copy_to_device("/gpu:0")).prefetch(autotune)
    return ds


def _tf(files: list[str], args: argparse.Namespace, crops: int | None) -> dict[str, Any]:
    iterator = iter(_tf_dataset(files, args, crops))

    def step() -> np.ndarray:
        patches, source = next(iterator)
        _ = patches.shape  # materialised by the iterator
        return source.numpy()

    return _measure(step, args, patches_per_decode=crops or 1, warmup_steps=10)


# -- PyTorch ---------------------------------------------------------------------------------
def _torch_dataloader(files: list[str], args: argparse.Namespace) -> dict[str, Any]:
    try:
        import torch
        from torch.utils.data import DataLoader
    except ImportError as e:
        raise Skip("torch is not installed (pip install torch==2.13.0)") from e
    dataset = _PillowCrops(files, args.patch)
    gpu = args.device == "gpu"
    loader = DataLoader(dataset, batch_size=args.batch, shuffle=True, num_workers=2, drop_last=True,
                        persistent_workers=True, prefetch_factor=2, pin_memory=gpu,
                        worker_init_fn=_PillowCrops.seed_worker, generator=torch.Generator().manual_seed(0))
    batches = _forever(loader)

    def step() -> np.ndarray:
        patches, source = next(batches)
        if gpu:
            patches = patches.cuda(non_blocking=True)
        return source.numpy()

    sync = torch.cuda.synchronize if gpu else (lambda: None)
    return _measure(step, args, patches_per_decode=1, warmup_steps=5, sync=sync)


def _forever(loader: Any) -> Any:
    while True:
        yield from loader


class _PillowCrops:
    """Map-style dataset: index → (random ``(P, P, 3) uint8`` crop of the fully decoded image, index)."""

    rng = np.random.default_rng(0)

    def __init__(self, files: list[str], patch: int) -> None:
        self.files, self.patch = files, patch

    def __len__(self) -> int:
        return len(self.files)

    @staticmethod
    def seed_worker(worker_id: int) -> None:
        _PillowCrops.rng = np.random.default_rng(worker_id)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import torch
        from PIL import Image

        with Image.open(self.files[i]) as im:
            image = np.asarray(im.convert("RGB"))
        y = int(self.rng.integers(0, image.shape[0] - self.patch + 1))
        x = int(self.rng.integers(0, image.shape[1] - self.patch + 1))
        return torch.from_numpy(image[y: y + self.patch, x: x + self.patch].copy()), i


# -- DALI ------------------------------------------------------------------------------------
def _dali(files: list[str], args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """``kind``: ``decode`` (full decode only), ``decode_crop`` or ``roi_decode``."""
    from nvidia.dali import fn, pipeline_def, types

    backend = resolve_backend(args.device)
    batch = (args.decode_batch or default_decode_batch(backend)) if kind == "decode" else args.batch

    @pipeline_def(batch_size=batch, num_threads=args.threads, device_id=backend.dali_device_id,
                  prefetch_queue_depth=2, seed=0)
    def pipe_def():
        jpegs, labels = fn.readers.file(files=files, labels=list(range(len(files))), random_shuffle=True,
                                        initial_fill=len(files))
        pos_x, pos_y = fn.random.uniform(range=(0.0, 1.0)), fn.random.uniform(range=(0.0, 1.0))
        if kind == "roi_decode":
            return fn.decoders.image_crop(jpegs, device=backend.decoder_device, output_type=types.RGB,
                                          crop=(args.patch, args.patch), crop_pos_x=pos_x, crop_pos_y=pos_y), labels
        images = fn.decoders.image(jpegs, device=backend.decoder_device, output_type=types.RGB)
        if kind == "decode":
            return images, labels
        return fn.crop(images, crop=(args.patch, args.patch), crop_pos_x=pos_x, crop_pos_y=pos_y), labels

    pipe = pipe_def()
    pipe.build()

    def step() -> np.ndarray:
        _, labels = pipe.run()
        return np.asarray(labels.as_tensor())

    sync = _cuda_sync() if backend.is_gpu else (lambda: None)
    result = _measure(step, argparse.Namespace(**{**vars(args), "batch": batch}), patches_per_decode=1, sync=sync)
    if kind == "decode":  # a decode rate, not patches
        result.update(patches_per_s=None, distinct_fraction=None, mean_distinct_images=None)
    return result


def _cuda_sync() -> Callable[[], None]:
    import cupy

    return cupy.cuda.runtime.deviceSynchronize


def _dali_patches(files: list[str], args: argparse.Namespace, reuse: float) -> dict[str, Any]:
    with PatchSampler(files, patch_size=args.patch, batch_size=args.batch, reuse=reuse, cache_bytes=args.cache,
                      device=args.device, seed=0, num_threads=args.threads, decode_batch=args.decode_batch,
                      progress=False) as sampler:
        pipe = sampler.pipeline()
        sync = _cuda_sync() if sampler.backend.is_gpu else (lambda: None)
        pipe.run()  # waits for the cache warm-up
        before = sampler.stats()

        def step() -> np.ndarray:
            _, source, _ = pipe.run()
            return np.asarray(source.as_cpu().as_tensor() if sampler.backend.is_gpu else source.as_tensor())

        result = _measure(step, args, patches_per_decode=1, sync=sync)
        after = sampler.stats()
    # The producer runs a few batches ahead of the consumer; the ratio of its own counters is exact.
    decoded = after["images_decoded"] - before["images_decoded"]
    mean_reuse = (after["patches_made"] - before["patches_made"]) / decoded if decoded else None
    result.update(decodes_per_s=result["patches_per_s"] / mean_reuse if mean_reuse else 0.0,
                  mean_reuse=mean_reuse, resident_images=after["resident_images"],
                  duplicate_decodes=after["duplicate_decodes"] - before["duplicate_decodes"])
    return result


def run_method(name: str, files: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Run one method by name (see the module docstring) in this process."""
    family, _, value = name.partition("@")
    if family == "tf_decode_crop":
        return _tf(files, args, crops=None)
    if family == "tf_multicrop":
        return _tf(files, args, crops=int(value))
    if family == "torch_dataloader":
        return _torch_dataloader(files, args)
    if family.startswith("dali_") and family != "dali_patches":
        return _dali(files, args, family.removeprefix("dali_"))
    if family == "dali_patches":
        return _dali_patches(files, args, _WARM_REUSE if value == WARM else float(value))
    msg = f"unknown method {name!r}"
    raise ValueError(msg)


# -- the run ---------------------------------------------------------------------------------
def method_names(args: argparse.Namespace) -> list[str]:
    peers = ["tf_decode_crop"] + [f"tf_multicrop@{r:g}" for r in args.reuse if r >= 2] + ["torch_dataloader"]
    dali = ["dali_decode", "dali_decode_crop", "dali_roi_decode"]
    ours = [f"dali_patches@{r:g}" for r in args.reuse] + ([f"dali_patches@{WARM}"] if args.warm else [])
    names = (peers if args.peers else []) + dali + ours
    return [n for n in names if not args.only or any(n.startswith(prefix) for prefix in args.only)]


def build_parser(**defaults: Any) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="image folder; omitted: generate synthetic JPEGs")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--patch", type=int, default=64, help="patch side P in pixels [64]")
    p.add_argument("--batch", type=int, default=64, help="batch size B [64]")
    p.add_argument("--reuse", type=float, nargs="+", default=[1, 8, 32, 128],
                   help="dali_patches reuse values, also the K of tf_multicrop [1 8 32 128]")
    p.add_argument("--cache", default="2GiB", help="dali_patches cache [2GiB]")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per method [10]")
    p.add_argument("--threads", type=int, default=2, help="DALI worker threads [2]")
    p.add_argument("--decode-batch", type=int, default=None, help="dali_patches decode batch [library default]")
    p.add_argument("--no-peers", dest="peers", action="store_false", help="DALI and dali_patches only")
    p.add_argument("--no-warm", dest="warm", action="store_false", help="skip dali_patches@warm")
    p.add_argument("--only", nargs="+", metavar="PREFIX", help="run only the methods whose names start so")
    p.add_argument("--count", type=int, default=300, help="synthetic images to generate [300]")
    p.add_argument("--size", default="1536x2048", help="synthetic image HEIGHTxWIDTH [1536x2048]")
    p.add_argument("--json", help="write results here")
    p.add_argument("--plot", help="write a PNG plot here")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method, print its JSON
    p.set_defaults(**defaults)
    return p


def _child(args: argparse.Namespace, source: str, method: str) -> dict[str, Any]:
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("device", "patch", "batch", "cache", "seconds", "threads", "decode_batch") and v is not None]
    cmd = [sys.executable, __file__, source, "--one", method, *forwarded]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(("RESULT ", "SKIP ")):
            kind, _, payload = line.partition(" ")
            return json.loads(payload) if kind == "RESULT" else {"skipped": payload}
    return {"failed": done.stderr.strip()[-1500:] or f"exit {done.returncode}"}


def _add_ratios(results: dict[str, dict[str, Any]]) -> str:
    """Ratios to the reference method and the bound; returns the reference's name."""
    ok = {k: r for k, r in results.items() if "patches_per_s" in r}
    reference = "tf_decode_crop" if "tf_decode_crop" in ok else "dali_decode_crop"
    rates = [ok[k]["decodes_per_s"] for k in ("dali_decode", "dali_decode_crop") if k in ok]
    decode_rate = max(rates) if rates else None
    for name, r in ok.items():
        if r["patches_per_s"] is not None and reference in ok:
            r["ratio_to_reference"] = r["patches_per_s"] / ok[reference]["patches_per_s"]
        family, _, value = name.partition("@")
        if family == "dali_patches" and value != WARM and decode_rate:
            r["bound_patches_per_s"] = float(value) * decode_rate
            r["fraction_of_bound"] = r["patches_per_s"] / r["bound_patches_per_s"]
    return reference


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(results: dict[str, dict[str, Any]], reference: str) -> None:
    header = (f"{'method':<22}{'patches/s':>11}{'× ref':>8}{'decodes/s':>11}{'bound':>7}{'distinct':>10}"
              f"{'img/batch':>10}{'RSS MB':>9}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        if "skipped" in r or "failed" in r:
            print(f"{name:<22}  {'skipped' if 'skipped' in r else 'FAILED'}: {r.get('skipped') or r['failed']}")
            continue
        print(f"{name:<22}{_fmt(r['patches_per_s'], ',.0f'):>11}{_fmt(r.get('ratio_to_reference'), '.1f'):>8}"
              f"{_fmt(r['decodes_per_s'], ',.1f'):>11}{_fmt(r.get('fraction_of_bound'), '.2f'):>7}"
              f"{_fmt(r['distinct_fraction'], '.3f'):>10}{_fmt(r['mean_distinct_images'], '.1f'):>10}"
              f"{r['peak_rss_mb']:>9,.0f}")
    print(f"× ref = patches/s ÷ {reference}; bound = reuse × best DALI full-decode rate; "
          "distinct = batches whose patches all come from different images")


def plot(results: dict[str, dict[str, Any]], path: str, title: str, batch: int) -> None:
    """Patches/s (log) and distinct fraction against reuse / K; single-rate peers as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = {k: r for k, r in results.items() if r.get("patches_per_s") is not None}
    fig, (ax_rate, ax_div) = plt.subplots(1, 2, figsize=(12, 4.5))
    for family, style, color in (("dali_patches", "o-", "C0"), ("tf_multicrop", "s--", "C1")):
        points = sorted((float(k.split("@")[1]), r) for k, r in ok.items()
                        if k.startswith(family + "@") and not k.endswith(WARM))
        if points:
            xs = [x for x, _ in points]
            ax_rate.plot(xs, [r["patches_per_s"] for _, r in points], style, color=color, label=f"{family} (reuse / K)")
            ax_div.plot(xs, [r["distinct_fraction"] for _, r in points], style, color=color, label=family)
            ax_div.plot(xs, [r["mean_distinct_images"] / batch for _, r in points], style, color=color, alpha=0.4,
                        label=f"{family}: distinct images ÷ B")
    lines = [k for k in ok if "@" not in k]
    for i, name in enumerate(lines):
        color = f"C{i + 2}"
        ax_rate.axhline(ok[name]["patches_per_s"], color=color, ls=":", label=name)
        ax_div.axhline(ok[name]["distinct_fraction"], color=color, ls=":", label=name)
    if f"dali_patches@{WARM}" in ok:
        ax_rate.axhline(ok[f"dali_patches@{WARM}"]["patches_per_s"], color="k", ls="-.", label="dali_patches warm cache")
    ax_rate.set(xscale="log", yscale="log", xlabel="reuse (patches per decoded image) / K", ylabel="patches/s",
                title="throughput")
    ax_div.set(xscale="log", xlabel="reuse / K", ylabel="batches with all-distinct images (fraction)",
               ylim=(-0.05, 1.05), title="diversity")
    for ax in (ax_rate, ax_div):
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax_rate.legend(fontsize=7)
    ax_div.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None, **defaults: Any) -> int:
    args = build_parser(**defaults).parse_args(argv)
    if args.one:
        files = list(Catalog.scan(args.source, min_size=(args.patch, args.patch), progress=False).files)
        try:
            print("RESULT " + json.dumps(run_method(args.one, files, args)))
        except Skip as e:
            print(f"SKIP {json.dumps(str(e))}")
        return 0
    with image_source(args) as source:
        catalog = Catalog.scan(source, min_size=(args.patch, args.patch))
        mp = float(np.mean(catalog.heights * catalog.widths)) / 1e6
        title = (f"{len(catalog.files)} images, mean {mp:.2f} MP, device {args.device}, "
                 f"patch {args.patch}, batch {args.batch}")
        print(title)
        results = {}
        for method in method_names(args):
            r = results[method] = _child(args, source, method)
            if "decodes_per_s" not in r:
                done = next(iter(r.values()))
            elif r["patches_per_s"] is None:
                done = f"{r['decodes_per_s']:,.1f} decodes/s"
            else:
                done = f"{r['patches_per_s']:,.0f} patches/s"
            print(f"  {method}: {done}", flush=True)
    reference = _add_ratios(results)
    print_table(results, reference)
    if args.json:
        write_json(args.json, {"args": vars(args), "images": len(catalog.files), "mean_megapixels": mp,
                               "reference": reference, "versions": versions(), "results": results})
    if args.plot:
        plot(results, args.plot, title, args.batch)
    failed = [k for k, r in results.items() if "failed" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
