"""Verify: decode every JPEG once, before sampling, to find those whose data libjpeg only warns about.

A JPEG whose entropy-coded data is damaged (a truncated body with an end marker appended, a few bad
bytes) decodes without an error: libjpeg fills the rest with grey and prints a warning to the
process's stderr, naming no file. ``PatchSampler(verify=True)`` and ``inspect --verify`` decode each
file alone with file descriptor 2 captured, so each warning is tied to its file.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence

from nvidia.dali import fn, pipeline_def, types
from tqdm.auto import tqdm

from ..sources import open_source
from ..sources.base import Problem, Source
from .decode import error_cause

__all__ = ["find_corrupt"]


_LIBJPEG_WARNING = "Corrupt JPEG data"


def find_corrupt(paths: Sequence[str], num_threads: int = 1, progress: bool = False,
                 source: Source | None = None) -> dict[str, Problem]:
    """Decode every JPEG of ``paths`` once with DALI's CPU decoder and return those whose data is
    corrupt: libjpeg decodes them without an error (grey or garbled rows, e.g. a truncated body with
    an end marker appended) and only prints a warning to the process's stderr, naming no file. Each
    file's decode runs with file descriptor 2 captured, so the warning is tied to its file and not
    shown. A full decode of the data set: opt-in (``PatchSampler(verify=True)``, ``inspect --verify``).
    Other threads' stderr output during the pass is captured too (and dropped). ``source``: where
    the locations live (``None``: local files or objects, as the locations say)."""
    jpegs = [p for p in paths if p.lower().endswith((".jpg", ".jpeg"))]
    found: dict[str, Problem] = {}
    if not jpegs:
        return found

    reader = (source or open_source(jpegs)).reader(range(len(jpegs)), [jpegs], shuffle=False)

    @pipeline_def(batch_size=1, num_threads=num_threads, device_id=None, prefetch_queue_depth=1,
                  enable_checkpointing=reader.checkpointing)
    def one_by_one():  # a DALI graph
        (encoded,), _ = reader.nodes()
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    with reader.building():
        pipe = one_by_one()
        pipe.build()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as captured, tqdm(jpegs, desc="verifying JPEG data", unit="file",
                                                        disable=not progress, leave=False) as bar:
            for path in bar:
                sys.stderr.flush()
                captured.seek(0)
                captured.truncate()
                os.dup2(captured.fileno(), 2)
                try:
                    pipe.run()
                    error = ""
                except RuntimeError as e:
                    error = error_cause(e)
                finally:
                    os.dup2(saved, 2)
                captured.seek(0)
                warned = [ln for ln in captured.read().decode(errors="replace").splitlines() if _LIBJPEG_WARNING in ln]
                if error:  # the next run() goes on with the next file
                    found[path] = Problem(f"the decoder rejects it ({error})", "corrupt data")
                elif warned:
                    found[path] = Problem(f"libjpeg: {warned[0].strip()}; part of its pixels would be grey", "corrupt data")
    finally:
        os.close(saved)
    return found
