"""Reductions over one axis, several axes (a tuple) or all (axis=None), with keepdims."""
from __future__ import annotations

import builtins
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
        n = 1
        for i in axes:
            n *= shape[i]
        return ctx.xp.broadcast_to(_expand(g, shape, axes, keepdims) / g.dtype.type(builtins.max(n, 1)), shape)


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
