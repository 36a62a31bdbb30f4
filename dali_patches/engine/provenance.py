"""Provenance log: every delivered patch's ``(batch index, source, y, x)``, appended to one file.

Format (little-endian): the magic ``b"DPPROV1\\n"``, an 8-byte header length, a JSON header (files,
image sizes, patch size, settings), then fixed-size records of :data:`RECORD` — 16 bytes per patch,
written and flushed to the operating system once per batch (4 KiB at B 256), so a run of 100 M
patches takes 1.6 GB and a crashed run leaves every batch written before the crash readable; the
header is on disk from construction on. A write that fails (full disk, file-size limit) raises
:class:`OSError` naming the log, so that no delivered patch goes unrecorded without the run knowing.
:func:`dali_patches.review.load` reads it back.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from typing import Any

import numpy as np

__all__ = ["MAGIC", "ProvenanceWriter", "RECORD"]

MAGIC = b"DPPROV1\n"
RECORD = np.dtype([("batch", "<i8"), ("source", "<i4"), ("y", "<i2"), ("x", "<i2")])
_BIG = np.dtype([("batch", "<i8"), ("source", "<i4"), ("y", "<i4"), ("x", "<i4")])


class ProvenanceWriter:
    """Appends the provenance of each delivered batch to ``path``.

    Args:
        path: file to create (overwritten).
        header: JSON-able description of the run; must hold ``files`` (paths indexed by ``source``),
            ``heights``/``widths`` and ``patch_size``. Anchors of images over 32767 px are stored
            as 32-bit (``header["record"]`` says which).
    """

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]) -> None:
        big = max(max(header["heights"], default=0), max(header["widths"], default=0)) > np.iinfo(np.int16).max
        self.record = _BIG if big else RECORD
        text = json.dumps({**header, "record": "int32" if big else "int16"}).encode()
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self.patches = 0
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - kept open for the run, closed by close()
        self._write(MAGIC + len(text).to_bytes(8, "little") + text, "its header")

    def _write(self, data: bytes, what: str) -> None:
        start = self._file.tell()
        try:
            view = memoryview(data)
            while view:  # an unbuffered write may take part of the bytes
                view = view[self._file.write(view):]
        except OSError as e:
            with contextlib.suppress(OSError):  # no partial batch is left behind: the log ends on whole batches
                self._file.truncate(start)
            msg = (f"provenance log {self.path!r}: writing {what} failed ({e.strerror or e}) after {self.patches} "
                   "patches were recorded; free space on its disk or put the log elsewhere (provenance=...). "
                   "The run stops here so that no delivered patch goes unrecorded")
            raise OSError(e.errno, msg) from e

    def write(self, batch: int, source: np.ndarray, anchor: np.ndarray) -> None:
        """Record one batch: ``source`` ``(B,)`` and ``anchor`` ``(B, 2)`` host arrays."""
        rows = np.empty(len(source), self.record)
        rows["batch"], rows["source"], rows["y"], rows["x"] = batch, source, anchor[:, 0], anchor[:, 1]
        with self._lock:
            if not self._file.closed:
                self._write(rows.tobytes(), f"batch {batch}")
                self.patches += len(rows)

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()
