"""PyTorch export: torch tensors from a :class:`~dali_patches.PatchSampler`, two ways.

* :class:`PatchIterator` — DALI's ``DALIGenericIterator`` over the sampler's sample pipeline, for
  when DALI ops (``augment``, your own) should run on the batches.
* :class:`DirectIterator` — the sampler's batches as torch tensors through DLPack, zero copy, for
  training loops that need no DALI ops: no pipeline, no copy, the same provenance and state. With
  ``to_device="cuda"`` it also serves the common *decode on the CPU, train on a GPU* setup (a GPU
  busy training, or a format nvJPEG cannot decode): a ``device="cpu"`` sampler's patches arrive as
  CUDA tensors, copied from pinned host buffers by asynchronous copies that torch's current stream
  waits for on the device (:mod:`dali_patches.export.transfer`).

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

from .engine.backend import Backend, DeviceUnavailableError
from .export.epochs import PipelineEpochIterator
from .export.transfer import TransferEpochIterator, refuse_gpu_sampler
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


def _cuda_index(sampler: PatchSampler, to_device: Any) -> int | None:
    """The CUDA device index ``to_device`` names (``None``: tensors stay where the sampler makes them),
    or an error naming ``to_device`` and the fix."""
    if to_device is None:
        return None
    refuse_gpu_sampler(sampler.backend, to_device)
    if isinstance(to_device, bool) or not isinstance(to_device, (int, str, torch.device)):
        device = None
    elif isinstance(to_device, int):
        device = torch.device("cuda", to_device) if to_device >= 0 else None
    else:
        try:
            device = torch.device(to_device)
        except (RuntimeError, ValueError):
            device = None
    if device is None or device.type not in ("cuda", "cpu"):
        msg = (f"to_device={to_device!r} is no CUDA device; pass 'cuda' (torch's current CUDA device), 'cuda:N', "
               "torch.device('cuda', N) or N, or None for CPU tensors")
        raise ValueError(msg)
    if device.type == "cpu":  # a CPU sampler's tensors are on the host already
        return None
    if not torch.cuda.is_available():
        msg = (f"to_device={to_device!r} but torch sees no CUDA GPU (torch.cuda.is_available() is False: a CPU-only "
               "torch build, no driver or no device); install torch with CUDA on a GPU machine, or leave "
               "to_device=None for CPU tensors")
        raise DeviceUnavailableError(msg)
    return torch.cuda.current_device() if device.index is None else int(device.index)


class DirectIterator(TransferEpochIterator):
    """Torch tensors straight from the sampler's batches, through DLPack: no DALI pipeline, no copy —
    or, with ``to_device``, one asynchronous host-to-device copy per batch of a CPU sampler.

    **A GPU sampler** (``device="gpu"``): the tensors are the sampler's batch memory on its device,
    read on torch's current stream of that device, which waits (on the device, not the host) for the
    gather that wrote them; the sampler rewrites a batch's memory only after the tensor and every
    view of it are released and the work queued on that stream by then is done. Keeping a batch (or
    a view) alive keeps its patches as they are. ``source`` and ``anchor`` are host tensors.

    **A CPU sampler** (``device="cpu"``): CPU tensors over the sampler's batch memory (zero copy), or,
    with ``to_device="cuda"`` (or ``"cuda:N"``, ``torch.device``, ``N``), CUDA tensors of that device
    (``"cuda"``: torch's current CUDA device when the iterator is made). Each batch's patches and
    companions (e.g. ``(B, P, P, 3) uint8``) are copied on the host into one of ``copy_depth``
    page-locked staging buffers, then into one of ``copy_depth`` device buffers by one asynchronous
    copy on a stream of the iterator's own; torch's current stream of that device waits for the copy
    on the device (no host wait per batch) and receives the device buffer through DLPack (no further
    copy). The promise is the GPU sampler's: a device buffer is rewritten only after the tensor and
    every view of it are released and the work queued on torch's stream by then is done, so a tensor
    kept (or not yet read by a lagging stream) never changes; when a loop keeps every buffer, the
    iterator allocates a replacement rather than wait (``iterator.copies.replaced`` counts them). A
    staging buffer is refilled only after its copy ``copy_depth`` batches back has run — the host
    waits only when the GPU is that far behind. Memory: ``copy_depth`` batches of patch outputs on
    the device and as many in pinned host memory (``iterator.copies.device_bytes`` and
    ``host_bytes``). ``source`` and ``anchor`` stay host tensors. Read the tensors on the stream that
    was current when ``next()`` returned them (as with any tensor, another stream needs its own
    synchronisation). ``close()`` frees the ring early; dropping the iterator frees it too.

    The state (``state_dict()``, ``load_state_dict()``) is the same with or without ``to_device``: the
    copy holds no sampler state.

    Args:
        sampler: the sampler to draw from (its stream is shared with any other consumer).
        batches_per_epoch: as for :class:`PatchIterator`.
        to_device: ``None`` (tensors on the sampler's device), or the CUDA device to copy a CPU
            sampler's batches to; ``"cpu"`` is accepted for a CPU sampler (no copy).
        copy_depth: batches the copy ring holds (≥ 2; with 3, the copy of batch ``k + 1`` overlaps
            the step on batch ``k``). Ignored without ``to_device``.

    Raises:
        ValueError: ``to_device`` names no CUDA device, or the sampler is already on a GPU
            (``device="gpu"``: drop ``to_device``), or ``copy_depth`` < 2.
        DeviceUnavailableError: ``to_device`` names a GPU, but torch or CuPy sees none.

    Example:
        >>> for data in DirectIterator(sampler, batches_per_epoch=100):
        ...     x = data["patches"].permute(0, 3, 1, 2).float() / 255  # (B, 3, P, P) on the sampler's device
        >>> cpu_sampler = PatchSampler("images/", patch_size=128, batch_size=64, device="cpu")
        >>> for data in DirectIterator(cpu_sampler, batches_per_epoch=100, to_device="cuda"):
        ...     x = data["patches"].permute(0, 3, 1, 2).float() / 255  # (B, 3, P, P) on torch's current GPU
    """

    def __init__(self, sampler: PatchSampler, batches_per_epoch: int | None = None, to_device: Any = None,
                 copy_depth: int = 3) -> None:
        device_id = _cuda_index(sampler, to_device)
        super().__init__(sampler, batches_per_epoch, device_id, copy_depth, requested=to_device)

    def _from_dlpack(self, array: Any) -> Any:
        return torch.from_dlpack(array)

    def _consumer_stream(self, backend: Backend) -> Any:
        # torch's stream of the backend's device (not of whichever device is current), seen by CuPy as
        # its current stream there: batches are ordered on it, and DLPack adds no second event.
        device = backend.device_id
        return _cupy_stream(backend.xp, torch.cuda.current_stream(device), device)

    def _take_on_device(self) -> dict[str, Any]:
        backend = self.sampler.backend
        with backend.on_device(), self._consumer_stream(backend) as stream:
            return self._convert(self.sampler.take(stream))
