"""Activations and the softmax family.

GELU is the exact erf form by default, GELU(x) = x Φ(x) = ½x(1 + erf(x/√2)), or the tanh
approximation ½x(1 + tanh(√(2/π)(x + 0.044715x³))) with approximate="tanh".
Softmax subtracts the row max first, so exp never overflows.
"""
from __future__ import annotations

import math

from tinygpt import backend, cpu_kernels, cuda_kernels
from tinygpt.function import Function
from tinygpt.tensor import Tensor

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _fast_cpu(ctx, x) -> bool:
    """Use the blocked, threaded NumPy kernels? (CPU, float32/float16; float64 stays exact for gradchecks)."""
    return ctx.device.name == "cpu" and x.dtype.itemsize <= 4


def _c(x, value):
    """A Python constant in x's dtype (a NumPy scalar), so it never upcasts float32."""
    return x.dtype.type(value)


class ReLU(Function):
    @staticmethod
    def forward(ctx, x):
        y = ctx.xp.maximum(x, 0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):  # d relu/dx = 1 where x > 0, else 0 (a mask multiply, not np.where)
        (y,) = ctx.saved_tensors
        return g * (y > 0)


class GELU(Function):
    @staticmethod
    def forward(ctx, x, approximate="none"):
        xp = ctx.xp
        ctx.approximate = approximate
        if approximate == "tanh":
            ctx.save_for_backward(x, None)
            if cuda_kernels.fusable(ctx.device, x):
                return cuda_kernels.gelu_tanh_forward(x)  # one fused CUDA kernel, same math
            inner = _c(x, _SQRT_2_OVER_PI) * (x + _c(x, 0.044715) * x * x * x)
            return _c(x, 0.5) * x * (1 + xp.tanh(inner))
        if _fast_cpu(ctx, x):                             # the same math, cache-blocked and threaded;
            y, dydx = cpu_kernels.gelu_forward(x)         # it hands back y' = Φ + xφ for the backward
            ctx.save_for_backward(None, dydx)
            return y
        if cuda_kernels.fusable(ctx.device, x):
            y, cdf = cuda_kernels.gelu_forward(x)         # the same math, one CUDA kernel
        else:
            cdf = backend.normal_cdf(x)                   # Φ(x)
            y = x * cdf
        ctx.save_for_backward(x, cdf)
        return y

    @staticmethod
    def backward(ctx, g):
        x, cdf = ctx.saved_tensors
        xp = ctx.xp
        if x is None:                                     # the CPU kernel saved y' itself
            return cpu_kernels.multiply(g, cdf), None
        if ctx.approximate == "tanh":
            if cuda_kernels.fusable(ctx.device, x, g):
                return cuda_kernels.gelu_tanh_backward(g, x), None
            # y = ½x(1+t), t = tanh(u), u = k(x + 0.044715x³):  y' = ½(1+t) + ½x(1-t²)k(1 + 3·0.044715x²)
            k = _c(x, _SQRT_2_OVER_PI)
            t = xp.tanh(k * (x + _c(x, 0.044715) * x * x * x))
            dy = _c(x, 0.5) * (1 + t) + _c(x, 0.5) * x * (1 - t * t) * k * (1 + _c(x, 3 * 0.044715) * x * x)
            return g * dy, None
        # y = xΦ(x): y' = Φ(x) + x φ(x), φ(x) = e^(-x²/2)/√(2π)
        if cuda_kernels.fusable(ctx.device, x, g):
            return cuda_kernels.gelu_backward(g, x, cdf), None
        pdf = _c(x, _INV_SQRT_2PI) * xp.exp(_c(x, -0.5) * x * x)
        return g * (cdf + x * pdf), None


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


class Softmax(Function):
    @staticmethod
    def forward(ctx, x, axis=-1):
        xp = ctx.xp
        if cuda_kernels.softmax_fusable(ctx.device, x, axis):   # one CUDA block per row, same math
            e = cuda_kernels.softmax_forward(x)
            ctx.save_for_backward(e, axis)
            return e
        e = xp.exp(x - x.max(axis=axis, keepdims=True))
        e /= e.sum(axis=axis, keepdims=True)
        ctx.save_for_backward(e, axis)
        return e

    @staticmethod
    def backward(ctx, g):  # dx = y ⊙ (g - Σ_j g_j y_j)
        y, axis = ctx.saved_tensors
        if cuda_kernels.softmax_fusable(ctx.device, y, axis) and cuda_kernels.fusable(ctx.device, g):
            return cuda_kernels.softmax_backward(g, y), None
        return y * (g - (g * y).sum(axis=axis, keepdims=True)), None


class LogSoftmax(Function):
    @staticmethod
    def forward(ctx, x, axis=-1):
        xp = ctx.xp
        if cuda_kernels.softmax_fusable(ctx.device, x, axis):
            y = cuda_kernels.softmax_forward(x, log=True)
            ctx.save_for_backward(y, axis)
            return y
        shifted = x - x.max(axis=axis, keepdims=True)
        y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        ctx.save_for_backward(y, axis)
        return y

    @staticmethod
    def backward(ctx, g):  # dx = g - softmax(x) Σ_j g_j
        y, axis = ctx.saved_tensors
        if cuda_kernels.softmax_fusable(ctx.device, y, axis) and cuda_kernels.fusable(ctx.device, g):
            return cuda_kernels.softmax_backward(g, y, log=True), None
        return g - ctx.xp.exp(y) * g.sum(axis=axis, keepdims=True), None


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
