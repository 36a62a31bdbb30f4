"""PyTorch export: torch tensors from a :class:`~dali_patches.PatchSampler`, two ways.

* :class:`PatchIterator` — DALI's ``DALIGenericIterator`` over the sampler's sample pipeline, for
  when DALI ops (``augment``, your own) should run on the batches.
* :class:`DirectIterator` — the sampler's batches as torch tensors through DLPack, zero copy, for
  training loops that need no DALI ops: no pipeline, no copy, the same provenance and state.

Each step yields ``{"patches": (B, P_h, P_w, C), "source": (B,) int64, "anchor": (B, 2) int32}`` plus
one entry per companion (``"target"``, ``"mask"``, …); patches are ``uint8`` unless the sampler's
``dtype`` or ``augment`` says otherwise. Both iterators have ``len()`` and epoch-bounded ``for``
loops (``batches_per_epoch``), ``state_dict()`` and ``load_state_dict()``
(:mod:`dali_patches.export.epochs`). Import this module only when torch is installed; the core
package does not need it.
"""

from __future__ import annotations

from typing import Any

import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .export.epochs import DirectEpochIterator, PipelineEpochIterator
from .sampler import PatchSampler

__all__ = ["DirectIterator", "PatchIterator"]


class _StreamHandle:
    """A raw CUDA stream handle under the CUDA stream protocol (what CuPy's ``Stream.from_external``
    takes; a torch stream need not implement it)."""

    def __init__(self, ptr: int) -> None:
        self._ptr = int(ptr)

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self._ptr)


def _cupy_stream(xp: Any, torch_stream: Any, device: int) -> Any:
    """CuPy's view of a torch stream: ``Stream.from_external`` (CuPy 14+), else ``ExternalStream``."""
    from_external = getattr(xp.cuda.Stream, "from_external", None)
    if from_external is not None:
        return from_external(_StreamHandle(torch_stream.cuda_stream))
    return xp.cuda.ExternalStream(torch_stream.cuda_stream, device)


class PatchIterator(PipelineEpochIterator):
    """Torch tensors from a :class:`~dali_patches.PatchSampler`, through DALI's PyTorch plugin.

    In GPU mode every output, ``source`` and ``anchor`` included, is a CUDA tensor of the sampler's
    device; on the CPU, CPU tensors. The pipeline is built, and DALI's iterator made, at the first
    ``next()``: constructing the iterator takes no batch, so :meth:`load_state_dict` may follow.

    Args: ``sampler``, ``batches_per_epoch``, ``prefetch_queue_depth`` and ``no_copy``, as for
        :class:`~dali_patches.export.epochs.PipelineEpochIterator`.

    Example:
        >>> for step, data in zip(range(1000), PatchIterator(sampler)):
        ...     loss = model(data["patches"].permute(0, 3, 1, 2).float() / 255)
    """

    def __init__(self, sampler: PatchSampler, batches_per_epoch: int | None = None,
                 prefetch_queue_depth: int = 2, no_copy: bool = False) -> None:
        super().__init__(sampler, batches_per_epoch, prefetch_queue_depth, no_copy)

    def _plugin(self, pipe: Any) -> Any:
        return DALIGenericIterator(pipe, list(self.sampler.output_names), size=-1)

    def _unpack(self, step: Any) -> dict[str, Any]:
        return dict(step[0])  # one pipeline


class DirectIterator(DirectEpochIterator):
    """Torch tensors straight from the sampler's batches, through DLPack: no DALI pipeline, no copy.

    On a GPU, the tensors are read on torch's current stream of the sampler's device, which waits
    (on the device, not the host) for the gather that wrote them; the sampler rewrites a batch's
    memory only after the tensor and every view of it are released and the work queued on that
    stream by then is done. Keeping a batch (or a view) alive keeps its patches as they are.
    ``source`` and ``anchor`` are host tensors.

    Args:
        sampler: the sampler to draw from (its stream is shared with any other consumer).
        batches_per_epoch: as for :class:`PatchIterator`.

    Example:
        >>> for data in DirectIterator(sampler, batches_per_epoch=100):
        ...     x = data["patches"].permute(0, 3, 1, 2).float() / 255  # (B, 3, P, P) on the sampler's device
    """

    def _from_dlpack(self, array: Any) -> Any:
        return torch.from_dlpack(array)

    def _take_on_device(self) -> dict[str, Any]:
        # torch's stream of the sampler's device (not of whichever device is current), seen by CuPy as
        # its current stream there: the batch is ordered on it, and DLPack adds no second event.
        backend = self.sampler.backend
        device = backend.device_id
        with backend.on_device(), _cupy_stream(backend.xp, torch.cuda.current_stream(device), device) as stream:
            return self._convert(self.sampler.take(stream))
