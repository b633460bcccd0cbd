"""Scaled dot-product attention as one fused op, all heads at once (no Python loop over heads).

    S = q kᵀ · scale            (B, H, Tq, Tk)    scale = hs^-0.5 by default
    S = S masked to -inf above the causal diagonal
    P = softmax(S, axis=-1)
    P = dropout(P)              (training only)
    y = P v                     (B, H, Tq, hs)

Backward, with g = dL/dy:
    dv = Pᵀ g,   dP = g vᵀ,   dS = P ⊙ (dP - Σ_k dP ⊙ P) · scale,   dq = dS k,   dk = dSᵀ q

With a KV cache the queries are the last Tq of Tk positions, so query i may see keys 0..(Tk-Tq+i).

Reference first, kernel second: the softmax step and its backward are written out below (_softmax_scores,
_softmax_scores_grad); the op hands the same math to a kernel when `kernels.fused` answers "cpu"
(tinygpt/cpu_kernels.py: blocked and threaded) or "cuda" (tinygpt/cuda/kernels.py: one block per row).
TINYGPT_KERNELS=reference runs the reference alone (tinygpt/kernels.py).
"""
from __future__ import annotations

import math

import numpy as np

from tinygpt import backend, cpu_kernels, cpu_linear, kernels
from tinygpt.cuda import kernels as cuda_kernels
from tinygpt.function import Function
from tinygpt.tensor import Tensor


def causal_mask(xp, Tq: int, Tk: int):
    """(Tq, Tk) bool, True where query i must NOT see key j (j > i + Tk - Tq)."""
    return xp.triu(xp.ones((Tq, Tk), dtype=bool), k=Tk - Tq + 1)


_additive_masks: dict = {}
_MAX_MASKS = 8          # training needs one shape; uncached generation would otherwise keep one per length


def _additive_causal_mask(Tq: int, Tk: int, dtype):
    """(Tq, Tk) NumPy array of 0 (may see) and -inf (may not), cached: adding it is one pass."""
    key = (Tq, Tk, dtype)
    if key not in _additive_masks:
        if len(_additive_masks) >= _MAX_MASKS:
            _additive_masks.pop(next(iter(_additive_masks)))       # the oldest
        m = causal_mask(np, Tq, Tk)
        _additive_masks[key] = np.where(m, -np.inf, 0).astype(dtype)
    return _additive_masks[key]


def _transposed(ctx, a, n_queries: int):
    """aᵀ over the last two axes (a: (..., Tk, hs)) for a product with n_queries rows: a view, or on the CPU
    a contiguous copy where that pays. Measured (one core): NumPy's batched matmul with a transposed second
    operand takes 1.25-1.3x as long on short sequences (T = 64; the copy costs less than that), about the
    same on long ones (T = 256: the copy makes it 5% slower), and with a few queries against a long key
    cache (KV-cached generation, Tq = 1..16) the copy costs up to 10x the product itself."""
    t = a.swapaxes(-1, -2)
    return np.ascontiguousarray(t) if _copies_transpose(ctx, a, n_queries) else t


def _copies_transpose(ctx, a, n_queries: int) -> bool:
    return ctx.xp is np and n_queries >= 32 and a.shape[-2] <= 128


def _softmax_scores(xp, s, scale, causal):
    """P = softmax(S · scale, causally masked) over the last axis, in place of S (B, H, Tq, Tk)."""
    Tq, Tk = s.shape[-2], s.shape[-1]
    s *= scale
    if causal:
        s[..., causal_mask(xp, Tq, Tk)] = -xp.inf
    s -= s.max(axis=-1, keepdims=True)
    p = xp.exp(s, out=s)
    p /= p.sum(axis=-1, keepdims=True)
    return p


def _softmax_scores_grad(dp, p, scale):
    """dS = P ⊙ (dP − Σ_k dP ⊙ P) · scale, in place of dP (B, H, Tq, Tk)."""
    dp -= (dp * p).sum(axis=-1, keepdims=True)
    dp *= p
    dp *= scale
    return dp


