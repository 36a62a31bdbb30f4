"""GPU hand-over race: a consumer whose CUDA stream runs late must still read every patch exactly as
it was cut, through both the direct path and DALI's. Without an ordered hand-over (events and
``cuda_stream=``) and an output ring that never rewrites a buffer still referenced, a slow consumer
reads patches of a later round."""

from pathlib import Path

import numpy as np
import pytest

from dali_patches import PatchSampler
from dali_patches.backend import cuda_available

from .conftest import reference_decode

pytestmark = pytest.mark.gpu


@pytest.fixture
def torch_cuda():
    torch = pytest.importorskip("torch")
    if not cuda_available() or not torch.cuda.is_available():
        pytest.skip("no CUDA GPU with CuPy and torch on this machine")
    return torch


def _check(held: list, sampler: PatchSampler, reference: dict[str, np.ndarray]) -> None:
    p = sampler.config.patch_size
    for patches, source, anchor in held:
        for patch, s, (y, x) in zip(patches, source.tolist(), anchor.tolist()):
            assert np.array_equal(patch, reference[sampler.files[s]][y: y + p[0], x: x + p[1]])


@pytest.mark.parametrize("path", ["direct", "dali"])
def test_a_late_consumer_stream_reads_every_patch_as_cut(torch_cuda, image_dir: Path, path: str) -> None:
    torch = torch_cuda
    from dali_patches.torch import DirectIterator, PatchIterator

    with PatchSampler(image_dir, patch_size=16, batch_size=8, reuse=2, cache_images=12, device="gpu", seed=0) as s:
        reference = reference_decode(list(s.files), "gpu")
        iterator = DirectIterator(s) if path == "direct" else PatchIterator(s)
        held = []
        for _, data in zip(range(80), iterator):
            torch.cuda._sleep(5_000_000)  # the consumer's stream spins for milliseconds before it reads
            held.append((data["patches"].clone(), data["source"].clone(), data["anchor"].clone()))
        torch.cuda.synchronize()
        _check([(p.cpu().numpy(), src, anc) for p, src, anc in held], s, reference)
