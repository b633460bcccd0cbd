"""Models: the bigram table, GPT against a PyTorch nanoGPT written here, tied weights, presets, generation."""
import math

import numpy as np
import pytest

import tinygpt
from tinygpt import models, optim, presets
from tinygpt.models import GPT, BigramLanguageModel, ConfigError, GPTConfig, sample_next

from conftest import torch_or_skip
from nanogpt_torch import torch_gpt

TINY = dict(vocab_size=23, block_size=16, n_layer=2, n_head=4, n_embd=32)


def tiny(**kw):
    return GPT(GPTConfig(**{**TINY, **kw}))


def batch(V=23, B=3, T=16, seed=0):
    r = np.random.default_rng(seed)
    return r.integers(0, V, (B, T)), r.integers(0, V, (B, T))


def closed_form_count(V, bs, L, C, bias, qkv_bias, tie):
    """Parameters of a nanoGPT-shaped model, counted by hand."""
    b = C if bias else 0
    per_block = (C + b) * 2                                  # ln_1, ln_2
    per_block += 3 * C * C + (3 * C if qkv_bias else 0)      # c_attn
    per_block += C * C + b                                   # attn.c_proj
    per_block += 4 * C * C + (4 * C if bias else 0)          # mlp.c_fc
    per_block += 4 * C * C + b                               # mlp.c_proj
    head = 0 if tie else V * C + (V if bias else 0)
    return V * C + bs * C + L * per_block + (C + b) + head


# ---- bigram -----------------------------------------------------------------------------------------

def test_bigram_initial_loss_is_uniform_guess():
    V = 65
    m = BigramLanguageModel(V)
    x, y = batch(V, B=32, T=8)
    logits, loss = m(x, y)
    assert logits.shape == (32, 8, V)
    assert abs(loss.item() - (-math.log(1 / V))) < 0.02      # ≈ ln 65 = 4.17


def test_bigram_logits_are_rows_of_the_table():
    m = BigramLanguageModel(10)
    x, _ = batch(10, B=2, T=5)
    logits, loss = m(x)
    assert loss is None
    np.testing.assert_array_equal(logits.numpy(), m.token_embedding_table.weight.numpy()[x])


def test_bigram_generate_ignores_all_but_last_token():
    m = BigramLanguageModel(10)
    tinygpt.manual_seed(3)
    a = m.generate([[1, 2, 3]], 20).numpy()
    tinygpt.manual_seed(3)
    b = m.generate([[7, 3]], 20).numpy()
    assert a.shape == (1, 23) and b.shape == (1, 22)
    np.testing.assert_array_equal(a[:, 3:], b[:, 2:])


# ---- GPT structure -------------------------------------------------------------------------------------

def test_video_preset_has_exactly_10788929_parameters():
    p = presets.get_preset("video")
    cfg = p.model_config(65)
    m = models.model_from_config(cfg)
    assert m.num_parameters() == 10_788_929
    assert closed_form_count(65, 256, 6, 384, True, False, False) == 10_788_929


@pytest.mark.parametrize("bias,qkv_bias,tie", [(True, None, True), (False, None, True), (True, False, False),
                                               (False, True, False)])
def test_parameter_count_matches_closed_form(bias, qkv_bias, tie):
    m = tiny(bias=bias, qkv_bias=qkv_bias, tie_weights=tie)
    qb = bias if qkv_bias is None else qkv_bias
    assert m.num_parameters() == closed_form_count(23, 16, 2, 32, bias, qb, tie)


def nanogpt_names(L, bias, qkv_bias, tie):
    ln = ["weight"] + (["bias"] if bias else [])
    names = ["transformer.wte.weight", "transformer.wpe.weight"]
    for i in range(L):
        h = f"transformer.h.{i}"
        names += [f"{h}.ln_1.{n}" for n in ln]
        names += [f"{h}.attn.c_attn.weight"] + ([f"{h}.attn.c_attn.bias"] if qkv_bias else [])
        names += [f"{h}.attn.c_proj.{n}" for n in ln]
        names += [f"{h}.ln_2.{n}" for n in ln]
        names += [f"{h}.mlp.c_fc.{n}" for n in ln]
        names += [f"{h}.mlp.c_proj.{n}" for n in ln]
    names += [f"transformer.ln_f.{n}" for n in ln]
    names += ["lm_head.weight"] + (["lm_head.bias"] if bias and not tie else [])
    return names


