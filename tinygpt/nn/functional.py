"""`tinygpt.nn.functional` (import as F): torch.nn.functional's names and signatures over tinygpt's ops.

    from tinygpt.nn import functional as F
    probs = F.softmax(logits, dim=-1)                  # (B, V)
    loss = F.cross_entropy(logits, targets)            # logits (N, C), targets (N,)

Where torch's signature differs from tinygpt.functional's (the engine's own, NumPy-named module),
torch's wins here:
    softmax / log_softmax(input, dim)                  tinygpt.functional: softmax(x, axis=-1)
    layer_norm(input, normalized_shape, weight, bias)  tinygpt.functional: layer_norm(x, weight, bias)
    cross_entropy: classes on dim 1 for (N, C, d1...) inputs, ignore_index=-100, reduction=
                                                       tinygpt.functional: classes on the last axis, -1
    scaled_dot_product_attention(..., is_causal=False) tinygpt.functional: causal=True
Everything else is the same function as in tinygpt.functional.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinygpt import backend, ops
from tinygpt.functional import (  # noqa: F401  (the same in both)
    dropout, embedding, exp, gelu, linear, log, masked_fill, matmul, relu, sigmoid, sqrt, tanh, where)
from tinygpt.tensor import Tensor, tensor


def softmax(input: Tensor, dim: int = -1) -> Tensor:
    """exp(x_i) / Σ_j exp(x_j) along `dim` (the row max is subtracted first)."""
    return ops.softmax(input, dim)


def log_softmax(input: Tensor, dim: int = -1) -> Tensor:
    return ops.log_softmax(input, dim)


def layer_norm(input: Tensor, normalized_shape: Any, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalize the last axis (normalized_shape must be (C,)) to mean 0, variance 1, then x̂ w + b."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if shape != input.shape[-len(shape):] or len(shape) != 1:
        raise ValueError(f"layer_norm: normalized_shape {shape} must be the last axis of the input, "
                         f"({input.shape[-1]},) for shape {input.shape}")
    if weight is None:
        xp = input.device.xp
        weight = Tensor(xp.ones(shape, dtype=input.dtype))      # no affine transform: w = 1
    return ops.layer_norm(input, weight, bias, eps)


def cross_entropy(input: Tensor, target: Any, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """-log softmax(input)[target], averaged over the targets that are not ignore_index.

    input (N, C) with target (N,), or (N, C, d1, ...) with target (N, d1, ...): classes on dim 1, as in
    torch. reduction: "mean" (default), "sum", or "none" (one loss per target, 0 where ignored).
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', not {reduction!r}")
    t = target if isinstance(target, Tensor) else tensor(target)
    if input.ndim > 2:                                          # (N, C, d1...) -> (N, d1..., C)
        input = input.permute(0, *range(2, input.ndim), 1)
    if reduction == "mean":
        return ops.cross_entropy(input, t, ignore_index=ignore_index)
    if input.shape[:-1] != t.shape:
        raise ValueError(f"cross_entropy: input {input.shape} needs targets of shape {input.shape[:-1]}, "
                         f"got {t.shape}")
    valid = t.data != ignore_index
    safe = Tensor(input.device.xp.where(valid, t.data, 0))
    flat = ops.log_softmax(input, -1).reshape(-1, input.shape[-1])            # (N, C)
    rows = input.device.xp.arange(flat.shape[0])
    losses = -flat[rows, safe.data.reshape(-1)] * Tensor(valid.reshape(-1).astype(input.dtype))   # (N,)
    return losses.reshape(t.shape) if reduction == "none" else losses.sum()


def one_hot(tensor: Any, num_classes: int = -1) -> Tensor:
    """Integer ids (...) -> (..., num_classes) int64 rows with a 1 at each id, as torch's (makemore's
    F.one_hot(xs, num_classes=27).float() @ W). num_classes=-1: the largest id + 1. No gradient."""
    ids = tensor.data if isinstance(tensor, Tensor) else np.asarray(tensor)
    xp = backend.get_array_module(ids)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"one_hot: ids must be integers (torch.long), not {ids.dtype}")
    if ids.size and int(ids.min()) < 0:
        raise ValueError("one_hot: ids must be >= 0")
    n = int(ids.max()) + 1 if num_classes == -1 and ids.size else int(num_classes)
    if n < 0 or (ids.size and int(ids.max()) >= n):
        raise ValueError(f"one_hot: num_classes={num_classes} is too small for ids up to "
                         f"{int(ids.max()) if ids.size else None}")
    return Tensor((ids[..., None] == xp.arange(n)).astype(np.int64))


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Any = None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None) -> Tensor:
    """softmax(q kᵀ · scale) v over (B, H, T, hs) tensors; is_causal=True masks the future."""
    if attn_mask is not None:
        raise NotImplementedError("scaled_dot_product_attention: attn_mask is not supported; "
                                  "use is_causal=True for the causal mask")
    return ops.scaled_dot_product_attention(query, key, value, causal=is_causal, dropout_p=dropout_p,
                                            scale=scale)
