"""RunSettings: the presets hold their sources' values, the rules run in RunSettings(...) and on resume, and
what a resumed run may change is what Trainer.resume says."""
import math
import typing
from dataclasses import asdict, fields, replace

import pytest

from tinygpt import checkpoint, models, presets
from tinygpt.models import ConfigError
from tinygpt.settings import RESUMABLE, OneOf, Range, RunSettings, SampleSettings, make_schedule, \
    resumed_settings
from tinygpt.train import Trainer


def kind(cls, f):
    hint = typing.get_type_hints(cls)[f.name]
    return next(a for a in (typing.get_args(hint) or (hint,)) if a is not type(None))


def bad_values(cls, f):
    """Values field f must refuse: another type, nan/inf for floats, the ends its Range excludes."""
    k, rule = kind(cls, f), f.metadata["rule"]
    out = [[1]] + ([float("nan"), float("inf"), -float("inf")] if k is float else [])
    if k is int:
        out += [1.5, True]
    if isinstance(rule, Range):
        step = 1 if k is int else 1e-3
        if rule.lo is not None:
            out.append(k(rule.lo if rule.lo_open else rule.lo - step))
        if rule.hi is not None:
            out.append(k(rule.hi if rule.hi_open else rule.hi + step))
    if isinstance(rule, OneOf):
        out.append("gpt5")
    return out


CASES = [(cls, f, v) for cls in (RunSettings, SampleSettings) for f in fields(cls) for v in bad_values(cls, f)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].__name__}.{c[1].name}={c[2]!r}")
def test_constructor_refuses_what_the_rule_forbids(case):
    cls, f, value = case
    with pytest.raises(ConfigError, match=f"^{f.name} must be"):
        cls(**{f.name: value})


def test_defaults_are_valid_and_the_cpu_preset():
    assert RunSettings() == RunSettings.from_preset("cpu")
    s = RunSettings.from_preset("video", data="x.txt", max_iters=7)
    assert RunSettings(**asdict(s)) == s                          # JSON-able round trip (checkpoints)


def test_presets_hold_their_sources_values():
    """Numbers from the lecture's bigram.py and gpt.py, and nanoGPT's README CPU command line."""
    b = presets.get_preset("bigram")
    assert (b.model, b.batch_size, b.block_size, b.max_iters, b.eval_interval, b.lr, b.eval_iters) == \
        ("bigram", 32, 8, 3000, 300, 1e-2, 200)
    assert (b.decay_lr, b.weight_decay, b.beta1, b.beta2) == (False, 0.01, 0.9, 0.999)   # torch's AdamW
    v = presets.get_preset("video")
    assert (v.batch_size, v.block_size, v.max_iters, v.eval_interval, v.lr, v.eval_iters, v.n_embd, v.n_head,
            v.n_layer, v.dropout) == (64, 256, 5000, 500, 3e-4, 200, 384, 6, 6, 0.2)
    assert (v.activation, v.tie_weights, v.bias, v.qkv_bias, v.decay_lr, v.weight_decay, v.beta2) == \
        ("relu", False, True, False, False, 0.01, 0.999)
    c = presets.get_preset("cpu")
    assert (c.block_size, c.batch_size, c.n_layer, c.n_head, c.n_embd, c.max_iters, c.lr_decay_iters,
            c.dropout, c.eval_iters, c.eval_interval) == (64, 12, 4, 4, 128, 2000, 2000, 0.0, 20, 250)
    assert (c.lr, c.min_lr, c.warmup_iters, c.beta2, c.weight_decay, c.bias, c.decay_lr) == \
        (1e-3, 1e-4, 100, 0.99, 0.1, False, True)


def test_presets_only_name_fields():
    names = {f.name for f in fields(RunSettings)}
    for name, values in presets.PRESETS.items():
        assert set(values) <= names, name
        assert RunSettings.from_preset(name).preset == name


def test_from_preset_rules():
    assert RunSettings.from_preset("cpu", lr=None).lr == 1e-3                 # None: left out
    with pytest.raises(ConfigError, match="unknown settings"):
        RunSettings.from_preset("cpu", learning_rate=1.0)
    with pytest.raises(ConfigError, match="bigram, cpu, video"):
        RunSettings.from_preset("gpt5")
    with pytest.raises(ConfigError, match="no n_layer"):
        RunSettings.from_preset("bigram", n_layer=2)
    v = RunSettings.from_preset("video", warmup_iters=10)                      # turns the decay on
    assert (v.decay_lr, v.lr_decay_iters, v.min_lr) == (True, 5000, pytest.approx(3e-5))
    assert make_schedule(v)(10) == pytest.approx(3e-4) and make_schedule(v)(5000) == pytest.approx(3e-5)
    b = RunSettings.from_preset("bigram", n_layer=None)
    assert b.model_config(65) == {"model": "bigram", "vocab_size": 65}
    cfg = RunSettings.from_preset("cpu").model_config(65)
    assert models.model_from_config(cfg).num_parameters() == 804_096


def test_gpt_rules_do_not_apply_to_the_bigram():
    """A bigram checkpoint's settings may hold any GPT shape (older ones hold n_layer=0); a GPT's may not."""
    b = replace(RunSettings.from_preset("bigram"), n_layer=0, n_head=0, n_embd=0)
    assert b.n_layer == 0
    with pytest.raises(ConfigError, match="n_layer must be an integer >= 1"):
        replace(RunSettings(), n_layer=0)
    with pytest.raises(ConfigError, match="not divisible"):
        RunSettings(n_embd=30, n_head=4)
    with pytest.raises(ConfigError, match="min_lr"):
        RunSettings(lr=1e-3, min_lr=2e-3)


def ckpt(**settings):
    return checkpoint.Checkpoint(meta={"settings": asdict(RunSettings(**settings))}, model_state={},
                                 path="run/ckpt_last.safetensors")


def test_resume_changes_only_the_resumable_settings():
    saved = ckpt(max_iters=10)
    s = resumed_settings(saved, {"max_iters": 20, "eval_interval": 5, "eval_iters": 3, "workers": 2,
                                 "device": "cpu", "out_dir": "moved", "lr": 1e-3, "seed": None})
    assert (s.max_iters, s.eval_interval, s.eval_iters, s.workers, s.out_dir) == (20, 5, 3, 2, "moved")
    with pytest.raises(ConfigError, match="cannot change lr"):
        resumed_settings(saved, {"lr": 2e-3})
    with pytest.raises(ConfigError, match="max_iters must be an integer >= 0"):
        resumed_settings(saved, {"max_iters": -1})                       # resumable, still checked
    with pytest.raises(ConfigError, match="lr must be a finite number"):
        resumed_settings(saved, {"lr": math.nan})                        # not "cannot change"
    with pytest.raises(ConfigError, match="unknown setting"):
        resumed_settings(saved, {"learning_rate": 1.0})
    broken = checkpoint.Checkpoint(meta={"settings": {**asdict(RunSettings()), "lr": -1.0}}, model_state={},
                                   path="x")
    with pytest.raises(checkpoint.CheckpointError, match="no usable run settings .*lr must be"):
        resumed_settings(broken, {})


def test_resume_docstring_lists_every_resumable_setting():
    assert set(RESUMABLE) == {"max_iters", "eval_interval", "eval_iters", "device", "workers", "out_dir"}
    doc = " ".join(Trainer.resume.__doc__.split())
    for name in RESUMABLE:
        assert name in doc, name
