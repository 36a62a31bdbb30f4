"""The source seam: where the items of a data set live, and everything that depends on it.

A :class:`Source` owns every answer about an item's bytes: listing the items (with the keys, sizes
and change stamps the persistent index needs), reading a few bytes of each for its header, feeding
the decoder (a DALI reader node, or bytes through ``external_source`` where no reader fits: see
:mod:`dali_patches.sources.feeding`), naming the item behind a decode failure, and waiting for a
store that stopped answering. The catalog and the decode stage only talk to this interface, so a
new kind of source is one module (``files``, ``s3`` and ``tar`` are the three there are).

An item is one row: the main image and its companions, each a *location* — a string that names it
for people and logs (a path, an ``s3://`` URI, ``shard.tar#member``). Locations are what the
catalog's ``files`` and a provenance log hold.
"""

from __future__ import annotations

import os
import sys
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..options import Companion

if TYPE_CHECKING:
    import numpy as np
    from tqdm.auto import tqdm

    from .columns import Columns
    from .feeding import Reader

__all__ = ["IMAGE_SUFFIXES", "Items", "MAIN", "PROBLEM_KINDS", "Problem", "Source", "cache_folder", "user_stacklevel"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
MAIN = "image"  # key of the main image in a dict source

PROBLEM_KINDS = ("empty", "truncated", "not an image", "unreadable", "too small", "no partner", "orphan companion",
                 "duplicate key", "size mismatch", "palette mask", "duplicate", "too large", "not a regular file",
                 "link loop", "unusable name", "corrupt data", "changed")  # every Problem.kind


class Problem(str):
    """Why a file was left out: the message itself (a ``str``), plus ``kind``, a short stable label
    for counting, one of :data:`PROBLEM_KINDS`."""

    kind: str

    def __new__(cls, message: str, kind: str) -> Problem:  # noqa: PYI034 - Self needs Python 3.11
        self = super().__new__(cls, message)
        self.kind = kind
        return self

    def __reduce__(self) -> tuple[type[Problem], tuple[str, str]]:  # pickle and copy keep the kind
        return Problem, (str(self), self.kind)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller point at the first frame outside
    this package (the user's ``PatchSampler(...)`` line), not at ours."""
    frame: FrameType | None = sys._getframe(1)
    level, package = 1, os.path.dirname(os.path.dirname(__file__)) + os.sep
    while frame is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def cache_folder(*names: str) -> str:
    """A folder under the user's cache (``$XDG_CACHE_HOME``, else ``~/.cache``) / ``dali_patches``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dali_patches", *names)


@dataclass
class Items:
    """What listing a source found.

    Attributes:
        columns: locations, one list per part (the main images, then each companion in the order
            asked), aligned: row ``i`` of every list is one item.
        skipped: ``(location, Problem)`` of what was left out while listing (unpaired companions,
            links that lead back up the tree, members of a damaged shard, …).
        stamps: size and change stamps of every location (rows: the main images, then each
            companion's), when listing already learnt them (objects, tar members); ``None``: the
            catalog asks :meth:`Source.stat` when it needs them.
        ignored: files of other suffixes, per suffix (``".svg": 9``), with a few ``ignored_examples``.
        warn_ignored: whether they are worth a warning (stray files in a folder are; the label and
            metadata members of a shard are not).
    """

    columns: list[list[str]]
    skipped: list[tuple[str, Problem]] = field(default_factory=list)
    stamps: Columns | None = None
    ignored: Counter = field(default_factory=Counter)
    ignored_examples: list[str] = field(default_factory=list)
    warn_ignored: bool = True


class Source(ABC):
    """Where items live (see the module).

    ``root`` is what every location lies under (the index's keys are locations relative to it);
    ``identity`` names the data set for the index (an absolute folder, a URI prefix); both are known
    once :meth:`items` has run (a folder knows them at once). ``companions`` are the parts each
    item has besides its image, with their options. A source's part of a resumable state is where
    its reader stands: the checkpoint its :meth:`reader` gives and takes back (``at``), which the
    decode stage keeps in its own state."""

    root: str = ""
    identity: str = ""
    companions: tuple[Companion, ...] = ()

    @classmethod
    def claims(cls, spec: Any) -> bool:
        """Whether ``spec`` (what a user passed as ``source``) names items of this kind; what
        :func:`~dali_patches.sources.open_source` asks each kind in turn."""
        return False

    @abstractmethod
    def items(self, keys: Sequence[str] | None = None) -> Items:
        """List the items, each with its :attr:`companions` (see the implementation for how they
        pair). ``keys``: locations relative to :attr:`root` that a trusted index holds; a source that
        can build its listing from them without looking (a read-only folder) does so, others list."""

    @abstractmethod
    def read_headers(self, locations: Sequence[str], bar: tqdm, workers: int = 0) -> Columns:
        """Size, stamps and header of each location (``bar`` advanced once per location);
        ``workers``: processes or threads to use (0: the source's default)."""

    def stat(self, locations: Sequence[str], workers: int = 0) -> Columns | None:
        """Size and change stamps of each location now, to tell the index what changed; ``None``:
        the listing's stamps are current (they are re-read at every listing)."""
        return None

    @abstractmethod
    def reader(self, labels: Sequence[int], columns: Sequence[Sequence[str]], read_as: np.ndarray | None = None, *,
               shard_id: int = 0, num_shards: int = 1, seed: int = 0, shuffle: bool = True, batch_size: int = 1,
               at: bytes | None = None) -> Reader:
        """What feeds a decode pipeline: the entries ``columns`` (locations per part) reported as
        ``labels`` (their catalog rows), each read as entry ``read_as[i]`` (the decode stage's
        stand-in for a broken one), sharded and shuffled per epoch with ``seed``, from checkpoint
        ``at`` (``None``: the start)."""

    @abstractmethod
    def read(self, location: str) -> bytes:
        """The whole encoded item at ``location`` (for pictures of a run, and Pillow fallbacks)."""

    def named_in(self, text: str, locations: Sequence[str]) -> int | None:
        """The index in ``locations`` of the item an error message names (the longest match), if any."""
        named = [(len(loc), i) for i, loc in enumerate(locations) if loc and loc in text]
        return max(named)[1] if named else None

    def irregular(self, locations: Sequence[str]) -> dict[int, str]:
        """Indices of ``locations`` that are (now) not regular files — a FIFO or a device put in a
        file's place, on which a reader would block — with why. Only local files can be."""
        return {}

    def unblock(self, locations: Sequence[str]) -> list[str]:
        """Release a reader blocked on such a FIFO (see :meth:`irregular`); the locations poked."""
        return []

    def wait_if_unreachable(self, text: str, patience_s: float) -> bool:
        """After a decode error ``text``: if it says the store did not answer (as opposed to "no such
        item"), wait for it with backoff, at most ``patience_s``, and return ``True`` once it answers
        again; ``False`` for any other error. Raises ``ConnectionError`` when it does not come back."""
        return False
