"""The bookkeeping behind `Tensor.backward()`: graph order, gradient sums, leaf accumulation.

`Tensor.backward` (tinygpt/tensor.py) is the chain rule in a few lines; the helpers it calls live here:

    topological_order(root)   every node after all the nodes that consume it (an iterative DFS)
    Gradients                 node -> the sum of the gradients that reached it from each of its uses
    accumulate_leaf(t, g)     t.grad += g for a leaf (a Tensor made by the user, not by an op)
    SparseGrad                what indexing's backward returns: zero except at the index

A node is a Function (an op's record: its `parents`, and what it saved) or a leaf Tensor.
"""
from __future__ import annotations

from typing import Any

from tinygpt import backend, cpu_threads


def topological_order(root: Any, is_leaf: Any) -> list:
    """Nodes reachable from `root`, `root` first and each node after every node that consumes it.

    Iterative (a 40,000-op chain needs no recursion). `is_leaf(node)` says where to stop.
    """
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
        if not is_leaf(node):
            for p in node.parents:
                if p is not None and id(p) not in visited:
                    stack.append((p, False))
    order.reverse()
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


class Gradients:
    """d(root)/d(node) for the nodes that backward has reached but not yet visited, summed over uses.

    The first gradient to reach a node is stored as it is; a second one makes a new array (their sum),
    which this table then owns, so later ones are added into it in place instead of allocating again.
    """

    def __init__(self, root: Any, grad: Any):
        self._grads = {id(root): grad}
        self._owned: set = set()     # ids of sums made here and held nowhere else

    def pop(self, node: Any) -> Any:
        """The total gradient of `node` (None if none reached it), removed from the table."""
        g = self._grads.pop(id(node), None)
        self._owned.discard(id(g))
        return g.dense() if type(g) is SparseGrad else g

    def add(self, op: Any, parent: Any, g: Any) -> None:
        """Add `g`, the gradient that `op`'s backward returned for its input `parent`."""
        if hasattr(parent, "out_shape"):                # made by an op: the shape and dtype it returned
            shape, dtype = parent.out_shape, parent.out_dtype
        else:                                           # a leaf Tensor
            shape, dtype = parent.data.shape, parent.data.dtype
        if g.shape != shape:
            raise RuntimeError(f"{type(op).__name__}.backward returned a gradient of shape {g.shape} "
                               f"for an input of shape {shape}")
        if g.dtype != dtype:
            cpu_threads.ready(g)
            g = g.astype(dtype)
        key = id(parent)
        prev = self._grads.get(key)
        if prev is None:
            self._grads[key] = g
            return
        cpu_threads.ready(prev, g)                    # neither still being written by a worker
        if id(prev) in self._owned:                 # a sum made here: add into it
            if isinstance(g, SparseGrad):
                g.add_to(prev)
            else:
                prev += g
        else:
            total = _sum(prev, g)
            self._grads[key] = total
            self._owned.add(id(total))


def _sum(a: Any, b: Any) -> Any:
    """a + b as a new array, for dense arrays and SparseGrads alike."""
    if isinstance(a, SparseGrad):
        a, b = b, a
    if isinstance(a, SparseGrad):
        return b.add_to(a.dense())
    if isinstance(b, SparseGrad):
        return b.add_to(a.copy())
    return a + b


def accumulate_leaf(leaf: Any, g: Any, handed: set) -> None:
    """leaf.grad += g. A fresh .grad never aliases another leaf's (`handed`: ids given out in this
    backward) or a view of another array, so later in-place updates of one cannot change another.
    A g that a worker is still writing (cpu_threads) is handed over as it is and waited for only to be
    read: Tensor.backward waits for every such job before it returns."""
    if leaf.grad is None:
        if id(g) in handed or getattr(g, "base", None) is not None:
            cpu_threads.ready(g)
            g = g.copy()
        handed.add(id(g))
        leaf.grad = g
    else:
        cpu_threads.ready(g, leaf.grad)
        leaf.grad += g


def retain(tensors: list, g: Any) -> None:
    """t.grad += g for the non-leaf tensors that asked for it with retain_grad() (a copy: g moves on)."""
    for ref in tensors:
        t = ref()
        if t is None:
            continue
        if t.grad is None:
            t.grad = g.copy()
        else:
            t.grad += g


def call_backward(op: Any, g: Any, retain_graph: bool) -> tuple:
    """One step of the chain rule: `op`'s backward turns dL/d(output) into dL/d(each input)."""
    if op.freed:
        raise RuntimeError(f"backward through {type(op).__name__} a second time: its saved arrays were "
                           "freed; call backward(retain_graph=True) the first time")
    op.last_use = not retain_graph          # on its last use a backward may overwrite what it saved
    in_grads = type(op).backward(op, g)
    if not isinstance(in_grads, tuple):
        in_grads = (in_grads,)
    if len(in_grads) != len(op.parents):
        raise RuntimeError(f"{type(op).__name__}.backward returned {len(in_grads)} gradients "
                           f"for {len(op.parents)} inputs")
    return in_grads
