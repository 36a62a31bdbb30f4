"""PyTorch export: DALI's ``DALIGenericIterator`` over the sampler's sample pipeline.

Each step yields ``{"patches": (B, P_h, P_w, 3) uint8, "source": (B,) int64, "anchor": (B, 2) int32}``
plus one entry per companion (``"target"``, ``"mask"``, …), as torch tensors on the sampler's device
(CUDA in GPU mode, CPU otherwise); ``augment`` may change dtypes and layout (see ``output_dtypes()``). Import this module only
when torch is installed; the core package does not need it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from nvidia.dali.plugin.pytorch import DALIGenericIterator

from .pipeline import PatchSampler

__all__ = ["PatchIterator"]


class PatchIterator:
    """Torch tensors from a :class:`~dali_patches.PatchSampler`, through DALI's PyTorch plugin.

    Args:
        sampler: the sampler to draw from (its stream is shared with any other consumer).
        batches_per_epoch: ``None`` iterates forever; an int makes each ``for`` loop stop after that
            many batches (``len()`` gives it), continuing the same stream on the next loop.
        prefetch_queue_depth: batches DALI keeps in flight.

    Example:
        >>> for step, data in zip(range(1000), PatchIterator(sampler)):
        ...     loss = model(data["patches"].permute(0, 3, 1, 2).float() / 255)
    """

    def __init__(self, sampler: PatchSampler, batches_per_epoch: int | None = None,
                 prefetch_queue_depth: int = 2) -> None:
        if batches_per_epoch is not None and (not isinstance(batches_per_epoch, int) or batches_per_epoch <= 0):
            msg = f"{batches_per_epoch=} must be a positive int or None (endless)"
            raise ValueError(msg)
        self.sampler = sampler
        self.batches_per_epoch = batches_per_epoch
        self.pipeline = sampler.pipeline(prefetch_queue_depth=prefetch_queue_depth)
        self._dali = DALIGenericIterator(self.pipeline, list(sampler.output_names), size=-1)
        self._returned = 0

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            msg = "an endless PatchIterator has no length; pass batches_per_epoch"
            raise TypeError(msg)
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        count = 0
        while self.batches_per_epoch is None or count < self.batches_per_epoch:
            data = next(self._dali)[0]
            self._returned += 1
            yield data
            count += 1

    def state_dict(self) -> dict[str, Any]:
        """The sampler's :meth:`~dali_patches.PatchSampler.state_dict` after the last batch this
        iterator yielded (batches in DALI's prefetch queue are not counted as consumed). Restore
        with ``sampler.load_state_dict`` on a new sampler, then wrap it in a new iterator."""
        return self.sampler.state_dict(in_flight=self.pipeline.batches_fed[0] - self._returned)
