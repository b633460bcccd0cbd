"""Tests for tinygpt.optim: update rules against float64 NumPy transcriptions of the papers and against
torch.optim, exact resume from state dicts, training a small MLP, clipping, weight-decay groups, schedules.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import tinygpt
import tinygpt.functional as F
from tinygpt import backend, nn, optim
from tinygpt.optim import OptimizerStateError

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------
# A fixed problem: least squares  L(W, b) = ½ Σ_n ‖W x_n + b − y_n‖² / N, with W (3, 4) and b (3,).
# Its gradient in closed form: r = X Wᵀ + b − Y (N, 3);  dL/dW = rᵀ X / N;  dL/db = Σ_n r_n / N.


def _problem():
    rng = np.random.default_rng(42)
    X, Y = rng.standard_normal((16, 4)), rng.standard_normal((16, 3)) + 1.0
    W0, b0 = rng.standard_normal((3, 4)) * 0.5, rng.standard_normal(3) * 0.5
    return X, Y, W0, b0


def _np_grads(W, b, X, Y):
    r = X @ W.T + b - Y
    return r.T @ X / len(X), r.sum(axis=0) / len(X)


def _tinygpt_loss(W, b, X, Y):
    """The same loss through tinygpt's autograd (so step() sees gradients made by backward())."""
    r = F.linear(X, W, b) - Y
    return (r * r).sum() * (0.5 / X.shape[0])


# --- independent float64 transcriptions of the papers' equations ------------------------------------------

