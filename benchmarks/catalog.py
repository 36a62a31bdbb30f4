"""Start-up cost at 10k / 100k / 1M files: header-scan rate, construct-to-first-batch time on the
first start (no index), the second start (index, re-stat) and with ``trust_index``, peak RSS, catalog
bytes per entry, and two local ranks sharing the first scan.

The data sets are real files (8 small JPEG/PNG images, baseline and progressive, copied N times: each
copy its own inode, since hard or symbolic links to one file are merged as duplicates by design).
Every measurement runs in a fresh process; the page cache is warm (every file is read once with
``find | xargs cat`` first). Pillow's ``Image.open`` header read (what the catalog used before) is timed on the same files
in the same run for the ratio.

    python benchmarks/catalog.py --sizes 10000 100000 1000000 --json benchmarks/results/catalog.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, os, resource, sys, time, warnings
t_start = time.perf_counter()
warnings.simplefilter("ignore")
from dali_patches import PatchSampler
folder, index_file, mode = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
sampler = PatchSampler(folder, patch_size=64, batch_size=32, reuse=8, cache_images=128, index=index_file,
                       trust_index=mode == "trust", progress=False, device="cpu")
t1 = time.perf_counter()
next(sampler)
t2 = time.perf_counter()
cat = sampler.catalog
paths = sum(sys.getsizeof(f) for f in cat.files)
arrays = sum(a.nbytes for a in (cat.heights, cat.widths, cat.channels, cat.file_bytes, cat.stamps))
tuples = sum(sys.getsizeof(t) for t in (cat.files, cat.formats, cat.modes))
print(json.dumps({"construct_s": t1 - t0, "first_batch_s": t2 - t0, "import_s": t0 - t_start, "files": len(cat),
                  "header_reads": cat.scan_report["read_here"], "from_index": cat.scan_report["from_index"],
                  "scan_s": cat.scan_report["seconds"], "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "catalog_bytes_per_entry": (arrays + tuples) / len(cat), "path_bytes_per_entry": paths / len(cat)}))
sampler.close()
"""


def make_tree(folder: Path, count: int) -> None:
    """``count`` small images in folders of 1000 (skipped when already there)."""
    marker = folder / f".complete-{count}"
    if marker.exists():
        return
    rng = np.random.default_rng(0)
    blobs = []
    for i in range(8):
        y, x = np.mgrid[:96 + 8 * i, :128]
        image = np.stack([(x * 2 + i * 9) % 256, (y * 2) % 256, (x + y + i * 30 + rng.integers(0, 9)) % 256], -1)
        out = io.BytesIO()
        Image.fromarray(image.astype(np.uint8)).save(out, "PNG" if i % 4 == 3 else "JPEG", progressive=i % 4 == 2)
        blobs.append((out.getvalue(), ".png" if i % 4 == 3 else ".jpg"))
    for d in range(-(-count // 1000)):
        sub = folder / f"d{d:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        for j in range(min(1000, count - d * 1000)):
            data, ext = blobs[(d * 1000 + j) % 8]
            (sub / f"{j:05d}{ext}").write_bytes(data)
    marker.touch()


def child(folder: Path, index_file: Path, mode: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(folder), str(index_file), mode], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def result(run: subprocess.Popen[str]) -> dict:
    out, _ = run.communicate()
    if run.returncode:
        msg = f"benchmark child failed (rc {run.returncode})"
        raise RuntimeError(msg)
    return json.loads(out.strip().splitlines()[-1])


def parser_rates(folder: Path, limit: int = 10_000) -> tuple[float, float]:
    """Files/s of our header parser and of Pillow's ``Image.open`` on the same files, one thread."""
    from dali_patches.sources.headers import pillow_header, read_local
    from dali_patches.sources.listing import expand

    paths = expand(str(folder))[:limit]
    rates: dict[Any, float] = {}
    for read in (read_local, pillow_header, read_local, pillow_header):  # twice each, alternating: the best
        t0 = time.perf_counter()
        for p in paths:
            read(p)
        rates[read] = max(rates.get(read, 0.0), len(paths) / (time.perf_counter() - t0))
    return rates[read_local], rates[pillow_header]


def warm_page_cache(folder: Path) -> float:
    """Read every file once (``find | xargs cat``), so that every start measures a warm cache."""
    t0 = time.perf_counter()
    find = subprocess.Popen(["find", "-L", str(folder), "-type", "f", "-print0"], stdout=subprocess.PIPE)
    subprocess.run(["xargs", "-0", "cat"], stdin=find.stdout, stdout=subprocess.DEVNULL, check=False)
    find.wait()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--root", type=Path, default=Path("/tmp/dali_patches_bench/catalog"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for n in args.sizes:
        folder = args.root / f"{n}"
        t0 = time.perf_counter()
        make_tree(folder, n)
        print(f"{n} files ready in {time.perf_counter() - t0:.0f} s, read once in {warm_page_cache(folder):.0f} s",
              file=sys.stderr)
        index_file = args.root / f"index-{n}.npz"
        index_file.unlink(missing_ok=True)
        ours, pillow = parser_rates(folder)
        row: dict = {"files": n, "parser_files_per_s": ours, "pillow_files_per_s": pillow}
        row["first"] = result(child(folder, index_file, "first"))
        for mode in ("second", "trust"):  # the median of three starts
            runs = sorted((result(child(folder, index_file, mode)) for _ in range(3)), key=lambda r: r["first_batch_s"])
            row[mode] = runs[1]
            row[f"{mode}_range_s"] = [runs[0]["first_batch_s"], runs[2]["first_batch_s"]]
        ranks_index = args.root / f"index-{n}-ranks.npz"
        ranks_index.unlink(missing_ok=True)
        t0 = time.perf_counter()
        runs = [child(folder, ranks_index, "first", {"LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"}) for r in range(2)]
        ranks = [result(r) for r in runs]
        row["ranks2"] = {"wall_s": time.perf_counter() - t0, "header_reads": [r["header_reads"] for r in ranks],
                         "scan_work_x_dataset": sum(r["header_reads"] for r in ranks) / n}
        row["first_scan_files_per_s"] = n / row["first"]["scan_s"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    print(f"{'files':>9} {'first start':>12} {'scan rate':>11} {'parser/Pillow':>14} {'second start':>13} "
          f"{'trust_index':>12} {'RSS MiB':>8} {'B/entry':>8} {'2 ranks: work':>14}")
    for r in rows:
        print(f"{r['files']:>9,} {r['first']['first_batch_s']:>11.2f}s {r['first_scan_files_per_s']:>9,.0f}/s "
              f"{r['parser_files_per_s'] / r['pillow_files_per_s']:>13.1f}× {r['second']['first_batch_s']:>12.2f}s "
              f"{r['trust']['first_batch_s']:>11.2f}s {r['second']['rss_mib']:>8.0f} "
              f"{r['second']['catalog_bytes_per_entry']:>8.0f} {r['ranks2']['scan_work_x_dataset']:>13.2f}×")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
