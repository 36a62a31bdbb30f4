"""Local files: a folder (searched recursively), a glob, one file or a list of files, or images with
named companions (parallel folders, globs or explicit rows: see :mod:`dali_patches.sources.pairing`).

Headers are read with positioned reads (in worker processes for large lists), DALI's
``fn.readers.file`` feeds the decoder (read, not mapped: a file rewritten in place under a mapping
would kill the process with SIGBUS), and only regular files are ever opened: a FIFO or a device
put in a file's place during the run is found by :meth:`LocalFiles.irregular` and released by
:meth:`LocalFiles.unblock`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from ..options import Companion
from .base import MAIN, Items, Source
from .columns import Columns
from .feeding import ReadsFiles
from .headers import not_regular
from .pairing import pair_sources
from .workers import read_columns, stat_columns

__all__ = ["LocalFiles", "local_root"]


def local_root(source: Any, paths: Sequence[str]) -> str:
    """The folder every path lies under, as the paths spell it: the folder itself for a folder
    source, else the common folder of the paths."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(os.fspath(source)):
        return os.fspath(source).rstrip("/") or "/"
    if isinstance(source, Mapping) and all(isinstance(v, (str, os.PathLike)) for v in source.values()):
        main = os.fspath(source[MAIN])
        if os.path.isdir(main) and not paths:
            return main.rstrip("/") or "/"
    try:
        return os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else ""
    except ValueError:  # absolute and relative paths mixed
        return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])


class LocalFiles(ReadsFiles, Source):
    """Images on a local (or mounted) file system.

    Args:
        spec: a folder, a glob, one file, a list of files, or a dict/list naming companions.
        companions: the resolved companions the spec names (see :func:`~dali_patches.sources.declared_companions`).
    """

    def __init__(self, spec: Any, companions: Sequence[Companion] = ()) -> None:
        self._spec = spec
        self.companions = tuple(companions)
        folder = isinstance(spec, (str, os.PathLike)) and os.path.isdir(os.fspath(spec))
        self.root = local_root(spec, []) if folder else ""
        self.identity = os.path.abspath(self.root) if folder else ""

    @classmethod
    def claims(cls, spec: Any) -> bool:
        """Anything else: local paths (checked when listed)."""
        return True

    def items(self, keys: Sequence[str] | None = None) -> Items:
        """The listing (or, for a folder without companions, the ``keys`` a trusted index holds:
        no walk, no stat)."""
        if keys is not None and self.root and not self.companions:
            prefix = self.root.rstrip("/") + "/"
            return Items([(prefix + ("\0" + prefix).join(keys)).split("\0") if keys else []])
        columns, skipped, notes = pair_sources(self._spec, [c.name for c in self.companions])
        if not self.root:
            self.root = local_root(self._spec, [p for column in columns for p in column])
            self.identity = os.path.abspath(self.root)
        return Items(columns, skipped, None, notes.ignored, notes.ignored_examples)

    def read_headers(self, locations: Sequence[str], bar: tqdm, workers: int = 0) -> Columns:
        return read_columns(locations, workers or os.cpu_count() or 1, bar)

    def stat(self, locations: Sequence[str], workers: int = 0) -> Columns | None:
        return stat_columns(locations, workers or os.cpu_count() or 1)

    def read(self, location: str) -> bytes:
        with open(location, "rb") as f:
            return f.read()

    def irregular(self, locations: Sequence[str]) -> dict[int, str]:
        """Stats each location (never opens it)."""
        found: dict[int, str] = {}
        for i, path in enumerate(locations):
            try:
                mode = os.stat(path).st_mode
            except OSError:
                continue  # missing: the reader names it
            why = not_regular(mode)
            if why is not None:
                found[i] = f"became {why[:why.index(',')]} during the run" if "," in why else str(why)
        return found

    def unblock(self, locations: Sequence[str]) -> list[str]:
        """Opens each FIFO among ``locations`` for writing, without blocking, and closes it: a reader
        stuck opening it then reads an empty file (an error the decode stage blames on it)."""
        poked = []
        for i in self.irregular(locations):
            try:
                fd = os.open(locations[i], os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                continue  # not a FIFO, or no reader waiting on it
            os.close(fd)
            poked.append(locations[i])
        return poked

