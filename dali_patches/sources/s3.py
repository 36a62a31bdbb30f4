"""S3: images in S3-compatible object storage (``s3://bucket/prefix``), and the object access other
sources build on (tar shards on S3).

DALI's reader fetches the objects itself (its S3 client honours ``AWS_ENDPOINT_URL`` and the usual
``AWS_*`` credentials); this module does what the catalog needs before that — list a prefix (size
and ETag of every object), ranged reads of an object's first and last bytes for its header — and
recognises DALI's errors that name an object or a server that stopped answering, which it waits for.
It uses ``boto3`` (``pip install "dali-patches[s3]"``), which reads the same variables.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from .base import IMAGE_SUFFIXES, Items, Source
from .columns import Columns
from .feeding import ReadsFiles
from .workers import ranged_headers

__all__ = ["ENDPOINT_PATIENCE_S", "EndpointUnreachable", "ObjectListing", "S3Objects", "is_uri", "list_objects", "named_object", "object_root",
           "patient", "read_object", "read_range", "split_uri", "unreachable", "wait_for_endpoint", "waited"]

log = logging.getLogger(__name__)

_SCHEME = "s3://"
ENDPOINT_PATIENCE_S = 120.0  # how long an object store that stopped answering is waited for
_OBJECT_THREADS = 32  # concurrent ranged GETs for headers (network-bound)
_local = threading.local()
T = TypeVar("T")
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
    bucket, key = split_uri(uri)
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


def split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len(_SCHEME):].partition("/")
    if not bucket:
        msg = f"{uri!r} names no bucket; write s3://bucket/prefix"
        raise ValueError(msg)
    return bucket, key


_SETTINGS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_REGION",
             "AWS_DEFAULT_REGION")  # what a client is made from: a client is kept per thread and per their values


def _client() -> Any:
    """A boto3 client per thread (endpoint and credentials from the environment, as DALI's), made
    again when those variables change."""
    settings = tuple(os.environ.get(name) for name in _SETTINGS)
    kept = getattr(_local, "client", None)
    if kept is None or kept[0] != settings:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as e:
            msg = 's3:// sources need boto3 for listing and headers: pip install "dali-patches[s3]"'
            raise ImportError(msg) from e
        endpoint = settings[0] or settings[1]
        client = boto3.client("s3", endpoint_url=endpoint, config=Config(max_pool_connections=64, connect_timeout=5,
                                                                         read_timeout=30, retries={"max_attempts": 5}))
        kept = _local.client = (settings, client)
    return kept[1]


def _stamp(etag: str) -> int:
    """An ETag as a non-negative int64 (what the index compares, like a file's mtime)."""
    return int(hashlib.sha256(etag.strip('"').encode()).hexdigest()[:15], 16)


class ObjectListing:
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


def list_objects(source: str | Sequence[str], suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> ObjectListing:
    """Objects of ``suffixes`` (images by default) under ``s3://bucket/prefix`` (recursively), or the
    objects of an explicit list of URIs (one listing of their common prefix).

    Raises:
        FileNotFoundError: the bucket, prefix or a listed object does not exist.
        PermissionError: the credentials are refused.
    """
    wanted = None if isinstance(source, str) else list(source)
    prefix_uri = source if isinstance(source, str) else os.path.commonprefix(list(source))
    bucket, prefix = split_uri(prefix_uri)
    if wanted is not None and any(split_uri(u)[0] != bucket for u in wanted):
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
        uris = sorted(u for u in found if u.lower().endswith(suffixes))
        if not uris:
            shards = sum(u.endswith(".tar") for u in found)
            hint = (f"; it holds {shards} tar shard(s): pass {prefix_uri.rstrip('/') + '/*.tar'!r} to sample their "
                    "members" if shards and suffixes == IMAGE_SUFFIXES else "")
            msg = f"no objects under {source!r} end in {', '.join(suffixes)}{hint}"
            raise ValueError(msg)
    else:
        missing = [u for u in wanted if u not in found]
        if missing:
            msg = f"{len(missing)} listed object(s) do not exist, e.g. {missing[:3]}; fix the list or remove them"
            raise FileNotFoundError(msg)
        uris = wanted
    sizes = np.fromiter((found[u][0] for u in uris), np.int64, len(uris))
    stamps = np.fromiter((found[u][1] for u in uris), np.int64, len(uris))
    return ObjectListing(uris, sizes, stamps)


def read_range(uri: str, offset: int, length: int) -> bytes:
    """``length`` bytes of an object from ``offset`` (fewer at its end); one ranged GET."""
    bucket, key = split_uri(uri)
    if length <= 0:
        return b""
    response = _client().get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}")
    return bytes(response["Body"].read())


def read_object(uri: str) -> bytes:
    """The whole object (for Pillow, when the header parser is not certain)."""
    bucket, key = split_uri(uri)
    return bytes(_client().get_object(Bucket=bucket, Key=key)["Body"].read())


def object_root(source: str | Sequence[str]) -> str:
    """The prefix (up to its last ``/``) every object of ``source`` lies under."""
    return (source if isinstance(source, str) else os.path.commonprefix(list(source))).rpartition("/")[0]


class S3Objects(ReadsFiles, Source):
    """Image objects under an ``s3://bucket/prefix``, or a list of ``s3://`` URIs (one bucket).
    DALI's reader fetches them; companions are not supported here (keep pairs on a file system, or
    in tar shards)."""

    def __init__(self, spec: str | Sequence[str], companions: Sequence[Any] = ()) -> None:
        if companions:
            msg = ("companions are not supported for s3:// sources of single images; sample the images alone, keep "
                   "the pairs on a file system, or store them as tar shards (s3://bucket/shards/*.tar)")
            raise ValueError(msg)
        self._spec = spec
        self._sizes: dict[str, int] = {}  # bytes of every object listed
        self.root = self.identity = object_root(spec)

    @classmethod
    def claims(cls, spec: Any) -> bool:
        """An ``s3://`` URI or a list of them (a dict of them too: refused, with the reason)."""
        return is_uri(spec) or (isinstance(spec, Mapping) and any(is_uri(v) for v in spec.values()))

    def items(self, keys: Sequence[str] | None = None) -> Items:
        listing = list_objects(self._spec)
        stamps = Columns.empty(len(listing.uris))
        stamps.size[:], stamps.stamp[:] = listing.sizes, listing.stamps
        self._sizes = dict(zip(listing.uris, listing.sizes.tolist()))
        return Items([listing.uris], [], stamps)

    def read_headers(self, locations: Sequence[str], bar: tqdm, workers: int = 0) -> Columns:
        if any(loc not in self._sizes for loc in locations):
            self._sizes.update(zip(locations, list_objects(list(locations)).sizes.tolist()))
        return ranged_headers(locations, [self._sizes[loc] for loc in locations], read_range, read_object, bar,
                              workers or _OBJECT_THREADS)

    def read(self, location: str) -> bytes:
        return read_object(location)

    def named_in(self, text: str, locations: Sequence[str]) -> int | None:
        """DALI's S3 reader writes ``bucket=B object=KEY``; other errors name the URI."""
        return super().named_in(f"{text}\n{named_object(text) or ''}", locations)

    def wait_if_unreachable(self, text: str, patience_s: float) -> bool:
        return waited(text, patience_s)


def patient(call: Callable[[], T], uri: str, patience_s: float = ENDPOINT_PATIENCE_S) -> T:
    """``call()``, a request about object ``uri``; when the server does not answer at all (as opposed
    to answering "no such object"), wait for it (:func:`wait_for_endpoint`) and ask once more."""
    try:
        return call()
    except Exception as e:
        if getattr(e, "response", None) is not None:
            raise
        wait_for_endpoint(f"{type(e).__name__}: {e}", uri, patience_s)
        return call()


def waited(text: str, patience_s: float) -> bool:
    """If DALI's error ``text`` says the object store did not answer: wait for it (see
    :func:`wait_for_endpoint`) and return ``True`` once it answers; ``False`` for other errors."""
    uri = named_object(text)
    if uri is None or unreachable(text) is None:
        return False
    wait_for_endpoint(text, uri, patience_s)
    return True
