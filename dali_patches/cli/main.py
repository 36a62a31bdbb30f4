"""``dali-patches``: sample patches from a folder of images, and look at what was sampled.

Commands: ``inspect`` (what a data set holds, what is wrong with it), ``bench`` (patches/s on your
data), ``preview`` (a captioned grid of sampled patches), ``coverage`` (where patches come from) and
``synth`` (synthetic images to try it on). Exit codes: 0 success; 2 bad arguments or unusable data
(message on stderr); 3 ``inspect`` found files that would be skipped; 1 an unexpected failure;
130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import signal
import sys
import threading
import warnings
from typing import TextIO

from ..config import Device, format_bytes, parse_reuse
from ..engine.backend import DeviceUnavailableError
from ..options import Reuse
from . import commands, defaults
from .errors import translate

__all__ = ["main", "version"]


def _data_args(p: argparse.ArgumentParser, patch: int = defaults.PATCH, also: str = "") -> None:
    p.add_argument("source", metavar="SOURCE",
                   help=f"folder of images (searched recursively), glob such as 'data/**/*.jpg', s3://bucket/prefix, "
                        f"or one image{also}")
    p.add_argument("--companion", action="append", default=[], metavar="NAME=PATH[,OPT=V]",
                   help="an aligned partner of every image, matched by relative path without extension "
                        "(folders) or by what the wildcards match (globs); options scale=2 or scale=1/2 "
                        "(its size over the image's), kind=mask (label values), channels=1|3, "
                        "dtype=uint8|uint16; repeat for several, e.g. --companion mask=data/masks,kind=mask")
    p.add_argument("--patch", type=int, default=patch, help=f"patch size in pixels (square) [{patch}]")
    p.add_argument("--channels", type=int, default=3, choices=[1, 3], help="decoded channels: 3 RGB, 1 grey [3]")
    p.add_argument("--dtype", default="uint8", choices=["uint8", "uint16"], help="cached pixel type [uint8]")
    p.add_argument("--pad", action="store_true", help="keep images smaller than the patch, zero-padded")
    p.add_argument("--index", default=None, metavar="PATH|off",
                   help="the persistent header index: a file to keep it in, or 'off'; by default one under "
                        "the user's cache folder for 1000 files or more, so the next start only re-stats")
    p.add_argument("--trust-index", action="store_true",
                   help="take the folder's file list and headers from its index without listing or stat-ing "
                        "(read-only data sets)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _reuse(text: str) -> float | str:
    try:
        value = parse_reuse(text)
    except ValueError:
        msg = f"{text!r} is neither a number nor 'auto' (patches served per decoded image, >= 1)"
        raise argparse.ArgumentTypeError(msg) from None
    return value.value if isinstance(value, Reuse) else value


def _stream_args(p: argparse.ArgumentParser) -> None:
    """The sampler's flags, with the one set of defaults every command shares (:mod:`.defaults`)."""
    p.add_argument("--batch", type=int, default=None,
                   help=f"patches per batch, each from a different image [{defaults.BATCH}, or fewer: at most half "
                        "the usable images, and as many of the largest as the cache holds]")
    p.add_argument("--reuse", type=_reuse, default=defaults.REUSE,
                   help=f"mean patches per decoded image, or 'auto': whatever the consumer's pace over the "
                        f"decoder's gives [{defaults.REUSE}]")
    p.add_argument("--min-reuse", type=float, default=None, metavar="R",
                   help="--reuse auto: below this the decoder pauses [1]")
    p.add_argument("--max-reuse", type=float, default=None, metavar="R",
                   help="--reuse auto: past this the consumer waits for decodes (a staleness bound) [none]")
    p.add_argument("--cache", default=None,
                   help=f"cache of decoded images, e.g. 512MiB, 2GiB [{defaults.DATA_SHARE * 100:g}%% of the data set "
                        f"decoded (all of it with --reuse auto) up to {format_bytes(defaults.CACHE_BOUND).replace(' ', '')}"
                        ", but at least --batch of the largest images, within half the free memory]")
    p.add_argument("--allow-repeats", action="store_true",
                   help="let a batch hold several patches of one image when fewer than --batch images are "
                        "resident (small data sets, small caches)")
    p.add_argument("--device", default="auto", choices=[d.value for d in Device],
                   help="where images are decoded and cached: gpu if CUDA is usable, else cpu [auto]")
    p.add_argument("--decode-batch", type=int, default=None, metavar="N",
                   help="images per DALI decode batch; DALI holds about 3 of them decoded besides the cache "
                        "[8 on cpu, 64 on gpu]")
    p.add_argument("--num-threads", type=int, default=None, metavar="N", help="DALI worker threads [every core]")
    p.add_argument("--seed", type=int, default=0, help="seeds file order and patch positions [0]")
    p.add_argument("--anchors", default="uniform", choices=["uniform", "content"],
                   help="where patches sit in an image: anywhere, or only where the patch is informative "
                        "(luminance std at least --min-std, mostly opaque) [uniform]")
    p.add_argument("--min-std", type=float, default=None, metavar="S",
                   help="--anchors content: least luminance standard deviation of a patch, 0-255 scale; below 2 "
                        "looks flat [4]")
    p.add_argument("--min-opaque", type=float, default=None, metavar="F",
                   help="--anchors content: least share of a patch's pixels that are opaque (images with alpha) [0.9]")


