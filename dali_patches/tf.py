"""TensorFlow export: the sampler's sample pipeline as a ``tf.data.Dataset`` through DALI's TF plugin.

DALI's ``DALIDataset`` refuses pipelines whose ``external_source`` has a ``source``; its variant
``experimental.DALIDatasetWithInputs`` accepts them, one output each, with CPU data only (DALI issues
3321 and 2196). So the pipeline is the sample pipeline built with one host ``external_source`` per
output (:func:`~dali_patches.export.pipeline.build_pipeline` with ``per_field=True``): each reads its
field of the same finished batch; on a GPU the fields are copied to the host for the hand-over and
moved back to the GPU inside the pipeline, where the augmentation ops run — when TensorFlow sees a GPU
(with a CPU-only TensorFlow, such as the ``tf`` extra's ``tensorflow-cpu``, everything stays on the
host). Import this module only where TensorFlow and DALI's TF plugin (``nvidia-dali-tf-plugin-cuda130``, or
``-cuda120`` beside the CUDA 12 DALI) are installed; without them the import says how to install them.
The core package does not need them.
"""

from __future__ import annotations

from .flavour import require_dali

try:
    import tensorflow as tf
except ModuleNotFoundError as error:
    msg = "dali_patches.tf needs TensorFlow: pip install 'dali-patches[tf]' (tensorflow-cpu; tensorflow[and-cuda] on a GPU)"
    raise ModuleNotFoundError(msg, name=error.name) from error
try:
    from nvidia.dali.plugin.tf.experimental import DALIDatasetWithInputs
except (ImportError, tf.errors.NotFoundError) as error:  # missing, or built against another TensorFlow
    _PLUGIN = "nvidia-dali-tf-plugin-cuda120" if "cuda120" in require_dali() else "nvidia-dali-tf-plugin-cuda130"
    msg = (f"dali_patches.tf needs DALI's TensorFlow plugin, which is built against the installed TensorFlow "
           f"({tf.__version__}): pip install --no-build-isolation --no-cache-dir {_PLUGIN} (after TensorFlow; it "
           f"compiles for about 30 s and needs g++). Its error: {error}")
    raise ModuleNotFoundError(msg, name="nvidia.dali.plugin.tf") from error

from .export.pipeline import build_pipeline
from .sampler import PatchSampler

__all__ = ["patch_dataset"]


def patch_dataset(sampler: PatchSampler, prefetch_queue_depth: int = 2, num_threads: int = 1) -> tf.data.Dataset:
    """An endless ``tf.data.Dataset`` of dicts ``{name: (B, ...) tensor}`` for every entry of
    ``sampler.output_names`` — ``patches`` ``(B, P_h, P_w, C)`` (``uint8`` unless ``dtype`` or
    ``augment`` says otherwise), each companion, ``source`` ``(B,) int64`` and ``anchor`` ``(B, 2)
    int32`` — with static shapes and dtypes (``sampler.output_shapes()`` / ``output_dtypes()`` with the
    batch in front), on the sampler's device when TensorFlow has it, else on the host.

    The dataset takes batches from the sampler only while it is iterated (DALI prefetches
    ``prefetch_queue_depth`` of them). To resume, load the state into the new sampler
    (``sampler.load_state_dict``) before making the dataset.

    Args:
        sampler: the sampler to draw from (its stream is shared with any other consumer).
        prefetch_queue_depth: batches DALI keeps in flight.
        num_threads: DALI CPU threads of the pipeline (raise it when augmenting on the CPU).

    Example:
        >>> ds = patch_dataset(sampler).map(lambda d: (d["patches"], d["target"]))
        >>> model.fit(ds, steps_per_epoch=100, epochs=10)
    """
    names, backend = sampler.output_names, sampler.backend
    # TensorFlow takes the outputs from its GPU only when it has one (the `tf` extra installs
    # tensorflow-cpu); otherwise the patches stay on the host for it, wherever they were cut.
    on_gpu = backend.is_gpu and bool(tf.config.list_physical_devices("GPU"))
    pipe, _ = build_pipeline(lambda: next(sampler), sampler.config, backend, None, prefetch_queue_depth, num_threads,
                             per_field=True, gpu_outputs=on_gpu, build=False)
    batch = sampler.config.batch_size
    shapes = tuple((batch, *shape) for shape in sampler.output_shapes())
    dtypes = tuple(tf.as_dtype(name) for name in sampler.output_dtypes())
    device = f"/gpu:{backend.device_id}" if on_gpu else "/cpu:0"
    with tf.device(device):
        dataset = DALIDatasetWithInputs(pipeline=pipe, batch_size=batch, output_shapes=shapes,
                                        output_dtypes=dtypes, device_id=backend.dali_device_id)
        return dataset.map(lambda *outputs: dict(zip(names, outputs)))
