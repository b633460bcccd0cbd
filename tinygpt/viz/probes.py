"""Look inside a forward pass: attention maps, and activation/gradient statistics per layer.

    with capture_attention(model) as att:          # att[layer]: (B, nh, T, T) NumPy attention weights
        model(idx)

    with record_stats(model) as rec:               # makemore part 3's activation and gradient histograms
        _, loss = model(x, y)
        loss.backward()
    print(rec.summary())                           # per layer: mean, std, saturation; grad mean, std

    param_stats(model)                             # per weight: data std, grad std, grad:data ratio

Both context managers cost nothing outside their `with` block: capture_attention sets one module-level
hook in tinygpt/models.py (None otherwise), record_stats wraps the recorded modules' forward for the
duration of the block only. They see one process: under DataParallel the workers are not recorded.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from tinygpt import backend, models, nn
from tinygpt.ops.attention import causal_mask
from tinygpt.tensor import Tensor

__all__ = ["capture_attention", "attention_probs", "record_stats", "Recording", "LayerStats", "ArrayStats",
           "param_stats", "ParamStats"]


# --- attention maps ---------------------------------------------------------------------------------------

def attention_probs(q: Any, k: Any) -> Any:
    """P = softmax(q kᵀ / √hs, causal) for raw arrays q (B, nh, Tq, hs), k (B, nh, Tk, hs) -> (B, nh, Tq, Tk).

    Query i (of the last Tq positions) sees keys 0..Tk-Tq+i; the rest get exactly 0. Before dropout: the
    weights the model computed, not the ones a training step's dropout kept.
    """
    xp = backend.get_array_module(q)
    Tq, Tk = q.shape[-2], k.shape[-2]
    s = (q @ k.swapaxes(-1, -2)) * q.dtype.type(1.0 / math.sqrt(q.shape[-1]))   # (B, nh, Tq, Tk)
    s[..., causal_mask(xp, Tq, Tk)] = -xp.inf
    s -= s.max(axis=-1, keepdims=True)
    p = xp.exp(s)
    return p / p.sum(axis=-1, keepdims=True)


@contextlib.contextmanager
def capture_attention(model: nn.Module) -> Iterator[dict]:
    """Record every attention layer's weights while the block runs: yields att = {layer: array}.

    att[i] is a NumPy array (B, nh, Tq, Tk) from the LAST forward pass in the block (Tq = Tk = T without
    a KV cache), layers numbered in model order (transformer.h.0.attn is 0). Rows sum to 1; entries above
    the causal diagonal are exactly 0. The probabilities are recomputed from the layer's q and k (the
    fused attention op never materialises them outside its own buffer).
    """
    layers = {id(m): i for i, m in enumerate(
        m for m in model.modules() if isinstance(m, models.CausalSelfAttention))}
    if not layers:
        raise ValueError(f"capture_attention: {type(model).__name__} has no CausalSelfAttention layer")
    att: dict = {}
    previous = models.attention_probe

    def probe(module: Any, q: Tensor, k: Tensor) -> None:
        i = layers.get(id(module))
        if i is not None:
            att[i] = backend.to_numpy(attention_probs(q.data, k.data))
        elif previous is not None:                  # an outer capture of another model
            previous(module, q, k)

    models.attention_probe = probe
    try:
        yield att
    finally:
        models.attention_probe = previous


# --- activation and gradient statistics ------------------------------------------------------------------

@dataclass
class ArrayStats:
    """Summary of one array (float64): mean, std (÷ n), and a histogram of `bins` equal bins over [min, max]."""
    mean: float
    std: float
    counts: np.ndarray      # (bins,)
    edges: np.ndarray       # (bins + 1,)

    @classmethod
    def of(cls, a: Any, bins: int) -> "ArrayStats":
        a = backend.to_numpy(a).astype(np.float64).ravel()
        counts, edges = np.histogram(a, bins=bins)
        return cls(float(a.mean()), float(a.std()), counts, edges)

    def density(self) -> tuple[np.ndarray, np.ndarray]:
        """(bin centres, probability density): what the lecture plots, comparable across layers."""
        widths = np.diff(self.edges)
        total = max(int(self.counts.sum()), 1)
        return (self.edges[:-1] + self.edges[1:]) / 2, self.counts / (total * np.where(widths > 0, widths, 1))


@dataclass
class LayerStats:
    """One recorded module's output (B, T, C)-like tensor: its data, its gradient (None without backward),
    and `saturated`, the fraction of |x| > `threshold`. With 0.97 that is makemore part 3's saturation of a
    tanh layer (its gradient nearly 0 there); for other layers it is just the share of large values."""
    name: str
    module: str             # the class name: Block, GELU, ...
    shape: tuple
    data: ArrayStats
    grad: ArrayStats | None
    saturated: float
    threshold: float


class Recording(dict):
    """{module name: LayerStats} in the order of the names recorded; filled when the `with` block ends."""

    def summary(self) -> str:
        rows = []
        for s in self.values():
            row = (f"{s.name:28s} ({s.module}): mean {s.data.mean:+.4f}, std {s.data.std:.4f}, "
                   f"|x|>{s.threshold:g} {100 * s.saturated:.2f}%")
            if s.grad is not None:
                row += f" | grad mean {s.grad.mean:+.3e}, std {s.grad.std:.3e}"
            rows.append(row)
        return "\n".join(rows)


def default_modules(model: nn.Module) -> list[str]:
    """What record_stats watches unless told: for a GPT each block's output (the residual stream) and its
    MLP's activation; for another model each GELU/ReLU module."""
    if isinstance(model, models.GPT):
        return [n for i in range(len(model.transformer.h))
                for n in (f"transformer.h.{i}", f"transformer.h.{i}.mlp.act")]
    return [n for n, m in model.named_modules() if isinstance(m, (nn.GELU, nn.ReLU))]


