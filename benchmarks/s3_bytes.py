"""Bytes read from object storage per patch: dali_patches at reuse R against DALI's decode-per-patch,
on the same bucket.

Starts an S3-compatible server (``moto_server``) on 127.0.0.1 behind a byte-counting proxy, uploads
photo-like JPEGs, and points both loaders at the proxy (``AWS_ENDPOINT_URL``), so every byte DALI's
S3 reader and our listing/header reads fetch is counted. dali_patches is measured twice: from
construction (listing, ranged header reads, the cache warm-up) and in steady state (after the
warm-up). Needs ``boto3`` and ``moto[server]`` (the ``dev`` extra).

    python benchmarks/s3_bytes.py --images 24 --reuse 8 32 --json benchmarks/results/s3_bytes.json
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Counter:
    """Bytes of response bodies that went through the proxy."""

    def __init__(self) -> None:
        self.bytes = 0
        self.requests = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n
            self.requests += 1


def start_proxy(upstream_port: int, counter: Counter) -> tuple[ThreadingHTTPServer, int]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            upstream = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            counter.add(len(data))
            self.send_response(response.status, response.reason)
            for k, v in response.getheaders():  # HEAD keeps the object's Content-Length
                if k.lower() not in _HOP and (k.lower() != "content-length" or self.command == "HEAD"):
                    self.send_header(k, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            upstream.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    port = _free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, port


def photo(rng: np.random.Generator, h: int, w: int) -> bytes:
    from dali_patches.cli.synth import synthetic_image

    out = io.BytesIO()
    Image.fromarray(synthetic_image(h, w, rng)).save(out, "JPEG", quality=90)
    return out.getvalue()


def decode_per_patch(uris: list[str], patch: int, batch: int, batches: int) -> None:
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=batch, num_threads=2, device_id=None, seed=0, prefetch_queue_depth=1)
    def pipe():
        encoded, _ = fn.readers.file(files=uris, random_shuffle=True, dont_use_mmap=True)
        image = fn.decoders.image(encoded, device="cpu")
        return fn.crop(image, crop=(patch, patch), crop_pos_x=fn.random.uniform(range=(0, 1)),
                       crop_pos_y=fn.random.uniform(range=(0, 1)))

    p = pipe()
    p.build()
    for _ in range(batches):
        p.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", default="1200x1600", help="HxW of the uploaded photos")
    parser.add_argument("--reuse", type=float, nargs="+", default=[8, 32])
    parser.add_argument("--patch", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import boto3

    h, w = (int(v) for v in args.size.split("x"))
    moto_port = _free_port()
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    counter = Counter()
    proxy, proxy_port = start_proxy(moto_port, counter)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy_port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{moto_port}", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}")
        client.create_bucket(Bucket="bench")
        rng = np.random.default_rng(0)
        sizes = []
        for i in range(args.images):
            data = photo(rng, h, w)
            sizes.append(len(data))
            client.put_object(Bucket="bench", Key=f"photos/{i:04d}.jpg", Body=data)
        uris = [f"s3://bench/photos/{i:04d}.jpg" for i in range(args.images)]
        mean_object = float(np.mean(sizes))
        rows = []
        patches = args.images * 2  # two passes over the bucket, decode-per-patch
        before = counter.bytes
        decode_per_patch(uris, args.patch, args.batch, -(-patches // args.batch))
        per_patch = (counter.bytes - before) / (-(-patches // args.batch) * args.batch)
        rows.append({"method": "DALI decode-per-patch", "bytes_per_patch": per_patch})
        from dali_patches import PatchSampler

        for reuse in args.reuse:
            counter.bytes = 0
            with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
                warnings.simplefilter("ignore")
                sampler = PatchSampler("s3://bench/photos", patch_size=args.patch, batch_size=args.batch, reuse=reuse,
                                       cache_images=args.batch + 4, device="cpu", index=os.path.join(tmp, "i.npz"))
                scan_bytes = counter.bytes
                warm = int(np.ceil(args.images * reuse / args.batch))  # a shard's worth of patches
                for _ in range(warm):
                    next(sampler)
                steady0, decoded0 = counter.bytes, sampler.stats()["images_decoded"]
                steady_batches = int(np.ceil(8 * args.images * reuse / args.batch))  # 8 passes: read-ahead amortised
                for _ in range(steady_batches):
                    next(sampler)
                stats = sampler.stats()
                sampler.close()
            total_patches = (warm + steady_batches) * args.batch
            rows.append({"method": f"dali_patches reuse {reuse:g}",
                         "bytes_per_patch": (counter.bytes - steady0) / (steady_batches * args.batch),
                         "bytes_per_patch_from_start": counter.bytes / total_patches, "scan_bytes": scan_bytes,
                         "decodes_steady": stats["images_decoded"] - decoded0, "mean_reuse": stats["mean_reuse"]})
    finally:
        proxy.shutdown()
        moto.terminate()
    base = rows[0]["bytes_per_patch"]
    print(f"{args.images} JPEGs of {h}x{w} ({mean_object / 1e6:.2f} MB each) in s3://bench, P {args.patch}, B {args.batch}")
    print(f"{'method':<28} {'bytes/patch':>12} {'from start':>11} {'÷ decode-per-patch':>19}")
    for r in rows:
        print(f"{r['method']:<28} {r['bytes_per_patch']:>12,.0f} {r.get('bytes_per_patch_from_start', r['bytes_per_patch']):>11,.0f} "
              f"{base / r['bytes_per_patch']:>18.1f}×")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"mean_object_bytes": mean_object, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
