"""TensorFlow export through DALI's TF plugin; skipped only where TensorFlow or the plugin is absent."""

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("nvidia.dali.plugin.tf", reason="nvidia-dali-tf-plugin-cuda130 is not installed (see README)")

import tensorflow as tf

from dali_patches import Augment, PatchSampler
from dali_patches.tf import patch_dataset


def _sr_sampler(sr_pairs: Path, device: str, **kwargs) -> PatchSampler:
    source = {"image": str(sr_pairs / "lr_x2/**/*x2.png"), "target": str(sr_pairs / "hr/**/*.png")}
    return PatchSampler(source, patch_size=12, batch_size=8, reuse=4, cache_images=12, device=device,
                        companions={"target": {"scale": 2}}, **kwargs)


def test_dataset_yields_every_named_output_with_static_shapes(dali_device: str, sr_pairs: Path) -> None:
    with _sr_sampler(sr_pairs, dali_device) as sampler:
        dataset = patch_dataset(sampler)
        assert dataset.element_spec == {
            "patches": tf.TensorSpec((8, 12, 12, 3), tf.uint8),
            "target": tf.TensorSpec((8, 24, 24, 3), tf.uint8),
            "source": tf.TensorSpec((8,), tf.int64),
            "anchor": tf.TensorSpec((8, 2), tf.int32),
        }
        for data in dataset.take(4):
            lr, hr = data["patches"].numpy(), data["target"].numpy()
            assert np.array_equal(hr[:, ::2, ::2], lr)  # each output's fields come from the same batch
            assert len(set(data["source"].numpy().tolist())) == 8
        assert sampler.stats()["batches_made"] >= 4


def test_keras_model_fit_on_the_dataset(dali_device: str, sr_pairs: Path) -> None:
    with _sr_sampler(sr_pairs, dali_device, augment=Augment(hflip=True, rot90=True, mean=0, std=255)) as sampler:
        dataset = patch_dataset(sampler).map(lambda d: (d["patches"], d["target"]))
        model = tf.keras.Sequential([
            tf.keras.Input((12, 12, 3)),
            tf.keras.layers.Conv2D(12, 3, padding="same"),
            tf.keras.layers.Lambda(lambda x: tf.nn.depth_to_space(x, 2)),  # sub-pixel ×2 upsampling
        ])
        model.compile(optimizer="adam", loss="mse")
        history = model.fit(dataset, steps_per_epoch=5, epochs=2, verbose=0, shuffle=False)
    assert len(history.history["loss"]) == 2 and np.isfinite(history.history["loss"]).all()


def test_dataset_continues_a_saved_stream(dali_device: str, sr_pairs: Path) -> None:
    """A state loaded into a new sampler before the dataset is made: the dataset's first batches are
    the very batches the saving sampler went on with (patches, target, source, anchor)."""
    with _sr_sampler(sr_pairs, dali_device, seed=4) as sampler:
        for _ in range(5):
            next(sampler)
        state = sampler.state_dict()
        expected = []
        for _ in range(3):
            batch = next(sampler)
            host = sampler.backend.to_host
            expected.append((host(batch.patches), host(batch.companions["target"]), batch.source.copy(),
                             batch.anchor.copy()))
    with _sr_sampler(sr_pairs, dali_device, seed=4) as resumed:
        resumed.load_state_dict(state)
        for data, (patches, target, source, anchor) in zip(patch_dataset(resumed).take(3), expected, strict=True):
            assert np.array_equal(data["patches"].numpy(), patches)
            assert np.array_equal(data["target"].numpy(), target)
            assert np.array_equal(data["source"].numpy(), source)
            assert np.array_equal(data["anchor"].numpy(), anchor)


def test_a_missing_plugin_says_how_to_build_it() -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['nvidia.dali.plugin.tf.experimental'] = None\n"
            "try:\n    import dali_patches.tf\nexcept ModuleNotFoundError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install --no-build-isolation --no-cache-dir nvidia-dali-tf-plugin-cuda130" in out
    assert f"({tf.__version__})" in out


def test_a_plugin_built_for_another_tensorflow_says_how_to_rebuild_it() -> None:
    import subprocess
    import sys

    code = ("import tensorflow as tf\n"
            "def stale(path): raise tf.errors.NotFoundError(None, None, f'{path}: undefined symbol')\n"
            "tf.load_op_library = stale\n"
            "try:\n    import dali_patches.tf\nexcept ModuleNotFoundError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install --no-build-isolation --no-cache-dir nvidia-dali-tf-plugin-cuda130" in out
    assert "undefined symbol" in out
