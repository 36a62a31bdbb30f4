"""What each ``dali-patches`` command does; :mod:`dali_patches.cli` parses the arguments.

Each ``cmd_*`` function takes the parsed arguments, prints its report (or JSON with ``--json``) and
returns the exit code; they raise ``ValueError``/``FileNotFoundError`` for bad arguments or data,
which the CLI turns into exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import format_bytes, parse_bytes

__all__ = ["cmd_bench", "cmd_coverage", "cmd_inspect", "cmd_preview", "cmd_synth", "run_bench"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _versions() -> dict[str, str]:
    import numpy
    from nvidia import dali

    from .. import __version__

    return {"dali_patches": __version__, "dali": dali.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


def _consumer(sampler: Any, via: str) -> Any:
    """A zero-argument callable that takes one batch through the chosen export path."""
    if via == "arrays":
        return lambda: next(sampler)
    if via == "dali":
        pipe = sampler.pipeline()
        return pipe.run
    from ..torch import PatchIterator  # needs torch: imported only for --via torch

    iterator = iter(PatchIterator(sampler))
    return lambda: next(iterator)


def run_bench(source: Any, patch: int, batch: int, reuse: float | str, cache: str | int, device: str = "auto",
              seconds: float = 30.0, via: str = "dali", seed: int = 0, progress: bool = True,
              **options: Any) -> dict[str, Any]:
    """Stream patches for ``seconds`` after the cache is warm; return throughput and quality metrics.
    ``options`` go to :class:`~dali_patches.PatchSampler` (``companions``, ``channels``, …)."""
    from ..sampler import PatchSampler  # imported here: keeps `--help` fast

    t0 = time.perf_counter()
    with PatchSampler(source, patch_size=patch, batch_size=batch, reuse=reuse, cache_bytes=cache,
                      device=device, seed=seed, progress=progress, **options) as sampler:
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
                    bar.set_postfix_str(f"{batches * batch / elapsed:,.0f} patches/s, {_live(sampler)}")
        if sampler.backend.is_gpu:
            sampler.backend.xp.cuda.runtime.deviceSynchronize()
        elapsed = time.perf_counter() - t_start
        end = sampler.stats()
    return {
        "patches_per_s": batches * batch / elapsed,
        "decodes_per_s": (end["images_decoded"] - start["images_decoded"]) / elapsed,
        "pace": {k: end[k] for k in _PACE_KEYS},
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
        "round_batches": end["round_batches"],
        "host_us_per_batch": {"producer": end["producer_us_per_batch"], "refill": end["refill_us_per_batch"],
                              "handover": end["handover_us_per_batch"]},
        "config": {"patch": patch, "batch": batch, "reuse": reuse, "cache_bytes": parse_bytes(cache),
                   "device": end["device"], "via": via, "seed": seed},
        "versions": _versions(),
    }


_PACE_KEYS = ("reuse", "effective_reuse", "effective_reuse_recent", "decoder_busy_fraction",
              "decoder_busy_fraction_recent", "consumer_wait_fraction", "consumer_wait_fraction_recent", "consumer_wait_s")


def _live(sampler: Any) -> str:
    """The progress bar's live figures: effective reuse and decoder busy over the last seconds."""
    stats = sampler.stats()
    return (f"reuse {stats.get('effective_reuse_recent', float('nan')):.1f}, decoder busy "
            f"{stats.get('decoder_busy_fraction_recent', float('nan')):.0%}")


def _window_reuse(start: dict[str, Any], end: dict[str, Any]) -> float:
    """Patches served per image decoded between two ``stats()`` snapshots (no warm-up bias)."""
    decoded = end["images_decoded"] - start["images_decoded"]
    return (end["patches_made"] - start["patches_made"]) / decoded if decoded else float("inf")


