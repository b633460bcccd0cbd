"""`Optimizer`: the base class. It holds parameter groups and per-parameter state, and saves/loads both.

    opt = AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=3e-4)
    loss.backward(); opt.step(); opt.zero_grad()

`step()` walks every parameter that has a gradient and calls the subclass's `_update_param(p, grad, state,
group)`: the one place where an update rule is written out (see sgd.py, adam.py). Updates happen in place
on `p.data`, on the parameter's own device, with hyperparameters as Python floats, so nothing waits for
the device and float32 stays float32 (NumPy 2 keeps Python scalars "weak").

state_dict() has torch's layout, with host NumPy arrays:
    {"state": {0: {"step": 12, "exp_avg": array, "exp_avg_sq": array}, ...},       # by parameter index
     "param_groups": [{"lr": 3e-4, "weight_decay": 0.1, ..., "params": [0, 1, 2]}, ...]}
A parameter's index counts through the groups in order, so it fits any optimizer built the same way.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from tinygpt import backend
from tinygpt.tensor import Tensor

__all__ = ["Optimizer", "OptimizerStateError"]


class OptimizerStateError(ValueError):
    """An optimizer state dict that does not fit this optimizer's parameter groups."""


class Optimizer:
    """Base class: `params_or_groups` is an iterable of Tensors, or of dicts {"params": [...], "lr": ...}
    (each group may override any default, e.g. its own lr and weight_decay)."""

    _state_keys: tuple[str, ...] = ("step",)  # what a subclass keeps per parameter (checked on load)
    _lazy_state_keys: tuple[str, ...] = ()     # of those, the ones made later than the first step

    def __init__(self, params_or_groups: Any, defaults: dict):
        self.defaults = dict(defaults)
        self.state: dict[Tensor, dict] = {}       # parameter -> {"step": int, arrays...}
        self.param_groups: list[dict] = []
        if isinstance(params_or_groups, (Tensor, dict)):
            params_or_groups = [params_or_groups]
        groups = list(params_or_groups)
        if not groups:
            raise ValueError(f"{type(self).__name__} got an empty parameter list; pass model.parameters()")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group: dict) -> None:
        """Add a group {"params": [...], hyperparameter: value, ...}; missing hyperparameters take the
        optimizer's defaults."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"{type(self).__name__}: a parameter group must be a dict with a 'params' key, "
                            f"got {type(group).__name__}")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"{type(self).__name__}: parameter {i} of group {len(self.param_groups)} is a "
                                f"{type(p).__name__}, not a Tensor; pass model.parameters()")
            if not p.requires_grad or not p.is_leaf:
                raise ValueError(f"{type(self).__name__}: parameter {i} (shape {p.shape}) is not a leaf that "
                                 "requires grad; optimize nn.Parameters or tensors made with requires_grad=True")
            if id(p) in seen:
                raise ValueError(f"{type(self).__name__}: parameter {i} (shape {p.shape}) appears twice "
                                 "(within or across groups); give each parameter to one group once")
            seen.add(id(p))
        unknown = [k for k in group if k != "params" and k not in self.defaults]
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown hyperparameters {unknown} in a parameter group; "
                             f"known: {sorted(self.defaults)}")
        full = {**self.defaults, **{k: v for k, v in group.items() if k != "params"}}
        self._check_hyperparameters(full)
        self.param_groups.append({"params": params, **full})

    def _check_hyperparameters(self, group: dict) -> None:
        """Subclasses raise ValueError for an out-of-range value (negative lr, beta outside [0, 1), ...)."""
        if not group["lr"] >= 0.0:
            raise ValueError(f"{type(self).__name__}: lr must be >= 0, got {group['lr']}")

    # --- the step -----------------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a .grad (those with grad None are skipped, as in torch).

        `closure` (optional) re-evaluates the loss and calls backward; its result is returned.
        """
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            items = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.get(p)
                if state is None:
                    state = self.state[p] = self._init_state(p)
                state["step"] += 1                                   # t ← t + 1 (a host int: no sync)
                items.append((p, state))
            self._update_group(items, group)
        return loss

    def _update_group(self, items: list, group: dict) -> None:
        """Update one group's (param, state) pairs; a subclass may fuse them into one kernel."""
        for p, state in items:
            self._update_param(p, p.grad, state, group)

    def _init_state(self, p: Tensor) -> dict:
        """The state of a parameter before its first update."""
        return {"step": 0}

    def _update_param(self, p: Tensor, grad: Any, state: dict, group: dict) -> None:
        """Apply the update rule to one parameter, in place on p.data. `state["step"]` is already t."""
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients of all parameters: .grad = None (default) or zeros in place."""
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad[...] = 0

    # --- saving and resuming -----------------------------------------------------------------------------
    def _all_params(self) -> list[Tensor]:
        """Every parameter, group by group: a parameter's index in state_dict() is its place here."""
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """{"state": {index: {name: int | host array}}, "param_groups": [{hyperparameters, "params": [index]}]}.

        Arrays are host NumPy copies (a device sync on CUDA: this is for checkpoints)."""
        index = {id(p): i for i, p in enumerate(self._all_params())}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[id(p)] for p in g["params"]]}
                  for g in self.param_groups]
        state = {}
        for p, s in self.state.items():
            packed = {}
            for k, v in s.items():
                if isinstance(v, (int, float, bool)) or v is None:
                    packed[k] = v
                else:
                    host = backend.to_numpy(v)
                    packed[k] = host.copy() if host is v else host
            state[index[id(p)]] = packed
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyperparameters, moments and step counts saved by `state_dict()`, so a resumed run goes
        on exactly as the saved one would have. Arrays are copied onto each parameter's device.

        Raises OptimizerStateError when the saved groups or shapes do not fit this optimizer's parameters.
        """
        name = type(self).__name__
        if not isinstance(state_dict, dict) or set(state_dict) != {"state", "param_groups"}:
            got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise OptimizerStateError(f"{name}.load_state_dict: expected a dict with keys 'state' and "
                                      f"'param_groups' (from optimizer.state_dict()), got {got}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise OptimizerStateError(f"{name}.load_state_dict: the state has {len(saved_groups)} parameter "
                                      f"groups but this optimizer has {len(self.param_groups)}; build the "
                                      "optimizer with the same groups as the run that saved it")
        for i, (saved, own) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(own["params"]):
                raise OptimizerStateError(f"{name}.load_state_dict: group {i} has {len(saved['params'])} "
                                          f"parameters in the state but {len(own['params'])} here; build the "
                                          "optimizer from the same model and grouping")
            unknown = [k for k in saved if k != "params" and k not in self.defaults]
            if unknown:
                raise OptimizerStateError(f"{name}.load_state_dict: group {i} has hyperparameters {unknown} "
                                          f"that {name} does not use; was it saved by another optimizer?")
        # saved index -> our parameter, group by group (the saved indices may be renumbered)
        params: dict[int, Tensor] = {}
        for saved, own in zip(saved_groups, self.param_groups):
            params.update({int(i): p for i, p in zip(saved["params"], own["params"])})
        new_state: dict[Tensor, dict] = {}
        for key, saved_state in state_dict["state"].items():
            if int(key) not in params:
                raise OptimizerStateError(f"{name}.load_state_dict: the state names parameter {key}, which "
                                          f"no group lists (there are {len(params)} parameters)")
            p = params[int(key)]
            new_state[p] = self._load_param_state(int(key), p, saved_state)
        # everything checked: now replace
        for saved, own in zip(saved_groups, self.param_groups):
            for k, v in saved.items():
                if k != "params":
                    own[k] = tuple(v) if isinstance(v, list) else v  # JSON turns tuples (betas) into lists
        self.state = new_state

    def _load_param_state(self, index: int, p: Tensor, saved: dict) -> dict:
        """Parameter `index`'s saved state, checked (its keys, each array's shape == p.shape) and copied onto
        p's device in p's dtype; OptimizerStateError names what does not fit."""
        name, out = type(self).__name__, {}
        for k, v in saved.items():
            if k not in self._state_keys:
                raise OptimizerStateError(f"{name}.load_state_dict: the state of parameter {index} has "
                                          f"{k!r}, which {name} does not keep (it keeps {list(self._state_keys)}); "
                                          "was it saved by another optimizer?")
            if k == "step":
                out[k] = int(v)
                continue
            if v is None:
                out[k] = None
                continue
            arr = v.data if isinstance(v, Tensor) else v
            if not hasattr(arr, "shape"):
                arr = np.asarray(arr)
            if tuple(arr.shape) != p.shape:
                raise OptimizerStateError(f"{name}.load_state_dict: {k!r} of parameter {index} has shape "
                                          f"{tuple(arr.shape)} but the parameter has shape {p.shape}; the "
                                          "parameter order or the model config differs from the saved run")
            dev_arr = backend.to_device(arr, p.device)
            if dev_arr is arr or dev_arr.dtype != p.dtype:   # never alias the caller's arrays
                dev_arr = dev_arr.astype(p.dtype, copy=True)
            out[k] = dev_arr
        missing = [k for k in self._state_keys if k not in out and k not in self._lazy_state_keys]
        if missing:
            raise OptimizerStateError(f"{name}.load_state_dict: the state of parameter {index} lacks {missing}; "
                                      "was it saved by another optimizer?")
        return out

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, g in enumerate(self.param_groups):
            hp = ", ".join(f"{k}={v}" for k, v in g.items() if k != "params")
            lines.append(f"  group {i}: {len(g['params'])} params, {hp}")
        return "\n".join(lines) + "\n)"
