"""The fused neural-network ops: cross-entropy, layer norm, embedding, dropout, masked_fill, where.

Fused means one Function with a hand-derived backward instead of a chain of small ops: less memory,
fewer passes, and a backward with no log(0) or catastrophic cancellation.
Shapes: N rows, V classes (vocab), C channels.

Reference first, kernel second: the math of cross-entropy, layer norm and the embedding's backward is
written out as plain array code (the _functions below, with shapes); the Function runs it, or hands the
same math to a kernel when `kernels.fused` answers "cpu" (tinygpt/cpu_kernels.py) or "cuda"
(tinygpt/cuda/kernels.py). TINYGPT_KERNELS=reference runs the references alone (tinygpt/kernels.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from tinygpt import backend, cpu_kernels, kernels
from tinygpt.cuda import kernels as cuda_kernels
from tinygpt.function import Function, unbroadcast
from tinygpt.ops.elementwise import as_operand
from tinygpt.tensor import Tensor


# --- cross-entropy ----------------------------------------------------------------------------------------
def _cross_entropy(xp, logits, targets, ignore_index):
    """loss = Σ_n valid_n (log Σ_j e^(z_nj) − z_n,t_n) / n_valid over rows z = logits (N, V), t = targets (N,)
    (any leading axes are flattened into N). Returns (loss (0-d), what the backward needs)."""
    V = logits.shape[-1]
    z = logits.reshape(-1, V)                                # (N, V)
    t = targets.reshape(-1)                                  # (N,)
    valid = t != ignore_index                                # (N,)
    t_safe = xp.where(valid, t, 0)
    shifted = z - z.max(axis=1, keepdims=True)               # (N, V): e^shifted cannot overflow
    e = xp.exp(shifted)
    sumexp = e.sum(axis=1, keepdims=True)                    # (N, 1)
    rows = xp.arange(z.shape[0])
    nll = xp.log(sumexp[:, 0]) - shifted[rows, t_safe]       # (N,) loss_n = log Σ_j e^{z_nj} − z_n,t
    n_valid = valid.sum()
    loss = (nll * valid).sum() / n_valid.astype(logits.dtype)
    return loss, (e / sumexp, t_safe, valid, n_valid, logits.shape)   # softmax (N, V), ...


def _cross_entropy_grad(xp, g, p, t, valid, n_valid, shape, overwrite=False):
    """dz = (softmax(z) − onehot(t)) · g / n_valid, 0 on ignored rows; p = softmax(z) (N, V), back to `shape`.
    overwrite=True writes into p (its last use)."""
    rows = xp.arange(p.shape[0])
    d = p if overwrite else p.copy()
    d[rows, t] -= 1
    d *= (valid / n_valid).astype(p.dtype)[:, None] * g
    return d.reshape(shape)


class CrossEntropy(Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index=-1):
        ctx.fused = kernels.fused(ctx.device, logits) == "cuda"
        if ctx.fused:  # the same math, one CUDA block per row; the backward recomputes softmax from lse
            loss, lse, n_valid = cuda_kernels.cross_entropy_forward(logits, targets, ignore_index)
            ctx.save_for_backward(logits, targets, lse, n_valid, ignore_index)
            return loss
        loss, saved = _cross_entropy(ctx.xp, logits, targets, ignore_index)
        ctx.save_for_backward(*saved)
        return loss

    @staticmethod
    def backward(ctx, g):
        if ctx.fused:
            return cuda_kernels.cross_entropy_backward(g, *ctx.saved_tensors), None
        # on its last use the saved softmax can be overwritten
        return _cross_entropy_grad(ctx.xp, g, *ctx.saved_tensors, overwrite=ctx.last_use), None


# --- layer norm -------------------------------------------------------------------------------------------
def _layer_norm(xp, x, w, b, eps):
    """y = x̂ w + b, x̂ = (x − μ) r, r = 1/√(σ² + ε), μ and σ² over the last axis of x (..., C); w, b (C,).
    Returns (y (..., C), x̂ (..., C), r (..., 1))."""
    mu = x.mean(axis=-1, keepdims=True)                      # (..., 1)
    xc = x - mu
    var = (xc * xc).mean(axis=-1, keepdims=True)             # (..., 1)
    rstd = 1 / xp.sqrt(var + x.dtype.type(eps))              # (..., 1)
    xhat = xc * rstd                                         # (..., C)
    y = xhat * w
    if b is not None:
        y += b
    return y, xhat, rstd


def _layer_norm_grad_x(g, xhat, rstd, w):
    """dx = r (dx̂ − mean(dx̂) − x̂ mean(dx̂ x̂)), dx̂ = g w, means over the last axis: (..., C)."""
    dxhat = g * w
    return rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                   - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))


class LayerNorm(Function):
    @staticmethod
    def forward(ctx, x, weight, bias=None, eps=1e-5):
        fused = kernels.fused(ctx.device, x, weight)
        if fused == "cpu":                                       # the same math, blocked and threaded
            y, xhat, rstd = cpu_kernels.layer_norm_forward(x, weight, bias, eps)
        elif fused == "cuda":                                    # the same math, one CUDA block per row
            y, xhat, rstd = cuda_kernels.layer_norm_forward(x, weight, bias, eps)
        else:
            y, xhat, rstd = _layer_norm(ctx.xp, x, weight, bias, eps)
        ctx.save_for_backward(xhat, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, g):  # dx (above), dw = Σ g x̂, db = Σ g: sums over every row
        xhat, rstd, w = ctx.saved_tensors
        nx, nw, *nb = ctx.needs_input_grad
        C = xhat.shape[-1]
        gx = gw = gb = None
        want_db = bool(nb and nb[0])
        fused = kernels.fused(ctx.device, g, xhat, w) if nx else None
        if fused == "cpu":                                       # dw and db come from the same pass
            gx, gw, gb = cpu_kernels.layer_norm_backward(g, xhat, rstd, w, bool(nw), want_db)
            return (gx, gw, gb, None) if nb else (gx, gw)
        if fused == "cuda":
            gx = cuda_kernels.layer_norm_backward_dx(g, xhat, rstd, w)
        elif nx:
            gx = _layer_norm_grad_x(g, xhat, rstd, w)
        if nw:
            gw = unbroadcast((g * xhat).reshape(-1, C), (C,))
        if want_db:
            gb = unbroadcast(g.reshape(-1, C), (C,))
        return (gx, gw, gb, None) if nb else (gx, gw)


# --- embedding --------------------------------------------------------------------------------------------
def _embedding_grad(xp, idx, g, shape):
    """dW[v] = Σ of g over every position whose id is v: ids (...) and g (..., C) -> (V, C), a scatter-add."""
    gw = xp.zeros(shape, dtype=g.dtype)
    backend.scatter_add(xp, gw, idx.reshape(-1), g.reshape(-1, shape[1]))
    return gw


class Embedding(Function):
    @staticmethod
    def forward(ctx, idx, weight):
        ctx.save_for_backward(idx, weight.shape)
        return weight[idx]                                       # (..., C)

    @staticmethod
    def backward(ctx, g):
        idx, shape = ctx.saved_tensors
        if kernels.fused(ctx.device, g) == "cpu":                # the same sums: sort + segment sums
            return None, cpu_kernels.embedding_backward(idx, g, shape[0])
        return None, _embedding_grad(ctx.xp, idx, g, shape)


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
        out = ctx.xp.where(cond, a, b) if ctx.xp is not np else _pick(cond, a, b)
        return out

    @staticmethod
    def backward(ctx, g):  # the gradient goes to whichever side was picked
        cond, sa, sb = ctx.saved_tensors
        _, na, nb = ctx.needs_input_grad
        zero = g.dtype.type(0)
        pick = ctx.xp.where if ctx.xp is not np else _pick
        ga = unbroadcast(pick(cond, g, zero), sa) if na else None
        gb = unbroadcast(pick(cond, zero, g), sb) if nb else None
        return None, ga, gb


def _pick(cond, a, b):
    """np.where(cond, a, b). Where b alone has the result's shape and dtype (masked_fill: b is x, a the fill
    value), as a copy of b with a written where cond holds: twice as fast (37 against 79 µs for a
    (32, 64, 64) float32 x under a broadcast (64, 64) mask); likewise with the roles swapped."""
    shape = np.broadcast_shapes(np.shape(cond), np.shape(a), np.shape(b))
    dtype = np.result_type(a, b)
    if np.shape(b) == shape and b.dtype == dtype:
        out = b.copy()
        np.copyto(out, a, where=cond)
        return out
    if np.shape(a) == shape and a.dtype == dtype:
        out = a.copy()
        np.copyto(out, b, where=~np.asarray(cond))
        return out
    return np.where(cond, a, b)


def _array(x: Any) -> Any:
    return x.data if isinstance(x, Tensor) else x


def cross_entropy(logits: Tensor, targets: Any, ignore_index: int = -1) -> Tensor:
    """Mean over non-ignored targets of -log softmax(logits)[target].

    logits (N, V) with targets (N,), or logits (B, T, V) with targets (B, T). A target outside [0, V) that
    is not ignore_index raises IndexError; on a GPU without a sync: the device keeps the first bad target and
    the next read of a device value (loss.item(), the trainer's log line) raises (backend.flag_bad_ids).
    """
    t = targets if isinstance(targets, Tensor) else Tensor(backend.to_device(targets, logits.device))
    if logits.shape[:-1] != t.shape:
        raise ValueError(f"cross_entropy: logits {logits.shape} need targets of shape {logits.shape[:-1]}, "
                         f"got {t.shape}")
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: targets must be integer class ids, got dtype {t.dtype}")
    V = logits.shape[-1]              # a target outside [0, V) would index past the row (or wrap, on CUDA)
    if logits.device.name != "cpu":   # the same error, raised at the next read instead of a sync here
        backend.flag_bad_ids(t.data, V, f"cross_entropy: target {{}} is out of range for {V} classes: targets "
                                        f"must be in [0, {V}) or equal ignore_index={ignore_index}", ignore_index,
                             logits.device)
    elif t.data.size and bool(((t.data != ignore_index) & ((t.data < 0) | (t.data >= V))).any()):
        bad = backend.to_numpy(t.data)
        bad = bad[(bad != ignore_index) & ((bad < 0) | (bad >= V))]
        raise IndexError(f"cross_entropy: target {int(bad.flat[0])} is out of range for {V} classes: targets "
                         f"must be in [0, {V}) or equal ignore_index={ignore_index}")
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

    Ids outside [0, V) raise IndexError (CuPy would silently wrap them); on a GPU without a sync: the device
    keeps the first bad id and the next read of a device value raises (backend.flag_bad_ids).
    """
    ids = _array(idx)
    if getattr(ids, "dtype", None) is None or ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: ids must be an integer array or Tensor, got {type(ids).__name__} "
                        f"of dtype {getattr(ids, 'dtype', None)}")
    if backend.device_of(ids) is not weight.device:
        raise backend.DeviceError(f"embedding: ids are on {backend.device_of(ids).name!r} but the table is "
                                  f"on {weight.device.name!r}; move them with .to({weight.device.name!r})")
    V = weight.shape[0]
    if weight.device.name != "cpu":   # the same error, raised at the next read instead of a sync here
        backend.flag_bad_ids(ids, V, f"embedding: id {{}} is out of range for a table of {V} rows",
                             device=weight.device)
    elif ids.size and bool(((ids < 0) | (ids >= V)).any()):
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
