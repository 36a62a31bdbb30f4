"""Pairing: images with their companions — rows of paths, one per item, matched by key, with every
unmatched file reported.

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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import MAIN, Problem
from .listing import Listing, exists_as_file, list_source, note

__all__ = ["pair_sources"]


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
    note(notes, listing)
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


def _rows_by_key(source: Mapping[str, Any], names: Sequence[str],
                 notes: Listing) -> tuple[list[tuple[str, ...]], list[tuple[str, Problem]]]:
    keyed = {}
    problems: list[tuple[str, Problem]] = []
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
    missing = [p for row in out for p in row if not exists_as_file(p)]
    if missing:
        msg = f"{len(missing)} listed file(s) do not exist, e.g. {missing[:3]}; fix the list or remove them"
        raise FileNotFoundError(msg)
    return out


def _columns(rows: Sequence[tuple[str, ...]], width: int) -> list[list[str]]:
    return [list(column) for column in zip(*rows)] if rows else [[] for _ in range(width)]


def pair_sources(source: Any, names: Sequence[str]) -> tuple[list[list[str]], list[tuple[str, Problem]], Listing]:
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
        note(notes, listing)
        return [listing.paths], list(notes.skipped), notes
    return _columns(_check_rows(list(source), names), 1 + len(names)), [], notes
