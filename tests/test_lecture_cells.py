"""The cells of the "Let's build GPT" notebook, in the lecture's order and spelling, on tinygpt.

Each test types what the lecture types (import tinygpt as torch), checks what the lecture checks, and,
where PyTorch is installed, runs the same arithmetic in torch on the same numbers and compares. Random
draws differ between the two frameworks, so a comparison feeds both the same arrays (made with NumPy).
"""
import io
import math
import re
from contextlib import redirect_stdout

import numpy as np
import pytest

import tinygpt as torch            # the lecture's three imports, pointed at tinygpt
import tinygpt.nn as nn
from tinygpt.nn import functional as F
from tinygpt.data import shakespeare_text

LN_65 = -math.log(1 / 65)          # 4.1744: the loss of a uniform guess among 65 characters


def real_torch():
    return pytest.importorskip("torch", reason="PyTorch is the oracle for the comparisons; not installed")


@pytest.fixture(scope="module")
def text():
    return shakespeare_text()


@pytest.fixture(scope="module")
def vocab(text):
    """The lecture's character tokenizer: chars, stoi, itos, encode, decode."""
    chars = sorted(list(set(text)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    itos = {i: ch for i, ch in enumerate(chars)}
    encode = lambda s: [stoi[c] for c in s]            # noqa: E731  (the lecture's lambdas)
    decode = lambda l: ''.join([itos[i] for i in l])   # noqa: E731,E741
    return chars, encode, decode


@pytest.fixture(scope="module")
def data(text, vocab):
    _, encode, _ = vocab
    return torch.tensor(encode(text), dtype=torch.long)


def get_batch(train_data, batch_size, block_size):
    ix = torch.randint(len(train_data) - block_size, (batch_size,))
    x = torch.stack([train_data[i:i + block_size] for i in ix])
    y = torch.stack([train_data[i + 1:i + block_size + 1] for i in ix])
    return ix, x, y


class BigramLanguageModel(nn.Module):
    """The notebook's first model, as the lecture writes it."""

    def __init__(self, vocab_size):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx, targets=None):
        logits = self.token_embedding_table(idx)   # (B, T, C)
        if targets is None:
            loss = None
        else:
            B, T, C = logits.shape
            logits = logits.view(B * T, C)
            targets = targets.view(B * T)
            loss = F.cross_entropy(logits, targets)
        return logits, loss

    def generate(self, idx, max_new_tokens):
        for _ in range(max_new_tokens):
            logits, loss = self(idx)
            logits = logits[:, -1, :]
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


# --- the data -----------------------------------------------------------------------------------------------

def test_tokenizer_encode_decode_and_the_split(text, vocab, data):
    chars, encode, decode = vocab
    assert len(text) == 1115394 and len(chars) == 65
    assert ''.join(chars) == "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    assert encode("hii there") == [46, 47, 47, 1, 58, 46, 43, 56, 43]
    assert decode(encode("hii there")) == "hii there"
    assert data.shape == (1115394,) and data.dtype == torch.long
    assert data[:10].tolist() == [18, 47, 56, 57, 58, 1, 15, 47, 58, 47]          # "First Citi"
    n = int(0.9 * len(data))
    train_data, val_data = data[:n], data[n:]
    assert n == 1003854 and len(train_data) + len(val_data) == len(data)
    assert decode(val_data[:5].tolist()) == text[n:n + 5]


def test_one_block_holds_block_size_examples(data):
    """x = train_data[:block_size], y = train_data[1:block_size+1]: the t-th example is x[:t+1] -> y[t]."""
    block_size = 8
    train_data = data[:int(0.9 * len(data))]
    x, y = train_data[:block_size], train_data[1:block_size + 1]
    lines = [f"when input is {x[:t + 1]} the target: {y[t]}" for t in range(block_size)]
    assert lines[0] == "when input is tensor([18]) the target: 47"
    assert lines[-1] == "when input is tensor([18, 47, 56, 57, 58,  1, 15, 47]) the target: 58"


def test_format_of_a_0d_tensor_is_its_number_as_in_torch():
    """torch formats a 0-d tensor as its number under any spec (print() still shows tensor(...))."""
    target = torch.tensor([18, 47, 56])[1]
    assert f"{target}" == "47" and str(target) == "tensor(47)" and f"{target:>4}" == "  47"
    loss = torch.tensor(2.5)
    assert f"{loss}" == "2.5" and f"{loss:.4f}" == "2.5000"
    row = torch.tensor([1.0, 2.0])
    assert f"{row}" == str(row)                        # not 0-d: as str()
    rt = real_torch()
    for t, spec in [(np.int64(47), ""), (np.float32(2.6666667), ""), (np.float32(2.6666667), ".3f")]:
        assert format(torch.tensor(t), spec) == format(rt.tensor(t), spec)


def test_batch_examples_printout(data):
    """The B×T loop: every (context, target) pair of a batch, and y is x shifted by one in the data."""
    torch.manual_seed(1337)
    batch_size, block_size = 4, 8
    train_data = data[:int(0.9 * len(data))]
    ix, xb, yb = get_batch(train_data, batch_size, block_size)
    assert xb.shape == (4, 8) and yb.shape == (4, 8) and xb.dtype == torch.long
    out = io.StringIO()
    with redirect_stdout(out):
        for b in range(batch_size):          # batch dimension
            for t in range(block_size):      # time dimension
                context = xb[b, :t + 1]
                target = yb[b, t]
                print(f"when input is {context.tolist()} the target: {target}")
    lines = out.getvalue().splitlines()
    assert len(lines) == batch_size * block_size
    host = data.numpy()
    for k, line in enumerate(lines):
        b, t = divmod(k, block_size)
        m = re.fullmatch(r"when input is \[([\d, ]+)\] the target: (\d+)", line)
        assert m, line
        context = [int(v) for v in m.group(1).split(", ")]
        start = int(ix[b])
        assert context == host[start:start + t + 1].tolist()
        assert int(m.group(2)) == host[start + t + 1]


# --- the bigram model ----------------------------------------------------------------------------------------

def test_bigram_first_loss_is_about_minus_ln_one_over_65(data):
    torch.manual_seed(1337)
    train_data = data[:int(0.9 * len(data))]
    _, xb, yb = get_batch(train_data, 64, 8)
    m = BigramLanguageModel(65)
    logits, loss = m(xb, yb)
    assert logits.shape == (64 * 8, 65)
    # N(0, 1) logits: E[logsumexp] = ln 65 + 1/2 less a little; the lecture saw 4.88 on 32 targets
    assert LN_65 < loss.item() < LN_65 + 0.8
    nn.init.zeros_(m.token_embedding_table.weight)              # perfectly diffuse: exactly -ln(1/65)
    assert abs(m(xb, yb)[1].item() - LN_65) < 1e-5


def test_bigram_loss_matches_torch_on_the_same_weights(data):
    rt = real_torch()
    torch.manual_seed(1337)
    _, xb, yb = get_batch(data, 32, 8)
    m = BigramLanguageModel(65)
    logits, loss = m(xb, yb)
    w = rt.tensor(m.token_embedding_table.weight.numpy())
    ref = rt.nn.functional.cross_entropy(w[rt.tensor(xb.numpy())].view(-1, 65), rt.tensor(yb.numpy()).view(-1))
    assert abs(loss.item() - ref.item()) < 1e-5
    loss.backward()
    wt = w.clone().requires_grad_(True)
    rt.nn.functional.cross_entropy(wt[rt.tensor(xb.numpy())].view(-1, 65), rt.tensor(yb.numpy()).view(-1)).backward()
    np.testing.assert_allclose(m.token_embedding_table.weight.grad, wt.grad.numpy(), atol=1e-6)


def test_generate_decodes_to_text_and_training_lowers_the_loss(data, vocab):
    chars, _, decode = vocab
    torch.manual_seed(1337)
    train_data = data[:int(0.9 * len(data))]
    m = BigramLanguageModel(65)
    out = m.generate(idx=torch.zeros((1, 1), dtype=torch.long), max_new_tokens=100)
    assert out.shape == (1, 101) and out.dtype == torch.long and out[0, 0].item() == 0
    sample = decode(out[0].tolist())
    assert len(sample) == 101 and sample[0] == "\n" and set(sample) <= set(chars)

    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3)
    first = None
    for steps in range(100):
        _, xb, yb = get_batch(train_data, 32, 8)
        logits, loss = m(xb, yb)
        first = loss.item() if first is None else first
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < first - 0.1          # lr 1e-3 for 100 steps: the lecture goes 4.7 -> 4.6