@pytest.mark.parametrize("bias,tie", [(True, True), (False, True), (True, False)])
def test_state_dict_names_and_shapes_follow_nanogpt(bias, tie):
    m = tiny(bias=bias, tie_weights=tie)
    sd = m.state_dict()
    assert list(sd) == nanogpt_names(2, bias, bias, tie)
    C, V = 32, 23
    assert sd["transformer.wte.weight"].shape == (V, C)
    assert sd["transformer.wpe.weight"].shape == (16, C)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (3 * C, C)       # Linear: (out, in)
    assert sd["transformer.h.0.mlp.c_fc.weight"].shape == (4 * C, C)
    assert sd["transformer.h.0.mlp.c_proj.weight"].shape == (C, 4 * C)
    assert sd["lm_head.weight"].shape == (V, C)


def test_tied_weights_are_one_parameter():
    m = tiny()
    assert m.lm_head.weight is m.transformer.wte.weight
    names = [n for n, _ in m.named_parameters()]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    sd = m.state_dict()
    np.testing.assert_array_equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
    # the gradient gets both uses: embedding lookup and output projection
    x, y = batch()
    m(x, y)[1].backward()
    g_tied = m.transformer.wte.weight.grad.copy()
    untied = tiny(tie_weights=False, bias=True)
    untied.load_state_dict({**m.state_dict(), "lm_head.bias": np.zeros(23, np.float32)})
    untied(x, y)[1].backward()
    np.testing.assert_allclose(g_tied, untied.transformer.wte.weight.grad + untied.lm_head.weight.grad,
                               rtol=1e-4, atol=1e-6)


def test_init_statistics():
    tinygpt.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=500, block_size=64, n_layer=3, n_head=4, n_embd=128))
    sd = m.state_dict()
    assert abs(sd["transformer.wte.weight"].std() - 0.02) < 0.001
    assert abs(sd["transformer.h.0.attn.c_attn.weight"].std() - 0.02) < 0.001
    proj = 0.02 / math.sqrt(2 * 3)
    assert abs(sd["transformer.h.1.attn.c_proj.weight"].std() - proj) < 0.0005
    assert abs(sd["transformer.h.2.mlp.c_proj.weight"].std() - proj) < 0.0005
    assert not sd["transformer.h.0.mlp.c_fc.bias"].any()
    np.testing.assert_array_equal(sd["transformer.ln_f.weight"], 1)
    assert all(a.dtype == np.float32 for a in sd.values())


def test_step0_loss_of_cpu_preset_is_near_ln_vocab():
    m = models.model_from_config(presets.get_preset("cpu").model_config(65))
    x, y = batch(65, B=12, T=64, seed=1)
    _, loss = m(x, y)
    assert abs(loss.item() - math.log(65)) < 0.1


def test_bad_configs_raise_config_error():
    with pytest.raises(ConfigError, match="n_embd=30 is not divisible by n_head=4"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=4, n_embd=30)
    with pytest.raises(ConfigError, match="activation"):
        GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=4, n_embd=32, activation="swish")
    with pytest.raises(ConfigError, match="bigram, cpu, video"):
        presets.get_preset("gpt5")


def test_forward_rejects_context_longer_than_block():
    m = tiny()
    with pytest.raises(ValueError, match="block_size=16"):
        m(np.zeros((1, 17), dtype=np.int64))


def test_dropout_only_in_training_mode():
    m = tiny(dropout=0.5)
    x, _ = batch()
    a, b = m(x)[0].numpy(), m(x)[0].numpy()
    assert not np.array_equal(a, b)
    m.eval()
    np.testing.assert_array_equal(m(x)[0].numpy(), m(x)[0].numpy())


# ---- parity with a PyTorch nanoGPT ----------------------------------------------------------------------

PARITY_CONFIGS = {
    "nanogpt-cpu": dict(bias=False, activation="gelu", tie_weights=True),
    "lecture-video": dict(bias=True, qkv_bias=False, activation="relu", tie_weights=False),
    "all-bias": dict(bias=True, activation="gelu", tie_weights=True),
}


def _to_torch(torch, sd):
    return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


@pytest.mark.parametrize("name, sdpa", [(name, False) for name in PARITY_CONFIGS] + [("nanogpt-cpu", True)])
def test_logits_loss_and_every_gradient_match_pytorch(name, sdpa):
    torch = torch_or_skip()
    cfg = GPTConfig(**TINY, **PARITY_CONFIGS[name])
    ours = GPT(cfg)
    ref = torch_gpt(torch, cfg, sdpa=sdpa)
    ref.load_state_dict(_to_torch(torch, ours.state_dict()), strict=True)
    x, y = batch()
    logits, loss = ours(x, y)
    loss.backward()
    t_logits, t_loss = ref(torch.from_numpy(x), torch.from_numpy(y))
    t_loss.backward()
    np.testing.assert_allclose(logits.numpy(), t_logits.detach().numpy(), atol=2e-5, rtol=1e-4)
    assert abs(loss.item() - t_loss.item()) < 1e-5
    t_params = dict(ref.named_parameters())
    ours_named = list(ours.named_parameters())
    assert len(ours_named) == len(t_params)
    for n, p in ours_named:
        tp = t_params[n] if n in t_params else t_params["lm_head.weight"]
        np.testing.assert_allclose(p.grad, tp.grad.numpy(), atol=2e-5, rtol=1e-3, err_msg=n)


