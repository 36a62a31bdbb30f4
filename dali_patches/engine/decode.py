"""Decode stage: the source's reader → ``decoders.image``, over the catalog, one image at a time.

DALI's executor decodes ``prefetch`` batches ahead in its own threads, so the producer thread that
calls :meth:`DecodeStage.next` finds finished images waiting whenever decoding keeps up. Images come
out in a full per-epoch permutation seeded from the sampler's seed: one reader epoch decodes every
item of the shard exactly once, and epochs follow each other seamlessly. Where the bytes come from
is the source's business (:meth:`~dali_patches.sources.base.Source.reader`: DALI's file reader, or
byte ranges through ``external_source``); :meth:`DecodeStage.state_dict` names the exact image a
restarted stage continues from (the reader's checkpoint plus the images to skip in its batch).

A batch that fails is recovered here, whatever the source: the item to blame is set aside (one the
error names, one that is no longer a regular file, one the decoder rejects alone), and the batch is
decoded again with a stand-in in its place, so no good image is lost.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..sources.base import Source
from ..sources.s3 import ENDPOINT_PATIENCE_S
from ..state import state_value
from .backend import Backend
from .decoders import decode_files, decode_pipeline

__all__ = ["DecodeError", "DecodeStage", "error_cause"]

log = logging.getLogger(__name__)

_MAX_FAILED_RUNS_IN_A_ROW = 8  # a reader that fails this often is broken, not unlucky


def error_cause(error: BaseException) -> str:
    """The line of a DALI error that says what went wrong (after its operator traceback)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1]
    return lines[-1] if lines else repr(error)


class DecodeError(RuntimeError):
    """The decode pipeline failed repeatedly; the message carries DALI's error (it names the file)."""


