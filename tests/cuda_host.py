"""Running tinygpt's CUDA kernels without a GPU (a helper of tests/test_cuda_kernels.py, not a test file).

  * `elementwise_translation_unit(names, dtype, target)`: ElementwiseKernel bodies wrapped the way CuPy wraps
    them, as CUDA kernels (for nvcc) or as plain host loops (for g++).
  * `row_emulator_source(dtype)`: the row-kernel module plus a small emulator of a CUDA block on the host:
    one std::thread per CUDA thread, a std::barrier for __syncthreads, a slot array for __shfl_xor_sync.
  * `HostBuilds(tmp_dir)`: compiles those with g++ on first use; `host_elementwise` / `host_rows` run them
    on NumPy arrays through ctypes.
  * `raw_emulator_source(source, name)`: a RawKernel's own source (tg_flag_bad_ids) under the same emulator,
    with a mutex-guarded atomicMin.
  * `HostCuPy`: just the CuPy calls that tinygpt/cuda/kernels.py makes (RawModule, RawKernel,
    ElementwiseKernel, and NumPy for the rest), running the host builds and asserting that every kernel
    argument has the exact type of its C parameter.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess

import numpy as np

from tinygpt.cuda import sources

NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)
CXX = shutil.which("g++") or shutil.which("c++")
HOST_DTYPES = ["float32", "float64"]      # float16 loads and stores use a PTX instruction: GPU only

C_TYPES = {"float16": "__half", "float32": "float", "float64": "double", "int64": "long long", "int32": "int"}
CTYPES_SCALAR = {"float32": ctypes.c_float, "float64": ctypes.c_double, "int64": ctypes.c_longlong,
                 "int32": ctypes.c_int, "int": ctypes.c_int, "long long": ctypes.c_longlong,
                 "float": ctypes.c_float, "double": ctypes.c_double}


def parse_params(params: str) -> list[tuple[bool, str, str]]:
    """CuPy parameter list -> [(is_raw, type, name)]."""
    out = []
    for p in filter(None, (s.strip() for s in params.split(","))):
        words = p.split()
        raw = words[0] == "raw"
        out.append((raw, words[-2], words[-1]))
    return out


def elementwise_translation_unit(names, dtype, target: str) -> str:
    """The ElementwiseKernel bodies wrapped the way CuPy wraps them (inputs are `const T x = x[i]`, outputs
    `T& y = y[i]`, raw arrays are pointers, scalars by value), as CUDA kernels (target="cuda") or as
    extern "C" host loops (target="host"). T is __half for float16 (CuPy's own float16 type behaves alike)."""
    ct = sources.ctype(dtype)
    lines = ["#include <cuda_fp16.h>" if dtype == "float16" else "#include <math.h>",
             f"typedef {C_TYPES[dtype]} T;", sources.math_preamble(ct)]
    for name in names:
        ins, outs, op, kname, _ = sources.elementwise_spec(name, dtype)
        params, body = [], []
        for kind, plist in (("in", ins), ("out", outs)):
            for raw, typ, pname in parse_params(plist):
                c = "T" if typ == "T" else C_TYPES[typ]
                if raw:
                    params.append(f"const {c}* {pname}")
                elif typ != "T":
                    params.append(f"{c} {pname}")                        # a scalar
                elif kind == "in":
                    params.append(f"const T* {pname}_arr")
                    body.append(f"const T {pname} = {pname}_arr[i];")
                else:
                    params.append(f"T* {pname}_arr")
                    body.append(f"T& {pname} = {pname}_arr[i];")
        decl = ", ".join(["long long size"] + params)
        if target == "cuda":
            head = (f'extern "C" __global__ void {kname}({decl}) {{\n'
                    "  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size;"
                    " i += (long long)gridDim.x * blockDim.x) {\n")
        else:
            head = f'extern "C" void {kname}({decl}) {{\n  for (long long i = 0; i < size; ++i) {{\n'
        lines.append(head + "    " + "\n    ".join(body) + "\n" + op + "\n  }\n}\n")
    return "\n".join(lines)


EMULATOR = r"""
// A CUDA block on the host: one std::thread per CUDA thread. __syncthreads is a std::barrier over the
// block, __shfl_xor_sync swaps values through a slot array between two barriers (so, as on a GPU, every
// thread of the block must reach it), __shared__ variables are function statics (blocks run one by one).
#include <math.h>
#include <string.h>
#include <barrier>
#include <thread>
#include <vector>
struct tg_dim3 { unsigned x, y, z; };
static thread_local tg_dim3 threadIdx;
static tg_dim3 blockIdx, blockDim, gridDim;
static std::barrier<>* tg_bar;
static double tg_slots[1024];
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
static inline void __syncthreads() { tg_bar->arrive_and_wait(); }
template <class V> static V __shfl_xor_sync(unsigned, V v, int lane_mask) {
    tg_bar->arrive_and_wait();
    tg_slots[threadIdx.x] = (double)v;
    tg_bar->arrive_and_wait();
    return (V)tg_slots[threadIdx.x ^ lane_mask];
}
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline double __longlong_as_double(long long i) { double d; memcpy(&d, &i, 8); return d; }
template <class F> static void tg_launch(int grid, int block, F body) {
    blockDim = {(unsigned)block, 1, 1};
    gridDim = {(unsigned)grid, 1, 1};
    for (int b = 0; b < grid; ++b) {
        blockIdx = {(unsigned)b, 0, 0};
        std::barrier<> bar(block);
        tg_bar = &bar;
        std::vector<std::thread> threads;
        for (int t = 0; t < block; ++t)
            threads.emplace_back([&body, t] { threadIdx = {(unsigned)t, 0, 0}; body(); });
        for (auto& th : threads) th.join();
    }
}
"""


def row_emulator_source(dtype) -> str:
    src = [EMULATOR, sources.row_module_source(dtype)]
    for name, params in sources.ROW_KERNELS.items():
        names = [p.split()[-1] for p in params.split(",")]
        src.append(f'extern "C" void launch_{name}(int grid, int block, {params}) '
                   f'{{ tg_launch(grid, block, [&] {{ {name}({", ".join(names)}); }}); }}\n')
    return "\n".join(src)


RAW_EXTRA = r"""
// atomicMin on the host: the emulator's threads are real threads, so a mutex makes it atomic
#include <mutex>
static std::mutex tg_atomic_mutex;
static unsigned long long atomicMin(unsigned long long* address, unsigned long long value) {
    std::lock_guard<std::mutex> lock(tg_atomic_mutex);
    unsigned long long old = *address;
    if (value < old) *address = value;
    return old;
}
"""
_SIGNATURE = re.compile(r'extern "C" __global__ void (\w+)\(([^)]*)\)')


def raw_kernel_params(source: str, name: str) -> list[str]:
    """The C parameter list of kernel `name` in a RawKernel source: ["const long long* ids", ...]."""
    for kname, params in _SIGNATURE.findall(source):
        if kname == name:
            return [" ".join(p.split()) for p in params.split(",")]
    raise KeyError(f"no kernel {name} in the source")


def raw_emulator_source(source: str, name: str) -> str:
    """A RawKernel's source (tinygpt/cuda/kernels.py keeps its own) under the block emulator, plus an
    extern "C" launch_<name>(grid, block, params...)."""
    params = raw_kernel_params(source, name)
    names = [p.split()[-1] for p in params]
    return "\n".join([EMULATOR, RAW_EXTRA, source,
                      f'extern "C" void launch_{name}(int grid, int block, {", ".join(params)}) '
                      f'{{ tg_launch(grid, block, [&] {{ {name}({", ".join(names)}); }}); }}\n'])


def _compile_shared(tmp_dir, name: str, source: str, std: str) -> ctypes.CDLL:
    path = tmp_dir / f"{name}.cpp"
    path.write_text(source)
    lib = tmp_dir / f"{name}.so"
    cmd = [CXX, f"-std={std}", "-O1", "-shared", "-fPIC", "-pthread", "-w", str(path), "-o", str(lib)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"host compile of {name} failed:\n{r.stderr[-4000:]}"
    return ctypes.CDLL(str(lib))

class HostBuilds:
    """builds(kind, dtype) -> the ctypes library of kind "ew" (elementwise) or "row", compiled once."""

    def __init__(self, tmp_dir):
        self.tmp_dir, self.cache = tmp_dir, {}

    def raw(self, source: str, name: str) -> ctypes.CDLL:
        """The host build of RawKernel `name` from `source` (see raw_emulator_source)."""
        if ("raw", name) not in self.cache:
            self.cache["raw", name] = _compile_shared(self.tmp_dir, f"raw_{name}",
                                                      raw_emulator_source(source, name), "c++20")
        return self.cache["raw", name]

    def __call__(self, kind, dtype):
        if (kind, dtype) not in self.cache:
            if kind == "ew":
                src = elementwise_translation_unit(sources.ELEMENTWISE, dtype, "host")
                self.cache[kind, dtype] = _compile_shared(self.tmp_dir, f"ew_{dtype}", src, "c++17")
            else:
                src = row_emulator_source(dtype)
                self.cache[kind, dtype] = _compile_shared(self.tmp_dir, f"row_{dtype}", src, "c++20")
        return self.cache[kind, dtype]


def _arg(value, ctype_name):
    if isinstance(value, np.ndarray):
        assert value.flags.c_contiguous
        return ctypes.c_void_p(value.ctypes.data)
    return CTYPES_SCALAR[ctype_name](value)


def host_elementwise(host_libs, name, dtype, size, *args):
    """Run an elementwise body over `size` elements; args in declaration order (inputs, then outputs)."""
    ins, outs, _, kname, _ = sources.elementwise_spec(name, dtype)
    params = parse_params(ins) + parse_params(outs)
    assert len(params) == len(args)
    types = [sources.ctype(dtype).acc_dtype if t not in C_TYPES and t != "T" else t for _, t, _ in params]
    fn = getattr(host_libs("ew", dtype), kname)
    fn.restype = None
    fn(ctypes.c_longlong(size), *[_arg(a, t) for a, t in zip(args, types)])


def host_rows(host_libs, name, dtype, grid, block, *args):
    """Launch a row kernel on the emulator; args in the order of sources.ROW_KERNELS[name]."""
    acc = sources.ctype(dtype).acc
    ctypes_names = []
    for p in sources.ROW_KERNELS[name].split(","):
        typ = " ".join(p.split()[:-1])
        ctypes_names.append("ptr" if "*" in typ else acc if typ == "acc_t" else typ)
    fn = getattr(host_libs("row", dtype), f"launch_{name}")
    fn.restype = None
    fn(ctypes.c_int(grid), ctypes.c_int(block), *[_arg(a, t) for a, t in zip(args, ctypes_names)])


_SCALAR_TYPES = {"int": np.int32, "long long": np.int64}


class _HostModule:
    def __init__(self, lib, dtype):
        self.lib, self.dtype = lib, dtype

    def get_function(self, name):
        ct = sources.ctype(self.dtype)

        def launch(grid, block, args):
            assert len(grid) == 1 and len(block) == 1 and block[0] % 32 == 0 and 32 <= block[0] <= 1024
            params = [p.strip() for p in sources.ROW_KERNELS[name].split(",")]
            assert len(args) == len(params), f"{name}: {len(args)} arguments for {len(params)} parameters"
            for p, a in zip(params, args):
                typ = " ".join(p.split()[:-1]).replace("const ", "")
                if typ.endswith("*"):
                    want = {"scalar_t*": ct.dtype, "acc_t*": ct.acc_dtype, "long long*": "int64"}[typ]
                    assert isinstance(a, np.ndarray) and a.dtype == want and a.flags.c_contiguous, (name, p)
                else:       # a RawKernel scalar must be the exact NumPy type of the C parameter
                    want = np.dtype(ct.acc_dtype).type if typ == "acc_t" else _SCALAR_TYPES[typ]
                    assert type(a) is want, f"{name}: {p} got {type(a).__name__}, needs {want.__name__}"
            host_rows(lambda kind, d: self.lib, name, self.dtype, grid[0], block[0], *args)
        return launch


class _HostElementwise:
    def __init__(self, lib, dtype, ins, outs):
        self.lib, self.dtype = lib, dtype
        self.ins, self.outs = parse_params(ins), parse_params(outs)
        self.name = None

    def __call__(self, *args):
        n_in = len(self.ins)
        assert len(args) in (n_in, n_in + len(self.outs))
        arrays = [a for (raw, t, _), a in zip(self.ins, args) if not raw and t == "T"]
        shape = arrays[0].shape
        assert all(a.shape == shape and a.dtype == self.dtype for a in arrays)
        outs = list(args[n_in:]) or [np.empty(shape, self.dtype) for _ in self.outs]
        assert all(o.shape == shape and o.dtype == self.dtype and o.flags.c_contiguous for o in outs)
        call = []
        for (raw, t, pname), a in zip(self.ins, args[:n_in]):
            if raw:
                assert a.dtype == (self.dtype if t == "T" else t) and a.flags.c_contiguous, pname
            call.append(np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a)
        host_elementwise(lambda kind, d: self.lib, self.name, self.dtype, int(np.prod(shape)), *call, *outs)
        return outs[0] if len(outs) == 1 else tuple(outs)


_POINTER_DTYPES = {"long long": "int64", "int": "int32", "float": "float32", "double": "float64"}


class _HostRawKernel:
    """A RawKernel run by the emulator; every argument must have its C parameter's exact type."""

    def __init__(self, lib, source, name):
        self.lib, self.name = lib, name
        self.params = raw_kernel_params(source, name)

    def __call__(self, grid, block, args):
        assert len(grid) == 1 and len(block) == 1 and 32 <= block[0] <= 1024 and block[0] % 32 == 0
        assert len(args) == len(self.params), f"{self.name}: {len(args)} arguments for {len(self.params)}"
        call = []
        for p, a in zip(self.params, args):
            typ = " ".join(p.replace("const ", "").split()[:-1])
            if typ.endswith("*"):
                want = _POINTER_DTYPES[typ[:-1].strip()]
                assert isinstance(a, np.ndarray) and a.dtype == want and a.flags.c_contiguous, (self.name, p)
                call.append(ctypes.c_void_p(a.ctypes.data))
            else:
                want = _SCALAR_TYPES[typ]
                assert type(a) is want, f"{self.name}: {p} got {type(a).__name__}, needs {want.__name__}"
                call.append(CTYPES_SCALAR[typ](a))
        fn = getattr(self.lib, f"launch_{self.name}")
        fn.restype = None
        fn(ctypes.c_int(grid[0]), ctypes.c_int(block[0]), *call)


class HostCuPy:
    """NumPy, plus RawModule, RawKernel and ElementwiseKernel running tinygpt's kernels on the host."""

    def __init__(self, host_libs):
        self._libs = host_libs

    def __getattr__(self, name):
        return getattr(np, name)

    def RawModule(self, code):
        dtype = next(d for d in HOST_DTYPES if code == sources.row_module_source(d))
        return _HostModule(self._libs("row", dtype), dtype)

    def RawKernel(self, code, name):
        return _HostRawKernel(self._libs.raw(code, name), code, name)

    def ElementwiseKernel(self, ins, outs, op, kname, preamble=""):
        name, suffix = kname[3:].rsplit("_", 1)
        dtype = next(d for d in HOST_DTYPES if sources.ctype(d).suffix == suffix)
        assert (ins, outs, op, kname, preamble) == sources.elementwise_spec(name, dtype)
        k = _HostElementwise(self._libs("ew", dtype), dtype, ins, outs)
        k.name = name
        return k
