"""The CPU thread team (tinygpt/cpu_threads.py) and the GEMM kernels that share work over it
(tinygpt/cpu_linear.py), against plain NumPy.

The kernels run with 1 thread and with 2, with the size thresholds lowered so that even these small test
shapes are shared out, and the `threads` fixture checks that the team was (or was not) used.
"""
import math
import os
import sys
import threading
import time

import numpy as np
import pytest

from tinygpt import cpu_kernels, cpu_linear
from tinygpt import cpu_threads as T
from tinygpt.ops import attention as A


def _runs() -> int:
    return 0 if T._team is None else T._team.runs


@pytest.fixture(params=[1, 2])
def threads(request, monkeypatch):
    monkeypatch.setenv("TINYGPT_NUM_THREADS", str(request.param))
    monkeypatch.setattr(T, "_limit", None)
    monkeypatch.setattr(cpu_linear, "MIN_MACS", 1)
    monkeypatch.setattr(cpu_linear, "MIN_ASYNC_MACS", 1)
    monkeypatch.setattr(cpu_linear, "MIN_STACK_MACS", 1)
    monkeypatch.setattr(T, "MIN_PARALLEL", 1)
    T.team()
    before = _runs()
    yield request.param
    assert (_runs() > before) == (request.param > 1)


@pytest.fixture
def team(monkeypatch):
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "3")
    monkeypatch.setattr(T, "_limit", None)
    return T.team()


# --- the team --------------------------------------------------------------------------------------------
def test_every_task_runs_once_on_several_threads(team):
    seen, who = [0] * 10, set()
    together = threading.Barrier(3, timeout=10)    # the first task of each share (0, 3, 6) waits for the
                                                     # other two: three threads at once, or a timeout

    def task(i):
        def run():
            seen[i] += 1
            who.add(threading.get_ident())
            if i in (0, 3, 6):
                together.wait()
        return run

    team.run([task(i) for i in range(10)])
    assert seen == [1] * 10
    assert len(who) == 3 and threading.get_ident() in who


def test_a_failing_task_raises_after_every_task_is_done(team):
    done = []

    def slow():
        time.sleep(0.05)
        done.append("slow")

    def fails():
        raise ValueError("task 2 failed")

    with pytest.raises(ValueError, match="task 2 failed"):
        team.run([lambda: done.append("first"), fails, slow])
    assert sorted(done) == ["first", "slow"]
    team.run([lambda: done.append("again")] * 3)             # the team still works afterwards
    assert done.count("again") == 3


def test_a_team_run_inside_a_task_runs_inline(team):
    inner = []

    def outer(i):
        def run():
            T.run([lambda: inner.append((i, threading.get_ident()))] * 2)
        return run

    runs = team.runs
    team.run([outer(i) for i in range(3)])
    assert len(inner) == 6 and team.runs == runs + 1         # the nested runs did not use the workers
    for i in range(3):                                       # each task's inner pair ran on its own thread
        assert len({ident for j, ident in inner if j == i}) == 1


def test_one_thread_has_no_team_and_leaves_blas_alone(monkeypatch):
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "1")
    assert T.team() is None
    order = []
    T.run([lambda: order.append(1), lambda: order.append(2)])
    assert order == [1, 2]


def test_the_team_puts_blas_on_one_thread(team):
    from threadpoolctl import threadpool_info
    blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas"]
    assert blas and all(lib["num_threads"] == 1 for lib in blas)


def test_blas_info_names_the_kernels_and_what_forced_them(monkeypatch):
    pytest.importorskip("threadpoolctl")
    from threadpoolctl import threadpool_info
    numpy_blas = [lib for lib in threadpool_info() if lib["user_api"] == "blas" and "numpy" in lib["filepath"]]
    if not numpy_blas:
        pytest.skip("threadpoolctl finds no BLAS shipped with NumPy")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    info = T.blas_info()
    assert info["library"] == numpy_blas[0]["internal_api"]
    assert info["kernels"] == numpy_blas[0]["architecture"]
    assert info.get("forced_by") == ("OPENBLAS_CORETYPE=Haswell" if info["library"] == "openblas" else None)
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert "forced_by" not in T.blas_info()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_builds_its_own_team(team):
    team.run([lambda: None] * 3)
    pid = os.fork()
    if pid == 0:                                             # the child: the parent's workers are not here
        code = 1
        try:
            out = []
            T.team().run([lambda: out.append(1)] * 3)
            code = 0 if out == [1, 1, 1] and T._team is not team else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


