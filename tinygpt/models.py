"""The language models of "Let's build GPT": the bigram baseline and the GPT (presets: tinygpt/presets.py).

Shape legend: B batch, T time (context length), C = n_embd channels, V vocab, nh heads, hs = C // nh.

    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128))
    logits, loss = model(idx, targets)          # (B, T, V), scalar mean cross-entropy
    out = model.generate(idx, 100, top_k=40)    # (B, T + 100), sampled with tinygpt.manual_seed's generator

Parameter names and shapes are nanoGPT's (`transformer.h.0.attn.c_attn.weight` ...), Linear weights are
(out, in), so `state_dict()` goes to and from a PyTorch nanoGPT with `strict=True`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator

import numpy as np

from tinygpt import backend, nn
from tinygpt import functional as F
from tinygpt.ops import norm as norm_ops
from tinygpt.sample import sample_next
from tinygpt.tensor import Tensor, no_grad

__all__ = ["ConfigError", "BigramLanguageModel", "GPTConfig", "GPT", "KVCache", "model_from_config",
           "sample_next"]


# tinygpt.viz.capture_attention sets this to a function (attention module, q, k) while it records; None
# otherwise, so the check below is all it costs.
attention_probe = None


class ConfigError(ValueError):
    """A model config or preset that cannot work (unknown preset, n_embd not divisible by n_head, ...)."""


def _normal_(p: nn.Parameter, std: float) -> None:
    """p ~ N(0, std²), drawn on the host from tinygpt's seeded generator, written in place."""
    w = backend.host_rng().standard_normal(p.shape, dtype=np.float32) * np.float32(std)
    p.data[...] = backend.to_device(w, p.device)


def _as_ids(idx: Any, device: backend.Device) -> Tensor:
    """Token ids (a Tensor, a NumPy or device (CuPy) array, or a nested list) as an integer Tensor on `device`."""
    if not isinstance(idx, Tensor):
        on_host = backend.device_of(idx).name == "cpu"          # np.asarray would refuse a CuPy array
        idx = Tensor(backend.to_device(np.asarray(idx) if on_host else idx, device))
    if idx.dtype.kind not in "iu" or idx.ndim != 2:
        raise ValueError(f"idx must be a (B, T) array of integer token ids, got shape {idx.shape} "
                         f"and dtype {idx.dtype}")
    return idx.to(device)


class _Generator:
    """Shared `generate` / `generate_stream` for both models; subclasses define `_next_logits`."""

    def generate_stream(self, idx: Any, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None,
                        use_cache: bool = True) -> Iterator[np.ndarray]:
        """Yield the sampled token ids (B,) one step at a time (for streaming text to a terminal)."""
        device = self.device
        ids = backend.to_numpy(_as_ids(idx, device).data).astype(np.int64)   # (B, T0) on the host
        if ids.shape[1] == 0:
            raise ValueError("generate needs at least one token of context; start from e.g. [[0]]")
        was_training = self.training
        self.eval()
        state: dict = {}
        try:
            with no_grad():
                for _ in range(int(max_new_tokens)):
                    logits = self._next_logits(ids, state, use_cache)                 # (B, V) host
                    nxt = sample_next(logits, temperature, top_k, top_p)             # (B,)
                    ids = np.concatenate([ids, nxt[:, None]], axis=1)
                    yield nxt
        finally:
            self.train(was_training)

    def generate(self, idx: Any, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, use_cache: bool = True) -> Tensor:
        """idx (B, T) -> (B, T + max_new_tokens): append sampled tokens, feeding each one back in."""
        start = _as_ids(idx, self.device)
        new = [t[:, None] for t in self.generate_stream(start, max_new_tokens, temperature, top_k, top_p,
                                                       use_cache)]
        out = np.concatenate([backend.to_numpy(start.data).astype(np.int64)] + new, axis=1)
        return Tensor(backend.to_device(out, self.device))

    @property
    def device(self) -> backend.Device:
        return next(self.parameters()).device


# ---------------------------------------------------------------------------------------------------
# The bigram model: each token looks up the logits of the next one in a (V, V) table. No context at all.

