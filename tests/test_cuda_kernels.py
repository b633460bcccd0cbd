"""The fused CUDA kernels (tinygpt/cuda/kernels.py, tinygpt/cuda/sources.py), checked as far as a machine without a GPU
allows, plus `gpu` tests that compare every kernel with the generic CuPy path (run them with pytest -m gpu).

Without a GPU:
  * launch geometry, the dtype -> C type table, source generation, argument checks, dispatch decisions;
  * ops on a stand-in "cuda" device call the right kernel with the right arguments (the kernels replaced by
    NumPy versions of their documented math), and give the CPU ops' results;
  * the CUDA sources compile with nvcc (skipped when nvcc is absent);
  * the kernel bodies RUN on the host, compiled by a C++ compiler: elementwise bodies in a plain loop, row
    kernels under a small emulator (one std::thread per CUDA thread, a std::barrier for __syncthreads and a
    slot array for __shfl_xor_sync), and match the CPU ops (skipped when g++ is absent);
  * LossScaler and the matmul-precision switch, with NumPy arrays.
"""
from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import tinygpt
import tinygpt.functional as F
from tinygpt import backend, kernels, optim
from tinygpt.cuda import amp, sources
from tinygpt.cuda import kernels as cuda_kernels
from tinygpt.ops.activations import _on_rows

from cuda_host import (CXX, HOST_DTYPES, NVCC, HostBuilds, HostCuPy, elementwise_translation_unit,
                       host_elementwise, host_rows, parse_params)

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++) to run the kernels on the host")
_no_gpu = pytest.mark.skipif(not backend.is_cuda_available(), reason="needs CuPy and a CUDA GPU")


def gpu(test):
    """Mark a test `gpu` (deselect with -m "not gpu", select with -m gpu) and skip it without CUDA."""
    return pytest.mark.gpu(_no_gpu(test))


# =====================================================================================================
# Pure launch logic
# =====================================================================================================
@pytest.mark.parametrize("dtype, storage, acc", [(np.float16, "unsigned short", "float"),
                                                  (np.float32, "float", "float"),
                                                  (np.float64, "double", "double")])
def test_ctype_maps_each_dtype_to_storage_and_accumulator(dtype, storage, acc):
    for spelling in (dtype, np.dtype(dtype), np.dtype(dtype).name):
        ct = sources.ctype(spelling)
        assert (ct.storage, ct.acc, ct.dtype) == (storage, acc, np.dtype(dtype).name)
    assert sources.ctype(np.float16).elementwise == "float16"   # CuPy's own name for T


@pytest.mark.parametrize("bad", [np.int64, np.bool_, "bfloat16", np.complex64])
def test_ctype_rejects_other_dtypes_with_the_fix(bad):
    with pytest.raises(TypeError, match="float16, float32 or float64.*astype"):
        sources.ctype(bad)


@pytest.mark.parametrize("cols, threads", [(1, 32), (7, 32), (128, 32), (129, 64), (384, 96), (768, 192),
                                           (4096, 1024), (50257, 1024), (10**7, 1024)])
def test_row_threads(cols, threads):
    assert sources.row_threads(cols) == threads


def test_row_threads_is_whole_warps_within_limits():
    for cols in list(range(1, 3000, 7)) + [2**k for k in range(20)]:
        t = sources.row_threads(cols)
        assert t % 32 == 0 and 32 <= t <= 1024
        assert t * 4 >= min(cols, 4096)          # about four elements per thread at most, until the cap
    assert sources.row_threads(1000, max_threads=100) == 96
    with pytest.raises(ValueError, match="at least one column"):
        sources.row_threads(0)


def test_row_launch_is_one_block_per_row():
    assert sources.row_launch(4096, 384) == ((4096,), (96,))
    with pytest.raises(ValueError, match="at least one row"):
        sources.row_launch(0, 10)
    with pytest.raises(ValueError, match="beyond"):
        sources.row_launch(2**31, 10)


@pytest.mark.parametrize("dtype", sources.SUPPORTED_DTYPES)
def test_row_module_source_has_every_kernel_once(dtype):
    src = sources.row_module_source(dtype)
    ct = sources.ctype(dtype)
    for name, params in sources.ROW_KERNELS.items():
        assert src.count(f'extern "C" __global__ void {name}({params})') == 1
    assert f"typedef {ct.storage} scalar_t;" in src and f"typedef {ct.acc} acc_t;" in src
    assert ("cvt.rn.f16.f32" in src) == (dtype == "float16")
    assert "#include" not in src                   # NVRTC needs no header search path
    f = "f" if ct.acc == "float" else ""
    assert f"#define TG_EXP exp{f}\n" in src


@pytest.mark.parametrize("dtype", sources.SUPPORTED_DTYPES)
def test_elementwise_specs(dtype):
    ct = sources.ctype(dtype)
    for name in sources.ELEMENTWISE:
        ins, outs, op, kname, pre = sources.elementwise_spec(name, dtype)
        assert kname == f"tg_{name}_{ct.suffix}"
        assert "{" not in ins + outs and "{A}" not in op and "{AD}" not in op
        for _raw, _typ, pname in parse_params(ins) + parse_params(outs):
            assert pname not in ("n", "i") and not pname.startswith("_"), "CuPy reserves n, i and _names"
        assert pre == sources.math_preamble(ct)
        if ct.acc == "float":
            assert "double" not in op                 # float16/32 kernels never compute in double
    with pytest.raises(KeyError, match="no elementwise kernel"):
        sources.elementwise_spec("nope", "float32")


def test_dispatch_rules():
    x32, i64, x16 = np.zeros((2, 3), np.float32), np.zeros(3, np.int64), np.zeros(3, np.float16)
    assert kernels.fused(backend.get_device("cpu"), x32) == "cpu"
    assert kernels.fused("cuda", x32, x16) == "cuda"
    assert kernels.fused(backend.Device("cuda", np, object), x32) == "cuda"      # by the device's name
    assert kernels.fused("cuda", x32, i64) is None and kernels.fused("cuda", x32.astype(np.int32)) is None
    assert _on_rows(x32, -1) and _on_rows(x32, 1)               # the softmax kernels take the last axis,
    assert not _on_rows(x32, 0) and not _on_rows(np.zeros((2, 0), np.float32), -1)     # of a non-empty array
    with kernels.disabled():
        assert kernels.fused("cuda", x32) is None


