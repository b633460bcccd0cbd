"""The fused neural-network ops: cross-entropy, layer norm, embedding, dropout, masked_fill, where.

Fused means one Function with a hand-derived backward instead of a chain of small ops: less memory,
fewer passes, and a backward with no log(0) or catastrophic cancellation.
Shapes: N rows, V classes (vocab), C channels.
"""
from __future__ import annotations

from typing import Any

from tinygpt import backend, cpu_kernels, cuda_kernels
from tinygpt.function import Function, unbroadcast
from tinygpt.ops.elementwise import as_operand
from tinygpt.tensor import Tensor


class CrossEntropy(Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index=-1):
        xp = ctx.xp
        ctx.fused = cuda_kernels.fusable(ctx.device, logits)
        if ctx.fused:  # CUDA: the same math, one block per row; backward recomputes softmax from lse
            loss, lse, n_valid = cuda_kernels.cross_entropy_forward(logits, targets, ignore_index)
            ctx.save_for_backward(logits, targets, lse, n_valid, ignore_index)
            return loss
        V = logits.shape[-1]
        z = logits.reshape(-1, V)                                # (N, V)
        t = targets.reshape(-1)                                  # (N,)
        valid = t != ignore_index
        t_safe = xp.where(valid, t, 0)
        shifted = z - z.max(axis=1, keepdims=True)
        e = xp.exp(shifted)
        sumexp = e.sum(axis=1, keepdims=True)
        rows = xp.arange(z.shape[0])
        # loss_n = log Σ_j e^{z_nj} - z_n,t  (computed on max-shifted logits)
        nll = xp.log(sumexp[:, 0]) - shifted[rows, t_safe]
        n_valid = valid.sum()
        ctx.save_for_backward(e / sumexp, t_safe, valid, n_valid, logits.shape)
        return (nll * valid).sum() / n_valid.astype(logits.dtype)

    @staticmethod
    def backward(ctx, g):  # dz = (softmax(z) - onehot(t)) / N_valid, zero on ignored rows
        if ctx.fused:
            return cuda_kernels.cross_entropy_backward(g, *ctx.saved_tensors), None
        p, t, valid, n_valid, shape = ctx.saved_tensors
        xp = ctx.xp
        rows = xp.arange(p.shape[0])
        d = p if ctx.last_use else p.copy()  # on its last use the saved softmax can be overwritten
        d[rows, t] -= 1
        d *= (valid / n_valid).astype(p.dtype)[:, None] * g
        return d.reshape(shape), None


class LayerNorm(Function):
    @staticmethod
    def forward(ctx, x, weight, bias=None, eps=1e-5):
        xp = ctx.xp
        if ctx.device.name == "cpu":                             # the same math, blocked and threaded
            y, xhat, rstd = cpu_kernels.layer_norm_forward(x, weight, bias, eps)
            ctx.save_for_backward(xhat, rstd, weight)
            return y
        if cuda_kernels.fusable(ctx.device, x, weight):        # the same math, one CUDA block per row
            y, xhat, rstd = cuda_kernels.layer_norm_forward(x, weight, bias, eps)
            ctx.save_for_backward(xhat, rstd, weight)
            return y
        mu = x.mean(axis=-1, keepdims=True)
        xc = x - mu
        var = (xc * xc).mean(axis=-1, keepdims=True)
        rstd = 1 / xp.sqrt(var + x.dtype.type(eps))              # (..., 1)
        xhat = xc * rstd                                         # (..., C)
        ctx.save_for_backward(xhat, rstd, weight)
        y = xhat * weight
        if bias is not None:
            y += bias
        return y

    @staticmethod
    def backward(ctx, g):
        # y = x̂ w + b, x̂ = (x - μ) r, r = 1/√(σ² + ε):
        # dx = r (dx̂ - mean(dx̂) - x̂ mean(dx̂ x̂)), dx̂ = g w;  dw = Σ g x̂;  db = Σ g
        xhat, rstd, w = ctx.saved_tensors
        nx, nw, *nb = ctx.needs_input_grad
        C = xhat.shape[-1]
        gx = gw = gb = None
        want_db = bool(nb and nb[0])
        if nx and ctx.device.name == "cpu":                      # dw and db come from the same pass
            gx, gw, gb = cpu_kernels.layer_norm_backward(g, xhat, rstd, w, bool(nw), want_db)
            return (gx, gw, gb, None) if nb else (gx, gw)
        if nx and cuda_kernels.fusable(ctx.device, g, xhat, w):
            gx = cuda_kernels.layer_norm_backward_dx(g, xhat, rstd, w)
        elif nx:
            dxhat = g * w
            gx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                         - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
        if nw:
            gw = unbroadcast((g * xhat).reshape(-1, C), (C,))
        if want_db:
            gb = unbroadcast(g.reshape(-1, C), (C,))
        return (gx, gw, gb, None) if nb else (gx, gw)


