"""Sources: what the user passed (folder, glob, file list, or images with named companions) → rows
of paths, one per sample, matched by key, with every unmatched file reported.

Ways to pair an image with its companions (``"image"`` is the main image's key):

* parallel folders, matched by relative path without extension:
  ``{"image": "hr/", "target": "lr_x2/"}`` pairs ``hr/a/0001.png`` with ``lr_x2/a/0001.jpg``;
* glob patterns, matched by what their wildcards capture:
  ``{"image": "data/*_albedo.jpg", "normal": "data/*_normal.jpg"}``, or
  ``{"image": "LR/*x2.png", "target": "HR/*.png"}`` (``0001x2.png`` ↔ ``0001.png``);
* explicit lists: ``[{"image": "a.png", "mask": "a_mask.png"}, ...]``, tuples in the order
  ``(image, *companion names)``, or a dict of equally long lists.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from ..options import Companion

__all__ = ["IMAGE_SUFFIXES", "Listing", "MAIN", "PROBLEM_KINDS", "Problem", "declared_companions", "expand",
           "list_source", "pair_sources", "user_stacklevel"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
_SUFFIXES_AS_WRITTEN = IMAGE_SUFFIXES + tuple(x.upper() for x in IMAGE_SUFFIXES)  # no lower() for most names
MAIN = "image"  # key of the main image in a dict source


PROBLEM_KINDS = ("empty", "truncated", "not an image", "unreadable", "too small", "no partner", "orphan companion",
                 "duplicate key", "size mismatch", "palette mask", "duplicate", "too large", "not a regular file",
                 "link loop", "unusable name", "corrupt data", "changed")  # every Problem.kind


class Problem(str):
    """Why a file was left out: the message itself (a ``str``), plus ``kind``, a short stable label
    for counting (``"empty"``, ``"truncated"``, ``"not an image"``, ``"unreadable"``, ``"too small"``,
    ``"no partner"``, ``"orphan companion"``, ``"duplicate key"``, ``"size mismatch"``,
    ``"palette mask"``, ``"duplicate"``, ``"too large"``, ``"not a regular file"``, ``"link loop"``,
    ``"unusable name"``)."""

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
        if _exists_as_file(text):  # a literal path first, even when it holds '[', '*' or '?'
            return Listing([text])
        if glob.has_magic(text):
            found = sorted(p for p in glob.glob(text, recursive=True) if _exists_as_file(p))
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
    missing = [p for p in paths if not _exists_as_file(p)]
    if missing:
        msg = f"{len(missing)} listed file(s) do not exist, e.g. {missing[:3]}; fix the list or remove them"
        raise FileNotFoundError(msg)
    return Listing(paths)


def expand(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Folder (recursive), glob pattern or explicit list → sorted list of candidate paths."""
    return list_source(source).paths


def _exists_as_file(path: str) -> bool:
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


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A regex matching what ``glob`` returns for ``pattern``, capturing each wildcard."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:(.*)/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append("(.*)")
            i += 2
        elif pattern[i] == "*":
            out.append("([^/]*)")
            i += 1
        elif pattern[i] == "?":
            out.append("([^/])")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            out.append("[" + pattern[i + 1:end].replace("!", "^", 1) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _keyed(source: Any, name: str, notes: Listing) -> tuple[dict[str, str], list[tuple[str, Problem]]]:
    """``{key: path}`` for a folder (key: relative path without extension) or a glob (key: the text
    its wildcards matched), and the files whose key is taken twice; what listing left out goes to
    ``notes``."""
    text = os.fspath(source)
    listing = list_source(text)
    _note(notes, listing)
    paths = listing.paths
    if os.path.isdir(text):
        keys = [Path(os.path.relpath(p, text)).with_suffix("").as_posix() for p in paths]
    elif glob.has_magic(text):
        regex = _glob_regex(text)
        matches = [(p, regex.match(p)) for p in paths]
        keys = ["/".join(g or "" for g in m.groups()) if m else p for p, m in matches]
    else:
        msg = f"{name!r}: {text!r} must be a folder or a glob to be matched by name (or give explicit lists)"
        raise ValueError(msg)
    found: dict[str, str] = {}
    clashes: list[tuple[str, Problem]] = []
    for key, path in zip(keys, paths):
        if key in found:
            clashes.append((path, Problem(f"{name!r} key {key!r} is also {found[key]!r}; keep one file per key",
                                            "duplicate key")))
        else:
            found[key] = path
    return found, clashes


def _note(notes: Listing, listing: Listing) -> None:
    notes.skipped += listing.skipped
    notes.ignored.update(listing.ignored)
    notes.ignored_examples += listing.ignored_examples[: max(0, 3 - len(notes.ignored_examples))]


def _rows_by_key(source: Mapping[str, Any], names: Sequence[str],
                 notes: Listing) -> tuple[list[tuple[str, ...]], list[tuple[str, str]]]:
    keyed = {}
    problems: list[tuple[str, str]] = []
    for name in (MAIN, *names):
        keyed[name], clashes = _keyed(source[name], name, notes)
        problems += clashes
    rows = []
    for key, path in keyed[MAIN].items():
        missing = [n for n in names if key not in keyed[n]]
        if missing:
            example = next(iter(keyed[missing[0]]), None)
            where = os.fspath(source[missing[0]])
            why = f"no {missing[0]!r} partner with key {key!r} in {where!r} (its keys look like {example!r})"
            problems.append((path, Problem(f"{why}; add it or remove this image", "no partner")))
            continue
        rows.append((path, *(keyed[n][key] for n in names)))
    for name in names:
        problems += [(path, Problem(f"this {name!r} file has no image with key {key!r} in {os.fspath(source[MAIN])!r}",
                                      "orphan companion"))
                     for key, path in keyed[name].items() if key not in keyed[MAIN]]
    return rows, problems


def _check_rows(rows: list[Any], names: Sequence[str]) -> list[tuple[str, ...]]:
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, Mapping):
            if set(row) != {MAIN, *names}:
                msg = f"sample {i} has keys {sorted(row)}; every sample needs exactly {sorted({MAIN, *names})}"
                raise ValueError(msg)
            row = tuple(row[n] for n in (MAIN, *names))
        if len(row) != 1 + len(names):
            msg = f"sample {i} has {len(row)} paths; expected {1 + len(names)}: ({MAIN}, {', '.join(names)})"
            raise ValueError(msg)
        out.append(tuple(os.fspath(p) for p in row))
    missing = [p for row in out for p in row if not _exists_as_file(p)]
    if missing:
        msg = f"{len(missing)} listed file(s) do not exist, e.g. {missing[:3]}; fix the list or remove them"
        raise FileNotFoundError(msg)
    return out


