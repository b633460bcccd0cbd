"""`Function`: one differentiable op, its forward and its backward side by side.

Write your own op the way tinygpt writes its own:

    class Square(tinygpt.Function):
        @staticmethod
        def forward(ctx, x):                 # x: a raw array (numpy or cupy)
            ctx.save_for_backward(x)
            return x * x
        @staticmethod
        def backward(ctx, grad):             # d(x²)/dx = 2x
            (x,) = ctx.saved_tensors
            return 2 * x * grad

    y = Square.apply(t)                      # t: a Tensor -> y: a Tensor on the autograd graph

`forward` and `backward` see raw arrays, never Tensors; `ctx.xp` is the array module to call (numpy on
the CPU, cupy on CUDA), so one body serves both devices. `backward` returns one gradient per positional
input of `forward`: a bare array when there is one input, else a tuple, with None for inputs that take
no gradient. Keyword arguments of `apply` reach `forward` unchanged and take no gradient.

The graph: each Function instance is a node. Its `parents` hold, per input, the Function that made that
input, or the leaf Tensor itself, or None where no gradient is needed. Outputs are not held by the graph,
so an activation lives only as long as a Tensor or a `save_for_backward` keeps it.
"""
from __future__ import annotations

from typing import Any

from tinygpt import backend
from tinygpt import tensor as _tensor_mod


def unbroadcast(grad: Any, shape: tuple) -> Any:
    """Sum `grad` back down to `shape`, undoing NumPy broadcasting.

    Broadcasting copies an input along new leading axes and along axes of size 1, so the gradient of
    the input is the sum over those axes: (B, T, C) -> (C,) sums over B and T; (B, T, C) -> (B, 1, C)
    sums over T with keepdims.
    """
    if grad.shape == tuple(shape):
        return grad
    lead = grad.ndim - len(shape)
    if lead and grad.size and all(s == gs for s, gs in zip(shape, grad.shape[lead:])):
        # only new leading axes: one GEMV with a ones vector beats .sum() (a 5x difference in NumPy)
        g2 = grad.reshape(-1, grad[(0,) * lead].size)
        if g2.dtype.kind == "f" and g2.shape[0] > 1:
            xp = backend.get_array_module(grad)
            return (xp.ones(g2.shape[0], dtype=g2.dtype) @ g2).reshape(shape)
        return g2.sum(axis=0).reshape(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, s in enumerate(shape) if s == 1 and grad.shape[lead + i] != 1)
    return grad.sum(axis=axes).reshape(shape)


class Function:
    """Base class for an op. Subclasses define static `forward(ctx, *arrays)` and `backward(ctx, grad)`."""

    retained: tuple = ()    # weak references to the output Tensor when it called retain_grad()
    saved: tuple | None = ()    # what forward saved (None once backward has freed it)
    freed = False
    last_use = True             # False while backward(retain_graph=True) runs
    out_shape: tuple = ()       # the output's shape and dtype, for checking the gradients that reach it
    out_dtype: Any = None

    def __init__(self, xp: Any, device: Any, parents: tuple, needs_input_grad: tuple):
        self.xp = xp                                # the array module of this op's device
        self.device = device
        self.parents = parents                      # per input: Function | leaf Tensor | None
        self.needs_input_grad = needs_input_grad    # per input: does it want a gradient?

    # --- what forward leaves for backward --------------------------------------------------------
    def save_for_backward(self, *arrays: Any) -> None:
        self.saved = arrays

    @property
    def saved_tensors(self) -> tuple:
        if self.freed:
            raise RuntimeError(
                f"{type(self).__name__}: its saved arrays were freed by an earlier backward(); "
                "call backward(retain_graph=True) the first time to backward through a graph twice")
        return self.saved

    # --- the op ------------------------------------------------------------------------------------
    @staticmethod
    def forward(ctx: "Function", *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    @staticmethod
    def backward(ctx: "Function", grad: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def apply(cls, *args: Any, **kwargs: Any) -> "_tensor_mod.Tensor":
        """Run `forward` on the arrays of the Tensor arguments and return a Tensor.

        When gradients are enabled and an input requires one, the result remembers this node so that
        `backward()` can come back through it.
        """
        Tensor = _tensor_mod.Tensor
        device, arrays, needs = None, [], []
        for a in args:                              # one pass: the device, the raw arrays, who wants a grad
            if isinstance(a, Tensor):
                if device is None:
                    device = a.device
                elif a.device is not device:
                    raise backend.DeviceError(
                        f"{cls.__name__}: inputs are on different devices, {device.name!r} and "
                        f"{a.device.name!r}; move them to one with .to(device)")
                arrays.append(a.data)
                needs.append(a.requires_grad)
            else:
                arrays.append(a)
                needs.append(False)
        if device is None:
            device = backend.get_device()
        needs = tuple(needs)
        record = True in needs and _tensor_mod.is_grad_enabled()
        ctx = cls(device.xp, device, (), needs)
        out = cls.forward(ctx, *arrays, **kwargs)
        if not record:
            return Tensor._make(out, device, None)
        ctx.parents = tuple((a._ctx if a._ctx is not None else a) if n else None
                            for a, n in zip(args, needs))
        ctx.out_shape, ctx.out_dtype = out.shape, out.dtype
        return Tensor._make(out, device, ctx)
