"""Fused CUDA kernels for the ops where CuPy's generic path makes many passes over memory.

    op (tinygpt/ops, optim)            kernel                          kind
    GELU forward / backward            tg_gelu_{fwd,bwd}, _tanh_       ElementwiseKernel: 1 pass instead of ~6
    LayerNorm forward / dx             tg_layer_norm_{fwd,bwd}         RawKernel, one block per row
    Softmax, LogSoftmax (last axis)    tg_softmax_{fwd,bwd}            RawKernel, one block per row
    attention's softmax                tg_softmax_{fwd,bwd}            the same, with scale and causal mask fused
    CrossEntropy forward / backward    tg_cross_entropy_fwd, _bwd      RawKernel per row / ElementwiseKernel
    Adam / AdamW step                  tg_adam                         ElementwiseKernel, one launch per parameter
    id checks (embedding, targets)     tg_flag_bad_ids                 RawKernel, one block: the device's error flag

The CUDA C source is in tinygpt/cuda/sources.py, generated per dtype (float16, float32, float64; the
arithmetic is float for float16); tg_flag_bad_ids's is below. Kernels are compiled on first use and cached
(the RawModule, each of its functions, each ElementwiseKernel and RawKernel), by CuPy on disk too.

No function here reads a device value on the host: scalars that change every step (Adam's bias
corrections) are Python floats computed from the host's step counter, and the ones that live on the
device (cross-entropy's upstream gradient and count of valid targets) are read inside the kernel. So a
training step queues its kernels and never waits for the GPU.

This module does not import CuPy; it asks `tinygpt.backend` for it when a kernel is first built. The ops
call these functions when `tinygpt.kernels.fused` answers "cuda"; TINYGPT_KERNELS=reference (or
`with tinygpt.kernels.disabled():`) runs the ops' reference math instead, e.g. to compare the two.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np  # host-side scalars and dtype names only, never called on a device array

from tinygpt import backend
from tinygpt.cuda.sources import ctype, elementwise_spec, row_launch, row_module_source


# --- building the kernels (once per dtype) --------------------------------------------------------------
def _cupy() -> Any:
    return backend.get_device("cuda").xp


@lru_cache(maxsize=None)
def row_module(dtype_name: str) -> Any:
    """The CuPy RawModule with every row kernel for this dtype."""
    return _cupy().RawModule(code=row_module_source(dtype_name))


@lru_cache(maxsize=None)
def row_function(dtype_name: str, name: str) -> Any:
    """Row kernel `name` of `row_module(dtype_name)`, looked up once (not at every launch)."""
    return row_module(dtype_name).get_function(name)


@lru_cache(maxsize=None)
def elementwise(name: str, dtype_name: str) -> Any:
    """The cupy.ElementwiseKernel `name` for this dtype."""
    ins, outs, op, kname, preamble = elementwise_spec(name, dtype_name)
    return _cupy().ElementwiseKernel(ins, outs, op, kname, preamble=preamble)


def _acc(x: Any, value: float) -> Any:
    """A host scalar in the kernel's accumulator type (np.float32 or np.float64): RawKernel arguments must
    match the C parameter types exactly, and a Python float would be passed as a double."""
    return np.dtype(ctype(x.dtype).acc_dtype).type(value)


def _launch_rows(name: str, n_rows: int, n_cols: int, dtype: Any, args: tuple) -> None:
    if n_rows == 0 or n_cols == 0:
        return                                            # nothing to do (and a 0-block grid is an error)
    grid, block = row_launch(n_rows, n_cols)
    row_function(dtype.name, name)(grid, block, args)


def _rows(x: Any) -> Any:
    """x as a C-contiguous (rows, last axis) array: the layout the row kernels index (a view when x is
    already C-contiguous, so a kernel writing into it writes into x)."""
    return _cupy().ascontiguousarray(x).reshape(-1, x.shape[-1])


def _same_shape(what: str, *arrays: Any) -> None:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{what}: arrays must have one shape, got {[a.shape for a in arrays]}")


# --- GELU -----------------------------------------------------------------------------------------------
def gelu_forward(x: Any) -> tuple[Any, Any]:
    """y = x Φ(x), Φ(x) = ½ erfc(−x/√2); returns (y, Φ(x)), both shaped like x."""
    return elementwise("gelu_fwd", x.dtype.name)(x)


def gelu_backward(g: Any, x: Any, cdf: Any) -> Any:
    """dx = g (Φ(x) + x φ(x)), φ(x) = e^(−x²/2)/√(2π); all of g, x, Φ(x) shaped alike."""
    _same_shape("gelu_backward", g, x, cdf)
    return elementwise("gelu_bwd", x.dtype.name)(g.astype(x.dtype, copy=False), x, cdf)


def gelu_tanh_forward(x: Any) -> Any:
    """y = ½x(1 + tanh(√(2/π)(x + 0.044715x³)))."""
    return elementwise("gelu_tanh_fwd", x.dtype.name)(x)


def gelu_tanh_backward(g: Any, x: Any) -> Any:
    """dx = g (½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²)), t = tanh(√(2/π)(x + 0.044715x³))."""
    _same_shape("gelu_tanh_backward", g, x)
    return elementwise("gelu_tanh_bwd", x.dtype.name)(g.astype(x.dtype, copy=False), x)


# --- LayerNorm ------------------------------------------------------------------------------------------
def layer_norm_forward(x: Any, w: Any, b: Any | None, eps: float) -> tuple[Any, Any, Any]:
    """y = x̂ w + b, x̂ = (x − μ)/√(σ² + ε) over the last axis. x (..., C), w and b (C,).

    Returns (y (..., C), x̂ (..., C), r = 1/√(σ² + ε) (..., 1)), what ops/nn.py LayerNorm saves.
    """
    xp = _cupy()
    C = x.shape[-1]
    if w.shape != (C,) or (b is not None and b.shape != (C,)):
        raise ValueError(f"layer_norm_forward: x {x.shape} needs weight and bias of shape ({C},), got "
                         f"{w.shape} and {None if b is None else b.shape}")
    x2 = _rows(x)
    w = xp.ascontiguousarray(w, dtype=x.dtype)
    b = w if b is None else xp.ascontiguousarray(b, dtype=x.dtype)
    y, xhat = xp.empty_like(x2), xp.empty_like(x2)
    rstd = xp.empty((x2.shape[0],), dtype=x.dtype)
    _launch_rows("tg_layer_norm_fwd", x2.shape[0], C, x.dtype,
                 (x2, w, b, y, xhat, rstd, np.int32(C), np.int32(b is not w), _acc(x, eps)))
    return y.reshape(x.shape), xhat.reshape(x.shape), rstd.reshape(x.shape[:-1] + (1,))


def layer_norm_backward_dx(g: Any, xhat: Any, rstd: Any, w: Any) -> Any:
    """dx = r (dx̂ − mean(dx̂) − x̂ mean(dx̂ x̂)), dx̂ = g w, means over the last axis. Shapes as saved by
    `layer_norm_forward`; dw = Σ g x̂ and db = Σ g are column sums left to the caller."""
    xp = _cupy()
    _same_shape("layer_norm_backward_dx", g, xhat)
    C = xhat.shape[-1]
    g2, xh2 = _rows(g.astype(xhat.dtype, copy=False)), _rows(xhat)
    r = xp.ascontiguousarray(rstd).reshape(-1)
    if r.shape[0] != xh2.shape[0] or w.shape != (C,):
        raise ValueError(f"layer_norm_backward_dx: rstd {rstd.shape} / weight {w.shape} do not fit x̂ {xhat.shape}")
    dx = xp.empty_like(xh2)
    _launch_rows("tg_layer_norm_bwd", xh2.shape[0], C, xhat.dtype,
                 (g2, xh2, r, xp.ascontiguousarray(w, dtype=xhat.dtype), dx, np.int32(C)))
    return dx.reshape(xhat.shape)


# --- softmax (plain, log, and attention's scaled + causal) ----------------------------------------------
def softmax_forward(s: Any, scale: float = 1.0, causal: bool = False, log: bool = False,
                    inplace: bool = False) -> Any:
    """softmax(s·scale) over the last axis, or its log with log=True. s (..., Tq, Tk).

    causal: entry (i, j) of each (Tq, Tk) matrix is masked (p = 0, log p = −∞) when j > i + Tk − Tq, i.e.
    the queries are the last Tq of Tk positions. inplace=True overwrites s (and returns it) when s is
    C-contiguous; otherwise the result is a new array.
    """
    xp = _cupy()
    Tk = s.shape[-1]
    Tq = s.shape[-2] if causal else 1
    if causal and (s.ndim < 2 or Tq > Tk):
        raise ValueError(f"softmax_forward: a causal mask needs (..., Tq, Tk) with Tq <= Tk, got {s.shape}")
    in_place = inplace and s.flags.c_contiguous
    s2 = _rows(s)
    p = s2 if in_place else xp.empty_like(s2)
    _launch_rows("tg_softmax_fwd", s2.shape[0], Tk, s.dtype,
                 (s2, p, np.int32(Tk), np.int32(Tq), np.int32(causal), np.int32(log), _acc(s, scale)))
    return s if in_place else p.reshape(s.shape)


def softmax_backward(dy: Any, y: Any, scale: float = 1.0, log: bool = False, inplace: bool = False) -> Any:
    """Through y = softmax(x·scale): dx = y ⊙ (dy − Σ dy ⊙ y)·scale; through y = log_softmax(x):
    dx = dy − e^y Σ dy (log=True; scale must be 1). Sums over the last axis. inplace=True overwrites dy
    (and returns it) when dy is C-contiguous and of y's dtype."""
    xp = _cupy()
    _same_shape("softmax_backward", dy, y)
    if log and scale != 1.0:
        raise ValueError(f"softmax_backward: log=True takes no scale, got {scale}")
    in_place = inplace and dy.flags.c_contiguous and dy.dtype == y.dtype
    dy2, y2 = _rows(dy.astype(y.dtype, copy=False)), _rows(y)
    dx = dy2 if in_place else xp.empty_like(y2)
    _launch_rows("tg_softmax_bwd", y2.shape[0], y.shape[-1], y.dtype,
                 (dy2, y2, dx, np.int32(y.shape[-1]), np.int32(log), _acc(y, scale)))
    return dy if in_place else dx.reshape(y.shape)


