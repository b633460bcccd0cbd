"""A finite-difference gradient checker: public API, for testing the ops you write.

    tinygpt.gradcheck(lambda x, w: F.linear(x, w), [x, w])    # True, or raises GradcheckError

How: every float input is copied to float64. The output y is reduced to a scalar L = Σ y ⊙ r with a
fixed random r (so every output element counts, and one backward gives every input's gradient).
The analytic gradient is what backward() returns; the numerical one is the central difference

    dL/dx_i ≈ (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)

and they must agree within atol + rtol·|numerical| at every position. That costs two forwards per
element, so for large inputs `mode="random"` checks `n_directions` random directions d instead
(as Chainer's check_backward does): (L(x + eps d) - L(x - eps d)) / (2 eps) against Σ grad ⊙ d.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from tinygpt import backend
from tinygpt.tensor import Tensor, no_grad

__all__ = ["gradcheck", "numerical_grad", "GradcheckError"]


class GradcheckError(AssertionError):
    """The analytic and numerical gradients disagree. The message names the input and position."""


def _float64_inputs(inputs: Sequence[Any]) -> list:
    """Float Tensors and float arrays become float64 leaves requiring grad; the rest pass through."""
    out = []
    for x in inputs:
        if isinstance(x, Tensor) and x.dtype.kind == "f":
            out.append(Tensor(x.data.astype("float64"), requires_grad=True))
        elif isinstance(x, np.ndarray) and x.dtype.kind == "f":
            out.append(Tensor(x.astype(np.float64), requires_grad=True))
        else:
            out.append(x)
    return out


def _scalar_loss(fn: Callable, args: list, r: Any) -> Any:
    """(y, L): y = fn(*args) (a Tensor, TypeError if not) and L = Σ y ⊙ r (None without r)."""
    y = fn(*args)
    if not isinstance(y, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(y).__name__}")
    return y, (y.data * r).sum() if r is not None else None


def numerical_grad(fn: Callable, args: list, index: int, r: Any, eps: float = 1e-6) -> Any:
    """Central-difference dL/dx for input `index`, L = Σ fn(*args) ⊙ r, one element at a time."""
    x = args[index].data
    grad = x.copy()
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    with no_grad():
        for i in range(flat.size):
            old = flat[i].item()
            flat[i] = old + eps
            lp = _scalar_loss(fn, args, r)[1]
            flat[i] = old - eps
            lm = _scalar_loss(fn, args, r)[1]
            flat[i] = old
            gflat[i] = (lp - lm) / (2 * eps)
    return grad


def gradcheck(fn: Callable, inputs: Sequence[Any], eps: float = 1e-6, atol: float = 1e-5,
              rtol: float = 1e-3, mode: str = "full", n_directions: int = 4, seed: int = 0) -> bool:
    """Check fn's backward against finite differences in float64; return True or raise GradcheckError.

    fn: takes the inputs (Tensors, plus any non-float arguments, passed through) and returns a Tensor.
    mode: "full" checks every element of every float input; "random" checks `n_directions` random
    directions through all of them at once (cheap for large inputs).
    """
    if mode not in ("full", "random"):
        raise ValueError(f"gradcheck: mode must be 'full' or 'random', not {mode!r}")
    args = _float64_inputs(inputs)
    checked = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no floating-point Tensor among the inputs to check")
    xp = args[checked[0]].device.xp
    rng = np.random.default_rng(seed)
    y = fn(*args)
    if not isinstance(y, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(y).__name__}")
    r = backend.to_device(rng.standard_normal(y.shape), y.device)   # the output's random weights
    y.backward(r.astype(y.dtype))
    analytic = {i: (args[i].grad if args[i].grad is not None else xp.zeros_like(args[i].data))
                for i in checked}
    if mode == "full":
        for i in checked:
            numeric = numerical_grad(fn, args, i, r, eps)
            _compare(backend.to_numpy(analytic[i]), backend.to_numpy(numeric), i, atol, rtol)
        return True
    for d_i in range(n_directions):
        dirs = {i: backend.to_device(rng.standard_normal(args[i].shape), args[i].device) for i in checked}
        saved = {i: args[i].data for i in checked}
        with no_grad():
            for i in checked:
                args[i].data = saved[i] + eps * dirs[i]
            lp = _scalar_loss(fn, args, r)[1]
            for i in checked:
                args[i].data = saved[i] - eps * dirs[i]
            lm = _scalar_loss(fn, args, r)[1]
        for i in checked:
            args[i].data = saved[i]
        numeric = float((lp - lm) / (2 * eps))
        exact = float(sum((analytic[i] * dirs[i]).sum() for i in checked))
        err = abs(exact - numeric)
        if err > atol + rtol * abs(numeric):
            raise GradcheckError(
                f"gradcheck failed along random direction {d_i}: analytic {exact:.6g}, numerical "
                f"{numeric:.6g}, absolute error {err:.3g}, relative error {err / max(abs(numeric), 1e-30):.3g}")
    return True


def _compare(analytic: np.ndarray, numeric: np.ndarray, index: int, atol: float, rtol: float) -> None:
    """GradcheckError naming the first position of input `index` where |analytic − numeric| >
    atol + rtol · |numeric| (both arrays of the input's shape)."""
    err = np.abs(analytic - numeric)
    bad = err > atol + rtol * np.abs(numeric)
    if bad.any():
        pos = tuple(int(p) for p in np.argwhere(bad)[0])
        e, n = float(err[pos]), float(numeric[pos])
        raise GradcheckError(
            f"gradcheck failed for input {index} at position {pos}: analytic {float(analytic[pos]):.6g}, "
            f"numerical {n:.6g}, absolute error {e:.3g}, relative error {e / max(abs(n), 1e-30):.3g} "
            f"({int(bad.sum())} of {bad.size} positions out of tolerance)")
