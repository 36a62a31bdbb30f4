"""The DALI sample pipeline: finished batches handed to DALI through ``external_source``.

The callbacks run on the thread that calls ``run()`` (the trainer's, or TensorFlow's), so they only
take a finished :class:`~dali_patches.engine.outputs.PatchBatch` and return its arrays. They take
``batch_info=True``, so DALI counts the iterations (:attr:`Feed.fed` is how many batches this
pipeline has taken, for ``state_dict``). One builder, :func:`build_pipeline`, makes the pipeline in
either of two shapes:

* **one multi-output ``external_source``** on the sampler's device (the default, behind
  :meth:`~dali_patches.PatchSampler.pipeline` and DALI's PyTorch and JAX iterators). On a GPU the
  patches, the companions and the round's ``source`` and ``anchor`` (written to the device with the
  patches) are handed over with ``cuda_stream=`` the producer's stream, so DALI's copy is queued
  after the gather that wrote them, and the producer rewrites nothing before that copy (its later
  work is queued behind it on the same stream).
* **one single-output ``external_source`` per field, on the host** (``per_field=True``), what
  TensorFlow's ``DALIDatasetWithInputs`` accepts (DALI issues 3321 and 2196): every callback returns
  its field of the same batch, taken once per iteration whatever order DALI calls them in; on a GPU
  the fields are copied to the host for the hand-over and moved back to the GPU inside the pipeline
  when ``gpu_outputs`` asks for it (the augmentation ops then run there).

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
from ..engine.decoders import DALI_DTYPES
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
    callback of that iteration returns its share of it (DALI may call them in any order, and
    TensorFlow from several threads).

    Args:
        take: returns the next finished batch.
        config: the sampler's config (for the output order).
        per_field: one callback per output, each returning its array alone (for one single-output
            ``external_source`` per field); otherwise one callback returning every output as a tuple.
        on_device: hand ``source`` and ``anchor`` over from the device (GPU).
        to_host: applied to every output before it is handed over (a host copy, for host-only
            consumers such as DALI's TF plugin); ``None`` hands the arrays over as they are.
        keep: batches kept referenced after they were handed over (``no_copy=True``: DALI reads them
            until the iteration's outputs are consumed).
    """

    def __init__(self, take: Callable[[], PatchBatch], config: SamplerConfig, per_field: bool = False,
                 on_device: bool = False, to_host: Callable[[Any], Any] | None = None, keep: int = 0) -> None:
        count = len(output_names(config))
        self._take, self._config, self._on_device, self._to_host = take, config, on_device, to_host
        self.per_field = per_field
        self._groups = [range(i, i + 1) for i in range(count)] if per_field else [range(count)]
        self._lock = threading.Lock()
        self._pending: dict[int, list[Any]] = {}  # iteration → [outputs, callbacks still to take them]
        self._kept: deque[tuple[Any, ...]] = deque(maxlen=keep)
        self.fed = 0  # batches this pipeline has taken

    def _outputs(self) -> tuple[Any, ...]:
        outputs = batch_outputs(self._config, self._take(), self._on_device)
        return outputs if self._to_host is None else tuple(self._to_host(a) for a in outputs)

    def callback(self, group: int) -> Callable[[Any], Any]:
        """The ``source=`` of ``external_source`` number ``group`` (``batch=True, batch_info=True``)."""
        span, single = self._groups[group], self.per_field

        def take(info: Any) -> Any:
            with self._lock:
                entry = self._pending.get(info.iteration)
                if entry is None:
                    outputs = self._outputs()
                    entry = self._pending[info.iteration] = [outputs, len(self._groups)]
                    self._kept.append(outputs)
                    self.fed = max(self.fed, info.iteration + 1)
                entry[1] -= 1
                if not entry[1]:
                    del self._pending[info.iteration]
                return entry[0][span.start] if single else tuple(entry[0][i] for i in span)

        return take


def build_pipeline(take: Callable[[], PatchBatch], config: SamplerConfig, backend: Backend, stream: Any,
                   prefetch_queue_depth: int = 2, num_threads: int = 1, no_copy: bool = False, *,
                   per_field: bool = False, gpu_outputs: bool | None = None, build: bool = True,
                   **kwargs: Any) -> tuple[Any, Feed]:
    """A DALI pipeline with one output per :func:`output_names` entry, fed by ``take``, with
    ``config.augment`` applied inside it; and its :class:`Feed`.

    Args:
        take: returns the next finished batch (the sampler's ``take``, on the stream the pipeline
            reads on).
        config, backend: the sampler's resolved config and backend.
        stream: the producer's CUDA stream (GPU) or ``None``: DALI copies the outputs on it (one
            ``external_source`` on the device, without ``no_copy``).
        prefetch_queue_depth: batches DALI keeps in flight.
        num_threads: DALI's CPU worker threads of the pipeline.
        no_copy: DALI reads the batches in place (see the module's docstring).
        per_field: one single-output ``external_source`` per output, fed host arrays (``stream`` is
            then unused); otherwise one multi-output ``external_source`` on the backend's device.
        gpu_outputs: with ``per_field``: move every field to the GPU inside the pipeline (default:
            when the backend is a GPU).
        build: build the pipeline (DALI's TF plugin takes it unbuilt).
        **kwargs: more arguments of ``pipeline_def``.
    """
    names, spec = output_names(config), external_source_args(config)
    on_gpu = backend.is_gpu if gpu_outputs is None else gpu_outputs
    feed = Feed(take, config, per_field=per_field, on_device=backend.is_gpu and not per_field,
                to_host=backend.to_host if per_field and backend.is_gpu else None,
                keep=prefetch_queue_depth + 2 if no_copy else 0)
    extra = {"cuda_stream": stream} if (backend.is_gpu and stream is not None and not per_field) else {}

    @pipeline_def(batch_size=config.batch_size, num_threads=num_threads, device_id=backend.dali_device_id,
                  prefetch_queue_depth=prefetch_queue_depth, seed=config.seed, **kwargs)
    def sample_pipeline():  # a DALI graph
        if not per_field:
            nodes = fn.external_source(source=feed.callback(0), num_outputs=len(names), batch=True, batch_info=True,
                                       device=backend.op_device, no_copy=no_copy, **spec, **extra)
            return augment_nodes(config, list(nodes))
        nodes = [fn.external_source(source=feed.callback(i), batch=True, batch_info=True, name=name, device="cpu",
                                    no_copy=no_copy, dtype=spec["dtype"][i], layout=spec["layout"][i],
                                    ndim=spec["ndim"][i]) for i, name in enumerate(names)]
        if on_gpu:
            nodes = [node.gpu() for node in nodes]  # every output from the GPU (TF on a GPU takes them there)
        return augment_nodes(config, nodes)

    pipe = sample_pipeline()
    if build:
        pipe.build()
    return pipe, feed
