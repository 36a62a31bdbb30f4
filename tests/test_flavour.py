"""The import-time check that exactly one DALI wheel is installed."""

from __future__ import annotations

import pytest

from dali_patches.flavour import require_dali


def _installed(**wheels: str):  # type: ignore[no-untyped-def]
    return lambda name: wheels.get(name.replace("-", "_"))


def test_the_installed_wheel_is_named() -> None:
    assert require_dali(_installed(nvidia_dali_cuda120="2.4.0")) == "nvidia-dali-cuda120 2.4.0"


def test_no_dali_names_every_extra() -> None:
    with pytest.raises(ImportError, match=r"no DALI wheel is installed.*\[cuda13\].*\[cuda12\].*\[cpu\]"):
        require_dali(_installed(), importable=lambda: False)


def test_two_flavours_name_both_and_the_fix() -> None:
    with pytest.raises(ImportError) as info:
        require_dali(_installed(nvidia_dali_cuda120="2.4.0", nvidia_dali_cuda130="2.4.0"))
    message = str(info.value)
    assert "nvidia-dali-cuda120 2.4.0 and nvidia-dali-cuda130 2.4.0 are installed" in message
    assert "pip uninstall -y nvidia-dali-cuda120 nvidia-dali-cuda130" in message


def test_dali_without_metadata_is_accepted() -> None:
    assert require_dali(_installed(), importable=lambda: True) == "nvidia-dali (wheel unknown)"


def test_this_environment_has_exactly_one() -> None:
    import dali_patches

    assert dali_patches.DALI.startswith("nvidia-dali")
