"""Index: every file's header, kept between runs, so a second start re-stats instead of re-reading.

One index per data-set root (a folder, or an ``s3://bucket/prefix``): a ``.npz`` of columns keyed
by each file's path relative to the root, its size and its modification time in ns (an object's
ETag digest). A file whose size or stamp changed is read again; one no longer listed drops out.
Written atomically (a temporary file renamed over the old one): two processes starting at once
never leave a torn index, the later one's simply wins. A missing, unreadable or foreign index is
rebuilt with a warning, never trusted.

Ranks on one machine (``LOCAL_RANK`` of ``LOCAL_WORLD_SIZE``, as ``torchrun`` sets them) share the
first scan: each reads every W-th of the files the index lacks and leaves its part beside the index;
each merges all parts (the same result everywhere); local rank 0 writes the new index. A rank that
waits too long for a peer's part reads that part itself, with a warning.

Large lists are read and stat-ed in worker processes (plain Python subprocesses that load neither
DALI nor the user's script), since the per-file Python would otherwise be GIL-bound.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .headers import Header, read_local
from .sources import Problem

__all__ = ["Columns", "IndexWarning", "default_index_path", "load_index", "lookup"]

log = logging.getLogger(__name__)

_VERSION = 1
_CHUNK = 4096  # files per task given to a worker
_PROCESS_MIN_FILES = 50_000  # below this, worker processes cost more than they save
_PATIENCE_S = 120.0  # extra wait for a peer rank's part beyond this rank's own scan time


class IndexWarning(UserWarning):
    """The index could not be used (unreadable, foreign, not writable) or a peer rank was late."""


@dataclass
class Columns:
    """One row per file: ``size`` bytes and ``stamp`` (mtime ns or ETag digest; -1: unreadable),
    ``dev``/``ino`` (0 for objects), the header as stored (``height``/``width`` before EXIF
    orientation, ``channels``, ``transposed``, ``mode``, ``format``), and ``problem``: the
    :class:`~dali_patches.sources.Problem` kind (``b""``: a usable image) with its message in
    ``messages`` (row → text)."""

    size: np.ndarray
    stamp: np.ndarray
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
        z = np.zeros
        return cls(np.full(n, -1, np.int64), np.full(n, -1, np.int64), z(n, np.uint64), z(n, np.uint64),
                   z(n, np.int32), z(n, np.int32), z(n, np.uint8), z(n, bool), z(n, "S12"), z(n, "S24"),
                   z(n, "S16"), {})

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


def default_index_path(root: str) -> str:
    """Where the index of ``root`` lives unless ``index=`` says otherwise: the user's cache folder
    (``$XDG_CACHE_HOME``, else ``~/.cache``) / ``dali_patches`` / a digest of the root."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = hashlib.sha256(root.encode()).hexdigest()[:24]
    return os.path.join(base, "dali_patches", "index", f"{name}.npz")


# -- reading and stat-ing files, in worker processes when there are many --------------------------
def _read_chunk(paths: Sequence[str]) -> Columns:
    out = Columns.empty(len(paths))
    for i, path in enumerate(paths):
        header, stat = read_local(path)
        out.put(i, header)
        if stat is not None:
            out.size[i], out.stamp[i], out.dev[i], out.ino[i] = stat.st_size, stat.st_mtime_ns, stat.st_dev, stat.st_ino
    return out


def _stat_chunk(paths: Sequence[str]) -> Columns:
    out = Columns.empty(len(paths))
    rows: list[tuple[int, int, int, int]] = []
    for i, path in enumerate(paths):  # the hot loop of a second start: one list append per file
        try:
            stat = os.stat(path)
        except OSError as e:
            rows.append((-1, -1, 0, 0))
            out.problem[i], out.messages[i] = b"unreadable", f"unreadable: {e.strerror or e}"
            continue
        rows.append((stat.st_size, stat.st_mtime_ns, stat.st_dev, stat.st_ino))
    table = np.array(rows, dtype=np.uint64).reshape(-1, 4)
    out.size[:], out.stamp[:] = table[:, 0].view(np.int64), table[:, 1].view(np.int64)
    out.dev[:], out.ino[:] = table[:, 2], table[:, 3]
    return out


