"""Decode stage: DALI ``readers.file → decoders.image`` over the catalog, one image at a time.

DALI's executor decodes ``prefetch`` batches ahead in its own threads, so the producer thread that
calls :meth:`DecodeStage.next` finds finished images waiting whenever decoding keeps up. Images come
out in a full per-epoch permutation (``shuffle_after_epoch``) seeded from the sampler's seed: one
reader epoch decodes every file of the shard exactly once, and epochs follow each other seamlessly.
The pipeline is built with DALI checkpointing, so :meth:`DecodeStage.position` names the exact image
a restarted stage continues from (a ~200-byte reader checkpoint plus the images to skip in its batch).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import tempfile
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from ..config import state_value
from ..sources import s3 as storage
from ..sources.headers import not_regular
from .backend import Backend

__all__ = ["DALI_DTYPES", "DecodeError", "DecodeStage", "decode_files", "error_cause"]

log = logging.getLogger(__name__)

DALI_DTYPES = {"uint8": types.UINT8, "uint16": types.UINT16}  # the sampler's dtype names → DALI types
_MAX_FAILED_RUNS_IN_A_ROW = 8  # a reader that fails this often is broken, not unlucky
ENDPOINT_PATIENCE_S = 120.0  # how long an object store that stopped answering is waited for


def error_cause(error: BaseException) -> str:
    """The line of a DALI error that says what went wrong (after its operator traceback)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1]
    return lines[-1] if lines else repr(error)


class DecodeError(RuntimeError):
    """The decode pipeline failed repeatedly; the message carries DALI's error (it names the file)."""


_LIST_MIN_FILES = 10_000  # from here on DALI's reader gets a list file: it builds far faster than files=
_UNLISTABLE = (" ", "\t", "\r", "\f", "\v", "s3://")  # what a "path label" line cannot hold; objects


@contextlib.contextmanager
def _list_files(columns: Sequence[Sequence[str]]) -> Iterator[list[str | None]]:
    """For each long column of local paths without whitespace, a temporary DALI ``file_list``
    (``path label`` lines) that lives while the pipeline is built; ``None`` where ``files=`` is used."""
    made: list[str | None] = []
    try:
        for column in columns:
            text = "\n".join(column) if len(column) >= _LIST_MIN_FILES else ""
            if not text or any(mark in text for mark in _UNLISTABLE):
                made.append(None)
                continue
            fd, path = tempfile.mkstemp(prefix="dali_patches_files_", suffix=".txt")
            with os.fdopen(fd, "w") as f:  # "path label" lines, built without a Python loop per line
                f.write("\n".join(map(" ".join, zip(column, map(str, range(len(column)))))) + "\n")
            made.append(path)
        yield made
    finally:
        for listed in made:
            if listed is not None:
                os.unlink(listed)


@pipeline_def(enable_conditionals=False, enable_checkpointing=True)
def _decode_pipeline(columns: Sequence[Sequence[str]], decoder_device: str, shuffle_seed: int, shard_id: int,
                     num_shards: int, shuffle: bool = True, exif: bool = True,
                     parts: Sequence[tuple[int, str]] = ((3, "uint8"),), decode: bool = True,
                     lists: Sequence[str | None] = (), hw_decoder_load: float | None = None):
    """One reader per column (the main images, then each companion), all with the same files count,
    shard and shuffle seed, so they yield the same rows in the same order; each with its own decoder
    settings ``(channels, dtype)``. Returns ``(*images, *labels)``; the labels (row indices) of
    every reader are returned so that :class:`DecodeStage` can check that the rows stay aligned."""
    outputs: list[Any] = []
    labels: list[Any] = []
    shuffling: dict[str, Any] = {"shuffle_after_epoch": True, "shuffle_after_epoch_seed": shuffle_seed} if shuffle else {}
    for k, (column, (channels, dtype)) in enumerate(zip(columns, parts)):
        listed = lists[k] if k < len(lists) else None
        encoded, label = fn.readers.file(
            **({"file_list": listed} if listed else {"files": list(column), "labels": list(range(len(column)))}),
            shard_id=shard_id,
            num_shards=num_shards,
            # Read, don't map: a file rewritten in place under a mapping kills the process with SIGBUS.
            dont_use_mmap=True,
            name=f"Reader{len(labels) or ''}",
            **shuffling,
        )
        labels.append(label)
        if not decode:  # the same reader, for finding out which files a batch held; "Decoder" is a no-op
            return fn.cast(encoded, dtype=types.UINT8, name="Decoder"), label
        # nvJPEG splits a batch between the hardware JPEG engine and CUDA (hw_decoder_load), which may
        # differ pixel for pixel; pinning the share makes a decode reproducible batch for batch.
        split: dict[str, Any] = ({"hw_decoder_load": hw_decoder_load}
                                 if hw_decoder_load is not None and decoder_device == "mixed" else {})
        outputs.append(fn.decoders.image(encoded, device=decoder_device,
                                         output_type=types.RGB if channels == 3 else types.GRAY,
                                         dtype=DALI_DTYPES[dtype], adjust_orientation=exif,
                                         name=f"Decoder{len(outputs) or ''}", **split))
    return (*outputs, *labels)


