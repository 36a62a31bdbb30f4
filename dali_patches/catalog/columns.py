"""Columns: every file's size, stamps and header as one table, read in worker processes when many.

:class:`Columns` is the table the catalog and the persistent index (:mod:`dali_patches.catalog.index`) share:
one row per file. :func:`read_columns` and :func:`stat_columns` fill it for a list of local files —
reading headers (:func:`~dali_patches.sources.headers.read_local`) or only stat-ing — in plain worker
subprocesses for large lists (they load neither DALI nor the user's script), since the per-file
Python would otherwise be GIL-bound.
"""

from __future__ import annotations

import functools
import os
import pickle
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields

import numpy as np
from tqdm.auto import tqdm

from ..sources.files import Problem
from ..sources.headers import Header, not_regular, read_local

__all__ = ["COLUMN_DTYPES", "Columns", "read_columns", "stat_columns"]

_CHUNK = 4096  # files per task given to a worker
_PROCESS_MIN_FILES = 50_000  # below this, worker processes cost more than they save


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


def _read_chunk(paths: Sequence[str]) -> Columns:
    out = Columns.empty(len(paths))
    for i, path in enumerate(paths):
        header, stat = read_local(path)
        out.put(i, header)
        if stat is not None:
            out.size[i], out.stamp[i], out.ctime[i] = stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns
            out.dev[i], out.ino[i] = stat.st_dev, stat.st_ino
    return out


def _stat_chunk(paths: Sequence[str]) -> Columns:
    out = Columns.empty(len(paths))
    rows: list[tuple[int, int, int, int, int]] = []
    for i, path in enumerate(paths):  # the hot loop of a second start: one list append per file
        try:
            stat = os.stat(path)
        except OSError as e:
            rows.append((-1, -1, 0, 0, 0))
            out.problem[i], out.messages[i] = b"unreadable", f"unreadable: {e.strerror or e}"
            continue
        if not_regular(stat.st_mode) is not None:  # read again, which reports it (never opened)
            rows.append((-1, -1, 0, 0, 0))
            continue
        rows.append((stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_dev, stat.st_ino))
    table = np.array(rows, dtype=np.uint64).reshape(-1, 5)
    out.size[:], out.stamp[:], out.ctime[:] = (table[:, k].view(np.int64) for k in range(3))
    out.dev[:], out.ino[:] = table[:, 3], table[:, 4]
    return out


class _Workers:
    """Worker processes (``dali_patches.catalog.index._worker("read"|"stat")``) that each take chunks of
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
    names = ("size", "stamp", "ctime", "dev", "ino", "problem") if work is _stat_chunk else ()
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

def read_columns(paths: Sequence[str], workers: int, bar: tqdm) -> Columns:
    """Size, stamps and header of every local file of ``paths``."""
    return _in_chunks(_read_chunk, paths, workers, bar)


def stat_columns(paths: Sequence[str], workers: int) -> Columns:
    """Size and stamps of every local file of ``paths`` (``size`` -1: unreadable, or not a regular
    file, which a header read then reports)."""
    return _in_chunks(_stat_chunk, paths, workers, tqdm(disable=True))


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
