"""Tensor: an array, the gradient that backward() leaves on it, and the node that made it.

    t = tinygpt.tensor([1.0, 2.0], requires_grad=True)    # float32 by default
    y = (t * t).sum(); y.backward(); t.grad                 # -> array([2., 4.], dtype=float32)

`backward()` walks the graph of Function nodes in reverse topological order (an iterative sort, so a
40,000-op chain needs no recursion), sums the gradients that reach a node from each of its uses, adds
leaf gradients into `.grad` (they accumulate across calls, as in PyTorch), and frees every node's
saved arrays unless `retain_graph=True`.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Iterator

import numpy as np

from tinygpt import autograd, backend, cpu_threads

_state = threading.local()
_allocator_tuned = False


def _tune_allocator_once() -> None:
    """At the first backward() of a process a training loop has begun: from then on glibc keeps each step's
    freed blocks for the next step (backend.tune_allocator, as `tinygpt train` does; a learner's own loop
    gets it too: 10-17% faster steps at the cpu size, BENCHMARKS.md). TINYGPT_NO_MALLOPT=1 skips it."""
    global _allocator_tuned
    if not _allocator_tuned:
        _allocator_tuned = True
        backend.tune_allocator()


def is_grad_enabled() -> bool:
    return getattr(_state, "grad_enabled", True)


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Within this block ops record no graph: for evaluation and sampling."""
    prev = is_grad_enabled()
    _state.grad_enabled = False
    try:
        yield
    finally:
        _state.grad_enabled = prev


def _to_array(data: Any, device: backend.Device, dtype: Any) -> Any:
    """Make a backend array on `device`. Floats become float32 unless `dtype` says otherwise."""
    if isinstance(data, Tensor):
        data = data.data
    src = backend.device_of(data)
    if src.name != "cpu" or isinstance(data, np.ndarray):
        arr = data if src is device else backend.to_device(data, device)
    else:
        arr = np.asarray(data)  # lists, Python and NumPy scalars
        if device.name != "cpu":
            arr = backend.to_device(arr, device)
    if dtype is not None:
        dtype = np.dtype(dtype)
    elif arr.dtype.kind == "f" and arr.dtype != np.float16:
        dtype = np.dtype(np.float32)
    elif arr.dtype.kind not in "fiub":
        raise TypeError(f"tinygpt.tensor: cannot make a tensor from dtype {arr.dtype}; "
                        "give numbers, bools or a numeric array")
    if dtype is not None and arr.dtype != dtype:
        arr = arr.astype(dtype)
    return arr


def tensor(data: Any, requires_grad: bool = False, device: Any = None, dtype: Any = None) -> "Tensor":
    """Make a Tensor from a list, scalar, NumPy/CuPy array or Tensor.

    Floats default to float32 (also float64 NumPy input); ints and bools keep their dtype.
    `device` defaults to the array's own device for device arrays, else to backend.default_device().
    Like torch.tensor, the result owns its data: an array that would otherwise be shared is copied.
    """
    raw = data.data if isinstance(data, Tensor) else data
    if device is None and backend.device_of(raw).name != "cpu":
        dev = backend.device_of(raw)
    else:
        dev = backend.get_device(device)
    arr = _to_array(data, dev, dtype)
    if arr is raw:
        arr = arr.copy()
    return Tensor(arr, requires_grad=requires_grad)


