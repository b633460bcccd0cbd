"""Reductions over one axis, several axes (a tuple) or all (axis=None), with keepdims.

The wrappers take NumPy's names (axis, keepdims); Tensor methods and tinygpt.sum/mean/... add torch's
dim/keepdim on top. `max_with_indices` is torch's x.max(dim): the values and where they are.
"""
from __future__ import annotations

import builtins
from collections import namedtuple
from typing import Any

from tinygpt.function import Function
from tinygpt.tensor import Tensor


def normalize_axes(axis: Any, ndim: int) -> tuple:
    """axis (None, int or tuple, negatives allowed) as a sorted tuple of non-negative ints."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < builtins.max(ndim, 1):
            raise ValueError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
        out.append(a % ndim if ndim else 0)
    return tuple(sorted(set(out)))


def _expand(g: Any, shape: tuple, axes: tuple, keepdims: bool) -> Any:
    """Put the reduced axes back (size 1) so that g broadcasts against the input."""
    if keepdims or not shape:
        return g
    kept = [1 if i in axes else s for i, s in enumerate(shape)]
    return g.reshape(kept)


class Sum(Function):
    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        axes = normalize_axes(axis, a.ndim)
        ctx.save_for_backward(a.shape, axes, keepdims)
        return a.sum(axis=axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):  # d(Σa)/da_i = 1: spread g back over the summed axes
        shape, axes, keepdims = ctx.saved_tensors
        return ctx.xp.broadcast_to(_expand(g, shape, axes, keepdims), shape)


class Mean(Function):
    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        axes = normalize_axes(axis, a.ndim)
        ctx.save_for_backward(a.shape, axes, keepdims)
        return a.mean(axis=axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, g):  # d(mean a)/da_i = 1/n, n = number of elements averaged
        shape, axes, keepdims = ctx.saved_tensors
        n = _count(shape, axes)
        return ctx.xp.broadcast_to(_expand(g, shape, axes, keepdims) / g.dtype.type(builtins.max(n, 1)), shape)


class Var(Function):
    @staticmethod
    def forward(ctx, a, axis=None, correction=1, keepdims=False):
        axes = normalize_axes(axis, a.ndim)
        mu = a.mean(axis=axes, keepdims=True)
        d = a - mu                                               # deviations from the mean
        n = _count(a.shape, axes)
        denom = a.dtype.type(builtins.max(n - correction, 0))   # n - 1 (unbiased) or n; 0 gives inf/nan
        ctx.save_for_backward(d, denom, axes, keepdims)
        return (d * d).sum(axis=axes, keepdims=keepdims) / denom

    @staticmethod
    def backward(ctx, g):  # var = Σ(a_i - μ)² / (n - c):  dvar/da_i = 2(a_i - μ) / (n - c)  (Σ(a_i - μ) = 0)
        d, denom, axes, keepdims = ctx.saved_tensors
        return _expand(g, d.shape, axes, keepdims) * (d * (d.dtype.type(2) / denom))


def _count(shape: tuple, axes: tuple) -> int:
    n = 1
    for i in axes:
        n *= shape[i]
    return n


class Max(Function):
    @staticmethod
    def forward(ctx, a, axis=None, keepdims=False):
        axes = normalize_axes(axis, a.ndim)
        y = a.max(axis=axes, keepdims=True)
        ctx.save_for_backward(a, y, axes, keepdims)
        return y if keepdims else y.reshape([s for i, s in enumerate(a.shape) if i not in axes])

    @staticmethod
    def backward(ctx, g):  # d(max a)/da_i = 1 where a_i is the max, shared equally among ties
        a, y, axes, keepdims = ctx.saved_tensors
        mask = (a == y).astype(g.dtype)
        mask /= mask.sum(axis=axes, keepdims=True)
        return _expand(g, a.shape, axes, keepdims) * mask


def sum(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:  # noqa: A001
    return Sum.apply(a, axis=axis, keepdims=keepdims)


def mean(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    return Mean.apply(a, axis=axis, keepdims=keepdims)


def max(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:  # noqa: A001
    return Max.apply(a, axis=axis, keepdims=keepdims)


def min(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:  # noqa: A001
    """min a = -max(-a): the gradient goes to the smallest element(s)."""
    return -Max.apply(-a, axis=axis, keepdims=keepdims)


def var(a: Tensor, axis: Any = None, correction: int = 1, keepdims: bool = False) -> Tensor:
    """Σ(a - mean)² / (n - correction): unbiased (correction=1) by default, as torch; 0 for NumPy's."""
    return Var.apply(a, axis=axis, correction=correction, keepdims=keepdims)


def argmax(a: Tensor, axis: Any = None, keepdims: bool = False) -> Tensor:
    """Index of the largest element along one axis (of the flattened array when axis is None); int64."""
    if axis is not None and not isinstance(axis, int):
        raise TypeError(f"argmax: dim must be one int or None, not {axis!r}")
    axis = None if axis is None else normalize_axes(axis, a.ndim)[0]
    idx = a.device.xp.argmax(a.data, axis=axis).astype("int64")
    if keepdims:
        idx = idx.reshape([1 if axis is None or i == axis else s for i, s in enumerate(a.shape)])
    return Tensor._make(idx, a.device, None)


ValuesIndices = namedtuple("ValuesIndices", ["values", "indices"])   # what torch's x.max(dim) returns


def max_with_indices(a: Tensor, axis: int, keepdims: bool = False) -> ValuesIndices:
    """torch's x.max(dim): (values, indices) along one axis; the values carry the gradient."""
    return ValuesIndices(max(a, axis, keepdims), argmax(a, axis, keepdims))


def min_with_indices(a: Tensor, axis: int, keepdims: bool = False) -> ValuesIndices:
    return ValuesIndices(min(a, axis, keepdims), argmax(-a.detach(), axis, keepdims))
