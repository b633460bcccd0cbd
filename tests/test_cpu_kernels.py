"""The blocked, threaded NumPy kernels against plain NumPy transcriptions of the same math.

Sizes straddle the block threshold; each kernel runs with 1 thread (inline: the test sizes are below
MIN_PARALLEL) and with 2 threads, where MIN_PARALLEL is lowered to 1 so that every call goes through the
thread team (tinygpt/cpu_threads.py), and the fixture checks that it did. test_threading_threshold checks the real threshold.
"""
import math

import numpy as np
import pytest

from tinygpt import cpu_kernels as K
from tinygpt import cpu_threads as T


def _team_runs() -> int:
    """Team.run calls so far that used the worker threads (the team counts them itself)."""
    return 0 if T._team is None else T._team.runs


@pytest.fixture(params=["1", "2"])
def threads(request, monkeypatch):
    monkeypatch.setenv("TINYGPT_NUM_THREADS", request.param)
    monkeypatch.setattr(T, "_limit", None)                   # no cap left behind by another test
    n = int(request.param)
    T.team()
    before = _team_runs()
    if n > 1:
        monkeypatch.setattr(T, "MIN_PARALLEL", 1)            # every call is shared out, even the tiny ones
    yield n
    shared = _team_runs() - before
    assert (shared > 0) == (n > 1), f"{shared} team runs with {n} threads"


SIZES = [(7,), (3, 5000), (70000,), (2, 3, 40001)]


def exact_cdf(x):
    return np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x.reshape(-1).astype(np.float64)]).reshape(x.shape)


@pytest.mark.parametrize("shape", SIZES)
def test_normal_cdf_and_gelu(shape, threads, rng):
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    x.reshape(-1)[:3] = [0.0, -12.0, 12.0]
    cdf = exact_cdf(x)
    assert np.abs(K.normal_cdf(x) - cdf).max() < 5e-7   # A&S 1.5e-7 on erf, plus float32 rounding
    y, dydx = K.gelu_forward(x)
    x64 = x.astype(np.float64)
    assert np.abs(y - x64 * cdf).max() < 1e-6 * max(1.0, np.abs(x).max())
    pdf = np.exp(-0.5 * x64 ** 2) / math.sqrt(2 * math.pi)
    assert np.abs(dydx - (cdf + x64 * pdf)).max() < 1e-6
    g = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(K.multiply(g, dydx), g * dydx)


def test_gelu_float16_is_finite_at_zero():
    x = np.array([0.0, -0.0, 1.0, -1.0, 3.0], np.float16)
    y, dydx = K.gelu_forward(x)
    assert np.isfinite(y).all() and np.isfinite(dydx).all()
    np.testing.assert_allclose(y.astype(np.float64), x * exact_cdf(x), atol=2e-3)
    np.testing.assert_allclose(dydx[:2].astype(np.float64), 0.5, atol=1e-3)


def _softmax_ref(s, scale, mask):
    z = s.astype(np.float64) * scale + (0 if mask is None else mask)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("Tq,Tk", [(64, 64), (1, 10), (5, 9), (256, 256)])
@pytest.mark.parametrize("causal", [True, False])
def test_softmax_lastaxis(Tq, Tk, causal, threads, rng):
    s = (rng.standard_normal((3, 2, Tq, Tk)) * 3).astype(np.float32)
    s[0, 0, Tq - 1, 0] = 500.0          # a visible score that overflows exp(z - z_ii): the fallback path
    s[1, 1, 0, Tk - 1] = -1e4           # and a very negative one
    mask = None
    if causal:
        mask = np.where(np.triu(np.ones((Tq, Tk), bool), Tk - Tq + 1), -np.inf, 0).astype(np.float32)
    out = K.softmax_lastaxis_(s.copy(), 0.5, mask, causal=causal)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, _softmax_ref(s, 0.5, mask), atol=2e-7, rtol=1e-5)


@pytest.mark.parametrize("shift", [0.0, -100.0, 40.0])     # no shift; rows redone from the source; row max
def test_softmax_rows_from_a_source(shift, threads, rng):
    """The Softmax op's path (no mask, the input kept as `source`): rows that sit far below the rest
    (their sums underflow without a shift) are redone from the source; masked rows as the reference."""
    x = rng.standard_normal((3, 70, 50)).astype(np.float32)
    x[0] += shift                          # a whole matrix moved: no shift, redone, or over SAFE_EXP
    x[1, 5] -= 200.0                       # one row far below its block
    x[1, 6, 1:] = -np.inf                  # masked but one
    x[2, :, ::2] = -np.inf                 # half of every row masked
    want = _softmax_ref(x.astype(np.float64), 1.0, None)
    got = K.softmax_lastaxis_(x.copy(), source=x)
    np.testing.assert_allclose(got, want, atol=2e-7, rtol=1e-5)
    row = np.full((1, 4), -np.inf, np.float32)                     # nothing visible: NaN, as the reference
    with np.errstate(invalid="ignore"):
        assert np.isnan(K.softmax_lastaxis_(row.copy(), source=row)).all()


@pytest.mark.parametrize("shape", [(2, 3, 40, 40), (4, 4, 64, 300)])     # one block; several
def test_softmax_backward(shape, threads, rng):
    p = _softmax_ref(rng.standard_normal(shape), 1.0, None).astype(np.float32)
    d = rng.standard_normal(p.shape).astype(np.float32)
    ref = p * (d - (d * p).sum(-1, keepdims=True)) * 0.3
    np.testing.assert_allclose(K.softmax_backward_(d.copy(), p, 0.3), ref, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 8), (4, 100, 128), (2, 300, 384)])
