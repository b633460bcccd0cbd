"""Ops of the speedrun-style GPT options (GPTConfig norm="rmsnorm", activation="relu2", rope=True): RMSNorm,
ReLU² and the rotary position embedding, each a Function with its forward and hand-derived backward side by
side, as plain array code on any device (reference math; no fused kernel yet). Shapes: C channels, hs head
size, T positions.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinygpt import backend
from tinygpt.function import Function, unbroadcast
from tinygpt.tensor import Tensor

__all__ = ["rms_norm", "relu_squared", "rotary", "rotary_tables"]


# --- RMSNorm (Zhang & Sennrich 2019) ----------------------------------------------------------------------
class RMSNorm(Function):
    """y = x̂ w with x̂ = x · r, r = 1 / √(mean(x², last axis) + ε): no mean subtracted, no bias."""

    @staticmethod
    def forward(ctx, x, weight, eps=1e-5):
        xp = ctx.xp
        C = x.shape[-1]
        ms = (x * x).sum(-1, keepdims=True) / C                  # mean(x²) (..., 1)
        r = 1.0 / xp.sqrt(ms + eps)                              # r (..., 1)
        xhat = x * r                                             # x̂ (..., C)
        ctx.save_for_backward(xhat, r, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, g):
        # y = x̂ w, x̂_i = x_i r, ∂r/∂x_j = −r³ x_j / C  =>  dx = r (g w − x̂ · mean(g w x̂))
        xhat, r, w = ctx.saved_tensors
        nx, nw = ctx.needs_input_grad[:2]
        C = xhat.shape[-1]
        gx = gw = None
        if nx:
            gxhat = g * w                                        # ∂L/∂x̂
            gx = r * (gxhat - xhat * ((gxhat * xhat).sum(-1, keepdims=True) / C))
        if nw:
            gw = unbroadcast((g * xhat).reshape(-1, C), (C,))    # dw = Σ over rows of g x̂
        return gx, gw


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """Scale the last axis to root-mean-square 1, then multiply by weight (C,): (..., C) -> (..., C)."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight has shape {weight.shape}, expected ({x.shape[-1]},)")
    return RMSNorm.apply(x, weight, eps=eps)


# --- ReLU² (So et al. 2021, "Primer") ---------------------------------------------------------------------
class ReLUSquared(Function):
    """y = max(x, 0)²;  dy/dx = 2 max(x, 0)."""

    @staticmethod
    def forward(ctx, x):
        r = ctx.xp.maximum(x, 0)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, g):
        (r,) = ctx.saved_tensors
        return g * (2 * r)


def relu_squared(x: Tensor) -> Tensor:
    return ReLUSquared.apply(x)


# --- rotary position embedding (Su et al. 2021, RoFormer) ---------------------------------------------------
def rotary_tables(positions: int | tuple[int, int], head_size: int, base: float = 10000.0,
                  device: Any = None, dtype: Any = np.float32) -> tuple[Any, Any]:
    """cos and sin (T, hs/2) of the angles θ_{t,i} = t · base^(−2i/hs), for t in range(start, stop) (or
    range(T) for an int), computed in float64 and stored in `dtype` on `device`."""
    start, stop = (0, positions) if isinstance(positions, int) else positions
    if head_size % 2:
        raise ValueError(f"rotary embedding needs an even head size, got {head_size}")
    inv_freq = base ** (-np.arange(0, head_size, 2, dtype=np.float64) / head_size)      # (hs/2,)
    angles = np.arange(start, stop, dtype=np.float64)[:, None] * inv_freq[None, :]      # (T, hs/2)
    dev = backend.get_device(device) if device is not None else backend.get_device("cpu")
    return (backend.to_device(np.cos(angles).astype(dtype), dev),
            backend.to_device(np.sin(angles).astype(dtype), dev))


class Rotary(Function):
    """Rotate each pair (x1_i, x2_i) = (x[..., i], x[..., hs/2 + i]) of the last axis by the angle θ_{t,i}
    of its position t (axis −2):
        y1 = x1 cos θ + x2 sin θ,   y2 = −x1 sin θ + x2 cos θ
    A rotation: its backward is the rotation by −θ, gx1 = g1 cos θ − g2 sin θ, gx2 = g1 sin θ + g2 cos θ.
    q·k after rotating both depends on the positions only through their difference."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        xp = ctx.xp
        h = x.shape[-1] // 2
        x1, x2 = x[..., :h], x[..., h:]
        ctx.save_for_backward(cos, sin)
        return xp.concatenate([x1 * cos + x2 * sin, x2 * cos - x1 * sin], axis=-1).astype(x.dtype, copy=False)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        h = g.shape[-1] // 2
        g1, g2 = g[..., :h], g[..., h:]
        gx = ctx.xp.concatenate([g1 * cos - g2 * sin, g1 * sin + g2 * cos], axis=-1).astype(g.dtype, copy=False)
        return gx, None, None


def rotary(x: Tensor, cos: Any, sin: Any) -> Tensor:
    """x (..., T, hs) rotated by the tables (T, hs/2) of `rotary_tables` (constants: no gradient)."""
    T, hs = x.shape[-2], x.shape[-1]
    if hs % 2 or tuple(cos.shape) != (T, hs // 2) or tuple(sin.shape) != (T, hs // 2):
        raise ValueError(f"rotary: x (..., {T}, {hs}) needs cos and sin of shape ({T}, {hs // 2}), "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    cos = cos.data if isinstance(cos, Tensor) else cos
    sin = sin.data if isinstance(sin, Tensor) else sin
    return Rotary.apply(x, cos.astype(x.dtype, copy=False), sin.astype(x.dtype, copy=False))