# --- cross-entropy --------------------------------------------------------------------------------------
def cross_entropy_forward(logits: Any, targets: Any, ignore_index: int) -> tuple[Any, Any, Any]:
    """loss = Σ_n valid_n (lse_n − z_n,t_n) / n_valid, lse_n = log Σ_j e^(z_nj), over rows z (N, V).

    logits (..., V), targets (...) integer. Returns (loss (0-d, logits dtype), lse (N,), n_valid (0-d int64)),
    all on the device; lse and n_valid are what `cross_entropy_backward` needs. A target outside [0, V)
    that is not ignore_index makes the loss NaN (a kernel cannot raise): ops/nn.py's cross_entropy flags it
    first (`flag_bad_ids`), so the next read raises the CPU's IndexError instead.
    """
    xp = _cupy()
    V = logits.shape[-1]
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy_forward: logits {logits.shape} need targets {logits.shape[:-1]}, "
                         f"got {targets.shape}")
    z = _rows(logits)
    t = xp.ascontiguousarray(targets.reshape(-1), dtype=xp.int64)
    acc = ctype(logits.dtype).acc_dtype
    lse, nll = xp.empty((z.shape[0],), dtype=acc), xp.zeros((z.shape[0],), dtype=acc)
    _launch_rows("tg_cross_entropy_fwd", z.shape[0], V, logits.dtype,
                 (z, t, lse, nll, np.int32(V), np.int64(ignore_index)))
    n_valid = (t != ignore_index).sum()
    loss = (nll.sum() / n_valid.astype(acc)).astype(logits.dtype, copy=False)
    return loss, lse, n_valid