def _summary_text(r: dict[str, Any]) -> str:
    c = r["config"]
    lines = [
        (f"device {c['device']}, {r['files']} images ({r['skipped_files']} skipped), "
         f"{r['resident_images']} resident, warm-up {r['warmup_s']:.1f} s"),
        f"patches/s          {r['patches_per_s']:>12,.0f}   ({c['patch']}x{c['patch']}, batch {c['batch']}, via {c['via']})",
        f"decodes/s          {r['decodes_per_s']:>12,.1f}",
        f"distinct fraction  {r['distinct_fraction']:>12.3f}   (batches whose patches all come from different images)",
        f"mean reuse         {r['mean_reuse']:>12.2f}   (patches per decoded image; asked {c['reuse']})",
        (f"pace               decoder busy {r['pace']['decoder_busy_fraction']:.0%}, consumer waited "
         f"{r['pace']['consumer_wait_fraction']:.0%} of the time; last 5 s: reuse "
         f"{r['pace']['effective_reuse_recent']:.1f}, busy {r['pace']['decoder_busy_fraction_recent']:.0%}, "
         f"waited {r['pace']['consumer_wait_fraction_recent']:.0%}"),
        f"peak RSS           {r['peak_rss_mb']:>12,.0f} MB",
        (f"host µs per batch  producer {r['host_us_per_batch']['producer']:,.0f} (draw, gather, state; rounds of "
         f"{r['round_batches']}), refill {r['host_us_per_batch']['refill']:,.0f}, hand-over "
         f"{r['host_us_per_batch']['handover']:,.0f} (waits included)"),
    ]
    return "\n".join(lines) + "\n"


# -- options shared by the commands --------------------------------------------------------------
_COMPANION_KEYS = ("scale", "kind", "channels", "dtype")


