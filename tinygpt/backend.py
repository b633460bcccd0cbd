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
    "synchronize", "manual_seed", "host_rng", "device_rng", "tune_allocator",
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
    """True when CuPy imports and sees at least one GPU. Never raises."""
    cp = _import_cupy()
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _cuda_device() -> Device:
    cp = _import_cupy()
    if cp is None:
        raise CudaUnavailableError(
            f"device 'cuda' needs CuPy, which is not available ({_cupy_error}); "
            "install it with: pip install \"tinygpt[cuda]\", or use device 'cpu'")
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:
        n, why = 0, f" ({type(e).__name__}: {e})"
    else:
        why = ""
    if n == 0:
        raise CudaUnavailableError(
            f"device 'cuda' needs an NVIDIA GPU, but CuPy found none{why}; use device 'cpu'")
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
    """Copy a device array to a host NumPy array (a no-op for NumPy arrays). This syncs the device."""
    if isinstance(arr, np.ndarray):
        return arr
    dev = device_of(arr)
    if dev.name == "cpu":
        return np.asarray(arr)
    return dev.xp.asnumpy(arr)


def to_device(arr: Any, device: "str | Device | None" = None) -> Any:
    """Put an array (NumPy or device) on `device`, copying only when it is not already there."""
    dev = get_device(device)
    src = device_of(arr)
    if src is dev:
        return arr
    host = to_numpy(arr)
    return host if dev.name == "cpu" else dev.xp.asarray(host)


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


def device_normal_cdf(x: Any) -> Any:
    """Φ(x), the standard normal CDF, of an array on a GPU device: CuPy keeps it in cupyx.scipy.special
    (`ndtr`); a device registered by the tests brings its own `xp.normal_cdf`. NumPy has none: the CPU's
    is written out in tinygpt/ops/activations.py, `normal_cdf`, which calls this for device arrays."""
    dev = device_of(x)
    if dev.name == "cuda":
        import cupyx.scipy.special  # noqa: part of CuPy
        return cupyx.scipy.special.ndtr(x)
    return dev.xp.normal_cdf(x)


def normal_cdf(x: Any) -> Any:
    """Moved to tinygpt.ops.activations.normal_cdf; this forwards to it for older callers."""
    from tinygpt.ops.activations import normal_cdf as moved
    return moved(x)


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