def cross_entropy_backward(g: Any, logits: Any, targets: Any, lse: Any, n_valid: Any,
                           ignore_index: int) -> Any:
    """dz = (softmax(z) − onehot(t)) · g / n_valid, 0 on ignored rows; shaped like logits.

    g: the upstream gradient of the loss (0-d device array), n_valid from `cross_entropy_forward`.
    """
    xp = _cupy()
    V = logits.shape[-1]
    z = _rows(logits)
    t = xp.ascontiguousarray(targets.reshape(-1), dtype=xp.int64)
    if lse.shape != (z.shape[0],) or t.shape != (z.shape[0],):
        raise ValueError(f"cross_entropy_backward: lse {lse.shape} and targets {targets.shape} need "
                         f"{z.shape[0]} rows")
    gout = xp.asarray(g, dtype=logits.dtype).reshape(1)
    dz = elementwise("cross_entropy_bwd", logits.dtype.name)(
        z, lse, t, gout, n_valid.reshape(1), V, ignore_index)
    return dz.reshape(logits.shape)


# --- id checks (embedding ids, cross-entropy targets) ---------------------------------------------------
FLAG_BAD_IDS_SOURCE = r"""
extern "C" __global__ void tg_flag_bad_ids(const long long* ids, long long n, long long bound,
                                           long long ignore, int use_ignore, long long code, long long* flag) {
    // One block. The first position i (in order) whose id is outside [0, bound), and is not `ignore` when
    // use_ignore, writes flag = [code, ids[i]], unless flag[0] already holds an earlier error.
    __shared__ unsigned long long first;
    if (threadIdx.x == 0) first = 0xFFFFFFFFFFFFFFFFull;
    __syncthreads();
    if (flag[0] == 0) {                      // read by every thread before thread 0 writes it (below)
        for (long long i = threadIdx.x; i < n; i += blockDim.x) {
            long long t = ids[i];
            if ((t < 0 || t >= bound) && !(use_ignore && t == ignore)) {
                atomicMin(&first, (unsigned long long)i);
                break;                       // this thread's later positions come after i
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0 && first != 0xFFFFFFFFFFFFFFFFull) {
        flag[1] = ids[first];
        flag[0] = code;
    }
}
"""
FLAG_BAD_IDS_THREADS = 1024