class _Workers:
    """Worker processes (``dali_patches.index._worker("read"|"stat")``) that each take chunks of
    paths on stdin and answer with their :class:`Columns`. Plain
    subprocesses rather than ``multiprocessing``: they never re-run the user's script (which
    ``spawn`` does without an ``if __name__ == "__main__"`` guard) and never fork a threaded process."""

    def __init__(self, mode: str, count: int) -> None:
        self.errors = [tempfile.TemporaryFile() for _ in range(count)]  # noqa: SIM115 - closed in close()
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-c", f"from {__name__} import _worker; _worker({mode!r})"]
        self.procs = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
                      for err in self.errors]

    def map(self, chunks: Sequence[Sequence[str]]) -> Iterator[Columns]:
        """Each chunk's columns, in order. Worker ``k`` takes chunks ``k, k + W, …``: a thread writes
        them all to its stdin (the pipe paces it) while another reads its answers, so a worker never
        waits for the parent."""
        results: dict[int, Columns | BaseException] = {}
        ready = threading.Condition()
        count = len(self.procs)

        def publish(i: int, result: Columns | BaseException) -> None:
            with ready:
                results[i] = result
                ready.notify_all()

        def write(k: int) -> None:
            stdin = self.procs[k].stdin
            try:
                for i in range(k, len(chunks), count):
                    data = "\0".join(chunks[i]).encode("utf-8", "surrogateescape")
                    stdin.write(len(data).to_bytes(8, "little") + data)  # type: ignore[union-attr]
                stdin.flush()  # type: ignore[union-attr]
            except (OSError, ValueError):
                pass  # the worker died: its reader reports why

        def read(k: int) -> None:
            stdout, errors = self.procs[k].stdout, self.errors[k]
            for i in range(k, len(chunks), count):
                try:
                    size = int.from_bytes(stdout.read(8), "little")  # type: ignore[union-attr]
                    result: Columns | BaseException = pickle.loads(stdout.read(size))  # type: ignore[union-attr]
                except Exception as e:  # noqa: BLE001 - a dead worker: its stderr tells why
                    errors.seek(0)
                    text = errors.read().decode(errors="replace")[-2000:]
                    result = RuntimeError(f"a header-scan worker process failed ({type(e).__name__}: {e}); its "
                                          f"output: {text or 'none'}")
                    for j in range(i, len(chunks), count):
                        publish(j, result)
                    return
                publish(i, result)

        for k in range(count):
            for target in (write, read):
                threading.Thread(target=target, args=(k,), daemon=True).start()
        for i in range(len(chunks)):
            with ready:
                ready.wait_for(functools.partial(results.__contains__, i))
                result = results.pop(i)
            if isinstance(result, BaseException):
                raise result
            yield result

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for errors in self.errors:
            errors.close()


def _in_chunks(work: Callable[[Sequence[str]], Columns], paths: Sequence[str], workers: int,
               bar: tqdm) -> Columns:
    out = Columns.empty(len(paths))
    names = ("size", "stamp", "dev", "ino", "problem") if work is _stat_chunk else ()
    chunks = [paths[s:s + _CHUNK] for s in range(0, len(paths), _CHUNK)]
    pool = _Workers("read" if work is _read_chunk else "stat", workers) \
        if len(paths) >= _PROCESS_MIN_FILES and workers > 1 else None
    try:
        parts = pool.map(chunks) if pool is not None else map(work, chunks)
        start = 0
        for part in parts:
            out.assign(slice(start, start + len(part.size)), part, names)
            start += len(part.size)
            bar.update(len(part.size))
    finally:
        if pool is not None:
            pool.close()
    return out


