"""Write your own differentiable op, then prove its backward right with the gradient checker.

Run: python examples/custom_op.py
"""
import numpy as np

import tinygpt


class Softplus(tinygpt.Function):
    """y = log(1 + e^x), computed stably as max(x, 0) + log(1 + e^-|x|)."""

    @staticmethod
    def forward(ctx, x):                     # x: a raw numpy/cupy array
        xp = ctx.xp                          # the array module of x's device
        ctx.save_for_backward(x)
        return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))

    @staticmethod
    def backward(ctx, grad):                 # dy/dx = sigmoid(x) = 1 / (1 + e^-x)
        (x,) = ctx.saved_tensors
        return grad / (1 + ctx.xp.exp(-x))


class BuggySoftplus(Softplus):
    @staticmethod
    def backward(ctx, grad):                 # 1% wrong: the checker must catch it
        return Softplus.backward(ctx, grad) * 1.01


x = tinygpt.tensor(np.random.default_rng(0).standard_normal((3, 4)), requires_grad=True)
print("Softplus passes gradcheck:", tinygpt.gradcheck(Softplus.apply, [x]))
try:
    tinygpt.gradcheck(BuggySoftplus.apply, [x])
except tinygpt.GradcheckError as e:
    print("BuggySoftplus is caught:", e)
