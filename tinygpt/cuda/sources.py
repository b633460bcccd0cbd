"""The CUDA C source of tinygpt's fused kernels, generated per dtype, and their launch geometry.

Nothing here touches a GPU or imports CuPy: these are plain strings and integers, so the tests check them
on any machine (and compile them with nvcc, or run them on the host through a small emulator, where one
is installed). `tinygpt.cuda.kernels` turns them into CuPy kernels.

Two kinds of kernel:
  * Row kernels (one CUDA block per row of a (rows, cols) array, `ROW_KERNELS`): layer norm, softmax,
    cross-entropy. Threads stride over the row; a block-wide sum or max is a warp shuffle reduction
    (`__shfl_xor_sync`) followed by one pass through 32 shared-memory slots. One module per dtype.
  * Elementwise kernels (`ELEMENTWISE`): GELU, cross-entropy backward, Adam/AdamW. Their bodies follow
    CuPy's ElementwiseKernel rules: `T` is the array dtype, `i` the flat index, `raw` arrays are indexed
    by hand, and n, i and names that start with "_" are reserved.

Storage vs arithmetic: every kernel loads its elements into the accumulator type `acc_t` (float for
float16 and float32, double for float64), computes there, and rounds once when it stores. float16 is
stored as its 16 raw bits and converted with the PTX `cvt` instruction, so no header is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CType", "ctype", "SUPPORTED_DTYPES", "MAX_THREADS", "row_threads", "row_launch",
           "row_module_source", "ROW_KERNELS", "ELEMENTWISE", "elementwise_spec", "math_preamble"]

MAX_THREADS = 1024          # CUDA's limit on threads per block
WARP = 32


@dataclass(frozen=True)
class CType:
    """How one NumPy dtype is spelled in the kernels."""
    dtype: str          # NumPy name: "float32"
    storage: str        # C type of one element in a row kernel ("unsigned short" holds a float16's bits)
    elementwise: str    # what CuPy's ElementwiseKernel calls T for this dtype
    acc: str            # C type the arithmetic is done in
    acc_dtype: str      # NumPy name of `acc`
    suffix: str         # kernel-name suffix, so every (kernel, dtype) pair has its own name


_CTYPES = {
    "float16": CType("float16", "unsigned short", "float16", "float", "float32", "f16"),
    "float32": CType("float32", "float", "float", "float", "float32", "f32"),
    "float64": CType("float64", "double", "double", "double", "float64", "f64"),
}
SUPPORTED_DTYPES = tuple(_CTYPES)


def ctype(dtype) -> CType:
    """The CType of a dtype (a NumPy/CuPy dtype, a type like numpy.float32, or its name)."""
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    if name not in _CTYPES:
        raise TypeError(f"tinygpt's CUDA kernels take float16, float32 or float64 arrays, not {name}; "
                        "cast with .astype('float32')")
    return _CTYPES[name]


# --- launch geometry ------------------------------------------------------------------------------------
def row_threads(n_cols: int, per_thread: int = 4, max_threads: int = MAX_THREADS) -> int:
    """Threads per block for a row of n_cols: about `per_thread` elements each, a whole number of warps
    (the block reductions assume full warps), at least one warp and at most `max_threads`."""
    if n_cols < 1:
        raise ValueError(f"row_threads: a row needs at least one column, got {n_cols}")
    want = -(-n_cols // per_thread)                       # ceil(n_cols / per_thread)
    warps = -(-want // WARP)
    return max(WARP, min(max_threads // WARP * WARP, warps * WARP))


def row_launch(n_rows: int, n_cols: int) -> tuple[tuple[int], tuple[int]]:
    """(grid, block) for a row kernel: one block per row. Callers skip the launch when n_rows == 0."""
    if n_rows < 1:
        raise ValueError(f"row_launch: need at least one row, got {n_rows}")
    if n_rows > 2**31 - 1 or n_cols > 2**31 - 1:
        raise ValueError(f"row_launch: {n_rows} rows of {n_cols} columns is beyond a 1-D grid of int indices")
    return (n_rows,), (row_threads(n_cols),)


# --- shared preambles -----------------------------------------------------------------------------------
def math_preamble(ct: CType) -> str:
    """Math in the accumulator type: TG_EXP(x) is expf for float and exp for double, and so on."""
    f = "f" if ct.acc == "float" else ""
    names = {"EXP": "exp", "LOG": "log", "SQRT": "sqrt", "ERFC": "erfc", "TANH": "tanh", "MAX": "fmax"}
    return "".join(f"#define TG_{k} {v}{f}\n" for k, v in names.items())


def _load_store(ct: CType) -> str:
    if ct.dtype == "float16":  # IEEE half <-> float with one PTX instruction each way, round to nearest even
        return r"""