def _sgd_ref(theta, g, buf, t, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    """PyTorch's SGD (Sutskever et al. 2013 form), one step; returns (theta, buf)."""
    g = g + weight_decay * theta
    if momentum:
        buf = g if t == 1 else momentum * buf + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    return theta - lr * g, buf


def _adam_ref(theta, g, m, v, t, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """Kingma & Ba (2015), Algorithm 1, with L2 decay added to the gradient; returns (theta, m, v)."""
    b1, b2 = betas
    g = g + weight_decay * theta
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return theta - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def _adamw_ref(theta, g, m, v, t, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    """Loshchilov & Hutter (2019), Algorithm 2: θ_t = θ_{t-1} − η_t (α m̂_t / (√v̂_t + ε) + λ θ_{t-1}),
    with α = lr, schedule multiplier η_t = 1 and λ = lr · weight_decay (PyTorch's parameterisation)."""
    b1, b2 = betas
    alpha, eta, lam = lr, 1.0, lr * weight_decay
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    return theta - eta * (alpha * m_hat / (np.sqrt(v_hat) + eps) + lam * theta), m, v


CASES = {  # name: (tinygpt optimizer class, reference, hyperparameters for group 0)
    "sgd": (optim.SGD, _sgd_ref, dict(lr=0.1)),
    "sgd_momentum_dampening_wd": (optim.SGD, _sgd_ref, dict(lr=0.05, momentum=0.9, dampening=0.3,
                                                            weight_decay=0.1)),
    "sgd_nesterov_wd": (optim.SGD, _sgd_ref, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.05)),
    "adam_l2": (optim.Adam, _adam_ref, dict(lr=0.03, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    "adamw": (optim.AdamW, _adamw_ref, dict(lr=0.03, betas=(0.85, 0.995), weight_decay=0.2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_trajectory_matches_float64_paper_transcription(name):
    cls, ref, hp = CASES[name]
    X, Y, W0, b0 = _problem()
    # tinygpt, in float64, with two groups: W with `hp`, b with half the lr and no weight decay
    W = tinygpt.tensor(W0.copy(), dtype="float64", requires_grad=True)  # copies: tensor() shares memory
    b = tinygpt.tensor(b0.copy(), dtype="float64", requires_grad=True)
    hp_b = {**hp, "lr": hp["lr"] / 2, "weight_decay": 0.0}
    opt = cls([{"params": [W], **hp}, {"params": [b], "lr": hp_b["lr"], "weight_decay": 0.0}],
              **{k: v for k, v in hp.items() if k not in ("lr", "weight_decay")}, lr=hp["lr"])
    Xt, Yt = tinygpt.tensor(X, dtype="float64"), tinygpt.tensor(Y, dtype="float64")
    # the reference, step by step
    theta = [W0.copy(), b0.copy()]
    slots = [[0.0, 0.0], [0.0, 0.0]]  # (m, v) for Adam, (buf, unused) for SGD
    for t in range(1, 31):
        opt.zero_grad()
        _tinygpt_loss(W, b, Xt, Yt).backward()
        opt.step()
        grads = _np_grads(theta[0], theta[1], X, Y)
        for i, h in enumerate((hp, hp_b)):
            if ref is _sgd_ref:
                theta[i], slots[i][0] = ref(theta[i], grads[i], slots[i][0], t, **h)
            else:
                theta[i], slots[i][0], slots[i][1] = ref(theta[i], grads[i], *slots[i], t, **h)
        assert W.dtype == np.float64 and b.dtype == np.float64
    assert_allclose(W.numpy(), theta[0], rtol=1e-11, atol=1e-13)
    assert_allclose(b.numpy(), theta[1], rtol=1e-11, atol=1e-13)
    assert not np.allclose(W0, theta[0], atol=1e-2)  # it moved: the comparison means something


# --- torch.optim parity ---------------------------------------------------------------------------------

TORCH_CASES = {
    "sgd_momentum": ("SGD", dict(lr=0.05, momentum=0.9)),
    "sgd_momentum_dampening": ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.5)),
    "sgd_nesterov": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    "sgd_l2": ("SGD", dict(lr=0.05, momentum=0.5, weight_decay=0.1)),
    "adam": ("Adam", dict(lr=0.01)),
    "adam_l2": ("Adam", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1)),
    "adamw": ("AdamW", dict(lr=0.01, weight_decay=0.1)),
    "adamw_betas_eps": ("AdamW", dict(lr=0.02, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.5)),
}


@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_tracks_torch_optim_for_25_steps(name):
    torch = pytest.importorskip("torch")
    opt_name, hp = TORCH_CASES[name]
    X, Y, W0, b0 = _problem()
    ours = [tinygpt.tensor(a, requires_grad=True) for a in (W0, b0)]         # float32
    theirs = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (W0, b0)]
    opt = getattr(optim, opt_name)(ours, **hp)
    topt = getattr(torch.optim, opt_name)(theirs, foreach=False, **hp)
    for _ in range(25):
        # the same gradient formula, at each side's own current point, as float32 gradients
        for p, g in zip(ours, _np_grads(*(p.numpy().astype(np.float64) for p in ours), X, Y)):
            p.grad = g.astype(np.float32)
        for p, g in zip(theirs, _np_grads(*(p.detach().numpy().astype(np.float64) for p in theirs), X, Y)):
            p.grad = torch.from_numpy(g.astype(np.float32))
        opt.step()
        topt.step()
    for p, tp in zip(ours, theirs):
        assert p.dtype == np.float32
        assert_allclose(p.numpy(), tp.detach().numpy(), rtol=1e-5, atol=1e-6)
    # the moments too: the state keys have torch's names
    for p, tp in zip(ours, theirs):
        state, tstate = opt.state[p], topt.state[tp]
        assert state["step"] == 25
        for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
            assert (key in state) == (key in tstate and tstate[key] is not None), key
            if key in state:
                assert_allclose(state[key], tstate[key].numpy(), rtol=1e-5, atol=1e-7)


def test_clip_grad_norm_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s).astype(np.float32) for s in [(3, 4), (4,), (2, 2, 2)]]
    for max_norm in (0.5, 100.0):
        ours = [tinygpt.tensor(a, requires_grad=True) for a in arrays]
        theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
        for p, tp, a in zip(ours, theirs, arrays):
            p.grad = a * 3
            tp.grad = torch.from_numpy(a * 3)
        total = optim.clip_grad_norm_(ours, max_norm)
        ttotal = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        assert_allclose(total.item(), ttotal.item(), rtol=1e-6)
        for p, tp in zip(ours, theirs):
            assert_allclose(p.grad, tp.grad.numpy(), rtol=1e-6, atol=1e-7)


# --- clipping -------------------------------------------------------------------------------------------------

def test_clip_grad_norm_scales_to_max_norm_and_returns_the_total():
    a, b, c = (tinygpt.tensor(np.zeros(s), requires_grad=True) for s in [(2, 2), (3,), (5,)])
    a.grad = np.full((2, 2), 1.0, np.float32)        # ‖·‖² = 4
    b.grad = np.array([2.0, 2.0, 1.0], np.float32)   # ‖·‖² = 9  -> total √13
    total = optim.clip_grad_norm_([a, b, c], 1.0)    # c has no grad: skipped
    assert isinstance(total, tinygpt.Tensor) and total.shape == () and total.dtype == np.float32
    assert total.item() == pytest.approx(math.sqrt(13), rel=1e-6)
    norm = math.sqrt(float((a.grad ** 2).sum() + (b.grad ** 2).sum()))
    assert norm == pytest.approx(1.0, rel=1e-5)
    assert_allclose(b.grad, np.array([2, 2, 1]) / math.sqrt(13), rtol=1e-5)
    assert c.grad is None
    # below max_norm: unchanged (c = min(1, ...) = 1)
    a.grad = np.full((2, 2), 1.0, np.float32)
    assert optim.clip_grad_norm_([a], 10.0).item() == pytest.approx(2.0)
    assert_array_equal(a.grad, np.full((2, 2), 1.0, np.float32))


def test_clip_grad_norm_on_param_groups_and_without_grads():
    p = tinygpt.tensor(np.ones(3), requires_grad=True)
    assert optim.clip_grad_norm_([p], 1.0).item() == 0.0
    p.grad = np.array([3.0, 4.0, 0.0], np.float32)
    assert optim.clip_grad_norm_([{"params": [p]}], 1.0).item() == pytest.approx(5.0)
    assert_allclose(p.grad, [0.6, 0.8, 0.0], rtol=1e-5)


# --- resuming ------------------------------------------------------------------------------------------------

def _mlp():
    return nn.Sequential(nn.Linear(2, 8), nn.GELU(), nn.Linear(8, 2))


XOR_X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
XOR_Y = np.array([0, 1, 1, 0])


def _make_opt(kind, model):
    if kind == "sgd":
        return optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    if kind == "adam":
        return optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3)
    return optim.AdamW(optim.weight_decay_groups(model, 0.1), lr=0.01, betas=(0.9, 0.95))


