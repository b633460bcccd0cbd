"""Stochastic gradient descent with momentum, Nesterov momentum and L2 weight decay (PyTorch's semantics).

Per parameter θ with gradient g_t, learning rate η, momentum μ, dampening τ, weight decay λ:

    d_t = g_t + λ θ_{t-1}                       L2 decay: the gradient of ½λ‖θ‖², added to g
    b_t = d_t                       (t = 1)     momentum buffer ("velocity"), started at the first gradient
    b_t = μ b_{t-1} + (1 − τ) d_t   (t > 1)     a running sum of past gradients
    d_t = d_t + μ b_t   (Nesterov)  or  b_t     Nesterov: step from the look-ahead point
    θ_t = θ_{t-1} − η d_t

This is the form of Sutskever et al. (2013) that PyTorch uses: the lr multiplies the whole buffer, so
changing lr mid-run changes the step at once (in the original form v ← μv − ηg it would lag).
"""
from __future__ import annotations

from typing import Any

from tinygpt.optim.optimizer import Optimizer
from tinygpt.tensor import Tensor

__all__ = ["SGD"]


class SGD(Optimizer):
    """SGD(params, lr, momentum=0, dampening=0, nesterov=False, weight_decay=0); see the module docstring."""

    _state_keys = ("step", "momentum_buffer")
    _lazy_state_keys = ("momentum_buffer",)  # made at the first step, and only when momentum != 0

    def __init__(self, params: Any, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                                      weight_decay=weight_decay))

    def _check_hyperparameters(self, group: dict) -> None:
        """ValueError for a negative momentum or weight decay, or Nesterov without momentum or with dampening."""
        super()._check_hyperparameters(group)
        if not group["momentum"] >= 0.0:
            raise ValueError(f"SGD: momentum must be >= 0, got {group['momentum']}")
        if not group["weight_decay"] >= 0.0:
            raise ValueError(f"SGD: weight_decay must be >= 0, got {group['weight_decay']}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"SGD: nesterov=True needs momentum > 0 and dampening = 0, got momentum="
                             f"{group['momentum']}, dampening={group['dampening']}")

    def _update_param(self, p: Tensor, grad: Any, state: dict, group: dict) -> None:
        """One step of the module docstring's rule, in place on p.data; the buffer b_t lives in `state`."""
        lr, mu = float(group["lr"]), float(group["momentum"])
        tau, wd = float(group["dampening"]), float(group["weight_decay"])
        theta = p.data
        d = grad                                       # d_t = g_t  (p.grad itself: never written to)
        if wd != 0.0:
            d = theta * wd                             # d_t = g_t + λ θ_{t-1}
            d += grad
        if mu != 0.0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = d.copy()  # b_1 = d_1
            else:
                buf *= mu                              # b_t = μ b_{t-1} ...
                if tau == 0.0:
                    buf += d                           #       ... + d_t
                else:
                    buf += (1.0 - tau) * d             #       ... + (1 − τ) d_t
            if group["nesterov"]:
                d = d + mu * buf                       # d_t = d_t + μ b_t
            else:
                d = buf                                # d_t = b_t
        theta -= lr * d                                # θ_t = θ_{t-1} − η d_t
