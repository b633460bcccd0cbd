"""Muon (tinygpt/optim/muon.py) against independent references.

The Newton–Schulz iteration acts on each singular value alone: for M = U Σ Vᵀ, X_0 = M/‖M‖_F = U (Σ/‖M‖_F) Vᵀ
and every step keeps U, V and maps σ -> aσ + bσ³ + cσ⁵. So the reference here is an SVD and a scalar
polynomial applied five times (no matrix products at all), and the Muon step is written out again in NumPy.
"""
import numpy as np
import pytest

import tinygpt
from tinygpt import optim
from tinygpt.models import GPT, GPTConfig
from tinygpt.optim.muon import NS_COEFFICIENTS, newton_schulz


def ns_by_svd(M, steps=5, eps=1e-7):
    """The NS5 output computed on the singular values: U p(p(...p(σ/‖M‖))) Vᵀ (float64)."""
    M = np.asarray(M, dtype=np.float64)
    U, s, Vt = np.linalg.svd(M, full_matrices=False)
    a, b, c = NS_COEFFICIENTS
    s = s / (np.sqrt((M ** 2).sum()) + eps)
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return (U * s) @ Vt


@pytest.mark.parametrize("shape", [(16, 16), (48, 16), (16, 48), (7, 3)])
def test_newton_schulz_is_the_polynomial_on_singular_values(shape, rng):
    M = rng.standard_normal(shape)
    np.testing.assert_allclose(newton_schulz(M), ns_by_svd(M), rtol=1e-9, atol=1e-9)
    out32 = newton_schulz(M.astype(np.float32))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, ns_by_svd(M), atol=2e-4)


@pytest.mark.parametrize("shape", [(128, 128), (384, 128), (128, 512)])
def test_newton_schulz_output_is_nearly_orthogonal(shape, rng):
    # singular values spread over two decades (condition number 100), random singular vectors
    k = min(shape)
    U, _ = np.linalg.qr(rng.standard_normal((shape[0], k)))
    V, _ = np.linalg.qr(rng.standard_normal((shape[1], k)))
    M = (U * np.logspace(0, -2, k)) @ V.T
    O = newton_schulz(M.astype(np.float32))
    s = np.linalg.svd(O, compute_uv=False)
    assert 0.6 < s.min() and s.max() < 1.25          # every direction moves about equally
    # and the directions are M's: O ≈ U Vᵀ up to those factors
    np.testing.assert_allclose(U.T @ O @ V, np.diag(np.diag(U.T @ O @ V)), atol=1e-3)


def muon_reference(W0, grads, lr, mu, wd, nesterov=True):
    """The Muon update of the module docstring, one step per gradient, in float64 NumPy."""
    W, B = W0.astype(np.float64).copy(), np.zeros_like(W0, dtype=np.float64)
    for g in grads:
        B = mu * B + g
        M = g + mu * B if nesterov else B
        O = ns_by_svd(M)
        W = (1 - lr * wd) * W - lr * np.sqrt(max(1.0, W.shape[0] / W.shape[1])) * O
    return W


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shape", [(24, 8), (8, 24)])
def test_muon_steps_match_the_reference(shape, nesterov, rng):
    W0 = rng.standard_normal(shape)
    grads = [rng.standard_normal(shape) for _ in range(4)]
    p = tinygpt.tensor(W0, dtype=np.float64, requires_grad=True)
    opt = optim.Muon([{"params": [p], "muon": True, "lr_scale": 2.0}], lr=0.01, momentum=0.9,
                     nesterov=nesterov, weight_decay=0.1)
    for g in grads:
        p.grad = g.copy()
        opt.step()
    np.testing.assert_allclose(p.numpy(), muon_reference(W0, grads, 0.02, 0.9, 0.1, nesterov), rtol=1e-8,
                               atol=1e-10)


def test_muon_adamw_groups_match_adamw(rng):
    shapes = [(5, 3), (3,)]
    init = [rng.standard_normal(s) for s in shapes]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(3)]
    a = [tinygpt.tensor(x, dtype=np.float64, requires_grad=True) for x in init]
    b = [tinygpt.tensor(x, dtype=np.float64, requires_grad=True) for x in init]
    muon = optim.Muon([{"params": [a[0]], "muon": False, "weight_decay": 0.1, "lr_scale": 0.5},
                       {"params": [a[1]], "muon": False, "lr_scale": 0.5}], lr=4e-3, betas=(0.8, 0.95))
    adamw = optim.AdamW([{"params": [b[0]], "weight_decay": 0.1}, {"params": [b[1]], "weight_decay": 0.0}],
                        lr=2e-3, betas=(0.8, 0.95))
    for gs in grads:
        for pa, pb, g in zip(a, b, gs):
            pa.grad, pb.grad = g.copy(), g.copy()
        muon.step()
        adamw.step()
    for pa, pb in zip(a, b):
        np.testing.assert_allclose(pa.numpy(), pb.numpy(), rtol=1e-12)


