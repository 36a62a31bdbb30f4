"""Sources: where the items live and how their bytes reach the decoder (see :mod:`.base`).

:func:`open_source` turns what a user passes into a :class:`~dali_patches.sources.base.Source` of
the first kind of :data:`KINDS` that claims it — tar shards (:mod:`.tar`), ``s3://`` objects
(:mod:`.s3`), else local files (:mod:`.files`); a ``Source`` object (your own, say) is taken as it
is. A new kind of source is one module with a :class:`~dali_patches.sources.base.Source` subclass,
named in :data:`KINDS`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..options import Companion
from .base import MAIN, Source
from .files import LocalFiles
from .s3 import S3Objects
from .tar import TarShards

__all__ = ["KINDS", "LocalFiles", "S3Objects", "Source", "TarShards", "declared_companions", "item_bytes", "open_source"]

KINDS: tuple[type[Source], ...] = (TarShards, S3Objects, LocalFiles)  # asked in this order; the last claims all


def declared_companions(spec: Any, companions: Mapping[str, Any] | Sequence[Companion] | None) -> tuple[Companion, ...]:
    """Companions named by a dict source's keys (or a list of dicts), with options from ``companions``
    (name → :class:`~dali_patches.options.Companion`, dict of its options, or ``None`` for
    defaults); for other sources, those of ``companions``, in their order."""
    given = {c.name: c for c in companions} if isinstance(companions, Sequence) else dict(companions or {})
    if isinstance(spec, Mapping):
        names = [k for k in spec if k != MAIN]
    elif isinstance(spec, Sequence) and not isinstance(spec, str) and spec and isinstance(spec[0], Mapping):
        names = [k for k in spec[0] if k != MAIN]
    else:  # plain paths, shards, or tuples in the order of ``companions``
        names = list(given)
    unknown = set(given) - set(names)
    if unknown:
        msg = f"companions {sorted(unknown)} are not in the source (it names {names}); add them to the source"
        raise ValueError(msg)
    return tuple(c if isinstance(c := given.get(n), Companion) else Companion(n, **(c or {})) for n in names)


def open_source(spec: Any, companions: Mapping[str, Any] | Sequence[Companion] | None = None) -> Source:
    """The source ``spec`` names, with its companions resolved (see the module)."""
    if isinstance(spec, Source):
        if companions:
            msg = "give companions to the Source object itself, not beside it"
            raise ValueError(msg)
        return spec
    if isinstance(spec, Iterator):  # a generator of paths: read it once, here
        spec = list(spec)
    kind = next(k for k in KINDS if k.claims(spec))
    return kind(spec, declared_companions(spec, companions))  # type: ignore[call-arg]


def item_bytes(location: str) -> bytes:
    """The encoded item at a location as logs spell it (a path, an ``s3://`` URI, ``shard.tar#member``)."""
    shard, hash_, _ = location.partition("#")
    if hash_ and shard.endswith(".tar"):
        source: Source = TarShards(shard)
        source.items()
    else:
        source = S3Objects(location) if S3Objects.claims(location) else LocalFiles(location)
    return source.read(location)