# --- the mathematical trick in self-attention ----------------------------------------------------------------

def averaging_versions(x):
    """The lecture's four ways to average the past: a loop, a tril matmul, a masked softmax, and (given
    weights for a head) attention itself. Returns xbow, xbow2, xbow3."""
    B, T, C = x.shape
    # version 1: for each (b, t), the mean of x[b, :t+1]
    xbow = torch.zeros((B, T, C))
    for b in range(B):
        for t in range(T):
            xprev = x[b, :t + 1]   # (t, C)
            xbow[b, t] = torch.mean(xprev, 0)
    # version 2: a lower-triangular matrix of row-normalised ones
    wei = torch.tril(torch.ones(T, T))
    wei = wei / wei.sum(1, keepdim=True)
    xbow2 = wei @ x   # (T, T) @ (B, T, C) -> (B, T, C)
    # version 3: softmax over a mask of 0 and -inf
    tril = torch.tril(torch.ones(T, T))
    wei = torch.zeros((T, T))
    wei = wei.masked_fill(tril == 0, float('-inf'))
    wei = F.softmax(wei, dim=-1)
    xbow3 = wei @ x
    return xbow, xbow2, xbow3


def test_the_toy_tril_matmul():
    torch.manual_seed(42)
    a = torch.tril(torch.ones(3, 3))
    a = a / torch.sum(a, 1, keepdim=True)
    b = torch.randint(0, 10, (3, 2)).float()
    c = a @ b
    assert a.tolist()[1] == [0.5, 0.5, 0.0] and b.dtype == torch.float
    assert torch.allclose(c, torch.tensor([b[:1].mean(0).tolist(), b[:2].mean(0).tolist(), b.mean(0).tolist()]))


