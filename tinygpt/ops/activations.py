"""Activations and the softmax family.

GELU is the exact erf form by default, GELU(x) = x Φ(x) = ½x(1 + erf(x/√2)), or the tanh
approximation ½x(1 + tanh(√(2/π)(x + 0.044715x³))) with approximate="tanh".
Softmax subtracts the row max first, so exp never overflows.

Reference first, kernel second: each op's math is written out as plain array code (the functions named
_gelu_erf, _softmax, ...; every array has x's shape unless a comment says otherwise). The Function runs
that reference, or hands the same math to a fused kernel when `kernels.fused` answers "cpu"
(tinygpt/cpu_kernels.py) or "cuda" (tinygpt/cuda/kernels.py). TINYGPT_KERNELS=reference, or
`with tinygpt.kernels.disabled():`, runs the reference alone (tinygpt/kernels.py).
"""
from __future__ import annotations

import math

import numpy as np

from tinygpt import backend, cpu_kernels, kernels
from tinygpt.cuda import kernels as cuda_kernels
from tinygpt.function import Function
from tinygpt.tensor import Tensor

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _c(x, value):
    """A Python constant in x's dtype (a NumPy scalar), so it never upcasts float32."""
    return x.dtype.type(value)


# --- the standard normal CDF Φ -------------------------------------------------------------------------
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)    # Abramowitz & Stegun 7.1.26
_AS_P = 0.3275911
_half_erfc = np.frompyfunc(lambda v: 0.5 * math.erfc(v), 1, 1)


def _normal_cdf_as(x):
    """Φ(x) = ½ + ½ sign(x) erf(a), a = |x|/√2, with erf(a) = 1 − (a1 t + a2 t² + ... + a5 t⁵) e^(−a²),
    t = 1/(1 + p a): Abramowitz & Stegun 7.1.26, |error| < 1.5e-7. x: a NumPy float32 (or float16) array."""
    a = np.abs(x) * _c(x, math.sqrt(0.5))
    t = 1 / (1 + _c(x, _AS_P) * a)
    poly = _c(x, _AS_A[4])
    for coef in _AS_A[3::-1]:                             # Horner: (((a5 t + a4) t + a3) t + a2) t + a1
        poly = poly * t + _c(x, coef)
    erf = 1 - poly * t * np.exp(-a * a)
    return _c(x, 0.5) + _c(x, 0.5) * np.sign(x) * erf


def normal_cdf(x):
    """Φ(x) = ½ erfc(−x/√2), the standard normal CDF, elementwise on any device (NumPy has no erf).

    NumPy float64 is exact (math.erfc per element: for gradient checks); other NumPy dtypes use
    Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7); CuPy has its own (backend.device_normal_cdf).
    """
    if not isinstance(x, np.ndarray):
        return backend.device_normal_cdf(x)
    if x.dtype == np.float64:
        return _half_erfc(x * -math.sqrt(0.5)).astype(np.float64)
    if kernels.fused("cpu", x):
        return cpu_kernels.normal_cdf(x)                  # the same formula, blocked and threaded
    return _normal_cdf_as(x)


# --- GELU: the references --------------------------------------------------------------------------------
def _gelu_erf(x):
    """y = x Φ(x); returns (y, Φ(x)), Φ for the backward."""
    cdf = normal_cdf(x)
    return x * cdf, cdf


def _gelu_erf_grad(xp, x, cdf):
    """dy/dx = Φ(x) + x φ(x), φ(x) = e^(−x²/2)/√(2π) the normal density."""
    pdf = _c(x, _INV_SQRT_2PI) * xp.exp(_c(x, -0.5) * x * x)
    return cdf + x * pdf


def _gelu_tanh(xp, x):
    """y = ½x(1 + t), t = tanh(u), u = √(2/π)(x + 0.044715x³)."""
    u = _c(x, _SQRT_2_OVER_PI) * (x + _c(x, 0.044715) * x * x * x)
    return _c(x, 0.5) * x * (1 + xp.tanh(u))


def _gelu_tanh_grad(xp, x):
    """dy/dx = ½(1 + t) + ½x(1 − t²) du/dx, du/dx = √(2/π)(1 + 3·0.044715x²)."""
    k = _c(x, _SQRT_2_OVER_PI)
    t = xp.tanh(k * (x + _c(x, 0.044715) * x * x * x))
    return _c(x, 0.5) * (1 + t) + _c(x, 0.5) * x * (1 - t * t) * k * (1 + _c(x, 3 * 0.044715) * x * x)


class ReLU(Function):
    @staticmethod
    def forward(ctx, x):
        if kernels.fused(ctx.device, x) == "cpu":       # the same max, vectorized and threaded
            y = cpu_kernels.relu_forward(x)
        else:
            y = ctx.xp.maximum(x, 0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):  # d relu/dx = 1 where x > 0, else 0 (a mask multiply, not np.where)
        (y,) = ctx.saved_tensors
        if kernels.fused(ctx.device, g, y) == "cpu":
            return cpu_kernels.relu_backward(g, y)
        return g * (y > 0)


