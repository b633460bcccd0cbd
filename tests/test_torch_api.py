"""The torch-style API a learner from the lecture types: constructors, sampling, Tensor conveniences,
retain_grad, buffers and nn.init. Differentiable ops are in the op table (op_cases.py); here the rest."""
import math

import numpy as np
import pytest

import tinygpt
import tinygpt as torch          # the lecture's spelling
import tinygpt.nn as nn
from tinygpt.nn import functional as F


# --- constructors and dtypes -------------------------------------------------------------------------------

def test_dtypes_and_constructors():
    assert torch.long == np.int64 and torch.float == np.float32 and torch.bool == np.bool_
    data = torch.tensor([3, 1, 2], dtype=torch.long)
    assert data.dtype == torch.int64 and data.shape == (3,)
    assert torch.zeros((2, 3)).shape == (2, 3) and torch.zeros(2, 3).dtype == np.float32
    assert torch.ones(3, 3, dtype=torch.long).dtype == np.int64
    assert torch.arange(5).tolist() == [0, 1, 2, 3, 4] and torch.arange(5).dtype == np.int64
    assert torch.arange(0.0, 1.0, 0.25).tolist() == [0.0, 0.25, 0.5, 0.75]
    assert torch.arange(3, device="cpu").device.name == "cpu"
    assert torch.full((2,), 7).tolist() == [7, 7]
    with pytest.raises(ValueError, match="negative"):
        torch.zeros(-1, 2)


def test_randn_and_randint_follow_the_seed_and_their_ranges():
    torch.manual_seed(1337)
    a = torch.randn(4, 8, 2)
    ix = torch.randint(100, (5000,))
    torch.manual_seed(1337)
    assert np.array_equal(a.numpy(), torch.randn(4, 8, 2).numpy())
    assert np.array_equal(ix.numpy(), torch.randint(0, 100, (5000,)).numpy())
    assert a.dtype == np.float32 and ix.dtype == np.int64
    assert ix.numpy().min() == 0 and ix.numpy().max() == 99           # [low, high): 5000 draws hit both ends
    r = torch.randint(-3, 2, size=(4000,)).numpy()
    assert set(np.unique(r)) == {-3, -2, -1, 0, 1}
    big = torch.randn(20000).numpy()
    assert abs(big.mean()) < 0.03 and abs(big.std() - 1) < 0.03
    with pytest.raises(ValueError, match="low < high"):
        torch.randint(5, 5, (2,))


def test_multinomial_draws_in_proportion_to_the_weights():
    torch.manual_seed(0)
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]] * 4000)              # (B, V): one draw per row
    idx = torch.multinomial(probs, num_samples=1)
    assert idx.shape == (4000, 1) and idx.dtype == np.int64
    counts = np.bincount(idx.numpy().ravel(), minlength=4) / 4000
    assert counts[1] == 0                                              # weight 0 is never drawn
    assert np.allclose(counts, [0.1, 0.0, 0.6, 0.3], atol=0.03)
    # unnormalized weights, 1-D input, with replacement
    many = torch.multinomial(torch.tensor([1.0, 3.0]), num_samples=4000, replacement=True).numpy()
    assert many.shape == (4000,) and abs(many.mean() - 0.75) < 0.03


def test_multinomial_without_replacement_never_repeats_and_checks_its_input():
    torch.manual_seed(0)
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.5]] * 200)
    idx = torch.multinomial(w, num_samples=5).numpy()
    assert all(sorted(row) == [0, 1, 2, 3, 4] for row in idx)
    first = np.bincount(idx[:, 0], minlength=5) / 200                  # first draw follows the weights
    assert first.argmax() == 3 and first[4] < first[3]
    with pytest.raises(ValueError, match="num_samples"):
        torch.multinomial(torch.tensor([0.5, 0.5]), num_samples=3)
    with pytest.raises(ValueError, match="non-negative"):
        torch.multinomial(torch.tensor([0.5, -0.1]), num_samples=1)


def test_allclose_uses_torch_tolerances():
    a = torch.tensor([1.0, 2.0])
    assert torch.allclose(a, a + 1e-6) and not torch.allclose(a, a + 1e-3)


# --- Tensor conveniences -----------------------------------------------------------------------------------

