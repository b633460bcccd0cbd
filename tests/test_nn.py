"""Tests for tinygpt.nn: registration, names, state dicts (and their errors), modes, devices, layers
against closed forms and against torch.nn (state dicts port both ways)."""
import math

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import tinygpt
import tinygpt.functional as F
from tinygpt import backend, nn
from tinygpt.nn import StateDictError


class Block(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.ln = nn.LayerNorm(C)
        self.fc = nn.Linear(C, C)

    def forward(self, x):
        return x + F.relu(self.fc(self.ln(x)))


class Net(nn.Module):
    """A small GPT-shaped tree: embedding, a ModuleList of blocks, a head tied to the embedding."""

    def __init__(self, V=10, C=4, n=2):
        super().__init__()
        self.wte = nn.Embedding(V, C)
        self.h = nn.ModuleList([Block(C) for _ in range(n)])
        self.scale = nn.Parameter([1.0])
        self.head = nn.Linear(C, V, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.h:
            x = block(x)
        return self.head(x * self.scale)


NET_NAMES = ["scale", "wte.weight", "h.0.ln.weight", "h.0.ln.bias", "h.0.fc.weight", "h.0.fc.bias",
             "h.1.ln.weight", "h.1.ln.bias", "h.1.fc.weight", "h.1.fc.bias"]  # own parameters first, as torch


# --- Parameter --------------------------------------------------------------------------------------------

def test_parameter_is_a_tensor_that_requires_grad():
    p = nn.Parameter([[1.0, 2.0]])
    assert isinstance(p, tinygpt.Tensor) and p.requires_grad and p.is_leaf
    assert p.dtype == np.float32 and p.shape == (1, 2)
    assert nn.Parameter(np.zeros(3)).dtype == np.float32      # float64 host data -> float32, as tensor()
    t = tinygpt.tensor(np.arange(3.0), dtype="float64")
    p64 = nn.Parameter(t)
    assert p64.dtype == np.float64 and p64.data is t.data      # a Tensor's array is shared, dtype kept
    assert not nn.Parameter([1.0], requires_grad=False).requires_grad
    assert repr(p).startswith("Parameter containing:")
    with pytest.raises(TypeError, match="only floating-point tensors can require grad"):
        nn.Parameter(np.arange(3))


# --- registration and names -------------------------------------------------------------------------------

def test_named_parameters_dotted_names_and_shared_parameters_once():
    net = Net()
    assert [n for n, _ in net.named_parameters()] == NET_NAMES   # head.weight is wte.weight: listed once
    assert len(list(net.parameters())) == len(NET_NAMES)
    all_names = [n for n, _ in net.named_parameters(remove_duplicate=False)]
    assert all_names == NET_NAMES + ["head.weight"]
    assert net.num_parameters() == 10 * 4 + 2 * (4 + 4 + 16 + 4) + 1
    assert [n for n, _ in net.named_parameters(prefix="model")][1] == "model.wte.weight"
    assert [n for n, _ in net.named_modules()] == ["", "wte", "h", "h.0", "h.0.ln", "h.0.fc", "h.1",
                                                   "h.1.ln", "h.1.fc", "head"]
    assert [type(m).__name__ for m in net.children()] == ["Embedding", "ModuleList", "Linear"]


def test_shared_module_counts_once():
    lin = nn.Linear(3, 3)
    seq = nn.Sequential(lin, nn.ReLU(), lin)
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias"]
    assert list(seq.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert seq.num_parameters() == 12


def test_registration_rules():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(np.ones(2))
            self.sub = nn.Linear(2, 2)
            self.plain = [nn.Linear(2, 2)]        # a plain list hides its modules, as in torch
            self.t = tinygpt.tensor([1.0])         # a plain tensor is not a parameter

    m = M()
    assert [n for n, _ in m.named_parameters()] == ["w", "sub.weight", "sub.bias"]
    with pytest.raises(TypeError, match="cannot assign a Tensor to parameter 'w'"):
        m.w = tinygpt.tensor([1.0, 2.0])
    with pytest.raises(TypeError, match="cannot assign a int to sub-module 'sub'"):
        m.sub = 3
    m.w = None                                     # an empty slot, like Linear(bias=False).bias
    assert "w" not in dict(m.named_parameters())
    m.w = nn.Parameter(np.zeros(2))                # re-registered under the same name
    del m.sub
    assert [n for n, _ in m.named_parameters()] == ["w"]
    m.sub = nn.Parameter([3.0])                    # a name can change kind
    assert [n for n, _ in m.named_parameters()] == ["w", "sub"] and not list(m.children())
    with pytest.raises(TypeError, match=r"wrap it in nn.Parameter"):
        m.register_parameter("x", tinygpt.tensor([1.0]))

    class Forgot(nn.Module):
        def __init__(self):
            self.fc = nn.Linear(2, 2)

    with pytest.raises(AttributeError, match=r"call super\(\).__init__\(\)"):
        Forgot()


def test_containers():
    layers = [nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)]
    seq = nn.Sequential(*layers)
    assert len(seq) == 3 and seq[0] is layers[0] and seq[-1] is layers[2] and list(seq) == layers
    assert isinstance(seq[:2], nn.Sequential) and len(seq[:2]) == 2
    x = tinygpt.tensor(np.random.default_rng(0).standard_normal((5, 2)))
    assert_allclose(seq(x).numpy(), layers[2](layers[1](layers[0](x))).numpy())
    ml = nn.ModuleList()
    ml.append(nn.Linear(1, 1)).extend([nn.Linear(1, 2)])
    assert len(ml) == 2 and isinstance(ml[1:], nn.ModuleList) and ml[1].out_features == 2
    assert [n for n, _ in ml.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    with pytest.raises(NotImplementedError, match="loop over it"):
        ml(x)
    with pytest.raises(NotImplementedError, match="has no forward"):
        nn.Module()(x)


def test_repr_is_readable():
    r = repr(nn.Sequential(nn.Linear(2, 16), nn.GELU(approximate="tanh"), nn.Dropout(0.1),
                           nn.LayerNorm(16, bias=False), nn.Embedding(5, 3), nn.Linear(16, 2, bias=False)))
    assert r == ("Sequential(\n"
                 "  (0): Linear(in_features=2, out_features=16, bias=True)\n"
                 "  (1): GELU(approximate='tanh')\n"
                 "  (2): Dropout(p=0.1)\n"
                 "  (3): LayerNorm((16,), eps=1e-05, bias=False)\n"
                 "  (4): Embedding(5, 3)\n"
                 "  (5): Linear(in_features=16, out_features=2, bias=False)\n"
                 ")")
    assert "(h): ModuleList(\n    (0): Block(\n      (ln): LayerNorm" in repr(Net())


def test_apply_train_eval_zero_grad():
    net = Net()
    seen = []
    assert net.apply(lambda m: seen.append(type(m).__name__)) is net
    assert seen[-1] == "Net" and seen.count("Block") == 2
    assert net.training and net.eval() is net
    assert not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())
    net(tinygpt.tensor([[1, 2, 3]])).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad(set_to_none=False)
    assert all(not np.any(p.grad) for p in net.parameters())
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())


# --- state dicts -------------------------------------------------------------------------------------------

def test_state_dict_is_host_copies_under_every_name():
    net = Net()
    sd = net.state_dict()
    assert list(sd) == NET_NAMES + ["head.weight"]
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    assert_array_equal(sd["head.weight"], sd["wte.weight"])
    sd["wte.weight"][...] = 7.0                      # a copy: the parameter is untouched
    assert not np.any(net.wte.weight.numpy() == 7.0)


def test_load_state_dict_round_trip_in_place():
    tinygpt.manual_seed(1)
    src = Net()
    tinygpt.manual_seed(2)
    dst = Net()
    arrays = {n: p.data for n, p in dst.named_parameters()}
    assert not np.array_equal(src.wte.weight.numpy(), dst.wte.weight.numpy())
    result = dst.load_state_dict(src.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    for (n, p), (_, q) in zip(src.named_parameters(), dst.named_parameters()):
        assert_array_equal(p.numpy(), q.numpy(), err_msg=n)
        assert q.data is arrays[n]                   # written in place: optimizers keep their arrays
    dst.load_state_dict({k: tinygpt.tensor(v) for k, v in src.state_dict().items()})  # Tensors work too


def test_load_state_dict_errors():
    net = Net()
    good = net.state_dict()
    missing = {k: v for k, v in good.items() if k != "h.1.fc.bias"}
    with pytest.raises(StateDictError, match=r"missing keys \['h.1.fc.bias'\]; .*strict=False"):
        net.load_state_dict(missing)
    with pytest.raises(StateDictError, match=r"unexpected keys \['extra'\]"):
        net.load_state_dict({**good, "extra": np.zeros(1)})
    with pytest.raises(StateDictError, match=r"missing keys \['scale'\] and unexpected keys \['scal'\]"):
        net.load_state_dict({**{k: v for k, v in good.items() if k != "scale"}, "scal": np.ones(1)})
    with pytest.raises(StateDictError, match=r"'h.0.fc.weight' has shape \(4, 5\) in the state dict but the "
                                             r"parameter has shape \(4, 4\)"):
        net.load_state_dict({**good, "h.0.fc.weight": np.zeros((4, 5), np.float32)})
    with pytest.raises(StateDictError, match=r"'scale' has dtype float64 .* is float32; cast it with "
                                             r"\.astype\('float32'\)"):
        net.load_state_dict({**good, "scale": np.ones(1)})
    with pytest.raises(StateDictError, match="expected a dict of name -> array"):
        net.load_state_dict([("scale", np.ones(1))])
    # nothing is written when any check fails
    before = net.state_dict()
    bad = {**{k: v + 1 for k, v in good.items()}, "h.1.ln.bias": np.zeros(3, np.float32)}
    with pytest.raises(StateDictError):
        net.load_state_dict(bad)
    for k, v in net.state_dict().items():
        assert_array_equal(v, before[k], err_msg=k)
    # strict=False loads what fits and reports the rest
    result = net.load_state_dict({"scale": np.full(1, 3.0, np.float32), "nope": np.ones(1)}, strict=False)
    assert result.unexpected_keys == ["nope"] and "wte.weight" in result.missing_keys
    assert net.scale.item() == 3.0
    with pytest.raises(StateDictError, match="has shape"):  # shapes are checked even when not strict
        net.load_state_dict({"scale": np.ones(2, np.float32)}, strict=False)


# --- layers ------------------------------------------------------------------------------------------------

def test_linear_matches_its_formula_and_torch_init():
    tinygpt.manual_seed(0)
    lin = nn.Linear(64, 300)
    assert lin.weight.shape == (300, 64) and lin.bias.shape == (300,)
    k = 1 / math.sqrt(64)
    w = lin.weight.numpy()
    assert w.dtype == np.float32 and np.abs(w).max() <= k and np.abs(lin.bias.numpy()).max() <= k
    assert w.std() == pytest.approx(k / math.sqrt(3), rel=0.03)    # U(-k, k) has std k/√3
    assert abs(w.mean()) < 0.05 * k
    x = np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)
    y = lin(tinygpt.tensor(x))
    assert y.shape == (2, 5, 300)
    assert_allclose(y.numpy(), x @ w.T + lin.bias.numpy(), rtol=1e-5, atol=1e-5)
    nob = nn.Linear(3, 2, bias=False)
    assert nob.bias is None and [n for n, _ in nob.named_parameters()] == ["weight"]


def test_init_is_seeded_and_embedding_is_standard_normal():
    tinygpt.manual_seed(5)
    a = nn.Embedding(200, 50)
    tinygpt.manual_seed(5)
    b = nn.Embedding(200, 50)
    assert_array_equal(a.weight.numpy(), b.weight.numpy())
    w = a.weight.numpy()
    assert w.dtype == np.float32 and abs(w.mean()) < 0.03 and w.std() == pytest.approx(1.0, rel=0.03)
    ids = tinygpt.tensor([[3, 0], [199, 3]])
    assert_array_equal(a(ids).numpy(), w[[[3, 0], [199, 3]]])
    ln = nn.LayerNorm(6)
    assert_array_equal(ln.weight.numpy(), np.ones(6))
    assert_array_equal(ln.bias.numpy(), np.zeros(6))


def test_layernorm_matches_closed_form():
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32) * 3 + 1
    ln = nn.LayerNorm(6, eps=1e-3)
    ln.weight.data[...] = np.arange(6, dtype=np.float32)
    ln.bias.data[...] = 0.5
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    assert_allclose(ln(tinygpt.tensor(x)).numpy(), (x - mu) / np.sqrt(var + 1e-3) * np.arange(6) + 0.5,
                    rtol=1e-5, atol=1e-5)
    nob = nn.LayerNorm(6, bias=False)
    assert nob.bias is None and [n for n, _ in nob.named_parameters()] == ["weight"]
    assert_allclose(nob(tinygpt.tensor(x)).numpy(), (x - mu) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-5)