def test_importing_the_kernels_does_not_import_cupy():
    code = ("import sys, tinygpt, tinygpt.cuda, tinygpt.cuda.kernels, tinygpt.kernels, tinygpt.ops.nn; "
            "print('cupy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# =====================================================================================================
# NumPy versions of each kernel's documented math (float64), for the stand-in device
# =====================================================================================================
def _cdf(x):
    return 0.5 * np.vectorize(math.erfc)(-np.asarray(x, np.float64) / math.sqrt(2.0))


def ref_gelu_forward(x):
    c = _cdf(x)
    return (x * c).astype(x.dtype), c.astype(x.dtype)


def ref_gelu_backward(g, x, cdf):
    pdf = np.exp(-0.5 * x.astype(np.float64) ** 2) / math.sqrt(2 * math.pi)
    return (g * (cdf.astype(np.float64) + x * pdf)).astype(x.dtype)


def _tanh_parts(x):
    x = x.astype(np.float64)
    k = math.sqrt(2 / math.pi)
    return x, k, np.tanh(k * (x + 0.044715 * x ** 3))


def ref_gelu_tanh_forward(x):
    xv, _, t = _tanh_parts(x)
    return (0.5 * xv * (1 + t)).astype(x.dtype)


def ref_gelu_tanh_backward(g, x):
    xv, k, t = _tanh_parts(x)
    return (g * (0.5 * (1 + t) + 0.5 * xv * (1 - t * t) * k * (1 + 3 * 0.044715 * xv * xv))).astype(x.dtype)


def ref_layer_norm_forward(x, w, b, eps):
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    r = 1 / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + eps)
    xh = (x64 - mu) * r
    y = xh * w + (0 if b is None else b)
    return y.astype(x.dtype), xh.astype(x.dtype), r.astype(x.dtype)


def ref_layer_norm_backward_dx(g, xhat, rstd, w):
    d = g.astype(np.float64) * w
    return (rstd * (d - d.mean(-1, keepdims=True) - xhat * (d * xhat).mean(-1, keepdims=True))).astype(g.dtype)


def ref_softmax_forward(s, scale=1.0, causal=False, log=False, inplace=False):
    v = s.astype(np.float64) * scale
    if causal:
        Tq, Tk = s.shape[-2:]
        v = np.where(np.triu(np.ones((Tq, Tk), bool), k=Tk - Tq + 1), -np.inf, v)
    v = v - v.max(-1, keepdims=True)
    out = v - np.log(np.exp(v).sum(-1, keepdims=True)) if log else np.exp(v) / np.exp(v).sum(-1, keepdims=True)
    out = out.astype(s.dtype)
    if inplace:
        s[...] = out
        return s
    return out


def ref_softmax_backward(dy, y, scale=1.0, log=False, inplace=False):
    d, y64 = dy.astype(np.float64), y.astype(np.float64)
    if log:
        out = d - np.exp(y64) * d.sum(-1, keepdims=True)
    else:
        out = y64 * (d - (d * y64).sum(-1, keepdims=True)) * scale
    out = out.astype(y.dtype)
    if inplace:
        dy[...] = out
        return dy
    return out


def ref_cross_entropy_rows(z, t, ignore_index):
    """(lse (N,), nll (N,)) of the forward kernel."""
    z64 = z.astype(np.float64)
    m = z64.max(-1)
    lse = m + np.log(np.exp(z64 - m[:, None]).sum(-1))
    valid = t != ignore_index
    nll = np.where(valid, lse - z64[np.arange(len(t)), np.where(valid, t, 0)], 0.0)
    nll = np.where(valid & ((t < 0) | (t >= z.shape[-1])), np.nan, nll)
    return lse, nll


def ref_cross_entropy_forward(logits, targets, ignore_index):
    z, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).astype(np.int64)
    lse, nll = ref_cross_entropy_rows(z, t, ignore_index)
    n_valid = np.array((t != ignore_index).sum())
    return np.array(nll.sum() / n_valid, dtype=logits.dtype), lse.astype(np.float32), n_valid


def ref_cross_entropy_backward(g, logits, targets, lse, n_valid, ignore_index):
    z, t = logits.reshape(-1, logits.shape[-1]).astype(np.float64), targets.reshape(-1)
    d = np.exp(z - lse[:, None].astype(np.float64))
    d[np.arange(len(t)), np.where(t != ignore_index, t, 0)] -= (t != ignore_index)
    d *= ((t != ignore_index) * float(g) / float(n_valid))[:, None]
    return d.astype(logits.dtype).reshape(logits.shape)


def ref_adam_step(params, lr, beta1, beta2, eps, weight_decay, decoupled):
    for theta, g, m, v, t in params:
        th = theta.astype(np.float64) * ((1 - lr * weight_decay) if decoupled else 1.0)
        gv = g + (0.0 if decoupled else weight_decay) * th
        m[...] = beta1 * m + (1 - beta1) * gv
        v[...] = beta2 * v + (1 - beta2) * gv * gv
        theta[...] = th - lr / (1 - beta1 ** t) * m / (np.sqrt(v) / math.sqrt(1 - beta2 ** t) + eps)


def ref_flag_bad_ids(flag, ids, bound, ignore_index, code):
    """flag = [code, the first id outside [0, bound) that is not ignore_index], unless flag[0] is set."""
    t = ids.reshape(-1).astype(np.int64)
    bad = ((t < 0) | (t >= bound)) & (True if ignore_index is None else (t != ignore_index))
    if flag[0] == 0 and bad.any():
        flag[:] = code, t[bad.argmax()]


REFS = {name: globals()[f"ref_{name}"] for name in (
    "gelu_forward", "gelu_backward", "gelu_tanh_forward", "gelu_tanh_backward", "layer_norm_forward",
    "layer_norm_backward_dx", "softmax_forward", "softmax_backward", "cross_entropy_forward",
    "cross_entropy_backward", "adam_step", "flag_bad_ids")}


# =====================================================================================================
# The ops on a stand-in "cuda" device: NumPy arrays in Tensors whose device is named "cuda", so every op
# takes its fused branch (ops carry their inputs' device to their outputs). The kernels are replaced by
# the references above, and each call is logged.
# =====================================================================================================
class _NeverAnArray:
    pass


def on(device, array, requires_grad=False):
    """A Tensor holding a NumPy array; on "cuda" (the stand-in) only its device is set."""
    t = tinygpt.tensor(array, requires_grad=requires_grad, device="cpu", dtype=array.dtype)
    if device == "cuda":
        t.device = backend.get_device("cuda")
    return t


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setitem(backend._DEVICES, "cuda", backend.Device("cuda", np, _NeverAnArray))
    calls = []
    for name, ref in REFS.items():
        def logged(*args, _ref=ref, _name=name, **kw):
            calls.append((_name, args, kw))
            return _ref(*args, **kw)
        monkeypatch.setattr(cuda_kernels, name, logged)
    return calls