def test_format_item_tolist_numel_and_argmax():
    t = torch.tensor([[1.0, 5.0, 2.0], [7.0, 0.0, 1.0]])
    loss = t.mean()
    assert f"{loss:.4f}" == "2.6667" and f"{loss}" == str(loss.item())   # a 0-d tensor formats as its number
    assert f"{t}" == str(t)                                                # others as their repr
    assert t.numel() == 6 and t.dim() == 2 and t.tolist()[1] == [7.0, 0.0, 1.0]
    assert t.argmax().item() == 3 and t.argmax(1).tolist() == [1, 0]
    assert t.argmax(dim=0, keepdim=True).shape == (1, 3)
    values, indices = t.max(dim=1)                                     # torch's meaning: a named pair
    assert values.tolist() == [5.0, 7.0] and indices.tolist() == [1, 0]
    assert t.max(axis=1).tolist() == [5.0, 7.0]                         # NumPy's axis= keeps its meaning
    assert t.max().item() == 7.0
    with pytest.raises(TypeError, match="one-element"):
        f"{t:.2f}"


def test_var_and_std_are_unbiased_by_default():
    x = np.random.default_rng(0).standard_normal((5, 7))
    t = torch.tensor(x)
    assert np.allclose(t.var().item(), x.var(ddof=1), rtol=1e-5)
    assert np.allclose(t.std(1).numpy(), x.std(1, ddof=1), rtol=1e-5)
    assert np.allclose(t.var(1, unbiased=False).numpy(), x.var(1), rtol=1e-5)
    assert np.allclose(t.var(axis=0, correction=0).numpy(), x.var(0), rtol=1e-5)


def test_index_and_iteration_with_tensors_from_randint():
    data = torch.arange(100)
    torch.manual_seed(0)
    ix = torch.randint(len(data) - 8, (4,))
    x = torch.stack([data[i:i + 8] for i in ix])                      # 0-d tensors as slice bounds
    assert x.shape == (4, 8)
    assert x[:, 0].tolist() == ix.tolist() and np.array_equal(x[:, 7].numpy(), ix.numpy() + 7)
    assert data[ix].tolist() == ix.tolist() and data[ix.tolist()].tolist() == ix.tolist()
    assert [int(v) for v in torch.tensor([4, 5])] == [4, 5]
    with pytest.raises(TypeError, match="integer"):
        data[torch.tensor(1.0):3]


def test_setitem_outside_the_graph_and_refused_inside_it():
    xbow = torch.zeros((2, 3))
    xbow[1, 2] = torch.tensor(5.0)
    losses = torch.zeros(3)
    losses[0] = 1.5
    assert xbow.tolist() == [[0, 0, 0], [0, 0, 5]] and losses.tolist() == [1.5, 0, 0]
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="requires grad"):
        w[0] = 1.0
    with torch.no_grad():                                             # initialising a weight in place
        w[0] = 1.0
    assert w.tolist() == [1.0, 0.0, 0.0]


def test_eq_gives_masks_and_tensors_still_hash_by_identity():
    tril = torch.tril(torch.ones(3, 3))
    mask = tril == 0
    assert mask.dtype == np.bool_ and mask.tolist() == [[False, True, True], [False, False, True], [False] * 3]
    a, b = torch.ones(2), torch.ones(2)
    assert len({a, b}) == 2 and a in [a] and (a != b).tolist() == [False, False]
    with pytest.raises(RuntimeError, match="ambiguous"):
        bool(a == b)
    assert bool(torch.tensor(3) == 3)


def test_to_moves_or_casts_and_float_long_keep_the_graph_right():
    x = torch.tensor([1.5, -2.0], requires_grad=True)
    assert x.to("cpu") is x and x.to(torch.float64).dtype == np.float64
    assert x.long().tolist() == [1, -2] and not x.long().requires_grad
    y = (x.double() * 3).sum()
    y.backward()
    assert x.grad.dtype == np.float32 and x.grad.tolist() == [3.0, 3.0]
    assert torch.randint(0, 10, (3, 2)).float().dtype == np.float32


def test_no_grad_as_decorator():
    w = torch.ones(2, requires_grad=True)

    @torch.no_grad()
    def evaluate():
        return (w * 2).sum()

    assert not evaluate().requires_grad and (w * 2).sum().requires_grad


def test_cuda_is_available_answers_from_cupy(monkeypatch):
    from tinygpt import backend
    monkeypatch.setattr(backend, "is_cuda_available", lambda: True)
    assert torch.cuda.is_available() is True
    monkeypatch.setattr(backend, "is_cuda_available", lambda: False)
    assert torch.cuda.is_available() is False