__device__ __forceinline__ acc_t ld(const scalar_t* p, long long k) {
    float f; unsigned short h = p[k];
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ void st(scalar_t* p, long long k, acc_t v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p[k] = h;
}
"""
    return r"""
__device__ __forceinline__ acc_t ld(const scalar_t* p, long long k) { return (acc_t)p[k]; }
__device__ __forceinline__ void st(scalar_t* p, long long k, acc_t v) { p[k] = (scalar_t)v; }
"""


def _constants(ct: CType) -> str:
    if ct.acc == "float":
        return ("#define TG_NEG_INF __int_as_float((int)0xff800000u)\n"
                "#define TG_NAN __int_as_float((int)0x7fc00000u)\n")
    return ("#define TG_NEG_INF __longlong_as_double((long long)0xfff0000000000000ull)\n"
            "#define TG_NAN __longlong_as_double((long long)0x7ff8000000000000ull)\n")


_REDUCE = r"""
// Sum (or max) of v over the warp: after log2(32) butterfly steps every lane holds the total.
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ acc_t warp_max(acc_t v) {
    for (int o = 16; o > 0; o >>= 1) v = TG_MAX(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum (or max) of v over the block; every thread gets the result. blockDim.x is a multiple of 32.
// The first __syncthreads() protects `sh` from a warp that is still reading the previous reduction.
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    return warp_sum(lane < n_warps ? sh[lane] : (acc_t)0);
}
__device__ __forceinline__ acc_t block_max(acc_t v, acc_t* sh) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    return warp_max(lane < n_warps ? sh[lane] : TG_NEG_INF);
}
"""

# --- row kernels ----------------------------------------------------------------------------------------
# name -> C parameter list. The launcher in cuda/kernels.py passes arguments in this order; the tests
# parse these lists to build host harnesses. Every kernel runs with grid = (rows,), block = (row_threads,).
ROW_KERNELS = {
    "tg_layer_norm_fwd": "const scalar_t* x, const scalar_t* w, const scalar_t* b, scalar_t* y, "
                         "scalar_t* xhat, scalar_t* rstd, int C, int has_bias, acc_t eps",
    "tg_layer_norm_bwd": "const scalar_t* g, const scalar_t* xhat, const scalar_t* rstd, const scalar_t* w, "
                         "scalar_t* dx, int C",
    "tg_softmax_fwd": "const scalar_t* s, scalar_t* p, int n_cols, int Tq, int causal, int log_out, acc_t scale",
    "tg_softmax_bwd": "const scalar_t* dy, const scalar_t* y, scalar_t* dx, int n_cols, int log_out, acc_t scale",
    "tg_cross_entropy_fwd": "const scalar_t* z, const long long* t, acc_t* lse, acc_t* nll, int V, "
                            "long long ignore_index",
}

_ROW_BODIES = {
    # y = x̂ w + b,  x̂ = (x − μ) r,  μ = mean(x),  σ² = mean((x − μ)²),  r = 1/√(σ² + ε)   (two passes, as
    # ops/nn.py LayerNorm). Writes y, x̂ (N, C) and r (N,).
    "tg_layer_norm_fwd": r"""
    __shared__ acc_t sh[32];
    const long long row = blockIdx.x, base = row * (long long)C;
    acc_t s = 0;
    for (int j = threadIdx.x; j < C; j += blockDim.x) s += ld(x, base + j);
    const acc_t mu = block_sum(s, sh) / (acc_t)C;
    acc_t q = 0;
    for (int j = threadIdx.x; j < C; j += blockDim.x) { acc_t d = ld(x, base + j) - mu; q += d * d; }
    const acc_t var = block_sum(q, sh) / (acc_t)C;
    const acc_t r = (acc_t)1 / TG_SQRT(var + eps);
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        acc_t xh = (ld(x, base + j) - mu) * r;
        st(xhat, base + j, xh);
        acc_t v = xh * ld(w, j);
        if (has_bias) v += ld(b, j);
        st(y, base + j, v);
    }
    if (threadIdx.x == 0) st(rstd, row, r);
