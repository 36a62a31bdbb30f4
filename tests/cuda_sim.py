"""A model of CUDA stream semantics, for testing the GPU path on a machine without a GPU.

This is **not a GPU emulator**. It is a test double of the small part of CuPy that
:mod:`dali_patches` uses (device arrays, streams, events, devices, driver memory, the memory pool,
pinned host memory, one raw kernel), built to make ordering mistakes visible:

* **Work runs later and out of step.** Every operation on device memory (a copy, a kernel, a
  memset) is queued on its stream and executed by a worker thread after a random lag, picking among
  the streams at random. Streams keep their own order; nothing else is ordered unless an event says so.
* **Events and stream waits order that work**, exactly as in CUDA: ``stream.wait_event(e)`` holds
  the stream until the work recorded before ``e`` has run; ``stream.synchronize()``,
  ``event.synchronize()``, a successful ``event.done`` and ``deviceSynchronize()`` tell the host
  that work has run.
* **Every access is checked against a happens-before order** (vector clocks per stream, plus what
  the host has seen complete). Two accesses to overlapping device bytes, at least one a write,
  from different streams and not ordered by an event, a host synchronisation or stream order, are a
  *hazard* — whichever of them happens to run first here. So is a use of released memory, memory
  handed out again by the pool while a pending operation of another stream still uses it, memory
  released to its owner (DALI's decoded views, driver memory) before the work that reads it is
  known to have run, a kernel or allocation on another device than the memory's, and pinned host
  memory rewritten before the asynchronous copy from it has run.
* **Released memory is poisoned**, so a late read also gets wrong bytes, not silently right ones.
  Driver memory is freed as ``cudaFree`` frees it, after waiting for the device; later work on it
  is a use after free.

A hazard is recorded with the operation, the buffer and both streams named, and raised as
:class:`HazardError` by :meth:`Simulator.check` (the test fixture calls it after every test).

The memory pool follows CuPy's: a freed block returns to the pool of the stream that was current
when it was allocated and is handed out again only on that stream, best fit (a larger block serves
a smaller request, as CuPy splits one); the new owner's accesses are checked against the last
owner's (memory dropped by one stream and rewritten by another without an event between them is a
hazard). ``cuda.MemoryPool()`` with ``cuda.using_allocator`` gives a pool of its own.
Driver memory (``cuda.Memory``) and DALI's decoded views are released at once (their owners may hand
them to another stream right away). Kernels are executed by registered NumPy twins.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["HazardError", "Simulator"]

_POISON = 0xDB
_ALIGN = 256


class HazardError(AssertionError):
    """A stream-ordering or lifetime mistake that real CUDA would turn into wrong bytes (or worse)."""


VectorClock = dict[int, int]


def _join(a: VectorClock, b: VectorClock) -> VectorClock:
    return {k: max(a.get(k, 0), b.get(k, 0)) for k in a.keys() | b.keys()}


@dataclass
class _Access:
    op: str
    stream: Stream
    clock: int  # the stream's own clock at that access
    write: bool
    lo: int
    hi: int


@dataclass
class _Block:
    """Device (or pinned) bytes; shared by every array over them and by the operations queued on them."""

    name: str
    storage: np.ndarray
    device: int
    kind: str  # "pool" | "driver" | "dali"
    address: int
    pool_key: tuple[int, int, int] | None = None  # (pool, device, stream id): the free list it returns to
    released: bool = False
    accesses: list[_Access] = field(default_factory=list)
    pending: int = 0  # queued operations on it that have not run


class _Handle:
    """What keeps a block alive: arrays refer to it, queued operations do not (like a CUDA kernel,
    which holds no Python reference). When the last array goes, the block is released."""

    def __init__(self, sim: Simulator, block: _Block) -> None:
        self.block = block
        weakref.finalize(self, sim._release, block)


@dataclass
class _Op:
    name: str
    stream: Stream
    clock: VectorClock
    run: Callable[[], None]
    ready_at: float
    wait_for: _Op | None = None  # a stream wait: runs once this op has run
    blocks: tuple[_Block, ...] = ()
    firm: bool = False  # runs no sooner than ready_at, even when the host waits for it (device work)
    done: bool = False


class Stream:
    """A CUDA stream: a FIFO of operations run by the simulator's worker, late."""

    def __init__(self, sim: Simulator, name: str = "", device: int | None = None, ptr: int | None = None) -> None:
        self.sim = sim
        self.id = next(sim._ids)
        self.ptr = ptr if ptr is not None else 0x7000_0000 + 16 * self.id
        self.device_id = sim._device() if device is None else device
        self.name = name or f"stream {self.id}"
        self.queue: deque[_Op] = deque()
        self.clock: VectorClock = {self.id: 0}
        with sim._cv:
            sim._streams[self.ptr] = self

    def __repr__(self) -> str:
        return f"<{self.name} on device {self.device_id}>"

    # -- CuPy's API -------------------------------------------------------------------------
    def synchronize(self) -> None:
        self.sim._sync(self)

    @property
    def done(self) -> bool:
        with self.sim._cv:
            if self.queue:
                return False
            self.sim._host_knows(self.clock)
            return True

    def record(self, event: Event | None = None) -> Event:
        event = event or Event(self.sim)
        event.record(self)
        return event

    def wait_event(self, event: Event) -> None:
        sim = self.sim
        with sim._cv:
            if event.op is None:  # never recorded: nothing to wait for (as in CUDA)
                return
            self.clock = _join(self.clock, event.clock)
            sim._enqueue(self, f"wait for {event}", lambda: None, wait_for=event.op)

    def use(self) -> Stream:
        self.sim._current_streams().__setitem__(self.device_id, self)
        return self

    def __enter__(self) -> Stream:  # noqa: PYI034 - Self needs Python 3.11
        sim = self.sim
        if self.device_id != sim._device():
            msg = f"{self} entered while device {sim._device()} is current"
            sim._hazard(msg)
        stack = sim._local.__dict__.setdefault("stream_stack", [])
        stack.append(sim._current_streams().get(self.device_id))
        sim._current_streams()[self.device_id] = self
        return self

    def __exit__(self, *exc: object) -> None:
        previous = self.sim._local.stream_stack.pop()
        current = self.sim._current_streams()
        if previous is None:
            current.pop(self.device_id, None)
        else:
            current[self.device_id] = previous