def _run_both(fn, arrays, device):
    """fn(*tensors) on `device` -> (output, grads) as NumPy; the output is reduced with a fixed weight."""
    ts = [on(device, a, requires_grad=a.dtype.kind == "f") for a in arrays]
    out = fn(*ts)
    w = np.random.default_rng(1).standard_normal(out.shape).astype(out.dtype)
    (out * on(device, w)).sum().backward()
    return np.asarray(out.data), [None if t.grad is None else np.asarray(t.grad) for t in ts]


OP_CASES = {
    "gelu": (lambda x: F.gelu(x), ["gelu_forward", "gelu_backward"]),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), ["gelu_tanh_forward", "gelu_tanh_backward"]),
    "softmax": (lambda x: F.softmax(x, axis=-1), ["softmax_forward", "softmax_backward"]),
    "log_softmax": (lambda x: F.log_softmax(x, axis=-1), ["softmax_forward", "softmax_backward"]),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, w, b), ["layer_norm_forward", "layer_norm_backward_dx"]),
    "layer_norm_nobias": (lambda x, w: F.layer_norm(x, w), ["layer_norm_forward", "layer_norm_backward_dx"]),
    "cross_entropy": (lambda z, t: F.cross_entropy(z, t, ignore_index=2).reshape(1),
                      ["flag_bad_ids", "cross_entropy_forward", "cross_entropy_backward"]),
    "attention": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True),
                  ["softmax_forward", "softmax_backward"]),
    "attention_kv_cache": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=True, scale=0.3),
                           ["softmax_forward", "softmax_backward"]),
}


def _op_inputs(name, rng):
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    if name.startswith("layer_norm"):
        return [r(2, 3, 8), 1 + r(8)] + ([r(8)] if name == "layer_norm" else [])
    if name == "cross_entropy":
        return [r(3, 4, 6) * 2, np.array([[0, 2, 5, 1], [2, 3, 3, 4], [5, 0, 1, 2]], np.int64)]
    if name == "attention":
        return [r(2, 3, 5, 4), r(2, 3, 5, 4), r(2, 3, 5, 4)]
    if name == "attention_kv_cache":
        return [r(1, 2, 3, 4), r(1, 2, 7, 4), r(1, 2, 7, 4)]
    return [r(3, 5, 7) * 2]


@pytest.mark.parametrize("name", OP_CASES)
def test_op_takes_the_fused_branch_on_cuda_and_matches_cpu(name, fake_cuda, rng):
    fn, kernels = OP_CASES[name]
    arrays = _op_inputs(name, rng)
    out_cpu, grads_cpu = _run_both(fn, arrays, "cpu")
    assert not fake_cuda, "the CPU path must not touch the CUDA kernels"
    out_gpu, grads_gpu = _run_both(fn, arrays, "cuda")
    assert [c[0] for c in fake_cuda] == kernels
    np.testing.assert_allclose(out_gpu, out_cpu, rtol=2e-5, atol=2e-6)
    for gc, gg in zip(grads_cpu, grads_gpu):
        assert (gc is None) == (gg is None)
        if gc is not None:
            np.testing.assert_allclose(gg, gc, rtol=2e-4, atol=2e-6)


def test_attention_passes_scale_and_causal_and_works_in_place(fake_cuda, rng):
    q, k, v = (on("cuda", rng.standard_normal((1, 2, 3, 16)).astype(np.float32), True) for _ in range(3))
    F.scaled_dot_product_attention(q, k, v, causal=True).sum().backward()
    (_, fargs, fkw), (_, bargs, bkw) = fake_cuda
    assert fkw == {"causal": True, "inplace": True} and fargs[1] == np.float32(0.25)
    assert bkw == {"inplace": True} and bargs[2] == np.float32(0.25)
    fake_cuda.clear()
    F.scaled_dot_product_attention(q, k, v, causal=False, scale=0.5)
    assert fake_cuda[0][2]["causal"] is False and fake_cuda[0][1][1] == np.float32(0.5)


def test_log_softmax_and_cross_entropy_arguments(fake_cuda, rng):
    x = on("cuda", rng.standard_normal((2, 5)).astype(np.float32), True)
    F.log_softmax(x).sum().backward()
    assert fake_cuda[0][2] == {"log": True} and fake_cuda[1][2] == {"log": True}
    fake_cuda.clear()
    F.cross_entropy(x, on("cuda", np.array([1, -100])), ignore_index=-100).backward()
    (check, cargs, _), (name, args, _), (bname, bargs, _) = fake_cuda
    assert check == "flag_bad_ids" and cargs[2:4] == (5, -100)     # the ids' bound V and ignore_index
    assert name == "cross_entropy_forward" and args[2] == -100 and bargs[-1] == -100
    assert bargs[1] is args[0]                     # the backward gets the forward's logits, lse and n_valid


def test_softmax_over_another_axis_stays_generic(fake_cuda, rng):
    x = on("cuda", rng.standard_normal((3, 4)).astype(np.float32), True)
    F.softmax(x, axis=0).sum().backward()
    assert fake_cuda == []


@pytest.mark.parametrize("opt_cls, kw", [(optim.AdamW, dict(weight_decay=0.1)),
                                         (optim.Adam, dict(weight_decay=0.05)), (optim.Adam, {})])
def test_adam_takes_the_fused_branch_on_cuda_and_matches_cpu(opt_cls, kw, fake_cuda, rng):
    w0 = rng.standard_normal((4, 3)).astype(np.float32)
    grads = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(3)]
    results = {}
    for dev in ("cpu", "cuda"):
        p = tinygpt.nn.Parameter(w0.copy())
        if dev == "cuda":
            p.device = backend.get_device("cuda")
        opt = opt_cls([p], lr=0.01, **kw)
        for g in grads:
            p.grad = g.copy()
            opt.step()
        results[dev] = np.asarray(p.data)
    assert [c[0] for c in fake_cuda] == ["adam_step"] * 3
    assert [c[1][0][0][4] for c in fake_cuda] == [1, 2, 3]          # the host's step count t
    assert fake_cuda[0][2]["decoupled"] is (opt_cls is optim.AdamW)
    np.testing.assert_allclose(results["cuda"], results["cpu"], rtol=1e-5, atol=1e-7)


