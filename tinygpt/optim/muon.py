"""Muon: momentum orthogonalized by a Newton–Schulz iteration (Keller Jordan et al., 2024, the optimizer of the
modded-nanogpt speedruns), for the 2-D weight matrices of the hidden layers; AdamW for everything else.

For a hidden weight matrix W (out, in) with gradient G_t at step t, learning rate α, momentum μ, weight decay λ:

    B_t = μ B_{t-1} + G_t                  momentum buffer (B_0 = 0)
    M_t = G_t + μ B_t   (Nesterov)  or B_t the direction to orthogonalize
    O_t = NS5(M_t)                         ≈ U Vᵀ for M_t = U Σ Vᵀ: every singular value pushed to ~1
    W_t = (1 − α λ) W_{t-1} − α · √max(1, out/in) · O_t

NS5 (`newton_schulz`), the quintic iteration X ← a X + (b A + c A²) X with A = X Xᵀ, (a, b, c) = (3.4445,
−4.7750, 2.0315), run 5 times from X_0 = M / (‖M‖_F + 1e-7) (so every singular value starts in (0, 1]);
on the wide orientation (rows ≤ cols, a transpose otherwise) so that A is the smaller Gram matrix. Each
step maps a singular value σ to p(σ) = a σ + b σ³ + c σ⁵; these coefficients make p'(0) = a large (small
values grow fast) and keep p(σ) in about [0.7, 1.2] on the interval, so after 5 steps the singular values
lie near 1 rather than exactly on it (that is enough, and 5 steps are cheap). The update O_t thus moves W
by the same amount along every direction the gradient spans: its rare directions are not drowned out by
its dominant ones, which is what lets Muon take large, well-conditioned steps.

The other parameters (embeddings, the output head, norm gains, biases) are in groups with muon=False and
take AdamW's step (tinygpt/optim/adam.py, the same equations):

    m_t = β1 m_{t-1} + (1 − β1) g_t;  v_t = β2 v_{t-1} + (1 − β2) g_t²
    θ_t = (1 − α' λ) θ_{t-1} − α' (m_t / (1 − β1^t)) / (√(v_t / (1 − β2^t)) + ε)

Every group has the schedule's `lr` (the trainer sets it each step) times its own `lr_scale`, so one
schedule drives both: α = lr · lr_scale of the Muon groups, α' = lr · lr_scale of the AdamW groups.
`muon_groups(model, ...)` builds those groups.
"""
from __future__ import annotations

import math
from typing import Any

from tinygpt import cpu_threads
from tinygpt.optim.adam import Adam
from tinygpt.optim.optimizer import Optimizer
from tinygpt.tensor import Tensor

