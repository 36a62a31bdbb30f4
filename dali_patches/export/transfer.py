"""Decode on the CPU, train on a GPU: a CPU sampler's batches copied to a CUDA device, stream-ordered.

:class:`TransferEpochIterator` is a :class:`~dali_patches.export.epochs.DirectEpochIterator` that,
given a CUDA ``device_id``, takes each host batch of a ``device="cpu"`` sampler and hands its patch
outputs (``patches`` and every companion, e.g. ``(B, P_h, P_w, C) uint8``) over as arrays on that
device, through :class:`DeviceCopies`; ``source`` ``(B,) int64`` and ``anchor`` ``(B, 2) int32`` stay
host arrays, as on the GPU direct path. A framework adapter writes how it names its consumer stream
(:meth:`TransferEpochIterator._consumer_stream`) and how it wraps a device array
(:meth:`~dali_patches.export.epochs.DirectEpochIterator._from_dlpack`); ``dali_patches.torch``'s
``DirectIterator(to_device=...)`` is one.

:class:`DeviceCopies` keeps the rules of the GPU path (ARCHITECTURE.md, "Threads, rounds and streams"):

1. *Readers wait for writers on the device.* A batch goes up in one asynchronous copy from pinned
   host memory, queued on the ring's own copy stream; an event is recorded after it and the
   consumer's stream (e.g. torch's current stream of the device) waits on that event. The host never
   waits for a batch's copy.
2. *Memory is chosen first, then the readers are waited for, then it is written.* A device buffer
   is rewritten only once nothing refers to it (no array, view or DLPack tensor of it lives: Python's
   reference count says so, as in :class:`~dali_patches.engine.outputs.OutputRing`), and the copy
   into it waits for events recorded on every consumer stream *after* the buffer was seen
   unreferenced: the reads a consumer queued before letting go of it run first. A buffer seen free at
   one ``next()`` is refilled ``depth - 2`` batches later in a typical loop, so with the default depth
   of 3 the copy of batch ``k + 1`` overlaps the training step of batch ``k``. When every buffer is
   still held (a consumer keeps batches), a replacement comes from the ring's own memory pool and
   the held one belongs to whoever holds it: a kept batch never changes.
3. *The host never rewrites pinned memory an asynchronous copy still reads.* ``depth`` pinned
   staging buffers are filled in turn; buffer ``k`` is refilled after the event of its copy
   ``depth`` batches back. That is the only host wait, and it happens only when the device has
   fallen ``depth`` copies behind (back-pressure, not a wait per batch).

The ring holds ``depth`` device buffers and ``depth`` pinned host buffers of one batch's patch
outputs each (offsets aligned to 256 bytes), allocated at the first batch; nothing else grows.
The copy stage holds no sampler state: the iterator's ``state_dict()`` is the plain direct
iterator's.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..engine import backend as backend_module
from ..engine.backend import Backend, DeviceArray, DeviceUnavailableError, HostArray
from .epochs import DirectEpochIterator, SampleSource
from .pipeline import batch_outputs

__all__ = ["ALIGN", "DeviceCopies", "TransferEpochIterator", "copy_backend", "refuse_gpu_sampler"]

ALIGN = 256  # bytes: each output's offset in a ring buffer (CUDA allocations are aligned so)

log = logging.getLogger(__name__)

# One output's place in a ring buffer: shape, dtype, byte offset, byte count.
_Field = tuple[tuple[int, ...], np.dtype[Any], int, int]


@dataclass
class _Slot:
    """One device buffer of the ring. ``events``: ``None`` while it is handed out (or not yet seen
    unreferenced since); else the consumer-stream events the next copy into it waits for, recorded
    after it was seen unreferenced (``[]``: never handed out)."""

    buffer: DeviceArray
    events: list[Any] | None = field(default_factory=list)


@dataclass
class _Staging:
    """One pinned host buffer; ``copied``: the event after the last copy that read it."""

    pinned: HostArray
    copied: Any = None


def _stream_key(stream: Any) -> int:
    return int(getattr(stream, "ptr", id(stream)))


def _drain(streams: list[Any], consumers: dict[int, Any]) -> None:
    """Wait for the copy stream and every consumer stream (before the ring's memory goes)."""
    for stream in [*streams, *consumers.values()]:
        with contextlib.suppress(Exception):  # a stream its framework destroyed has nothing left to run
            stream.synchronize()


def _layout(arrays: Sequence[HostArray]) -> tuple[_Field, ...]:
    fields, offset = [], 0
    for array in arrays:
        array = np.asarray(array)
        fields.append((tuple(array.shape), array.dtype, offset, int(array.nbytes)))
        offset += -(-int(array.nbytes) // ALIGN) * ALIGN
    return tuple(fields)


class DeviceCopies:
    """A ring of ``depth`` pinned host buffers and ``depth`` device buffers that copies host batches to
    one CUDA device, ordered on the device (see the module's docstring for the rules).

    Args:
        backend: a GPU :class:`~dali_patches.engine.backend.Backend` of the target device (CuPy on a
            real GPU; the simulator of ``tests/cuda_sim.py`` in tests).
        depth: batches the ring holds (≥ 2). Device memory: ``depth × `` one batch's patch outputs,
            the same again in pinned host memory.

    Attributes:
        replaced: device buffers replaced because a consumer still held every one of the ring's.
    """

    def __init__(self, backend: Backend, depth: int = 3) -> None:
        if not backend.is_gpu:
            msg = "DeviceCopies copies to a GPU: pass the backend of a CUDA device"
            raise ValueError(msg)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
            msg = f"copy_depth={depth!r} must be an int >= 2 (batches the host-to-device copy ring holds)"
            raise ValueError(msg)
        self.backend, self.depth = backend, depth
        self._pool = backend.memory_pool()
        self._stream = backend.new_stream()
        self._consumers: dict[int, Any] = {}  # stream handle → consumer stream
        self._slots: list[_Slot] = []
        self._staging: list[_Staging] = []
        self._fields: tuple[_Field, ...] = ()
        self._total = 0
        self._next = self._turn = 0
        self._baseline = 0
        self._closed = False
        self.replaced = 0
        # Dropped while copies are queued: wait for them before the pinned and device memory goes.
        self._finalizer = weakref.finalize(self, _drain, [self._stream], self._consumers)
        self._finalizer.atexit = False

    @property
    def device_bytes(self) -> int:
        """Device bytes of the ring's own buffers (replacements held by a consumer are theirs)."""
        return len(self._slots) * self._total

    @property
    def host_bytes(self) -> int:
        """Pinned host bytes of the staging buffers."""
        return len(self._staging) * self._total

    def copy(self, arrays: Sequence[HostArray], consumer: Any) -> list[DeviceArray]:
        """Device copies of ``arrays`` (host arrays of fixed shapes from batch to batch), to be read
        on ``consumer``: a stream of the ring's device (the backend's stream type), which is made to
        wait on the device for the copy. The caller has the ring's device current. Each returned
        array is a view of a ring buffer that is rewritten only after every array and view of it has
        gone and the work queued on the consumer streams by then has run."""
        if self._closed:
            msg = "this host-to-device copy ring is closed"
            raise RuntimeError(msg)
        fields = _layout(arrays)
        if fields != self._fields:
            self._build(fields)
        self._consumers.setdefault(_stream_key(consumer), consumer)
        self._observe()
        slot, events = self._acquire()
        staging = self._next_staging()
        for (shape, dtype, offset, nbytes), array in zip(self._fields, arrays, strict=True):
            np.copyto(staging.pinned[offset: offset + nbytes].view(dtype).reshape(shape), array)
        with self.backend.use(self._stream):
            self._wait_for_readers(events)
            slot.buffer.set(staging.pinned, self._stream)  # one asynchronous copy of the whole batch
            staging.copied = copied = self.backend.record(self._stream)
        self._hand_over(consumer, copied)
        slot.events = None
        return [slot.buffer[offset: offset + nbytes].view(dtype).reshape(shape)
                for shape, dtype, offset, nbytes in self._fields]

    # -- the rules, one method each (tests/test_transfer.py injects a mistake into each) -------------
    def _free(self, slot: _Slot) -> bool:
        """Whether nothing outside the ring refers to ``slot``'s buffer (no array, view or DLPack
        tensor of it)."""
        return sys.getrefcount(slot.buffer) <= self._baseline

    def _observe(self) -> None:
        """Give every buffer seen unreferenced for the first time the events recorded now, after
        looking: its consumers' reads were queued before they let go of it, so before these."""
        newly = [slot for slot in self._slots if slot.events is None and self._free(slot)]
        if newly:
            events = self._record_consumers()
            for slot in newly:
                slot.events = events

    def _acquire(self) -> tuple[_Slot, list[Any]]:
        """The next buffer seen unreferenced, in ring order, with the events to wait for; or, when a
        consumer holds them all, a replacement from the ring's pool with events recorded after it
        was chosen (the pool may hand back memory a consumer has just dropped)."""
        for _ in range(len(self._slots)):
            slot = self._slots[self._next]
            self._next = (self._next + 1) % len(self._slots)
            if slot.events is not None:
                return slot, slot.events
        i = self._next
        self._next = (self._next + 1) % len(self._slots)
        self._slots[i] = slot = self._new_slot()  # the held one now belongs to whoever holds it
        self.replaced += 1
        return slot, self._record_consumers()

    def _wait_for_readers(self, events: list[Any]) -> None:
        """The copy stream waits (on the device) for the consumers' reads of the buffer it writes."""
        for event in events:
            self.backend.wait(self._stream, event)

    def _next_staging(self) -> _Staging:
        """The pinned buffer to fill now, once the copy from it ``depth`` batches ago has run."""
        staging = self._staging[self._turn]
        self._turn = (self._turn + 1) % len(self._staging)
        if staging.copied is not None:
            staging.copied.synchronize()
        return staging

    def _hand_over(self, consumer: Any, copied: Any) -> None:
        """The consumer's stream waits (on the device, not the host) for the copy."""
        self.backend.wait(consumer, copied)

    # -- memory ------------------------------------------------------------------------------
    def _record_consumers(self) -> list[Any]:
        """An event on every consumer stream now; a stream that no longer exists is dropped."""
        events = []
        for key, consumer in list(self._consumers.items()):
            try:
                events.append(self.backend.record(consumer))
            except Exception as e:  # noqa: BLE001 - CUDA reports a destroyed stream in its own error types
                log.warning("stopped waiting for consumer stream %#x: recording on it failed (%s)", key, e)
                self._consumers.pop(key, None)
        return events

    def _new_slot(self) -> _Slot:
        with self.backend.use(self._stream):  # the ring's pool, on the copy stream of the ring's device
            return _Slot(self.backend.empty_device(max(self._total, 1), np.uint8, self._pool))

    def _build(self, fields: tuple[_Field, ...]) -> None:
        """(Re)allocate the ring for batches of this layout (the first batch's)."""
        _drain([self._stream], {})  # the old staging buffers are no longer read
        self._fields = fields
        self._total = max(-(-(offset + nbytes) // ALIGN) * ALIGN for _, _, offset, nbytes in fields)
        self._slots = [self._new_slot() for _ in range(self.depth)]
        self._staging = [_Staging(self.backend.pinned((self._total,), np.uint8)) for _ in range(self.depth)]
        self._next = self._turn = 0
        self._baseline = sys.getrefcount(self._slots[0].buffer)

    def close(self) -> None:
        """Wait for the copies and the consumers' queued work, then free the ring (arrays handed out
        and still referenced keep their memory)."""
        self._finalizer()
        self._slots, self._staging, self._fields, self._closed = [], [], (), True
        if self._pool is not None:
            self._pool.free_all_blocks()


def refuse_gpu_sampler(sampler_backend: Backend, requested: Any) -> None:
    """``to_device`` is for CPU samplers: raise, naming it and the fix, when the sampler is on a GPU."""
    if requested is not None and sampler_backend.is_gpu:
        msg = (f"to_device={requested!r} copies a CPU sampler's batches to a GPU, but this sampler already runs on "
               f"CUDA device {sampler_backend.device_id} (device='gpu'): its batches are there already, handed over "
               "zero copy; drop to_device, or create the sampler with device='cpu' to decode on the CPU")
        raise ValueError(msg)


def copy_backend(sampler_backend: Backend, device_id: int, requested: Any) -> Backend:
    """The GPU backend of CUDA device ``device_id`` to copy a CPU sampler's batches to, or an error
    naming ``to_device`` (``requested``, as the user spelt it) and the fix."""
    refuse_gpu_sampler(sampler_backend, requested)
    try:
        return backend_module.resolve_backend("gpu", device_id)
    except DeviceUnavailableError as e:
        msg = (f"to_device={requested!r} copies batches to a GPU through CuPy, which is missing or sees no CUDA "
               "device; install a GPU extra (pip install 'dali-patches[cuda13]', or '[cuda12]' for CUDA 12 "
               "drivers) on a machine with a GPU, or leave to_device=None for CPU tensors")
        raise DeviceUnavailableError(msg) from e
    except ValueError as e:
        msg = f"to_device={requested!r} names CUDA device {device_id}, which CuPy does not see ({e})"
        raise ValueError(msg) from e


class TransferEpochIterator(DirectEpochIterator):
    """A :class:`~dali_patches.export.epochs.DirectEpochIterator` that copies a CPU sampler's patch
    outputs to CUDA device ``device_id`` (see the module's docstring); with ``device_id=None`` it is
    the plain direct iterator. Subclasses write :meth:`_consumer_stream` and ``_from_dlpack``.

    Args:
        sampler, batches_per_epoch: as for :class:`~dali_patches.export.epochs.EpochIterator`.
        device_id: the CUDA device to copy to; ``None``: no copy.
        copy_depth: batches the copy ring holds (≥ 2; see :class:`DeviceCopies`).
        requested: the user's ``to_device`` as given, for messages (a GPU sampler refuses any).
    """

    def __init__(self, sampler: SampleSource, batches_per_epoch: int | None = None, device_id: int | None = None,
                 copy_depth: int = 3, requested: Any = None) -> None:
        super().__init__(sampler, batches_per_epoch)
        refuse_gpu_sampler(sampler.backend, requested)
        self.copies: DeviceCopies | None = None
        if device_id is not None:
            self.copies = DeviceCopies(copy_backend(sampler.backend, device_id, requested), copy_depth)

    def _take(self) -> dict[str, Any]:
        copies = self.copies
        if copies is None:
            return super()._take()
        outputs = batch_outputs(self.sampler.config, self.sampler.take(None))
        parts = len(self.sampler.config.parts)
        with copies.backend.on_device(), self._consumer_stream(copies.backend) as stream:
            arrays = copies.copy(outputs[:parts], stream)
            return {name: self._from_dlpack(array)  # on the consumer's stream: DLPack adds no second event
                    for name, array in zip(self._names, (*arrays, *outputs[parts:]), strict=True)}

    def _consumer_stream(self, backend: Backend) -> Any:
        """The stream the framework reads on, as ``backend``'s stream type (a context manager that
        makes it current); by default CuPy's current stream of ``backend``'s device."""
        return backend.current_stream()

    def close(self) -> None:
        """Free the copy ring (after its copies and the consumers' queued work); no-op without one."""
        if self.copies is not None:
            self.copies.close()