class GELU(Function):
    @staticmethod
    def forward(ctx, x, approximate="none"):
        ctx.approximate = approximate
        fused = kernels.fused(ctx.device, x)
        if approximate == "tanh":
            ctx.save_for_backward(x, None)
            if fused == "cuda":
                return cuda_kernels.gelu_tanh_forward(x)  # the same math, one CUDA kernel
            return _gelu_tanh(ctx.xp, x)
        if fused == "cpu" and x.dtype.itemsize <= 4:      # (float64 keeps the exact Φ, for gradient checks)
            y, dydx = cpu_kernels.gelu_forward(x)         # the same math, blocked and threaded; it hands
            ctx.save_for_backward(None, dydx)             # back dy/dx too, so the backward is one multiply
            return y
        if fused == "cuda":
            y, cdf = cuda_kernels.gelu_forward(x)         # the same math, one CUDA kernel
        else:
            y, cdf = _gelu_erf(x)
        ctx.save_for_backward(x, cdf)
        return y

    @staticmethod
    def backward(ctx, g):                                 # dx = g · dy/dx
        x, saved = ctx.saved_tensors
        if x is None:                                     # the CPU kernel saved dy/dx itself
            return (cpu_kernels.multiply(g, saved) if kernels.fused(ctx.device, g) else g * saved), None
        fused = kernels.fused(ctx.device, x, g)
        if ctx.approximate == "tanh":
            if fused == "cuda":
                return cuda_kernels.gelu_tanh_backward(g, x), None
            return g * _gelu_tanh_grad(ctx.xp, x), None
        if fused == "cuda":
            return cuda_kernels.gelu_backward(g, x, saved), None
        return g * _gelu_erf_grad(ctx.xp, x, saved), None


class Sigmoid(Function):
    @staticmethod
    def forward(ctx, x):
        y = _c(x, 0.5) * (1 + ctx.xp.tanh(_c(x, 0.5) * x))  # σ(x) = ½(1 + tanh(x/2)): no overflow
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):  # σ' = σ(1 - σ)
        (y,) = ctx.saved_tensors
        return g * y * (1 - y)


# --- softmax and log-softmax: the references ----------------------------------------------------------
def _softmax(xp, x, axis):
    """y = e^(x − max) / Σ e^(x − max), max and Σ along `axis`."""
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def _softmax_grad(g, y, axis):
    """dx = y ⊙ (g − Σ g ⊙ y), Σ along `axis`."""
    return y * (g - (g * y).sum(axis=axis, keepdims=True))


def _log_softmax(xp, x, axis):
    """y = (x − max) − log Σ e^(x − max), along `axis`."""
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


def _log_softmax_grad(xp, g, y, axis):
    """dx = g − e^y Σ g, Σ along `axis` (e^y is the softmax)."""
    return g - xp.exp(y) * g.sum(axis=axis, keepdims=True)


def _on_rows(x, axis) -> bool:
    """The softmax kernels work on the last axis of a non-empty array."""
    return x.ndim >= 1 and axis in (-1, x.ndim - 1) and x.size > 0


class Softmax(Function):
    @staticmethod
    def forward(ctx, x, axis=-1):
        fused = kernels.fused(ctx.device, x) if _on_rows(x, axis) else None
        if fused == "cuda":
            y = cuda_kernels.softmax_forward(x)           # the same math, one CUDA block per row
        elif fused == "cpu":                              # the same math, blocked (on a copy: in place)
            y = np.array(x, order="C")                   # rows of any rank: (rows, 1, n) for the kernel
            cpu_kernels.softmax_lastaxis_(y.reshape(-1, 1, y.shape[-1]), source=x)
        else:
            y = _softmax(ctx.xp, x, axis)
        ctx.save_for_backward(y, axis)
        return y

    @staticmethod
    def backward(ctx, g):
        y, axis = ctx.saved_tensors
        fused = kernels.fused(ctx.device, y, g) if _on_rows(y, axis) else None
        if fused == "cuda":
            return cuda_kernels.softmax_backward(g, y), None
        if fused == "cpu":
            return cpu_kernels.softmax_backward_(np.array(g, order="C"), y), None
        return _softmax_grad(g, y, axis), None


class LogSoftmax(Function):
    @staticmethod
    def forward(ctx, x, axis=-1):
        if kernels.fused(ctx.device, x) == "cuda" and _on_rows(x, axis):
            y = cuda_kernels.softmax_forward(x, log=True)
        else:
            y = _log_softmax(ctx.xp, x, axis)
        ctx.save_for_backward(y, axis)
        return y

    @staticmethod
    def backward(ctx, g):
        y, axis = ctx.saved_tensors
        if kernels.fused(ctx.device, y, g) == "cuda" and _on_rows(y, axis):
            return cuda_kernels.softmax_backward(g, y, log=True), None
        return _log_softmax_grad(ctx.xp, g, y, axis), None


def relu(x: Tensor) -> Tensor:
    return ReLU.apply(x)


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU, exact (erf) by default; approximate="tanh" for the GPT-2 tanh form."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', not {approximate!r}")
    return GELU.apply(x, approximate)


def sigmoid(x: Tensor) -> Tensor:
    return Sigmoid.apply(x)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return Softmax.apply(x, axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return LogSoftmax.apply(x, axis)
