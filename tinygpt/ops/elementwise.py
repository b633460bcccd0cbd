"""Elementwise ops: arithmetic with broadcasting, and the unary functions.

Each op is a Function with forward and backward side by side; the comment above backward is its math.
Under broadcasting, backward sums each gradient back to its input's shape with `unbroadcast`.
Scalars (Python floats, NumPy float64 scalars, np.sqrt(8)) take the tensor's dtype first, so they never
turn a float32 graph into float64.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinygpt.function import Function, unbroadcast
from tinygpt.tensor import Tensor


def as_operand(x: Any, like: Any) -> Any:
    """A non-Tensor operand as an array of `like`'s device and (floating) dtype, so it never upcasts."""
    if isinstance(x, Tensor):
        return x
    other = like if isinstance(like, Tensor) else None
    if other is None:  # neither is a Tensor: make a float32 leaf on the default device
        from tinygpt.tensor import tensor
        return tensor(x)
    xp = other.device.xp
    if isinstance(x, (bool, int)) and other.dtype.kind in "iu":
        dtype = other.dtype
    else:
        dtype = other.dtype if other.dtype.kind == "f" else "float32"
    if isinstance(x, (bool, int, float, np.bool_, np.integer, np.floating)):
        return xp.full((), x, dtype=dtype)     # a scalar: filled on the device, not copied (and waited for)
    return xp.asarray(x, dtype=dtype)  # lists, host or device arrays


def _pair(a: Any, b: Any) -> tuple:
    return as_operand(a, b), as_operand(b, a)


class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a.shape, b.shape)
        return a + b

    @staticmethod
    def backward(ctx, g):  # d(a+b)/da = 1, d(a+b)/db = 1
        sa, sb = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        return (unbroadcast(g, sa) if na else None), (unbroadcast(g, sb) if nb else None)


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a.shape, b.shape)
        return a - b

    @staticmethod
    def backward(ctx, g):  # d(a-b)/da = 1, d(a-b)/db = -1
        sa, sb = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        return (unbroadcast(g, sa) if na else None), (unbroadcast(-g, sb) if nb else None)


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):  # d(ab)/da = b, d(ab)/db = a
        a, b = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        return (unbroadcast(g * b, a.shape) if na else None), (unbroadcast(g * a, b.shape) if nb else None)


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx, g):  # d(a/b)/da = 1/b, d(a/b)/db = -a/b²
        a, b = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        ga = unbroadcast(g / b, a.shape) if na else None
        gb = unbroadcast(-g * a / (b * b), b.shape) if nb else None
        return ga, gb


class Pow(Function):
    @staticmethod
    def forward(ctx, a, p):
        ctx.save_for_backward(a)
        ctx.p = p
        return a ** p

    @staticmethod
    def backward(ctx, g):  # d(a^p)/da = p a^(p-1)
        (a,) = ctx.saved_tensors
        if ctx.p == 0:  # a⁰ = 1 everywhere: the gradient is 0, also at a = 0 (not 0·0⁻¹ = nan)
            return ctx.xp.zeros_like(g), None
        return g * ctx.p * a ** (ctx.p - 1), None


class Cast(Function):
    @staticmethod
    def forward(ctx, a, dtype):
        ctx.save_for_backward(a.dtype)
        return a.astype(dtype)                      # always a copy (also to the same dtype: clone())

    @staticmethod
    def backward(ctx, g):  # the identity, in the input's dtype
        (dtype,) = ctx.saved_tensors
        return g.astype(dtype, copy=False), None


class Neg(Function):
    @staticmethod
    def forward(ctx, a):
        return -a

    @staticmethod
    def backward(ctx, g):  # d(-a)/da = -1
        return -g


class Exp(Function):
    @staticmethod
    def forward(ctx, a):
        y = ctx.xp.exp(a)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):  # d(e^a)/da = e^a
        (y,) = ctx.saved_tensors
        return g * y


class Log(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return ctx.xp.log(a)

    @staticmethod
    def backward(ctx, g):  # d(ln a)/da = 1/a
        (a,) = ctx.saved_tensors
        return g / a


class Sqrt(Function):
    @staticmethod
    def forward(ctx, a):
        y = ctx.xp.sqrt(a)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):  # d(√a)/da = 1/(2√a)
        (y,) = ctx.saved_tensors
        return g / (2 * y)


class Tanh(Function):
    @staticmethod
    def forward(ctx, a):
        y = ctx.xp.tanh(a)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):  # d(tanh a)/da = 1 - tanh²a
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


def add(a, b) -> Tensor:
    return Add.apply(*_pair(a, b))


def sub(a, b) -> Tensor:
    return Sub.apply(*_pair(a, b))


def mul(a, b) -> Tensor:
    return Mul.apply(*_pair(a, b))


def div(a, b) -> Tensor:
    return Div.apply(*_pair(a, b))


def pow(a: Tensor, exponent: float) -> Tensor:
    """a ** exponent for a scalar exponent (kept in a's dtype)."""
    if isinstance(exponent, Tensor):
        raise TypeError("pow: the exponent must be a Python or NumPy scalar, not a Tensor")
    e = float(exponent)
    p = int(e) if e.is_integer() else a.dtype.type(e)
    return Pow.apply(a, p)


def cast(a: Tensor, dtype: Any) -> Tensor:
    """a as `dtype` (a new array). Differentiable between float dtypes; no gradient to or from integers."""
    dtype = np.dtype(dtype)
    if a.dtype.kind != "f" or dtype.kind != "f":
        return Tensor._make(a.data.astype(dtype), a.device, None)
    return Cast.apply(a, dtype)


def neg(a: Tensor) -> Tensor:
    return Neg.apply(a)


def exp(a: Tensor) -> Tensor:
    return Exp.apply(a)


def log(a: Tensor) -> Tensor:
    return Log.apply(a)


def sqrt(a: Tensor) -> Tensor:
    return Sqrt.apply(a)


def tanh(a: Tensor) -> Tensor:
    return Tanh.apply(a)