class Event:
    """A CUDA event: a marker in a stream's queue."""

    def __init__(self, sim: Simulator, block: bool = False, disable_timing: bool = False,
                 interprocess: bool = False) -> None:
        self.sim = sim
        self.device = sim._device()  # an event belongs to the device current when it is made
        self.op: _Op | None = None
        self.clock: VectorClock = {}

    def __repr__(self) -> str:
        return f"<event on {self.op.stream if self.op else 'nothing'}>"

    def record(self, stream: Stream | None = None) -> None:
        sim = self.sim
        stream = stream or sim.get_current_stream()
        with sim._cv:
            if self.device != stream.device_id:
                sim._hazard(f"an event made on device {self.device} recorded on {stream}")
            self.op = sim._enqueue(stream, "event", lambda: None)
            self.clock = dict(stream.clock)

    @property
    def done(self) -> bool:
        with self.sim._cv:
            if self.op is not None and not self.op.done:
                return False
            self.sim._host_knows(self.clock)
            return True

    def synchronize(self) -> None:
        sim = self.sim
        with sim._cv:
            while self.op is not None and not self.op.done:
                sim._urgent.add(self.op.stream.id)
                sim._cv.wait(0.01)
            sim._host_knows(self.clock)


class Device:
    """``cupy.cuda.Device``: a context that makes a device current in this thread."""

    def __init__(self, sim: Simulator, device: Any = None) -> None:
        self.sim = sim
        self.id = sim._device() if device is None else int(device)
        if not 0 <= self.id < sim.devices:
            msg = f"invalid device ordinal {self.id} (the simulator has {sim.devices})"
            raise ValueError(msg)
        self._previous: list[int] = []

    def __int__(self) -> int:
        return self.id

    __index__ = __int__

    def __enter__(self) -> Device:  # noqa: PYI034 - Self needs Python 3.11
        self._previous.append(self.sim._device())
        self.sim._local.device = self.id
        return self

    def __exit__(self, *exc: object) -> None:
        self.sim._local.device = self._previous.pop()

    def use(self) -> None:
        self.sim._local.device = self.id

    def synchronize(self) -> None:
        self.sim.device_synchronize()