def _companion(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``NAME=PATH[,scale=S][,kind=mask][,channels=C][,dtype=T]`` → name, path, Companion options."""
    name, sep, rest = spec.partition("=")
    path, *pairs = rest.split(",")
    if not sep or not name or not path:
        msg = f"--companion {spec!r} must look like NAME=PATH[,scale=2][,kind=mask], e.g. mask=data/masks,kind=mask"
        raise ValueError(msg)
    options: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in _COMPANION_KEYS or not value:
            msg = f"--companion {spec!r}: {pair!r} is not one of {', '.join(k + '=...' for k in _COMPANION_KEYS)}"
            raise ValueError(msg)
        options[key] = int(value) if key == "channels" and value.isdigit() else value
    return name, path, options


def _sampler_options(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The source and the :class:`~dali_patches.PatchSampler` keyword options the flags ask for."""
    specs = [_companion(s) for s in args.companion]
    index = False if args.index == "off" else args.index
    options: dict[str, Any] = {"channels": args.channels, "dtype": args.dtype, "pad": args.pad, "index": index,
                               "trust_index": args.trust_index}
    for bound in ("min_reuse", "max_reuse"):
        if getattr(args, bound, None) is not None:
            options[bound] = getattr(args, bound)
    if not specs:
        return args.source, options
    source = {"image": args.source, **{name: path for name, path, _ in specs}}
    return source, {**options, "companions": {name: opts for name, _, opts in specs}}


def _open_sampler(args: argparse.Namespace, **extra: Any) -> Any:
    """The :class:`~dali_patches.PatchSampler` that the data and streaming flags describe."""
    from ..sampler import PatchSampler

    source, options = _sampler_options(args)
    return PatchSampler(source, patch_size=args.patch, batch_size=args.batch, reuse=args.reuse, cache_bytes=args.cache,
                        device=args.device, seed=args.seed, progress=not args.no_progress, **options, **extra)


def _emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    """Print the text report (unless ``--json`` without a path) and write ``--json``."""
    if args.json == "-":
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    sys.stdout.write(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        sys.stdout.write(f"wrote {args.json}\n")


# -- commands -----------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    source, options = _sampler_options(args)
    result = run_bench(source, args.patch, args.batch, args.reuse, args.cache, args.device, args.seconds, args.via,
                       args.seed, progress=not args.no_progress, **options)
    _emit(args, result, _summary_text(result))
    return 0


def _inspect_report(args: argparse.Namespace) -> dict[str, Any]:
    """Scan the data set's headers and summarise it (formats, sizes, problems, cache capacity)."""
    from ..catalog.catalog import Catalog
    from ..config import SamplerConfig
    from ..engine.cache import images_held
    from ..sources import open_source

    spec, options = _sampler_options(args)
    source = open_source(spec, options.get("companions"))
    config = SamplerConfig(patch_size=args.patch, batch_size=1, reuse=1, cache_bytes=args.cache,
                           channels=options["channels"], dtype=options["dtype"], pad=options["pad"],
                           companions=source.companions)
    t0 = time.perf_counter()
    catalog = Catalog.scan(source, min_size=config.patch_size, progress=not args.no_progress, pad=config.pad,
                           check=False, index=options["index"], trust_index=options["trust_index"])
    if args.verify:
        from ..engine.verify import find_corrupt

        catalog = catalog.without(find_corrupt(source, catalog.files, os.cpu_count() or 1, not args.no_progress))
    sizes = catalog.sample_bytes(config.parts)  # bytes of each image in the cache, companions included
    at_least, typical = images_held(sizes, int(config.cache_bytes or 0))
    return {**catalog.summary(), "seconds": time.perf_counter() - t0, "scan": catalog.scan_report,
            "cache": {"cache_bytes": config.cache_bytes, "images_at_least": at_least, "images_typical": typical,
                      "bytes_per_image_mean": float(sizes.mean()) if len(sizes) else 0.0},
            "bad_files": [{"path": p, "kind": getattr(r, "kind", "other"), "reason": str(r)} for p, r in catalog.skipped]}


def _counts(values: dict[Any, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in values.items()) or "-"


def _inspect_text(r: dict[str, Any], cache: str, shown: int = 50) -> str:
    mp, c = r["megapixels"], r["cache"]
    lines = [f"{r['images']:,} usable images, {r['skipped']:,} files skipped ({r['seconds']:.1f} s)"]
    scan = r["scan"]
    if scan:
        peers = f", {scan['read_by_peers']:,} by other local ranks" if scan["read_by_peers"] else ""
        where = f"index {scan['index']}" if scan["index"] else "no index"
        lines.append(f"headers     {scan['files']:,} files: {scan['from_index']:,} from the index, "
                     f"{scan['read_here']:,} read{peers} ({where})")
    if r["images"]:
        size = (f"{mp['min']:.2f} / {mp['median']:.2f} / {mp['max']:.2f} MP (min / median / max), {mp['total']:,.1f} MP "
                f"in all; smallest {r['sizes']['smallest']}, largest {r['sizes']['largest']}")
        fit = (f"holds all {r['images']:,} images" if c["images_at_least"] == r["images"] else
               f"holds at least {c['images_at_least']:,} images, about {c['images_typical']:,} typically")
        fit += (f" ({format_bytes(c['bytes_per_image_mean'])} per image decoded"
                f"{', companions included' if r['companions'] else ''})")
        lines += [f"formats     {_counts(r['formats'])}", f"modes       {_counts(r['modes'])}",
                  f"channels    {', '.join(f'{k} ch × {v:,}' for k, v in r['channels'].items())}",
                  f"size        {size}", f"cache {cache:<6}{fit}"]
    lines += [f"companions  {name}: {n:,} images paired" for name, n in r["companions"].items()]
    alpha = {mode: n for mode, n in r["modes"].items() if mode in ("RGBA", "LA", "PA")}
    if alpha:
        lines.append(f"alpha       {sum(alpha.values()):,} images ({_counts(alpha)}): dropped when decoding, so "
                     "transparent areas show the colour stored under them")
    ignored = scan.get("ignored") if scan else None
    if ignored:
        examples = ", ".join(scan.get("ignored_examples", [])[:2])
        lines.append(f"ignored     {sum(ignored.values()):,} files that are not images it reads "
                     f"({', '.join(f'{k or chr(39) * 2} ×{v:,}' for k, v in ignored.items())}), e.g. {examples}")
    if r["padded"]:
        lines.append(f"padded      {r['padded']:,} images smaller than the patch (zero-padded)")
    if r["bad_files"]:
        lines.append(f"skipped     {_counts(r['problems'])}")
        lines += [f"  {b['path']}: {b['reason']}" for b in r["bad_files"][:shown]]
        if len(r["bad_files"]) > shown:
            lines.append(f"  … and {len(r['bad_files']) - shown:,} more (--json lists all)")
    return "\n".join(lines) + "\n"


def cmd_inspect(args: argparse.Namespace) -> int:
    report = _inspect_report(args)
    _emit(args, report, _inspect_text(report, args.cache))
    if not report["images"]:
        sys.stderr.write("dali-patches: error: no usable image (see the skipped files above)\n")
        return 2
    return 3 if report["bad_files"] else 0


def cmd_preview(args: argparse.Namespace) -> int:
    from ..options import CompanionKind
    from ..review.figures import patch_grid

    with _open_sampler(args) as sampler:
        for _ in range(args.skip + 1):
            batch = next(sampler)
        host = sampler.backend.to_host
        masks = [c.name for c in sampler.config.companions if c.kind is CompanionKind.MASK]
        grid = patch_grid(host(batch.patches), batch.source, batch.anchor, sampler.files,
                          {k: host(v) for k, v in batch.companions.items()}, masks, columns=args.columns)
    grid.image.save(args.out)
    sys.stdout.write(f"wrote {args.out}: {len(grid.boxes)} patches of batch {batch.index} from "
                     f"{len(set(batch.source.tolist()))} images, {grid.image.width}x{grid.image.height} px\n")
    return 0


def _sample_log(args: argparse.Namespace, log: str) -> None:
    """Stream ``--patches`` patches (rounded up to whole batches), recording their provenance in ``log``."""
    with _open_sampler(args, provenance=log) as sampler:
        batches = -(-args.patches // args.batch)
        with tqdm(total=batches * args.batch, desc="sampling", unit="patch", disable=args.no_progress) as bar:
            for i in range(batches):
                next(sampler)
                bar.update(args.batch)
                if i % 32 == 31:
                    bar.set_postfix_str(_live(sampler))


def _is_log(path: str) -> bool:
    from ..engine.provenance import MAGIC

    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def cmd_coverage(args: argparse.Namespace) -> int:
    from ..review import runs as review
    from ..review.figures import coverage_figure

    reviewing = _is_log(args.source)  # an existing run's log: nothing to sample
    with tempfile.TemporaryDirectory() as tmp:
        log = args.source if reviewing else (args.log or os.path.join(tmp, "run.prov"))
        if not reviewing:
            _sample_log(args, log)
        run = review.load(log)
        stats = coverage_figure(run, args.out, images=args.images, images_from=args.images_from)
    shown = ", ".join(Path(run.files[i]).name for i in stats["shown"])
    text = (f"{stats['patches']:,} patches in {stats['batches']:,} batches from {stats['images']:,} images\n"
            f"patches per image  mean {stats['patches_per_image_mean']:.2f}, CV {stats['patches_per_image_cv']:.3f}"
            f" (0 = every image equally often)\n"
            f"never sampled      {stats['never_sampled']:,} images\n"
            f"anchor uniformity  χ² {stats['anchor_chi2']:.1f} on {stats['anchor_chi2_dof']} dof "
            f"= {stats['anchor_chi2_per_dof']:.2f} per dof (≈ 1 uniform, ≫ 1 weighted or clustered)\n"
            f"wrote {args.out} (heat maps of {shown})\n" + (f"kept the log in {args.log}\n" if args.log else ""))
    _emit(args, {**stats, "out": args.out, "log": args.log}, text)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import write_synthetic_images

    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {args.size!r} must look like 1536x2048 (HEIGHTxWIDTH)") from None
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers} must be at least 1 (or leave it out: every core)")
    paths = write_synthetic_images(args.folder, args.count, (h, w), seed=args.seed, fmt=args.format,
                                   progress=not args.no_progress, workers=args.workers)
    sys.stdout.write(f"wrote {len(paths)} images to {args.folder}\n")
    return 0
