"""The DALI sample pipeline: finished batches handed to DALI through ``external_source``.

The callbacks run on the thread that calls ``run()`` (the trainer's), so they only take a finished
:class:`~dali_patches.outputs.PatchBatch` and return its arrays. They take ``batch_info=True``, so
DALI counts the iterations (:attr:`Feed.fed` is how many batches this pipeline has taken, for
``state_dict``). In GPU mode the patch outputs come from one GPU ``external_source`` given the
producer's CUDA stream (``cuda_stream=``), so DALI's copy is queued after the gather that wrote the
batch; ``source`` and ``anchor``, host arrays, come from a second, CPU ``external_source`` that reads
the same batch. DALI copies what it is fed (``no_copy=False``), and the output ring never rewrites a
buffer a feed still refers to, so a reused buffer cannot change under DALI's copy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from nvidia.dali import fn, pipeline_def, types

from .augment import augment_outputs, output_dtype
from .backend import Backend
from .config import SamplerConfig
from .decode import DALI_DTYPES
from .options import Layout
from .outputs import PatchBatch

__all__ = ["Feed", "augment_nodes", "batch_outputs", "build_pipeline", "external_source_args", "output_dtypes",
           "output_names", "output_shapes"]


def output_names(config: SamplerConfig) -> tuple[str, ...]:
    """``patches``, each companion, ``source``, ``anchor``."""
    return (*(p.name for p in config.parts), "source", "anchor")


def batch_outputs(config: SamplerConfig, batch: PatchBatch) -> tuple[Any, ...]:
    """A batch's arrays ordered as :func:`output_names`."""
    return (batch.patches, *(batch.companions[p.name] for p in config.parts[1:]), batch.source, batch.anchor)


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
        take: returns the next finished batch (``next(sampler)``).
        config: the sampler's config (for the output order).
        groups: output index ranges, one per ``external_source`` (e.g. device outputs, host outputs).
    """

    def __init__(self, take: Callable[[], PatchBatch], config: SamplerConfig, groups: Sequence[range]) -> None:
        self._take, self._config, self._groups = take, config, list(groups)
        self._lock = threading.Lock()
        self._pending: dict[int, list[Any]] = {}  # iteration → [outputs, callbacks still to take them]
        self.fed = 0  # batches this pipeline has taken

    def callback(self, group: int) -> Callable[[Any], tuple[Any, ...]]:
        span = self._groups[group]

        def take(info: Any) -> tuple[Any, ...]:
            with self._lock:
                entry = self._pending.get(info.iteration)
                if entry is None:
                    entry = self._pending[info.iteration] = [batch_outputs(self._config, self._take()), len(self._groups)]
                    self.fed = max(self.fed, info.iteration + 1)
                entry[1] -= 1
                if not entry[1]:
                    del self._pending[info.iteration]
                return tuple(entry[0][i] for i in span)

        return take


def build_pipeline(take: Callable[[], PatchBatch], config: SamplerConfig, backend: Backend, stream: Any,
                   prefetch_queue_depth: int = 2, num_threads: int = 1, **kwargs: Any) -> tuple[Any, Feed]:
    """A built DALI pipeline with one output per :func:`output_names` entry, fed by ``take``, with
    ``config.augment`` applied on ``backend``'s device; and its :class:`Feed`.

    ``stream`` is the producer's CUDA stream (GPU) or ``None``: DALI copies the patch outputs on it.
    """
    names, spec = output_names(config), external_source_args(config)
    n_parts = len(config.parts)
    split = backend.is_gpu  # device patches on one source, host provenance on another
    groups = [range(n_parts), range(n_parts, len(names))] if split else [range(len(names))]
    feed = Feed(take, config, groups)

    @pipeline_def(batch_size=config.batch_size, num_threads=num_threads, device_id=backend.dali_device_id,
                  prefetch_queue_depth=prefetch_queue_depth, seed=config.seed, **kwargs)
    def sample_pipeline():  # a DALI graph
        nodes: list[Any] = []
        for g, span in enumerate(groups):
            device = backend.op_device if (g == 0 or not split) else "cpu"
            extra = {"cuda_stream": stream} if (device == "gpu" and stream is not None) else {}
            args = {key: [values[i] for i in span] for key, values in spec.items()}
            out = fn.external_source(source=feed.callback(g), num_outputs=len(span), batch=True, batch_info=True,
                                     device=device, **args, **extra)
            nodes += list(out)
        return augment_nodes(config, nodes)

    pipe = sample_pipeline()
    pipe.build()
    return pipe, feed