# --- retain_grad ------------------------------------------------------------------------------------------

def test_retain_grad_of_an_intermediate_matches_finite_differences():
    rng = np.random.default_rng(0)
    x0, w0 = rng.standard_normal((3, 4)), rng.standard_normal((4, 5))
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(w0, dtype=torch.float64)
    h = x @ w                                  # the intermediate whose gradient we want
    h.retain_grad()
    loss = (h.tanh() ** 2).sum()
    loss.backward()
    # dL/dh by central differences on h itself: L(h) = Σ tanh(h)²
    h0, eps, num = x0 @ w0, 1e-6, np.zeros((3, 5))
    for i in np.ndindex(h0.shape):
        hp, hm = h0.copy(), h0.copy()
        hp[i] += eps
        hm[i] -= eps
        num[i] = ((np.tanh(hp) ** 2).sum() - (np.tanh(hm) ** 2).sum()) / (2 * eps)
    assert h.grad is not None and np.allclose(h.grad, num, atol=1e-7)
    assert x.grad is not None and np.allclose(x.grad, num @ w0.T, atol=1e-7)


def test_retain_grad_accumulates_like_a_leaf_and_needs_grad():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    h = x * 3
    h.retain_grad()
    (h * h).sum().backward(retain_graph=True)
    first = h.grad.copy()
    (h * h).sum().backward()
    assert np.allclose(first, [6.0, 12.0]) and np.allclose(h.grad, 2 * first)
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.ones(2).retain_grad()
    assert (x * 2).grad_fn is not None and x.grad_fn is None


# --- nn: buffers and init ---------------------------------------------------------------------------------

class _Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.key = nn.Linear(4, 2, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(3, 3)))
        self.register_buffer("scratch", torch.zeros(1), persistent=False)


def test_buffers_are_state_but_never_parameters():
    h = _Head()
    assert [n for n, _ in h.named_parameters()] == ["key.weight"]
    assert [n for n, _ in h.named_buffers()] == ["tril", "scratch"]
    sd = h.state_dict()
    assert set(sd) == {"key.weight", "tril"}                          # non-persistent buffers are left out
    sd["tril"] = np.zeros((3, 3), dtype=np.float32)
    h.load_state_dict(sd)
    assert h.tril.tolist() == [[0.0] * 3] * 3
    h.tril = torch.ones(3, 3)                                          # reassigning keeps it a buffer
    assert dict(h.named_buffers())["tril"] is h.tril
    with pytest.raises(TypeError, match="Tensor"):
        h.register_buffer("bad", [1, 2])
    opt = torch.optim.AdamW(h.parameters(), lr=0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == 1


def test_module_to_moves_buffers():
    """Buffers go with the parameters to another device (the tests' strict stand-in device), and the
    attribute a forward reads (self.tril) is the moved one."""
    from strict_xp import register
    register()
    h = _Head().to("strict")
    assert h.key.weight.device.name == "strict"
    assert h.tril.device.name == "strict" and dict(h.named_buffers())["tril"] is h.tril
    assert h.scratch.device.name == "strict"
    assert np.array_equal(h.state_dict()["tril"], np.tril(np.ones((3, 3), np.float32)))


def test_nn_init_and_apply():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))

    def init(m):
        if isinstance(m, nn.Linear):
            torch.nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)

    net.apply(init)
    w = net[0].weight.numpy()
    assert abs(w.std() - 0.02) < 0.001 and abs(w.mean()) < 0.001
    assert not net[0].bias.numpy().any() and net[0].weight.dtype == np.float32
    with pytest.raises(ValueError, match="std"):
        nn.init.normal_(net[0].weight, std=-1.0)


def test_functional_softmax_and_cross_entropy_as_the_lecture_calls_them():
    logits = torch.randn(4, 8, 65)
    B, T, C = logits.shape
    targets = torch.randint(65, (B, T))
    loss = F.cross_entropy(logits.view(B * T, C), targets.view(B * T))
    assert abs(loss.item() - math.log(65)) < 1.5
    probs = F.softmax(logits[:, -1, :], dim=-1)
    assert np.allclose(probs.sum(dim=-1).numpy(), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(logits.view(B * T, C), targets.view(B * T), reduction="avg")
