"""The DALI sample pipeline: finished batches handed to DALI through ``external_source``.

The callback runs on the thread that calls ``run()`` (the trainer's), so it only takes a finished
:class:`~dali_patches.engine.outputs.PatchBatch` and returns its arrays. It takes ``batch_info=True``, so
DALI counts the iterations (:attr:`Feed.fed` is how many batches this pipeline has taken, for
``state_dict``). Every output comes from one ``external_source`` on the sampler's device: on a GPU
the patches, the companions and the round's ``source`` and ``anchor`` (written to the device with
the patches) are handed over with ``cuda_stream=`` the producer's stream, so DALI's copy is queued
after the gather that wrote them, and the producer rewrites nothing before that copy (its later
work is queued behind it on the same stream).

``no_copy=True`` lets DALI read the batch in place instead of copying it. DALI then needs the
buffers unchanged until the iteration's outputs are consumed (``prefetch_queue_depth`` iterations
later): the feed keeps the last ``prefetch_queue_depth + 2`` batches referenced, and neither the
host rounds (fresh every round) nor the output ring (a buffer is rewritten only when nothing refers
to it) changes a referenced batch. On a GPU DALI then ignores ``cuda_stream=`` and orders its reads
after the stream the arrays name (CuPy's current stream of the thread calling ``run()``), so the
sampler hands the batch over on that stream (:meth:`~dali_patches.PatchSampler.take`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from nvidia.dali import fn, pipeline_def, types

from ..config import SamplerConfig
from ..engine.backend import Backend
from ..engine.decode import DALI_DTYPES
from ..engine.outputs import PatchBatch
from ..options import Layout
from .augment import augment_outputs, output_dtype

__all__ = ["Feed", "augment_nodes", "batch_outputs", "build_pipeline", "external_source_args", "output_dtypes",
           "output_names", "output_shapes"]


def output_names(config: SamplerConfig) -> tuple[str, ...]:
    """``patches``, each companion, ``source``, ``anchor``."""
    return (*(p.name for p in config.parts), "source", "anchor")


def batch_outputs(config: SamplerConfig, batch: PatchBatch, on_device: bool = False) -> tuple[Any, ...]:
    """A batch's arrays ordered as :func:`output_names`; ``on_device``: ``source`` and ``anchor`` from
    the device too (GPU; on the CPU they are the host arrays anyway)."""
    meta = ((batch.device_source, batch.device_anchor) if on_device and batch.device_source is not None
            else (batch.source, batch.anchor))
    return (batch.patches, *(batch.companions[p.name] for p in config.parts[1:]), *meta)


def output_dtypes(config: SamplerConfig) -> tuple[str, ...]:
    """NumPy dtype names of the outputs after ``augment``, ordered as :func:`output_names`."""
    return (*(output_dtype(p, config.augment) for p in config.parts), "int64", "int32")


def output_shapes(config: SamplerConfig) -> tuple[tuple[int, ...], ...]:
    """Per-sample shapes of the outputs after ``augment``, ordered as :func:`output_names`."""
    chw = config.augment.layout is Layout.CHW
    return (*((p.channels, *p.patch_hw) if chw else p.patch_shape for p in config.parts), (), (2,))


def external_source_args(config: SamplerConfig) -> dict[str, list[Any]]:
    """``dtype``, ``layout`` and ``ndim`` lists (one entry per output) for ``fn.external_source``."""
    parts = config.parts
    return {"dtype": [*(DALI_DTYPES[p.dtype] for p in parts), types.INT64, types.INT32],
            "layout": [*("HWC" for _ in parts), "", ""], "ndim": [*(3 for _ in parts), 0, 1]}


def augment_nodes(config: SamplerConfig, inputs: Sequence[Any]) -> tuple[Any, ...]:
    """Inside a DALI graph: ``config.augment`` applied to nodes ordered as :func:`output_names` (one
    random draw per patch, shared by its companions); ``source`` and ``anchor`` pass through."""
    parts = config.parts
    return (*augment_outputs(inputs[:len(parts)], parts, config.augment), *inputs[len(parts):])


class Feed:
    """The ``external_source`` callbacks of one pipeline: each iteration takes one batch, and every
    callback of that iteration returns its share of it (DALI may call them in any order).

    Args:
        take: returns the next finished batch.
        config: the sampler's config (for the output order).
        groups: output index ranges, one per ``external_source``.
        on_device: hand ``source`` and ``anchor`` over from the device (GPU).
        keep: batches kept referenced after they were handed over (``no_copy=True``: DALI reads them
            until the iteration's outputs are consumed).
    """

    def __init__(self, take: Callable[[], PatchBatch], config: SamplerConfig, groups: Sequence[range],
                 on_device: bool = False, keep: int = 0) -> None:
        self._take, self._config, self._groups, self._on_device = take, config, list(groups), on_device
        self._lock = threading.Lock()
        self._pending: dict[int, list[Any]] = {}  # iteration → [outputs, callbacks still to take them]
        self._kept: deque[tuple[Any, ...]] = deque(maxlen=keep or None) if keep else deque(maxlen=0)
        self.fed = 0  # batches this pipeline has taken

    def callback(self, group: int) -> Callable[[Any], tuple[Any, ...]]:
        span = self._groups[group]

        def take(info: Any) -> tuple[Any, ...]:
            with self._lock:
                entry = self._pending.get(info.iteration)
                if entry is None:
                    outputs = batch_outputs(self._config, self._take(), self._on_device)
                    entry = self._pending[info.iteration] = [outputs, len(self._groups)]
                    self._kept.append(outputs)
                    self.fed = max(self.fed, info.iteration + 1)
                entry[1] -= 1
                if not entry[1]:
                    del self._pending[info.iteration]
                return tuple(entry[0][i] for i in span)

        return take


def build_pipeline(take: Callable[[], PatchBatch], config: SamplerConfig, backend: Backend, stream: Any,
                   prefetch_queue_depth: int = 2, num_threads: int = 1, no_copy: bool = False,
                   **kwargs: Any) -> tuple[Any, Feed]:
    """A built DALI pipeline with one output per :func:`output_names` entry, fed by ``take`` through
    one ``external_source`` on ``backend``'s device, with ``config.augment`` applied there; and its
    :class:`Feed`.

    ``stream`` is the producer's CUDA stream (GPU) or ``None``: DALI copies the outputs on it.
    ``no_copy``: DALI reads the batches in place (see the module's docstring).
    """
    names, spec = output_names(config), external_source_args(config)
    groups = [range(len(names))]
    feed = Feed(take, config, groups, on_device=backend.is_gpu, keep=prefetch_queue_depth + 2 if no_copy else 0)
    extra = {"cuda_stream": stream} if (backend.is_gpu and stream is not None) else {}

    @pipeline_def(batch_size=config.batch_size, num_threads=num_threads, device_id=backend.dali_device_id,
                  prefetch_queue_depth=prefetch_queue_depth, seed=config.seed, **kwargs)
    def sample_pipeline():  # a DALI graph
        nodes = fn.external_source(source=feed.callback(0), num_outputs=len(names), batch=True, batch_info=True,
                                   device=backend.op_device, no_copy=no_copy, **spec, **extra)
        return augment_nodes(config, list(nodes))

    pipe = sample_pipeline()
    pipe.build()
    return pipe, feed
