"""Pace: how fast each side of the sampler goes, over the whole run and over the last seconds.

Counters that only grow (patches drawn, images taken into the cache, seconds the decoder sat idle,
seconds the consumer waited) are sampled at most every ``_SAMPLE_S``; "recent" figures are the
differences over the newest ``window_s`` of samples. Any thread may sample.
"""

from __future__ import annotations

import threading
import time
from collections import deque

__all__ = ["Pace"]

_SAMPLE_S = 0.25


class Pace:
    """Samples of growing counters, for rates over the last ``window_s`` seconds."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, dict[str, float]]] = deque()
        self._lock = threading.Lock()

    def sample(self, counters: dict[str, float], force: bool = False) -> None:
        """Keep ``counters`` as they are now (unless the last sample is younger than 0.25 s)."""
        now = time.perf_counter()
        with self._lock:
            if self._samples and not force and now - self._samples[-1][0] < _SAMPLE_S:
                return
            self._samples.append((now, dict(counters)))
            while len(self._samples) > 2 and now - self._samples[1][0] > self.window_s:
                self._samples.popleft()

    def recent(self, counters: dict[str, float]) -> tuple[float, dict[str, float]]:
        """``(seconds, growth of each counter)`` from the oldest sample of the window to ``counters``
        now; ``(0, {})`` before any sample."""
        now = time.perf_counter()
        with self._lock:
            old = next((s for s in self._samples if now - s[0] <= self.window_s), None) or \
                (self._samples[-1] if self._samples else None)
        if old is None:
            return 0.0, {}
        return now - old[0], {k: v - old[1].get(k, 0.0) for k, v in counters.items()}

    def figures(self, now: dict[str, float], since: dict[str, float] | None) -> dict[str, float]:
        """From counters ``made`` (patches drawn), ``taken`` (images into the cache), ``paused``
        (decoder idle, s) and ``wait`` (consumer waiting, s), now and at ``since`` (with its
        ``time``; ``None`` before the first batch): ``effective_reuse``, ``decoder_busy_fraction``
        and ``consumer_wait_fraction``, each also ``…_recent`` (over the last ``window_s``)."""
        if since is None:
            return {}
        spans = {"": (time.perf_counter() - since["time"], {k: now[k] - since[k] for k in now}),
                 "_recent": self.recent(now)}
        out: dict[str, float] = {}
        for suffix, (seconds, grown) in spans.items():
            out[f"effective_reuse{suffix}"] = grown["made"] / grown["taken"] if grown.get("taken") else float("inf")
            out[f"decoder_busy_fraction{suffix}"] = max(0.0, 1 - grown.get("paused", 0) / seconds) if seconds > 0 else 1.0
            out[f"consumer_wait_fraction{suffix}"] = min(1.0, grown.get("wait", 0) / seconds) if seconds > 0 else 0.0
        return out
