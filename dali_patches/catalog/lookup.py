"""Lookup: headers of a listing from the persistent index where the files are unchanged, read (and
the index written again) where not — the reading shared among the ranks of one machine.

Ranks on one machine (``LOCAL_RANK`` of ``LOCAL_WORLD_SIZE``, as ``torchrun`` sets them) share the
first scan: each reads every W-th of the items the index lacks and leaves its part beside the
index; each merges all parts (the same result everywhere); local rank 0 writes the new index. A
rank that waits too long for a peer's part reads that part itself, with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..ranks import local_rank
from ..sources.base import user_stacklevel
from ..sources.columns import Columns
from .index import IndexWarning, load_index, save_index

__all__ = ["lookup"]

log = logging.getLogger(__name__)

_PATIENCE_S = 120.0  # extra wait for a peer rank's part beyond this rank's own scan time


def _remove_old_parts(path: str, age_s: float = 600.0) -> None:
    """Parts that peer ranks left beside the index more than ``age_s`` ago (every rank has merged
    them by then, or read the late share itself)."""
    folder, name = os.path.split(path)
    try:
        for entry in os.scandir(folder or "."):
            if entry.name.startswith(name + ".part-") and time.time() - entry.stat().st_mtime > age_s:
                os.unlink(entry.path)
    except OSError:
        pass


def _read_shared(path: str, root: str, keys: Sequence[str], paths: Sequence[str], read: Callable[[Sequence[str], tqdm], Columns],
                 bar: tqdm, report: dict[str, Any]) -> Columns:
    """Headers of ``paths`` (keys ``keys``): this rank's share read here, the others' taken from
    their parts beside the index (read here too when a peer is too late)."""
    rank, world = local_rank()
    if world == 1 or not paths:
        report["read_here"] = len(paths)
        return read(paths, bar)
    token = hashlib.sha256("\0".join(keys).encode()).hexdigest()[:16]

    def part(r: int) -> str:
        return f"{path}.part-{token}-{r}of{world}.npz"

    t0 = time.perf_counter()
    out = Columns.empty(len(paths))
    mine = np.arange(rank, len(paths), world)
    out.assign(mine, read([paths[i] for i in mine.tolist()], bar))
    report["read_here"], report["read_by_peers"] = len(mine), len(paths) - len(mine)
    save_index(part(rank), root, [keys[i] for i in mine.tolist()], out.take(mine))
    deadline = time.perf_counter() + 2 * (time.perf_counter() - t0) + _PATIENCE_S
    waiting = [r for r in range(world) if r != rank]
    while waiting:
        for r in list(waiting):
            loaded = load_index(part(r), root) if os.path.exists(part(r)) else None
            rows = np.arange(r, len(paths), world)
            if loaded is not None and loaded[0] == [keys[i] for i in rows.tolist()]:
                out.assign(rows, loaded[1])
                waiting.remove(r)
                bar.update(len(rows))
        if waiting and time.perf_counter() > deadline:
            warnings.warn(f"local rank(s) {waiting} did not share their part of the header scan in time; "
                          "reading it here", IndexWarning, stacklevel=user_stacklevel())
            for r in waiting:
                rows = np.arange(r, len(paths), world)
                out.assign(rows, read([paths[i] for i in rows.tolist()], bar))
                report["read_here"] += len(rows)
                report["read_by_peers"] -= len(rows)
            break
        if waiting:
            time.sleep(0.05)
    return out


def _unchanged(old: Columns, now: Columns) -> np.ndarray:
    """Rows whose file is the one the index saw: the same size, mtime (or ETag digest), inode change
    time and inode, and one that could be stat-ed."""
    return ((old.size == now.size) & (old.stamp == now.stamp) & (old.ctime == now.ctime) & (old.ino == now.ino)
            & (now.size >= 0))


def lookup(paths: Sequence[str], keys: list[str], root: str, index: str | None, trust: bool,
           read: Callable[[Sequence[str], tqdm], Columns], stat: Callable[[Sequence[str]], Columns | None],
           stamps: Columns | None = None, progress: bool = False, report: dict[str, Any] | None = None,
           loaded: tuple[list[str], Columns] | None = None) -> Columns:
    """Headers of ``paths`` (``keys``: their locations relative to ``root``), from the index at
    ``index`` where size and stamps still match, read (and the index updated) where not.

    Args:
        read: reads the headers of some paths (the source's :meth:`~dali_patches.sources.base.Source.read_headers`).
        stat: their sizes and stamps now (the source's ``stat``), asked only when the index is
            compared and ``stamps`` is ``None``.
        stamps: size and stamps already known (listings of objects and tar members).
        trust: take the index's rows without stat-ing (read-only data sets).
        index: the index file, or ``None`` for none (every start reads every header).
        report: filled with ``files``, ``from_index``, ``read_here``, ``read_by_peers`` (local
            ranks) and ``seconds``.
        loaded: the index as :func:`load_index` already read it (not read again).
    """
    t0 = time.perf_counter()
    report = {} if report is None else report
    report.update(files=len(paths), from_index=0, read_here=0, read_by_peers=0, index=index)
    if loaded is None and index:
        loaded = load_index(index, root)
    bar = tqdm(total=len(paths), desc="scanning headers", unit="file", disable=not progress)
    with bar:
        if stamps is None and loaded is not None and not trust:  # without an index, reading stats too
            stamps = stat(paths)
        out = Columns.empty(len(paths))
        fresh = np.ones(len(paths), bool)
        if loaded is not None:
            table = loaded[1]
            if loaded[0] == keys and (table.stamp != -2).all() and (stamps is None or _unchanged(table, stamps).all()):
                out, found = table, np.arange(len(keys))  # the usual second start: nothing changed
            else:
                position = {k: i for i, k in enumerate(loaded[0])}
                where = np.fromiter((position.get(k, -1) for k in keys), np.int64, len(keys))
                found = np.flatnonzero(where >= 0)
                old = table.take(where[found])
                same = old.stamp != -2  # never an entry decoding proved wrong
                if stamps is not None:
                    same &= _unchanged(old, stamps.take(found))
                found, old = found[same], old.take(np.flatnonzero(same))
                out.assign(found, old)
            fresh[found] = False
            bar.update(len(found))
            report["from_index"] = len(found)
        stale = np.flatnonzero(fresh)
        if len(stale):
            some = [paths[i] for i in stale.tolist()]
            if index:
                out.assign(stale, _read_shared(index, root, [keys[i] for i in stale.tolist()], some, read, bar, report))
            else:
                out.assign(stale, read(some, bar))
                report["read_here"] = len(stale)
        if stamps is not None:  # the files as they are now
            out.size[:], out.stamp[:], out.ctime[:] = stamps.size, stamps.stamp, stamps.ctime
            out.dev[:], out.ino[:] = stamps.dev, stamps.ino
    rank, world = local_rank()
    if index and (len(stale) or loaded is None or len(loaded[0]) != len(keys)) and (rank == 0 or world == 1):
        listed = np.flatnonzero(out.stamp >= 0)
        save_index(index, root, [keys[i] for i in listed.tolist()], out.take(listed))
        _remove_old_parts(index)
        log.info("index %s: %d files, %d read this time", index, len(listed), len(stale))
    report["seconds"] = time.perf_counter() - t0
    return out


