"""Fused elementwise kernels for the CPU, in NumPy: the work that BLAS does not do.

Two tricks make plain NumPy fast here:
  1. Cache blocking. A chain of ufuncs over a 12 MB activation streams it through memory once per op;
     the same chain over 64K-element blocks keeps each block (and its temporaries) in L2 cache.
  2. Threads. NumPy releases the GIL inside a ufunc loop, so a kernel's blocks are shared out to the
     CPU's thread team (tinygpt/cpu_threads.py) when the array is big enough (MIN_PARALLEL) and each
     NumPy call long enough: two threads gain nothing from calls under ~10 µs, which only take turns at
     the GIL. Data-parallel training uses the other cores through processes instead
     (tinygpt/parallel.py), which cap the team at one thread.

Every kernel here takes and returns NumPy arrays only. The ops call them when `tinygpt.kernels.fused`
answers "cpu", and run their reference math otherwise (TINYGPT_KERNELS=reference runs it everywhere; CuPy
has its own fused kernels in tinygpt/cuda/kernels.py). The math of each kernel is written in its
docstring; the op that uses it has the same math, as plain array code, beside the call.
"""
from __future__ import annotations

import math

import numpy as np

from tinygpt import cpu_threads
from tinygpt.cpu_threads import BLOCK, parallel_blocks


# --- normal CDF and GELU ---------------------------------------------------------------------------
_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_P = 0.3275911
_P_HALF = _P * math.sqrt(0.5)                    # p a = p |x|/√2 in one multiply
_A_HALF = tuple(-0.5 * a for a in _A)            # -½ a_k: the Horner sum comes out as -½(1 - erf(a)) e^(a²)