def _json_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help=f"{what} as JSON: to PATH, or to stdout instead of the text report when no PATH is given")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dali-patches", description="Sample patches from a folder of images, and look at what was sampled.",
                                epilog="exit codes: 0 success, 2 bad arguments or unusable data, 3 inspect found "
                                       "files that would be skipped, 1 unexpected failure, 130 interrupted")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    p.add_argument("--version", action="version", version=version(),
                   help="print this package's version, the DALI wheel serving it and Python's, and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    i = sub.add_parser("inspect", help="what a data set holds: formats, sizes, bad files, companions, cache fit",
                       description="Scan every file's header (no decoding) and report the file count by format, "
                                   "size distribution, channels, files that would be skipped and why, companions "
                                   "found or missing, how many images --cache holds, and the most memory a sampler "
                                   "with these flags would hold. Exit code 3 when any file would be skipped, 2 when "
                                   "none is usable.")
    _data_args(i)
    _stream_args(i)
    i.add_argument("--verify", action="store_true",
                   help="also decode every JPEG once and report those with corrupt data (libjpeg decodes them to "
                        "partly grey pixels without an error); costs a full decode")
    i.add_argument("--content", action="store_true",
                   help="also decode every image once and report those where no patch passes --min-std and "
                        "--min-opaque (--anchors content would set them aside) and how much of the images looks "
                        "informative; costs a full decode")
    _json_arg(i, "the report (every bad file included)")
    i.set_defaults(run=commands.cmd_inspect)

    b = sub.add_parser("bench", help="measure patches/s, decodes/s, diversity and memory on a folder",
                       description="Fill the cache, then stream patches for --seconds and report throughput, "
                                   "decode rate, batch diversity, reuse and peak memory.")
    _data_args(b)
    _stream_args(b)
    b.add_argument("--seconds", type=float, default=defaults.SECONDS,
                   help=f"timed streaming after warm-up [{defaults.SECONDS:g}]")
    b.add_argument("--via", default="dali", choices=["dali", "arrays", "torch"],
                   help="export path: DALI pipeline, plain arrays, or the PyTorch iterator [dali]")
    _json_arg(b, "the results, with settings and versions")
    b.set_defaults(run=commands.cmd_bench)

    v = sub.add_parser("preview", help="draw a grid of sampled patches captioned with file and anchor",
                       description="Sample one batch and draw its patches (companions beside them, masks "
                                   "stretched to be visible) in a grid, each captioned with its file name and "
                                   "the (y, x) of its top-left corner.")
    _data_args(v)
    _stream_args(v)
    v.add_argument("--out", default="preview.png", help="PNG to write [preview.png]")
    v.add_argument("--columns", type=int, help="patches per row [about square]")
    v.add_argument("--skip", type=int, default=0, help="batches to skip before the one drawn [0]")
    v.add_argument("--compare", action="store_true",
                   help="draw the same batch with uniform and with content anchors side by side (same seed), "
                        "and count the flat patches of each")
    v.set_defaults(run=commands.cmd_preview)

    c = sub.add_parser("coverage", help="where patches come from: heat maps, patches-per-image histogram, statistics",
                       description="Stream --patches patches or for --seconds, whichever ends first (or read a "
                                   "provenance log given as SOURCE), then draw "
                                   "a handful of images with a heat map of where their patches were taken and a "
                                   "histogram of patches per image, and print patches per image (mean, CV), images "
                                   "never sampled and the chi-squared uniformity of anchors.")
    _data_args(c, also="; or a provenance log (PatchSampler(provenance=...), --log) to review instead of sampling")
    _stream_args(c)
    c.add_argument("--patches", type=int, default=None,
                   help=f"patches to stream, rounded up to whole batches [{defaults.COVERAGE_PATCHES}, or what "
                        f"--seconds allows; given alone: exactly this many]")
    c.add_argument("--seconds", type=float, default=None,
                   help=f"stream for this long after the warm-up [{defaults.SECONDS:g} with the default --patches; "
                        "none with --patches given]")
    c.add_argument("--out", default="coverage.png", help="PNG to write [coverage.png]")
    c.add_argument("--images", type=int, default=4, help="images drawn with heat maps [4]")
    c.add_argument("--images-from", metavar="DIR",
                   help="reviewing a log: draw its images from DIR (the data set moved since) instead of the folder "
                        "the log recorded; images outside it are never read")
    c.add_argument("--log", help="keep the provenance log of the streamed patches here (see dali_patches.review)")
    _json_arg(c, "the statistics")
    c.set_defaults(run=commands.cmd_coverage)

    s = sub.add_parser("synth", help="write synthetic photo-like images to try the sampler on",
                       description="Write photo-like images (gradients, shapes, noise) so the sampler can be tried "
                                   "without downloading data.")
    s.add_argument("folder", help="folder to write to (created)")
    s.add_argument("--count", type=int, default=64, help="number of images [64]")
    s.add_argument("--size", default="1536x2048", help="HEIGHTxWIDTH (±25%% per image) [1536x2048]")
    s.add_argument("--format", default="jpg", choices=["jpg", "png", "mixed"],
                   help="mixed: 70%% baseline JPEG, 20%% progressive JPEG, 10%% PNG, like a photo collection [jpg]")
    s.add_argument("--flat", type=float, default=0.0, metavar="FRACTION",
                   help="about this fraction of each image's area is flat, with no noise: a studio backdrop or "
                        "clear sky (one colour, a very gentle gradient), black letterbox bars, or a slide's white "
                        "or light-grey background around textured blobs; one kind per image, like a photo "
                        "collection [0: none]")
    s.add_argument("--seed", type=int, default=0, help="[0]")
    s.add_argument("--workers", type=int, default=None, help="processes writing images [every core]")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    s.set_defaults(run=commands.cmd_synth)
    return p


