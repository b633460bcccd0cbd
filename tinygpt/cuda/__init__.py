"""Everything CUDA-only, one entry point: `from tinygpt import cuda`.

    cuda.set_matmul_precision("tf32")     # or "float16"/"bfloat16" with a cuda.LossScaler (docs/GPU.md)

The package holds the fused kernels (kernels.py: the launchers the ops call when tinygpt.kernels.fused
answers "cuda"; sources.py: their CUDA C source) and reduced-precision matmuls with loss scaling
(amp.py). Nothing here imports CuPy: tinygpt.backend does, on first use of the "cuda" device."""
from tinygpt.cuda.amp import LossScaler, get_matmul_precision, set_matmul_precision  # noqa: F401


def is_available() -> bool:
    """torch.cuda.is_available(): True when CuPy imports and sees a GPU (the answer comes from CuPy)."""
    from tinygpt import backend
    return backend.is_cuda_available()
