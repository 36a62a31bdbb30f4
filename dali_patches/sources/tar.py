"""Tar shards in the WebDataset layout: ``shard-000000.tar`` … holding ``key.jpg``, ``key.mask.png``,
``key.lr.png`` …, on a local file system or in S3 (``s3://``).

An item is a key (a member's path up to the first dot of its name); its main image is the member
whose extension is an image suffix (``key.jpg``), and companion ``name`` is the member
``key.name.<image suffix>`` (``key.mask.png`` for ``"mask"``). Other members (``.cls``, ``.json``)
are counted as ignored. A member's location is ``shard.tar#member`` (in ``files``, the index and
provenance logs). Items are decoded straight from their byte ranges — positioned reads of the
local file, ranged GETs of the object — through :class:`~dali_patches.sources.feeding.RangeReader`:
nothing is extracted to disk, and a patch costs 1/``reuse`` of its item's bytes.

A shard's member table (names, offsets, sizes: its tar headers) is read once and kept under the
user's cache folder, keyed by the shard's path, size and stamp; a changed shard is read again. A
member cut short by a truncated shard, a key in two shards, a key with two main images or without
a companion are skipped and reported like bad files; bad pixels are found by the decode stage.
With several ranks, whole shards are split among them when there are at least as many shards as
ranks (each rank then reads its own files only), items otherwise.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import hashlib
import io
import os
import tarfile
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..options import Companion
from .base import IMAGE_SUFFIXES, Items, Problem, Source, cache_folder
from .columns import Columns
from .feeding import RangeReader, Reader
from .s3 import is_uri, list_objects, object_root, patient, read_range
from .workers import ranged_headers

__all__ = ["SHARD_SUFFIX", "TarShards", "is_shard_spec"]

SHARD_SUFFIX = ".tar"
_MAIN_EXTS = {s[1:] for s in IMAGE_SUFFIXES}  # "jpg", "png", …: a member with one of these is an item's image
_LOCAL_THREADS = 8  # positioned reads of local shards (seek-bound on disks)
_OBJECT_THREADS = 32  # ranged GETs (network-bound)
_BLOCK = 64 * 1024  # bytes per ranged GET while reading an object's tar headers


def is_shard_spec(spec: Any) -> bool:
    """Whether ``spec`` names tar shards: a ``.tar`` path, URI or glob, a list of them, or a local
    folder holding ``.tar`` files and no images at its top level."""
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        if text.endswith(SHARD_SUFFIX):
            return True
        if not is_uri(text) and os.path.isdir(text):
            with os.scandir(text) as entries:
                names = [e.name.lower() for e in entries if e.is_file()]
            return any(n.endswith(SHARD_SUFFIX) for n in names) and not any(n.endswith(IMAGE_SUFFIXES) for n in names)
        return False
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(s, (str, os.PathLike)) for s in spec):
        return all(os.fspath(s).endswith(SHARD_SUFFIX) for s in spec)
    return False


class _ObjectFile(io.RawIOBase):
    """An object read through ranged GETs, for ``tarfile`` (seekable; wrap it in a buffer)."""

    def __init__(self, uri: str, size: int) -> None:
        self._uri, self._size, self._pos = uri, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = {0: offset, 1: self._pos + offset, 2: self._size + offset}[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: Any) -> int:
        data = read_range(self._uri, self._pos, min(len(buffer), max(0, self._size - self._pos)))
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


def _key_and_ext(name: str) -> tuple[str, str]:
    """WebDataset's split of a member name: the key is the path up to the first dot of the last
    component, the extension the rest (``a/b.mask.png`` → ``("a/b", "mask.png")``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class TarShards(Source):
    """Items stored as members of tar shards (see the module).

    Args:
        spec: a folder of shards, a glob (``"shards/*.tar"``, ``"s3://bucket/shards/*.tar"``), one
            shard, or a list of shard paths or URIs.
        companions: the companions each item has (``key.<name>.<suffix>`` members).
    """

    def __init__(self, spec: Any, companions: Sequence[Companion] = ()) -> None:
        self.companions = tuple(companions)
        self.shards, sizes, stamps, ctimes = _list_shards(spec)
        self._size, self._stamp, self._ctime = sizes, stamps, ctimes
        self._remote = is_uri(self.shards[0])
        if self._remote:
            self.root = self.identity = object_root(self.shards)
        else:
            self.root = os.path.commonpath([os.path.dirname(os.path.abspath(s)) for s in self.shards])
            self.identity = self.root
        self._members: dict[str, tuple[int, int, int]] = {}  # location → (shard, offset of the data, size)
        self._lock = threading.Lock()
        self.bytes_read = 0  # item bytes read for decoding since the start

    @classmethod
    def claims(cls, spec: Any) -> bool:
        return is_shard_spec(spec)

    # -- listing ------------------------------------------------------------------------------
    def _location(self, shard: int, member: str) -> str:
        return f"{self.shards[shard]}#{member}"

    def _table(self, shard: int) -> tuple[list[str], np.ndarray, np.ndarray, str | None]:
        """Names, data offsets and sizes of the regular members of a shard, in archive order, and why
        the shard ends early (``None``: it is whole). Kept in the cache folder per shard version."""
        uri = self.shards[shard]
        tag = f"{uri if self._remote else os.path.abspath(uri)}\0{self._size[shard]}\0{self._stamp[shard]}"
        path = cache_folder("tar", hashlib.sha256(tag.encode()).hexdigest()[:32] + ".npz")
        try:
            with np.load(path, allow_pickle=False) as kept:
                names = kept["names"].tobytes().decode("utf-8", "surrogateescape").split("\0") if len(kept["offsets"]) else []
                cut = kept["cut"].tobytes().decode() or None
                return names, kept["offsets"], kept["sizes"], cut
        except (OSError, KeyError, ValueError):
            pass
        names, offsets, sizes = [], [], []
        raw = _ObjectFile(uri, int(self._size[shard])) if self._remote else open(uri, "rb")  # noqa: SIM115
        with io.BufferedReader(raw, _BLOCK) if self._remote else raw as f, \
                tarfile.open(fileobj=f, mode="r:", encoding="utf-8", errors="surrogateescape") as tar:
            try:
                for member in tar:
                    if member.isfile():
                        names.append(member.name)
                        offsets.append(member.offset_data)
                        sizes.append(member.size)
            except tarfile.ReadError:  # "unexpected end of data": the shard ends inside the last member
                pass
        cut = None
        end = offsets[-1] + sizes[-1] if offsets else 0
        if end > self._size[shard]:
            cut = (f"the shard ends at byte {self._size[shard]}, inside this member (bytes {offsets[-1]}-{end}): it was "
                   "cut short, and members after it are lost; copy the shard again")
        table = (names, np.asarray(offsets, np.int64), np.asarray(sizes, np.int64), cut)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "wb") as out:
                np.savez(out, names=np.frombuffer("\0".join(names).encode("utf-8", "surrogateescape"), np.uint8),
                         offsets=table[1], sizes=table[2], cut=np.frombuffer((cut or "").encode(), np.uint8))
            os.replace(path + ".tmp", path)
        except OSError:
            pass  # read again at the next start
        return table

    def items(self, keys: Sequence[str] | None = None) -> Items:
        """Every key of every shard with its companions; members of other kinds counted as ignored."""
        with ThreadPoolExecutor(_OBJECT_THREADS if self._remote else _LOCAL_THREADS) as pool:
            tables = list(pool.map(self._table, range(len(self.shards))))
        names = [c.name for c in self.companions]
        found: dict[str, dict[str, str]] = {}  # key → part → location
        skipped: list[tuple[str, Problem]] = []
        ignored: Counter = Counter()
        examples: list[str] = []
        self._members.clear()
        for shard, (members, offsets, sizes, cut) in enumerate(tables):
            for member, offset, size in zip(members, offsets.tolist(), sizes.tolist()):
                location = self._location(shard, member)
                self._members[location] = (shard, offset, size)
                key, ext = _key_and_ext(member)
                part = "image" if ext in _MAIN_EXTS else next(
                    (n for n in names if ext.startswith(n + ".") and ext[len(n) + 1:] in _MAIN_EXTS), None)
                if cut is not None and member == members[-1]:
                    skipped.append((location, Problem(cut, "truncated")))
                    continue
                if part is None:
                    ignored["." + ext.rpartition(".")[2]] += 1
                    if len(examples) < 3:
                        examples.append(location)
                    continue
                parts = found.setdefault(key, {})
                if part in parts:
                    skipped.append((location, Problem(f"key {key!r} already has its {part!r} member {parts[part]!r}; "
                                                      "keep one member per key and part", "duplicate key")))
                    continue
                parts[part] = location
        columns: list[list[str]] = [[] for _ in range(1 + len(names))]
        for key, parts in found.items():
            if "image" not in parts:
                skipped += [(loc, Problem(f"this {part!r} member has no image with key {key!r}", "orphan companion"))
                            for part, loc in parts.items()]
                continue
            missing = [n for n in names if n not in parts]
            if missing:
                skipped.append((parts["image"], Problem(f"no {missing[0]!r} member with key {key!r} (a "
                                                        f"'{key}.{missing[0]}.png' or other image suffix); add it "
                                                        "or leave the companion out", "no partner")))
                continue
            for k, part in enumerate(["image", *names]):
                columns[k].append(parts[part])
        return Items(columns, skipped, self._stamps([loc for column in columns for loc in column]), ignored, examples,
                     warn_ignored=False)

    def _stamps(self, locations: Sequence[str]) -> Columns:
        """Size of each member; the stamp (mtime or ETag digest) and change time of its shard."""
        out = Columns.empty(len(locations))
        spots = np.array([self._members[loc] for loc in locations], np.int64).reshape(-1, 3)
        out.size[:] = spots[:, 2]
        out.stamp[:] = np.asarray(self._stamp, np.int64)[spots[:, 0]] if len(spots) else 0
        out.ctime[:] = np.asarray(self._ctime, np.int64)[spots[:, 0]] if len(spots) else 0
        return out

    def read_headers(self, locations: Sequence[str], bar: tqdm, workers: int = 0) -> Columns:
        sizes = [self._members[loc][2] for loc in locations]
        threads = workers or (_OBJECT_THREADS if self._remote else _LOCAL_THREADS)
        return ranged_headers(locations, sizes, self._read_range, self.read, bar, threads)

    # -- reading ------------------------------------------------------------------------------
    def _read_range(self, location: str, offset: int, length: int) -> bytes:
        shard, start, size = self._members[location]
        length = max(0, min(length, size - offset))
        if self._remote:
            return read_range(self.shards[shard], start + offset, length)
        with open(self.shards[shard], "rb") as f:
            return os.pread(f.fileno(), length, start + offset)

    def read(self, location: str) -> bytes:
        if location not in self._members:
            shard, _, member = location.partition("#")
            with tarfile.open(shard) as tar:
                extracted = tar.extractfile(member)
                if extracted is None:
                    msg = f"{location!r} is no file member of {shard!r}"
                    raise FileNotFoundError(msg)
                return extracted.read()
        return self._read_range(location, 0, self._members[location][2])

    def read_many(self, locations: Sequence[str]) -> list[bytes | Problem]:
        """Each member's bytes (a :class:`Problem` for one cut short); objects in threads, local
        shards one open file each. A store that stops answering is waited for (once), then raises."""
        out: list[bytes | Problem] = []
        if self._remote:
            with ThreadPoolExecutor(min(len(locations), _OBJECT_THREADS) or 1) as pool:
                out = list(pool.map(self._read_remote, locations))
        else:
            files: dict[int, Any] = {}
            try:
                for location in locations:
                    shard, start, size = self._members[location]
                    if shard not in files:
                        files[shard] = open(self.shards[shard], "rb")  # noqa: SIM115 - closed below
                    out.append(os.pread(files[shard].fileno(), size, start))
            finally:
                for f in files.values():
                    f.close()
        for i, (location, data) in enumerate(zip(locations, out)):
            size = self._members[location][2]
            if not isinstance(data, Problem) and len(data) < size:
                out[i] = Problem(f"only {len(data)} of its {size} bytes could be read: the shard is cut short "
                                 "(truncated since it was listed?)", "truncated")
        with self._lock:
            self.bytes_read += sum(len(v) for v in out if not isinstance(v, Problem))
        return out

    def _read_remote(self, location: str) -> bytes:
        shard, start, size = self._members[location]
        uri = self.shards[shard]
        return patient(functools.partial(read_range, uri, start, size), uri)

    def reader(self, labels: Sequence[int], columns: Sequence[Sequence[str]], read_as: np.ndarray | None = None, *,
               shard_id: int = 0, num_shards: int = 1, seed: int = 0, shuffle: bool = True, batch_size: int = 1,
               at: bytes | None = None) -> Reader:
        groups = np.fromiter((self._members[loc][0] for loc in columns[0]), np.int64, len(columns[0]))
        return RangeReader(labels, columns, read_as, self.read_many, groups, shard_id=shard_id, num_shards=num_shards,
                           seed=seed, shuffle=shuffle, batch_size=batch_size, at=at)


