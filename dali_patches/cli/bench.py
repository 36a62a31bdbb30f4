"""``dali-patches bench``: stream patches for a while after the warm-up and measure the stream.

:func:`run_bench` is the measurement (also for scripts); :func:`summary_text` its report.
"""

from __future__ import annotations

import platform
import resource
import time
from typing import Any

from tqdm.auto import tqdm

from ..config import parse_bytes
from .defaults import SECONDS

__all__ = ["live", "run_bench", "summary_text"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _versions() -> dict[str, str]:
    import numpy
    from nvidia import dali

    from .. import DALI, __version__

    return {"dali_patches": __version__, "dali": dali.__version__, "dali_wheel": DALI, "numpy": numpy.__version__,
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
              seconds: float = SECONDS, via: str = "dali", seed: int = 0, progress: bool = True,
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
                    bar.set_postfix_str(f"{batches * batch / elapsed:,.0f} patches/s, {live(sampler)}")
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
        "content": end.get("content"),
        "config": {"patch": patch, "batch": batch, "reuse": reuse, "cache_bytes": parse_bytes(cache),
                   "device": end["device"], "via": via, "seed": seed},
        "versions": _versions(),
    }


_PACE_KEYS = ("reuse", "effective_reuse", "effective_reuse_recent", "decoder_busy_fraction",
              "decoder_busy_fraction_recent", "consumer_wait_fraction", "consumer_wait_fraction_recent", "consumer_wait_s")


def live(sampler: Any) -> str:
    """The progress bar's live figures: effective reuse and decoder busy over the last seconds."""
    stats = sampler.stats()
    return (f"reuse {stats.get('effective_reuse_recent', float('nan')):.1f}, decoder busy "
            f"{stats.get('decoder_busy_fraction_recent', float('nan')):.0%}")


def _window_reuse(start: dict[str, Any], end: dict[str, Any]) -> float:
    """Patches served per image decoded between two ``stats()`` snapshots (no warm-up bias)."""
    decoded = end["images_decoded"] - start["images_decoded"]
    return (end["patches_made"] - start["patches_made"]) / decoded if decoded else float("inf")


def summary_text(r: dict[str, Any]) -> str:
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
    if r.get("content"):
        k = r["content"]
        lines.append(f"content anchors    {k['redrawn']:,} of {k['checked']:,} tested patches redrawn, map "
                     f"{1e3 * k['map_s'] / max(1, k['maps']):.1f} ms per image, {k['set_aside']:,} images set aside")
    return "\n".join(lines) + "\n"
