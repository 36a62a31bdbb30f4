"""JAX export: ``jax.Array`` batches from a :class:`~dali_patches.PatchSampler`, two ways.

* :class:`DirectIterator` — the sampler's batches through DLPack (``jax.dlpack.from_dlpack``): no
  DALI pipeline. On the CPU the arrays are the sampler's own batch memory (zero copy where it is
  64-byte aligned, as JAX requires; JAX copies it otherwise); on a GPU each output is copied once on
  the device (see the class).
* :class:`PatchIterator` — DALI's JAX plugin (``nvidia.dali.plugin.jax.DALIGenericIterator``, which
  needs JAX ≥ 0.6) over the sampler's sample pipeline, for when DALI ops (``augment``, your own) should
  run on the batches. It works on a CPU-only pipeline as on a GPU.

Each step yields ``{"patches": (B, P_h, P_w, C), "source": (B,), "anchor": (B, 2) int32}`` plus one
entry per companion; patches are ``uint8`` unless the sampler's ``dtype`` (or, through
:class:`PatchIterator`, ``augment``) says otherwise. JAX without 64-bit types (its default) has no
``int64``: ``source`` then arrives as ``int32`` (image indices below 2³¹), with
``jax.config.update("jax_enable_x64", True)`` as ``int64``. Both iterators have ``len()`` and
epoch-bounded ``for`` loops (``batches_per_epoch``), ``state_dict()`` and ``load_state_dict()``
(:mod:`dali_patches.export.epochs`). Import this module only when JAX is installed (the ``jax``
extra); the core package does not need it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.dlpack
import jax.numpy as jnp

from .export.epochs import DirectEpochIterator, PipelineEpochIterator
from .sampler import PatchSampler

__all__ = ["DirectIterator", "PatchIterator"]


def _dali_jax_iterator() -> Any:
    """DALI's ``DALIGenericIterator`` for JAX (its plugin checks the JAX version when imported)."""
    try:
        from nvidia.dali.plugin.jax import DALIGenericIterator
    except AssertionError as error:
        msg = (f"PatchIterator runs DALI's JAX plugin, which refuses this JAX ({jax.__version__}): {error}; "
               "install jax>=0.6, or use dali_patches.jax.DirectIterator (no DALI pipeline)")
        raise ImportError(msg) from error
    return DALIGenericIterator


class PatchIterator(PipelineEpochIterator):
    """JAX arrays from a :class:`~dali_patches.PatchSampler`, through DALI's JAX plugin.

    Every output is on the sampler's device (a GPU of JAX in GPU mode, JAX's CPU otherwise). DALI's
    iterator hands over the pipeline's outputs through DLPack on the stream DALI names, and waits on
    the host for every batch. The pipeline is built, and DALI's iterator made, at the first
    ``next()``: constructing this iterator takes no batch, so :meth:`load_state_dict` may follow.

    Args: ``sampler``, ``batches_per_epoch``, ``prefetch_queue_depth`` and ``no_copy``, as for
        :class:`~dali_patches.export.epochs.PipelineEpochIterator`.

    Raises:
        ImportError: DALI's JAX plugin refuses the installed JAX (it needs JAX ≥ 0.6).

    Example:
        >>> for data in PatchIterator(sampler, batches_per_epoch=100):
        ...     x = data["patches"].astype(jnp.float32) / 255  # (B, P, P, 3) on the sampler's device
    """

    def __init__(self, sampler: PatchSampler, batches_per_epoch: int | None = None,
                 prefetch_queue_depth: int = 2, no_copy: bool = False) -> None:
        super().__init__(sampler, batches_per_epoch, prefetch_queue_depth, no_copy)
        self._iterator_type = _dali_jax_iterator()

    def _plugin(self, pipe: Any) -> Any:
        return self._iterator_type(pipe, list(self.sampler.output_names), size=-1)


class DirectIterator(DirectEpochIterator):
    """JAX arrays straight from the sampler's batches, through DLPack: no DALI pipeline.

    **On the CPU** the patch arrays are the sampler's batch memory itself (JAX copies instead where
    that memory is not 64-byte aligned). JAX holds the batch for as long as an array, or a
    computation queued on it, needs it — the sampler rewrites a batch's memory only once nothing
    refers to it — so a kept batch never changes.

    **On a GPU** JAX reads on streams of its own, which the sampler cannot order its rewrites after
    (it orders them after the streams that took batches through ``take(stream)``), so a zero-copy
    array could see its memory rewritten while a JAX computation still reads it. Each output is
    therefore copied once on the device: the batch is taken on this thread's current CuPy stream
    (which waits on the device for the gather), imported into JAX through DLPack (JAX's stream waits
    for that one), copied by JAX into memory JAX owns, and the host waits for those copies before the
    batch is let go. That costs one device copy and one host wait per batch; the arrays are then
    JAX's own, free of any rule. ``source`` and ``anchor`` are host (CPU) arrays, as with torch.

    Augmentation (``augment``) runs as DALI ops: use :class:`PatchIterator` for it.

    Args:
        sampler: the sampler to draw from (its stream is shared with any other consumer).
        batches_per_epoch: as for :class:`PatchIterator`.

    Example:
        >>> for data in DirectIterator(sampler, batches_per_epoch=100):
        ...     x = data["patches"].astype(jnp.float32) / 255  # (B, P, P, 3) on the sampler's device
    """

    def _from_dlpack(self, array: Any) -> Any:
        return jax.dlpack.from_dlpack(array)

    def _take_on_device(self) -> dict[str, Any]:
        backend = self.sampler.backend
        with backend.on_device():  # CuPy's current stream of the sampler's device: DLPack orders JAX after it
            views = self._convert(self.sampler.take(backend.current_stream()))
        copies = {name: jnp.array(view, copy=True) for name, view in views.items()}
        jax.block_until_ready(copies)  # every read of the batch's memory is done: it may be let go
        return copies