def test_async_jobs_ready_and_wait(team):
    out, gate = np.zeros(4), threading.Event()

    def slow_fill():
        gate.wait(5)
        out[:] = 7.0

    T.submit(slow_fill, writes=[out])
    assert (out == 0).all()                                 # still queued behind the gate
    gate.set()
    T.ready(out)
    assert (out == 7.0).all()
    T.submit(lambda: (_ for _ in ()).throw(ValueError("async job failed")))
    with pytest.raises(ValueError, match="async job failed"):
        T.wait()
    T.wait()                                                # raised once, then clear


def test_a_run_does_not_wait_for_a_worker_busy_with_an_async_job(monkeypatch):
    monkeypatch.setenv("TINYGPT_NUM_THREADS", "2")           # the only worker is the busy one
    monkeypatch.setattr(T, "_limit", None)
    T.team()
    gate, seen = threading.Event(), []
    T.submit(lambda: gate.wait(10))                          # the worker blocked until the gate opens
    start = time.perf_counter()
    T.run([lambda i=i: seen.append((i, threading.get_ident())) for i in range(2)])
    took = time.perf_counter() - start
    gate.set()
    T.wait()
    assert sorted(i for i, _ in seen) == [0, 1] and took < 5  # the caller took the worker's share back
    assert {ident for _, ident in seen} == {threading.get_ident()}


def test_submit_from_another_thread_runs_inline(team):
    out = []

    def other():
        T.submit(lambda: out.append(threading.get_ident()))
        out.append(threading.get_ident())

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(out) == 2 and out[0] == out[1]


def test_both_returns_the_two_results_computed_at_once(team):
    who, started = [], threading.Event()

    def first():
        who.append(threading.get_ident())
        assert started.wait(10)                  # the second runs at the same time, on a worker
        return "a"

    def second():
        who.append(threading.get_ident())
        started.set()
        return "b"

    assert T.both(first, second) == ("a", "b")
    assert len(set(who)) == 2


def test_edges():
    assert T.edges(10, 3) == [0, 3, 6, 10]
    assert T.edges(256, 2, align=64) == [0, 128, 256]
    assert T.edges(300, 2, align=64) == [0, 128, 300]


# --- the GEMM kernels ------------------------------------------------------------------------------------
@pytest.mark.parametrize("a_shape,b_shape", [((37, 20), (20, 9)), ((3, 11, 20), (20, 9)),
                                             ((5, 11, 20), (5, 20, 9)), ((4, 20), (20,))])
def test_matmul(a_shape, b_shape, threads, rng):
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    want = a.astype(np.float64) @ b.astype(np.float64)
    got = cpu_linear.matmul(a, b)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if a_shape == (4, 20):                                   # a vector operand: NumPy's @, no team needed
        cpu_linear.matmul(a, b.reshape(20, 1) @ np.ones((1, 3), np.float32))


@pytest.mark.parametrize("bias", [True, False])
def test_linear_forward_and_backward(bias, threads, rng):
    N, fin, fout = 33, 12, 7
    x = rng.standard_normal((N, fin)).astype(np.float32)
    w = rng.standard_normal((fout, fin)).astype(np.float32)
    b = rng.standard_normal(fout).astype(np.float32) if bias else None
    g = rng.standard_normal((N, fout)).astype(np.float32)
    x64, w64, g64 = (t.astype(np.float64) for t in (x, w, g))
    want = x64 @ w64.T + (b if bias else 0)
    np.testing.assert_allclose(cpu_linear.linear_forward(x, w, b), want, rtol=1e-5, atol=1e-5)
    gx, gw, gb = cpu_linear.linear_backward(g, x, w, True, True, bias)
    T.wait()                                                 # dW and db may come from an async job
    np.testing.assert_allclose(gx, g64 @ w64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw, g64.T @ x64, rtol=1e-5, atol=1e-5)
    if bias:
        np.testing.assert_allclose(gb, g64.sum(axis=0), rtol=1e-5, atol=1e-5)
    else:
        assert gb is None
    gx, gw, _ = cpu_linear.linear_backward(g, x, w, False, True, False)
    T.wait()
    assert gx is None and gw.shape == (fout, fin)
    gx, gw, _ = cpu_linear.linear_backward(g, x, w, True, False, False)
    assert gw is None and gx.shape == (N, fin)