def _run(model, opt, schedule, its):
    X, y = tinygpt.tensor(XOR_X), tinygpt.tensor(XOR_Y)
    for it in its:
        for g in opt.param_groups:
            g["lr"] = schedule(it)
        loss = F.cross_entropy(model(X), y)
        opt.zero_grad()
        loss.backward()
        optim.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_state_dict_round_trip_mid_run_continues_bit_identically(kind):
    tinygpt.manual_seed(0)
    model = _mlp()
    opt = _make_opt(kind, model)
    schedule = optim.WarmupCosineLR(max_lr=opt.param_groups[0]["lr"], warmup_iters=3, lr_decay_iters=20,
                                    min_lr=1e-4)
    _run(model, opt, schedule, range(10))
    # a checkpoint: host copies, through JSON for the non-array parts (as a checkpoint file would)
    ckpt_model = model.state_dict()
    ckpt_opt = opt.state_dict()
    ckpt_sched = json.loads(json.dumps(schedule.state_dict()))
    groups_json = json.loads(json.dumps(ckpt_opt["param_groups"]))
    _run(model, opt, schedule, range(10, 20))     # the original run goes on (and must not touch the copies)
    # a fresh process-like restart: new objects with different initial values, then load
    tinygpt.manual_seed(123)
    model2 = _mlp()
    opt2 = _make_opt(kind, model2)
    model2.load_state_dict(ckpt_model)
    opt2.load_state_dict({"state": ckpt_opt["state"], "param_groups": groups_json})
    _run(model2, opt2, optim.schedule_from_state(ckpt_sched), range(10, 20))
    for (n, p), (_, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert_array_equal(p.numpy(), p2.numpy(), err_msg=n)
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd["param_groups"] == sd2["param_groups"]  # betas came back from JSON's list as a tuple
    assert sd["state"].keys() == sd2["state"].keys()
    for i in sd["state"]:
        assert sd["state"][i].keys() == sd2["state"][i].keys()
        for k, v in sd["state"][i].items():
            assert_array_equal(v, sd2["state"][i][k])


def test_state_dict_format_is_host_numpy_with_int_steps():
    tinygpt.manual_seed(0)
    model = _mlp()
    opt = optim.AdamW(model.parameters(), lr=0.01)
    _run(model, opt, optim.ConstantLR(0.01), range(3))
    sd = opt.state_dict()
    assert sorted(sd) == ["param_groups", "state"]
    assert sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert sd["param_groups"][0]["lr"] == 0.01 and sd["param_groups"][0]["betas"] == (0.9, 0.999)
    s0 = sd["state"][0]
    assert sorted(s0) == ["exp_avg", "exp_avg_sq", "step"] and s0["step"] == 3 and type(s0["step"]) is int
    assert isinstance(s0["exp_avg"], np.ndarray) and s0["exp_avg"].dtype == np.float32
    s0["exp_avg"][...] = 99.0  # a copy, not the live moment
    assert not np.any(backend.to_numpy(opt.state[next(model.parameters())]["exp_avg"]) == 99.0)


def test_load_state_dict_errors():
    tinygpt.manual_seed(0)
    model = _mlp()
    opt = optim.Adam(model.parameters(), lr=0.01)
    _run(model, opt, optim.ConstantLR(0.01), range(2))
    good = opt.state_dict()
    fresh = lambda: optim.Adam(_mlp().parameters(), lr=0.01)  # noqa: E731
    with pytest.raises(OptimizerStateError, match="expected a dict with keys 'state' and 'param_groups'"):
        fresh().load_state_dict({"state": {}})
    with pytest.raises(OptimizerStateError, match="2 parameter groups but this optimizer has 1"):
        fresh().load_state_dict({"state": {}, "param_groups": good["param_groups"] * 2})
    short = [{**good["param_groups"][0], "params": [0, 1, 2]}]
    with pytest.raises(OptimizerStateError, match="group 0 has 3 parameters in the state but 4 here"):
        fresh().load_state_dict({"state": {}, "param_groups": short})
    wrong_shape = {**good, "state": {**good["state"], 1: {**good["state"][1], "exp_avg": np.zeros((3, 3))}}}
    with pytest.raises(OptimizerStateError, match=r"'exp_avg' of parameter 1 has shape \(3, 3\)"):
        fresh().load_state_dict(wrong_shape)
    with pytest.raises(OptimizerStateError, match="'momentum_buffer', which Adam does not keep"):
        fresh().load_state_dict({**good, "state": {0: {"step": 1, "momentum_buffer": np.zeros((8, 2))}}})
    with pytest.raises(OptimizerStateError, match=r"lacks \['exp_avg_sq'\]"):
        fresh().load_state_dict({**good, "state": {0: {"step": 1, "exp_avg": np.zeros((8, 2))}}})
    with pytest.raises(OptimizerStateError, match="parameter 7, which no group lists"):
        fresh().load_state_dict({**good, "state": {7: good["state"][0]}})
    sgd = optim.SGD(_mlp().parameters(), lr=0.1)
    with pytest.raises(OptimizerStateError, match=r"hyperparameters \['betas', 'eps'\] that SGD does not use"):
        sgd.load_state_dict(good)
    # a failed load changes nothing
    opt3 = fresh()
    with pytest.raises(OptimizerStateError):
        opt3.load_state_dict(wrong_shape)
    assert opt3.state == {}


def test_load_state_dict_restores_hyperparameters_and_copies_arrays():
    tinygpt.manual_seed(0)
    model = _mlp()
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _run(model, opt, optim.ConstantLR(0.1), range(2))
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.025
    opt2 = optim.SGD(_mlp().parameters(), lr=1.0, momentum=0.9)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["lr"] == 0.025
    p0 = opt2.param_groups[0]["params"][0]
    assert opt2.state[p0]["momentum_buffer"] is not sd["state"][0]["momentum_buffer"]
    assert_array_equal(opt2.state[p0]["momentum_buffer"], sd["state"][0]["momentum_buffer"])
    assert opt2.state[p0]["step"] == 2


# --- behaviour ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdamW])
def test_updates_are_in_place_skip_missing_grads_and_stay_float32(cls):
    a = tinygpt.tensor(np.ones((2, 3)), requires_grad=True)
    b = tinygpt.tensor(np.ones(3), requires_grad=True)
    opt = cls([a, b], lr=np.float64(0.1), **({"momentum": np.float64(0.9)} if cls is optim.SGD else
                                             {"betas": (np.float64(0.9), 0.99), "weight_decay": np.float64(0.1)}))
    data_a = a.data
    a.grad = np.full((2, 3), 0.5, np.float32)
    for _ in range(3):
        opt.step()
    assert a.data is data_a and a.dtype == np.float32
    assert not np.allclose(a.numpy(), 1.0)
    assert_array_equal(b.numpy(), np.ones(3))  # grad None: untouched, and no state made
    assert b not in opt.state and opt.state[a]["step"] == 3
    for v in opt.state[a].values():
        assert not hasattr(v, "dtype") or v.dtype == np.float32
    assert_array_equal(a.grad, np.full((2, 3), 0.5, np.float32))  # the gradient itself is never modified


def test_zero_grad_and_param_group_lr():
    p = tinygpt.tensor(np.ones(2), requires_grad=True)
    opt = optim.SGD(p, lr=0.5)
    p.grad = np.ones(2, np.float32)
    opt.zero_grad(set_to_none=False)
    assert_array_equal(p.grad, [0, 0])
    opt.zero_grad()
    assert p.grad is None
    p.grad = np.ones(2, np.float32)
    opt.param_groups[0]["lr"] = 0.25   # what a schedule does
    opt.step()
    assert_allclose(p.numpy(), [0.75, 0.75])


def test_adamw_decays_only_the_decay_group():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    opt = optim.AdamW(optim.weight_decay_groups(model, 0.5), lr=0.1)
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = np.zeros(p.shape, np.float32)  # m = v = 0: only the decoupled decay moves anything
    opt.step()
    for n, p in model.named_parameters():
        expect = before[n] * (1 - 0.1 * 0.5) if p.ndim >= 2 else before[n]
        assert_allclose(p.numpy(), expect, rtol=1e-6, err_msg=n)


def test_weight_decay_groups_split_like_nanogpt():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.ln = nn.LayerNorm(4)
            self.head = nn.Linear(4, 10, bias=True)
            self.head.weight = self.emb.weight  # tied: counted once
            self.frozen = nn.Parameter(np.zeros((2, 2)), requires_grad=False)

    net = Net()
    decay, no_decay = optim.weight_decay_groups(net, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(net.emb.weight)]
    assert [id(p) for p in no_decay["params"]] == [id(net.ln.weight), id(net.ln.bias), id(net.head.bias)]
    # the same from (name, param) pairs or bare params
    for src in (list(net.named_parameters()), list(net.parameters())):
        d2, n2 = optim.weight_decay_groups(src, 0.1)
        assert [id(p) for p in d2["params"]] == [id(net.emb.weight)] and len(n2["params"]) == 3
    with pytest.raises(TypeError, match="expected a Module, Tensors or"):
        optim.weight_decay_groups([1, 2], 0.1)


def test_param_group_validation():
    p, q = (tinygpt.tensor(np.ones(2), requires_grad=True) for _ in range(2))
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.SGD([], lr=0.1)
    with pytest.raises(ValueError, match="appears twice"):
        optim.SGD([p, p], lr=0.1)
    with pytest.raises(ValueError, match="appears twice"):
        optim.Adam([{"params": [p]}, {"params": [p, q]}])
    with pytest.raises(ValueError, match="not a leaf that requires grad"):
        optim.Adam([tinygpt.tensor([1.0])])
    with pytest.raises(ValueError, match="not a leaf that requires grad"):
        optim.Adam([p * 2])
    with pytest.raises(TypeError, match="is a ndarray, not a Tensor"):
        optim.Adam([np.ones(2)])
    with pytest.raises(ValueError, match=r"unknown hyperparameters \['weight_deacy'\]"):
        optim.AdamW([{"params": [p], "weight_deacy": 0.1}])
    with pytest.raises(ValueError, match="lr must be >= 0"):
        optim.SGD([p], lr=-1.0)
    with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\)"):
        optim.Adam([p], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        optim.SGD([p], lr=0.1, nesterov=True)
    opt = optim.AdamW([{"params": [p], "lr": 0.5}, {"params": q, "weight_decay": 0.0}], lr=0.1)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert "group 1: 1 params" in repr(opt)


# --- training a tiny MLP to near-zero loss --------------------------------------------------------------

@pytest.mark.parametrize("make", [
    lambda ps: optim.SGD(ps, lr=0.3, momentum=0.9),
    lambda ps: optim.SGD(ps, lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-4),
    lambda ps: optim.Adam(ps, lr=0.05),
    lambda ps: optim.AdamW(ps, lr=0.05, weight_decay=0.01),
], ids=["sgd_momentum", "sgd_nesterov", "adam", "adamw"])
def test_each_optimizer_trains_xor(make):
    tinygpt.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.GELU(), nn.Linear(16, 2))
    opt = make(model.parameters())
    X, y = tinygpt.tensor(XOR_X), tinygpt.tensor(XOR_Y)
    first = None
    for _ in range(300):
        loss = F.cross_entropy(model(X), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = F.cross_entropy(model(X), y).item()
    assert first > 0.5 and final < 0.02, (first, final)


def test_readme_example_runs_and_learns_xor():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "train_mlp.py")], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    final = [line for line in out.stdout.splitlines() if line.startswith("final loss")]
    assert final, out.stdout
    assert float(final[0].split()[-1]) < 0.01, out.stdout
    assert "predictions [0 1 1 0]" in out.stdout


