"""Matrix products: `matmul` (the @ operator) and the fused `linear` (x @ W.T + b).

Shapes follow NumPy's matmul: 1-D operands get a temporary axis, and batch axes broadcast, e.g.
(B, T, C) @ (C, D) -> (B, T, D) and (B, H, T, hs) @ (B, H, hs, T) -> (B, H, T, T).
Gradients: for Y = A @ B, dA = dY @ Bᵀ and dB = Aᵀ @ dY, summed over broadcast batch axes.
Every GEMM is `_mm(a, b)`, tinygpt.kernels.matmul: a @ b, or on CUDA a float16/bfloat16 GEMM when chosen
with tinygpt.cuda.set_matmul_precision (docs/GPU.md).
"""
from __future__ import annotations

from typing import Any

from tinygpt import cpu_linear, cpu_threads, kernels
from tinygpt.kernels import matmul as _mm
from tinygpt.function import Function, unbroadcast
from tinygpt.ops.elementwise import as_operand
from tinygpt.tensor import Tensor


def _mT(x: Any) -> Any:
    return x.swapaxes(-1, -2)


def _flat2d(x: Any) -> Any:
    """(..., K) -> (N, K): stacks all leading axes into one, so one GEMM does a whole batch."""
    return x.reshape(-1, x.shape[-1])


class MatMul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _mm(a, b)

    @staticmethod
    def backward(ctx, g):  # dA = dY @ Bᵀ, dB = Aᵀ @ dY (with 1-D operands lifted to 2-D)
        a, b = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        a2 = a[None, :] if a.ndim == 1 else a          # (K,) -> (1, K)
        b2 = b[:, None] if b.ndim == 1 else b          # (K,) -> (K, 1)
        g2 = g                                          # lift g the same way (b first: 1-D·1-D g is 0-d)
        if b.ndim == 1:
            g2 = g2[..., None]
        if a.ndim == 1:
            g2 = g2[..., None, :]

        def grad_a():                                   # dA = dY @ Bᵀ
            return unbroadcast(_mm(g2, _mT(b2)), a2.shape).reshape(a.shape)

        def grad_b():                                   # dB = Aᵀ @ dY
            if b2.ndim == 2 and a2.ndim > 2:            # (B,T,C)@(C,D): dB = Σ_bt a_btᵀ g_bt, one GEMM
                return _mm(_flat2d(a2).T, _flat2d(g2)).reshape(b.shape)
            return unbroadcast(_mm(_mT(a2), g2), b2.shape).reshape(b.shape)

        if na and nb and kernels.fused(ctx.device, a, b, g) == "cpu":
            return cpu_threads.both(grad_a, grad_b)     # the same two products, at once on the CPU's threads
        return (grad_a() if na else None), (grad_b() if nb else None)


class Linear(Function):
    """y = x @ Wᵀ + b with W of shape (out, in) as in torch.nn.Linear; x is (..., in)."""

    @staticmethod
    def forward(ctx, x, w, b=None):
        ctx.save_for_backward(x, w)
        if kernels.fused(ctx.device, x, w) == "cpu":    # the same math, by row blocks over the CPU's threads
            return cpu_linear.linear_forward(_flat2d(x), w, b).reshape(x.shape[:-1] + (w.shape[0],))
        # one GEMM over all rows: NumPy's matmul of a 3-D x would loop over the batch axis instead
        y = _mm(_flat2d(x), w.T).reshape(x.shape[:-1] + (w.shape[0],))   # (..., out)
        if b is not None:
            y += b
        return y

    @staticmethod
    def backward(ctx, g):  # dx = g W, dW = gᵀ x (summed over all rows), db = Σ g
        x, w = ctx.saved_tensors
        nx, nw, *nb = ctx.needs_input_grad
        g2 = _flat2d(g)                                 # (N, out)
        if kernels.fused(ctx.device, g2, x, w) == "cpu":   # the same math; dx and dW on separate threads
            gx, gw, gb = cpu_linear.linear_backward(g2, _flat2d(x), w, nx, nw, bool(nb and nb[0]))
            gx = None if gx is None else gx.reshape(x.shape)
            return (gx, gw, gb) if nb else (gx, gw)
        gx = _mm(g2, w).reshape(x.shape) if nx else None   # (..., in)
        gw = _mm(g2.T, _flat2d(x)) if nw else None     # (out, in)
        gb = None
        if nb and nb[0]:
            gb = unbroadcast(g2, (g2.shape[1],))
        return (gx, gw, gb) if nb else (gx, gw)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    a, b = as_operand(a, b), as_operand(b, a)  # a NumPy operand takes the tensor's dtype and device
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError("matmul: both operands need at least 1 dimension; use * for a scalar")
    if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not fit "
                         f"({a.shape[-1]} != {b.shape[-2 if b.ndim > 1 else 0]})")
    return MatMul.apply(a, b)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias: (..., in) with (out, in) -> (..., out)."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"linear: input has {x.shape[-1]} features but weight {weight.shape} expects "
                         f"{weight.shape[-1]}")
    if bias is None:
        return Linear.apply(x, weight)
    return Linear.apply(x, weight, bias)