def _cdf_block(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = Φ(x) = ½ + ½ sign(x) erf(|x|/√2), erf(a) = 1 - (a1 t + ... + a5 t⁵) e^(-a²), t = 1/(1 + p a)

    (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7). The constants ½ and 1/√2 are folded into the
    coefficients, so each line is one pass over the block. sign(x) is x/(|x| + tiny): NumPy's divide is
    vectorized where its sign and copysign are not, and erf(0) = 0 makes x = 0 exact.
    Returns e^(-x²/2), a by-product the GELU derivative needs.
    """
    c = x.dtype.type
    ax = np.abs(x)
    t = ax * c(_P_HALF)
    t += c(1)
    np.divide(c(1), t, out=t)                    # t = 1/(1 + p |x|/√2)
    half_erf = t * c(_A_HALF[4])
    for coef in _A_HALF[3::-1]:                  # Horner: -½ ((a5 t + a4) t + a3) t ... + a1) t
        half_erf += c(coef)
        half_erf *= t
    e = np.multiply(x, x, out=t)                 # t is free again
    e *= c(-0.5)
    np.exp(e, out=e)                             # e^(-x²/2) = e^(-a²)
    half_erf *= e
    half_erf += c(0.5)                           # ½ erf(|x|/√2)
    ax += np.finfo(x.dtype).tiny                 # smallest normal number of this dtype (1e-30 is 0 in float16)
    np.divide(x, ax, out=ax)                     # sign(x)
    np.multiply(half_erf, ax, out=out)
    out += c(0.5)
    return e


def normal_cdf(x: np.ndarray) -> np.ndarray:
    """Φ(x) for a float32 (or float16) NumPy array, blocked and threaded."""
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    xf, of = x.reshape(-1), out.reshape(-1)
    parallel_blocks(lambda lo, hi: _cdf_block(xf[lo:hi], of[lo:hi]), xf.size)
    return out


def gelu_forward(x: np.ndarray) -> tuple:
    """y = x Φ(x), and its derivative y' = Φ(x) + x φ(x) for the backward, φ(x) = e^(-x²/2)/√(2π).

    The derivative costs little here: e^(-x²/2) is already computed on the way to Φ, so the backward
    becomes a single multiply instead of a second pass through exp.
    """
    x = np.ascontiguousarray(x)
    y, dydx = np.empty_like(x), np.empty_like(x)
    xf, yf, df = x.reshape(-1), y.reshape(-1), dydx.reshape(-1)
    c = x.dtype.type

    def block(lo: int, hi: int) -> None:
        xs, d = xf[lo:hi], df[lo:hi]
        pdf = _cdf_block(xs, yf[lo:hi])                   # y = Φ(x) for now; pdf = e^(-x²/2)
        pdf *= c(1.0 / math.sqrt(2.0 * math.pi))          # φ(x)
        np.multiply(xs, pdf, out=d)
        d += yf[lo:hi]                                    # y' = Φ + xφ
        yf[lo:hi] *= xs                                   # y = xΦ

    parallel_blocks(block, xf.size)
    return y, dydx


def multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a ⊙ b for two same-shaped arrays (the GELU backward: g ⊙ y'), blocked and threaded."""
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    out = np.empty_like(b)
    af, bf, of = a.reshape(-1), b.reshape(-1), out.reshape(-1)
    parallel_blocks(lambda lo, hi: np.multiply(af[lo:hi], bf[lo:hi], out=of[lo:hi]), of.size)
    return out


# --- ReLU ------------------------------------------------------------------------------------------
_ZEROS: dict = {}


def _zeros(dtype) -> np.ndarray:
    """A cached block of zeros (4 cache blocks: parallel_blocks' largest block)."""
    if dtype not in _ZEROS:
        _ZEROS[dtype] = np.zeros(4 * BLOCK, dtype)
    return _ZEROS[dtype]


def relu_forward(x: np.ndarray) -> np.ndarray:
    """y = max(x, 0). NumPy's maximum with a scalar 0 takes 3x as long as with an array of zeros (its
    scalar path is not vectorized: 316 against 103 µs for 1M float32 here), so the zeros are an array."""
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    xf, yf, z = x.reshape(-1), y.reshape(-1), _zeros(x.dtype)
    parallel_blocks(lambda lo, hi: np.maximum(xf[lo:hi], z[:hi - lo], out=yf[lo:hi]), xf.size)
    return y


def relu_backward(g: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dx = g ⊙ (y > 0), y = relu(x): the mask block by block, so it never leaves the cache."""
    g, y = np.ascontiguousarray(g), np.ascontiguousarray(y)
    dx = np.empty_like(g)
    gf, yf, df, z = g.reshape(-1), y.reshape(-1), dx.reshape(-1), _zeros(y.dtype)

    def block(lo: int, hi: int) -> None:
        mask = np.greater(yf[lo:hi], z[:hi - lo])
        np.multiply(gf[lo:hi], mask, out=df[lo:hi])

    parallel_blocks(block, gf.size)
    return dx


# --- softmax over the last axis (attention) ---------------------------------------------------------
SAFE_EXP = 30.0         # logits within ±30 need no shift before exp (see softmax_lastaxis_)


def softmax_lastaxis_(s: np.ndarray, scale: float = 1.0, additive_mask: np.ndarray | None = None,
                      causal: bool = False, source: np.ndarray | None = None) -> np.ndarray:
    """In place: s = softmax(s·scale + mask) over the last axis. s: (..., Tq, Tk), mask: (Tq, Tk) of 0/-inf.

    softmax is shift-invariant, softmax(z) = softmax(z - c) for any c per row; c is there so that exp
    cannot overflow. The textbook c is the row max, but a row max over short rows is slow in NumPy (and
    subtracting it is a slow broadcast), so each block of rows takes the cheapest c that is safe:
      * none, when the block's largest z (one flat max) is at most SAFE_EXP and each row is known to hold
        a z ≥ -SAFE_EXP: nothing can overflow, every row sum is at least e^-30, and what underflows is
        below e^-57 of its row's sum. Causal rows hold z_ii (one gather); other rows are checked after
        the exp, by their sums, when `source` (the unscaled, unmasked input) can redo a failing row.
      * c = z_ii with a causal mask, unless some z_ij - z_ii could pass the overflow point (88 for
        float32): max(z) - min(z_ii) over the block bounds them all;
      * else the row max, by NumPy's fmax (1.5x as fast as max over short rows here; the two differ only
        where a row holds a NaN, and such a row comes out all NaN either way).
    Row sums are one GEMV with a ones vector.
    """
    Tq, Tk = s.shape[-2], s.shape[-1]
    rows = s.reshape(-1, Tk)
    c = s.dtype.type
    ones = np.ones(Tk, s.dtype)
    limit = c(math.log(float(np.finfo(s.dtype).max)) - 1.0)      # e^limit is still finite
    safe, floor = c(SAFE_EXP), c(math.exp(-SAFE_EXP))
    qi = np.arange(Tq)
    ki = qi + (Tk - Tq)                                           # query i's own key position

    def block(lo: int, hi: int) -> None:
        r = rows[lo:hi]                                           # whole (Tq, Tk) matrices
        r3 = r.reshape(-1, Tq, Tk)
        if scale != 1.0:
            r *= c(scale)
        if additive_mask is not None:
            r3 += additive_mask
        top = r.max()                                             # NaN: every test below is False
        if causal:
            diag = r3[:, qi, ki][..., None]                       # z_ii, (n, Tq, 1)
            low = diag.min()
            if not (top <= safe and low >= -safe):
                if top - low <= limit:                            # every z_ij - z_ii <= limit
                    r3 -= diag
                else:
                    r -= np.fmax.reduce(r, axis=1)[:, None]
        elif not (source is not None and top <= safe):
            r -= np.fmax.reduce(r, axis=1)[:, None]             # row max
        np.exp(r, out=r)
        sums = r @ ones
        if source is not None and not causal and top <= safe:
            redo = np.flatnonzero(sums < floor)                   # rows with no z ≥ -30: from the source
            if redo.size:
                again = source.reshape(-1, Tk)[lo:hi][redo]
                again -= np.fmax.reduce(again, axis=1)[:, None]
                r[redo] = np.exp(again)
                sums[redo] = r[redo] @ ones
        np.divide(r, sums[:, None], out=r)     # a division, not a reciprocal times: a row with one
                                               # visible entry comes out exactly 1, as the lecture shows

    parallel_blocks(block, rows.shape[0], block=max(Tq, BLOCK // Tk), align=Tq, item_size=Tk)
    return s


def softmax_backward_(dp: np.ndarray, p: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """In place: dp = p ⊙ (dp - Σ_k dp ⊙ p) · scale over the last axis."""
    Tk = p.shape[-1]
    d2, p2 = dp.reshape(-1, Tk), p.reshape(-1, Tk)
    c = p.dtype.type

    def block(lo: int, hi: int) -> None:
        d, pp = d2[lo:hi], p2[lo:hi]
        d -= np.einsum("ij,ij->i", d, pp)[:, None]
        d *= pp
        if scale != 1.0:
            d *= c(scale)

    parallel_blocks(block, d2.shape[0], block=max(1, BLOCK // Tk), item_size=Tk)
    return dp


# --- Adam / AdamW over all parameters at once -------------------------------------------------------
SMALL_PARAM = 4096       # parameters below this many elements are updated together (adam_step)


def adam_step(params: list, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
              decoupled: bool) -> None:
    """One Adam/AdamW step over every (θ, g, m, v, t) in `params`, in place, block by block:

        AdamW: θ ← θ(1 − α λ)          Adam: g ← g + λ θ
        m ← β1 m + (1 − β1) g;   v ← β2 v + (1 − β2) g²
        θ ← θ − (α / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)

    Each block streams through memory once instead of once per operation. Small parameters (biases and
    norm gains: dozens of arrays of a few hundred numbers) are gathered into one array per step count,
    updated together and written back: 14 NumPy calls for all of them instead of 14 each. The blocks are
    shared out among the threads only where they are long (2 cache blocks on average): a call over a
    64K-element block takes ~5 µs, too short for two threads to share the GIL well (at the cpu size two
    threads took 1.6 ms a step against 1.25 ms for one).
    """
    small = [p for p in params if p[0].size < SMALL_PARAM]
    big = [p for p in params if p[0].size >= SMALL_PARAM]
    tmp = np.empty(BLOCK, np.float32)
    for t in sorted({p[4] for p in small}):
        group = [p for p in small if p[4] == t]
        th, g, m, v = (np.concatenate([p[k].reshape(-1) for p in group]) for k in range(4))
        tmp = tmp if tmp.size >= th.size else np.empty(th.size, np.float32)
        _adam_block(th, g, m, v, t, tmp[:th.size], lr, beta1, beta2, eps, weight_decay, decoupled)
        start = 0
        for p in group:                           # θ, m and v back into each parameter's own arrays
            n = p[0].size
            for k, flat in ((0, th), (2, m), (3, v)):
                p[k].reshape(-1)[...] = flat[start:start + n]
            start += n
    if not big:
        return
    block = 4 * BLOCK if cpu_threads.num_threads() > 1 else BLOCK
    tasks = []                                    # (param index, lo, hi) over the flattened arrays
    for i, (theta, *_rest) in enumerate(big):
        tasks += [(i, lo, min(lo + block, theta.size)) for lo in range(0, theta.size, block)]
    flat = [(th.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), t) for th, g, m, v, t in big]

    def blocks(k0: int, k1: int) -> None:
        scratch = np.empty(block, np.float32)
        for i, lo, hi in tasks[k0:k1]:
            theta, g, m, v, t = flat[i]
            _adam_block(theta[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], t, scratch[:hi - lo],
                        lr, beta1, beta2, eps, weight_decay, decoupled)

    mean = sum(theta.size for theta, *_rest in big) // len(tasks)
    parts = cpu_threads.num_threads() if mean >= 2 * BLOCK else 1
    cpu_threads.split(blocks, len(tasks), parts)       # each thread: a contiguous share of the blocks


def _adam_block(th, g, m, v, t: int, w, lr, beta1, beta2, eps, weight_decay, decoupled) -> None:
    """adam_step's equations over one block of flat float32 arrays; w: scratch of the same length."""
    c = np.float32
    if weight_decay != 0.0:
        if decoupled:
            th *= c(1.0 - lr * weight_decay)
        else:
            g = th * c(weight_decay) + g          # a new array: the gradient is never written to
    m *= c(beta1)
    np.multiply(g, c(1.0 - beta1), out=w)
    m += w
    v *= c(beta2)
    np.multiply(g, g, out=w)
    w *= c(1.0 - beta2)
    v += w
    np.sqrt(v, out=w)
    w *= c(1.0 / math.sqrt(1.0 - beta2 ** t))
    w += c(eps)
    np.divide(m, w, out=w)
    w *= c(lr / (1.0 - beta1 ** t))
    th -= w


# --- layer norm over the last axis -------------------------------------------------------------------
def layer_norm_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, eps: float) -> tuple:
    """y = x̂ w + b, x̂ = (x - μ) r, r = 1/√(σ² + ε), row by row. Returns (y, x̂, r) with r (..., 1)."""
    C = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, C)
    y, xhat = np.empty_like(x2), np.empty_like(x2)
    rstd = np.empty((x2.shape[0], 1), x.dtype)
    c = x.dtype.type
    ones = np.full(C, 1.0 / C, x.dtype)                    # row means as a GEMV: (N, C) @ (C,)

    def block(lo: int, hi: int) -> None:
        xs, xh, r = x2[lo:hi], xhat[lo:hi], rstd[lo:hi]
        np.subtract(xs, (xs @ ones)[:, None], out=xh)      # x - μ
        np.multiply(xh, xh, out=y[lo:hi])
        r[:, 0] = y[lo:hi] @ ones                          # σ²
        r += c(eps)
        np.sqrt(r, out=r)
        np.divide(c(1), r, out=r)                          # r = 1/√(σ² + ε)
        xh *= r                                            # x̂
        np.multiply(xh, w, out=y[lo:hi])
        if b is not None:
            y[lo:hi] += b

    parallel_blocks(block, x2.shape[0], block=max(1, BLOCK // C), item_size=C)
    return y.reshape(x.shape), xhat.reshape(x.shape), rstd.reshape(x.shape[:-1] + (1,))


def layer_norm_backward(g: np.ndarray, xhat: np.ndarray, rstd: np.ndarray, w: np.ndarray,
                        want_dw: bool = False, want_db: bool = False) -> tuple:
    """dx = r (dx̂ - mean(dx̂) - x̂ mean(dx̂ x̂)), dx̂ = g w, row by row; and, while each block of g and x̂
    is in cache, dw = Σ_rows g x̂ and db = Σ_rows g when asked (else None). Returns (dx, dw, db)."""
    C = xhat.shape[-1]
    g2, xh2, r2 = np.ascontiguousarray(g).reshape(-1, C), xhat.reshape(-1, C), rstd.reshape(-1, 1)
    dx = np.empty_like(xh2)
    w_mean = (w / C).astype(xhat.dtype)                    # row means of (…) ⊙ w as one GEMV with w/C
    partial_dw: list = []                                  # one (C,) sum per block (append is thread-safe)
    partial_db: list = []

    def block(lo: int, hi: int) -> None:
        d, xh, gb = dx[lo:hi], xh2[lo:hi], g2[lo:hi]
        column_ones = np.ones(hi - lo, xhat.dtype)
        if want_db:
            partial_db.append(column_ones @ gb)            # Σ g over these rows, as a GEMV
        np.multiply(gb, xh, out=d)                         # g x̂
        if want_dw:
            partial_dw.append(column_ones @ d)             # Σ g x̂ over these rows
        m2 = d @ w_mean                                    # mean(dx̂ x̂) = mean(g x̂ w)
        m1 = gb @ w_mean                                   # mean(dx̂) = mean(g w)
        np.multiply(gb, w, out=d)                          # dx̂
        d -= m1[:, None]
        d -= xh * m2[:, None]
        d *= r2[lo:hi]

    parallel_blocks(block, xh2.shape[0], block=max(1, BLOCK // C), item_size=C)
    dw = sum(partial_dw[1:], partial_dw[0]) if want_dw and partial_dw else None
    db = sum(partial_db[1:], partial_db[0]) if want_db and partial_db else None
    return dx.reshape(xhat.shape), dw, db


# --- embedding backward ------------------------------------------------------------------------------
def embedding_backward(ids: np.ndarray, g: np.ndarray, num_embeddings: int) -> np.ndarray:
    """dW[v] = Σ_{n: ids[n] = v} g[n]:  (N,) ids, (N, C) g -> (V, C).

    Sort the ids, then sum each run of equal ids with np.add.reduceat: several times faster than
    np.add.at, which updates one row at a time.
    """
    ids = ids.reshape(-1)
    g = g.reshape(ids.size, g.shape[-1])
    out = np.zeros((num_embeddings, g.shape[1]), g.dtype)
    if ids.size == 0:
        return out
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    out[sorted_ids[starts]] = np.add.reduceat(g[order], starts, axis=0)
    return out
