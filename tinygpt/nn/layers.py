"""The layers a GPT is built from, and the containers that hold them. Each calls a fused op of
`tinygpt.functional` and does no math of its own; the init of each is in its docstring."""
from __future__ import annotations

import math
from typing import Any, Iterable, Iterator

import numpy as np

from tinygpt import backend
from tinygpt import functional as F
from tinygpt.nn.module import Module, Parameter
from tinygpt.tensor import Tensor, tensor


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