def test_layer_norm(shape, threads, rng):
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    w, b = rng.standard_normal(shape[-1]).astype(np.float32), rng.standard_normal(shape[-1]).astype(np.float32)
    y, xhat, rstd = K.layer_norm_forward(x, w, b, 1e-5)
    x64 = x.astype(np.float64)
    ref_xhat = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(xhat, ref_xhat, atol=2e-5)
    np.testing.assert_allclose(y, ref_xhat * w + b, atol=1e-4)
    g = rng.standard_normal(shape).astype(np.float32)
    dxh = g.astype(np.float64) * w
    ref = (dxh - dxh.mean(-1, keepdims=True) - ref_xhat * (dxh * ref_xhat).mean(-1, keepdims=True)) * \
        (1 / np.sqrt(x64.var(-1, keepdims=True) + 1e-5))
    dx, dw, db = K.layer_norm_backward(g, xhat, rstd, w)
    np.testing.assert_allclose(dx, ref, atol=1e-4, rtol=1e-4)
    assert dw is None and db is None
    dx2, dw, db = K.layer_norm_backward(g, xhat, rstd, w, want_dw=True, want_db=True)
    np.testing.assert_array_equal(dx2, dx)
    rows = g.reshape(-1, shape[-1]).astype(np.float64)
    np.testing.assert_allclose(dw, (rows * ref_xhat.reshape(rows.shape)).sum(0), atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(db, rows.sum(0), atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("V", [1, 65, 5000])
def test_embedding_backward(V, rng):
    ids = rng.integers(0, V, (8, 33))
    g = rng.standard_normal((8 * 33, 16)).astype(np.float32)
    ref = np.zeros((V, 16), np.float64)
    np.add.at(ref, ids.reshape(-1), g)
    np.testing.assert_allclose(K.embedding_backward(ids, g, V), ref, atol=1e-5)
    assert K.embedding_backward(np.zeros(0, np.int64), np.zeros((0, 16), np.float32), V).shape == (V, 16)


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("big", [(700, 800), (1100, 1000)])   # several (threaded) blocks each
def test_adam_step_matches_the_equations(decoupled, big, threads, rng):
    shapes = [(3,), big, (17, 5), (40, 3)]           # the small ones: gathered by step count (1, 30, 1)
    params = [(rng.standard_normal(s).astype(np.float32), rng.standard_normal(s).astype(np.float32),
               rng.standard_normal(s).astype(np.float32) * 0.1, rng.random(s).astype(np.float32) * 0.1, t)
              for s, t in zip(shapes, (1, 5, 30, 1))]
    grads = [p[1].copy() for p in params]
    ref = [(th.astype(np.float64), g.astype(np.float64), m.astype(np.float64), v.astype(np.float64), t)
           for th, g, m, v, t in params]
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.99, 1e-8, 0.1
    K.adam_step(params, lr, b1, b2, eps, wd, decoupled)
    for (th, _, m, v, _), (rth, rg, rm, rv, t) in zip(params, ref):
        if decoupled:
            rth = rth * (1 - lr * wd)
        else:
            rg = rg + wd * rth
        rm = b1 * rm + (1 - b1) * rg
        rv = b2 * rv + (1 - b2) * rg * rg
        rth = rth - lr * (rm / (1 - b1 ** t)) / (np.sqrt(rv / (1 - b2 ** t)) + eps)
        np.testing.assert_allclose(m, rm, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(v, rv, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(th, rth, rtol=1e-5, atol=1e-6)
    for p, g in zip(params, grads):
        np.testing.assert_array_equal(p[1], g)        # the gradients are read, never written


def test_parallel_blocks_covers_every_index_once(threads):
    seen = np.zeros(1_000_003, np.int32)

    def fn(lo, hi):
        seen[lo:hi] += 1

    T.parallel_blocks(fn, seen.size)
    assert (seen == 1).all()
    rows = np.zeros(4096, np.int32)
    T.parallel_blocks(lambda lo, hi: rows.__setitem__(slice(lo, hi), rows[lo:hi] + 1 + (lo % 64 != 0) * 100),
                      rows.size, block=300, align=64, item_size=100)
    assert (rows == 1).all()                              # aligned: every block starts on a multiple of 64


def test_threading_threshold(monkeypatch):
    """With 2 threads, work below MIN_PARALLEL elements stays inline and work at it is shared out."""
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "2")
    monkeypatch.setattr(T, "_limit", None)
    team = T.team()
    before = team.runs
    seen = np.zeros(T.MIN_PARALLEL, np.int32)

    def fn(lo, hi):
        seen[lo:hi] += 1

    T.parallel_blocks(fn, T.MIN_PARALLEL - 1)
    assert team.runs == before
    T.parallel_blocks(fn, T.MIN_PARALLEL)
    assert team.runs == before + 1                          # one run: half here, half on the worker
    assert (seen[:-1] == 2).all() and seen[-1] == 1
    T.parallel_blocks(fn, 64, item_size=T.MIN_PARALLEL // 64)           # 64 long rows: shared out too
    assert team.runs == before + 2
