"""The one place where CPU and GPU mode differ: array module, DALI device names, streams, events.

Everything downstream asks a :class:`Backend` instead of branching on the device, so the CPU and GPU
paths are the same code (ARCHITECTURE.md, invariant 7). CuPy is imported only when GPU mode is chosen.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import types
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from ..options import Device

__all__ = ["Backend", "DeviceArray", "DeviceUnavailableError", "HostArray", "cuda_available", "resolve_backend"]

HostArray: TypeAlias = npt.NDArray[Any]
# An array on the sampler's device: numpy.ndarray in CPU mode, cupy.ndarray in GPU mode (CuPy ships
# no type information, so the checker sees this alias as Any).
DeviceArray: TypeAlias = Any

log = logging.getLogger(__name__)


class DeviceUnavailableError(RuntimeError):
    """``device="gpu"`` was asked for where no usable GPU is: CuPy missing, no CUDA device, no driver."""


def _import_cupy() -> types.ModuleType | None:
    try:
        import cupy  # optional: GPU mode only
    except ImportError:
        return None
    return cupy


def cuda_available() -> bool:
    """True when CuPy is installed and sees at least one CUDA device."""
    cupy = _import_cupy()
    if cupy is None:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no driver, no device: all mean "no GPU"
        return False


@dataclass(frozen=True)
class Backend:
    """Array module and DALI names for one device mode.

    Attributes:
        device: ``Device.CPU`` or ``Device.GPU`` (never ``AUTO``).
        xp: ``numpy`` or ``cupy``.
        decoder_device: DALI ``decoders.image`` device: ``"mixed"`` (nvJPEG) or ``"cpu"``.
        op_device: DALI device of data after decoding: ``"gpu"`` or ``"cpu"``.
        dali_device_id: ``device_id`` for DALI pipelines (``None`` = CPU-only pipeline).
        device_id: the CUDA device (GPU mode) every array, stream and event of the sampler lives
            on. Each is made with that device current, whichever device the calling thread has
            current (CuPy allocates on the current device, not on the one a stream belongs to).
    """

    device: Device
    xp: Any
    decoder_device: str
    op_device: str
    dali_device_id: int | None
    device_id: int = 0

    @property
    def is_gpu(self) -> bool:
        return self.device is Device.GPU

    def on_device(self) -> contextlib.AbstractContextManager:
        """Make the sampler's CUDA device current in this thread (GPU); no-op on CPU."""
        return self.xp.cuda.Device(self.device_id) if self.is_gpu else contextlib.nullcontext()

    def new_stream(self) -> Any:
        """A CUDA stream for a producer thread (GPU) or ``None`` (CPU)."""
        if not self.is_gpu:
            return None
        with self.on_device():
            return self.xp.cuda.Stream(non_blocking=True)

    @property
    def asynchronous(self) -> bool:
        """Whether copies into the arena may still be pending when the call returns (GPU)."""
        return self.is_gpu

    def use(self, stream: Any) -> contextlib.AbstractContextManager:
        """Make ``stream`` current (and the device active) in this thread; no-op on CPU."""
        if stream is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(self.on_device())
        stack.enter_context(stream)
        return stack

    @staticmethod
    def synchronize(stream: Any) -> None:
        """Block until all work queued on ``stream`` is done (no-op on CPU)."""
        if stream is not None:
            stream.synchronize()

    def record(self, stream: Any) -> Any:
        """A CUDA event recorded on ``stream`` now (GPU): later work that waits on it runs after
        everything queued on ``stream`` so far. ``None`` on CPU, where work is done when it returns."""
        if stream is None:
            return None
        with self.on_device():  # an event belongs to the device current when it is made
            event = self.xp.cuda.Event(block=False, disable_timing=True)
            event.record(stream)
        return event

    def current_stream(self) -> Any:
        """The calling thread's current CuPy stream on the sampler's device (GPU), ``None`` on CPU."""
        if not self.is_gpu:
            return None
        with self.on_device():
            return self.xp.cuda.get_current_stream()

    def empty_device(self, shape: tuple[int, ...] | int, dtype: Any, pool: Any = None) -> DeviceArray:
        """An uninitialised array on the sampler's device: from CuPy's default pool, or from ``pool``
        (:meth:`memory_pool`) when given, whose memory nothing else is handed (GPU)."""
        if not self.is_gpu:
            return np.empty(shape, dtype)
        with self.on_device(), self.xp.cuda.using_allocator(pool.malloc) if pool is not None else contextlib.nullcontext():
            return self.xp.empty(shape, dtype)

    def free_pool_blocks(self, stream: Any) -> None:
        """Return the free memory CuPy's default pool keeps for ``stream`` to the device (GPU; the
        stream is about to go, and memory it kept would count as used to the next sampler's plan)."""
        if self.is_gpu and stream is not None:
            with self.on_device():
                self.xp.get_default_memory_pool().free_all_blocks(stream=stream)

    def memory_pool(self) -> Any:
        """A CuPy memory pool of its own (GPU; ``None`` on the CPU): memory freed into it goes to no
        other allocation than those made from it."""
        return self.xp.cuda.MemoryPool() if self.is_gpu else None

    @staticmethod
    def wait(stream: Any, event: Any) -> None:
        """Make ``stream`` wait on the GPU for ``event`` (no host blocking); no-op on CPU."""
        if stream is not None and event is not None:
            stream.wait_event(event)

    def pinned(self, shape: tuple[int, ...], dtype: Any) -> HostArray:
        """A host array in page-locked memory (GPU: asynchronous uploads from it); plain on CPU."""
        if not self.is_gpu:
            return np.empty(shape, dtype)
        count = int(np.prod(shape))
        memory = self.xp.cuda.alloc_pinned_memory(count * np.dtype(dtype).itemsize)
        return np.frombuffer(memory, dtype, count).reshape(shape)

    def empty(self, nbytes: int) -> DeviceArray:
        """One flat ``uint8`` buffer of ``nbytes`` on this device.

        On the host it is an anonymous mapping advised to use transparent huge pages where the
        kernel allows it (copies of decoded images into it are faster than into 4 KiB pages; see
        benchmarks/RESULTS.md). Pages are committed as the cache first fills them.
        """
        if self.is_gpu:  # straight from the driver, not CuPy's pool: freed to the device when dropped
            with self.on_device():
                memory = self.xp.cuda.Memory(nbytes)
                return self.xp.ndarray((nbytes,), self.xp.uint8, self.xp.cuda.MemoryPointer(memory, 0))
        buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        with contextlib.suppress(AttributeError, OSError):  # no THP on this kernel: plain pages
            buffer.madvise(mmap.MADV_HUGEPAGE)
        return np.frombuffer(buffer, dtype=np.uint8)

    def as_array(self, dali_tensor: Any) -> DeviceArray:
        """A view of one DALI tensor (``TensorCPU``/``TensorGPU``) as an ``xp`` array (no copy)."""
        with self.on_device():
            return self.xp.asarray(dali_tensor)

    def free_bytes(self) -> int:
        """Memory an arena could take now: free GPU memory, or available host RAM (``MemAvailable``)."""
        if self.is_gpu:
            with self.on_device():
                return int(self.xp.cuda.runtime.memGetInfo()[0])
        try:  # what the kernel can give without swapping (free pages and reclaimable caches)
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))

    def to_host(self, array: DeviceArray) -> HostArray:
        """A host copy (GPU: made on the calling thread's current stream of the sampler's device,
        which must already be ordered after the work that wrote ``array``)."""
        if not self.is_gpu:
            return np.asarray(array)
        with self.on_device():
            return self.xp.asnumpy(array)


