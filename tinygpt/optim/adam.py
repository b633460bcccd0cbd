"""Adam (Kingma & Ba 2015, Algorithm 1) with L2 weight decay, and AdamW (Loshchilov & Hutter 2019).

Per parameter θ with gradient g_t at step t = 1, 2, ..., learning rate α, betas β1 β2, ε, weight decay λ:

    g_t ← g_t + λ θ_{t-1}                 Adam's L2 decay: part of the gradient, so m and v see it
    θ_{t-1} ← θ_{t-1} − α λ θ_{t-1}       AdamW's decoupled decay: shrinks θ directly, m and v never see it
    m_t = β1 m_{t-1} + (1 − β1) g_t       first moment: a running mean of the gradient
    v_t = β2 v_{t-1} + (1 − β2) g_t²      second moment: a running mean of its square (elementwise)
    m̂_t = m_t / (1 − β1^t)                bias correction: m_0 = v_0 = 0 make early averages too small
    v̂_t = v_t / (1 − β2^t)
    θ_t = θ_{t-1} − α m̂_t / (√v̂_t + ε)   a step of about α per coordinate, whatever the gradient's scale

Why AdamW: with L2 inside Adam, the decay λθ is divided by √v̂ like the gradient, so weights with large
gradients are barely decayed. Decoupling applies the same relative shrink α·λ to every weight. (The paper
writes θ ← θ − η_t λ θ with a schedule multiplier η_t; PyTorch, and so tinygpt, uses α·λ: the paper's λ is
lr × weight_decay here.)

The last line is computed as PyTorch does, which is algebraically the same:
    denom = √v_t / √(1 − β2^t) + ε;   θ ← θ − (α / (1 − β1^t)) · m_t / denom

Reference first, kernel second: `_update_param` is that math, one parameter at a time, on any device.
`_update_group` hands the parameters a fused kernel can take to it instead (`kernels.fused`: "cpu", all
of them in one blocked, threaded pass, tinygpt/cpu_kernels.py; "cuda", one launch each,
tinygpt/cuda/kernels.py). TINYGPT_KERNELS=reference runs `_update_param` for all (tinygpt/kernels.py).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from tinygpt import cpu_kernels, kernels
from tinygpt.cuda import kernels as cuda_kernels
from tinygpt.optim.optimizer import Optimizer
from tinygpt.tensor import Tensor

__all__ = ["Adam", "AdamW"]


class Adam(Optimizer):
    """Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0): L2 decay added to the gradient."""

    _state_keys = ("step", "exp_avg", "exp_avg_sq")
    decoupled_weight_decay = False

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _check_hyperparameters(self, group: dict) -> None:
        super()._check_hyperparameters(group)
        name = type(self).__name__
        betas = group["betas"]
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"{name}: betas must be two numbers in [0, 1), got {betas}")
        if not group["eps"] >= 0.0:
            raise ValueError(f"{name}: eps must be >= 0, got {group['eps']}")
        if not group["weight_decay"] >= 0.0:
            raise ValueError(f"{name}: weight_decay must be >= 0, got {group['weight_decay']}")

    def _init_state(self, p: Tensor) -> dict:
        xp = p.device.xp
        return {"step": 0,
                "exp_avg": xp.zeros_like(p.data),      # m_0 = 0
                "exp_avg_sq": xp.zeros_like(p.data)}   # v_0 = 0

    def _update_param(self, p: Tensor, grad: Any, state: dict, group: dict) -> None:
        """The reference: the equations of the module docstring, in place, on any device."""
        xp = p.device.xp
        lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        beta1, beta2 = float(group["betas"][0]), float(group["betas"][1])
        t = state["step"]
        theta, m, v = p.data, state["exp_avg"], state["exp_avg_sq"]
        g = grad                                       # p.grad itself: never written to
        if wd != 0.0:
            if self.decoupled_weight_decay:
                theta *= 1.0 - lr * wd                 # AdamW: θ ← θ − α λ θ
            else:
                g = theta * wd                         # Adam + L2: g_t ← g_t + λ θ_{t-1}
                g += grad
        tmp = xp.multiply(g, 1.0 - beta1)              # one scratch array, reused below
        m *= beta1                                     # m_t = β1 m_{t-1} + (1 − β1) g_t
        m += tmp
        xp.multiply(g, g, out=tmp)                     # v_t = β2 v_{t-1} + (1 − β2) g_t²
        tmp *= 1.0 - beta2
        v *= beta2
        v += tmp
        bias_correction1 = 1.0 - beta1 ** t            # 1 − β1^t  (Python floats: no device sync)
        bias_correction2 = 1.0 - beta2 ** t            # 1 − β2^t
        denom = xp.sqrt(v, out=tmp)                    # denom = √v_t / √(1 − β2^t) + ε  (= √v̂_t + ε)
        denom /= math.sqrt(bias_correction2)
        denom += eps
        update = xp.divide(m, denom, out=tmp)          # θ_t = θ_{t-1} − (α / (1 − β1^t)) m_t / denom
        update *= lr / bias_correction1                #     = θ_{t-1} − α m̂_t / (√v̂_t + ε)
        theta -= update

    def _update_group(self, items: list, group: dict) -> None:
        """The same equations as `_update_param`, fused where `kernels.fused` says so: CPU parameters
        (C-contiguous float32) all in one cpu_kernels.adam_step, CUDA ones one kernel launch each."""
        hyper = dict(lr=float(group["lr"]), beta1=float(group["betas"][0]), beta2=float(group["betas"][1]),
                     eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                     decoupled=self.decoupled_weight_decay)
        batches: dict = {"cpu": [], "cuda": []}
        reference = []
        for p, s in items:
            arrays = (p.data, p.grad, s["exp_avg"], s["exp_avg_sq"])
            fused = kernels.fused(p.device, *arrays) if _alike(arrays) else None
            if fused == "cpu" and not (p.data.dtype == np.float32 and _c_contiguous(p.data, *arrays[2:])):
                fused = None                       # the CPU kernel updates float32 blocks of flat views
            if fused:
                batches[fused].append((*arrays, s["step"]))
            else:
                reference.append((p, s))
        if batches["cpu"]:
            cpu_kernels.adam_step(batches["cpu"], **hyper)
        if batches["cuda"]:
            cuda_kernels.adam_step(batches["cuda"], **hyper)
        if reference:
            super()._update_group(reference, group)


def _alike(arrays: tuple) -> bool:
    """θ, its gradient and its state arrays all of one shape and dtype (what the fused kernels take)."""
    return all(a.shape == arrays[0].shape and a.dtype == arrays[0].dtype for a in arrays[1:])


def _c_contiguous(*arrays: Any) -> bool:
    return all(a.flags.c_contiguous for a in arrays)


class AdamW(Adam):
    """AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01): decoupled weight decay.

    Give biases and LayerNorm weights weight_decay=0 with `optim.weight_decay_groups(model, wd)`.
    """

    decoupled_weight_decay = True

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