class Memory(_Handle):
    """``cupy.cuda.Memory``: driver memory on the current device, freed when dropped."""

    def __init__(self, sim: Simulator, size: int) -> None:
        super().__init__(sim, sim._new_block(int(size), "driver", f"driver memory of {int(size)} bytes"))


class MemoryPointer:
    def __init__(self, mem: _Handle, offset: int) -> None:
        self.mem, self.offset = mem, int(offset)

    @property
    def ptr(self) -> int:
        return self.mem.block.address + self.offset

    @property
    def device_id(self) -> int:
        return self.mem.block.device


class PinnedMemory(bytearray):
    """``cupy.cuda.alloc_pinned_memory``: page-locked host bytes (a buffer for ``np.frombuffer``)."""


class ndarray:  # CuPy's name
    """A device array: a NumPy view of a block's bytes that only queued operations read or write."""

    def __init__(self, shape: Any, dtype: Any = np.float64, memptr: MemoryPointer | None = None,
                 strides: Any = None, *, _sim: Simulator | None = None, _view: np.ndarray | None = None,
                 _handle: _Handle | None = None, _base: ndarray | None = None) -> None:
        if _view is None:  # the public constructor: over a MemoryPointer
            if memptr is None:
                msg = "the simulator builds arrays with xp.empty/zeros/asarray or over a MemoryPointer"
                raise TypeError(msg)
            _handle, block = memptr.mem, memptr.mem.block
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            _view = np.ndarray(shape, dtype, buffer=block.storage, offset=memptr.offset, strides=strides)
        self._sim: Simulator = _sim  # type: ignore[assignment]
        self._view = _view
        self._handle = _handle
        self.base = _base  # the array owning the memory, as CuPy keeps it (views keep it alive)

    # -- what a view is -----------------------------------------------------------------------
    def _derived(self, view: Any) -> ndarray:
        if not isinstance(view, np.ndarray):
            msg = "reading one element of a (simulated) device array needs a copy to the host; use asnumpy()"
            raise TypeError(msg)
        return ndarray(view.shape, _sim=self._sim, _view=view, _handle=self._handle,
                       _base=self.base if self.base is not None else self)

    @property
    def _block(self) -> _Block:
        return self._handle.block  # type: ignore[union-attr]

    def _range(self) -> tuple[int, int]:
        if self._view.size == 0:
            return 0, 0
        lo, hi = np.lib.array_utils.byte_bounds(self._view)
        start = self._block.storage.__array_interface__["data"][0]
        return lo - start, hi - start

    shape = property(lambda self: self._view.shape)
    dtype = property(lambda self: self._view.dtype)
    size = property(lambda self: self._view.size)
    ndim = property(lambda self: self._view.ndim)
    nbytes = property(lambda self: self._view.nbytes)
    itemsize = property(lambda self: self._view.itemsize)
    strides = property(lambda self: self._view.strides)
    flags = property(lambda self: self._view.flags)

    @property
    def data(self) -> MemoryPointer:
        return MemoryPointer(self._handle, self._range()[0])  # type: ignore[arg-type]

    @property
    def device(self) -> Device:
        return Device(self._sim, self._block.device)

    def __len__(self) -> int:
        return len(self._view)

    def __iter__(self) -> Iterator[ndarray]:
        return (self._derived(v) for v in self._view)

    def __getitem__(self, index: Any) -> ndarray:
        return self._derived(self._view[index])

    def reshape(self, *shape: Any) -> ndarray:
        view = self._view.reshape(*shape)
        if view.flags.owndata:
            msg = "reshape of a non-contiguous simulated array would copy; not modelled"
            raise NotImplementedError(msg)
        return self._derived(view)

    def view(self, dtype: Any) -> ndarray:
        return self._derived(self._view.view(dtype))

    def ravel(self) -> ndarray:
        return self.reshape(-1)

    def __setitem__(self, index: Any, value: Any) -> None:
        target = self[index]
        self._sim._copy(value, target, f"copy into {self._block.name}")

    def copy(self) -> ndarray:
        out = self._sim.empty(self.shape, self.dtype)
        self._sim._copy(self, out, "copy")
        return out

    def sum(self, axis: Any = None, dtype: Any = None) -> ndarray:
        result = np.zeros((1,) * self.ndim, self.dtype).sum(axis=axis, dtype=dtype).dtype
        shape = () if axis is None else tuple(n for i, n in enumerate(self.shape) if i != axis % self.ndim)
        out = self._sim.empty(shape, result)

        def run(src: np.ndarray, dst: np.ndarray) -> None:
            dst[...] = src.sum(axis=axis, dtype=dtype)

        self._sim._launch("sum", [(self, False), (out, True)], run)
        return out

    def get(self, stream: Stream | None = None) -> np.ndarray:
        return self._sim.asnumpy(self, stream)

    def set(self, array: np.ndarray, stream: Stream | None = None) -> None:
        self._sim._upload(np.asarray(array), self, stream)

    # -- what the real GPU would refuse -------------------------------------------------------
    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        msg = "implicit conversion of a (simulated) device array to NumPy; use asnumpy()/get()"
        raise TypeError(msg)

    def __repr__(self) -> str:
        return f"<simulated device array {self.shape} {self.dtype} in {self._block.name}>"


