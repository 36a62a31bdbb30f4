"""content: ``anchors="content"`` — patches only where an image holds something to learn from.

When an image enters the cache, its coarse map (:mod:`dali_patches.engine.measure`) is computed
on its device: one flag per cell of ``2s × 2s`` anchors (``s = min(P_h, P_w) // 4``), set where a
sample every ``s`` pixels suggests an informative patch. The flags come to the host with those of
every other image inserted before the next draw, in one copy; the candidate cells of each resident
image are kept in one pool (4 bytes per cell). A draw picks a candidate cell of the image uniformly
and an anchor uniformly inside it.

The map only proposes; the round's gathered patches are then tested exactly (:meth:`ContentAnchors.settle`),
and every failing one is drawn again in the same image and cut again, so no patch below the
threshold leaves the engine and every batch keeps its ``B`` distinct images. An image whose map
proposes nothing, or a patch that failed :data:`_MAP_TRIES` times, has its image scanned exactly
(:meth:`ContentAnchors._scan`): :data:`_PROBE` anchors drawn and tested, and where none passes, every
anchor (:func:`~dali_patches.engine.measure.passing_anchors`). Such a patch then comes from the
anchors found; an image whose map proposes nothing (texture finer than the samples, or little of
it) is drawn from anywhere, each patch tested; and an image where nothing passes is set aside —
reported once, never drawn, not inserted again — and a patch that was to come from it comes from
another resident image not in its batch. Images set aside still fill the cache until they are
evicted, so before a round the maker takes more decoded images while fewer than a batch's worth
of the resident ones hold an informative patch (:meth:`ContentAnchors.top_up`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..state import state_value
from .anchors import AnchorPolicy
from .backend import Backend, HostArray
from .cache import RingCache
from .draw import RoundDraw
from .measure import Threshold, check_device, check_host, passing_anchors

__all__ = ["ContentAnchors", "map_geometry"]

log = logging.getLogger(__name__)

_SAMPLES_PER_SIDE = 4  # the map samples a patch's window on a 4 × 4 grid (at least)
_CELL = 2  # sample anchors per cell side
_MAP_TRIES = 3  # passes of redraws from the map before a failing image is scanned exactly
_MAX_PASSES = 12  # passes of checks in a round before giving up (the exact lists end it long before)
_EXACT_ANCHORS = 4096  # anchors kept per exactly scanned image
_PROBE = 512  # anchors drawn and tested before a whole image is scanned ...
_PROBE_BYTES = 64 << 20  # ... fewer where their patches would take more than this (at least 16)
_MAP, _UNIFORM, _ASIDE = 0, 1, 2  # draw from the map's cells; anywhere (the map proposes nothing); never


def map_geometry(patch_size: tuple[int, int], height: int, width: int) -> dict[str, int]:
    """The map of an ``height × width`` image: ``stride`` (pixels between samples), ``win_h``/``win_w``
    (samples per patch window), ``anchors_h``/``anchors_w`` (sample anchors), ``cells_h``/``cells_w``,
    ``cell`` (sample anchors per cell side) and ``cell_px`` (the same in pixels)."""
    ph, pw = patch_size
    s = max(1, min(ph, pw) // _SAMPLES_PER_SIDE)
    ah, aw = (height - ph) // s + 1, (width - pw) // s + 1
    return {"stride": s, "win_h": ph // s, "win_w": pw // s, "anchors_h": ah, "anchors_w": aw,
            "cells_h": -(-ah // _CELL), "cells_w": -(-aw // _CELL), "cell": _CELL, "cell_px": _CELL * s}


class ContentAnchors(AnchorPolicy):
    """Anchors where patches pass ``threshold`` (see the module).

    Args:
        backend: the device.
        threshold: the test (:class:`~dali_patches.engine.measure.Threshold`).
        alpha_part: index of the cache's alpha part (images with transparency), or ``None``.
        allow_repeats: a patch whose image was set aside may come from an image already in its batch.
        names: each source's location, for messages.
        seed: seeds the probes of images scanned exactly (with each image's source index).
        alpha: ``(N,) bool``, which sources have an alpha channel (for messages), or ``None``.
    """

    def __init__(self, patch_size: tuple[int, int], step: int, rng: np.random.Generator, backend: Backend,
                 threshold: Threshold, alpha_part: int | None, allow_repeats: bool = False,
                 names: Sequence[str] = (), seed: int = 0, alpha: HostArray | None = None) -> None:
        super().__init__(patch_size, step, rng)
        self.names, self.seed, self._alpha = names, seed, alpha
        self._cell_px = map_geometry(patch_size, *patch_size)["cell_px"]  # the same for every image
        self.backend, self.xp = backend, backend.xp
        self.threshold, self.alpha_part, self.allow_repeats = threshold, alpha_part, allow_repeats
        self._pending: dict[int, tuple[int, Any]] = {}  # slot → (source, cell flags on the device, not yet on the host)
        self._slots = 0
        self._mode = np.zeros(0, np.int8)  # per slot: _MAP, _UNIFORM or _ASIDE
        self._start = np.zeros(0, np.int64)  # per slot: first candidate in the pool, and how many
        self._count = np.zeros(0, np.int64)
        self._cols = np.ones(0, np.int64)  # per slot: cells per row
        self._pool = np.zeros(1 << 16, np.int32)
        self._used = 0
        self._exact: dict[int, HostArray] = {}  # slot → (k, 2) anchors that pass: where redraws keep failing
        self.exact_sources: set[int] = set()  # images scanned exactly (scanned again when they come back)
        self.set_aside: dict[int, str] = {}  # source → why (no patch passes)
        self.checked = self.redrawn = self.replaced = 0
        self.maps, self.map_s, self.scan_s = 0, 0.0, 0.0

    # -- maps ----------------------------------------------------------------------------------
    def _grow(self, slots: int) -> None:
        if slots > self._slots:
            extra = slots - self._slots
            self._mode = np.concatenate([self._mode, np.zeros(extra, np.int8)])
            self._start = np.concatenate([self._start, np.zeros(extra, np.int64)])
            self._count = np.concatenate([self._count, np.zeros(extra, np.int64)])
            self._cols = np.concatenate([self._cols, np.ones(extra, np.int64)])
            self._slots = slots

    def on_insert(self, cache: RingCache, slot: int) -> None:
        """Queue the map of the image in ``slot`` on its device (its flags come over at the next draw)."""
        t0 = time.perf_counter()
        self._grow(cache.max_slots)
        h, w = cache.sizes(np.asarray([slot]))
        geometry = map_geometry(self.patch_size, int(h[0]), int(w[0]))
        self._pending[int(slot)] = (int(cache.sources(np.asarray([slot]))[0]),
                                    cache.content_map(slot, self.alpha_part, geometry, self.threshold))
        self._cols[slot] = geometry["cells_w"]
        self._mode[slot] = _MAP
        self._exact.pop(int(slot), None)
        self.maps += 1
        self.map_s += time.perf_counter() - t0

    def _flush(self, cache: RingCache) -> None:
        """Bring the pending maps to the host at once; scan exactly the images whose map proposes
        nothing (or that were scanned before a resume) and set aside those where nothing passes."""
        if not self._pending:
            return
        t0 = time.perf_counter()
        slots, pending = list(self._pending), list(self._pending.values())
        self._pending = {}
        maps = [flags for _, flags in pending]
        flags = self.backend.to_host(self.xp.concatenate(maps)) if len(maps) > 1 else self.backend.to_host(maps[0])
        ends = np.cumsum([len(m) for m in maps])
        scanned = self.scan_s
        for slot, (source, cells) in zip(slots, zip((p[0] for p in pending), np.split(flags, ends[:-1]))):
            if not cache.holds(source) or int(cache.sources(np.asarray([slot]))[0]) != source:
                continue  # evicted by the same refill: never drawn, nothing to judge
            if source in self.set_aside:  # set aside before a resume (its scan found nothing, or its anchors failed)
                self._mode[slot] = _ASIDE
                continue
            candidates = np.flatnonzero(cells).astype(np.int32)
            self._append(cache, slot, candidates)  # first: a scan probes the candidates (as it did before a resume)
            if not len(candidates) or source in self.exact_sources:
                self._scan(cache, slot)
        self.map_s += time.perf_counter() - t0 - (self.scan_s - scanned)

    def _append(self, cache: RingCache, slot: int, candidates: HostArray) -> None:
        if self._used + len(candidates) > len(self._pool):
            live = [s for s in cache.resident_slots().tolist() if self._mode[s] == _MAP and self._count[s]
                    and s not in self._pending and s != slot]
            kept = [self._pool[self._start[s]: self._start[s] + self._count[s]] for s in live]
            total = sum(len(k) for k in kept) + len(candidates)
            pool = np.zeros(max(2 * total, len(self._pool)), np.int32)
            at = 0
            for s, values in zip(live, kept):
                pool[at: at + len(values)], self._start[s] = values, at
                at += len(values)
            self._pool, self._used = pool, at
        self._pool[self._used: self._used + len(candidates)] = candidates
        self._start[slot], self._count[slot] = self._used, len(candidates)
        self._used += len(candidates)

    def _scan(self, cache: RingCache, slot: int) -> None:
        """Find anchors of the image in ``slot`` that pass, exactly: first those among :data:`_PROBE`
        drawn from its candidate cells (or anywhere, without candidates) with a generator of the
        image's own, gathered and tested; where none passes, every anchor (:func:`passing_anchors`).
        Redraws that keep failing come from them; an image whose map proposes nothing is drawn from
        anywhere (each patch tested) once one is found; with none, it is set aside."""
        t0 = time.perf_counter()
        source = int(cache.sources(np.asarray([slot]))[0])
        self.exact_sources.add(source)
        found = self._probe(cache, slot, source)
        if not len(found):
            image = self.backend.to_host(cache.image(0, slot))
            alpha = self.backend.to_host(cache.image(self.alpha_part, slot)) if self.alpha_part is not None else None
            found = passing_anchors(image, alpha, self.patch_size, self.step, self.threshold, _EXACT_ANCHORS)
        if len(found):
            self._exact[int(slot)] = found
            if not self._count[slot]:
                self._mode[slot] = _UNIFORM
        else:
            self._aside(cache, slot)
        self.scan_s += time.perf_counter() - t0

    def _probe(self, cache: RingCache, slot: int, source: int) -> HostArray:
        """``(k, 2)`` anchors among :data:`_PROBE` drawn for the image in ``slot`` that pass the exact
        test (seeded by ``source``: the same wherever and whenever it is probed, so a resumed stream
        finds the same)."""
        count = int(max(16, min(_PROBE, _PROBE_BYTES // max(1, cache.parts[0].patch_bytes))))
        rng, self.rng = self.rng, np.random.default_rng([self.seed, source])
        try:
            slots = np.full(count, slot, np.int64)
            if self._mode[slot] == _MAP and self._count[slot]:
                ys, xs = self.draw(cache, slots)
            else:
                ys, xs = self._uniform(*cache.sizes(slots))
        finally:
            self.rng = rng
        patches = cache.cut(0, cache.table(0, slots, ys, xs))
        ok = self._check(cache, patches, np.arange(count), slots, ys, xs)
        found = np.unique(np.stack([ys[ok], xs[ok]], axis=1), axis=0)
        return found.astype(np.int64)

    def _aside(self, cache: RingCache, slot: int) -> None:
        self._mode[slot] = _ASIDE
        source = int(cache.sources(np.asarray([slot]))[0])
        if source not in self.set_aside:
            why = f"no {self.patch_size[0]}x{self.patch_size[1]} patch has {self._bound(source)}"
            self.set_aside[source] = why
            log.warning("set aside for anchors='content' (reported once, not drawn again): %s: %s",
                        self.names[source] if source < len(self.names) else source, why)

    def _bound(self, source: int | None = None) -> str:
        """What a patch must have, in words (the opaque share where the image, or any, has alpha)."""
        return self.threshold.describe(self._alpha is not None and (source is None or bool(self._alpha[source])))

    def _too_few(self, drawable: int, batch_size: int) -> str:
        """The message when fewer images hold an informative patch than a batch needs."""
        fix = "lower min_std" + (" or min_opaque" if self._alpha is not None else "")
        if self.allow_repeats:
            return (f"no image of this shard holds a patch with {self._bound()} ({len(self.set_aside)} set aside); "
                    f"{fix}")
        return (f"only {drawable} images hold a patch with {self._bound()} ({len(self.set_aside)} set aside) but "
                f"batch_size={batch_size} distinct images are needed; {fix}, lower batch_size, or pass "
                "allow_repeats=True")

    def top_up(self, cache: RingCache, take: Any, batch_size: int, shard_size: int) -> None:
        """Before a round: while fewer resident images than a batch needs hold an informative patch
        (those set aside still fill the cache until they are evicted), ``take()`` one more decoded
        image (it returns how many it took). Raises ``ValueError`` when a whole shard's worth more
        does not make up for them."""
        need = 1 if self.allow_repeats else batch_size
        taken = 0
        while len(self.drawable(cache, cache.resident_slots())) < need:
            if taken >= shard_size:
                raise ValueError(self._too_few(len(self.drawable(cache, cache.resident_slots())), batch_size))
            taken += max(1, take())

    def refuses(self, source: int) -> bool:
        """Whether a decoded image of ``source`` should not enter the cache (set aside before)."""
        return source in self.set_aside

    def drawable(self, cache: RingCache, resident: HostArray) -> HostArray:
        """The resident slots a batch may use: all but those set aside."""
        self._flush(cache)
        return resident[self._mode[resident] != _ASIDE] if self._slots else resident

    # -- draws ---------------------------------------------------------------------------------
    def draw(self, cache: RingCache, slots: HostArray, exact: HostArray | None = None) -> tuple[HostArray, HostArray]:
        """Anchors for ``slots``: a candidate cell of the map, then a position in it (anywhere for an
        image whose map proposes nothing); from the image's exact list where ``exact`` (bool, per
        slot) says so."""
        self._flush(cache)
        (ph, pw), s = self.patch_size, self.step
        h, w = cache.sizes(slots)
        n = len(slots)
        u = self.rng.random((n, 3))
        count = self._count[slots]
        at = self._start[slots] + np.minimum((u[:, 0] * count).astype(np.int64), np.maximum(count - 1, 0))
        cell = self._pool[np.where(count > 0, at, 0)]  # an image without candidates may start past the pool's end
        row, col = np.divmod(cell.astype(np.int64), self._cols[slots])
        size = self._cell_px
        top, left = row * size, col * size
        y = top + (u[:, 1] * (np.minimum(top + size, h - ph + 1) - top)).astype(np.int64)
        x = left + (u[:, 2] * (np.minimum(left + size, w - pw + 1) - left)).astype(np.int64)
        y, x = y // s * s, x // s * s
        anywhere = count == 0  # _UNIFORM images (and, defensively, any without candidates)
        if anywhere.any():
            self.fallbacks += int((self._mode[slots[anywhere]] != _UNIFORM).sum())
            y[anywhere], x[anywhere] = self._uniform(h[anywhere], w[anywhere])
        for i in np.flatnonzero(exact) if exact is not None else ():
            anchors = self._exact[int(slots[i])]
            y[i], x[i] = anchors[min(int(u[i, 0] * len(anchors)), len(anchors) - 1)]
        return y, x

    def settle(self, cache: RingCache, draw: RoundDraw, patches: Any, recut: Any, split: Any = None) -> None:
        """Test every patch of a round exactly and redraw the failing ones until all pass (see the
        module). ``patches``: the round's main patches ``(n·B, P_h, P_w, C)`` on the device;
        ``recut(positions)``: cut those positions again from ``draw`` (changed in place);
        ``split(work, count)``: runs ``work(start, stop)`` over ``range(count)``, on two threads
        where it can (the host's test)."""
        resident = self.drawable(cache, cache.resident_slots())  # the slots a replacement may come from
        slots, ys, xs, sources = (draw.slots.reshape(-1), draw.y.reshape(-1), draw.x.reshape(-1),
                                  draw.source.reshape(-1))
        b = draw.slots.shape[1]
        todo = np.arange(len(slots))
        tries = np.zeros(len(slots), np.int64)  # failed tests of each position
        for _ in range(_MAX_PASSES):
            ok = self._check(cache, patches, todo, slots, ys, xs, split)
            self.checked += len(todo)
            todo = todo[~ok]
            if not len(todo):
                return
            self.redrawn += len(todo)
            tries[todo] += 1
            for slot in np.unique(slots[todo[tries[todo] >= _MAP_TRIES]]).tolist():  # proposals that keep failing
                if self._mode[slot] != _ASIDE and int(slot) not in self._exact:
                    self._scan(cache, slot)
                elif tries[todo][slots[todo] == slot].max() >= _MAP_TRIES + 3:  # its exact list fails: a rounding edge
                    self._aside(cache, slot)
            resident = self.drawable(cache, resident)
            for i in todo[self._mode[slots[todo]] == _ASIDE].tolist():
                slots[i] = self._replacement(resident, slots[(i // b) * b: (i // b + 1) * b])
                sources[i], tries[i] = cache.sources(slots[i: i + 1])[0], 0
                self.replaced += 1
            ys[todo], xs[todo] = self.draw(cache, slots[todo], tries[todo] >= _MAP_TRIES)
            recut(todo)
        msg = (f"{len(todo)} patches still fail min_std={self.threshold.min_std:g} after {_MAX_PASSES} redraws; "
               "please report this with the images")
        raise RuntimeError(msg)

    def _replacement(self, resident: HostArray, row: HostArray) -> int:
        free = np.setdiff1d(resident, row)
        if not len(free) and self.allow_repeats and len(resident):
            free = resident
        if not len(free):
            raise ValueError(self._too_few(len(resident), len(row)))
        return int(free[self.rng.integers(len(free))])

    def _check(self, cache: RingCache, patches: Any, todo: HostArray, slots: HostArray, ys: HostArray,
               xs: HostArray, split: Any = None) -> HostArray:
        """``(len(todo),) bool``: which of the patches ``todo`` pass, tested exactly on their device."""
        alpha = None
        if self.alpha_part is not None:
            alpha = cache.cut(self.alpha_part, cache.table(self.alpha_part, slots[todo], ys[todo], xs[todo]))
        if not self.backend.is_gpu:
            ok = np.empty(len(todo), bool)
            every = len(todo) == len(patches)  # the first pass: views, not copies

            def work(start: int, stop: int) -> None:
                ok[start:stop] = check_host(patches[start:stop] if every else patches[todo[start:stop]],
                                            None if alpha is None else alpha[start:stop], self.threshold)

            (split or (lambda w, count: w(0, count)))(work, len(todo))
            return ok
        flags = check_device(self.xp, patches, alpha, todo, self.threshold)
        return self.backend.to_host(flags).astype(bool)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "redrawn": self.redrawn, "replaced": self.replaced,
                "exact_sources": sorted(self.exact_sources), "set_aside": {str(k): v for k, v in self.set_aside.items()}}

    def check_state(self, state: dict[str, Any], where: str = "['anchors']") -> dict[str, Any]:
        counts = {name: state_value(state, name, where, int, 0) for name in ("checked", "redrawn", "replaced")}
        exact = state_value(state, "exact_sources", where, list)
        aside = state_value(state, "set_aside", where, dict)
        if not all(isinstance(s, int) and s >= 0 for s in exact) or not all(
                isinstance(k, str) and k.isdigit() and isinstance(v, str) for k, v in aside.items()):
            msg = f"state {where} is damaged; load a state made by state_dict() of the same version, unchanged"
            raise ValueError(msg)
        return {**counts, "exact_sources": set(exact), "set_aside": {int(k): v for k, v in aside.items()}}

    def apply_state(self, checked: dict[str, Any]) -> None:
        self.checked, self.redrawn, self.replaced = checked["checked"], checked["redrawn"], checked["replaced"]
        self.exact_sources, self.set_aside = set(checked["exact_sources"]), dict(checked["set_aside"])

    def stats(self) -> dict[str, Any]:
        """``checked`` and ``redrawn`` patches, ``replaced`` (patches moved to another image because
        theirs was set aside), ``maps`` (images mapped), ``map_s`` (host seconds spent on maps and
        their flags), ``scan_s`` (on probes and exact scans), ``exact_images`` (images scanned
        exactly and drawn from; set aside ones not counted) and ``set_aside`` (images where no patch
        passes)."""
        return {"checked": self.checked, "redrawn": self.redrawn, "replaced": self.replaced, "maps": self.maps,
                "map_s": self.map_s, "scan_s": self.scan_s, "exact_images": len(self.exact_sources - set(self.set_aside)),
                "set_aside": len(self.set_aside)}