def test_muon_groups_of_a_gpt():
    tinygpt.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, bias=True, tie_weights=True))
    groups = optim.muon_groups(m, muon_lr_scale=20.0, weight_decay=0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    hidden, embed, flat = ([names[id(p)] for p in g["params"]] for g in groups)
    assert groups[0]["muon"] and not groups[1]["muon"] and not groups[2]["muon"]
    assert sorted(hidden) == sorted(n for n, p in m.named_parameters() if n.startswith("transformer.h.")
                                    and p.ndim == 2)
    assert len(hidden) == 2 * 4
    assert sorted(embed) == ["transformer.wpe.weight", "transformer.wte.weight"]   # the tied head once
    assert all(n.endswith("bias") or ".ln_" in n for n in flat)
    assert (groups[0]["lr_scale"], groups[1]["weight_decay"], groups[2]["weight_decay"]) == (20.0, 0.1, 0.0)
    with pytest.raises(ValueError, match="2-D"):
        optim.Muon([{"params": [m.transformer.ln_f.weight], "muon": True}])


def test_muon_state_dict_round_trip(rng):
    def make():
        tinygpt.manual_seed(0)
        m = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, bias=False))
        return m, optim.Muon(optim.muon_groups(m, 10.0), lr=1e-3)
    idx = rng.integers(0, 11, (3, 8))

    def step(m, opt):
        _, loss = m(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
    m1, o1 = make()
    for _ in range(2):
        step(m1, o1)
    m2, o2 = make()
    m2.load_state_dict(m1.state_dict())
    o2.load_state_dict(o1.state_dict())
    step(m1, o1)
    step(m2, o2)
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        np.testing.assert_array_equal(p1.numpy(), p2.numpy(), err_msg=n)


def test_a_muon_run_resumes_bit_exact(tmp_path):
    from tinygpt import checkpoint
    from tinygpt.train import RunSettings, Trainer
    kw = dict(data="shakespeare", n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_iters=2,
              eval_interval=3, max_iters=6, lr_decay_iters=6, warmup_iters=2, workers=1)
    Trainer(RunSettings.from_preset("speedrun", out_dir=str(tmp_path / "a"), **kw), progress=False).run()
    Trainer(RunSettings.from_preset("speedrun", out_dir=str(tmp_path / "b"), **{**kw, "max_iters": 3}),
            progress=False).run()
    Trainer.resume(tmp_path / "b", {"max_iters": 6}, progress=False).run()
    a, b = (checkpoint.load(checkpoint.checkpoint_path(tmp_path / d, "last")) for d in "ab")
    assert a.meta["iter"] == b.meta["iter"] == 6
    for k in a.model_state:
        np.testing.assert_array_equal(a.model_state[k], b.model_state[k], err_msg=k)
    assert any("momentum_buffer" in s for s in b.optim_state["state"].values())


def test_threaded_group_update_is_the_reference_bit_for_bit(rng, monkeypatch):
    """A Muon group of several CPU matrices runs Newton–Schulz on threads (_update_group); each matrix must get
    exactly what the one-parameter reference (_update_param) gives, and match the NumPy reference."""
    import os
    shapes = [(24, 8), (8, 24), (16, 16), (32, 8)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]

    def run(threads):
        monkeypatch.setattr(os, "cpu_count", lambda: threads)
        ps = [tinygpt.tensor(x.copy(), requires_grad=True) for x in init]
        opt = optim.Muon([{"params": ps, "muon": True}], lr=0.02, momentum=0.9, weight_decay=0.1)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.copy()
            opt.step()
        return [p.numpy() for p in ps]
    threaded, single = run(2), run(1)
    for t, s, x0, i in zip(threaded, single, init, range(4)):
        np.testing.assert_array_equal(t, s)
        ref = muon_reference(x0, [g[i].astype(np.float64) for g in grads], 0.02, 0.9, 0.1)
        np.testing.assert_allclose(t, ref, atol=2e-5)