# -- the index file ----------------------------------------------------------------------------
def _load(path: str, root: str) -> tuple[list[str], Columns] | None:
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(data["meta"].tobytes().decode())
            if meta.get("version") != _VERSION or meta.get("root") != root:
                warnings.warn(f"index {path!r} belongs to {meta.get('root')!r} (version {meta.get('version')}), "
                              f"not {root!r}; building a new one", IndexWarning, stacklevel=4)
                return None
            keys = data["keys"].tobytes().decode().split("\0") if meta["count"] else []
            cols = {f.name: data[f.name] for f in fields(Columns) if f.name != "messages"}
            table = Columns(**cols, messages={int(k): v for k, v in meta["messages"].items()})
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: rebuild, never trust it
        warnings.warn(f"index {path!r} is unreadable ({type(e).__name__}: {e}); building a new one",
                      IndexWarning, stacklevel=4)
        return None
    if len(keys) != meta["count"] or len(table.size) != len(keys):
        warnings.warn(f"index {path!r} is inconsistent; building a new one", IndexWarning, stacklevel=4)
        return None
    return keys, table


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
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        warnings.warn(f"cannot write the catalog index {path!r} ({e.strerror or e}); the next start will scan "
                      "again. Pass index= a writable path, or index=False to stop trying", IndexWarning, stacklevel=4)
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
                          "reading it here", IndexWarning, stacklevel=4)
            for r in waiting:
                rows = np.arange(r, len(paths), world)
                out.assign(rows, read([paths[i] for i in rows.tolist()], bar))
                report["read_here"] += len(rows)
                report["read_by_peers"] -= len(rows)
            break
        if waiting:
            time.sleep(0.05)
    return out


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
    read = read or (lambda some, bar: _in_chunks(_read_chunk, some, workers, bar))
    if loaded is None and index:
        loaded = _load(index, root)
    bar = tqdm(total=len(paths), desc="scanning headers", unit="file", disable=not progress)
    with bar:
        if stamps is None and loaded is not None and not trust:  # without an index, reading stats too
            stamps = _in_chunks(_stat_chunk, paths, workers, tqdm(disable=True))
        out = Columns.empty(len(paths))
        fresh = np.ones(len(paths), bool)
        if loaded is not None:
            table = loaded[1]
            if loaded[0] == keys and (stamps is None or (
                    (table.size == stamps.size) & (table.stamp == stamps.stamp) & (stamps.size >= 0)).all()):
                out, found = table, np.arange(len(keys))  # the usual second start: nothing changed
            else:
                position = {k: i for i, k in enumerate(loaded[0])}
                where = np.fromiter((position.get(k, -1) for k in keys), np.int64, len(keys))
                found = np.flatnonzero(where >= 0)
                old = table.take(where[found])
                if stamps is not None:
                    same = (old.size == stamps.size[found]) & (old.stamp == stamps.stamp[found]) & (stamps.size[found] >= 0)
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
        if stamps is not None:  # where the files are now (a moved data set keeps its index rows)
            out.size[:], out.stamp[:], out.dev[:], out.ino[:] = stamps.size, stamps.stamp, stamps.dev, stamps.ino
    if index and (len(stale) or loaded is None or len(loaded[0]) != len(keys)) and _local_rank()[0] == 0:
        listed = np.flatnonzero(out.stamp >= 0)
        _save(index, root, [keys[i] for i in listed.tolist()], out.take(listed))
        _remove_old_parts(index)
        log.info("index %s: %d files, %d read this time", index, len(listed), len(stale))
    report["seconds"] = time.perf_counter() - t0
    return out


def _worker(mode: str) -> None:
    """A worker process: chunks of NUL-separated paths in (8-byte length first), pickled
    :class:`Columns` out, until stdin closes."""
    work = _read_chunk if mode == "read" else _stat_chunk
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    while len(head := source.read(8)) == 8:
        paths = source.read(int.from_bytes(head, "little")).decode("utf-8", "surrogateescape").split("\0")
        payload = pickle.dumps(work(paths), protocol=pickle.HIGHEST_PROTOCOL)
        sink.write(len(payload).to_bytes(8, "little") + payload)
        sink.flush()
