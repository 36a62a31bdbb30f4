"""Fault scenarios from outside the data: object storage that loses objects or stops answering, files
that turn into FIFOs or devices, links back up the tree. Run one per process through
``python -m tests.faults SCENARIO FOLDER`` (see ``tests/faults.py``); each returns what happened."""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dali_patches import PatchSampler
from dali_patches.cli.synth import synthetic_image

from .faults import _run
from .s3_server import Proxy, moto_server

SETTINGS = {"patch_size": 24, "batch_size": 8, "reuse": 2, "device": "cpu", "seed": 0}


def _jpegs(n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(synthetic_image(int(rng.integers(64, 120)), int(rng.integers(64, 120)), rng)).save(
            buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _reference(files: list[str], data: dict[str, bytes]) -> dict[str, np.ndarray]:
    from .conftest import reference_decode

    folder = Path(os.environ["FAULT_FOLDER"]) / "reference"
    folder.mkdir(exist_ok=True)
    local = {}
    for uri in files:
        path = folder / uri.rsplit("/", 1)[1]
        path.write_bytes(data[uri])
        local[uri] = str(path)
    decoded = reference_decode(list(local.values()), "cpu")
    return {uri: decoded[path] for uri, path in local.items()}


def s3(name: str, folder: Path) -> dict[str, Any]:
    """Objects deleted or replaced under a running sampler (``s3_delete``); the server stopping for
    good (``s3_down``) or for a few seconds (``s3_blip``), seen through a proxy that stops answering."""
    import boto3

    from dali_patches.engine import decode

    decode.ENDPOINT_PATIENCE_S = 6.0  # the wait for a server that stopped, shortened for the test
    os.environ["FAULT_FOLDER"] = str(folder)
    with moto_server() as url:
        proxy = Proxy(url)
        os.environ.update(AWS_ENDPOINT_URL=proxy.url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_REGION="us-east-1", AWS_DEFAULT_REGION="us-east-1")
        client = boto3.client("s3", endpoint_url=url)
        client.create_bucket(Bucket="faults")
        data = {}
        for i, body in enumerate(_jpegs(40)):
            client.put_object(Bucket="faults", Key=f"p/im_{i:02d}.jpg", Body=body)
            data[f"s3://faults/p/im_{i:02d}.jpg"] = body
        out: dict[str, Any] = {"endpoint": proxy.url}
        with PatchSampler("s3://faults/p", cache_images=10, **SETTINGS) as sampler:
            reference = _reference(list(sampler.files), data)
            next(sampler)
            t0 = time.monotonic()
            if name == "s3_delete":
                hit = [f"p/im_{i:02d}.jpg" for i in range(0, 40, 3)]
                for key in hit[: len(hit) // 2]:
                    client.delete_object(Bucket="faults", Key=key)
                for key in hit[len(hit) // 2:]:  # replaced by something that is no image
                    client.put_object(Bucket="faults", Key=key, Body=b"not an image any more")
                out["hit"] = sorted(Path(k).name for k in hit)
            elif name == "s3_blip":
                proxy.down()
                threading.Timer(2.0, proxy.up).start()
            else:
                proxy.down()
            before = sampler.stats()["images_decoded"]
            try:
                out.update(_run(sampler, 100, reference))
                out["decoded_after"] = sampler.stats()["images_decoded"] - before
            except Exception as e:  # noqa: BLE001 - the error is the result to check
                out.update(error=type(e).__name__, message=str(e))
            out["seconds"] = time.monotonic() - t0
        proxy.close()
    return out


def fifo(name: str, folder: Path) -> dict[str, Any]:
    """A FIFO named like an image at the start (``fifo_scan``) or put in a file's place during the
    run (``fifo_run``): nothing may block on it."""
    from dali_patches.engine import feeder

    from .conftest import reference_decode

    feeder.STALL_S = 1.0  # the watchdog looks at a stuck decode after 1 s, not 5
    data = folder / "data"
    data.mkdir()
    paths = []
    for i, body in enumerate(_jpegs(24)):
        (data / f"im_{i:02d}.jpg").write_bytes(body)
        paths.append(data / f"im_{i:02d}.jpg")
    if name == "fifo_scan":
        os.mkfifo(data / "pipe.jpg")
    reference = reference_decode([str(p) for p in paths], "cpu")
    out: dict[str, Any] = {}
    with PatchSampler(data, cache_images=8, **SETTINGS) as sampler:
        out["skipped"] = [(Path(p).name, r.kind) for p, r in sampler.catalog.skipped]
        next(sampler)
        if name == "fifo_run":
            hit = paths[5]
            hit.unlink()
            os.mkfifo(hit)
            out["hit"] = hit.name
        t0 = time.monotonic()
        out.update(_run(sampler, 120, reference))
        out["seconds"] = time.monotonic() - t0
    return out


def devices(name: str, folder: Path) -> dict[str, Any]:
    """Ten of forty files turned into links to ``/dev/zero`` during the run, ten times over: every
    good image must still be decoded (no batch lost to a failure no file was blamed for)."""
    from .conftest import reference_decode

    runs = []
    for run in range(10):
        data = folder / f"run{run}"
        data.mkdir()
        paths = []
        for i, body in enumerate(_jpegs(40, seed=run)):
            (data / f"im_{i:02d}.jpg").write_bytes(body)
            paths.append(data / f"im_{i:02d}.jpg")
        reference = reference_decode([str(p) for p in paths], "cpu")
        with PatchSampler(data, cache_images=10, **{**SETTINGS, "seed": run}) as sampler:
            next(sampler)
            hit = paths[::4]
            for path in hit:
                path.unlink()
                path.symlink_to("/dev/zero")
            result = _run(sampler, 60, reference)
        result["hit"] = sorted(p.name for p in hit)
        runs.append(result)
        shutil.rmtree(data)
    return {"runs": runs}


def link_to_root(name: str, folder: Path) -> dict[str, Any]:
    """A link to ``/`` inside the data folder: listed and skipped at once, not walked."""
    data = folder / "data"
    data.mkdir()
    for i, body in enumerate(_jpegs(8)):
        (data / f"im_{i:02d}.jpg").write_bytes(body)
    (data / "everything").symlink_to("/")
    (data / "up").symlink_to("..")
    t0 = time.monotonic()
    with PatchSampler(data, cache_images=8, allow_repeats=True, **SETTINGS) as sampler:
        return {"seconds": time.monotonic() - t0, "files": len(sampler.files),
                "skipped": sorted((Path(p).name, r.kind) for p, r in sampler.catalog.skipped)}


SCENARIOS = {"s3_delete": s3, "s3_down": s3, "s3_blip": s3, "fifo_scan": fifo, "fifo_run": fifo,
             "devices": devices, "link_to_root": link_to_root}
