"""Parameter and Module: the tree of named weights that every layer and model is (see tinygpt/nn/__init__.py)."""
from __future__ import annotations

from collections import namedtuple
from typing import Any, Iterator

import numpy as np

from tinygpt import backend
from tinygpt.tensor import Tensor, tensor


class Parameter(Tensor):
    """A Tensor that is a trainable weight: it requires grad, and a Module that holds it registers it.

    `data`: a Tensor (its array is shared, its dtype kept), or an array/list (floats become float32, as in
    `tinygpt.tensor`, on the default device).
    """
    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True):
        arr = data.data if isinstance(data, Tensor) else tensor(data).data
        super().__init__(arr, requires_grad=requires_grad)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


class StateDictError(ValueError):
    """A state dict that does not fit the module: missing or unexpected keys, wrong shapes or dtypes."""


IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def _common_prefix(missing: list, unexpected: list) -> str | None:
    """"model." when every unexpected key is "model." + a missing key (a wrapper's names), else None."""
    if not missing or len(missing) != len(unexpected):
        return None
    u = sorted(unexpected, key=len)[0]
    prefixes = {u[:-len(m)] for m in missing if u.endswith("." + m)}
    for prefix in prefixes:
        if sorted(prefix + m for m in missing) == sorted(unexpected):
            return prefix
    return None