class Tensor:
    __slots__ = ("data", "grad", "requires_grad", "_ctx", "device", "__weakref__")
    # NumPy arrays and scalars on the left (np.float64(2) * t, np.ones(3) + t) return NotImplemented,
    # so Python calls t.__rmul__ / t.__radd__ instead of NumPy building an object array of Tensors.
    __array_ufunc__ = None

    def __init__(self, data: Any, requires_grad: bool = False):
        dev = backend.device_of(data)
        if not isinstance(data, dev.array_type):
            data = _to_array(data, dev, None)
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require grad, not {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx = None
        self.device = dev

    @classmethod
    def _make(cls, data: Any, device: backend.Device, ctx: Any) -> "Tensor":
        """Wrap an op's output array without any checks (the hot path)."""
        t = cls.__new__(cls)
        t.data, t.grad, t._ctx, t.device = data, None, ctx, device
        t.requires_grad = ctx is not None
        return t

    # --- facts ----------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        """As torch prints: tensor([[1., 2.]], grad_fn=<MatMul>), dtype shown unless float32/int64/bool."""
        arr = backend.to_numpy(self.data)
        whole = arr.dtype.kind != "f" or not arr.size or bool(np.all(np.mod(arr[np.isfinite(arr)], 1) == 0))
        body = np.array2string(arr, separator=", ", prefix="tensor(", threshold=1000, edgeitems=3,
                               precision=4, floatmode="maxprec" if whole else "fixed")
        extras = [f"device={self.device.name!r}"] if self.device.name != "cpu" else []
        if arr.dtype not in (np.float32, np.int64, np.bool_):
            extras.append(f"dtype={arr.dtype}")
        if self._ctx is not None:
            extras.append(f"grad_fn=<{type(self._ctx).__name__}>")
        elif self.requires_grad:
            extras.append("requires_grad=True")
        return "tensor(" + ", ".join([body] + extras) + ")"

    # --- moving and detaching ---------------------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """A host NumPy array (a copy from the device; the same array on the CPU)."""
        return backend.to_numpy(self.data)

    def item(self) -> Any:
        """The one value as a Python number. On CUDA this waits for the device."""
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, this one has shape {self.shape}")
        return self.numpy().reshape(()).item()

    def tolist(self) -> Any:
        return self.numpy().tolist()

    def to(self, device: Any = None, dtype: Any = None) -> "Tensor":
        """This tensor on `device` ("cpu" or "cuda") and/or as `dtype`: t.to("cuda"), t.to(tinygpt.float),
        t.to(device, dtype=...). Itself when nothing changes; moving makes a new leaf; a cast stays on the
        graph."""
        if dtype is None and device is not None and _is_dtype(device):
            device, dtype = None, device
        out = self
        if device is not None:
            dev = backend.get_device(device)
            if dev is not self.device:
                out = Tensor(backend.to_device(self.data, dev), requires_grad=self.requires_grad)
        if dtype is not None and np.dtype(dtype) != out.dtype:
            out = ops.cast(out, dtype)
        return out

    def cpu(self) -> "Tensor":
        return self.to("cpu")

    def detach(self) -> "Tensor":
        """The same data, cut off from the graph."""
        return Tensor._make(self.data, self.device, None)

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        if flag and self.data.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require grad, not {self.dtype}")
        self.requires_grad = bool(flag)
        return self

    def zero_grad(self) -> None:
        self.grad = None

    # --- backward ---------------------------------------------------------------------------------
    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's `.grad` that requires grad: the chain rule, node
        by node from `self` back to the leaves (the bookkeeping is in tinygpt/autograd.py).

        `grad` is d(loss)/d(self); it defaults to 1 for a one-element tensor.
        """
        _tune_allocator_once()
        grad = self._seed_grad(grad)
        root = self._ctx if self._ctx is not None else self
        grads = autograd.Gradients(root, grad)     # node -> dL/d(node's output), summed over its uses
        handed = {id(grad)}                         # arrays given to a .grad: never give one out twice
        try:
            self._backward_nodes(root, grads, handed, retain_graph)
        finally:
            cpu_threads.wait()                      # weight gradients still computed on a CPU worker

    @staticmethod
    def _backward_nodes(root: Any, grads: Any, handed: set, retain_graph: bool) -> None:
        for node in autograd.topological_order(root, _is_leaf):
            g = grads.pop(node)                     # dL/d(this node's output), all uses added up
            if g is None:
                continue
            if isinstance(node, Tensor):            # a leaf: its gradient is the answer
                autograd.accumulate_leaf(node, g, handed)
                continue
            cpu_threads.ready(g)                    # read below: not still being written by a worker
            if node.retained:                       # its output asked for .grad with retain_grad()
                autograd.retain(node.retained, g)
            in_grads = autograd.call_backward(node, g, retain_graph)   # dL/d(inputs) = local rule · g
            for parent, pg in zip(node.parents, in_grads):
                if parent is not None and pg is not None:
                    grads.add(node, parent, pg)
            if not retain_graph:                    # free what forward saved: it is not needed again
                node.saved, node.parents, node.freed = None, (), True

    def _seed_grad(self, grad: Any) -> Any:
        """d(self)/d(self): ones for a one-element tensor, or the given `grad` checked against self."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: no input of the "
                               "ops that made it had requires_grad=True (or it was made under no_grad)")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() without a grad needs a one-element tensor, got shape "
                                   f"{self.shape}; pass grad= of the same shape")
            return self.device.xp.ones(self.shape, dtype=self.dtype)
        grad = _to_array(grad, self.device, self.dtype)
        if grad.shape != self.shape:
            raise ValueError(f"backward(grad): grad has shape {grad.shape}, tensor has {self.shape}")
        return grad

    def retain_grad(self) -> None:
        """Keep this (non-leaf) tensor's gradient in `.grad` after backward(), as torch does: to print the
        gradient that flows into a layer. A leaf keeps its gradient anyway."""
        if not self.requires_grad:
            raise RuntimeError("retain_grad() on a tensor that does not require grad: it gets no gradient")
        if self._ctx is not None and not any(r() is self for r in self._ctx.retained):
            self._ctx.retained = self._ctx.retained + (weakref.ref(self),)

    @property
    def grad_fn(self) -> Any:
        """The op (a Function) that made this tensor; None for a leaf or a tensor made under no_grad."""
        return self._ctx

    # --- operators (the ops themselves live in tinygpt/ops) ------------------------------------------
    def __add__(self, other): return ops.add(self, other)
    def __radd__(self, other): return ops.add(other, self)
    def __sub__(self, other): return ops.sub(self, other)
    def __rsub__(self, other): return ops.sub(other, self)
    def __mul__(self, other): return ops.mul(self, other)
    def __rmul__(self, other): return ops.mul(other, self)
    def __truediv__(self, other): return ops.div(self, other)
    def __rtruediv__(self, other): return ops.div(other, self)
    def __pow__(self, exponent): return ops.pow(self, exponent)
    def __neg__(self): return ops.neg(self)
    def __matmul__(self, other): return ops.matmul(self, other)
    def __rmatmul__(self, other): return ops.matmul(other, self)
    def __getitem__(self, index): return ops.getitem(self, index)

    # comparisons give bool tensors with no graph (masks); == and != too, as in torch (so a Tensor
    # hashes by identity: `t in some_set` compares ids, never values)
    def __lt__(self, other): return Tensor._make(self.data < _raw(other), self.device, None)
    def __le__(self, other): return Tensor._make(self.data <= _raw(other), self.device, None)
    def __gt__(self, other): return Tensor._make(self.data > _raw(other), self.device, None)
    def __ge__(self, other): return Tensor._make(self.data >= _raw(other), self.device, None)
    def __eq__(self, other): return Tensor._make(self.data == _raw(other), self.device, None)
    def __ne__(self, other): return Tensor._make(self.data != _raw(other), self.device, None)
    __hash__ = object.__hash__

    def neg(self): return ops.neg(self)
    def exp(self): return ops.exp(self)
    def log(self): return ops.log(self)
    def sqrt(self): return ops.sqrt(self)
    def tanh(self): return ops.tanh(self)
    def relu(self): return ops.relu(self)
    def pow(self, exponent): return ops.pow(self, exponent)   # x.pow(2) is x ** 2
    def reshape(self, *shape): return ops.reshape(self, *shape)
    def view(self, *shape): return ops.reshape(self, *shape)
    def transpose(self, dim0=-2, dim1=-1): return ops.transpose(self, dim0, dim1)
    def permute(self, *dims): return ops.permute(self, *dims)
    def masked_fill(self, mask, value): return ops.masked_fill(self, mask, value)
    def tril(self, diagonal=0): return ops.tril(self, diagonal)
    def triu(self, diagonal=0): return ops.triu(self, diagonal)

    @property
    def T(self):
        return ops.permute(self, *reversed(range(self.ndim)))

    # --- reductions: torch's dim=/keepdim= (NumPy's axis=/keepdims= work too) --------------------------
    def sum(self, dim=None, keepdim=False, *, axis=None, keepdims=None):
        return ops.sum(self, *_dim(dim, axis, keepdim, keepdims))

    def mean(self, dim=None, keepdim=False, *, axis=None, keepdims=None):
        return ops.mean(self, *_dim(dim, axis, keepdim, keepdims))

    def var(self, dim=None, unbiased=True, keepdim=False, *, correction=None, axis=None, keepdims=None):
        """Variance, unbiased (÷ (n - 1)) by default as in torch; correction=0 (or unbiased=False) ÷ n."""
        ax, keep = _dim(dim, axis, keepdim, keepdims)
        return ops.var(self, ax, (1 if unbiased else 0) if correction is None else correction, keep)

    def std(self, dim=None, unbiased=True, keepdim=False, *, correction=None, axis=None, keepdims=None):
        """√var, unbiased by default as in torch."""
        return ops.sqrt(self.var(dim, unbiased, keepdim, correction=correction, axis=axis, keepdims=keepdims))

    def max(self, dim=None, keepdim=False, *, axis=None, keepdims=None):
        """Torch's meaning: x.max() is the largest element; x.max(dim) is (values, indices), a named
        tuple. NumPy's x.max(axis=...) gives the values alone."""
        if dim is None:
            return ops.max(self, *_dim(None, axis, keepdim, keepdims))
        return ops.max_with_indices(self, *_dim(dim, None, keepdim, keepdims))

    def min(self, dim=None, keepdim=False, *, axis=None, keepdims=None):
        """As max(): x.min() a tensor, x.min(dim) (values, indices)."""
        if dim is None:
            return ops.min(self, *_dim(None, axis, keepdim, keepdims))
        return ops.min_with_indices(self, *_dim(dim, None, keepdim, keepdims))

    def argmax(self, dim=None, keepdim=False):
        """Index of the largest element (of the flattened tensor when dim is None); int64, no gradient."""
        return ops.argmax(self, dim, keepdim)

    def argmin(self, dim=None, keepdim=False):
        return ops.argmax(-self.detach(), dim, keepdim)

    def softmax(self, dim=-1): return ops.softmax(self, dim)
    def log_softmax(self, dim=-1): return ops.log_softmax(self, dim)

    # --- shapes and numbers, torch's names -------------------------------------------------------------
    def numel(self) -> int:
        return int(self.data.size)

    def dim(self) -> int:
        return self.data.ndim

    def contiguous(self) -> "Tensor":
        return self

    def unsqueeze(self, dim: int) -> "Tensor":
        d = dim % (self.ndim + 1)
        return ops.reshape(self, self.shape[:d] + (1,) + self.shape[d:])

    def squeeze(self, dim: Any = None) -> "Tensor":
        if dim is None:
            return ops.reshape(self, tuple(s for s in self.shape if s != 1))
        d = dim % max(self.ndim, 1)
        return ops.reshape(self, self.shape[:d] + self.shape[d + 1:]) if self.shape[d] == 1 else self

    def flatten(self) -> "Tensor":
        return ops.reshape(self, (-1,))

    def float(self) -> "Tensor":
        """As float32 (differentiable: the gradient is cast back)."""
        return ops.cast(self, np.float32)

    def double(self) -> "Tensor":
        return ops.cast(self, np.float64)

    def long(self) -> "Tensor":
        """As int64 (integers take no gradient)."""
        return ops.cast(self, np.int64)

    def int(self) -> "Tensor":
        return ops.cast(self, np.int32)

    def bool(self) -> "Tensor":
        return ops.cast(self, np.bool_)

    def type(self, dtype: Any) -> "Tensor":
        return ops.cast(self, dtype)

    def clone(self) -> "Tensor":
        """A copy that stays on the graph (the gradient flows back to self)."""
        return ops.cast(self, self.dtype)

    def __iter__(self):
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d tensor")
        for i in range(self.shape[0]):
            yield self[i]

    def __bool__(self) -> bool:
        if self.data.size != 1:
            raise RuntimeError(f"the truth value of a tensor with {self.data.size} elements is ambiguous; "
                               "use .any() or .all()")
        return bool(self.item())

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __index__(self) -> int:
        """An integer tensor of one element used as an index or a slice bound: data[i:i + 8]."""
        if self.dtype.kind not in "iub" or self.data.size != 1:
            raise TypeError(f"only integer tensors of one element can be used as an index, not "
                            f"{self.dtype} of shape {self.shape}")
        return int(self.item())

    def __format__(self, spec: str) -> str:
        """f"{loss:.4f}" formats a one-element tensor as its number. As in torch, a 0-d tensor formats as
        its number with any spec (f"the target: {y[t]}" prints 47, while print(y[t]) shows tensor(47));
        any other tensor with an empty spec gives str(t)."""
        if self.ndim == 0:
            return format(self.item(), spec)
        if not spec:
            return str(self)
        if self.data.size != 1:
            raise TypeError(f"cannot format a tensor of shape {self.shape} with {spec!r}; "
                            "only one-element tensors take a format spec")
        return format(self.item(), spec)

    def any(self) -> "Tensor":
        return Tensor._make(self.data.any(), self.device, None)

    def all(self) -> "Tensor":
        return Tensor._make(self.data.all(), self.device, None)

    def __setitem__(self, index: Any, value: Any) -> None:
        """t[index] = value, in place, outside the graph: xbow[b, t] = x[b, :t + 1].mean(0).

        Allowed on tensors that do not require grad, and under no_grad (to initialise weights).
        """
        if self.requires_grad and is_grad_enabled():
            raise RuntimeError("in-place assignment t[...] = v into a tensor that requires grad would "
                               "change a value the graph depends on; do it under tinygpt.no_grad(), or on "
                               "a tensor that does not require grad (e.g. t.detach().clone())")
        if isinstance(value, Tensor):
            value = value.data
        self.data[ops.shape.index_arrays(index, self.device.xp)] = backend.to_device(value, self.device) \
            if hasattr(value, "dtype") else value


def _dim(dim: Any, axis: Any, keepdim: bool, keepdims: Any) -> tuple:
    """(axis, keepdims) from torch's dim/keepdim or NumPy's axis/keepdims, whichever was given."""
    if dim is not None and axis is not None:
        raise TypeError("give dim (torch) or axis (NumPy), not both")
    return (axis if dim is None else dim), bool(keepdim if keepdims is None else keepdims)


def _raw(x: Any) -> Any:
    return x.data if isinstance(x, Tensor) else x


def _is_dtype(x: Any) -> bool:
    """A dtype given where a device could be: np.dtype, a NumPy scalar type or tinygpt.float etc."""
    return isinstance(x, np.dtype) or (isinstance(x, type) and issubclass(x, np.generic))


def _is_leaf(node: Any) -> bool:
    return isinstance(node, Tensor)


SparseGrad = autograd.SparseGrad   # indexing's backward returns one (tinygpt/ops/shape.py)


from tinygpt import ops  # noqa: E402  (ops import Tensor; the operators above call into them)