""",
    # dx = r (dx̂ − mean(dx̂) − x̂ mean(dx̂ x̂)),  dx̂ = g w. Both means come from one pass (two block sums).
    "tg_layer_norm_bwd": r"""
    __shared__ acc_t sh[32];
    const long long row = blockIdx.x, base = row * (long long)C;
    acc_t a = 0, c = 0;
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        acc_t d = ld(g, base + j) * ld(w, j);
        a += d;
        c += d * ld(xhat, base + j);
    }
    const acc_t mean_d = block_sum(a, sh) / (acc_t)C;
    const acc_t mean_dx = block_sum(c, sh) / (acc_t)C;
    const acc_t r = ld(rstd, row);
    for (int j = threadIdx.x; j < C; j += blockDim.x) {
        acc_t d = ld(g, base + j) * ld(w, j);
        st(dx, base + j, r * (d - mean_d - ld(xhat, base + j) * mean_dx));
    }
""",
    # v_j = s_j·scale where key j is visible, −∞ where it is masked (causal: j > q + n_cols − Tq, q = row % Tq).
    # p = softmax(v) = e^(v − M) / D, or log_out: log p = v − M − log D, where M = max v and D = Σ e^(v − M).
    # Pass 1 keeps a running (max m, sum d) per thread ("online softmax"); combining two: d·e^(m − M).
    # p may be s itself: each element is read and written by the same thread, and every read of pass 1
    # is done before the block reductions return.
    "tg_softmax_fwd": r"""
    __shared__ acc_t sh[32];
    const long long row = blockIdx.x, base = row * (long long)n_cols;
    const int last = causal ? (int)(row % Tq) + n_cols - Tq : n_cols - 1;   // last visible key
    acc_t m = TG_NEG_INF, d = 0;
    for (int j = threadIdx.x; j <= last; j += blockDim.x) {
        acc_t v = ld(s, base + j) * scale;
        if (v > m) { d = d * TG_EXP(m - v) + (acc_t)1; m = v; }
        else if (v != TG_NEG_INF) d += TG_EXP(v - m);
    }
    const acc_t M = block_max(m, sh);
    const acc_t D = block_sum(m == TG_NEG_INF ? (acc_t)0 : d * TG_EXP(m - M), sh);
    const acc_t inv_D = (acc_t)1 / D, log_D = TG_LOG(D);
    for (int j = threadIdx.x; j < n_cols; j += blockDim.x) {
        acc_t out;
        if (j <= last) {
            acc_t v = ld(s, base + j) * scale - M;
            out = log_out ? v - log_D : TG_EXP(v) * inv_D;
        } else {
            out = log_out ? TG_NEG_INF : (acc_t)0;
        }
        st(p, base + j, out);
    }
