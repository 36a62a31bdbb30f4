"""TensorFlow export: the sampler's sample pipeline as a ``tf.data.Dataset`` through DALI's TF plugin.

DALI's ``DALIDataset`` refuses pipelines whose ``external_source`` has a ``source``; its variant
``experimental.DALIDatasetWithInputs`` accepts them, one output each, with CPU data only (DALI issues 3321 and 2196).
So every output (``patches``, each companion, ``source``, ``anchor``) gets an ``external_source`` of
its own that reads its field of the same finished batch, memoised per iteration; on a GPU the patch
batch is copied to the host for the hand-over and moved back to the GPU inside the pipeline, where the
augmentation ops run (with a CPU-only TensorFlow, such as the ``tf`` extra's ``tensorflow-cpu``,
everything stays on the host). Import this module only where TensorFlow and
``nvidia-dali-tf-plugin-cuda130`` are installed; the core package does not need them.
"""

from __future__ import annotations

import threading
from typing import Any

import tensorflow as tf
from nvidia.dali import fn, pipeline_def
from nvidia.dali.plugin.tf.experimental import DALIDatasetWithInputs

from .sampler import PatchSampler

__all__ = ["patch_dataset"]


class _Fields:
    """The batch of each iteration, shared by the per-output callbacks and dropped once every output
    has taken its field (TF may call them in any order, from several threads)."""

    def __init__(self, sampler: PatchSampler) -> None:
        self._sampler = sampler
        self._lock = threading.Lock()
        self._batches: dict[int, list[Any]] = {}  # iteration → [fields, outputs still to take it]

    def callback(self, field: int) -> Any:
        def take(info: Any) -> Any:
            with self._lock:
                if info.iteration not in self._batches:
                    fields = [self._sampler.backend.to_host(v) for v in self._sampler.next_outputs()]
                    self._batches[info.iteration] = [fields, len(fields)]
                entry = self._batches[info.iteration]
                entry[1] -= 1
                if not entry[1]:
                    del self._batches[info.iteration]
                return entry[0][field]

        return take


def patch_dataset(sampler: PatchSampler, prefetch_queue_depth: int = 2, num_threads: int = 1) -> tf.data.Dataset:
    """An endless ``tf.data.Dataset`` of dicts ``{name: (B, ...) tensor}`` for every entry of
    ``sampler.output_names``, with static shapes and dtypes (``sampler.output_shapes()`` /
    ``output_dtypes()`` with the batch in front), on the sampler's device.

    Args:
        sampler: the sampler to draw from (its stream is shared with any other consumer).
        prefetch_queue_depth: batches DALI keeps in flight.
        num_threads: DALI CPU threads of the pipeline (raise it when augmenting on the CPU).

    Example:
        >>> ds = patch_dataset(sampler).map(lambda d: (d["patches"], d["target"]))
        >>> model.fit(ds, steps_per_epoch=100, epochs=10)
    """
    names, backend = sampler.output_names, sampler.backend
    fields = _Fields(sampler)
    external = sampler.external_source_args()
    # TensorFlow takes the outputs from its GPU only when it has one (the `tf` extra installs
    # tensorflow-cpu); otherwise the patches stay on the host for it, wherever they were cut.
    on_gpu = backend.is_gpu and bool(tf.config.list_physical_devices("GPU"))

    @pipeline_def(batch_size=sampler.config.batch_size, num_threads=num_threads, device_id=backend.dali_device_id,
                  prefetch_queue_depth=prefetch_queue_depth, seed=sampler.config.seed)
    def tf_pipeline():  # a DALI graph: one single-output external_source per field
        inputs = [fn.external_source(source=fields.callback(i), batch=True, batch_info=True, name=name,
                                     device="cpu", dtype=external["dtype"][i], layout=external["layout"][i],
                                     ndim=external["ndim"][i]) for i, name in enumerate(names)]
        if on_gpu:
            inputs = [node.gpu() for node in inputs]  # TF on a GPU takes every output from the GPU
        return sampler.augment_nodes(inputs)

    batch = sampler.config.batch_size
    shapes = tuple((batch, *shape) for shape in sampler.output_shapes())
    dtypes = tuple(tf.as_dtype(name) for name in sampler.output_dtypes())
    device = f"/gpu:{backend.device_id}" if on_gpu else "/cpu:0"
    with tf.device(device):
        dataset = DALIDatasetWithInputs(pipeline=tf_pipeline(), batch_size=batch, output_shapes=shapes,
                                        output_dtypes=dtypes, device_id=backend.dali_device_id)
        return dataset.map(lambda *outputs: dict(zip(names, outputs)))
