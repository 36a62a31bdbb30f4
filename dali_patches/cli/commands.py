"""What each ``dali-patches`` command does; :mod:`dali_patches.cli` parses the arguments.

Each ``cmd_*`` function takes the parsed arguments, prints its report (or JSON with ``--json``) and
returns the exit code; they raise ``ValueError``/``FileNotFoundError`` for bad arguments or data,
which the CLI turns into exit code 2. A batch or cache left to the defaults is fitted to the data
and the machine first (:mod:`.defaults`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..config import format_bytes, parse_bytes
from ..engine.plan import cached_parts
from .bench import live, run_bench, summary_text
from .defaults import COVERAGE_PATCHES, SECONDS, content_options, fit_args, scan, stream_config
from .errors import translate

__all__ = ["cmd_bench", "cmd_coverage", "cmd_inspect", "cmd_preview", "cmd_synth"]


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
                               "trust_index": args.trust_index, "allow_repeats": args.allow_repeats,
                               **content_options(args)}
    for name in ("decode_batch", "num_threads"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    for bound in ("min_reuse", "max_reuse"):
        if getattr(args, bound, None) is not None:
            options[bound] = getattr(args, bound)
    if not specs:
        return args.source, options
    source = {"image": args.source, **{name: path for name, path, _ in specs}}
    return source, {**options, "companions": {name: opts for name, _, opts in specs}}


def _fitted(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """:func:`_sampler_options`, after the flags are checked and a batch or cache left to the
    defaults is fitted to the data set (scanned once here) and the free memory."""
    from ..sources import open_source

    spec, options = _sampler_options(args)
    source = open_source(spec, options.get("companions"))
    config = stream_config(args, source.companions)
    if args.batch is None or args.cache is None:
        fit_args(args, scan(source, config, args), config)
    return spec, options


def _open_sampler(args: argparse.Namespace, progress: bool | None = None, **extra: Any) -> Any:
    """The :class:`~dali_patches.PatchSampler` that the data and streaming flags describe (the
    batch and cache fitted first, if left to the defaults)."""
    from ..sampler import PatchSampler

    source, options = _fitted(args)
    return PatchSampler(source, patch_size=args.patch, batch_size=args.batch, reuse=args.reuse, cache_bytes=args.cache,
                        device=args.device, seed=args.seed, progress=not args.no_progress if progress is None else progress,
                        **options, **extra)


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
    source, options = _fitted(args)
    result = run_bench(source, args.patch, args.batch, args.reuse, args.cache, args.device, args.seconds, args.via,
                       args.seed, progress=not args.no_progress, **options)
    _emit(args, result, summary_text(result))
    return 0


def _inspect_report(args: argparse.Namespace) -> dict[str, Any]:
    """Scan the data set's headers and summarise it (formats, sizes, problems, cache capacity, and
    the most memory a sampler with these flags would hold)."""
    from ..engine.plan import images_held
    from ..sources import open_source

    spec, options = _sampler_options(args)
    source = open_source(spec, options.get("companions"))
    config = stream_config(args, source.companions)
    t0 = time.perf_counter()
    catalog = scan(source, config, args, check=False, progress=not args.no_progress)
    if args.verify:
        from ..engine.verify import find_corrupt

        catalog = catalog.without(find_corrupt(source, catalog.files, args.num_threads or os.cpu_count() or 1,
                                               not args.no_progress))
    content: dict[str, Any] | None = None
    if args.content and len(catalog):
        from ..engine.verify import find_flat

        flat, shares = find_flat(catalog, config.patch_size, config.min_std, config.min_opaque, config.channels,
                                 config.dtype, args.num_threads or os.cpu_count() or 1, not args.no_progress,
                                 config.anchor_step)
        content = {"min_std": config.min_std, "min_opaque": config.min_opaque, "flat": flat,
                   "informative_share_median": float(np.median(shares)) if shares else 0.0}
    seconds = time.perf_counter() - t0
    sizes = catalog.sample_bytes(cached_parts(config, catalog.modes)[0])  # bytes of each image in the cache, companions included
    memory: dict[str, Any] = {"max_memory": None, "device": None, "error": None}
    if len(catalog):
        fit_args(args, catalog, config)
        memory = _max_memory(args)
    cache = parse_bytes(args.cache) if args.cache is not None else 0
    at_least, typical = images_held(sizes, cache)
    return {**catalog.summary(), "seconds": seconds, "scan": catalog.scan_report,
            "cache": {"cache_bytes": cache, "images_at_least": at_least, "images_typical": typical,
                      "bytes_per_image_mean": float(sizes.mean()) if len(sizes) else 0.0},
            "batch": args.batch, "memory": memory, "content": content,
            "bad_files": [{"path": p, "kind": getattr(r, "kind", "other"), "reason": str(r)} for p, r in catalog.skipped]}


def _max_memory(args: argparse.Namespace) -> dict[str, Any]:
    """``PatchSampler.max_memory`` of a sampler with these flags (built, never started: nothing is
    decoded), or why such a sampler cannot be built."""
    from ..engine.backend import DeviceUnavailableError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the report lists the skipped files itself
            with _open_sampler(args, progress=False) as sampler:
                return {"max_memory": int(sampler.max_memory), "device": sampler.backend.device.value, "error": None}
    except (ValueError, DeviceUnavailableError) as e:
        return {"max_memory": None, "device": None, "error": translate(str(e))}


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
                  f"size        {size}", f"cache       {cache} {fit}", _memory_text(r)]
    lines += [f"companions  {name}: {n:,} images paired" for name, n in r["companions"].items()]
    alpha = {mode: n for mode, n in r["modes"].items() if mode in ("RGBA", "LA", "PA")}
    if alpha:
        lines.append(f"alpha       {sum(alpha.values()):,} images ({_counts(alpha)}): patches carry no alpha, so "
                     "transparent areas show the colour stored under them (--anchors content keeps patches out of "
                     "those of RGBA images)")
    if r.get("content"):
        flat, c = r["content"]["flat"], r["content"]
        lines.append(f"content     {len(flat):,} images without a patch of luminance std >= {c['min_std']:g}"
                     f" (--anchors content sets them aside); median {c['informative_share_median']:.0%} of an image's "
                     "area looks informative")
        lines += [f"  {path}: {why}" for path, why in list(flat.items())[:shown]]
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


def _memory_text(r: dict[str, Any]) -> str:
    m = r["memory"]
    if m["error"]:
        return f"memory      a sampler with --batch {r['batch']} would not start: {m['error']}"
    return (f"memory      at most {format_bytes(m['max_memory'])} of {m['device']} memory for a sampler with --batch "
            f"{r['batch']} (the cache, DALI's decode queue, images decoded ahead, output batches)")


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.content:
        args.anchors = "content"
    report = _inspect_report(args)
    cache = args.cache if isinstance(args.cache, str) else format_bytes(report["cache"]["cache_bytes"])
    _emit(args, report, _inspect_text(report, cache))
    if not report["images"]:
        sys.stderr.write("dali-patches: error: no usable image (see the skipped files above)\n")
        return 2
    if report["memory"]["error"]:  # the data may be fine, but a sampler with these flags would not start
        sys.stderr.write(f"dali-patches: error: {report['memory']['error']}\n")
        return 2
    return 3 if report["bad_files"] else 0


def _flat_count(patches: Any, min_std: float) -> int:
    """Patches whose luminance std (0–255 scale) is below ``min_std``."""
    values = np.asarray(patches, np.float64) / (257.0 if np.asarray(patches).dtype == np.uint16 else 1.0)
    luma = values @ np.array([0.299, 0.587, 0.114]) if values.shape[-1] == 3 else values[..., 0]
    return int((luma.reshape(len(values), -1).std(axis=1) < min_std).sum())


def _preview_grid(args: argparse.Namespace, min_std: float) -> tuple[Any, Any, int]:
    """One batch's grid (after ``--skip`` batches), the batch, and how many of its patches have a
    luminance std below ``min_std``."""
    from ..options import CompanionKind
    from ..review.figures import patch_grid

    with _open_sampler(args) as sampler:
        for _ in range(args.skip + 1):
            batch = next(sampler)
        host = sampler.backend.to_host
        masks = [c.name for c in sampler.config.companions if c.kind is CompanionKind.MASK]
        grid = patch_grid(host(batch.patches), batch.source, batch.anchor, sampler.files,
                          {k: host(v) for k, v in batch.companions.items()}, masks, columns=args.columns)
        flat = _flat_count(host(batch.patches), min_std)
    return grid, batch, flat


def cmd_preview(args: argparse.Namespace) -> int:
    min_std = args.min_std if args.min_std is not None else 4.0
    if not args.compare:
        grid, batch, flat = _preview_grid(args, min_std)
        image = grid.image
        what = (f"{len(grid.boxes)} patches of batch {batch.index} from {len(set(batch.source.tolist()))} images, "
                f"{flat} flat (luminance std < {min_std:g})")
    else:
        from PIL import Image, ImageDraw

        shown: list[tuple[Any, str]] = []
        opaque = args.min_opaque
        # The same seed, batch and flags but the anchors; content first: a batch or cache left to the
        # defaults is fitted for it (its cache may hold an alpha channel more), and suits both.
        for anchors in ("content", "uniform"):
            args.anchors = anchors
            args.min_std, args.min_opaque = (min_std, opaque) if anchors == "content" else (None, None)
            grid, batch, flat = _preview_grid(args, min_std)
            title = f"anchors={anchors}: {flat} of {len(batch.source)} patches flat (std < {min_std:g})"
            shown.insert(0, (grid.image, title))
        width, height = sum(im.width for im, _ in shown) + 24, max(im.height for im, _ in shown) + 28
        image = Image.new("RGB", (width, height), "white")
        draw, x = ImageDraw.Draw(image), 0
        for im, title in shown:
            image.paste(im, (x, 28))
            draw.text((x + 4, 8), title, fill="black")
            x += im.width + 24
        what = "; ".join(title for _, title in shown)
    image.save(args.out)
    sys.stdout.write(f"wrote {args.out}: {what}, {image.width}x{image.height} px\n")
    return 0


def _sample_log(args: argparse.Namespace, log: str) -> tuple[str, dict[str, Any] | None]:
    """Stream ``--patches`` patches (rounded up to whole batches), or for ``--seconds`` after the
    warm-up, whichever ends first (neither given: :data:`COVERAGE_PATCHES` within :data:`SECONDS`),
    recording their provenance in ``log``; returns a line saying which ended it, and the content
    anchors' counts (``--anchors content``; else ``None``)."""
    patches, seconds = args.patches, args.seconds
    if patches is None and seconds is None:
        patches, seconds = COVERAGE_PATCHES, SECONDS
    with _open_sampler(args, provenance=log) as sampler:
        batches = -(-patches // args.batch) if patches is not None else None
        with tqdm(total=batches * args.batch if batches else None, desc="sampling", unit="patch",
                  disable=args.no_progress) as bar:
            next(sampler)  # the first batch waits for the warm-up
            bar.update(args.batch)
            made, t0 = 1, time.perf_counter()
            while (batches is None or made < batches) and (seconds is None or time.perf_counter() - t0 < seconds):
                next(sampler)
                made += 1
                bar.update(args.batch)
                if made % 32 == 0:
                    bar.set_postfix_str(live(sampler))
        content = sampler.stats().get("content")
    if batches is not None and made >= batches:
        return "", content
    cap = f" of --patches {patches:,}" if patches is not None else ""
    return f"stopped after --seconds {seconds:g} of sampling: {made * args.batch:,} patches{cap}\n", content


def _is_log(path: str) -> bool:
    from ..engine.provenance import MAGIC

    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def cmd_coverage(args: argparse.Namespace) -> int:
    from ..review import runs as review
    from ..review.figures import coverage_figure

    if importlib.util.find_spec("matplotlib") is None:  # said before any sampling, not after it
        msg = "coverage draws its figure with matplotlib: pip install 'dali-patches[viz]'"
        raise ImportError(msg)
    reviewing = _is_log(args.source)  # an existing run's log: nothing to sample
    with tempfile.TemporaryDirectory() as tmp:
        log = args.source if reviewing else (args.log or os.path.join(tmp, "run.prov"))
        stopped, content = ("", None) if reviewing else _sample_log(args, log)
        run = review.load(log)
        stats = coverage_figure(run, args.out, images=args.images, images_from=args.images_from)
    shown = ", ".join(Path(run.files[i]).name for i in stats["shown"])
    text = (f"{stopped}{stats['patches']:,} patches in {stats['batches']:,} batches from {stats['images']:,} images\n"
            f"patches per image  mean {stats['patches_per_image_mean']:.2f}, CV {stats['patches_per_image_cv']:.3f}"
            f" (0 = every image equally often)\n"
            f"never sampled      {stats['never_sampled']:,} images\n"
            f"anchor uniformity  χ² {stats['anchor_chi2']:.1f} on {stats['anchor_chi2_dof']} dof "
            f"= {stats['anchor_chi2_per_dof']:.2f} per dof (≈ 1 uniform, ≫ 1 weighted or clustered)\n"
            + (_content_text(content) if content else "")
            + f"wrote {args.out} (heat maps of {shown})\n" + (f"kept the log in {args.log}\n" if args.log else ""))
    _emit(args, {**stats, "out": args.out, "log": args.log, "content": content}, text)
    return 0


def _content_text(c: dict[str, Any]) -> str:
    """The content anchors' counts of a run (``--anchors content``), a line or two."""
    share = c["redrawn"] / c["checked"] if c["checked"] else 0.0
    text = (f"content anchors    {c['redrawn']:,} of {c['checked']:,} drawn patches failed the exact test and were "
            f"redrawn ({share:.1%}; the producer's rounds, possibly past the last batch taken); "
            f"{c['exact_images']:,} images drawn from an exact scan, {c['set_aside']:,} set aside as flat\n")
    return text + "".join(f"  set aside: {path}: {why}\n" for path, why in c["set_aside_files"][:20])


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import write_synthetic_images

    try:
        h, w = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size {args.size!r} must look like 1536x2048 (HEIGHTxWIDTH)") from None
    if min(h, w) < 1:
        raise ValueError(f"--size {args.size!r} must be at least 1x1 pixels")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers} must be at least 1 (or leave it out: every core)")
    if not 0 <= args.flat <= 1:
        raise ValueError(f"--flat {args.flat:g} must be a fraction of the image area, from 0 to 1")
    paths = write_synthetic_images(args.folder, args.count, (h, w), seed=args.seed, fmt=args.format,
                                   progress=not args.no_progress, workers=args.workers, flat=args.flat)
    sys.stdout.write(f"wrote {len(paths)} images to {args.folder}\n")
    return 0
