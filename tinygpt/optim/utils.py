"""Helpers around an optimizer: gradient clipping, and weight-decay parameter groups."""
from __future__ import annotations

import math
import numbers
from typing import Any

from tinygpt import backend
from tinygpt.tensor import Tensor

__all__ = ["clip_grad_norm_", "weight_decay_groups"]


def _flat_params(params: Any) -> list[Tensor]:
    """A Tensor, an iterable of Tensors, or of param-group dicts -> a flat list of Tensors."""
    if isinstance(params, Tensor):
        return [params]
    out: list[Tensor] = []
    for item in params:
        out.extend(_flat_params(item["params"]) if isinstance(item, dict) else [item])
    return out


def clip_grad_norm_(params: Any, max_norm: float) -> Tensor:
    """Scale all gradients together so that their global L2 norm is at most `max_norm` (PyTorch's rule).

        ‖g‖ = √(Σ_p ‖g_p‖²)          over every parameter that has a .grad
        c   = min(1, max_norm / (‖g‖ + 1e-6))
        g_p ← c · g_p                  in place, always (a comparison would need the value on the host)

    Returns ‖g‖ before clipping as a 0-d Tensor on the gradients' device; `.item()` reads it (a sync).
    `max_norm` must be a finite number >= 0 (ValueError otherwise: inf or nan would scale every gradient
    by nan, a negative one would flip them).
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) or not math.isfinite(max_norm) \
            or max_norm < 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be a finite number >= 0, got {max_norm!r}")
    grads = [p.grad for p in _flat_params(params) if p.grad is not None]
    if not grads:
        return Tensor(backend.get_device().xp.zeros((), dtype="float32"))
    dev = backend.device_of(grads[0])
    xp = dev.xp
    for g in grads:
        if backend.device_of(g) is not dev:
            raise backend.DeviceError(f"clip_grad_norm_: gradients are on {dev.name!r} and "
                                      f"{backend.device_of(g).name!r}; move the model to one device")
    norms = xp.stack([xp.linalg.norm(g.reshape(-1)) for g in grads])  # ‖g_p‖ for each p
    total = xp.linalg.norm(norms)                                     # ‖g‖ = √(Σ ‖g_p‖²)
    coef = xp.minimum(max_norm / (total + 1e-6), 1.0)                 # c (stays on the device)
    for g in grads:
        g *= coef.astype(g.dtype)
    return Tensor._make(xp.asarray(total), dev, None)


def weight_decay_groups(model_or_named_params: Any, weight_decay: float) -> list[dict]:
    """Split parameters into two optimizer groups, as nanoGPT does:

        [{"params": every tensor with ndim >= 2 (matmul weights, embeddings), "weight_decay": weight_decay},
         {"params": the rest (biases, LayerNorm weights and biases),          "weight_decay": 0.0}]

    Accepts a Module (its unique named_parameters), or an iterable of Parameters or (name, Parameter)
    pairs. Parameters with requires_grad=False are left out.
    """
    if hasattr(model_or_named_params, "named_parameters"):
        params = [p for _, p in model_or_named_params.named_parameters()]
    else:
        params, seen = [], set()
        for item in model_or_named_params:
            p = item[1] if isinstance(item, tuple) else item
            if not isinstance(p, Tensor):
                raise TypeError(f"weight_decay_groups: expected a Module, Tensors or (name, Tensor) pairs, "
                                f"got a {type(p).__name__}")
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": float(weight_decay)},
            {"params": no_decay, "weight_decay": 0.0}]
