"""GEMM-based kernels for the CPU: matmul, Linear and attention, shared out over the thread team.

The math is the ops' own (tinygpt/ops/linalg.py, tinygpt/ops/attention.py); what these kernels add is the
split. A product is cut into independent pieces, each one a single-threaded GEMM (cpu_threads: BLAS runs
on one thread while the team has more than one), and the pieces run on the team's threads at once:

  matmul, Linear forward:  by rows of the output, Y[lo:hi] = X[lo:hi] Wᵀ (+ b while the block is in cache)
  Linear backward:         dX = G W by rows; dW = Gᵀ X and db = Σ_rows G as an async job on a worker,
                           which the backward pass does not wait for until its end
  attention:               by batch entries: each thread runs the whole forward or backward of its
                           share, GEMMs and softmax, so one hand-off covers about a dozen NumPy calls

Small products run as they are: below MIN_MACS multiply-adds a hand-off costs more than it saves.
Every function takes and returns NumPy arrays.
"""
from __future__ import annotations

import numpy as np

from tinygpt import cpu_kernels, cpu_threads

MIN_MACS = 1 << 24       # multiply-adds below which a product stays whole: ~17M, 140-270 µs on one core.
                         # A split costs ~100 µs here (waking the worker, waiting for it, and two GEMMs at
                         # once each run 7-16% slower), so the lecture's per-head Linears, (2048, 128) x
                         # (128, 32) = 8M MACs, run faster whole: at batch 12, 38.6 -> 34.3 ms a step
                         # (AVX2 kernels) and 30.4 -> 26.7 (AVX-512); at batch 32, 0-4% (BENCHMARKS.md)
MIN_ASYNC_MACS = 1 << 21 # the same for handing a weight gradient to a worker as an async job (no waiting)
MIN_STACK_MACS = 1 << 25 # the same for a stack of small matrices (a head's q kᵀ at (32, 64, 32)): NumPy
                         # runs them one BLAS call each, at about half a big GEMM's speed, so a share
                         # must be bigger before it pays for its hand-off


def _parts(macs: int, rows: int, stack: bool = False) -> int:
    """How many pieces to cut `rows` rows of a product of `macs` multiply-adds into (`stack`: the rows
    are the matrices of a stack)."""
    if macs < (MIN_STACK_MACS if stack else MIN_MACS):
        return 1
    return max(1, min(cpu_threads.num_threads(), rows))


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b, by row blocks over the team when a is (..., M, K) and b is a (K, N) matrix, or by batch
    entries when both are (B, M, K) and (B, K, N) stacks; as NumPy's @ otherwise."""
    if b.ndim == 2 and a.ndim >= 2:
        a2 = a.reshape(-1, a.shape[-1])
        M, K, N = a2.shape[0], b.shape[0], b.shape[1]
        parts = _parts(M * K * N, M)
        if parts > 1:
            out = np.empty((M, N), np.result_type(a, b))
            cpu_threads.split(_gemm(a2, b, out), M, parts)
            return out.reshape(a.shape[:-1] + (N,))
    elif a.ndim == 3 and b.ndim == 3 and a.shape[0] == b.shape[0]:
        Bn, M, K, N = a.shape[0], a.shape[1], a.shape[2], b.shape[2]
        parts = _parts(Bn * M * K * N, Bn, stack=True)
        if parts > 1:
            out = np.empty((Bn, M, N), np.result_type(a, b))
            cpu_threads.split(_gemm(a, b, out, batched=True), Bn, parts)
            return out
    return a @ b


def _gemm(a, b, out, batched: bool = False, bias=None):
    """fn(lo, hi): out[lo:hi] = a[lo:hi] @ b (b[lo:hi] too when batched), plus bias."""
    def rows(lo: int, hi: int) -> None:
        np.matmul(a[lo:hi], b[lo:hi] if batched else b, out=out[lo:hi])
        if bias is not None:
            out[lo:hi] += bias
    return rows


