"""Output buffers of the gathered patches, and the batch type that carries them.

The gather writes each round into preallocated memory (on a GPU the kernel, read later by DALI or
the trainer on another stream; on the host NumPy passes). :class:`OutputRing` makes reusing it safe
by construction: a buffer is handed out for rewriting only when nothing outside the ring refers to
it any more — no batch, view, DLPack tensor or DALI feed holds it (Python's reference count says so)
— and on a GPU the producer's stream additionally waits for the consumer streams before the kernel
overwrites it. A consumer that keeps batches longer only makes the ring allocate a replacement; it
never sees its patches change. On the host the ring keeps the resident memory flat: no round
allocates (and the allocator trims) tens of MiB of fresh pages.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import Backend, DeviceArray, HostArray

__all__ = ["OutputRing", "PatchBatch"]


@dataclass(frozen=True)
class PatchBatch:
    """One batch of patches with its provenance.

    Attributes:
        patches: ``(B, P_h, P_w, C)`` (default RGB ``uint8``); CuPy on GPU, NumPy on CPU.
        source: ``(B,) int64`` host array, index of each patch's image in ``sampler.files``.
        anchor: ``(B, 2) int32`` host array, ``(y, x)`` of each patch's top-left pixel in its image.
        index: position of this batch in the stream (0, 1, 2, ...).
        companions: name → ``(B, P_h·s, P_w·s, C_c)`` patches of each companion, cut at the anchors
            scaled by its ``s``.
        ready: GPU: a CUDA event that completes when the patches are written (the sampler makes the
            consumer's stream wait on it); ``None`` on CPU.
        device_source, device_anchor: GPU: ``source`` and ``anchor`` on the device too, written with
            the patches (the DALI pipeline hands every output over from the device); ``None`` on CPU.
    """

    patches: DeviceArray
    source: HostArray
    anchor: HostArray
    index: int
    companions: dict[str, DeviceArray] = field(default_factory=dict)
    ready: Any = None
    device_source: DeviceArray = None
    device_anchor: DeviceArray = None


class OutputRing:
    """``depth`` groups of preallocated flat ``uint8`` device buffers, one buffer per part of a round.

    Args:
        backend: the device; buffers are allocated on it.
        round_bytes: bytes of one round of each part (``round batches × B × patch bytes``), and of
            anything else a round hands out with them (its ``source`` and ``anchor`` on the device).
        depth: groups kept; rounds in flight beyond it get fresh buffers (counted in ``replaced``).

    :meth:`acquire` is the only way to a group. The producer's stream must then wait for every stream
    that read the ring *before* anything writes the group: a group is free because its readers let go
    of it; only an event recorded after the choice covers their reads. On a GPU the groups come from
    a memory pool of the ring's own, so a replaced group that a consumer drops later is handed to no
    other allocation than a later replacement (in CuPy's shared pool a smaller request — a pad, a
    mask sum — could take part of it before that wait).
    """

    def __init__(self, backend: Backend, round_bytes: list[int], depth: int) -> None:
        self._backend = backend
        self._pool = backend.memory_pool()
        self._round_bytes = list(round_bytes)
        self._groups = [self._new_group() for _ in range(depth)]
        self._next = 0
        self.replaced = 0  # groups replaced because a consumer still held every buffer
        self._baseline = max(self._references(self._groups[0]))  # references while only the ring holds it

    def _new_group(self) -> list[DeviceArray]:
        return [self._backend.empty_device(nbytes, np.uint8, self._pool) for nbytes in self._round_bytes]

    def release(self) -> None:
        """Drop the ring and return its pool's free memory to the device (the stream writing it is
        done: the caller has synchronised it)."""
        self._groups = []
        if self._pool is not None:
            self._pool.free_all_blocks()

    @staticmethod
    def _references(group: list[DeviceArray]) -> list[int]:
        counts = []
        for buffer in group:
            counts.append(sys.getrefcount(buffer))
        return counts

    def _free(self, group: list[DeviceArray]) -> bool:
        """Whether nothing outside the ring refers to any buffer of ``group`` (no batch, view, DLPack
        tensor or DALI feed)."""
        return max(self._references(group)) <= self._baseline

    def acquire(self) -> list[DeviceArray]:
        """A group of buffers nothing else refers to: the next free one in ring order, or a fresh
        replacement when every group is still held somewhere."""
        for _ in range(len(self._groups)):
            i = self._next
            self._next = (self._next + 1) % len(self._groups)
            if self._free(self._groups[i]):
                return self._groups[i]
        i = self._next
        self._next = (self._next + 1) % len(self._groups)
        self._groups[i] = self._new_group()  # the held one now belongs to whoever holds it
        self.replaced += 1
        return self._groups[i]

    @property
    def nbytes(self) -> int:
        """Device bytes the ring holds."""
        return len(self._groups) * sum(self._round_bytes)
