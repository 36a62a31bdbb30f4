"""Feeder: a thread that keeps the decode stage running flat out, a few images ahead of the cache.

The producer takes decoded images from here when a round's refill asks for them: exactly the
schedule's count with a fixed ``reuse`` (the same images in the same order as without the thread,
so the stream stays reproducible), or everything that is ready within the bounds with
``reuse="auto"``. When ``capacity`` images wait untaken, the thread stops pulling (DALI's own
prefetch queue then fills and its threads idle): that time is what the decoder's busy fraction
leaves out.

Every image carries the decode stage's position from before it was taken, so the position "after
the last image the cache took" is exact however far the thread has run ahead: a resumed sampler
re-decodes nothing twice and skips nothing. The stage is not thread-safe; this thread calls it
under a lock, and so does :meth:`DecodeFeeder.mark_broken`.

Nothing waits forever on the decoder: a watchdog thread looks at a decode that has not returned for
:data:`STALL_S` and unblocks a reader stuck on a FIFO that replaced a file
(:meth:`~dali_patches.engine.decode.DecodeStage.unblock`: the recovery then sets it aside); a decode that
has not returned after :data:`STALL_LIMIT_S` ends the run with a :class:`DecodeError` that says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from .backend import Backend
from .decode import DecodeError, DecodeStage

__all__ = ["DecodeFeeder", "POLL_S", "STALL_LIMIT_S", "STALL_S"]

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often a waiting thread (the feeder's, the producer's, a consumer) checks for close()
STALL_S = 5.0  # a decode call this old is looked at: a reader blocked on a FIFO is unblocked ...
_UNBLOCK_EVERY_S = 2.0  # ... and looked at again this often (at least twice the time a look takes)
STALL_LIMIT_S = 600.0  # a decode call this old ends the run: what it waits for does not answer


class DecodeFeeder:
    """Decodes ahead into a buffer of ``capacity`` images.

    Args:
        decoder: the decode stage (from here on only this object calls it).
        backend, stream: the thread decodes with the producer's device and stream current.
        capacity: images decoded but not yet taken, at most (each holds DALI's output memory).
    """

    def __init__(self, decoder: DecodeStage, backend: Backend, stream: Any, capacity: int) -> None:
        self.decoder = decoder
        self._backend, self._stream = backend, stream
        self.capacity = max(1, capacity)
        self._buffer: deque[tuple[dict[str, Any], int, list[Any]]] = deque()  # (position before, source, images)
        self._next_position = decoder.state_dict()  # before the image being decoded now
        self._state = threading.Condition()  # buffer, positions, counters
        self._decoding = threading.Lock()  # the decode stage itself
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self.paused_s = 0.0  # time with `capacity` images waiting: the decoder idles
        self.taken = decoder.images_decoded  # images handed to the producer (a resumed stage starts where it was)
        self._decoding_since: float | None = None  # when the decode call in progress began
        self._thread = threading.Thread(target=self._run, name="dali-patches-decode", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name="dali-patches-decode-watchdog", daemon=True)

    # -- the thread --------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread.ident is None:
            self._thread.start()
            self._watchdog.start()

    def _watch(self) -> None:
        """Unblock a decode stuck on a FIFO; end the run when a decode never returns (see the module)."""
        next_unblock = 0.0
        while not self._stop.wait(1.0):
            since = self._decoding_since
            if since is None:
                next_unblock = 0.0
                continue
            waited = time.monotonic() - since
            if waited >= STALL_LIMIT_S:
                error = DecodeError(f"no image came out of the decoder for {waited:.0f} s: its reader waits on a "
                                    f"file or object under {self.decoder.where()!r} that does not answer (a hung "
                                    "network mount, a storage server that stopped); check the storage, then restart")
                with self._state:
                    self._error = error
                    self._state.notify_all()
                return
            if waited >= STALL_S and time.monotonic() >= next_unblock:
                t0 = time.monotonic()
                poked = self.decoder.unblock()
                if poked:
                    log.warning("the decoder was stuck for %.0f s on %d FIFO(s) that replaced files, e.g. %s; "
                                "unblocked them (they will be set aside)", waited, len(poked), poked[0])
                next_unblock = time.monotonic() + max(_UNBLOCK_EVERY_S, 2 * (time.monotonic() - t0))

    def _run(self) -> None:
        try:
            with self._backend.use(self._stream):
                while not self._stop.is_set():
                    with self._state:
                        if len(self._buffer) >= self.capacity:
                            t0 = time.perf_counter()
                            self._state.wait(POLL_S)
                            self.paused_s += time.perf_counter() - t0
                            continue
                    with self._decoding:
                        position = self.decoder.state_dict()
                        with self._state:
                            self._next_position = position
                        self._decoding_since = time.monotonic()
                        try:
                            source, images = self.decoder.next()
                        finally:
                            self._decoding_since = None
                        after = self.decoder.state_dict()
                    with self._state:
                        self._buffer.append((position, source, images))
                        # With the buffer emptied before the next decode starts, the state is the one
                        # after this image, not the one before it (which it was until the next loop).
                        self._next_position = after
                        self._state.notify_all()
        except BaseException as e:  # noqa: BLE001 - the producer re-raises it, with its own type
            with self._state:
                self._error = e
                self._state.notify_all()

    # -- the producer's side -----------------------------------------------------------------
    def _wait_for(self, count: int) -> None:
        """Until ``count`` images are buffered (the caller holds ``_state``)."""
        while len(self._buffer) < count and self._error is None and not self._stop.is_set():
            self.start()
            self._state.wait(POLL_S)
        if len(self._buffer) < count and self._error is not None:
            raise self._error

    def peek(self) -> tuple[int, list[Any]]:
        """The next image ``(source, [image, *companions])`` without taking it (waits for one)."""
        with self._state:
            self._wait_for(1)
            _, source, images = self._buffer[0]
            return source, images

    def take(self, at_least: int, at_most: int) -> list[tuple[int, list[Any]]]:
        """Between ``at_least`` (waiting for the decoder if needed) and ``at_most`` images: all that
        are ready, within those bounds (held together: prefer :meth:`each` for more than a few)."""
        return list(self.each(at_least, at_most))

    def each(self, at_least: int, at_most: int) -> Iterator[tuple[int, list[Any]]]:
        """:meth:`take`'s images one at a time, each handed over as soon as it is ready: the caller
        holds one decoded image, not the whole refill (a refill at ``reuse=1`` is a batch's worth
        of images — 32 images of up to 72 MiB each held at once were 2.3 GB beyond the arena). It
        stops at ``at_most``, or once ``at_least`` are out and none is ready."""
        out = 0
        while out < at_most:
            with self._state:
                if not self._buffer:
                    if out >= at_least:
                        return
                    self._wait_for(1)
                _, source, images = self._buffer.popleft()
                self.taken += 1
                self._state.notify_all()
            out += 1
            yield source, images
            del images

    @property
    def ready(self) -> int:
        """Images decoded and waiting now."""
        return len(self._buffer)

    def state_dict(self) -> dict[str, Any]:
        """The decode stage's state after the last image taken (for the producer's snapshots),
        however far the thread has decoded ahead."""
        with self._state:
            return dict(self._buffer[0][0] if self._buffer else self._next_position)

    def check_state(self, state: dict[str, Any], where: str = "['decoder']") -> None:
        """Check a saved :meth:`state_dict` (see :meth:`DecodeStage.check_state`); nothing changes."""
        self.decoder.check_state(state, where)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (before the thread has started)."""
        if self._thread.ident is not None:
            msg = "the decoder's state can only be loaded before it starts decoding"
            raise RuntimeError(msg)
        self.decoder.load_state_dict(state)
        self._buffer.clear()
        self._next_position = self.decoder.state_dict()
        self.taken = self.decoder.images_decoded

    def mark_broken(self, source: int, reason: str) -> None:
        """Set a file aside from now on (see :meth:`DecodeStage.mark_broken`)."""
        with self._decoding:
            self.decoder.mark_broken(source, reason)

    def close(self) -> None:
        """Stop the thread (after the image it is decoding; not when that decode never returns) and
        drop the buffer."""
        self._stop.set()
        with self._state:
            self._state.notify_all()
        if self._thread.ident is not None:
            self._thread.join(timeout=None if self._error is None else POLL_S)
            self._watchdog.join()
        self._buffer.clear()