@contextlib.contextmanager
def record_stats(model: nn.Module, modules: list[str] | None = None, bins: int = 50,
                 saturation: float = 0.97) -> Iterator[Recording]:
    """Record the outputs of `modules` (dotted names from model.named_modules(); default_modules(model)
    when None) in one forward (and backward) pass: yields a Recording, filled when the block ends.

    Each output calls retain_grad(), so a backward() inside the block leaves its gradient for the
    statistics. A module that runs twice in the block keeps its last output. The outputs are held only
    until the block ends.
    """
    found = dict(model.named_modules())
    names = default_modules(model) if modules is None else list(modules)
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"record_stats: {type(model).__name__} has no module {missing[0]!r}; names come "
                         f"from named_modules(), e.g. {', '.join(list(found)[1:4])}")
    if not names:
        raise ValueError(f"record_stats: nothing to record in {type(model).__name__}; pass modules=[...]")
    outputs: dict = {}
    patched = []
    for name in names:
        m = found[name]
        own = m.__dict__.get("forward")             # an instance-level forward (e.g. an outer recording)
        object.__setattr__(m, "forward", _recording_forward(m.forward, name, outputs))
        patched.append((m, own))
    rec = Recording()
    try:
        yield rec
    finally:
        for m, own in reversed(patched):
            if own is None:
                object.__delattr__(m, "forward")
            else:
                object.__setattr__(m, "forward", own)
        for name in (n for n in names if n in outputs):
            out = outputs[name]
            a = out.data
            rec[name] = LayerStats(
                name, type(found[name]).__name__, tuple(out.shape), ArrayStats.of(a, bins),
                None if out.grad is None else ArrayStats.of(out.grad, bins),
                float(backend.to_numpy((abs(a) > saturation).mean())), float(saturation))
        outputs.clear()


def _recording_forward(forward: Any, name: str, outputs: dict) -> Any:
    def recorded(*args: Any, **kwargs: Any) -> Any:
        out = forward(*args, **kwargs)
        if isinstance(out, Tensor):
            if out._ctx is not None:                 # on the graph: keep its gradient too
                out.retain_grad()
            outputs[name] = out
        return out
    return recorded


@dataclass
class ParamStats:
    """A parameter after backward: data std, grad mean and std, and grad std / data std (the lecture's
    grad:data ratio; times the learning rate it approximates the update:data ratio of plain SGD)."""
    name: str
    shape: tuple
    data_std: float
    grad_mean: float
    grad_std: float
    ratio: float


def param_stats(model: nn.Module, min_dim: int = 2) -> list[ParamStats]:
    """ParamStats for each parameter with ndim >= min_dim (the weights; 1 includes biases, LayerNorms) that
    has a gradient, in named_parameters() order."""
    out = []
    for name, p in model.named_parameters():
        if p.ndim < min_dim or p.grad is None:
            continue
        d = backend.to_numpy(p.data).astype(np.float64)
        g = backend.to_numpy(p.grad).astype(np.float64)
        out.append(ParamStats(name, tuple(p.shape), float(d.std()), float(g.mean()), float(g.std()),
                              float(g.std() / d.std()) if d.std() > 0 else math.inf))
    return out
