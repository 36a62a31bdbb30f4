"""Epochs: the framework-neutral base of the iterators — ``len()``, epoch-bounded ``for`` loops over
the sampler's endless stream, and the iterator's resumable state.

A framework adapter subclasses :class:`EpochIterator` and writes how it takes one batch
(``_take``: e.g. the sampler's batch through DLPack), or :class:`PipelineEpochIterator` and writes
which DALI plugin iterator wraps the sample pipeline (``_plugin``). Everything else — epochs,
``state_dict()`` / ``load_state_dict()``, the checks — is here, once, and imports no framework.

**Epochs.** ``batches_per_epoch=None`` iterates forever; an int makes every ``for`` loop run to the
end of the current epoch, ``batches_per_epoch`` batches of the same endless stream (``len()`` gives
it). The position inside the epoch is the iterator's: a loop left early (``break``) leaves its epoch
open, and the next loop yields the rest of it — so an iterator restored from a state taken inside an
epoch behaves exactly as the one that saved it.

**State** (the :class:`~dali_patches.state.Stateful` protocol). ``state_dict()`` is the sampler's
:meth:`~dali_patches.PatchSampler.state_dict` after the last batch this iterator *yielded* (batches a
DALI pipeline has taken but not yet handed out are not counted as consumed), with the iterator's
own fields under ``"iterator"``: ``batches_per_epoch`` and ``epoch_batches`` (batches yielded in the
open epoch). It loads into a new iterator over a new sampler with the same settings, before its
first batch (``it.load_state_dict(state)``, then loop: the stream continues after the last batch
yielded, inside the same epoch), or into a new sampler alone (``sampler.load_state_dict(state)``:
the sampler's fields; an iterator wrapped around it then starts a fresh epoch). An iterator never
takes a batch before its first ``next()`` (the DALI pipeline and DALI's iterator, whose construction
runs the pipeline, are made then), so loading a state right after construction is always in time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, Protocol

from ..state import state_value
from .pipeline import batch_outputs

__all__ = ["DirectEpochIterator", "EpochIterator", "PipelineEpochIterator", "SampleSource"]


class SampleSource(Protocol):
    """What the iterators need of a :class:`~dali_patches.PatchSampler` (typed here without importing
    it: the sampler comes later in the package's flow)."""

    @property
    def output_names(self) -> tuple[str, ...]: ...

    def state_dict(self, in_flight: int = 0) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def pipeline(self, prefetch_queue_depth: int = 2, num_threads: int = 1, no_copy: bool = False,
                 **kwargs: Any) -> Any: ...

    def batches_fed(self, pipe: Any) -> int: ...

    @property
    def backend(self) -> Any: ...

    @property
    def config(self) -> Any: ...

    def take(self, stream: Any = None) -> Any: ...


def _positive_or_none(value: Any, name: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        msg = f"{name}={value!r} must be a positive int or None (endless)"
        raise ValueError(msg)
    return value


class EpochIterator(ABC):
    """``len()``, epoch-bounded ``for`` loops and the resumable state of an iterator over a sampler's
    endless stream of batches (see the module's docstring). Subclasses write :meth:`_take`.

    Args:
        sampler: the sampler to draw from (its stream is shared with any other consumer).
        batches_per_epoch: ``None`` iterates forever; an int makes each ``for`` loop run to the end of
            the current epoch of that many batches (``len()`` gives it), continuing the same stream on
            the next loop.
    """

    def __init__(self, sampler: SampleSource, batches_per_epoch: int | None = None) -> None:
        self.sampler = sampler
        self.batches_per_epoch = _positive_or_none(batches_per_epoch, "batches_per_epoch")
        self._epoch_batches = 0  # batches yielded in the open epoch
        self._yielded = 0  # batches this iterator has yielded

    @abstractmethod
    def _take(self) -> dict[str, Any]:
        """The next batch as ``{name: array}`` for every entry of ``sampler.output_names``."""

    def _in_flight(self) -> int:
        """Batches taken from the sampler but not yet yielded (DALI's prefetch queue)."""
        return 0

    def _started(self) -> bool:
        """Whether this iterator has taken batches from the sampler."""
        return self._yielded > 0

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            msg = f"an endless {type(self).__name__} has no length; pass batches_per_epoch"
            raise TypeError(msg)
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.batches_per_epoch is not None and self._epoch_batches >= self.batches_per_epoch:
            self._epoch_batches = 0  # the last epoch ended: this loop is a new one
        while self.batches_per_epoch is None or self._epoch_batches < self.batches_per_epoch:
            data = self._take()
            self._epoch_batches += 1  # counted before it is handed out: a loop left at this batch has had it
            self._yielded += 1
            yield data

    # -- resumable state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The sampler's state after the last batch this iterator yielded, with this iterator's
        fields under ``"iterator"`` (plain values: JSON- and ``torch.save``-able)."""
        state = self.sampler.state_dict(in_flight=self._in_flight())
        epoch = self.batches_per_epoch
        state["iterator"] = {"batches_per_epoch": epoch, "epoch_batches": self._epoch_batches % epoch if epoch else 0}
        return state

    def check_state(self, state: Any, where: str = "") -> int:
        """Check this iterator's fields of a saved :meth:`state_dict` (nothing changes); returns the
        batches already yielded in the saved epoch. A sampler's own state (no ``"iterator"``) is
        accepted: its epoch starts afresh."""
        if not isinstance(state, dict):
            msg = f"state {where} is a {type(state).__name__}, not a dict; load a state made by state_dict(), unchanged"
            raise ValueError(msg)  # noqa: TRY004 - a bad state is a bad value, as everywhere in the state's checks
        if "iterator" not in state:
            return 0
        own, inner = state_value(state, "iterator", where, dict), f"{where}['iterator']"
        if "batches_per_epoch" not in own:
            state_value(own, "batches_per_epoch", inner)  # raises, naming the missing field
        saved = own["batches_per_epoch"]
        if saved is not None:
            saved = state_value(own, "batches_per_epoch", inner, int, 1)
        if saved != self.batches_per_epoch:
            msg = (f"state {inner}['batches_per_epoch'] is {saved}, this iterator's is {self.batches_per_epoch}; "
                   f"create the {type(self).__name__} with batches_per_epoch={saved} to continue the saved epoch, "
                   "or load the state with sampler.load_state_dict() to start a fresh one")
            raise ValueError(msg)
        return int(state_value(own, "epoch_batches", inner, int, 0, saved - 1 if saved else 0))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` of an iterator over a sampler with the same files and
        settings: the next ``for`` loop yields the rest of the saved epoch, starting right after the
        last batch the saving iterator yielded. Call it on a new iterator over a new sampler, before
        the first batch; everything is checked before anything changes.

        Raises:
            ValueError: a damaged state, one of another sampler, or another ``batches_per_epoch``.
            RuntimeError: this iterator or its sampler has already produced batches.
        """
        name = type(self).__name__
        fix = (f"create a new PatchSampler with the saved settings, wrap it in a new {name} and load the state "
               "into that before its first batch")
        if self._started():
            msg = f"this {name} has already taken batches; {fix}"
            raise RuntimeError(msg)
        position = self.check_state(state)
        if self.sampler.state_dict().get("stream") is not None:  # a batch handed out, or a state loaded
            msg = f"this {name}'s sampler has already produced batches (or loaded a state); {fix}"
            raise RuntimeError(msg)
        try:
            self.sampler.load_state_dict({key: value for key, value in state.items() if key != "iterator"})
        except RuntimeError as error:  # e.g. the sampler's producer has started meanwhile
            msg = f"{error}; {fix}"
            raise RuntimeError(msg) from error
        self._epoch_batches = position


class DirectEpochIterator(EpochIterator):
    """An :class:`EpochIterator` over the sampler's batches themselves, no DALI pipeline: each
    output (:func:`~dali_patches.export.pipeline.batch_outputs`) handed to the framework, typically
    through DLPack. Subclasses write :meth:`_convert` and, for a GPU, :meth:`_take_on_device` (take
    the batch on the framework's stream, or copy it on the device: ARCHITECTURE.md, GPU rules 1-2).
    :class:`~dali_patches.export.transfer.TransferEpochIterator` adds copying a CPU sampler's batches
    to a GPU (``to_device``)."""

    def __init__(self, sampler: SampleSource, batches_per_epoch: int | None = None) -> None:
        super().__init__(sampler, batches_per_epoch)
        self._names = sampler.output_names

    def _take(self) -> dict[str, Any]:
        if not self.sampler.backend.is_gpu:
            return self._convert(self.sampler.take(None))
        return self._take_on_device()

    def _convert(self, batch: Any) -> dict[str, Any]:
        """``{name: framework array}`` of a batch's outputs (zero copy where the framework can)."""
        return {name: self._from_dlpack(array)
                for name, array in zip(self._names, batch_outputs(self.sampler.config, batch))}

    @abstractmethod
    def _from_dlpack(self, array: Any) -> Any:
        """The framework's array over ``array`` (NumPy or CuPy), through DLPack."""

    @abstractmethod
    def _take_on_device(self) -> dict[str, Any]:
        """GPU: the next batch, read safely on the framework's side (see the class)."""


class PipelineEpochIterator(EpochIterator):
    """An :class:`EpochIterator` over the sampler's DALI sample pipeline, through a DALI plugin
    iterator of the framework (subclasses write :meth:`_plugin`). The pipeline is built, and the
    plugin iterator made (which runs the pipeline), at the first ``next()``.

    Args:
        sampler, batches_per_epoch: as for :class:`EpochIterator`.
        prefetch_queue_depth: batches DALI keeps in flight (taken from the sampler ahead of use; the
            state does not count them as consumed).
        no_copy: DALI reads the batches in place instead of copying them (see
            :meth:`~dali_patches.PatchSampler.pipeline`).
    """

    def __init__(self, sampler: SampleSource, batches_per_epoch: int | None = None, prefetch_queue_depth: int = 2,
                 no_copy: bool = False) -> None:
        super().__init__(sampler, batches_per_epoch)
        if isinstance(prefetch_queue_depth, bool) or not isinstance(prefetch_queue_depth, int) \
                or prefetch_queue_depth <= 0:
            msg = f"prefetch_queue_depth={prefetch_queue_depth!r} must be a positive int (batches DALI keeps in flight)"
            raise ValueError(msg)
        self._depth, self._no_copy = prefetch_queue_depth, bool(no_copy)
        self._pipeline: Any = None
        self._outputs: Any = None  # the plugin iterator, made at the first next()
        self._returned = 0  # batches the plugin iterator has returned

    @property
    def pipeline(self) -> Any:
        """The built DALI sample pipeline this iterator runs (built on first use; building it takes no
        batch)."""
        if self._pipeline is None:
            self._pipeline = self.sampler.pipeline(prefetch_queue_depth=self._depth, no_copy=self._no_copy)
        return self._pipeline

    @abstractmethod
    def _plugin(self, pipe: Any) -> Any:
        """DALI's iterator of the framework over ``pipe`` with ``sampler.output_names`` (endless)."""

    def _unpack(self, step: Any) -> dict[str, Any]:
        """One step of the plugin iterator as ``{name: array}``."""
        return dict(step)

    def _take(self) -> dict[str, Any]:
        if self._outputs is None:
            self._outputs = self._plugin(self.pipeline)
        data = self._unpack(next(self._outputs))
        self._returned += 1
        return data

    def _in_flight(self) -> int:
        if self._pipeline is None:
            return 0
        return self.sampler.batches_fed(self._pipeline) - self._returned

    def _started(self) -> bool:
        return self._outputs is not None or (self._pipeline is not None and self.sampler.batches_fed(self._pipeline) > 0)
