"""torch's free functions: `tinygpt.sum(x, 1, keepdim=True)` is `x.sum(1, keepdim=True)`, and so on.

They take torch's dim/keepdim (NumPy's axis/keepdims also work) and call the Tensor methods, which call
the ops in tinygpt/ops. Non-Tensor inputs (lists, arrays, numbers) become float32 tensors first.
"""
from __future__ import annotations

from typing import Any

from tinygpt import ops
from tinygpt.tensor import Tensor, tensor


def _t(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else tensor(x)


def sum(input: Any, dim: Any = None, keepdim: bool = False, **numpy_names: Any) -> Tensor:  # noqa: A001
    return _t(input).sum(dim, keepdim, **numpy_names)


def mean(input: Any, dim: Any = None, keepdim: bool = False, **numpy_names: Any) -> Tensor:
    return _t(input).mean(dim, keepdim, **numpy_names)


def var(input: Any, dim: Any = None, unbiased: bool = True, keepdim: bool = False, **kw: Any) -> Tensor:
    return _t(input).var(dim, unbiased, keepdim, **kw)


def std(input: Any, dim: Any = None, unbiased: bool = True, keepdim: bool = False, **kw: Any) -> Tensor:
    return _t(input).std(dim, unbiased, keepdim, **kw)


def max(input: Any, dim: Any = None, keepdim: bool = False) -> Any:  # noqa: A001
    """torch.max(x) the largest element; torch.max(x, dim) (values, indices)."""
    return _t(input).max(dim, keepdim)


def min(input: Any, dim: Any = None, keepdim: bool = False) -> Any:  # noqa: A001
    return _t(input).min(dim, keepdim)


def argmax(input: Any, dim: Any = None, keepdim: bool = False) -> Tensor:
    return _t(input).argmax(dim, keepdim)


def softmax(input: Any, dim: int = -1) -> Tensor:
    return ops.softmax(_t(input), dim)


def log_softmax(input: Any, dim: int = -1) -> Tensor:
    return ops.log_softmax(_t(input), dim)


def sqrt(input: Any) -> Tensor:
    return ops.sqrt(_t(input))


def exp(input: Any) -> Tensor:
    return ops.exp(_t(input))


def log(input: Any) -> Tensor:
    return ops.log(_t(input))


def tanh(input: Any) -> Tensor:
    return ops.tanh(_t(input))


def relu(input: Any) -> Tensor:
    return ops.relu(_t(input))


def matmul(input: Any, other: Any) -> Tensor:
    return ops.matmul(input, other)


def transpose(input: Tensor, dim0: int, dim1: int) -> Tensor:
    return ops.transpose(input, dim0, dim1)


def where(condition: Any, input: Any, other: Any) -> Tensor:
    return ops.where(condition, input, other)


def tril(input: Tensor, diagonal: int = 0) -> Tensor:
    return ops.tril(input, diagonal)


def triu(input: Tensor, diagonal: int = 0) -> Tensor:
    return ops.triu(input, diagonal)
