"""Presets: a model shape plus the hyper-parameters of a known training run (`tinygpt train --preset NAME`).

    p = get_preset("cpu")                       # nanoGPT's CPU Shakespeare run
    cfg = p.model_config(vocab_size=65)         # the GPT's config_dict(), for models.model_from_config
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from tinygpt.models import ConfigError, GPTConfig

__all__ = ["Preset", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class Preset:
    """Everything `tinygpt train --preset NAME` starts from; each CLI option overrides one field."""
    name: str
    model: str                      # "gpt" or "bigram"
    block_size: int
    batch_size: int
    max_iters: int
    lr: float
    eval_interval: int
    eval_iters: int
    n_layer: int = 0
    n_head: int = 0
    n_embd: int = 0
    dropout: float = 0.0
    bias: bool = True
    qkv_bias: bool | None = None
    activation: str = "gelu"
    tie_weights: bool = True
    decay_lr: bool = True           # False: constant lr (the lecture's scripts)
    warmup_iters: int = 0
    lr_decay_iters: int = 0
    min_lr: float = 0.0
    weight_decay: float = 0.1       # on 2-D weights only
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    description: str = ""

    def model_config(self, vocab_size: int, **overrides: Any) -> dict:
        """The `config_dict()` of this preset's model for a vocabulary, with field overrides."""
        if self.model == "bigram":
            return {"model": "bigram", "vocab_size": vocab_size}
        cfg = {f.name: getattr(self, f.name) for f in fields(GPTConfig) if f.name != "vocab_size"}
        cfg.update({k: v for k, v in overrides.items() if v is not None})
        GPTConfig(vocab_size=vocab_size, **cfg)                   # validate now (ConfigError)
        return {"model": "gpt", "vocab_size": vocab_size, **cfg}


PRESETS: dict[str, Preset] = {
    # The lecture's bigram.py: a (V, V) table, AdamW at a constant 1e-2 (torch's default weight decay 0.01).
    "bigram": Preset(
        "bigram", model="bigram", block_size=8, batch_size=32, max_iters=3000, lr=1e-2, eval_interval=300,
        eval_iters=200, decay_lr=False, weight_decay=0.01,
        description="the lecture's bigram.py: a V×V table of next-token logits"),
    # nanoGPT's README CPU run: config/train_shakespeare_char.py (lr 1e-3, min_lr 1e-4, warmup 100, beta2 0.99,
    # weight decay 0.1, train.py's bias=False) with --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
    # --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 --eval_iters=20.
    "cpu": Preset(
        "cpu", model="gpt", block_size=64, batch_size=12, max_iters=2000, lr=1e-3, eval_interval=250,
        eval_iters=20, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False, activation="gelu",
        tie_weights=True, decay_lr=True, warmup_iters=100, lr_decay_iters=2000, min_lr=1e-4,
        weight_decay=0.1, beta2=0.99,
        description="nanoGPT's CPU Shakespeare run: 4 layers, 4 heads, 128 channels, ~0.8M parameters"),
    # The lecture's gpt.py: 6 layers, 6 heads, 384 channels, block 256, dropout 0.2, ReLU, separate untied
    # lm_head with bias, bias-free q/k/v, AdamW at a constant 3e-4 (torch's default weight decay 0.01).
    "video": Preset(
        "video", model="gpt", block_size=256, batch_size=64, max_iters=5000, lr=3e-4, eval_interval=500,
        eval_iters=200, n_layer=6, n_head=6, n_embd=384, dropout=0.2, bias=True, qkv_bias=False,
        activation="relu", tie_weights=False, decay_lr=False, weight_decay=0.01,
        description="the lecture's gpt.py: 6 layers, 6 heads, 384 channels, 10.8M parameters (V=65)"),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
