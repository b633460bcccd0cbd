"""The settings of a training run: `RunSettings`, the one list of its knobs, and what follows from it.

    settings = RunSettings.from_preset("cpu", data="shakespeare", max_iters=500)
    schedule = make_schedule(settings)          # warmup + cosine, or constant for the lecture's presets
    add_flags(parser, RunSettings)              # --lr, --max-iters, ...: one command-line flag per field

Each field is declared once, with `setting(default, help, rule)`: its type is the annotation, its default
the cpu preset's value, and its metadata the help text and the rule its value must meet (a `Range` or a
`OneOf`; floats must also be finite). The presets (tinygpt/presets.py) are overrides of these fields, the
CLI's flags are derived from them, and the same checks run on the command line (argparse), on
`RunSettings(...)` and on what a resumed run changes. `SampleSettings` does the same for `tinygpt sample`.
"""
from __future__ import annotations

import argparse
import functools
import math
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tinygpt import models, optim, presets
from tinygpt.models import ConfigError

if TYPE_CHECKING:
    from tinygpt import checkpoint

__all__ = ["RunSettings", "SampleSettings", "Range", "OneOf", "setting", "add_flags", "check_fields",
           "make_schedule", "make_optimizer", "resumed_settings", "RESUMABLE"]


@dataclass(frozen=True)
class Range:
    """Numbers from lo to hi (None: unbounded), the ends excluded where lo_open / hi_open say."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, v: float) -> bool:
        """Whether v lies in the range."""
        return ((self.lo is None or v > self.lo or (v == self.lo and not self.lo_open))
                and (self.hi is None or v < self.hi or (v == self.hi and not self.hi_open)))

    def describe(self) -> str:
        """The range as an error message says it: ">= 0", "> 0", "in [0, 1)"."""
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{'<' if self.hi_open else '<='} {self.hi:g}" if self.hi is not None else ""


@dataclass(frozen=True)
class OneOf:
    """One of a few named choices."""
    choices: tuple

    def __init__(self, *choices: str):
        object.__setattr__(self, "choices", choices)

    def ok(self, v: str) -> bool:
        """Whether v is one of the choices."""
        return v in self.choices

    def describe(self) -> str:
        """"one of a, b, c"."""
        return "one of " + ", ".join(self.choices)


def setting(default: Any, help: str, rule: Range | OneOf | None = None, *, gpt: bool = False,
            resumable: bool = False, flag: bool = True, default_help: str | None = None, **extra: Any) -> Any:
    """A dataclass field with its help and rule. gpt: only a GPT has it (the bigram table ignores it);
    resumable: a resumed run may change it; flag=False: no command-line flag; default_help: the default as
    the help should say it (when the field's default is a stand-in, e.g. None); extra: more for add_flags
    (switch=True: an on/off flag; metavar)."""
    return field(default=default, metadata={"help": help, "rule": rule, "gpt": gpt, "resumable": resumable,
                                            "flag": flag, "default_help": default_help, **extra})


_NAMES = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}


@functools.lru_cache(maxsize=None)
def _kind(cls: type, name: str) -> tuple[type, bool]:
    """The field's type (int, float, bool or str) and whether None is allowed (`X | None`)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0], type(None) in typing.get_args(hint)


def _problem(f, kind: type, optional: bool, v: Any) -> str | None:
    """Why `v` cannot be field f's value ("must be ..., got ..."), or None when it can."""
    if v is None and optional:
        return None
    rule = f.metadata.get("rule")
    want = _NAMES[kind] + (f" {rule.describe()}" if isinstance(rule, Range) else "")
    if isinstance(rule, OneOf):
        want = rule.describe()
    fits = {int: lambda: isinstance(v, int) and not isinstance(v, bool),
            float: lambda: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
            bool: lambda: isinstance(v, bool), str: lambda: isinstance(v, str)}[kind]()
    if not fits or (rule is not None and not rule.ok(v)):
        return f"must be {want}{' (or left out)' if optional else ''}, got {v!r}"
    return None


def check_fields(obj: Any, skip: Callable[[Any], bool] = lambda f: False) -> None:
    """Raise ConfigError for the first field of the dataclass instance `obj` whose value breaks its type or
    rule (fields for which skip(field) is true are not checked)."""
    for f in fields(obj):
        if not skip(f):
            problem = _problem(f, *_kind(type(obj), f.name), getattr(obj, f.name))
            if problem:
                raise ConfigError(f"{f.name} {problem}")


def _read_bool(text: str) -> bool:
    """true/yes/on/1 -> True, false/no/off/0 -> False (any case); ArgumentTypeError for anything else."""
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _reader(f, kind: type, optional: bool) -> Callable[[str], Any]:
    """argparse's `type` for field f: text -> value, or an error that names the rule."""
    def read(text: str) -> Any:
        value = _read_bool(text) if kind is bool else kind(text)    # ValueError: "invalid int value: ..."
        problem = _problem(f, kind, optional, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    read.__name__ = kind.__name__
    return read


def add_flags(parser: argparse.ArgumentParser, cls: type, *, defaults: bool = True,
              default_text: Callable[[Any], str | None] | None = None) -> None:
    """Add one --field-name flag per field of the dataclass `cls` (unless its metadata says flag=False), of
    the field's type, checked by its rule. defaults=False: a flag left out is None (its value then comes
    from elsewhere, e.g. a preset), and default_text(field) says what that is in the help. A field with
    `switch` in its metadata is an on/off flag (store_true)."""
    for f in fields(cls):
        if not f.metadata.get("flag", True):
            continue
        text = f.metadata.get("default_help") or (default_text(f) if default_text else None)
        if text is None and f.default not in (None, MISSING) and not f.metadata.get("switch"):
            text = show(f.default)
        helptext = f.metadata["help"] + (f" (default: {text})" if text else "")
        name = "--" + f.name.replace("_", "-")
        kwargs = {"default": f.default if defaults else None, "help": helptext.replace("%", "%%")}
        if f.metadata.get("switch"):
            parser.add_argument(name, action="store_true", help=kwargs["help"])
            continue
        rule, (kind, optional) = f.metadata.get("rule"), _kind(cls, f.name)
        metavar = f.metadata.get("metavar") or _METAVARS.get(kind)
        if isinstance(rule, OneOf):
            metavar = "{" + ",".join(rule.choices) + "}"
        parser.add_argument(name, type=_reader(f, kind, optional), metavar=metavar, **kwargs)


_METAVARS = {int: "N", float: "X", bool: "{true,false}"}


def show(value: Any) -> str:
    """A setting's value as a flag takes it: true/false, numbers and text as they are."""
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass
class RunSettings:
    """Every knob of a run; the defaults are the cpu preset. `from_preset` starts from a preset. JSON-able
    (stored in checkpoints) and checked on creation (ConfigError)."""
    preset: str = setting("cpu", "the run to start from", OneOf(*presets.PRESETS), default_help="speedrun")
    model: str = setting("gpt", "the model (set by the preset)", OneOf("gpt", "bigram"), flag=False)
    data: str | None = setting(None, "a UTF-8 .txt file or folder, 'shakespeare' (Tiny Shakespeare, shipped "
                               "with tinygpt), 'shakespeare-download' or 'python-stdlib'",
                               default_help="shakespeare")
    tokenizer: str = setting("char", "how text becomes ids", OneOf("char", "bpe"))
    bpe_vocab_size: int = setting(512, "vocabulary size of --tokenizer bpe", Range(256))
    device: str = setting("cpu", "cpu or cuda", resumable=True, default_help="$TINYGPT_DEVICE or cpu")
    workers: int = setting(0, "CPU processes that share each batch (0: one per core when the model is big "
                              "enough; 1: off)", Range(0), resumable=True)
    block_size: int = setting(64, "context length in tokens", Range(1))
    n_layer: int = setting(4, "transformer blocks", Range(1), gpt=True)
    n_head: int = setting(4, "attention heads (must divide --n-embd)", Range(1), gpt=True)
    n_embd: int = setting(128, "channels", Range(1), gpt=True)
    dropout: float = setting(0.0, "dropout probability", Range(0, 1, hi_open=True), gpt=True)
    bias: bool = setting(False, "biases in Linear and LayerNorm layers", gpt=True)
    qkv_bias: bool | None = setting(None, "bias of the q, k, v projection", gpt=True, default_help="as --bias")
    activation: str = setting("gelu", "the MLP's nonlinearity (relu2: ReLU squared)", OneOf("gelu", "relu", "relu2"),
                              gpt=True)
    tie_weights: bool = setting(True, "lm_head shares the token embedding's weights", gpt=True)
    norm: str = setting("layernorm", "the normalization of the blocks and the output", OneOf("layernorm", "rmsnorm"),
                        gpt=True)
    rope: bool = setting(False, "rotary position embedding on q and k instead of a learned position table",
                         gpt=True)
    qk_norm: bool = setting(False, "RMS-normalize q and k per head before attention", gpt=True)
    batch_size: int = setting(12, "sequences per micro-batch", Range(1))
    grad_accum: int = setting(1, "micro-batches per optimizer step", Range(1))
    max_iters: int = setting(2000, "iteration to stop at (the lr schedule does not change)", Range(0),
                             resumable=True)
    lr: float = setting(1e-3, "peak learning rate", Range(0, lo_open=True))
    min_lr: float = setting(1e-4, "learning rate at the end of the cosine decay (at most --lr)", Range(0))
    decay_lr: bool = setting(True, "warmup + cosine decay; false: a constant lr (--warmup-iters or "
                                   "--lr-decay-iters turn it on)", flag=False)
    warmup_iters: int = setting(100, "linear warmup length", Range(0))
    lr_decay_iters: int = setting(2000, "cosine decay reaches min_lr here", Range(0))
    weight_decay: float = setting(0.1, "AdamW weight decay on 2-D weights", Range(0))
    beta1: float = setting(0.9, "AdamW's decay of the gradient's running mean", Range(0, 1, hi_open=True))
    beta2: float = setting(0.99, "AdamW's decay of the squared gradient's running mean",
                           Range(0, 1, hi_open=True))
    grad_clip: float = setting(1.0, "clip the global gradient norm (0: off)", Range(0))
    optimizer: str = setting("adamw", "adamw, or muon: Newton-Schulz orthogonalized momentum on the blocks' 2-D "
                                      "weights and AdamW (at --lr) on the rest (tinygpt/optim/muon.py)",
                             OneOf("adamw", "muon"))
    muon_lr: float = setting(0.02, "--optimizer muon: peak learning rate of the Muon weights (the schedule "
                                   "scales it as it scales --lr)", Range(0, lo_open=True))
    muon_momentum: float = setting(0.95, "--optimizer muon: momentum of the Muon weights",
                                   Range(0, 1, hi_open=True))
    eval_interval: int = setting(250, "evaluate and checkpoint every N iterations", Range(1), resumable=True)
    eval_iters: int = setting(20, "batches averaged per evaluation", Range(1), resumable=True)
    seed: int = setting(1337, "random seed", Range(0))
    out_dir: str = setting("out", "where checkpoints, log.jsonl and loss.png go", resumable=True)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_preset(cls, preset: str = "cpu", **overrides: Any) -> "RunSettings":
        """The preset's values, then each override that is not None.

        The lecture's presets (bigram, video) use a constant lr; giving warmup_iters or lr_decay_iters turns
        on warmup + cosine decay to min_lr (default lr/10) at lr_decay_iters (default: the preset's max_iters).
        """
        base = {**presets.overrides(preset), "preset": preset}
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}; known: {sorted(names)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if base.get("model") == "bigram":
            bad = sorted(set(given) & set(GPT_ONLY))
            if bad:
                raise ConfigError(f"preset 'bigram' is a lookup table with no {', '.join(bad)}; "
                                  f"drop those options or use --preset cpu")
        if base.get("decay_lr") is False and ("warmup_iters" in given or "lr_decay_iters" in given):
            base.update(decay_lr=True, lr_decay_iters=base.get("max_iters", cls.max_iters),
                        min_lr=given.get("lr", base.get("lr", cls.lr)) / 10)
        return cls(**{**base, **given})

    def validate(self) -> None:
        """Each field's type and rule (a GPT's fields only for a GPT), then the rules between fields."""
        check_fields(self, skip=lambda f: f.metadata["gpt"] and self.model != "gpt")
        if self.min_lr > self.lr:
            raise ConfigError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr!r}")
        if self.decay_lr and self.warmup_iters > self.lr_decay_iters:
            raise ConfigError(f"warmup_iters={self.warmup_iters} is larger than lr_decay_iters="
                              f"{self.lr_decay_iters}; warm up first, then decay")
        if self.model == "gpt":
            models.GPTConfig(vocab_size=1, **self.gpt_fields())   # n_embd % n_head

    def gpt_fields(self) -> dict:
        """The GPTConfig fields (all but vocab_size) from these settings."""
        return {f.name: getattr(self, f.name) for f in fields(models.GPTConfig) if f.name != "vocab_size"}

    def model_config(self, vocab_size: int) -> dict:
        """The model's `config_dict()` for a vocabulary of vocab_size ids (for models.model_from_config)."""
        if self.model == "bigram":
            return {"model": "bigram", "vocab_size": vocab_size}
        return {"model": "gpt", "vocab_size": vocab_size, **self.gpt_fields()}

    @property
    def tokens_per_iter(self) -> int:
        """Tokens per optimizer step: grad_accum · batch_size · block_size."""
        return self.grad_accum * self.batch_size * self.block_size


# settings a resumed run may change; any other one must stay what the checkpoint says
RESUMABLE = tuple(f.name for f in fields(RunSettings) if f.metadata["resumable"])
GPT_ONLY = tuple(f.name for f in fields(RunSettings) if f.metadata["gpt"])


@dataclass
class SampleSettings:
    """The knobs of `tinygpt sample`; checked on creation (ConfigError)."""
    out_dir: str = setting("out", "the training run's folder")
    checkpoint: str = setting("best", "which checkpoint", OneOf("best", "last"))
    prompt: str = setting("\n", "text to continue", default_help="a newline")
    num_samples: int = setting(1, "how many texts to generate", Range(1))
    max_new_tokens: int = setting(500, "tokens generated per text", Range(0))
    temperature: float = setting(1.0, "0 is greedy; below 1 is more conservative", Range(0))
    top_k: int | None = setting(None, "sample only from the k most likely tokens", Range(1), default_help="all")
    top_p: float | None = setting(None, "nucleus sampling: the smallest set of tokens with mass p",
                                  Range(0, 1, lo_open=True), default_help="off")
    seed: int = setting(1337, "random seed", Range(0))
    device: str | None = setting(None, "cpu or cuda", default_help="$TINYGPT_DEVICE or cpu")

    def __post_init__(self) -> None:
        check_fields(self)


def make_schedule(s: RunSettings):
    """The run's learning rate per iteration: warmup + cosine decay, or constant when decay_lr is off."""
    if not s.decay_lr:
        return optim.ConstantLR(s.lr)
    return optim.WarmupCosineLR(s.lr, s.warmup_iters, s.lr_decay_iters, s.min_lr)


def make_optimizer(s: RunSettings, model: Any) -> optim.Optimizer:
    """The run's optimizer: AdamW with nanoGPT's decay groups, or Muon on the blocks' 2-D weights (peak
    s.muon_lr) with AdamW at s.lr (decay on the embeddings and head) on the rest. Every group's lr is the
    schedule's value times its lr_scale, so one schedule drives both."""
    if s.optimizer == "muon":
        groups = optim.muon_groups(model, muon_lr_scale=s.muon_lr / s.lr, weight_decay=s.weight_decay)
        return optim.Muon(groups, lr=s.lr, momentum=s.muon_momentum, betas=(s.beta1, s.beta2))
    return optim.AdamW(optim.weight_decay_groups(model, s.weight_decay), lr=s.lr, betas=(s.beta1, s.beta2))


def resumed_settings(ckpt: checkpoint.Checkpoint, overrides: dict) -> RunSettings:
    """The checkpoint's settings, with RESUMABLE overrides applied; other overrides must agree."""
    from tinygpt import checkpoint, data     # here: `tinygpt bench` imports this module and measures its RSS
    try:
        saved = RunSettings(**ckpt.meta["settings"])
    except (KeyError, TypeError, ConfigError) as e:
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
            replace(saved, **{k: v})            # a value no run may have says so (ConfigError), not "cannot change"
            raise ConfigError(f"cannot change {k} when resuming: the checkpoint has {getattr(saved, k)!r}, "
                              f"you gave {v!r}; drop the option, or start a new run in another --out-dir")
    return replace(saved, **changes)
