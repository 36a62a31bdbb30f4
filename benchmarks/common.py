"""Benchmark helpers: warm-up, one device sync at each end of the timed region, median + IQR, peak RSS,
JSON."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_PAGE = 4096


def current_rss_mb() -> float:
    """This process's resident set, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


def _descendants(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the task ended
            continue
        for child in children:
            out += [child, *_descendants(child)]
    return out


def _pss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def tree_memory_mb() -> float:
    """RSS of this process plus the proportional set size of its worker processes (DataLoader
    workers, tf.data threads live in-process), in MiB: pages shared after ``fork`` count once."""
    return current_rss_mb() + sum(_pss_mb(pid) for pid in _descendants(os.getpid()))


@contextmanager
def peak_rss():
    """Samples :func:`tree_memory_mb` every 50 ms; yields a dict whose ``"peak_mb"`` is set on exit."""
    result = {"peak_mb": tree_memory_mb()}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.05):
            result["peak_mb"] = max(result["peak_mb"], tree_memory_mb())

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_mb"] = max(result["peak_mb"], tree_memory_mb())


@dataclass
class Timing:
    """Per-step wall times of one timed run."""

    steps: list[float] = field(default_factory=list)
    total_s: float = 0.0

    @property
    def median_s(self) -> float:
        return float(np.median(self.steps)) if self.steps else float("nan")

    @property
    def iqr_s(self) -> float:
        if not self.steps:
            return float("nan")
        q1, q3 = np.percentile(self.steps, [25, 75])
        return float(q3 - q1)


def timed(step: Callable[[], Any], seconds: float, warmup_steps: int = 3,
          sync: Callable[[], None] = lambda: None) -> Timing:
    """Run ``step`` ``warmup_steps`` times untimed, then for ``seconds``.

    ``sync`` (a device synchronisation, for asynchronous work) runs once before the timed region and
    once at its end, inside it: the work the steps queued is counted, while nothing drains the
    pipelines between steps (a sync per step would empty DALI's prefetch queue and the producer's
    run-ahead, and bias every method towards its latency). Use the same ``sync`` for every method
    compared. The per-step times are the host's (``median_s``); rates come from the total.
    """
    for _ in range(warmup_steps):
        step()
    sync()
    timing = Timing()
    start = time.perf_counter()
    while timing.total_s < seconds:
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        timing.steps.append(t1 - t0)
        timing.total_s = t1 - start
    sync()
    timing.total_s = time.perf_counter() - start
    return timing


def rate(timing: Timing, per_step: int) -> float:
    """Items per second of a :func:`timed` run that handled ``per_step`` items per step."""
    return len(timing.steps) * per_step / timing.total_s


def device_sync(backend: Any) -> Callable[[], None]:
    """A whole-device synchronisation on a GPU backend, nothing on the CPU."""
    if not backend.is_gpu:
        return lambda: None
    xp, device = backend.xp, backend.device_id

    def sync() -> None:
        with xp.cuda.Device(device):
            xp.cuda.runtime.deviceSynchronize()

    return sync


def bare_decode_rate(files: list[str], device: str, batch: int, threads: int, seconds: float) -> float:
    """Images/s of DALI's own ``readers.file → decoders.image`` alone (no sampler): the decode bound."""
    from nvidia.dali import fn, pipeline_def, types

    from dali_patches.engine.backend import resolve_backend

    backend = resolve_backend(device)

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=backend.dali_device_id, prefetch_queue_depth=2)
    def decode():
        jpegs, _ = fn.readers.file(files=files, shuffle_after_epoch=True)
        return fn.decoders.image(jpegs, device=backend.decoder_device, output_type=types.RGB)

    pipe = decode()
    pipe.build()
    return rate(timed(pipe.run, seconds, warmup_steps=3), batch)


@contextmanager
def image_source(args: Any):
    """The folder to benchmark: ``args.source``, or ``args.count`` synthetic JPEGs of about
    ``args.size`` (``"HxW"``) written to a temporary folder that is removed afterwards."""
    if args.source is not None:
        yield args.source
        return
    from dali_patches.cli.synth import write_synthetic_images

    h, w = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_images(tmp, args.count, (h, w), seed=0, progress=True)
        yield tmp


def versions() -> dict[str, str]:
    from nvidia import dali

    out = {"python": platform.python_version(), "numpy": np.__version__, "dali": dali.__version__,
           "machine": platform.machine(), "processor": platform.processor() or platform.machine()}
    try:
        import cupy

        out["cupy"] = cupy.__version__
        out["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:  # noqa: BLE001 - no GPU: versions without it
        return out
    return out


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
