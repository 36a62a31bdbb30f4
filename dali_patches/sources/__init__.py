"""Sources: where the items live and how their bytes reach the decoder (see :mod:`.base`).

:func:`open_source` turns what a user passes into a :class:`~dali_patches.sources.base.Source`:
tar shards (:mod:`.tar`), ``s3://`` objects (:mod:`.s3`) or local files (:mod:`.files`); a
``Source`` object (your own, say) is taken as it is.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..options import Companion
from .base import Source
from .files import LocalFiles
from .pairing import declared_companions
from .s3 import S3Objects, is_uri
from .tar import TarShards, is_shard_spec

__all__ = ["LocalFiles", "S3Objects", "Source", "TarShards", "item_bytes", "open_source"]


def open_source(spec: Any, companions: Mapping[str, Any] | Sequence[Companion] | None = None) -> Source:
    """The source ``spec`` names, with its companions resolved: a :class:`Source` as it is; tar
    shards (a ``.tar`` path, URI or glob, a list of them, a folder of shards); ``s3://`` objects;
    else local files (a folder, a glob, a list, or a dict/list naming companions)."""
    if isinstance(spec, Source):
        if companions:
            msg = "give companions to the Source object itself, not beside it"
            raise ValueError(msg)
        return spec
    if isinstance(spec, Iterator):  # a generator of paths: read it once, here
        spec = list(spec)
    declared = declared_companions(spec, companions)
    if is_shard_spec(spec):
        return TarShards(spec, declared)
    if is_uri(spec) or (isinstance(spec, Mapping) and any(is_uri(v) for v in spec.values())):
        return S3Objects(spec, declared)
    return LocalFiles(spec, declared)


def item_bytes(location: str) -> bytes:
    """The encoded item at a location as logs spell it (a path, an ``s3://`` URI, ``shard.tar#member``)."""
    shard, hash_, _ = location.partition("#")
    if hash_ and shard.endswith(".tar"):
        source: Source = TarShards(shard)
        source.items()
    else:
        source = S3Objects(location) if is_uri(location) else LocalFiles(location)
    return source.read(location)