class BigramLanguageModel(_Generator, nn.Module):
    """logits[b, t] = table[idx[b, t]]: row i of the (V, V) table holds the logits for the token after i.

    Init N(0, 0.02²) (the lecture uses N(0, 1), which starts at loss ≈ 4.9 instead of the uniform -ln(1/V)):
    near-zero logits predict every token with probability 1/V, so the step-0 loss is ≈ ln V (4.17 for V=65).
    """

    def __init__(self, vocab_size: int, device: Any = None):
        super().__init__()
        if int(vocab_size) < 1:
            raise ConfigError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        self.vocab_size = int(vocab_size)
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size, device="cpu")
        _normal_(self.token_embedding_table.weight, 0.02)
        if device is not None:
            self.to(device)

    def forward(self, idx: Any, targets: Any = None) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) -> logits (B, T, V), and the mean cross-entropy against targets (B, T) if given."""
        idx = _as_ids(idx, self.device)
        logits = self.token_embedding_table(idx)                  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits, _as_ids(targets, self.device))
        return logits, loss

    def _next_logits(self, ids: np.ndarray, state: dict, use_cache: bool) -> np.ndarray:
        logits, _ = self(ids[:, -1:])                             # only the last token matters
        return backend.to_numpy(logits.data[:, -1, :])

    def config_dict(self) -> dict:
        return {"model": "bigram", "vocab_size": self.vocab_size}


# ---------------------------------------------------------------------------------------------------
# GPT

@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True               # biases in Linear and LayerNorm layers
    qkv_bias: bool | None = None    # bias of c_attn (the q, k, v projection); None: same as `bias`
    activation: str = "gelu"        # "gelu" (nanoGPT, exact erf form) or "relu" (the lecture's gpt.py)
    tie_weights: bool = True        # lm_head.weight IS transformer.wte.weight
    # speedrun options (tinygpt/ops/norm.py); the defaults are nanoGPT's GPT, so old checkpoints load as they were
    norm: str = "layernorm"         # "layernorm", or "rmsnorm": x / rms(x) · w (no mean, no bias)
    rope: bool = False              # rotary position embedding on q and k instead of the learned wpe table
    qk_norm: bool = False           # RMS-normalize q and k per head (no weight) before attention

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head != 0:
            raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; each head "
                              f"gets n_embd // n_head channels, so pick e.g. n_embd="
                              f"{self.n_head * max(1, round(self.n_embd / self.n_head))}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation not in ("gelu", "relu", "relu2"):
            raise ConfigError(f"activation must be 'gelu', 'relu' or 'relu2', got {self.activation!r}")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ConfigError(f"norm must be 'layernorm' or 'rmsnorm', got {self.norm!r}")
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"rope needs an even head size, got n_embd // n_head = {self.n_embd // self.n_head}")

    @property
    def attn_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else bool(self.qkv_bias)


class RMSNorm(nn.Module):
    """y = x / √(mean(x²) + ε) · w over the last axis (GPTConfig norm="rmsnorm"); weight init 1, no bias."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(Tensor(np.ones(dim, dtype=np.float32)))

    def forward(self, x: Tensor) -> Tensor:
        return norm_ops.rms_norm(x, self.weight, self.eps)