def _columns(rows: Sequence[tuple[str, ...]], width: int) -> list[list[str]]:
    return [list(column) for column in zip(*rows)] if rows else [[] for _ in range(width)]


def pair_sources(source: Any, names: Sequence[str]) -> tuple[list[list[str]], list[tuple[str, str]], Listing]:
    """Columns of paths (the images, then each companion's files in ``names`` order, aligned: one
    sample per position), ``(path, reason)`` of every file left unpaired or not followed, and what
    listing noted (:class:`Listing`, without paths: links not followed, suffixes ignored).

    Raises:
        ValueError: the source's form does not fit ``names`` (the message says which form to use).
    """
    notes = Listing([])
    if isinstance(source, Mapping):
        if set(source) != {MAIN, *names}:
            msg = f"a dict source needs exactly the keys {sorted({MAIN, *names})}, got {sorted(source)}"
            raise ValueError(msg)
        lists = [not isinstance(v, (str, os.PathLike)) for v in source.values()]
        if all(lists):
            counts = {k: len(v) for k, v in source.items()}
            if len(set(counts.values())) != 1:
                msg = f"explicit lists must be equally long (one entry per sample), got {counts}"
                raise ValueError(msg)
            rows = _check_rows(list(zip(*(source[n] for n in (MAIN, *names)))), names)
            return _columns(rows, 1 + len(names)), [], notes
        if any(lists):
            msg = "give every entry of a dict source as a folder/glob, or every entry as a list; not a mix"
            raise ValueError(msg)
        rows, problems = _rows_by_key(source, names, notes)
        return _columns(rows, 1 + len(names)), [*problems, *notes.skipped], notes
    if isinstance(source, (str, os.PathLike)) or not any(isinstance(r, (Mapping, tuple)) for r in source):
        if names:
            msg = (f"companions {list(names)} need a source that names them: a dict such as "
                   f"{{'image': 'hr/', {names[0]!r}: 'other/'}} or a list of dicts/tuples")
            raise ValueError(msg)
        listing = list_source(source if isinstance(source, (str, os.PathLike)) else list(source))
        _note(notes, listing)
        return [listing.paths], list(notes.skipped), notes
    return _columns(_check_rows(list(source), names), 1 + len(names)), [], notes


def declared_companions(source: Any, companions: Mapping[str, Any] | Sequence[Companion] | None) -> tuple[Companion, ...]:
    """Companions named by a dict source's keys (or a list of dicts), with options from ``companions``
    (name → :class:`Companion`, dict of its options, or ``None`` for defaults)."""
    given = {c.name: c for c in companions} if isinstance(companions, Sequence) else dict(companions or {})
    if isinstance(source, Mapping):
        names = [k for k in source if k != MAIN]
    elif isinstance(source, Sequence) and not isinstance(source, str) and source and isinstance(source[0], Mapping):
        names = [k for k in source[0] if k != MAIN]
    else:  # plain paths, or tuples in the order of ``companions``
        names = list(given)
    unknown = set(given) - set(names)
    if unknown:
        msg = f"companions {sorted(unknown)} are not in the source (it names {names}); add them to the source"
        raise ValueError(msg)
    out = []
    for name in names:
        spec = given.get(name)
        out.append(spec if isinstance(spec, Companion) else Companion(name, **(spec or {})))
    return tuple(out)