class ScaledDotProductAttention(Function):
    @staticmethod
    def forward(ctx, q, k, v, causal=True, dropout_p=0.0, scale=None):
        Tq, Tk = q.shape[-2], k.shape[-2]
        causal = causal and Tq > 1        # one query (KV-cached decoding) is the newest position: sees every key
        scale = q.dtype.type(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
        if dropout_p == 0.0 and kernels.fused(ctx.device, q, k, v) == "cpu":
            # the same math, batch entries shared out over the CPU's threads (tinygpt/cpu_linear.py)
            mask = _additive_causal_mask(Tq, Tk, q.dtype) if causal else None
            y, p = cpu_linear.attention_forward(q, k, v, scale, mask, causal, _copies_transpose(ctx, k, Tq))
            ctx.save_for_backward(q, k, v, p, None, scale)
            return y
        s = q @ _transposed(ctx, k, Tq)                           # (B, H, Tq, Tk)
        fused = kernels.fused(ctx.device, s)
        if fused == "cpu":                                        # the same math, blocked and threaded
            mask = _additive_causal_mask(Tq, Tk, s.dtype) if causal else None
            p = cpu_kernels.softmax_lastaxis_(s, scale, mask, causal=causal)
        elif fused == "cuda":                                     # scale, mask and softmax in one kernel
            p = cuda_kernels.softmax_forward(s, scale, causal=causal, inplace=True)
        else:
            p = _softmax_scores(ctx.xp, s, scale, causal)
        mask = None
        if dropout_p > 0.0:
            keep = backend.device_rng(ctx.device).random(p.shape, dtype=p.dtype) >= dropout_p
            mask = keep * p.dtype.type(1.0 / (1.0 - dropout_p))
            pd = p * mask
        else:
            pd = p
        ctx.save_for_backward(q, k, v, p, mask, scale)
        return pd @ v                                             # (B, H, Tq, hs)

    @staticmethod
    def backward(ctx, g):
        q, k, v, p, mask, scale = ctx.saved_tensors
        nq, nk, nv = ctx.needs_input_grad
        if mask is None and kernels.fused(ctx.device, g, q, k, v, p) == "cpu":
            return cpu_linear.attention_backward(g, q, k, v, p, scale, _copies_transpose(ctx, v, g.shape[-2]))
        pd = p if mask is None else p * mask
        dv = pd.swapaxes(-1, -2) @ g if nv else None              # (B, H, Tk, hs)
        dp = g @ _transposed(ctx, v, g.shape[-2])                 # (B, H, Tq, Tk)
        if mask is not None:
            dp *= mask
        fused = kernels.fused(ctx.device, dp, p)                  # the softmax backward, in place of dP
        if fused == "cpu":
            cpu_kernels.softmax_backward_(dp, p, scale)
        elif fused == "cuda":
            dp = cuda_kernels.softmax_backward(dp, p, scale, inplace=True)
        else:
            dp = _softmax_scores_grad(dp, p, scale)
        dq = dp @ k if nq else None                               # (B, H, Tq, hs)
        dk = dp.swapaxes(-1, -2) @ q if nk else None              # (B, H, Tk, hs)
        return dq, dk, dv


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True,
                                 dropout_p: float = 0.0, scale: float | None = None) -> Tensor:
    """softmax(q kᵀ · scale, causally masked) v for q (B, H, Tq, hs), k and v (B, H, Tk, hs)."""
    if q.shape[-1] != k.shape[-1] or k.shape != v.shape:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit "
                         "(need q (..., Tq, hs) and k, v (..., Tk, hs))")
    if causal and q.shape[-2] > k.shape[-2]:
        raise ValueError(f"attention: {q.shape[-2]} queries but only {k.shape[-2]} keys")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    return ScaledDotProductAttention.apply(q, k, v, causal=causal, dropout_p=dropout_p, scale=scale)
