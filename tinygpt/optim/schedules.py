"""Learning-rate schedules: plain callables `schedule(it) -> lr` of the iteration number it = 0, 1, ...

    schedule = WarmupCosineLR(max_lr=1e-3, warmup_iters=100, lr_decay_iters=5000, min_lr=1e-4)
    for it in range(max_iters):
        for group in optimizer.param_groups:
            group["lr"] = schedule(it)
        ...

A schedule has no hidden state beyond its settings: `state_dict()` gives them as JSON-able data (with its
"kind"), and `schedule_from_state(d)` rebuilds it, so a resumed run gets the same lr at every iteration.
"""
from __future__ import annotations

import math

__all__ = ["ConstantLR", "WarmupCosineLR", "StepLR", "schedule_from_state"]


class _Schedule:
    """The base of the schedules: `kind` names the class in state_dict(); every attribute is a setting."""
    kind = ""

    def __call__(self, it: int) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The settings as JSON-able data, with "kind": what schedule_from_state rebuilds it from."""
        return {"kind": self.kind, **vars(self)}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class ConstantLR(_Schedule):
    """lr(it) = lr."""
    kind = "constant"

    def __init__(self, lr: float):
        self.lr = float(lr)

    def __call__(self, it: int) -> float:
        return self.lr


class WarmupCosineLR(_Schedule):
    """nanoGPT's `get_lr`: a linear warmup, a cosine decay to min_lr, then min_lr.

        it < warmup_iters:                  lr = max_lr · (it + 1) / (warmup_iters + 1)
        warmup_iters <= it <= lr_decay_iters:
            r = (it − warmup_iters) / (lr_decay_iters − warmup_iters)        goes 0 -> 1
            lr = min_lr + ½ (1 + cos(π r)) · (max_lr − min_lr)               goes max_lr -> min_lr
        it > lr_decay_iters:                lr = min_lr
    """
    kind = "warmup_cosine"

    def __init__(self, max_lr: float, warmup_iters: int, lr_decay_iters: int, min_lr: float):
        if warmup_iters < 0 or lr_decay_iters < warmup_iters:
            raise ValueError(f"WarmupCosineLR: need 0 <= warmup_iters <= lr_decay_iters, got warmup_iters="
                             f"{warmup_iters}, lr_decay_iters={lr_decay_iters}")
        self.max_lr, self.warmup_iters = float(max_lr), int(warmup_iters)
        self.lr_decay_iters, self.min_lr = int(lr_decay_iters), float(min_lr)

    def __call__(self, it: int) -> float:
        if it < self.warmup_iters:                                   # 1) linear warmup
            return self.max_lr * (it + 1) / (self.warmup_iters + 1)
        if it >= self.lr_decay_iters:                                # 3) min_lr after the decay (at it ==
            return self.min_lr                                       #    lr_decay_iters cos(π) gives it too)
        ratio = (it - self.warmup_iters) / (self.lr_decay_iters - self.warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))              # 2) cosine: 1 -> 0
        return self.min_lr + coeff * (self.max_lr - self.min_lr)


class StepLR(_Schedule):
    """Step decay: lr(it) = lr · gamma^⌊it / step_size⌋ (multiply by gamma every step_size iterations)."""
    kind = "step"

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1):
        if int(step_size) < 1:
            raise ValueError(f"StepLR: step_size must be >= 1, got {step_size}")
        self.lr, self.step_size, self.gamma = float(lr), int(step_size), float(gamma)

    def __call__(self, it: int) -> float:
        return self.lr * self.gamma ** (it // self.step_size)


_KINDS = {cls.kind: cls for cls in (ConstantLR, WarmupCosineLR, StepLR)}


def schedule_from_state(state: dict) -> _Schedule:
    """Rebuild a schedule from its `state_dict()`."""
    if not isinstance(state, dict) or state.get("kind") not in _KINDS:
        kind = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"schedule_from_state: unknown schedule kind {kind!r}; expected one of {sorted(_KINDS)}")
    cls = _KINDS[state["kind"]]
    settings = {k: v for k, v in state.items() if k != "kind"}
    try:
        return cls(**settings)
    except TypeError as e:
        raise ValueError(f"schedule_from_state: bad settings {settings} for {cls.__name__}: {e}") from None
