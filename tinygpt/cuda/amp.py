"""Faster matmuls on CUDA at lower precision, and the dynamic loss scaling that float16 needs.

    set_matmul_precision("float32")    exact float32 GEMMs (the default)
    set_matmul_precision("tf32")       float32 in and out, tensor cores multiply with a 10-bit mantissa
                                       (Ampere or newer); the same as starting Python with CUPY_TF32=1
    set_matmul_precision("float16")    inputs cast to float16 for the GEMM (float32 accumulation in cuBLAS,
                                       float16 result cast back to float32); use a LossScaler
    set_matmul_precision("bfloat16")   the same with bfloat16 (float32's range: no loss scaling needed);
                                       needs a CuPy that has bfloat16 arrays (ml_dtypes)

Only the GEMMs of Linear and MatMul change (ops/linalg.py, through tinygpt.kernels.matmul); parameters,
activations, gradients and optimizer state stay float32. On the CPU every setting is plain float32.

Why loss scaling with float16: float16 keeps about 3 significant digits and nothing below ~6e-8, so small
gradients (activation gradients of a late layer are often ~1e-6 to 1e-9) round to zero in the cast. Scaling
the loss by S (say 2^16) scales every gradient by S, which lifts them into float16's range; the optimizer
must then see grads / S. If S is too large a product overflows float16 (> 65504) and the gradients hold
inf or NaN: that step is skipped and S halved. After `growth_interval` good steps S doubles again.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np  # for a host dtype only

from tinygpt import backend

PRECISIONS = ("float32", "tf32", "float16", "bfloat16")
CAST_PRECISIONS = ("float16", "bfloat16")          # the ones `matmul` casts the operands for
_precision = "tf32" if os.environ.get("CUPY_TF32", "0").strip() not in ("", "0") else "float32"


def get_matmul_precision() -> str:
    return _precision


def set_matmul_precision(precision: str) -> None:
    """Pick the GEMM precision on CUDA: "float32", "tf32", "float16" or "bfloat16" (see the module doc)."""
    global _precision
    if precision not in PRECISIONS:
        raise ValueError(f"set_matmul_precision: {precision!r} is not one of {PRECISIONS}")
    _precision = precision
    _set_tf32(precision == "tf32")


def _set_tf32(on: bool) -> None:
    """CuPy reads $CUPY_TF32 once, at its first float32 GEMM; after that only its compute-type setter
    (not public API, so it is looked up defensively) changes it."""
    if on:
        os.environ["CUPY_TF32"] = "1"
    elif os.environ.get("CUPY_TF32", "0").strip() not in ("", "0"):
        os.environ["CUPY_TF32"] = "0"
    if not backend.is_cuda_available():
        return
    try:
        linalg = backend.get_device("cuda").xp._core._routines_linalg
        kind = linalg.COMPUTE_TYPE_TF32 if on else linalg.COMPUTE_TYPE_DEFAULT
        linalg.set_compute_type(np.float32, kind)
    except AttributeError:  # another CuPy layout: the environment variable still works before first use
        pass


def _low_dtype(xp: Any, precision: str) -> Any:
    if precision == "float16":
        return xp.float16
    try:
        import ml_dtypes  # noqa: the NumPy bfloat16 dtype that CuPy's bfloat16 arrays use
        return ml_dtypes.bfloat16
    except ImportError:
        raise RuntimeError("matmul precision 'bfloat16' needs the ml_dtypes package and a CuPy with "
                           "bfloat16 arrays; use 'float16' (with a LossScaler) or 'tf32'") from None


def matmul(a: Any, b: Any) -> Any:
    """a @ b on raw arrays at the chosen precision. float32 CUDA operands with "float16"/"bfloat16" are cast
    down for the GEMM and the product cast back up; everything else is exactly `a @ b`."""
    if _precision in ("float32", "tf32") or a.dtype != b.dtype or a.dtype.name != "float32":
        return a @ b
    dev = backend.device_of(a)
    if dev.name != "cuda":
        return a @ b
    low = _low_dtype(dev.xp, _precision)
    return (a.astype(low) @ b.astype(low)).astype(a.dtype)


class LossScaler:
    """Dynamic loss scaling (for matmul precision "float16"):

        scaler = LossScaler()
        loss = model(x, y)
        scaler.scale_loss(loss).backward()      # gradients are S times too large
        scaler.step(optimizer)                  # unscale, skip on inf/NaN, else optimizer.step(); adapt S
        optimizer.zero_grad()

    To clip gradients, call `scaler.unscale_(optimizer)` first, then clip, then `scaler.step(optimizer)`.
    The inf/NaN check is done on the device (one `isfinite().all()` per gradient, combined into one flag);
    `step` reads that single flag, so with loss scaling each step waits for the GPU once.
    """

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True):
        if not init_scale > 0 or not growth_factor > 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError(f"LossScaler: need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and "
                             f"growth_interval >= 1, got {init_scale}, {growth_factor}, {backoff_factor}, "
                             f"{growth_interval}")
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.enabled = enabled
        self.good_steps = 0          # finite steps since the scale last changed
        self.skipped_steps = 0       # total steps skipped for inf/NaN gradients
        self._found_inf = None       # device flag of the current step, set by unscale_

    def scale_loss(self, loss: Any) -> Any:
        """loss · S (a Tensor op, so backward() carries the scale into every gradient)."""
        return loss * self.scale if self.enabled else loss

    def unscale_(self, optimizer: Any) -> Any:
        """Divide every gradient by S (new arrays: grads may be read-only) and return the device flag
        "some gradient is inf or NaN" (0-d bool array; not read here). Idempotent within a step."""
        if self._found_inf is not None or not self.enabled:
            return self._found_inf
        flags = []
        for p in _params(optimizer):
            if p.grad is None:
                continue
            g = p.grad * p.grad.dtype.type(1.0 / self.scale)
            p.grad = g
            flags.append(p.device.xp.isfinite(g).all())
        if flags:
            xp = backend.get_array_module(flags[0])
            self._found_inf = ~xp.stack(flags).all()
        return self._found_inf

    def step(self, optimizer: Any) -> bool:
        """optimizer.step() unless a gradient is inf/NaN; then adapt S. True when the step was taken."""
        if not self.enabled:
            optimizer.step()
            return True
        found = self.unscale_(optimizer)
        self._found_inf = None
        if found is not None and bool(found):   # the one host read of the step
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped_steps += 1
            return False
        optimizer.step()
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps,
                "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "enabled": self.enabled}

    def load_state_dict(self, d: dict) -> None:
        self.scale, self.good_steps = float(d["scale"]), int(d["good_steps"])
        self.skipped_steps = int(d.get("skipped_steps", 0))
        self.growth_factor, self.backoff_factor = float(d["growth_factor"]), float(d["backoff_factor"])
        self.growth_interval, self.enabled = int(d["growth_interval"]), bool(d["enabled"])


def _params(optimizer: Any) -> Iterable[Any]:
    for group in optimizer.param_groups:
        yield from group["params"]