class DecodeStage:
    """Decoded images of a shard, in the reader's seeded order, as device arrays.

    Args:
        source: where the locations live (it feeds the decoder and names the items of its errors).
        columns: the main images' locations, then each companion's, aligned; the index of a row is
            the ``source`` reported for its image. A plain list of paths is one column.
        backend: device mode (decoder ``"mixed"`` on GPU, ``"cpu"`` otherwise).
        batch_size: images per DALI decode batch.
        num_threads: DALI worker threads.
        seed: seeds the reader's per-epoch shuffle.
        prefetch: decode batches DALI keeps in flight; each holds ``batch_size`` decoded images.
        min_good: fewer items of the shard than this left decodable (deleted, broken or changed
            during the run) stop the run with a :class:`DecodeError` that says so.
        exif: apply EXIF orientation.
        parts: ``(channels, dtype)`` of each column: 3 (RGB) or 1 (gray), ``"uint8"``/``"uint16"``.
        hw_decoder_load: GPU: the share of each batch nvJPEG gives its hardware engine (``None``:
            DALI's default).
        alpha: every row comes with one more part after its companions: its main image's alpha
            ``(H, W, 1)``, or ``(1, 1, 1)`` opaque for images without one
            (:func:`~dali_patches.engine.decoders.decode_pipeline`).
        source: where the locations live (``None``: local files or ``s3://`` objects, as the
            locations say).
    """

    def __init__(
        self,
        source: Source,
        columns: Sequence[Sequence[str]] | Sequence[str],
        backend: Backend,
        batch_size: int,
        num_threads: int,
        seed: int,
        shard_id: int = 0,
        num_shards: int = 1,
        prefetch: int = 2,
        min_good: int = 1,
        exif: bool = True,
        parts: Sequence[tuple[int, str]] = ((3, "uint8"),),
        hw_decoder_load: float | None = None,
        alpha: bool = False,
    ) -> None:
        self._backend = backend
        self._alpha = alpha
        self._paths: list[list[str]] = ([list(c) for c in columns] if columns and not isinstance(columns[0], str)
                                        else [[str(c) for c in columns]])
        self._source = source
        self._read_as = np.arange(len(self._paths[0]))  # the row read for each row: a stand-in for a broken one
        self._min_good = min_good
        self._pending: deque[tuple[int, list[Any]]] = deque()
        self._run_checkpoint: str | None = None  # reader state before the run that filled _pending (base64)
        self._taken_from_run = 0
        self._skip = 0
        self._runs = 0  # runs of the pipeline since it was built
        self.images_decoded = 0
        self.failed_runs = 0
        self.lost_batches = 0  # decode batches skipped because no item could be blamed (their images too)
        self._report = threading.Lock()  # broken and errors: written by the decoding thread, read by others
        self.errors: list[str] = []
        self.broken: dict[int, str] = {}  # source index → why it cannot be decoded (read via broken_items())
        self._prefetch = prefetch
        self.skipped_decodes = 0  # reads of broken items (their stand-in's decode is discarded)
        self._failed_in_a_row = 0
        self._output: dict[str, Any] = {"exif": exif, "parts": tuple(parts), "hw_decoder_load": hw_decoder_load}
        self._order: dict[str, Any] = {"shard_id": shard_id, "num_shards": num_shards, "seed": seed, "batch_size": batch_size}
        self._build_args = {"batch_size": batch_size, "num_threads": num_threads, "prefetch": prefetch, "seed": seed}
        self._build(None)
        self.epoch_size = self._reader.epoch_size
        self.shard_size = self._reader.shard_size

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where the stream of images stands: loading it into a stage over the same items and
        settings makes that stage return the same images as this one would from here on."""
        return {"checkpoint": self._run_checkpoint, "skip": self._taken_from_run, "images_decoded": self.images_decoded,
                "broken": {str(k): v for k, v in self.broken_items()}}

    def check_state(self, state: dict[str, Any], where: str = "['decoder']") -> tuple[int, int, bytes | None, dict[int, str]]:
        """``(skip, images decoded, reader checkpoint, broken)`` of a saved :meth:`state_dict`, every
        field checked (for a stage over the same items and settings); nothing changes."""
        skip = state_value(state, "skip", where, int, 0, int(self._order["batch_size"]))
        decoded = state_value(state, "images_decoded", where, int, 0)
        checkpoint = None
        if state.get("checkpoint") is not None:
            try:
                checkpoint = base64.b64decode(state_value(state, "checkpoint", where, str), validate=True)
            except ValueError:
                msg = (f"state {where}['checkpoint'] is not a reader checkpoint; load a state made by state_dict() "
                       "of the same version, unchanged")
                raise ValueError(msg) from None
        broken = state_value(state, "broken", where, dict) if "broken" in state else {}
        if not all(isinstance(k, str) and k.isdigit() and int(k) < len(self._paths[0]) and isinstance(v, str)
                   for k, v in broken.items()):
            msg = (f"state {where}['broken'] names items this sampler does not have; load a state of a sampler over "
                   "the same data")
            raise ValueError(msg)
        return skip, decoded, checkpoint, {int(k): v for k, v in broken.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a stage over the same items and settings (checked
        first); the pipeline is built again at the saved reader checkpoint."""
        skip, decoded, checkpoint, broken = self.check_state(state)
        self._pending.clear()
        self._skip, self.images_decoded = skip, decoded
        self._run_checkpoint, self._taken_from_run = state.get("checkpoint"), skip
        for source, reason in broken.items():
            self._mark_broken(source, reason, quiet=True)
        self._build(checkpoint)

    # -- the pipeline ------------------------------------------------------------------------
    def _build(self, checkpoint: bytes | None) -> None:
        """(Re)build the reader at ``checkpoint``. Building prefetches, so a second missing item of
        the same batch can fail the build itself: set it aside as well and build again; a store
        that does not answer is waited for (:meth:`_unreachable`)."""
        while True:
            self._reader = self._source.reader(range(len(self._paths[0])), self._paths, self._read_as,
                                               **self._order, at=checkpoint)
            try:
                self._pipe: Any = decode_pipeline(self._reader, self._backend, **self._build_args, output=self._output,
                                                  alpha=self._alpha)
                self._runs = 0
                return
            except RuntimeError as e:
                if self._unreachable(str(e)):
                    continue
                source = self._named_in(str(e))
                if source is None:
                    raise
                self._mark_broken(source, error_cause(e))

    def _named_in(self, text: str) -> int | None:
        """The row whose item an error message names (the longest matching location), if any."""
        n = len(self._paths[0])
        flat = [loc if i % n not in self.broken else "" for i, loc in enumerate(p for c in self._paths for p in c)]
        found = self._source.named_in(text, flat)
        return None if found is None else found % n

    def _unreachable(self, text: str) -> bool:
        """A store that did not answer (not "no such item"): wait for it with backoff, at most
        :data:`~dali_patches.sources.s3.ENDPOINT_PATIENCE_S`; ``True`` once it answers again (build
        and read again, nothing is set aside). Raises :class:`DecodeError` naming the endpoint when
        it does not come back."""
        try:
            return self._source.wait_if_unreachable(text, ENDPOINT_PATIENCE_S)
        except ConnectionError as e:
            raise DecodeError(str(e)) from None

    def broken_items(self) -> list[tuple[int, str]]:
        """``(source, why)`` of every item set aside so far (a copy: safe from any thread)."""
        with self._report:
            return sorted(self.broken.items())

    def error_list(self) -> list[str]:
        """The decode errors reported so far (a copy: safe from any thread)."""
        with self._report:
            return list(self.errors)

    def _flat(self) -> list[str]:
        return [p for column in self._paths for p in column]

    def irregular(self) -> dict[int, str]:
        """Rows whose item is (now) not a regular file — a FIFO or a device put in its place: any
        reader would block on it or read without end (see the source's ``irregular``). For recovery
        and the feeder's watchdog."""
        n = len(self._paths[0])
        return {i % n: why for i, why in self._source.irregular(self._flat()).items() if i % n not in self.broken}

    def unblock(self) -> list[str]:
        """The watchdog's remedy for a reader stuck opening a FIFO that replaced a file (see the
        source's ``unblock``): the reader then reads an empty file, which recovery blames on it.
        Returns the locations poked."""
        n, flat = len(self._paths[0]), self._flat()
        return self._source.unblock([loc for i, loc in enumerate(flat) if i % n in self.irregular()])

    def where(self) -> str:
        """Where the items lie, for messages (the source's root)."""
        return self._source.root or "its source"

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

    def _run(self) -> None:
        checkpoint = self._reader.checkpoint(self._pipe, self._runs)
        try:
            outputs = self._pipe.run()
        except RuntimeError as e:
            if self._reader.failure is not None:  # the reader's own error (a store gone for good): its type
                raise self._reader.failure from e
            self._recover(e, checkpoint)
            return
        self._runs += 1
        for source, why in self._reader.take_bad():
            self.mark_broken(source, why)
        n = len(self._paths) + self._alpha  # images per row (the alpha part last)
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
        """A decode batch failed. Find the item to blame and set it aside — one the error names
        (corrupt, unreadable, deleted during the run, an object that is gone), one that is no longer
        a regular file, or one the decoder rejects alone — then redo the batch from ``checkpoint``
        with a stand-in in its place: no good image is lost, and the item is reported once and
        skipped from then on. The failure may come from any batch DALI had already prefetched, so the
        search covers ``prefetch + 1`` batches from the checkpoint. A store that stopped answering
        is waited for. When nothing can be blamed the batch is lost (counted);
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
            self._failed_in_a_row = 0  # an item was found and set aside: progress, not a failing reader
            self._build(checkpoint)  # the same batch again, stand-ins in the broken items' places
            return
        self._failed_in_a_row += 1
        if self._failed_in_a_row >= _MAX_FAILED_RUNS_IN_A_ROW:
            msg = (f"{self._failed_in_a_row} decode batches failed in a row and no item could be blamed; "
                   f"last error: {text}")
            raise DecodeError(msg) from error
        with self._report:
            self.errors.append(text.splitlines()[0] if text else repr(error))
        self.lost_batches += 1
        log.warning("decode batch failed and was skipped (no item could be blamed): %s", text)
        # A failed pipeline may be dead for good: rebuild it just past the lost batch.
        self._build(self._reader.rows_at(checkpoint, 1)[1])

    def _find_undecodable(self, checkpoint: bytes) -> bool:
        """Which rows does the decoder reject? (The decoder's error does not name the item, and the
        failing batch may be one DALI prefetched.) Reads the ``prefetch + 1`` batches from
        ``checkpoint`` again without decoding, then decodes their rows one by one."""
        try:
            labels, _ = self._reader.rows_at(checkpoint, self._prefetch + 1)
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
                for _ in decode_files(self._source, [[c[source]] for c in self._paths], self._backend, num_threads=1,
                                      alpha=self._alpha, **self._output):
                    pass
            except RuntimeError as e:
                self._mark_broken(source, f"the decoder rejects it ({error_cause(e)})")
                found = True
        return found

    def mark_broken(self, source: int, reason: str) -> None:
        """Set item ``source`` aside from now on (e.g. it changed during the run): reported once, its
        later reads are replaced by a stand-in whose decodes are dropped."""
        if source not in self.broken:
            self._mark_broken(source, reason)

    def _mark_broken(self, source: int, reason: str, quiet: bool = False) -> None:
        location = self._paths[0][source]
        with self._report:
            self.broken[source] = reason
        good = np.setdiff1d(np.arange(len(self._read_as)), list(self.broken))  # rows that still decode
        if not len(good):
            msg = f"every item failed to decode or changed during the run; the last one, {location!r}: {reason}"
            raise DecodeError(msg)
        left = self.shard_size - len(self.broken) if hasattr(self, "shard_size") else len(good)
        if left < self._min_good:
            examples = "; ".join(f"{self._paths[0][i]}: {why}" for i, why in list(self.broken_items())[-3:])
            msg = (f"only {left} items of this shard still decode, fewer than the {self._min_good} distinct images "
                   f"a batch needs: {len(self.broken)} were deleted, broken or changed during the run (e.g. {examples}). "
                   "Restore them, or restart the sampler on the data as it is now")
            raise DecodeError(msg)
        self._read_as[self._read_as == source] = good[0]  # also rows that used it as their stand-in
        if not quiet:
            with self._report:
                self.errors.append(f"{location}: {reason}")
            log.warning("skipping %s from now on: %s", location, reason)

    def close(self) -> None:
        """Drop pending images and the DALI pipeline (frees its buffers and threads)."""
        self._pending.clear()
        self._pipe = None
