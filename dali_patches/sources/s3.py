"""Storage: images in S3-compatible object storage (``s3://bucket/prefix``).

DALI's reader fetches the objects itself (its S3 client honours ``AWS_ENDPOINT_URL`` and the usual
``AWS_*`` credentials); this module does what the catalog needs before that: list a prefix (size
and ETag of every object) and ranged reads of an object's first and last bytes for its header.
It uses ``boto3`` (``pip install "dali-patches[s3]"``), which reads the same variables.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .files import IMAGE_SUFFIXES

__all__ = ["EndpointUnreachable", "Listing", "is_uri", "list_objects", "named_object", "read_range", "unreachable",
           "wait_for_endpoint"]

log = logging.getLogger(__name__)

_SCHEME = "s3://"
_local = threading.local()
# DALI's S3 reader names an object "bucket=B object=KEY" in its errors, and a connection that failed
# by its curl code; "Could not connect" and the like come with it.
_NAMED = re.compile(r"bucket=(\S+) object=(.+?)(?::\s|\s*$)", re.MULTILINE)
_UNREACHABLE = re.compile(r"curlCode: (\d+)[^\n]*", re.MULTILINE)
_CONNECT_TO = re.compile(r"Failed to connect to (\S+)")


class EndpointUnreachable(ConnectionError):
    """The object store stopped answering and did not come back within the time allowed."""


def named_object(text: str) -> str | None:
    """The ``s3://bucket/key`` an error of DALI's S3 reader names, if any."""
    found = _NAMED.search(text)
    return f"{_SCHEME}{found.group(1)}/{found.group(2)}" if found else None


def unreachable(text: str) -> str | None:
    """The connection failure an error of DALI's S3 reader reports (the server did not answer, as
    opposed to answering "no such object"), or ``None``."""
    found = _UNREACHABLE.search(text)
    return found.group(0).strip() if found else None


def _endpoint(text: str = "") -> str:
    where = _CONNECT_TO.search(text)
    configured = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return configured or (where.group(1) if where else "the default AWS S3 endpoint")


def wait_for_endpoint(text: str, uri: str, patience_s: float) -> float:
    """After a connection failure (``text``, DALI's error) on object ``uri``: ask the server for that
    object again, with exponential backoff (0.5 s, 1 s, 2 s, … at most 8 s apart) until it answers or
    ``patience_s`` have passed. Returns the seconds waited.

    Raises:
        EndpointUnreachable: it did not answer in time; the message names the endpoint and the cause.
    """
    bucket, key = _split(uri)
    t0, delay, last = time.monotonic(), 0.5, unreachable(text) or text.strip().splitlines()[-1]
    log.warning("the object store at %s did not answer (%s); retrying for up to %.0f s", _endpoint(text), last, patience_s)
    while time.monotonic() - t0 < patience_s:
        time.sleep(min(delay, max(0.0, patience_s - (time.monotonic() - t0))))
        delay = min(8.0, delay * 2)
        try:
            _client().head_object(Bucket=bucket, Key=key)
            return time.monotonic() - t0
        except Exception as e:  # noqa: BLE001 - any answer ends the wait; no answer keeps it going
            if getattr(e, "response", None) is not None:  # the server answered (404, 403): it is back
                return time.monotonic() - t0
            last = f"{type(e).__name__}: {e}"
    msg = (f"the object store at {_endpoint(text)} has not answered for {patience_s:.0f} s (last error: {last}); "
           "check that it is running and reachable from here (AWS_ENDPOINT_URL), then start again")
    raise EndpointUnreachable(msg)


def is_uri(source: Any) -> bool:
    """``source`` names objects: an ``s3://`` string, or a non-empty list of them."""
    if isinstance(source, str):
        return source.startswith(_SCHEME)
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, str) for s in source):
        return all(s.startswith(_SCHEME) for s in source)
    return False


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len(_SCHEME):].partition("/")
    if not bucket:
        msg = f"{uri!r} names no bucket; write s3://bucket/prefix"
        raise ValueError(msg)
    return bucket, key