def test_cpu_ops_never_call_the_cuda_kernels(monkeypatch, rng):
    def boom(*a, **k):
        raise AssertionError("a CUDA kernel was called for a CPU tensor")
    for name in list(REFS) + ["elementwise", "row_module", "row_function", "raw_kernel"]:
        monkeypatch.setattr(cuda_kernels, name, boom)
    for name, (fn, _) in OP_CASES.items():
        _run_both(fn, _op_inputs(name, rng), "cpu")
    p = tinygpt.nn.Parameter(tinygpt.tensor(np.ones(3, np.float32)))
    p.grad = np.ones(3, np.float32)
    optim.AdamW([p]).step()


# =====================================================================================================
# nvcc: the sources compile (real evidence of valid CUDA C, short of running them)
# =====================================================================================================
def _nvcc(tmp_path, name, source):
    cu = tmp_path / f"{name}.cu"
    cu.write_text(source)
    cmd = [NVCC, "-c", "-arch=sm_80", "--Werror", "all-warnings", str(cu), "-o", str(tmp_path / "k.o")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"nvcc failed on {name}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


@needs_nvcc
@pytest.mark.parametrize("dtype", sources.SUPPORTED_DTYPES)
def test_row_kernels_compile_with_nvcc(dtype, tmp_path):
    _nvcc(tmp_path, f"row_{dtype}", sources.row_module_source(dtype))


@needs_nvcc
@pytest.mark.parametrize("dtype", sources.SUPPORTED_DTYPES)
def test_elementwise_kernels_compile_with_nvcc(dtype, tmp_path):
    _nvcc(tmp_path, f"ew_{dtype}", elementwise_translation_unit(sources.ELEMENTWISE, dtype, "cuda"))


@needs_nvcc
def test_flag_bad_ids_kernel_compiles_with_nvcc(tmp_path):
    _nvcc(tmp_path, "flag_bad_ids", cuda_kernels.FLAG_BAD_IDS_SOURCE)


# =====================================================================================================
# The kernels run on the host (float32 and float64; float16 needs the GPU's cvt instruction)
# =====================================================================================================
@pytest.fixture(scope="module")
def host_libs(tmp_path_factory):
    """The kernels built for the host (see tests/cuda_host.py), compiled on first use."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    return HostBuilds(tmp_path_factory.mktemp("host_kernels"))


TOL = {"float32": dict(rtol=2e-5, atol=2e-6), "float64": dict(rtol=1e-11, atol=1e-13)}


def _grad_of(fn, arrays, g, wrt=0):
    """Gradient of sum(fn(*arrays) * g) w.r.t. arrays[wrt], by tinygpt on the CPU."""
    ts = [tinygpt.tensor(a, requires_grad=(i == wrt), dtype=a.dtype) for i, a in enumerate(arrays)]
    out = fn(*ts)
    (out * tinygpt.tensor(g, dtype=g.dtype)).sum().backward()
    return out.numpy(), ts[wrt].grad


@needs_cxx
@pytest.mark.parametrize("dtype", HOST_DTYPES)
def test_host_gelu_matches_the_cpu_op(dtype, host_libs, rng):
    x = np.concatenate([np.linspace(-12, 12, 97), rng.standard_normal(200) * 3, [0.0, -0.0]]).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    y, cdf, dx = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    host_elementwise(host_libs, "gelu_fwd", dtype, x.size, x, y, cdf)
    host_elementwise(host_libs, "gelu_bwd", dtype, x.size, g, x, cdf, dx)
    y_cpu, dx_cpu = _grad_of(F.gelu, [x], g)
    tol = dict(rtol=2e-6, atol=5e-7) if dtype == "float32" else TOL[dtype]   # the CPU's float32 Φ is A&S 7.1.26
    np.testing.assert_allclose(cdf, _cdf(x), **tol)
    np.testing.assert_allclose(y, y_cpu, **tol)
    np.testing.assert_allclose(dx, dx_cpu, **tol)
    yt, dxt = np.empty_like(x), np.empty_like(x)
    host_elementwise(host_libs, "gelu_tanh_fwd", dtype, x.size, x, yt)
    host_elementwise(host_libs, "gelu_tanh_bwd", dtype, x.size, g, x, dxt)
    yt_cpu, dxt_cpu = _grad_of(lambda t: F.gelu(t, approximate="tanh"), [x], g)
    np.testing.assert_allclose(yt, yt_cpu, **TOL[dtype])
    np.testing.assert_allclose(dxt, dxt_cpu, **TOL[dtype])


@needs_cxx
@pytest.mark.parametrize("dtype", HOST_DTYPES)
@pytest.mark.parametrize("gout", [1.0, 2.5])
def test_host_cross_entropy_backward_matches_the_cpu_op(dtype, gout, host_libs, rng):
    N, V, ignore = 9, 13, 3
    z = (rng.standard_normal((N, V)) * 3).astype(dtype)
    t = rng.integers(0, V, N).astype(np.int64)
    t[[1, 4]] = ignore
    lse, _ = ref_cross_entropy_rows(z, t, ignore)
    lse = lse.astype(sources.ctype(dtype).acc_dtype)
    n_valid = np.array([(t != ignore).sum()], np.int64)
    dz = np.empty_like(z)
    host_elementwise(host_libs, "cross_entropy_bwd", dtype, z.size, z, lse, t, np.array([gout], dtype), n_valid,
                     V, ignore, dz)
    zt = tinygpt.tensor(z, requires_grad=True, dtype=dtype)
    (F.cross_entropy(zt, tinygpt.tensor(t), ignore_index=ignore) * gout).backward()
    np.testing.assert_allclose(dz, zt.grad, **TOL[dtype])
    assert not dz[[1, 4]].any()


@needs_cxx
@pytest.mark.parametrize("dtype", HOST_DTYPES)
@pytest.mark.parametrize("opt_cls, wd", [(optim.AdamW, 0.1), (optim.Adam, 0.05), (optim.AdamW, 0.0)])
def test_host_adam_matches_the_cpu_optimizer(dtype, opt_cls, wd, host_libs, rng):
    theta0 = rng.standard_normal(37).astype(dtype)
    grads = [rng.standard_normal(37).astype(dtype) for _ in range(4)]
    p = tinygpt.nn.Parameter(tinygpt.tensor(theta0.copy(), dtype=dtype))
    opt = opt_cls([p], lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd)
    theta, m, v = theta0.copy(), np.zeros_like(theta0), np.zeros_like(theta0)
    lr, b1, b2, eps = 0.02, 0.8, 0.99, 1e-6
    decoupled = opt_cls is optim.AdamW
    for t, g in enumerate(grads, start=1):
        p.grad = g.copy()
        opt.step()
        host_elementwise(host_libs, "adam", dtype, theta.size, g,
                         1 - lr * wd if decoupled else 1.0, 0.0 if decoupled else wd, b1, 1 - b1, b2, 1 - b2, eps,
                         lr / (1 - b1 ** t), 1 / math.sqrt(1 - b2 ** t), theta, m, v)
    np.testing.assert_allclose(theta, p.data, **TOL[dtype])
    np.testing.assert_allclose(m, opt.state[p]["exp_avg"], **TOL[dtype])
    np.testing.assert_allclose(v, opt.state[p]["exp_avg_sq"], **TOL[dtype])


def _blocks(cols):
    return sorted({sources.row_threads(cols), 32, 96})


@needs_cxx
@pytest.mark.parametrize("dtype", HOST_DTYPES)
@pytest.mark.parametrize("C", [1, 7, 100, 385])
def test_host_layer_norm_matches_the_cpu_op(dtype, C, host_libs, rng):
    N, eps = 4, 1e-5
    x = (rng.standard_normal((N, C)) * 2 + 3).astype(dtype)
    w, b = (1 + rng.standard_normal(C)).astype(dtype), rng.standard_normal(C).astype(dtype)
    g = rng.standard_normal((N, C)).astype(dtype)
    y_cpu, dx_cpu = _grad_of(lambda xt, wt, bt: F.layer_norm(xt, wt, bt, eps), [x, w, b], g)
    y_ref, xh_ref, r_ref = ref_layer_norm_forward(x, w, b, eps)
    for block in _blocks(C):
        for has_bias in (1, 0):
            y, xhat, rstd = np.empty_like(x), np.empty_like(x), np.empty(N, dtype)
            host_rows(host_libs, "tg_layer_norm_fwd", dtype, N, block, x, w, b, y, xhat, rstd, C, has_bias, eps)
            np.testing.assert_allclose(y, y_cpu if has_bias else y_cpu - b, **TOL[dtype])
            np.testing.assert_allclose(xhat, xh_ref, **TOL[dtype])
            np.testing.assert_allclose(rstd, r_ref[:, 0], **TOL[dtype])
        dx = np.empty_like(x)
        host_rows(host_libs, "tg_layer_norm_bwd", dtype, N, block, g, xhat, rstd, w, dx, C)
        np.testing.assert_allclose(dx, dx_cpu, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10)


@needs_cxx
@pytest.mark.parametrize("dtype", HOST_DTYPES)
@pytest.mark.parametrize("Tk", [1, 5, 33, 300])
def test_host_softmax_matches_the_cpu_ops(dtype, Tk, host_libs, rng):
    x = (rng.standard_normal((3, Tk)) * 4).astype(dtype)
    if Tk > 1:
        x[1, ::3] = -np.inf                                 # masked_fill'ed entries: p = 0, log p = -inf
    g = rng.standard_normal(x.shape).astype(dtype)
    for log, op in ((0, F.softmax), (1, F.log_softmax)):
        with np.errstate(invalid="ignore"):                 # -inf · g in the summed output only
            y_cpu, dx_cpu = _grad_of(lambda t: op(t, axis=-1), [x], g)
        for block in _blocks(Tk):
            y = np.empty_like(x)
            host_rows(host_libs, "tg_softmax_fwd", dtype, 3, block, x, y, Tk, 1, 0, log, 1.0)
            np.testing.assert_allclose(y, y_cpu, **TOL[dtype])
            dx = np.empty_like(x)
            host_rows(host_libs, "tg_softmax_bwd", dtype, 3, block, g, y, dx, Tk, log, 1.0)
            np.testing.assert_allclose(dx, dx_cpu, **TOL[dtype])


@needs_cxx
@pytest.mark.parametrize("dtype", HOST_DTYPES)
@pytest.mark.parametrize("Tq, Tk", [(6, 6), (3, 7), (1, 40), (33, 33)])
def test_host_attention_softmax_is_causal_scaled_and_in_place(dtype, Tq, Tk, host_libs, rng):
    from tinygpt import cpu_kernels
    from tinygpt.ops.attention import _additive_causal_mask
    scale = 0.37
    s = rng.standard_normal((2, 2, Tq, Tk)).astype(dtype)
    dp = rng.standard_normal(s.shape).astype(dtype)
    p_cpu = cpu_kernels.softmax_lastaxis_(s.copy(), scale, _additive_causal_mask(Tq, Tk, s.dtype))
    ds_cpu = cpu_kernels.softmax_backward_(dp.copy(), p_cpu, scale)
    rows = 2 * 2 * Tq
    for block in _blocks(Tk):
        p = s.copy()                                         # in place, as the attention op launches it
        host_rows(host_libs, "tg_softmax_fwd", dtype, rows, block, p, p, Tk, Tq, 1, 0, scale)
        np.testing.assert_allclose(p, p_cpu, **TOL[dtype])
        assert (p[..., np.triu(np.ones((Tq, Tk), bool), k=Tk - Tq + 1)] == 0).all()
        ds = dp.copy()
        host_rows(host_libs, "tg_softmax_bwd", dtype, rows, block, ds, p, ds, Tk, 0, scale)
        np.testing.assert_allclose(ds, ds_cpu, **TOL[dtype])


@needs_cxx
@pytest.mark.parametrize("dtype", HOST_DTYPES)
@pytest.mark.parametrize("V", [2, 65, 1000])
def test_host_cross_entropy_forward_matches_the_cpu_op(dtype, V, host_libs, rng):
    N, ignore = 6, -100
    z = (rng.standard_normal((N, V)) * 5).astype(dtype)
    t = rng.integers(0, V, N).astype(np.int64)
    t[2] = ignore
    acc = sources.ctype(dtype).acc_dtype
    loss_cpu = F.cross_entropy(tinygpt.tensor(z, dtype=dtype), tinygpt.tensor(t), ignore_index=ignore).item()
    lse_ref, nll_ref = ref_cross_entropy_rows(z, t, ignore)
    for block in _blocks(V):
        lse, nll = np.empty(N, acc), np.empty(N, acc)
        host_rows(host_libs, "tg_cross_entropy_fwd", dtype, N, block, z, t, lse, nll, V, ignore)
        np.testing.assert_allclose(lse, lse_ref, **TOL[dtype])
        np.testing.assert_allclose(nll, nll_ref, **TOL[dtype])
        assert nll[2] == 0
        np.testing.assert_allclose(nll.sum() / (N - 1), loss_cpu, **TOL[dtype])
    bad = t.copy()
    bad[0], bad[1] = V, -1                                   # out of range, and not ignore_index
    host_rows(host_libs, "tg_cross_entropy_fwd", dtype, N, 32, z, bad, lse, nll, V, ignore)
    assert np.isnan(nll[:2]).all() and np.isfinite(nll[2:]).all()


# =====================================================================================================
# End to end on the host: the ops on the stand-in "cuda" device, through the real launchers in
# cuda/kernels.py, with a stand-in for the few CuPy calls they make (RawModule, ElementwiseKernel) that
# runs the host-compiled kernels and checks every argument's type the way the CUDA ABI needs it.
# =====================================================================================================
@pytest.fixture
def host_cuda(monkeypatch, host_libs):
    monkeypatch.setitem(backend._DEVICES, "cuda", backend.Device("cuda", np, _NeverAnArray))
    monkeypatch.setattr(cuda_kernels, "_cupy", lambda: HostCuPy(host_libs))
    cached = (cuda_kernels.row_module, cuda_kernels.row_function, cuda_kernels.elementwise, cuda_kernels.raw_kernel)
    for c in cached:
        c.cache_clear()
    yield
    for c in cached:
        c.cache_clear()


@needs_cxx
@pytest.mark.parametrize("dtype", HOST_DTYPES)
@pytest.mark.parametrize("name", OP_CASES)
def test_host_end_to_end_op_matches_cpu_and_the_reference(name, dtype, host_cuda, rng):
    """The CUDA kernels against the CPU op (its kernels) and against the op's reference math on the same
    stand-in device (TINYGPT_KERNELS=reference's path)."""
    fn, _ = OP_CASES[name]
    arrays = [a.astype(dtype) if a.dtype.kind == "f" else a for a in _op_inputs(name, rng)]
    out_gpu, grads_gpu = _run_both(fn, arrays, "cuda")
    out_cpu, grads_cpu = _run_both(fn, arrays, "cpu")
    with kernels.disabled():
        out_ref, grads_ref = _run_both(fn, arrays, "cuda")
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)
    for out, grads in ((out_cpu, grads_cpu), (out_ref, grads_ref)):
        assert out_gpu.dtype == out.dtype
        np.testing.assert_allclose(out_gpu, out, **tol)
        for gc, gg in zip(grads, grads_gpu):
            assert (gc is None) == (gg is None)
            if gc is not None:
                np.testing.assert_allclose(gg, gc, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)


@needs_cxx
def test_host_end_to_end_layer_norm_of_a_strided_view(host_cuda, rng):
    x = rng.standard_normal((6, 4, 5)).astype(np.float32)
    w = (1 + rng.standard_normal(4)).astype(np.float32)
    fn = lambda xt, wt: F.layer_norm(xt.transpose(1, 2), wt)  # noqa: E731  (.., 4) is a strided view
    out_cpu, grads_cpu = _run_both(fn, [x, w], "cpu")
    out_gpu, grads_gpu = _run_both(fn, [x, w], "cuda")
    np.testing.assert_allclose(out_gpu, out_cpu, rtol=2e-5, atol=2e-6)
    for gc, gg in zip(grads_cpu, grads_gpu):
        np.testing.assert_allclose(gg, gc, rtol=2e-4, atol=2e-6)


@needs_cxx
@pytest.mark.parametrize("opt_cls, wd", [(optim.AdamW, 0.1), (optim.Adam, 0.05)])
def test_host_end_to_end_adam_matches_cpu(opt_cls, wd, host_cuda, rng):
    w0 = rng.standard_normal((5, 3)).astype(np.float32)
    grads = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(3)]
    results = {}
    for dev, fused in (("cpu", True), ("cuda", True), ("cuda", False)):
        with contextlib.nullcontext() if fused else kernels.disabled():
            p = tinygpt.nn.Parameter(w0.copy())
            if dev == "cuda":
                p.device = backend.get_device("cuda")
            opt = opt_cls([p], lr=0.01, weight_decay=wd)
            for g in grads:
                p.grad = g.copy()
                opt.step()
            results[dev, fused] = np.asarray(p.data)
    np.testing.assert_allclose(results["cuda", True], results["cpu", True], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(results["cuda", True], results["cuda", False], rtol=1e-6, atol=1e-7)


def _host_flag(host_libs, ids, bound, ignore=None, flag=(0, 0)):
    """Run tg_flag_bad_ids on the host emulator, as the launcher does; returns the flag."""
    flag = np.array(flag, np.int64)
    k = HostCuPy(host_libs).RawKernel(cuda_kernels.FLAG_BAD_IDS_SOURCE, "tg_flag_bad_ids")
    t = np.ascontiguousarray(ids.reshape(-1), dtype=np.int64)
    k((1,), (cuda_kernels.FLAG_BAD_IDS_THREADS,), (t, np.int64(t.size), np.int64(bound),
                                                   np.int64(0 if ignore is None else ignore),
                                                   np.int32(ignore is not None), np.int64(7), flag))
    return flag.tolist()


@needs_cxx
def test_host_flag_bad_ids_keeps_the_first_bad_id_in_order(host_libs, rng):
    V = 50
    ids = rng.integers(0, V, 5000)
    assert _host_flag(host_libs, ids, V) == [0, 0]                       # all good: untouched
    for positions, values in (([3], [V]), ([4999], [-1]), ([2100, 1100, 4000], [99, -5, V]),
                              ([1, 2, 3], [-7, V + 1, 10 ** 12]), ([1024, 1023], [V, -1])):
        bad = ids.copy()
        bad[positions] = values
        first = min(positions)
        assert _host_flag(host_libs, bad, V) == [7, bad[first]], positions
    bad = ids.copy()
    bad[[10, 20]] = -100, V
    assert _host_flag(host_libs, bad, V, ignore=-100) == [7, V]          # ignore_index is not an error
    assert _host_flag(host_libs, bad, V, flag=(3, 42)) == [3, 42]        # an earlier error stays


@needs_cxx
def test_host_end_to_end_bad_target_sets_the_flag_with_the_cpu_message(host_cuda, rng):
    """cross_entropy on the stand-in device runs tg_flag_bad_ids (the embedding's ids take the same call;
    the strict device's tests cover both wrappers, tests/test_gpu_readiness.py)."""
    z = rng.standard_normal((3, 4)).astype(np.float32)
    t = np.array([1, 4, -100])
    with pytest.raises(IndexError) as cpu:
        F.cross_entropy(on("cpu", z), on("cpu", t), ignore_index=-100)
    dev = backend.get_device("cuda")
    F.cross_entropy(on("cuda", z), on("cuda", t), ignore_index=-100)     # no raise: the flag holds it
    code, value = dev.error_flag.tolist()
    assert code > 0 and value == 4
    assert backend._ERROR_MESSAGES[code - 1].format(value) == str(cpu.value)


def test_kernels_are_built_once_and_looked_up_once(monkeypatch):
    """RawModule, its functions, RawKernel and ElementwiseKernel are built on first use only."""
    built = []

    class Fn:
        def __call__(self, grid, block, args):
            pass

    class Module:
        def get_function(self, name):
            built.append(("get_function", name))
            return Fn()

    class Cp:
        int64 = np.int64

        def __getattr__(self, name):
            return getattr(np, name)

        def RawModule(self, code):
            built.append(("RawModule",))
            return Module()

        def RawKernel(self, code, name):
            built.append(("RawKernel", name))
            return Fn()

    monkeypatch.setattr(cuda_kernels, "_cupy", lambda: Cp())
    for c in (cuda_kernels.row_module, cuda_kernels.row_function, cuda_kernels.raw_kernel):
        c.cache_clear()
    try:
        x = np.ones((3, 8), np.float32)
        for _ in range(3):
            cuda_kernels.softmax_forward(x)
            cuda_kernels.softmax_backward(x, x)
            cuda_kernels.flag_bad_ids(np.zeros(2, np.int64), np.arange(4), 4, None, 1)
        assert built == [("RawModule",), ("get_function", "tg_softmax_fwd"), ("get_function", "tg_softmax_bwd"),
                         ("RawKernel", "tg_flag_bad_ids")]
    finally:
        for c in (cuda_kernels.row_module, cuda_kernels.row_function, cuda_kernels.raw_kernel):
            c.cache_clear()


# =====================================================================================================
# Matmul precision and LossScaler (CPU, NumPy arrays)
# =====================================================================================================
@pytest.fixture
def precision(monkeypatch):
    """Restores the matmul precision and $CUPY_TF32 after the test."""
    monkeypatch.setenv("CUPY_TF32", os.environ.get("CUPY_TF32", "0"))
    old = amp.get_matmul_precision()
    yield
    amp.set_matmul_precision(old)


def test_set_matmul_precision(precision):
    assert tinygpt.cuda.set_matmul_precision is amp.set_matmul_precision          # the documented name
    for p in amp.PRECISIONS:
        amp.set_matmul_precision(p)
        assert amp.get_matmul_precision() == p
        assert os.environ["CUPY_TF32"] == ("1" if p == "tf32" else "0")
    with pytest.raises(ValueError, match="'fp8' is not one of"):
        amp.set_matmul_precision("fp8")


@pytest.mark.parametrize("p", amp.PRECISIONS)
def test_matmul_is_exact_float32_on_the_cpu_at_any_precision(p, precision, rng):
    amp.set_matmul_precision(p)
    a, b = rng.standard_normal((3, 4, 5)).astype(np.float32), rng.standard_normal((5, 2)).astype(np.float32)
    out = amp.matmul(a, b)
    assert out.dtype == np.float32 and np.array_equal(out, a @ b)
    x = tinygpt.tensor(a, requires_grad=True)
    w = tinygpt.tensor(rng.standard_normal((2, 5)).astype(np.float32), requires_grad=True)
    F.linear(x, w).sum().backward()
    np.testing.assert_array_equal(x.grad, np.ones((3, 4, 2), np.float32) @ w.data)


def _sgd_problem(rng):
    w = tinygpt.nn.Parameter(rng.standard_normal((3, 2)).astype(np.float32))
    x = tinygpt.tensor(rng.standard_normal((4, 3)).astype(np.float32))
    return w, x, optim.SGD([w], lr=0.1)


def test_loss_scaler_step_equals_an_unscaled_step(rng):
    w, x, opt = _sgd_problem(rng)
    w0 = w.data.copy()
    ((x @ w) ** 2).mean().backward()
    expected = w0 - 0.1 * w.grad
    w.grad = None
    scaler = amp.LossScaler(init_scale=2.0 ** 12)
    loss = ((x @ w) ** 2).mean()
    scaled = scaler.scale_loss(loss)
    assert scaled.dtype == np.float32 and scaled.item() == pytest.approx(loss.item() * 4096, rel=1e-6)
    scaled.backward()
    assert scaler.step(opt) is True
    np.testing.assert_allclose(w.data, expected, rtol=1e-6)
    assert (scaler.scale, scaler.good_steps, scaler.skipped_steps) == (4096.0, 1, 0)


def test_loss_scaler_skips_a_step_with_inf_or_nan_and_halves_the_scale(rng):
    w, _, opt = _sgd_problem(rng)
    scaler = amp.LossScaler(init_scale=1024.0)
    for bad in (np.inf, np.nan):
        w0 = w.data.copy()
        g = np.ones((3, 2), np.float32)
        g[1, 1] = bad
        w.grad = g
        assert scaler.step(opt) is False
        np.testing.assert_array_equal(w.data, w0)
    assert (scaler.scale, scaler.skipped_steps, scaler.good_steps) == (256.0, 2, 0)


def test_loss_scaler_grows_after_growth_interval_good_steps(rng):
    w, _, opt = _sgd_problem(rng)
    scaler = amp.LossScaler(init_scale=8.0, growth_interval=3)
    scales = []
    for _ in range(7):
        w.grad = np.ones((3, 2), np.float32)
        scaler.step(opt)
        scales.append(scaler.scale)
    assert scales == [8.0, 8.0, 16.0, 16.0, 16.0, 32.0, 32.0]


def test_loss_scaler_unscales_once_per_step_and_survives_a_state_dict(rng):
    w, _, opt = _sgd_problem(rng)
    scaler = amp.LossScaler(init_scale=4.0)
    w.grad = np.full((3, 2), 8.0, np.float32)
    flag = scaler.unscale_(opt)
    scaler.unscale_(opt)                                 # a second call must not divide again
    assert not bool(flag)
    np.testing.assert_array_equal(w.grad, np.full((3, 2), 2.0, np.float32))
    w0 = w.data.copy()
    scaler.step(opt)
    np.testing.assert_allclose(w.data, w0 - 0.2)
    other = amp.LossScaler(enabled=False)
    other.load_state_dict(scaler.state_dict())
    assert other.state_dict() == scaler.state_dict()
    with pytest.raises(ValueError, match="backoff_factor"):
        amp.LossScaler(backoff_factor=1.5)


def test_disabled_loss_scaler_is_a_pass_through(rng):
    w, x, opt = _sgd_problem(rng)
    scaler = amp.LossScaler(enabled=False)
    loss = ((x @ w) ** 2).mean()
    assert scaler.scale_loss(loss) is loss
    w.grad = np.full((3, 2), np.inf, np.float32)
    assert scaler.step(opt) is True and not np.isfinite(w.data).any()


# =====================================================================================================
# On a GPU (pytest -m gpu): every fused kernel against the generic CuPy path, forward and backward
# =====================================================================================================
def _cuda_run(fn, arrays):
    ts = [tinygpt.tensor(a, requires_grad=a.dtype.kind == "f", device="cuda", dtype=a.dtype) for a in arrays]
    out = fn(*ts)
    w = tinygpt.tensor(np.random.default_rng(1).standard_normal(out.shape).astype(np.float32), device="cuda")
    (out * w).sum().backward()
    return out.numpy(), [None if t.grad is None else backend.to_numpy(t.grad) for t in ts]


@pytest.mark.parametrize("name", OP_CASES)
@gpu
def test_gpu_fused_op_matches_generic_cupy(name, rng):
    fn, _ = OP_CASES[name]
    arrays = _op_inputs(name, rng)
    out_f, grads_f = _cuda_run(fn, arrays)
    with kernels.disabled():
        out_g, grads_g = _cuda_run(fn, arrays)
    np.testing.assert_allclose(out_f, out_g, rtol=1e-5, atol=1e-6)
    for gf, gg in zip(grads_f, grads_g):
        if gg is not None:
            np.testing.assert_allclose(gf, gg, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 768), (8, 4096), (4, 50257)])