class Embedding(Function):
    @staticmethod
    def forward(ctx, idx, weight):
        ctx.save_for_backward(idx, weight.shape)
        return weight[idx]                                       # (..., C)

    @staticmethod
    def backward(ctx, g):  # dW[v] = Σ of g over every position whose id is v (a scatter-add)
        idx, shape = ctx.saved_tensors
        if ctx.device.name == "cpu":                             # sort + segment sums
            return None, cpu_kernels.embedding_backward(idx, g, shape[0])
        gw = ctx.xp.zeros(shape, dtype=g.dtype)
        backend.scatter_add(ctx.xp, gw, idx.reshape(-1), g.reshape(-1, shape[1]))
        return None, gw


class Dropout(Function):
    @staticmethod
    def forward(ctx, x, p):
        rng = backend.device_rng(ctx.device)
        keep = rng.random(x.shape, dtype=x.dtype) >= p
        mask = keep * x.dtype.type(1.0 / (1.0 - p))              # 0 or 1/(1-p)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, g):  # y = x m  =>  dx = g m
        (mask,) = ctx.saved_tensors
        return g * mask, None


class Where(Function):
    @staticmethod
    def forward(ctx, cond, a, b):
        ctx.save_for_backward(cond, a.shape, b.shape)
        return ctx.xp.where(cond, a, b)

    @staticmethod
    def backward(ctx, g):  # the gradient goes to whichever side was picked
        cond, sa, sb = ctx.saved_tensors
        _, na, nb = ctx.needs_input_grad
        zero = g.dtype.type(0)
        ga = unbroadcast(ctx.xp.where(cond, g, zero), sa) if na else None
        gb = unbroadcast(ctx.xp.where(cond, zero, g), sb) if nb else None
        return None, ga, gb


def _array(x: Any) -> Any:
    return x.data if isinstance(x, Tensor) else x


def cross_entropy(logits: Tensor, targets: Any, ignore_index: int = -1) -> Tensor:
    """Mean over non-ignored targets of -log softmax(logits)[target].

    logits (N, V) with targets (N,), or logits (B, T, V) with targets (B, T).
    """
    t = targets if isinstance(targets, Tensor) else Tensor(backend.to_device(targets, logits.device))
    if logits.shape[:-1] != t.shape:
        raise ValueError(f"cross_entropy: logits {logits.shape} need targets of shape {logits.shape[:-1]}, "
                         f"got {t.shape}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integer class ids, got dtype {t.dtype}")
    return CrossEntropy.apply(logits, t.detach() if isinstance(t, Tensor) else t, ignore_index=ignore_index)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalize the last axis to mean 0 and variance 1, then scale by weight and shift by bias: (..., C)."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"layer_norm: weight has shape {weight.shape}, expected ({x.shape[-1]},)")
    if bias is None:
        return LayerNorm.apply(x, weight, eps=eps)
    return LayerNorm.apply(x, weight, bias, eps)


def embedding(idx: Any, weight: Tensor) -> Tensor:
    """Rows of `weight` (V, C) picked by integer ids `idx` (...) -> (..., C).

    Ids outside [0, V) raise (CuPy would silently wrap them); on CUDA this check reads one flag back.
    """
    ids = _array(idx)
    if getattr(ids, "dtype", None) is None or ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be an integer array or Tensor, got {type(ids).__name__} "
                        f"of dtype {getattr(ids, 'dtype', None)}")
    if backend.device_of(ids) is not weight.device:
        raise backend.DeviceError(f"embedding: ids are on {backend.device_of(ids).name!r} but the table is "
                                  f"on {weight.device.name!r}; move them with .to({weight.device.name!r})")
    V = weight.shape[0]
    if ids.size and bool(((ids < 0) | (ids >= V)).any()):
        bad = backend.to_numpy(ids)
        bad = bad[(bad < 0) | (bad >= V)]
        raise IndexError(f"embedding: id {int(bad.flat[0])} is out of range for a table of {V} rows")
    return Embedding.apply(ids, weight)


def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p); identity when not training."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    return Dropout.apply(x, p)


def where(cond: Any, a: Any, b: Any) -> Tensor:
    """Elementwise `a if cond else b`, with broadcasting; a and b may be scalars."""
    like = a if isinstance(a, Tensor) else b
    a, b = as_operand(a, like), as_operand(b, like)
    c = _array(cond)
    if isinstance(like, Tensor) and backend.device_of(c) is not like.device:
        if isinstance(cond, Tensor):
            raise backend.DeviceError(f"where: the condition is on {cond.device.name!r} but the values are "
                                      f"on {like.device.name!r}; move it with .to({like.device.name!r})")
        c = backend.to_device(c, like.device)  # a host mask (NumPy array, list): copy it over
    return Where.apply(c, a, b)


def masked_fill(x: Tensor, mask: Any, value: float) -> Tensor:
    """x with `value` wherever mask is True (mask broadcasts against x); no gradient flows there."""
    return where(mask, value, x)
