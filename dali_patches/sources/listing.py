"""Listing local files: a folder (recursive), a glob pattern or an explicit list → candidate paths,
with what was left out on the way (links back up the tree, files of other suffixes)."""

from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .base import IMAGE_SUFFIXES, Problem

__all__ = ["Listing", "exists_as_file", "expand", "list_source", "note"]

_SUFFIXES_AS_WRITTEN = IMAGE_SUFFIXES + tuple(x.upper() for x in IMAGE_SUFFIXES)  # no lower() for most names


@dataclass
class Listing:
    """What listing a source found: the candidate ``paths`` (sorted), ``skipped`` ``(path, Problem)``
    (links that lead back up the tree), and ``ignored``: files of other suffixes in a folder, per
    suffix (``".svg": 9``), with ``ignored_examples`` (a few paths)."""

    paths: list[str]
    skipped: list[tuple[str, Problem]] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)
    ignored_examples: list[str] = field(default_factory=list)


def list_source(source: str | os.PathLike | Sequence[str | os.PathLike]) -> Listing:
    """Folder (recursive), glob pattern or explicit list → the candidate paths and what was left out
    while listing. Files that are not regular files (a FIFO, a device) are listed: reading their
    header reports them (:func:`~dali_patches.sources.headers.read_local`), and nothing ever opens them."""
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if os.path.isdir(text):
            listing = _walk(text)
            if not listing.paths:
                ignored = (f"; it holds {sum(listing.ignored.values())} other file(s): "
                           f"{_suffix_counts(listing.ignored)}") if listing.ignored else ""
                msg = f"no images in folder {text!r} (searched recursively for {', '.join(IMAGE_SUFFIXES)}){ignored}"
                raise ValueError(msg)
            listing.paths.sort()
            return listing
        if exists_as_file(text):  # a literal path first, even when it holds '[', '*' or '?'
            return Listing([text])
        if glob.has_magic(text):
            found = sorted(p for p in glob.glob(text, recursive=True) if exists_as_file(p))
            if not found:
                msg = f"glob {text!r} matched no files; check the pattern (use '**' with recursive folders)"
                raise ValueError(msg)
            return Listing(found)
        msg = f"{text!r} does not exist; pass an existing folder, a glob such as 'data/**/*.jpg', or a list of files"
        raise FileNotFoundError(msg)
    paths = [os.fspath(p) for p in source]
    if not paths:
        msg = "the file list is empty; pass at least one image path"
        raise ValueError(msg)
    missing = [p for p in paths if not exists_as_file(p)]
    if missing:
        msg = f"{len(missing)} listed file(s) do not exist, e.g. {missing[:3]}; fix the list or remove them"
        raise FileNotFoundError(msg)
    return Listing(paths)


def expand(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Folder (recursive), glob pattern or explicit list → sorted list of candidate paths."""
    return list_source(source).paths


def exists_as_file(path: str) -> bool:
    """Whether ``path`` names something that is not a folder (a FIFO counts: it is reported later)."""
    return os.path.exists(path) and not os.path.isdir(path)


def _suffix_counts(ignored: Counter) -> str:
    return ", ".join(f"{suffix or '(no suffix)'} ×{n}" for suffix, n in ignored.most_common(6))


def _walk(folder: str) -> Listing:
    """Image files below ``folder``, following symbolic links to folders but entering each real
    folder once (a link back up the tree, ``ln -s .. sub/up``, would otherwise repeat it forever);
    a link to the folder itself or to one above it (``/``, say) is not followed but reported.
    Files of other suffixes are counted by suffix."""
    listing = Listing([])
    seen: set[tuple[int, int]] = set()
    top = os.path.realpath(folder)
    stack = [folder]
    while stack:
        root = stack.pop()
        try:
            stat = os.stat(root)
            if (stat.st_dev, stat.st_ino) in seen:
                continue
            seen.add((stat.st_dev, stat.st_ino))
            with os.scandir(root) as entries:
                for entry in entries:
                    name = entry.name
                    if entry.is_dir():
                        if entry.is_symlink() and _is_ancestor(os.path.realpath(entry.path), top):
                            listing.skipped.append((entry.path, Problem(
                                f"a link to {os.path.realpath(entry.path)!r}, which holds the data folder itself; "
                                "not followed (it would list the data set again, or the whole file system)",
                                "link loop")))
                            continue
                        stack.append(entry.path)
                    elif name.endswith(_SUFFIXES_AS_WRITTEN) or name.lower().endswith(IMAGE_SUFFIXES):
                        listing.paths.append(entry.path)
                    else:
                        listing.ignored[os.path.splitext(name)[1].lower()] += 1
                        if len(listing.ignored_examples) < 3:
                            listing.ignored_examples.append(entry.path)
        except OSError:  # a folder that vanished or cannot be read while listing: its files are not found
            continue
    return listing


def _is_ancestor(candidate: str, path: str) -> bool:
    """Whether ``candidate`` is ``path`` or a folder above it (both resolved)."""
    return path == candidate or path.startswith(candidate.rstrip(os.sep) + os.sep)


def note(notes: Listing, listing: Listing) -> None:
    """Add what ``listing`` left out to ``notes`` (a few examples at most)."""
    notes.skipped += listing.skipped
    notes.ignored.update(listing.ignored)
    notes.ignored_examples += listing.ignored_examples[: max(0, 3 - len(notes.ignored_examples))]