def _attention_reference(q, k, v, scale, causal):
    q, k, v = (t.astype(np.float64) for t in (q, k, v))
    s = q @ k.swapaxes(-1, -2) * scale
    if causal:
        s = np.where(A.causal_mask(np, q.shape[-2], k.shape[-2]), -np.inf, s)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return p @ v, p


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq,Tk", [(8, 8), (3, 8)])
def test_attention_forward_and_backward(causal, Tq, Tk, threads, rng):
    B, H, hs = 3, 2, 4
    q = rng.standard_normal((B, H, Tq, hs)).astype(np.float32)
    k, v = (rng.standard_normal((B, H, Tk, hs)).astype(np.float32) for _ in range(2))
    g = rng.standard_normal((B, H, Tq, hs)).astype(np.float32)
    scale = np.float32(1 / math.sqrt(hs))
    mask = A._additive_causal_mask(Tq, Tk, np.float32) if causal else None
    y, p = cpu_linear.attention_forward(q, k, v, scale, mask, causal, copy_kt=Tq > 4)
    y_want, p_want = _attention_reference(q, k, v, scale, causal)
    np.testing.assert_allclose(p, p_want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-5)
    dq, dk, dv = cpu_linear.attention_backward(g, q, k, v, p, scale, copy_vt=Tq > 4)
    g64, q64, k64, v64 = (t.astype(np.float64) for t in (g, q, k, v))
    dp = g64 @ v64.swapaxes(-1, -2)
    ds = p_want * (dp - (dp * p_want).sum(axis=-1, keepdims=True)) * float(scale)
    np.testing.assert_allclose(dv, p_want.swapaxes(-1, -2) @ g64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dq, ds @ k64, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dk, ds.swapaxes(-1, -2) @ q64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(7,), (3, 5000), (300001,)])
def test_relu(shape, threads, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[:2] = [0.0, -0.0]
    y = cpu_kernels.relu_forward(x)
    np.testing.assert_array_equal(y, np.maximum(x, 0))
    g = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(cpu_kernels.relu_backward(g, y), g * (y > 0))


# --- the async weight gradients inside backward --------------------------------------------------------
def _gpt_grads(threads, monkeypatch, tie, twice=False):
    import tinygpt
    from tinygpt.models import GPT, GPTConfig
    monkeypatch.setenv("TINYGPT_NUM_THREADS", str(threads))
    tinygpt.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, tie_weights=tie,
                          activation="relu"))
    rng = np.random.default_rng(0)
    x = tinygpt.tensor(rng.integers(0, 11, (4, 8)))
    y = tinygpt.tensor(rng.integers(0, 11, (4, 8)))
    for _ in range(2 if twice else 1):                       # twice: .grad += on the second pass
        _, loss = model(x, y)
        loss.backward()
    return {name: p.grad.copy() for name, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [True, False])
def test_backward_with_async_weight_gradients_matches_one_thread(tie, monkeypatch):
    """Every Linear's dW is an async job here (MIN_ASYNC_MACS = 1); the tied head's weight gets two gradients
    (its embedding's and its head's), which must be waited for before they are added."""
    monkeypatch.setattr(cpu_linear, "MIN_MACS", 1)
    monkeypatch.setattr(cpu_linear, "MIN_ASYNC_MACS", 1)
    monkeypatch.setattr(cpu_linear, "MIN_STACK_MACS", 1)
    monkeypatch.setattr(T, "_limit", None)
    one = _gpt_grads(1, monkeypatch, tie)
    runs = _runs()
    two = _gpt_grads(2, monkeypatch, tie)
    assert _runs() > runs
    assert not T._team._pending and all(not w.unfinished for w in T._team._workers)
    for name in one:
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-6, err_msg=name)
    accumulated = _gpt_grads(2, monkeypatch, tie, twice=True)
    for name in one:
        np.testing.assert_allclose(accumulated[name], 2 * one[name], rtol=1e-5, atol=1e-6, err_msg=name)