def test_pytorch_state_dict_loads_strictly_and_gives_the_same_logits():
    torch = torch_or_skip()
    cfg = GPTConfig(**TINY, bias=True, tie_weights=True)
    torch.manual_seed(0)
    ref = torch_gpt(torch, cfg)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    assert "lm_head.weight" in sd                       # torch lists the tied tensor under both names
    # what a nanoGPT checkpoint may also carry: the causal-mask buffer and torch.compile's prefix
    sd = {"_orig_mod." + k: v for k, v in sd.items()}
    sd["_orig_mod.transformer.h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
    ours = GPT(cfg)
    ours.load_state_dict(sd, strict=True)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    x, y = batch()
    np.testing.assert_allclose(ours(x)[0].numpy(), ref(torch.from_numpy(x), torch.from_numpy(y))[0].detach(),
                               atol=2e-5, rtol=1e-4)


def test_ten_adamw_steps_track_pytorch():
    """llm.c's test_gpt2: the same batch, ten optimizer steps, the losses agree step by step."""
    torch = torch_or_skip()
    cfg = GPTConfig(**TINY, bias=False, tie_weights=True)
    ours = GPT(cfg)
    ref = torch_gpt(torch, cfg)
    ref.load_state_dict(_to_torch(torch, ours.state_dict()), strict=True)
    opt = optim.AdamW(optim.weight_decay_groups(ours, 0.1), lr=1e-3, betas=(0.9, 0.99))
    decay = [p for p in ref.parameters() if p.dim() >= 2]
    no_decay = [p for p in ref.parameters() if p.dim() < 2]
    t_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=1e-3, betas=(0.9, 0.99))
    x, y = batch(B=4)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    losses, t_losses = [], []
    for _ in range(10):
        _, loss = ours(x, y)
        loss.backward()
        optim.clip_grad_norm_(ours.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        _, t_loss = ref(tx, ty)
        t_loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        t_opt.step()
        t_opt.zero_grad()
        t_losses.append(t_loss.item())
    assert losses[-1] < losses[0] - 0.1                  # it learns
    np.testing.assert_allclose(losses, t_losses, atol=1e-4)
    for n, p in ours.named_parameters():
        np.testing.assert_allclose(p.numpy(), dict(ref.named_parameters())[n].detach().numpy(), atol=1e-4,
                                   err_msg=n)


# ---- generation ------------------------------------------------------------------------------------------

def test_generate_crops_context_to_block_size():
    m = tiny()
    long = np.random.default_rng(5).integers(0, 23, (2, 40))        # longer than block_size=16
    tinygpt.manual_seed(7)
    a = m.generate(long, 10, use_cache=False).numpy()
    tinygpt.manual_seed(7)
    b = m.generate(long[:, -16:], 10, use_cache=False).numpy()
    assert a.shape == (2, 50)
    np.testing.assert_array_equal(a[:, :40], long)
    np.testing.assert_array_equal(a[:, 40:], b[:, 16:])              # only the last 16 tokens mattered


@pytest.mark.parametrize("prompt_len,new", [(1, 40), (5, 8), (16, 5), (20, 6)])
def test_kv_cache_gives_the_same_tokens_as_recomputing(prompt_len, new):
    m = tiny(dropout=0.1)                     # generate must switch dropout off itself
    prompt = np.random.default_rng(prompt_len).integers(0, 23, (2, prompt_len))
    tinygpt.manual_seed(11)
    cached = m.generate(prompt, new, use_cache=True).numpy()
    tinygpt.manual_seed(11)
    plain = m.generate(prompt, new, use_cache=False).numpy()
    np.testing.assert_array_equal(cached, plain)
    assert m.training                          # mode restored


def test_kv_cache_logits_match_full_forward():
    m = tiny()
    m.eval()
    ids = np.random.default_rng(0).integers(0, 23, (2, 16))
    full = m(ids)[0].numpy()                                         # (B, T, V) in one pass
    cache = models.KVCache(m.config, 2, m.device)
    with tinygpt.no_grad():
        first = m.lm_head(m._hidden(tinygpt.tensor(ids[:, :4]), cache)).numpy()
        steps = [m.lm_head(m._hidden(tinygpt.tensor(ids[:, t:t + 1]), cache)).numpy()[:, 0]
                 for t in range(4, 16)]
    np.testing.assert_allclose(first, full[:, :4], atol=1e-5)
    np.testing.assert_allclose(np.stack(steps, axis=1), full[:, 4:], atol=1e-5)


def test_generate_is_seeded_by_manual_seed():
    m = tiny()
    tinygpt.manual_seed(1)
    a = m.generate([[1, 2]], 30).numpy()
    tinygpt.manual_seed(1)
    b = m.generate([[1, 2]], 30).numpy()
    tinygpt.manual_seed(2)
    c = m.generate([[1, 2]], 30).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ---- sampling ------------------------------------------------------------------------------------------

def test_sample_next_follows_the_softmax_distribution():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    draws = np.array([sample_next(logits, rng=rng)[0] for _ in range(20000)])
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)