def test_dropout_and_activations():
    x = tinygpt.tensor(np.ones((200, 50)))
    d = nn.Dropout(0.25)
    y = d(x).numpy()
    assert set(np.unique(y)) == {0.0, np.float32(1 / 0.75)}
    assert (y == 0).mean() == pytest.approx(0.25, abs=0.02)
    d.eval()
    assert_array_equal(d(x).numpy(), x.numpy())
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.5"):
        nn.Dropout(1.5)
    v = tinygpt.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    assert_array_equal(nn.ReLU()(v).numpy(), [0, 0, 0, 0.5, 2])
    exact = np.array([0.5 * t * (1 + math.erf(t / math.sqrt(2))) for t in [-2.0, -0.5, 0.0, 0.5, 2.0]])
    assert_allclose(nn.GELU()(v).numpy(), exact, rtol=1e-5, atol=1e-6)
    tanh = 0.5 * v.numpy() * (1 + np.tanh(math.sqrt(2 / math.pi) * (v.numpy() + 0.044715 * v.numpy() ** 3)))
    assert_allclose(nn.GELU(approximate="tanh")(v).numpy(), tanh, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', not 'fast'"):
        nn.GELU(approximate="fast")


# --- torch: the same names and shapes, so state dicts port both ways ----------------------------------------

def test_state_dicts_port_to_and_from_torch():
    torch = pytest.importorskip("torch")

    class TBlock(torch.nn.Module):
        def __init__(self, C):
            super().__init__()
            self.ln = torch.nn.LayerNorm(C)
            self.fc = torch.nn.Linear(C, C)

        def forward(self, x):
            return x + torch.relu(self.fc(self.ln(x)))

    class TNet(torch.nn.Module):
        def __init__(self, V=10, C=4, n=2):
            super().__init__()
            self.wte = torch.nn.Embedding(V, C)
            self.h = torch.nn.ModuleList([TBlock(C) for _ in range(n)])
            self.scale = torch.nn.Parameter(torch.ones(1))
            self.head = torch.nn.Linear(C, V, bias=False)
            self.head.weight = self.wte.weight

        def forward(self, idx):
            x = self.wte(idx)
            for block in self.h:
                x = block(x)
            return self.head(x * self.scale)

    torch.manual_seed(0)
    tnet, net = TNet(), Net()
    tsd = {k: v.detach().numpy().copy() for k, v in tnet.state_dict().items()}
    assert list(tsd) == list(net.state_dict())                               # same names, same order
    assert all(tsd[k].shape == v.shape for k, v in net.state_dict().items())
    net.load_state_dict(tsd)                                                  # torch -> tinygpt, strict
    idx = np.array([[1, 2, 3, 9], [0, 0, 5, 4]])
    assert_allclose(net(tinygpt.tensor(idx)).numpy(), tnet(torch.from_numpy(idx)).detach().numpy(),
                    rtol=1e-5, atol=1e-5)
    tinygpt.manual_seed(9)
    other = Net()                                                             # tinygpt -> torch, strict
    tnet.load_state_dict({k: torch.from_numpy(v) for k, v in other.state_dict().items()}, strict=True)
    assert_allclose(other(tinygpt.tensor(idx)).numpy(), tnet(torch.from_numpy(idx)).detach().numpy(),
                    rtol=1e-5, atol=1e-5)


def test_linear_init_bound_matches_torch():
    torch = pytest.importorskip("torch")
    t = torch.nn.Linear(50, 400)
    ours = nn.Linear(50, 400)
    for tp, p in [(t.weight, ours.weight), (t.bias, ours.bias)]:
        a, b = tp.detach().numpy(), p.numpy()
        assert np.abs(b).max() <= 1 / math.sqrt(50)
        assert b.std() == pytest.approx(a.std(), rel=0.05)     # same distribution, U(-1/√in, 1/√in)


# --- devices -----------------------------------------------------------------------------------------------

def test_to_moves_parameters_and_grads_in_place(device):
    net = Net()
    params = list(net.parameters())
    net(tinygpt.tensor([[1, 2]])).sum().backward()
    grads = {id(p): backend.to_numpy(p.grad).copy() for p in params}
    values = {id(p): p.numpy().copy() for p in params}
    assert net.to(device) is net
    assert list(net.parameters()) == params                     # the same Parameter objects
    for p in params:
        assert p.device.name == device and backend.device_of(p.data).name == device
        assert backend.device_of(p.grad).name == device
        assert_array_equal(p.numpy(), values[id(p)])
        assert_array_equal(backend.to_numpy(p.grad), grads[id(p)])
    assert net(tinygpt.tensor([[1, 2]], device=device)).device.name == device
    sd = net.state_dict()                                       # host arrays from any device
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    net.load_state_dict(sd)


def test_layers_built_on_a_strict_device_match_the_cpu():
    strict = pytest.importorskip("strict_xp")
    strict.register()
    outs = {}
    for dev in ("cpu", strict.DEVICE):
        tinygpt.manual_seed(3)
        model = nn.Sequential(nn.Embedding(10, 8, device=dev), nn.LayerNorm(8, device=dev),
                              nn.Linear(8, 8, device=dev), nn.GELU(), nn.Dropout(0.0), nn.Linear(8, 3, device=dev))
        assert all(p.device.name == dev for p in model.parameters())
        ids = tinygpt.tensor([[1, 2, 3]], device=dev)
        y = model(ids)
        y.sum().backward()
        outs[dev] = (y.numpy(), [backend.to_numpy(p.grad) for p in model.parameters()], model.state_dict())
        moved = nn.Linear(2, 2)                      # made on the CPU, with grads, then moved
        moved(tinygpt.tensor([[1.0, 2.0]])).sum().backward()
        assert moved.to(dev) is moved
        assert all(backend.device_of(p.grad).name == dev and p.device.name == dev for p in moved.parameters())
        assert moved(tinygpt.tensor([[1.0, 2.0]], device=dev)).device.name == dev
        moved.load_state_dict({"weight": np.ones((2, 2), np.float32), "bias": np.zeros(2, np.float32)})
        assert backend.device_of(moved.weight.data).name == dev and moved.weight.numpy().sum() == 4
    assert_allclose(outs["cpu"][0], outs[strict.DEVICE][0], rtol=1e-6)
    for a, b in zip(outs["cpu"][1], outs[strict.DEVICE][1]):
        assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for k in outs["cpu"][2]:
        assert_array_equal(outs["cpu"][2][k], outs[strict.DEVICE][2][k])
