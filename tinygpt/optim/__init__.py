"""`tinygpt.optim`: optimizers that update parameters in place, with their update rules written out.

    opt = optim.AdamW(optim.weight_decay_groups(model, 0.1), lr=3e-4, betas=(0.9, 0.95))
    loss.backward()
    optim.clip_grad_norm_(model.parameters(), 1.0)
    opt.step(); opt.zero_grad()

Read sgd.py and adam.py for the math; optimizer.py for param groups and state dicts; schedules.py for the
learning-rate schedules; utils.py for clipping and weight-decay groups.
"""
from tinygpt.optim.optimizer import Optimizer, OptimizerStateError  # noqa: F401
from tinygpt.optim.sgd import SGD  # noqa: F401
from tinygpt.optim.adam import Adam, AdamW  # noqa: F401
from tinygpt.optim.muon import Muon, muon_groups, newton_schulz  # noqa: F401
from tinygpt.optim.utils import clip_grad_norm_, weight_decay_groups  # noqa: F401
from tinygpt.optim.schedules import ConstantLR, StepLR, WarmupCosineLR, schedule_from_state  # noqa: F401

__all__ = ["Optimizer", "OptimizerStateError", "SGD", "Adam", "AdamW", "Muon", "muon_groups", "newton_schulz", "clip_grad_norm_",
           "weight_decay_groups", "ConstantLR", "WarmupCosineLR", "StepLR", "schedule_from_state"]
