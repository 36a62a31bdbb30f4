"""Object storage: a sampler over ``s3://bucket/prefix`` on a real S3-protocol server (moto, started
here on 127.0.0.1) lists the objects, reads their headers with ranged GETs, skips and reports bad
objects like bad files, serves exact patches through DALI's own S3 reader, and keeps its index keyed
by ETag."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dali_patches import PatchSampler
from dali_patches.catalog.catalog import Catalog, CatalogWarning
from dali_patches.cli.synth import synthetic_image

from .conftest import reference_decode

boto3 = pytest.importorskip("boto3", reason="object storage needs boto3 (pip install 'dali-patches[s3]')")
pytest.importorskip("moto.server", reason="the S3 test server needs moto[server] (pip install 'moto[server]')")

P = 16



@pytest.fixture
def bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[str, Path]:
    """``s3://train-data/photos`` holding 20 JPEG/PNG images and 3 bad objects; a local copy of the
    good ones for reference decodes."""
    for name, value in {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=s3_server)
    name = f"train-data-{tmp_path.name.lower().replace('_', '-')}"[:60]
    client.create_bucket(Bucket=name)
    rng = np.random.default_rng(5)
    local = tmp_path / "local"
    local.mkdir()
    for i in range(20):
        out = io.BytesIO()
        fmt, ext = ("PNG", "png") if i % 5 == 4 else ("JPEG", "jpg")
        Image.fromarray(synthetic_image(40 + i, 60 + 2 * i, rng)).save(out, fmt, progressive=i % 5 == 3)
        (local / f"im_{i:02d}.{ext}").write_bytes(out.getvalue())
        client.put_object(Bucket=name, Key=f"photos/im_{i:02d}.{ext}", Body=out.getvalue())
    good = (local / "im_00.jpg").read_bytes()
    client.put_object(Bucket=name, Key="photos/cut.jpg", Body=good[: len(good) // 2])
    client.put_object(Bucket=name, Key="photos/empty.jpg", Body=b"")
    client.put_object(Bucket=name, Key="photos/notes.png", Body=b"not an image at all")
    client.put_object(Bucket=name, Key="photos/readme.txt", Body=b"ignored: not an image suffix")
    return f"s3://{name}/photos", local


def test_training_from_object_storage_skips_bad_objects_and_serves_exact_patches(bucket: tuple[str, Path]) -> None:
    uri, local = bucket
    with pytest.warns(CatalogWarning, match="skipped 3 of 23"):
        sampler = PatchSampler(uri, patch_size=P, batch_size=8, reuse=4, cache_images=12, seed=1, device="cpu",
                               index=False)
    with sampler:
        kinds = {Path(p).name: r.kind for p, r in sampler.catalog.skipped}
        assert kinds == {"cut.jpg": "truncated", "empty.jpg": "empty", "notes.png": "not an image"}
        assert len(sampler.files) == 20 and all(f.startswith(uri + "/") for f in sampler.files)
        copies = [str(local / Path(f).name) for f in sampler.files]
        decoded = reference_decode(copies, "cpu")
        reference = [decoded[c] for c in copies]
        for _ in range(30):
            batch = next(sampler)
            assert len(set(batch.source.tolist())) == 8
            for patch, source, (y, x) in zip(batch.patches, batch.source, batch.anchor):
                np.testing.assert_array_equal(patch, reference[source][y:y + P, x:x + P])
        assert sampler.stats()["images_decoded"] >= 20


def test_object_index_is_keyed_by_etag(bucket: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri, _ = bucket
    from dali_patches.sources import s3 as storage

    gets: list[str] = []
    real = storage.read_range
    monkeypatch.setattr(storage, "read_range", lambda u, o, n: (gets.append(u), real(u, o, n))[1])
    index = tmp_path / "objects.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CatalogWarning)
        first = Catalog.scan(uri, min_size=(P, P), index=index)
        assert len(set(gets)) == 22  # every object but the empty one (its size says enough)
        gets.clear()
        second = Catalog.scan(uri, min_size=(P, P), index=index)
        assert gets == [] and second.files == first.files and second.digest() == first.digest()
        client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        bucket_name, key = uri[5:].split("/", 1)
        out = io.BytesIO()
        Image.fromarray(synthetic_image(70, 71, np.random.default_rng(9))).save(out, "JPEG")
        client.put_object(Bucket=bucket_name, Key=f"{key}/im_03.jpg", Body=out.getvalue())  # a new ETag
        third = Catalog.scan(uri, min_size=(P, P), index=index)
    assert sorted(set(gets)) == [f"{uri}/im_03.jpg"]
    i = third.files.index(f"{uri}/im_03.jpg")
    assert (third.heights[i], third.widths[i]) == (70, 71)


def test_missing_bucket_names_it(bucket: tuple[str, Path]) -> None:
    with pytest.raises(FileNotFoundError, match="NoSuchBucket"):
        Catalog.scan("s3://no-such-bucket-here/x", index=False)


def test_companions_from_object_storage_are_refused_with_the_reason(bucket: tuple[str, Path]) -> None:
    uri, _ = bucket
    with pytest.raises(ValueError, match="companions are not supported for s3:// sources"):
        PatchSampler({"image": uri, "target": uri}, patch_size=P, batch_size=4, reuse=2, cache_images=8, device="cpu")
