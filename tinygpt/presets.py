"""Presets: the values of a known training run, as overrides of RunSettings' fields (tinygpt/settings.py).

    RunSettings.from_preset("video", max_iters=100)      # the lecture's gpt.py, stopped early
    get_preset("cpu").model_config(vocab_size=65)        # its GPT's config_dict(), for models.model_from_config

A field a preset leaves out keeps RunSettings' default; those defaults are the cpu preset.
"""
from __future__ import annotations

from typing import Any

from tinygpt.models import ConfigError

__all__ = ["PRESETS", "overrides", "get_preset"]

PRESETS: dict[str, dict[str, Any]] = {
    # The lecture's bigram.py: a (V, V) table of next-token logits, AdamW at a constant 1e-2 with torch's
    # defaults (weight decay 0.01, betas (0.9, 0.999)). It has no layers: the GPT's fields do not apply.
    "bigram": dict(model="bigram", block_size=8, batch_size=32, max_iters=3000, lr=1e-2, eval_interval=300,
                   eval_iters=200, decay_lr=False, warmup_iters=0, lr_decay_iters=0, min_lr=0.0,
                   weight_decay=0.01, beta2=0.999),
    # nanoGPT's README CPU run: config/train_shakespeare_char.py (lr 1e-3, min_lr 1e-4, warmup 100, beta2 0.99,
    # weight decay 0.1, train.py's bias=False) with --block_size=64 --batch_size=12 --n_layer=4 --n_head=4
    # --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 --eval_iters=20 (eval_interval 250):
    # 4 layers, 4 heads, 128 channels, ~0.8M parameters. RunSettings' defaults are exactly this run.
    "cpu": {},
    # The lecture's gpt.py: 6 layers, 6 heads, 384 channels, block 256, dropout 0.2, ReLU, separate untied
    # lm_head with bias, bias-free q/k/v, AdamW at a constant 3e-4 with torch's defaults (weight decay 0.01,
    # betas (0.9, 0.999)): 10,788,929 parameters for V = 65.
    "video": dict(block_size=256, batch_size=64, max_iters=5000, lr=3e-4, eval_interval=500, eval_iters=200,
                  n_layer=6, n_head=6, n_embd=384, dropout=0.2, bias=True, qkv_bias=False, activation="relu",
                  tie_weights=False, decay_lr=False, warmup_iters=0, lr_decay_iters=0, min_lr=0.0,
                  weight_decay=0.01, beta2=0.999),
    # Time to quality (issue 19; BENCHMARKS.md "Time to quality"): the cpu preset's shape (4 layers, 4 heads, 128
    # channels, block 64, batch 12) with rotary positions (no wpe table), RMS-normalized q and k, ReLU² and an
    # untied head, trained by Muon (the blocks' 2-D weights, peak 0.015) and AdamW (embeddings, head, gains; peak
    # 4e-3, decay 0.1) for 500 iterations: warmup 30, cosine to 1% of the peak, one evaluation at the end.
    # Tuned on a dev split carved from the training text (scripts/speedrun_tune.py), never on validation.
    "speedrun": dict(max_iters=500, lr_decay_iters=500, warmup_iters=30, lr=4e-3, min_lr=4e-5, eval_interval=500,
                     activation="relu2", tie_weights=False, rope=True, qk_norm=True, optimizer="muon",
                     muon_lr=0.015),
}


def overrides(name: str) -> dict[str, Any]:
    """The fields preset `name` sets (a copy), or a ConfigError that lists the presets."""
    try:
        return dict(PRESETS[name])
    except (KeyError, TypeError):
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def get_preset(name: str):
    """The RunSettings of preset `name` with nothing overridden (RunSettings.from_preset(name))."""
    from tinygpt.settings import RunSettings      # settings imports this module
    return RunSettings.from_preset(name)
