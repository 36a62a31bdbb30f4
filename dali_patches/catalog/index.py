"""Index: every file's header, kept between runs, so a second start re-stats instead of re-reading.

One index per data-set root (a folder, or an ``s3://bucket/prefix``): a ``.npz`` of
:class:`~dali_patches.catalog.columns.Columns` keyed by each file's path relative to the root, its size, its
modification time in ns (an object's ETag digest), and what a rewrite cannot restore: the inode and
the inode's change time (``touch -d`` puts an old mtime back, a file system with coarse mtimes may
not see a quick rewrite; neither keeps the ctime). A file whose key changed is read again; one no
longer listed drops out. Written atomically (a temporary file renamed over the old one): two
processes starting at once never leave a torn index, the later one's simply wins. A missing,
unreadable, foreign or damaged index (columns of the wrong length, type or range: checked on every
load) is rebuilt with an :class:`IndexWarning`, never trusted.

An entry that decoding proves wrong (the file decodes to another size than its header said) is
*distrusted*: its key is appended to a small side file next to the index (:func:`distrust`), and the
next start reads that file again and writes the corrected index — so a stale answer is healed once,
not worked around at every start.

Ranks on one machine (``LOCAL_RANK`` of ``LOCAL_WORLD_SIZE``, as ``torchrun`` sets them) share the
first scan: each reads every W-th of the files the index lacks and leaves its part beside the index;
each merges all parts (the same result everywhere); local rank 0 writes the new index. A rank that
waits too long for a peer's part reads that part itself, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..sources.files import PROBLEM_KINDS, user_stacklevel
from .columns import COLUMN_DTYPES, Columns, read_columns, stat_columns

__all__ = ["IndexWarning", "default_index_path", "distrust", "load_index", "lookup"]

log = logging.getLogger(__name__)

_VERSION = 2  # 2: ctime in the key, structure checked on load
_PATIENCE_S = 120.0  # extra wait for a peer rank's part beyond this rank's own scan time
_DISTRUST = ".distrust"  # suffix of the side file listing entries decoding proved wrong


class IndexWarning(UserWarning):
    """The index could not be used (unreadable, foreign, not writable) or a peer rank was late."""


def default_index_path(root: str) -> str:
    """Where the index of ``root`` lives unless ``index=`` says otherwise: the user's cache folder
    (``$XDG_CACHE_HOME``, else ``~/.cache``) / ``dali_patches`` / a digest of the root."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = hashlib.sha256(root.encode()).hexdigest()[:24]
    return os.path.join(base, "dali_patches", "index", f"{name}.npz")


# -- the index file ----------------------------------------------------------------------------
def _damage(table: Columns, count: int) -> str | None:
    """What is structurally wrong with a loaded table of ``count`` rows, or ``None``."""
    for f in fields(Columns):
        if f.name == "messages":
            continue
        column = getattr(table, f.name)
        if column.shape != (count,) or column.dtype != COLUMN_DTYPES[f.name]:
            return f"column {f.name!r} is {column.dtype}{list(column.shape)}, not {COLUMN_DTYPES[f.name]}[{count}]"
    kinds = {k.encode() for k in PROBLEM_KINDS} | {b""}
    usable = table.problem == b""
    checks = {"size below -1": table.size < -1, "problem kinds unknown": ~np.isin(table.problem, list(kinds)),
              "a usable image of no pixels": usable & ((table.height <= 0) | (table.width <= 0)),
              "channels outside 1-4": usable & ((table.channels < 1) | (table.channels > 4)),
              "a problem without its message": ~usable & ~np.isin(np.arange(count), list(table.messages))}
    for what, bad in checks.items():
        if bad.any():
            return f"{int(bad.sum())} row(s) with {what} (e.g. row {int(np.flatnonzero(bad)[0])})"
    if any(not 0 <= k < count for k in table.messages):
        return "messages of rows that do not exist"
    return None


def _load(path: str, root: str) -> tuple[list[str], Columns] | None:
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes().decode())
            if meta.get("version") != _VERSION or meta.get("root") != root:
                warnings.warn(f"index {path!r} belongs to {meta.get('root')!r} (version {meta.get('version')}), "
                              f"not {root!r}; building a new one", IndexWarning, stacklevel=user_stacklevel())
                return None
            count = meta["count"]
            keys = data["keys"].tobytes().decode("utf-8", "surrogateescape").split("\0") if count else []
            cols = {f.name: data[f.name] for f in fields(Columns) if f.name != "messages"}
            table = Columns(**cols, messages={int(k): str(v) for k, v in meta["messages"].items()})
            damage = "keys and rows differ in number" if len(keys) != count else _damage(table, count)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: rebuild, never trust it
        warnings.warn(f"index {path!r} is unreadable ({type(e).__name__}: {e}); building a new one",
                      IndexWarning, stacklevel=user_stacklevel())
        return None
    if damage is not None:
        warnings.warn(f"index {path!r} is damaged ({damage}); building a new one", IndexWarning,
                      stacklevel=user_stacklevel())
        return None
    doubted = _distrusted(path)
    if doubted:  # decoding proved these entries wrong: read those files again
        table.stamp[np.isin(np.asarray(keys, dtype=object), list(doubted))] = -2
    return keys, table


