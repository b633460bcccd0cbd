"""The one kernel switch (tinygpt/kernels.py): each op's reference math against its fused kernels, and the
reference math alone when the switch is off.

  * the whole op table (op_cases.py) in float32, kernels on and off: the same forward and gradients, and
    the CPU kernels run only when on;
  * a GPT (exact and tanh GELU, dropout) on and off: the same loss, gradients, and weights after 5 AdamW steps;
  * switched off (TINYGPT_KERNELS=reference in a fresh process, or `kernels.disabled()`), with every public
    function of cpu_kernels, cpu_linear and tinygpt.cuda.kernels raising, a GPT trains, evaluates and generates, and
    the fused ops run on a stand-in "cuda" device;
  * the environment variable: its values, and one line of error for an unknown one.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tinygpt
import tinygpt.functional as F
from tinygpt import backend, cpu_kernels, cpu_linear, kernels, nn, optim
from tinygpt.cuda import kernels as cuda_kernels
from tinygpt.models import GPT, GPTConfig
from tinygpt.train import estimate_loss
from op_cases import CASES, CASE_IDS, make_tensors

KERNEL_MODULES = (cpu_kernels, cpu_linear, cuda_kernels)


def public_functions(module) -> list[str]:
    """Every public function defined in `module` (lru_cache-wrapped ones included)."""
    return sorted(name for name, obj in vars(module).items()
                  if not name.startswith("_") and callable(obj) and not isinstance(obj, type)
                  and getattr(obj, "__module__", None) == module.__name__)


def test_public_functions_sees_the_kernels():
    assert {"gelu_forward", "layer_norm_forward", "softmax_lastaxis_", "adam_step", "embedding_backward",
            "normal_cdf", "relu_forward", "relu_backward"} <= set(public_functions(cpu_kernels))
    assert {"matmul", "linear_forward", "linear_backward", "attention_forward",
            "attention_backward"} <= set(public_functions(cpu_linear))
    assert {"gelu_forward", "softmax_forward", "cross_entropy_backward", "adam_step", "row_module",
            "elementwise"} <= set(public_functions(cuda_kernels))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Log every call of a public kernel function (module.name), letting it run."""
    calls = []
    for mod in KERNEL_MODULES:
        for name in public_functions(mod):
            def logged(*a, _f=getattr(mod, name), _n=f"{mod.__name__}.{name}", **k):
                calls.append(_n)
                return _f(*a, **k)
            monkeypatch.setattr(mod, name, logged)
    return calls


def _make_kernels_raise(monkeypatch, keep=()):
    for mod in KERNEL_MODULES:
        for name in public_functions(mod):
            if name not in keep:
                def boom(*a, _n=f"{mod.__name__}.{name}", **k):
                    raise AssertionError(f"{_n} was called with the kernels switched off")
                monkeypatch.setattr(mod, name, boom)


@pytest.fixture
def kernels_raise(monkeypatch):
    """Every public kernel function raises."""
    _make_kernels_raise(monkeypatch)


@pytest.fixture
def switch(monkeypatch):
    """Restores the switch (and its error) after a test that sets it."""
    monkeypatch.setattr(kernels, "_enabled", kernels._enabled)
    monkeypatch.setattr(kernels, "_env_error", kernels._env_error)
    return kernels


# =====================================================================================================
# The op table, kernels on and off
# =====================================================================================================
def _run_case(case, arrays, calls):
    tinygpt.manual_seed(0)
    ts = make_tensors(arrays, "cpu", np.float32)
    del calls[:]
    y = case.fn(*ts)
    g = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    y.backward(g)
    return (y.numpy(), [None if t.grad is None else np.asarray(t.grad) for t in ts if t.requires_grad],
            list(calls))


