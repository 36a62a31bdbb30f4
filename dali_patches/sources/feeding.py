"""Feeding: how the encoded bytes of a shard's items reach a decode pipeline, two ways behind one
interface (:class:`Reader`).

* :class:`FileReader` — DALI's ``fn.readers.file`` per part (local paths or ``s3://`` objects): DALI
  reads in its own threads, shuffles per epoch (``shuffle_after_epoch``) and shards, and its
  checkpoint (``enable_checkpointing``) is the reader's position.
* :class:`RangeReader` — bytes through ``fn.external_source`` for items no DALI reader can open
  alone (members of a tar shard: a byte range of a larger file or object). Its callback reads the
  items of one batch (the source's ``read_many``); the order is a seeded permutation of the shard
  per epoch, so batch ``k`` of the stream is known without reading anything before it, and the
  position — a sample count — is its checkpoint. DALI calls the callback on the thread that runs
  the pipeline, ahead by its prefetch depth: reading overlaps the decoding of earlier batches.

Both yield, per part, the encoded bytes and the entry's label (its catalog row), and both can say
which rows the batches from a checkpoint hold without decoding them (for blaming a failed batch).
DALI is imported where a graph is built, so listing a source does not load it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from .base import Problem

__all__ = ["FileReader", "RangeReader", "Reader", "ReadsFiles", "shard_bounds"]

_LIST_MIN_FILES = 10_000  # from here on DALI's reader gets a list file: it builds far faster than files=
_UNLISTABLE = (" ", "\t", "\r", "\f", "\v", "s3://")  # what a "path label" line cannot hold; objects


def shard_bounds(count: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """``[start, end)`` of shard ``shard_id`` of ``count`` entries split in ``num_shards`` contiguous
    runs (as DALI's readers split them)."""
    return count * shard_id // num_shards, count * (shard_id + 1) // num_shards


class Reader(ABC):
    """What feeds one decode pipeline (see the module).

    Attributes:
        epoch_size: entries of the whole selection (every shard).
        shard_size: entries this shard decodes per epoch.
        dali_checkpoint: the DALI checkpoint to build the pipeline with (``None``: none).
        checkpointing: whether the pipeline is built with DALI checkpointing.
    """

    epoch_size: int
    shard_size: int
    dali_checkpoint: bytes | None = None
    checkpointing: bool = True

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """Around building the pipeline (a reader may need files that live only that long)."""
        yield

    @abstractmethod
    def nodes(self) -> tuple[list[Any], list[Any]]:
        """Inside a DALI graph: the encoded bytes of each part and the labels (one node per part
        that has its own, the first for the main images)."""

    @abstractmethod
    def checkpoint(self, pipe: Any, runs: int) -> bytes:
        """Where ``pipe`` stands before its next run, ``runs`` runs after it was built."""

    @abstractmethod
    def rows_at(self, checkpoint: bytes, batches: int) -> tuple[list[int], bytes]:
        """Labels of the next ``batches`` batches from ``checkpoint`` (read, not decoded), and the
        checkpoint after the first of them."""

    failure: BaseException | None = None  # what stopped the reader for good (re-raised with its type)

    def take_bad(self) -> list[tuple[int, Problem]]:
        """``(label, why)`` of entries that could not be read since the last call (their decodes are
        stand-ins: the decode stage sets them aside)."""
        return []


class FileReader(Reader):
    """DALI's ``fn.readers.file`` over each part's locations (paths, ``s3://`` URIs).

    Args:
        labels: the row reported for each entry.
        columns: locations per part (entries aligned).
        read_as: ``(N,)`` the entry whose bytes are read for each entry (a stand-in for a broken one,
            whose decode the decode stage drops); ``None``: each its own.
        shard_id, num_shards, seed, shuffle: DALI's sharding and per-epoch shuffle.
        batch_size: entries per batch (for reading without decoding).
        at: a DALI checkpoint to continue from.
    """

    def __init__(self, labels: Sequence[int], columns: Sequence[Sequence[str]], read_as: np.ndarray | None = None, *,
                 shard_id: int = 0, num_shards: int = 1, seed: int = 0, shuffle: bool = True, batch_size: int = 1,
                 at: bytes | None = None) -> None:
        self._labels = [int(v) for v in labels]
        picks = None if read_as is None else read_as.tolist()
        self._columns = [list(c) if picks is None else [c[j] for j in picks] for c in columns]
        self._shard: dict[str, Any] = {"shard_id": shard_id, "num_shards": num_shards}
        self._shuffling: dict[str, Any] = ({"shuffle_after_epoch": True, "shuffle_after_epoch_seed": seed}
                                           if shuffle else {})
        self._batch_size = batch_size
        self._lists: list[str | None] = []
        self.epoch_size = len(self._labels)
        self.shard_size = -(-self.epoch_size // num_shards) if num_shards > 1 else self.epoch_size
        self.dali_checkpoint = at

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """For each long column of local paths without whitespace, a temporary DALI ``file_list``
        (``path label`` lines: it builds far faster than ``files=``), removed after the build."""
        made: list[str | None] = []
        try:
            for column in self._columns:
                text = "\n".join(column) if len(column) >= _LIST_MIN_FILES else ""
                if not text or any(mark in text for mark in _UNLISTABLE):
                    made.append(None)
                    continue
                fd, path = tempfile.mkstemp(prefix="dali_patches_files_", suffix=".txt")
                with os.fdopen(fd, "w") as f:  # "path label" lines, built without a Python loop per line
                    f.write("\n".join(map(" ".join, zip(column, map(str, self._labels)))) + "\n")
                made.append(path)
            self._lists = made
            yield
        finally:
            self._lists = []
            for listed in made:
                if listed is not None:
                    os.unlink(listed)

    def nodes(self, first_only: bool = False) -> tuple[list[Any], list[Any]]:
        from nvidia.dali import fn

        encoded, labels = [], []
        for k, column in enumerate(self._columns[:1] if first_only else self._columns):
            listed = self._lists[k] if k < len(self._lists) else None
            data, label = fn.readers.file(
                **({"file_list": listed} if listed else {"files": list(column), "labels": self._labels}),
                # Read, don't map: a file rewritten in place under a mapping kills the process with SIGBUS.
                dont_use_mmap=True, name=f"Reader{k or ''}", **self._shard, **self._shuffling)
            encoded.append(data)
            labels.append(label)
        return encoded, labels

    def checkpoint(self, pipe: Any, runs: int) -> bytes:
        return bytes(pipe.checkpoint())

    def rows_at(self, checkpoint: bytes, batches: int) -> tuple[list[int], bytes]:
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=self._batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1,
                      enable_checkpointing=True)
        def read_only():  # a DALI graph: the main images' reader; "Decoder" matches the full graph's names
            (encoded,), (label,) = self.nodes(first_only=True)
            return fn.cast(encoded, dtype=types.UINT8, name="Decoder"), label

        with self.building():
            pipe = read_only(checkpoint=checkpoint)
            pipe.build()
        rows: list[int] = []
        after = b""
        for k in range(batches):
            _, labels = pipe.run()
            rows += np.asarray(labels.as_tensor()).reshape(-1).tolist()
            if k == 0:
                after = bytes(pipe.checkpoint())
        return rows, after


class ReadsFiles:
    """For a :class:`~dali_patches.sources.base.Source` whose locations DALI's file reader opens
    itself (local paths, ``s3://`` objects): its ``reader`` is a :class:`FileReader`."""

    def reader(self, labels: Sequence[int], columns: Sequence[Sequence[str]], read_as: np.ndarray | None = None, *,
               shard_id: int = 0, num_shards: int = 1, seed: int = 0, shuffle: bool = True, batch_size: int = 1,
               at: bytes | None = None) -> Reader:
        return FileReader(labels, columns, read_as, shard_id=shard_id, num_shards=num_shards, seed=seed,
                          shuffle=shuffle, batch_size=batch_size, at=at)


class RangeReader(Reader):
    """Encoded items read by the source itself (``read_many``) and handed to DALI through
    ``external_source``, in a seeded per-epoch permutation of the shard.

    Args:
        labels, columns, read_as: as for :class:`FileReader`.
        read_many: reads a list of locations → their bytes, or a :class:`Problem` for an entry that
            cannot be read (a member cut short by a truncated shard); may raise for the whole batch
            (a store that stopped answering), which stops the reader (:attr:`failure`).
        groups: ``(N,)`` the file each entry lies in (its shard, by the entry's own location); whole groups are split among the
            ranks when there are at least as many as ranks, entries otherwise.
        shard_id, num_shards, seed, shuffle, batch_size: the order (see :class:`FileReader`).
        at: a checkpoint of an earlier reader over the same entries.
    """

    checkpointing = False

    def __init__(self, labels: Sequence[int], columns: Sequence[Sequence[str]], read_as: np.ndarray | None,
                 read_many: Callable[[Sequence[str]], list[bytes | Problem]], groups: np.ndarray | None = None, *,
                 shard_id: int = 0, num_shards: int = 1, seed: int = 0, shuffle: bool = True, batch_size: int = 1,
                 at: bytes | None = None) -> None:
        self._labels = np.asarray(labels, np.int64)
        self._columns = [list(c) for c in columns]
        self._read_as = np.arange(len(self._labels)) if read_as is None else np.asarray(read_as, np.int64)
        self._read_many = read_many
        self._seed, self._shuffle, self._batch_size = seed, shuffle, batch_size
        count = len(self._labels)
        if groups is not None and len(groups) and int(groups.max()) + 1 >= num_shards > 1:
            first, last = shard_bounds(int(groups.max()) + 1, shard_id, num_shards)
            self._mine = np.flatnonzero((groups >= first) & (groups < last))
        else:
            self._mine = np.arange(*shard_bounds(count, shard_id, num_shards))
        self.epoch_size, self.shard_size = count, len(self._mine)
        self._start = int(json.loads(at)["sample"]) if at else 0
        self._orders: dict[int, np.ndarray] = {}
        self._bad: list[tuple[int, Problem]] = []
        self.failure = None

    def _entries(self, sample: int, count: int) -> np.ndarray:
        """Entries (indices into the columns) of the ``count`` samples from stream position ``sample``."""
        n = len(self._mine)
        positions = np.arange(sample, sample + count)
        out = np.empty(count, np.int64)
        for epoch in np.unique(positions // n).tolist():
            if epoch not in self._orders:
                rng = np.random.default_rng([self._seed, epoch])
                self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
                self._orders[epoch] = self._mine[rng.permutation(n)] if self._shuffle else self._mine
            here = positions // n == epoch
            out[here] = self._orders[epoch][positions[here] % n]
        return out

    def _feed(self, info: Any) -> tuple[list[Any], ...]:
        entries = self._entries(self._start + info.iteration * self._batch_size, self._batch_size)
        outputs: list[list[Any]] = []
        try:
            for column in self._columns:
                found = self._read_many([column[e] for e in self._read_as[entries].tolist()])
                good = next((v for v in found if not isinstance(v, Problem)), b"\0")
                for i, value in enumerate(found):
                    if isinstance(value, Problem):
                        self._bad.append((int(self._labels[entries[i]]), value))
                outputs.append([np.frombuffer(good if isinstance(v, Problem) else v, np.uint8) for v in found])
        except BaseException as e:
            self.failure = e
            raise
        labels = [np.array([v], np.int32) for v in self._labels[entries].tolist()]
        return (*outputs, labels)

    def nodes(self) -> tuple[list[Any], list[Any]]:
        from nvidia.dali import fn, types

        parts = len(self._columns)
        out = fn.external_source(source=self._feed, num_outputs=parts + 1, batch=True, batch_info=True,
                                 dtype=[*(types.UINT8 for _ in range(parts)), types.INT32],
                                 ndim=[*(1 for _ in range(parts)), 1])
        return list(out[:parts]), [out[parts]]

    def checkpoint(self, pipe: Any, runs: int) -> bytes:
        return json.dumps({"sample": self._start + runs * self._batch_size}).encode()

    def rows_at(self, checkpoint: bytes, batches: int) -> tuple[list[int], bytes]:
        sample = int(json.loads(checkpoint)["sample"])
        rows = self._labels[self._entries(sample, batches * self._batch_size)].tolist()
        return rows, json.dumps({"sample": sample + self._batch_size}).encode()

    def take_bad(self) -> list[tuple[int, Problem]]:
        bad, self._bad = self._bad, []
        return bad
