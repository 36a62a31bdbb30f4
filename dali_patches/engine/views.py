"""Decoded views (DALI's buffers) held on a GPU until the copies that read them are done."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

__all__ = ["HELD_GROUPS", "HeldViews"]

HELD_GROUPS = 2  # GPU: decode batches of views awaiting their copies before the oldest is waited for


class HeldViews:
    """GPU: decoded views (DALI's buffers) kept until the copies that read them are done. DALI takes
    a buffer back as soon as its last view goes and may decode into it at once, so each decode batch
    of views is tied to an event recorded after its copies, and dropped when that event is done —
    at most :data:`HELD_GROUPS` groups wait."""

    def __init__(self, every: int) -> None:
        self._held: deque[tuple[Any, list[Any]]] = deque()  # (event, views copied before it)
        self._holding: list[Any] = []
        self._every = every

    def add(self, views: Iterable[Any], record: Any) -> None:
        """Keep ``views``; every ``every`` of them, tie those kept to an event (``record()``)."""
        self._holding += views
        if len(self._holding) >= self._every:
            self.release(record())

    def release(self, event: Any, wait: bool = False) -> None:
        """Tie the views kept so far to ``event``; drop the groups whose reads are done (no host
        blocking unless more than ``HELD_GROUPS`` groups wait, or ``wait``)."""
        if self._holding:
            self._held.append((event, self._holding))
            self._holding = []
        while self._held and (wait or len(self._held) > HELD_GROUPS or self._held[0][0].done):
            event, views = self._held[0]  # the views stay referenced until their reads are known done
            event.synchronize()
            self._held.popleft()
            del views

    def clear(self) -> None:
        self._held.clear()
        self._holding.clear()