def test_sample_next_temperature_top_k_top_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    rng = np.random.default_rng(1)
    assert (sample_next(logits, temperature=0) == 0).all()                 # greedy
    assert set(sample_next(logits, top_k=2, rng=rng)) == {0, 1}
    assert set(sample_next(logits, top_p=0.7, rng=rng)) == {0, 1}          # 0.5 < 0.7 <= 0.8
    assert set(sample_next(logits, top_p=0.81, rng=rng)) == {0, 1, 2}
    cold = sample_next(logits, temperature=0.1, rng=rng)
    assert (cold == 0).mean() > 0.99                                       # (0.5/0.3)^10 ≈ 165:1


def test_stream_decoder_never_prints_half_a_character():
    from tinygpt.sample import StreamDecoder
    from tinygpt.tokenizers import BPETokenizer
    tok = BPETokenizer()                                     # no merges: one token per byte
    text = "héllo € 🙂!"
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in tok.encode(text)] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[1] == "" and pieces[2] == "é"              # 0xC3 waits for 0xA9


# ---- the speedrun options (GPTConfig norm, rope, qk_norm, activation="relu2"; tinygpt/ops/norm.py) ----------

SPEED_OPTIONS = [dict(norm="rmsnorm"), dict(rope=True), dict(qk_norm=True), dict(activation="relu2"),
                 dict(norm="rmsnorm", rope=True, qk_norm=True, activation="relu2", tie_weights=False)]


