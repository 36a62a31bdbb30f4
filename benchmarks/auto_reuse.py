"""``reuse="auto"`` against fixed reuse 8, 32 and 128 under a trainer whose pace changes: a fast phase,
a slow one, a pause and fast again, on the same images in one run.

The simulated trainer takes a batch, then "computes" for the phase's time per batch (a sleep: it
leaves the CPU to the sampler, as a GPU-bound model would). For each setting and phase: the share of
wall time the trainer waited in ``next()``, the decoder's busy fraction (the time it had room to
decode ahead), the effective reuse (patches drawn per image taken into the cache) beside
consumption ÷ decode rate (DALI's decode alone, measured first in the same run), and the fewest
distinct images in any batch. Writes a table, JSON and a plot of effective reuse and waiting over
time.

``--pacing B [B ...]`` measures instead whether the decoder keeps running flat out under a slow
trainer (``--pace`` patches/s, default 800) at each batch size: its busy fraction, its rate ÷ bare
DALI decode (measured before and after, same run), and the effective reuse against consumption ÷
bare decode. ``--ab`` adds the same run with the refill between rounds switched off (the producer
then refills only once a round), for comparison.

    python benchmarks/auto_reuse.py [DIR] --json benchmarks/results/auto_reuse.json --plot benchmarks/results/auto_reuse.png
    python benchmarks/auto_reuse.py DIR --cache 7.5GiB --pacing 16 32 64 256 --ab --json benchmarks/results/auto_pacing.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bare_decode_rate, image_source, versions

from dali_patches import PatchSampler
from dali_patches.sources.listing import expand

# (name, seconds, seconds per batch; None = a pause without batches)
PHASES = [("fast", 10.0, 0.004), ("slow", 10.0, 0.08), ("pause", 4.0, None), ("fast again", 10.0, 0.004)]


def run(files: list[str], reuse: Any, args: argparse.Namespace, **bounds: Any) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampler = PatchSampler(files, patch_size=args.patch, batch_size=args.batch, reuse=reuse, cache_bytes=args.cache,
                               device="cpu", seed=0, progress=False, **bounds)
    trace: list[dict[str, Any]] = []
    phases = []
    waited_before = 0.0  # the trainer's waits in earlier phases (the trace is cumulative)
    with sampler:
        next(sampler)  # warm-up
        t_run = time.perf_counter()
        for name, seconds, per_batch in PHASES:
            start, t0 = sampler.stats(), time.perf_counter()
            waited, fewest, batches = 0.0, args.batch, 0
            next_trace = t0
            while (now := time.perf_counter()) - t0 < seconds:
                if per_batch is None:
                    time.sleep(0.05)
                else:
                    t_ask = time.perf_counter()
                    batch = next(sampler)
                    waited += time.perf_counter() - t_ask
                    fewest = min(fewest, len(set(batch.source.tolist())))
                    batches += 1
                    time.sleep(per_batch)
                if now >= next_trace:
                    s = sampler.stats()
                    trace.append({"t": now - t_run, "served": s["patches_made"], "taken": s["images_decoded"],
                                  "wait": waited_before + waited, "paused": s["decoder_paused_s"], "phase": name})
                    next_trace = now + 0.5
            end, wall = sampler.stats(), time.perf_counter() - t0
            waited_before += waited
            taken = end["images_decoded"] - start["images_decoded"]
            served = end["patches_made"] - start["patches_made"]
            phases.append({"phase": name, "seconds": wall, "batches": batches,
                           "patches_per_s": batches * args.batch / wall,
                           "wait_fraction": waited / wall if per_batch is not None else None,
                           "sampler_wait_fraction": (end["consumer_wait_s"] - start["consumer_wait_s"]) / wall
                           if per_batch is not None else None,
                           "decoder_busy": min(1.0, max(0.0, 1 - (end["decoder_paused_s"] - start["decoder_paused_s"]) / wall)),
                           "decodes_per_s": taken / wall,
                           "effective_reuse": served / taken if taken else None,
                           "fewest_distinct": fewest if per_batch is not None else None})
    return {"reuse": reuse, "bounds": bounds, "phases": phases, "trace": trace}


def pacing(files: list[str], batch: int, args: argparse.Namespace, refill_ahead: bool = True) -> dict[str, Any]:
    """``reuse="auto"`` under a trainer taking ``args.pace`` patches/s at batch size ``batch``."""
    from dali_patches.engine.maker import BatchMaker

    real = BatchMaker.refill_ahead
    if not refill_ahead:  # the comparison: refill only once a round, as before the refill between rounds
        BatchMaker.refill_ahead = lambda self: None  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sampler = PatchSampler(files, patch_size=args.patch, batch_size=batch, reuse="auto", cache_bytes=args.cache,
                                   device="cpu", seed=0, progress=False)
        with sampler:
            next(sampler)  # the warm-up
            start, t0 = sampler.stats(), time.perf_counter()
            while time.perf_counter() - t0 < args.seconds:
                next(sampler)
                time.sleep(batch / args.pace)
            end, wall = sampler.stats(), time.perf_counter() - t0
    finally:
        BatchMaker.refill_ahead = real  # type: ignore[method-assign]
    taken = end["images_decoded"] - start["images_decoded"]
    return {"batch": batch, "refill_ahead": refill_ahead, "seconds": wall, "round_batches": end["round_batches"],
            "decodes_per_s": taken / wall,
            "decoder_busy": 1 - (end["decoder_paused_s"] - start["decoder_paused_s"]) / wall,
            "effective_reuse": (end["patches_made"] - start["patches_made"]) / taken if taken else None}


def plot(results: list[dict[str, Any]], decode_rate: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for r in results:
        trace = r["trace"]
        label = f"reuse {r['reuse']}" + (f" [{r['bounds']['min_reuse']:g}, {r['bounds']['max_reuse']:g}]" if r["bounds"] else "")
        ts, reuse, wait = [], [], []
        for a, b in zip(trace, trace[4:]):  # 2 s windows
            ts.append(b["t"])
            taken = b["taken"] - a["taken"]
            reuse.append((b["served"] - a["served"]) / taken if taken else float("nan"))
            wait.append((b["wait"] - a["wait"]) / (b["t"] - a["t"]))
        top.plot(ts, reuse, label=label)
        bottom.plot(ts, wait, label=label)
    t = 0.0
    for name, seconds, per_batch in PHASES:  # what consumption ÷ decode rate asks for, per phase
        if per_batch is not None:
            want = 64 / per_batch / decode_rate
            top.hlines(want, t, t + seconds, colors="grey", linestyles="dotted")
        top.text(t + 0.2, 1.02, name, fontsize=8, color="grey", transform=top.get_xaxis_transform())
        t += seconds
    top.set_yscale("log")
    top.set_ylabel("effective reuse (2 s windows)")
    bottom.set_ylabel("share of time the trainer waited")
    bottom.set_xlabel("seconds")
    bottom.set_ylim(-0.05, 1.05)
    bottom.legend(fontsize=8, loc="center left")
    top.set_title("effective reuse (dotted: the trainer's pace ÷ bare decode rate) and waiting, per setting", fontsize=10, pad=16)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="image folder; omitted: generate a photo-like set")
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--cache", default="3GiB")
    p.add_argument("--count", type=int, default=48)
    p.add_argument("--size", default="2600x3500")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--pacing", type=int, nargs="+", metavar="B", help="measure the decoder's pace at these batch sizes")
    p.add_argument("--pace", type=float, default=800.0, help="--pacing: the trainer's patches/s [800]")
    p.add_argument("--seconds", type=float, default=30.0, help="--pacing: seconds per run [30]")
    p.add_argument("--ab", action="store_true", help="--pacing: also run without the refill between rounds")
    args = p.parse_args()
    if args.pacing:
        with image_source(args) as folder:
            files = expand(folder)

            def bare() -> float:
                return bare_decode_rate(files, "cpu", 8, os.cpu_count() or 1, 10.0)

            # The machine's speed drifts over minutes: each batch size is compared with the bare
            # decode rate measured right before and right after its runs.
            bares, runs = [bare()], []
            for b in args.pacing:
                runs += [pacing(files, b, args, ahead) for ahead in ((False, True) if args.ab else (True,))]
                bares.append(bare())
                for r in runs[-(2 if args.ab else 1):]:
                    r["bare_decode"] = (bares[-2] + bares[-1]) / 2
        print(f"{len(files)} images, bare decode {min(bares):.1f}–{max(bares):.1f} img/s over the run, trainer "
              f"{args.pace:,.0f} patches/s (consumption ÷ bare decode ≈ {args.pace / (sum(bares) / len(bares)):.1f}), "
              f"P {args.patch}")
        print(f"{'B':>5} {'refill':<14} {'round':>5} {'busy':>6} {'decode img/s':>13} {'bare':>6} {'÷ bare':>7} "
              f"{'reuse':>7}")
        for r in runs:
            print(f"{r['batch']:>5} {'between rounds' if r['refill_ahead'] else 'once a round':<14} {r['round_batches']:>5} "
                  f"{r['decoder_busy']:>6.0%} {r['decodes_per_s']:>13.1f} {r['bare_decode']:>6.1f} "
                  f"{r['decodes_per_s'] / r['bare_decode']:>7.2f} {r['effective_reuse']:>7.1f}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"bare_decode": bares, "pace": args.pace, "runs": runs,
                                             "versions": versions()}, indent=1))
        return
    global PHASES
    PHASES = [(n, s, None if b is None else b * args.batch / 64) for n, s, b in PHASES]
    with image_source(args) as folder:
        files = expand(folder)
        decode_rate = bare_decode_rate(files, "cpu", 8, os.cpu_count() or 1, 10.0)
        results = [run(files, reuse, args) for reuse in (8, 32, 128, "auto")]
        results.append(run(files, "auto", args, min_reuse=16, max_reuse=64))
    print(f"{len(files)} images, bare decode {decode_rate:.1f} img/s, P {args.patch}, B {args.batch}")
    print("waited: share of the phase the trainer spent in next() (in the sampler's queue wait alone); reuse: "
          "effective, against consumption ÷ bare decode rate (÷ the decoder's own rate in the phase)")
    print(f"{'setting':<24} {'phase':<11} {'patches/s':>10} {'waited':>12} {'busy':>6} {'reuse':>7} "
          f"{'wanted':>15} {'distinct':>8}")

    def pct(value: float | None) -> str:
        return "" if value is None else f"{value:.0%}"

    for r in results:
        label = f"reuse {r['reuse']}" + (f" [{r['bounds']['min_reuse']:g}, {r['bounds']['max_reuse']:g}]" if r["bounds"] else "")
        for ph in r["phases"]:
            per_batch = {n: b for n, _, b in PHASES}[ph["phase"]]
            wanted = f"{ph['patches_per_s'] / decode_rate:.1f} ({ph['patches_per_s'] / ph['decodes_per_s']:.1f})" \
                if per_batch and ph["decodes_per_s"] else ""
            waited = f"{pct(ph['wait_fraction'])} ({pct(ph['sampler_wait_fraction'])})" if per_batch else ""
            reuse = "" if ph["effective_reuse"] is None else f"{ph['effective_reuse']:.1f}"
            print(f"{label:<24} {ph['phase']:<11} {ph['patches_per_s']:>10,.0f} {waited:>12} {ph['decoder_busy']:>6.0%} "
                  f"{reuse:>7} {wanted:>15} {'' if ph['fewest_distinct'] is None else ph['fewest_distinct']:>8}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"decode_rate": decode_rate, "results": results, "versions": versions()}, indent=1))
    if args.plot:
        plot(results, decode_rate, args.plot)


if __name__ == "__main__":
    main()
