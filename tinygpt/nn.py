"""`tinygpt.nn`: Parameter, Module and the layers a GPT is built from.

    model = nn.Sequential(nn.Linear(2, 16), nn.GELU(), nn.Linear(16, 2))
    logits = model(x)                       # (N, 2)
    model.named_parameters()                # ("0.weight", ...), ("0.bias", ...), ("2.weight", ...), ...

A Module is a tree: assigning a Parameter or a Module to an attribute registers it (in `_parameters` or
`_modules`, and as a plain attribute so reading it back is a normal, fast lookup). Names are dotted paths
through the tree, as in PyTorch, so state dicts port: Linear's weight is (out_features, in_features).

Layers call the fused ops of `tinygpt.functional`; they hold parameters, they do no math of their own.
Initialisation (torch's defaults) draws from `backend.host_rng()` (seeded by `tinygpt.manual_seed`) in
float32 on the host, then moves to the layer's device:
    Linear     weight, bias ~ U(-1/√in, 1/√in)     (torch: kaiming_uniform(a=√5) gives the same bound)
    Embedding  weight ~ N(0, 1)
    LayerNorm  weight = 1, bias = 0
"""
from __future__ import annotations

import math
from collections import namedtuple
from typing import Any, Iterable, Iterator

import numpy as np

from tinygpt import backend
from tinygpt import functional as F
from tinygpt.tensor import Tensor, tensor

__all__ = ["Parameter", "Module", "StateDictError", "Linear", "Embedding", "LayerNorm", "Dropout", "ReLU",
           "GELU", "Sequential", "ModuleList"]


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
            object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        self.__dict__["_parameters"].pop(name, None)
        self.__dict__["_modules"].pop(name, None)
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
        """Move every parameter (and its grad) to `device` in place: the Parameter objects stay the same, so
        an optimizer that holds them still works (create its state after moving). Returns self."""
        dev = backend.get_device(device)
        for p in self.parameters():
            if p.device is not dev:
                p.data = backend.to_device(p.data, dev)
                if p.grad is not None:
                    p.grad = backend.to_device(p.grad, dev)
                p.device = dev
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
        """name -> a host NumPy copy of the parameter. Tied parameters appear under every name, like torch.
        On CUDA this copies from the device (a sync): it is meant for checkpoints."""
        out = {}
        for name, p in self.named_parameters(remove_duplicate=False):
            host = backend.to_numpy(p.data)
            out[name] = host.copy() if host is p.data else host
        return out

    def load_state_dict(self, state_dict: dict, strict: bool = True) -> IncompatibleKeys:
        """Copy arrays (NumPy, device arrays or Tensors) into the parameters, in place on their device.

        Everything is checked before anything is written. With strict=True, missing or unexpected keys
        raise StateDictError; with strict=False they are returned as (missing_keys, unexpected_keys).
        Shape and dtype mismatches always raise.
        """
        if not isinstance(state_dict, dict):
            raise StateDictError(f"load_state_dict: expected a dict of name -> array, got "
                                 f"{type(state_dict).__name__}")
        own = dict(self.named_parameters(remove_duplicate=False))
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            parts = ([f"missing keys {missing}"] if missing else []) + (
                [f"unexpected keys {unexpected}"] if unexpected else [])
            raise StateDictError(f"load_state_dict into {type(self).__name__}: {' and '.join(parts)}; "
                                 "check the model config matches the checkpoint, or pass strict=False")
        todo = []
        for name, p in own.items():
            if name not in state_dict:
                continue
            value = state_dict[name]
            value = value.data if isinstance(value, Tensor) else value
            if not hasattr(value, "shape") or not hasattr(value, "dtype"):
                value = np.asarray(value)
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


def _init_param(host: np.ndarray, device: Any) -> Parameter:
    """A float32 host array made into a Parameter on `device` (None: the default device)."""
    return Parameter(tensor(host.astype(np.float32, copy=False), device=device))


# --- layers -------------------------------------------------------------------------------------------------

class Linear(Module):
    """y = x Wᵀ + b: (..., in_features) -> (..., out_features). W is (out_features, in_features) as in torch.

    Init: W, b ~ U(-k, k) with k = 1/√in_features (PyTorch's default).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        rng = backend.host_rng()
        k = 1.0 / math.sqrt(in_features) if in_features > 0 else 0.0
        self.weight = _init_param(rng.uniform(-k, k, (out_features, in_features)), device)
        if bias:
            self.bias = _init_param(rng.uniform(-k, k, (out_features,)), device)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A lookup table: integer ids (...) -> rows of weight (num_embeddings, embedding_dim) -> (..., dim).

    Init: weight ~ N(0, 1) (PyTorch's default; GPT models usually re-init with a smaller std).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, device: Any = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        w = backend.host_rng().standard_normal((num_embeddings, embedding_dim), dtype=np.float32)
        self.weight = _init_param(w, device)

    def forward(self, idx: Any) -> Tensor:
        return F.embedding(idx, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """Normalize the last axis (size `dim`) to mean 0, variance 1, then y = x̂ w + b: (..., dim) -> (..., dim).

    Init: weight = 1, bias = 0. bias=False drops the bias (as nanoGPT's LayerNorm(ndim, bias)).
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, device: Any = None):
        super().__init__()
        self.dim, self.eps = int(dim), float(eps)
        self.weight = _init_param(np.ones(dim, dtype=np.float32), device)
        if bias:
            self.bias = _init_param(np.zeros(dim, dtype=np.float32), device)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"({self.dim},), eps={self.eps}, bias={self.bias is not None}"


class Dropout(Module):
    """While training, zero each element with probability p and scale the rest by 1/(1-p); identity in eval."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ReLU(Module):
    """max(x, 0), elementwise."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


class GELU(Module):
    """x Φ(x), elementwise; approximate="tanh" for GPT-2's tanh form."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', not {approximate!r}")
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}" if self.approximate != "none" else ""


# --- containers ----------------------------------------------------------------------------------------------

class ModuleList(Module):
    """A list of modules, registered as "0", "1", ... so their parameters are found (a plain list hides them)."""

    def __init__(self, modules: Iterable[Module] | None = None):
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def append(self, module: Module) -> ModuleList:
        self.register_module(str(len(self._modules)), module)
        return self

    def extend(self, modules: Iterable[Module]) -> ModuleList:
        for m in modules:
            self.append(m)
        return self

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __getitem__(self, i: int | slice) -> Any:
        items = list(self._modules.values())
        return type(self)(items[i]) if isinstance(i, slice) else items[i]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("ModuleList has no forward(); loop over it: for block in self.blocks: ...")


class Sequential(ModuleList):
    """Modules applied one after another: Sequential(a, b, c)(x) = c(b(a(x)))."""

    def __init__(self, *modules: Module):
        super().__init__(modules)

    def __getitem__(self, i: int | slice) -> Any:
        items = list(self._modules.values())
        return Sequential(*items[i]) if isinstance(i, slice) else items[i]

    def forward(self, x: Any) -> Any:
        for m in self._modules.values():
            x = m(x)
        return x