__all__ = ["Muon", "newton_schulz", "muon_groups", "NS_COEFFICIENTS"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(M: Any, steps: int = 5, eps: float = 1e-7) -> Any:
    """≈ U Vᵀ of M = U Σ Vᵀ (2-D, any device) by `steps` quintic Newton–Schulz iterations (module docstring)."""
    xp = _xp(M)
    a, b, c = NS_COEFFICIENTS
    X = M / (xp.linalg.norm(M) + eps)                 # X_0 = M / ‖M‖_F: singular values in (0, 1]
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T                                        # rows ≤ cols: A = X Xᵀ is the small Gram matrix
    X = xp.ascontiguousarray(X)
    for _ in range(steps):
        A = X @ X.T                                    # A = X Xᵀ
        B = b * A + c * (A @ A)                        # B = b A + c A²
        X = a * X + B @ X                              # X ← a X + B X = a X + b X Xᵀ X + c (X Xᵀ)² X
    return X.T if tall else X


def _xp(a: Any):
    """The array module of `a` (NumPy, or CuPy through the backend seam)."""
    from tinygpt import backend
    return backend.get_array_module(a)


class Muon(Optimizer):
    """Muon(groups, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0, betas=(0.9, 0.95),
    eps=1e-8, lr_scale=1.0, muon=True): Muon on the groups with muon=True (2-D parameters only), AdamW on
    the others (module docstring). `muon_groups(model, ...)` splits a GPT's parameters."""

    _state_keys = ("step", "momentum_buffer", "exp_avg", "exp_avg_sq")
    _lazy_state_keys = ("momentum_buffer", "exp_avg", "exp_avg_sq")     # which ones depends on the group

    def __init__(self, params: Any, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, lr_scale: float = 1.0, muon: bool = True):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                                      lr_scale=lr_scale, muon=muon))

    def _check_hyperparameters(self, group: dict) -> None:
        super()._check_hyperparameters(group)
        if not 0.0 <= group["momentum"] < 1.0:
            raise ValueError(f"Muon: momentum must be in [0, 1), got {group['momentum']}")
        if not (isinstance(group["ns_steps"], int) and group["ns_steps"] >= 1):
            raise ValueError(f"Muon: ns_steps must be a positive integer, got {group['ns_steps']!r}")
        if not group["weight_decay"] >= 0.0 or not group["lr_scale"] >= 0.0:
            raise ValueError("Muon: weight_decay and lr_scale must be >= 0")
        if len(group["betas"]) != 2 or not all(0.0 <= b < 1.0 for b in group["betas"]):
            raise ValueError(f"Muon: betas must be two numbers in [0, 1), got {group['betas']}")

    def add_param_group(self, group: dict) -> None:
        """Optimizer.add_param_group, and a muon=True group (the default) must hold 2-D matrices only."""
        super().add_param_group(group)
        added = self.param_groups[-1]
        bad = [p.shape for p in added["params"] if p.ndim != 2]
        if added["muon"] and bad:
            self.param_groups.pop()
            raise ValueError(f"Muon: a muon=True group takes 2-D weight matrices only, got shapes {bad}; "
                             "put the others in a group with muon=False (AdamW)")

    def _init_state(self, p: Tensor) -> dict:
        return {"step": 0}

    def step(self, closure: Any = None) -> Any:
        """Optimizer.step with single-threaded BLAS on the CPU: the Newton–Schulz products are small (C × C
        to C × 4C), and BLAS threads spinning beside the data-parallel workers or other jobs cost more than
        they save (measured: 0.1 s single-threaded against 0.4-7 s with 2 threads on a busy 2-core box)."""
        limit = cpu_threads.blas_single_thread()
        try:
            return super().step(closure)
        finally:
            if limit is not None:
                limit.restore_original_limits()

    def _update_param(self, p: Tensor, grad: Any, state: dict, group: dict) -> None:
        lr = float(group["lr"]) * float(group["lr_scale"])
        if not group["muon"]:
            adam_state = state
            if "exp_avg" not in state:
                xp = p.device.xp
                state["exp_avg"], state["exp_avg_sq"] = xp.zeros_like(p.data), xp.zeros_like(p.data)
            _ADAMW._update_param(p, grad, adam_state, {**group, "lr": lr})   # AdamW's equations, adam.py
            return
        self._apply(p, newton_schulz(self._direction(p, grad, state, group), int(group["ns_steps"])), group)

    @staticmethod
    def _direction(p: Tensor, grad: Any, state: dict, group: dict) -> Any:
        """Update the momentum buffer and return M_t, the matrix to orthogonalize."""
        mu = float(group["momentum"])
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = p.device.xp.zeros_like(p.data)  # B_0 = 0
        buf *= mu                                       # B_t = μ B_{t-1} + G_t
        buf += grad
        return grad + mu * buf if group["nesterov"] else buf   # M_t = G_t + μ B_t  (Nesterov) or B_t

    @staticmethod
    def _apply(p: Tensor, o: Any, group: dict) -> None:
        """W_t = (1 − α λ) W_{t-1} − α √max(1, out/in) O_t, with O_t = NS5(M_t)."""
        lr = float(group["lr"]) * float(group["lr_scale"])
        wd = float(group["weight_decay"])
        theta = p.data
        if wd != 0.0:
            theta *= 1.0 - lr * wd                      # decoupled decay: W ← (1 − α λ) W
        rows, cols = theta.shape
        theta -= (lr * math.sqrt(max(1.0, rows / cols))) * o.astype(theta.dtype, copy=False)   # W −= α √(out/in) O

    def _update_group(self, items: list, group: dict) -> None:
        """The same math as `_update_param`; for a Muon group of CPU matrices the Newton–Schulz iterations
        (the costly part: ~25 ms a step for the cpu preset's 16 matrices on one core) run on the CPU's
        thread team (tinygpt/cpu_threads.py), each matrix on one thread with single-threaded BLAS (NumPy
        releases the GIL in matmul). Data-parallel workers sit idle during the optimizer step, so this uses
        their cores. Each matrix's result is the same as `_update_param`'s, bit for bit."""
        if not group["muon"] or cpu_threads.num_threads() < 2 or any(p.device.name != "cpu" for p, _ in items):
            return super()._update_group(items, group)
        directions = [self._direction(p, p.grad, s, group) for p, s in items]
        steps = int(group["ns_steps"])
        done: dict = {}

        def orthogonalize(i: int):
            return lambda: done.__setitem__(i, newton_schulz(directions[i], steps))

        # the team cuts the list into contiguous shares: sizes dealt in turn (largest first) balance them
        by_size = sorted(range(len(items)), key=lambda i: -directions[i].size)
        threads = cpu_threads.num_threads()
        cpu_threads.run([orthogonalize(i) for k in range(threads) for i in by_size[k::threads]])
        for i, (p, _) in enumerate(items):
            self._apply(p, done[i], group)


class _AdamWRule(Adam):
    """AdamW's `_update_param` (decoupled decay), borrowed by Muon for its muon=False groups."""
    decoupled_weight_decay = True

    def __init__(self) -> None:      # no parameters of its own: only the update rule is used
        pass


_ADAMW = _AdamWRule()


def muon_groups(model: Any, muon_lr_scale: float, adam_lr_scale: float = 1.0, weight_decay: float = 0.0,
                muon_weight_decay: float = 0.0) -> list[dict]:
    """A GPT's parameters as Muon's groups: the 2-D weights inside the transformer blocks (`transformer.h.*`:
    q/k/v, attention and MLP projections) with muon=True; the embeddings and the output head (AdamW, decayed
    by weight_decay) and the 1-D gains and biases (AdamW, no decay) with muon=False. Shared parameters (a
    tied head) are listed once."""
    seen: set[int] = set()
    hidden, embed, flat = [], [], []
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if p.ndim == 2 and name.startswith("transformer.h."):
            hidden.append(p)
        elif p.ndim >= 2:
            embed.append(p)
        else:
            flat.append(p)
    groups = [{"params": hidden, "muon": True, "lr_scale": float(muon_lr_scale),
               "weight_decay": float(muon_weight_decay)},
              {"params": embed, "muon": False, "lr_scale": float(adam_lr_scale), "weight_decay": float(weight_decay)},
              {"params": flat, "muon": False, "lr_scale": float(adam_lr_scale), "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