def distrust(path: str | None, keys: Sequence[str]) -> None:
    """Note that the entries of ``keys`` in the index at ``path`` are wrong (decoding found another
    size than their header): the next start reads those files again and corrects the index. One line
    per key appended to a side file (cheap, and safe to call from a running sampler)."""
    if not path or not keys:
        return
    try:
        with open(path + _DISTRUST, "a", encoding="utf-8", errors="surrogateescape") as f:
            f.write("".join(key.replace("\n", " ") + "\n" for key in keys))
    except OSError as e:
        log.warning("cannot note stale index entries in %s: %s", path + _DISTRUST, e)


def _distrusted(path: str) -> set[str]:
    try:
        with open(path + _DISTRUST, encoding="utf-8", errors="surrogateescape") as f:
            return set(f.read().splitlines())
    except OSError:
        return set()


def _save(path: str, root: str, keys: Sequence[str], table: Columns) -> bool:
    """Write atomically; ``False`` (with a warning) when the folder is not writable."""
    meta = {"version": _VERSION, "root": root, "count": len(keys),
            "messages": {str(k): v for k, v in table.messages.items()}}
    arrays = {f.name: getattr(table, f.name) for f in fields(Columns) if f.name != "messages"}
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, keys=np.frombuffer("\0".join(keys).encode(), np.uint8),
                         meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            if os.path.exists(path + _DISTRUST):  # every distrusted entry was read again for this index
                os.unlink(path + _DISTRUST)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        warnings.warn(f"cannot write the catalog index {path!r} ({e.strerror or e}); the next start will scan "
                      "again. Pass index= a writable path, or index=False to stop trying", IndexWarning, stacklevel=user_stacklevel())
        return False
    return True


def load_index(path: str, root: str) -> tuple[list[str], Columns] | None:
    """The relative paths and columns an index of ``root`` holds, or ``None`` without a usable one
    (for ``trust_index``, which takes its file list from here and hands the result to :func:`lookup`)."""
    return _load(path, root)


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


def _local_rank() -> tuple[int, int]:
    try:
        rank, world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1
    return (rank, world) if 0 <= rank < world else (0, 1)


def _read_shared(path: str, root: str, keys: Sequence[str], paths: Sequence[str], read: Callable[[Sequence[str], tqdm], Columns],
                 bar: tqdm, report: dict[str, Any]) -> Columns:
    """Headers of ``paths`` (keys ``keys``): this rank's share read here, the others' taken from
    their parts beside the index (read here too when a peer is too late)."""
    rank, world = _local_rank()
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
    _save(part(rank), root, [keys[i] for i in mine.tolist()], out.take(mine))
    deadline = time.perf_counter() + 2 * (time.perf_counter() - t0) + _PATIENCE_S
    waiting = [r for r in range(world) if r != rank]
    while waiting:
        for r in list(waiting):
            loaded = _load(part(r), root) if os.path.exists(part(r)) else None
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
           read: Callable[[Sequence[str], tqdm], Columns] | None = None, stamps: Columns | None = None,
           workers: int = 0, progress: bool = False, report: dict[str, Any] | None = None,
           loaded: tuple[list[str], Columns] | None = None) -> Columns:
    """Headers of ``paths`` (``keys``: their paths relative to ``root``), from the index at ``index``
    where size and stamp still match, read (and the index updated) where not.

    Args:
        read: reads the headers of some paths (default: local files, in worker processes when many).
        stamps: size/stamp/dev/ino already known (object listings); default: stat the files.
        trust: take the index's rows without stat-ing (read-only data sets).
        index: the index file, or ``None`` for none (every start reads every header).
        report: filled with ``files``, ``from_index``, ``read_here``, ``read_by_peers`` (local
            ranks) and ``seconds``.
        loaded: the index as :func:`load_index` already read it (not read again).
    """
    t0 = time.perf_counter()
    report = {} if report is None else report
    report.update(files=len(paths), from_index=0, read_here=0, read_by_peers=0, index=index)
    workers = workers or os.cpu_count() or 1
    read = read or (lambda some, bar: read_columns(some, workers, bar))
    if loaded is None and index:
        loaded = _load(index, root)
    bar = tqdm(total=len(paths), desc="scanning headers", unit="file", disable=not progress)
    with bar:
        if stamps is None and loaded is not None and not trust:  # without an index, reading stats too
            stamps = stat_columns(paths, workers)
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
    if index and (len(stale) or loaded is None or len(loaded[0]) != len(keys)) and _local_rank()[0] == 0:
        listed = np.flatnonzero(out.stamp >= 0)
        _save(index, root, [keys[i] for i in listed.tolist()], out.take(listed))
        _remove_old_parts(index)
        log.info("index %s: %d files, %d read this time", index, len(listed), len(stale))
    report["seconds"] = time.perf_counter() - t0
    return out