# --- schedules ------------------------------------------------------------------------------------------------

def _nanogpt_get_lr(it, learning_rate, warmup_iters, lr_decay_iters, min_lr):
    """nanoGPT train.py's get_lr, transcribed."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


def test_warmup_cosine_matches_nanogpt():
    s = optim.WarmupCosineLR(max_lr=6e-4, warmup_iters=10, lr_decay_iters=100, min_lr=6e-5)
    for it in range(130):
        assert s(it) == pytest.approx(_nanogpt_get_lr(it, 6e-4, 10, 100, 6e-5), rel=1e-12, abs=1e-18)
    assert s(0) == pytest.approx(6e-4 / 11) and s(10) == pytest.approx(6e-4) and s(100) == pytest.approx(6e-5)
    assert s(55) == pytest.approx((6e-4 + 6e-5) / 2)  # halfway through the cosine
    assert all(s(i) >= s(i + 1) for i in range(10, 120))
    no_warmup = optim.WarmupCosineLR(1.0, 0, 0, 0.1)  # degenerate: straight to min_lr, no division by 0
    assert no_warmup(0) == 0.1 and no_warmup(5) == 0.1
    with pytest.raises(ValueError, match="need 0 <= warmup_iters <= lr_decay_iters"):
        optim.WarmupCosineLR(1.0, 10, 5, 0.1)


def test_step_and_constant_schedules():
    s = optim.StepLR(1.0, step_size=3, gamma=0.5)
    assert [s(i) for i in range(8)] == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert optim.ConstantLR(0.3)(0) == optim.ConstantLR(0.3)(10 ** 6) == 0.3
    with pytest.raises(ValueError, match="step_size must be >= 1"):
        optim.StepLR(1.0, 0)


@pytest.mark.parametrize("sched", [optim.ConstantLR(0.1), optim.StepLR(0.1, 5, 0.3),
                                   optim.WarmupCosineLR(1e-3, 5, 50, 1e-4)], ids=repr)
def test_schedule_state_round_trip_through_json(sched):
    d = json.loads(json.dumps(sched.state_dict()))
    assert "kind" in d
    again = optim.schedule_from_state(d)
    assert type(again) is type(sched) and [again(i) for i in range(60)] == [sched(i) for i in range(60)]


def test_schedule_from_state_errors():
    with pytest.raises(ValueError, match="unknown schedule kind 'linear'"):
        optim.schedule_from_state({"kind": "linear"})
    with pytest.raises(ValueError, match="bad settings"):
        optim.schedule_from_state({"kind": "step", "lr": 1.0})


# --- the device path, on the strict stand-in for CuPy -------------------------------------------------------

def test_optimizers_and_clipping_run_on_a_strict_device():
    strict = pytest.importorskip("strict_xp")
    strict.register()
    results = {}
    for dev in ("cpu", strict.DEVICE):
        tinygpt.manual_seed(0)
        model = _mlp().to(dev)
        opts = [optim.AdamW(optim.weight_decay_groups(model, 0.1), lr=0.01),
                optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
                optim.Adam(model.parameters(), lr=0.01, weight_decay=0.01)]
        X, y = tinygpt.tensor(XOR_X, device=dev), tinygpt.tensor(XOR_Y, device=dev)
        norms = []
        for opt in opts:
            for _ in range(3):
                loss = F.cross_entropy(model(X), y)
                opt.zero_grad()
                loss.backward()
                norms.append(optim.clip_grad_norm_(model.parameters(), 0.5))
                opt.step()
        # resume onto this device from a host state dict
        sd = opts[0].state_dict()
        opts[0].load_state_dict(sd)
        p0 = opts[0].param_groups[0]["params"][0]
        assert backend.device_of(opts[0].state[p0]["exp_avg"]).name == dev
        assert all(n.device.name == dev for n in norms)
        results[dev] = ([n.item() for n in norms], [p.numpy() for p in model.parameters()])
    assert_allclose(results["cpu"][0], results[strict.DEVICE][0], rtol=1e-6)
    for a, b in zip(results["cpu"][1], results[strict.DEVICE][1]):
        assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_step_and_clipping_never_sync_with_the_host(monkeypatch):
    """On the strict device every way back to the host (bool, float, item, asnumpy) raises inside step()."""
    strict = pytest.importorskip("strict_xp")
    strict.register()
    tinygpt.manual_seed(0)
    model = _mlp().to(strict.DEVICE)
    opts = [optim.AdamW(model.parameters(), lr=0.01), optim.Adam(model.parameters(), weight_decay=0.1),
            optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)]
    X, y = tinygpt.tensor(XOR_X, device=strict.DEVICE), tinygpt.tensor(XOR_Y, device=strict.DEVICE)
    F.cross_entropy(model(X), y).backward()

    def no_sync(*args, **kwargs):
        raise AssertionError("a host/device sync inside the optimizer")

    for name in ("__bool__", "__float__", "__int__", "item", "tolist", "get"):
        monkeypatch.setattr(strict.StrictArray, name, no_sync)
    monkeypatch.setattr(strict.strict_xp, "asnumpy", no_sync)
    for opt in opts:
        for _ in range(2):
            optim.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
    monkeypatch.undo()
    assert all(np.isfinite(p.numpy()).all() for p in model.parameters())


def test_optimizer_state_lives_on_the_parameters_device(device):
    tinygpt.manual_seed(0)
    model = _mlp().to(device)
    opt = optim.AdamW(model.parameters(), lr=0.01)
    X = tinygpt.tensor(XOR_X, device=device)
    loss = F.cross_entropy(model(X), tinygpt.tensor(XOR_Y, device=device))
    loss.backward()
    opt.step()
    for s in opt.state.values():
        assert backend.device_of(s["exp_avg"]).name == device
