"""Index: every item's header, kept between runs, so a second start re-stats instead of re-reading.

One index per data-set root (a folder, an ``s3://bucket/prefix``, the folder of a set of tar
shards): a ``.npz`` of :class:`~dali_patches.sources.columns.Columns` keyed by each location
relative to the root (``shard-000000.tar#0001.jpg`` for a member), its size, its
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
Ranks on one machine share the first scan (:mod:`dali_patches.catalog.lookup`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import fields

import numpy as np

from ..sources.base import PROBLEM_KINDS, cache_folder, user_stacklevel
from ..sources.columns import COLUMN_DTYPES, Columns

__all__ = ["INDEX_MIN_FILES", "IndexWarning", "default_index_path", "distrust", "index_path", "load_index", "save_index"]

log = logging.getLogger(__name__)

_VERSION = 2  # 2: ctime in the key, structure checked on load
INDEX_MIN_FILES = 1000  # index=None keeps an index from this many items on (smaller scans are instant)
_DISTRUST = ".distrust"  # suffix of the side file listing entries decoding proved wrong


class IndexWarning(UserWarning):
    """The index could not be used (unreadable, foreign, not writable) or a peer rank was late."""


def default_index_path(root: str) -> str:
    """Where the index of ``root`` lives unless ``index=`` says otherwise: the user's cache folder
    (``$XDG_CACHE_HOME``, else ``~/.cache``) / ``dali_patches`` / a digest of the root."""
    return cache_folder("index", f"{hashlib.sha256(root.encode()).hexdigest()[:24]}.npz")


def index_path(index: str | os.PathLike | bool | None, identity: str, count: int) -> str | None:
    """The index file of the data set ``identity`` of ``count`` items, as ``index=`` asks: ``None``
    keeps one under the user's cache folder from :data:`INDEX_MIN_FILES` items on, ``True`` always,
    a path there, ``False`` none (``None`` returned)."""
    if index is False or (index is None and count < INDEX_MIN_FILES):
        return None
    if index is None or index is True:
        return default_index_path(identity)
    return os.fspath(index)


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


def load_index(path: str, root: str) -> tuple[list[str], Columns] | None:
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


def save_index(path: str, root: str, keys: Sequence[str], table: Columns) -> bool:
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
