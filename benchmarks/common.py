"""Benchmark helpers: warm-up, device sync inside the timed region, median + IQR, peak RSS, JSON."""

from __future__ import annotations

import json
import platform
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_PAGE = 4096


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


@contextmanager
def peak_rss():  # noqa: ANN201
    """Samples this process's RSS every 10 ms; yields a dict whose ``"peak_mb"`` is set on exit."""
    result = {"peak_mb": current_rss_mb()}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.01):
            result["peak_mb"] = max(result["peak_mb"], current_rss_mb())

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result["peak_mb"] = max(result["peak_mb"], current_rss_mb())


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
    """Run ``step`` ``warmup_steps`` times untimed, then for ``seconds``; ``sync`` runs inside the
    timed region after every step so that asynchronous device work is counted."""
    for _ in range(warmup_steps):
        step()
    sync()
    timing = Timing()
    start = time.perf_counter()
    while timing.total_s < seconds:
        t0 = time.perf_counter()
        step()
        sync()
        t1 = time.perf_counter()
        timing.steps.append(t1 - t0)
        timing.total_s = t1 - start
    return timing


def versions() -> dict[str, str]:
    import nvidia.dali as dali

    out = {"python": platform.python_version(), "numpy": np.__version__, "dali": dali.__version__,
           "machine": platform.machine(), "processor": platform.processor() or platform.machine()}
    try:
        import cupy

        out["cupy"] = cupy.__version__
        out["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:  # noqa: BLE001 - no GPU
        pass
    return out


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
