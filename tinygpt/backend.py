"""The one seam between tinygpt and the array libraries.

Devices are named "cpu" (NumPy) and "cuda" (CuPy). This is the only module that imports CuPy, and it
does so lazily, the first time "cuda" is asked for. Everything else asks here for the array module
(`xp`) that goes with an array or a device, so one op body serves both backends.

A device is a small record: its name, its array module and the array type that lives on it. Tests
register a third, strict stand-in device (see tests/strict_xp.py) to prove that no op calls NumPy on
a device array.
"""
from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "Device", "DeviceError", "CudaUnavailableError", "get_device", "default_device", "register_device",
    "get_array_module", "device_of", "to_numpy", "to_device", "is_cuda_available", "scatter_add",
    "synchronize", "manual_seed", "host_rng", "device_rng", "tune_allocator", "cuda_problem",
    "upload", "flag_bad_ids", "raise_device_errors", "peak_device_bytes",
]


class DeviceError(RuntimeError):
    """A device name that is not known, or arrays from two devices mixed in one op."""


class CudaUnavailableError(DeviceError):
    """"cuda" was asked for, but CuPy or a GPU is missing."""


@dataclass
class Device:
    """A place arrays live: `name` ("cpu", "cuda"), its array module `xp`, and that module's array type."""
    name: str
    xp: ModuleType | Any
    array_type: type
    rng: Any = field(default=None, repr=False)  # the device's random generator, made on first use
    error_flag: Any = field(default=None, repr=False)   # int64 [code, value] on the device (flag_bad_ids)
    stager: Any = field(default=None, repr=False)       # pinned host buffers for `upload` (CUDA)

    def __repr__(self) -> str:
        return f"device({self.name!r})"


_DEVICES: dict[str, Device] = {"cpu": Device("cpu", np, np.ndarray)}
_cupy: ModuleType | None = None
_cupy_error: str | None = None


def _import_cupy() -> ModuleType | None:
    """Import CuPy once; remember why it failed so the error can say so."""
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            import cupy  # noqa: the only CuPy import in tinygpt
            _cupy = cupy
        except Exception as e:  # ImportError, or a CUDA library that fails to load
            _cupy_error = f"{type(e).__name__}: {e}"
    return _cupy


def is_cuda_available() -> bool:
    """True when device "cuda" works here: CuPy imports, sees a GPU, compiles and runs a kernel (NVRTC),
    multiplies matrices (cuBLAS) and draws random numbers (cuRAND). Checked once; never raises."""
    return cuda_problem() is None


_UNCHECKED = "unchecked"
_cuda_status: "str | None" = _UNCHECKED      # None: CUDA works; a str: the one line that says why not


def cuda_problem() -> "str | None":
    """Why device "cuda" cannot work in this process, as one line, or None when it works.

    The first call imports CuPy, counts the GPUs and, on the current GPU, compiles and launches a tiny
    kernel (NVRTC), runs a small matmul (cuBLAS) and draws from CuPy's default_rng (cuRAND), then reads the
    results back (a sync, once). CuPy 14 no longer bundles those libraries: a bare `pip install
    cupy-cuda12x` imports and counts GPUs but fails at the first op, and this says so up front. The answer
    is cached for the process."""
    global _cuda_status
    if _cuda_status == _UNCHECKED:
        try:
            _cuda_status = _check_cuda()
        except Exception as e:                  # nothing may escape is_cuda_available
            _cuda_status = f"device 'cuda' could not be checked ({_one_line(e)}); use device 'cpu'"
    return _cuda_status


