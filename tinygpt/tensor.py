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
from typing import Any, Iterator

import numpy as np

from tinygpt import backend

_state = threading.local()


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
        grad = ", requires_grad=True" if self.requires_grad else ""
        dev = f", device={self.device.name!r}" if self.device.name != "cpu" else ""
        return f"tensor({backend.to_numpy(self.data)!r}{dev}{grad})".replace("\n", "\n       ")

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

    def to(self, device: Any) -> "Tensor":
        """This tensor on `device` ("cpu" or "cuda"): itself when already there, else a new leaf."""
        dev = backend.get_device(device)
        if dev is self.device:
            return self
        return Tensor(backend.to_device(self.data, dev), requires_grad=self.requires_grad)

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
        """Accumulate d(self)/d(leaf) into every leaf's `.grad` that requires grad.

        `grad` is d(loss)/d(self); it defaults to 1 for a one-element tensor.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad: no input of the "
                               "ops that made it had requires_grad=True (or it was made under no_grad)")
        xp = self.device.xp
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() without a grad needs a one-element tensor, got shape "
                                   f"{self.shape}; pass grad= of the same shape")
            grad = xp.ones(self.shape, dtype=self.dtype)
        else:
            grad = _to_array(grad, self.device, self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward(grad): grad has shape {grad.shape}, tensor has {self.shape}")
        root = self._ctx if self._ctx is not None else self
        grads = {id(root): grad}
        handed = {id(grad)}  # ids of arrays given to a leaf's .grad in this call: never alias two
        owned: set = set()   # ids of sums this loop made and alone holds: safe to add into in place
        for node in _toposort(root):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            owned.discard(id(g))
            if isinstance(g, SparseGrad):
                g = g.dense()
            if isinstance(node, Tensor):  # a leaf
                _accumulate_leaf(node, g, handed)
                continue
            if node.freed:
                raise RuntimeError(
                    f"backward through {type(node).__name__} a second time: its saved arrays were "
                    "freed; call backward(retain_graph=True) the first time")
            node.last_use = not retain_graph
            in_grads = type(node).backward(node, g)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            if len(in_grads) != len(node.parents):
                raise RuntimeError(f"{type(node).__name__}.backward returned {len(in_grads)} gradients "
                                   f"for {len(node.parents)} inputs")
            for parent, pg in zip(node.parents, in_grads):
                if parent is None or pg is None:
                    continue
                shape, dtype = ((parent.shape, parent.dtype) if isinstance(parent, Tensor)
                                else (parent.out_shape, parent.out_dtype))
                if pg.shape != shape:
                    raise RuntimeError(f"{type(node).__name__}.backward returned a gradient of shape "
                                       f"{pg.shape} for an input of shape {shape}")
                if pg.dtype != dtype:
                    pg = pg.astype(dtype)
                key = id(parent)
                prev = grads.get(key)
                if prev is None:
                    grads[key] = pg
                elif id(prev) in owned:                   # a sum made below: add into it
                    if isinstance(pg, SparseGrad):
                        pg.add_to(prev)
                    else:
                        prev += pg
                else:
                    total = _sum_grads(prev, pg)
                    grads[key] = total
                    owned.add(id(total))
            if not retain_graph:
                node.saved, node.parents, node.freed = None, (), True

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

    # comparisons give bool tensors with no graph (masks)
    def __lt__(self, other): return Tensor._make(self.data < _raw(other), self.device, None)
    def __le__(self, other): return Tensor._make(self.data <= _raw(other), self.device, None)
    def __gt__(self, other): return Tensor._make(self.data > _raw(other), self.device, None)
    def __ge__(self, other): return Tensor._make(self.data >= _raw(other), self.device, None)

    def neg(self): return ops.neg(self)
    def exp(self): return ops.exp(self)
    def log(self): return ops.log(self)
    def sqrt(self): return ops.sqrt(self)
    def tanh(self): return ops.tanh(self)
    def relu(self): return ops.relu(self)
    def sum(self, axis=None, keepdims=False): return ops.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return ops.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return ops.max(self, axis, keepdims)
    def reshape(self, *shape): return ops.reshape(self, *shape)
    def view(self, *shape): return ops.reshape(self, *shape)
    def transpose(self, dim0=-2, dim1=-1): return ops.transpose(self, dim0, dim1)
    def permute(self, *axes): return ops.permute(self, *axes)

    @property
    def T(self):
        return ops.permute(self, *reversed(range(self.ndim)))


def _raw(x: Any) -> Any:
    return x.data if isinstance(x, Tensor) else x


def _toposort(root: Any) -> list:
    """Nodes reachable from `root`, each after every node that consumes it (iterative DFS)."""
    order, visited, stack = [], set(), [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        if not isinstance(node, Tensor):
            for p in node.parents:
                if p is not None and id(p) not in visited:
                    stack.append((p, False))
    order.reverse()  # root first
    return order


class SparseGrad:
    """A gradient that is zero except at `index`, where it is `values`: what indexing's backward returns.

    Slices of one tensor (q, k, v = qkv[0], qkv[1], qkv[2]) then add into a single zero-filled buffer,
    instead of each making a full zero array that is summed afterwards. `basic`: the index only picks
    a view (ints, slices), so no element repeats; otherwise repeated indices add up (a scatter-add).
    """
    __slots__ = ("xp", "shape", "index", "values", "basic")

    def __init__(self, xp: Any, shape: tuple, index: Any, values: Any, basic: bool):
        self.xp, self.shape, self.index, self.values, self.basic = xp, tuple(shape), index, values, basic

    @property
    def dtype(self) -> Any:
        return self.values.dtype

    def astype(self, dtype: Any) -> "SparseGrad":
        return SparseGrad(self.xp, self.shape, self.index, self.values.astype(dtype), self.basic)

    def add_to(self, buf: Any) -> Any:
        """buf[index] += values, in place; returns buf."""
        if self.basic:
            buf[self.index] += self.values
        else:
            backend.scatter_add(self.xp, buf, self.index, self.values)
        return buf

    def dense(self) -> Any:
        return self.add_to(self.xp.zeros(self.shape, dtype=self.values.dtype))


def _sum_grads(a: Any, b: Any) -> Any:
    """a + b as a new array, for dense arrays and SparseGrads alike."""
    if isinstance(a, SparseGrad):
        a, b = b, a
    if isinstance(a, SparseGrad):
        return b.add_to(a.dense())
    if isinstance(b, SparseGrad):
        return b.add_to(a.copy())
    return a + b


def _accumulate_leaf(leaf: Tensor, g: Any, handed: set) -> None:
    """leaf.grad += g. A fresh .grad never aliases another leaf's or a view of another array."""
    if leaf.grad is None:
        if id(g) in handed or getattr(g, "base", None) is not None:
            g = g.copy()
        handed.add(id(g))
        leaf.grad = g
    else:
        leaf.grad += g


from tinygpt import ops  # noqa: E402  (ops import Tensor; the operators above call into them)