@gpu
def test_gpu_big_rows(shape, rng):
    """Rows wider than one block's threads, as GPT-2 sizes have (C = 768, vocab = 50257)."""
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    w = (1 + rng.standard_normal(shape[-1:])).astype(np.float32)
    t = rng.integers(0, shape[-1], shape[0])
    for fn, arrays in ((lambda a, b: F.layer_norm(a, b), [x, w]), (lambda a: F.softmax(a), [x]),
                       (lambda a, tt: F.cross_entropy(a, tt).reshape(1), [x, t])):
        out_f, grads_f = _cuda_run(fn, arrays)
        with kernels.disabled():
            out_g, grads_g = _cuda_run(fn, arrays)
        np.testing.assert_allclose(out_f, out_g, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grads_f[0], grads_g[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("opt_cls", [optim.AdamW, optim.Adam])
@gpu
def test_gpu_fused_adam_matches_generic(opt_cls, rng):
    w0 = rng.standard_normal((64, 33)).astype(np.float32)
    grads = rng.standard_normal((3, 64, 33)).astype(np.float32)
    out = []
    for fused in (True, False):
        with contextlib.nullcontext() if fused else kernels.disabled():
            p = tinygpt.nn.Parameter(tinygpt.tensor(w0, device="cuda"))
            opt = opt_cls([p], lr=0.01, weight_decay=0.1)
            for g in grads:
                p.grad = backend.to_device(g, "cuda")
                opt.step()
            out.append(p.numpy())
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-7)


@gpu
def test_gpu_float16_kernels_track_float32(rng):
    x = rng.standard_normal((16, 96)).astype(np.float32)
    w = np.ones(96, np.float32)
    for name, fn in (("gelu", lambda a: F.gelu(a)), ("softmax", lambda a: F.softmax(a)),
                     ("layer_norm", lambda a: F.layer_norm(a, tinygpt.tensor(w.astype(a.dtype), device="cuda")))):
        y32 = fn(tinygpt.tensor(x, device="cuda")).numpy()
        y16 = fn(tinygpt.tensor(x, device="cuda", dtype=np.float16)).numpy()
        assert y16.dtype == np.float16, name
        np.testing.assert_allclose(y16.astype(np.float32), y32, rtol=2e-2, atol=2e-3, err_msg=name)


@gpu
def test_gpu_training_step_never_syncs(rng):
    """LayerNorm, attention, GELU, cross-entropy, backward and AdamW with host syncs forbidden."""
    no_sync = getattr(pytest.importorskip("cupyx"), "allow_synchronize", None)   # deprecated in CuPy 10+
    if no_sync is None:
        pytest.skip("this CuPy has no cupyx.allow_synchronize")
    B, T, C, H, V = 2, 8, 32, 4, 50
    params = [tinygpt.nn.Parameter(tinygpt.tensor(rng.standard_normal(s).astype(np.float32) * 0.1, device="cuda"))
              for s in ((C,), (3 * C, C), (V, C))]
    x = tinygpt.tensor(rng.standard_normal((B, T, C)).astype(np.float32), device="cuda")
    t = tinygpt.tensor(rng.integers(0, V, (B, T)), device="cuda")
    opt = optim.AdamW(params, lr=1e-3)
    with no_sync(False):
        for _ in range(2):
            h = F.layer_norm(x, params[0])
            qkv = F.linear(h, params[1]).reshape(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            y = F.gelu(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))
            F.cross_entropy(F.linear(y, params[2]), t).backward()
            opt.step()
            opt.zero_grad()


@gpu
def test_gpu_float16_matmul_with_loss_scaling(precision, rng):
    a, b = rng.standard_normal((64, 128)).astype(np.float32), rng.standard_normal((128, 32)).astype(np.float32)
    exact = a @ b
    amp.set_matmul_precision("float16")
    out = backend.to_numpy(amp.matmul(backend.to_device(a, "cuda"), backend.to_device(b, "cuda")))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, exact, rtol=1e-2, atol=5e-2)
    w = tinygpt.nn.Parameter(tinygpt.tensor(rng.standard_normal((4, 8)).astype(np.float32), device="cuda"))
    xin = tinygpt.tensor(rng.standard_normal((16, 8)).astype(np.float32), device="cuda")
    opt, scaler = optim.SGD([w], lr=0.1), amp.LossScaler(init_scale=2.0 ** 30)   # overflows float16 at first
    losses = []
    for _ in range(40):
        loss = (F.linear(xin, w) ** 2).mean()
        scaler.scale_loss(loss).backward()
        scaler.step(opt)
        opt.zero_grad()
        losses.append(loss.item())
    assert scaler.skipped_steps >= 1 and scaler.scale < 2.0 ** 30
    assert losses[-1] < 0.5 * losses[0]