# cases that must take a CPU kernel in float32 (every other case may, or may not)
CPU_FUSED = ["gelu", "gelu_of_transposed", "layer_norm", "layer_norm_no_bias", "layer_norm_of_transposed",
             "embedding", "embedding_1d", "attention_causal", "attention_full", "attention_kv_cache",
             "attention_dropout_reseeded", "mlp_block", "relu", "F.relu", "linear", "linear_no_bias",
             "linear_1d", "softmax", "softmax_3d", "softmax_of_transposed"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_op_table_with_kernels_on_and_off(case, kernel_calls):
    arrays = case.inputs(np.random.default_rng(0))
    y_on, g_on, calls_on = _run_case(case, arrays, kernel_calls)
    with kernels.disabled():
        y_off, g_off, calls_off = _run_case(case, arrays, kernel_calls)
    assert calls_off == [], f"kernels ran while switched off: {calls_off}"
    if case.name in CPU_FUSED:
        assert any(c.startswith(("tinygpt.cpu_kernels.", "tinygpt.cpu_linear.")) for c in calls_on), \
            "the CPU kernels did not run"
    assert y_on.dtype == y_off.dtype == np.float32
    np.testing.assert_allclose(y_on, y_off, rtol=2e-5, atol=2e-6)
    assert len(g_on) == len(g_off)
    for a, b in zip(g_on, g_off):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype == np.float32
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)


def test_every_cpu_fused_case_exists():
    assert set(CPU_FUSED) <= set(CASE_IDS)


# =====================================================================================================
# A GPT, kernels on and off
# =====================================================================================================
CONFIG = GPTConfig(vocab_size=23, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)


def _gpt(approximate="none", config=CONFIG):
    tinygpt.manual_seed(0)
    model = GPT(config)
    if approximate == "tanh":
        for block in model.transformer.h:
            block.mlp.act = nn.GELU(approximate="tanh")
    return model


def _batch(config=CONFIG, B=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, config.vocab_size, (B, config.block_size)),
            rng.integers(0, config.vocab_size, (B, config.block_size)))


def _train(approximate, steps=5):
    """(first loss, first gradients by name, weights after `steps` AdamW steps by name)."""
    model = _gpt(approximate)
    opt = optim.AdamW(optim.weight_decay_groups(model, 0.1), lr=1e-3)
    x, y = _batch()
    tinygpt.manual_seed(1)                                   # the dropout masks
    loss0 = grads0 = None
    for _ in range(steps):
        _, loss = model(x, y)
        loss.backward()
        if loss0 is None:
            loss0, grads0 = loss.item(), {n: p.grad.copy() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return loss0, grads0, {n: p.data.copy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gpt_training_with_kernels_on_and_off(approximate, kernel_calls):
    on = _train(approximate)
    assert {"tinygpt.cpu_kernels.layer_norm_forward", "tinygpt.cpu_kernels.softmax_lastaxis_",
            "tinygpt.cpu_kernels.embedding_backward", "tinygpt.cpu_kernels.adam_step"} <= set(kernel_calls)
    assert ("tinygpt.cpu_kernels.gelu_forward" in kernel_calls) == (approximate == "none")
    del kernel_calls[:]
    with kernels.disabled():
        off = _train(approximate)
    assert kernel_calls == []
    assert on[0] == pytest.approx(off[0], rel=1e-6)
    assert on[1].keys() == off[1].keys() and len(on[1]) > 10
    for name in on[1]:
        scale = np.abs(off[1][name]).max()
        np.testing.assert_allclose(on[1][name], off[1][name], rtol=1e-4, atol=1e-5 * scale, err_msg=name)
    for name in on[2]:                                       # AdamW steps are ~1e-3 per weight
        np.testing.assert_allclose(on[2][name], off[2][name], rtol=0, atol=1e-5, err_msg=name)


# =====================================================================================================
# Switched off, the kernels are never called and everything still works
# =====================================================================================================
def _train_evaluate_generate():
    """A few AdamW steps, an evaluation and generation (cached and not) of a small GPT, on the CPU."""
    model = _gpt()
    opt = optim.AdamW(optim.weight_decay_groups(model, 0.1), lr=1e-2)
    x, y = _batch()
    losses = []
    for _ in range(4):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    ids = np.random.default_rng(2).integers(0, CONFIG.vocab_size, 500)
    ev = estimate_loss(model, {"train": ids, "val": ids[::-1].copy()}, 2, 4, CONFIG.block_size, 0, 0, "cpu")
    tinygpt.manual_seed(3)
    cached = model.generate([[1, 2]], 20).numpy()
    tinygpt.manual_seed(3)
    uncached = model.generate([[1, 2]], 20, use_cache=False).numpy()
    return losses, ev, cached, uncached


def _check_run(losses, ev, cached, uncached):
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]        # it learns the batch
    assert set(ev) == {"train", "val"} and all(2.0 < v < 4.0 for v in ev.values())   # ln 23 = 3.1
    assert cached.shape == (1, 22) and (cached == uncached).all()


def test_disabled_never_calls_a_kernel_and_trains(kernels_raise):
    with kernels.disabled():
        _check_run(*_train_evaluate_generate())
    with pytest.raises(AssertionError, match="cpu_kernels.layer_norm_forward was called"):   # the trap works
        F.layer_norm(tinygpt.tensor(np.ones((2, 3), np.float32)), tinygpt.tensor(np.ones(3, np.float32)))


def test_env_reference_in_a_fresh_process_never_calls_a_kernel():
    here = os.path.dirname(os.path.abspath(__file__))
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {here!r})
        from tinygpt import kernels
        import test_kernels as T
        assert kernels.enabled() is False
        for mod in T.KERNEL_MODULES:
            for name in T.public_functions(mod):
                def boom(*a, _n=mod.__name__ + "." + name, **k):
                    raise AssertionError(_n + " was called")
                setattr(mod, name, boom)
        T._check_run(*T._train_evaluate_generate())
        print("trained without kernels")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TINYGPT_KERNELS": "reference"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "trained without kernels"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="data parallelism forks: Linux only")
