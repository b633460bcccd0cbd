"""Ops that move elements without changing them: reshape, transpose, permute, indexing, cat, stack,
and tril/triu, which keep a triangle and zero the rest.

Their backward moves the gradient back the same way: reshape it back, apply the inverse permutation,
or scatter it into a zero array (adding, so repeated indices accumulate).
"""
from __future__ import annotations

from typing import Any, Sequence

from tinygpt import backend
from tinygpt.function import Function
from tinygpt.ops.nn import where
from tinygpt.tensor import SparseGrad, Tensor


class Reshape(Function):
    @staticmethod
    def forward(ctx, a, shape):
        ctx.save_for_backward(a.shape)
        return a.reshape(shape)

    @staticmethod
    def backward(ctx, g):  # same elements, old shape
        (shape,) = ctx.saved_tensors
        return g.reshape(shape), None


class Permute(Function):
    @staticmethod
    def forward(ctx, a, axes):
        ctx.save_for_backward(axes)
        return a.transpose(axes)

    @staticmethod
    def backward(ctx, g):  # undo with the inverse permutation
        (axes,) = ctx.saved_tensors
        inverse = [0] * len(axes)
        for i, ax in enumerate(axes):
            inverse[ax] = i
        return g.transpose(inverse), None


def index_arrays(index: Any, xp: Any) -> Any:
    """Tensor, list and host-array indices as arrays of this device; a one-element integer Tensor as a
    slice bound (data[i:i + 8]) becomes an int; ints, slices, None, ... pass unchanged."""
    def one(i):
        if isinstance(i, slice) and any(isinstance(v, Tensor) for v in (i.start, i.stop, i.step)):
            return slice(*(None if v is None else v.__index__() for v in (i.start, i.stop, i.step)))
        if isinstance(i, Tensor):
            i = i.data
        if isinstance(i, list) or (hasattr(i, "dtype") and backend.get_array_module(i) is not xp):
            return xp.asarray(backend.to_numpy(i) if hasattr(i, "dtype") else i)
        return i
    return tuple(one(i) for i in index) if isinstance(index, tuple) else one(index)


def _is_basic(index: Any) -> bool:
    """True when indexing selects a view (ints, slices, None, Ellipsis): no element repeats."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items)


class GetItem(Function):
    @staticmethod
    def forward(ctx, a, index):
        ctx.save_for_backward(a.shape, a.dtype, index)
        return a[index]

    @staticmethod
    def backward(ctx, g):  # each picked element gets its gradient, the rest 0; repeats add up (scatter-add)
        shape, dtype, index = ctx.saved_tensors
        return SparseGrad(ctx.xp, shape, index, g, _is_basic(index)), None   # made dense by the engine


class Cat(Function):
    @staticmethod
    def forward(ctx, *arrays, axis=0):
        ctx.save_for_backward(axis, [a.shape[axis] for a in arrays])
        return ctx.xp.concatenate(arrays, axis=axis)

    @staticmethod
    def backward(ctx, g):  # each input gets its own slice of g
        axis, sizes = ctx.saved_tensors
        out, start = [], 0
        for n, need in zip(sizes, ctx.needs_input_grad):
            sl = [slice(None)] * g.ndim
            sl[axis] = slice(start, start + n)
            out.append(g[tuple(sl)] if need else None)
            start += n
        return tuple(out)


class Stack(Function):
    @staticmethod
    def forward(ctx, *arrays, axis=0):
        ctx.save_for_backward(axis)
        return ctx.xp.stack(arrays, axis=axis)

    @staticmethod
    def backward(ctx, g):  # input i gets g taken at position i of the new axis
        (axis,) = ctx.saved_tensors
        return tuple(ctx.xp.take(g, i, axis=axis) if need else None
                     for i, need in enumerate(ctx.needs_input_grad))


def reshape(a: Tensor, *shape: Any) -> Tensor:
    """a.reshape(2, -1) or a.reshape((2, -1))."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return Reshape.apply(a, tuple(int(s) for s in shape))


def permute(a: Tensor, *axes: int) -> Tensor:
    """Reorder all axes: permute(x, 0, 2, 1, 3) as in torch."""
    if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
        axes = tuple(axes[0])
    if sorted(a_ % max(a.ndim, 1) for a_ in axes) != list(range(a.ndim)):
        raise ValueError(f"permute: {axes} is not a permutation of the {a.ndim} axes of shape {a.shape}")
    return Permute.apply(a, tuple(a_ % a.ndim for a_ in axes))


def transpose(a: Tensor, dim0: int = -2, dim1: int = -1) -> Tensor:
    """Swap two axes (torch.transpose), e.g. (B, T, H, hs).transpose(1, 2) -> (B, H, T, hs)."""
    axes = list(range(a.ndim))
    axes[dim0], axes[dim1] = axes[dim1], axes[dim0]
    return Permute.apply(a, tuple(axes))


def getitem(a: Tensor, index: Any) -> Tensor:
    """a[index] with ints, slices, None, ... and integer (or bool) arrays / Tensors / lists."""
    return GetItem.apply(a, index_arrays(index, a.device.xp))


def cat(tensors: Sequence[Tensor], dim: int = 0, *, axis: int | None = None) -> Tensor:
    """Join tensors along an existing axis: cat((idx, idx_next), dim=1). `axis=` is NumPy's name for dim."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat: needs at least one tensor")
    return Cat.apply(*tensors, axis=dim if axis is None else axis)


def stack(tensors: Sequence[Tensor], dim: int = 0, *, axis: int | None = None) -> Tensor:
    """Join same-shaped tensors along a new axis: stack([data[i:i + T] for i in ix]) -> (B, T)."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack: needs at least one tensor")
    shapes = {t.shape for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"stack: every tensor needs the same shape, got {sorted(shapes)}")
    return Stack.apply(*tensors, axis=dim if axis is None else axis)


def _triangle(a: Tensor, diagonal: int, upper: bool, name: str) -> Tensor:
    if a.ndim < 2:
        raise ValueError(f"{name}: needs at least 2 dimensions, got shape {a.shape}")
    n, m = a.shape[-2:]
    xp = a.device.xp
    keep = (xp.triu if upper else xp.tril)(xp.ones((n, m), dtype=bool), k=int(diagonal))   # (n, m)
    return where(keep, a, 0)                # the gradient flows to the kept triangle only


def tril(a: Tensor, diagonal: int = 0) -> Tensor:
    """The lower triangle of the last two axes (j <= i + diagonal), zeros above: tril(ones(T, T))."""
    return _triangle(a, diagonal, False, "tril")


def triu(a: Tensor, diagonal: int = 0) -> Tensor:
    """The upper triangle of the last two axes (j >= i + diagonal), zeros below."""
    return _triangle(a, diagonal, True, "triu")
