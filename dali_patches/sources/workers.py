"""Workers: sizes, stamps and headers of many local files, in worker processes when many.

:func:`read_columns` and :func:`stat_columns` fill :class:`~dali_patches.sources.columns.Columns` for a
list of local files — reading headers (:func:`~dali_patches.sources.headers.read_local`) or only
stat-ing — in plain worker subprocesses for large lists (they load neither DALI nor the user's
script), since the per-file Python would otherwise be GIL-bound.
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
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm.auto import tqdm

from .base import Problem
from .columns import Columns
from .headers import Header, not_regular, parse, pillow_header, read_local

__all__ = ["ranged_headers", "read_columns", "stat_columns"]

_CHUNK = 4096  # files per task given to a worker
_PROCESS_MIN_FILES = 50_000  # below this, worker processes cost more than they save


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
    """Worker processes (:func:`_worker`, ``"read"`` or ``"stat"``) that each take chunks of
    paths on stdin and answer with their :class:`Columns`. Plain
    subprocesses rather than ``multiprocessing``: they never re-run the user's script (which
    ``spawn`` does without an ``if __name__ == "__main__"`` guard) and never fork a threaded process."""

    def __init__(self, mode: str, count: int) -> None:
        self.errors = [tempfile.TemporaryFile() for _ in range(count)]  # noqa: SIM115 - closed in close()
        package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


def ranged_headers(locations: Sequence[str], sizes: Sequence[int], read_range: Callable[[str, int, int], bytes],
                   read_all: Callable[[str], bytes], bar: tqdm, threads: int) -> Columns:
    """Headers of items read through ``read_range(location, offset, length)`` (objects, tar
    members: a few positioned reads each, Pillow on ``read_all(location)`` where the parser is not
    certain), ``threads`` at a time (network- or seek-bound, not CPU-bound). ``sizes``: each item's
    bytes, from the listing. An item that cannot be read is a ``"unreadable"`` problem, named."""
    out = Columns.empty(len(locations))

    def one(i: int) -> Header | Problem:
        location, size = locations[i], int(sizes[i])
        try:
            found = parse(functools.partial(read_range, location), size, os.path.splitext(location)[1])
            return pillow_header(read_all(location)) if found is None else found
        except Exception as e:  # noqa: BLE001 - a refused or failed read: the item is left out, named
            return Problem(f"unreadable: {e}", "unreadable")

    with ThreadPoolExecutor(threads) as pool:
        for i, header in enumerate(pool.map(one, range(len(locations)))):
            out.put(i, header)  # size and stamps: the listing's
            bar.update(1)
    return out
