"""tinygpt: a GPT trained by an autograd engine written out by hand, on NumPy (CPU) or CuPy (CUDA).

    import tinygpt
    import tinygpt.functional as F
    x = tinygpt.tensor([[1.0, 2.0]], requires_grad=True)
"""
from tinygpt.backend import (  # noqa: F401
    manual_seed, is_cuda_available, get_device, DeviceError, CudaUnavailableError)
from tinygpt.tensor import Tensor, tensor, no_grad, is_grad_enabled  # noqa: F401
from tinygpt.function import Function, unbroadcast  # noqa: F401
from tinygpt.gradcheck import gradcheck, numerical_grad, GradcheckError  # noqa: F401
from tinygpt import functional  # noqa: F401

__version__ = "0.1.0"
from tinygpt import nn, optim  # noqa: F401,E402
