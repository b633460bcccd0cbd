"""tinygpt: a GPT trained by an autograd engine written out by hand, on NumPy (CPU) or CuPy (CUDA).

Code written the way Karpathy's "Let's build GPT" lecture writes it runs with its imports changed:

    import tinygpt as torch
    import tinygpt.nn as nn
    from tinygpt.nn import functional as F

Where torch and NumPy mean different things by a name, torch's meaning wins (x.max(dim) gives values
and indices, var/std are unbiased); NumPy's axis=/keepdims= still work where they did.
"""
from tinygpt.backend import (  # noqa: F401
    manual_seed, is_cuda_available, get_device, DeviceError, CudaUnavailableError)
from tinygpt.tensor import Tensor, tensor, no_grad, is_grad_enabled  # noqa: F401
from tinygpt.function import Function, unbroadcast  # noqa: F401
from tinygpt.gradcheck import gradcheck, numerical_grad, GradcheckError  # noqa: F401
from tinygpt.creation import (  # noqa: F401
    float32, float64, float16, int64, int32, uint8, long, double, half,
    zeros, ones, full, zeros_like, ones_like, arange, randn, rand, randint, multinomial, allclose,
    from_numpy)
from tinygpt.functions import (  # noqa: F401
    sum, mean, var, std, max, min, argmax, softmax, log_softmax, sqrt, exp, log, tanh, relu, matmul,
    transpose, where, tril, triu)
from tinygpt.ops.shape import cat, stack  # noqa: F401
from tinygpt import creation as _creation
from tinygpt import functional  # noqa: F401

float = _creation.float32      # torch.float is float32 (this shadows the builtin only in this namespace)
bool = _creation.bool_         # torch.bool

__version__ = "0.1.0"
from tinygpt import cuda, nn, optim  # noqa: F401,E402