def resolve_backend(device: Device | str, device_id: int = 0, from_local_rank: bool = False) -> Backend:
    """Pick the backend for ``device``; ``"auto"`` means GPU when one is usable, else CPU.

    ``from_local_rank``: ``device_id`` is the launcher's ``LOCAL_RANK`` rather than the user's choice.
    Launchers that give each rank its own visible GPU (``CUDA_VISIBLE_DEVICES`` per rank) make the
    local rank larger than the visible device count; the rank then takes ``local_rank % count``.
    """
    device = Device(device)
    if device is Device.AUTO:
        device = Device.GPU if cuda_available() else Device.CPU
        log.info("device='auto' resolved to %r", device.value)
    if device is Device.GPU:
        cupy = _import_cupy()
        if cupy is None:
            msg = ("device='gpu' needs CuPy: pip install 'dali-patches[cuda13]' (NVIDIA driver R580 or newer) or "
                   "'dali-patches[cuda12]' (CUDA 12 drivers), or use device='cpu'")
            raise DeviceUnavailableError(msg)
        if not cuda_available():
            msg = "device='gpu' but CuPy sees no CUDA device; check the driver or use device='cpu'"
            raise DeviceUnavailableError(msg)
        count = cupy.cuda.runtime.getDeviceCount()
        if device_id >= count and from_local_rank:
            log.info("LOCAL_RANK=%d but %d CUDA device(s) are visible: using device %d", device_id, count,
                     device_id % count)
            device_id %= count
        if device_id >= count:
            msg = f"{device_id=} but only {count} CUDA device(s) are visible; pass device_id < {count}"
            raise ValueError(msg)
        return Backend(Device.GPU, cupy, "mixed", "gpu", device_id, device_id)
    return Backend(Device.CPU, np, "cpu", "cpu", None)
