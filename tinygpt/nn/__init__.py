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
from tinygpt.nn.layers import GELU, Dropout, Embedding, LayerNorm, Linear, ModuleList, ReLU, Sequential
from tinygpt.nn.module import IncompatibleKeys, Module, Parameter, StateDictError
from tinygpt.nn import functional, init  # noqa: F401  (nn.functional: torch's signatures; nn.init)

__all__ = ["Parameter", "Module", "StateDictError", "IncompatibleKeys", "Linear", "Embedding", "LayerNorm",
           "Dropout", "ReLU", "GELU", "Sequential", "ModuleList", "functional", "init"]
