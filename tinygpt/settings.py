"""The settings of a training run: `RunSettings` (every knob, filled from a preset), its validation, the
LR schedule that follows from it, and what a resumed run may change.

    settings = RunSettings.from_preset("cpu", data="shakespeare", max_iters=500)
    schedule = make_schedule(settings)          # warmup + cosine, or constant for the lecture's presets
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from tinygpt import checkpoint, data, models, optim, presets
from tinygpt.models import ConfigError

__all__ = ["RunSettings", "make_schedule", "resumed_settings", "RESUMABLE"]

# settings a resumed run may change; any other one must stay what the checkpoint says
RESUMABLE = ("max_iters", "eval_interval", "eval_iters", "device", "out_dir", "workers")
_GPT_ONLY = ("n_layer", "n_head", "n_embd", "dropout", "bias", "qkv_bias", "activation", "tie_weights")


@dataclass
class RunSettings:
    """Every knob of a run. `from_preset` fills them from a preset; JSON-able (stored in checkpoints)."""
    preset: str = "cpu"
    model: str = "gpt"
    data: str | None = None             # a path or one of data.NAMED_SOURCES; None: "shakespeare"
    tokenizer: str = "char"             # "char" or "bpe"
    bpe_vocab_size: int = 512
    device: str = "cpu"
    workers: int = 0                    # CPU processes sharing each batch (tinygpt.parallel); 0: automatic
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False
    qkv_bias: bool | None = None
    activation: str = "gelu"
    tie_weights: bool = True
    batch_size: int = 12
    grad_accum: int = 1
    max_iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    decay_lr: bool = True
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 1337
    out_dir: str = "out"

    @classmethod
    def from_preset(cls, preset: str = "cpu", **overrides: Any) -> "RunSettings":
        """The preset's values, then each override that is not None.

        The lecture's presets (bigram, video) use a constant lr; giving warmup_iters or lr_decay_iters turns
        on warmup + cosine decay to min_lr (default lr/10) at lr_decay_iters (default: the preset's max_iters).
        """
        p = presets.get_preset(preset)
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}; known: {sorted(names)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if p.model == "bigram":
            bad = sorted(set(given) & set(_GPT_ONLY))
            if bad:
                raise ConfigError(f"preset 'bigram' is a lookup table with no {', '.join(bad)}; "
                                  f"drop those options or use --preset cpu")
        base = {f.name: getattr(p, f.name) for f in fields(cls) if hasattr(p, f.name) and f.name != "data"}
        base["preset"] = p.name
        if not p.decay_lr and ("warmup_iters" in given or "lr_decay_iters" in given):
            base.update(decay_lr=True, lr_decay_iters=p.max_iters, min_lr=given.get("lr", p.lr) / 10)
        s = cls(**{**base, **given})
        s.validate()
        return s

    def validate(self) -> None:
        def positive(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("block_size", "batch_size", "grad_accum", "eval_interval", "eval_iters"):
            positive(name)
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "seed", "workers"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {v!r}")
        if self.tokenizer not in ("char", "bpe"):
            raise ConfigError(f"tokenizer must be 'char' or 'bpe', got {self.tokenizer!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr!r}")
        if self.decay_lr and self.warmup_iters > self.lr_decay_iters:
            raise ConfigError(f"warmup_iters={self.warmup_iters} is larger than lr_decay_iters="
                              f"{self.lr_decay_iters}; warm up first, then decay")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError(f"grad_clip and weight_decay must be >= 0, got {self.grad_clip}, "
                              f"{self.weight_decay}")
        if self.model == "gpt":
            models.GPTConfig(vocab_size=1, **self.gpt_fields())   # n_embd % n_head, dropout, activation

    def gpt_fields(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(models.GPTConfig) if f.name != "vocab_size"}

    def model_config(self, vocab_size: int) -> dict:
        if self.model == "bigram":
            return {"model": "bigram", "vocab_size": vocab_size}
        return {"model": "gpt", "vocab_size": vocab_size, **self.gpt_fields()}

    @property
    def tokens_per_iter(self) -> int:
        return self.grad_accum * self.batch_size * self.block_size


def make_schedule(s: RunSettings):
    if not s.decay_lr:
        return optim.ConstantLR(s.lr)
    return optim.WarmupCosineLR(s.lr, s.warmup_iters, s.lr_decay_iters, s.min_lr)


def resumed_settings(ckpt: checkpoint.Checkpoint, overrides: dict) -> RunSettings:
    """The checkpoint's settings, with RESUMABLE overrides applied; other overrides must agree."""
    try:
        saved = RunSettings(**ckpt.meta["settings"])
    except (KeyError, TypeError) as e:
        raise checkpoint.CheckpointError(f"checkpoint {str(ckpt.path)!r} has no usable run settings "
                                         f"({' '.join(str(e).split())})") from None
    changes = {}
    for k, v in overrides.items():
        if v is None:
            continue
        if k in RESUMABLE:
            changes[k] = v
        elif k == "data" and saved.data not in data.NAMED_SOURCES and v not in data.NAMED_SOURCES \
                and Path(v).expanduser().resolve() == Path(saved.data):
            continue
        elif not hasattr(saved, k):
            raise ConfigError(f"unknown setting {k!r}")
        elif getattr(saved, k) != v:
            raise ConfigError(f"cannot change {k} when resuming: the checkpoint has {getattr(saved, k)!r}, "
                              f"you gave {v!r}; drop the option, or start a new run in another --out-dir")
    return replace(saved, **changes)
