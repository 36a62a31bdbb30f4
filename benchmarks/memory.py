"""Memory: ``max_memory`` against the measured peak resident set, case by case.

Each case (a source folder × ``cache_bytes`` × ``reuse``) runs in a child process of its own, so that
one case's peak (``VmHWM``) and allocator pools never reach the next: the child notes its resident
set after importing DALI and dali_patches (the *base*), builds a sampler with the default knobs
(``decode_batch``, ``num_threads``, ``queue_depth``: unless given), draws batches for ``--seconds``
and reports its ``VmHWM``. Per case the table gives ``max_memory``, the peak over the base (what
``max_memory`` models), the absolute peak, ``cache_bytes + 1 GiB`` (the goal for the absolute peak)
and ``max_memory ÷ (peak − base)`` (the goal: within 0.9–1.1). A cache too small for ``--batch``
distinct images of the largest size samples with ``allow_repeats`` (marked ``*``).

    python benchmarks/memory.py --source /tmp/photos25 --source /tmp/photos --cache 1GiB 2GiB 4GiB \\
        --reuse 1 32 --seconds 30 --json benchmarks/results/cpu_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import current_rss_mb, versions, write_json

_GIB = 2**30
_MIB = 2**20


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def _child(case: dict[str, Any]) -> dict[str, Any]:
    """One case, in this process: the sampler's ``max_memory`` and the peak resident set."""
    import nvidia.dali  # noqa: F401 - imported before the base is taken, as a trainer would have

    import dali_patches as dp
    from dali_patches.config import parse_bytes

    base = current_rss_mb()
    options = {k: case[k] for k in ("decode_batch", "num_threads") if case.get(k) is not None}
    t0 = time.perf_counter()
    kwargs = {"patch_size": case["patch"], "batch_size": case["batch"], "reuse": case["reuse"],
              "cache_bytes": case["cache"], "device": "cpu", "progress": False, "seed": 0, **options}
    try:
        sampler = dp.PatchSampler(case["source"], **kwargs)
    except ValueError as e:  # a cache too small for B distinct large images: sample with repeats
        if "allow_repeats" not in str(e):
            raise
        case["allow_repeats"] = True
        sampler = dp.PatchSampler(case["source"], allow_repeats=True, **kwargs)
    with sampler:
        built = time.perf_counter() - t0
        it = iter(sampler)
        next(it)
        decoded0, batches, t1 = sampler.stats()["images_decoded"], 0, time.perf_counter()
        while time.perf_counter() - t1 < case["seconds"]:
            next(it)
            batches += 1
        stats = sampler.stats()
        rate = (stats["images_decoded"] - decoded0) / (time.perf_counter() - t1)
        maker = sampler._producer.maker  # the benchmark reports the engine's sizes
        hwm = _hwm_mb()
        return {**case, "base_mib": base, "vmhwm_mib": hwm, "over_base_mib": hwm - base,
                "max_memory_mib": sampler.max_memory / _MIB, "cache_mib": sampler.cache_bytes / _MIB,
                "goal_mib": (parse_bytes(case["cache"]) + _GIB) / _MIB,
                "ratio": sampler.max_memory / _MIB / (hwm - base), "largest_mib": maker.largest_bytes / _MIB,
                "decode_batch_used": sampler.config.decode_batch, "threads": sampler.config.num_threads,
                "round_batches": maker.round_batches, "images_decoded": stats["images_decoded"], "decodes_per_s": rate,
                "batches": batches, "build_s": built}


def _run_case(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True,
                          timeout=timeout, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {**case, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def _table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'source':<16} {'cache':>6} {'reuse':>5} {'db':>3} {'max_memory':>10} {'peak-base':>9} {'peak':>7} "
            f"{'cache+1G':>8} {'ratio':>6} {'peak≤goal':>9}")
    out = [head, "-" * len(head)]
    for r in rows:
        name = os.path.basename(r["source"].rstrip("/"))[:16]
        cache = r["cache"] + ("*" if r.get("allow_repeats") else "")
        if "error" in r:
            out.append(f"{name:<16} {cache:>6} {r['reuse']:>5}  error: {r['error']}")
            continue
        out.append(f"{name:<16} {cache:>6} {r['reuse']:>5} {r['decode_batch_used']:>3} {r['max_memory_mib']:>10.0f} "
                   f"{r['over_base_mib']:>9.0f} {r['vmhwm_mib']:>7.0f} {r['goal_mib']:>8.0f} {r['ratio']:>6.2f} "
                   f"{'yes' if r['vmhwm_mib'] <= r['goal_mib'] else 'NO':>9}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", action="append", help="image folder (repeatable; default /tmp/photos25 /tmp/photos)")
    parser.add_argument("--cache", nargs="+", default=["1GiB", "2GiB", "4GiB"])
    parser.add_argument("--reuse", nargs="+", type=float, default=[1, 32])
    parser.add_argument("--decode-batch", type=int, default=None, help="default: the sampler's own")
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0, help="drawing time per case, after construction")
    parser.add_argument("--timeout", type=float, default=900.0, help="per case")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))), flush=True)
        return
    rows = []
    for source in args.source or ["/tmp/photos25", "/tmp/photos"]:
        for cache in args.cache:
            for reuse in args.reuse:
                case = {"source": source, "cache": cache, "reuse": int(reuse) if reuse == int(reuse) else reuse,
                        "decode_batch": args.decode_batch, "num_threads": args.num_threads, "patch": (args.patch, args.patch),
                        "batch": args.batch, "seconds": args.seconds}
                rows.append(_run_case(case, args.timeout))
                print(_table(rows[-1:]).splitlines()[-1], flush=True)
    print(_table(rows))
    ok = [r for r in rows if "error" not in r]
    if ok:
        worst = max(abs(r["ratio"] - 1) for r in ok)
        print(f"max_memory ÷ (peak − base): {min(r['ratio'] for r in ok):.2f}–{max(r['ratio'] for r in ok):.2f} "
              f"(worst {worst:.0%} off); peak ≤ cache + 1 GiB in {sum(r['vmhwm_mib'] <= r['goal_mib'] for r in ok)} "
              f"of {len(ok)} cases")
    if args.json:
        write_json(args.json, {"cases": rows, "versions": versions(), "cpus": os.cpu_count()})


if __name__ == "__main__":
    main()
