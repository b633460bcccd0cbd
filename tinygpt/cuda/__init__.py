"""CUDA-only pieces: the fused kernels' C source (sources.py) and reduced-precision matmuls with loss
scaling (amp.py). Nothing here imports CuPy; `tinygpt.cuda_kernels` is the entry point the ops use."""
