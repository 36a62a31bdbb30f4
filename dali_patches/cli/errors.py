"""The library's messages in the command line's words: one mapping from Python parameters to flags.

:class:`~dali_patches.PatchSampler` and :class:`~dali_patches.SamplerConfig` name their parameters
(``batch_size=256 distinct images are needed …; lower batch_size or pass allow_repeats=True``); the
command line has flags instead (``--batch 256 … lower --batch or pass --allow-repeats``).
:func:`translate` rewrites every error and warning the CLI shows, so a message never recommends
something the command line cannot do.
"""

from __future__ import annotations

import re

__all__ = ["FLAGS", "translate"]

# Python parameter → the flag that sets it (every sampling command has each of them).
FLAGS = {
    "allow_repeats": "--allow-repeats",
    "anchors": "--anchors",
    "batch_size": "--batch",
    "cache_bytes": "--cache",
    "decode_batch": "--decode-batch",
    "device": "--device",
    "max_reuse": "--max-reuse",
    "min_opaque": "--min-opaque",
    "min_reuse": "--min-reuse",
    "min_std": "--min-std",
    "num_threads": "--num-threads",
    "pad": "--pad",
    "patch_size": "--patch",
    "reuse": "--reuse",
    "seed": "--seed",
    "trust_index": "--trust-index",
    "verify": "--verify",
}
# Parameters the command line takes from the launcher's environment, as torchrun sets it.
_ENVIRONMENT = {"num_shards": "WORLD_SIZE", "shard_id": "RANK", "device_id": "LOCAL_RANK"}
# Whole phrases that name Python API rather than a parameter.
_PHRASES = {
    "; None uses every core": "; leave --num-threads out to use every core",
    "Catalog.skipped lists them all": "dali-patches inspect lists them all",
    "PatchSampler(provenance=...)": "dali-patches coverage --log (or a PatchSampler's provenance log)",
}

_NAMES = "|".join(sorted(FLAGS, key=len, reverse=True))
_ASSIGNED = re.compile(rf"(?<![\w.-])(?:self\.)?({_NAMES})=(True|False|None|'[^']*'|\"[^\"]*\"|\((\d+), \3\))?")
_BARE = re.compile(rf"(?<![\w.'-])({'|'.join(n for n in FLAGS if '_' in n)})(?![\w=])")
_ENV = re.compile(rf"(?<![\w.-])(?:self\.)?({'|'.join(_ENVIRONMENT)})\b")


def _assigned(match: re.Match[str]) -> str:
    flag, value = FLAGS[match.group(1)], match.group(2)
    if value == "True":
        return flag
    if value in ("False", "None"):
        return f"no {flag}"
    if value is None:
        return f"{flag} "
    if match.group(3):  # a square patch, (64, 64): the flag takes one number
        return f"{flag} {match.group(3)}"
    return f"{flag} {value.strip(chr(39) + chr(34)) if value[0] in chr(39) + chr(34) else value}"


def translate(message: str) -> str:
    """``message`` with every Python parameter it names replaced by its flag (``batch_size=16`` →
    ``--batch 16``, ``allow_repeats=True`` → ``--allow-repeats``, ``device='cpu'`` → ``--device cpu``,
    a bare ``cache_bytes`` → ``--cache``) and the launcher's settings by their variables
    (``num_shards`` → ``WORLD_SIZE``)."""
    for phrase, words in _PHRASES.items():
        message = message.replace(phrase, words)
    message = _ASSIGNED.sub(_assigned, message)
    message = _BARE.sub(lambda m: FLAGS[m.group(1)], message)
    return _ENV.sub(lambda m: _ENVIRONMENT[m.group(1)], message)