def _norm(config: GPTConfig) -> nn.Module:
    """The block's and the final normalization: nanoGPT's LayerNorm, or RMSNorm."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd, bias=config.bias, device="cpu")


class ReLUSquared(nn.Module):
    """max(x, 0)² (GPTConfig activation="relu2")."""

    def forward(self, x: Tensor) -> Tensor:
        return norm_ops.relu_squared(x)


class CausalSelfAttention(nn.Module):
    """All heads at once: one (C, 3C) projection to q, k, v, one fused attention op, one output projection."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        self.n_head, self.dropout = config.n_head, config.dropout
        self.rope, self.qk_norm = config.rope, config.qk_norm
        self._rope_tables: dict = {}              # (start, stop, device name) -> (cos, sin)
        self.c_attn = nn.Linear(C, 3 * C, bias=config.attn_bias, device="cpu")   # x -> q, k, v
        self.c_proj = nn.Linear(C, C, bias=config.bias, device="cpu")             # heads -> residual
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: "KVCache | None" = None, layer: int = 0) -> Tensor:
        B, T, C = x.shape
        nh = self.n_head
        qkv = self.c_attn(x).reshape(B, T, 3, nh, C // nh)                          # (B, T, 3, nh, hs)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))                  # (B, nh, T, hs) each
        if self.qk_norm:                                          # q, k scaled to rms 1 per head
            ones = self._ones(C // nh, x)
            q, k = norm_ops.rms_norm(q, ones), norm_ops.rms_norm(k, ones)
        if self.rope:                                             # rotate by position (cache: from its length)
            start = 0 if cache is None else cache.length
            cos, sin = self._tables(start, start + T, C // nh, x)
            q, k = norm_ops.rotary(q, cos, sin), norm_ops.rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)                      # (B, nh, Tk, hs): this step's and earlier
        if attention_probe is not None:                           # viz.capture_attention is recording
            attention_probe(self, q, k)
        # softmax(q kᵀ / √hs, causal) v; queries are the last T of the Tk positions
        y = F.scaled_dot_product_attention(q, k, v, causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)                    # (B, T, nh·hs): heads side by side
        return self.resid_dropout(self.c_proj(y))

    def _tables(self, start: int, stop: int, hs: int, x: Tensor):
        key = (start, stop, x.device.name, x.dtype.str)
        if key not in self._rope_tables:
            if len(self._rope_tables) > 8:
                self._rope_tables.clear()
            self._rope_tables[key] = norm_ops.rotary_tables((start, stop), hs, device=x.device, dtype=x.dtype)
        return self._rope_tables[key]

    def _ones(self, hs: int, x: Tensor) -> Tensor:
        key = ("ones", hs, x.device.name, x.dtype.str)
        if key not in self._rope_tables:
            self._rope_tables[key] = Tensor(x.device.xp.ones(hs, dtype=x.dtype))
        return self._rope_tables[key]


class MLP(nn.Module):
    """Position-wise feed-forward: C -> 4C -> activation -> C."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        C = config.n_embd
        self.c_fc = nn.Linear(C, 4 * C, bias=config.bias, device="cpu")
        self.act = {"gelu": nn.GELU, "relu": nn.ReLU, "relu2": ReLUSquared}[config.activation]()
        self.c_proj = nn.Linear(4 * C, C, bias=config.bias, device="cpu")
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = _norm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: "KVCache | None" = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)             # tokens talk to each other
        return x + self.mlp(self.ln_2(x))                         # each token thinks on its own


class Transformer(nn.Module):
    """nanoGPT's `model.transformer` (a ModuleDict there): wte, wpe, drop, h, ln_f."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd, device="cpu")    # (V, C) token embedding
        if not config.rope:                                                         # rope: positions in q, k
            self.wpe = nn.Embedding(config.block_size, config.n_embd, device="cpu")  # (block_size, C) position
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = _norm(config)


class KVCache:
    """Keys and values of every position seen so far, per layer, in preallocated (B, nh, block_size, hs)
    buffers, so one new token costs O(T) attention instead of recomputing the O(T²) prefix."""

    def __init__(self, config: GPTConfig, batch_size: int, device: backend.Device, dtype: Any = np.float32):
        shape = (batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        xp = device.xp
        self.k = [xp.empty(shape, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [xp.empty(shape, dtype=dtype) for _ in range(config.n_layer)]
        self.device = device
        self.length = 0        # positions filled in every layer (advanced by GPT after all layers ran)

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's k, v (B, nh, T, hs) after the cached ones; return all (B, nh, length+T, hs)."""
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k.data
        self.v[layer][:, :, start:end] = v.data
        return (Tensor._make(self.k[layer][:, :, :end], self.device, None),
                Tensor._make(self.v[layer][:, :, :end], self.device, None))


class GPT(_Generator, nn.Module):
    """GPT-2 style decoder: embeddings, n_layer pre-LN blocks, final LayerNorm, lm_head (nanoGPT names).

    Init (GPT-2): every Linear and Embedding weight ~ N(0, 0.02²), biases 0, and the two residual
    projections (attn.c_proj, mlp.c_proj) ~ N(0, (0.02/√(2·n_layer))²) so the residual stream's variance
    does not grow with depth.
    """

    def __init__(self, config: GPTConfig, device: Any = None):
        super().__init__()
        self.config = config
        self.transformer = Transformer(config)
        lm_bias = config.bias and not config.tie_weights
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=lm_bias, device="cpu")
        if config.tie_weights:
            self.lm_head.weight = self.transformer.wte.weight     # the SAME Parameter: weight tying
        self._init_weights()
        if device is not None:
            self.to(device)

    def _init_weights(self) -> None:
        proj_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        done: set[int] = set()
        for name, p in self.named_parameters():
            if id(p) in done:
                continue
            done.add(id(p))
            if name.endswith("c_proj.weight"):
                _normal_(p, proj_std)
            elif name.endswith(".weight") and p.ndim == 2:        # Linear and Embedding weights
                _normal_(p, 0.02)
            elif name.endswith(".bias"):
                p.data[...] = 0
            # LayerNorm weights stay 1

    def forward(self, idx: Any, targets: Any = None) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) -> logits (B, T, V), and the mean cross-entropy against targets (B, T) if given."""
        x = self._hidden(_as_ids(idx, self.device))               # (B, T, C)
        logits = self.lm_head(x)                                  # (B, T, V)
        loss = None if targets is None else F.cross_entropy(logits, _as_ids(targets, self.device))
        return logits, loss

    def _hidden(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        """Token ids (B, T) -> final hidden states (B, T, C). With a cache, idx are the next T positions."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size="
                             f"{self.config.block_size}; crop the context to the last "
                             f"{self.config.block_size} tokens")
        tr = self.transformer
        tok_emb = tr.wte(idx)                                     # (B, T, C)
        if self.config.rope:                                      # positions enter in attention
            x = tr.drop(tok_emb)
        else:
            pos_emb = tr.wpe.weight[start:start + T]              # (T, C): wpe(arange(start, start + T))
            x = tr.drop(tok_emb + pos_emb)
        for i, block in enumerate(tr.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.length += T
        return tr.ln_f(x)

    def _next_logits(self, ids: np.ndarray, state: dict, use_cache: bool) -> np.ndarray:
        """Logits (B, V) for the token after ids (B, L).

        Cached: the first call feeds the whole prompt (prefill), later calls only the newest token. Once L
        exceeds block_size the window slides, every token's position changes and the cached keys are stale,
        so from then on each step recomputes the cropped window, exactly as the uncached path does.
        """
        B, L = ids.shape
        block = self.config.block_size
        cache = state.get("cache")
        if use_cache and L <= block:
            if cache is None:
                cache = state["cache"] = KVCache(self.config, B, self.device, self.lm_head.weight.dtype)
            new = ids[:, cache.length:]                          # the prompt, then one token a step
            x = self._hidden(Tensor(backend.to_device(new, self.device)), cache)
        else:
            state.pop("cache", None)
            x = self._hidden(Tensor(backend.to_device(ids[:, -block:], self.device)))
        logits = self.lm_head(x[:, -1, :])                        # (B, V): only the last position
        return backend.to_numpy(logits.data)

    def config_dict(self) -> dict:
        return {"model": "gpt", **asdict(self.config)}

    # nanoGPT's state dicts may carry the causal-mask buffer "attn.bias" (no flash attention) or the
    # "_orig_mod." prefix (torch.compile): neither is a weight, so drop them before loading.
    def load_state_dict(self, state_dict: dict, strict: bool = True):
        own = set(dict(self.named_parameters(remove_duplicate=False)))
        cleaned = {}
        for k, v in state_dict.items():
            k = k[len("_orig_mod."):] if k.startswith("_orig_mod.") else k
            if k not in own and (k.endswith(".attn.bias") or k.endswith(".attn.masked_bias")):
                continue
            cleaned[k] = v
        return super().load_state_dict(cleaned, strict=strict)


def model_from_config(d: dict, device: Any = None) -> "GPT | BigramLanguageModel":
    """Rebuild a model from `model.config_dict()` (as stored in checkpoints)."""
    d = dict(d)
    kind = d.pop("model", None)
    if kind == "bigram":
        return BigramLanguageModel(d["vocab_size"], device=device)
    if kind == "gpt":
        names = {f.name for f in fields(GPTConfig)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown GPTConfig fields {sorted(unknown)}; this tinygpt knows {sorted(names)}")
        return GPT(GPTConfig(**d), device=device)
    raise ConfigError(f"unknown model kind {kind!r}; expected 'gpt' or 'bigram'")
