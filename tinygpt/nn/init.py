"""`tinygpt.nn.init`: fill a weight in place, as torch.nn.init does (e.g. inside `model.apply(init_fn)`).

    nn.init.normal_(module.weight, mean=0.0, std=0.02)
    nn.init.zeros_(module.bias)

Random draws come from the host generator that `tinygpt.manual_seed` seeds, in float32, then move to the
tensor's device. Each returns the tensor, and none of them is recorded on the autograd graph.
"""
from __future__ import annotations

import math

import numpy as np

from tinygpt import backend
from tinygpt.tensor import Tensor

__all__ = ["normal_", "uniform_", "zeros_", "ones_", "constant_"]


def _write(t: Tensor, host: np.ndarray) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"nn.init: expected a Tensor or Parameter, got {type(t).__name__}")
    t.data[...] = backend.to_device(host.astype(t.dtype, copy=False), t.device)
    return t


def normal_(tensor: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """tensor ~ N(mean, std²), in place."""
    if not (math.isfinite(mean) and math.isfinite(std)) or std < 0:
        raise ValueError(f"normal_: need a finite mean and std >= 0, got mean={mean}, std={std}")
    draw = backend.host_rng().standard_normal(tensor.shape, dtype=np.float32)
    return _write(tensor, draw * np.float32(std) + np.float32(mean))


def uniform_(tensor: Tensor, a: float = 0.0, b: float = 1.0) -> Tensor:
    """tensor ~ U(a, b), in place."""
    if not (math.isfinite(a) and math.isfinite(b)) or b < a:
        raise ValueError(f"uniform_: need finite a <= b, got a={a}, b={b}")
    return _write(tensor, backend.host_rng().uniform(a, b, tensor.shape).astype(np.float32))


def constant_(tensor: Tensor, val: float) -> Tensor:
    return _write(tensor, np.full(tensor.shape, val, dtype=np.float32))


def zeros_(tensor: Tensor) -> Tensor:
    return constant_(tensor, 0.0)


def ones_(tensor: Tensor) -> Tensor:
    return constant_(tensor, 1.0)