def _list_shards(spec: Any) -> tuple[list[str], list[int], list[int], list[int]]:
    """The shards ``spec`` names, sorted, with their sizes, stamps (mtime in ns, or an ETag digest)
    and change times."""
    given = [os.fspath(s) for s in spec] if isinstance(spec, (list, tuple)) else [os.fspath(spec)]
    if all(is_uri(s) for s in given):
        if len(given) == 1 and glob.has_magic(given[0]):
            pattern = given[0]
            prefix = pattern[:min(pattern.index(c) for c in "*?[" if c in pattern)]
            listing = list_objects(prefix, (SHARD_SUFFIX,))
            keep = [i for i, u in enumerate(listing.uris) if fnmatch.fnmatchcase(u, pattern)]
            if not keep:
                msg = f"no shards match {pattern!r}; check the pattern (objects found under {prefix!r}: {len(listing.uris)})"
                raise ValueError(msg)
            return ([listing.uris[i] for i in keep], listing.sizes[keep].tolist(), listing.stamps[keep].tolist(),
                    [0] * len(keep))
        listing = list_objects(given if len(given) > 1 or given[0].endswith(SHARD_SUFFIX) else given[0], (SHARD_SUFFIX,))
        return listing.uris, listing.sizes.tolist(), listing.stamps.tolist(), [0] * len(listing.uris)
    if any(is_uri(s) for s in given):
        msg = "give every shard as a local path or every shard as an s3:// URI, not a mix"
        raise ValueError(msg)
    if len(given) == 1 and os.path.isdir(given[0]):
        paths = sorted(glob.glob(os.path.join(glob.escape(given[0]), "**", "*" + SHARD_SUFFIX), recursive=True))
    elif len(given) == 1 and glob.has_magic(given[0]) and not os.path.exists(given[0]):
        paths = sorted(glob.glob(given[0], recursive=True))
    else:
        paths = given
    missing = [p for p in paths if not os.path.isfile(p)]
    if not paths or missing:
        what = f"{len(missing)} shard(s) do not exist, e.g. {missing[:3]}" if missing else f"{spec!r} names no shards"
        msg = f"{what}; pass a folder of .tar shards, a glob such as 'shards/*.tar', or a list of shard paths"
        raise FileNotFoundError(msg)
    stats = [os.stat(p) for p in paths]
    return paths, [s.st_size for s in stats], [s.st_mtime_ns for s in stats], [s.st_ctime_ns for s in stats]