class DecodeStage:
    """Decoded images of a shard, in the reader's seeded order, as device arrays.

    Args:
        columns: the main images' paths, then each companion's, aligned; the index of a row is the
            ``source`` reported for its image. A plain list of paths is one column.
        backend: device mode (decoder ``"mixed"`` on GPU, ``"cpu"`` otherwise).
        batch_size: images per DALI decode batch.
        num_threads: DALI worker threads.
        seed: seeds the reader's per-epoch shuffle.
        prefetch: decode batches DALI keeps in flight; each holds ``batch_size`` decoded images.
        min_good: fewer files of the shard than this left decodable (deleted, broken or changed
            during the run) stop the run with a :class:`DecodeError` that says so.
        position: a :meth:`position` of an earlier stage over the same files and seed: continue there.
        exif: apply EXIF orientation.
        parts: ``(channels, dtype)`` of each column: 3 (RGB) or 1 (gray), ``"uint8"``/``"uint16"``.
        hw_decoder_load: GPU: the share of each batch nvJPEG gives its hardware engine (``None``:
            DALI's default).
    """

    def __init__(
        self,
        columns: Sequence[Sequence[str]] | Sequence[str],
        backend: Backend,
        batch_size: int,
        num_threads: int,
        seed: int,
        shard_id: int = 0,
        num_shards: int = 1,
        prefetch: int = 2,
        min_good: int = 1,
        position: dict[str, Any] | None = None,
        exif: bool = True,
        parts: Sequence[tuple[int, str]] = ((3, "uint8"),),
        hw_decoder_load: float | None = None,
    ) -> None:
        self._backend = backend
        # What the readers read, per column: broken rows swapped for a stand-in row.
        self._columns: list[list[str]] = ([list(c) for c in columns] if columns and not isinstance(columns[0], str)
                                          else [[str(c) for c in columns]])
        self._paths = [list(c) for c in self._columns]  # as given; _columns swaps stand-ins in
        self._min_good = min_good
        self._pending: deque[tuple[int, list[Any]]] = deque()
        self._run_checkpoint: str | None = None  # reader state before the run that filled _pending (base64)
        self._taken_from_run = 0
        self._skip = 0
        self.images_decoded = 0
        self.failed_runs = 0
        self.lost_batches = 0  # decode batches skipped because no file could be blamed (their images too)
        self._report = threading.Lock()  # broken and errors: written by the decoding thread, read by others
        self.errors: list[str] = []
        self.broken: dict[int, str] = {}  # source index → why it cannot be decoded (read via broken_items())
        self._prefetch = prefetch
        self.skipped_decodes = 0  # reads of broken files (their stand-in's decode is discarded)
        self._failed_in_a_row = 0
        self._output: dict[str, Any] = {"exif": exif, "parts": tuple(parts), "hw_decoder_load": hw_decoder_load}
        self._options = {"decoder_device": backend.decoder_device, "shuffle_seed": seed, "shard_id": shard_id,
                         "num_shards": num_shards, **self._output, "batch_size": batch_size,
                         "num_threads": num_threads, "device_id": backend.dali_device_id,
                         "prefetch_queue_depth": prefetch, "seed": seed}
        checkpoint = None
        if position:
            self._skip, self.images_decoded, checkpoint = self.checked_position(position)
            self._run_checkpoint, self._taken_from_run = position["checkpoint"], self._skip
            for source, reason in position.get("broken", {}).items():
                self._mark_broken(int(source), reason, quiet=True)
        self._build(checkpoint)
        self.epoch_size = int(self._pipe.reader_meta("Reader")["epoch_size"])
        self.shard_size = -(-self.epoch_size // num_shards) if num_shards > 1 else self.epoch_size

    def checked_position(self, position: dict[str, Any], where: str = "['decoder']") -> tuple[int, int, bytes | None]:
        """``(skip, images decoded, reader checkpoint)`` of a saved :meth:`position`, every field checked
        (for a stage over the same files and settings); nothing changes."""
        skip = state_value(position, "skip", where, int, 0, int(self._options["batch_size"]))
        decoded = state_value(position, "images_decoded", where, int, 0)
        text = position.get("checkpoint") if isinstance(position, dict) else None
        checkpoint = None
        if text is not None:
            try:
                checkpoint = base64.b64decode(state_value(position, "checkpoint", where, str), validate=True)
            except ValueError:
                msg = (f"state {where}['checkpoint'] is not a reader checkpoint; load a state made by state_dict() "
                       "of the same version, unchanged")
                raise ValueError(msg) from None
        broken = state_value(position, "broken", where, dict) if "broken" in position else {}
        if not all(isinstance(k, str) and k.isdigit() and int(k) < len(self._paths[0]) and isinstance(v, str)
                   for k, v in broken.items()):
            msg = (f"state {where}['broken'] names files this sampler does not have; load a state of a sampler over "
                   "the same files")
            raise ValueError(msg)
        return skip, decoded, checkpoint

    def _build(self, checkpoint: bytes | None) -> None:
        """(Re)build the reader at ``checkpoint``. Building prefetches, so a second missing file of
        the same batch can fail the build itself: set it aside as well and build again; an object
        store that does not answer is waited for (:meth:`_unreachable`)."""
        while True:
            try:
                with _list_files(self._columns) as lists:
                    self._pipe: Any = _decode_pipeline(columns=self._columns, checkpoint=checkpoint, lists=lists,
                                                       **self._options)
                    self._pipe.build()
                return
            except RuntimeError as e:
                if self._unreachable(str(e)):
                    continue
                source = self._named_in(str(e))
                if source is None:
                    raise
                self._mark_broken(source, error_cause(e))

    def _named_in(self, text: str) -> int | None:
        """The row whose file an error message names (the longest matching path; DALI's S3 reader
        writes ``bucket=B object=KEY``), if any."""
        text = f"{text}\n{storage.named_object(text) or ''}"
        named = [(len(path), i) for column in self._columns for i, path in enumerate(column)
                 if path in text and i not in self.broken]
        return max(named)[1] if named else None

    def _unreachable(self, text: str) -> bool:
        """An object store that did not answer (not "no such object"): wait for it with backoff, at most
        :data:`ENDPOINT_PATIENCE_S`; ``True`` once it answers again (build and read again, nothing is
        set aside). Raises :class:`DecodeError` naming the endpoint when it does not come back."""
        uri = storage.named_object(text)
        if uri is None or storage.unreachable(text) is None:
            return False
        try:
            storage.wait_for_endpoint(text, uri, ENDPOINT_PATIENCE_S)
        except storage.EndpointUnreachable as e:
            raise DecodeError(str(e)) from None
        return True

    def broken_items(self) -> list[tuple[int, str]]:
        """``(source, why)`` of every file set aside so far (a copy: safe from any thread)."""
        with self._report:
            return sorted(self.broken.items())

    def error_list(self) -> list[str]:
        """The decode errors reported so far (a copy: safe from any thread)."""
        with self._report:
            return list(self.errors)

    def irregular(self) -> dict[int, str]:
        """Rows of the shard whose file is (now) not a regular file — a FIFO or a device put in its
        place: any reader would block on it or read without end. Stats every local file of the
        columns (not opened); objects are skipped. For recovery and the feeder's watchdog."""
        found: dict[int, str] = {}
        for column in self._paths:
            for i, path in enumerate(column):
                if i in found or i in self.broken or path.startswith("s3://"):
                    continue
                try:
                    mode = os.stat(path).st_mode
                except OSError:
                    continue  # missing: the reader names it
                why = not_regular(mode)
                if why is not None:
                    found[i] = f"became {why[:why.index(',')]} during the run" if "," in why else str(why)
        return found

    def unblock(self) -> list[str]:
        """The watchdog's remedy for a reader stuck opening a FIFO that replaced a file: open each such
        FIFO for writing, without blocking, and close it, so the reader's open returns and it reads an
        empty file (an error the recovery then blames on it). Returns the paths poked."""
        poked = []
        for i in self.irregular():
            for column in self._paths:
                path = column[i]
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:
                    continue  # not a FIFO, or no reader waiting on it
                os.close(fd)
                poked.append(path)
        return poked

    def peek(self) -> tuple[int, list[Any]]:
        """The next ``(source index, [(H, W, C) image, *its companions]])`` without consuming it."""
        while not self._pending:
            self._run()
        return self._pending[0]

    def next(self) -> tuple[int, list[Any]]:
        """Consume the next decoded row. The arrays are views into DALI's output, valid while held."""
        item = self.peek()
        self._pending.popleft()
        self.images_decoded += 1
        self._taken_from_run += 1
        return item

    def position(self) -> dict[str, Any]:
        """Where the stream of images stands: restoring it into a new stage (``position=``) makes
        that stage return the same images as this one would from here on."""
        return {"checkpoint": self._run_checkpoint, "skip": self._taken_from_run, "images_decoded": self.images_decoded,
                "broken": {str(k): v for k, v in self.broken_items()}}

    def _run(self) -> None:
        checkpoint = self._pipe.checkpoint()
        try:
            outputs = self._pipe.run()
        except RuntimeError as e:
            self._recover(e, checkpoint)
            return
        n = len(self._columns)
        sources = np.asarray(outputs[n].as_tensor()).reshape(-1)
        for labels in outputs[n + 1:]:
            if not np.array_equal(np.asarray(labels.as_tensor()).reshape(-1), sources):
                msg = "the companion readers fell out of step with the image reader; please report this"
                raise DecodeError(msg)
        self._failed_in_a_row = 0
        self._run_checkpoint = base64.b64encode(checkpoint).decode()  # once per decode batch, JSON-able
        self._taken_from_run = self._skip
        for i, source in enumerate(sources.tolist()[self._skip:], start=self._skip):
            if source in self.broken:
                self.skipped_decodes += 1  # the stand-in's pixels: never served
                continue
            self._pending.append((source, [self._backend.as_array(images[i]) for images in outputs[:n]]))
        self._skip = 0

    def _recover(self, error: RuntimeError, checkpoint: bytes) -> None:
        """A decode batch failed. Find the file to blame and set it aside — one DALI's message names
        (corrupt, unreadable, deleted during the run, an object that is gone), one that is no longer
        a regular file, or one the decoder rejects alone — then redo the batch from ``checkpoint``
        with a stand-in in its place: no good image is lost, and the file is reported once and
        skipped from then on. The failure may come from any batch DALI had already prefetched, so the
        search covers ``prefetch + 1`` batches from the checkpoint. An object store that stopped
        answering is waited for. When nothing can be blamed the batch is lost (counted);
        ``_MAX_FAILED_RUNS_IN_A_ROW`` such failures in a row end the run."""
        text = str(error)
        self.failed_runs += 1
        if self._unreachable(text):
            self._build(checkpoint)
            return
        named = self._named_in(text)
        if named is not None:
            self._mark_broken(named, error_cause(error))
        blamed = named is not None
        for source, why in self.irregular().items():
            self._mark_broken(source, why)
            blamed = True
        if blamed or self._find_undecodable(checkpoint):
            self._failed_in_a_row = 0  # a file was found and set aside: progress, not a failing reader
            self._build(checkpoint)  # the same batch again, stand-ins in the broken files' places
            return
        self._failed_in_a_row += 1
        if self._failed_in_a_row >= _MAX_FAILED_RUNS_IN_A_ROW:
            msg = (f"{self._failed_in_a_row} decode batches failed in a row and no file could be blamed; "
                   f"last error: {text}")
            raise DecodeError(msg) from error
        with self._report:
            self.errors.append(text.splitlines()[0] if text else repr(error))
        self.lost_batches += 1
        log.warning("decode batch failed and was skipped (no file could be blamed): %s", text)
        # A failed pipeline may be dead for good: rebuild it just past the lost batch.
        self._build(self._read_batches_at(checkpoint, 1)[1])

    def _read_batches_at(self, checkpoint: bytes, batches: int) -> tuple[list[int], bytes]:
        """Source indices of the next ``batches`` batches the reader yields at ``checkpoint`` (read,
        not decoded), and the reader's checkpoint after the first of them."""
        with _list_files(self._columns) as lists:
            reader = _decode_pipeline(columns=self._columns, checkpoint=checkpoint, decode=False, lists=lists,
                                      **{**self._options, "prefetch_queue_depth": 1})
            reader.build()
        sources: list[int] = []
        after = b""
        for k in range(batches):
            _, labels = reader.run()
            sources += np.asarray(labels.as_tensor()).reshape(-1).tolist()
            if k == 0:
                after = reader.checkpoint()
        return sources, after

    def _find_undecodable(self, checkpoint: bytes) -> bool:
        """Which rows does the decoder reject? (The decoder's error does not name the file, and the
        failing batch may be one DALI prefetched.) Reads the ``prefetch + 1`` batches from
        ``checkpoint`` again without decoding, then decodes their rows one by one."""
        try:
            labels, _ = self._read_batches_at(checkpoint, self._prefetch + 1)
        except RuntimeError as e:  # the reader itself fails there: blame what it names, if anything
            named = self._named_in(str(e))
            if named is None:
                return False
            self._mark_broken(named, error_cause(e))
            return True
        found = False
        for source in dict.fromkeys(labels):
            if source in self.broken:
                continue
            try:
                for _ in decode_files([[c[source]] for c in self._columns], self._backend, num_threads=1,
                                      **self._output):
                    pass
            except RuntimeError as e:
                self._mark_broken(source, f"the decoder rejects it ({error_cause(e)})")
                found = True
        return found

    def mark_broken(self, source: int, reason: str) -> None:
        """Set file ``source`` aside from now on (e.g. it changed during the run): reported once, its
        later reads are replaced by a stand-in whose decodes are dropped."""
        if source not in self.broken:
            self._mark_broken(source, reason)

    def _mark_broken(self, source: int, reason: str, quiet: bool = False) -> None:
        path = self._paths[0][source]
        with self._report:
            self.broken[source] = reason
        good = [i for i in range(len(self._columns[0])) if i not in self.broken and self._columns[0][i] != path]
        if not good:
            msg = f"every file failed to decode or changed during the run; the last one, {path!r}: {reason}"
            raise DecodeError(msg)
        left = self.shard_size - len(self.broken) if hasattr(self, "shard_size") else len(good)
        if left < self._min_good:
            examples = "; ".join(f"{self._paths[0][i]}: {why}" for i, why in list(self.broken_items())[-3:])
            msg = (f"only {left} files of this shard still decode, fewer than the {self._min_good} distinct images "
                   f"a batch needs: {len(self.broken)} were deleted, broken or changed during the run (e.g. {examples}). "
                   "Restore them, or restart the sampler on the data as it is now")
            raise DecodeError(msg)
        stand_in = good[0]
        for i, current in enumerate(list(self._columns[0])):  # also rows that used ``path`` as their stand-in
            if current == path:
                for column in self._columns:
                    column[i] = column[stand_in]
        if not quiet:
            with self._report:
                self.errors.append(f"{path}: {reason}")
            log.warning("skipping %s from now on: %s", path, reason)

    def close(self) -> None:
        """Drop pending images and the DALI pipeline (frees its buffers and threads)."""
        self._pending.clear()
        self._pipe = None


def decode_files(columns: Sequence[Sequence[str]], backend: Backend, num_threads: int, batch_size: int = 8,
                 exif: bool = True, parts: Sequence[tuple[int, str]] = ((3, "uint8"),),
                 hw_decoder_load: float | None = None) -> Iterator[list[Any]]:
    """Decode the rows of ``columns`` (main images, then each companion's files) once, in order, with
    the same decoders as :class:`DecodeStage`; yields ``[image, *companions]`` of each row (views
    valid until the next row is taken). Used to refill a restored cache with the images it held."""
    if not columns or not columns[0]:
        return
    batch_size = min(batch_size, len(columns[0]))
    pipe = _decode_pipeline(columns=columns, decoder_device=backend.decoder_device, shuffle_seed=0, shard_id=0,
                            num_shards=1, shuffle=False, exif=exif, parts=parts, batch_size=batch_size,
                            hw_decoder_load=hw_decoder_load,
                            num_threads=num_threads, device_id=backend.dali_device_id, prefetch_queue_depth=1)
    pipe.build()
    left, n = len(columns[0]), len(columns)
    while left:
        outputs = pipe.run()
        for i in range(min(left, batch_size)):
            yield [backend.as_array(images[i]) for images in outputs[:n]]
        left -= min(left, batch_size)
