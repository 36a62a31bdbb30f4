"""A Griffe extension for the API reference: the package's docstrings cross-reference in Sphinx style
(:class:`~dali_patches.PatchSampler`, :meth:`state_dict`), which Markdown would show literally. Each
such role becomes inline code that links to the object when the reference documents it, and stays
plain code when it does not (private modules, names of other packages).

A few docstrings also write ``Args: <prose>`` on one line (the arguments "as for" another class);
that line is kept as prose instead of being parsed as a one-entry parameter table."""

from __future__ import annotations

import re
from typing import Any

import griffe

INLINE_ARGS = re.compile(r"^(\s*)Args: (?=\S)", re.MULTILINE)
ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([\w.]+)(?:\(\))?`")


class SphinxRoles(griffe.Extension):
    """Rewrites Sphinx roles in every docstring as optional cross-references."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        obj.docstring.value = INLINE_ARGS.sub(r"\1*Arguments:* ", obj.docstring.value)
        if ":`" not in obj.docstring.value:
            return
        scope = obj if obj.kind in (griffe.Kind.CLASS, griffe.Kind.MODULE) else (obj.parent or obj)
        module = obj.module if obj.kind is not griffe.Kind.MODULE else obj

        def link(match: re.Match[str]) -> str:
            short, target = match.group(1), match.group(2)
            title = target.rsplit(".", 1)[-1] if short else target
            if target.startswith("dali_patches"):
                first, second = target, target
            else:  # relative to the class (or module) that holds the docstring, then to its module
                first, second = f"{scope.path}.{target}", f"{module.path}.{target}"
            return (f'<autoref identifier="{first}" slug="{second}" optional>'
                    f"<code>{title}</code></autoref>")

        obj.docstring.value = ROLE.sub(link, obj.docstring.value)
