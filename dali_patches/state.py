"""State: the one protocol every stateful piece follows, and the checks that guard loading one.

Every piece whose state shapes the stream of batches — the cache, the draws, the refill schedule,
the decode stage, the feeder, the producer, the sampler and the iterators — is :class:`Stateful`:
``state_dict()`` returns plain Python values (JSON- and ``torch.save``-able), ``load_state_dict()``
continues from one. A parent's state is its children's, each under its own key, plus the fields it
declares itself; loading checks *every* field of every child first (:meth:`Stateful.check_state`),
and changes nothing until all passed, so a damaged or hand-edited state fails naming the field and
leaves the object as it was.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["Field", "Stateful", "plain", "read_fields", "state_value"]


@runtime_checkable
class Stateful(Protocol):
    """``state_dict()`` → plain values; ``load_state_dict(state)`` continues from them. A piece that
    is part of a larger state also has ``check_state(state, where)`` (every field checked, the
    values returned, nothing changed) and ``apply_state(checked)``, so that its parent checks all
    its children before it changes any; ``load_state_dict`` is then ``apply_state(check_state(s))``."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def state_value(state: Any, key: str, where: str, kind: type = int, low: float | None = None,
                high: float | None = None) -> Any:
    """Field ``key`` of the saved state ``state`` (a dict, at ``where`` in the whole state), checked:
    present, of ``kind`` (``int``, ``float``, ``str``, ``list``, ``dict``), within ``[low, high]``.
    Every piece that loads a state reads it through here, so a damaged or hand-edited state fails
    with the field's name instead of a raw error deep inside (or worse, loads)."""
    def refuse(problem: str) -> ValueError:
        return ValueError(f"state {where}[{key!r}] {problem}; load a state made by state_dict() of the same "
                          "version, unchanged")

    if not isinstance(state, dict):
        msg = f"state {where} is a {type(state).__name__}, not a dict; load a state made by state_dict(), unchanged"
        raise ValueError(msg)  # noqa: TRY004 - a bad state is a bad value, as everywhere in the state's checks
    if key not in state:
        raise refuse("is missing")
    value: Any = state[key]
    numbers = {int: (int, np.integer), float: (int, float, np.integer, np.floating)}
    if isinstance(value, bool) or not isinstance(value, numbers.get(kind, kind)):
        raise refuse(f"is {value!r:.80} ({type(value).__name__}), not {kind.__name__}")
    if kind not in numbers:
        return value
    number = float(value)  # type: ignore[arg-type]  # a number: checked above
    if not math.isfinite(number):
        raise refuse(f"is {value!r}, not a finite number")
    if (low is not None and number < low) or (high is not None and number > high):
        raise refuse(f"is {value!r}, outside [{low}, {high}]")
    return int(value) if kind is int else number  # type: ignore[call-overload]


@dataclass(frozen=True)
class Field:
    """A declared state field: its type and bounds (see :func:`state_value`)."""

    kind: type = int
    low: float | None = 0
    high: float | None = None


def read_fields(state: Any, where: str, declared: Mapping[str, Field]) -> dict[str, Any]:
    """Every field ``declared`` of ``state``, checked (the first bad one raises, naming it)."""
    return {name: state_value(state, name, where, f.kind, f.low, f.high) for name, f in declared.items()}


def plain(value: Any) -> Any:
    """``value`` as plain JSON values, recursively: arrays → lists, enums → their value, fractions →
    ``"a/b"``, dataclasses → the list of their fields."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Fraction):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [plain(getattr(value, f.name)) for f in dataclasses.fields(value)]
    return value
