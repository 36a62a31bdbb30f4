"""Which DALI wheel is installed. DALI ships one wheel per CUDA major (``nvidia-dali-cuda120``,
``nvidia-dali-cuda130``), all of them holding the same ``nvidia.dali`` package, so exactly one must be
installed; this package's extras pick it (``cpu``, ``cuda12``, ``cuda13``). Checked once, when
:mod:`dali_patches` is imported, so that a missing or doubled DALI is named with its fix instead of
failing later inside DALI."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from importlib import metadata

__all__ = ["DALI_WHEELS", "dali_wheel", "require_dali"]

# Every DALI wheel this package works with, and the CUDA major it is built for (nightly and weekly
# builds included: they install the same nvidia.dali package).
DALI_WHEELS = {f"nvidia-dali{channel}-cuda{major}0": major
               for channel in ("", "-nightly", "-weekly") for major in ("12", "13")}

_EXTRAS = ("pip install 'dali-patches[cuda13]' (NVIDIA driver R580 or newer), "
           "'dali-patches[cuda12]' (CUDA 12 drivers) or 'dali-patches[cpu]' (no GPU)")


def _version_or_none(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def dali_wheel(version_of: Callable[[str], str | None] = _version_or_none) -> dict[str, str]:
    """The DALI wheels installed, ``{distribution name: version}`` (normally one)."""
    found = {name: version_of(name) for name in DALI_WHEELS}
    return {name: version for name, version in found.items() if version is not None}


def require_dali(version_of: Callable[[str], str | None] = _version_or_none,
                 importable: Callable[[], bool] | None = None) -> str:
    """``"nvidia-dali-cuda130 2.4.0"``: the one DALI wheel installed.

    Raises:
        ImportError: no DALI is installed, or wheels of two CUDA flavours are (they overwrite each
            other's files), each with the commands that fix it.
    """
    wheels = dali_wheel(version_of)
    if len(wheels) > 1:
        listed = " and ".join(f"{name} {version}" for name, version in sorted(wheels.items()))
        msg = (f"{listed} are installed; they share the nvidia.dali package, so the one installed last has "
               f"overwritten the other's files. Keep one: pip uninstall -y {' '.join(sorted(wheels))}, then "
               + _EXTRAS)
        raise ImportError(msg)
    if wheels:
        ((name, version),) = wheels.items()
        return f"{name} {version}"
    if (importable or (lambda: importlib.util.find_spec("nvidia.dali") is not None))():
        return "nvidia-dali (wheel unknown)"  # e.g. DALI on PYTHONPATH without its metadata
    msg = "dali_patches needs NVIDIA DALI, and no DALI wheel is installed: " + _EXTRAS
    raise ImportError(msg)
