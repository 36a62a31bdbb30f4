"""Columns: every item's size, stamps and header as one table.

:class:`Columns` is what a source reports about its items (:meth:`~dali_patches.sources.base.Source.read_headers`)
and what the catalog and the persistent index (:mod:`dali_patches.catalog.index`) keep: one row per
location.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from .base import Problem
from .headers import Header

__all__ = ["COLUMN_DTYPES", "Columns"]


COLUMN_DTYPES: dict[str, np.dtype] = {"size": np.dtype(np.int64), "stamp": np.dtype(np.int64), "ctime": np.dtype(np.int64),
                 "dev": np.dtype(np.uint64), "ino": np.dtype(np.uint64), "height": np.dtype(np.int32),
                 "width": np.dtype(np.int32), "channels": np.dtype(np.uint8), "transposed": np.dtype(bool),
                 "mode": np.dtype("S12"), "format": np.dtype("S24"), "problem": np.dtype("S24")}


@dataclass
class Columns:
    """One row per file: ``size`` bytes and ``stamp`` (mtime ns or ETag digest; -1: unreadable),
    ``ctime`` (the inode's change time in ns, which no rewrite can set back; 0 for objects),
    ``dev``/``ino`` (0 for objects), the header as stored (``height``/``width`` before EXIF
    orientation, ``channels``, ``transposed``, ``mode``, ``format``), and ``problem``: the
    :class:`~dali_patches.sources.files.Problem` kind (``b""``: a usable image) with its message in
    ``messages`` (row → text). :data:`COLUMN_DTYPES` gives each column's type."""

    size: np.ndarray
    stamp: np.ndarray
    ctime: np.ndarray
    dev: np.ndarray
    ino: np.ndarray
    height: np.ndarray
    width: np.ndarray
    channels: np.ndarray
    transposed: np.ndarray
    mode: np.ndarray
    format: np.ndarray
    problem: np.ndarray
    messages: dict[int, str]

    @classmethod
    def empty(cls, n: int) -> Columns:
        d = COLUMN_DTYPES
        return cls(np.full(n, -1, d["size"]), np.full(n, -1, d["stamp"]),
                   **{name: np.zeros(n, d[name]) for name in d if name not in ("size", "stamp")}, messages={})

    def put(self, i: int, header: Header | Problem) -> None:
        """Row ``i`` holds ``header`` (or the problem that stands in for it)."""
        if isinstance(header, Problem):
            self.problem[i], self.messages[i] = header.kind.encode(), str(header)
        else:
            self.height[i], self.width[i], self.channels[i] = header.height, header.width, header.channels
            self.mode[i], self.format[i], self.transposed[i] = header.mode.encode(), header.format.encode(), header.transposed

    def problem_at(self, i: int) -> Problem | None:
        kind = self.problem[i]
        return Problem(self.messages[i], kind.decode()) if kind else None

    def take(self, rows: np.ndarray) -> Columns:
        """The rows ``rows`` (``(M,) int``) in that order."""
        cols = {f.name: getattr(self, f.name)[rows] for f in fields(self) if f.name != "messages"}
        marked = np.flatnonzero(np.isin(rows, np.fromiter(self.messages, np.int64, len(self.messages))))
        return Columns(**cols, messages={int(j): self.messages[int(rows[j])] for j in marked})

    def assign(self, rows: np.ndarray | slice, other: Columns, names: Sequence[str] = ()) -> None:
        """Rows ``rows`` (indices, or a slice) of this table ← every row of ``other`` (only the
        columns ``names``, if given)."""
        for name in names or [f.name for f in fields(self) if f.name != "messages"]:
            getattr(self, name)[rows] = getattr(other, name)
        for j, text in other.messages.items():
            self.messages[rows.start + j if isinstance(rows, slice) else int(rows[j])] = text
