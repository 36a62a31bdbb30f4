from pathlib import Path

import numpy as np

from dali_patches.catalog import Catalog
from dali_patches.decode import DecodeStage

from .conftest import reference_decode


def test_every_file_once_per_epoch_in_a_fresh_order(backend, many_images: Path) -> None:
    files = list(Catalog.scan(many_images).files)
    stage = DecodeStage(files, backend, batch_size=5, num_threads=2, seed=3)
    assert stage.epoch_size == len(files)
    epochs = [[stage.next()[0] for _ in files] for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(len(files)))  # each image exactly once per reader epoch
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    assert stage.images_decoded == 3 * len(files)
    stage.close()


def test_same_seed_same_order_and_pixels_match_reference(backend, image_dir: Path) -> None:
    files = list(Catalog.scan(image_dir).files)
    a = DecodeStage(files, backend, batch_size=4, num_threads=2, seed=11)
    b = DecodeStage(files, backend, batch_size=3, num_threads=1, seed=11)
    reference = reference_decode(files, backend.device.value)
    for _ in range(len(files)):
        (sa, ia), (sb, _) = a.next(), b.next()
        assert sa == sb
        assert np.array_equal(backend.to_host(ia), reference[files[sa]])
