"""`tinygpt.functional` (import as F): the ops a network is written with.

Each lives in tinygpt/ops/ as a Function with its forward and backward side by side.
"""
from tinygpt.ops.activations import relu, gelu, sigmoid, softmax, log_softmax  # noqa: F401
from tinygpt.ops.attention import scaled_dot_product_attention  # noqa: F401
from tinygpt.ops.elementwise import exp, log, sqrt, tanh  # noqa: F401
from tinygpt.ops.linalg import linear, matmul  # noqa: F401
from tinygpt.ops.nn import cross_entropy, dropout, embedding, layer_norm, masked_fill, where  # noqa: F401
from tinygpt.ops.shape import cat, stack  # noqa: F401