def test_disabled_trainer_with_forked_workers(monkeypatch, tmp_path):
    """`tinygpt train`'s loop, with 2 data-parallel processes (forked after the switch and the traps are
    set), never calls a kernel."""
    import io
    from tinygpt.train import RunSettings, Trainer
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(np.random.default_rng(0).choice(["the ", "cat ", "sat\n"], 2000)))
    settings = RunSettings.from_preset("cpu", n_layer=2, n_head=2, n_embd=16, block_size=8, batch_size=4,
                                       eval_iters=2, eval_interval=3, max_iters=3, dropout=0.1, workers=2,
                                       data=str(corpus), out_dir=str(tmp_path / "out"))
    _make_kernels_raise(monkeypatch)
    with kernels.disabled():
        trainer = Trainer(settings, progress=False, out=io.StringIO())
        trainer.run()
    assert trainer.iter == 3 and trainer.best_val_loss is not None and np.isfinite(trainer.best_val_loss)


class _NeverAnArray:
    pass


def _on_stand_in_cuda(array, requires_grad=False):
    """A Tensor of a NumPy array whose device is named "cuda" (so the ops ask for the CUDA kernels)."""
    t = tinygpt.tensor(array, requires_grad=requires_grad, dtype=array.dtype)
    t.device = backend.get_device("cuda")
    return t


def test_disabled_runs_the_cuda_ops_reference(kernels_raise, monkeypatch, rng):
    """On a stand-in "cuda" device every fused op (and Adam) takes the reference path when switched off."""
    monkeypatch.setitem(backend._DEVICES, "cuda", backend.Device("cuda", np, _NeverAnArray))
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    ops = [(lambda x: F.gelu(x), [r(3, 5)]), (lambda x: F.gelu(x, approximate="tanh"), [r(3, 5)]),
           (lambda x: F.softmax(x), [r(3, 5)]), (lambda x: F.log_softmax(x), [r(3, 5)]),
           (lambda x, w, b: F.layer_norm(x, w, b), [r(2, 3, 8), r(8), r(8)]),
           (lambda z, t: F.cross_entropy(z, t), [r(4, 6), np.array([0, 5, 2, 1])]),
           (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [r(1, 2, 5, 4)] * 3)]
    with kernels.disabled():
        for fn, arrays in ops:
            ts = [_on_stand_in_cuda(a, a.dtype.kind == "f") for a in arrays]
            fn(*ts).sum().backward()
            assert all(t.grad is not None for t in ts if t.requires_grad)
        p = nn.Parameter(r(4, 3))
        p.device = backend.get_device("cuda")
        p.grad = r(4, 3)
        optim.AdamW([p]).step()
    with pytest.raises(AssertionError, match="cuda.kernels.gelu_forward was called"):        # the trap works
        F.gelu(_on_stand_in_cuda(r(3)))


