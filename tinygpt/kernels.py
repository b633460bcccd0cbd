"""The one switch for tinygpt's fused kernels, and the one question every fused op asks.

Every op that has a fast kernel keeps its plain reference math too, written first, with shapes in comments
(tinygpt/ops/activations.py, ops/nn.py, ops/attention.py, optim/adam.py). A short delegation below the
reference hands the same math to a kernel when `fused` says so:

    "cpu"    tinygpt/cpu_kernels.py: cache-blocked, threaded NumPy (GELU, layer norm, attention's softmax,
             embedding backward, AdamW)
    "cuda"   tinygpt/cuda/kernels.py: CUDA kernels through CuPy (GELU, layer norm, softmax, attention's
             softmax, cross-entropy, Adam/AdamW)
    None     the reference math, on any device

Turn every kernel off, CPU and CUDA alike, to read, step through or check the reference math:

    TINYGPT_KERNELS=reference python train.py       # read when tinygpt is imported
    with tinygpt.kernels.disabled(): ...            # in code
    tinygpt.kernels.set_enabled(False)              # until set_enabled(True); set_enabled(None) re-reads
                                                    # the environment variable

TINYGPT_KERNELS=fused (or unset) is the default. Results differ between the two only by float rounding.

Every GEMM goes through `matmul` here too: it is `a @ b`, except on CUDA at a reduced matmul precision
(tinygpt.cuda.set_matmul_precision, docs/GPU.md).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import numpy as np

from tinygpt import cpu_linear
from tinygpt.cuda import amp
from tinygpt.cuda.sources import SUPPORTED_DTYPES

__all__ = ["fused", "enabled", "set_enabled", "disabled", "matmul", "ENV"]

ENV = "TINYGPT_KERNELS"
_VALUES = {"fused": True, "reference": False}


def _from_env() -> tuple[bool | None, str]:
    """(on?, error): on is None when the variable holds something else; the error says what to set."""
    raw = os.environ.get(ENV, "")
    value = raw.strip().lower() or "fused"
    if value in _VALUES:
        return _VALUES[value], ""
    return None, f"{ENV}={raw!r} is not a known value; set it to 'fused' (the default) or 'reference'"


# True: fused kernels where they apply. False: reference math everywhere. None: the environment variable
# holds an unknown value, and the first op that asks raises (so the `tinygpt` command reports it in one
# line rather than failing at import with a traceback).
_enabled, _env_error = _from_env()


def enabled() -> bool:
    """Do fused kernels run (where they apply)?"""
    if _enabled is None:
        raise ValueError(_env_error)
    return _enabled


def set_enabled(flag: bool | None) -> None:
    """True/False: fused kernels on/off for every op, on every device. None: back to $TINYGPT_KERNELS."""
    global _enabled, _env_error
    _enabled, _env_error = _from_env() if flag is None else (bool(flag), "")


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """`with kernels.disabled():` runs the reference math of every op, e.g. to compare it with a kernel."""
    global _enabled
    old, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = old


def fused(device: Any, *arrays: Any) -> str | None:
    """Which kernels an op on `device` over `arrays` should use: "cpu", "cuda", or None (the reference).

    "cpu" when the kernels are on, the device is the CPU and every array is a NumPy float array;
    "cuda" when they are on, the device is "cuda" and every array is float16, float32 or float64.
    An op adds its own conditions (softmax kernels work on the last axis only, say) with `and`.
    """
    if not _enabled:
        if _enabled is None:
            raise ValueError(_env_error)
        return None
    name = getattr(device, "name", device)
    if name == "cpu":
        if all(isinstance(a, np.ndarray) and a.dtype.kind == "f" for a in arrays):
            return "cpu"
    elif name == "cuda":
        if all(getattr(getattr(a, "dtype", None), "name", None) in SUPPORTED_DTYPES for a in arrays):
            return "cuda"
    return None


def matmul(a: Any, b: Any) -> Any:
    """a @ b on raw arrays: every GEMM of Linear and MatMul (ops/linalg.py).

    On CUDA with set_matmul_precision("float16" or "bfloat16"), tinygpt/cuda/amp.py casts the float32
    operands down for the GEMM and the product back up. On the CPU with the kernels on, a big product is
    cut into row blocks that the CPU's threads compute at once (tinygpt/cpu_linear.py).
    """
    if amp.get_matmul_precision() in amp.CAST_PRECISIONS:
        return amp.matmul(a, b)
    if fused("cpu", a, b):                  # big products by row blocks over the CPU's threads
        return cpu_linear.matmul(a, b)
    return a @ b