def version() -> str:
    """``dali-patches 0.1.0 (nvidia-dali-cuda130 2.4.0, Python 3.11.7)``: what ``--version`` prints."""
    from .. import DALI, __version__

    return f"dali-patches {__version__} ({DALI}, Python {platform.python_version()})"


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """Warnings (skipped files, …) as one line each, in the command line's words."""
    (file or sys.stderr).write(f"dali-patches: warning: {translate(str(message))}\n")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name, least in (("patches", 1), ("batch", 1), ("images", 1), ("columns", 1), ("count", 1), ("skip", 0),
                        ("seconds", 0), ("patch", 1), ("decode_batch", 1), ("num_threads", 1)):
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and value >= least):
            flag = name.replace("_", "-")
            sys.stderr.write(f"dali-patches: error: --{flag} {value} must be at least {least} (and a finite number)\n")
            return 2
    if args.run is commands.cmd_bench and args.seconds <= 0:
        sys.stderr.write(f"dali-patches: error: --seconds {args.seconds:g} measures nothing; give a time above 0\n")
        return 2
    for name in ("out", "log", "json"):  # checked before any work, not after the sampling
        path = getattr(args, name, None)
        folder = os.path.dirname(os.path.abspath(path)) if isinstance(path, str) and path != "-" else None
        if folder is not None and not os.path.isdir(folder):
            sys.stderr.write(f"dali-patches: error: --{name} {path}: the folder {folder} does not exist; create it or "
                             "write elsewhere\n")
            return 2

    def interrupt(signum: int, frame: object) -> None:
        # The first Ctrl-C stops the command; later ones must not cut its clean-up short (closing the
        # sampler, DALI's pipelines), which is what aborted DALI at exit.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, interrupt)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.run(args)
    except (ValueError, FileNotFoundError, TypeError, ImportError, DeviceUnavailableError) as e:
        sys.stderr.write(f"dali-patches: error: {translate(str(e))}\n")
        return 2
    except OSError as e:  # the machine, not the arguments: a full disk, a file-size limit, ...
        sys.stderr.write(f"dali-patches: error: {translate(str(e))}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("dali-patches: interrupted\n")
        return 130  # Ctrl-C stays ignored: the process is on its way out
    finally:
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)