def test_three_averages_agree_and_match_torch():
    torch.manual_seed(1337)
    B, T, C = 4, 8, 2
    x = torch.randn(B, T, C)
    xbow, xbow2, xbow3 = averaging_versions(x)
    assert torch.allclose(xbow, xbow2) and torch.allclose(xbow, xbow3)
    assert torch.allclose(xbow[0, 3], x[0, :4].mean(0))
    assert not torch.allclose(xbow, x)                       # it did average something
    rt = real_torch()
    xt = rt.tensor(x.numpy())
    w = rt.tril(rt.ones(T, T))
    ref = (w / w.sum(1, keepdim=True)) @ xt
    for mine in (xbow, xbow2, xbow3):
        assert rt.allclose(rt.tensor(mine.numpy()), ref, atol=1e-6)


def test_one_head_of_self_attention_matches_torch():
    """Version 4: the weights come from queries and keys; the future is masked; rows sum to 1."""
    torch.manual_seed(1337)
    B, T, C = 4, 8, 32
    x = torch.randn(B, T, C)
    head_size = 16
    key = nn.Linear(C, head_size, bias=False)
    query = nn.Linear(C, head_size, bias=False)
    value = nn.Linear(C, head_size, bias=False)
    k = key(x)     # (B, T, 16)
    q = query(x)   # (B, T, 16)
    wei = q @ k.transpose(-2, -1)   # (B, T, 16) @ (B, 16, T) -> (B, T, T)
    tril = torch.tril(torch.ones(T, T))
    wei = wei.masked_fill(tril == 0, float('-inf'))
    wei = F.softmax(wei, dim=-1)
    v = value(x)
    out = wei @ v
    assert out.shape == (4, 8, 16) and wei.shape == (4, 8, 8)
    assert torch.allclose(wei.sum(-1), torch.ones(B, T), atol=1e-6)
    assert (wei[0].numpy()[np.triu_indices(T, 1)] == 0).all() and wei[0, 0, 0].item() == 1.0
    assert wei[0, -1].max().item() < 1.0                     # data-dependent: not a plain average
    out.sum().backward()                                     # and it trains: gradients reach the weights
    assert key.weight.grad is not None and np.abs(key.weight.grad).sum() > 0

    rt = real_torch()
    xt = rt.tensor(x.numpy())
    kt = xt @ rt.tensor(key.weight.numpy()).T
    qt = xt @ rt.tensor(query.weight.numpy()).T
    vt = xt @ rt.tensor(value.weight.numpy()).T
    wt = (qt @ kt.transpose(-2, -1)).masked_fill(rt.tril(rt.ones(T, T)) == 0, float('-inf')).softmax(-1)
    np.testing.assert_allclose(wei.numpy(), wt.numpy(), atol=1e-6)
    np.testing.assert_allclose(out.numpy(), (wt @ vt).numpy(), atol=1e-5)