# =====================================================================================================
# The switch itself
# =====================================================================================================
def test_fused_answers_by_device_and_dtype():
    x32, x64, i64 = np.zeros(3, np.float32), np.zeros(3), np.zeros(3, np.int64)
    cpu = backend.get_device("cpu")
    assert kernels.fused(cpu, x32, x64) == "cpu" and kernels.fused("cpu") == "cpu"
    assert kernels.fused(cpu, x32, i64) is None                  # integer arrays are no kernel's business
    assert kernels.fused(cpu, [1.0, 2.0]) is None                # nor is anything but a NumPy array
    assert kernels.fused("strict", x32) is None                  # a device without kernels
    assert kernels.fused("cuda", x32) == "cuda"
    with kernels.disabled():
        assert kernels.enabled() is False and kernels.fused(cpu, x32) is None
        with kernels.disabled():
            pass
        assert kernels.enabled() is False                        # nested: restored to off, not on
    assert kernels.enabled() is True


@pytest.mark.parametrize("value, on", [(None, True), ("", True), ("fused", True), (" Fused\n", True),
                                       ("reference", False), ("REFERENCE", False)])
def test_env_values(value, on, switch, monkeypatch):
    if value is None:
        monkeypatch.delenv(kernels.ENV, raising=False)
    else:
        monkeypatch.setenv(kernels.ENV, value)
    kernels.set_enabled(None)                                    # read the environment again
    assert kernels.enabled() is on
    assert (kernels.fused("cpu", np.zeros(2, np.float32)) == "cpu") is on
    kernels.set_enabled(not on)
    assert kernels.enabled() is (not on)


@pytest.mark.parametrize("value", ["fast", "0", "off", "reference,fused"])
def test_env_unknown_value_is_a_one_line_error(value, switch, monkeypatch):
    monkeypatch.setenv(kernels.ENV, value)
    kernels.set_enabled(None)
    for ask in (kernels.enabled, lambda: kernels.fused("cpu")):
        with pytest.raises(ValueError) as e:
            ask()
        msg = str(e.value)
        assert "\n" not in msg and f"TINYGPT_KERNELS={value!r}" in msg and "'reference'" in msg
    with kernels.disabled():                                     # code may still switch them off
        assert kernels.fused("cpu") is None
    kernels.set_enabled(True)
    assert kernels.fused("cpu") == "cpu"


def test_env_unknown_value_fails_the_command_in_one_line():
    """Importing works; the first op raises, and the `tinygpt` command reports that on one line."""
    env = {**os.environ, "TINYGPT_KERNELS": "fast"}
    r = subprocess.run([sys.executable, "-c", "import tinygpt, tinygpt.kernels; print('imported')"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "imported", r.stderr
    cmd = [sys.executable, "-m", "tinygpt", "bench", "--preset", "cpu", "--batch-size", "1", "--steps", "1",
           "--no-torch", "--no-memory", "--workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr == ("tinygpt: error: TINYGPT_KERNELS='fast' is not a known value; set it to 'fused' "
                        "(the default) or 'reference'\n")


def test_matmul_is_a_at_b_on_the_cpu(rng):
    a, b = rng.standard_normal((2, 3, 4)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32)
    np.testing.assert_array_equal(kernels.matmul(a, b), a @ b)


def test_reference_normal_cdf_is_accurate():
    """The plain A&S 7.1.26 of ops/activations.py (what GELU uses with the kernels off) against math.erfc."""
    from tinygpt.ops.activations import _normal_cdf_as, normal_cdf
    x = np.concatenate([np.linspace(-9, 9, 1801), [0.0, -0.0]]).astype(np.float32)
    exact = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
    y = _normal_cdf_as(x)
    assert y.dtype == np.float32 and (np.diff(y[:-2]) >= 0).all() and (y[-2:] == 0.5).all()
    np.testing.assert_allclose(y, exact, rtol=0, atol=3e-7)          # A&S: 0.75e-7 on Φ, plus float32 rounding
    with kernels.disabled():
        np.testing.assert_array_equal(normal_cdf(x), y)
    np.testing.assert_allclose(normal_cdf(x), y, rtol=0, atol=1e-7)          # the kernel: the same formula
