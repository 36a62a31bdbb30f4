"""Review: looking back at a run from its provenance log (``load``, ``coverage``, ``heat_map``);
pictures of it in :mod:`dali_patches.review.figures` (needs matplotlib)."""

from .runs import Provenance, coverage, heat_map, load

__all__ = ["Provenance", "coverage", "heat_map", "load"]
