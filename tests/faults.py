"""Fault scenarios, one per process: ``python -m tests.faults SCENARIO FOLDER``.

Each builds its own images in ``FOLDER``, starts a sampler, provokes the fault while it runs and
prints one JSON line with what happened (exit code 0 when the run survived; an error is printed as
``{"error": type, "message": ...}`` and exits 3). ``tests/test_faults.py`` runs each in a subprocess,
so that a signal (SIGBUS, SIGABRT) can end only that process, and asserts on the JSON.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dali_patches import PatchSampler
from dali_patches.cli.synth import synthetic_image

SETTINGS = {"patch_size": 24, "batch_size": 8, "reuse": 2, "device": "cpu", "seed": 0}


def _images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = int(rng.integers(64, 120)), int(rng.integers(64, 120))
        path = folder / f"img_{i:03d}.jpg"
        Image.fromarray(synthetic_image(h, w, rng)).save(path, quality=90)
        paths.append(path)
    return paths


def _reference(paths: list[str]) -> dict[str, np.ndarray]:
    from .conftest import reference_decode

    return reference_decode(paths, "cpu")


class _Warnings(logging.Handler):
    """Counts the decode stage's 'skipping <file>' reports per file."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("skipping "):
            path = record.getMessage().split(" ")[1]
            self.skipped[path] = self.skipped.get(path, 0) + 1


def _run(sampler: PatchSampler, batches: int, reference: dict[str, np.ndarray]) -> dict[str, Any]:
    """Take ``batches`` batches; count patches that differ from the files' decode before the fault."""
    p = sampler.config.patch_size
    wrong = served = 0
    for _ in range(batches):
        batch = next(sampler)
        for patch, s, (y, x) in zip(batch.patches, batch.source.tolist(), batch.anchor.tolist()):
            served += 1
            wrong += not np.array_equal(patch, reference[sampler.files[s]][y: y + p[0], x: x + p[1]])
    stats = sampler.stats()
    return {"served": served, "wrong": wrong, "broken": [(Path(f).name, why) for f, why in stats["broken_files"]],
            "changed": stats["changed_files"], "distinct": stats["distinct_fraction"],
            "lost_batches": stats["decode_lost_batches"]}


def scenario(name: str, folder: Path) -> dict[str, Any]:
    handler = _Warnings()
    logging.getLogger("dali_patches").addHandler(handler)
    out: dict[str, Any] = {}
    if name in ("overwrite", "delete_half", "replace_smaller", "replace_bigger", "replace_text", "delete_all"):
        n = 24 if name == "overwrite" else 40
        paths = _images(folder, n)
        reference = _reference([str(p) for p in paths])
        with PatchSampler(folder, cache_images=10, **SETTINGS) as sampler:
            next(sampler)
            hit = paths[:16] if name == "overwrite" else paths[::2]
            for path in hit:
                if name == "overwrite":  # in place: same inode, as an editor or rsync --inplace does
                    with open(path, "w") as f:
                        f.write("x")
                elif name in ("delete_half", "delete_all"):
                    path.unlink()
                elif name == "replace_smaller":
                    Image.fromarray(synthetic_image(40, 40, np.random.default_rng(1))).save(path, quality=90)
                elif name == "replace_bigger":
                    Image.fromarray(synthetic_image(900, 1200, np.random.default_rng(1))).save(path, quality=90)
                else:
                    path.write_text("not an image")
            if name == "delete_all":
                shutil.rmtree(folder)
            out = _run(sampler, 80 if name == "overwrite" else 100, reference)
        out["hit"] = sorted(p.name for p in hit)
    elif name == "duplicates":
        paths = [str(p) for p in _images(folder / "data", 6)]
        (folder / "data" / "sub").mkdir()
        os.symlink("..", folder / "data" / "sub" / "up")  # a loop back up the tree
        os.link(paths[0], folder / "data" / "hard_link.jpg")
        with PatchSampler(folder / "data", cache_images=6, allow_repeats=True, **{**SETTINGS, "batch_size": 4}) as s:
            out["files"] = len(s.files)
            out["merged"] = sorted(Path(p).name for p, r in s.catalog.skipped if r.kind == "duplicate")
        with PatchSampler(paths + paths, cache_images=6, **{**SETTINGS, "batch_size": 4}) as s:
            out["twice_files"] = len(s.files)
            out["twice_distinct_batches"] = all(len(set(next(s).source.tolist())) == 4 for _ in range(30))
        try:
            PatchSampler([paths[0]] * 6, cache_images=6, **{**SETTINGS, "batch_size": 4})
        except ValueError as e:
            out["one_file_six_times"] = str(e)
    elif name == "full_disk":
        import resource

        paths = _images(folder / "data", 24)
        log = folder / "run.prov"
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))  # a 64 KiB "disk"
        delivered = 0
        try:
            with PatchSampler(folder / "data", cache_images=10, provenance=log, **SETTINGS) as s:
                for _ in range(2000):  # 16,000 patches: 256 KB of records
                    next(s)
                    delivered += 8
        except OSError as e:
            out["error"], out["message"] = type(e).__name__, str(e)
        from dali_patches import review

        out["delivered"], out["logged"] = delivered, len(review.load(log).source)
    else:
        msg = f"unknown scenario {name!r}"
        raise ValueError(msg)
    out["reported"] = {Path(p).name: n for p, n in handler.skipped.items()}
    return out


def main() -> int:
    from .faults_outside import SCENARIOS

    name, folder = sys.argv[1], Path(sys.argv[2])
    if name in SCENARIOS:
        handler = _Warnings()
        logging.getLogger("dali_patches").addHandler(handler)
    try:
        if name in SCENARIOS:
            result = SCENARIOS[name](name, folder)
            result["reported"] = {Path(p).name: n for p, n in handler.skipped.items()}
        else:
            result = scenario(name, folder)
    except Exception as e:  # noqa: BLE001 - the error itself is the result to check
        print(json.dumps({"error": type(e).__name__, "message": str(e)}))
        return 3
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
