"""Making tensors the way torch does: dtypes, zeros/ones/arange, random tensors, multinomial sampling.

    import tinygpt as torch
    data = torch.tensor(encode(text), dtype=torch.long)        # (N,) int64
    ix = torch.randint(len(data) - block_size, (batch_size,))   # (B,) int64 in [0, high)
    x = torch.randn(B, T, C)                                    # (B, T, C) float32 ~ N(0, 1)
    idx_next = torch.multinomial(probs, num_samples=1)          # (B, 1) int64, row b drawn from probs[b]

Random numbers come from the device's generator (`backend.device_rng`), which `tinygpt.manual_seed` seeds.
Floats are float32 unless a dtype is given; integers int64. None of these tensors is on a graph.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinygpt import backend
from tinygpt.tensor import Tensor

# dtypes, under torch's names (NumPy dtypes underneath: t.dtype == tinygpt.long works)
float32 = np.dtype("float32")
float64 = np.dtype("float64")
float16 = np.dtype("float16")
int64 = np.dtype("int64")
int32 = np.dtype("int32")
uint8 = np.dtype("uint8")
bool_ = np.dtype("bool")
long, double, half = int64, float64, float16       # torch.float and torch.bool: see tinygpt/__init__.py


def _size(size: tuple) -> tuple:
    """zeros(2, 3) and zeros((2, 3)) alike."""
    if len(size) == 1 and isinstance(size[0], (tuple, list)):
        size = tuple(size[0])
    try:
        shape = tuple(int(s) for s in size)
    except (TypeError, ValueError):
        raise TypeError(f"a size must be ints, e.g. (2, 3); got {size!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"a size cannot be negative, got {shape}")
    return shape


def _new(arr: Any, requires_grad: bool) -> Tensor:
    return Tensor(arr, requires_grad=requires_grad)


def full(size: Any, fill_value: Any, *, dtype: Any = None, device: Any = None,
         requires_grad: bool = False) -> Tensor:
    """A tensor of `size` filled with `fill_value` (float32 unless dtype says otherwise)."""
    dev = backend.get_device(device)
    dt = np.dtype(dtype) if dtype is not None else (
        int64 if isinstance(fill_value, (int, np.integer)) and not isinstance(fill_value, bool) else float32)
    return _new(dev.xp.full(_size((size,) if isinstance(size, int) else tuple(size)), fill_value, dtype=dt),
                requires_grad)


def zeros(*size: Any, dtype: Any = None, device: Any = None, requires_grad: bool = False) -> Tensor:
    dev = backend.get_device(device)
    return _new(dev.xp.zeros(_size(size), dtype=dtype or float32), requires_grad)


def ones(*size: Any, dtype: Any = None, device: Any = None, requires_grad: bool = False) -> Tensor:
    dev = backend.get_device(device)
    return _new(dev.xp.ones(_size(size), dtype=dtype or float32), requires_grad)


def zeros_like(t: Tensor, *, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    return zeros(t.shape, dtype=dtype or t.dtype, device=t.device, requires_grad=requires_grad)


def ones_like(t: Tensor, *, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    return ones(t.shape, dtype=dtype or t.dtype, device=t.device, requires_grad=requires_grad)


def arange(start: Any, end: Any = None, step: Any = 1, *, dtype: Any = None, device: Any = None) -> Tensor:
    """[start, end) in steps: arange(T) -> 0..T-1 as int64; floats give float32."""
    if end is None:
        start, end = 0, start
    if step == 0:
        raise ValueError("arange: step must not be 0")
    ints = all(isinstance(v, (int, np.integer)) for v in (start, end, step))
    dt = np.dtype(dtype) if dtype is not None else (int64 if ints else float32)
    dev = backend.get_device(device)
    return Tensor(dev.xp.arange(start, end, step).astype(dt, copy=False))


def randn(*size: Any, dtype: Any = None, device: Any = None, requires_grad: bool = False) -> Tensor:
    """Samples of N(0, 1): randn(B, T, C)."""
    dev = backend.get_device(device)
    dt = np.dtype(dtype or float32)
    return _new(backend.device_rng(dev).standard_normal(_size(size), dtype=dt), requires_grad)


def rand(*size: Any, dtype: Any = None, device: Any = None, requires_grad: bool = False) -> Tensor:
    """Samples of U[0, 1)."""
    dev = backend.get_device(device)
    dt = np.dtype(dtype or float32)
    return _new(backend.device_rng(dev).random(_size(size), dtype=dt), requires_grad)


def randint(*args: Any, size: Any = None, dtype: Any = None, device: Any = None) -> Tensor:
    """Integers uniform in [low, high): randint(high, size) or randint(low, high, size), as torch."""
    if size is None:
        if not args:
            raise TypeError("randint(low=0, high, size): give at least high and size")
        *args, size = args
    if len(args) == 1:
        low, high = 0, args[0]
    elif len(args) == 2:
        low, high = args
    else:
        raise TypeError("randint(low=0, high, size): give high, or low and high, then size")
    low, high = int(low), int(high)
    if high <= low:
        raise ValueError(f"randint: need low < high, got low={low}, high={high}")
    dev = backend.get_device(device)
    shape = _size((size,) if isinstance(size, int) else tuple(size))
    ids = backend.device_rng(dev).integers(low, high, size=shape)
    return Tensor(ids.astype(np.dtype(dtype or int64), copy=False))


def multinomial(input: Tensor, num_samples: int, replacement: bool = False) -> Tensor:
    """Draw `num_samples` category indices from each row of non-negative weights (need not sum to 1).

    input (V,) -> (num_samples,), or (B, V) -> (B, num_samples), int64. Without replacement (torch's
    default) a category is drawn at most once per row.

    With replacement: u ~ U[0, 1), index = the first k with cdf_k > u, cdf = cumsum(p) / Σp.
    Without: the Gumbel-top-k trick, the num_samples largest of log p_k - log(-log u_k), which is the same
    distribution as drawing one at a time and removing what was drawn.
    """
    p = input.data if isinstance(input, Tensor) else np.asarray(input)
    if p.ndim not in (1, 2):
        raise ValueError(f"multinomial: input must be (V,) or (B, V) weights, got shape {p.shape}")
    xp = backend.get_array_module(p)
    rows = p.reshape(1, -1) if p.ndim == 1 else p
    B, V = rows.shape
    n = int(num_samples)
    if n < 1 or (not replacement and n > V):
        raise ValueError(f"multinomial: num_samples must be in [1, {V}] without replacement, got {num_samples}")
    w = rows.astype(np.float64)
    total = w.sum(axis=1, keepdims=True)
    if bool(((w < 0) | ~xp.isfinite(w)).any()) or bool((total <= 0).any()):
        raise ValueError("multinomial: weights must be finite, non-negative, with a positive sum in each row")
    rng = backend.device_rng(backend.device_of(p))
    u = rng.random((B, n))                                            # (B, n) in [0, 1)
    if replacement or n == 1:
        cdf = xp.cumsum(w / total, axis=1)                            # (B, V), last column 1
        idx = (u[:, :, None] >= cdf[:, None, :]).sum(axis=2)          # (B, n): how many cdf_k <= u
        idx = xp.minimum(idx, V - 1)                                  # u just below 1 after rounding
    else:
        with np.errstate(divide="ignore"):
            keys = xp.log(w) - xp.log(-xp.log(rng.random((B, V))))   # (B, V), -inf where p = 0
        idx = xp.argsort(-keys, axis=1)[:, :n]
    idx = idx.astype(np.int64)
    return Tensor(idx.reshape(n) if p.ndim == 1 else idx)


def allclose(a: Any, b: Any, rtol: float = 1e-05, atol: float = 1e-08, equal_nan: bool = False) -> bool:
    """|a - b| <= atol + rtol |b| everywhere (torch's and NumPy's test), for tensors or arrays."""
    a = a.data if isinstance(a, Tensor) else a
    b = b.data if isinstance(b, Tensor) else b
    return bool(backend.get_array_module(a, b).allclose(a, b, rtol=rtol, atol=atol, equal_nan=equal_nan))


def from_numpy(arr: np.ndarray) -> Tensor:
    """A tensor on the CPU that shares `arr`'s memory and keeps its dtype."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"from_numpy: expected a NumPy array, got {type(arr).__name__}")
    return Tensor(arr)