@lru_cache(maxsize=None)
def raw_kernel(name: str) -> Any:
    """A cupy.RawKernel of this module's own source (tg_flag_bad_ids), built once."""
    sources_by_name = {"tg_flag_bad_ids": FLAG_BAD_IDS_SOURCE}
    return _cupy().RawKernel(sources_by_name[name], name)


def flag_bad_ids(flag: Any, ids: Any, bound: int, ignore_index: int | None, code: int) -> None:
    """One launch: the first id outside [0, bound) (not ignore_index) goes to flag = [code, id] (int64 (2,),
    on the device) unless flag[0] is already set; backend.flag_bad_ids documents the flag. No sync."""
    xp = _cupy()
    if flag.dtype != np.int64 or flag.shape != (2,):
        raise ValueError(f"flag_bad_ids: the flag must be int64 of shape (2,), got {flag.dtype} {flag.shape}")
    t = xp.ascontiguousarray(ids.reshape(-1), dtype=xp.int64)
    if t.size == 0:
        return
    use_ignore = ignore_index is not None
    raw_kernel("tg_flag_bad_ids")((1,), (FLAG_BAD_IDS_THREADS,),
                                  (t, np.int64(t.size), np.int64(bound), np.int64(ignore_index if use_ignore else 0),
                                   np.int32(use_ignore), np.int64(code), flag))


# --- Adam / AdamW ---------------------------------------------------------------------------------------
def adam_step(params: list, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
              decoupled: bool) -> None:
    """One Adam/AdamW step, in place, over every (θ, g, m, v, t) in `params` (t: the host's step count):

        AdamW: θ ← θ(1 − α λ)          Adam: g ← g + λ θ
        m ← β1 m + (1 − β1) g;   v ← β2 v + (1 − β2) g²
        θ ← θ − (α / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)

    One kernel launch per parameter reads θ, g, m, v once and writes θ, m, v once.
    """
    for theta, grad, m, v, t in params:
        kernel = elementwise("adam", theta.dtype.name)
        decay = 1.0 - lr * weight_decay if decoupled else 1.0
        l2 = 0.0 if decoupled else weight_decay
        kernel(grad, decay, l2, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
               lr / (1.0 - beta1 ** t), 1.0 / math.sqrt(1.0 - beta2 ** t), theta, m, v)