class Simulator:
    """One simulated machine: ``devices`` CUDA devices, one worker running every stream's queue.

    Args:
        devices: how many devices there are (the tests use 2 to check placement on device 1).
        max_lag_s: each operation runs at least 0 and at most this long after it was queued.
        seed: the worker's choices (which stream runs next, the lags).
        kernels: kernel name → ``(twin, reads, writes)``: a NumPy function taking the kernel's
            arguments (arrays as NumPy views, scalars as given) and the argument positions it reads
            and writes.
    """

    def __init__(self, devices: int = 2, max_lag_s: float = 0.003, seed: int = 0,
                 kernels: dict[str, tuple[Callable[..., None], tuple[int, ...], tuple[int, ...]]] | None = None,
                 memory_bytes: int = 80 << 30) -> None:
        self.devices = devices
        self.max_lag_s = max_lag_s
        self.kernels = dict(kernels or {})
        self.memory_bytes = memory_bytes
        self.hazards: list[str] = []
        self._rng = random.Random(seed)
        self._ids = itertools.count(1)
        self._addresses = itertools.count(1)
        self._cv = threading.Condition(threading.RLock())
        self._local = threading.local()
        self._streams: dict[int, Stream] = {}
        self._null: dict[int, Stream] = {}
        self._host: VectorClock = {}
        self._pool: dict[tuple[int, int, int], list[_Block]] = {}
        self._pools = itertools.count(1)  # ids of memory pools made with cuda.MemoryPool (0: the default)
        self._tracked: set[int] = set()  # ids of blocks with accesses not yet known to the host
        self._blocks: dict[int, _Block] = {}
        self._pinned: list[tuple[int, int]] = []  # address ranges of pinned host memory
        self._urgent: set[int] = set()
        self._used_bytes = 0
        self._stop = False
        self.ops_run = 0
        self._worker = threading.Thread(target=self._work, name="simulated-gpu", daemon=True)
        self._worker.start()
        self.xp = self._module()

    # -- the CuPy look-alike ----------------------------------------------------------------------
    def _module(self) -> types.SimpleNamespace:
        sim = self
        runtime = types.SimpleNamespace(
            getDeviceCount=lambda: sim.devices, getDevice=sim._device,
            memGetInfo=lambda: (sim.memory_bytes - sim._used_bytes, sim.memory_bytes),
            deviceSynchronize=sim.device_synchronize,
            getDeviceProperties=lambda i: {"name": b"simulated CUDA device", "totalGlobalMem": sim.memory_bytes})
        cuda = types.SimpleNamespace(
            Stream=lambda null=False, non_blocking=False, priority=0: Stream(sim),
            ExternalStream=lambda ptr, device_id=-1: sim._external(ptr),
            Event=lambda block=False, disable_timing=False, interprocess=False: Event(sim),
            Device=lambda device=None: Device(sim, device),
            Memory=lambda size: Memory(sim, size), MemoryPointer=MemoryPointer,
            alloc_pinned_memory=sim._pinned_memory, get_current_stream=lambda device_id=-1: sim.get_current_stream(),
            MemoryPool=sim._memory_pool, using_allocator=sim._using_allocator, runtime=runtime, is_available=lambda: True)
        names = {name: getattr(np, name) for name in ("uint8", "uint16", "uint32", "int32", "int64", "float32",
                                                      "float64", "bool_")}
        return types.SimpleNamespace(
            __name__="simulated_cupy", cuda=cuda, ndarray=lambda shape, dtype=np.float64, memptr=None, strides=None:
            ndarray(shape, dtype, memptr, strides, _sim=sim), empty=sim.empty, zeros=sim.zeros, asarray=sim.asarray,
            asnumpy=sim.asnumpy, pad=sim.pad, greater=sim.greater, concatenate=sim.concatenate,
            RawKernel=sim._raw_kernel, get_default_memory_pool=sim._default_pool, **names)

    def empty(self, shape: Any, dtype: Any = np.float64) -> ndarray:
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        handle = _Handle(self, self._pool_block(nbytes))
        view = np.ndarray(shape, dtype, buffer=handle.block.storage)
        return ndarray(shape, _sim=self, _view=view, _handle=handle)

    def zeros(self, shape: Any, dtype: Any = np.float64) -> ndarray:
        out = self.empty(shape, dtype)
        self._launch("memset", [(out, True)], lambda dst: dst.fill(0))
        return out

    def asarray(self, obj: Any, dtype: Any = None) -> ndarray:
        if isinstance(obj, ndarray):
            return obj
        if isinstance(obj, np.ndarray):
            out = self.empty(obj.shape, dtype or obj.dtype)
            self._upload(obj.astype(out.dtype, copy=False), out, None)
            return out
        # A DALI tensor (the decoder's output): device memory DALI owns and takes back once no array
        # refers to it; its bytes are final when DALI hands it over.
        host = np.asarray(obj)
        nbytes = host.nbytes
        block = self._new_block(nbytes, "dali", f"DALI's decoded {host.shape} image")
        block.storage[:nbytes] = host.reshape(-1).view(np.uint8)
        handle = _Handle(self, block)
        return ndarray(host.shape, _sim=self, _view=np.ndarray(host.shape, host.dtype, buffer=block.storage),
                       _handle=handle)

    def asnumpy(self, array: Any, stream: Stream | None = None) -> np.ndarray:
        """A device-to-host copy on ``stream`` (the current one), then a wait for that stream."""
        if not isinstance(array, ndarray):
            return np.asarray(array)
        stream = stream or self.get_current_stream()
        out = np.empty(array.shape, array.dtype)
        self._launch("copy to the host", [(array, False)], lambda src: np.copyto(out, src), stream=stream)
        stream.synchronize()
        return out

    def pad(self, array: ndarray, pad_width: Any, constant_values: Any = 0) -> ndarray:
        widths = [(int(a), int(b)) for a, b in pad_width]
        shape = tuple(n + a + b for n, (a, b) in zip(array.shape, widths))
        out = self.empty(shape, array.dtype)
        inner = tuple(slice(a, a + n) for n, (a, _) in zip(array.shape, widths))

        def run(src: np.ndarray, dst: np.ndarray) -> None:
            dst.fill(constant_values)
            dst[inner] = src

        self._launch("pad", [(array, False), (out, True)], run)
        return out

    def concatenate(self, arrays: list[ndarray]) -> ndarray:
        arrays = list(arrays)
        out = self.empty((sum(len(a) for a in arrays), *arrays[0].shape[1:]), arrays[0].dtype)

        def run(*views: np.ndarray) -> None:
            np.concatenate(views[:-1], out=views[-1])

        self._launch("concatenate", [*((a, False) for a in arrays), (out, True)], run)
        return out

    def greater(self, a: ndarray, b: Any, out: ndarray) -> ndarray:
        self._launch("greater", [(a, False), (out, True)],
                     lambda src, dst: np.greater(src, b, out=dst, casting="unsafe"))
        return out

    def _raw_kernel(self, code: str, name: str, **_: Any) -> Callable[..., None]:
        if name not in self.kernels:
            msg = f"no NumPy twin registered for kernel {name!r}"
            raise KeyError(msg)
        twin, reads, writes = self.kernels[name]

        def launch(grid: Any, block: Any, args: tuple[Any, ...], shared_mem: int = 0, stream: Any = None) -> None:
            positions = [i for i, a in enumerate(args) if isinstance(a, ndarray)]
            unknown = [i for i in positions if i not in reads and i not in writes]
            if unknown:
                msg = f"kernel {name!r}: array argument(s) {unknown} are neither read nor written by its twin"
                raise ValueError(msg)

            def run(*views: np.ndarray) -> None:
                values = list(args)
                for i, view in zip(positions, views):
                    values[i] = view
                twin(*values)

            self._launch(f"kernel {name}", [(args[i], i in writes) for i in positions], run, stream=stream)

        return launch

    def _pinned_memory(self, size: int) -> PinnedMemory:
        memory = PinnedMemory(int(size))
        start = np.frombuffer(memory, np.uint8).ctypes.data if size else 0
        with self._cv:
            self._pinned.append((start, start + int(size)))
        return memory

    def _is_pinned(self, array: np.ndarray) -> bool:
        lo = array.ctypes.data
        return any(a <= lo < b for a, b in self._pinned)

    def _external(self, ptr: int) -> Stream:
        with self._cv:
            if ptr in self._streams:
                return self._streams[ptr]
        return Stream(self, f"external stream {ptr:#x}", ptr=ptr)

    # -- current device and stream ------------------------------------------------------------
    def _device(self) -> int:
        return getattr(self._local, "device", 0)

    def _current_streams(self) -> dict[int, Stream]:
        return self._local.__dict__.setdefault("streams", {})

    def get_current_stream(self) -> Stream:
        device = self._device()
        current = self._current_streams().get(device)
        if current is not None:
            return current
        with self._cv:
            if device not in self._null:
                self._null[device] = Stream(self, f"null stream of device {device}", device, ptr=0x100 + device)
            return self._null[device]

    # -- memory -------------------------------------------------------------------------------
    def _new_block(self, nbytes: int, kind: str, name: str) -> _Block:
        with self._cv:
            address = next(self._addresses) * (1 << 40) // _ALIGN * _ALIGN
            block = _Block(name, np.full(max(nbytes, 1), _POISON, np.uint8), self._device(), kind, address)
            self._blocks[id(block)] = block
            self._used_bytes += nbytes
            return block

    def _pool_block(self, nbytes: int) -> _Block:
        """A block from the current allocator's pool, as CuPy's: best fit among the blocks freed on the
        current stream (any larger one will do: CuPy splits it), else a new one."""
        stream = self.get_current_stream()
        key = (getattr(self._local, "pool", 0), self._device(), stream.id)
        with self._cv:
            free = self._pool.get(key, [])
            fits = [b for b in free if b.storage.size >= nbytes]
            if fits:  # handed out again on the stream it was freed to; its history stays, so the new
                block = min(fits, key=lambda b: b.storage.size)  # owner's accesses are checked against the last's
                free.remove(block)
                block.released, block.name = False, f"pool memory of {block.storage.size} bytes (reused for {nbytes})"
                self._used_bytes += block.storage.size
                if not block.pending:  # nothing queued still reads the old bytes: they are garbage now
                    block.storage.fill(_POISON)
                return block
        block = self._new_block(nbytes, "pool", f"pool memory of {nbytes} bytes")
        block.pool_key = key
        return block

    def _memory_pool(self) -> types.SimpleNamespace:
        """``cupy.cuda.MemoryPool()``: a pool of its own; allocate from it under ``using_allocator``."""
        pool_id = next(self._pools)

        def free_all_blocks(stream: Any = None) -> None:
            with self._cv:
                for key in [k for k in self._pool if k[0] == pool_id]:
                    self._pool.pop(key)

        return types.SimpleNamespace(malloc=pool_id, free_all_blocks=free_all_blocks)

    def _default_pool(self) -> types.SimpleNamespace:
        def free_all_blocks(stream: Any = None) -> None:
            with self._cv:
                for key in [k for k in self._pool if k[0] == 0 and (stream is None or k[2] == stream.id)]:
                    self._pool.pop(key)

        return types.SimpleNamespace(free_all_blocks=free_all_blocks)

    @contextlib.contextmanager
    def _using_allocator(self, malloc: Any = None) -> Iterator[None]:
        previous = getattr(self._local, "pool", 0)
        self._local.pool = malloc if isinstance(malloc, int) else 0
        try:
            yield
        finally:
            self._local.pool = previous

    def _release(self, block: _Block) -> None:
        if self._stop or (block.released and block.kind != "pool"):
            return
        if block.kind == "driver" and threading.current_thread() is not self._worker:
            self.device_synchronize()  # cudaFree waits for the device, as CUDA's does
        with self._cv:
            block.released = True
            self._used_bytes -= block.storage.size
            if block.kind == "pool" and block.pool_key is not None:
                self._pool.setdefault(block.pool_key, []).append(block)
                return
            # DALI's views go back to DALI, which may hand them to its next decode at once, on its own
            # stream: the reads queued on them must be known to have run.
            for access in block.accesses:
                if access.clock > self._host.get(access.stream.id, 0):
                    self._hazard(f"{block.name} was released while '{access.op}' on {access.stream} may not have "
                                 "run yet (release it only after an event or a synchronisation says so)")
            block.accesses.clear()
            block.storage.fill(_POISON)

    # -- queued work ----------------------------------------------------------------------------
    def _check_device(self, what: str, device: int) -> None:
        if device != self._device():
            self._hazard(f"{what}: device {device}'s work issued while device {self._device()} is current")

    def _enqueue(self, stream: Stream, name: str, run: Callable[[], None], wait_for: _Op | None = None,
                 accesses: list[tuple[_Block, int, int, bool]] = ()) -> _Op:
        """Queue ``run`` on ``stream``; check ``accesses`` (block, lo, hi, write) against every
        earlier access that is not ordered before this one."""
        with self._cv:
            stream.clock = _join(stream.clock, self._host)
            stream.clock[stream.id] = stream.clock.get(stream.id, 0) + 1
            now = stream.clock[stream.id]
            for block, lo, hi, write in accesses:
                if block.released and block.kind != "pool":
                    self._hazard(f"'{name}' on {stream} uses {block.name} after it was released")
                if block.device != stream.device_id:
                    self._hazard(f"'{name}' on {stream} (device {stream.device_id}) touches {block.name}, "
                                 f"which lives on device {block.device}")
                for a in block.accesses:
                    if (write or a.write) and a.lo < hi and lo < a.hi and a.stream is not stream \
                            and a.clock > stream.clock.get(a.stream.id, 0):
                        kinds = f"{'write' if write else 'read'} after {'write' if a.write else 'read'}"
                        self._hazard(f"{kinds} on {block.name} [{max(lo, a.lo)}, {min(hi, a.hi)}): '{name}' on "
                                     f"{stream} is not ordered after '{a.op}' on {a.stream} (no event, wait or "
                                     "synchronisation between them)")
                block.accesses.append(_Access(name, stream, now, write, lo, hi))
                self._tracked.add(id(block))
            lag = self._rng.uniform(0, self.max_lag_s)
            blocks = tuple(block for block, *_ in accesses)
            for block in blocks:
                block.pending += 1
            op = _Op(name, stream, dict(stream.clock), run, time.monotonic() + lag, wait_for, blocks)
            stream.queue.append(op)
            self._cv.notify_all()
            return op

    def _launch(self, name: str, arrays: list[tuple[ndarray, bool]], run: Callable[..., None],
                stream: Stream | None = None) -> None:
        """Queue ``run(*views)`` on ``stream`` (the current one), the views of ``arrays`` in order;
        each array is ``(array, written)``."""
        stream = stream or self.get_current_stream()
        self._check_device(f"'{name}' on {stream}", stream.device_id)
        views = [a._view for a, _ in arrays]
        blocks = [a._block for a, _ in arrays]

        def execute() -> None:
            for block in blocks:
                if block.released and block.kind != "pool":
                    self._hazard(f"'{name}' on {stream} ran on {block.name} after it was released")
            run(*views)

        self._enqueue(stream, name, execute, accesses=[(a._block, *a._range(), w) for a, w in arrays])

    def _copy(self, source: Any, target: ndarray, name: str) -> None:
        if isinstance(source, ndarray):
            self._launch(name, [(source, False), (target, True)],
                         lambda src, dst: np.copyto(dst, src.reshape(dst.shape)))
        else:  # a host array, or a scalar filling the target (as CuPy broadcasts it)
            host = np.asarray(source)
            if host.size == 1 and target.size != 1:
                host = np.full(target.shape, host.reshape(()), target.dtype)
            self._upload(host, target, None)

    def _upload(self, host: np.ndarray, target: ndarray, stream: Stream | None) -> None:
        """A host-to-device copy: from pinned memory it reads the host bytes when it runs (so the host
        must not rewrite them before); from pageable memory they are staged at once (as CUDA does)."""
        stream = stream or self.get_current_stream()
        pinned = host.size > 0 and self._is_pinned(host)
        source = host if pinned else host.copy()
        expected = source.tobytes() if pinned else b""

        def run(dst: np.ndarray) -> None:
            if pinned and source.tobytes() != expected:
                self._hazard(f"pinned host memory was rewritten before the asynchronous copy from it into "
                             f"{target._block.name} on {stream} ran (wait for the copy's event first)")
            np.copyto(dst, source.reshape(dst.shape), casting="unsafe")

        self._launch("copy from the host", [(target, True)], run, stream=stream)

    # -- the host's view -----------------------------------------------------------------------
    def _host_knows(self, clock: VectorClock) -> None:
        """The host has seen everything before ``clock`` run: later work is ordered after it."""
        self._host = _join(self._host, clock)
        for key in list(self._tracked):
            block = self._blocks.get(key)
            if block is None:
                self._tracked.discard(key)
                continue
            block.accesses = [a for a in block.accesses if a.clock > self._host.get(a.stream.id, 0)]
            if not block.accesses:
                self._tracked.discard(key)

    def _sync(self, stream: Stream) -> None:
        with self._cv:
            target = dict(stream.clock)
            while stream.queue:
                self._urgent.add(stream.id)
                self._cv.wait(0.01)
            self._host_knows(target)

    def device_synchronize(self) -> None:
        with self._cv:
            streams = list(self._streams.values())
        for stream in streams:
            self._sync(stream)

    def _hazard(self, message: str) -> None:
        with self._cv:
            if message not in self.hazards:
                self.hazards.append(message)

    def delay(self, stream: Stream, seconds: float) -> None:
        """Queue ``seconds`` of (simulated) device work on ``stream``: a training step, say. What
        ``stream`` queues afterwards runs no sooner; other streams go on."""
        with self._cv:
            op = self._enqueue(stream, f"{seconds * 1e3:.0f} ms of other work", lambda: None)
            op.ready_at, op.firm = time.monotonic() + seconds, True

    def release_now(self, array: ndarray) -> None:
        """Free ``array``'s memory at once, whoever still refers to it (what code that frees memory
        behind its users' backs does); later work on it is a use after free."""
        self._release(array._block)

    def check(self) -> None:
        """Raise :class:`HazardError` with every hazard seen so far."""
        if self.hazards:
            listed = "\n  ".join(self.hazards[:8])
            more = f"\n  ... and {len(self.hazards) - 8} more" if len(self.hazards) > 8 else ""
            raise HazardError(f"{len(self.hazards)} hazard(s) on the simulated GPU:\n  {listed}{more}")

    # -- the worker --------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cv:
                if self._stop:
                    return
                now = time.monotonic()
                ready = [s for s in self._streams.values() if s.queue and self._runnable(s, now)]
                if not ready:
                    self._cv.wait(0.0005)
                    continue
                stream = self._rng.choice(ready)
                op = stream.queue.popleft()
                try:
                    op.run()
                except Exception as e:  # noqa: BLE001 - a broken twin is a test failure, named
                    self._hazard(f"'{op.name}' on {stream} failed: {e!r}")
                op.done = True
                for block in op.blocks:
                    block.pending -= 1
                self.ops_run += 1
                if not stream.queue:
                    self._urgent.discard(stream.id)
                self._cv.notify_all()

    def _runnable(self, stream: Stream, now: float) -> bool:
        op = stream.queue[0]
        if op.wait_for is not None and not op.wait_for.done:
            return False
        if op.firm:
            return op.ready_at <= now
        return stream.id in self._urgent or op.ready_at <= now or op.wait_for is not None

    def close(self) -> None:
        """Run what is queued, then stop the worker."""
        with contextlib.suppress(Exception):
            self.device_synchronize()
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._worker.join()