""",
    # softmax:     dx = y ⊙ (dy − Σ_k dy_k y_k) · scale     (attention passes scale; plain softmax 1)
    # log_softmax: dx = dy − e^y Σ_k dy_k                     (y = log p)
    # dx may be dy itself (same thread reads then writes each element).
    "tg_softmax_bwd": r"""
    __shared__ acc_t sh[32];
    const long long row = blockIdx.x, base = row * (long long)n_cols;
    acc_t a = 0;
    for (int j = threadIdx.x; j < n_cols; j += blockDim.x)
        a += log_out ? ld(dy, base + j) : ld(dy, base + j) * ld(y, base + j);
    const acc_t total = block_sum(a, sh);
    for (int j = threadIdx.x; j < n_cols; j += blockDim.x) {
        acc_t yv = ld(y, base + j), g = ld(dy, base + j);
        st(dx, base + j, log_out ? g - TG_EXP(yv) * total : yv * (g - total) * scale);
    }
""",
    # lse_n = M + log Σ_j e^(z_nj − M) (M = max_j z_nj);  nll_n = lse_n − z_n,t  (0 where t = ignore_index,
    # NaN where t is outside [0, V): a visible error, as a kernel cannot raise).
    "tg_cross_entropy_fwd": r"""
    __shared__ acc_t sh[32];
    const long long row = blockIdx.x, base = row * (long long)V;
    acc_t m = TG_NEG_INF, d = 0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        acc_t v = ld(z, base + j);
        if (v > m) { d = d * TG_EXP(m - v) + (acc_t)1; m = v; }
        else if (v != TG_NEG_INF) d += TG_EXP(v - m);
    }
    const acc_t M = block_max(m, sh);
    const acc_t D = block_sum(m == TG_NEG_INF ? (acc_t)0 : d * TG_EXP(m - M), sh);
    if (threadIdx.x == 0) {
        const long long tgt = t[row];
        const acc_t l = M + TG_LOG(D);
        lse[row] = l;
        if (tgt == ignore_index) nll[row] = (acc_t)0;
        else if (tgt < 0 || tgt >= V) nll[row] = TG_NAN;
        else nll[row] = l - ld(z, base + tgt);
    }