def torch_forward_with_options(T, cfg: GPTConfig, params: dict, idx, targets):
    """The GPT forward with the speedrun options, written functionally in PyTorch from the paper formulas
    (RMSNorm: x/√(mean x² + ε)·w; RoPE as complex rotation of (x_i, x_{i+hs/2}) by e^(−i t θ_i); ReLU²)."""
    tF = T.nn.functional
    C, nh = cfg.n_embd, cfg.n_head
    hs = C // nh

    def norm(x, prefix):
        if cfg.norm == "rmsnorm":
            return x * T.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * params[prefix + ".weight"]
        return tF.layer_norm(x, (C,), params[prefix + ".weight"], params.get(prefix + ".bias"), 1e-5)

    def rope(x):                                              # (B, nh, Tn, hs)
        Tn = x.shape[-2]
        theta = T.arange(Tn, dtype=T.float64)[:, None] * 10000.0 ** (-T.arange(hs // 2, dtype=T.float64) * 2 / hs)
        z = T.complex(x[..., :hs // 2].double(), x[..., hs // 2:].double()) * T.exp(-1j * theta)
        return T.cat([z.real, z.imag], -1).to(x.dtype)

    B, Tn = idx.shape
    x = params["transformer.wte.weight"][idx]
    if not cfg.rope:
        x = x + params["transformer.wpe.weight"][:Tn]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        q, k, v = (norm(x, p + "ln_1") @ params[p + "attn.c_attn.weight"].T).split(C, dim=2)
        q, k, v = (t.view(B, Tn, nh, hs).transpose(1, 2) for t in (q, k, v))
        if cfg.qk_norm:
            q, k = (t * T.rsqrt((t * t).mean(-1, keepdim=True) + 1e-5) for t in (q, k))
        if cfg.rope:
            q, k = rope(q), rope(k)
        y = tF.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, Tn, C)
        x = x + y @ params[p + "attn.c_proj.weight"].T
        h = norm(x, p + "ln_2") @ params[p + "mlp.c_fc.weight"].T
        h = {"gelu": tF.gelu, "relu": T.relu, "relu2": lambda u: T.relu(u) ** 2}[cfg.activation](h)
        x = x + h @ params[p + "mlp.c_proj.weight"].T
    head = params["transformer.wte.weight"] if cfg.tie_weights else params["lm_head.weight"]
    logits = norm(x, "transformer.ln_f") @ head.T
    return tF.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@pytest.mark.parametrize("opts", SPEED_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_speed_options_match_a_torch_forward_and_gradients(opts):
    torch = torch_or_skip()
    tinygpt.manual_seed(3)
    m = tiny(bias=False, **opts)
    cfg = m.config
    x, y = batch()
    _, loss = m(x, y)
    loss.backward()
    named = dict(m.named_parameters())
    params = {n: torch.tensor(p.numpy(), requires_grad=True) for n, p in named.items()}
    ref = torch_forward_with_options(torch, cfg, params, torch.tensor(x), torch.tensor(y))
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=2e-5)
    for n, p in named.items():
        np.testing.assert_allclose(p.grad, params[n].grad.numpy(), atol=3e-5, rtol=1e-3, err_msg=n)


def test_speed_options_default_off_and_what_they_change():
    old = tiny(bias=False)
    cfg = old.config_dict()
    assert (cfg["norm"], cfg["rope"], cfg["qk_norm"]) == ("layernorm", False, False)
    for key in ("norm", "rope", "qk_norm"):                   # a checkpoint from before the options loads
        cfg.pop(key)
    assert models.model_from_config(cfg).config == old.config
    names = dict(tiny(bias=False, rope=True, norm="rmsnorm").named_parameters())
    assert "transformer.wpe.weight" not in names              # rope: positions live in q and k
    assert set(dict(old.named_parameters())) - set(names) == {"transformer.wpe.weight"}
    assert isinstance(tiny(norm="rmsnorm").transformer.h[0].ln_1, models.RMSNorm)
    with pytest.raises(ConfigError, match="norm"):
        GPTConfig(**TINY, norm="batchnorm")
    with pytest.raises(ConfigError, match="relu2"):
        GPTConfig(**TINY, activation="swish")
    with pytest.raises(ConfigError, match="even head size"):
        GPTConfig(**{**TINY, "n_embd": 12, "n_head": 4}, rope=True)


def test_rope_scores_depend_only_on_relative_position(rng):
    from tinygpt.ops import norm as norm_ops
    q, k = rng.standard_normal((2, 1, 1, 1, 8))
    cos, sin = norm_ops.rotary_tables(40, 8, dtype=np.float64)
    def rotated(x, t):
        return norm_ops.rotary(tinygpt.tensor(x), cos[t:t + 1], sin[t:t + 1]).numpy().ravel()
    scores = [rotated(q, t + 7) @ rotated(k, t) for t in (0, 5, 30)]          # query 7 after the key
    assert np.allclose(scores, scores[0]) and not np.isclose(scores[0], rotated(q, 9) @ rotated(k, 0))


@pytest.mark.parametrize("opts", SPEED_OPTIONS[1:2] + SPEED_OPTIONS[-1:], ids=["rope", "all"])
def test_kv_cache_with_speed_options_matches_full_forward(opts):
    m = tiny(bias=False, **opts)
    m.eval()
    ids = np.random.default_rng(0).integers(0, 23, (2, 16))
    full = m(ids)[0].numpy()
    cache = models.KVCache(m.config, 2, m.device)
    with tinygpt.no_grad():
        first = m.lm_head(m._hidden(tinygpt.tensor(ids[:, :5]), cache)).numpy()
        steps = [m.lm_head(m._hidden(tinygpt.tensor(ids[:, t:t + 1]), cache)).numpy()[:, 0] for t in range(5, 16)]
    np.testing.assert_allclose(first, full[:, :5], atol=1e-5)
    np.testing.assert_allclose(np.stack(steps, axis=1), full[:, 5:], atol=1e-5)


@pytest.mark.slow
def test_speedrun_preset_trains(tmp_path):
    """The speedrun preset (Muon + AdamW, ReLU², untied head) for 60 iterations: the loss falls well below ln 65."""
    from tinygpt.train import RunSettings, Trainer
    s = RunSettings.from_preset("speedrun", data="shakespeare", max_iters=60, eval_interval=30, eval_iters=5,
                                out_dir=str(tmp_path / "o"))
    assert (s.optimizer, s.activation, s.tie_weights) == ("muon", "relu2", False)
    t = Trainer(s, progress=False)
    assert isinstance(t.optimizer, optim.Muon)
    r = t.run()
    first, last = r.history[0], r.history[-1]
    assert abs(first["val_loss"] - math.log(65)) < 0.15
    assert last["train_loss"] < first["train_loss"] - 1.0 and last["val_loss"] < 3.0