def test_scaled_attention_keeps_unit_variance():
    """k and q ~ N(0, 1): q·kᵀ has variance head_size; times head_size**-0.5 it has variance 1."""
    torch.manual_seed(1337)
    B, T, head_size = 4, 8, 16
    k = torch.randn(B, T, head_size)
    q = torch.randn(B, T, head_size)
    wei = q @ k.transpose(-2, -1) * head_size**-0.5
    raw = q @ k.transpose(-2, -1)
    for v in (k.var(), q.var()):
        assert 0.85 < v.item() < 1.15                       # 512 draws each
    assert 0.6 < wei.var().item() < 1.5                      # 256 correlated products: a loose band
    assert abs(raw.var().item() / wei.var().item() - head_size) < 1e-3   # exactly the scale squared
    # on more draws the law shows plainly
    k, q = torch.randn(64, 64, head_size), torch.randn(64, 64, head_size)
    assert abs((q @ k.transpose(-2, -1) * head_size**-0.5).var().item() - 1) < 0.08
    assert abs((q @ k.transpose(-2, -1)).var().item() / head_size - 1) < 0.08
    rt = real_torch()
    kt, qt = rt.tensor(k.numpy()), rt.tensor(q.numpy())
    for mine, ref in [(k.var(), kt.var()), ((q @ k.transpose(-2, -1) * head_size**-0.5).var(),
                                            (qt @ kt.transpose(-2, -1) * head_size**-0.5).var())]:
        assert abs(mine.item() - ref.item()) < 1e-4 * ref.item()


def test_softmax_gets_peaky_when_its_inputs_grow():
    logits = torch.tensor([0.1, -0.2, 0.3, -0.2, 0.5])
    diffuse = torch.softmax(logits, dim=-1)
    peaky = torch.softmax(logits * 8, dim=-1)
    assert np.allclose(diffuse.numpy(), [0.1925, 0.1426, 0.2351, 0.1426, 0.2872], atol=1e-4)
    assert np.allclose(peaky.numpy(), [0.0326, 0.0030, 0.1615, 0.0030, 0.8000], atol=1e-4)
    assert peaky.argmax().item() == 4 and peaky.max().item() > 2.5 * diffuse.max().item()
    rt = real_torch()
    ref = rt.softmax(rt.tensor([0.1, -0.2, 0.3, -0.2, 0.5]) * 8, dim=-1)
    np.testing.assert_allclose(peaky.numpy(), ref.numpy(), atol=1e-7)