class Module:
    """Base class of every layer and model. Subclasses set attributes in `__init__` and define `forward`.

        class MLP(nn.Module):
            def __init__(self):
                super().__init__()              # must come first: it makes the registries
                self.fc = nn.Linear(4, 8)       # registered as a sub-module "fc"
            def forward(self, x):
                return F.relu(self.fc(x))
    """

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", {})   # name -> Parameter | None
        object.__setattr__(self, "_modules", {})      # name -> Module | None
        object.__setattr__(self, "_buffers", {})      # name -> Tensor | None: state that is not trained
        object.__setattr__(self, "_non_persistent", set())   # buffer names left out of state_dict
        object.__setattr__(self, "training", True)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no forward(); define forward(self, ...)")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)  # no hooks: this is on the hot path

    # --- registration -------------------------------------------------------------------------------
    def _registries(self) -> tuple[dict, dict]:
        params = self.__dict__.get("_parameters")
        if params is None:
            raise AttributeError(f"{type(self).__name__}: call super().__init__() at the start of __init__, "
                                 "before assigning parameters or sub-modules")
        return params, self.__dict__["_modules"]

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Register `param` (or None: a slot with no parameter, like a Linear without bias) as `name`."""
        params, modules = self._registries()
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"cannot register a {type(param).__name__} as parameter {name!r}: "
                            "wrap it in nn.Parameter(...) (or assign None)")
        modules.pop(name, None)
        params[name] = param
        object.__setattr__(self, name, param)

    def register_module(self, name: str, module: Module | None) -> None:
        """Register a sub-module `module` (or None) as `name`; its parameters get the prefix `name.`."""
        params, modules = self._registries()
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"cannot register a {type(module).__name__} as sub-module {name!r}: "
                            "it is not an nn.Module")
        params.pop(name, None)
        modules[name] = module
        object.__setattr__(self, name, module)

    add_module = register_module

    def register_buffer(self, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        """Keep `tensor` as state that is not a parameter: it moves with .to(), is saved in state_dict
        (unless persistent=False), and no optimizer sees it, e.g. the causal mask
        self.register_buffer("tril", tinygpt.tril(tinygpt.ones(T, T)))."""
        self._registries()
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(f"cannot register a {type(tensor).__name__} as buffer {name!r}: it must be a Tensor "
                            "(or None)")
        if isinstance(tensor, Parameter):
            raise TypeError(f"buffer {name!r} is a Parameter: register it with register_parameter instead")
        self.__dict__["_parameters"].pop(name, None)
        self.__dict__["_modules"].pop(name, None)
        self.__dict__["_buffers"][name] = tensor
        if persistent:
            self.__dict__["_non_persistent"].discard(name)
        else:
            self.__dict__["_non_persistent"].add(name)
        object.__setattr__(self, name, tensor)

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, Parameter):
            self.register_parameter(name, value)
        elif isinstance(value, Module):
            self.register_module(name, value)
        else:
            params, modules = self._registries()
            if name in params and value is not None:
                raise TypeError(f"cannot assign a {type(value).__name__} to parameter {name!r}: "
                                "assign an nn.Parameter or None (to change the values, write to .data)")
            if name in modules and value is not None:
                raise TypeError(f"cannot assign a {type(value).__name__} to sub-module {name!r}: "
                                "assign an nn.Module or None")
            if name in params:
                params[name] = None
            elif name in modules:
                modules[name] = None
            elif name in self.__dict__.get("_buffers", ()):
                if value is not None and not isinstance(value, Tensor):
                    raise TypeError(f"cannot assign a {type(value).__name__} to buffer {name!r}: assign a Tensor "
                                    "or None")
                self.__dict__["_buffers"][name] = value
            object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        self.__dict__["_parameters"].pop(name, None)
        self.__dict__["_modules"].pop(name, None)
        self.__dict__.get("_buffers", {}).pop(name, None)
        object.__delattr__(self, name)

    # --- walking the tree -----------------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, m in self._modules.items():
            if m is not None:
                yield name, m

    def children(self) -> Iterator[Module]:
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix: str = "", remove_duplicate: bool = True,
                      _memo: set | None = None) -> Iterator[tuple[str, Module]]:
        """This module (named `prefix`) and every sub-module below it, depth first, with dotted names."""
        if _memo is None:
            _memo = set()
        if remove_duplicate:
            if id(self) in _memo:
                return
            _memo.add(id(self))
        yield prefix, self
        for name, m in self.named_children():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name, remove_duplicate, _memo)

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "", remove_duplicate: bool = True
                         ) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, Parameter) pairs. A parameter shared by two modules (tied weights) comes once,
        under its first name, unless remove_duplicate=False."""
        seen: set[int] = set()
        for mod_name, m in self.named_modules(prefix, remove_duplicate):
            for name, p in m._parameters.items():
                if p is None:
                    continue
                if remove_duplicate:
                    if id(p) in seen:
                        continue
                    seen.add(id(p))
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self) -> Iterator[Parameter]:
        """Every parameter once (shared ones too), in registration order: what an optimizer takes."""
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
        """(dotted name, buffer) pairs for this module and every sub-module."""
        for mod_name, m in self.named_modules(prefix):
            for name, b in m.__dict__.get("_buffers", {}).items():
                if b is not None:
                    yield (f"{mod_name}.{name}" if mod_name else name), b

    def buffers(self) -> Iterator[Tensor]:
        for _, b in self.named_buffers():
            yield b

    def num_parameters(self) -> int:
        """The number of scalars in the unique parameters (a tied weight counts once)."""
        return sum(p.size for p in self.parameters())

    def apply(self, fn: Any) -> Module:
        """Call fn(m) on every sub-module, then on self (as torch does; used for custom init)."""
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    # --- modes, devices, gradients ------------------------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        """Set `.training` on this module and all below it (Dropout reads it). Returns self."""
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> Module:
        return self.train(False)

    def to(self, device: Any) -> Module:
        """Move every parameter (and its grad) and every buffer to `device` in place: the Parameter objects
        stay the same, so an optimizer that holds them still works (create its state after moving).
        Returns self."""
        dev = backend.get_device(device)
        for p in self.parameters():
            if p.device is not dev:
                p.data = backend.to_device(p.data, dev)
                if p.grad is not None:
                    p.grad = backend.to_device(p.grad, dev)
                p.device = dev
        for m in self.modules():
            for name, b in list(m.__dict__.get("_buffers", {}).items()):
                if b is not None and b.device is not dev:
                    setattr(m, name, b.to(dev))
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients: .grad = None (the default), or fill them with zeros in place."""
        for p in self.parameters():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad[...] = 0

    # --- state dicts ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """name -> a host NumPy copy of each parameter and persistent buffer. Tied parameters appear under
        every name, like torch. On CUDA this copies from the device (a sync): it is meant for checkpoints."""
        out = {}
        for name, t in self._state_items():
            host = backend.to_numpy(t.data)
            out[name] = host.copy() if host is t.data else host
        return out

    def _state_items(self) -> list[tuple[str, Tensor]]:
        """What state_dict holds: every parameter (under each of its names), then the persistent buffers."""
        items = list(self.named_parameters(remove_duplicate=False))
        for mod_name, m in self.named_modules():
            skip = m.__dict__.get("_non_persistent", ())
            for name, b in m.__dict__.get("_buffers", {}).items():
                if b is not None and name not in skip:
                    items.append(((f"{mod_name}.{name}" if mod_name else name), b))
        return items

    def load_state_dict(self, state_dict: dict, strict: bool = True) -> IncompatibleKeys:
        """Copy arrays (NumPy, device arrays or Tensors) into the parameters, in place on their device.

        Everything is checked before anything is written. With strict=True, missing or unexpected keys
        raise StateDictError; with strict=False they are returned as (missing_keys, unexpected_keys).
        Shape and dtype mismatches always raise.
        """
        if not isinstance(state_dict, dict):
            raise StateDictError(f"load_state_dict: expected a dict of name -> array, got "
                                 f"{type(state_dict).__name__}")
        bad_keys = [k for k in state_dict if not isinstance(k, str)]
        if bad_keys:
            raise StateDictError(f"load_state_dict: keys must be parameter names (str), got {bad_keys[0]!r} "
                                 f"of type {type(bad_keys[0]).__name__}")
        own = dict(self._state_items())
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            def few(keys: list) -> str:                    # a GPT has hundreds: name a few and count
                return f"{keys[:4]}" + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            parts = ([f"missing keys {few(missing)}"] if missing else []) + (
                [f"unexpected keys {few(unexpected)}"] if unexpected else [])
            hint = "check the model config matches the checkpoint, or pass strict=False"
            prefix = _common_prefix(missing, unexpected)
            if prefix:
                hint = f"the state dict's names carry an extra prefix {prefix!r}: strip it from every key"
            raise StateDictError(f"load_state_dict into {type(self).__name__}: {' and '.join(parts)}; {hint}")
        todo = []
        for name, p in own.items():
            if name not in state_dict:
                continue
            value = state_dict[name]
            value = value.data if isinstance(value, Tensor) else value
            if not hasattr(value, "shape") or not hasattr(value, "dtype"):
                try:
                    value = np.asarray(value)
                except (ValueError, TypeError) as e:       # e.g. a ragged nested list
                    raise StateDictError(f"load_state_dict: {name!r} is a {type(state_dict[name]).__name__} "
                                         f"that is not an array ({' '.join(str(e).split())})") from None
            if getattr(value.dtype, "kind", "O") not in "fiub":
                given = state_dict[name]
                what = "None" if given is None else f"a {type(given).__name__} of {value.dtype} values"
                raise StateDictError(f"load_state_dict: {name!r} is {what}, not numbers; pass an array of "
                                     f"{p.dtype} with shape {p.shape}")
            if tuple(value.shape) != p.shape:
                raise StateDictError(f"load_state_dict: {name!r} has shape {tuple(value.shape)} in the state "
                                     f"dict but the parameter has shape {p.shape}; check the model config")
            if value.dtype != p.dtype:
                raise StateDictError(f"load_state_dict: {name!r} has dtype {value.dtype} in the state dict but "
                                     f"the parameter is {p.dtype}; cast it with .astype({str(p.dtype)!r})")
            todo.append((p, value))
        for p, value in todo:
            p.data[...] = backend.to_device(value, p.device)  # in place: optimizers keep their view
        return IncompatibleKeys(missing, unexpected)

    # --- printing ---------------------------------------------------------------------------------------
    def extra_repr(self) -> str:
        """The text inside this module's parentheses, e.g. "in_features=2, out_features=16, bias=True"."""
        return ""

    def __repr__(self) -> str:
        lines = []
        for name, m in self._modules.items():
            child = repr(m).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child}")
        extra = self.extra_repr()
        if not lines:
            return f"{type(self).__name__}({extra})"
        head = f"{type(self).__name__}({extra}" if extra else f"{type(self).__name__}("
        return head + "\n" + "\n".join(lines) + "\n)"
