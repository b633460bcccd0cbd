"""The differentiable ops, one family a module. Each op: a Function (forward + backward) and a wrapper."""
from tinygpt.ops.elementwise import add, sub, mul, div, pow, neg, exp, log, sqrt, tanh, cast  # noqa: F401
from tinygpt.ops.reduce import (  # noqa: F401
    sum, mean, max, min, var, argmax, max_with_indices, min_with_indices)
from tinygpt.ops.shape import reshape, permute, transpose, getitem, cat, stack, tril, triu  # noqa: F401
from tinygpt.ops.linalg import matmul, linear  # noqa: F401
from tinygpt.ops.activations import relu, gelu, sigmoid, softmax, log_softmax  # noqa: F401
from tinygpt.ops.nn import cross_entropy, layer_norm, embedding, dropout, where, masked_fill  # noqa: F401
from tinygpt.ops.attention import scaled_dot_product_attention  # noqa: F401