def _client() -> Any:
    """One boto3 client per thread (endpoint and credentials from the environment, as DALI's)."""
    client = getattr(_local, "client", None)
    if client is None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as e:
            msg = 's3:// sources need boto3 for listing and headers: pip install "dali-patches[s3]"'
            raise ImportError(msg) from e
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        client = boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=64, connect_timeout=5,
                                                                         read_timeout=30, retries={"max_attempts": 5}))
        _local.client = client
    return client


def _stamp(etag: str) -> int:
    """An ETag as a non-negative int64 (what the index compares, like a file's mtime)."""
    return int(hashlib.sha256(etag.strip('"').encode()).hexdigest()[:15], 16)


class Listing:
    """Objects under a prefix: ``uris`` (sorted), ``sizes`` ``(N,) int64`` bytes, ``stamps``
    ``(N,) int64`` ETag digests."""

    def __init__(self, uris: list[str], sizes: np.ndarray, stamps: np.ndarray) -> None:
        self.uris, self.sizes, self.stamps = uris, sizes, stamps


def _problem_text(error: Exception, uri: str) -> str:
    code = getattr(error, "response", {}).get("Error", {}).get("Code", type(error).__name__)
    hints = {"NoSuchBucket": "check the bucket name and AWS_ENDPOINT_URL",
             "AccessDenied": "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE)",
             "InvalidAccessKeyId": "check AWS_ACCESS_KEY_ID", "NoCredentialsError": "set AWS credentials"}
    return f"cannot list {uri!r}: {code} ({error}); {hints.get(code, 'check the URI, endpoint and credentials')}"


def list_objects(source: str | Sequence[str]) -> Listing:
    """Image objects under ``s3://bucket/prefix`` (recursively, by suffix as for folders), or the
    objects of an explicit list of URIs (one listing of their common prefix).

    Raises:
        FileNotFoundError: the bucket, prefix or a listed object does not exist.
        PermissionError: the credentials are refused.
    """
    wanted = None if isinstance(source, str) else list(source)
    prefix_uri = source if isinstance(source, str) else os.path.commonprefix(list(source))
    bucket, prefix = _split(prefix_uri)
    if wanted is not None and any(_split(u)[0] != bucket for u in wanted):
        msg = "the listed s3:// objects span several buckets; give one bucket's objects per sampler"
        raise ValueError(msg)
    client = _client()
    found: dict[str, tuple[int, int]] = {}
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                found[f"{_SCHEME}{bucket}/{obj['Key']}"] = (int(obj["Size"]), _stamp(obj.get("ETag", "")))
    except Exception as e:
        text = _problem_text(e, prefix_uri)
        raise (PermissionError(text) if "Access" in text or "Credential" in text else FileNotFoundError(text)) from e
    if wanted is None:
        uris = sorted(u for u in found if u.lower().endswith(IMAGE_SUFFIXES))
        if not uris:
            msg = f"no images under {source!r} (searched for {', '.join(IMAGE_SUFFIXES)})"
            raise ValueError(msg)
    else:
        missing = [u for u in wanted if u not in found]
        if missing:
            msg = f"{len(missing)} listed object(s) do not exist, e.g. {missing[:3]}; fix the list or remove them"
            raise FileNotFoundError(msg)
        uris = wanted
    sizes = np.fromiter((found[u][0] for u in uris), np.int64, len(uris))
    stamps = np.fromiter((found[u][1] for u in uris), np.int64, len(uris))
    return Listing(uris, sizes, stamps)


def read_range(uri: str, offset: int, length: int) -> bytes:
    """``length`` bytes of an object from ``offset`` (fewer at its end); one ranged GET."""
    bucket, key = _split(uri)
    if length <= 0:
        return b""
    response = _client().get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}")
    return bytes(response["Body"].read())


def read_object(uri: str) -> bytes:
    """The whole object (for Pillow, when the header parser is not certain)."""
    bucket, key = _split(uri)
    return bytes(_client().get_object(Bucket=bucket, Key=key)["Body"].read())