def linear_forward(x2: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """y = x Wᵀ + b for x (N, in), W (out, in), b (out,) or None -> (N, out)."""
    N, out_features = x2.shape[0], w.shape[0]
    y = np.empty((N, out_features), np.result_type(x2, w))
    parts = _parts(N * x2.shape[1] * out_features, N)
    cpu_threads.split(_gemm(x2, w.T, y, bias=b), N, parts)
    return y


def linear_backward(g2: np.ndarray, x2: np.ndarray, w: np.ndarray, want_x: bool, want_w: bool,
                    want_b: bool) -> tuple:
    """dx = G W (N, in), dW = Gᵀ X (out, in), db = Σ_rows G (out,), for G (N, out), X (N, in), W (out, in);
    None where not wanted.

    dx is on the path back to the input, needed at once (split by rows over the team); dW and db only by
    the optimizer. So with a team, dW and db go to a worker as an async job (cpu_threads.submit) and this
    thread returns with dx while the worker computes them: the backward pass goes on down the model
    meanwhile, and Tensor.backward waits for the jobs at its end (cpu_threads.wait). Without a team,
    all three here."""
    N, out_features, in_features = g2.shape[0], g2.shape[1], x2.shape[1]
    macs = N * in_features * out_features                    # of each of the two products
    dtype = np.result_type(g2, w)
    gx = None
    if want_x:                                               # first: the next op waits for it
        gx = np.empty((N, in_features), dtype)
        cpu_threads.split(_gemm(g2, w, gx), N, _parts(macs, N))
    gw = np.empty((out_features, in_features), dtype) if want_w else None
    gb = np.empty(out_features, dtype) if want_b else None
    if want_w or want_b:
        def weight_grads() -> None:
            if want_w:
                np.matmul(g2.T, x2, out=gw)                  # Σ over rows of gᵀ x
            if want_b:
                np.matmul(np.ones(N, dtype), g2, out=gb)     # Σ over rows, as a GEMV
        if macs >= MIN_ASYNC_MACS:
            cpu_threads.submit(weight_grads, writes=[a for a in (gw, gb) if a is not None])
        else:
            weight_grads()
    return gx, gw, gb


# --- attention: q kᵀ, softmax, P v, shared out by batch entries --------------------------------------------
def _heads_inner(shape: tuple, dtype) -> np.ndarray:
    """An empty (B, nh, T, hs) array laid out as (B, T, nh, hs): the layout the model's (B, T, C) side wants,
    so its transpose(1, 2).reshape(B, T, C) is a view, not a copy. Other ranks: plain C order."""
    if len(shape) != 4:
        return np.empty(shape, dtype)
    B, nh, T, hs = shape
    return np.empty((B, T, nh, hs), dtype).transpose(0, 2, 1, 3)


def _transposed(a: np.ndarray, copy: bool) -> np.ndarray:
    t = a.swapaxes(-1, -2)
    return np.ascontiguousarray(t) if copy else t


def _by_batch(fn, a: np.ndarray, macs: int) -> None:
    """fn(lo, hi) over a's first axis, shared out when worth it (whole for a 2-D a)."""
    n = a.shape[0] if a.ndim > 2 else 1
    cpu_threads.split(fn, n, _parts(macs, n))


def _rows(a: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return a[lo:hi] if a.ndim > 2 else a


def attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale, mask, causal: bool,
                      copy_kt: bool) -> tuple:
    """y = softmax(q kᵀ · scale + mask) v for q (..., Tq, hs), k, v (..., Tk, hs) of any strides (no copies:
    NumPy's batched matmul takes strided heads); returns (y, P), P (..., Tq, Tk) contiguous, y (B, nh, Tq, hs)
    laid out as (B, Tq, nh, hs). mask: additive (Tq, Tk) or None; copy_kt: make kᵀ contiguous first."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    p = np.empty(q.shape[:-1] + (Tk,), q.dtype)
    y = _heads_inner(q.shape[:-1] + (v.shape[-1],), q.dtype)

    def share(lo: int, hi: int) -> None:
        ps = _rows(p, lo, hi)
        np.matmul(_rows(q, lo, hi), _transposed(_rows(k, lo, hi), copy_kt), out=ps)   # S (.., Tq, Tk)
        cpu_kernels.softmax_lastaxis_(ps, scale, mask, causal=causal)                   # P, in place
        np.matmul(ps, _rows(v, lo, hi), out=_rows(y, lo, hi))                          # (.., Tq, hs)

    _by_batch(share, q, p.size * q.shape[-1] * 2)
    return y, p


def attention_backward(g: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, p: np.ndarray, scale,
                       copy_vt: bool) -> tuple:
    """dv = Pᵀ g, dP = g vᵀ, dS = P ⊙ (dP − Σ_k dP ⊙ P) · scale, dq = dS k, dk = dSᵀ q: (dq, dk, dv), laid
    out as attention_forward's y (so the model's q, k, v views take them back without a copy)."""
    dq, dk, dv = (_heads_inner(a.shape, a.dtype) for a in (q, k, v))

    def share(lo: int, hi: int) -> None:
        ps, gs = _rows(p, lo, hi), _rows(g, lo, hi)
        np.matmul(ps.swapaxes(-1, -2), gs, out=_rows(dv, lo, hi))                   # (.., Tk, hs)
        ds = gs @ _transposed(_rows(v, lo, hi), copy_vt)                            # dP (.., Tq, Tk)
        cpu_kernels.softmax_backward_(ds, ps, scale)                               # dS, in place
        np.matmul(ds, _rows(k, lo, hi), out=_rows(dq, lo, hi))                      # (.., Tq, hs)
        np.matmul(ds.swapaxes(-1, -2), _rows(q, lo, hi), out=_rows(dk, lo, hi))    # (.., Tk, hs)

    _by_batch(share, q, p.size * q.shape[-1] * 4)
    return dq, dk, dv