def _one_line(e: BaseException, limit: int = 300) -> str:
    """'Type: message' on one line, cut to `limit` characters."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


_INSTALL = ('install it with: pip install "tinygpt[cuda]" (CUDA 12, NVIDIA driver >= 525) or '
            '"tinygpt[cuda13]" (CUDA 13, driver >= 580), or use device \'cpu\'; where CuPy is preinstalled, '
            'put it on PYTHONPATH instead of installing a second cupy-cudaXX')


def _check_cuda() -> "str | None":
    cp = _import_cupy()
    if cp is None:
        return f"device 'cuda' needs CuPy, which is not available ({_cupy_error}); {_INSTALL}"
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:
        n, why = 0, f" ({_one_line(e)})"
    else:
        why = ""
    if n == 0:
        return f"device 'cuda' needs an NVIDIA GPU, but CuPy found none{why}; use device 'cpu'"
    return _probe_cuda(cp)


_PROBE_KERNEL = r'extern "C" __global__ void tg_probe(float* x) { x[threadIdx.x] = 2.0f * threadIdx.x; }'


def _probe_cuda(cp: Any) -> "str | None":
    """Run once, on the current GPU, what every training step needs; the first check that fails names its
    library and how to install it (a one-line str), None when all pass."""
    try:
        major = int(cp.cuda.runtime.runtimeGetVersion()) // 1000
    except Exception:
        major = 12
    fix = (f"install CUDA {major}'s libraries with: pip install \"cuda-toolkit[nvrtc,cublas,curand]=={major}.*\" "
           f"(what CuPy's [ctk] extra brings; never a second cupy-cudaXX), or use device 'cpu'")

    def kernel():                               # NVRTC compiles it, the driver loads and launches it
        x = cp.zeros(32, dtype=cp.float32)
        cp.RawKernel(_PROBE_KERNEL, "tg_probe")((1,), (32,), (x,))
        return x.sum()                          # 2 (0 + 1 + ... + 31) = 992

    def matmul():
        a = cp.ones((16, 16), dtype=cp.float32)
        return (a @ a).sum()                    # 16 · 16 · 16 = 4096

    def rng():                                  # what Dropout draws with (backend.device_rng)
        r = cp.random.default_rng(0).random(64, dtype=cp.float32)
        return ((r >= 0) & (r < 1)).sum() + (r.max() > r.min())    # 64 + 1

    checks = (("compile and run a kernel", "NVRTC", kernel, 992.0),
              ("run a matmul", "cuBLAS", matmul, 4096.0),
              ("draw random numbers", "cuRAND", rng, 65.0))
    for what, lib, run, expected in checks:
        try:
            got = run()
            cp.cuda.get_current_stream().synchronize()
            got = float(got)
        except Exception as e:
            return f"device 'cuda': CuPy cannot {what} ({lib}: {_one_line(e)}); {fix}"
        if got != expected:
            return (f"device 'cuda': CuPy's {lib} check gave {got} instead of {expected}; the GPU or its driver "
                    f"is not working; use device 'cpu'")
    return None


def use_gpu(local_rank: int) -> int:
    """Make GPU local_rank (mod the GPUs CuPy sees) this process's, before the CUDA check and before any
    allocation, so each rank of a multi-GPU job opens a context on its own GPU only. Returns its index."""
    cp = _import_cupy()
    if cp is None:
        raise CudaUnavailableError(f"device 'cuda' needs CuPy, which is not available ({_cupy_error}); {_INSTALL}")
    try:
        n = int(cp.cuda.runtime.getDeviceCount())
    except Exception as e:
        raise CudaUnavailableError(f"device 'cuda' needs an NVIDIA GPU, but CuPy found none ({_one_line(e)}); "
                                   "use device 'cpu'") from None
    if n == 0:
        raise CudaUnavailableError("device 'cuda' needs an NVIDIA GPU, but CuPy found none; use device 'cpu'")
    index = int(local_rank) % n
    cp.cuda.Device(index).use()
    return index


def _cuda_device() -> Device:
    problem = cuda_problem()
    if problem is not None:
        raise CudaUnavailableError(problem)
    cp = _import_cupy()
    return Device("cuda", cp, cp.ndarray)


def default_device() -> str:
    """The device used when none is given: $TINYGPT_DEVICE, else "cpu"."""
    return os.environ.get("TINYGPT_DEVICE", "").strip() or "cpu"


def get_device(device: "str | Device | None" = None) -> Device:
    """Turn a name ("cpu", "cuda", "cuda:0"), a Device, or None (the default device) into a Device."""
    if isinstance(device, Device):
        return device
    name = default_device() if device is None else str(device)
    if name == "cuda:0":
        name = "cuda"
    if name not in _DEVICES:
        if name != "cuda":
            raise DeviceError(f"unknown device {name!r}; use 'cpu' or 'cuda'")
        _DEVICES["cuda"] = _cuda_device()
    return _DEVICES[name]


def register_device(name: str, xp: Any, array_type: type) -> Device:
    """Add a device (used by the tests' strict stand-in array module)."""
    _DEVICES[name] = Device(name, xp, array_type)
    return _DEVICES[name]


def device_of(arr: Any) -> Device:
    """The Device an array lives on. NumPy arrays and scalars are on "cpu"."""
    if isinstance(arr, (np.ndarray, np.generic)):
        return _DEVICES["cpu"]
    for dev in _DEVICES.values():
        if isinstance(arr, dev.array_type):
            return dev
    # A CuPy array made before tinygpt used "cuda": recognise it without importing CuPy (if it is not in
    # sys.modules, no CuPy array can exist), and register the device (which checks it, once).
    cp = sys.modules.get("cupy")
    if "cuda" not in _DEVICES and cp is not None and isinstance(getattr(cp, "ndarray", None), type) \
            and isinstance(arr, cp.ndarray):
        return get_device("cuda")
    return _DEVICES["cpu"]


def get_array_module(*arrays: Any) -> Any:
    """The array module (numpy, cupy, ...) for these arrays; NumPy when none is a device array."""
    for a in arrays:
        if not isinstance(a, (np.ndarray, np.generic)) and not isinstance(a, (int, float, bool)):
            dev = device_of(a)
            if dev.name != "cpu":
                return dev.xp
    return np


def to_numpy(arr: Any) -> np.ndarray:
    """Copy a device array to a host NumPy array (a no-op for NumPy arrays). This syncs the device, so it
    also raises the error an op recorded on the device since the last read (see `flag_bad_ids`)."""
    if isinstance(arr, np.ndarray):
        return arr
    dev = device_of(arr)
    if dev.name == "cpu":
        return np.asarray(arr)
    out = dev.xp.asnumpy(arr)
    if dev.error_flag is not None:
        raise_device_errors(dev)
    return out


def to_device(arr: Any, device: "str | Device | None" = None) -> Any:
    """Put an array (NumPy or device) on `device`, copying only when it is not already there."""
    dev = get_device(device)
    src = device_of(arr)
    if src is dev:
        return arr
    host = to_numpy(arr)
    return host if dev.name == "cpu" else dev.xp.asarray(host)


def upload(host: np.ndarray, device: "str | Device | None" = None) -> Any:
    """Copy a host array to `device` without making the host wait (the batch upload of every step).

    On CUDA the array goes through a pinned (page-locked) staging buffer and an asynchronous copy queued
    on the current stream, so Python goes on queueing the step's kernels while the copy waits its turn;
    a plain `cupy.asarray` of pageable memory would wait for all queued work first. A staging buffer is
    reused once its copy has finished (an event query, not a wait); the host waits only when the GPU is
    several steps behind (`_Stager.DEPTH`). On other devices it is `to_device`."""
    dev = get_device(device)
    if dev.name != "cuda":
        return to_device(host, dev)
    if dev.stager is None:
        dev.stager = _Stager(dev.xp)
    return dev.stager.upload(np.ascontiguousarray(host))


class _Stager:
    """A few pinned host buffers, each with the event of its last copy (CUDA's pinned-memory pattern)."""
    DEPTH = 4                   # copies in flight at most (steps the host may run ahead of the GPU)

    def __init__(self, cp: Any):
        self.cp = cp
        self.slots: list = []   # [pinned uint8 buffer (NumPy view), event of its last copy or None]

    def _slot(self, nbytes: int) -> list:
        free = [s for s in self.slots if s[1] is None or s[1].done]        # cudaEventQuery: no wait
        if not free and len(self.slots) >= self.DEPTH:
            oldest = self.slots.pop(0)
            oldest[1].synchronize()          # the GPU is DEPTH copies behind: wait for the oldest
            self.slots.append(oldest)
            free = [oldest]
        if not free:
            self.slots.append([None, None])
            free = [self.slots[-1]]
        slot = free[0]
        self.slots = [s for s in self.slots if s is not slot] + [slot]    # in the order of the copies
        if slot[0] is None or slot[0].nbytes < nbytes:
            mem = self.cp.cuda.alloc_pinned_memory(max(nbytes, 1))     # as cupyx.empty_pinned does
            slot[0] = np.ndarray((max(nbytes, 1),), dtype=np.uint8, buffer=mem)
        return slot

    def upload(self, host: np.ndarray) -> Any:
        slot = self._slot(host.nbytes)
        staged = slot[0][:host.nbytes].view(host.dtype).reshape(host.shape)
        staged[...] = host                   # host -> pinned: a memcpy on the CPU
        out = self.cp.empty(host.shape, dtype=host.dtype)
        stream = self.cp.cuda.get_current_stream()
        out.set(staged, stream=stream)       # pinned -> device, asynchronous on the stream
        event = self.cp.cuda.Event(block=False, disable_timing=True)
        event.record(stream)
        slot[1] = event
        return out


# ---------------------------------------------------------------------------------------------------
# Errors found on the device. An op that must refuse bad input (an embedding id or a cross-entropy target
# outside [0, V)) cannot raise on a GPU without reading a value back, which would make the host wait in
# the middle of every step. Instead it records the first bad value in a small device array (the device's
# error flag); reading any device value through tinygpt (to_numpy: loss.item(), .numpy(), printing, the
# trainer's log line) reads the flag too and raises the same IndexError the CPU raises at once.

_ERROR_MESSAGES: list = []              # code - 1 -> message template with {} for the bad value


def flag_bad_ids(ids: Any, n: int, message: str, ignore_index: "int | None" = None,
                 device: "str | Device | None" = None) -> None:
    """Record on `device` (default: the ids'), without a sync, the first id outside [0, n) (ids equal to ignore_index
    excepted) when no earlier error is pending. `message` is the IndexError's text, with {} where the bad
    id goes; it is raised by the next `to_numpy` of an array of that device, or `raise_device_errors`.
    On CUDA with the fused kernels on, one kernel launch (tinygpt/cuda/kernels.py); elsewhere a few
    array ops."""
    dev = device_of(ids) if device is None else get_device(device)
    if dev.name == "cpu":
        raise DeviceError("flag_bad_ids is for device arrays; on the CPU check and raise at once")
    if ids.size == 0:
        return
    if message not in _ERROR_MESSAGES:
        _ERROR_MESSAGES.append(message)
    code = _ERROR_MESSAGES.index(message) + 1
    xp = dev.xp
    if dev.error_flag is None:
        dev.error_flag = xp.zeros(2, dtype=xp.int64)
    flag = dev.error_flag
    if dev.name == "cuda":
        from tinygpt import kernels                          # late: tinygpt.kernels imports this module
        if kernels.fused(dev) == "cuda":
            from tinygpt.cuda import kernels as cuda_kernels
            cuda_kernels.flag_bad_ids(flag, ids, n, ignore_index, code)
            return
    t = ids.reshape(-1)
    bad = (t < 0) | (t >= n)                                 # (N,) bool
    if ignore_index is not None:
        bad = bad & (t != ignore_index)
    first = bad.argmax()                                     # 0-d: the first bad position (0 if none)
    hit = bad[first] & (flag[0] == 0)                        # 0-d bool: a new error
    flag[1] = xp.where(hit, t[first].astype(xp.int64), flag[1])
    flag[0] = xp.where(hit, code, flag[0])


def raise_device_errors(device: "str | Device | None" = None) -> None:
    """Raise the IndexError an op recorded on `device` (flag_bad_ids), and clear it. Reads two int64
    values back (a sync) when the device has a flag; nothing to do otherwise, and never on the CPU."""
    dev = get_device(device)
    if dev.error_flag is None:
        return
    code, value = (int(v) for v in dev.xp.asnumpy(dev.error_flag))
    if code:
        dev.error_flag[...] = 0
        raise IndexError(_ERROR_MESSAGES[code - 1].format(value))


def scatter_add(xp: Any, target: Any, indices: Any, values: Any) -> None:
    """target[indices] += values, where repeated indices all add up (unlike plain fancy-index +=)."""
    if xp is np:
        np.add.at(target, indices, values)
    elif hasattr(xp, "add") and hasattr(xp.add, "at"):
        xp.add.at(target, indices, values)
    else:  # older CuPy
        import cupyx  # noqa: part of CuPy
        cupyx.scatter_add(target, indices, values)


def synchronize(device: "str | Device | None" = None) -> None:
    """Wait for queued device work to finish (a no-op on the CPU). Call before reading a clock."""
    dev = get_device(device)
    if dev.name == "cuda":
        dev.xp.cuda.get_current_stream().synchronize()


def peak_device_bytes(run: Any, device: "str | Device | None" = None) -> "int | None":
    """Call run() and return the most bytes of device memory that arrays held at once meanwhile (CUDA: the
    default CuPy pool's used bytes, not its cache, read by a memory hook after every allocation, so a peak
    inside a step counts); arrays alive before the call count too. None off CUDA (run() still runs)."""
    dev = get_device(device)
    if dev.name != "cuda":
        run()
        return None
    cp = dev.xp
    pool = cp.get_default_memory_pool()
    synchronize(dev)
    peak = [pool.used_bytes()]

    class PeakHook(cp.cuda.memory_hook.MemoryHook):
        name = "tinygpt_peak_device_bytes"

        def malloc_postprocess(self, **kwargs: Any) -> None:     # after the pool handed out a block
            peak[0] = max(peak[0], pool.used_bytes())

    with PeakHook():
        run()
        synchronize(dev)
    return max(peak[0], pool.used_bytes())


def device_normal_cdf(x: Any) -> Any:
    """Φ(x), the standard normal CDF, of an array on a GPU device: CuPy keeps it in cupyx.scipy.special
    (`ndtr`); a device registered by the tests brings its own `xp.normal_cdf`. NumPy has none: the CPU's
    is written out in tinygpt/ops/activations.py, `normal_cdf`, which calls this for device arrays."""
    dev = device_of(x)
    if dev.name == "cuda":
        import cupyx.scipy.special  # noqa: part of CuPy
        return cupyx.scipy.special.ndtr(x)
    return dev.xp.normal_cdf(x)


# ---------------------------------------------------------------------------------------------------
# Random numbers. One seed drives the host generator (init, dropout on the CPU, sampling) and each
# device's generator, so `manual_seed(s)` makes a run repeatable.

_SEED = 1337
_HOST_RNG = np.random.default_rng(_SEED)


def manual_seed(seed: int) -> None:
    """Seed every generator tinygpt uses: the host one and those of devices already in use."""
    global _HOST_RNG, _SEED
    _SEED = int(seed)
    _HOST_RNG = np.random.default_rng(_SEED)
    for dev in _DEVICES.values():
        dev.rng = None  # re-made from _SEED on next use


def host_rng() -> np.random.Generator:
    """The host NumPy Generator (parameter init, sampling)."""
    return _HOST_RNG


def device_rng(device: "str | Device | None" = None) -> Any:
    """The random generator of a device: a NumPy Generator on the CPU, a CuPy one on "cuda"."""
    dev = get_device(device)
    if dev.name == "cpu":
        return _HOST_RNG
    if dev.rng is None:
        dev.rng = dev.xp.random.default_rng(_SEED)
    return dev.rng


def get_rng_state() -> dict:
    """The host generator's state as plain JSON-able data (for checkpoints)."""
    return _HOST_RNG.bit_generator.state


def set_rng_state(state: dict) -> None:
    _HOST_RNG.bit_generator.state = state


# ---------------------------------------------------------------------------------------------------
# glibc hands large blocks (>128 KiB by default) straight to mmap and back with munmap on free, so each
# training step page-faults its big temporaries in again. Raising the thresholds keeps them in the heap.
# It changes the whole process's allocator, so it is not done on import: the trainer and the benchmark
# call it (a forked worker inherits it).

def tune_allocator() -> bool:
    """Keep freed memory in the heap for the next training step (glibc only: page faults 14,846 -> 31 per
    step of the cpu preset, BENCHMARKS.md). Set TINYGPT_NO_MALLOPT=1 to skip it. True when it was applied."""
    if not sys.platform.startswith("linux") or os.environ.get("TINYGPT_NO_MALLOPT"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        # up to 1 GiB blocks from the heap; glibc versions that cap the threshold at 32 MiB refuse it
        if not libc.mallopt(M_MMAP_THRESHOLD, 1 << 30):
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)     # and keep freed memory for the next step
        return True
    except Exception:  # not glibc (musl, ...): nothing to tune
        return False