class LayerNorm1d:  # (used to be BatchNorm1d): the lecture's hand-written layer norm, not an nn.Module
    def __init__(self, dim, eps=1e-5, momentum=0.1):
        self.eps = eps
        self.gamma = torch.ones(dim)
        self.beta = torch.zeros(dim)

    def __call__(self, x):
        xmean = x.mean(1, keepdim=True)   # the mean over each row's features
        xvar = x.var(1, keepdim=True)     # unbiased, as in torch
        xhat = (x - xmean) / torch.sqrt(xvar + self.eps)
        self.out = self.gamma * xhat + self.beta
        return self.out

    def parameters(self):
        return [self.gamma, self.beta]


def test_layernorm1d_normalises_rows_not_columns():
    torch.manual_seed(1337)
    module = LayerNorm1d(100)
    x0 = torch.randn(32, 100)
    x = module(x0)
    assert x.shape == (32, 100) and len(module.parameters()) == 2
    # a row (one example's features) is normalised: mean 0, std 1 (unbiased on both sides, so 1 to ~1e-5)
    assert abs(x[0, :].mean().item()) < 1e-6 and abs(x[0, :].std().item() - 1) < 1e-4
    # a column (one feature across the batch) is not
    col_mean, col_std = x[:, 0].mean().item(), x[:, 0].std().item()
    assert abs(col_mean) > 1e-3 or abs(col_std - 1) > 1e-3
    rt = real_torch()
    xt = rt.tensor(x0.numpy())
    ref = (xt - xt.mean(1, keepdim=True)) / rt.sqrt(xt.var(1, keepdim=True) + 1e-5)
    for mine, theirs in [(x[:, 0].mean(), ref[:, 0].mean()), (x[:, 0].std(), ref[:, 0].std()),
                         (x[0, :].mean(), ref[0, :].mean()), (x[0, :].std(), ref[0, :].std())]:
        assert abs(mine.item() - theirs.item()) < 1e-5
    np.testing.assert_allclose(x.numpy(), ref.numpy(), atol=1e-5)


# --- next to the lecture: what a learner arriving from makemore types ---------------------------------------

def test_one_hot_as_makemore_uses_it():
    xs = torch.tensor([0, 5, 13, 13, 1])
    enc = F.one_hot(xs, num_classes=27)
    assert enc.shape == (5, 27) and enc.dtype == torch.long
    assert enc.sum(1).tolist() == [1] * 5 and enc.argmax(1).tolist() == xs.tolist()
    assert F.one_hot(torch.tensor([[2], [0]])).shape == (2, 1, 3)          # num_classes from the largest id
    W = torch.randn(27, 27, requires_grad=True)
    logits = enc.float() @ W                                               # = the rows W[xs]
    assert torch.allclose(logits, W[xs])
    logits.sum().backward()
    assert W.grad[13].tolist() == [2.0] * 27 and W.grad[2].tolist() == [0.0] * 27
    with pytest.raises(ValueError, match="too small"):
        F.one_hot(xs, num_classes=10)
    with pytest.raises(TypeError, match="integers"):
        F.one_hot(torch.tensor([0.0, 1.0]))
    rt = real_torch()
    ref = rt.nn.functional.one_hot(rt.tensor([0, 5, 13, 13, 1]), num_classes=27)
    assert enc.tolist() == ref.tolist()


def test_pow_method_is_the_power_operator():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = (x - x.mean()).pow(2).mean()                       # a variance, the way people write it by hand
    y.backward()
    assert abs(y.item() - 38 / 9) < 1e-5                  # deviations 1/3, -8/3, 7/3
    np.testing.assert_allclose(x.grad, 2 * (x.numpy() - x.numpy().mean()) / 3, atol=1e-6)
    assert torch.tensor([4.0]).pow(0.5).item() == 2.0