""",
}


def row_module_source(dtype) -> str:
    """One CUDA module holding every row kernel for `dtype` (extern "C", so names are not mangled)."""
    ct = ctype(dtype)
    parts = [f"// tinygpt row kernels, {ct.dtype} (arithmetic in {ct.acc})\n",
             f"typedef {ct.storage} scalar_t;\ntypedef {ct.acc} acc_t;\n",
             math_preamble(ct), _constants(ct), _load_store(ct), _REDUCE]
    for name, params in ROW_KERNELS.items():
        parts.append(f'\nextern "C" __global__ void {name}({params}) {{{_ROW_BODIES[name]}}}\n')
    return "".join(parts)


# --- elementwise kernels --------------------------------------------------------------------------------
# name -> (in_params, out_params, operation). "{A}" is replaced by the accumulator C type and "{AD}" by its
# NumPy name (scalar parameters are declared in it). `T` stays a CuPy type placeholder, bound to the
# array dtype at the call.
ELEMENTWISE = {
    # y = x Φ(x),  Φ(x) = ½ erfc(−x/√2);  Φ is an output too: the backward reuses it.
    "gelu_fwd": ("T x", "T y, T cdf", """
        {A} xv = ({A})x;
        {A} c = ({A})0.5 * TG_ERFC(-xv * ({A})0.70710678118654752440);
        cdf = (T)c;
        y = (T)(xv * c);"""),
    # dx = g (Φ(x) + x φ(x)),  φ(x) = e^(−x²/2) / √(2π)
    "gelu_bwd": ("T g, T x, T cdf", "T dx", """
        {A} xv = ({A})x;
        {A} pdf = ({A})0.39894228040143267794 * TG_EXP(({A})-0.5 * xv * xv);
        dx = (T)(({A})g * (({A})cdf + xv * pdf));"""),
    # y = ½x(1 + tanh u),  u = √(2/π)(x + 0.044715x³)
    "gelu_tanh_fwd": ("T x", "T y", """
        {A} xv = ({A})x;
        {A} u = ({A})0.79788456080286535588 * (xv + ({A})0.044715 * xv * xv * xv);
        y = (T)(({A})0.5 * xv * (({A})1 + TG_TANH(u)));"""),
    # dy/dx = ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²),  t = tanh u
    "gelu_tanh_bwd": ("T g, T x", "T dx", """
        {A} xv = ({A})x;
        {A} k = ({A})0.79788456080286535588;
        {A} t = TG_TANH(k * (xv + ({A})0.044715 * xv * xv * xv));
        {A} dy = ({A})0.5 * (({A})1 + t)
               + ({A})0.5 * xv * (({A})1 - t * t) * k * (({A})1 + ({A})0.134145 * xv * xv);
        dx = (T)(({A})g * dy);"""),
    # dz_nj = (e^(z_nj − lse_n) − [j = t_n]) · g / n_valid, 0 on rows whose target is ignore_index.
    # g (the upstream gradient) and n_valid stay on the device: read here, never on the host.
    "cross_entropy_bwd": ("T z, raw {AD} lse, raw int64 tgt, raw T gout, raw int64 n_valid, "
                          "int64 n_classes, int64 ignore_index", "T dz", """
        long long row = i / n_classes, col = i - row * n_classes;
        long long target = tgt[row];
        {A} val = 0;
        if (target != ignore_index) {
            val = TG_EXP(({A})z - lse[row]);
            if (col == target) val -= ({A})1;
            val *= ({A})gout[0] / ({A})n_valid[0];
        }
        dz = (T)val;"""),
    # One Adam/AdamW step, in place on (θ, m, v); the scalars come from the host's Python floats:
    #   θ ← θ·decay (AdamW: decay = 1 − αλ, else 1);  g ← g + l2·θ (Adam: l2 = λ, else 0)
    #   m ← β1 m + (1 − β1) g;   v ← β2 v + (1 − β2) g²
    #   θ ← θ − step_size · m / (√v · inv_sqrt_bc2 + ε),  step_size = α/(1 − β1^t), inv_sqrt_bc2 = 1/√(1 − β2^t)
    # (1 − β1 and 1 − β2 are computed on the host in float64 and passed rounded, as cpu_kernels does.)
    "adam": ("T grad, {AD} decay, {AD} l2, {AD} beta1, {AD} one_minus_beta1, {AD} beta2, "
             "{AD} one_minus_beta2, {AD} eps, {AD} step_size, {AD} inv_sqrt_bc2", "T theta, T m, T v", """
        {A} th = ({A})theta * decay;
        {A} gv = ({A})grad;
        if (l2 != ({A})0) gv = th * l2 + gv;
        {A} mv = beta1 * ({A})m + one_minus_beta1 * gv;
        {A} vv = beta2 * ({A})v + one_minus_beta2 * (gv * gv);
        {A} denom = TG_SQRT(vv) * inv_sqrt_bc2 + eps;
        theta = (T)(th - (mv / denom) * step_size);
        m = (T)mv;
        v = (T)vv;"""),
}


def elementwise_spec(name: str, dtype) -> tuple[str, str, str, str, str]:
    """(in_params, out_params, operation, kernel_name, preamble) for cupy.ElementwiseKernel."""
    if name not in ELEMENTWISE:
        raise KeyError(f"no elementwise kernel {name!r}; the kernels are {sorted(ELEMENTWISE)}")
    ct = ctype(dtype)
    ins, outs, op = ELEMENTWISE[name]
    sub = {"{A}": ct.acc, "{AD}": ct.acc_dtype}
    for k, v in sub.items():
        ins, outs, op = ins.replace(k, v), outs.replace(k, v), op.replace(k, v)
    return ins, outs, op.strip("\n"), f"tg_{name}_{ct.suffix}", math_preamble(ct)
